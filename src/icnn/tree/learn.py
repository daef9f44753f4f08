"""Growing the decision tree bottom-up (Zhang et al., CVPR 2019, §3.2; SPEC Method 1, Steps 2-6).

Start (P0): the root with one leaf per positive image ``i`` (``w_i = g_i``, ``alpha_i = 1``,
``b_i``), so ``h_i(x_i) = y_i``. Then merge greedily two second-layer nodes ``v, v'`` into a new
second-layer node ``u`` whose children they become, each time the pair of largest gain, while
the gain is positive (or until ``max_merges``, or one node is left). The objective is

    log E = sum_{i in Omega+} log P(x_i) - beta |V|,   P(x_i) = exp(gamma h_{v(i)}(x_i)) / Theta,
    Theta = sum_{j in Omega+} exp(gamma h_{v(j)}(x_j)),  gamma = 1 / E_{Omega+}[y],

``v(i)`` the second-layer node above image ``i`` and ``|V|`` the number of second-layer nodes,
so a merge changes it by (Step 6.2)

    Delta log E = beta + gamma sum_{i in Omega_u} (h_u(x_i) - h_{v(i)}(x_i)) + n (log Theta - log Theta').

The new node (Step 6.1): ``g_u = argmax_{|g|=1} sum_{i in Omega_u} cos(g_i, g) = normalise(sum g_i)``
(closed form; the ports call SLSQP), and ``alpha_u, b_u`` by the LASSO on rows ``g_u * x_i``
with ``lam = 1e-6 sqrt(|Omega_u|)`` (``lasso.py``). ``alpha_mode="binary"`` (default, the paper's
``alpha in {0, 1}^D``: the LASSO selects the filters) takes ``alpha = 1[theta != 0]`` and refits
``b`` by least squares; ``"relaxed"`` keeps ``w = theta * g_u`` and the LASSO's intercept.
Either way ``b_u`` is a least-squares intercept, so ``sum_{Omega_u} h_u = sum_{Omega_u} y``: the
linear term of the gain is zero for every merge (kept in the exact gain, where it is ~1e-13),
and the gain is ``beta + n (log Theta - log Theta')``, i.e. it rewards merges that lower Theta.

Two ways to find the pair (``mode``):

- ``"fast"`` (default): every pair scored in closed form with ``alpha = 1`` and the least-squares
  intercept. With ``S_v = sum g_i``, ``P[v, i] = S_v . x_i``, ``Q[v, v'] = sum_{i in v'} P[v, i]``
  and the Gram ``G = S S'``, a pair's ``h_u(x_i) = (P[v,i] + P[v',i]) / |S_v + S_v'| + b_vv'``
  needs no ``D``-vector, and a merge updates ``P``, ``Q``, ``G`` by adding rows. The gain is
  ``beta - n log(1 + dTheta / Theta)`` with ``dTheta = sum_{Omega_u} exp(gamma h_u) -
  exp(gamma h_{v(i)})``: Theta changes with every merge, but the pairs' order is that of
  ``dTheta``, which changes only for pairs with the new node. So ``dTheta`` of all pairs sits in
  a ``(K, K)`` buffer (log-space sums, no overflow), a merge recomputes the new node's row,
  ``O(|Omega_u| K + n)``, and cached row minima give the best pairs in ``O(K)``; the gains are
  then taken at the current Theta. The ``rerank`` best pairs are fitted by one batched LASSO
  (each warm-started from its larger child's solution) and the merge with the best *exact* gain
  is taken; growth stops when that gain is ``<= 0``.
- ``"exact"``: the buffer holds every pair's gain from its LASSO fit (all pairs of leaves at the
  start, then the new node against every other after each merge, batched): ``O(n^2)`` LASSOs,
  for small sets.

The paper's penalty is tiny next to the fit, so the LASSO is nearly least squares: for a node
with fewer images than filters it keeps few filters (at most ``|Omega_u| - 1`` at the optimum),
for a larger one nearly all; a filter constant over the node's images never enters. It is solved
to ``lasso_tol`` or ``lasso_iters`` iterations; where the latter stops it first the selection is
that of the solver's path (see ``lasso.py``).

Disagreements settled (SPEC §1c): the likelihood routes each image through its own second-layer
node (the form of the paper's derivation; [VR] routes by cosine); the gain is not divided by
``|Omega_u|`` ([VR] does); ``alpha`` comes from the LASSO with the paper's ``lam = 1e-6
sqrt(|Omega_u|)`` and ``1/|Omega_u|`` scaling ([VR] leaves it all ones, [GD] uses a fixed lam,
drops ``b`` and fits the post-softmax score); ``g_u`` is over all the leaves below ``u`` ([GD]:
the two children only); the denominator of ``P`` runs over ``Omega+`` (both ports; the paper's
text writes ``Omega``, but the tree sees only the positives).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..training.config import Config
from ..training.loop import progress as progress_bar
from .extract import SITES, Features
from .lasso import lasso
from .model import DecisionTree, TreeError

MODES = ("fast", "exact")
ALPHA_MODES = ("binary", "relaxed")
_CHUNK = 1 << 23  # LASSO design elements per batch in exact mode (64 MB of float64)


@dataclass
class TreeConfig(Config):
    """What the tree reads (``layer``, ``site``: for ``extract``) and how ``fit_tree`` grows it
    (module docstring)."""

    layer: str = "new"  # the interpretable layer whose maps the tree reads (new: the paper's top conv-layer)
    site: str = "post_mask"  # post_mask: the maps after the mask (paper); pre_mask: before it ([VR]; per-image rationales through the mask)
    beta: float = 1.0  # each merge adds beta to log E: the prior e^{-beta |V|} (paper: 1)
    gamma: float | None = None  # P(x) ~ exp(gamma h(x)); None: 1 / mean normalised y of the positives (paper)
    lambda_scale: float = 1e-6  # LASSO penalty lam = lambda_scale * sqrt(|Omega_u|) (paper: 1e-6)
    mode: str = "fast"  # "fast": closed-form pair scores, exact fits of the best `rerank`; "exact": every pair fitted
    alpha_mode: str = "binary"  # "binary": alpha = 1[theta != 0], b refit (paper); "relaxed": w = theta * g_u
    rerank: int = 4  # fast mode: best closed-form pairs fitted by the LASSO each step
    max_merges: int | None = None  # stop after this many merges (None: while a merge gains)
    lasso_iters: int = 100  # FISTA iterations per LASSO at most
    lasso_tol: float = 1e-4  # relative duality gap at which a LASSO is solved
    exact_limit: int = 400  # exact mode refuses more positive images (it fits O(n^2) LASSOs)

    CHOICES: ClassVar[dict[str, tuple]] = {"mode": MODES, "alpha_mode": ALPHA_MODES, "site": SITES}

    def __post_init__(self) -> None:
        bad = lambda name, why: TreeError(f"config.{name}: {why}, got {getattr(self, name)!r}", field=name,
                                          reason=f"{why}, got {getattr(self, name)!r}")  # fmt: skip
        if self.mode not in MODES:
            raise bad("mode", f"expected one of {', '.join(MODES)}")
        if self.alpha_mode not in ALPHA_MODES:
            raise bad("alpha_mode", f"expected one of {', '.join(ALPHA_MODES)}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise bad("beta", "expected a number >= 0")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise bad("gamma", "expected a number > 0 or None")
        if not (math.isfinite(self.lambda_scale) and self.lambda_scale >= 0):
            raise bad("lambda_scale", "expected a number >= 0")
        for name in ("rerank", "lasso_iters", "exact_limit"):
            if isinstance(getattr(self, name), bool) or int(getattr(self, name)) < 1:
                raise bad(name, "expected a positive integer")
        if self.max_merges is not None and int(self.max_merges) < 0:
            raise bad("max_merges", "expected an integer >= 0 or None")
        if not self.lasso_tol > 0:
            raise bad("lasso_tol", "expected a number > 0")


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, num: int) -> torch.Tensor:
    """``out[s, k] = log sum_{i: segment[i] = s} exp(values[i, k])``: ``(n, K) -> (num, K)``."""
    index = segment[:, None].expand_as(values)
    top = torch.full((num, values.shape[1]), -torch.inf, dtype=values.dtype).scatter_reduce(0, index, values, "amax")
    top = torch.where(torch.isfinite(top), top, 0.0)
    sums = torch.zeros_like(top).index_add_(0, segment, torch.exp(values - top[segment]))
    return torch.log(sums) + top


class _Growth:
    """The state of a growing tree (module docstring).

    The second-layer nodes live in slots ``0..n-1``: merging slots ``a < b`` keeps the new node
    in ``a`` and kills ``b``. A pair's gain is ``beta - n log(1 + dTheta / Theta)``, and
    ``dTheta = sum_{Omega_u} exp(gamma h_u) - exp(gamma h_{v(i)})`` changes only for pairs with a
    new node, so the symmetric buffer ``delta[a, b] = dTheta e^{-ref}`` (``+inf`` on the diagonal
    and for dead slots) is updated on the merged row and column, and the best pairs are its
    smallest entries whatever Theta is. Each row's minimum is cached, so finding them costs
    ``O(K)`` a step, not ``O(K^2)``.
    """

    def __init__(self, x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, b: torch.Tensor, gamma: float, cfg: TreeConfig):
        n, d = x.shape
        self.x, self.y, self.gamma, self.cfg, self.n = x, y, gamma, cfg, n
        self.direction = torch.zeros(2 * n, d, dtype=x.dtype)  # node arrays, trimmed at the end
        self.alpha = torch.zeros(2 * n, d, dtype=x.dtype)
        self.bias = torch.zeros(2 * n, dtype=x.dtype)
        self.parent = torch.full((2 * n,), -1, dtype=torch.long)
        self.gain = torch.zeros(2 * n, dtype=x.dtype)
        self.direction[:n], self.alpha[:n], self.bias[:n] = g, 1.0, b
        self.merges = 0

        self.slot = torch.arange(n)  # image -> slot of its second-layer node
        self.node = torch.arange(n)  # slot -> node index
        self.alive = torch.ones(n, dtype=torch.bool)
        self.h = (g * x).sum(1) + b  # (n,) h_{v(i)}(x_i); = y at the leaves
        self.theta = torch.zeros(n, d, dtype=x.dtype)  # (K, D) LASSO solution of each slot (warm starts)
        self.S = g.clone()  # (K, D) sum of the unit rationales below each slot
        self.Y = y.clone()  # (K,) sum of y
        self.count = torch.ones(n, dtype=x.dtype)
        self.C = gamma * self.h  # (K,) log sum_{i in v} exp(gamma h_v(x_i))
        self.ref = float(self.log_theta())
        self.P = g @ x.t()  # (K, n) S_v . x_i
        self.G = g @ g.t()  # (K, K) S_v . S_v'
        self.Q = self.P.clone()  # (K, K) S_v . sum_{i in v'} x_i
        self.delta = torch.full((n, n), torch.inf, dtype=x.dtype)
        a, t = torch.triu_indices(n, n, 1)
        if cfg.mode == "fast":
            norm, bias = self._pair(torch.arange(n)[:, None], torch.arange(n)[None])  # (K, K)
            own = self.P.diagonal()  # (n,) P[v(i), i]
            v = gamma * ((own[:, None] + self.P.t()) / norm[self.slot] + bias[self.slot])  # (n, K) image i with slot t
            r = _segment_logsumexp(v, self.slot, n)  # (K, K): over i in slot a, paired with slot t
            self._set(a, t, self._delta(a, t, torch.logaddexp(r, r.t())[a, t]))
        else:
            self._exact_pairs(a, t)
        self.row_min, self.row_arg = self.delta.min(1)

    # ---- the objective

    def log_theta(self) -> torch.Tensor:
        return torch.logsumexp(self.gamma * self.h, 0)

    def _delta(self, a: torch.Tensor, t: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """``dTheta e^{-ref}`` of merging slots ``a, t`` into a node with ``T = log sum_{Omega_u}
        exp(gamma h_u)``."""
        c = torch.logaddexp(self.C[a], self.C[t])  # the pair's images now
        return torch.exp(c - self.ref) * torch.expm1(T - c)

    def gains(self, delta: torch.Tensor) -> torch.Tensor:
        """``beta + n (log Theta - log Theta')`` from ``delta`` entries (``+inf`` -> ``-inf``)."""
        return self.cfg.beta - self.n * torch.log1p(delta * torch.exp(self.ref - self.log_theta()))

    def _set(self, a: torch.Tensor, t: torch.Tensor, values: torch.Tensor) -> None:
        self.delta[a, t] = self.delta[t, a] = values

    def best_pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` pairs ``a < t`` of smallest ``delta``: each lies in one of the ``2k`` rows of
        smallest minimum (a better pair rules out at most two rows)."""
        rows = self.row_min.topk(min(2 * k, self.n), largest=False).indices
        values, flat = self.delta[rows].flatten().topk(min(2 * k, len(rows) * self.n), largest=False)
        a, t = rows[flat // self.n], flat % self.n
        keep = torch.isfinite(values) & (a < t)  # each pair once (both its rows may be there)
        return a[keep][:k], t[keep][:k]

    def _update_rows(self, a: int, dead: int) -> None:
        """Row minima after row and column ``a`` changed and slot ``dead`` died."""
        self.row_min[dead] = torch.inf
        stale = (self.row_arg == a) | (self.row_arg == dead)
        stale[a] = True
        self.row_min[stale], self.row_arg[stale] = self.delta[stale].min(1)
        better = self.delta[:, a] < self.row_min
        self.row_min[better], self.row_arg[better] = self.delta[better, a], a

    # ---- closed form (alpha = 1)

    def _pair(self, a: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``|S_a + S_t|`` and the least-squares intercept of ``(S_a + S_t) / |.| . x`` over the
        images of ``a`` and ``t`` (broadcast slot indices)."""
        norm = (self.G[a, a] + 2 * self.G[a, t] + self.G[t, t]).clamp_min(0).sqrt().clamp_min(torch.finfo(self.x.dtype).tiny)
        cross = self.Q[a, a] + self.Q[a, t] + self.Q[t, a] + self.Q[t, t]  # (S_a + S_t) . sum x
        return norm, (self.Y[a] + self.Y[t] - cross / norm) / (self.count[a] + self.count[t])

    def _closed_row(self, a: int, members: torch.Tensor) -> torch.Tensor:
        """``T`` of slot ``a`` (images ``members``) paired with every slot ``(K,)``, closed form."""
        norm, bias = self._pair(torch.tensor(a), torch.arange(self.n))  # (K,)
        inner = self.gamma * ((self.P[a, members][:, None] + self.P[:, members].t()) / norm + bias)  # (|a|, K)
        norm, bias = self._pair(self.slot, torch.tensor(a))  # (n,) each image's slot with a
        own = self.P[self.slot, torch.arange(self.n)]
        outer = self.gamma * ((own + self.P[a]) / norm + bias)  # (n,) image i in the pair (slot(i), a)
        col = _segment_logsumexp(outer[:, None], self.slot, self.n)[:, 0]
        return torch.logaddexp(torch.logsumexp(inner, 0), col)

    # ---- exact fits

    def _fit(self, a: torch.Tensor, t: torch.Tensor) -> dict:
        """LASSO fits of the candidate nodes merging slots ``a[k]`` and ``t[k]``, batched; each
        warm-started from its larger child's solution (a leaf has none)."""
        members = (self.slot[None] == a[:, None]) | (self.slot[None] == t[:, None])  # (k, n)
        size = members.sum(1)
        width = int(size.max())
        rows = torch.argsort((~members).to(torch.int8), dim=1, stable=True)[:, :width]  # (k, m) members first
        valid = torch.arange(width)[None] < size[:, None]
        direction = self.S[a] + self.S[t]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.x.dtype).tiny)
        xs, ys = self.x[rows], self.y[rows]  # (k, m, D), (k, m)
        lam = self.cfg.lambda_scale * size.to(self.x.dtype).sqrt()
        start = self.theta[torch.where(self.count[a] >= self.count[t], a, t)]
        fit = lasso(xs * direction[:, None], ys, lam, mask=valid, theta0=start, max_iter=self.cfg.lasso_iters,
                    tol=self.cfg.lasso_tol)  # fmt: skip
        if self.cfg.alpha_mode == "binary":
            alpha = (fit.theta != 0).to(self.x.dtype)
            w = alpha * direction
            bias = (valid * (ys - (xs * w[:, None]).sum(-1))).sum(1) / size
        else:
            alpha, w, bias = fit.theta, fit.theta * direction, fit.intercept
        h = (xs * w[:, None]).sum(-1) + bias[:, None]  # (k, m) h_u on its images
        T = torch.logsumexp(torch.where(valid, self.gamma * h, -torch.inf), 1)
        linear = self.gamma * (valid * (h - self.h[rows])).sum(1)
        return {"direction": direction, "alpha": alpha, "bias": bias, "theta": fit.theta, "h": h, "rows": rows,
                "valid": valid, "T": T, "linear": linear}  # fmt: skip

    def _exact_pairs(self, a: torch.Tensor, t: torch.Tensor) -> None:
        """``delta`` of the pairs ``(a[k], t[k])`` from their LASSO fits, in chunks."""
        per = max(1, _CHUNK // (int((self.count[a] + self.count[t]).max()) * self.x.shape[1]))
        for i in range(0, len(a), per):
            ai, ti = a[i : i + per], t[i : i + per]
            self._set(ai, ti, self._delta(ai, ti, self._fit(ai, ti)["T"]))

    # ---- growth

    def step(self) -> bool:
        """One merge; ``False`` when no merge gains."""
        a, t = self.best_pairs(self.cfg.rerank if self.cfg.mode == "fast" else 1)
        if len(a) == 0:
            return False
        fit = self._fit(a, t)
        gain = self.gains(self._delta(a, t, fit["T"])) + fit["linear"]  # exact, with the zero linear term
        j = int(gain.argmax())
        if not gain[j] > 0:
            return False
        self._merge(int(a[j]), int(t[j]), {key: v[j] for key, v in fit.items()}, float(gain[j]))
        return True

    def _merge(self, a: int, t: int, fit: dict, gain: float) -> None:
        v = self.n + self.merges
        self.merges += 1
        self.direction[v], self.alpha[v], self.bias[v], self.gain[v] = fit["direction"], fit["alpha"], fit["bias"], gain
        self.parent[self.node[a]] = self.parent[self.node[t]] = v
        members = fit["rows"][fit["valid"]]
        self.slot[members] = a
        self.node[a], self.alive[t] = v, False
        self.h[members] = fit["h"][fit["valid"]]
        self.C[a], self.theta[a] = fit["T"], fit["theta"]
        self.S[a] += self.S[t]
        self.Y[a] += self.Y[t]
        self.count[a] += self.count[t]
        self.P[a] += self.P[t]
        row = self.G[a] + self.G[t]
        self.G[a], self.G[:, a], self.G[a, a] = row, row, row[a] + row[t]
        row, col = self.Q[a] + self.Q[t], self.Q[:, a] + self.Q[:, t]
        self.Q[a], self.Q[:, a], self.Q[a, a] = row, col, row[a] + row[t]
        self.delta[t], self.delta[:, t] = torch.inf, torch.inf
        others = torch.nonzero(self.alive & (torch.arange(self.n) != a)).flatten()
        if len(others):
            new = torch.full_like(others, a)
            if self.cfg.mode == "fast":
                self._set(new, others, self._delta(new, others, self._closed_row(a, members)[others]))
            else:
                self._exact_pairs(new, others)
        self._update_rows(a, t)

    def tree(self, config: dict) -> DecisionTree:
        root = self.n + self.merges
        self.parent[self.node[self.alive]] = root
        keep = slice(0, root + 1)
        return DecisionTree(self.direction[keep].clone(), self.alpha[keep].clone(), self.bias[keep].clone(),
                            self.parent[keep].clone(), self.gain[keep].clone(), self.gamma, config)  # fmt: skip


def fit_tree(features: Features, config: TreeConfig | None = None, *, progress: bool = False) -> DecisionTree:
    """Grow the decision tree over the positive images of ``features`` (module docstring).

    Returns a :class:`DecisionTree` whose leaves ``0..n-1`` are the positive rows of
    ``features`` in order.
    """
    cfg = config if config is not None else TreeConfig()
    if not isinstance(features, Features):
        raise TreeError(f"features: expected icnn.tree.Features, got {type(features).__name__}")
    pos = features.select(features.positive)
    n = len(pos)
    if n == 0:
        raise TreeError("features: no positive images to grow the tree from")
    if cfg.mode == "exact" and n > cfg.exact_limit:
        raise TreeError(f"config.mode: 'exact' fits O(n^2) LASSOs; {n} positive images exceed exact_limit={cfg.exact_limit} (use 'fast')")
    x, g, y, b = (t.double().cpu() for t in (pos.x, pos.g, pos.y, pos.b))
    if not all(torch.isfinite(t).all() for t in (x, g, y, b)):
        raise TreeError("features: x, g, y and b must be finite")
    mean_y = float(y.mean())
    if cfg.gamma is None and not mean_y > 0:
        raise TreeError(f"features: gamma = 1 / E[y] needs a positive mean score of the positive images, got {mean_y:.4g} "
                        "(wrong target class? or set config.gamma)")  # fmt: skip
    gamma = cfg.gamma if cfg.gamma is not None else 1.0 / mean_y
    growth = _Growth(x, g, y, b, gamma, cfg)
    for _ in progress_bar(range(n - 1), enabled=progress, total=n - 1, desc="tree merges"):  # a merge retires one node
        if (cfg.max_merges is not None and growth.merges >= cfg.max_merges) or not growth.step():
            break
    return growth.tree(asdict(cfg))
