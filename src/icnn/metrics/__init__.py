"""Interpretability metrics (paper §5.2, SPEC §5): pure functions + streaming accumulators.

Evaluation of one layer over a dataset::

    pass 1   TopQuantile(C, total_units).update(maps)           -> thresholds T_f
             LocationInstability(C, landmark_names, NC).update_maps(maps, centers, landmarks, labels, hw)
             AccuracyMeter(NC).update(logits, labels)
    pass 2   ov = piou.overlaps(maps, part_masks)                 # the filters' regions, built once
             PartInterpretability(T, part_names, NC, centers=...).update(maps, part_masks, labels, overlaps=ov)
             NetworkDissection(T, part_names, centers=...).update(maps, part_masks, overlaps=ov)

Every accumulator gives exactly the same numbers whatever the batching of the stream.
"""

from .accuracy import AccuracyMeter, AccuracyResult, binary_correct, logistic_correct, softmax_correct
from .dissection import DissectionResult, NetworkDissection
from .instability import (
    InstabilityReferences,
    InstabilityResult,
    LocationInstability,
    argmax_units,
    as_unit_centers,
    instability_references,
    landmark_distances,
)
from .part_iou import (
    PartInterpretability,
    PartInterpretabilityResult,
    filter_regions,
    region_overlaps,
    resolve_radius,
)
from .quantile import MetricError, TopQuantile, top_quantile

__all__ = [
    "AccuracyMeter",
    "AccuracyResult",
    "DissectionResult",
    "InstabilityReferences",
    "InstabilityResult",
    "LocationInstability",
    "MetricError",
    "NetworkDissection",
    "PartInterpretability",
    "PartInterpretabilityResult",
    "TopQuantile",
    "argmax_units",
    "as_unit_centers",
    "binary_correct",
    "filter_regions",
    "instability_references",
    "landmark_distances",
    "logistic_correct",
    "region_overlaps",
    "resolve_radius",
    "softmax_correct",
    "top_quantile",
]

from . import receptive_field as _rf  # noqa: E402
from .collapse import CollapseResult, FilterCollapse  # noqa: E402
from .receptive_field import *  # noqa: F401,F403,E402

__all__ += ["CollapseResult", "FilterCollapse", *getattr(_rf, "__all__", [])]
