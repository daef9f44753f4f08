"""Evaluating an explainer (paper 003 §4, Tables 1-3 and 5-7) and its HTML report.

One pass over a dataset, performer and explainer side by side:

* ``p`` (Table 2);
* location instability (SPEC §5) of conv-interp-2 (masked maps), of the performer's top
  conv-layer (its last layer, ``"new"`` for icnn networks: the layer the paper compares with)
  and of the layer the explainer reads (Tables 5-6 baseline), each with its reference points
  (random unit, best fixed unit); receptive fields from ``icnn.metrics.receptive_field``:
  the explainer's units compose the layer read with conv-interp-1 and conv-interp-2;
* part interpretability (paper §5.2.1, Table 1) of the same three views when the dataset has
  part masks: ``icnn.evaluate``'s rules -- per filter the exact top-``quantile`` threshold over the
  images that can show parts, the receptive-field region above it, IoU with each part mask >
  ``iou_threshold``, P_fk on the filter's category; the maps are cached (float16) for that second
  pass, so the data is still streamed once;
* classification error of the performer and of the performer's classifier fed with the
  explainer's reconstructed features (Tables 3 and 7: ``delta_error``), and the relative
  reconstruction error of each target.

Filter categories: single-category sets use the target class for every filter; multi-category
sets assign each explainer filter the class whose images activate it most (paper §4), and
ordinary performer filters take the best class (``min_c``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..evaluate import EvalConfig, _MapCache
from ..mask import PartMask
from ..metrics.instability import LocationInstability, argmax_units
from ..metrics.part_iou import PartInterpretability
from ..metrics.quantile import TopQuantile
from ..metrics.receptive_field import layer_geometry, unit_centers
from ..task_loss import correct_count
from .model import ExplainedNet, Explainer, performer_targets


_EVAL = EvalConfig()  # defaults of the part-interpretability settings, shared with icnn.evaluate
_MASKS_WITH = "explainer"  # the view whose map cache also holds the part masks (cached once)


@dataclass
class ExplainerEval:
    metrics: dict[str, Any]
    best_image: dict[str, list[int]] = field(default_factory=dict)  # layer -> per filter, top image index


def _categories(class_sum: torch.Tensor, class_count: torch.Tensor, single: bool,
                annotated: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Each filter's category: the target class (single-category), else the class with the
    largest mean activation sum, among the ``annotated`` classes ``(NC,)`` bool when given."""
    if single:
        return torch.ones(class_sum.shape[1], dtype=torch.long)
    means = class_sum / class_count.clamp_min(1)[:, None]
    if annotated is not None:
        means = torch.where(annotated[:, None], means, torch.full_like(means, -math.inf))
    return means.argmax(0)


@torch.no_grad()
def evaluate_explainer(performer: nn.Module, explainer: Explainer, dataset, *, layer: str = "stem", batch_size: int = 32,
                       top_k: int = 100, reference_draws: int = 20, seed: int = 0, num_workers: int = 0,
                       quantile: float = _EVAL.quantile, iou_threshold: float = _EVAL.iou_threshold,
                       rf_mode: str = _EVAL.rf_mode) -> ExplainerEval:  # fmt: skip
    """Streams ``dataset`` once; see the module docstring for what is measured.

    ``quantile``, ``iou_threshold`` and ``rf_mode`` are part interpretability's settings, as in
    :class:`icnn.evaluate.EvalConfig`."""
    device = next(performer.parameters()).device
    was_p, was_e = performer.training, explainer.training
    performer.eval()
    explainer.eval()
    try:
        return _evaluate(performer, explainer, dataset, layer, batch_size, top_k, reference_draws, seed, num_workers, device,
                         quantile=quantile, iou_threshold=iou_threshold, rf_mode=rf_mode)  # fmt: skip
    finally:
        performer.train(was_p)
        explainer.train(was_e)


