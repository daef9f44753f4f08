"""The explanatory graph's tensors and their files (no pickle: safetensors + JSON).

One directory::

    graph.json                 config, layers (LayerInfo), which layers are learned, history
    layer_<l>.safetensors      nodes of layer l (bottom = 0): mu, sigma, parents, strength,
                               mean_pos, and the training records pos, log_score

Node ``v = c * P + p`` is node ``p`` of filter ``c``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GraphConfig, GraphError
from .features import LayerInfo

FORMAT = 1


@dataclass
class LayerNodes:
    """The learned nodes of one layer (C filters, P nodes per filter, V = C P, N training images)."""

    mu: torch.Tensor  # (C, P, 2) mean position (row, col), map units
    sigma: torch.Tensor  # (C, P) deformation sigma, map units
    parents: torch.Tensor  # (V, k) node indices in the layer above (k = 0 for the top layer)
    strength: torch.Tensor  # (V, k) edge strengths in [0, 1] (parents.select_parents)
    mean_pos: torch.Tensor  # (V, 2) mean inferred position over the training images
    pos: torch.Tensor  # (N, V, 2) inferred positions on the training images (the code's pos_record)
    log_score: torch.Tensor  # (N, V) log S_V(I) on the training images (prob_record up to a constant)

    @property
    def num_nodes(self) -> int:
        return self.mu.shape[0] * self.mu.shape[1]


@dataclass
class ExplanatoryGraph:
    """Layers bottom to top; ``nodes[l]`` is None until layer ``l`` is learned (top-down)."""

    config: GraphConfig
    layers: list[LayerInfo]
    nodes: list[LayerNodes | None]
    num_images: int
    history: list[dict] = field(default_factory=list)  # one entry per iteration (learn.py)

    @property
    def complete(self) -> bool:
        return all(n is not None for n in self.nodes)

    def save(self, root: str | Path) -> None:
        """Write every learned layer and ``graph.json`` (atomically: a crash leaves the last save)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for l, nodes in enumerate(self.nodes):
            path = root / f"layer_{l}.safetensors"
            if nodes is not None and not path.exists():
                tmp = path.with_suffix(".tmp")
                save_file({f.name: getattr(nodes, f.name).contiguous() for f in fields(nodes)}, tmp)
                os.replace(tmp, path)
        meta = {"format": FORMAT, "config": self.config.to_dict(), "layers": [asdict(L) for L in self.layers],
                "learned": [n is not None for n in self.nodes], "num_images": self.num_images, "history": self.history}  # fmt: skip
        tmp = root / "graph.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / "graph.json")

    @classmethod
    def load(cls, root: str | Path) -> ExplanatoryGraph:
        root = Path(root)
        path = root / "graph.json"
        if not path.exists():
            raise GraphError(f"graph: {root} holds no graph.json")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise GraphError(f"graph: {path} has format {meta.get('format')!r}, this icnn reads {FORMAT}")
        layers = [LayerInfo.from_dict(d) for d in meta["layers"]]
        nodes = [LayerNodes(**load_file(root / f"layer_{l}.safetensors")) if done else None
                 for l, done in enumerate(meta["learned"])]  # fmt: skip
        return cls(GraphConfig.from_dict(meta["config"]), layers, nodes, meta["num_images"], meta["history"])
