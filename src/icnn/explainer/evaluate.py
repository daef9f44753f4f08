"""Evaluating an explainer (paper 003 §4, Tables 1-3 and 5-7); its report is ``icnn.report.explainer``.

One pass over a dataset, performer and explainer side by side, one ``icnn.evaluate.MetricSuite``
per view (``metrics[view]`` holds what ``icnn evaluate`` reports for a layer):

* ``p`` (Table 2);
* location instability (SPEC §5) of conv-interp-2 (masked maps), of the performer's top
  conv-layer (its last layer, ``"new"`` for icnn networks: the layer the paper compares with)
  and of the layer the explainer reads (Tables 5-6 baseline), each with its reference points
  (random unit, best fixed unit); receptive fields from ``icnn.metrics.receptive_field``:
  the explainer's units compose the layer read with conv-interp-1 and conv-interp-2;
* part interpretability (paper §5.2.1, Table 1) of the same three views when the dataset has
  part masks, and the collapse figures of each view;
* classification error of the performer and of the performer's classifier fed with the
  explainer's reconstructed features (Tables 3 and 7: ``delta_error``), and the relative
  reconstruction error of each target.

Filter categories (``icnn.categories``): single-category sets use the target class for every
filter; multi-category sets assign each explainer filter the class whose images activate it most
(paper §4), and ordinary performer filters take the best class (``min_c``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..evaluate import EvalConfig, MetricSuite
from ..metrics.receptive_field import layer_geometry
from ..models.net import batch_input, eval_mode
from ..task_loss import correct_count
from ..training.loop import progress
from .model import ExplainedNet, Explainer, performer_targets

VIEWS = ("explainer", "performer_top", "performer_read")


@dataclass
class ExplainerEval:
    metrics: dict[str, Any]
    best_image: dict[str, list[int]] = field(default_factory=dict)  # view -> per filter, its top image index


@torch.no_grad()
def evaluate_explainer(performer: nn.Module, explainer: Explainer, dataset, *, layer: str = "stem",
                       config: EvalConfig | None = None) -> ExplainerEval:  # fmt: skip
    """Streams ``dataset`` once (images, or a ``CachedDataset`` of the performer's frozen stem):
    one :class:`icnn.evaluate.MetricSuite` per view (see the module docstring), the performer's
    error and the error with the reconstructed features."""
    cfg = (config or EvalConfig()).validate()
    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate_explainer: the dataset is empty")
    device = next(performer.parameters()).device
    top = performer.layer_names[-1]
    single = performer.num_classes == 1
    kind = "logistic" if single else "softmax"
    net = ExplainedNet(performer, explainer, layer)
    geoms = {"explainer": layer_geometry(net, "interp2"), "performer_top": layer_geometry(performer, top),
             "performer_read": layer_geometry(performer, layer)}  # fmt: skip
    interp = {"explainer": True, "performer_top": bool(performer.interpretable), "performer_read": False}
    suites = {v: MetricSuite(dataset, geoms[v], cfg, interpretable=interp[v], single=single) for v in VIEWS}
    correct = {"performer": 0.0, "explainer": 0.0}
    rec_err = rec_norm = 0.0
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    with eval_mode(performer, explainer):
        for batch in progress(loader, enabled=cfg.progress, total=len(loader), desc=f"evaluate explainer ({n} images)"):
            x, from_stem = batch_input(batch)
            perf = performer_targets(performer, x.to(device), layer, explainer.targets, from_stem=from_stem)
            o = explainer(perf.read)
            labels = batch["label"].long()
            correct["performer"] += float(correct_count(kind, perf.logits.float().cpu(), labels))
            correct["explainer"] += float(correct_count(kind, o.logits.float().cpu(), labels))
            rec_err = rec_err + torch.stack([((z.float() - t.float()) ** 2).sum() for z, t in zip(o.recon, perf.targets.values())]).cpu()
            rec_norm = rec_norm + torch.stack([(t.float() ** 2).sum() for t in perf.targets.values()]).cpu()
            maps = {"explainer": o.masked["interp2"], "performer_top": perf.maps.masked[top], "performer_read": perf.read}
            for v in VIEWS:
                suites[v].update(maps[v], batch)
    results = {v: suites[v].compute() for v in VIEWS}
    err_p, err_e = 1.0 - correct["performer"] / n, 1.0 - correct["explainer"] / n
    m: dict[str, Any] = {
        "num_images": n, "p": float(explainer.p), "layer_read": layer, "performer_top_layer": top,
        "performer_error": err_p, "explainer_error": err_e, "delta_error": err_e - err_p,
        "reconstruction_targets": list(explainer.targets),
        "relative_reconstruction_error": dict(zip(explainer.targets, (rec_err / rec_norm.clamp_min(1e-30)).tolist())),
        **{v: r.metrics for v, r in results.items()},
    }  # fmt: skip
    for key, ratio in (("location_instability", "instability_ratio"), ("part_interpretability", "part_interpretability_ratio")):
        num, den = m["explainer"].get(key), m["performer_top"].get(key)
        if num is not None and den and math.isfinite(num) and math.isfinite(den):
            m[ratio] = num / den
    best = {v: [row[0] if row else -1 for row in r.artifacts["top_images"]] for v, r in results.items()}
    return ExplainerEval(m, best)
