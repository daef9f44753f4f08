"""Conv-layer features of a pretrained CNN for the explanatory graph (SPEC-trees-graph §2a "Data",
"Features"; the authors' ``getRoughCNN.m``).

For object crops ``I`` and every chosen layer the code keeps ``R = max(x / sigma_neg, 0)``: the
layer's **pre-ReLU** output ``x`` divided unit by unit (``h, w, c``) by its population standard
deviation over negative images (``getAvgResponse``: ``sqrt(E[x^2] - E[x]^2)`` over 1,000
negatives), negatives mapping to 0. We store ``max(x, 0)`` as float16 in chunk files of
``chunk_size`` images and divide by ``sigma_neg`` on reading, so one pass over the data does it
all. A unit that never varies on the negatives would divide by 0: ``sigma_neg`` is floored at
1e-3 times the layer's mean ``sigma_neg``.

On disk (``root``)::

    features.json                layers (name, channels, size, stride, offset), image size, landmark names
    stats.safetensors            sigma/<layer> (C, H, W), landmarks (N, K, 2), indices (N,)
    chunk_00000.safetensors ...  <layer> (B, C, H, W) float16, max(x, 0)

Layers are read with forward hooks by module name (``icnn layers --arch A`` lists them); the
forward stops after the topmost chosen layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from icnn.training.loop import progress

from .config import GraphError

FP16_MAX = float(torch.finfo(torch.float16).max)


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The layers a graph is learned on, bottom to top (module names of ``model``).

    - ``vgg16``: conv4_2, conv4_3, conv5_2, conv5_3 before their ReLU (the paper's and the code's,
      ``validLayers = [9, 10, 12, 13]``): 28, 28, 14, 14 px maps at 224 px.
    - ``efficientnet_lite*``: the last two blocks of stage 4 (stride 16, 14 px at 224) and of
      stage 5 (stride 32, 7 px), the analogue of VGG's conv4 / conv5 pairs one octave up (the
      stride-8 stage has 40 channels only). A block's output is linear (projection BN plus the
      shortcut), so "pre-ReLU" holds as for VGG.
    - ``resnet*``: the last two blocks of ``layer3`` and ``layer4`` (block outputs, after the
      block's ReLU: a ResNet has no pre-activation block output).
    - ``small_cnn``: the BN outputs of blocks 2, 3, 4 (32, 16, 8 px at 64 px).
    """
    arch = getattr(model, "arch", "")
    if arch == "vgg16":
        return ("stem.19", "stem.21", "stem.26", "layers.top.body.28")
    if arch.startswith("efficientnet_lite"):
        blocks = model.stem.blocks
        return tuple(f"stem.blocks.{s}.{len(blocks[s]) + i}" for s in (4, 5) for i in (-2, -1))
    if arch.startswith("resnet"):
        l3, l4 = len(model.stem.layer3), len(model.layers.top.body.layer4)
        return (f"stem.layer3.{l3 - 2}", f"stem.layer3.{l3 - 1}", f"layers.top.body.layer4.{l4 - 2}",
                f"layers.top.body.layer4.{l4 - 1}")  # fmt: skip
    if arch == "small_cnn":
        return ("stem.block2.bn", "stem.block3.bn", "layers.top.body.block4.bn")
    raise GraphError(f"layers: no default layers for arch {arch!r}; name them (see `icnn layers --arch {arch}`)")


@dataclass(frozen=True)
class LayerInfo:
    """One layer of the graph: its map and the receptive-field centres of its units.

    Unit ``(i, j)`` (row, column; also any fractional position) is centred on the image at
    ``(x, y) = (offset_x + stride_x * j + 0.5, offset_y + stride_y * i + 0.5)`` (docs/DESIGN.md).
    """

    name: str
    channels: int
    size: tuple[int, int]  # (H, W)
    stride: tuple[int, int]  # (sy, sx)
    offset: tuple[float, float]  # (oy, ox)

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(d["name"], d["channels"], tuple(d["size"]), tuple(d["stride"]), tuple(d["offset"]))

    @property
    def side(self) -> int:
        return self.size[0]

    def pixels(self, pos: torch.Tensor) -> torch.Tensor:
        """Map positions ``(..., 2)`` as (row, col) -> image points ``(..., 2)`` as (x, y)."""
        sy, sx = self.stride
        oy, ox = self.offset
        return torch.stack((ox + sx * pos[..., 1] + 0.5, oy + sy * pos[..., 0] + 0.5), dim=-1)


