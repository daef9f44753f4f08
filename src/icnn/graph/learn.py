"""Learning the explanatory graph top-down, layer by layer (SPEC-trees-graph §2a "Learning"; the
authors' ``learn_explanatoryGraph.m``, ``initializeModel.m``, ``getCurDistribution.m``).

For each layer from the top: ``P`` nodes per filter start at distinct random cells with
``sigma = init_delta H``; then ``iterations`` times:

1. parents (not the top layer, from the second iteration on): each node's ``top_n`` parents among
   the candidates of the layer above, from its positions and peak values of the previous
   iteration (``parents.select_parents``), and the prior they give it on every image;
2. the E-step over the images in chunks of ``chunk_images`` (``estep.e_step``);
3. the M-step::

       mu_V    += eta sigma_min^2 sum_I grad_V(I) / max(sum_I mass_V(I), 1e-8),
                  sigma_min = min_{V, I} cd_V(I) / iter^(1/4)          (a decaying gradient step)
       sigma_V  = sqrt(sum_I S_V(I) spread_V(I) / sum_I S_V(I)) * spacing   clamped to sigma_range

   ``spread`` is the radial second moment in candidate steps: the code multiplies its root by the
   candidate spacing of the layer's *first* iteration and uses it as a per-axis sigma; fixed, the
   spacing of the iteration that measured it and the per-axis value (``/ sqrt 2``) (SPEC §2c.4).

After each layer the graph is saved (``ExplanatoryGraph.save``): a rerun with the same directory,
features and config continues with the next layer. There is no objective to monitor (the code
runs ``iterations`` iterations, SPEC §2c.7); the history records per iteration the mean
``log S``, the mean move of ``mu`` and the mean ``sigma``, with times and peak memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from icnn.training.loop import progress

from .config import GraphConfig, GraphError
from .estep import half_ranges
from .features import FeatureStore
from .match import check_features, infer_layer
from .model import ExplanatoryGraph, LayerNodes
from .parents import candidate_parents, select_parents

log = logging.getLogger(__name__)


def _peak_rss_mb(reset: bool = False) -> float | None:
    """The process's peak resident memory (Linux ``VmHWM``), MiB; ``reset`` restarts the peak."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def learn_graph(features: FeatureStore, root: str | Path, config: GraphConfig | None = None, *,
                progress_bar: bool = True) -> ExplanatoryGraph:  # fmt: skip
    """Learn (or finish learning) the graph of ``features`` into the directory ``root``.

    A directory that already holds a graph continues it when it was started with the same config
    and features; learned layers are not recomputed. Deterministic for a given ``config.seed``.
    """
    config = config or GraphConfig()
    layers, n = features.layers, features.num_images
    if n < 2:
        raise GraphError(f"features: need at least 2 images to learn a graph, got {n}")
    for l, info in enumerate(layers):
        config.nodes_per_filter(l, len(layers), info.side)  # validates density against the layers
    root = Path(root)
    if (root / "graph.json").exists():
        graph = ExplanatoryGraph.load(root)
        conflicts = config.resume_conflicts(graph.config.to_dict())
        if conflicts:
            key, (was, now) = next(iter(conflicts.items()))
            raise GraphError(f"root: {root} holds a graph learned with {key} = {was!r}, not {now!r}; use a new directory",
                             field=key, reason=f"the graph in {root} was learned with {key} = {was!r}; use a new directory")  # fmt: skip
        if graph.layers != layers or graph.num_images != n:
            raise GraphError(f"root: {root} holds a graph of other features; use a new directory")
        check_features(graph, features)
        graph.config = config  # only the chunk sizes may differ (RESUME_OVERRIDABLE)
    else:
        graph = ExplanatoryGraph(config, list(layers), [None] * len(layers), n)
    for l in reversed(range(len(layers))):
        if graph.nodes[l] is None:
            (root / f"layer_{l}.safetensors").unlink(missing_ok=True)  # left by a crash before graph.json
            graph.nodes[l] = _learn_layer(graph, features, l, progress_bar)
            graph.save(root)
    return graph


