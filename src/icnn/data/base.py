"""What every dataset shares: the sample contract, errors, and the crop/resize geometry.

A sample (``docs/DESIGN.md``) is a dict::

    image      float32 (3, H, W) in [0, 1]   resized to ``dataset.image_size``
    label      int64 ()
    box        float32 (4,)     x0, y0, x1, y1 in output pixels (NaN for negatives)
    landmarks  float32 (K, 2)   (x, y) per ``dataset.landmark_names``, NaN where absent
    part_masks bool (P, H, W)   per ``dataset.part_names``; only when P > 0
    index      int64 ()

Coordinates are continuous pixel coordinates: pixel ``p`` covers ``[p, p + 1)``. Cropping the
region ``c = (cx0, cy0, cx1, cy1)`` of a source image and resizing it to ``(H, W)`` is the affine
map ``x' = (x - cx0) * W / (cx1 - cx0)``, ``y' = (y - cy0) * H / (cy1 - cy0)``; Pillow's
``resize(box=...)`` samples output pixel ``u`` at source point ``cx0 + (u + 0.5) * (cx1 - cx0) / W``,
i.e. exactly this map, so landmarks, boxes and masks stay aligned with the pixels.

Real datasets subclass :class:`PartDataset`: they read their index files eagerly (cheap) into a
list of :class:`Record` s and, if they have masks, implement ``_load_masks``. Images are decoded
lazily in ``__getitem__``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SAMPLE_KEYS = ("image", "label", "box", "landmarks", "part_masks", "index")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

Box = tuple[float, float, float, float]


class DatasetError(ValueError):
    """A missing or corrupt dataset file; the message is one line naming the file and the problem."""


def as_batches(data: Dataset | Iterable[dict], batch_size: int) -> Iterable[dict]:
    """The batches of one pass over ``data``: a Dataset in its order (a DataLoader, no shuffling);
    anything else is taken to be batches already (a DataLoader, a list of batch dicts)."""
    return DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data


# ---------------------------------------------------------------------------------------------
# small shared readers


def as_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(H, W) -> (H, W)``; rejects non-positive sizes."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return path


def require_dir(path: Path, what: str = "dataset root") -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found (not a directory)")
    return path


def read_table(path: Path, columns: int, *, text_last: bool = False) -> list[list[str]]:
    """Whitespace-separated rows of exactly ``columns`` fields (CUB index files).

    With ``text_last`` the last field takes the rest of the line (names may hold spaces).
    """
    require_file(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(None, columns - 1) if text_last else line.split()
        if len(fields) != columns:
            raise DatasetError(f"{path}:{n}: expected {columns} fields, got {len(fields)}: {line.strip()!r}")
        rows.append([f.strip() for f in fields])
    if not rows:
        raise DatasetError(f"{path}: file is empty")
    return rows


def parse_number(text: str, path: Path, line: int | str, kind: type = float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise DatasetError(f"{path}:{line}: not a number: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise DatasetError(f"{path}:{line}: not a finite number: {text!r}")
    return value


def hash_split(key: str, test_fraction: float) -> str:
    """Deterministic split of datasets that ship without one: ``"test"`` for a fixed
    ``test_fraction`` of keys (CRC32 of the key), ``"train"`` otherwise. Stable when files are
    added or removed, identical on every machine."""
    return "test" if zlib.crc32(key.encode("utf-8")) / 2**32 < test_fraction else "train"


def check_split(split: str | None, allowed: Sequence[str | None] = ("train", "test", None)) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")


def list_images(root: Path) -> list[Path]:
    """Every jpg/jpeg/png under ``root`` (recursive, any case), sorted by relative path."""
    require_dir(root, "image folder")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB; any failure is a :class:`DatasetError` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def peek_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header only (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def load_mat(path: Path) -> dict:
    """``scipy.io.loadmat`` with MATLAB structs as attribute objects (``squeeze_me``); any
    failure is a :class:`DatasetError` naming the file. MATLAB v7.3 (HDF5) files are not
    readable by scipy: re-save them with ``save(file, '-v7')``."""
    import scipy.io

    require_file(path)
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except NotImplementedError:
        raise DatasetError(
            f"{path}: MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in MATLAB "
            "with save(file, '-v7')"
        ) from None
    except Exception as exc:  # scipy raises many types on corrupt input
        raise DatasetError(f"{path}: cannot read MATLAB file ({type(exc).__name__}: {exc})") from None


def mat_list(value: Any) -> list:
    """A MATLAB struct array read with ``squeeze_me`` as a Python list (0, 1 or n elements)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


# ---------------------------------------------------------------------------------------------
# geometry (pure functions)


