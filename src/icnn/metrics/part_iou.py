"""Part interpretability of filters (paper §5.2.1 and footnote 5/6; SPEC §5).

For filter ``f`` with threshold ``T_f`` (``p(x_ij > T_f) = 0.005`` over all units of all maps of the
dataset, ``quantile.TopQuantile``), the region ``S_f^I`` on image ``I`` is made of its
above-threshold activations mapped to the image, and::

    IoU_fk^I = |S_f^I ∩ S_k^I| / |S_f^I ∪ S_k^I|        (S_k^I: the mask of part k)
    P_fk     = mean_{I with part k} 1(IoU_fk^I > 0.2)
    P_f      = max_k P_fk,     layer score = mean_f P_f

(The CVPR copy prints ``P_fk = max_I``; the arXiv copy and SPEC say ``mean_I``: a probability.)

Two ways to map activations to the image (``mode``):

- ``"upsample"`` (Network Dissection): bilinear interpolation of the map to the image, then
  ``> T_f``. With ``centers`` (the units' RF centres) the interpolation is between RF centres,
  as the original Network Dissection (its ``upsampleL`` places units on their receptive fields),
  held constant beyond the outermost centres; without, it is ``F.interpolate(mode="bilinear",
  align_corners=False)`` (NetDissect-Lite): unit centres at ``(j + 0.5) * W / w``.
- ``"rf"`` (the paper's footnote: "a round RF for each valid activation ... overlapped"): the
  union of disks of radius ``r`` centred on the RF centres of the units with ``x_ij > T_f``; a
  pixel belongs to a disk when its centre ``(px + 0.5, py + 0.5)`` is within ``r``.
  Default ``radius="stride"``: ``r`` = the stride (spacing of unit centres, mean of x and y).
  Why: the theoretical RF of a top layer covers most of the image (VGG-16 conv5_3: 212 px on a
  224 px input), so disks that size would make every region nearly the whole image and every
  IoU small; effective RFs are far smaller than theoretical ones (Luo et al. 2016). One stride is
  the reach of a unit in bilinear upsampling (its tent kernel spans +-1 stride), so the two modes
  see regions of similar extent, and disks of neighbouring active units overlap into one region.
  ``radius="rf"`` uses half the geometry's theoretical RF size; a number is taken as pixels.

Regions are strict ``> T_f``, so maps entirely at or below the threshold have empty regions and
are skipped (most maps, at q = 0.005). Regions are built sparsely, around the active units only,
as disjoint row intervals (``_upsample_intervals``, ``_disk_intervals``), and intersected with the
masks through per-row prefix sums: the cost follows the active units and the rows they reach, not
``B x C x H x W``; Network Dissection takes the same overlaps (``overlaps`` of either metric,
computed once per batch). Pixel counts are int64 and IoU > 0.2 is decided in exact integer
arithmetic (``5 * |∩| > |∪|``), and a pixel's interpolated value does not depend on what else is
in the batch: every number is the same whatever the batching.

Multi-category: each filter is evaluated on images of its category - given, or by default
``c_hat = argmax_c mean_{I in I_c} sum_ij x_ij`` (paper §5.2.1) over the classes that have part
annotations (so the negatives of a single-category set, which have none, are never chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .instability import as_unit_centers, class_indices
from .quantile import MetricError, exact_fraction

__all__ = [
    "PartInterpretability",
    "PartInterpretabilityResult",
    "filter_regions",
    "region_overlaps",
    "resolve_radius",
]

MODES = ("upsample", "rf")
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _axis_weights(centers_1d: torch.Tensor, size: int):
    """Linear interpolation along one axis at pixel centres ``p + 0.5`` between sample positions.

    Returns ``lo, hi`` (size,) indices and ``t`` (size,) weights: value = (1 - t) v[lo] + t v[hi];
    constant beyond the first/last sample.
    """
    c = centers_1d.to(torch.float64).contiguous()
    x = torch.arange(size, dtype=torch.float64) + 0.5
    if len(c) == 1:
        zero = torch.zeros(size, dtype=torch.long)
        return zero, zero, torch.zeros(size, dtype=torch.float64)
    hi = torch.searchsorted(c, x, right=True).clamp(1, len(c) - 1)
    lo = hi - 1
    t = ((x - c[lo]) / (c[hi] - c[lo])).clamp(0.0, 1.0)
    return lo, hi, t


def _grid_axes(centers, h: int, w: int, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit centre positions along x ``(w,)`` and y ``(h,)``; NetDissect-Lite grid when None."""
    big_h, big_w = image_hw
    if centers is None:
        cx = (torch.arange(w, dtype=torch.float64) + 0.5) * (big_w / w)
        cy = (torch.arange(h, dtype=torch.float64) + 0.5) * (big_h / h)
        return cx, cy
    ctr = as_unit_centers(centers, h, w)  # (h, w, 2)
    cx, cy = ctr[0, :, 0], ctr[:, 0, 1]
    if not (torch.equal(ctr[..., 0], cx.expand(h, w)) and torch.equal(ctr[..., 1], cy[:, None].expand(h, w))):
        raise MetricError("centers must form a grid: x depends on the column only, y on the row only")
    if (w > 1 and not bool((cx.diff() > 0).all())) or (h > 1 and not bool((cy.diff() > 0).all())):
        raise MetricError("centers must increase along rows and columns")
    return cx, cy


