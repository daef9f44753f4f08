"""The report's figures (paper Fig. 4, 5, 6 and metric comparisons) as PNG bytes.

Pure functions: arrays in, PNG bytes out, no file I/O and no global plotting state (each call
builds its own ``matplotlib.figure.Figure`` on an Agg canvas, never ``pyplot``). Inputs may be
numpy arrays or torch tensors; images are floats in ``[0, 1]`` as ``(3, H, W)`` (the library's
layout, tried first) or ``(H, W, 3)``; maps are ``(h, w)``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cm, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from scipy import ndimage

from .html import ReportError

_RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "figure.dpi": 100}
_REGION_RGB = np.array([1.0, 0.85, 0.1])  # tint of a region on an image (Fig. 5)
_RUN_COLOURS = ("#8c96a3", "#2f6db5", "#d9822b", "#3a9a5b", "#b5475a", "#7a5cb5")
_REF_STYLES = ("--", ":", "-.")


# ---------------------------------------------------------------- inputs


def _array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ReportError(f"{name}: expected an array of numbers ({exc})") from None


def _map(value: Any, name: str) -> np.ndarray:
    a = _array(value, name)
    if a.ndim != 2:
        raise ReportError(f"{name}: expected a 2-D map (h, w), got shape {tuple(a.shape)}")
    return a


def _image(value: Any, name: str = "image") -> np.ndarray:
    """``(3, H, W)`` / ``(H, W, 3)`` / ``(H, W)`` in [0, 1] -> ``(H, W, 3)`` clipped to [0, 1]."""
    a = _array(value, name)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    elif not (a.ndim == 3 and a.shape[-1] in (1, 3)):
        raise ReportError(f"{name}: expected an image (3, H, W) or (H, W, 3), got shape {tuple(a.shape)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(np.nan_to_num(a), 0.0, 1.0)


def _region(value: Any, hw: tuple[int, int], name: str) -> tuple[np.ndarray, bool]:
    """A region on an image: ``(H, W)`` bool, or heat scaled to [0, 1]. Returns (array, is_bool)."""
    is_bool = getattr(value, "dtype", None) in (bool, np.bool_) or str(getattr(value, "dtype", "")) == "torch.bool"
    a = _map(value, name)
    if a.shape != hw:
        raise ReportError(f"{name}: shape {tuple(a.shape)} does not match the image's (H, W) = {hw}")
    a = np.clip(np.nan_to_num(a), 0.0, None)
    if not is_bool and a.max() > 1:
        a = a / a.max()
    return a, is_bool


# ---------------------------------------------------------------- drawing helpers


def _new_figure(width: float, height: float, constrained: bool = True) -> MplFigure:
    # Constrained layout fits labels of any length but costs half the drawing time: image grids
    # without tick labels use fixed margins instead.
    fig = MplFigure(figsize=(width, height), dpi=_RC["figure.dpi"], layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: MplFigure, title: str = "") -> bytes:
    """The figure as PNG bytes, under ``title`` when one is given."""
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    # No "Software" text chunk: the PNG carries no URL and is byte-identical across runs.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _plain(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: np.ndarray, region: np.ndarray, is_bool: bool) -> None:
    """The image with a region on it: tinted + outlined (bool), or a heat overlay with a contour."""
    if is_bool:  # outside the region dimmed, inside tinted
        tinted = np.where(region[..., None] > 0.5, 0.55 * image + 0.45 * _REGION_RGB, 0.6 * image)
        ax.imshow(tinted, interpolation="bilinear")
    else:
        ax.imshow(image, interpolation="bilinear")
        rgba = matplotlib.colormaps["inferno"](region)
        rgba[..., 3] = 0.65 * region
        ax.imshow(rgba, interpolation="bilinear")
    if region.max() > 0.5 and region.min() < 0.5:
        ax.contour(region, levels=[0.5], colors=[_REGION_RGB], linewidths=1.5)
    _plain(ax)


# ---------------------------------------------------------------- paper figures


def filter_panel(image: Any, x: Any, mask: Any, masked: Any, rf: Any, *, title: str = "") -> bytes:
    """Paper Fig. 4 for one filter on one image, left to right: the feature map ``x`` after
    ReLU, the mask chosen ``T_mu_hat`` (values in [-1, 1]), the masked map ``x_masked``, and
    the image with the image-resolution RF of the masked activations.

    Args:
        image: ``(3, H, W)`` or ``(H, W, 3)`` in [0, 1].
        x, mask, masked: ``(h, w)`` maps; ``x`` and ``masked`` share one colour scale.
        rf: ``(H, W)`` heat in [0, 1] (larger values are rescaled) or a bool region.
        title: shown above the panel (e.g. ``"filter 12, image 3"``).
    """
    img = _image(image)
    x, mask, masked = _map(x, "x"), _map(mask, "mask"), _map(masked, "masked")
    if not x.shape == mask.shape == masked.shape:
        raise ReportError(
            f"filter_panel: x {x.shape}, mask {mask.shape} and masked {masked.shape} must have one shape (h, w)"
        )
    region, is_bool = _region(rf, img.shape[:2], "rf")
    top = max(float(np.nanmax(x)), float(np.nanmax(masked)), 1e-12)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(10.5, 3.0, constrained=False)
        grid = dict(left=0.01, right=0.955, bottom=0.04, top=0.82 if title else 0.88, wspace=0.3)
        axes = fig.subplots(1, 4, gridspec_kw=grid)
        panels = [
            (x, "feature map x (after ReLU)", "viridis", 0.0, top),
            (mask, "mask $T_{\\hat\\mu}$", "RdBu_r", -1.0, 1.0),
            (masked, "masked map $x^{masked}$", "viridis", 0.0, top),
        ]
        for ax, (a, name, cmap, lo, hi) in zip(axes, panels):
            im = ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(name)
            _plain(ax)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        _overlay(axes[3], img, region, is_bool)
        axes[3].set_title("RF of the masked activations")
        heat = cm.ScalarMappable(colors.Normalize(0, 1), cmap="inferno")
        bar = fig.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.03)
        bar.ax.set_visible(not is_bool)  # a bool region has no scale; the bar's room keeps panels aligned
        return _png(fig, title)


def top_images(
    images: Sequence[Any],
    regions: Sequence[Any],
    scores: Sequence[float] | None = None,
    ncols: int = 5,
    *,
    title: str = "",
) -> bytes:
    """Paper Fig. 5: one filter's top-activating images, each with the filter's region on it
    (tinted and outlined for a bool region, a heat overlay for a float one).

    Args:
        images: images, best first (any sizes; each ``(3, H, W)`` or ``(H, W, 3)``).
        regions: one ``(H, W)`` region per image, bool or heat in [0, 1].
        scores: the filter's activation on each image, shown under it (optional).
        ncols: images per row.
    """
    if len(images) == 0:
        raise ReportError("top_images: images is empty")
    if len(regions) != len(images) or (scores is not None and len(scores) != len(images)):
        raise ReportError(
            f"top_images: got {len(images)} images, {len(regions)} regions and "
            f"{'no' if scores is None else len(scores)} scores; give one region (and score) per image"
        )
    if ncols < 1:
        raise ReportError(f"top_images: ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    with matplotlib.rc_context(_RC):
        height = 2.1 * nrows + (0.35 if title else 0.0)
        fig = _new_figure(2.0 * ncols, height, constrained=False)
        top = 1 - (0.3 + (0.35 if title else 0.0)) / height  # room for the tile titles and the title
        grid = dict(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.06, hspace=0.3 / 1.8)
        axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel()
        for i, ax in enumerate(axes):
            if i >= len(images):
                ax.set_axis_off()
                continue
            img = _image(images[i], f"images[{i}]")
            region, is_bool = _region(regions[i], img.shape[:2], f"regions[{i}]")
            _overlay(ax, img, region, is_bool)
            label = f"#{i + 1}" if scores is None else f"#{i + 1}   {float(scores[i]):.3g}"
            ax.set_title(label, fontsize=9)
        return _png(fig, title)


def part_heatmap(
    matrix: Any,
    part_names: Sequence[str],
    *,
    row_label: str = "filter",
    row_names: Sequence[str] | None = None,
    title: str = "",
) -> bytes:
    """How filters spread over parts (paper Fig. 6, per part): a heat map of ``matrix``
    ``(num_filters_or_groups, num_parts)`` (e.g. each filter's ``P_fk`` or mean IoU per part),
    rows sorted by their best part, next to a bar chart of how many rows have each part as
    their best (rows that are all zero / NaN count for no part). A 1-D ``matrix`` is taken as
    counts per part and drawn as the bar chart alone.
    """
    m = _array(matrix, "matrix")
    names = [str(p) for p in part_names]
    if m.ndim not in (1, 2) or m.shape[-1] != len(names):
        raise ReportError(
            f"part_heatmap: matrix must be (num_rows, num_parts) or (num_parts,) with num_parts = "
            f"{len(names)} (part_names), got shape {tuple(m.shape)}"
        )
    if row_names is not None and (m.ndim != 2 or len(row_names) != m.shape[0]):
        raise ReportError(f"part_heatmap: row_names has {len(row_names)} names for matrix of shape {tuple(m.shape)}")
    with matplotlib.rc_context(_RC):
        if m.ndim == 1:
            fig = _new_figure(max(3.5, 0.7 * len(names) + 1.5), 3.0)
            _part_bars(fig.add_subplot(), np.nan_to_num(m), names, f"{row_label}s")
        else:
            best, assigned, counts = _best_part_counts(m)
            peak = np.nan_to_num(m, nan=-np.inf).max(axis=1)
            order = np.lexsort((-peak, np.where(assigned, best, len(names))))  # by part, then strength
            many = m.shape[0] > 40
            height = 3.4 if many else max(2.6, 0.28 * m.shape[0] + 1.2)
            fig = _new_figure(max(5.6, 0.7 * len(names) + 3.6), height)
            ax_heat, ax_bar = fig.subplots(1, 2, width_ratios=[1.4, 1])
            vmax = np.nanmax(m) if np.isfinite(np.nanmax(m)) and np.nanmax(m) > 0 else 1.0
            im = ax_heat.imshow(m[order], cmap="magma", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
            fig.colorbar(im, ax=ax_heat, shrink=0.9, pad=0.02)
            ax_heat.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax_heat.set_ylabel(f"{row_label}s (sorted by best part)" if many else row_label)
            if many:
                ax_heat.set_yticks([])
            else:
                labels = [str(row_names[i]) if row_names is not None else str(i) for i in order]
                ax_heat.set_yticks(range(len(order)), labels)
            _part_bars(ax_bar, counts, names, f"{row_label}s")
        return _png(fig, title)


def _best_part_counts(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best part ``(R,)``, whether it has one ``(R,)`` (a positive, non-NaN maximum),
    and the number of rows per part ``(P,)``."""
    filled = np.nan_to_num(m, nan=-np.inf)
    best = filled.argmax(axis=1)
    assigned = filled.max(axis=1) > 0
    return best, assigned, np.bincount(best[assigned], minlength=m.shape[1])


def _part_bars(ax, counts: np.ndarray, names: list[str], unit: str) -> None:
    bars = ax.bar(range(len(names)), counts, color=_RUN_COLOURS[1])
    ax.bar_label(bars, labels=[f"{c:g}" for c in counts], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{unit} per part")
    ax.set_ylim(0, max(float(counts.max()), 1.0) * 1.15)
    ax.spines[["top", "right"]].set_visible(False)


def location_density(points: Any, size: tuple[int, int] = (64, 64), sigma: float = 2.0) -> np.ndarray:
    """Smoothed 2-D histogram of part positions in a normalised object frame (paper Fig. 6).

    ``points`` ``(N, 2)`` are ``(x, y)`` relative to the object box (``(p - box0) / box_size``,
    ``[0, 1]`` inside the box; NaN rows and points outside are dropped). Returns an ``(H, W)``
    density that sums to 1 (all zeros when no point is left), Gaussian-smoothed with ``sigma``
    bins.
    """
    p = _array(points, "points")
    if p.ndim != 2 or p.shape[1] != 2:
        raise ReportError(f"location_density: points must be (N, 2) as (x, y), got shape {tuple(p.shape)}")
    p = p[np.isfinite(p).all(axis=1)]
    h, w = size
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=(h, w), range=((0, 1), (0, 1)))  # (H, W) rows = y
    if sigma > 0:
        hist = ndimage.gaussian_filter(hist, sigma, mode="constant")
    total = hist.sum()
    return hist / total if total > 0 else hist


def location_heatmap(density: Any, background: Any = None, *, title: str = "") -> bytes:
    """Paper Fig. 6: where the filters' parts lie, as a heat map over the normalised object
    frame (x, y in [0, 1] relative to the object box), on ``background`` (e.g. a mean object
    crop, any size) when given. ``density`` is ``(H, W)``, e.g. from :func:`location_density`;
    it is shown relative to its maximum.
    """
    d = np.nan_to_num(_map(density, "density")).clip(0, None)
    d = d / d.max() if d.max() > 0 else d
    extent = (0.0, 1.0, 1.0, 0.0)  # y grows downwards, as on the image
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.2, 3.6)
        ax = fig.add_subplot()
        if background is not None:
            ax.imshow(_image(background, "background"), extent=extent, interpolation="bilinear")
            rgba = matplotlib.colormaps["jet"](d)
            rgba[..., 3] = 0.75 * np.sqrt(d)  # faint tails stay visible, the background shows through
            ax.imshow(rgba, extent=extent, interpolation="bilinear")
            scale = cm.ScalarMappable(colors.Normalize(0, 1), cmap="jet")
        else:
            scale = ax.imshow(d, cmap="jet", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        fig.colorbar(scale, ax=ax, shrink=0.85, pad=0.02, label="relative density")
        ax.set_xlabel("x / box width")
        ax.set_ylabel("y / box height")
        if title:
            ax.set_title(title)
        return _png(fig)


# ---------------------------------------------------------------- metrics


def metric_bars(
    values: Mapping[str, Mapping[str, Any]],
    metric: str,
    *,
    references: Mapping[str, float] | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> bytes:
    """Side-by-side bars of one metric over several runs (e.g. ordinary vs interpretable).

    Args:
        values: run name -> that run's metrics; ``values[run][metric]`` is a number, or a dict
            of numbers (e.g. per landmark: ``{"head": .07, "back": .08}``) drawn as grouped bars.
            A run without the metric gets no bar (shown as "n/a").
        metric: the key to draw.
        references: label -> value drawn as dashed horizontal lines, e.g.
            ``{"random": 0.161, "best fixed unit": 0.074}`` next to location instability.
    """
    if not values:
        raise ReportError("metric_bars: values is empty; give at least one run")
    runs = list(values)
    groups: list[str] = []  # x positions: [metric] or the keys of per-group dicts
    table: dict[str, dict[str, float]] = {}
    for run in runs:
        v = values[run].get(metric) if isinstance(values[run], Mapping) else None
        if isinstance(v, Mapping):
            table[run] = {str(k): _number(x) for k, x in v.items()}
        else:
            table[run] = {metric: _number(v)}
        groups += [g for g in table[run] if g not in groups]
    if all(math.isnan(x) for row in table.values() for x in row.values()):
        raise ReportError(f"metric_bars: no run has a number for {metric!r} (runs: {', '.join(runs)})")
    width = 0.8 / len(runs)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(5.0, 2.6 + 0.5 * len(runs) * len(groups) + 0.3 * len(groups)), 3.2)
        ax = fig.add_subplot()
        for r, run in enumerate(runs):
            xs = np.arange(len(groups)) + (r - (len(runs) - 1) / 2) * width
            ys = np.array([table[run].get(g, math.nan) for g in groups])
            bars = ax.bar(xs, np.nan_to_num(ys), width * 0.92, label=run, color=_RUN_COLOURS[r % len(_RUN_COLOURS)])
            ax.bar_label(bars, labels=["n/a" if math.isnan(y) else f"{y:.3g}" for y in ys], fontsize=8, padding=2)
        for i, (name, value) in enumerate((references or {}).items()):
            ax.axhline(float(value), color="#333333", lw=1.1, ls=_REF_STYLES[i % len(_REF_STYLES)],
                       label=f"{name} ({float(value):.3g})")
        ax.set_xticks(range(len(groups)), groups if len(groups) > 1 else [metric])
        ax.set_ylabel(ylabel or metric)
        top = max([x for row in table.values() for x in row.values() if not math.isnan(x)]
                  + [float(v) for v in (references or {}).values()])
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(top, 1e-12) * 1.22)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title)
        return _png(fig)


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ReportError(f"metric_bars: expected a number, got {value!r}") from None
