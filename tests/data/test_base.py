"""Geometry of crop + resize: landmarks, boxes and masks follow the pixels exactly."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from icnn.data.base import (
    DatasetError,
    PartDataset,
    Record,
    check_box,
    crop_region,
    flip_permutation,
    hash_split,
    hflip_sample,
    resize_image,
    resize_masks,
    transform_box,
    transform_points,
)


def test_transform_points_hand_computed():
    # crop 50 wide x 100 high -> output (H, W) = (50, 100): sx = 2, sy = 0.5
    crop = (10.0, 20.0, 60.0, 120.0)
    pts = np.array([[35.0, 70.0], [10.0, 20.0], [60.0, 120.0], [np.nan, np.nan]])
    out = transform_points(pts, crop, (50, 100))
    np.testing.assert_allclose(out[:3], [[50.0, 25.0], [0.0, 0.0], [100.0, 50.0]])
    assert np.isnan(out[3]).all()


def test_crop_region_margin_and_clamp():
    # box 20 x 10 at (10, 10); margin 0.5 grows by 10 / 5 px each side; clamp at 0 and the image
    assert crop_region((10.0, 10.0, 30.0, 20.0), 0.5, 100, 100) == (0.0, 5.0, 40.0, 25.0)
    assert crop_region((10.0, 10.0, 30.0, 20.0), 0.5, 35, 22) == (0.0, 5.0, 35.0, 22.0)
    np.testing.assert_allclose(transform_box((10.0, 10.0, 30.0, 20.0), (0.0, 5.0, 40.0, 25.0), (40, 80)), [20, 10, 60, 30])


def test_check_box_errors_name_the_file():
    assert check_box([1, 2, 3, 4], 10, 10, "a.jpg") == (1.0, 2.0, 3.0, 4.0)
    for bad in ([5, 2, 3, 4], [0, 0, 50, 5], [np.nan, 0, 1, 1]):
        with pytest.raises(DatasetError, match="a.jpg"):
            check_box(bad, 10, 10, "a.jpg")


def test_single_pixel_image_mask_and_landmark_agree():
    # one bright pixel at column 30, row 40 (centre (30.5, 40.5)); crop 20x20 -> 40x40 (scale 2)
    arr = np.zeros((60, 50, 3), dtype=np.uint8)
    arr[40, 30] = 255
    crop = (20.0, 30.0, 40.0, 50.0)
    lm = transform_points(np.array([[30.5, 40.5]]), crop, (40, 40))
    np.testing.assert_allclose(lm, [[21.0, 21.0]])
    mask = np.zeros((1, 60, 50), dtype=bool)
    mask[0, 40, 30] = True
    m = resize_masks(mask, crop, (40, 40))[0]
    rows, cols = torch.nonzero(m, as_tuple=True)
    assert sorted(set(rows.tolist())) == [20, 21] and sorted(set(cols.tolist())) == [20, 21]
    img = resize_image(Image.fromarray(arr), crop, (40, 40))[0]  # (40, 40)
    yy, xx = torch.meshgrid(torch.arange(40) + 0.5, torch.arange(40) + 0.5, indexing="ij")
    cx, cy = (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()
    assert abs(cx - 21.0) < 1e-4 and abs(cy - 21.0) < 1e-4


@settings(max_examples=60, deadline=None)
@example(x0=0, y0=0, w=16, h=1, out_h=1, out_w=12, px=5, py=0)  # a centre on a pixel border (CI found it)
@given(
    x0=st.integers(0, 20), y0=st.integers(0, 20), w=st.integers(1, 25), h=st.integers(1, 25),
    out_h=st.integers(1, 30), out_w=st.integers(1, 30), px=st.integers(0, 44), py=st.integers(0, 44),
)  # fmt: skip
def test_mask_resize_matches_brute_force_and_landmark(x0, y0, w, h, out_h, out_w, px, py):
    """Nearest resize = brute force sampling at output pixel centres; a landmark at a pixel's
    centre lands inside that pixel's resized footprint whenever the footprint is non-empty."""
    crop = (float(x0), float(y0), float(x0 + w), float(y0 + h))
    mask = np.zeros((1, 45, 45), dtype=bool)
    mask[0, py, px] = True
    got = resize_masks(mask, crop, (out_h, out_w))[0].numpy()
    sx, sy = out_w / w, out_h / h
    # source coordinate of output centre u: x0 + (2u + 1) w / (2 out_w), in exact integers; a centre
    # exactly on a pixel border (a tie) may take either neighbour (PIL's fixed point picks one)
    num_c, num_r = (2 * np.arange(out_w) + 1) * w, (2 * np.arange(out_h) + 1) * h
    src_c, src_r = x0 + num_c // (2 * out_w), y0 + num_r // (2 * out_h)
    tie_c, tie_r = num_c % (2 * out_w) == 0, num_r % (2 * out_h) == 0
    want = mask[0][src_r[:, None], src_c[None, :]]
    allowed = np.zeros_like(got)
    for dr in (0, 1):
        for dc in (0, 1):
            rr, cc = src_r - dr * tie_r, src_c - dc * tie_c
            allowed |= got == mask[0][rr[:, None], cc[None, :]]
    assert allowed.all(), (got, want)
    assert (got == want)[~tie_r[:, None] & ~tie_c[None, :]].all()  # no tie: exactly the pixel under the centre
    p = transform_points(np.array([[px + 0.5, py + 0.5]]), crop, (out_h, out_w))[0]
    # inverse map is exact
    np.testing.assert_allclose(p / [sx, sy] + [x0, y0], [px + 0.5, py + 0.5], rtol=0, atol=1e-4)
    if want.any():
        rows, cols = np.nonzero(want)
        assert cols.min() - 1e-4 <= p[0] <= cols.max() + 1 + 1e-4
        assert rows.min() - 1e-4 <= p[1] <= rows.max() + 1 + 1e-4