def resolve_radius(radius, centers, h: int, w: int, image_hw: tuple[int, int]) -> float:
    """Disk radius in pixels for ``mode="rf"`` (see the module doc for the default)."""
    if isinstance(radius, (int, float)) and not isinstance(radius, bool):
        if radius <= 0:
            raise MetricError(f"radius must be positive, got {radius}")
        return float(radius)
    if radius == "stride":
        cx, cy = _grid_axes(centers, h, w, image_hw)
        steps = [float(a.diff().mean()) for a in (cx, cy) if len(a) > 1]
        if not steps:
            raise MetricError("radius='stride' needs a map larger than 1x1; pass radius in pixels")
        return sum(steps) / len(steps)
    if radius == "rf":
        size = None if isinstance(centers, torch.Tensor) else getattr(centers, "size", None)
        if size is None:
            raise MetricError("radius='rf' needs a geometry with .size (theoretical RF); got plain centers")
        return (float(size[0]) + float(size[1])) / 4.0
    raise MetricError(f"radius must be a number of pixels, 'stride' or 'rf', got {radius!r}")


def _runs(lo: torch.Tensor, t: torch.Tensor, ncell: int, device):
    """One axis by interpolation cell: ``key = lo + t`` (nondecreasing along the axis, exact in
    float64) and the first and end pixel of each cell's run of pixels ``[start, end)``."""
    count = torch.bincount(lo, minlength=ncell)
    end = count.cumsum(0)
    return (lo + t.double()).to(device), (end - count).to(device), end.to(device)


def _reach(u, v, z):
    """``[lo, hi]``: the weights ``t`` in ``[0, 1]`` with ``u + v t >= z``; none: ``[inf, -inf]``."""
    r = (z - u) / v
    lo = torch.where(v > 0, r, 0.0).clamp_min(0)
    hi = torch.where(v < 0, r, 1.0).clamp_max(1)
    none = (lo > hi) | ((v == 0) & (u < z))
    return lo.masked_fill(none, float("inf")), hi.masked_fill(none, -float("inf"))


def _span(key, start, end, cell, lo, hi):
    """Pixels ``[i0, i1)`` of the cells' runs ``[start, end)`` whose weight lies in ``[lo, hi]``."""
    return (
        torch.searchsorted(key, cell + lo).clamp(start, end),
        torch.searchsorted(key, cell + hi, right=True).clamp(start, end),
    )


def _expand(first, count):
    """``first[i] + 0, 1, .., count[i] - 1`` for every ``i``, flat, with the ``i`` of each."""
    end = count.cumsum(0)
    total = int(end[-1]) if len(end) else 0
    i = torch.repeat_interleave(count, output_size=total)
    return i, first[i] + torch.arange(total, device=count.device) - (end - count)[i]


