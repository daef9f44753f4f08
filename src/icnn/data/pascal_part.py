"""Pascal-Part (Chen et al. 2014): VOC2010 images with part segmentations, six animal categories.

Layout under ``root``::

    JPEGImages/<id>.jpg              the VOC2010 images
    Annotations_Part/<id>.mat        Pascal-Part annotations (scipy-readable MATLAB files)
    ImageSets/Main/train.txt         optional: the VOC2010 split (one id per line);
    ImageSets/Main/val.txt           "train" -> train.txt, "test" -> val.txt

Without ``ImageSets/Main/{train,val}.txt`` the split is deterministic by id
(:func:`~icnn.data.base.hash_split`, ``test_fraction``).

Each ``.mat`` holds the struct ``anno`` with ``objects``; each object has ``class`` (e.g.
``"bird"``), ``mask`` (H x W, the object silhouette) and ``parts``, each with ``part_name``
(``"head"``, ``"leye"``, ``"lfleg"``, ...) and ``mask``. Every object of a selected category
becomes one sample, cropped by its box: the tight box of its silhouette (grown by ``margin``).
Objects with an empty silhouette are left out and counted in ``empty_objects``.

Parts are merged exactly as paper §5.2.1 (and the authors' ``getPart.m``):

    bird   head = head, beak, l/r eye; torso = torso, neck, l/r wing; legs = l/r leg, l/r foot; tail
    cat    head = head, l/r eye, l/r ear, nose; torso = torso, neck; front legs = l/r front leg
           and paw; back legs = l/r back leg and paw; tail
    dog    as cat, head also with the muzzle
    cow    head = head, l/r eye, l/r ear, muzzle, l/r horn; torso = torso, neck; front legs =
           l/r front upper and lower leg; back legs likewise; no tail
    horse  as cow without horns (it has none), legs with their hooves
    sheep  as cow

``part_names`` is the ordered union over the selected categories of
``head, torso, legs, front legs, back legs, tail``; a part a category lacks is an all-False mask.
Landmarks (paper §5.2.2: head, neck, torso) are the centroids of the original (unmerged)
``head``, ``neck`` and ``torso`` masks, in continuous pixel coordinates; NaN where absent.

Constructing the dataset reads every ``.mat`` of the split once (to list objects, boxes and
landmarks); masks are read again lazily per sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DatasetError, PartDataset, Record, check_split, hash_split, load_mat, mat_list, require_dir

CATEGORIES = ("bird", "cat", "cow", "dog", "horse", "sheep")
PART_ORDER = ("head", "torso", "legs", "front legs", "back legs", "tail")
LANDMARKS = ("head", "neck", "torso")

_CAT = {
    "head": ("head", "leye", "reye", "lear", "rear", "nose"),
    "torso": ("torso", "neck"),
    "front legs": ("lfleg", "lfpa", "rfleg", "rfpa"),
    "back legs": ("lbleg", "lbpa", "rbleg", "rbpa"),
    "tail": ("tail",),
}
_COW = {
    "head": ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn"),
    "torso": ("torso", "neck"),
    "front legs": ("lfuleg", "lflleg", "rfuleg", "rflleg"),
    "back legs": ("lbuleg", "lblleg", "rbuleg", "rblleg"),
}
# merged part -> original Pascal-Part names, per category (paper §5.2.1)
PART_MERGE: dict[str, dict[str, tuple[str, ...]]] = {
    "bird": {
        "head": ("head", "beak", "leye", "reye"),
        "torso": ("torso", "neck", "lwing", "rwing"),
        "legs": ("lleg", "lfoot", "rleg", "rfoot"),
        "tail": ("tail",),
    },
    "cat": _CAT,
    "dog": {**_CAT, "head": _CAT["head"] + ("muzzle",)},
    "cow": _COW,
    "horse": {
        "head": ("head", "leye", "reye", "lear", "rear", "muzzle"),
        "torso": ("torso", "neck"),
        "front legs": _COW["front legs"] + ("lfho", "rfho"),
        "back legs": _COW["back legs"] + ("lbho", "rbho"),
    },
    "sheep": _COW,
}


def mask_centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid ``(x, y)`` of a bool mask in continuous pixel coordinates (pixel centres at
    ``+0.5``); NaN for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.full(2, np.nan)
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box ``(x0, y0, x1, y1)`` of a bool mask (``x1 = last column + 1``); None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def merge_parts(parts: Sequence[tuple[str, np.ndarray]], category: str, part_names: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
    """``(P, H, W)`` bool: the union of the original part masks mapped to each merged part."""
    table = PART_MERGE[category]
    source_to_merged = {src: merged for merged, srcs in table.items() for src in srcs}
    index = {name: k for k, name in enumerate(part_names)}
    out = np.zeros((len(part_names), *shape), dtype=bool)
    for name, mask in parts:
        merged = source_to_merged.get(name)
        if merged is not None and merged in index:
            out[index[merged]] |= mask
    return out


def _objects(mat: dict, path: Path) -> list:
    anno = mat.get("anno")
    if anno is None or not hasattr(anno, "objects"):
        raise DatasetError(f"{path}: no struct 'anno' with field 'objects' (not a Pascal-Part annotation)")
    return mat_list(anno.objects)


def _object_fields(obj, path: Path, k: int) -> tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]:
    where = f"{path}: object {k + 1}"
    try:
        cls = str(getattr(obj, "class"))
        mask = np.asarray(obj.mask).astype(bool)
        parts = [(str(p.part_name), np.asarray(p.mask).astype(bool)) for p in mat_list(getattr(obj, "parts", None))]
    except AttributeError as exc:
        raise DatasetError(f"{where}: missing field ({exc})") from None
    if mask.ndim != 2:
        raise DatasetError(f"{where}: mask is not a 2-D array (shape {mask.shape})")
    for name, m in parts:
        if m.shape != mask.shape:
            raise DatasetError(f"{where}: part {name!r} mask shape {m.shape} differs from object mask {mask.shape}")
    return cls, mask, parts


class PascalPart(PartDataset):
    """Pascal-Part animal objects (crops) with merged part masks and head/neck/torso landmarks.

    Args:
        root: folder holding ``JPEGImages/`` and ``Annotations_Part/``.
        split: ``"train"``, ``"test"`` or None (all).
        categories: the categories to keep, in label order (default: the six animals). For a
            single-category positive set pass one, e.g. ``("bird",)``.
        test_fraction: share of ids in "test" when no VOC split files exist.
        **options: ``image_size``, ``margin``, ``augment``, ``skip_bad``, ``keep_outside_landmarks``
            of :class:`PartDataset`.
    """

    def __init__(self, root: str | Path, *, split: str | None = "train", categories: Sequence[str] = CATEGORIES,
                 test_fraction: float = 0.3, **options):
        check_split(split)
        categories = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in categories if c not in PART_MERGE]
        if unknown or not categories:
            raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories}")
        self.root = root = Path(root)
        require_dir(root, "Pascal-Part root")
        ann_dir = require_dir(root / "Annotations_Part", "Pascal-Part annotation folder")
        img_dir = require_dir(root / "JPEGImages", "VOC2010 image folder")
        self.split = split

        ids = sorted(p.stem for p in ann_dir.glob("*.mat"))
        if not ids:
            raise DatasetError(f"{ann_dir}: no .mat annotation files")
        sets = root / "ImageSets" / "Main"
        if split is not None:
            split_file = sets / ("train.txt" if split == "train" else "val.txt")
            if (sets / "train.txt").is_file() and (sets / "val.txt").is_file():
                wanted = set(split_file.read_text().split())
                ids = [i for i in ids if i in wanted]
            else:
                ids = [i for i in ids if hash_split(i, test_fraction) == split]

        part_names = [p for p in PART_ORDER if any(p in PART_MERGE[c] for c in categories)]
        label_of = {c: k for k, c in enumerate(categories)}
        records: list[Record] = []
        self.empty_objects = 0
        for image_id in ids:
            mat_path = ann_dir / f"{image_id}.mat"
            mat = load_mat(mat_path)
            for k, obj in enumerate(_objects(mat, mat_path)):
                cls, mask, parts = _object_fields(obj, mat_path, k)
                if cls not in label_of:
                    continue
                box = mask_box(mask)
                if box is None:
                    self.empty_objects += 1
                    continue
                raw = {}
                for name, m in parts:  # a part may come in several pieces: union them
                    raw[name] = raw[name] | m if name in raw else m
                lm = np.stack([mask_centroid(raw[n]) if n in raw else np.full(2, np.nan) for n in LANDMARKS])
                records.append(
                    Record(
                        path=img_dir / f"{image_id}.jpg",
                        label=label_of[cls],
                        box=box,
                        landmarks=lm,
                        parts=(mat_path, k, cls, mask.shape),
                        key=f"{mat_path} object {k + 1}",
                    )
                )
        super().__init__(records, classes=categories, landmark_names=list(LANDMARKS), part_names=part_names, **options)

    def _load_masks(self, record: Record, width: int, height: int) -> np.ndarray:
        mat_path, k, cls, shape = record.parts
        if shape != (height, width):
            raise DatasetError(f"{mat_path}: object {k + 1} mask is {shape[1]}x{shape[0]} but {record.path} is {width}x{height}")
        objects = _objects(load_mat(mat_path), mat_path)
        if k >= len(objects):
            raise DatasetError(f"{mat_path}: object {k + 1} disappeared since the dataset was built")
        _, _, parts = _object_fields(objects[k], mat_path, k)
        return merge_parts(parts, cls, self.part_names, (height, width))
