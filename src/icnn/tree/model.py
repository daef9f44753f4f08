"""The learned decision tree as node arrays (Zhang, Yang, Ma, Wu, CVPR 2019, §3; SPEC Method 1).

Every node ``v`` is a decision mode, a linear model of the rationale ``h_v(x) = w_v . x + b_v``
with ``w_v = alpha_v * g_v``: ``g_v`` (unit norm) the mode's common rationale, ``alpha_v`` the
filters it uses. Nodes are stored bottom-up, so a parent always has a larger index than its
children::

    0 .. n-1          leaves, one per positive training image i (w = g_i, alpha = 1, b = b_i)
    n .. n+M-1        the M merged nodes, in merge order
    n+M               the root (no model of its own: its children are the second-layer nodes)

Layers are counted from the root as in the paper: the root is layer 1, its children (the most
generic decision modes) layer 2, and so on down to the leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..training.config import ConfigError


class TreeError(ConfigError):
    """A wrong argument to the decision tree (features, config, paths); one line naming it."""


@dataclass
class DecisionTree:
    """Node arrays of a decision tree over ``D`` filters (module docstring for the layout)."""

    direction: torch.Tensor  # (N, D) g_v, unit norm (zeros at the root)
    alpha: torch.Tensor  # (N, D) filter selection: {0, 1} ("binary") or the LASSO weights ("relaxed")
    bias: torch.Tensor  # (N,) b_v
    parent: torch.Tensor  # (N,) int64, -1 at the root
    gain: torch.Tensor  # (N,) exact Delta log E of the merge that made the node (0: leaves, root)
    gamma: float  # the likelihood's gamma the tree was grown with
    config: dict = field(default_factory=dict)  # the TreeConfig, as a dict

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def num_leaves(self) -> int:
        """``n``: one leaf per training image; the leaves are nodes ``0 .. n-1``."""
        return self.num_nodes - len(self.parent[self.parent >= 0].unique())

    @property
    def num_merges(self) -> int:
        return self.num_nodes - self.num_leaves - 1

    @property
    def root(self) -> int:
        return self.num_nodes - 1

    @property
    def weight(self) -> torch.Tensor:
        """``w_v = alpha_v * g_v`` ``(N, D)``."""
        return self.alpha * self.direction

    def children(self, node: int) -> torch.Tensor:
        """Indices of ``node``'s children, ascending."""
        return torch.nonzero(self.parent == node).flatten()

    def _upward(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(B, L)``: column ``j`` the node ``j`` steps above ``nodes (B,)`` (the root stays)."""
        up = [torch.as_tensor(nodes, dtype=torch.long)]
        while (up[-1] != self.root).any():
            up.append(torch.where(up[-1] == self.root, up[-1], self.parent[up[-1]]))
        return torch.stack(up, 1)

    def count(self) -> torch.Tensor:
        """Training images under every node ``(N,)`` (1 at a leaf, n at the root)."""
        up = self._upward(torch.arange(self.num_leaves))  # (n, L)
        first = torch.ones_like(up, dtype=torch.bool)
        first[:, 1:] = up[:, 1:] != up[:, :-1]  # each node once per leaf (the root repeats)
        return torch.bincount(up[first], minlength=self.num_nodes)

    def depth(self) -> torch.Tensor:
        """Layer of every node ``(N,)``: 1 at the root, 2 for its children, ..."""
        return (self._upward(torch.arange(self.num_nodes)) != self.root).sum(1) + 1

    def ancestors(self, nodes: torch.Tensor) -> torch.Tensor:
        """The path from the root down to each of ``nodes (B,)``: ``(B, L)`` node indices,
        column ``k`` the node at layer ``k + 1``; a short path is padded by repeating its end."""
        up = self._upward(nodes)  # (B, L)
        layers = (up != self.root).sum(1) + 1  # (B,)
        steps = (layers[:, None] - 1 - torch.arange(up.shape[1])[None]).clamp_min(0)
        return up.gather(1, steps)

    def predict(self, nodes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h_v(x) = w_v . x + b_v`` for each image's node: ``nodes (B,)``, ``x (B, D)`` -> ``(B,)``."""
        return (self.weight[nodes] * x).sum(1) + self.bias[nodes]
