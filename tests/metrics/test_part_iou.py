import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnn.metrics.part_iou import (
    MetricError,
    PartInterpretability,
    filter_regions,
    region_overlaps,
    resolve_radius,
)
from icnn.metrics.quantile import TopQuantile


def centers_grid(h, w, stride, offset=0.0):
    x = offset + stride * torch.arange(w, dtype=torch.float64) + 0.5
    y = offset + stride * torch.arange(h, dtype=torch.float64) + 0.5
    return torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)  # (h, w, 2)


# --------------------------------------------------------------------------- brute force reference
def brute_region(m, t, image_hw, mode, ctr, radius):
    """One map (h, w) -> (H, W) bool with explicit per-pixel loops (numpy)."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    big_h, big_w = image_hw
    if ctr is None:
        cx = (np.arange(w) + 0.5) * big_w / w
        cy = (np.arange(h) + 0.5) * big_h / h
    else:
        cx, cy = np.asarray(ctr)[0, :, 0], np.asarray(ctr)[:, 0, 1]
    out = np.zeros((big_h, big_w), dtype=bool)
    if m.max() <= t:
        return out
    for py in range(big_h):
        for px in range(big_w):
            x, y = px + 0.5, py + 0.5
            if mode == "rf":
                out[py, px] = any(
                    (x - cx[j]) ** 2 + (y - cy[i]) ** 2 <= radius**2
                    for i in range(h) for j in range(w) if m[i, j] > t
                )
                continue

            def lerp(c, v):
                if v <= c[0]:
                    return 0, 0, 0.0
                if v >= c[-1]:
                    return len(c) - 1, len(c) - 1, 0.0
                lo = int(np.searchsorted(c, v, side="right")) - 1
                return lo, lo + 1, (v - c[lo]) / (c[lo + 1] - c[lo])

            j0, j1, tx = lerp(cx, x)
            i0, i1, ty = lerp(cy, y)
            val = (1 - ty) * ((1 - tx) * m[i0, j0] + tx * m[i0, j1]) + ty * ((1 - tx) * m[i1, j0] + tx * m[i1, j1])
            out[py, px] = val > t
    return out


def brute_part_interpretability(maps, masks, labels, thr, nc, categories, mode, ctr, radius):
    """Loops over filters and images: P_fk = mean over images of the category with part k."""
    b, c = maps.shape[:2]
    p = masks.shape[1]
    image_hw = masks.shape[2:]
    p_f = []
    for f in range(c):
        hits, n = np.zeros(p), np.zeros(p)
        for i in range(b):
            if labels[i] != categories[f]:
                continue
            region = brute_region(maps[i, f], float(thr[f]), image_hw, mode, ctr, radius)
            for k in range(p):
                mk = np.asarray(masks[i, k])
                if not mk.any():
                    continue
                n[k] += 1
                iou = (region & mk).sum() / (region | mk).sum()
                hits[k] += iou > 0.2
        with np.errstate(invalid="ignore"):
            pk = hits / n
        p_f.append(np.nanmax(pk) if (n > 0).any() else np.nan)
    p_f = np.array(p_f)
    return p_f, float(np.nanmean(p_f))


def random_case(seed, b=10, c=5, h=3, w=4, big=(12, 16), p=3, nc=2):
    g = torch.Generator().manual_seed(seed)
    maps = torch.relu(torch.randn(b, c, h, w, generator=g))
    masks = torch.zeros(b, p, *big, dtype=torch.bool)
    for k in range(p):  # random boxes, some empty
        y0 = torch.randint(0, big[0] - 3, (b,), generator=g)
        x0 = torch.randint(0, big[1] - 3, (b,), generator=g)
        hh = torch.randint(0, 9, (b,), generator=g)
        ww = torch.randint(0, 12, (b,), generator=g)
        yy = torch.arange(big[0])[None, :, None]
        xx = torch.arange(big[1])[None, None, :]
        masks[:, k] = (yy >= y0[:, None, None]) & (yy < (y0 + hh)[:, None, None]) & (xx >= x0[:, None, None]) & (
            xx < (x0 + ww)[:, None, None]
        )
    labels = torch.randint(0, nc, (b,), generator=g)
    tq = TopQuantile(c, b * h * w, q=0.15)
    tq.update(maps)
    return maps, masks, labels, tq.compute()


# --------------------------------------------------------------------------- hand-made cases
def hand_map():
    # 4x4 map on a 16x16 image (stride 4, NetDissect-Lite grid: unit centres at 2, 6, 10, 14 px)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 1, 1] = 1.0
    return m


def test_upsample_region_by_hand_and_iou_one():
    # along x the bilinear factor at pixels 4..7 is 0.625, 0.875, 0.875, 0.625 (0 outside 3..8 > 0.5
    # only there); the product exceeds 0.5 on the 4x4 block minus its corners (0.625^2 < 0.5)
    region = filter_regions(hand_map(), torch.tensor([0.5]), (16, 16))[0, 0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 4:8] = True
    expected[[4, 4, 7, 7], [4, 7, 4, 7]] = False
    assert torch.equal(region, expected)
    pi = PartInterpretability(torch.tensor([0.5]), ["head", "tail"])
    masks = torch.stack((expected, torch.zeros(16, 16, dtype=torch.bool)))[None]
    masks[0, 1, 12:, 12:] = True  # the tail: missed entirely
    inter, area = region_overlaps(hand_map(), torch.tensor([0.5]), masks)
    assert inter.tolist() == [[[12, 0]]] and area.tolist() == [[12]]
    pi.update(hand_map(), masks)
    r = pi.compute()
    assert r.per_filter_part.tolist() == [[1.0, 0.0]]
    assert r.score == 1.0 and r.best_part.tolist() == [0]


def test_rf_disk_region_by_hand():
    # unit centres on pixel centres (x.5); radius 1 -> the centre pixel and its 4 neighbours
    ctr = centers_grid(4, 4, stride=4, offset=2)  # centres at 2.5, 6.5, 10.5, 14.5
    region = filter_regions(hand_map(), torch.tensor([0.5]), (16, 16), mode="rf", centers=ctr, radius=1.0)[0, 0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[[6, 5, 7, 6, 6], [6, 6, 6, 5, 7]] = True
    assert torch.equal(region, expected)
    # radius 1.5: the 3x3 block (corners at sqrt(2) <= 1.5)
    region = filter_regions(hand_map(), torch.tensor([0.5]), (16, 16), mode="rf", centers=ctr, radius=1.5)[0, 0]
    assert int(region.sum()) == 9 and bool(region[5:8, 5:8].all())


def test_rf_union_of_disks_and_default_radius():
    ctr = centers_grid(4, 4, stride=4, offset=2)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 1, 1] = m[0, 0, 1, 2] = 2.0  # two neighbouring active units
    assert resolve_radius("stride", ctr, 4, 4, (16, 16)) == 4.0
    region = filter_regions(m, torch.tensor([1.0]), (16, 16), mode="rf", centers=ctr)[0, 0]
    ref = brute_region(m[0, 0], 1.0, (16, 16), "rf", ctr, 4.0)
    assert np.array_equal(region.numpy(), ref)
    assert bool(region[6, 6]) and bool(region[6, 10]) and bool(region[6, 8])  # connected


def test_iou_threshold_is_strict_and_exact():
    # region of 5 pixels (the plus shape), part = 1 of them: IoU = 1/5 = 0.2, not > 0.2
    ctr = centers_grid(4, 4, stride=4, offset=2)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[0, 0, 6, 6] = True
    pi = PartInterpretability(torch.tensor([0.5]), 1, mode="rf", centers=ctr, radius=1.0)
    pi.update(hand_map(), mask)
    assert pi.compute().score == 0.0
    mask[0, 0, 6, 7] = True  # IoU = 2/5 > 0.2
    pi = PartInterpretability(torch.tensor([0.5]), 1, mode="rf", centers=ctr, radius=1.0)
    pi.update(hand_map(), mask)
    assert pi.compute().score == 1.0


def test_p_fk_is_a_mean_over_images_with_the_part():
    # 4 images: the part is absent on image 3 (not counted); the map covers it on images 0 and 2
    maps = hand_map().expand(4, 1, 4, 4).clone()
    region = filter_regions(hand_map(), torch.tensor([0.5]), (16, 16))[0, 0]
    masks = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    masks[0, 0], masks[2, 0] = region, region
    masks[1, 0, 0:2, 0:2] = True  # missed
    pi = PartInterpretability(torch.tensor([0.5]), 1)
    pi.update(maps, masks)
    r = pi.compute()
    assert r.per_filter_part.tolist() == [[2 / 3]]
    assert r.images_with_part.tolist() == [[3]]


def test_silent_maps_have_empty_regions():
    maps = torch.zeros(2, 3, 4, 4)
    masks = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    inter, area = region_overlaps(maps, torch.zeros(3), masks)
    assert int(inter.sum()) == 0 and int(area.sum()) == 0


def test_default_category_skips_classes_without_parts():
    # single-category layout: class 0 = negatives (no masks) where the filter fires more,
    # class 1 = target; the filter must be evaluated on the target
    maps = torch.zeros(4, 1, 4, 4)
    maps[:2] = 5.0  # negatives
    maps[2:, 0, 1, 1] = 1.0
    region = filter_regions(hand_map(), torch.tensor([0.5]), (16, 16))[0, 0]
    masks = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    masks[2:, 0] = region
    pi = PartInterpretability(torch.tensor([0.5]), 1, num_classes=2)
    pi.update(maps, masks, torch.tensor([0, 0, 1, 1]))
    r = pi.compute()
    assert r.category.tolist() == [1]
    assert r.score == 1.0
    assert r.mean_activation[0].tolist() == [80.0, 1.0]


def test_multi_category_argmax_assignment():
    # filter 0 fires most on class 2, filter 1 on class 0
    maps = torch.zeros(3, 2, 2, 2)
    maps[:, 0] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    maps[:, 1] = torch.tensor([3.0, 2.0, 1.0])[:, None, None]
    masks = torch.ones(3, 1, 4, 4, dtype=torch.bool)
    pi = PartInterpretability(torch.tensor([10.0, 10.0]), 1, num_classes=3)
    pi.update(maps, masks, torch.tensor([0, 1, 2]))
    assert pi.default_categories().tolist() == [2, 0]


# --------------------------------------------------------------------------- references
def test_upsample_without_centres_is_f_interpolate():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 4, 5, 7, generator=g)
    thr = torch.full((4,), 0.6)
    got = filter_regions(maps, thr, (20, 21))
    up = F.interpolate(maps, size=(20, 21), mode="bilinear", align_corners=False)
    assert torch.equal(got, up > 0.6)


@pytest.mark.parametrize("mode", ["upsample", "rf"])
def test_regions_match_brute_force(mode):
    maps, masks, labels, thr = random_case(0, b=3, c=3)
    ctr = centers_grid(3, 4, stride=4, offset=-1)
    got = filter_regions(maps, thr, (12, 16), mode=mode, centers=ctr, radius=3.0)
    for i in range(3):
        for f in range(3):
            ref = brute_region(maps[i, f], float(thr[f]), (12, 16), mode, ctr, 3.0)
            assert np.array_equal(got[i, f].numpy(), ref), (i, f)


@pytest.mark.parametrize("mode", ["upsample", "rf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_and_streaming_is_exact(mode, seed):
    maps, masks, labels, thr = random_case(seed)
    ctr = centers_grid(3, 4, stride=4)
    kw = dict(mode=mode, centers=ctr, radius=2.5)
    one = PartInterpretability(thr, 3, num_classes=2, **kw)
    one.update(maps, masks, labels)
    r = one.compute()
    cats = r.category.numpy()
    pf, score = brute_part_interpretability(maps, masks, labels, thr, 2, cats, mode, ctr, 2.5)
    np.testing.assert_allclose(r.per_filter.numpy(), pf, equal_nan=True)
    assert r.score == pytest.approx(score)

    streamed = PartInterpretability(thr, 3, num_classes=2, chunk_bytes=1, **kw)  # 1 filter per chunk
    for idx in torch.split(torch.arange(len(maps)), [1, 3, 6]):
        streamed.update(maps[idx], masks[idx], labels[idx])
    s = streamed.compute()
    assert torch.equal(streamed.hits, one.hits)
    assert torch.equal(streamed.act_sum, one.act_sum)
    assert torch.equal(s.category, r.category)
    assert s.score == r.score or (math.isnan(s.score) and math.isnan(r.score))

    fixed = torch.tensor([1, 0, 1, 1, 0])
    pf_c, _ = brute_part_interpretability(maps, masks, labels, thr, 2, fixed.numpy(), mode, ctr, 2.5)
    np.testing.assert_allclose(one.compute(fixed).per_filter.numpy(), pf_c, equal_nan=True)


def test_category_sums_do_not_depend_on_batching():
    # magnitudes over 16 decades: a plain per-batch sum rounds differently for another batching
    # (checked: it does for this seed); the sequential running sum does not
    g = torch.Generator().manual_seed(9)
    maps = torch.rand(50, 7, 3, 3, generator=g, dtype=torch.float64)
    maps = maps * 10 ** (torch.rand(50, 7, 3, 3, generator=g, dtype=torch.float64) * 16 - 8)
    masks = torch.zeros(50, 1, 6, 6, dtype=torch.bool)
    labels = torch.randint(0, 3, (50,), generator=g)
    a = PartInterpretability(torch.full((7,), 1e9), 1, num_classes=3)
    a.update(maps, masks, labels)
    b = PartInterpretability(torch.full((7,), 1e9), 1, num_classes=3)
    for idx in torch.split(torch.arange(50), [7, 1, 20, 22]):
        b.update(maps[idx], masks[idx], labels[idx])
    assert torch.equal(a.act_sum, b.act_sum)


def test_bad_input_messages():
    with pytest.raises(MetricError, match="mode='rf' needs centers"):
        PartInterpretability(torch.zeros(2), 1, mode="rf")
    with pytest.raises(MetricError, match="mode must be"):
        PartInterpretability(torch.zeros(2), 1, mode="box")
    pi = PartInterpretability(torch.zeros(2), 2)
    with pytest.raises(MetricError, match="part_masks"):
        pi.update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 6, 6, dtype=torch.bool))
    with pytest.raises(MetricError, match="thresholds"):
        region_overlaps(torch.zeros(1, 2, 3, 3), torch.zeros(3), torch.zeros(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(MetricError, match="radius"):
        resolve_radius("huge", None, 3, 3, (6, 6))


@pytest.mark.parametrize("mode,radius", [("upsample", "stride"), ("rf", 6.0), ("rf", "stride"), ("rf", 0.7)])
def test_overlaps_equal_dense_regions(mode, radius):
    # heavily overlapping disks (radius 6 > stride 4) must be counted once; a tiny radius may hold
    # no pixel centre at all
    maps, masks, labels, thr = random_case(4, b=4, c=4)
    ctr = centers_grid(3, 4, stride=4, offset=0.25)  # centres off the pixel grid
    region = filter_regions(maps, thr, (12, 16), mode=mode, centers=ctr, radius=radius)
    inter, area = region_overlaps(maps, thr, masks, mode=mode, centers=ctr, radius=radius, chunk_bytes=4000)
    assert torch.equal(area, region.sum(dim=(-2, -1)))
    assert torch.equal(inter, (region[:, :, None] & masks[:, None]).sum(dim=(-2, -1)))
    for i in range(2):
        for f in range(4):
            r = radius if isinstance(radius, float) else 4.0
            ref = brute_region(maps[i, f], float(thr[f]), (12, 16), mode, ctr, r)
            assert np.array_equal(region[i, f].numpy(), ref)


def test_geometry_object_and_rf_radius():
    from types import SimpleNamespace

    geom = SimpleNamespace(stride=(4, 4), offset=(2, 2), size=(6, 10))  # centres 2.5, 6.5, ...
    assert resolve_radius("rf", geom, 4, 4, (16, 16)) == 4.0  # half the mean RF size
    assert resolve_radius("stride", geom, 4, 4, (16, 16)) == 4.0
    thr = torch.tensor([0.5])
    got = filter_regions(hand_map(), thr, (16, 16), mode="rf", centers=geom, radius=1.0)
    ctr = centers_grid(4, 4, stride=4, offset=2)
    assert torch.equal(got, filter_regions(hand_map(), thr, (16, 16), mode="rf", centers=ctr, radius=1.0))
    with pytest.raises(MetricError, match="radius='rf' needs a geometry"):
        resolve_radius("rf", ctr, 4, 4, (16, 16))


def test_part_interpretability_references_score_one_unit_regions_by_the_same_rule():
    """The references of part interpretability (evaluate's region pass): a pseudo-filter firing at
    one random unit per image, and the best fixed unit. On 2x2 maps of 8x8 images whose part is
    the top-left quadrant, the unit (0, 0) region is the part: a filter always firing there scores
    1, as the best fixed unit does; the random unit scores the share of images whose draw was (0, 0)."""
    from icnn.evaluate import _region_pass

    n, seed = 24, 3
    masks = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    masks[:, 0, :4, :4] = True
    maps = torch.zeros(n, 2, 2, 2)
    maps[:, 0, 0, 0] = 1.0  # filter 0: always at the part's unit
    maps[:, 1, 1, 1] = 1.0  # filter 1: always at the opposite unit
    labels = torch.zeros(n, dtype=torch.long)
    batches = [(maps[i:i + 8], masks[i:i + 8], labels[i:i + 8]) for i in range(0, n, 8)]
    pres, _, refs = _region_pass(batches, torch.full((2,), 0.5), ["part"], 1, mode="upsample", centers=None,
                                 iou_threshold=0.2, dissection_threshold=0.04, categories=torch.zeros(2, dtype=torch.long),
                                 progress=False, seed=seed)  # fmt: skip
    assert pres.per_filter.tolist() == [1.0, 0.0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.cat([torch.randint(4, (8, 1), generator=g)[:, 0] for _ in range(3)])
    assert refs["best_fixed_unit"] == 1.0
    assert refs["random_unit"] == pytest.approx(float((draws == 0).double().mean()))
    assert 0 < refs["random_unit"] < 1
    # several draws: their mean
    _, _, refs3 = _region_pass(batches, torch.full((2,), 0.5), ["part"], 1, mode="upsample", centers=None,
                               iou_threshold=0.2, dissection_threshold=0.04, categories=torch.zeros(2, dtype=torch.long),
                               progress=False, seed=seed, draws=3)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    draws3 = torch.cat([torch.randint(4, (8, 3), generator=g) for _ in range(3)])
    assert refs3["random_unit"] == pytest.approx(float((draws3 == 0).double().mean()))
    assert refs3["best_fixed_unit"] == 1.0


def test_per_unit_quantile_rule_is_one_unit_per_image_on_the_maps_grid():
    """quantile_rule=per_unit sets p = 1/(h w) from the evaluated layer's map size: the same
    numbers as giving that p by hand, recorded in metrics.json."""
    from icnn.data import build_dataset
    from icnn.evaluate import EvalConfig, evaluate
    from icnn.models import build_model

    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=1, image_size=32)
    data = build_dataset("synthetic", split="test", task="single", image_size=32, num_samples=12)
    h, w = net.layer_shapes()["new"][1:]
    auto = evaluate(net, data, EvalConfig(device="cpu", quantile_rule="per_unit", progress=False, batch_size=6)).metrics
    hand = evaluate(net, data, EvalConfig(device="cpu", quantile=1.0 / (h * w), progress=False, batch_size=6)).metrics
    assert auto["quantile"] == pytest.approx(1.0 / (h * w)) and auto["quantile"] != EvalConfig().quantile
    assert auto["part_interpretability"] == hand["part_interpretability"]
    assert auto["dissection"] == hand["dissection"]
