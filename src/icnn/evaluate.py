"""Evaluate a network's interpretability: one streaming pass over a dataset, then the metrics.

Pass 1 (the only pass over the data) runs the network once per batch and feeds the streaming
accumulators: accuracy, location instability (top-100 per filter and landmark), the exact
top-0.5% threshold of every filter, the per-class activation sums that assign each filter its
category, and the part-location density of Fig. 6. The masked maps of the evaluated layer and the
part masks are cached (float16 maps, bit-packed masks; in memory, or on disk under
``cache_dir``), so pass 2 -- part interpretability and Network Dissection, which need the
thresholds of the whole dataset first -- replays the cache instead of the data: no second forward
pass, features never all held in memory when ``cache_dir`` is given.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .metrics.instability import LocationInstability
from .metrics.quantile import TopQuantile
from .metrics.receptive_field import layer_geometry, unit_centers


@dataclass
class EvalConfig:
    """What ``evaluate`` computes and how."""

    layer: str = "new"  # interpretable layer to evaluate ("new": the paper's top conv-layer)
    batch_size: int = 32
    num_workers: int = 0
    device: str = "cpu"
    top_k: int = 100  # images per (filter, landmark) for location instability (paper: 100)
    quantile: float = 0.005  # p(x > T_f) for part regions (paper / Network Dissection)
    iou_threshold: float = 0.2  # part association (paper: 0.2)
    dissection_threshold: float = 0.04  # Network-Dissection detector threshold
    rf_mode: str = "upsample"  # part regions: "upsample" (Network Dissection) or "rf" (round RF per unit)
    reference_draws: int = 20  # Monte-Carlo draws of the random-unit reference
    seed: int = 0
    panels: int = 6  # filters shown with Fig. 4 panels and Fig. 5 top images in the report
    top_images: int = 6  # top-activating images per shown filter
    density_grid: int = 32  # resolution of the Fig. 6 part-location density (object-box frame)
    cache_dir: str | None = None  # cache the maps on disk here (default: in memory)
    progress: bool = True


@dataclass
class EvalResult:
    """Everything ``evaluate`` measured: JSON-ready ``metrics`` and arrays for the report."""

    metrics: dict
    per_filter: dict = field(default_factory=dict)  # name -> list per filter
    artifacts: dict = field(default_factory=dict)  # figures' raw data (numpy arrays)


class _MapCache:
    """Append-only float16 cache of ``(N, C, h, w)`` maps and bit-packed ``(N, P, H, W)`` masks."""

    def __init__(self, n: int, map_shape: tuple, mask_shape: tuple | None, cache_dir: str | None):
        self._tmp = None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(dir=cache_dir, prefix="icnn-eval-")
            path = Path(self._tmp.name)
            self.maps = np.lib.format.open_memmap(path / "maps.npy", "w+", np.float16, (n, *map_shape))
        else:
            self.maps = np.empty((n, *map_shape), np.float16)
        self.mask_shape = mask_shape
        self.masks = None
        if mask_shape is not None:
            packed = (int(np.prod(mask_shape)) + 7) // 8
            if cache_dir is not None:
                self.masks = np.lib.format.open_memmap(path / "masks.npy", "w+", np.uint8, (n, packed))
            else:
                self.masks = np.empty((n, packed), np.uint8)
        self.labels = np.empty((n,), np.int64)
        self.n = 0

    def append(self, maps: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor) -> None:
        b = maps.shape[0]
        self.maps[self.n : self.n + b] = maps.detach().cpu().to(torch.float16).numpy()
        if self.masks is not None:
            flat = masks.detach().cpu().reshape(b, -1).numpy()
            self.masks[self.n : self.n + b] = np.packbits(flat, axis=1)
        self.labels[self.n : self.n + b] = labels.cpu().numpy()
        self.n += b

    def batches(self, batch_size: int):
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            maps = torch.from_numpy(np.asarray(self.maps[start:stop], dtype=np.float32))
            masks = None
            if self.masks is not None:
                count = int(np.prod(self.mask_shape))
                bits = np.unpackbits(np.asarray(self.masks[start:stop]), axis=1, count=count)
                masks = torch.from_numpy(bits.astype(bool)).reshape(stop - start, *self.mask_shape)
            yield maps, masks, torch.from_numpy(self.labels[start:stop])

    def close(self) -> None:
        self.maps = self.masks = None
        if self._tmp is not None:
            self._tmp.cleanup()


def _progress(iterable, enabled: bool, total: int | None, desc: str):
    import sys

    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False)


def _box_density(unit_xy: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, grid: int) -> torch.Tensor:
    """Histogram ``(grid, grid)`` of inferred part positions in the object-box frame.

    ``unit_xy (B, C, 2)``, ``boxes (B, 4)`` (NaN for images without an object), ``scores (B, C)``:
    active maps (score > 0) of images with a box add one count at their box-relative position.
    """
    ok = torch.isfinite(boxes).all(-1)[:, None] & (scores > 0)  # (B, C)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)  # (B, 2)
    rel = (unit_xy - boxes[:, None, :2]) / wh[:, None, :]  # (B, C, 2) in [0, 1] inside the box
    cell = (rel * grid).floor().long()
    inside = ok & (cell >= 0).all(-1) & (cell < grid).all(-1)
    flat = (cell[..., 1] * grid + cell[..., 0])[inside]
    return torch.bincount(flat, minlength=grid * grid).reshape(grid, grid).double()


@torch.no_grad()
def evaluate(model, dataset, config: EvalConfig | None = None, *, categories: torch.Tensor | None = None) -> EvalResult:
    """Stream ``dataset`` once through ``model`` and compute every metric its annotations allow.

    Args:
        model: an :class:`icnn.models.InterpretableNet` (ordinary or interpretable).
        dataset: a dataset of DESIGN.md samples (image, label, box, landmarks[, part_masks]).
        config: :class:`EvalConfig`.
        categories: optional ``(C,)`` target category of each filter (interpretable nets:
            the filter loss's assignment). Default: assigned from this dataset's activations.
    """
    cfg = config or EvalConfig()
    device = torch.device(cfg.device)
    was_training = model.training
    model.eval().to(device)
    try:
        return _evaluate(model, dataset, cfg, device, categories)
    finally:
        model.train(was_training)


def _evaluate(model, dataset, cfg: EvalConfig, device, categories) -> EvalResult:
    from .metrics import accuracy as acc_mod
    from .metrics import dissection as dis_mod
    from .metrics import part_iou as iou_mod

    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    num_classes = len(dataset.classes)
    image_h, image_w = dataset.image_size
    map_h, map_w = model.map_size((image_h, image_w))[cfg.layer]
    geom = layer_geometry(model, cfg.layer)
    centers = unit_centers(geom, map_h, map_w)  # (h, w, 2) (x, y)
    has_masks = bool(getattr(dataset, "part_names", []))
    has_landmarks = bool(getattr(dataset, "landmark_names", []))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)

    num_filters = None
    inst = quant = cache = None
    accuracy = acc_mod.AccuracyMeter(num_classes if model.num_classes > 1 else 1)
    class_sum = torch.zeros(num_classes, 0, dtype=torch.float64)
    class_count = torch.zeros(num_classes, dtype=torch.float64)
    annotated_class = torch.zeros(num_classes, dtype=torch.bool)  # classes with any landmark
    density = torch.zeros(cfg.density_grid, cfg.density_grid, dtype=torch.float64)
    top_score = top_index = None  # per filter: its top images (score, dataset index), Fig. 4-5
    for batch in _progress(loader, cfg.progress, len(loader), "evaluate"):
        images = batch["image"].to(device)
        labels = batch["label"].long()
        feats = model.forward_features(images)
        logits = model.forward_head(feats.out).float().cpu()
        maps = feats.masked[cfg.layer].float().cpu()  # (B, C, h, w)
        b, c = maps.shape[:2]
        if num_filters is None:
            num_filters = c
            if has_landmarks:
                inst = LocationInstability(c, dataset.landmark_names, num_classes, top_k=cfg.top_k)
            quant = TopQuantile(c, n * map_h * map_w, q=cfg.quantile)
            mask_shape = (len(dataset.part_names), image_h, image_w) if has_masks else None
            cache = _MapCache(n, (c, map_h, map_w), mask_shape, cfg.cache_dir)
            class_sum = torch.zeros(num_classes, c, dtype=torch.float64)
            top_score = torch.empty(c, 0, dtype=torch.float64)
            top_index = torch.empty(c, 0, dtype=torch.long)
        accuracy.update(logits, labels)
        scores = maps.reshape(b, c, -1).amax(-1).double()  # (B, C)
        flat_idx = maps.reshape(b, c, -1).argmax(-1)
        unit_xy = centers.reshape(-1, 2)[flat_idx]  # (B, C, 2)
        if inst is not None:
            inst.update(scores, unit_xy, batch["landmarks"].float(), labels, (image_h, image_w))
        # Thresholds over the images that can show parts (paper §5.2.1: the target category's
        # images; single-category negatives would otherwise set the ordinary net's thresholds).
        has_parts = batch["part_masks"].flatten(1).any(1) if has_masks else torch.ones(b, dtype=torch.bool)
        if has_parts.any():
            quant.update(maps[has_parts])
        cache.append(maps, batch.get("part_masks"), labels)
        onehot = torch.nn.functional.one_hot(labels, num_classes).double()
        annotated_class |= (onehot.t() @ torch.isfinite(batch["landmarks"]).all(-1).any(-1).double()) > 0
        class_sum += onehot.t() @ maps.double().sum((-2, -1))
        class_count += onehot.sum(0)
        density += _box_density(unit_xy.double(), batch["box"].double(), scores, cfg.density_grid)
        # running top images per filter (earlier image first on ties: stable sort)
        cand_s = torch.cat((top_score, scores.t()), 1)
        cand_i = torch.cat((top_index, batch["index"].long()[None].expand(c, b)), 1)
        order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, : cfg.top_images]
        top_score, top_index = cand_s.gather(1, order), cand_i.gather(1, order)

    # Each filter's category: given (interpretable nets), or the annotated class activating it
    # most (paper §5.2.1); single-category: the target class.
    if categories is None:
        if model.num_classes == 1:
            categories = torch.ones(num_filters, dtype=torch.long)
        else:
            means = class_sum / class_count.clamp_min(1)[:, None]  # (K, C)
            annotated = annotated_class & (class_count > 0)
            means = torch.where(annotated[:, None], means, torch.full_like(means, -math.inf))
            categories = means.argmax(0)
    thresholds = quant.compute()

    metrics: dict = {"num_images": n, "num_filters": num_filters, "layer": cfg.layer, "map_size": [map_h, map_w]}
    per_filter: dict = {"category": categories.tolist(), "threshold": thresholds.tolist()}
    metrics.update(accuracy.compute().summary())
    if inst is not None:
        res = inst.compute(categories=categories if getattr(model, "interpretable", False) else None)
        refs = inst.references(centers, draws=cfg.reference_draws, seed=cfg.seed)
        metrics["location_instability"] = res.score
        metrics["instability_references"] = refs.summary()
        metrics["silent_fraction"] = float(res.silent_fraction.mean())
        metrics["location_instability_firing"] = res.score_firing
        metrics["silent_in_top"] = res.silent_in_top
        metrics["landmark_names"] = list(dataset.landmark_names)
        metrics["instability_per_landmark"] = dict(
            zip(dataset.landmark_names, torch.nanmean(res.per_filter_landmark, 0).tolist())
        )
        per_filter["location_instability"] = res.per_filter.tolist()

    artifacts: dict = {"density": density.numpy(), "top_images": top_index.tolist(), "top_scores": top_score.tolist()}
    if has_masks:
        piou = iou_mod.PartInterpretability(
            thresholds, dataset.part_names, num_classes, mode=cfg.rf_mode, centers=geom, iou_threshold=cfg.iou_threshold
        )
        dis = dis_mod.NetworkDissection(
            thresholds, dataset.part_names, mode=cfg.rf_mode, centers=geom, iou_threshold=cfg.dissection_threshold
        )
        for maps, masks, labels in _progress(cache.batches(cfg.batch_size), cfg.progress, None, "part IoU"):
            piou.update(maps, masks, labels)
            dis.update(maps, masks)
        pres = piou.compute(categories=categories)
        dres = dis.compute()
        metrics["part_interpretability"] = pres.score
        metrics["part_names"] = list(dataset.part_names)
        metrics["part_interpretability_per_part"] = dict(zip(dataset.part_names, torch.nanmean(pres.per_filter_part, 0).tolist()))
        metrics["dissection"] = dres.summary()
        per_filter["part_interpretability"] = pres.per_filter.tolist()
        per_filter["best_part"] = pres.best_part.tolist()
        best_part = pres.best_part[pres.best_part >= 0]
        artifacts["part_counts"] = np.bincount(best_part.numpy(), minlength=len(dataset.part_names))
        artifacts["per_filter_part"] = pres.per_filter_part.numpy()
    cache.close()
    metrics["config"] = asdict(cfg)
    return EvalResult(metrics=metrics, per_filter=per_filter, artifacts=artifacts)


def json_safe(obj):
    """``obj`` with NaN/inf floats as ``None`` and tensors/arrays as lists: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
