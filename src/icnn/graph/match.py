"""Matching images to a learned explanatory graph: every node's inferred position and score.

The authors' code has no such function (SPEC-trees-graph §2a "Inference on a new image"). We run
the E-step (without the competition, which only feeds the M-step) top-down with the graph frozen:
a node's prior centre is ``mu_V`` shifted by its parents' deviations from their **training** mean
positions, its prior sigma and ``lambda`` come from the parents as in learning
(``parents.parent_prior``). Deterministic: no randomness anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from icnn.training.loop import progress

from .config import GraphError
from .estep import EStep, e_step, half_ranges
from .features import FeatureStore
from .parents import parent_prior


class Match(NamedTuple):
    """Inferred positions and scores of a layer's units (nodes, or raw filters) on N images."""

    pos: torch.Tensor  # (N, V, 2) (row, col) in map units; LayerInfo.pixels gives image points
    log_score: torch.Tensor  # (N, V) log S_V(I) (raw filters: log of the map's maximum)


def infer_layer(graph, l: int, R: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, parents: torch.Tensor,
                upper_pos: torch.Tensor | None, *, compete: bool) -> tuple[EStep, torch.Tensor]:  # fmt: skip
    """The E-step of layer ``l`` of ``graph`` on maps ``R (B, C, H, W)`` with node parameters
    ``mu (C, P, 2)``, ``sigma (C, P)``, ``parents (V, k)``; ``upper_pos (B, U, 2)`` = the inferred
    positions of the layer above (None, or ``k = 0``: no parents, prior sigma ``init_delta H`` in
    the code, the node's own sigma when fixed, SPEC §2c.3). Returns the E-step and ``cd (C, P)``."""
    cfg, info = graph.config, graph.layers[l]
    b, (c, p) = R.shape[0], mu.shape[:2]
    shift = log_lam = None
    if upper_pos is not None and parents.shape[1] > 0:
        up = graph.nodes[l + 1]
        # upper map units per child unit; the code mixes them (SPEC §2c.2)
        scale = 1.0 if cfg.faithful else graph.layers[l + 1].stride[0] / info.stride[0]
        shift, cd, log_lam = parent_prior(parents, upper_pos - up.mean_pos, up.sigma.reshape(-1), scale=scale,
                                          faithful=cfg.faithful)  # fmt: skip
        shift, cd, log_lam = shift.reshape(b, c, p, 2), cd.reshape(c, p), log_lam.reshape(b, c, p)
    else:
        cd = torch.full_like(sigma, cfg.init_delta * info.side) if cfg.faithful else sigma
    half = half_ranges(sigma, info.side, cfg.max_range, cfg.deform_ratio)
    e = e_step(R, mu, half, cd, n=min(cfg.candidates, info.side), sigma_map=cfg.map_delta * info.side,
               faithful=cfg.faithful, tau=cfg.tau, shift=shift, log_lam=log_lam, compete=compete)  # fmt: skip
    return e, cd


def check_features(graph, features: FeatureStore) -> None:
    """The features must come from the graph's layers (same names and shapes)."""
    got = [(L.name, L.channels, L.size) for L in features.layers]
    want = [(L.name, L.channels, L.size) for L in graph.layers]
    if got != want:
        raise GraphError(f"features: layers {got} do not match the graph's {want}")


@torch.no_grad()
def match(graph, features: FeatureStore, *, progress_bar: bool = True) -> list[Match]:
    """Every node's position and score on every image of ``features``, per layer bottom to top.

    ``chunk_images`` images at a time, layer by layer top-down: memory is that chunk's working set
    plus the outputs.
    """
    if not graph.complete:
        raise GraphError("graph: not every layer is learned yet (rerun learn_graph to finish it)")
    check_features(graph, features)
    n = features.num_images
    pos = [torch.empty(n, nodes.num_nodes, 2) for nodes in graph.nodes]
    score = [torch.empty(n, nodes.num_nodes) for nodes in graph.nodes]
    batches = features.batches(graph.config.chunk_images)
    for a, b in progress(batches, enabled=progress_bar, total=len(batches), desc="graph: match"):
        upper = None
        for l in reversed(range(len(graph.layers))):
            nodes = graph.nodes[l]
            e, _ = infer_layer(graph, l, features.read(l, a, b, sigma_neg=graph.config.sigma_neg), nodes.mu, nodes.sigma, nodes.parents, upper, compete=False)
            upper = e.pos.reshape(b - a, -1, 2)
            pos[l][a:b], score[l][a:b] = upper, e.log_score.reshape(b - a, -1)
    return [Match(p, s) for p, s in zip(pos, score)]
