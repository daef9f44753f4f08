"""Datasets: every one returns the sample dict of ``docs/DESIGN.md`` (image, label, box,
landmarks, part_masks, index) and has ``classes``, ``landmark_names``, ``part_names``,
``image_size``."""

from .base import SAMPLE_KEYS, DatasetError, PartDataset, Record
from .cub import CUB200
from .custom import CustomParts
from .ilsvrc_part import ILSVRCPart
from .negatives import NegativeImages
from .pascal_part import PascalPart
from .registry import DATASETS, SPLITS, augments_by_flipping, build_dataset, is_validation
from .single_category import SingleCategory
from .synthetic import SyntheticParts, synthetic_single_category

__all__ = [
    "CUB200",
    "CustomParts",
    "DATASETS",
    "DatasetError",
    "ILSVRCPart",
    "NegativeImages",
    "PartDataset",
    "PascalPart",
    "Record",
    "SAMPLE_KEYS",
    "SingleCategory",
    "SPLITS",
    "SyntheticParts",
    "augments_by_flipping",
    "build_dataset",
    "is_validation",
    "synthetic_single_category",
]