def m_step(mu: torch.Tensor, grad: torch.Tensor, mass: torch.Tensor, log_score: torch.Tensor, spread: torch.Tensor, *,
           cd_min: float, iteration: int, eta: float, spacing: torch.Tensor, sigma_range: tuple[float, float],
           faithful: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The M-step (module doc; ``learn_explanatoryGraph.m:99-105``): new ``mu (C, P, 2)`` and
    ``sigma (C, P)`` from the E-step's sums over the images.

    Args:
        mu: ``(C, P, 2)``; grad: ``(C, P, 2)`` = ``sum_I grad_V(I)``; mass: ``(C, P)`` = ``sum_I mass_V(I)``.
        log_score, spread: ``(N, C, P)`` per image ``log S_V(I)`` and the radial second moment (steps^2).
        cd_min: ``min_{V, I} cd_V(I)`` of this iteration; spacing: ``(C, P)`` candidate spacing that
            converts steps to map units (the stale first one when ``faithful``).
    """
    step = eta * (cd_min / iteration**0.25) ** 2
    new_mu = mu + (grad / mass.clamp_min(1e-8)[..., None] * step).to(mu.dtype)
    var = (torch.softmax(log_score, 0) * spread).sum(0)  # S-weighted mean over images, finite at any scale
    sigma = (var if faithful else var / 2).sqrt().mul(spacing).clamp(*sigma_range)
    return new_mu, sigma


@torch.no_grad()
def _learn_layer(graph: ExplanatoryGraph, features: FeatureStore, l: int, progress_bar: bool) -> LayerNodes:
    cfg, info = graph.config, graph.layers[l]
    num_layers, side, c, n_img = len(graph.layers), graph.layers[l].side, graph.layers[l].channels, graph.num_images
    p = cfg.nodes_per_filter(l, num_layers, side)
    n = min(cfg.candidates, side)
    lo, hi = cfg.sigma_range(l, num_layers, side)
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + l)
    cells = torch.rand(c, side * side, generator=gen).argsort(1)[:, :p]  # (C, P) distinct cells per filter
    mu = torch.stack((cells // side, cells % side), -1).float()  # (C, P, 2)
    sigma = torch.full((c, p), cfg.init_delta * side)
    spacing = lambda s: 2 * half_ranges(s, side, cfg.max_range, cfg.deform_ratio).float() / n
    first_spacing = spacing(sigma)  # the code's stale spacing (SPEC §2c.4)
    v = c * p
    pos, log_score = torch.empty(n_img, v, 2), torch.empty(n_img, v)
    log_peak, spread = torch.empty(n_img, v), torch.empty(n_img, v)
    parents, strength = torch.empty(v, 0, dtype=torch.long), torch.empty(v, 0)

    upper = graph.nodes[l + 1] if l + 1 < num_layers else None
    if upper is not None:
        up_info = graph.layers[l + 1]
        cand = candidate_parents(upper.pos, upper.log_score, top_m=cfg.top_m, min_var_rate=cfg.min_var_rate,
                                 edge_cut_rate=cfg.edge_cut_rate, side=side if cfg.faithful else up_info.side,
                                 faithful=cfg.faithful)  # fmt: skip
        if len(cand) == 0:
            raise GraphError(f"layers: no node of {up_info.name!r} qualifies as a parent (too few images or nodes)")
        stride_up, stride = torch.tensor(up_info.stride, dtype=torch.float32), torch.tensor(info.stride, dtype=torch.float32)
        cand_pix = (upper.pos[:, cand] - upper.mean_pos[cand]) * stride_up  # (N, M, 2) centred pixels
        # x2p_ applied to centred positions keeps the constant centre - stride of each layer (SPEC §2c.2)
        kappa = ((torch.tensor(info.offset) - stride) - (torch.tensor(up_info.offset) - stride_up)) if cfg.faithful else 0.0

    rss0 = _peak_rss_mb(reset=True)
    t_layer = time.perf_counter()
    for it in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        with_parents = upper is not None and it > 1
        if with_parents:
            child_pix = (pos - pos.mean(0)) * stride + kappa
            local, strength = select_parents(child_pix, log_peak, cand_pix, top_n=cfg.top_n, chunk_elements=cfg.chunk_elements)
            parents = cand[local]
        t1 = time.perf_counter()
        grad, mass = torch.zeros(c, p, 2, dtype=torch.float64), torch.zeros(c, p, dtype=torch.float64)
        batches = features.batches(cfg.chunk_images)
        for a, b in progress(batches, enabled=progress_bar, total=len(batches), desc=f"graph {info.name} {it}/{cfg.iterations}"):
            up_pos = upper.pos[a:b] if with_parents else None
            e, cd = infer_layer(graph, l, features.read(l, a, b, sigma_neg=cfg.sigma_neg), mu, sigma, parents, up_pos, compete=True)
            pos[a:b], log_score[a:b] = e.pos.reshape(b - a, v, 2), e.log_score.reshape(b - a, v)
            log_peak[a:b], spread[a:b] = e.log_peak.reshape(b - a, v), e.spread.reshape(b - a, v)
            grad += e.grad.sum(0).double()
            mass += e.mass.sum(0).double()
        unit = first_spacing if cfg.faithful else spacing(sigma)
        new_mu, sigma = m_step(mu, grad, mass, log_score.reshape(n_img, c, p), spread.reshape(n_img, c, p), cd_min=float(cd.min()),
                               iteration=it, eta=cfg.eta, spacing=unit, sigma_range=(lo, hi), faithful=cfg.faithful)  # fmt: skip
        move, mu = new_mu - mu, new_mu
        entry = {"layer": info.name, "iteration": it, "candidate_parents": len(cand) if upper is not None else 0, "parents_s": t1 - t0, "estep_s": time.perf_counter() - t1,
                 "seconds": time.perf_counter() - t0, "mean_log_score": float(log_score.mean()),
                 "mean_move": float(move.norm(dim=-1).mean()), "mean_sigma": float(sigma.mean()), "peak_rss_mb": _peak_rss_mb(),
                 "peak_above_mb": None if rss0 is None else (_peak_rss_mb() or rss0) - rss0}  # fmt: skip
        graph.history.append(entry)
        log.info("graph %s iteration %d/%d: %.1f s, mean log S %.3f, mean move %.4f", info.name, it,
                 cfg.iterations, entry["seconds"], entry["mean_log_score"], entry["mean_move"])  # fmt: skip
    log.info("graph %s: %.1f s, peak RSS %s MiB (from %s)", info.name, time.perf_counter() - t_layer, _peak_rss_mb(), rss0)
    return LayerNodes(mu=mu, sigma=sigma, parents=parents, strength=strength, mean_pos=pos.mean(0),
                      pos=pos, log_score=log_score)  # fmt: skip
