"""The training-time filter loss of one interpretable conv-layer (paper Eq. 1-4, SPEC §2).

``loss = FilterLoss(...)(x, labels)`` for maps ``x (B, C, h, w)`` after ReLU (before the mask).
Its *value* is the lambda-weighted ``-MI`` of Eq. 1 over the batch, summed over filters (a
diagnostic); its *gradient* is that of one of three objectives (``mode``), each a short function
below over the shared running statistics (``state.FilterStatistics``):

* ``"paper"`` -- the approximate gradient of Eq. 4 with the leading minus of the Appendix::

      dLoss_f/dx_ij = -p(T^) t^_ij p(x|T^) (log p(x|T^) - log p(x))                (Eq. 4)

  ``T^ = T_mu^`` (at the map's argmax) on images of the filter's category, ``T-`` elsewhere,
  ``Z_T`` a running estimate (a constant for the gradient), ``p(x)`` as footnote 3 (``q(x) = 1``)
  or exact. Its weight has the sign of ``log p(x|T^) - log p(x)``: descent pulls a map towards
  ``T^`` only where it already fits ``T^`` better than the typical map, and pushes it away
  elsewhere -- a negative image that fires above the batch's typical level is pushed to fire
  *more* (docs/filter_loss.md measures what that does: filters that collapse onto one detector
  and fire harder on negatives than on their category). ``weight_sign``/``weight_mag``/``z_scope``
  are the variants measured against it.
* ``"posterior"`` -- ``-log p(T^|x)``, the cross-entropy of the template posterior
  ``p(T|x) = p(T) p(x|T) / p(x)`` against the target template: the label-guided conditional
  entropy ``H(T|X)`` of Eq. 1 (``-MI = H(T|X) - H(T)``). Gradient ``-(t^ - E_p(T|x) t)``: towards
  ``T^`` always (a negative is always pushed towards silence), vanishing once the posterior is
  confident. Computed in closed form, value and gradient (:mod:`.posterior`), not by autograd.
* ``"exact"`` -- autograd of Eq. 1 over the batch (label-free).

``diversity`` adds the filters' competition for positions (:func:`position_collision`): nothing
in Eq. 1 is shared between filters, so every filter of a dense layer can become the same detector
(docs/filter_loss.md measures it); the collision of their posteriors over positions, per image,
keeps them at different parts, and ``decorrelation`` (:func:`peak_decorrelation`) keeps their
responses from being copies of each other (redundancy reduction). Their weights are per filter
(``diversity * C * collision``) and not scheduled by lambda. With ``adapt_rate`` the two weights
are the multipliers of the collapse limits rather than constants: each step scales them by
``exp(adapt_rate * (measured / target - 1))``, with the batch's share of a category's firing
filters at an image's commonest unit (:func:`batch_collapse`) held at ``mode_target`` and the
mean correlation of their peaks held at ``corr_target``. A dataset whose filters do not pile up
then gets little of either term (each term costs stability); one whose filters collapse gets
as much as it needs (docs/filter_loss.md, session 13).

``forward(x, labels, units)`` takes the part locations to target (flat unit indices ``(B, C)``)
instead of each map's argmax ``mu^``: the paper's ``T^ = T_mu^`` is the default; research probes
(``benchmarks/filter_probe.py --pairs``, ``--parts``) pass consensus or discovered locations.

``map_norm="batch"`` divides each filter's maps by their batch mean of ``max_ij x`` (with
gradient), so the loss cannot be lowered by scaling activations; ``sharpness`` then replaces
``tau`` as the template scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..templates import DISTANCES, default_alpha, default_tau, part_templates, template_priors
from .mi import decompose, neg_mi, neg_mi_from_posterior, template_scores
from .posterior import batch_exp, posterior_terms, score_maps
from .state import SCHEDULES, Z_ESTIMATES, Z_SCOPES, FilterStatistics, all_reduce_logsumexp, all_reduce_mean, all_reduce_sum, dist_ready

MODES = ("paper", "exact", "posterior")
WEIGHT_NORMS = ("batch_mean", "none")
P_X = ("footnote", "exact")
MAP_NORMS = ("none", "batch")
WEIGHT_SIGNS = ("paper", "target", "negatives")
WEIGHT_MAGS = ("paper", "likelihood", "uniform")
CATEGORY_RULES = ("activation", "even")
_LOG_SCALE_RANGE = math.log(1000.0)  # adapt_rate: the factors on diversity and decorrelation stay within 1000x of the config's
_LOG_WEIGHT_CAP = 80.0  # log of the largest Eq. 4 weight let through in float32 (exp(80) ~ 5.5e34)


@dataclass
class FilterLossConfig:
    """How the filter loss is optimised (docs/filter_loss.md has the measurements behind each)."""

    mode: str = "paper"  # paper: Eq. 4's approximate gradient; posterior: -log p(T^|x); exact: autograd of Eq. 1
    lambda_: float = 0.01  # base weight; the schedule scales it
    warmup_epochs: int = 0  # lambda = 0 for the first epochs; the schedule's t counts from here
    schedule: str = "inverse_epoch"  # paper: lambda * mean max x / t; inverse_epoch: lambda / t; constant
    z_estimate: str = "running"  # Z_T: running (EMA across batches) or batch
    z_momentum: float = 0.9  # EMA momentum of the running Z_T
    z_scope: str = "all"  # Z_T over all maps (paper), or category: T_mu over the filter's category, T- over the rest
    weight_norm: str = "batch_mean"  # paper mode: Eq. 4 weights divided by their mean magnitude per filter in the batch, or none
    p_x: str = "footnote"  # paper mode: p(x) by footnote 3 (q(x) = 1) or exact (per map)
    weight_sign: str = "paper"  # paper mode: Eq. 4's sign; target: always towards T^; negatives: T- always towards silence
    weight_mag: str = "paper"  # paper mode: |w| = p(T^) q(x|T^) |log q(x|T^) - log q(x)|; likelihood: p(T^) q(x|T^); uniform: 1
    tau: float | None = None  # template scale (None: 0.5 / n^2)
    beta: float = 4.0  # template slope
    alpha: float | None = None  # prior of the positive templates (None: n^2 / (1 + n^2))
    distance: str = "l1"  # l1 (paper) or l2 (round templates)
    map_norm: str = "none"  # none: the paper's tr(x.T); batch: maps divided by their batch mean of max_ij x (scale-free)
    sharpness: float = 1.0  # with map_norm=batch: templates are sharpness * shape (replaces tau)
    diversity: float = 0.0  # weight of the filters' competition for positions (collision of their posteriors; 0: the paper)
    decorrelation: float = 0.0  # weight of the decorrelation of the filters' peak responses over their category's images (0: the paper)
    adapt_rate: float = 0.0  # > 0: diversity and decorrelation are starting weights, scaled every step by exp(rate * (measured / target - 1)) to hold the batch's share of filters at the commonest unit at mode_target and their mean peak correlation at corr_target; 0: fixed weights
    mode_target: float = 0.15  # with adapt_rate: the share of a category's firing filters at an image's commonest unit that diversity holds
    corr_target: float = 0.2  # with adapt_rate: the mean correlation of two filters' peaks over their category's images that decorrelation holds
    categories: str = "activation"  # each filter's category: activation (§3.1, the class activating it most, online) or even (f mod K, fixed)

    def __post_init__(self):
        choices = {"mode": MODES, "schedule": SCHEDULES, "weight_norm": WEIGHT_NORMS, "z_estimate": Z_ESTIMATES,
                   "z_scope": Z_SCOPES, "p_x": P_X, "distance": DISTANCES, "map_norm": MAP_NORMS,
                   "weight_sign": WEIGHT_SIGNS, "weight_mag": WEIGHT_MAGS, "categories": CATEGORY_RULES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"filter loss {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lambda_", "diversity", "decorrelation", "adapt_rate"):
            v = getattr(self, name)
            if v < 0 or not math.isfinite(v):
                raise ValueError(f"filter loss {name.rstrip('_')} must be a finite number >= 0, got {v}")
        if not (self.sharpness > 0 and math.isfinite(self.sharpness)):
            raise ValueError(f"filter loss sharpness must be a finite number > 0, got {self.sharpness}")
        for name in ("mode_target", "corr_target"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"filter loss {name} must lie in (0, 1), got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"filter loss warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.z_momentum < 1.0:
            raise ValueError(f"filter loss z_momentum must lie in [0, 1), got {self.z_momentum}")

    @classmethod
    def from_dict(cls, d: dict) -> "FilterLossConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown filter loss option(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def target_templates(units: torch.Tensor, is_target: torch.Tensor, num_units: int) -> torch.Tensor:
    """Index of ``T^`` per map ``(B, C)``: ``units``, each map's ``mu^ = argmax_ij x`` (row-major), on
    images of the filter's category, ``num_units = h*w`` (``T-``) elsewhere. No gradient."""
    return torch.where(is_target, units, torch.full_like(units, num_units))


