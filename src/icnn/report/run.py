"""The report of evaluated runs: metric tables and the paper's figures (Fig. 4, 5, 6).

``run_sections`` turns one evaluated network into report sections; ``write_run_report`` writes
one run, ``write_comparison_report`` several side by side (e.g. ordinary vs interpretable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics.instability import REFERENCE_NAMES
from . import figures
from .html import Figure, Section, Table, _lookup, comparison_section, write_report

# what the comparison table shows, in order (dotted keys into metrics.json)
COMPARISON_KEYS = [
    "accuracy",
    "location_instability",
    "location_instability_min_class",
    "location_instability_assigned",
    "instability_references.random_unit",
    "instability_references.best_fixed_unit",
    "instability_references.best_landmark_unit",
    "part_interpretability",
    "dissection.dissection_detectors",
    "dissection.dissection_unique_concepts",
    "silent_fraction",
    "silent_in_top",
    "location_instability_firing",
    "collapse.peak_correlation",
    "collapse.mode_share",
    "collapse.higher_on_category",
    "collapse.parts_effective",
]


def _shown_filters(per_filter: dict, count: int) -> list[int]:
    """Filters to draw: the most part-interpretable (or most stable) non-silent ones."""
    if "part_interpretability" in per_filter:
        score = -np.nan_to_num(np.asarray(per_filter["part_interpretability"], float), nan=-1.0)
    elif "location_instability" in per_filter:
        score = np.nan_to_num(np.asarray(per_filter["location_instability"], float), nan=np.inf)
    else:
        score = np.zeros(len(per_filter["threshold"]))
    return [int(i) for i in np.argsort(score, kind="stable")[:count]]


def filter_figure(image: torch.Tensor, relu: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, title: str) -> bytes:
    """Paper Fig. 4 of one filter on ``image``: ``relu``, ``mask`` and ``masked`` ``(h, w)``, and the
    masked map upsampled to the image (bilinear) relative to its maximum, as its RF."""
    size = tuple(image.shape[-2:])
    heat = torch.nn.functional.interpolate(masked[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return figures.filter_panel(image, relu, mask, masked, heat / heat.max().clamp_min(1e-12), title=title)


def panel_mask(mask_layer, relu: torch.Tensor, f: int, channels: int) -> torch.Tensor:
    """Filter ``f``'s mask on one ``relu (h, w)`` map; an ordinary layer (no mask) shows the
    template a mask layer would pick."""
    from ..mask import PartMask

    if mask_layer is None:
        return PartMask().mask(relu[None, None])[0, 0]
    x = torch.zeros(1, channels, *relu.shape, device=relu.device)
    x[0, f] = relu  # masks act per filter (an adaptive mask has a slope per filter)
    return mask_layer.mask(x)[0, f]


@torch.no_grad()
def _filter_figures(name: str, model, dataset, result, layer: str, count: int, top: int) -> tuple[list, list]:
    """Fig. 4 panels and Fig. 5 top images from the maps the evaluation kept (no second forward pass)."""
    from ..metrics.part_iou import filter_regions
    from ..metrics.receptive_field import layer_geometry

    geom = layer_geometry(model, layer)
    thresholds = torch.as_tensor(result.per_filter["threshold"], dtype=torch.float32)
    top_maps = result.artifacts["top_maps"]  # (C, kept, 2, h, w): masked, before the mask
    images_of = getattr(dataset, "base", dataset)  # a CachedDataset's images come from its base
    mask_layer = model.layers[layer].mask
    panels, tops = [], []
    for f in _shown_filters(result.per_filter, count):
        idx = result.artifacts["top_images"][f][:top]
        if not idx:
            continue
        images = torch.stack([images_of[i]["image"] for i in idx])
        masked, relu = top_maps[f, : len(idx), 0:1], top_maps[f, : len(idx), 1]
        regions = filter_regions(masked, thresholds[f : f + 1], tuple(images.shape[-2:]), centers=geom)[:, 0]
        m = panel_mask(mask_layer, relu[0], f, top_maps.shape[0])
        panels.append(Figure(filter_figure(images[0], relu[0], m, masked[0, 0], f"{name}: filter {f}"),
                             f"{name}, filter {f} on its top image: x, mask, masked x, RF (paper Fig. 4)"))  # fmt: skip
        scores = masked.reshape(len(idx), -1).amax(-1).tolist()
        tops.append(Figure(figures.top_images(list(images), list(regions.numpy()), scores, ncols=min(6, len(idx)), title=f"{name}: filter {f}"),
                           f"{name}, filter {f}: top-{len(idx)} images with the regions above its threshold (paper Fig. 5)", wide=True))  # fmt: skip
    return panels, tops


def run_sections(name: str, model, dataset, result, *, layer: str = "new", panels: int = 4, top: int = 6) -> list[Section]:
    """Sections for one evaluated network: Fig. 4 panels, Fig. 5 top images, Fig. 6 part maps."""
    m = result.metrics
    rows = [[k, m[k]] for k in ("accuracy", "location_instability", "location_instability_min_class", "location_instability_assigned",
                                "location_instability_firing", "part_interpretability", "silent_fraction", "silent_in_top") if k in m]  # fmt: skip
    if "filters_per_category" in m:
        rows.append(["filters per category", ", ".join(f"{c} {n}" for c, n in m["filters_per_category"].items())])
    rows += [[f"instability reference: {k}", v] for k, v in m.get("instability_references", {}).items()]
    rows += [[f"part interpretability reference: {k}", v] for k, v in m.get("part_interpretability_references", {}).items()]
    per_ref = m.get("instability_references_per_landmark", {})
    for k, v in m.get("instability_per_landmark", {}).items():
        refs = [f"{r.replace('_', ' ')} {per_ref[r][k]:.4f}" for r in ("random_unit", "best_fixed_unit") if k in per_ref.get(r, {})]
        rows.append([f"instability, {k}" + (f" ({', '.join(refs)})" if refs else ""), v])
    units = m.get("instability_landmark_units", {})
    rows += [[f"instability reference: a filter on the {k}'s unit on every image", v] for k, v in units.items()]
    rows += [[f"collapse: {k.replace('_', ' ')}", v if not isinstance(v, dict) else ", ".join(f"{a} {b:.2f}" for a, b in v.items())]
             for k, v in m.get("collapse", {}).items()]  # fmt: skip
    rows += [[f"part interpretability, {k}", v] for k, v in m.get("part_interpretability_per_part", {}).items()]
    rows += [[k.replace("_", " "), v] for k, v in m.get("dissection", {}).items()]
    sections = [Section(f"{name}: metrics", tables=[Table(["metric", "value"], rows, caption=f"{name}, layer {m.get('layer')}")])]
    panel_figs, top_figs = _filter_figures(name, model, dataset, result, layer, panels, top)
    sections.append(Section(f"{name}: filters (paper Fig. 4, 5)", figures=panel_figs + top_figs))
    fig6 = []
    if "density" in result.artifacts and result.artifacts["density"].sum() > 0:
        d = result.artifacts["density"]
        fig6.append(Figure(figures.location_heatmap(d / d.sum(), title=f"{name}: where filters fire"),
                           "Inferred part positions of all filters on all images, in the object-box frame (paper Fig. 6)"))
    if "per_filter_part" in result.artifacts:
        pfp = np.nan_to_num(result.artifacts["per_filter_part"])
        fig6.append(Figure(figures.part_heatmap(pfp, list(m.get("part_names", [])), title=f"{name}: parts per filter"),
                           "P_fk of every filter and part, and filters per best part (paper Fig. 6)"))
    if fig6:
        sections.append(Section(f"{name}: part distribution (paper Fig. 6)", figures=fig6))
    return sections


def _bars(runs: dict[str, dict]) -> list[Figure]:
    out = []
    first = next(iter(runs.values()))
    refs = first.get("instability_references", {})
    references = {name: refs[key] for key, name in REFERENCE_NAMES.items() if key in refs}
    prefs = first.get("part_interpretability_references", {})
    part_refs = {k.replace("_", " "): v for k, v in prefs.items() if v == v} or None
    for metric, refs_ in (("location_instability", references), ("part_interpretability", part_refs), ("accuracy", None)):
        if any(metric in r for r in runs.values()):
            out.append(Figure(figures.metric_bars(runs, metric, references=refs_), metric.replace("_", " ")))
    if any("instability_per_landmark" in r for r in runs.values()):
        out.append(Figure(figures.metric_bars(runs, "instability_per_landmark", references=references), "location instability per landmark"))
    return out


def write_run_report(path, name: str, model, dataset, result, *, config: dict | None = None, meta: dict | None = None) -> Path:
    """``report.html`` of one evaluated network."""
    sections = [Section("Summary", figures=_bars({name: result.metrics}))] + run_sections(name, model, dataset, result)
    return write_report(path, f"icnn evaluation: {name}", sections, config=config, meta=meta)


def write_comparison_report(path, runs: dict[str, tuple[Any, Any, Any]], *, title: str, config: dict | None = None,
                            meta: dict | None = None, text: str = "") -> Path:
    """``report.html`` with several evaluated networks side by side.

    ``runs``: name -> (model, dataset, EvalResult), e.g. ``{"ordinary": ..., "interpretable": ...}``.
    """
    metrics = {name: r[2].metrics for name, r in runs.items()}
    absent = object()
    shown = [k for k in COMPARISON_KEYS if any(_lookup(m, k, absent) is not absent for m in metrics.values())]
    comp = comparison_section(metrics, shown, title="Comparison", text=text)
    comp.figures.extend(_bars(metrics))
    sections = [comp]
    for name, (model, dataset, result) in runs.items():
        sections += run_sections(name, model, dataset, result)
    return write_report(path, title, sections, config=config, meta=meta)