def _evaluate(performer, explainer, dataset, layer, batch_size, top_k, draws, seed, num_workers, device, *,
              quantile: float = _EVAL.quantile, iou_threshold: float = _EVAL.iou_threshold,
              rf_mode: str = _EVAL.rf_mode) -> ExplainerEval:  # fmt: skip
    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate_explainer: the dataset is empty")
    top = performer.layer_names[-1]
    net = ExplainedNet(performer, explainer, layer)
    geoms = {"explainer": layer_geometry(net, "interp2"), "performer_top": layer_geometry(performer, top),
             "performer_read": layer_geometry(performer, layer)}  # fmt: skip
    h_img, w_img = dataset.image_size
    nc = len(dataset.classes)
    single = performer.num_classes == 1
    kind = "logistic" if single else "softmax"
    has_lm = bool(getattr(dataset, "landmark_names", []))
    has_pm = bool(getattr(dataset, "part_names", []))
    mask_shape = (len(dataset.part_names), h_img, w_img) if has_pm else None
    quant: dict[str, TopQuantile] = {}  # part interpretability, pass 1: thresholds ...
    cache: dict[str, _MapCache] = {}  # ... and the maps (the part masks with _MASKS_WITH) for pass 2
    annotated_class = torch.zeros(nc, dtype=torch.bool)  # classes with any annotation (icnn.evaluate)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    inst: dict[str, LocationInstability] = {}
    centers: dict[str, torch.Tensor] = {}
    class_sum: dict[str, torch.Tensor] = {}
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    class_count = torch.zeros(nc, dtype=torch.float64)
    correct = {"performer": 0.0, "explainer": 0.0}
    rec_err = None
    rec_norm = None
    for batch in loader:
        images = batch["image"].to(device)
        labels = batch["label"].long()
        perf = performer_targets(performer, images, layer, explainer.targets)
        o = explainer(perf.read)
        correct["performer"] += float(correct_count(kind, perf.logits.float().cpu(), labels))
        correct["explainer"] += float(correct_count(kind, o.logits.float().cpu(), labels))
        errs = torch.stack([((z.float() - t.float()) ** 2).sum(1).sum() for z, t in zip(o.recon, perf.targets.values())]).cpu()
        norms = torch.stack([(t.float() ** 2).sum(1).sum() for t in perf.targets.values()]).cpu()
        rec_err = errs if rec_err is None else rec_err + errs
        rec_norm = norms if rec_norm is None else rec_norm + norms
        onehot = F.one_hot(labels, nc).double()
        class_count += onehot.sum(0)
        if has_pm:
            part_masks = batch["part_masks"]
            # thresholds over the images that can show parts, as icnn.evaluate does
            has_parts = part_masks.flatten(1).any(1)
            shown = torch.isfinite(batch["landmarks"]).all(-1).any(-1) if "landmarks" in batch else has_parts
            annotated_class |= (onehot.t() @ shown.double()) > 0
        maps = {"explainer": o.masked["interp2"], "performer_top": perf.maps.masked[top], "performer_read": perf.read}
        for name, m in maps.items():
            m = m.float().cpu()
            b, c, h, w = m.shape
            if name not in centers:
                centers[name] = unit_centers(geoms[name], h, w)
                class_sum[name] = torch.zeros(nc, c, dtype=torch.float64)
                best[name] = (torch.full((c,), -math.inf, dtype=torch.float64), torch.zeros(c, dtype=torch.long))
                if has_lm:
                    inst[name] = LocationInstability(c, dataset.landmark_names, nc, top_k=top_k)
                if has_pm:
                    quant[name] = TopQuantile(c, n * h * w, q=quantile)
                    cache[name] = _MapCache(n, (c, h, w), mask_shape if name == _MASKS_WITH else None, None)
            scores, unit_xy = argmax_units(m, centers[name])
            if has_lm:
                inst[name].update(scores, unit_xy, batch["landmarks"].float(), labels, (h_img, w_img))
            class_sum[name] += onehot.t() @ m.double().sum((-2, -1))
            if has_pm:
                if has_parts.any():
                    quant[name].update(m[has_parts])
                cache[name].append(m, part_masks if name == _MASKS_WITH else None, labels)
            s, pos = scores.double().max(0)
            better = s > best[name][0]
            best[name] = (torch.where(better, s, best[name][0]), torch.where(better, batch["index"][pos], best[name][1]))

    err_p = 1.0 - correct["performer"] / n
    err_e = 1.0 - correct["explainer"] / n
    metrics: dict[str, Any] = {
        "num_images": n,
        "p": float(explainer.p),
        "layer_read": layer,
        "performer_top_layer": top,
        "performer_error": err_p,
        "explainer_error": err_e,
        "delta_error": err_e - err_p,
        "reconstruction_targets": list(explainer.targets),
        "relative_reconstruction_error": dict(zip(explainer.targets, (rec_err / rec_norm.clamp_min(1e-30)).tolist())),
    }
    if has_lm:
        for name in inst:
            cats = _categories(class_sum[name], class_count, single) if (single or name == "explainer") else None
            res = inst[name].compute(categories=cats)
            refs = inst[name].references(centers[name], draws=draws, seed=seed)
            metrics[f"{name}/location_instability"] = res.score
            metrics[f"{name}/silent_fraction"] = float(res.silent_fraction.mean())
            metrics[f"{name}/location_instability_firing"] = res.score_firing
            metrics[f"{name}/silent_in_top"] = res.silent_in_top
            metrics[f"{name}/references"] = refs.summary()
        top_score = metrics["performer_top/location_instability"]
        metrics["instability_ratio"] = metrics["explainer/location_instability"] / top_score if top_score else float("nan")
        metrics["landmark_names"] = list(dataset.landmark_names)
    if has_pm:
        metrics.update(_part_interpretability(quant, cache, geoms, class_sum, class_count, annotated_class, single,
                                              dataset.part_names, nc, batch_size, iou_threshold, rf_mode))  # fmt: skip
    return ExplainerEval(metrics, {k: v[1].tolist() for k, v in best.items()})