def paper_weights(scores, t_hat, log_z, log_prior, is_target, cfg: FilterLossConfig) -> torch.Tensor:
    """Eq. 4's per-map weights ``w (B, C)`` (detached): ``dLoss/dx = w t^``."""
    with torch.no_grad():
        log_q_hat = scores.gather(-1, t_hat[..., None])[..., 0] - log_z.gather(-1, t_hat.t()).t()  # log q(x|T^)
        log_q_x = torch.logsumexp(scores - log_z + log_prior, dim=-1) if cfg.p_x == "exact" else torch.zeros_like(log_q_hat)
        ratio = log_q_hat - log_q_x
        log_prior_hat = log_prior[t_hat]
        log_mag = {"paper": log_prior_hat + log_q_hat + ratio.abs().clamp_min(1e-30).log(),
                   "likelihood": log_prior_hat + log_q_hat, "uniform": torch.zeros_like(ratio)}[cfg.weight_mag]  # fmt: skip
        sign = -torch.sign(ratio)  # w = -p(T^) q(x|T^) (log q(x|T^) - log q(x))
        if cfg.weight_sign == "target":
            sign = -torch.ones_like(sign)
        elif cfg.weight_sign == "negatives":  # T- always pulls (activations down)
            sign = torch.where(is_target, sign, -torch.ones_like(sign))
        if cfg.weight_norm == "batch_mean":  # divide by mean_b |w| per filter, over the global batch
            n = torch.tensor(float(scores.shape[0]), dtype=torch.float64, device=scores.device)
            all_reduce_sum(n)
            log_mag = log_mag - (all_reduce_logsumexp(torch.logsumexp(log_mag.double(), dim=0)) - n.log()).to(log_mag.dtype)
        return sign * log_mag.clamp(max=_LOG_WEIGHT_CAP).exp()