def _upsample_intervals(maps, thr, cx, cy, image_hw, chunk_bytes):
    """Regions of ``maps (n, h, w)`` in mode "upsample" as disjoint row intervals: yields
    ``(map index, row, x_first, x_last)`` (M,) each, inclusive, covering each region pixel once.

    Pixel ``(py, px)`` lies in the interpolation cell of its lower-left unit pair ``(a, b)`` =
    ``(y0[py], x0[px])`` with weights ``tx[px]``, ``ty[py]`` (``_axis_weights``); it is a region pixel
    when, in the maps' dtype, ``row_a = m[a,b] (1 - tx) + m[a,b+1] tx``, ``row_b`` likewise on row
    ``a + 1``, ``row_a (1 - ty) + row_b ty > thr``. A cell can hold one only if a corner is above
    the threshold; cells partition the image, so only those are visited and no pixel comes twice.

    In exact arithmetic the value is bilinear: on a pixel row it is ``F(tx) = p + q tx``, and
    ``tx`` does not decrease along x (nor ``ty`` down y). The computed value is within
    ``e = 64 eps max|corner| + 64 tiny`` of ``F`` (rounding bound: ``4 eps max|corner|``), so the
    rows where neither edge of the cell (``tx = 0``, ``tx = 1``) reaches ``thr - e`` are out, and
    on the others the pixels with ``F > thr + e`` are in and those with ``F < thr - e`` out: a
    prefix and a suffix of the row's pixels, found by ``searchsorted`` on ``x0 + tx`` (rows alike
    on ``y0 + ty``). Only the band between them is evaluated as above, pixel by pixel. It is
    normally empty (a ~1e-5 px strip at the crossing); where a row lies within ``e`` of the
    threshold, rounding can make its pixels alternate in and out (the region's pixels of a row
    of a cell are then not one interval), and they come out as one-pixel intervals. Cost: active
    cells x the rows they reach, plus the band's pixels; chunks of cells and of band rows bound
    the memory.
    """
    h, w = maps.shape[1:]
    dt = maps.dtype if maps.dtype.is_floating_point else torch.float32
    maps, dev = maps.to(dt), maps.device
    fi = torch.finfo(dt)
    rel, tiny = 64 * max(fi.eps, 2.0**-40), 64 * fi.tiny  # float64 maps: room for the float64 bookkeeping
    x0, _, tx = _axis_weights(cx, image_hw[1])
    y0, _, ty = _axis_weights(cy, image_hw[0])
    tx, ty = tx.to(dt), ty.to(dt)
    x_key, x_start, x_end = _runs(x0, tx, max(w - 1, 1), dev)
    y_key, y_start, y_end = _runs(y0, ty, max(h - 1, 1), dev)
    tx, ty = tx.to(dev), ty.to(dev)
    act = maps > thr[:, None, None]  # (n, h, w)
    if h > 1:
        act = act[:, :-1] | act[:, 1:]
    if w > 1:
        act = act[:, :, :-1] | act[:, :, 1:]
    cells = act.nonzero()  # (mc, 3): map, cell row a, cell column b
    step = max(1, int(chunk_bytes) // (320 * int((y_end - y_start).max())))  # cells (~320 B a row)
    band_rows = max(1, int(chunk_bytes) // (96 * int((x_end - x_start).max())))  # (~96 B a pixel)
    inf = float("inf")
    for start in range(0, len(cells), step):
        k, a, b = cells[start : start + step].unbind(1)
        ah, bh = (a + 1 if h > 1 else a), (b + 1 if w > 1 else b)
        corner = torch.stack((maps[k, a, b], maps[k, a, bh], maps[k, ah, b], maps[k, ah, bh]))  # (4, m)
        c = corner.double()
        e = corner.abs().amax(0).double() * rel + tiny
        th = thr[k].double()
        bad = ~torch.isfinite(e)  # non-finite corners: every pixel is tested
        # the rows (weights ty) where the left or the right edge of the cell reaches thr - e
        (l0, h0), (l1, h1) = (_reach(c[i], c[i + 2] - c[i], th - e) for i in (0, 1))
        y_lo = torch.minimum(l0, l1).masked_fill(bad, -inf)
        y_hi = torch.maximum(h0, h1).masked_fill(bad, inf)
        r0, r1 = _span(y_key, y_start[a], y_end[a], a.double(), y_lo, y_hi)
        j, row = _expand(r0, (r1 - r0).clamp_min(0))  # cell (in the chunk) and pixel row of each row
        # on a row: p = F(0) = c0 + (c2 - c0) ty, q = dF/dtx = (c1 - c0) + ((c3 - c2) - (c1 - c0)) ty
        # (corners c0 = m[a,b], c1 = m[a,b+1], c2 = m[a+1,b], c3 = m[a+1,b+1]); per cell, gathered by row
        c0, c1, c2, c3 = c
        fc = torch.stack((c0, c2 - c0, c1 - c0, (c3 - c2) - (c1 - c0), th + e, th - e), 1).index_select(0, j)
        ic = torch.stack((k, b, x_start[b], x_end[b]), 1).index_select(0, j)
        t = ty.index_select(0, row).double()
        p = fc[:, 0] + fc[:, 1] * t
        q = fc[:, 2] + fc[:, 3] * t + 0.0  # + 0: no -0, so that q = 0 divides as q > 0
        r_in, r_out = (fc[:, 4] - p) / q, (fc[:, 5] - p) / q  # in beyond r_in, out beyond r_out
        down = q < 0
        lo, hi = torch.where(down, r_in, r_out), torch.where(down, r_out, r_in)  # the band
        odd = bad.index_select(0, j) | lo.isnan() | hi.isnan()  # NaN: a flat row at thr +- e exactly
        lo, hi = lo.masked_fill(odd, -inf), hi.masked_fill(odd, inf)
        kj, s, en = ic[:, 0], ic[:, 2], ic[:, 3]
        band0, band1 = _span(x_key, s, en, ic[:, 1].double(), lo, hi)
        in0, in1 = torch.where(down, s, band1), torch.where(down, band0, en)
        ok = in0 < in1
        yield kj[ok], row[ok], in0[ok], in1[ok] - 1
        nb = band1 - band0
        for u in range(0, len(nb) if bool(nb.any()) else 0, band_rows):
            i, px = _expand(band0[u : u + band_rows], nb[u : u + band_rows])
            i += u
            ci, txp, typ = j[i], tx[px], ty[row[i]]
            # the per-pixel test, operation for operation: a pixel's value does not depend on
            # what is batched with it
            row_a = corner[0, ci] * (1 - txp) + corner[1, ci] * txp
            row_b = corner[2, ci] * (1 - txp) + corner[3, ci] * txp
            inside = row_a * (1 - typ) + row_b * typ > thr[k[ci]]
            yield k[ci][inside], row[i][inside], px[inside], px[inside]


def _disk_intervals(maps, thr, cx, cy, image_hw, radius: float, chunk_bytes):
    """Regions of ``maps (n, h, w)`` in mode "rf" as disjoint row intervals: yields
    ``(map index, row, x_first, x_last)`` (M,) each, inclusive, covering each region pixel once.

    Each active unit's disk (pixel centres within ``radius`` of its RF centre) is cut into one
    interval per pixel row; the ends come from ``sqrt`` and are then corrected with the exact test
    ``(px + 0.5 - x)^2 + (py + 0.5 - y)^2 <= r^2`` (float64), so membership is decided by that test
    alone. Intervals of one (map, row) are sorted and merged, so overlapping disks count once.
    Chunks of whole maps bound the memory.
    """
    big_h, big_w = image_hw
    n, dev = len(maps), maps.device
    act = (maps > thr[:, None, None]).nonzero()  # (m, 3): map, i, j - grouped by map
    if len(act) == 0:
        return
    rows_per_unit = int(2 * radius) + 1  # the most pixel centres an interval of length 2r holds
    off = torch.arange(rows_per_unit, device=dev)
    cx, cy = cx.to(dev), cy.to(dev)
    r2 = radius * radius
    ends = torch.bincount(act[:, 0], minlength=n).cumsum(0)  # units up to each map
    cap = max(1, int(chunk_bytes) // (rows_per_unit * 96))  # units per chunk (~96 B per interval)
    group = (ends - 1).clamp_min(0) // cap
    bounds = torch.cat((ends.new_zeros(1), ends[torch.nonzero(group.diff())[:, 0]], ends[-1:]))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if hi <= lo:
            continue
        u = act[lo:hi]
        ux, uy = cx[u[:, 2]], cy[u[:, 1]]  # (m,) float64
        py = torch.ceil(uy - 0.5 - radius).long()[:, None] + off  # (m, R) rows in reach
        dy2 = (py + 0.5 - uy[:, None]).pow(2)
        ok = (dy2 <= r2) & (py >= 0) & (py < big_h)
        half = (r2 - dy2).clamp_min(0).sqrt()
        uxe = ux[:, None].expand_as(half)

        def inside(px):
            return (px + 0.5 - uxe).pow(2) + dy2 <= r2

        x0 = torch.ceil(uxe - 0.5 - half).long()
        x0 = torch.where(inside(x0 - 1), x0 - 1, torch.where(inside(x0), x0, x0 + 1))
        x1 = torch.floor(uxe - 0.5 + half).long()
        x1 = torch.where(inside(x1 + 1), x1 + 1, torch.where(inside(x1), x1, x1 - 1))
        x0, x1 = x0.clamp_min(0), x1.clamp_max(big_w - 1)
        ok &= x0 <= x1
        k = u[:, 0, None].expand_as(py)[ok]
        row, x0, x1 = py[ok], x0[ok], x1[ok]
        # merge the intervals of each (map, row): sort by (map, row, x0); an interval opens a new
        # block unless it starts at or before the running end of its group (+1: adjacent pixels)
        group_id = k * big_h + row
        order = torch.argsort(group_id * (big_w + 1) + x0)
        group_id, row, k, x0, x1 = group_id[order], row[order], k[order], x0[order], x1[order]
        run_end = torch.cummax(group_id * (big_w + 1) + x1, dim=0).values - group_id * (big_w + 1)
        prev_end = torch.cat((torch.full((1,), -2, dtype=torch.long, device=dev), run_end[:-1]))
        same = torch.cat((torch.zeros(1, dtype=torch.bool, device=dev), group_id[1:] == group_id[:-1]))
        starts = ~same | (x0 > prev_end + 1)
        block = starts.long().cumsum(0) - 1  # block index of every interval
        first = starts.nonzero()[:, 0]
        last_end = torch.zeros(len(first), dtype=torch.long, device=dev).scatter_reduce(
            0, block, x1, reduce="amax", include_self=False
        )
        yield k[first], row[first], x0[first], last_end


def _region_intervals(maps, thr, image_hw, mode, centers, radius, chunk_bytes):
    """Regions of ``n`` maps ``(n, h, w)`` with thresholds ``(n,)`` as disjoint row intervals,
    in chunks of ``(map index, row, x_first, x_last)`` (inclusive); every region pixel once."""
    h, w = maps.shape[-2:]
    cx, cy = _grid_axes(centers, h, w, image_hw)
    if mode == "upsample":
        return _upsample_intervals(maps, thr, cx, cy, image_hw, chunk_bytes)
    r = resolve_radius(radius, centers, h, w, image_hw)
    return _disk_intervals(maps, thr, cx, cy, image_hw, r, chunk_bytes)


def _check(maps, thresholds, mode) -> None:
    if maps.dim() != 4:
        raise MetricError(f"maps must be (B, C, h, w), got shape {tuple(maps.shape)}")
    if tuple(thresholds.shape) != (maps.shape[1],):
        raise MetricError(f"thresholds must be (C,) = ({maps.shape[1]},), got {tuple(thresholds.shape)}")
    if mode not in MODES:
        raise MetricError(f"mode must be one of {MODES}, got {mode!r}")


def filter_regions(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    image_hw: tuple[int, int],
    *,
    mode: str = "upsample",
    centers=None,
    radius="stride",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Regions ``S_f^I`` of every map on the image: ``(B, C, h, w) -> (B, C, H, W)`` bool.

    For visualisation and small inputs; ``region_overlaps`` streams a dataset without building
    this tensor (both use the same pixels).
    """
    _check(maps, thresholds, mode)
    b, c, h, w = maps.shape
    big_h, big_w = image_hw
    thr = thresholds.to(maps.device, maps.dtype).repeat(b)
    edges = torch.zeros(b * c, big_h, big_w + 1, dtype=torch.int32, device=maps.device)
    for k, row, x0, x1 in _region_intervals(
        maps.detach().reshape(b * c, h, w), thr, (big_h, big_w), mode, centers, radius, chunk_bytes
    ):
        ones = torch.ones_like(k, dtype=torch.int32)
        edges.index_put_((k, row, x0), ones, accumulate=True)  # +1 where an interval opens
        edges.index_put_((k, row, x1 + 1), -ones, accumulate=True)  # -1 after it closes
    return (edges.cumsum(-1)[..., :big_w] > 0).reshape(b, c, big_h, big_w)


def region_overlaps(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    masks: torch.Tensor,
    *,
    mode: str = "upsample",
    centers=None,
    radius="stride",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap of every filter region with every mask: ``inter (B, C, P)`` and ``area (B, C)`` (int64).

    ``maps (B, C, h, w)``, ``thresholds (C,)``, ``masks (B, P, H, W)`` bool. Only maps with a unit
    above threshold have a region; their region pixels are generated sparsely (see
    ``_upsample_intervals`` / ``_disk_intervals``) in chunks under ``chunk_bytes`` and looked up in the
    masks, so the cost follows the number of active units, not ``B x C x H x W``.
    """
    _check(maps, thresholds, mode)
    if masks.dim() != 4 or masks.shape[0] != maps.shape[0]:
        raise MetricError(f"masks must be (B, P, H, W) with B = {maps.shape[0]}, got {tuple(masks.shape)}")
    b, c, h, w = maps.shape
    p, big_h, big_w = masks.shape[1:]
    maps, masks = maps.detach(), masks.to(maps.device)
    thresholds = thresholds.to(maps.device, maps.dtype)
    inter = torch.zeros(b, c, p, dtype=torch.long, device=maps.device)
    area = torch.zeros(b, c, dtype=torch.long, device=maps.device)
    pairs = (maps.amax(dim=(-2, -1)) > thresholds).nonzero()  # (n, 2): image, filter
    if len(pairs) == 0:
        return inter, area
    bi, fi = pairs.unbind(1)
    # prefix sums of every mask row: |interval ∩ mask| = cs[x_last + 1] - cs[x_first]
    cs = torch.empty(b, big_h, big_w + 1, p, dtype=torch.int32, device=maps.device)  # (B, H, W+1, P)
    cs[:, :, 0] = 0
    cs[:, :, 1:] = masks.bool().cumsum(-1, dtype=torch.int32).permute(0, 2, 3, 1)
    cs = cs.reshape(b * big_h * (big_w + 1), p)  # rows: (image, row, x)
    inter_n = torch.zeros(len(pairs), p, dtype=torch.long, device=maps.device)
    area_n = torch.zeros(len(pairs), dtype=torch.long, device=maps.device)
    for k, row, x0, x1 in _region_intervals(
        maps[bi, fi], thresholds[fi], (big_h, big_w), mode, centers, radius, chunk_bytes
    ):
        base = (bi[k] * big_h + row) * (big_w + 1)
        inter_n.index_add_(0, k, (cs.index_select(0, base + x1 + 1) - cs.index_select(0, base + x0)).long())
        area_n.index_add_(0, k, x1 - x0 + 1)
    inter[bi, fi] = inter_n
    area[bi, fi] = area_n
    return inter, area


def _exceeds(inter: torch.Tensor, union: torch.Tensor, threshold) -> torch.Tensor:
    """``inter / union > threshold`` in exact integer arithmetic (threshold as a decimal)."""
    f = exact_fraction(threshold)
    return inter * f.denominator > union * f.numerator


@dataclass
class PartInterpretabilityResult:
    """What ``PartInterpretability.compute()`` returns (C filters, NC classes, P parts)."""

    score: float  # mean_f P_f over filters with any annotated image
    per_filter: torch.Tensor  # (C,) P_f = max_k P_fk
    per_filter_part: torch.Tensor  # (C, P) P_fk on the filter's category (NaN: no image with k)
    best_part: torch.Tensor  # (C,) argmax_k P_fk (first on ties; -1 if none)
    category: torch.Tensor  # (C,) the class each filter was evaluated on
    per_filter_class_part: torch.Tensor  # (C, NC, P) P_fk on images of each class
    images_with_part: torch.Tensor  # (NC, P)
    mean_activation: torch.Tensor  # (C, NC) mean_{I in c} sum_ij x_ij (category assignment)
    part_names: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "part_interpretability": self.score,
            "filters_evaluated": int((~torch.isnan(self.per_filter)).sum()),
        }


class _Regions:
    """The filter regions a metric is computed on: thresholds ``T_f`` ``(C,)`` and the keywords
    ``mode`` (``"upsample"`` or ``"rf"``), ``centers`` (``(h, w, 2)`` RF centres or a geometry;
    required for ``"rf"``), ``radius`` (disk radius for ``"rf"``: pixels, ``"stride"`` (default)
    or ``"rf"``) and ``chunk_bytes`` (memory bound of one chunk of filters).

    ``overlaps(maps, masks)`` is ``region_overlaps`` with these settings. The regions are the
    costly part, so metrics made with the same settings (``PartInterpretability`` and
    ``NetworkDissection`` of one layer) share one pass over them: compute ``overlaps`` once per
    batch and pass it to each metric's ``update(..., overlaps=)``.
    """

    def __init__(self, thresholds, *, mode: str = "upsample", centers=None, radius="stride",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):  # fmt: skip
        if mode not in MODES:
            raise MetricError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "rf" and centers is None:
            raise MetricError("mode='rf' needs centers (the units' RF centres or a geometry)")
        self.thresholds = thresholds.detach()
        self.mode, self.centers, self.radius, self.chunk_bytes = mode, centers, radius, chunk_bytes

    def overlaps(self, maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``inter (B, C, P)``, ``area (B, C)`` of ``maps (B, C, h, w)`` with ``masks (B, P, H, W)``."""
        return region_overlaps(
            maps, self.thresholds, masks.bool(), mode=self.mode, centers=self.centers, radius=self.radius,
            chunk_bytes=self.chunk_bytes,
        )

    def _overlaps(self, maps, masks, overlaps) -> tuple[torch.Tensor, torch.Tensor]:
        """``overlaps`` (given: shapes checked against the batch) or computed, on the CPU."""
        if overlaps is None:
            overlaps = self.overlaps(maps, masks)
        inter, area = overlaps
        b, c, p = maps.shape[0], maps.shape[1], masks.shape[1]
        if tuple(inter.shape) != (b, c, p) or tuple(area.shape) != (b, c):
            raise MetricError(f"overlaps must be inter ({b}, {c}, {p}) and area ({b}, {c}), as overlaps() returns")
        return inter.cpu(), area.cpu()


def _mask_area(masks: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` pixels of each mask, int64 on the CPU (summed in int32: no int64 copy of the masks)."""
    return masks.bool().sum(dim=(-2, -1), dtype=torch.int32).long().cpu()


class PartInterpretability(_Regions):
    """Streaming part interpretability of one layer (paper §5.2.1; see the module doc).

    Pass 2 of the metric: thresholds come from ``TopQuantile`` over the same maps (pass 1).

    Args:
        thresholds: ``(C,)`` ``T_f``.
        parts: P, or the P part names (the order of ``part_masks``).
        num_classes: NC (labels may be omitted when 1).
        iou_threshold: 0.2 (paper).
        **regions: ``mode``, ``centers``, ``radius``, ``chunk_bytes`` (see ``_Regions``).

    ``update(maps (B, C, h, w), part_masks (B, P, H, W) bool, labels (B,), overlaps=None)``;
    ``overlaps``: ``self.overlaps(maps, part_masks)``, computed once and shared (see ``_Regions``).
    """

    def __init__(self, thresholds: torch.Tensor, parts: int | Sequence[str], num_classes: int = 1, *,
                 iou_threshold: float = 0.2, **regions):  # fmt: skip
        names = [f"part{k}" for k in range(parts)] if isinstance(parts, int) else list(parts)
        super().__init__(thresholds, **regions)
        if thresholds.dim() != 1 or not names or num_classes <= 0:
            raise MetricError("thresholds must be (C,), parts and num_classes positive")
        self.part_names, self.num_classes = names, int(num_classes)
        self.iou_threshold = iou_threshold
        c, p = len(thresholds), len(names)
        self.hits = torch.zeros(c, self.num_classes, p, dtype=torch.long)  # IoU > thr, per class
        self.with_part = torch.zeros(self.num_classes, p, dtype=torch.long)
        self.act_sum = torch.zeros(self.num_classes, c, dtype=torch.float64)
        self.class_count = torch.zeros(self.num_classes, dtype=torch.long)

    def update(self, maps: torch.Tensor, part_masks: torch.Tensor, labels=None, *, overlaps=None) -> None:
        b, c = maps.shape[:2]
        nc, p = self.num_classes, len(self.part_names)
        if part_masks.dim() != 4 or part_masks.shape[:2] != (b, p):
            raise MetricError(
                f"part_masks must be (B, P, H, W) = ({b}, {p}, H, W), got {tuple(part_masks.shape)}"
            )
        labels = class_indices(labels, b, nc)
        inter, area = self._overlaps(maps, part_masks, overlaps)
        mask_area = _mask_area(part_masks)  # (B, P)
        has = mask_area > 0  # images "with part k"
        union = area[:, :, None] + mask_area[:, None, :] - inter  # (B, C, P)
        hit = _exceeds(inter, union, self.iou_threshold) & has[:, None, :]  # (B, C, P)
        onehot = torch.nn.functional.one_hot(labels, nc)  # (B, NC)
        self.hits.index_add_(1, labels, hit.long().transpose(0, 1))  # (C, NC, P)
        self.with_part.index_add_(0, labels, has.long())  # (NC, P)
        self.class_count += onehot.sum(0)
        # class sums: a sequential running sum over images (cumsum), so the result does not
        # depend on how the stream is batched
        s = maps.detach().to(torch.float64).sum(dim=(-2, -1)).cpu()  # (B, C)
        per = onehot.to(torch.float64)[:, :, None] * s[:, None, :]  # (B, NC, C)
        self.act_sum = torch.cat((self.act_sum[None], per)).cumsum(0)[-1]

    def mean_activation(self) -> torch.Tensor:
        """``(C, NC)`` mean over images of class c of ``sum_ij x_ij``."""
        return (self.act_sum / self.class_count.clamp_min(1)[:, None]).t()

    def default_categories(self) -> torch.Tensor:
        """``c_hat = argmax_c mean_{I in I_c} sum_ij x_ij`` over classes with part annotations."""
        from ..categories import assign_categories

        return assign_categories(self.act_sum, self.class_count.double(), self.with_part.sum(1) > 0)

    def compute(self, categories: torch.Tensor | None = None) -> PartInterpretabilityResult:
        c = len(self.thresholds)
        if int(self.class_count.sum()) == 0:
            raise MetricError("PartInterpretability.compute() called before any update()")
        cat = self.default_categories() if categories is None else class_indices(categories, c, self.num_classes, "categories")
        p_fck = self.hits.double() / self.with_part.double()[None]  # NaN where no image with k
        p_fk = p_fck[torch.arange(c), cat]  # (C, P)
        filled = torch.nan_to_num(p_fk, nan=-1.0)
        best_val, best = filled.max(dim=1)
        none = best_val < 0
        per_filter = torch.where(none, torch.full_like(best_val, float("nan")), best_val)
        ok = ~none
        return PartInterpretabilityResult(
            score=float(per_filter[ok].mean()) if bool(ok.any()) else float("nan"),
            per_filter=per_filter,
            per_filter_part=p_fk,
            best_part=torch.where(none, torch.full_like(best, -1), best),
            category=cat,
            per_filter_class_part=p_fck,
            images_with_part=self.with_part.clone(),
            mean_activation=self.mean_activation(),
            part_names=list(self.part_names),
        )
