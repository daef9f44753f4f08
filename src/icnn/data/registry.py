"""``build_dataset``: one entry point from a dataset name to a ready ``Dataset``.

=============  ===============================  ===========================================
name           task="multi"                      task="single" (paper §5.1)
=============  ===============================  ===========================================
synthetic      ``SyntheticParts``                ``synthetic_single_category`` (own negatives)
cub200         CUB crops, 200 species            bird crops vs ``negatives_root`` images
pascal_part    six animals' object crops         ``category=`` crops vs ``negatives_root``
ilsvrc_part    30 animals' object images         ``category=`` images vs ``negatives_root``
custom         the JSON's classes                one class (``category=`` if several) vs
                                                 ``negatives_root``
=============  ===============================  ===========================================

Extra keywords go to the loader, except the single-category ones (``balance``,
``max_positives``, ``max_negatives``, ``seed``, ``negatives_test_fraction``) which go to
:class:`SingleCategory` / :class:`NegativeImages`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from .base import DatasetError, PartDataset

DATASETS = ("synthetic", "cub200", "pascal_part", "ilsvrc_part", "custom")
TASKS = ("single", "multi")
_SINGLE_KEYS = ("balance", "max_positives", "max_negatives", "seed")


def _only_category(ds: PartDataset, category: str) -> PartDataset:
    """Keep one class of a multi-class dataset, relabelled 0 (the positives of a single task)."""
    if category not in ds.classes:
        raise ValueError(f"category {category!r} is not one of {ds.classes}")
    label = ds.classes.index(category)
    ds.records = [r for r in ds.records if r.label == label]
    for r in ds.records:
        r.label = 0
    ds.classes = [category]
    return ds


def _positives(name: str, root: Path, task: str, split: str, image_size, augment: bool, kw: dict) -> PartDataset:
    common = dict(split=split, image_size=image_size, augment=augment)
    category = kw.pop("category", None)
    if name == "cub200":
        from .cub import CUB200

        if category not in (None, "bird"):
            raise ValueError(f"cub200 has one single-category target, 'bird', got category={category!r}")
        return CUB200(root, labels="bird" if task == "single" else "species", **common, **kw)
    if name == "pascal_part":
        from .pascal_part import CATEGORIES, PascalPart

        if task == "single":
            if category is None:
                raise ValueError(f"pascal_part with task='single' needs category=, one of {CATEGORIES}")
            kw["categories"] = (category,)
        return PascalPart(root, **common, **kw)
    if name == "ilsvrc_part":
        from .ilsvrc_part import ILSVRCPart

        if task == "single":
            if category is None:
                raise ValueError("ilsvrc_part with task='single' needs category= (a wnid or name, e.g. 'dog')")
            kw["categories"] = (category,)
        return ILSVRCPart(root, **common, **kw)
    from .custom import CustomParts

    ds = CustomParts(root, **common, **kw)
    if task == "single":
        if category is not None:
            ds = _only_category(ds, category)
        elif len(ds.classes) != 1:
            raise ValueError(f"custom dataset has classes {ds.classes}: task='single' needs category=")
    return ds


def build_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    split: str | None,
    task: str = "single",
    image_size: int | Sequence[int],
    negatives_root: str | Path | None = None,
    augment: bool = False,
    **kw: Any,
) -> Dataset:
    """Build dataset ``name`` (one of :data:`DATASETS`) for ``split`` and ``task``.

    Args:
        name: ``"synthetic"``, ``"cub200"``, ``"pascal_part"``, ``"ilsvrc_part"``, ``"custom"``.
        root: the dataset folder (None for synthetic).
        split: ``"train"``, ``"test"`` (or None: every sample, real datasets only).
        task: ``"single"`` (target objects vs negatives, labels 0/1) or ``"multi"``.
        image_size: output size, int or ``(H, W)``.
        negatives_root: folder of negative images (single-category task, real datasets).
        augment: random horizontal flip (use for training only).
        **kw: loader options (``margin``, ``skip_bad``, ``category``, ``num_samples``, ...).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if name == "synthetic":
        if root is not None:
            raise ValueError(f"the synthetic dataset is generated, it takes no root (got {root!r})")
        from . import synthetic

        # the synthetic world draws random flips and poses itself: ``augment`` has nothing to add
        num_samples = kw.pop("num_samples", 1000)
        if "category" in kw:
            kw["target"] = kw.pop("category")
        if "margin" in kw:
            kw["crop_margin"] = kw.pop("margin")
        if task == "multi":
            kw.pop("crop_margin", None)
            return synthetic.SyntheticParts(num_samples, split=split, image_size=image_size, **kw)
        return synthetic.synthetic_single_category(num_samples, split=split, image_size=image_size, **kw)

    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder (root=None given)")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset root for {name!r} not found")
    single = {k: kw.pop(k) for k in _SINGLE_KEYS if k in kw}
    neg_fraction = kw.pop("negatives_test_fraction", 0.3)
    positives = _positives(name, root, task, split, image_size, augment, kw)
    if task == "multi":
        if single:
            raise ValueError(f"{sorted(single)} apply to task='single' only")
        return positives
    if negatives_root is None:
        raise DatasetError(f"task='single' on {name!r} needs negatives_root (a folder of negative images)")
    from .negatives import NegativeImages
    from .single_category import SingleCategory

    negatives = NegativeImages(
        negatives_root,
        split=split,
        test_fraction=neg_fraction,
        landmark_names=positives.landmark_names,
        part_names=positives.part_names,
        image_size=image_size,
        augment=augment,
        skip_bad=kw.get("skip_bad", False),
    )
    return SingleCategory(positives, negatives, **single)
