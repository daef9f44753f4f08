"""Evaluating an explanatory graph against the raw filters of the same layers (SPEC-trees-graph §2b;
the authors' ``computeStability_cub.m``, ``computeStability*.m``, ``getDistSqrtVar.m``).

**Location instability** (the code's protocol, with icnn's conventions where they differ):

1. per layer, rank the units by the mean of their ``top_images`` (20) highest scores and keep the
   first ``top_units`` (the code's hard-coded 167);
2. per kept unit and landmark, its ``top_images`` best-scoring images **among those annotated with
   the landmark** (``icnn.metrics.LocationInstability``; the code takes the top 20 images first and
   then drops the unannotated ones, so it may use fewer);
3. ``D = std_I ||landmark - p_unit(I)|| / diagonal`` with the **population** std (icnn's
   convention; the code's MATLAB ``var`` divides by ``N - 1``, a factor ``sqrt(20/19) = 1.026``
   on a full top-20), averaged over landmarks, then units, then layers.

A graph node's point is its inferred position; a raw filter's is the receptive-field centre of
its map's arg-max, scored by the map's maximum (``computeStability_raw.m``; maps normalised as
the features are: the arg-max of ``x / sigma_neg``). Beside both, per layer, the two image-blind
references of ``icnn.metrics.instability_references`` on the layer's unit grid: a filter firing at
a random unit, and the best fixed unit.

**Part localisation from a few annotated images** (the paper's few-shot part localisation; the
code ships no script, so the protocol is ours): for each landmark, ``shots`` annotated images
(consecutive, ``trials`` disjoint sets) give every unit ``u`` a displacement
``d_u = mean (landmark - p_u)`` and a spread ``e_u = RMS |landmark - p_u - d_u|``; the ``votes``
units of lowest spread predict ``mean_u (p_u(I) + d_u)`` on every other annotated image. The error
is ``|prediction - landmark| / diagonal``, for the graph's nodes (all layers) and for the raw
filters (all layers), beside the constant prediction ``mean landmark of the shots``.
"""

from __future__ import annotations

import math

import torch

from icnn.metrics.instability import LocationInstability, instability_references
from icnn.training.loop import progress

from .config import GraphError
from .features import FeatureStore, LayerInfo
from .match import Match, check_features, match


