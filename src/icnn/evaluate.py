"""Evaluate a network's interpretability: one streaming pass over a dataset, one metric suite.

:class:`MetricSuite` is every metric one layer's maps allow, given the dataset's annotations. It
is fed batch by batch (``update(maps, batch)``) and used by every command that measures filters
(``icnn evaluate``, ``icnn compare``, ``icnn explain`` for its three views, the reports):

- pass 1, streamed: location instability (top-100 per filter and landmark) and its references,
  the collapse figures (``metrics.collapse``), the exact top-0.5% threshold of every filter over
  the images that can show parts, the per-class activation sums behind each filter's category
  (``icnn.categories``), the part-location density of Fig. 6, the top images of every filter;
  the maps and part masks are cached (float16 maps, bit-packed masks; in memory or under
  ``cache_dir``);
- pass 2, over the cache (the thresholds need the whole dataset first): part interpretability
  and Network Dissection from one pass over the filters' regions.

:func:`evaluate` runs a network over a dataset once (from the cached stem outputs when the
dataset is a ``icnn.cache.CachedDataset``) and feeds one suite with the evaluated layer's masked
maps; it returns :class:`EvalResult` (JSON-ready metrics, per-filter lists, report arrays).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .categories import assign_categories
from .metrics.collapse import FilterCollapse
from .metrics.instability import LocationInstability
from .metrics.quantile import TopQuantile
from .metrics.receptive_field import layer_geometry, unit_centers
from .models.net import batch_features, eval_mode
from .training.config import Config
from .training.loop import progress as progress_bar, resolve_device


@dataclass
class EvalConfig(Config):
    layer: str = "new"  # interpretable layer evaluated (new: the paper's top conv-layer; top: the backbone's)
    batch_size: int = 32  # images per evaluation batch
    num_workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    top_k: int = 100  # images per filter and landmark for location instability (paper: 100)
    quantile: float = 0.005  # p(x > T_f) of the part regions (paper, Network Dissection)
    quantile_rule: str = "fixed"  # fixed: p = quantile (the paper); per_unit: p = 1/(h w), one unit per image on average, what 0.005 gives on 14x14 maps
    iou_threshold: float = 0.2  # IoU above which a region counts as the part (paper: 0.2)
    dissection_threshold: float = 0.04  # Network-Dissection detector threshold (Bau et al.: 0.04)
    rf_mode: str = "upsample"  # part regions: upsample (bilinear, Network Dissection) or rf (a round RF per active unit)
    reference_draws: int = 20  # Monte-Carlo draws of the random-unit reference
    seed: int = 0  # seed of the random-unit reference
    panels: int = 6  # filters shown with Fig. 4 panels and Fig. 5 top images in the report
    top_images: int = 6  # top-activating images kept per filter
    density_grid: int = 32  # resolution of the Fig. 6 part-location density (object-box frame)
    cache_dir: str | None = None  # keep caches (stem outputs, evaluated maps) on disk here (default: in memory)
    progress: bool = True  # progress bars (off when stderr is not a terminal)

    CHOICES = {"rf_mode": ("upsample", "rf"), "quantile_rule": ("fixed", "per_unit")}
    POSITIVE = ("batch_size", "top_k", "reference_draws", "density_grid", "quantile", "iou_threshold")


@dataclass
class EvalResult:
    """Everything a suite measured: JSON-ready ``metrics`` and arrays for the report."""

    metrics: dict
    per_filter: dict = field(default_factory=dict)  # name -> list per filter
    artifacts: dict = field(default_factory=dict)  # figures' raw data (numpy arrays, top images)


class _MapCache:
    """Append-only float16 cache of ``(N, C, h, w)`` maps and bit-packed ``(N, P, H, W)`` masks."""

    def __init__(self, n: int, map_shape: tuple, mask_shape: tuple | None, cache_dir: str | None):
        self._tmp = None
        path = None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(dir=cache_dir, prefix="icnn-eval-")
            path = Path(self._tmp.name)
        alloc = (lambda name, dt, shape: np.lib.format.open_memmap(path / name, "w+", dt, shape)) if path else \
            (lambda name, dt, shape: np.empty(shape, dt))  # fmt: skip
        self.maps = alloc("maps.npy", np.float16, (n, *map_shape))
        self.mask_shape = mask_shape
        self.masks = alloc("masks.npy", np.uint8, (n, (int(np.prod(mask_shape)) + 7) // 8)) if mask_shape else None
        self.labels = np.empty((n,), np.int64)
        self.n = 0

    def append(self, maps: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor) -> None:
        b = maps.shape[0]
        self.maps[self.n : self.n + b] = maps.detach().cpu().to(torch.float16).numpy()
        if self.masks is not None:
            self.masks[self.n : self.n + b] = np.packbits(masks.detach().cpu().reshape(b, -1).numpy(), axis=1)
        self.labels[self.n : self.n + b] = labels.cpu().numpy()
        self.n += b

    def batches(self, batch_size: int):
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            maps = torch.from_numpy(np.asarray(self.maps[start:stop], dtype=np.float32))
            masks = None
            if self.masks is not None:
                bits = np.unpackbits(np.asarray(self.masks[start:stop]), axis=1, count=int(np.prod(self.mask_shape)))
                masks = torch.from_numpy(bits.astype(bool)).reshape(stop - start, *self.mask_shape)
            yield maps, masks, torch.from_numpy(self.labels[start:stop])

    def close(self) -> None:
        self.maps = self.masks = None
        if self._tmp is not None:
            self._tmp.cleanup()


def _box_density(unit_xy: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, grid: int) -> torch.Tensor:
    """Histogram ``(grid, grid)`` of inferred part positions in the object-box frame: active maps
    (score > 0) of images with a box add one count at their box-relative position."""
    ok = torch.isfinite(boxes).all(-1)[:, None] & (scores > 0)  # (B, C)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)  # (B, 2)
    rel = (unit_xy - boxes[:, None, :2]) / wh[:, None, :]  # (B, C, 2) in [0, 1] inside the box
    cell = (rel * grid).floor().long()
    inside = ok & (cell >= 0).all(-1) & (cell < grid).all(-1)
    flat = (cell[..., 1] * grid + cell[..., 0])[inside]
    return torch.bincount(flat, minlength=grid * grid).reshape(grid, grid).double()


class MetricSuite:
    """Every metric one layer's maps allow on a dataset (see the module doc).

    Args:
        dataset: the dataset evaluated (its ``classes``, ``landmark_names``, ``part_names``,
            ``image_size`` and length).
        geometry: the layer's receptive-field geometry (``metrics.receptive_field``).
        cfg: :class:`EvalConfig`.
        interpretable: whether the filters have categories of their own (instability at each
            filter's category rather than the min over classes).
        single: a single-category task (every filter's category is the target class 1).
    """

    def __init__(self, dataset, geometry, cfg: EvalConfig, *, interpretable: bool, single: bool):
        self.cfg, self.geometry = cfg, geometry
        self.n, self.nc = len(dataset), len(dataset.classes)
        self.class_names = [str(c) for c in dataset.classes]
        self.image_hw = tuple(dataset.image_size)
        self.landmark_names = list(getattr(dataset, "landmark_names", []))
        self.part_names = list(getattr(dataset, "part_names", []))
        self.interpretable, self.single = interpretable, single
        self.c = None

    def _start(self, c: int, h: int, w: int) -> None:
        cfg, nc = self.cfg, self.nc
        self.c, self.centers = c, unit_centers(self.geometry, h, w)  # (h, w, 2) (x, y)
        self.inst = LocationInstability(c, self.landmark_names, nc, top_k=cfg.top_k) if self.landmark_names else None
        self.collapse = FilterCollapse(c, nc, self.landmark_names)
        self.quantile = cfg.quantile if cfg.quantile_rule == "fixed" else 1.0 / (h * w)  # docs/part_interpretability.md
        self.quant = TopQuantile(c, self.n * h * w, q=self.quantile)
        mask_shape = (len(self.part_names), *self.image_hw) if self.part_names else None
        self.cache = _MapCache(self.n, (c, h, w), mask_shape, cfg.cache_dir)
        self.class_sum = torch.zeros(nc, c, dtype=torch.float64)
        self.class_count = torch.zeros(nc, dtype=torch.float64)
        self.annotated = torch.zeros(nc, dtype=torch.bool)  # classes with any landmark or part
        self.density = torch.zeros(cfg.density_grid, cfg.density_grid, dtype=torch.float64)
        self.top_score = torch.empty(c, 0, dtype=torch.float64)
        self.top_index = torch.empty(c, 0, dtype=torch.long)
        self.top_maps = torch.empty(c, 0, 2, h, w)  # (C, kept, [masked, before the mask], h, w): the report's panels

    @torch.no_grad()
    def update(self, maps: torch.Tensor, batch: dict, relu: torch.Tensor | None = None) -> None:
        """``maps (B, C, h, w)`` of the layer for ``batch`` (labels, landmarks, box, part masks,
        index); ``relu``: the same maps before the mask (kept for the top images' panels)."""
        maps = maps.detach().float().cpu()
        b, c, h, w = maps.shape
        if self.c is None:
            self._start(c, h, w)
        labels = batch["label"].long().cpu()
        scores, flat_idx = maps.reshape(b, c, -1).max(-1)  # (B, C): x_mu_hat and its unit
        scores = scores.double()
        unit_xy = self.centers.reshape(-1, 2)[flat_idx]  # (B, C, 2)
        landmarks = batch["landmarks"].float().cpu() if self.landmark_names else None
        dist = self.inst.update(scores, unit_xy, landmarks, labels, self.image_hw) if self.inst is not None else None
        self.collapse.update(scores, flat_idx, labels, dist)  # the peaks' landmark distances, computed once
        masks = batch.get("part_masks")
        # thresholds over the images that can show parts (paper §5.2.1: the category's images;
        # single-category negatives would otherwise set the ordinary net's thresholds)
        has_parts = masks.flatten(1).any(1) if masks is not None else torch.ones(b, dtype=torch.bool)
        if has_parts.any():
            self.quant.update(maps[has_parts])
        self.cache.append(maps, masks, labels)
        onehot = torch.nn.functional.one_hot(labels, self.nc).double()
        shown = has_parts if masks is not None else torch.zeros(b, dtype=torch.bool)
        if landmarks is not None:
            shown = shown | torch.isfinite(landmarks).all(-1).any(-1)
        self.annotated |= (onehot.t() @ shown.double()) > 0
        self.class_sum += onehot.t() @ maps.double().sum((-2, -1))
        self.class_count += onehot.sum(0)
        self.density += _box_density(unit_xy.double(), batch["box"].double().cpu(), scores, self.cfg.density_grid)
        cand_s = torch.cat((self.top_score, scores.t()), 1)  # running top images per filter (stable: earlier first)
        cand_i = torch.cat((self.top_index, batch["index"].long().cpu()[None].expand(c, b)), 1)
        pair = torch.stack((maps, maps if relu is None else relu.detach().float().cpu()), 2).transpose(0, 1)  # (C, B, 2, h, w)
        cand_m = torch.cat((self.top_maps, pair), 1)
        order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, : self.cfg.top_images]
        self.top_score, self.top_index = cand_s.gather(1, order), cand_i.gather(1, order)
        self.top_maps = cand_m[torch.arange(c)[:, None], order]

    def categories(self) -> torch.Tensor:
        """Each filter's category (``icnn.categories``): the target class in single-category
        tasks, else the annotated class activating it most."""
        if self.single:
            return torch.ones(self.c, dtype=torch.long)
        return assign_categories(self.class_sum, self.class_count, self.annotated)

    def compute(self, categories: torch.Tensor | None = None) -> EvalResult:
        if self.c is None:
            raise ValueError("evaluate: the dataset is empty")
        cfg = self.cfg
        categories = self.categories() if categories is None else torch.as_tensor(categories).long()
        thresholds = self.quant.compute()
        h, w = self.centers.shape[:2]
        m: dict = {"num_images": self.n, "num_filters": self.c, "layer": cfg.layer, "map_size": [h, w], "quantile": self.quantile}
        per_filter: dict = {"category": categories.tolist(), "threshold": thresholds.tolist()}
        if self.inst is not None:
            res = self.inst.compute(categories=categories if self.interpretable else None)
            refs = self.inst.references(self.centers, draws=cfg.reference_draws, seed=cfg.seed)
            m |= {k: v for k, v in res.summary().items() if k != "filters_evaluated"}  # score, firing, silent
            m["instability_references"] = refs.summary()
            m["landmark_names"] = list(self.landmark_names)
            m["instability_per_landmark"] = dict(zip(self.landmark_names, torch.nanmean(res.per_filter_landmark, 0).tolist()))
            m["instability_references_per_landmark"] = {k: dict(zip(self.landmark_names, v)) for k, v in refs.per_landmark().items()}
            m["instability_landmark_units"] = dict(zip(self.landmark_names, refs.landmark_unit.tolist()))
            per_filter["location_instability"] = res.per_filter.tolist()
            if not self.single:  # paper §5.2.2: both readings, whichever the twin, so twins compare on each
                m["location_instability_min_class"] = res.score if not self.interpretable else self.inst.compute().score
                m["location_instability_assigned"] = res.score if self.interpretable else self.inst.compute(categories).score
        if not self.single:
            m["filters_per_category"] = dict(zip(self.class_names, torch.bincount(categories, minlength=self.nc).tolist()))
        m["collapse"] = self.collapse.compute(categories).summary()
        art: dict = {"density": self.density.numpy(), "top_images": self.top_index.tolist(), "top_scores": self.top_score.tolist(),
                     "top_maps": self.top_maps}  # fmt: skip
        if self.part_names:
            pres, dres, pref = _region_pass(self.cache.batches(cfg.batch_size), thresholds, self.part_names, self.nc,
                                           mode=cfg.rf_mode, centers=self.geometry, iou_threshold=cfg.iou_threshold,
                                           dissection_threshold=cfg.dissection_threshold, categories=categories,
                                           progress=cfg.progress, seed=cfg.seed, draws=cfg.reference_draws)  # fmt: skip
            m["part_interpretability"] = pres.score
            m["part_interpretability_references"] = pref
            m["part_names"] = list(self.part_names)
            m["part_interpretability_per_part"] = dict(zip(self.part_names, torch.nanmean(pres.per_filter_part, 0).tolist()))
            m["dissection"] = dres.summary()
            per_filter["part_interpretability"] = pres.per_filter.tolist()
            per_filter["best_part"] = pres.best_part.tolist()
            art["part_counts"] = np.bincount(pres.best_part[pres.best_part >= 0].numpy(), minlength=len(self.part_names))
            art["per_filter_part"] = pres.per_filter_part.numpy()
        self.cache.close()
        m["config"] = asdict(cfg)
        return EvalResult(metrics=m, per_filter=per_filter, artifacts=art)


def _region_pass(batches, thresholds, part_names, nc, *, mode, centers, iou_threshold, dissection_threshold, categories,
                 progress, seed=0, draws=1):  # fmt: skip
    """Part interpretability and Network Dissection over the cached maps: one pass over the regions.

    Beside the filters, the same pass scores the references of part interpretability, as for
    location instability: ``draws + h*w`` pseudo-filters whose map is one at a single unit (a random
    unit per image, ``draws`` times; each fixed unit), their regions made by the same rule.
    ``random_unit`` is the random ones' mean figure on each filter's category, ``best_fixed_unit``
    the best fixed unit's, both averaged over the evaluated filters as the score is.
    """
    from .metrics.dissection import NetworkDissection
    from .metrics.part_iou import PartInterpretability

    piou = PartInterpretability(thresholds, part_names, nc, mode=mode, centers=centers, iou_threshold=iou_threshold)
    dis = NetworkDissection(thresholds, part_names, mode=mode, centers=centers, iou_threshold=dissection_threshold)
    ref = None
    g = torch.Generator().manual_seed(seed)
    for maps, masks, labels in progress_bar(batches, enabled=progress, total=None, desc="part regions"):
        overlaps = piou.overlaps(maps, masks)
        piou.update(maps, masks, labels, overlaps=overlaps)
        dis.update(maps, masks, overlaps=overlaps)
        b, _, h, w = maps.shape
        if ref is None:
            ref = PartInterpretability(torch.full((draws + h * w,), 0.5), part_names, nc, mode=mode, centers=centers,
                                       iou_threshold=iou_threshold)  # fmt: skip
        units = torch.cat((torch.randint(h * w, (b, draws), generator=g), torch.arange(h * w).expand(b, -1)), 1)  # (B, draws+hw)
        pseudo = torch.nn.functional.one_hot(units, h * w).to(maps.dtype).reshape(b, draws + h * w, h, w)
        ref.update(pseudo, masks, labels)
    pres = piou.compute(categories=categories)
    every_class = ref.compute(categories=torch.zeros(len(ref.thresholds), dtype=torch.long)).per_filter_class_part
    per_class = torch.nan_to_num(every_class, nan=-1.0).amax(-1)  # (draws+hw, NC): the best part, on each class
    evaluated = ~torch.isnan(pres.per_filter)
    cat = pres.category[evaluated]
    refs = {}
    for name, values in (("random_unit", per_class[:draws].mean(0)), ("best_fixed_unit", per_class[draws:].amax(0))):
        v = values.double()[cat]
        refs[name] = float(v[v >= 0].mean()) if bool((v >= 0).any()) else float("nan")
    return pres, dis.compute(), refs


@torch.no_grad()
def evaluate(model, dataset, config: EvalConfig | None = None, *, categories: torch.Tensor | None = None) -> EvalResult:
    """Stream ``dataset`` once through ``model`` and compute every metric its annotations allow.

    Args:
        model: an :class:`icnn.models.InterpretableNet` (ordinary or interpretable).
        dataset: a dataset of DESIGN.md samples, or a ``CachedDataset`` (the stem's outputs).
        config: :class:`EvalConfig`.
        categories: optional ``(C,)`` category of each filter (multi-category interpretable nets:
            the filter loss's assignment). Default: the suite's rule.
    """
    from .metrics.accuracy import AccuracyMeter

    cfg = (config or EvalConfig()).validate()
    if cfg.layer not in model.layers:
        raise ValueError(f"evaluate: no layer {cfg.layer!r} (the network has {', '.join(model.layers)})")
    if model.num_classes > 1 and model.num_classes != len(dataset.classes):
        raise ValueError(f"evaluate: the network has {model.num_classes} outputs, the dataset {len(dataset.classes)} classes "
                         f"({', '.join(map(str, dataset.classes[:3]))}{', ...' if len(dataset.classes) > 3 else ''}): "
                         "evaluate it on the classes it was trained on")  # fmt: skip
    device = resolve_device(cfg.device)
    model.to(device)
    suite = MetricSuite(dataset, layer_geometry(model, cfg.layer), cfg, interpretable=bool(getattr(model, "interpretable", False)),
                        single=model.num_classes == 1)  # fmt: skip
    accuracy = AccuracyMeter(len(dataset.classes) if model.num_classes > 1 else 1)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    with eval_mode(model):
        for batch in progress_bar(loader, enabled=cfg.progress, total=len(loader), desc=f"evaluate ({len(dataset)} images)"):
            feats = batch_features(model, batch, device)
            accuracy.update(model.forward_head(feats.out).float().cpu(), batch["label"].long())
            suite.update(feats.masked[cfg.layer], batch, feats.relu[cfg.layer])
    result = suite.compute(categories)
    result.metrics.update(accuracy.compute().summary())
    return result


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
