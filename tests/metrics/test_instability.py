import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icnn.metrics.instability import (
    LocationInstability,
    MetricError,
    argmax_units,
    as_unit_centers,
    instability_references,
)

NAN = float("nan")


def grid_centers(h, w, stride=4, offset=0):
    return as_unit_centers(SimpleNamespace(stride=(stride, stride), offset=(offset, offset)), h, w)


# --------------------------------------------------------------------------- brute force reference
def brute_instability(scores, unit_xy, landmarks, labels, hw, nc, top_k, categories=None):
    """Plain loops over filters, classes, landmarks, images (numpy), ties -> earlier image."""
    scores, unit_xy, landmarks = (np.asarray(a, dtype=np.float64) for a in (scores, unit_xy, landmarks))
    labels = np.asarray(labels)
    n, c = scores.shape
    k = landmarks.shape[1]
    diag = math.sqrt(hw[0] ** 2 + hw[1] ** 2)
    d = np.full((c, nc, k), np.nan)
    parts = np.zeros((nc, k), dtype=bool)
    for cls in range(nc):
        for kk in range(k):
            imgs = [i for i in range(n) if labels[i] == cls and not np.isnan(landmarks[i, kk]).any()]
            parts[cls, kk] = len(imgs) > 0
            for f in range(c):
                ranked = sorted(imgs, key=lambda i: (-scores[i, f], i))[:top_k]
                dist = [np.linalg.norm(landmarks[i, kk] - unit_xy[i, f]) / diag for i in ranked]
                if len(dist) >= 2:
                    d[f, cls, kk] = np.std(dist)  # population std (ddof = 0)
    per_filter = []
    for f in range(c):
        vals = []
        for cls in range(nc):
            ks = [d[f, cls, kk] for kk in range(k) if parts[cls, kk] and not np.isnan(d[f, cls, kk])]
            vals.append(np.mean(ks) if ks else np.nan)
        if categories is None:
            finite = [v for v in vals if not np.isnan(v)]
            per_filter.append(min(finite) if finite else np.nan)
        else:
            per_filter.append(vals[categories[f]])
    per_filter = np.array(per_filter)
    return d, per_filter, float(np.nanmean(per_filter))


def random_stream(seed, n=23, c=4, k=3, nc=2, hw=(40, 30)):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (n, c), generator=g).double()  # many ties
    unit_xy = torch.rand(n, c, 2, generator=g, dtype=torch.float64) * torch.tensor([hw[1], hw[0]])
    landmarks = torch.rand(n, k, 2, generator=g, dtype=torch.float64) * torch.tensor([hw[1], hw[0]])
    landmarks[torch.rand(n, k, generator=g) < 0.3] = NAN
    labels = torch.randint(0, nc, (n,), generator=g)
    return scores, unit_xy, landmarks, labels


# --------------------------------------------------------------------------- hand-made cases
def test_filter_on_the_landmark_has_zero_instability():
    # the filter always fires at the unit on the landmark; landmarks move from image to image
    ctr = grid_centers(5, 5, stride=8)
    n = 7
    ii, jj = torch.arange(n) % 5, (3 * torch.arange(n)) % 5
    maps = torch.zeros(n, 1, 5, 5)
    maps[torch.arange(n), 0, ii, jj] = 1.0 + torch.arange(n).float()
    landmarks = ctr[ii, jj][:, None, :].clone()  # (n, 1, 2)
    li = LocationInstability(1, ["head"])
    li.update_maps(maps, ctr, landmarks, None, (40, 40))
    r = li.compute()
    assert r.score == 0.0
    assert r.per_filter_landmark.tolist() == [[0.0]]


def test_constant_offset_from_landmark_is_stable():
    # fires 2 units right of the landmark every time: distance constant -> D = 0
    ctr = grid_centers(6, 6, stride=4)
    maps = torch.zeros(4, 1, 6, 6)
    rows, cols = torch.tensor([0, 2, 5, 3]), torch.tensor([0, 1, 3, 2])
    maps[torch.arange(4), 0, rows, cols + 2] = 1.0
    landmarks = ctr[rows, cols][:, None, :]
    li = LocationInstability(1, 1)
    li.update_maps(maps, ctr, landmarks, None, (24, 24))
    assert li.compute().score == pytest.approx(0.0, abs=1e-15)