@torch.no_grad()
def raw_filters(features: FeatureStore, *, chunk_images: int | None = None, sigma_neg: str = "unit",
                progress_bar: bool = True) -> list[Match]:  # fmt: skip
    """Each filter as one unit: the arg-max cell of its normalised map (first in row-major order on
    ties) and ``log`` of the maximum (floored at float32's ``tiny`` for a silent map). Reads
    ``chunk_images`` images at a time (default: the store's chunk size); ``sigma_neg`` as the graph's
    (``FeatureStore.read``), so that nodes and filters see the same maps."""
    out = []
    for l, info in enumerate(features.layers):
        pos = torch.empty(features.num_images, info.channels, 2)
        score = torch.empty(features.num_images, info.channels)
        batches = features.batches(chunk_images or features.chunk_size)
        for a, b in progress(batches, enabled=progress_bar, total=len(batches), desc=f"graph: raw {info.name}"):
            best, flat = features.read(l, a, b, sigma_neg=sigma_neg).flatten(2).max(-1)  # (B, C)
            pos[a:b] = torch.stack((flat // info.size[1], flat % info.size[1]), -1).float()
            score[a:b] = best.clamp_min(torch.finfo(best.dtype).tiny).log()
        out.append(Match(pos, score))
    return out


def top_units(log_score: torch.Tensor, count: int, top_images: int) -> torch.Tensor:
    """The ``count`` units with the highest mean of their ``top_images`` best scores (ties: index)."""
    best = log_score.topk(min(top_images, log_score.shape[0]), dim=0).values  # (k, V)
    return torch.logsumexp(best, 0).sort(descending=True, stable=True).indices[:count]


def _landmarks(features: FeatureStore, names) -> tuple[torch.Tensor, list[str]]:
    names = list(features.landmark_names) if names is None else list(names)
    unknown = [n for n in names if n not in features.landmark_names]
    if unknown:
        raise GraphError(f"landmarks: {unknown[0]!r} is not one of the features' {features.landmark_names}")
    marks = features.landmarks[:, [features.landmark_names.index(n) for n in names]]
    if not names or bool(torch.isnan(marks).all()):
        raise GraphError("landmarks: the features have no landmarks to evaluate against")
    return marks.double(), names


def _layer_instability(m: Match, info: LayerInfo, marks, names, hw, count: int, top_images: int) -> float:
    keep = top_units(m.log_score, count, top_images)
    acc = LocationInstability(len(keep), names, top_k=top_images)
    acc.update(m.log_score[:, keep].double(), info.pixels(m.pos[:, keep]).double(), marks, None, hw)
    return acc.compute().score


def location_instability(nodes: list[Match], raw: list[Match], features: FeatureStore, *, top_units: int = 167,
                         top_images: int = 20, landmarks=None, draws: int = 20, seed: int = 0) -> dict:  # fmt: skip
    """The table of the module doc: per layer and averaged, nodes / raw filters / references."""
    marks, names = _landmarks(features, landmarks)
    rows = []
    for l, info in enumerate(features.layers):
        refs = instability_references(marks, None, features.image_hw, info, map_hw=info.size, top_k=top_images,
                                      draws=draws, seed=seed)  # fmt: skip
        graph_d, raw_d = (_layer_instability(m, info, marks, names, features.image_hw, top_units, top_images)
                          for m in (nodes[l], raw[l]))  # fmt: skip
        rows.append({"layer": info.name, "nodes": graph_d, "raw_filters": raw_d, "random_unit": refs.random,
                     "best_fixed_unit": refs.fixed, "best_landmark_unit": refs.best_landmark_unit})  # fmt: skip
    keys = ("nodes", "raw_filters", "random_unit", "best_fixed_unit", "best_landmark_unit")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"layers": rows, **mean, "ratio": mean["nodes"] / mean["raw_filters"], "top_units": top_units,
            "top_images": top_images, "landmarks": names}  # fmt: skip


def _localise(p_shot, y_shot, p_test, y_test, votes: int, diag: float) -> float:
    """Mean error of the ``votes`` lowest-spread units' vote (module doc); ``p (S, U, 2)``, ``y (S, 2)``."""
    d = (y_shot[:, None] - p_shot).mean(0)  # (U, 2)
    spread = (y_shot[:, None] - p_shot - d).pow(2).sum(-1).mean(0)  # (U,)
    sel = spread.sort(stable=True).indices[:votes]
    pred = (p_test[:, sel] + d[sel]).mean(1)  # (T, 2)
    return float((pred - y_test).norm(dim=-1).mean() / diag)


def part_localisation(nodes: list[Match], raw: list[Match], features: FeatureStore, *, shots: int = 3,
                      votes: int = 10, trials: int = 5, landmarks=None) -> dict:  # fmt: skip
    """Few-shot part localisation through nodes vs raw filters (module doc)."""
    marks, names = _landmarks(features, landmarks)
    points = lambda ms: torch.cat([L.pixels(m.pos).double() for L, m in zip(features.layers, ms)], 1)
    units = {"nodes": points(nodes), "raw_filters": points(raw)}
    diag = math.hypot(*features.image_hw)
    rows = []
    for k, name in enumerate(names):
        have = (~torch.isnan(marks[:, k]).any(-1)).nonzero()[:, 0]
        errs: dict[str, list[float]] = {"nodes": [], "raw_filters": [], "mean_shot": []}
        for t in range(min(trials, len(have) // shots - 1)):  # each trial leaves >= shots test images
            shot = have[t * shots : (t + 1) * shots]
            test = torch.cat((have[: t * shots], have[(t + 1) * shots :]))
            y_shot, y_test = marks[shot, k], marks[test, k]
            for key, p in units.items():
                errs[key].append(_localise(p[shot], y_shot, p[test], y_test, votes, diag))
            errs["mean_shot"].append(float((y_shot.mean(0) - y_test).norm(dim=-1).mean() / diag))
        rows.append({"landmark": name, "trials": len(errs["nodes"]),
                     **{key: sum(v) / len(v) if v else float("nan") for key, v in errs.items()}})  # fmt: skip
    done = [r for r in rows if r["trials"]]
    if not done:
        raise GraphError(f"shots: too few annotated images for {shots} shots and a test set")
    mean = {key: sum(r[key] for r in done) / len(done) for key in ("nodes", "raw_filters", "mean_shot")}
    return {"landmarks": rows, **mean, "shots": shots, "votes": votes}


def evaluate_graph(graph, features: FeatureStore, *, source: str = "match", progress_bar: bool = True, **kw) -> dict:
    """Both evaluations of the module doc on ``features``, as a JSON-able dict.

    ``source="match"`` matches the images to the graph (any images); ``"records"`` uses the
    positions and scores of the last learning iteration (the code's ``pos_record``/``prob_record``;
    the training features only). ``kw``: ``top_units``, ``top_images``, ``landmarks``, ``shots``,
    ``votes``, ``trials``.
    """
    check_features(graph, features)
    unknown = sorted(set(kw) - {"top_units", "top_images", "landmarks", "shots", "votes", "trials"})
    if unknown:
        raise GraphError(f"{unknown[0]}: not an evaluation setting")
    if source == "records":
        if features.num_images != graph.num_images or not graph.complete:
            raise GraphError("source: 'records' needs the complete graph and its own training features")
        nodes = [Match(n.pos, n.log_score) for n in graph.nodes]
    elif source == "match":
        nodes = match(graph, features, progress_bar=progress_bar)
    else:
        raise GraphError(f"source: must be 'match' or 'records', got {source!r}")
    raw = raw_filters(features, chunk_images=graph.config.chunk_images, sigma_neg=graph.config.sigma_neg,
                      progress_bar=progress_bar)
    inst = {k: kw[k] for k in ("top_units", "top_images", "landmarks") if k in kw}
    loc = {k: kw[k] for k in ("shots", "votes", "trials", "landmarks") if k in kw}
    return {"source": source, "faithful": graph.config.faithful,
            "location_instability": location_instability(nodes, raw, features, **inst),
            "part_localisation": part_localisation(nodes, raw, features, **loc)}  # fmt: skip
