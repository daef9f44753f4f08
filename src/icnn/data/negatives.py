"""Negative images: any folder of photographs, used whole (paper §5.1: "images of other
categories were regarded as negative samples").

Layout: every ``.jpg``/``.jpeg``/``.png`` file under ``root`` (recursive, any case), sorted by
relative path. Each image is resized whole to ``image_size`` (aspect not kept, as the positive
crops). Samples have label 0, box NaN, landmarks NaN (``(K, 2)`` for the ``landmark_names``
given, default none) and all-False part masks when ``part_names`` are given.

A folder has no split of its own: ``split="train"``/``"test"`` is deterministic by relative
path (:func:`~icnn.data.base.hash_split`, ``test_fraction``); ``split=None`` takes every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import DatasetError, PartDataset, Record, check_split, hash_split, list_images


class NegativeImages(PartDataset):
    """Whole images as negatives (label 0).

    Args:
        root: the image folder.
        split: ``"train"``, ``"test"`` or None (all images).
        test_fraction: share of images in "test".
        landmark_names, part_names: names to give NaN landmarks / empty masks for, so the
            samples batch with positives of the same shapes.
        **options: ``image_size``, ``augment``, ``skip_bad`` of :class:`PartDataset`.
    """

    def __init__(self, root: str | Path, *, split: str | None = None, test_fraction: float = 0.3,
                 landmark_names: Sequence[str] = (), part_names: Sequence[str] = (), **options):
        check_split(split)
        self.root = root = Path(root)
        files = list_images(root)
        if not files:
            raise DatasetError(f"{root}: no .jpg/.jpeg/.png images found")
        if split is not None:
            files = [f for f in files if hash_split(f.relative_to(root).as_posix(), test_fraction) == split]
        empty = np.full((len(landmark_names), 2), np.nan)
        records = [Record(path=f, label=0, box=None, landmarks=empty, key=str(f)) for f in files]
        super().__init__(records, classes=["negative"], landmark_names=landmark_names, part_names=part_names, **options)
        self.split = split

    def _load_masks(self, record: Record, width: int, height: int) -> np.ndarray:
        return np.zeros((len(self.part_names), height, width), dtype=bool)

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        sample["box"] = torch.full((4,), float("nan"))  # landmarks are NaN already: none given
        return sample