def template_posterior(scores, log_z, log_prior) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(T|x)`` and ``p(T|x)`` ``(B, C, T)``, ``Z_T`` a constant: the NLL and the collision share them."""
    log_post = torch.log_softmax(scores + (log_prior - log_z), dim=-1)
    return log_post, log_post.exp()


def position_collision(post, is_target) -> torch.Tensor:
    """How much a layer's filters pile onto the same positions, per image of their category.

    With ``p_f(u) = p(T_u | x_f)`` the posterior ``post (B, C, T)`` of filter ``f``'s map over the
    part templates (positions ``u``; the rest of its mass is on ``T-``, the last) and ``P(u)`` its
    mean over the filters of the image's category, the collision is ``U sum_u P(u)^2``: 1 when
    the filters' parts spread evenly over the ``U`` positions, ``U`` when every filter puts its
    part at the same unit, less where filters are silent (their mass sits on ``T-``). Averaged
    over the images with at least one such filter; differentiable through ``post``.
    """
    w = is_target.to(post.dtype)  # (B, C): the filters of this image's category
    count = w.sum(1)  # (B,)
    p = torch.bmm(w[:, None, :], post)[:, 0, :-1] / count.clamp_min(1)[:, None]  # (B, U): sum_f w p_f(u)
    per_image = p.shape[-1] * p.pow(2).sum(-1)
    ok = count > 0
    return per_image[ok].mean() if bool(ok.any()) else post.sum() * 0


def category_z_scores(peaks: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor):
    """Per category with at least 3 images and 2 filters in the batch: its filters' peaks over its
    images, standardised per filter, ``z (n, F)`` (``corr = z^T z / (n - 1)``; the std has an
    epsilon, so a filter constant over them counts as uncorrelated)."""
    for c in targets.unique().tolist():
        s = peaks[labels == c][:, targets == c]  # (n, F)
        if s.shape[0] >= 3 and s.shape[1] >= 2:
            yield (s - s.mean(0)) / (s.std(0) + 1e-3)


def peak_decorrelation(peaks: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Redundancy of a layer's filters: the mean squared correlation, between two filters of one
    category, of their peak responses ``peaks = max_ij x (B, C)`` over that category's images in
    the batch (0: no filter's response predicts another's; 1: copies). Differentiable; categories
    with fewer than 3 images or 2 filters in the batch drop out."""
    terms = []
    for z in category_z_scores(peaks, labels, targets):
        n, f = z.shape
        gram = z @ z.t() if n < f else z.t() @ z  # the smaller of z z^T, z^T z: the same ||.||_F
        off = gram.pow(2).sum() - z.pow(2).sum(0).pow(2).sum()  # sum_{f != g} (z^T z)_fg^2
        terms.append(off / ((n - 1) ** 2 * f * (f - 1)))
    return torch.stack(terms).mean() if terms else peaks.sum() * 0