def check_box(box: Sequence[float], width: int, height: int, where: str, *, tolerance: float = 1.0) -> Box:
    """Validate an object box against its image: finite, non-empty, inside the image up to
    ``tolerance`` pixels (annotation rounding). Returns it as a float tuple."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise DatasetError(f"{where}: box {list(box)} is not finite")
    if x1 <= x0 or y1 <= y0:
        raise DatasetError(f"{where}: box {list(box)} is empty (need x0 < x1 and y0 < y1)")
    t = tolerance
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise DatasetError(f"{where}: box {list(box)} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def crop_region(box: Box, margin: float, width: int, height: int) -> Box:
    """The crop of an object box: grown by ``margin`` x its width/height on each side, clamped
    to the image ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    c = (max(0.0, x0 - mx), max(0.0, y0 - my), min(float(width), x1 + mx), min(float(height), y1 + my))
    if c[2] <= c[0] or c[3] <= c[1]:
        raise ValueError(f"crop region {c} is empty")
    return c


def transform_points(points: np.ndarray, crop: Box, out_hw: tuple[int, int]) -> np.ndarray:
    """Map ``(K, 2)`` source points ``(x, y)`` into the resized crop (NaN stays NaN)."""
    sx, sy = out_hw[1] / (crop[2] - crop[0]), out_hw[0] / (crop[3] - crop[1])  # the crop -> output map
    return ((points - np.array(crop[:2], dtype=np.float64)) * np.array([sx, sy])).astype(np.float32)


def transform_box(box: Box, crop: Box, out_hw: tuple[int, int]) -> np.ndarray:
    """Map a source box into the resized crop, clipped to the output image."""
    pts = transform_points(np.array([[box[0], box[1]], [box[2], box[3]]], dtype=np.float64), crop, out_hw)
    h, w = out_hw
    return np.array([np.clip(pts[0, 0], 0, w), np.clip(pts[0, 1], 0, h), np.clip(pts[1, 0], 0, w), np.clip(pts[1, 1], 0, h)], dtype=np.float32)


def resize_image(image: Image.Image, crop: Box, out_hw: tuple[int, int]) -> torch.Tensor:
    """Crop + bilinear (antialiased) resize: ``(3, H, W)`` float32 in [0, 1]."""
    out = image.resize((out_hw[1], out_hw[0]), Image.Resampling.BILINEAR, box=crop)
    arr = np.asarray(out, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_masks(masks: np.ndarray, crop: Box, out_hw: tuple[int, int]) -> torch.Tensor:
    """Crop + nearest resize of ``(P, h, w)`` bool masks: output pixel ``u`` takes the source
    pixel under its centre. Packs 8 masks per uint8 image so P masks cost ``ceil(P/8)`` resizes."""
    p = masks.shape[0]
    out = np.zeros((p, out_hw[0], out_hw[1]), dtype=bool)
    bits = (1 << np.arange(8, dtype=np.uint16)).astype(np.uint8)
    for start in range(0, p, 8):
        chunk = masks[start : start + 8]  # (<=8, h, w)
        packed = np.tensordot(bits[: len(chunk)], chunk.astype(np.uint8), axes=1).astype(np.uint8)  # (h, w)
        img = Image.fromarray(packed, mode="L").resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST, box=crop)
        res = np.asarray(img, dtype=np.uint8)
        out[start : start + len(chunk)] = (res[None] & bits[: len(chunk), None, None]) > 0
    return torch.from_numpy(out)


def flip_permutation(names: Sequence[str]) -> list[int]:
    """Index map that swaps left/right names (``"left eye" <-> "right eye"``,
    ``"left_leg" <-> "right_leg"``, any case) under a horizontal flip; other names map to
    themselves, as does a name whose twin is not in the list."""
    lower = [n.lower() for n in names]
    perm = []
    for i, n in enumerate(lower):
        twin = n.replace("left", "\0").replace("right", "left").replace("\0", "right")
        perm.append(lower.index(twin) if twin != n and twin in lower else i)
    return perm


def hflip_sample(sample: dict, landmark_perm: Sequence[int], part_perm: Sequence[int]) -> dict:
    """Mirror a sample left-right: image, box, landmarks (x -> W - x, left/right names
    swapped) and part masks (flipped, left/right swapped)."""
    w = sample["image"].shape[-1]
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    x0, y0, x1, y1 = sample["box"].unbind()
    out["box"] = torch.stack((w - x1, y0, w - x0, y1))
    lm = sample["landmarks"][list(landmark_perm)].clone()
    lm[:, 0] = w - lm[:, 0]
    out["landmarks"] = lm
    if "part_masks" in sample:
        out["part_masks"] = sample["part_masks"][list(part_perm)].flip(-1)
    return out


# ---------------------------------------------------------------------------------------------
# the shared dataset


@dataclass
class Record:
    """One sample before decoding: everything in source-image pixels."""

    path: Path
    label: int
    box: Box | None  # object box; None = the whole image
    landmarks: np.ndarray  # (K, 2) float64, NaN where absent
    parts: Any = None  # dataset-specific handle for ``_load_masks``
    key: str = ""  # where the annotation came from, for messages
    extra: dict = field(default_factory=dict)


