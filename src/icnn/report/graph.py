"""Figures of an explanatory graph (``icnn.graph``): where its top nodes fire (the paper's image
patches, the authors' ``showPatch.m``) and a drawing of its strongest edges.

Pure functions: tensors in, arrays / PNG bytes / report sections out, no file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle

from .figures import _RC, _image, _new_figure, _png
from .html import Figure, ReportError, Section, Table

_LAYER_COLOURS = ("#2f6db5", "#d9822b", "#3a9a5b", "#b5475a", "#7a5cb5", "#8c96a3")


def node_patches(images: Sequence[Sequence], points: torch.Tensor, *, patch: int, tile: int = 48, gap: int = 2) -> np.ndarray:
    """A grid of image patches: row ``r`` holds the patches of side ``patch`` px centred on
    ``points[r, c]`` (``(x, y)`` on ``images[r][c]``, each ``(3, H, W)`` in [0, 1]), zero-padded
    where they leave the image, resized to ``tile`` px. Returns ``(H, W, 3)`` floats in [0, 1]."""
    rows, cols = len(images), max((len(r) for r in images), default=0)
    if rows == 0 or cols == 0 or tuple(points.shape[:2]) != (rows, cols):
        raise ReportError(f"node_patches: points must be (rows, cols, 2) for {rows} x {cols} images, got {tuple(points.shape)}")
    grid = np.ones((rows * (tile + gap) - gap, cols * (tile + gap) - gap, 3))
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            img = torch.as_tensor(img, dtype=torch.float32)
            x0, y0 = (math.ceil(float(v) - patch / 2 - 0.5) for v in points[r, c])  # pixels whose centre lies in [p - s/2, p + s/2)
            padded = F.pad(img, (patch, patch, patch, patch))
            crop = padded[:, y0 + patch : y0 + 2 * patch, x0 + patch : x0 + 2 * patch]
            crop = F.interpolate(crop[None], size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)[0]
            grid[r * (tile + gap) : r * (tile + gap) + tile, c * (tile + gap) : c * (tile + gap) + tile] = _image(crop)
    return grid


def patches_figure(grid: np.ndarray, labels: Sequence[str], *, title: str = "") -> bytes:
    """``node_patches``' grid as a PNG with one label per row."""
    h, w = grid.shape[:2]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(1.6 + w / 60, 0.4 + h / 60)
        ax = fig.add_subplot()
        ax.imshow(grid, interpolation="nearest")
        step = h / max(1, len(labels))
        ax.set_yticks([step * (i + 0.5) for i in range(len(labels))], labels, fontsize=8)
        ax.set_xticks([])
        if title:
            ax.set_title(title)
        return _png(fig)


def edge_figure(names: Sequence[str], sizes: Sequence[tuple[int, int]], mean_pos: Sequence[torch.Tensor],
                shown: Sequence[torch.Tensor], parents: Sequence[torch.Tensor], strength: Sequence[torch.Tensor],
                *, edges: int = 3, title: str = "") -> bytes:  # fmt: skip
    """The graph's strongest edges: one band per layer (bottom layer at the bottom), each node drawn
    at its mean position on its map; for every shown node its ``edges`` strongest parents, the
    line's weight and opacity by the edge strength.

    Args (one entry per layer, bottom to top):
        names, sizes: layer names and map sizes ``(H, W)``.
        mean_pos: ``(V, 2)`` mean (row, col) of every node.
        shown: indices of the nodes to draw.
        parents, strength: ``(V, k)`` parent indices in the layer above and edge strengths.
    """
    def xy(l, v):
        (h, w), p = sizes[l], mean_pos[l][v]
        return (p[..., 1] + 0.5) / w, l + 0.85 * (1 - (p[..., 0] + 0.5) / h)

    with matplotlib.rc_context(_RC):
        fig = _new_figure(6.5, 1.6 * len(names) + 0.4)
        ax = fig.add_subplot()
        for l in range(len(names)):
            colour = _LAYER_COLOURS[l % len(_LAYER_COLOURS)]
            ax.add_patch(Rectangle((0, l), 1, 0.85, fill=False, ec="#cccccc", lw=0.8))
            ax.text(-0.02, l + 0.42, names[l], ha="right", va="center", fontsize=8, color=colour)
            if l + 1 < len(names) and parents[l].shape[1]:
                for v in shown[l].tolist():
                    x0, y0 = xy(l, v)
                    for u, s in zip(parents[l][v, :edges].tolist(), strength[l][v, :edges].tolist()):
                        x1, y1 = xy(l + 1, u)
                        ax.plot([float(x0), float(x1)], [float(y0), float(y1)], color=colour, lw=0.4 + 2 * s, alpha=0.25 + 0.6 * s)
                        ax.scatter([float(x1)], [float(y1)], s=6, color="#999999", zorder=2)  # the parent
            x, y = xy(l, shown[l])
            ax.scatter(x.numpy(), y.numpy(), s=14, color=colour, zorder=3)
        ax.set_xlim(-0.35, 1.02)
        ax.set_ylim(-0.1, len(names))
        ax.set_axis_off()
        if title:
            ax.set_title(title)
        return _png(fig)


