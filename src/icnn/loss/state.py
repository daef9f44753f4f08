"""The running statistics of one layer's filter loss: ``Z_T``, each filter's category, lambda.

All in buffers (checkpointed with the loss), all-reduced under ``torch.distributed`` so that ``k``
processes hold what one process would on the same global batch:

* ``log_z (C, T)``: ``log mean_x exp(tr(x.T))``, i.e. ``Z_T`` up to the constant ``N`` (the
  number of maps), which cancels in ``log p(x|T) - log p(x)`` and only rescales gradients;
  estimated per batch (``"batch"``) or as an exponential moving average in log space
  (``"running"``), over all maps (``"all"``, the paper) or, for ``T_mu``, the filter's category's
  and, for ``T-``, the others' (``"category"``);
* ``class_sum (K, C)``, ``class_count (K,)``: per class the summed ``sum_ij x_ij`` of each filter,
  behind its category ``c^ = argmax_c mean_{I in I_c} sum_ij x_ij`` (paper §3.1,
  ``icnn.categories``); ``fixed_targets`` overrides it;
* ``epoch``, ``max_sum (C,)``, ``map_count``, ``active (C,)``: this epoch's ``mean_x max_ij x``
  (the paper's lambda schedule) and which filters fired at all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..categories import assign_categories

Z_ESTIMATES = ("running", "batch")
Z_SCOPES = ("all", "category")
SCHEDULES = ("paper", "inverse_epoch", "constant")


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if dist_ready():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not dist_ready():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_reduce_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """``log sum_r exp(lse_r)`` over processes, stable: max-shift then sum."""
    if not dist_ready():
        return lse
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (lse - m).exp()
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + s.log()


def batch_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """``log sum_b exp(scores)`` ``(C, T)`` of scores ``(B, C, T)``: float32 exps below the exact
    maximum, float64 sums. Run in the scores' memory layout, ``(B, C, T)`` or the transposed
    ``(B, T, C)`` that ``posterior.score_maps`` gives (a reduction over a permuted view is several
    times slower on CPU); the same values either way."""
    flip = not scores.is_contiguous() and scores.transpose(1, 2).is_contiguous()
    s = scores.transpose(1, 2) if flip else scores
    m = s.amax(0)
    lse = torch.sub(s, m).exp_().sum(0).double().log() + m.double()
    return lse.t() if flip else lse


def map_sums(x: torch.Tensor, chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """``sum_ij x`` of every map ``(B, C, h, w) -> (B, C)`` in float64, a few images at a time: the
    same sums as one ``x.sum(dim=(-2, -1), dtype=torch.float64)``, whose float64 copy of all of
    ``x`` is 2-3x slower than copies that stay in the cache."""
    step = max(1, chunk_bytes // max(1, 8 * x[0].numel() if len(x) else 1))
    if step >= x.shape[0]:
        return x.sum(dim=(-2, -1), dtype=torch.float64)
    return torch.cat([part.sum(dim=(-2, -1), dtype=torch.float64) for part in x.split(step)])


class FilterStatistics(nn.Module):
    """The running state of one layer's filter loss (module doc).

    Args:
        num_filters, num_templates, num_classes: ``C``, ``T = h*w + 1``, ``K``.
        negative_class: a class that is never a filter's category (single-category negatives).
        target_classes: fix each filter's category instead of assigning it online.
    """

    def __init__(self, num_filters: int, num_templates: int, num_classes: int, *, negative_class: int | None = None,
                 target_classes: torch.Tensor | int | None = None):  # fmt: skip
        super().__init__()
        self.num_classes, self.negative_class = int(num_classes), negative_class
        self.register_buffer("log_z", torch.zeros(num_filters, num_templates))
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

    def start_epoch(self, epoch: int) -> None:
        """Begin epoch ``epoch`` (1-based): resets this epoch's activation statistics."""
        if epoch < 1:
            raise ValueError(f"epoch must be >= 1, got {epoch}")
        self.epoch.fill_(epoch)
        self.max_sum.zero_()
        self.map_count.zero_()
        self.active.zero_()

    def targets(self) -> torch.Tensor:
        """Each filter's category ``(C,)``: fixed, or the class activating it most so far."""
        allowed = torch.ones(self.num_classes, dtype=torch.bool, device=self.class_count.device)
        if self.negative_class is not None:
            allowed[self.negative_class] = False
        return assign_categories(self.class_sum, self.class_count, allowed, self.fixed_targets)

    def lambdas(self, lambda_: float, schedule: str, warmup_epochs: int) -> torch.Tensor:
        """Per-filter weight ``(C,)`` of the current epoch: 0 during the warm-up, then ``lambda_``
        (``"constant"``), ``lambda_ / t`` (``"inverse_epoch"``) or ``lambda_ mean_x max_ij x / t``
        (``"paper"``), ``t`` counting epochs of filter-loss training from 1."""
        t = float(self.epoch.item()) - warmup_epochs
        lam = torch.full_like(self.max_sum, lambda_ if t >= 1 else 0.0)
        if schedule == "paper":
            lam = lam * (self.max_sum / self.map_count.clamp_min(1.0))
        if schedule in ("paper", "inverse_epoch"):
            lam = lam / max(t, 1.0)
        return lam

    @torch.no_grad()
    def update(self, x: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, estimate: str, scope: str,
               momentum: float, peak: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> bool:  # fmt: skip
        """Fold one (global) batch in: ``x (B, C, h, w)`` raw maps, ``scores (B, C, T)``, ``labels (B,)``,
        ``peak (B, C)`` their maxima ``max_ij x`` and ``lse (C, T)`` this process's
        :func:`batch_logsumexp` of the scores, if the caller has them. Returns whether ``log_z``
        is now this batch's own ``log mean_x exp(scores)`` (these scores alone: over all maps, from
        this batch only, on one process)."""
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        all_reduce_sum(n)
        if scope == "category":  # T_mu over the maps of the filter's category, T- over the others
            s = scores.to(torch.float64, memory_format=torch.contiguous_format)  # log Z_T = logsumexp - log N cancels: float64
            is_target = (labels[:, None] == self.targets()[None, :])[..., None]  # (B, C, 1)
            positive = torch.ones(s.shape[-1], dtype=torch.bool, device=x.device)
            positive[-1] = False
            sel = torch.where(positive, is_target, ~is_target)  # (B, C, T)
            lse = all_reduce_logsumexp(torch.logsumexp(torch.where(sel, s, torch.full_like(s, -math.inf)), dim=0))
            count = sel.double().sum(0)
            all_reduce_sum(count)
            batch = torch.where(count > 0, lse - count.clamp_min(1).log(), self.log_z.double())
        else:  # logsumexp over the batch in float32 (what log_z keeps), its last steps in float64
            batch = all_reduce_logsumexp(batch_logsumexp(scores) if lse is None else lse) - n.log()
        own = (self.z_count.item() == 0 or estimate == "batch") and scope != "category" and not dist_ready()
        if self.z_count.item() == 0 or estimate == "batch":
            new = batch
        else:  # running: EMA of the mean in log space
            new = torch.logaddexp(self.log_z.double() + math.log(momentum), batch + math.log1p(-momentum))
        self.log_z.copy_(new.to(self.log_z.dtype))
        self.z_count += n
        total = map_sums(x)  # (B, C)
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).double()  # (B, K)
        class_sum, class_count = onehot.t() @ total, onehot.sum(0)
        peak = x.amax(dim=(-2, -1)) if peak is None else peak  # (B, C)
        max_sum = peak.double().sum(0)
        active = (peak.amax(0) > 0).double()
        all_reduce_sum(class_sum, class_count, max_sum, active)
        self.class_sum += class_sum
        self.class_count += class_count
        self.max_sum += max_sum
        self.map_count += n
        self.active |= active > 0
        return own

    def mean_max(self) -> torch.Tensor:
        return self.max_sum / self.map_count.clamp_min(1.0)