class PartDataset(Dataset):
    """A list of :class:`Record` s turned into samples: decode, crop by box (+margin), resize,
    transform landmarks/box/masks, optional horizontal flip.

    Args:
        records: the samples, in order.
        classes, landmark_names, part_names: the dataset's name lists.
        image_size: output ``(H, W)`` (or an int for square).
        margin: crop margin around the object box, as a fraction of its width/height.
        augment: random horizontal flip (p = 0.5, torch RNG); only meaningful for training.
        skip_bad: False: a bad image raises :class:`DatasetError`. True: images are checked
            (header + box) at construction and bad ones dropped; an image that still fails to
            decode later is replaced by the next good one. Every skip is listed in
            ``self.skipped`` as ``(file, reason)`` (per process: DataLoader workers keep
            their own lists).
        keep_outside_landmarks: False (default): landmarks outside the crop become NaN (the
            network never sees them); True keeps their (out-of-image) coordinates.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        classes: Sequence[str],
        landmark_names: Sequence[str],
        part_names: Sequence[str] = (),
        image_size: int | Sequence[int] = 224,
        margin: float = 0.0,
        augment: bool = False,
        skip_bad: bool = False,
        keep_outside_landmarks: bool = False,
    ):
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.records = list(records)
        self.classes = list(classes)
        self.landmark_names = list(landmark_names)
        self.part_names = list(part_names)
        self.image_size = as_image_size(image_size)
        self.margin = float(margin)
        self.augment = bool(augment)
        self.skip_bad = bool(skip_bad)
        self.keep_outside_landmarks = bool(keep_outside_landmarks)
        self.skipped: list[tuple[str, str]] = []
        self._landmark_perm = flip_permutation(self.landmark_names)
        self._part_perm = flip_permutation(self.part_names)
        if self.skip_bad:
            self._drop_bad_records()

    # -- hooks -------------------------------------------------------------------------------
    def _load_masks(self, record: Record, width: int, height: int) -> np.ndarray:
        """``(P, height, width)`` bool masks in source pixels; datasets with parts override."""
        raise NotImplementedError

    # -- construction-time checks ---------------------------------------------------------------
    def _drop_bad_records(self) -> None:
        keep = []
        for r in self.records:
            try:
                w, h = peek_image_size(r.path)
                if r.box is not None:
                    check_box(r.box, w, h, f"{r.key or r.path}")
                keep.append(r)
            except DatasetError as exc:
                self.skipped.append((str(r.path), str(exc)))
        self.records = keep

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    # -- samples ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} samples")
        if not self.skip_bad:
            return self._sample(index, index)
        for step in range(len(self.records)):
            j = (index + step) % len(self.records)
            try:
                return self._sample(j, index)
            except DatasetError as exc:
                self.skipped.append((str(self.records[j].path), str(exc)))
        raise DatasetError(f"{type(self).__name__}: no readable sample left (every image failed)")

    def _sample(self, j: int, index: int) -> dict:
        r = self.records[j]
        image = open_image(r.path)
        width, height = image.size
        if r.box is None:
            box: Box = (0.0, 0.0, float(width), float(height))
            crop = box
        else:
            box = check_box(r.box, width, height, f"{r.key or r.path}")
            crop = crop_region(box, self.margin, width, height)
        out_hw = self.image_size
        landmarks = transform_points(np.asarray(r.landmarks, dtype=np.float64).reshape(-1, 2), crop, out_hw)
        if not self.keep_outside_landmarks and len(landmarks):
            h, w = out_hw
            outside = (landmarks[:, 0] < 0) | (landmarks[:, 0] > w) | (landmarks[:, 1] < 0) | (landmarks[:, 1] > h)
            landmarks[outside] = np.nan
        sample = {
            "image": resize_image(image, crop, out_hw),
            "label": torch.tensor(r.label, dtype=torch.int64),
            "box": torch.from_numpy(transform_box(box, crop, out_hw)),
            "landmarks": torch.from_numpy(landmarks),
        }
        if self.part_names:
            masks = self._load_masks(r, width, height)
            if masks.shape != (len(self.part_names), height, width):
                raise DatasetError(
                    f"{r.key or r.path}: part masks have shape {tuple(masks.shape)}, expected "
                    f"{(len(self.part_names), height, width)}"
                )
            sample["part_masks"] = resize_masks(masks, crop, out_hw)
        sample["index"] = torch.tensor(index, dtype=torch.int64)
        if self.augment and torch.rand(()) < 0.5:
            sample = hflip_sample(sample, self._landmark_perm, self._part_perm)
        return sample

    def extra_repr(self) -> str:
        return (
            f"{len(self)} samples, {len(self.classes)} classes, landmarks={self.landmark_names}, "
            f"parts={self.part_names}, image_size={self.image_size}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