def test_hand_computed_std():
    # image 30 x 40 -> diagonal 50; distances 5, 10, 15 px -> 0.1, 0.2, 0.3 -> population std
    unit_xy = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    landmarks = torch.tensor([[[3.0, 4.0]], [[6.0, 8.0]], [[9.0, 12.0]]])
    li = LocationInstability(1, 1)
    li.update(torch.tensor([[1.0], [2.0], [3.0]]), unit_xy, landmarks, None, (30, 40))
    expected = np.std([0.1, 0.2, 0.3])  # sqrt(2/3) * 0.1
    assert li.compute().score == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.sqrt(2 / 3) * 0.1)


def test_top_k_picks_the_highest_scores():
    # 5 images; the top-3 by score (images 1, 3, 4) are at distances 0, 10, 20 px; the others are far
    unit_xy = torch.zeros(5, 1, 2)
    dist_px = torch.tensor([100.0, 0.0, 90.0, 10.0, 20.0])
    landmarks = torch.stack((dist_px, torch.zeros(5)), dim=-1)[:, None, :]
    scores = torch.tensor([[1.0], [5.0], [2.0], [4.0], [3.0]])
    li = LocationInstability(1, 1, top_k=3)
    li.update(scores, unit_xy, landmarks, None, (100, 100))
    diag = math.sqrt(2) * 100
    assert li.compute().score == pytest.approx(np.std([0.0, 10 / diag, 20 / diag]), rel=1e-12)
    assert li.top_images()[0, 0, 0].tolist() == [1, 3, 4]


def test_ties_earlier_image_wins_whatever_the_batching():
    scores = torch.ones(6, 1)
    unit_xy = torch.zeros(6, 1, 2)
    landmarks = torch.arange(6.0)[:, None, None].expand(6, 1, 2).clone()
    for split in ([6], [1, 5], [2, 2, 2], [5, 1]):
        li = LocationInstability(1, 1, top_k=3)
        for s, u, lm in zip(scores.split(split), unit_xy.split(split), landmarks.split(split)):
            li.update(s, u, lm, None, (10, 10))
        assert li.top_images()[0, 0, 0].tolist() == [0, 1, 2]


def test_absent_landmarks_are_skipped_and_counted():
    unit_xy = torch.zeros(4, 1, 2)
    landmarks = torch.tensor([[[3.0, 4.0]], [[NAN, NAN]], [[6.0, 8.0]], [[NAN, 1.0]]])
    li = LocationInstability(1, 1)
    li.update(torch.ones(4, 1), unit_xy, landmarks, None, (30, 40))
    r = li.compute()
    assert r.counts.tolist() == [[[2]]]
    assert r.annotated.tolist() == [[2]]
    assert r.score == pytest.approx(np.std([0.1, 0.2]))


def test_single_image_has_no_spread():
    li = LocationInstability(1, 1)
    li.update(torch.ones(1, 1), torch.zeros(1, 1, 2), torch.ones(1, 1, 2), None, (10, 10))
    assert math.isnan(li.compute().per_filter[0])


