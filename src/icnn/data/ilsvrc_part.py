"""ILSVRC-2013 DET Animal-Part (Zhang et al., "Mining object parts from CNNs via active
question-answering", CVPR 2017), 30 animal categories with head and frontal-leg boxes.

Layout read (that of the authors' releases: images and object boxes from
``github.com/zqs1022/detanimalpart``, part boxes from the ``truth_partNN.mat`` files shipped with
their Interpretable-CNN code under ``code/data_input/data_input_DET-2015-subset-ILSVRC2013train/``)::

    root/<wnid>_obj/img/img/00001.jpg ...     object images, numbered from 1
    root/<wnid>_obj/img/data.mat              struct array samples(i).obj.bndbox.{xmin,ymin,xmax,ymax}
                                              (object box of image i, MATLAB 1-based inclusive pixels)
    parts_root/<wnid>/truth_part01.mat        head       } struct array truth(j) with
    parts_root/<wnid>/truth_part02.mat        front legs } .obj.filename, .obj.bndbox.{xmin,..},
                                                         .pHW_center (2 x n: [y; x]), .pHW_scale
                                                         (2 x n: [h; w]) of the part box(es), in
                                                         the object box resized to 224 x 224.

``parts_root`` defaults to ``root``. The part box in source pixels is recovered exactly as the
authors' ``readPartTruth.m`` made it: ``centre = bndbox_min + pHW_center / 224 * (bndbox_max -
bndbox_min)`` and ``size = pHW_scale / 224 * (bndbox_max - bndbox_min)``; MATLAB's 1-based pixel
coordinates become ours by ``- 0.5``. A category with one truth file only (goldfish: no legs)
has that part absent (NaN / all-False); a category with neither is a :class:`DatasetError`.

Landmarks (paper §5.2.2: "head and frontal legs") are the part box centres (the mean centre when
a part has several boxes); part masks are the part boxes (their union). The release has no
train/test split: it is deterministic by file (:func:`~icnn.data.base.hash_split`,
``test_fraction``). Both ``.mat`` kinds must be scipy-readable (MATLAB v5/v7; v7.3 files give a
:class:`DatasetError` saying how to re-save them).

NOTE: this layout is read from the authors' MATLAB readers (``readAnnotation.m``,
``readPartTruth.m``), not from the files themselves; it is checked only on fixtures made in
that structure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DatasetError, PartDataset, Record, check_split, hash_split, load_mat, mat_list, require_dir

# wnid -> name, in the paper's Table 3 order
CATEGORIES: dict[str, str] = {
    "n01443537": "goldfish", "n01503061": "bird", "n01639765": "frog", "n01662784": "turtle",
    "n01674464": "lizard", "n01882714": "koala", "n01982650": "lobster", "n02084071": "dog",
    "n02118333": "fox", "n02121808": "cat", "n02129165": "lion", "n02129604": "tiger",
    "n02131653": "bear", "n02324045": "rabbit", "n02342885": "hamster", "n02355227": "squirrel",
    "n02374451": "horse", "n02391049": "zebra", "n02395003": "swine", "n02398521": "hippopotamus",
    "n02402425": "cattle", "n02411705": "sheep", "n02419796": "antelope", "n02437136": "camel",
    "n02444819": "otter", "n02454379": "armadillo", "n02484322": "monkey", "n02503517": "elephant",
    "n02509815": "red panda", "n02510455": "giant panda",
}  # fmt: skip
PARTS = ("head", "front legs")
PART_FILES = ("truth_part01.mat", "truth_part02.mat")
TRUTH_SIZE = 224.0


def _num(struct, field: str, where: str) -> float:
    try:
        value = float(np.asarray(getattr(struct, field)).ravel()[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        raise DatasetError(f"{where}: missing or non-numeric field {field!r}") from None
    if not np.isfinite(value):
        raise DatasetError(f"{where}: field {field!r} is not finite")
    return value


def _bndbox(obj, where: str) -> tuple[float, float, float, float]:
    """MATLAB 1-based inclusive ``bndbox`` -> our continuous ``(x0, y0, x1, y1)``."""
    b = getattr(obj, "bndbox", None)
    if b is None:
        raise DatasetError(f"{where}: no field 'bndbox'")
    xmin, ymin, xmax, ymax = (_num(b, f, where) for f in ("xmin", "ymin", "xmax", "ymax"))
    return xmin - 1.0, ymin - 1.0, xmax, ymax


def read_part_boxes(path: Path) -> dict[str, np.ndarray]:
    """``filename -> (n, 4)`` part boxes ``(x0, y0, x1, y1)`` in source pixels from one
    ``truth_partNN.mat`` (entries without an object are images without that part)."""
    truth = load_mat(path).get("truth")
    if truth is None:
        raise DatasetError(f"{path}: no variable 'truth' (not a truth_partNN.mat file)")
    out: dict[str, np.ndarray] = {}
    for j, entry in enumerate(mat_list(truth)):
        where = f"{path}: truth({j + 1})"
        obj = getattr(entry, "obj", None)
        if obj is None or isinstance(obj, np.ndarray) and obj.size == 0:
            continue
        name = str(getattr(obj, "filename", "")).strip()
        if not name:
            raise DatasetError(f"{where}: obj has no filename")
        # bndbox here holds strings (int2str) of MATLAB 1-based inclusive pixels
        b = obj.bndbox
        try:
            xmin, ymin, xmax, ymax = (float(np.asarray(getattr(b, f)).ravel()[0]) for f in ("xmin", "ymin", "xmax", "ymax"))
            centre = np.asarray(entry.pHW_center, dtype=np.float64).reshape(2, -1)  # (2, n): [y; x]
            scale = np.asarray(entry.pHW_scale, dtype=np.float64).reshape(2, -1)  # (2, n): [h; w]
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: malformed entry ({exc})") from None
        if centre.shape != scale.shape or not np.isfinite(centre).all() or not np.isfinite(scale).all():
            raise DatasetError(f"{where}: pHW_center/pHW_scale malformed (shapes {centre.shape}, {scale.shape})")
        bh, bw = ymax - ymin, xmax - xmin
        cy = ymin + centre[0] / TRUTH_SIZE * bh - 0.5  # continuous coordinates
        cx = xmin + centre[1] / TRUTH_SIZE * bw - 0.5
        h, w = scale[0] / TRUTH_SIZE * bh, scale[1] / TRUTH_SIZE * bw
        out[name] = np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1)
    return out


class ILSVRCPart(PartDataset):
    """ILSVRC-2013 DET Animal-Part object images with head / front-leg landmarks and box masks.

    Args:
        root: folder holding the ``<wnid>_obj/`` folders.
        split: ``"train"``, ``"test"`` or None.
        categories: wnids (or names) to keep, in label order; default: every category folder
            present under ``root`` in the paper's order.
        parts_root: folder holding ``<wnid>/truth_part0{1,2}.mat`` (default ``root``).
        test_fraction: share of images in "test".
        **options: ``image_size``, ``margin``, ``augment``, ``skip_bad``, ``keep_outside_landmarks``
            of :class:`PartDataset`.
    """

    def __init__(self, root: str | Path, *, split: str | None = "train", categories: Sequence[str] | None = None,
                 parts_root: str | Path | None = None, test_fraction: float = 0.3, **options):
        check_split(split)
        self.root = root = Path(root)
        require_dir(root, "ILSVRC Animal-Part root")
        parts_root = Path(parts_root) if parts_root is not None else root
        by_name = {name: wnid for wnid, name in CATEGORIES.items()}
        if categories is None:
            wnids = [w for w in CATEGORIES if (root / f"{w}_obj").is_dir()]
            if not wnids:
                raise DatasetError(f"{root}: no <wnid>_obj folders of the 30 Animal-Part categories")
        else:
            categories = [categories] if isinstance(categories, str) else list(categories)
            wnids = []
            for c in categories:
                wnid = c if c in CATEGORIES else by_name.get(c)
                if wnid is None:
                    raise ValueError(f"unknown ILSVRC Animal-Part category {c!r}; known: {sorted(by_name)}")
                wnids.append(wnid)
        self.split = split

        records: list[Record] = []
        for label, wnid in enumerate(wnids):
            cat_dir = require_dir(root / f"{wnid}_obj", f"category folder of {wnid} ({CATEGORIES[wnid]})")
            data_path = cat_dir / "img" / "data.mat"
            samples = load_mat(data_path).get("samples")
            if samples is None:
                raise DatasetError(f"{data_path}: no variable 'samples'")
            part_files = [parts_root / wnid / f for f in PART_FILES]
            if not any(p.is_file() for p in part_files):
                raise DatasetError(f"{part_files[0]}: file not found (no part annotations for {wnid}: need truth_part01.mat and/or truth_part02.mat)")
            part_boxes = [read_part_boxes(p) if p.is_file() else {} for p in part_files]
            for i, sample in enumerate(mat_list(samples)):
                filename = f"{i + 1:05d}.jpg"
                where = f"{data_path}: samples({i + 1})"
                obj = getattr(sample, "obj", None)
                if obj is None:
                    raise DatasetError(f"{where}: no field 'obj'")
                box = _bndbox(obj, where)
                if split is not None and hash_split(f"{wnid}/{filename}", test_fraction) != split:
                    continue
                boxes = [pb.get(filename, np.zeros((0, 4))) for pb in part_boxes]
                lm = np.stack([
                    np.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2), axis=1).mean(axis=0)
                    if len(b) else np.full(2, np.nan)
                    for b in boxes
                ])  # fmt: skip
                records.append(
                    Record(
                        path=cat_dir / "img" / "img" / filename,
                        label=label,
                        box=box,
                        landmarks=lm,
                        parts=boxes,
                        key=f"{cat_dir / 'img' / 'img' / filename} ({where})",
                    )
                )
        super().__init__(records, classes=[CATEGORIES[w] for w in wnids], landmark_names=list(PARTS), part_names=list(PARTS),
                         **options)
        self.wnids = wnids

    def _load_masks(self, record: Record, width: int, height: int) -> np.ndarray:
        """Part boxes rasterised: pixel ``(r, c)`` is in a box when its centre is."""
        masks = np.zeros((len(PARTS), height, width), dtype=bool)
        cx = np.arange(width) + 0.5
        cy = np.arange(height) + 0.5
        for k, boxes in enumerate(record.parts):
            for x0, y0, x1, y1 in boxes:
                masks[k] |= ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
        return masks
