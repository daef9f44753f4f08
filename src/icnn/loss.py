"""The filter loss of an interpretable conv-layer (paper Eq. 1-7, SPEC §2).

For one filter with maps ``X = {x}`` (after ReLU, before the mask) and templates ``T`` (see
:mod:`icnn.templates`)::

    Loss_f = -MI(X; T) = -sum_T p(T) sum_x p(x|T) log(p(x|T) / p(x))            (Eq. 1)
    p(x|T) = exp(tr(x.T)) / Z_T,   Z_T = sum_x exp(tr(x.T)),   tr(x.T) = sum_ij x_ij t_ij   (Eq. 2)
    p(x)   = sum_T p(T) p(x|T)

Two ways to optimise it:

* :func:`mutual_information_loss` -- the exact ``-MI`` over a mini-batch, differentiable by
  autograd, label-free, all in log space.
* :class:`FilterLoss` with ``mode="paper"`` -- the approximate gradient of Eq. 4 with the leading
  minus of the Appendix's derivation::

      dLoss_f/dx_ij = -p(T^) t^_ij p(x|T^) (log p(x|T^) - log p(x))                (Eq. 4)

  where ``T^ = T_mu^`` on images of the filter's category and ``T-`` elsewhere, ``Z_T`` is a
  running estimate (a constant for the gradient) and ``p(x)`` follows footnote 3.

Everything is computed in log space: ``exp`` is only ever taken of non-positive numbers (or of
differences clamped to float range), so activations of 1e4 give neither inf nor NaN.

Units. ``Z_T`` is a sum over the whole training set; we track ``mean_x exp(tr(x.T))`` instead,
i.e. ``q(x|T) = N p(x|T)``. The factor ``N`` cancels in ``log p(x|T) - log p(x)`` and only
rescales the gradient, which ``lambda`` absorbs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from .categories import assign_categories
from .mask import MU_MODES, locate_parts
from .templates import DISTANCES, default_alpha, default_tau, part_templates, template_priors, template_shape

MODES = ("paper", "exact", "posterior")
SCHEDULES = ("paper", "mean_max", "inverse_epoch", "constant")
WEIGHT_NORMS = ("batch_mean", "none")
Z_ESTIMATES = ("running", "epoch", "batch")
P_X = ("footnote", "exact")
MAP_NORMS = ("none", "batch")
WEIGHT_SIGNS = ("paper", "target", "negatives")
WEIGHT_MAGS = ("paper", "likelihood", "uniform")
Z_SCOPES = ("all", "category")

# log of the largest weight we let through in float32 (exp(80) ~ 5.5e34 < 3.4e38).
_LOG_WEIGHT_CAP = 80.0


# --------------------------------------------------------------------------------------------
# Exact -MI over a batch (Eq. 1) and its decomposition (Eq. 5-7)
# --------------------------------------------------------------------------------------------


def _template_scores(x: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """``tr(x.T)`` for every map and template: ``(B, C, h, w), (T, h, w) -> (B, C, T)``."""
    b, c, h, w = x.shape
    return (x.reshape(b * c, h * w) @ templates.reshape(-1, h * w).t()).reshape(b, c, -1)


def _log_likelihoods(scores: torch.Tensor, log_prior: torch.Tensor, log_z: torch.Tensor):
    """``log p(x|T)`` (B, C, T) and ``log p(x)`` (B, C) from scores and ``log Z_T`` (C, T)."""
    log_px_t = scores - log_z  # (B, C, T)
    log_px = torch.logsumexp(log_px_t + log_prior, dim=-1)  # (B, C)
    return log_px_t, log_px


def _check_maps(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected feature maps of shape (B, C, h, w), got {tuple(x.shape)}")
    return x if x.dtype == torch.float64 else x.float()


def _scores_and_prior(x, tau, beta, alpha, distance):
    h, w = x.shape[-2:]
    templates = part_templates(h, w, tau=tau, beta=beta, distance=distance).to(x.device, x.dtype)
    log_prior = template_priors(h, w, alpha=alpha).log().to(x.device, x.dtype)  # (T,)
    return _template_scores(x, templates), log_prior


def _neg_mi(scores: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Eq. 1 from template scores ``(B, C, T)`` with ``Z_T`` over the batch: ``(C,)``."""
    log_px_t, log_px = _log_likelihoods(scores, log_prior, torch.logsumexp(scores, dim=0))
    # sum_T p(T) sum_x p(x|T) (log p(x|T) - log p(x)); p(x|T) = exp(<= 0), never overflows.
    return -(log_prior.exp() * (log_px_t.exp() * (log_px_t - log_px[..., None])).sum(0)).sum(-1)