def _part_interpretability(quant, cache, geoms, class_sum, class_count, annotated_class, single, part_names, nc,
                           batch_size, iou_threshold, rf_mode) -> dict[str, Any]:  # fmt: skip
    """Pass 2 of part interpretability over the cached maps of every view (``icnn.evaluate``'s
    rules): ``{view}/part_interpretability`` and ``part_interpretability_ratio`` (explainer /
    performer top, when the latter is finite and non-zero). Nothing when no image shows a part."""
    out: dict[str, Any] = {}
    try:
        if any(q.count == 0 for q in quant.values()):
            return out
        annotated = annotated_class & (class_count > 0)
        piou = {name: PartInterpretability(q.compute(), part_names, nc, mode=rf_mode, centers=geoms[name],
                                           iou_threshold=iou_threshold) for name, q in quant.items()}  # fmt: skip
        streams = {name: c.batches(batch_size) for name, c in cache.items()}
        for _, masks, _ in cache[_MASKS_WITH].batches(batch_size):
            for name, stream in streams.items():
                maps, _, labels = next(stream)
                piou[name].update(maps, masks, labels)
        for name, meter in piou.items():
            res = meter.compute(categories=_categories(class_sum[name], class_count, single, annotated))
            out[f"{name}/part_interpretability"] = res.score
        num, den = out["explainer/part_interpretability"], out["performer_top/part_interpretability"]
        if math.isfinite(num) and math.isfinite(den) and den != 0:
            out["part_interpretability_ratio"] = num / den
        out["part_names"] = list(part_names)
        return out
    finally:
        for c in cache.values():
            c.close()


# ----------------------------------------------------------------------------------------------
# report