def test_flip_permutation_and_hflip():
    assert flip_permutation(["left eye", "right eye", "head", "Left_Leg", "right_leg"]) == [1, 0, 2, 4, 3]
    assert flip_permutation(["left wing"]) == [0]  # twin absent: stays
    sample = {
        "image": torch.arange(6.0).reshape(1, 1, 6).expand(3, 2, 6).clone(),
        "box": torch.tensor([1.0, 0.0, 3.0, 2.0]),
        "landmarks": torch.tensor([[1.5, 0.5], [4.0, 1.0]]),
        "part_masks": torch.tensor([[[True, False, False, False, False, False]] * 2, [[False] * 6] * 2]),
    }
    out = hflip_sample(sample, [1, 0], [1, 0])
    assert out["image"][0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert out["box"].tolist() == [3.0, 0.0, 5.0, 2.0]
    assert out["landmarks"].tolist() == [[2.0, 1.0], [4.5, 0.5]]  # swapped, x -> 6 - x
    assert out["part_masks"][1, 0].tolist() == [False] * 5 + [True]
    assert not out["part_masks"][0].any()


def test_hash_split_is_deterministic_and_proportional():
    keys = [f"img{i}.jpg" for i in range(2000)]
    test = [k for k in keys if hash_split(k, 0.3) == "test"]
    assert test == [k for k in keys if hash_split(k, 0.3) == "test"]
    assert 0.25 < len(test) / len(keys) < 0.35


def _png(path, w, h, value=128):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def test_part_dataset_sample_contract_and_skip_bad(tmp_path):
    good = _png(tmp_path / "a.png", 40, 20)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    recs = [
        Record(path=good, label=0, box=(10.0, 0.0, 30.0, 20.0), landmarks=np.array([[20.0, 10.0], [0.0, 0.0]])),
        Record(path=bad, label=0, box=None, landmarks=np.full((2, 2), np.nan)),
        Record(path=good, label=0, box=(0.0, 0.0, 80.0, 20.0), landmarks=np.full((2, 2), np.nan), key="outside"),
    ]
    ds = PartDataset(recs, classes=["x"], landmark_names=["a", "b"], image_size=(8, 16))
    s = ds[0]
    assert s["image"].shape == (3, 8, 16) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["label"].dtype == torch.int64 and s["index"].item() == 0
    np.testing.assert_allclose(s["landmarks"][0], [8.0, 4.0])
    assert torch.isnan(s["landmarks"][1]).all()  # (0, 0) is outside the crop [10, 30] -> NaN
    np.testing.assert_allclose(s["box"], [0, 0, 16, 8])
    with pytest.raises(DatasetError, match="b.png"):
        ds[1]
    with pytest.raises(DatasetError, match="outside"):
        ds[2]
    skip = PartDataset(recs, classes=["x"], landmark_names=["a", "b"], image_size=8, skip_bad=True)
    assert len(skip) == 1 and skip.num_skipped == 2
    assert any("b.png" in f for f, _ in skip.skipped)
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["landmarks"].shape == (2, 2, 2)