def graph_section(graph, features, dataset, metrics: dict | None = None, *, nodes: int = 6, patches: int = 5,
                  edges: int = 3) -> Section:  # fmt: skip
    """A report section for a learned graph: the metrics tables (``icnn.graph.evaluate_graph``'s
    dict), per layer the image patches of its top ``nodes`` nodes on their top ``patches`` training
    images (``dataset[features.indices[i]]["image"]``), and the strongest edges of those nodes."""
    from icnn.graph import top_units

    figures, shown = [], []
    for info, layer in zip(graph.layers, graph.nodes):
        top = top_units(layer.log_score, nodes, 20)
        shown.append(top)
        best = layer.log_score[:, top].topk(min(patches, graph.num_images), dim=0).indices.T  # (nodes, patches)
        images = [[dataset[int(features.indices[i])]["image"] for i in row] for row in best.tolist()]
        points = info.pixels(layer.pos[best, top[:, None]])  # (nodes, patches, 2)
        side = int(min(features.image_hw[0] / 2, max(16, 6 * info.stride[0])))
        grid = node_patches(images, points, patch=side)
        labels = [f"node {int(v)} (filter {int(v) // layer.mu.shape[1]})" for v in top]
        figures.append(Figure(patches_figure(grid, labels), f"{info.name}: top nodes, {side} px patches on their top images"))
    figures.append(Figure(edge_figure([L.name for L in graph.layers], [L.size for L in graph.layers],
                                      [n.mean_pos for n in graph.nodes], shown, [n.parents for n in graph.nodes],
                                      [n.strength for n in graph.nodes], edges=edges),
                          f"strongest edges ({edges} per shown node) of the top nodes", wide=True))  # fmt: skip
    tables = []
    if metrics:
        li, pl = metrics["location_instability"], metrics["part_localisation"]
        keys = ("nodes", "raw_filters", "random_unit", "best_fixed_unit", "best_landmark_unit")
        rows = [[r["layer"]] + [r.get(k, float("nan")) for k in keys] for r in li["layers"]]
        rows.append(["mean"] + [li.get(k, float("nan")) for k in keys])
        tables.append(Table(["layer", "graph nodes", "raw filters", "random unit", "best fixed unit", "best landmark unit"], rows,
                            f"location instability (top {li['top_units']} units per layer, top {li['top_images']} images; "
                            f"nodes / raw = {li['ratio']:.3f})"))  # fmt: skip
        tables.append(Table(["landmark", "graph nodes", "raw filters", "mean of the shots"],
                            [[r["landmark"], r["nodes"], r["raw_filters"], r["mean_shot"]] for r in pl["landmarks"]],
                            f"part localisation error from {pl['shots']} annotated images ({pl['votes']} voting units)"))  # fmt: skip
    return Section("Explanatory graph", tables=tables, figures=figures)
