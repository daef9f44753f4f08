"""The report of an explainer network (paper 003): its metrics next to the paper's, and per-filter
panels (Fig. 4) of conv-interp-2 and of the performer's top conv-layer side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from ..metrics.instability import references_text
from .html import Figure, Section, Table, write_report
from .run import filter_figure, panel_mask

VIEW_LABELS = {"explainer": "conv-interp-2 (explainer)", "performer_top": "performer top conv-layer", "performer_read": "layer read"}


def summary_rows(m: dict) -> list[list]:
    rows = [["p (share of the interpretable track)", m["p"], "0.58-0.96 (Table 2)"],
            ["performer classification error", m["performer_error"], ""],
            ["error with reconstructed features", m["explainer_error"], ""],
            ["delta error (points)", 100 * m["delta_error"], "+0.14 to +1.02 points (Table 3)"]]  # fmt: skip
    rows += [[f"relative reconstruction error of {t}", v, ""] for t, v in m["relative_reconstruction_error"].items()]
    for view, label in VIEW_LABELS.items():
        v = m[view]
        if "location_instability" in v:
            refs = v["instability_references"]
            rows.append([f"location instability, {label}", v["location_instability"],
                         references_text(refs, digits=3)])
            rows.append([f"share of its top images that were silent (firing only: {v['location_instability_firing']:.4f})",
                         v["silent_in_top"], "silent maps sit at unit (0, 0)"])  # fmt: skip
        col = v.get("collapse", {})
        if col:
            rows.append([f"peak correlation / share at the commonest unit, {label}",
                         f"{col['peak_correlation']:.3f} / {col['mode_share']:.3f}", "collapse: > 0.3 / > 0.2"])  # fmt: skip
        if "part_interpretability" in v:
            rows.append([f"part interpretability, {label}", v["part_interpretability"], ""])
    for key, paper in (("instability_ratio", "0.36-0.69 (Table 1)"), ("part_interpretability_ratio", "")):
        if key in m:
            rows.append([key.replace("_", " ") + " explainer / performer top", m[key], paper])
    return rows


@torch.no_grad()
def write_explainer_report(path: str | Path, performer, explainer, dataset, result, *, layer: str = "stem", panels: int = 6,
                           config: dict | None = None) -> Path:  # fmt: skip
    """``report.html`` of an evaluated explainer (``icnn.explainer.evaluate_explainer``)."""
    from ..explainer.model import performer_targets

    m = result.metrics
    images = getattr(dataset, "base", dataset)  # a CachedDataset's images come from its base
    device = next(performer.parameters()).device
    summary = Section("Summary", tables=[Table(["quantity", "value", "paper / reference"], summary_rows(m))],
                      text="Explainer network (Zhang et al., paper 003) of a frozen performer.")  # fmt: skip
    top = performer.layer_names[-1]
    figures = []
    for f in range(min(panels, len(result.best_image["explainer"]))):
        for view in ("explainer", "performer_top"):
            idx = int(result.best_image[view][f])
            if idx < 0:
                continue
            image = images[idx]["image"]
            perf = performer_targets(performer, image[None].to(device), layer, ())
            if view == "explainer":
                o = explainer(perf.read)
                x, masked = o.relu["interp2"][0, f].cpu(), o.masked["interp2"][0, f].cpu()
                mask = explainer.layers["interp2"].mask.mask(o.relu["interp2"])[0, f].cpu()
                title = f"explainer conv-interp-2, filter {f}, image {idx}"
            else:
                relu = perf.maps.relu[top]
                x, masked = relu[0, f].cpu(), perf.maps.masked[top][0, f].cpu()
                mask = panel_mask(performer.layers[top].mask, relu[0, f], f, relu.shape[1]).cpu()  # ordinary: a mask's template
                title = f"performer {top}, filter {f}, image {idx}"
            figures.append(Figure(filter_figure(image, x, mask, masked, title), title))
    panels_sec = Section("Filters: explainer (left) and performer (right)", figures=figures,
                         text="Each filter on the image that activates it most: map after ReLU, mask (an ordinary performer has "
                              "none: the template a mask layer would pick), masked map, receptive field.")  # fmt: skip
    return write_report(path, "icnn explainer", [summary, panels_sec], config=config, meta={"images": m["num_images"]})
