"""Each filter's category (paper §3.1): the one rule, used by the filter loss, every metric,
the explainer's evaluation and the part contributions.

    c_hat_f = argmax_c mean_{I in I_c} sum_ij x_fij

over the classes allowed to be a filter's category (not the negatives of a single-category set;
for metrics, only the classes with annotations), with fixed categories overriding it.
"""

from __future__ import annotations

import math

import torch


def assign_categories(class_sum: torch.Tensor, class_count: torch.Tensor, allowed: torch.Tensor | None = None,
                      fixed: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``class_sum (K, C)`` (per class, the summed ``sum_ij x`` of each filter), ``class_count (K,)``
    images per class, ``allowed (K,)`` bool, ``fixed (C,)`` (``-1``: not fixed) -> ``(C,)`` long.

    Classes without images, or not allowed, are not chosen while another class can be (before
    any image is seen: the first allowed class)."""
    allowed = torch.ones_like(class_count, dtype=torch.bool) if allowed is None else allowed.to(class_count.device)
    means = class_sum / class_count.clamp_min(1)[:, None]
    ok = (class_count > 0) & allowed
    means = torch.where(ok[:, None], means, torch.full_like(means, -math.inf))
    out = torch.where(ok.any(), means.argmax(0), allowed.long().argmax())
    if fixed is not None:
        out = torch.where(fixed >= 0, fixed.to(out.device), out)
    return out
