"""CUB-200-2011 (Wah et al. 2011), read in the dataset's own on-disk layout.

Layout under ``root`` (the ``CUB_200_2011`` folder, or its parent)::

    images.txt              <image_id> <relative path under images/>
    images/<class>/<file>.jpg
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>      (pixels)
    image_class_labels.txt  <image_id> <class_id>
    classes.txt             <class_id> <class name>                   (1-based ids)
    train_test_split.txt    <image_id> <is_training_image>            (1 train, 0 test)
    parts/parts.txt         <part_id> <part name>                     (15 parts)
    parts/part_locs.txt     <image_id> <part_id> <x> <y> <visible>

The official split is used. Coordinates are taken as continuous pixel coordinates as given:
the box is ``(x, y, x + width, y + height)`` and a part location is the point ``(x, y)``;
a part with ``visible = 0`` is absent (NaN).

Positives are the object crops: each image is cropped by its box (grown by ``margin``) and
resized to ``image_size`` (paper §5.1: "we cropped objects ... based on their bounding boxes").

Landmarks (paper §5.2.2: "ground-truth positions of the head, back, tail of birds"):
``landmarks="paper"`` gives ``["head", "back", "tail"]``. CUB has no "head" part; **our head is
the mean of the visible ``crown`` and ``forehead`` locations** (the top of the head; NaN when
neither is visible). ``back`` and ``tail`` are CUB's parts of those names.
``landmarks="all"`` gives CUB's 15 parts under their own names. CUB has no part masks
(``part_names == []``).

Labels: ``labels="species"`` (multi-category: ``classes`` = the names in ``classes.txt`` of the
species that ``images.txt`` shows, in class-id order, after ``species``; label = the index in that
list: the full dataset's 200, the first-10 subset's 10) or ``labels="bird"`` (single-category:
every image is the one class ``"bird"``, paper §5.1: species ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DatasetError, PartDataset, Record, check_split, parse_number, read_table, require_dir

HEAD_PARTS = ("crown", "forehead")
PAPER_LANDMARKS = ("head", "back", "tail")


def find_cub_root(root: str | Path) -> Path:
    root = Path(root)
    require_dir(root, "CUB-200-2011 root")
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"
    return root


def parse_ids(spec: str | Sequence[int], count: int) -> set[int]:
    """``"1-5"``, ``"1,3,6-10"`` or a list of ints -> a set of 1-based ids in ``[1, count]``."""
    ids: set[int] = set()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    for part in parts:
        try:
            lo, _, hi = str(part).strip().partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise DatasetError(f"species {spec!r}: expected class ids such as '1-5' or '1,3,6-10'") from None
    bad = sorted(i for i in ids if not 1 <= i <= count)
    if bad or not ids:
        raise DatasetError(f"species {spec!r}: class ids must lie in 1..{count}")
    return ids


def _by_id(rows: list[list[str]], path: Path, what: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n, row in enumerate(rows, 1):
        key = parse_number(row[0], path, n, int)
        if key in out:
            raise DatasetError(f"{path}: {what} id {key} appears twice")
        out[key] = row[1:]
    return out


class CUB200(PartDataset):
    """CUB-200-2011 object crops with head/back/tail landmarks.

    Args:
        root: the ``CUB_200_2011`` folder (or its parent).
        split: ``"train"``, ``"test"`` (official split) or None for all images.
        labels: ``"species"`` (the species the images show: 200 on the full dataset) or ``"bird"``
            (one class).
        landmarks: ``"paper"`` (head, back, tail) or ``"all"`` (CUB's 15 parts).
        **options: ``image_size``, ``margin``, ``augment``, ``skip_bad``, ``keep_outside_landmarks``
            of :class:`PartDataset`.
        species: keep only these species (class ids of ``classes.txt``, 1-based): a list, or a
            string of ids and ranges such as ``"1-5"`` or ``"1,3,6-10"`` (species transfer).
    """

    def __init__(self, root: str | Path, *, split: str | None = "train", labels: str = "species", landmarks: str = "paper",
                 species: str | Sequence[int] | None = None, **options):
        check_split(split)
        if labels not in ("species", "bird"):
            raise ValueError(f"labels must be 'species' or 'bird', got {labels!r}")
        if landmarks not in ("paper", "all"):
            raise ValueError(f"landmarks must be 'paper' or 'all', got {landmarks!r}")
        self.root = root = find_cub_root(root)
        self.split = split

        p_images, p_boxes = root / "images.txt", root / "bounding_boxes.txt"
        p_labels, p_classes = root / "image_class_labels.txt", root / "classes.txt"
        p_split, p_parts, p_locs = root / "train_test_split.txt", root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
        images = _by_id(read_table(p_images, 2, text_last=True), p_images, "image")
        boxes = _by_id(read_table(p_boxes, 5), p_boxes, "image")
        image_labels = _by_id(read_table(p_labels, 2), p_labels, "image")
        class_rows = _by_id(read_table(p_classes, 2, text_last=True), p_classes, "class")
        is_train = _by_id(read_table(p_split, 2), p_split, "image")
        part_rows = _by_id(read_table(p_parts, 2, text_last=True), p_parts, "part")

        if sorted(class_rows) != list(range(1, len(class_rows) + 1)):
            raise DatasetError(f"{p_classes}: class ids must be 1..{len(class_rows)}")
        species_ids, species = species, [class_rows[i][0] for i in range(1, len(class_rows) + 1)]
        part_names = {pid: row[0] for pid, row in part_rows.items()}
        part_index = {name: pid for pid, name in part_names.items()}
        for needed in (*HEAD_PARTS, "back", "tail") if landmarks == "paper" else ():
            if needed not in part_index:
                raise DatasetError(f"{p_parts}: no part named {needed!r} (needed for landmarks='paper')")

        for path, table in ((p_boxes, boxes), (p_labels, image_labels), (p_split, is_train)):
            missing = sorted(set(images) - set(table))
            if missing:
                raise DatasetError(f"{path}: no line for image id {missing[0]} of images.txt ({len(missing)} missing)")

        # part_locs: (image id, part id) -> (x, y) or NaN
        part_ids = sorted(part_names)
        column = {pid: k for k, pid in enumerate(part_ids)}
        locs = {i: np.full((len(part_ids), 2), np.nan) for i in images}
        for n, row in enumerate(read_table(p_locs, 5), 1):
            img, pid = parse_number(row[0], p_locs, n, int), parse_number(row[1], p_locs, n, int)
            if img not in locs:
                raise DatasetError(f"{p_locs}:{n}: image id {img} is not in images.txt")
            if pid not in column:
                raise DatasetError(f"{p_locs}:{n}: part id {pid} is not in parts/parts.txt")
            x, y = parse_number(row[2], p_locs, n), parse_number(row[3], p_locs, n)
            vis = parse_number(row[4], p_locs, n, int)
            if vis not in (0, 1):
                raise DatasetError(f"{p_locs}:{n}: visible must be 0 or 1, got {vis}")
            if vis:
                locs[img][column[pid]] = (x, y)

        if landmarks == "paper":
            names = list(PAPER_LANDMARKS)
            head_cols = [column[part_index[n]] for n in HEAD_PARTS]
            back_col, tail_col = column[part_index["back"]], column[part_index["tail"]]
        else:
            names = [part_names[pid] for pid in part_ids]

        keep = None if species_ids is None else parse_ids(species_ids, len(species))
        # the species the images show (either split, after ``species``): a class no image shows can
        # be neither learnt nor scored, so a subset of CUB gets a head of its own species only
        class_of = {i: parse_number(image_labels[i][0], p_labels, f"image {i}", int) for i in sorted(images)}
        for img_id, cls in class_of.items():
            if not 1 <= cls <= len(species):
                raise DatasetError(f"{p_labels}: image {img_id}: class id {cls} is not in classes.txt")
        shown = sorted(c for c in set(class_of.values()) if keep is None or c in keep)
        label_of = {c: i for i, c in enumerate(shown)}
        records = []
        for img_id in sorted(images):
            flag = parse_number(is_train[img_id][0], p_split, f"image {img_id}", int)
            if flag not in (0, 1):
                raise DatasetError(f"{p_split}: image {img_id}: is_training_image must be 0 or 1, got {flag}")
            if split is not None and (flag == 1) != (split == "train"):
                continue
            cls = class_of[img_id]
            if keep is not None and cls not in keep:
                continue
            x, y, w, h = (parse_number(v, p_boxes, f"image {img_id}") for v in boxes[img_id])
            if w <= 0 or h <= 0:
                raise DatasetError(f"{p_boxes}: image {img_id}: box width/height must be > 0, got {w} x {h}")
            pts = locs[img_id]
            if landmarks == "paper":
                head = pts[head_cols]
                seen = ~np.isnan(head[:, 0])
                head_xy = head[seen].mean(axis=0) if seen.any() else np.full(2, np.nan)
                lm = np.stack((head_xy, pts[back_col], pts[tail_col]))
            else:
                lm = pts.copy()
            rel = images[img_id][0]
            records.append(
                Record(
                    path=root / "images" / rel,
                    label=label_of[cls] if labels == "species" else 0,
                    box=(x, y, x + w, y + h),
                    landmarks=lm,
                    key=f"{root / 'images' / rel} (image id {img_id})",
                    extra={"image_id": img_id},
                )
            )
        classes = [species[c - 1] for c in shown] if labels == "species" else ["bird"]
        super().__init__(records, classes=classes, landmark_names=names, part_names=[], **options)