class FeatureStore:
    """Read side of a features directory (module doc): normalised maps chunk by chunk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "features.json"
        if not meta_path.exists():
            raise GraphError(f"features: {self.root} holds no features.json (run extract_features first)")
        meta = json.loads(meta_path.read_text())
        self.layers = [LayerInfo.from_dict(d) for d in meta["layers"]]
        self.arch: str = meta.get("arch", "")
        self.image_hw: tuple[int, int] = tuple(meta["image_hw"])
        self.landmark_names: list[str] = list(meta["landmark_names"])
        self.chunk_size: int = int(meta["chunk_size"])
        self.num_images: int = int(meta["num_images"])
        with safe_open(self.root / "stats.safetensors", "pt") as f:
            self.sigma = {L.name: f.get_tensor(f"sigma/{L.name}") for L in self.layers}
            self.landmarks = f.get_tensor("landmarks")  # (N, K, 2) (x, y), NaN where absent
            self.indices = f.get_tensor("indices")  # (N,) positions in the source dataset

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def batches(self, size: int) -> list[tuple[int, int]]:
        """Consecutive image ranges ``[a, b)`` of at most ``size`` images."""
        return [(a, min(a + size, self.num_images)) for a in range(0, self.num_images, size)]

    def read(self, layer: int, a: int, b: int, *, sigma_neg: str = "unit") -> torch.Tensor:
        """``R = max(x, 0) / sigma_neg`` of images ``[a, b)``: ``(b - a, C, H, W)`` float32. Only
        those images are read from the chunk files (safetensors slices). ``sigma_neg="unit"``: per
        unit ``(c, h, w)`` (the code's); ``"channel"``: one per channel, the RMS of its units'
        (no boost of the units that vary little on the negatives, e.g. border units)."""
        name, cs = self.layers[layer].name, self.chunk_size
        parts = []
        for k in range(a // cs, (b - 1) // cs + 1):
            with safe_open(self.root / f"chunk_{k:05d}.safetensors", "pt") as f:
                parts.append(f.get_slice(name)[max(a - k * cs, 0) : min(b - k * cs, cs)])
        sigma = self.sigma[name]
        if sigma_neg == "channel":
            sigma = sigma.pow(2).mean((1, 2), keepdim=True).sqrt()
        elif sigma_neg != "unit":
            raise GraphError(f"sigma_neg: must be 'unit' or 'channel', got {sigma_neg!r}")
        return torch.cat(parts).float() / sigma


def write_features(root: str | Path, layers: list[LayerInfo], chunks, sigma: dict[str, torch.Tensor], *,
                   image_hw, landmark_names, arch: str = "") -> FeatureStore:  # fmt: skip
    """Write a features directory from ``chunks``: an iterable of ``(maps, landmarks, indices)``
    with ``maps = {layer name: (B, C, H, W) max(x, 0)}``, in image order. Returns the store."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marks, idx, sizes = [], [], []
    for k, (maps, lm, ix) in enumerate(chunks):
        save_file({n: m.clamp(0, FP16_MAX).half().contiguous() for n, m in maps.items()}, root / f"chunk_{k:05d}.safetensors")
        marks.append(lm.float())
        idx.append(ix.long())
        sizes.append(len(ix))
    if not sizes or sum(sizes) == 0:
        raise GraphError("images: no object images to extract features from")
    if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
        raise GraphError(f"chunks: every chunk but the last must hold the same number of images, got {sizes}")
    floor = {n: s.clamp_min(1e-3 * float(s.mean())) for n, s in sigma.items()}
    save_file({**{f"sigma/{n}": s.float().contiguous() for n, s in floor.items()},
               "landmarks": torch.cat(marks), "indices": torch.cat(idx)}, root / "stats.safetensors")  # fmt: skip
    meta = {"arch": arch, "layers": [asdict(L) for L in layers], "image_hw": list(image_hw),
            "landmark_names": list(landmark_names), "chunk_size": sizes[0], "num_images": sum(sizes)}  # fmt: skip
    (root / "features.json").write_text(json.dumps(meta, indent=1))
    return FeatureStore(root)


class _Stop(Exception):
    """Raised by the hook of the topmost layer: the rest of the network is not needed."""


def _layer_maps(model: nn.Module, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Forward ``images`` (B, 3, H, W) in [0, 1]; the outputs of the named modules, float32 copies
    (an in-place ReLU after a conv would otherwise overwrite the pre-ReLU map we keep)."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, _inp, y):
            out[name] = y.detach().float().clone()
            if len(out) == len(names):
                raise _Stop

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(images)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    root: str | Path,
    *,
    layers: tuple[str, ...] | None = None,
    negatives=None,
    max_images: int | None = None,
    batch_size: int = 16,
    chunk_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress_bar: bool = True,
) -> FeatureStore:
    """Features of ``dataset``'s object crops at ``layers`` (default ``default_layers(model)``).

    Args:
        model: any ``nn.Module`` taking images ``(B, 3, H, W)`` in [0, 1] (an ``InterpretableNet``).
        dataset: samples of the library's contract (``image``, ``label``, ``landmarks``). A
            single-category set (``classes[0] == "negative"``) gives its label-0 images as the
            negatives unless ``negatives`` is given; its other images are the objects.
        root: the features directory (module doc).
        layers: module names, bottom to top (the graph is learned top-down over them).
        negatives: a dataset of negative images for ``sigma_neg`` (every sample used).
        max_images: keep the first ``max_images`` objects.
        batch_size: images per forward pass; chunk_size: images per chunk file; workers: loader
            processes (decoding JPEGs is most of the time on real data).
    """
    names = tuple(layers) if layers is not None else default_layers(model)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise GraphError(f"layers: no module named {unknown[0]!r} in {type(model).__name__} (see `icnn layers`)")
    if len(set(names)) != len(names):
        raise GraphError(f"layers: names repeat in {names}")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    if [order[n] for n in names] != sorted(order[n] for n in names):
        raise GraphError(f"layers: must be given bottom to top, got {names}")
    if len(dataset) == 0:
        raise GraphError("dataset: is empty")
    single = list(getattr(dataset, "classes", []))[:1] == ["negative"]
    if negatives is None and not single:
        raise GraphError("negatives: needed (a dataset of negative images) unless dataset is single-category")
    model = model.eval().to(device)

    def batches(ds, desc):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
        return progress(loader, enabled=progress_bar, total=len(loader), desc=desc)

    def maps_of(images):
        return _layer_maps(model, images.to(device), names)

    # --- pass over the negatives: per-unit sums of x and x^2 (float64)
    s1: dict[str, torch.Tensor] = {}
    s2: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches(negatives if negatives is not None else dataset, "graph: negatives"):
        keep = torch.ones(len(batch["image"]), dtype=torch.bool) if negatives is not None else batch["label"] == 0
        if not bool(keep.any()):
            continue
        for n, x in maps_of(batch["image"][keep]).items():
            x = x.double().cpu()
            s1[n] = s1.get(n, 0) + x.sum(0)
            s2[n] = s2.get(n, 0) + x.pow(2).sum(0)
        count += int(keep.sum())
    if count == 0:
        raise GraphError("negatives: no negative images (label 0) to normalise the features by")
    sigma = {n: (s2[n] / count - (s1[n] / count).pow(2)).clamp_min(0).sqrt().float() for n in names}

    # --- pass over the objects: max(x, 0) in chunks
    first = dataset[0]
    image_hw = tuple(first["image"].shape[-2:])
    infos: list[LayerInfo] = []

    def chunks():
        buf: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
        taken = 0
        for batch in batches(dataset, "graph: features"):
            keep = batch["label"] != 0 if single else torch.ones(len(batch["image"]), dtype=torch.bool)
            if max_images is not None:
                keep &= torch.cumsum(keep.long(), 0) + taken <= max_images
            if not bool(keep.any()):
                continue
            taken += int(keep.sum())
            maps = {n: x.cpu().clamp_min(0) for n, x in maps_of(batch["image"][keep]).items()}
            if not infos:
                infos.extend(_layer_info(model, n, maps[n]) for n in names)
            buf.append((maps, batch["landmarks"][keep], batch["index"][keep]))
            while sum(len(b[2]) for b in buf) >= chunk_size:
                yield _take(buf, chunk_size)
            if max_images is not None and taken >= max_images:
                break
        if buf:
            yield _take(buf, sum(len(b[2]) for b in buf))

    return write_features(root, infos, chunks(), sigma, image_hw=image_hw,
                          landmark_names=getattr(dataset, "landmark_names", []), arch=getattr(model, "arch", ""))  # fmt: skip


def _take(buf: list, n: int):
    """Pop the first ``n`` images from a list of ``(maps, landmarks, indices)`` batches."""
    maps = {k: torch.cat([b[0][k] for b in buf]) for k in buf[0][0]}
    marks, idx = torch.cat([b[1] for b in buf]), torch.cat([b[2] for b in buf])
    buf.clear()
    if len(idx) > n:
        buf.append(({k: v[n:] for k, v in maps.items()}, marks[n:], idx[n:]))
    return {k: v[:n] for k, v in maps.items()}, marks[:n], idx[:n]


def _layer_info(model: nn.Module, name: str, x: torch.Tensor) -> LayerInfo:
    from icnn.metrics.receptive_field import GeometryError, layer_geometry

    if x.dim() != 4:
        raise GraphError(f"layers: {name!r} outputs shape {tuple(x.shape)}, not (B, C, H, W) maps")
    h, w = x.shape[-2:]
    if h != w:
        raise GraphError(f"layers: {name!r} gives {h}x{w} maps; the explanatory graph needs square maps (square images)")
    try:
        g = layer_geometry(model, name)
    except GeometryError as exc:
        raise GraphError(f"layers: {name!r}: {exc}") from None
    return LayerInfo(name, int(x.shape[1]), (int(h), int(w)), tuple(g.stride), tuple(float(o) for o in g.offset))
