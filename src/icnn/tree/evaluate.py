"""The tree's per-layer metrics (Zhang et al., CVPR 2019, §5; SPEC Method 1, §1b).

For each layer ``k`` of the parse paths (2 = the second layer, ..., and the leaves), with
``v`` the image's node at that layer, ``h = h_v(x)``, ``rho_hat = w_v * x`` and the network's
own linearised contributions ``rho* = g * x`` (all in the units of the normalised ``y``):

- ``accuracy``: ``1[h > 0]`` against the label, over all images (a single-category net decides
  by the sign of its logit; ``y`` and ``h`` keep that sign). The ``cnn`` row gives ``1[y > 0]``.
- ``prediction_error``: ``E |h - y| / (max y - min y)`` over the positives.
- ``fitness``: Jaccard of the filter contributions, ``sum_d min(|rho*_d|, rho+_d) / sum_d
  max(|rho*_d|, rho+_d)`` with ``rho+_d = max(rho_hat_d sign(rho*_d), 0)``, averaged over the
  positives (1 where both vanish).
- ``part_error`` (with ``parts`` and ``features.part_drop``): ``E_{I, p} |(A rho_hat)_p - drop_p|
  / E_I |y|`` over the positives and the ``M`` parts, ``drop_p`` the score lost when part ``p``'s
  filters are switched off (the ground truth of "de-activating one object part per time"). The
  ``cnn`` row gives the same for the linearised ``A rho*``. ([GD]'s evaluation keeps *only*
  part ``p``'s filters instead; the paper, as [GD-R] reports it, switches part ``p`` off.)
  ``E |y|`` stands for the paper's ``E[y]``: they agree when the positives score positive.

The ``prediction_error`` range (the ``part_error`` scale) is 1 when all ``y`` are equal (zero),
so the metrics stay finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .explain import part_matrix, paths
from .extract import Features
from .model import DecisionTree, TreeError

if TYPE_CHECKING:
    from icnn.attribution.contributions import FilterParts


def jaccard(rho_true: torch.Tensor, rho_tree: torch.Tensor) -> torch.Tensor:
    """Fitness of filter contributions per image ``(B,)`` from ``(B, D)`` each (module docstring)."""
    plus = (rho_tree * torch.sign(rho_true)).clamp_min(0)
    num = torch.minimum(rho_true.abs(), plus).sum(1)
    den = torch.maximum(rho_true.abs(), plus).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 1.0)


def evaluate_tree(
    tree: DecisionTree, features: Features, *, parts: FilterParts | None = None, own: bool = False
) -> dict[str, dict[str, float]]:
    """Metrics of every layer: ``{"cnn": {...}, "2": {...}, ..., "leaves": {...}}`` (module
    docstring), JSON-ready. ``own``: the positives are the tree's training images (in order)
    and follow their own leaf's ancestors, where the leaves reproduce ``y`` exactly."""
    if len(features) == 0:
        raise TreeError("features: no images to evaluate")
    pos = features.positive
    if not pos.any():
        raise TreeError("features: no positive images (the tree explains the target category)")
    if parts is not None and features.part_drop is None:
        raise TreeError("features: no part ablations for part_error; extract them with parts=")
    x, g, y = (t.to(tree.weight) for t in (features.x, features.g, features.y))
    path = paths(tree, features, own)
    span = float(y[pos].max() - y[pos].min())
    span = span if span > 0 else 1.0
    rho_true = g * x
    a = None
    if parts is not None:
        a = part_matrix(parts, x.shape[1])[:, : len(parts.part_names)]  # (D, M)
        drop = features.part_drop.to(x)[pos]
        if drop.shape[1] != a.shape[1]:
            raise TreeError(f"parts: {a.shape[1]} parts, but features.part_drop has {drop.shape[1]} columns")
        scale = float(y[pos].abs().mean()) or 1.0
    out = {"cnn": {"accuracy": float(((y > 0) == pos).double().mean())}}
    if a is not None:
        out["cnn"]["part_error"] = float((rho_true[pos] @ a - drop).abs().mean() / scale)
    layers = [(str(k + 1), k) for k in range(1, path.shape[1] - 1)] + [("leaves", path.shape[1] - 1)]
    for name, col in layers:
        node = path[:, col]
        rho = tree.weight[node] * x
        h = rho.sum(1) + tree.bias[node]
        row = {
            "nodes": int(node.unique().numel()),
            "accuracy": float(((h > 0) == pos).double().mean()),
            "prediction_error": float((h - y)[pos].abs().mean() / span),
            "fitness": float(jaccard(rho_true[pos], rho[pos]).mean()),
        }
        if a is not None:
            row["part_error"] = float((rho[pos] @ a - drop).abs().mean() / scale)
        out[name] = row
    return out
