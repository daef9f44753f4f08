"""Mode "upsample" regions as row intervals against the per-pixel generator they replace.

``reference_intervals`` is the former ``part_iou._upsample_pixels`` with its wrapper
``_upsample_intervals`` (one pixel at a time, as one-pixel intervals), kept here unchanged as the
brute-force reference: the row intervals must decide every pixel exactly as it does, rounding
included.
"""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icnn.metrics import part_iou
from icnn.metrics.dissection import NetworkDissection
from icnn.metrics.part_iou import (
    MetricError,
    PartInterpretability,
    filter_regions,
    region_overlaps,
)
from icnn.metrics.quantile import TopQuantile
from icnn.metrics.receptive_field import compose, conv_geometry


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the chunks here are tiny, and on a shared 2-core machine every parallel
    region (``repeat_interleave`` always opens one) waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the former generator
def _pixel_table(lo, t, ncell, dtype, device):
    count = torch.bincount(lo, minlength=ncell)
    start = count.cumsum(0) - count
    off = torch.arange(max(int(count.max()), 1))
    valid = off[None, :] < count[:, None]
    pix = (start[:, None] + off[None, :]).clamp(max=len(lo) - 1)
    return pix.to(device), t[pix].to(device, dtype), valid.to(device)


def reference_intervals(maps, thr, cx, cy, image_hw, chunk_bytes):
    big_h, big_w = image_hw
    n, h, w = maps.shape
    dt = maps.dtype if maps.dtype.is_floating_point else torch.float32
    maps, dev = maps.to(dt), maps.device
    x0, _, tx = part_iou._axis_weights(cx, big_w)
    y0, _, ty = part_iou._axis_weights(cy, big_h)
    ncx, ncy = max(w - 1, 1), max(h - 1, 1)
    px_t, tx_t, vx_t = _pixel_table(x0, tx, ncx, dt, dev)
    py_t, ty_t, vy_t = _pixel_table(y0, ty, ncy, dt, dev)
    act = maps > thr[:, None, None]
    if h > 1:
        act = act[:, :-1] | act[:, 1:]
    if w > 1:
        act = act[:, :, :-1] | act[:, :, 1:]
    cells = act.nonzero()
    step = max(1, int(chunk_bytes) // (px_t.shape[1] * py_t.shape[1] * 16))
    for start in range(0, len(cells), step):
        k, a, b = cells[start : start + step].unbind(1)
        ah, bh = (a + 1 if h > 1 else a), (b + 1 if w > 1 else b)
        txc, tyc = tx_t[b], ty_t[a]
        row_a = maps[k, a, b][:, None] * (1 - txc) + maps[k, a, bh][:, None] * txc
        row_b = maps[k, ah, b][:, None] * (1 - txc) + maps[k, ah, bh][:, None] * txc
        val = row_a[:, None, :] * (1 - tyc)[:, :, None] + row_b[:, None, :] * tyc[:, :, None]
        inside = (val > thr[k][:, None, None]) & vy_t[a][:, :, None] & vx_t[b][:, None, :]
        c, oy, ox = inside.nonzero().unbind(1)
        x = px_t[b[c], ox]
        yield k[c], py_t[a[c], oy], x, x


# --------------------------------------------------------------------------- helpers
def coverage(chunks, n, image_hw):
    """How many intervals cover each pixel: ``(n, H, W)`` int (checks each interval's bounds)."""
    big_h, big_w = image_hw
    edges = torch.zeros(n, big_h, big_w + 1, dtype=torch.int32)
    for k, row, x0, x1 in chunks:
        assert bool(((0 <= x0) & (x0 <= x1) & (x1 < big_w) & (0 <= row) & (row < big_h)).all())
        one = torch.ones_like(k, dtype=torch.int32)
        edges.index_put_((k, row, x0), one, accumulate=True)
        edges.index_put_((k, row, x1 + 1), -one, accumulate=True)
    return edges.cumsum(-1)[..., :big_w]


def assert_same_regions(maps, thr, image_hw, centers=None, chunk_bytes=1 << 20, masks=None):
    """New intervals == reference pixels, each pixel once; and the same overlaps / dense regions."""
    n, h, w = maps.shape
    cx, cy = part_iou._grid_axes(centers, h, w, image_hw)
    got = coverage(part_iou._upsample_intervals(maps, thr, cx, cy, image_hw, chunk_bytes), n, image_hw)
    ref = coverage(reference_intervals(maps, thr, cx, cy, image_hw, 1 << 20), n, image_hw)
    assert got.numel() == 0 or int(got.max()) <= 1  # disjoint
    assert torch.equal(got, ref)
    if masks is not None:  # through the public functions, maps as (1, n, h, w)
        kw = {"centers": centers, "chunk_bytes": chunk_bytes}
        inter, area = region_overlaps(maps[None], thr, masks, **kw)
        ref_b = ref.bool()
        assert torch.equal(area[0], ref.sum((-2, -1)).long())
        assert torch.equal(inter[0], (ref_b[:, None] & masks[0, None]).sum((-2, -1)))
        assert torch.equal(filter_regions(maps[None], thr, image_hw, **kw)[0], ref_b)
    return ref


def random_maps(g, n, h, w, style):
    m = torch.relu(torch.randn(n, h, w, generator=g))
    if style == "ties":  # few distinct values: units equal to the threshold, flat cells
        return (m * 2).round() / 2
    if style == "flat":  # every cell nearly flat: rows within rounding of the threshold
        return 0.5 + (torch.rand(n, h, w, generator=g) - 0.5) * 1e-6
    if style == "scales":
        return m * 10 ** (torch.rand(n, 1, 1, generator=g) * 8 - 4)
    return m


def own_thresholds(g, maps):
    """Each map's threshold is one of its own values (as the quantile's are), ties included."""
    flat = maps.flatten(1)
    return flat[torch.arange(len(maps)), torch.randint(0, flat.shape[1], (len(maps),), generator=g)]


def geometry(stride, offset):
    return SimpleNamespace(stride=(stride, stride), offset=(offset, offset))


# --------------------------------------------------------------------------- properties
@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    big_h=st.integers(1, 40),
    big_w=st.integers(1, 40),
    style=st.sampled_from(["relu", "ties", "flat", "scales"]),
    grid=st.sampled_from(["netdissect", "geometry", "random"]),
    chunk_bytes=st.sampled_from([1, 1 << 12, 1 << 20]),
)
def test_matches_per_pixel_reference(seed, h, w, big_h, big_w, style, grid, chunk_bytes):
    # image smaller or larger than the map grid, 1xN / Nx1 maps, centres on or off pixel
    # centres (beyond the image too), chunks that split the cells and the band
    g = torch.Generator().manual_seed(seed)
    maps = random_maps(g, 5, h, w, style)
    if grid == "netdissect":
        centers = None
    elif grid == "geometry":
        centers = geometry(max(1, big_w // max(w, 1)), float(torch.randint(-3, 3, (1,), generator=g)) / 2)
    else:  # increasing, arbitrary spacing
        x = torch.rand(w, generator=g, dtype=torch.float64).mul(big_w + 4).sub(2).sort().values
        y = torch.rand(h, generator=g, dtype=torch.float64).mul(big_h + 4).sub(2).sort().values
        x, y = x + torch.arange(w) * 1e-3, y + torch.arange(h) * 1e-3  # strictly increasing
        centers = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), -1)
    masks = torch.rand(1, 2, big_h, big_w, generator=g) < 0.4
    assert_same_regions(maps, own_thresholds(g, maps), (big_h, big_w), centers, chunk_bytes, masks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_match(dtype):
    g = torch.Generator().manual_seed(5)
    for style in ("relu", "ties", "flat"):
        maps = random_maps(g, 6, 3, 4, style)
        if style == "flat" and dtype != torch.float64:
            maps = 0.5 + (maps - 0.5) * 1e4  # as near the rounding of a coarser dtype
        maps = maps.to(dtype)
        assert_same_regions(maps, own_thresholds(g, maps), (17, 23), chunk_bytes=20000)


def test_non_finite_units_match():
    g = torch.Generator().manual_seed(2)
    maps = torch.relu(torch.randn(6, 3, 3, generator=g)) + 1
    maps[0, 1, 1], maps[1, 0, 2], maps[2, 2, 0], maps[3, 1, 1] = float("nan"), float("inf"), -float("inf"), 1e38
    assert_same_regions(maps, torch.full((6,), 1.5), (12, 12))


@pytest.mark.parametrize("h,w,image_hw", [(1, 5, (7, 30)), (5, 1, (30, 7)), (1, 1, (9, 9)), (6, 6, (3, 2))])
def test_line_maps_and_small_images(h, w, image_hw):
    g = torch.Generator().manual_seed(h * 10 + w)
    for style in ("relu", "ties", "flat"):
        maps = random_maps(g, 8, h, w, style)
        masks = torch.rand(1, 2, *image_hw, generator=g) < 0.5
        assert_same_regions(maps, own_thresholds(g, maps), image_hw, masks=masks)


def test_a_row_of_a_cell_can_be_several_runs():
    # nearly flat cells: rounding makes a row of a cell alternate in and out, so the region is
    # not one interval per (cell, row) there - the band's pixels are tested one by one
    g = torch.Generator().manual_seed(0)
    maps = 0.5 + (torch.rand(40, 2, 2, generator=g, dtype=torch.float64) - 0.5).float() * 1e-6
    ref = assert_same_regions(maps, own_thresholds(g, maps), (33, 40))
    runs = (torch.diff(ref.int(), dim=-1) == 1).sum(-1) + ref[..., 0].int()
    assert int(runs.max()) >= 2


@pytest.mark.parametrize(
    "n,big,centers",
    [
        (7, 224, compose(*[conv_geometry(3, 2, 1)] * 5)),  # EfficientNet-Lite0-like: stride 32
        (14, 224, compose(*[conv_geometry(3, 1, 1), conv_geometry(2, 2, 0)] * 4)),  # VGG-16 conv5_3-like
        (7, 224, None),  # NetDissect-Lite grid
    ],
)
def test_realistic_layer_matches(n, big, centers):
    # thresholds at the 0.5% quantile of ReLU maps; real geometries put unit centres on pixel
    # centres (weights exactly 0) and leave wide margins beyond the last centre
    g = torch.Generator().manual_seed(n)
    maps = torch.relu(torch.randn(6, 64, n, n, generator=g))
    tq = TopQuantile(64, 6 * n * n)
    tq.update(maps)
    thr = tq.compute()
    flat = maps.reshape(-1, n, n)
    assert_same_regions(flat, thr.repeat(6), (big, big), centers, chunk_bytes=1 << 16)


def test_chunks_and_band_pieces_do_not_change_the_intervals():
    g = torch.Generator().manual_seed(4)
    maps = random_maps(g, 12, 4, 5, "flat")
    thr = own_thresholds(g, maps)
    cx, cy = part_iou._grid_axes(None, 4, 5, (20, 25))
    counts = [coverage(part_iou._upsample_intervals(maps, thr, cx, cy, (20, 25), cb), 12, (20, 25))
              for cb in (1, 700, 1 << 24)]
    assert torch.equal(counts[0], counts[1]) and torch.equal(counts[0], counts[2])


# --------------------------------------------------------------------------- one pass, two metrics
@pytest.mark.parametrize("mode", ["upsample", "rf"])
def test_shared_overlaps_equal_separate_updates(mode):
    g = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(8, 6, 4, 4, generator=g))
    masks = torch.rand(8, 3, 16, 16, generator=g) < 0.3
    labels = torch.randint(0, 2, (8,), generator=g)
    tq = TopQuantile(6, 8 * 16, q=0.1)
    tq.update(maps)
    kw = {"mode": mode, "centers": geometry(4, 1.5)}
    pi_a, pi_b = (PartInterpretability(tq.compute(), 3, 2, **kw) for _ in range(2))
    nd_a, nd_b = (NetworkDissection(tq.compute(), 3, **kw) for _ in range(2))
    for idx in torch.split(torch.arange(8), [3, 5]):
        pi_a.update(maps[idx], masks[idx], labels[idx])
        nd_a.update(maps[idx], masks[idx])
        ov = pi_b.overlaps(maps[idx], masks[idx])
        pi_b.update(maps[idx], masks[idx], labels[idx], overlaps=ov)
        nd_b.update(maps[idx], masks[idx], overlaps=ov)
    assert torch.equal(pi_a.hits, pi_b.hits) and torch.equal(pi_a.act_sum, pi_b.act_sum)
    assert torch.equal(nd_a.inter, nd_b.inter) and torch.equal(nd_a.union(), nd_b.union())
    with pytest.raises(MetricError, match="overlaps must be"):
        nd_b.update(maps[:2], masks[:2], overlaps=ov)
