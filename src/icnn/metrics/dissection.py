"""Network Dissection (Bau et al. 2017; survey 004 §2.2), on part masks as concepts.

With the same thresholds ``T_f`` (``p(x > T_f) = 0.005``, ``quantile.TopQuantile``) and regions
``M_f^I`` (``part_iou``: bilinear upsampling then ``> T_f``, or the round-RF mode) the IoU is taken
over the whole dataset, not per image::

    IoU_fk = sum_I |M_f^I ∩ L_k^I| / sum_I |M_f^I ∪ L_k^I|

``f`` is a detector of concept ``k`` when ``IoU_fk > 0.04``; each filter's label is its best
concept (argmax, first on ties) and the layer is summarised by the number of detectors and the
number of unique concepts among their labels. Sums are int64 counts of pixels, so streaming is
exact, and ``> 0.04`` is decided in integer arithmetic (``25 |∩| > |∪|``).

Every image passed to ``update`` counts in the sums (the formula's ``sum_I``), including images
where a concept is absent (there the union is the filter's region). NetDissect-Lite restricts a
concept's sums to images annotated with its label *type*; pass only such images to do the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .part_iou import _exceeds, _mask_area, _Regions
from .quantile import MetricError

__all__ = ["DissectionResult", "NetworkDissection"]


@dataclass
class DissectionResult:
    """What ``NetworkDissection.compute()`` returns (C filters, K concepts)."""

    iou: torch.Tensor  # (C, K) dataset-level IoU (NaN where the union is empty)
    best_concept: torch.Tensor  # (C,) argmax_k IoU_fk
    best_iou: torch.Tensor  # (C,)
    is_detector: torch.Tensor  # (C,) bool, best IoU > iou_threshold
    num_detectors: int
    unique_concepts: int  # distinct best concepts among detectors
    concept_counts: torch.Tensor  # (K,) detectors labelled with each concept
    concept_names: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "dissection_detectors": self.num_detectors,
            "dissection_unique_concepts": self.unique_concepts,
            "dissection_mean_best_iou": float(torch.nan_to_num(self.best_iou).mean()),
        }


class NetworkDissection(_Regions):
    """Streaming Network Dissection of one layer (see the module doc).

    Args:
        thresholds: ``(C,)`` ``T_f``.
        concepts: K, or the K concept (part) names, the order of ``concept_masks``.
        iou_threshold: 0.04 (Bau et al.).
        **regions: ``mode``, ``centers``, ``radius``, ``chunk_bytes`` (as ``part_iou.PartInterpretability``).

    ``update(maps (B, C, h, w), concept_masks (B, K, H, W) bool, overlaps=None)``; ``overlaps``:
    ``overlaps(maps, concept_masks)`` of this or of a ``PartInterpretability`` with the same
    thresholds, mode, centers and radius, computed once per batch for both.
    """

    def __init__(self, thresholds: torch.Tensor, concepts: int | Sequence[str], *, iou_threshold: float = 0.04, **regions):
        names = [f"concept{k}" for k in range(concepts)] if isinstance(concepts, int) else list(concepts)
        super().__init__(thresholds, **regions)
        if thresholds.dim() != 1 or not names:
            raise MetricError("thresholds must be (C,) and concepts positive")
        self.concept_names, self.iou_threshold = names, iou_threshold
        c, k = len(thresholds), len(names)
        self.inter = torch.zeros(c, k, dtype=torch.long)  # sum_I |M ∩ L|
        self.region_area = torch.zeros(c, dtype=torch.long)  # sum_I |M|
        self.concept_area = torch.zeros(k, dtype=torch.long)  # sum_I |L|
        self.images = 0

    def update(self, maps: torch.Tensor, concept_masks: torch.Tensor, *, overlaps=None) -> None:
        b, k = maps.shape[0], len(self.concept_names)
        if concept_masks.dim() != 4 or concept_masks.shape[:2] != (b, k):
            raise MetricError(
                f"concept_masks must be (B, K, H, W) = ({b}, {k}, H, W), got {tuple(concept_masks.shape)}"
            )
        inter, area = self._overlaps(maps, concept_masks, overlaps)
        self.inter += inter.sum(0)
        self.region_area += area.sum(0)
        self.concept_area += _mask_area(concept_masks).sum(0)
        self.images += b

    def union(self) -> torch.Tensor:
        """``(C, K)`` ``sum_I |M ∪ L| = sum|M| + sum|L| - sum|M ∩ L|``."""
        return self.region_area[:, None] + self.concept_area[None, :] - self.inter

    def compute(self) -> DissectionResult:
        if self.images == 0:
            raise MetricError("NetworkDissection.compute() called before any update()")
        union = self.union()
        iou = self.inter.double() / union.double()  # NaN where 0 / 0
        best_iou, best = torch.nan_to_num(iou, nan=-1.0).max(dim=1)
        best_iou = torch.where(best_iou < 0, torch.full_like(best_iou, float("nan")), best_iou)
        rows = torch.arange(len(best))
        detector = _exceeds(self.inter[rows, best], union[rows, best], self.iou_threshold)
        counts = torch.bincount(best[detector], minlength=len(self.concept_names))
        return DissectionResult(
            iou=iou,
            best_concept=best,
            best_iou=best_iou,
            is_detector=detector,
            num_detectors=int(detector.sum()),
            unique_concepts=int((counts > 0).sum()),
            concept_counts=counts,
            concept_names=list(self.concept_names),
        )
