"""A batch of LASSO problems with an intercept, solved together in torch.

The sparse fit of a node's filters (Zhang et al., CVPR 2019, §3.2; SPEC §1a Step 6b) is one such
problem per candidate node: design rows ``z_i = g_u * x_i``, targets ``y_i``, penalty
``lam = 1e-6 sqrt(|Omega_u|)``, with the paper's ``1/|Omega_u|`` scaling (sklearn uses ``1/(2n)``)::

    min_{theta, b}  (1/m) sum_r (z_r . theta + b - y_r)^2 + lam |theta|_1        (per problem)

The intercept is eliminated by centring (``b = mean(y) - mean(z) . theta``), which leaves
``F(theta) = 1/2 |Zc theta - yc|^2 + mu |theta|_1`` with ``mu = lam m / 2``. ``F`` is minimised
by FISTA (Beck & Teboulle 2009) with the gradient restart of O'Donoghue & Candes (2015) and step
``1 / L``, ``L`` = 1.1 x the power-iteration estimate of ``sigma_max(Zc)^2``. From a zero start
and with ``lam > 0`` the penalty is reached by continuation: ``mu`` starts at ``mu_max / 10``
(``mu_max = |Zc' yc|_inf``, where ``theta = 0`` is optimal) and is divided by 10 each time the
current problem is solved, warm-started (set to the final ``mu`` at once when the residual is
already within the tolerance). The paper's penalty is tiny, so without continuation FISTA would
spend its iterations on a dense near-least-squares iterate; along the path the support grows
from empty and stays near the LASSO's own (at most ``m - 1`` filters when ``m <= D``). A
nonzero warm start (a node's larger child's solution) starts at the final ``mu``.

A problem stops when its relative duality gap ``(F - F_dual) / F(0)`` at the final ``mu`` is at
most ``tol`` (the dual point is the scaled residual, as in sklearn), or after ``max_iter``
iterations. (With ``lam = 0`` the dual point is the residual itself and the "gap" is
``|res . Zc theta| / F(0)``, zero at a least-squares solution.) Problems of different sizes
share one padded batch: ``mask`` marks the real rows, and a solved problem leaves the batch
while the others go on, so a problem's solution does not depend on the batch it is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import TreeError


@dataclass
class LassoFit:
    theta: torch.Tensor  # (P, D)
    intercept: torch.Tensor  # (P,)
    iterations: torch.Tensor  # (P,) int64 FISTA iterations run
    gap: torch.Tensor  # (P,) relative duality gap at the end


def _lipschitz(zc: torch.Tensor, zt: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """``1.1 sigma_max(Zc)^2`` ``(P, 1, 1)`` by power iteration from a fixed random start."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(zc.shape[0], 1, zc.shape[2], generator=gen, dtype=zc.dtype).to(zc.device)
    for _ in range(iters):
        v = torch.bmm(torch.bmm(v, zt), zc)
        v = v / v.norm(dim=2, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return 1.1 * torch.bmm(v, zt).pow(2).sum(2, keepdim=True)


def _objective(zc, zt, yc, theta, mu):
    """``(F(theta), duality gap)`` ``(P,)`` each (module docstring); ``theta (P, 1, D)``."""
    res = yc - torch.bmm(theta, zt)  # (P, 1, m)
    mu = mu.flatten()
    primal = 0.5 * res.pow(2).sum((1, 2)) + mu * theta.abs().sum((1, 2))
    corr = torch.bmm(res, zc).abs().amax((1, 2))  # |Zc' res|_inf
    s = torch.where((corr > mu) & (mu > 0), mu / corr.clamp_min(torch.finfo(res.dtype).tiny), 1.0)
    nu = s[:, None, None] * res
    dual = (nu * yc).sum((1, 2)) - 0.5 * nu.pow(2).sum((1, 2))
    return primal, (primal - dual).abs()


def _momentum(n: int, dtype) -> torch.Tensor:
    """FISTA's ``(t_j - 1) / t_{j+1}`` for ``j`` steps since the last restart, ``(n + 1,)``."""
    t = [1.0]
    for _ in range(n + 1):
        t.append((1 + math.sqrt(1 + 4 * t[-1] ** 2)) / 2)
    return torch.tensor([(t[j] - 1) / t[j + 1] for j in range(n + 1)], dtype=dtype)


def lasso(
    z: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor | float,
    *,
    mask: torch.Tensor | None = None,
    theta0: torch.Tensor | None = None,
    max_iter: int = 500,
    tol: float = 1e-4,
    check: int = 10,
) -> LassoFit:
    """Solve ``P`` LASSO problems at once (module docstring).

    Args:
        z: design ``(P, m, D)`` (rows past a problem's size are ignored through ``mask``).
        y: targets ``(P, m)``.
        lam: penalty ``(P,)`` or one number, ``>= 0``.
        mask: ``(P, m)`` bool, the real rows of each problem (default: all).
        theta0: ``(P, D)`` warm starts; a problem with a nonzero start begins at its final
            penalty, one with a zero start follows the continuation path.
        max_iter: FISTA iterations at most (all continuation stages together).
        tol: relative duality gap at which a problem is solved.
        check: iterations between duality-gap checks.
    """
    if z.ndim != 3 or y.shape != z.shape[:2]:
        raise TreeError(f"lasso: expected z (P, m, D) and y (P, m), got {tuple(z.shape)} and {tuple(y.shape)}")
    p, m, d = z.shape
    w = torch.ones(p, m, dtype=z.dtype, device=z.device) if mask is None else mask.to(z.dtype)
    rows = w.sum(1)  # (P,)
    if (rows < 1).any():
        raise TreeError("lasso: a problem has no rows")
    lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device).expand(p)
    if (lam < 0).any() or not torch.isfinite(lam).all():
        raise TreeError("lasso: the penalty must be finite and >= 0")
    z_mean = (w[..., None] * z).sum(1) / rows[:, None]  # (P, D)
    y_mean = (w * y).sum(1) / rows
    zc = (z - z_mean[:, None]) * w[..., None]  # (P, m, D)
    zt = zc.transpose(1, 2)  # row vectors times matrices: much faster than bmm with (., 1) columns on CPU
    yc = ((y - y_mean[:, None]) * w)[:, None]  # (P, 1, m)
    mu = (lam * rows / 2)[:, None, None]  # the penalty of F = 1/2 |r|^2 + mu |theta|_1
    mu_max = torch.bmm(yc, zc).abs().amax(2, keepdim=True)
    theta = torch.zeros(p, 1, d, dtype=z.dtype, device=z.device) if theta0 is None else theta0.to(z)[:, None].clone()
    cold = (theta == 0).all(2, keepdim=True)
    mu_cur = torch.where((mu > 0) & cold, torch.maximum(mu, mu_max / 10), mu)
    big_l = _lipschitz(zc, zt).clamp_min(torch.finfo(z.dtype).tiny)
    scale = (0.5 * yc.pow(2).sum((1, 2))).clamp_min(torch.finfo(z.dtype).tiny)  # F(0)
    coef_table = _momentum(max_iter, z.dtype).to(z.device)  # indexed by since (P, 1, 1)

    out_theta = torch.zeros(p, d, dtype=z.dtype, device=z.device)
    iterations = torch.full((p,), max_iter, dtype=torch.long, device=z.device)
    gap = torch.zeros(p, dtype=z.dtype, device=z.device)
    act = torch.arange(p, device=z.device)  # the problems still running; the others are written out
    delta = torch.zeros_like(theta)  # theta - previous theta
    since = torch.zeros(p, 1, 1, dtype=torch.long, device=z.device)  # steps since the last restart
    rate, thr = -1 / big_l, mu_cur / big_l
    for it in range(1, max_iter + 1):  # the hot loop: few, fused operations
        v = torch.addcmul(theta, coef_table[since], delta)  # momentum
        step = torch.addcmul(v, torch.bmm(torch.baddbmm(yc, v, zt, beta=-1), zc), rate)
        new = step - step.clamp(-thr, thr)  # soft threshold
        delta = new - theta
        since = (since + 1) * (torch.bmm(v - new, delta.transpose(1, 2)) <= 0)  # gradient restart: since = 0
        theta = new
        if it % check and it != max_iter:
            continue
        primal, dual_gap = _objective(zc, zt, yc, theta, mu_cur)
        final = (mu_cur <= mu).flatten()
        solved = dual_gap / scale[act] <= tol
        advance = solved & ~final
        fitted = (primal - mu_cur.flatten() * theta.abs().sum((1, 2))) <= tol * scale[act]  # residual already at tol
        nxt = torch.where(fitted[:, None, None], mu, torch.maximum(mu_cur / 10, mu))
        mu_cur = torch.where(advance[:, None, None], nxt, mu_cur)
        since = torch.where(advance[:, None, None], 0, since)
        stop = (solved & final) | torch.tensor(it == max_iter)
        if stop.any():
            idx = act[stop]
            out_theta[idx] = theta[stop, 0]
            iterations[idx] = it
            unfinished = stop & ~final  # ran out of iterations before the last stage
            gap[idx] = torch.where(unfinished[stop], _objective(zc, zt, yc, theta, mu)[1][stop] / scale[idx],
                                   dual_gap[stop] / scale[idx])  # fmt: skip
            keep = ~stop
            act = act[keep]
            if len(act) == 0:
                break
            zc, zt, yc, mu, mu_cur, big_l = zc[keep], zt[keep], yc[keep], mu[keep], mu_cur[keep], big_l[keep]
            theta, delta, since = theta[keep], delta[keep], since[keep]
        rate, thr = -1 / big_l, mu_cur / big_l
    return LassoFit(out_theta, y_mean - (z_mean * out_theta).sum(1), iterations, gap)