def _decompose(scores: torch.Tensor, log_prior: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 5-7 terms from template scores ``(B, C, T)`` (``Z_T`` over the batch)."""
    log_px_t, log_px = _log_likelihoods(scores, log_prior, torch.logsumexp(scores, dim=0))
    prior_entropy = -(log_prior.exp() * log_prior).sum()
    # joint p(T, x) = p(T) p(x|T) and posterior p(T|x) over the batch.
    log_joint = log_px_t + log_prior  # (B, C, T)
    log_post = log_joint - log_px[..., None]  # log p(T|x)
    log_post_pos = torch.logsumexp(log_post[..., :-1], dim=-1)  # log p(T+|x)  (B, C)
    log_post_neg = log_post[..., -1]  # log p(T-|x)
    px = log_px.exp()  # (B, C)

    def plogp(logp):
        return torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))

    inter = -(px * (plogp(log_post_pos) + plogp(log_post_neg))).sum(0)  # (C,)  Eq. 6
    log_tilde = log_post[..., :-1] - log_post_pos[..., None]  # log p~(T_mu|x)
    h_spatial = -plogp(log_tilde).sum(-1)  # H(T+|X=x), Eq. 7 with its minus  (B, C)
    joint_pos = torch.logsumexp(log_joint[..., :-1], dim=-1).exp()  # p(T+, x)
    spatial = (joint_pos * h_spatial).sum(0)
    prior_entropy = prior_entropy.expand_as(inter)
    return {
        "prior_entropy": prior_entropy,
        "inter_entropy": inter,
        "spatial_entropy": spatial,
        "neg_mi": -prior_entropy + inter + spatial,
    }


def mutual_information_loss(
    x: torch.Tensor,
    *,
    tau: float | None = None,
    beta: float = 4.0,
    alpha: float | None = None,
    distance: str = "l1",
) -> torch.Tensor:
    """Exact ``-MI(X; T)`` of Eq. 1 over a batch, per filter.

    ``X`` is the batch of maps of each filter (``p(x|T)`` normalised over the batch), ``T`` the
    ``h*w + 1`` templates with priors ``p(T_mu) = alpha / n^2``, ``p(T-) = 1 - alpha``.

    Args:
        x: ``(B, C, h, w)`` feature maps after ReLU.
        tau, beta, alpha, distance: template parameters (paper defaults when ``None``).

    Returns:
        ``(C,)`` tensor, differentiable w.r.t. ``x``. Computed in float32 (float64 if ``x`` is).
    """
    x = _check_maps(x)
    return _neg_mi(*_scores_and_prior(x, tau, beta, alpha, distance))


def mi_decomposition(
    x: torch.Tensor,
    *,
    tau: float | None = None,
    beta: float = 4.0,
    alpha: float | None = None,
    distance: str = "l1",
) -> dict[str, torch.Tensor]:
    """The three terms of Eq. 5, per filter (each ``(C,)``), over a batch.

    ``-MI = -H(T) + H(T'|X) + sum_x p(T+, x) H(T+|X=x)`` where ``T' = {T-, T+}`` (Eq. 6:
    inter-category entropy) and ``H(T+|X=x) = -sum_mu p~ log p~`` (Eq. 7 read as a true entropy:
    the printed equation drops the minus; with it the decomposition is exact).

    Returns:
        dict with ``prior_entropy`` (H(T)), ``inter_entropy`` (Eq. 6), ``spatial_entropy``
        (the last term of Eq. 5) and their sum ``neg_mi``.
    """
    x = _check_maps(x)
    return _decompose(*_scores_and_prior(x, tau, beta, alpha, distance))


# --------------------------------------------------------------------------------------------
# The training-time filter loss
# --------------------------------------------------------------------------------------------


@dataclass
class FilterLossConfig:
    """How the filter loss is optimised. Defaults: see docs/filter_loss.md for the measurements."""

    mode: str = "paper"  # "paper": Eq. 4 approximate gradient; "exact": autograd of Eq. 1 over the batch; "posterior": -log p(T^|x)
    lambda_: float = 0.01  # base weight; the schedule scales it
    warmup_epochs: int = 0  # lambda = 0 for the first epochs (train the task first, then the filters); t counts from here
    schedule: str = "inverse_epoch"  # "paper": lambda_*mean max x/t; "mean_max": lambda_*mean max x; "inverse_epoch": lambda_/t; "constant"
    weight_norm: str = "batch_mean"  # Eq. 4 weights divided by their mean magnitude per filter in the batch, or "none"
    z_estimate: str = "running"  # Z_T: "running" (EMA across batches), "epoch" (mean over the epoch so far), "batch"
    z_momentum: float = 0.9  # EMA momentum of the running Z_T
    p_x: str = "footnote"  # p(x): "footnote" (footnote 3: sum_T p(T) mean_x p(x|T)) or "exact" (per map)
    negative_weight: float = 1.0  # multiplier of the terms of images not of the filter's category
    tau: float | None = None  # template scale (None: 0.5 / n^2)
    beta: float = 4.0  # template slope
    alpha: float | None = None  # prior of positive templates (None: n^2 / (1 + n^2))
    distance: str = "l1"  # "l1" (paper) or "l2" (round templates)
    mu: str = "argmax"  # part location for T^: "argmax" (paper) or "centroid"
    map_norm: str = "none"  # "none": the paper's tr(x.T); "batch": maps divided by the batch mean of max_ij x (scale-free)
    sharpness: float = 1.0  # with map_norm="batch": templates are sharpness * shape (replaces tau)
    weight_sign: str = "paper"  # "paper": Eq. 4's sign, sign(log p(x|T^) - log p(x)); "target": always towards T^
    weight_mag: str = "paper"  # |w|: "paper" p(T^) q(x|T^) |log q(x|T^) - log q(x)|; "likelihood" p(T^) q(x|T^); "uniform" 1
    z_scope: str = "all"  # Z_T over "all" maps (paper) or "category": T_mu over the filter's category, T- over the rest

    def __post_init__(self):
        for name, allowed in (
            ("mode", MODES),
            ("schedule", SCHEDULES),
            ("weight_norm", WEIGHT_NORMS),
            ("z_estimate", Z_ESTIMATES),
            ("p_x", P_X),
            ("distance", DISTANCES),
            ("mu", MU_MODES),
            ("map_norm", MAP_NORMS),
            ("weight_sign", WEIGHT_SIGNS),
            ("z_scope", Z_SCOPES),
            ("weight_mag", WEIGHT_MAGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"filter loss {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.lambda_ < 0 or not math.isfinite(self.lambda_):
            raise ValueError(f"filter loss lambda must be a finite number >= 0, got {self.lambda_}")
        if not (self.sharpness > 0 and math.isfinite(self.sharpness)):
            raise ValueError(f"filter loss sharpness must be a finite number > 0, got {self.sharpness}")
        if self.warmup_epochs < 0:
            raise ValueError(f"filter loss warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.z_momentum < 1.0:
            raise ValueError(f"filter loss z_momentum must lie in [0, 1), got {self.z_momentum}")

    @classmethod
    def from_dict(cls, d: dict) -> "FilterLossConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown filter loss option(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    if _dist_ready():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def _all_reduce_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """``log sum_r exp(lse_r)`` over processes, stable: max-shift then sum."""
    if not _dist_ready():
        return lse
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (lse - m).exp()
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + s.log()


class FilterLoss(nn.Module):
    """Filter loss of one interpretable conv-layer, with its running statistics (SPEC §2).

    ``loss = filter_loss(x, labels)`` for maps ``x (B, C, h, w)`` after ReLU (before the mask)
    and class indices ``labels (B,)`` returns a scalar. Its *value* is ``lambda``-weighted
    ``-MI`` over the batch summed over filters (a diagnostic); its *gradient* is Eq. 4 (with the
    Appendix's minus) in ``mode="paper"``, or the exact gradient of the batch ``-MI`` in
    ``mode="exact"``.

    Running state (buffers, in ``state_dict``; all-reduced under ``torch.distributed`` so that
    k processes match one process with the same global batch):

    * ``log_z (C, T)``: ``log mean_x exp(tr(x.T))`` -- ``Z_T`` up to the constant ``N``.
    * ``class_sum (K, C)``, ``class_count (K,)``: per-class sums of ``sum_ij x_ij`` giving each
      filter's target category ``c^ = argmax_c mean_{I in I_c} sum_ij x_ij`` (paper §3.1).
    * ``epoch``, ``max_sum (C,)``, ``map_count``, ``active (C,)``: this epoch's
      ``mean_x max_ij x_ij`` (for lambda) and which filters fired at all.

    Args:
        num_filters: ``C``.
        num_classes: ``K`` (single-category: 2, with ``negative_class=0``).
        map_size: ``(h, w)`` of the maps.
        config: a :class:`FilterLossConfig` (keyword overrides apply on top).
        negative_class: a class that is never a filter's target (single-category negatives).
        target_classes: fix each filter's category instead of assigning it online.
    """

    def __init__(
        self,
        num_filters: int,
        num_classes: int,
        map_size: tuple[int, int],
        config: FilterLossConfig | None = None,
        *,
        negative_class: int | None = None,
        target_classes: torch.Tensor | int | None = None,
        **overrides,
    ):
        super().__init__()
        cfg = config or FilterLossConfig()
        if overrides:
            cfg = FilterLossConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        h, w = map_size
        self.num_filters, self.num_classes, self.map_size = int(num_filters), int(num_classes), (int(h), int(w))
        self.negative_class = negative_class
        if cfg.map_norm == "batch":
            self.tau = float(cfg.sharpness)  # maps are normalised to peak ~1: templates = sharpness * shape
        else:
            self.tau = default_tau(h, w) if cfg.tau is None else float(cfg.tau)
        self.alpha = default_alpha(h, w) if cfg.alpha is None else float(cfg.alpha)
        n_t = h * w + 1
        # Derived, not state: rebuilt from the config, so not saved.
        self.register_buffer("templates", part_templates(h, w, tau=self.tau, beta=cfg.beta, distance=cfg.distance), persistent=False)
        # template shapes t/tau, with T- as the last one (-1 everywhere)
        self.register_buffer("shapes", torch.cat((part_templates(h, w, tau=1.0, beta=cfg.beta, distance=cfg.distance)[:-1], -torch.ones(1, h, w))), persistent=False)
        self.register_buffer("log_prior", template_priors(h, w, alpha=self.alpha).log().float(), persistent=False)
        # Running state.
        self.register_buffer("log_z", torch.zeros(num_filters, n_t))
        self.register_buffer("z_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("class_sum", torch.zeros(num_classes, num_filters, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("epoch", torch.ones((), dtype=torch.long))
        self.register_buffer("max_sum", torch.zeros(num_filters, dtype=torch.float64))
        self.register_buffer("map_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("active", torch.zeros(num_filters, dtype=torch.bool))
        fixed = torch.full((num_filters,), -1, dtype=torch.long)
        if target_classes is not None:
            fixed = torch.as_tensor(target_classes, dtype=torch.long).expand(num_filters).clone()
            if (fixed < 0).any() or (fixed >= num_classes).any():
                raise ValueError(f"target_classes must lie in [0, {num_classes}), got {fixed.unique().tolist()}")
        self.register_buffer("fixed_targets", fixed)
        self._diag: dict[str, float] = {}

    # ---------------------------------------------------------------- state and schedule

    def start_epoch(self, epoch: int) -> None:
        """Begin epoch ``epoch`` (1-based): resets this epoch's activation statistics."""
        if epoch < 1:
            raise ValueError(f"epoch must be >= 1, got {epoch}")
        self.epoch.fill_(epoch)
        self.max_sum.zero_()
        self.map_count.zero_()
        self.active.zero_()
        if self.config.z_estimate == "epoch":
            self.z_count.zero_()

    def targets(self) -> torch.Tensor:
        """Each filter's target category ``(C,)``: fixed, or argmax of running class means."""
        allowed = torch.ones(self.num_classes, dtype=torch.bool, device=self.class_count.device)
        if self.negative_class is not None:
            allowed[self.negative_class] = False
        return assign_categories(self.class_sum, self.class_count, allowed, self.fixed_targets)

    def lambdas(self) -> torch.Tensor:
        """Per-filter weight ``lambda_f`` ``(C,)`` of the current epoch."""
        cfg = self.config
        t = float(self.epoch.item()) - cfg.warmup_epochs  # epochs of filter-loss training, 1-based
        lam = torch.full((self.num_filters,), cfg.lambda_ if t >= 1 else 0.0, dtype=torch.float64, device=self.max_sum.device)
        t = max(t, 1.0)
        if cfg.schedule in ("paper", "mean_max"):
            lam = lam * (self.max_sum / self.map_count.clamp_min(1.0))
        if cfg.schedule in ("paper", "inverse_epoch"):
            lam = lam / t
        return lam

    def diagnostics(self) -> dict[str, float]:
        """Last step's diagnostics: lambda, neg_mi, inter/spatial entropy, silent fraction, ..."""
        return dict(self._diag)

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def _update_statistics(self, x: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        b = x.shape[0]
        cfg = self.config
        # Z_T: log mean_x exp(tr(x.T)) over the (global) batch, folded into the running estimate.
        n = torch.tensor(float(b), dtype=torch.float64, device=x.device)
        _all_reduce_sum(n)
        if cfg.z_scope == "category":
            # T_mu over the maps of the filter's category, T- over the others: (B, C, T) selection
            is_target = (labels[:, None] == self.targets()[None, :])[..., None]  # (B, C, 1)
            col_pos = torch.ones(scores.shape[-1], dtype=torch.bool, device=x.device)
            col_pos[-1] = False
            sel = torch.where(col_pos, is_target, ~is_target)  # (B, C, T)
            masked = torch.where(sel, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.float64))
            lse = _all_reduce_logsumexp(torch.logsumexp(masked, dim=0))  # (C, T)
            cnt = sel.double().sum(0)
            _all_reduce_sum(cnt)
            batch_log_mean = torch.where(cnt > 0, lse - cnt.clamp_min(1).log(), self.log_z.double())
        else:
            lse = _all_reduce_logsumexp(torch.logsumexp(scores.double(), dim=0))  # (C, T)
            batch_log_mean = lse - n.log()
        if self.z_count.item() == 0 or cfg.z_estimate == "batch":
            new = batch_log_mean
        elif cfg.z_estimate == "running":
            m = cfg.z_momentum
            new = torch.logaddexp(self.log_z.double() + math.log(m), batch_log_mean + math.log1p(-m))
        else:  # "epoch": exact mean over the maps seen this epoch
            c = self.z_count
            new = torch.logaddexp(self.log_z.double() + (c / (c + n)).log(), batch_log_mean + (n / (c + n)).log())
        self.log_z.copy_(new.to(self.log_z.dtype))
        self.z_count += n
        # Per-class activation sums (targets) and this epoch's mean max (lambda), silent filters.
        total = x.double().sum(dim=(-2, -1))  # (B, C)
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).double()  # (B, K)
        class_sum, class_count = onehot.t() @ total, onehot.sum(0)
        max_sum = x.double().amax(dim=(-2, -1)).sum(0)
        active = (x.amax(dim=(0, 2, 3)) > 0).double()
        _all_reduce_sum(class_sum, class_count, max_sum, active)
        self.class_sum += class_sum
        self.class_count += class_count
        self.max_sum += max_sum
        self.map_count += n
        self.active |= active > 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.num_filters, *self.map_size):
            raise ValueError(
                f"filter loss expects maps (B, {self.num_filters}, {self.map_size[0]}, {self.map_size[1]}), got {tuple(x.shape)}"
            )
        labels = labels.reshape(-1).long()
        if not bool(torch.isfinite(x).all()):  # never fold a bad batch into the running state
            return (x.float().sum() * float("nan")).reshape(())
        cfg = self.config
        xf = x.float()
        if cfg.map_norm == "batch":
            # Scale-free maps: divide each filter's maps by their batch mean of max_ij x (with
            # gradient, like a norm layer), so the loss cannot be lowered by scaling activations
            # up -- only by where, and on which images, a filter fires.
            scale = xf.amax(dim=(-2, -1)).mean(0)  # (C,)
            if _dist_ready():
                scale = scale + (_all_reduce_mean(scale.detach()) - scale.detach())
            xf = xf / scale.clamp_min(1e-6)[None, :, None, None]
        # Template scores of every map: Z_T statistics, p(x), diagnostics. Differentiable only
        # in exact mode; the paper's gradient needs just tr(x.T^) (computed below).
        with torch.set_grad_enabled(cfg.mode != "paper" and torch.is_grad_enabled()):
            scores = _template_scores(xf, self.templates)  # (B, C, T)
        self._update_statistics(x.detach().float(), scores.detach(), labels)  # raw maps: lambda, targets, silence
        lam = self.lambdas().to(xf.dtype)  # (C,)

        with torch.no_grad():
            terms = _decompose(scores.detach(), self.log_prior)
        value = (lam * terms["neg_mi"]).sum()

        if cfg.mode == "exact":
            loss = (lam * _neg_mi(scores, self.log_prior)).sum()
            weights = None
        elif cfg.mode == "posterior":
            per_map = self._posterior_nll(xf, scores, labels)  # (B, C)
            loss = (lam * per_map.mean(0)).sum()
            loss = loss - loss.detach() + value
            weights = None
        else:
            surrogate, weights = self._paper_surrogate(xf, scores, labels)
            loss = (lam * surrogate).sum()
            loss = loss - loss.detach() + value  # value: lambda * -MI; gradient: Eq. 4

        self._record(terms, lam, weights)
        return loss

    def _target_templates(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of ``T^`` per map ``(B, C)`` (the unit of mu^, or ``h*w`` for ``T-``) and the
        ``(B, C)`` mask of maps whose image is of the filter's category."""
        b, c, h, w = x.shape
        is_target = labels[:, None] == self.targets()[None, :]
        with torch.no_grad():
            if self.config.mu == "argmax":
                unit = x.reshape(b, c, h * w).argmax(-1)
            else:
                mu = locate_parts(x, "centroid").round().long()
                unit = mu[..., 0] * w + mu[..., 1]
            t_hat = torch.where(is_target, unit, torch.full_like(unit, h * w))
        return t_hat, is_target

    def _posterior_nll(self, x: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``-log p(T^|x)`` per map ``(B, C)``, with ``p(T|x) = p(T) p(x|T) / p(x)``.

        A label-guided form of the conditional entropy ``H(T|X)`` that Eq. 1 minimises (``-MI =
        H(T|X) - H(T)``): the cross-entropy of the template posterior against the target
        template. Its gradient ``-(t^_ij - E_{p(T|x)} t_ij)`` has the direction of Eq. 4 (raise the
        map near mu^ on the filter's category, lower it elsewhere and on other categories) but
        vanishes once the posterior is confident, so activations cannot run away.
        """
        t_hat, is_target = self._target_templates(x, labels)
        log_joint = scores - self.log_z.to(scores.dtype) + self.log_prior  # (B, C, T), Z_T constant
        log_post = log_joint.gather(-1, t_hat[..., None]).squeeze(-1) - torch.logsumexp(log_joint, dim=-1)
        weight = torch.where(is_target, 1.0, self.config.negative_weight)
        return -log_post * weight

    def _paper_surrogate(self, x: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor):
        """Per-filter surrogate whose gradient is Eq. 4 with the Appendix's minus.

        Returns ``(C,)`` surrogate (sum over the batch of ``w * tr(x.T^)`` divided by B) and the
        detached weights ``w (B, C)``.
        """
        cfg = self.config
        b, c, h, w = x.shape
        log_z = self.log_z.to(x.dtype)  # (C, T), a constant for the gradient
        is_target = labels[:, None] == self.targets()[None, :]  # (B, C): image of the filter's category
        with torch.no_grad():
            neg = torch.full((b, c), h * w, dtype=torch.long, device=x.device)  # index of T-
            if cfg.mu == "argmax":
                t_hat = torch.where(is_target, x.reshape(b, c, h * w).argmax(-1), neg)  # (B, C)
                s_hat = scores.gather(-1, t_hat[..., None]).squeeze(-1)
                log_z_hat = log_z.gather(-1, t_hat.t()).t()
            else:
                # Centroid mu: T^ is a template centred between units; log Z of the nearest unit.
                mu = locate_parts(x, "centroid")
                shape = template_shape(mu, h, w, beta=cfg.beta, distance=cfg.distance)
                s_pos = self.tau * (x * shape).sum((-2, -1))
                near = mu.round().long()
                t_near = torch.where(is_target, near[..., 0] * w + near[..., 1], neg)
                s_hat = torch.where(is_target, s_pos, scores[..., -1])
                log_z_hat = log_z.gather(-1, t_near.t()).t()
                t_hat = t_near
            log_q_hat = s_hat - log_z_hat  # log q(x|T^)
            if cfg.p_x == "exact":
                log_q_x = torch.logsumexp(scores - log_z + self.log_prior, dim=-1)  # (B, C)
            else:  # footnote 3: p(x) ~ sum_T p(T) mean_x p(x|T) = 1/N, i.e. q(x) = 1
                log_q_x = torch.zeros_like(log_q_hat)
            log_prior_hat = self.log_prior[t_hat]
            ratio = log_q_hat - log_q_x
            # w = -p(T^) q(x|T^) (log q(x|T^) - log q(x)), magnitude in log space.
            log_mag = log_prior_hat + log_q_hat + ratio.abs().clamp_min(1e-30).log()
            if cfg.weight_mag == "likelihood":
                log_mag = log_prior_hat + log_q_hat
            elif cfg.weight_mag == "uniform":
                log_mag = torch.zeros_like(log_q_hat)
            sign = -torch.sign(ratio)
            if cfg.weight_sign == "target":
                sign = -torch.ones_like(ratio)
            elif cfg.weight_sign == "negatives":  # T- always pulls (activations down), T_mu as Eq. 4
                sign = torch.where(is_target, sign, -torch.ones_like(ratio))
            if cfg.weight_norm == "batch_mean":
                # divide by mean_b |w| per filter (over the global batch under DDP)
                lse = _all_reduce_logsumexp(torch.logsumexp(log_mag.double(), dim=0))
                n = torch.tensor(float(b), dtype=torch.float64, device=x.device)
                _all_reduce_sum(n)
                log_mag = log_mag - (lse - n.log()).to(log_mag.dtype)
            weights = sign * log_mag.clamp(max=_LOG_WEIGHT_CAP).exp()
            weights = torch.where(is_target, weights, weights * cfg.negative_weight)
        # tr(x.T^) with gradient: for T-, -tau*sum x; for T_mu, tau*sum x*shape(mu).
        if cfg.mu == "argmax":
            with torch.no_grad():
                shape = self.shapes.index_select(0, t_hat.reshape(-1)).reshape(b, c, h, w)
        tr_hat = self.tau * (x * shape).sum((-2, -1))
        if cfg.mu != "argmax":
            tr_hat = torch.where(is_target, tr_hat, -self.tau * x.sum((-2, -1)))
        surrogate = (weights * tr_hat).sum(0) / b  # (C,)
        return surrogate, weights

    @torch.no_grad()
    def _record(self, terms: dict, lam: torch.Tensor, weights: torch.Tensor | None) -> None:
        d = {
            "lambda": float(lam.mean()),
            "neg_mi": float(terms["neg_mi"].mean()),
            "inter_entropy": float(terms["inter_entropy"].mean()),
            "spatial_entropy": float(terms["spatial_entropy"].mean()),
            "silent_fraction": float(1.0 - self.active.double().mean()),
            "mean_max": float((self.max_sum / self.map_count.clamp_min(1.0)).mean()),
        }
        if weights is not None:
            d["weight_abs_mean"] = float(weights.abs().mean())
        self._diag = d
