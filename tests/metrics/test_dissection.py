import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnn.metrics.dissection import NetworkDissection
from icnn.metrics.part_iou import filter_regions
from icnn.metrics.quantile import MetricError, TopQuantile


def brute_dissection(maps, masks, thr):
    """Loops over filters, concepts, images; regions from F.interpolate (NetDissect-Lite grid)."""
    b, c = maps.shape[:2]
    k = masks.shape[1]
    up = F.interpolate(maps, size=masks.shape[2:], mode="bilinear", align_corners=False)
    inter = np.zeros((c, k))
    union = np.zeros((c, k))
    for f in range(c):
        for i in range(b):
            region = (up[i, f] > thr[f]).numpy()
            if not bool((maps[i, f] > thr[f]).any()):  # no active unit: no region
                region[:] = False
            for kk in range(k):
                m = masks[i, kk].numpy()
                inter[f, kk] += (region & m).sum()
                union[f, kk] += (region | m).sum()
    return inter, union


def test_hand_sums():
    # one filter, one concept, two 8x8 images with 2x2 maps (unit centres at 2 and 6 px).
    # Image 0: unit (0, 0) = 1, others 0, threshold 0.5. The bilinear factor along an axis is
    # 1, 1, .875, .625 at pixels 0..3 and below .5 after, so the region is the 4x4 corner block
    # minus pixel (3, 3) (.625^2 < .5): 15 pixels. Image 1: silent, no region.
    maps = torch.zeros(2, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    thr = torch.tensor([0.5])
    region = filter_regions(maps, thr, (8, 8))[:, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    expected[3, 3] = False
    assert torch.equal(region[0], expected) and int(region[1].sum()) == 0
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # 4 pixels inside the region
    masks[1, 0, 6:, 6:] = True  # 4 pixels on the image without a region
    nd = NetworkDissection(thr, ["head"])
    nd.update(maps, masks)
    assert nd.inter.tolist() == [[4]]
    assert nd.union().tolist() == [[15 + 8 - 4]]  # sum|M| + sum|L| - sum|M n L|
    r = nd.compute()
    assert r.iou.tolist() == [[4 / 19]]
    assert r.is_detector.tolist() == [True] and r.unique_concepts == 1


def test_detector_threshold_strict_and_unique_concepts():
    # craft counts directly: IoU exactly 0.04 is not a detector, above is
    nd = NetworkDissection(torch.zeros(4), ["a", "b", "c"])
    nd.inter = torch.tensor([[1, 0, 0], [0, 2, 0], [3, 0, 1], [0, 0, 0]])
    nd.region_area = torch.tensor([10, 10, 10, 10])
    nd.concept_area = torch.tensor([16, 30, 40])
    nd.images = 1
    r = nd.compute()
    # filter 0: a = 1/25 = 0.04 exactly -> not a detector; filter 1: b = 2/38; filter 2: a = 3/23
    assert r.best_concept.tolist() == [0, 1, 0, 0]
    assert r.is_detector.tolist() == [False, True, True, False]
    assert r.num_detectors == 2
    assert r.unique_concepts == 2
    assert r.concept_counts.tolist() == [1, 1, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_and_streaming_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.relu(torch.randn(9, 6, 3, 3, generator=g))
    masks = torch.rand(9, 4, 12, 12, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.0])[None, :, None, None]
    tq = TopQuantile(6, 9 * 9, q=0.2)
    tq.update(maps)
    thr = tq.compute()
    inter, union = brute_dissection(maps, masks, thr)

    one = NetworkDissection(thr, 4)
    one.update(maps, masks)
    np.testing.assert_array_equal(one.inter.numpy(), inter)
    np.testing.assert_array_equal(one.union().numpy(), union)
    r = one.compute()
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(r.iou.numpy(), inter / union, equal_nan=True)
    assert r.num_detectors == int(((inter / union).max(1) > 0.04).sum())

    streamed = NetworkDissection(thr, 4, chunk_bytes=1)
    for idx in torch.split(torch.arange(9), [2, 2, 5]):
        streamed.update(maps[idx], masks[idx])
    assert torch.equal(streamed.inter, one.inter) and torch.equal(streamed.union(), one.union())
    assert torch.equal(streamed.compute().best_concept, r.best_concept)


def test_rf_mode_runs_and_bad_input():
    ctr = torch.stack(torch.broadcast_tensors(
        (torch.arange(3.0) * 4 + 2.5)[None, :], (torch.arange(3.0) * 4 + 2.5)[:, None]), -1)
    nd = NetworkDissection(torch.tensor([0.5]), 1, mode="rf", centers=ctr, radius=1.0)
    maps = torch.zeros(1, 1, 3, 3)
    maps[0, 0, 1, 1] = 1.0
    masks = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    masks[0, 0, 6, 6] = True
    nd.update(maps, masks)
    assert nd.compute().iou.tolist() == [[1 / 5]]
    with pytest.raises(MetricError, match="concept_masks"):
        nd.update(maps, torch.zeros(1, 2, 12, 12, dtype=torch.bool))
    with pytest.raises(MetricError, match="before any update"):
        NetworkDissection(torch.tensor([0.5]), 1).compute()
