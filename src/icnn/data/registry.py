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
:class:`SingleCategory` / :class:`NegativeImages`; ``max_positives`` and ``max_negatives`` cap
the training splits only ("train", "fit"): "val" and "test" keep every image.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from .base import DatasetError, PartDataset
from .cub import CUB200
from .custom import CustomParts
from .ilsvrc_part import ILSVRCPart
from .negatives import NegativeImages
from .pascal_part import CATEGORIES as PASCAL_CATEGORIES, PascalPart
from .single_category import SingleCategory

DATASETS = ("synthetic", "cub200", "pascal_part", "ilsvrc_part", "custom")
TASKS = ("single", "multi")
SPLITS = ("train", "fit", "val", "test")
VALIDATION_FRACTION = 0.2  # share of the training images held out as "val" (the rest is "fit")


def is_validation(name: str) -> bool:
    """The validation rule: a training image is in "val" when the SHA-1 of its file name (no
    folder), read as a number in [0, 1), is below ``VALIDATION_FRACTION``; otherwise in "fit".

    Deterministic and machine-independent (the file name, not the path), stable when images are
    added or removed, and all objects of one image fall on the same side. Settings are chosen by
    training on "fit" and evaluating on "val"; the chosen recipe then trains on "train" (= fit +
    val) and is measured once on "test"."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < VALIDATION_FRACTION


def _carve(ds: PartDataset, split: str | None) -> PartDataset:
    """Keep the "fit" or "val" part of a dataset built from the training split."""
    if split in ("fit", "val"):
        ds.records = [r for r in ds.records if is_validation(r.path.name) == (split == "val")]
    return ds


def augments_by_flipping(name: str) -> bool:
    """Whether ``augment`` flips the images of dataset ``name`` (the synthetic world draws its
    own flips and poses: augmenting it adds nothing)."""
    return name != "synthetic"
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
        if category not in (None, "bird"):
            raise ValueError(f"cub200 has one single-category target, 'bird', got category={category!r}")
        return CUB200(root, labels="bird" if task == "single" else "species", **common, **kw)
    if name in ("pascal_part", "ilsvrc_part"):
        if task == "single":
            if category is None:
                which = f", one of {PASCAL_CATEGORIES}" if name == "pascal_part" else " (a wnid or name, e.g. 'dog')"
                raise ValueError(f"{name} with task='single' needs category={which}")
            kw["categories"] = (category,)
        return (PascalPart if name == "pascal_part" else ILSVRCPart)(root, **common, **kw)
    ds = CustomParts(root, **common, **kw)
    if task == "single":
        if category is not None:
            ds = _only_category(ds, category)
        elif len(ds.classes) != 1:
            raise ValueError(f"custom dataset has classes {ds.classes}: task='single' needs category=")
    return ds


def _loader(fn, name, *args, **kwargs):
    """``fn(name, *args, **kwargs)``; a keyword the loader does not take is a DatasetError naming it."""
    try:
        return fn(name, *args, **kwargs)
    except TypeError as exc:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if bad is None:
            raise
        raise DatasetError(f"dataset option {bad.group(1)!r}: not an option of dataset {name!r} (--dataset-option)") from None


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
        split: ``"train"``, ``"fit"`` / ``"val"`` (the training images without / with only the
            validation images, :func:`is_validation`), ``"test"`` (or None: every sample, real
            datasets only).
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
    if split not in (*SPLITS, None):
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name == "synthetic":
        split = "train" if split == "fit" else split  # its "val" is a stream of its own
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
            return _loader(lambda _, **k: synthetic.SyntheticParts(num_samples, **k), name, split=split, image_size=image_size, **kw)
        return _loader(lambda _, **k: synthetic.synthetic_single_category(num_samples, **k), name, split=split, image_size=image_size, **kw)

    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder (root=None given)")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset root for {name!r} not found")
    single = {k: kw.pop(k) for k in _SINGLE_KEYS if k in kw}
    if split not in ("train", "fit"):  # caps size a training set: an evaluated split keeps every image
        single = {k: v for k, v in single.items() if k not in ("max_positives", "max_negatives")}
    neg_fraction = kw.pop("negatives_test_fraction", 0.3)
    base_split = "train" if split in ("fit", "val") else split
    positives = _carve(_loader(_positives, name, root, task, base_split, image_size, augment, kw), split)
    if task == "multi":
        if single:
            raise ValueError(f"{sorted(single)} apply to task='single' only")
        return positives
    if not len(positives):
        raise DatasetError(f"{root}: no {'images' if task == 'multi' else 'positive images'} in split {split!r} of {name!r}")
    if negatives_root is None:
        raise DatasetError(f"single-category {name!r} needs negative images: --negatives DIR (negatives_root)")
    negatives = NegativeImages(
        negatives_root,
        split=base_split,
        test_fraction=neg_fraction,
        landmark_names=positives.landmark_names,
        part_names=positives.part_names,
        image_size=image_size,
        augment=augment,
        skip_bad=kw.get("skip_bad", False),
    )
    return SingleCategory(positives, _carve(negatives, split), **single)