@torch.no_grad()
def batch_collapse(peaks: torch.Tensor, units: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, num_units: int) -> torch.Tensor:
    """``[mode share, mean peak correlation]`` of a layer's filters on this batch (the two figures
    ``adapt_rate`` holds at their targets; ``icnn.metrics.collapse`` measures them on a whole set):
    the share of the category's firing filters at each image's commonest unit, averaged over the
    images with any, and the mean correlation of two filters' peaks over their category's images
    (categories as in :func:`category_z_scores`; NaN when none is left)."""
    firing = (labels[:, None] == targets[None, :]) & (peaks > 0)  # (B, C)
    counts = torch.zeros(peaks.shape[0], num_units, dtype=peaks.dtype, device=peaks.device)
    counts.scatter_add_(1, units, firing.to(peaks.dtype))
    n = firing.sum(1)
    ok = n > 0
    mode = (counts.amax(1)[ok] / n[ok]).mean() if bool(ok.any()) else peaks.new_tensor(float("nan"))
    corr = [(z.sum(1).pow(2).sum() - z.pow(2).sum()) / ((z.shape[0] - 1) * z.shape[1] * (z.shape[1] - 1))  # mean_{f != g} corr_fg
            for z in category_z_scores(peaks, labels, targets)]  # fmt: skip
    return torch.stack((mode, torch.stack(corr).mean() if corr else peaks.new_tensor(float("nan"))))


def posterior_nll(log_post, t_hat) -> torch.Tensor:
    """``-log p(T^|x)`` per map ``(B, C)`` from :func:`template_posterior`'s ``log_post``; gradient
    (``Z_T`` a constant) ``-(t^ - E_p(T|x) t)``."""
    return -log_post.gather(-1, t_hat[..., None])[..., 0]


