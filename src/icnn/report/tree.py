"""The decision tree's part of the report (Zhang et al., CVPR 2019, Fig. 1 and 4; ``icnn.tree``).

Pure functions, as ``figures``: the tree drawn down to a layer (each node with its image count
and top filters), one image's explanation (the image, its parse path, its top filters' regions,
its part contributions) and the per-layer metric table, as PNG bytes and report sections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from scipy import ndimage

from .figures import (
    _RC,
    _RUN_COLOURS,
    _array,
    _image,
    _new_figure,
    _overlay,
    _plain,
    _png,
)
from .html import Figure, ReportError, Section, Table

METRICS = ("nodes", "accuracy", "prediction_error", "fitness", "part_error")


def _layout(parent: np.ndarray, root: int, layers: int) -> tuple[dict[int, tuple[float, int]], list[tuple[int, int]]]:
    """``{node: (x, layer)}`` of the nodes down to ``layers`` and the edges between them; a
    node's ``x`` is the middle of its leaves' range in depth-first order, so subtrees do not
    cross."""
    children: dict[int, list[int]] = {}
    for v, p in enumerate(parent.tolist()):
        if p >= 0:
            children.setdefault(p, []).append(v)
    pos: dict[int, tuple[float, int]] = {}
    edges: list[tuple[int, int]] = []
    slot = 0.0

    def place(v: int, layer: int) -> float:
        nonlocal slot
        kids = children.get(v, []) if layer < layers else []
        if not kids:
            x, slot = slot, slot + 1
        else:
            xs = [place(c, layer + 1) for c in kids]
            edges.extend((v, c) for c in kids)
            x = (xs[0] + xs[-1]) / 2
        pos[v] = (x, layer)
        return x

    place(root, 1)
    return pos, edges


def tree_figure(tree, *, layers: int = 3, top_filters: int = 3, title: str = "") -> bytes:
    """The tree from the root down to layer ``layers``: every node with the number of training
    images below it and its ``top_filters`` largest weights ``w_v`` (filter indices); a node
    at the last shown layer stands for its subtree."""
    if layers < 2:
        raise ReportError(f"tree_figure: layers must be >= 2 (layer 1 is the root alone), got {layers}")
    parent = tree.parent.cpu().numpy()
    count = tree.count().cpu().numpy()
    weight = tree.weight.detach().cpu().numpy()
    pos, edges = _layout(parent, tree.root, layers)
    width = max(pos[v][0] for v in pos) + 1
    depth = max(layer for _, layer in pos.values())
    with matplotlib.rc_context(_RC):
        fig = _new_figure(min(18.0, 1.2 + 1.1 * width), 1.0 + 1.15 * depth, constrained=False)
        ax = fig.add_axes((0.01, 0.01, 0.98, 0.9 if title else 0.97))
        for u, v in edges:
            ax.plot([pos[u][0], pos[v][0]], [-pos[u][1], -pos[v][1]], color="#9aa3ad", lw=0.8, zorder=1)
        for v, (x, layer) in pos.items():
            if v == tree.root:
                label = f"root\nn={count[v]}"
            else:
                top = np.argsort(-weight[v], kind="stable")[:top_filters]
                label = f"n={count[v]}\n" + " ".join(f"f{int(f)}" for f in top if weight[v, f] > 0)
            ax.text(x, -layer, label, ha="center", va="center", fontsize=7, zorder=2,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": _RUN_COLOURS[1], "lw": 0.8})  # fmt: skip
        ax.set_xlim(-0.7, width - 0.3)
        ax.set_ylim(-depth - 0.6, -0.4)
        ax.set_axis_off()
        return _png(fig, title)


def explanation_figure(
    image: Any,
    maps: Any,
    filters: Sequence[int],
    contributions: Sequence[float],
    *,
    part_names: Sequence[str] | None = None,
    part_values: Any = None,
    path: Sequence[int] | None = None,
    title: str = "",
) -> bytes:
    """One image explained by the tree, left to right: the image (with its parse path), each
    top filter's map upsampled on it with its contribution ``rho_d = w_d x_d``, and the part
    contributions ``A rho`` as bars (when ``part_values`` is given).

    Args:
        image: ``(3, H, W)`` or ``(H, W, 3)`` in [0, 1].
        maps: ``(k, h, w)`` the top filters' maps (any size; shown relative to each map's max).
        filters: the ``k`` filter indices; ``contributions``: their ``rho_d``.
        part_names, part_values: ``(M,)`` part contributions and their names.
        path: the parse path's node indices (root first), shown under the image.
    """
    img = _image(image)
    m = _array(maps, "maps")
    if m.ndim != 3 or len(m) != len(filters) or len(contributions) != len(filters):
        raise ReportError(f"explanation_figure: maps {tuple(m.shape)}, {len(filters)} filters and "
                          f"{len(contributions)} contributions: give one (h, w) map and value per filter")  # fmt: skip
    bars = part_values is not None
    if bars:
        values = _array(part_values, "part_values").ravel()
        names = [str(p) for p in (part_names or range(len(values)))]
        if len(names) != len(values):
            raise ReportError(f"explanation_figure: {len(names)} part names for {len(values)} part values")
    panels = 1 + len(filters) + bars
    with matplotlib.rc_context(_RC):
        fig = _new_figure(2.3 * panels + 0.8 * bars, 2.9)
        axes = np.atleast_1d(fig.subplots(1, panels))
        axes[0].imshow(img, interpolation="bilinear")
        _plain(axes[0])
        axes[0].set_title("image")
        if path is not None:
            axes[0].set_xlabel("path " + " > ".join(str(int(v)) for v in path), fontsize=7)
        hw = img.shape[:2]
        for ax, f, rho, a in zip(axes[1:], filters, contributions, m):
            heat = ndimage.zoom(np.nan_to_num(a).clip(0, None), (hw[0] / a.shape[0], hw[1] / a.shape[1]), order=1)
            heat = heat / heat.max() if heat.max() > 0 else heat
            _overlay(ax, img, heat, False)
            ax.set_title(f"filter {int(f)}: {float(rho):.3g}")
        if bars:
            ax = axes[-1]
            colours = [_RUN_COLOURS[1] if v >= 0 else _RUN_COLOURS[4] for v in values]
            ax.bar(range(len(values)), values, color=colours)
            ax.axhline(0, color="#333333", lw=0.8)
            ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
            ax.set_title("part contributions")
            ax.spines[["top", "right"]].set_visible(False)
        return _png(fig, title)


def metrics_table(metrics: Mapping[str, Mapping[str, Any]], caption: str = "") -> Table:
    """``evaluate_tree``'s dict as a table: one row per layer (``cnn`` first), one column per
    metric present."""
    if not metrics:
        raise ReportError("metrics_table: metrics is empty")
    columns = [k for k in METRICS if any(k in row for row in metrics.values())]
    rows = [[f"layer {name}" if name.isdigit() else name, *(row.get(k) for k in columns)] for name, row in metrics.items()]
    return Table(["layer", *(c.replace("_", " ") for c in columns)], rows, caption)


def tree_sections(
    tree, metrics: Mapping[str, Mapping[str, Any]], explanations: Sequence[tuple[bytes, str]] = (), *, layers: int = 3,
    name: str = "decision tree",
) -> list[Section]:  # fmt: skip
    """The report's sections: the metric table and the drawn tree, then the per-image
    explanations (``(png, caption)`` pairs, e.g. from :func:`explanation_figure`)."""
    text = (f"{tree.num_leaves} training images, {tree.num_merges} merges, {len(tree.children(tree.root))} "
            "second-layer decision modes. Each row explains the images by their node at that layer of the "
            "parse path (leaves: the end of the path); accuracy over all images, the other metrics over the "
            "positives (prediction error relative to the score range, fitness the Jaccard of the filter "
            "contributions, part error relative to the mean score).")  # fmt: skip
    first = Section(f"{name}: layers", tables=[metrics_table(metrics, caption=f"{name}: metrics per layer")], text=text,
                    figures=[Figure(tree_figure(tree, layers=layers), f"{name} down to layer {layers}: images per node "
                                    "and each node's largest filter weights", wide=True)])  # fmt: skip
    sections = [first]
    if explanations:
        sections.append(Section(f"{name}: explanations", figures=[Figure(png, caption, wide=True) for png, caption in explanations]))
    return sections
