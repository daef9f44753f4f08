"""Explaining an image by the tree (Zhang et al., CVPR 2019, §4; SPEC Method 1, Step 7).

The parse path: from the root, go at each step to the child ``v`` of the current node with the
largest ``cos(g, w_v)``, down to a leaf (the survey, §4.2: "the child nodes with the maximum
computation result becomes part of the parse tree"). [GD] instead takes the best node among
*all* nodes of a layer, which need not lie on one path; [VR] stops at the second layer. The node
at layer ``k`` explains the image by the decision mode ``h_v(x) = w_v . x + b_v``, with

    filter contributions  rho = w_v * x             (D,)
    part contributions    rho_hat = A rho           (M + 1,)   A: filter -> part, one-hot

``A`` groups the filters by the part they localise (``icnn.attribution.assign_filter_parts``,
the landmark nearest to each filter's argmax unit, majority vote over the annotated images);
its last column collects the filters without a part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .extract import Features
from .model import DecisionTree, TreeError

if TYPE_CHECKING:
    from icnn.attribution.contributions import FilterParts


def children_table(tree: DecisionTree) -> torch.Tensor:
    """``(N, c)`` the children of every node, ascending, padded with ``-1``."""
    parent = tree.parent
    order = torch.argsort(parent, stable=True)
    order = order[parent[order] >= 0]  # nodes by parent, the root left out
    counts = torch.bincount(parent[order], minlength=tree.num_nodes)
    first = torch.cumsum(counts, 0) - counts  # (N,) where each parent's group starts
    rank = torch.arange(len(order)) - first[parent[order]]
    table = torch.full((tree.num_nodes, max(int(counts.max()), 1)), -1, dtype=torch.long)
    table[parent[order], rank] = order
    return table


def parse(tree: DecisionTree, g: torch.Tensor) -> torch.Tensor:
    """Parse paths of rationales ``g (B, D)``: ``(B, L)`` node indices, column ``k`` the node at
    layer ``k + 1`` (column 0 the root), a path shorter than ``L`` padded by repeating its leaf.
    Ties go to the child with the lower index."""
    g = torch.as_tensor(g).to(tree.weight)
    if g.ndim != 2 or g.shape[1] != tree.weight.shape[1]:
        raise TreeError(f"g: expected rationales (B, {tree.weight.shape[1]}), got shape {tuple(g.shape)}")
    tiny = torch.finfo(g.dtype).tiny
    w = tree.weight
    cos = (g / g.norm(dim=1, keepdim=True).clamp_min(tiny)) @ (w / w.norm(dim=1, keepdim=True).clamp_min(tiny)).t()  # (B, N)
    kids = children_table(tree)
    cur = torch.full((len(g),), tree.root, dtype=torch.long)
    path = [cur]
    while True:
        cand = kids[cur]  # (B, c)
        has = cand[:, 0] >= 0
        if not has.any():
            break
        score = torch.where(cand >= 0, cos.gather(1, cand.clamp_min(0)), -torch.inf)
        cur = torch.where(has, cand.gather(1, score.argmax(1, keepdim=True))[:, 0], cur)
        path.append(cur)
    return torch.stack(path, 1)


def part_matrix(parts: FilterParts, num_filters: int) -> torch.Tensor:
    """``A'`` ``(D, M + 1)`` one-hot: filter ``d``'s part, the last column for no part."""
    part = torch.as_tensor(parts.part_of_filter, dtype=torch.long).cpu()
    if part.shape != (num_filters,):
        raise TreeError(f"parts: {tuple(part.shape)} filter assignments for a tree over {num_filters} filters")
    m = len(parts.part_names)
    return torch.nn.functional.one_hot(torch.where(part < 0, m, part), m + 1).double()


@dataclass
class Explanation:
    """How the tree explains each image at one layer (module docstring)."""

    path: torch.Tensor  # (B, L) the parse path (column k: layer k + 1)
    node: torch.Tensor  # (B,) the node at the chosen layer
    prediction: torch.Tensor  # (B,) h_v(x)
    filters: torch.Tensor  # (B, D) rho = w_v * x
    parts: torch.Tensor | None = None  # (B, M + 1) A rho; last column: filters without a part
    part_names: list[str] | None = None  # the M part names then "none"


def paths(tree: DecisionTree, features: Features, own: bool = False) -> torch.Tensor:
    """Parse paths of ``features`` (``own``: the positives are the tree's training images, in
    order, and follow their own leaf's ancestors; the others are parsed)."""
    path = parse(tree, features.g)
    if not own:
        return path
    pos = torch.nonzero(features.positive).flatten()
    if len(pos) != tree.num_leaves:
        raise TreeError(f"features: own paths need the tree's {tree.num_leaves} training images, got {len(pos)} positives")
    anc = tree.ancestors(torch.arange(tree.num_leaves))
    width = max(path.shape[1], anc.shape[1])
    pad = lambda p: torch.cat((p, p[:, -1:].expand(-1, width - p.shape[1])), 1)
    path = pad(path)
    path[pos] = pad(anc)
    return path


def explain(
    tree: DecisionTree,
    features: Features,
    *,
    layer: int | None = None,
    parts: FilterParts | None = None,
    own: bool = False,
) -> Explanation:
    """Explain every image of ``features`` by its node at ``layer`` (2: the most generic decision
    modes; ``None`` or deeper than the path: its leaf). ``parts`` (from
    ``assign_filter_parts``) adds the part contributions; ``own`` as in :func:`paths`."""
    if layer is not None and (isinstance(layer, bool) or int(layer) < 2):
        raise TreeError(f"layer: expected an int >= 2 (layer 1 is the root, which has no model) or None, got {layer!r}")
    path = paths(tree, features, own)
    col = path.shape[1] - 1 if layer is None else min(int(layer) - 1, path.shape[1] - 1)
    node = path[:, col]
    filters = tree.weight[node] * features.x.to(tree.weight)
    prediction = filters.sum(1) + tree.bias[node]
    if parts is None:
        return Explanation(path, node, prediction, filters)
    return Explanation(path, node, prediction, filters, filters @ part_matrix(parts, filters.shape[1]),
                       [*parts.part_names, "none"])  # fmt: skip
