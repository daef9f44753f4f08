"""A frozen stem computed once: its outputs per image and transform, reused by every epoch, both
twins of a compare, evaluation and the explainer.

When the stem (the backbone below the top conv-layer) is frozen (``--freeze-stem``: fixed weights,
eval mode), its output for an image never changes. :class:`StemCache` computes it once per image
and transform (the image, and its mirror image when training flips) and serves it from memory,
or from a memory-mapped file in ``cache_dir`` (``--cache-dir``) when the features do not fit::

    image -> normalize -> stem  ==(once)==>  StemCache  ->  layers["top"] -> layers["new"] -> head

Keys: the SHA-256 of the stem's weights and buffers names the store; inside it, every entry is
keyed by the SHA-1 of the exact float32 image the stem reads (after decoding, cropping, resizing
and flipping). A changed image, crop, size, flip or stem can therefore never be served a stale
output: it has another key and is computed afresh.

:meth:`StemCache.dataset` wraps a dataset (built without augmentation) into a
:class:`CachedDataset` whose samples carry ``"stem"`` (the stem's output) instead of ``"image"``,
with the sample's annotations (label, box, landmarks, part masks), flipped with the features.
With ``flips=True`` each ``__getitem__`` draws its flip exactly as the dataset's own augmentation
does (one ``torch.rand(()) < 0.5``), so training on the cache sees the same flips, and the same
numbers up to float round-off, as training on the images.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.base import flip_permutation, hflip_sample
from .models.net import eval_mode


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


class _Store:
    """``key -> (C, h, w) float32`` rows, in memory or appended to ``DIR/features.f32``."""

    def __init__(self, root: Path | None):
        self.root, self.rows, self.shape, self._mem = root, {}, None, []
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            index = root / "index.json"
            if index.exists():
                meta = json.loads(index.read_text())
                self.rows, self.shape = meta["rows"], tuple(meta["shape"])

    def get(self, keys: list[str]) -> torch.Tensor:
        rows = [self.rows[k] for k in keys]
        if self.root is None:
            return torch.stack([self._mem[r] for r in rows])
        mm = np.memmap(self.root / "features.f32", dtype=np.float32, mode="r").reshape(-1, *self.shape)
        return torch.from_numpy(np.ascontiguousarray(mm[rows]))

    def add(self, keys: list[str], feats: torch.Tensor) -> None:
        feats = feats.detach().float().cpu().contiguous()
        if self.shape is None:
            self.shape = tuple(feats.shape[1:])
        if self.root is None:
            for k in keys:
                self.rows[k] = len(self.rows)
            self._mem.extend(feats.unbind(0))
            return
        # other processes may share the directory (two runs on one --cache-dir): under an exclusive
        # lock, rows go at the file's end and the index is re-read and merged before it is replaced
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self.root / "index.json"
            if index.exists():
                self.rows.update(json.loads(index.read_text())["rows"])
            start = max(self.rows.values(), default=-1) + 1  # rows past the index: a killed writer's, dropped
            with open(self.root / "features.f32", "ab") as f:
                f.truncate(start * 4 * int(np.prod(self.shape)))
                f.write(feats.numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
            for i, k in enumerate(keys):
                self.rows[k] = start + i
            tmp = self.root / f".index.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"rows": self.rows, "shape": list(self.shape)}))
            os.replace(tmp, index)  # the index never names rows not yet written

    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.shape or (0,))) * 4


class StemCache:
    """Outputs of a frozen ``stem`` (``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)``, e.g.
    ``lambda x: model.stem(model.normalize(x))``) for the images it has seen.

    Args:
        stem: the frozen part of the network (a module: its state names the store).
        forward: how to run it on images (default: ``stem`` itself).
        cache_dir: memory-map the features here (``DIR/<stem digest>/``); default: in memory.
        device: where the stem runs.
        batch_size: images per stem forward while filling the cache.
    """

    def __init__(self, stem: nn.Module, forward=None, *, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, progress: bool = True):  # fmt: skip
        self.stem, self.forward = stem, forward or stem
        self.digest = module_digest(stem)
        root = Path(cache_dir) / self.digest[:20] if cache_dir is not None else None
        self.store = _Store(root)
        self.device, self.batch_size, self.progress = torch.device(device), int(batch_size), progress
        self.computed = 0  # stem forwards done by this object (what the cache saved, the rest)

    @torch.no_grad()
    def _fill(self, images: list[torch.Tensor], keys: list[str]) -> None:
        todo = [(k, im) for k, im in zip(keys, images) if k not in self.store.rows]
        seen: set[str] = set()
        todo = [(k, im) for k, im in todo if not (k in seen or seen.add(k))]
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            x = torch.stack([im for _, im in chunk]).to(self.device)
            self.store.add([k for k, _ in chunk], self.forward(x))
            self.computed += len(chunk)

    def dataset(self, base: Dataset, *, flips: bool = False, desc: str = "stem cache") -> "CachedDataset":
        """``base`` (built without augmentation) with the stem's outputs in place of its images;
        with ``flips`` every sample is served as it is or mirrored, drawn per ``__getitem__``."""
        from .training.loop import progress

        lperm = flip_permutation(getattr(base, "landmark_names", []))
        pperm = flip_permutation(getattr(base, "part_names", []))
        notes: list[list[dict]] = []
        keys: list[list[str]] = []
        loader = DataLoader(base, batch_size=self.batch_size, shuffle=False, collate_fn=list)
        with eval_mode(self.stem), torch.random.fork_rng():  # filling the cache draws no number a run would see
            for batch in progress(loader, enabled=self.progress, total=len(loader), desc=desc):
                views = [[s] + ([hflip_sample(s, lperm, pperm)] if flips else []) for s in batch]
                flat = [v for vs in views for v in vs]
                ks = [image_key(v["image"]) for v in flat]
                self._fill([v["image"] for v in flat], ks)
                it = iter(ks)
                for vs in views:
                    keys.append([next(it) for _ in vs])
                    notes.append([_annotations(v) for v in vs])
        return CachedDataset(base, self, keys, notes, flips)

    def describe(self) -> str:
        where = str(self.store.root) if self.store.root is not None else "in memory"
        return f"stem cache: {len(self.store.rows)} feature maps {self.store.shape}, {self.store.nbytes() / 2**20:.1f} MiB ({where})"


def _annotations(sample: dict) -> dict:
    """Everything but the image; part masks bit-packed."""
    out = {k: v for k, v in sample.items() if k not in ("image", "part_masks")}
    if "part_masks" in sample:
        m = sample["part_masks"]
        out["part_masks"] = (np.packbits(m.numpy().reshape(-1)), tuple(m.shape))
    return out


class CachedDataset(Dataset):
    """Samples of ``base`` with ``"stem"`` (cached features) instead of ``"image"``.

    The dataset attributes (``classes``, ``landmark_names``, ``part_names``, ``image_size``) are
    ``base``'s; ``base[i]["image"]`` is the image (the report draws it)."""

    def __init__(self, base: Dataset, cache: StemCache, keys: list[list[str]], notes: list[list[dict]], flips: bool):
        self.base, self.cache, self.keys, self.notes, self.flips = base, cache, keys, notes, flips
        for name in ("classes", "landmark_names", "part_names", "image_size"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        view = int(bool(torch.rand(()) < 0.5)) if self.flips else 0  # the draw of PartDataset's augmentation
        sample = dict(self.notes[index][view])
        if "part_masks" in sample:
            bits, shape = sample["part_masks"]
            sample["part_masks"] = torch.from_numpy(np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape))
        sample["stem"] = self.cache.store.get([self.keys[index][view]])[0]
        return sample