def test_multi_category_min_and_assigned_category():
    # class 0: distances 0.1/0.3 (std 0.1); class 1: 0.2/0.2 (std 0) on landmark 0 and
    # 0.0/0.4 (std 0.2) on landmark 1 -> class means 0.1 and 0.1 ... make them differ:
    unit_xy = torch.zeros(6, 1, 2)
    # image size 30x40 (diag 50): a landmark at (x, 0) is at distance x / 50
    xs = torch.tensor([[5.0, NAN], [15.0, NAN], [10.0, 0.0], [10.0, 20.0], [0.0, NAN], [0.0, NAN]])
    landmarks = torch.stack((xs, torch.where(torch.isnan(xs), xs, torch.zeros_like(xs))), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    li = LocationInstability(1, ["a", "b"], num_classes=3)
    li.update(torch.ones(6, 1), unit_xy, landmarks, labels, (30, 40))
    r = li.compute()
    # class 0: only landmark a: std(0.1, 0.3) = 0.1; class 1: a -> 0, b -> std(0, 0.4) = 0.2 -> 0.1;
    # class 2: a -> 0 (both at the unit) -> 0: the min picks class 2
    assert r.per_filter_class[0].tolist() == pytest.approx([0.1, 0.1, 0.0])
    assert r.category.tolist() == [2]
    assert r.score == 0.0
    r1 = li.compute(categories=torch.tensor([1]))
    assert r1.score == pytest.approx(0.1)
    assert r1.per_filter_landmark[0].tolist() == pytest.approx([0.0, 0.2])


def test_silent_fraction():
    maps = torch.zeros(4, 2, 3, 3)
    maps[:3, 0, 1, 1] = 1.0
    li = LocationInstability(2, 1)
    li.update_maps(maps, grid_centers(3, 3), torch.ones(4, 1, 2), None, (12, 12))
    assert li.compute().silent_fraction.tolist() == [0.25, 1.0]


def test_silent_images_in_the_top_and_the_firing_only_score():
    # image 30 x 40 -> diagonal 50. Two firing images at 0.1 and 0.2, two silent ones (score 0,
    # argmax at the corner) at 0.5 and 0.0: with top_k 4 the silent ones enter the statistic.
    unit_xy = torch.zeros(4, 1, 2)
    landmarks = torch.tensor([[[3.0, 4.0]], [[6.0, 8.0]], [[15.0, 20.0]], [[0.0, 0.0]]])
    scores = torch.tensor([[2.0], [1.0], [0.0], [0.0]])
    li = LocationInstability(1, 1, top_k=4)
    li.update(scores, unit_xy, landmarks, None, (30, 40))
    r = li.compute()
    assert r.score == pytest.approx(np.std([0.1, 0.2, 0.5, 0.0]), rel=1e-12)
    assert r.score_firing == pytest.approx(0.05, rel=1e-12)
    assert r.silent_in_top == 0.5
    assert r.summary()["silent_in_top"] == 0.5
    # top-2 holds only firing images: the two figures agree and nothing silent is counted
    li2 = LocationInstability(1, 1, top_k=2)
    li2.update(scores, unit_xy, landmarks, None, (30, 40))
    r2 = li2.compute()
    assert r2.score == r2.score_firing == pytest.approx(0.05, rel=1e-12)
    assert r2.silent_in_top == 0.0


def test_a_filter_silent_everywhere_has_no_firing_score():
    li = LocationInstability(1, 1)
    li.update(torch.zeros(3, 1), torch.zeros(3, 1, 2), torch.rand(3, 1, 2) * 10, None, (10, 10))
    r = li.compute()
    assert math.isfinite(r.score) and r.silent_in_top == 1.0
    assert math.isnan(r.score_firing)


# --------------------------------------------------------------------------- brute force + streaming
def brute_firing(scores, unit_xy, landmarks, labels, hw, nc, top_k, categories):
    """Brute force of ``score_firing`` and ``silent_in_top`` at given categories: the kept images
    are the top-k of each (filter, class, landmark), the firing ones those with score > 0."""
    scores, unit_xy, landmarks = (np.asarray(a, dtype=np.float64) for a in (scores, unit_xy, landmarks))
    labels = np.asarray(labels)
    n, c = scores.shape
    k = landmarks.shape[1]
    diag = math.sqrt(hw[0] ** 2 + hw[1] ** 2)
    per_filter, silent, used = [], 0, 0
    for f in range(c):
        cls = categories[f]
        ks_all, ks_firing, kept = [], [], []
        for kk in range(k):
            imgs = [i for i in range(n) if labels[i] == cls and not np.isnan(landmarks[i, kk]).any()]
            ranked = sorted(imgs, key=lambda i: (-scores[i, f], i))[:top_k]
            if len(ranked) >= 2:
                ks_all.append(kk)
                kept.append(ranked)
            firing = [i for i in ranked if scores[i, f] > 0]
            if len(firing) >= 2:
                ks_firing.append(np.std([np.linalg.norm(landmarks[i, kk] - unit_xy[i, f]) / diag for i in firing]))
        if ks_all:  # the filter enters ``score``
            for ranked in kept:
                used += len(ranked)
                silent += sum(scores[i, f] <= 0 for i in ranked)
        per_filter.append(np.mean(ks_firing) if ks_firing else np.nan)
    return float(np.nanmean(per_filter)), silent / used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_firing_only_score_matches_brute_force(seed):
    scores, unit_xy, landmarks, labels = random_stream(seed)  # scores 0..5: many silent entries
    hw = (40, 30)
    li = LocationInstability(4, 3, num_classes=2, top_k=5)
    li.update(scores, unit_xy, landmarks, labels, hw)
    cats = torch.tensor([0, 1, 1, 0])
    r = li.compute(categories=cats)
    firing_ref, silent_ref = brute_firing(scores, unit_xy, landmarks, labels, hw, 2, 5, cats.tolist())
    assert r.score_firing == pytest.approx(firing_ref, rel=1e-12)
    assert r.silent_in_top == pytest.approx(silent_ref, rel=1e-12)
    assert 0 < r.silent_in_top < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_and_streaming_is_exact(seed):
    scores, unit_xy, landmarks, labels = random_stream(seed)
    hw = (40, 30)
    d_ref, pf_ref, score_ref = brute_instability(scores, unit_xy, landmarks, labels, hw, nc=2, top_k=5)

    one = LocationInstability(4, 3, num_classes=2, top_k=5)
    one.update(scores, unit_xy, landmarks, labels, hw)
    r = one.compute()
    np.testing.assert_allclose(r.per_filter_class_landmark.numpy(), d_ref, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(r.per_filter.numpy(), pf_ref, rtol=1e-12)
    assert r.score == pytest.approx(score_ref, rel=1e-12)

    streamed = LocationInstability(4, 3, num_classes=2, top_k=5)
    for idx in torch.split(torch.arange(len(scores)), [3, 1, 9, 10]):
        streamed.update(scores[idx], unit_xy[idx], landmarks[idx], labels[idx], hw)
    s = streamed.compute()
    assert torch.equal(s.per_filter_class_landmark.nan_to_num(-1), r.per_filter_class_landmark.nan_to_num(-1))
    assert s.score == r.score
    assert torch.equal(streamed.top_images(), one.top_images())

    cats = torch.tensor([0, 1, 1, 0])
    _, pf_cat, score_cat = brute_instability(scores, unit_xy, landmarks, labels, hw, 2, 5, cats.tolist())
    rc = one.compute(categories=cats)
    np.testing.assert_allclose(rc.per_filter.numpy(), pf_cat, rtol=1e-12)


def test_argmax_units_first_max_and_centres():
    maps = torch.zeros(1, 2, 2, 3)
    maps[0, 0, 1, 2] = 3.0
    maps[0, 1] = 1.0  # all tied: first unit (0, 0)
    ctr = grid_centers(2, 3, stride=10, offset=2)
    scores, xy = argmax_units(maps, ctr)
    assert scores.tolist() == [[3.0, 1.0]]
    assert xy.tolist() == [[[2 + 20 + 0.5, 2 + 10 + 0.5], [2.5, 2.5]]]


def test_geometry_duck_typing():
    geom = SimpleNamespace(stride=(16, 8), offset=(-1, 3))
    ctr = as_unit_centers(geom, 2, 3)
    assert ctr[1, 2].tolist() == [3 + 8 * 2 + 0.5, -1 + 16 * 1 + 0.5]
    with_method = SimpleNamespace(unit_centers=lambda h, w: ctr)
    assert torch.equal(as_unit_centers(with_method, 2, 3), ctr)
    with pytest.raises(MetricError, match="centers must be"):
        as_unit_centers(torch.zeros(3, 3, 2), 2, 3)


def test_bad_input_messages():
    li = LocationInstability(2, 1)
    with pytest.raises(MetricError, match="unit_xy"):
        li.update(torch.ones(3, 2), torch.zeros(3, 1, 2), torch.zeros(3, 1, 2), None, (4, 4))
    with pytest.raises(MetricError, match="image_hw"):
        li.update(torch.ones(3, 2), torch.zeros(3, 2, 2), torch.zeros(3, 1, 2), None, None)
    with pytest.raises(MetricError, match="labels"):
        li.update(torch.ones(3, 2), torch.zeros(3, 2, 2), torch.zeros(3, 1, 2), torch.tensor([0, 1, 0]), (4, 4))
    with pytest.raises(MetricError, match="finite"):
        li.update(torch.full((3, 2), NAN), torch.zeros(3, 2, 2), torch.zeros(3, 1, 2), None, (4, 4))


# --------------------------------------------------------------------------- reference points
def brute_fixed_unit(landmarks, labels, hw, ctr, nc):
    """Loops: every unit as an always-there filter over all annotated images; min over units."""
    landmarks, labels, ctr = np.asarray(landmarks), np.asarray(labels), np.asarray(ctr).reshape(-1, 2)
    diag = math.sqrt(hw[0] ** 2 + hw[1] ** 2)
    best = np.inf
    for u in range(len(ctr)):
        per_class = []
        for cls in range(nc):
            ds = []
            for kk in range(landmarks.shape[1]):
                imgs = [i for i in range(len(labels)) if labels[i] == cls and not np.isnan(landmarks[i, kk]).any()]
                if len(imgs) >= 2:
                    ds.append(np.std([np.linalg.norm(landmarks[i, kk] - ctr[u]) / diag for i in imgs]))
            if ds:
                per_class.append(np.mean(ds))
        best = min(best, min(per_class))
    return best


def test_fixed_unit_reference_matches_brute_force():
    _, _, landmarks, labels = random_stream(5, n=30)
    ctr = grid_centers(3, 4, stride=8, offset=1)
    ref = instability_references(landmarks, labels, (40, 30), ctr, num_classes=2, draws=2)
    assert ref.fixed == pytest.approx(brute_fixed_unit(landmarks, labels, (40, 30), ctr, 2), rel=1e-12)
    assert ref.fixed_per_unit.shape == (3, 4)
    assert ref.fixed == float(ref.fixed_per_unit[ref.fixed_unit])


def test_fixed_unit_first_k_equals_stream_with_constant_scores():
    # a constant-score filter in the stream keeps the first top_k images (tie rule): feeding every
    # unit as a filter must reproduce fixed_top_k = top_k
    _, _, landmarks, labels = random_stream(6, n=25)
    ctr = grid_centers(2, 3, stride=10)
    n, u = len(labels), 6
    li = LocationInstability(u, 3, num_classes=2, top_k=4)
    li.update(torch.ones(n, u), ctr.reshape(1, u, 2).expand(n, u, 2), landmarks, labels, (40, 30))
    ref = li.references(ctr, draws=2, fixed_top_k=4)
    stream = li.compute()
    assert ref.fixed == pytest.approx(float(stream.per_filter.min()), rel=1e-12)


def test_random_reference_equals_a_layer_of_random_filters():
    # rebuild the Monte-Carlo draws and feed them to the streaming metric as R filters
    _, _, landmarks, labels = random_stream(7, n=40)
    ctr = grid_centers(4, 4, stride=8)
    draws, seed, n = 6, 123, len(labels)
    ref = instability_references(landmarks, labels, (40, 30), ctr, num_classes=2, top_k=7, draws=draws, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    units = torch.randint(16, (draws, n), generator=gen)
    rscore = torch.rand(draws, n, generator=gen, dtype=torch.float64)
    li = LocationInstability(draws, 3, num_classes=2, top_k=7)
    li.update(rscore.t(), ctr.reshape(16, 2)[units.t()], landmarks, labels, (40, 30))
    assert ref.random == pytest.approx(li.compute().score, rel=1e-12)
    again = instability_references(landmarks, labels, (40, 30), ctr, num_classes=2, top_k=7, draws=draws, seed=seed)
    assert again.random == ref.random  # deterministic per seed


def test_random_reference_close_to_independent_estimate():
    # independent numpy Monte-Carlo of E[std_I d] with all images (top_k >= N): same expectation
    rng = np.random.default_rng(0)
    n = 60
    lm = rng.uniform(0, 32, size=(n, 1, 2))
    ctr = grid_centers(4, 4, stride=8)
    ref = instability_references(torch.from_numpy(lm), None, (32, 32), ctr, draws=400, seed=1)
    c = ctr.reshape(-1, 2).numpy()
    est = np.mean([
        np.std(np.linalg.norm(lm[:, 0] - c[rng.integers(0, 16, n)], axis=1) / math.sqrt(2 * 32**2))
        for _ in range(4000)
    ])
    assert ref.random == pytest.approx(est, rel=0.02)
    assert ref.fixed < ref.random


# --------------------------------------------------------------------------- landmark units (exact part detectors)
def test_landmark_unit_reference_by_hand():
    # units centred at 5, 15, 25 on a 30 x 30 image (diagonal 30 sqrt 2); landmarks A and B
    ctr = as_unit_centers(SimpleNamespace(stride=(10, 10), offset=(4.5, 4.5)), 3, 3)
    lm = torch.tensor([[[6.0, 4.0], [25.0, 25.0]], [[14.0, 16.0], [25.0, 5.0]]], dtype=torch.float64)
    ref = instability_references(lm, None, (30, 30), ctr, draws=2)
    # A's detector at (5, 5) then (15, 15): sqrt 2 from A both times (D_AA = 0); B at 20 sqrt 2 and
    # 10 sqrt 2, so D_AB = std(2/3, 1/3) = 1/6
    assert float(ref.landmark_unit[0]) == pytest.approx((0 + 1 / 6) / 2, rel=1e-12)
    # B's detector at (25, 25) then (25, 5): D_BB = 0, A at sqrt 802 and sqrt 242
    d_ba = abs(math.sqrt(802) - math.sqrt(242)) / (30 * math.sqrt(2)) / 2
    assert float(ref.landmark_unit[1]) == pytest.approx(d_ba / 2, rel=1e-12)
    assert ref.best_landmark_unit == pytest.approx(d_ba / 2, rel=1e-12)
    assert ref.mean_landmark_unit == pytest.approx((1 / 12 + d_ba / 2) / 2, rel=1e-12)
    assert {"best_landmark_unit", "mean_landmark_unit"} <= set(ref.summary())


def brute_landmark_unit(landmarks, labels, hw, ctr, nc, categories=None):
    """Loops: for each landmark j, a filter at the unit nearest j on the images showing j."""
    landmarks, labels, ctr = np.asarray(landmarks), np.asarray(labels), np.asarray(ctr).reshape(-1, 2)
    diag = math.sqrt(hw[0] ** 2 + hw[1] ** 2)
    n, k = landmarks.shape[:2]
    out = []
    for j in range(k):
        per_class = []
        for cls in range(nc):
            ds = []
            for kk in range(k):
                imgs = [i for i in range(n) if labels[i] == cls and not np.isnan(landmarks[i, kk]).any()
                        and not np.isnan(landmarks[i, j]).any()]  # fmt: skip
                if len(imgs) >= 2:
                    at = [ctr[np.argmin(((ctr - landmarks[i, j]) ** 2).sum(-1))] for i in imgs]
                    ds.append(np.std([np.linalg.norm(landmarks[i, kk] - a) / diag for i, a in zip(imgs, at)]))
            per_class.append(np.mean(ds) if ds else np.nan)
        per_class = np.array(per_class)
        if categories is None:
            out.append(np.nanmin(per_class) if not np.isnan(per_class).all() else np.nan)
        else:
            out.append(np.nanmean(per_class[np.asarray(categories)]))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_landmark_unit_reference_matches_brute_force(seed):
    _, _, landmarks, labels = random_stream(20 + seed, n=30)
    ctr = grid_centers(3, 4, stride=8, offset=1)
    ref = instability_references(landmarks, labels, (40, 30), ctr, num_classes=2, draws=2, chunk_elements=50)
    np.testing.assert_allclose(ref.landmark_unit.numpy(), brute_landmark_unit(landmarks, labels, (40, 30), ctr, 2), rtol=1e-12)
    cats = torch.tensor([0, 1, 1])
    ref_c = instability_references(landmarks, labels, (40, 30), ctr, num_classes=2, draws=2, categories=cats)
    np.testing.assert_allclose(ref_c.landmark_unit.numpy(), brute_landmark_unit(landmarks, labels, (40, 30), ctr, 2, cats),
                               rtol=1e-12)  # fmt: skip


def test_landmark_unit_reference_is_the_stream_figure_of_a_filter_on_the_landmark():
    # every landmark present: the detector is a filter whose argmax is the landmark's unit, scores
    # tied, top_k = all images -> LocationInstability gives the same figure
    g = torch.Generator().manual_seed(3)
    n, k = 17, 3
    lm = torch.rand(n, k, 2, generator=g, dtype=torch.float64) * 32
    ctr = grid_centers(4, 4, stride=8)
    near = ((lm[:, :, None] - ctr.reshape(1, 1, 16, 2)) ** 2).sum(-1).argmin(-1)  # (n, K)
    li = LocationInstability(k, k, top_k=n)
    li.update(torch.ones(n, k), ctr.reshape(16, 2)[near], lm, None, (32, 32))
    ref = li.references(ctr, draws=2)
    np.testing.assert_allclose(ref.landmark_unit.numpy(), li.compute().per_filter.numpy(), rtol=1e-12)


@pytest.mark.parametrize("interpretable", [False, True])
def test_multi_category_evaluation_reports_both_readings_and_the_filters_per_category(interpretable):
    # paper §5.2.2: min over classes (ordinary nets) and each filter's category (interpretable
    # ones); a multi-category evaluation gives both, whichever the twin, and the filters per category
    from icnn.data import build_dataset
    from icnn.evaluate import EvalConfig, MetricSuite, evaluate
    from icnn.metrics.receptive_field import layer_geometry
    from icnn.models import build_model

    torch.manual_seed(0)
    data = build_dataset("synthetic", split="test", task="multi", image_size=32, num_samples=16)
    net = build_model("small_cnn", num_classes=len(data.classes), interpretable=interpretable, image_size=32)
    cfg = EvalConfig(device="cpu", progress=False, batch_size=5)
    m = evaluate(net, data, cfg).metrics
    suite = MetricSuite(data, layer_geometry(net, "new"), cfg, interpretable=interpretable, single=False)
    net.eval()
    with torch.no_grad():
        for s in range(0, len(data), 5):
            batch = torch.utils.data.default_collate([data[i] for i in range(s, min(s + 5, len(data)))])
            feats = net.forward_features(batch["image"])
            suite.update(feats.masked["new"], batch, feats.relu["new"])
    suite.compute()
    cats = suite.categories()
    assert m["location_instability_min_class"] == pytest.approx(suite.inst.compute().score, rel=1e-12)
    assert m["location_instability_assigned"] == pytest.approx(suite.inst.compute(cats).score, rel=1e-12)
    assert m["location_instability"] == m["location_instability_assigned" if interpretable else "location_instability_min_class"]
    assert m["location_instability_min_class"] <= m["location_instability_assigned"] + 1e-12  # a min is never above a pick
    shares = m["filters_per_category"]
    assert list(shares) == [str(c) for c in data.classes] and sum(shares.values()) == net.layers["new"].body.conv.out_channels
    assert [shares[str(c)] for c in data.classes] == torch.bincount(cats, minlength=len(data.classes)).tolist()


def test_evaluate_names_a_head_that_does_not_match_the_classes():
    from icnn.data import build_dataset
    from icnn.evaluate import EvalConfig, evaluate
    from icnn.models import build_model

    data = build_dataset("synthetic", split="test", task="multi", image_size=32, num_samples=4)
    net = build_model("small_cnn", num_classes=len(data.classes) + 3, image_size=32)
    with pytest.raises(ValueError, match=f"{len(data.classes) + 3} outputs, the dataset {len(data.classes)} classes"):
        evaluate(net, data, EvalConfig(device="cpu", progress=False))
