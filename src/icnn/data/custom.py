"""Your own part-annotated images: a folder of images plus one JSON file.

Layout::

    root/annotations.json        (or pass the JSON path itself as root)
    root/<any>/<image files>     paths in the JSON are relative to the JSON's folder

The JSON::

    {
      "classes": ["bird", "cat"],                  # label names, in label order (required)
      "landmark_names": ["head", "tail"],          # optional, default []
      "part_names": ["head", "torso"],             # optional, default [] (no part masks)
      "images": [                                  # required, one entry per sample
        {
          "file": "images/a.jpg",                  # required
          "label": "bird",                         # required: a name from "classes"
          "box": [x0, y0, x1, y1],                 # optional: object box in pixels; the sample
                                                   #   is this crop. Absent: the whole image
          "split": "train",                        # optional: "train" or "test"
          "landmarks": {"head": [x, y]},           # optional: names from "landmark_names";
                                                   #   missing names or null are absent (NaN)
          "part_masks": {"head": "masks/a_head.png"}  # optional: names from "part_names"; a
                                                   #   mask image the size of the image, nonzero =
                                                   #   part; a missing name is an empty mask
        }
      ]
    }

Coordinates are continuous pixel coordinates (pixel ``p`` covers ``[p, p + 1)``; the centre of
the top-left pixel is ``(0.5, 0.5)``). Splits: when entries carry ``"split"``, ``split="train"``
selects those marked ``"train"``; a file where no entry has ``"split"`` is one set, returned for
every split. A file where only some entries have it is an error (ambiguous).

Everything in the JSON is checked at construction, and every image file must exist; each problem
is one :class:`DatasetError` naming the file and the entry (``annotations.json: images[3].box:
...``). An entry repeating another (same file and box) is refused, and so is a file listed in both
splits (it would be tested on what it trained on). Images and mask files are decoded lazily.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import DatasetError, PartDataset, Record, check_split, require_file

ANNOTATION_FILE = "annotations.json"
_ENTRY_KEYS = {"file", "label", "box", "split", "landmarks", "part_masks"}


def _names(doc: dict, key: str, path: Path, required: bool) -> list[str]:
    if key not in doc:
        if required:
            raise DatasetError(f"{path}: missing required key {key!r}")
        return []
    value = doc[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DatasetError(f"{path}: {key!r} must be a list of non-empty strings")
    if len(set(value)) != len(value):
        raise DatasetError(f"{path}: {key!r} has duplicate names")
    return value


def _point(value: Any, where: str) -> tuple[float, float]:
    if value is None:
        return math.nan, math.nan
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{where}: must be [x, y] numbers or null, got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise DatasetError(f"{where}: coordinates must be finite, got {value!r}")
    return float(value[0]), float(value[1])


class CustomParts(PartDataset):
    """Images described by one JSON file (format in the module docstring).

    Args:
        root: the folder holding ``annotations.json``, or the JSON file itself.
        split: ``"train"``, ``"test"`` or None (all).
        annotations: the JSON file name inside ``root``.
        **options: ``image_size``, ``margin``, ``augment``, ``skip_bad``, ``keep_outside_landmarks``
            of :class:`PartDataset`. With ``skip_bad`` an invalid JSON entry is skipped (listed in
            ``skipped``) instead of raising; structural errors (bad JSON, missing top-level keys)
            always raise.
    """

    def __init__(self, root: str | Path, *, split: str | None = None, annotations: str = ANNOTATION_FILE, **options):
        check_split(split)
        root = Path(root)
        path = root if root.is_file() else root / annotations
        require_file(path)
        self.annotation_file = path
        base = path.parent
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if not isinstance(doc, dict):
            raise DatasetError(f"{path}: top level must be an object with 'classes' and 'images'")
        unknown = set(doc) - {"classes", "landmark_names", "part_names", "images"}
        if unknown:
            raise DatasetError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
        classes = _names(doc, "classes", path, True)
        if not classes:
            raise DatasetError(f"{path}: 'classes' is empty")
        landmark_names = _names(doc, "landmark_names", path, False)
        part_names = _names(doc, "part_names", path, False)
        entries = doc.get("images")
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{path}: 'images' must be a non-empty list")
        has_split = [isinstance(e, dict) and "split" in e for e in entries]
        if any(has_split) and not all(has_split):
            first = has_split.index(False)
            raise DatasetError(f"{path}: images[{first}] has no 'split' but other entries do (give every entry a split, or none)")

        skipped: list[tuple[str, str]] = []
        records = []
        seen: dict[tuple, tuple[int, str | None]] = {}  # (file, box) -> (entry, split)
        split_of: dict[Path, tuple[int, str]] = {}  # file -> (entry, split)
        for i, entry in enumerate(entries):
            try:
                record = self._record(entry, i, path, base, classes, landmark_names, part_names)
                key = (record.path.resolve(), record.box)
                if key in seen:
                    raise DatasetError(f"{path}: images[{i}] repeats images[{seen[key][0]}] (same file and box)")
                seen[key] = (i, entry.get("split"))
                other = split_of.get(record.path.resolve())
                if other is not None and "split" in entry and other[1] != entry["split"]:
                    raise DatasetError(f"{path}: images[{i}] ({entry['split']}) and images[{other[0]}] ({other[1]}) "
                                       f"use the same file {entry['file']!r}: a test image must not be trained on")
                if "split" in entry:
                    split_of.setdefault(record.path.resolve(), (i, entry["split"]))
            except DatasetError as exc:
                if not options.get("skip_bad", False):
                    raise
                skipped.append((f"{path}: images[{i}]", str(exc)))
                continue
            if split is None or not any(has_split) or entry["split"] == split:
                records.append(record)
        super().__init__(records, classes=classes, landmark_names=landmark_names, part_names=part_names, **options)
        self.skipped = skipped + self.skipped

    @staticmethod
    def _record(entry, i, path, base, classes, landmark_names, part_names) -> Record:
        at = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{at}: must be an object")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise DatasetError(f"{at}: unknown key(s) {sorted(unknown)}")
        file = entry.get("file")
        if not isinstance(file, str) or not file:
            raise DatasetError(f"{at}.file: required, a path relative to {base}")
        if not (base / file).is_file():
            raise DatasetError(f"{at}.file: {base / file} not found")
        label = entry.get("label")
        if label not in classes:
            raise DatasetError(f"{at}.label: {label!r} is not one of the classes {classes}")
        if "split" in entry and entry["split"] not in ("train", "test"):
            raise DatasetError(f"{at}.split: must be 'train' or 'test', got {entry['split']!r}")
        box = None
        if entry.get("box") is not None:
            b = entry["box"]
            ok = isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            if not ok:
                raise DatasetError(f"{at}.box: must be [x0, y0, x1, y1] finite numbers, got {b!r}")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise DatasetError(f"{at}.box: {b} is empty (need x0 < x1 and y0 < y1)")
            box = tuple(float(v) for v in b)
        lm = np.full((len(landmark_names), 2), np.nan)
        given = entry.get("landmarks") or {}
        if not isinstance(given, dict):
            raise DatasetError(f"{at}.landmarks: must be an object {{name: [x, y]}}")
        for name, value in given.items():
            if name not in landmark_names:
                raise DatasetError(f"{at}.landmarks.{name}: not in landmark_names {landmark_names}")
            lm[landmark_names.index(name)] = _point(value, f"{at}.landmarks.{name}")
        masks = entry.get("part_masks") or {}
        if not isinstance(masks, dict):
            raise DatasetError(f"{at}.part_masks: must be an object {{name: mask file}}")
        mask_files: dict[int, Path] = {}
        for name, value in masks.items():
            if name not in part_names:
                raise DatasetError(f"{at}.part_masks.{name}: not in part_names {part_names}")
            if not isinstance(value, str) or not value:
                raise DatasetError(f"{at}.part_masks.{name}: must be a mask file path")
            mask_files[part_names.index(name)] = base / value
        return Record(path=base / file, label=classes.index(label), box=box, landmarks=lm, parts=mask_files, key=f"{base / file} ({at})")

    def _load_masks(self, record: Record, width: int, height: int) -> np.ndarray:
        out = np.zeros((len(self.part_names), height, width), dtype=bool)
        for k, mask_path in record.parts.items():
            try:
                with Image.open(mask_path) as im:
                    im.load()
                    arr = np.asarray(im.convert("L")) > 0 if im.mode not in ("1", "L", "I", "I;16") else np.asarray(im) > 0
            except FileNotFoundError:
                raise DatasetError(f"{mask_path}: mask file not found ({record.key})") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise DatasetError(f"{mask_path}: cannot decode mask ({exc})") from None
            if arr.shape != (height, width):
                raise DatasetError(f"{mask_path}: mask is {arr.shape[1]}x{arr.shape[0]} but its image {record.path} is {width}x{height}")
            out[k] = arr
        return out