def _panel(image: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, title: str) -> bytes:
    from ..report import filter_panel

    h, w = image.shape[-2:]
    heat = F.interpolate(masked[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = heat / heat.max().clamp_min(1e-12)
    return filter_panel(image, x.numpy(), mask.numpy(), masked.numpy(), heat.clamp(0, 1).numpy(), title=title)


@torch.no_grad()
def write_explainer_report(path: str | Path, performer: nn.Module, explainer: Explainer, dataset, result: ExplainerEval, *,
                           layer: str = "stem", panels: int = 6, config: dict | None = None) -> Path:  # fmt: skip
    """``report.html``: the metrics next to the paper's, and per-filter panels (Fig. 4) of
    conv-interp-2 and of the performer's top conv-layer side by side, each on its top image."""
    from ..report import Figure, Section, Table, write_report

    m = result.metrics
    device = next(performer.parameters()).device
    rows = [["p (share of the interpretable track)", m["p"], "0.58-0.96 (Table 2)"],
            ["performer classification error", m["performer_error"], ""],
            ["error with reconstructed features", m["explainer_error"], ""],
            ["delta error (points)", 100 * m["delta_error"], "+0.14 to +1.02 points (Table 3)"]]  # fmt: skip
    for t, v in m["relative_reconstruction_error"].items():
        rows.append([f"relative reconstruction error of {t}", v, ""])
    if "instability_ratio" in m:
        for name, label in (("explainer", "conv-interp-2 (explainer)"), ("performer_top", f"performer top conv-layer ({m['performer_top_layer']})"),
                            ("performer_read", f"layer read ({layer})")):  # fmt: skip
            refs = m[f"{name}/references"]
            rows.append([f"location instability, {label}", m[f"{name}/location_instability"],
                         f"random unit {refs['random_unit']:.3f}, best fixed unit {refs['best_fixed_unit']:.3f}"])  # fmt: skip
            rows.append([f"share of its top images that were silent (firing only: {m[f'{name}/location_instability_firing']:.4f})",
                         m[f"{name}/silent_in_top"], "silent maps sit at unit (0, 0)"])  # fmt: skip
        rows.append(["instability ratio explainer / performer top", m["instability_ratio"], "0.36-0.69 (Table 1)"])
    if "explainer/part_interpretability" in m:
        for name, label in (("explainer", "conv-interp-2 (explainer)"), ("performer_top", f"performer top conv-layer ({m['performer_top_layer']})"),
                            ("performer_read", f"layer read ({layer})")):  # fmt: skip
            rows.append([f"part interpretability, {label}", m[f"{name}/part_interpretability"], ""])
        if "part_interpretability_ratio" in m:
            rows.append(["part interpretability ratio explainer / performer top", m["part_interpretability_ratio"], ""])
    summary = Section("Summary", tables=[Table(["quantity", "value", "paper / reference"], rows)],
                      text="Explainer network (Zhang et al., paper 003) of a frozen performer.")  # fmt: skip

    top = performer.layer_names[-1]
    c = len(result.best_image["explainer"])
    shown = list(range(min(panels, c)))
    figures = []
    for f in shown:
        for name in ("explainer", "performer_top"):
            idx = int(result.best_image[name][f])
            image = dataset[idx]["image"]
            perf = performer_targets(performer, image[None].to(device), layer, ())
            if name == "explainer":
                o = explainer(perf.read)
                x, masked = o.relu["interp2"][0, f].cpu(), o.masked["interp2"][0, f].cpu()
                mask = explainer.layers["interp2"].mask.mask(o.relu["interp2"])[0, f].cpu()
                title = f"explainer conv-interp-2, filter {f}, image {idx}"
            else:
                x, masked = perf.maps.relu[top][0, f].cpu(), perf.maps.masked[top][0, f].cpu()
                layer_mask = performer.layers[top].mask
                if layer_mask is not None:
                    mask = layer_mask.mask(perf.maps.relu[top])[0, f].cpu()
                else:  # ordinary performer: no mask; the template a mask layer would pick (as icnn evaluate shows)
                    mask = PartMask().mask(x[None, None].float())[0, 0]
                title = f"performer {top}, filter {f}, image {idx}"
            figures.append(Figure(_panel(image, x, mask, masked, title), title))
    panels_sec = Section("Filters: explainer (left) and performer (right)", figures=figures,
                         text="Each filter on the image that activates it most: map after ReLU, mask (an ordinary performer has "
                              "none: the template a mask layer would pick), masked map, receptive field.")  # fmt: skip
    return write_report(path, "icnn explainer", [summary, panels_sec], config=config, meta={"images": m["num_images"]})