class FilterLoss(nn.Module):
    """Filter loss of one interpretable conv-layer, with its running statistics (module doc).

    Args:
        num_filters: ``C``.
        num_classes: ``K`` (single-category: 2, with ``negative_class=0``).
        map_size: ``(h, w)`` of the maps.
        config: a :class:`FilterLossConfig` (keyword overrides apply on top).
        negative_class: a class that is never a filter's target (single-category negatives).
        target_classes: fix each filter's category instead of assigning it online.
    """

    def __init__(self, num_filters: int, num_classes: int, map_size: tuple[int, int], config: FilterLossConfig | None = None, *,
                 negative_class: int | None = None, target_classes: torch.Tensor | int | None = None, **overrides):  # fmt: skip
        super().__init__()
        cfg = config or FilterLossConfig()
        self.config = cfg = FilterLossConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
        h, w = map_size
        self.num_filters, self.num_classes, self.map_size = int(num_filters), int(num_classes), (int(h), int(w))
        self.negative_class = negative_class
        tau = float(cfg.sharpness) if cfg.map_norm == "batch" else (default_tau(h, w) if cfg.tau is None else float(cfg.tau))
        self.tau = tau
        alpha = default_alpha(h, w) if cfg.alpha is None else float(cfg.alpha)
        # derived from the config, not state: not saved
        self.register_buffer("templates", part_templates(h, w, tau=tau, beta=cfg.beta, distance=cfg.distance), persistent=False)
        self.register_buffer("log_prior", template_priors(h, w, alpha=alpha).log().float(), persistent=False)
        if cfg.categories == "even" and target_classes is None:  # as many filters per class, fixed from the start
            classes = torch.tensor([c for c in range(self.num_classes) if c != negative_class])
            target_classes = classes[torch.arange(self.num_filters) % len(classes)]
        self.stats = FilterStatistics(num_filters, h * w + 1, num_classes, negative_class=negative_class, target_classes=target_classes)
        if cfg.adapt_rate > 0:  # log of the factors on diversity and decorrelation (saved: resume continues them)
            self.register_buffer("log_scale", torch.zeros(2))
        self._diag: dict[str, float] = {}
        self._pending: Callable[[], torch.Tensor] | None = None  # the last step's scores (B, C, T), when asked

    def start_epoch(self, epoch: int) -> None:
        """Begin epoch ``epoch`` (1-based): lambda's schedule, this epoch's statistics."""
        self.stats.start_epoch(epoch)

    def targets(self) -> torch.Tensor:
        """Each filter's category ``(C,)``."""
        return self.stats.targets()

    def lambdas(self) -> torch.Tensor:
        """Per-filter weight ``lambda_f`` ``(C,)`` of the current epoch."""
        return self.stats.lambdas(self.config.lambda_, self.config.schedule, self.config.warmup_epochs)

    def diagnostics(self) -> dict[str, float]:
        """Last step's: lambda, neg_mi, inter/spatial entropy, silent fraction, mean max, ...
        (the Eq. 5-7 terms are computed here, from the last step's scores, not at every step)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with torch.no_grad():
                terms = decompose(pending(), self.log_prior)
            self._diag.update({k: float(terms[k].mean()) for k in ("neg_mi", "inter_entropy", "spatial_entropy")})
        return dict(self._diag)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.num_filters, *self.map_size):
            raise ValueError(f"filter loss expects maps (B, {self.num_filters}, {self.map_size[0]}, {self.map_size[1]}), got {tuple(x.shape)}")
        labels = labels.reshape(-1).long()
        b, c, h, w = x.shape
        if not bool(torch.isfinite(x.detach().reshape(b, c, h * w).sum(-1, dtype=torch.float32)).all()):  # never fold a bad batch in
            return (x.float().sum() * float("nan")).reshape(())
        xf = x.float()
        if self.config.map_norm == "batch":  # like a norm layer: with gradient, the same scale on every process
            scale = xf.amax(dim=(-2, -1)).mean(0)  # (C,)
            if dist_ready():
                scale = scale + (all_reduce_mean(scale.detach()) - scale.detach())
            xf = xf / scale.clamp_min(1e-6)[None, :, None, None]
        if self.config.mode == "posterior":
            return self._posterior(x, xf, labels, units)
        return self._autograd(x, xf, labels, units)

    def _check_units(self, units: torch.Tensor | None, own_units: torch.Tensor) -> torch.Tensor:
        """The target locations: each map's argmax ``own_units`` unless ``units (B, C)`` are given."""
        if units is None:
            return own_units
        (b, c), (h, w) = own_units.shape, self.map_size
        if tuple(units.shape) != (b, c) or bool(((units < 0) | (units >= h * w)).any()):
            raise ValueError(f"filter loss units must be (B, C) = ({b}, {c}) flat unit indices in [0, {h * w}), got {tuple(units.shape)}")
        return units

    def _fold(self, x: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, peaks: torch.Tensor,
              lse: torch.Tensor | None = None) -> bool:  # fmt: skip
        """This batch into the running statistics (``scores (B, C, T)``, any layout; ``lse`` their
        log-sum-exp over the batch if computed); whether ``log_z`` is now the batch's own."""
        cfg = self.config
        return self.stats.update(x.detach().float(), scores.detach(), labels, estimate=cfg.z_estimate, scope=cfg.z_scope,
                                 momentum=cfg.z_momentum, peak=peaks.detach() if cfg.map_norm == "none" else None, lse=lse)  # fmt: skip

    def _posterior(self, x, xf, labels, units) -> torch.Tensor:
        """``mode="posterior"`` by :mod:`.posterior`: one matmul and one exp over the scores, the
        gradient written out (the same value and gradient as autograd through log-softmax, gather
        and the collision; docs/benchmarks.md, session 13)."""
        cfg, (b, c, h, w) = self.config, x.shape
        scores, peaks, own_units = score_maps(xf, self.templates)  # (B, T, C), (B, C), (B, C); no gradient
        units = self._check_units(units, own_units)
        # one exp for Z_T and the posterior; the scores themselves are kept only where -MI needs them
        keep = cfg.z_estimate != "batch" or cfg.z_scope != "all" or dist_ready()
        shared = batch_exp(scores, in_place=not keep)
        own_z = self._fold(x, scores.transpose(1, 2), labels, peaks, shared.lse)  # without keep only lse is read
        lam = self.lambdas().to(xf.dtype)  # (C,)
        maps = xf.detach()
        self._pending = lambda: template_scores(maps, self.templates)  # the Eq. 5-7 terms of diagnostics(), computed when asked
        targets = self.targets()
        is_target = labels[:, None] == targets[None, :]  # (B, C): image of the filter's category
        t_hat = target_templates(units, is_target, h * w)
        active = bool((lam > 0).any())
        div_w, decor_w = self.term_weights()
        diverse = cfg.diversity > 0 and active
        terms = posterior_terms(xf, scores, peaks, own_units, self.stats.log_z.to(xf.dtype), self.log_prior, self.templates, t_hat, lam,
                                is_target, collision_weight=div_w * self.num_filters if diverse else 0.0, shared=shared)  # fmt: skip
        with torch.no_grad():  # the value: -MI over the batch, from the posterior where its Z_T is the batch's own
            if own_z:
                mi = ((terms.log_norm - math.log(b)).exp() * terms.entropy).sum(0) + (self.log_prior.exp() * self.log_prior).sum()
            else:
                mi = neg_mi(scores.transpose(1, 2), self.log_prior)
            value = (lam * mi).sum()
        if diverse:
            self._collision = float(terms.collision)
        loss = self._across_filters(terms.loss, terms.peaks, own_units, labels, targets, decor_w, active)
        return self._record(loss - loss.detach() + value, lam, None)  # value: lambda * -MI; gradient: the objective's

    def _autograd(self, x, xf, labels, units) -> torch.Tensor:
        """``mode="paper"`` (Eq. 4's weights on ``tr(x.T^)``) and ``"exact"`` (Eq. 1), through autograd."""
        cfg, (b, c, h, w) = self.config, x.shape
        with torch.set_grad_enabled((cfg.mode == "exact" or cfg.diversity > 0) and torch.is_grad_enabled()):
            scores = template_scores(xf, self.templates)  # (B, C, T); the paper's gradient needs tr(x.T^) only
        flat = xf.reshape(b, c, h * w)
        peaks, own_units = flat.max(-1)  # (B, C): max_ij x (differentiable) and mu^, the first in row-major order on ties
        units = self._check_units(units, own_units)
        own_z = self._fold(x, scores, labels, peaks)
        lam = self.lambdas().to(xf.dtype)  # (C,)
        self._pending = scores.detach  # the Eq. 5-7 terms of diagnostics(), computed when asked
        if cfg.mode == "exact":
            return self._record((lam * neg_mi(scores, self.log_prior)).sum(), lam, None)
        targets = self.targets()
        is_target = labels[:, None] == targets[None, :]  # (B, C): image of the filter's category
        t_hat = target_templates(units, is_target, h * w)
        log_z = self.stats.log_z.to(xf.dtype)
        active = bool((lam > 0).any())
        diverse = cfg.diversity > 0 and active
        log_post, post = template_posterior(scores, log_z, self.log_prior) if diverse else (None, None)
        with torch.no_grad():  # the value: -MI over the batch, from the posterior where its Z_T is the batch's own
            mi = neg_mi_from_posterior(scores, log_post, post, t_hat, log_z, self.log_prior) if own_z and post is not None \
                else neg_mi(scores, self.log_prior)  # fmt: skip
            value = (lam * mi).sum()
        weights = paper_weights(scores.detach(), t_hat, log_z, self.log_prior, is_target, cfg)  # (B, C)
        tr_hat = (xf * self.templates.index_select(0, t_hat.reshape(-1)).reshape(b, c, h, w)).sum((-2, -1))  # tr(x.T^)
        loss = (lam * ((weights * tr_hat).sum(0) / b)).sum()
        div_w, decor_w = self.term_weights()
        if diverse:  # the layer's filters compete for positions
            collision = position_collision(post, is_target)
            self._collision = float(collision.detach())
            loss = loss + div_w * self.num_filters * collision
        loss = self._across_filters(loss, peaks, own_units, labels, targets, decor_w, active)
        return self._record(loss - loss.detach() + value, lam, weights)  # value: lambda * -MI; gradient: the mode's

    def _across_filters(self, loss, peaks, units, labels, targets, decor_w: float, active: bool) -> torch.Tensor:
        """``loss`` plus the decorrelation of the filters' ``peaks (B, C)`` at weight ``decor_w`` and,
        with ``adapt_rate``, the next step of the two terms' weights (neither while lambda is 0)."""
        if self.config.decorrelation > 0 and active:  # the filters carry different information
            redundancy = peak_decorrelation(peaks, labels, targets)
            self._redundancy = float(redundancy.detach())
            loss = loss + decor_w * self.num_filters * redundancy
        if self.config.adapt_rate > 0 and active and torch.is_grad_enabled():
            self._adapt(batch_collapse(peaks.detach(), units, labels, targets, self.map_size[0] * self.map_size[1]))
        return loss

    def term_weights(self) -> tuple[float, float]:
        """The weights of ``diversity`` and ``decorrelation`` this step (the config's, times the
        adapted factors with ``adapt_rate``)."""
        cfg = self.config
        if cfg.adapt_rate <= 0:
            return cfg.diversity, cfg.decorrelation
        f = self.log_scale.exp().tolist()
        return cfg.diversity * f[0], cfg.decorrelation * f[1]

    @torch.no_grad()
    def _adapt(self, measured: torch.Tensor) -> None:
        """One multiplicative step of the two weights towards their targets (every process the same:
        the measured figures are averaged over processes first)."""
        cfg = self.config
        measured = all_reduce_mean(measured.to(self.log_scale.device, torch.float32))
        self._measured = measured.tolist()
        target = torch.tensor([cfg.mode_target, cfg.corr_target], device=measured.device)
        step = torch.nan_to_num(cfg.adapt_rate * (measured / target - 1.0), nan=0.0)
        self.log_scale.add_(step).clamp_(min=-_LOG_SCALE_RANGE, max=_LOG_SCALE_RANGE)

    @torch.no_grad()
    def _record(self, loss: torch.Tensor, lam: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        self._diag = {"lambda": float(lam.mean()), "silent_fraction": float(1.0 - self.stats.active.double().mean()),
                      "mean_max": float(self.stats.mean_max().mean())}  # fmt: skip
        if weights is not None:
            self._diag["weight_abs_mean"] = float(weights.abs().mean())
        if self.config.diversity > 0:
            self._diag["collision"] = getattr(self, "_collision", float("nan"))
        if self.config.decorrelation > 0:
            self._diag["redundancy"] = getattr(self, "_redundancy", float("nan"))
        if self.config.adapt_rate > 0:
            div_w, decor_w = self.term_weights()
            mode, corr = getattr(self, "_measured", (float("nan"), float("nan")))
            self._diag.update({"diversity": div_w, "decorrelation": decor_w, "batch_mode_share": mode, "batch_peak_correlation": corr})
        return loss
