"""Report figures (paper Fig. 4, 5, 6; metric bars): valid PNGs, input handling, exact densities."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from icnn.report import (
    ReportError,
    filter_panel,
    location_density,
    location_heatmap,
    metric_bars,
    part_heatmap,
    top_images,
)
from icnn.report.figures import _best_part_counts

RNG = np.random.default_rng(0)
IMG = RNG.random((3, 16, 16))  # (3, H, W) in [0, 1]
X = RNG.random((4, 4))  # (h, w)
MASK = np.linspace(-1, 1, 16).reshape(4, 4)
RF = np.zeros((16, 16), dtype=bool)
RF[4:9, 6:12] = True


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png))
    im.load()
    assert im.width > 50 and im.height > 50
    return np.asarray(im.convert("RGB"))


def test_filter_panel_png_distinct_and_deterministic():
    a = filter_panel(IMG, X, MASK, X * (MASK > 0), RF, title="filter 0")
    b = filter_panel(IMG, X, MASK, X * (MASK > 0), ~RF, title="filter 0")  # other region
    pa, pb = _decode(a), _decode(b)
    assert pa.shape == pb.shape and not np.array_equal(pa, pb)
    assert filter_panel(IMG, X, MASK, X * (MASK > 0), RF, title="filter 0") == a  # no timestamps in PNG
    assert b"matplotlib.org" not in a  # no Software text chunk (no URL in the report)


def test_filter_panel_layouts_and_tensors_agree():
    heat = RNG.random((16, 16))
    ref = filter_panel(IMG, X, MASK, X, heat)
    # (H, W, 3) torch tensors (float64 kept as is) draw the same figure as (3, H, W) numpy arrays
    tens = filter_panel(torch.from_numpy(IMG).permute(1, 2, 0), torch.from_numpy(X), torch.from_numpy(MASK), X,
                        torch.from_numpy(heat))
    assert tens == ref


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(rf=np.zeros((8, 8))), "rf: shape (8, 8)"),
        (dict(mask=np.zeros((3, 4))), "must have one shape"),
        (dict(x=np.zeros((2, 4, 4))), "x: expected a 2-D map"),
        (dict(image=np.zeros((5, 16, 16))), "image: expected an image"),
    ],
)
def test_filter_panel_bad_input(kwargs, needle):
    args = dict(image=IMG, x=X, mask=MASK, masked=X, rf=RF) | kwargs
    with pytest.raises(ReportError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        filter_panel(**args)


def test_top_images_grid_and_errors():
    images = [IMG, np.moveaxis(IMG, 0, -1), RNG.random((3, 12, 20))]  # sizes may differ
    regions = [RF, RNG.random((16, 16)), np.ones((12, 20), dtype=bool)]
    one_row = _decode(top_images(images, regions, [3.0, 2.0, 1.0], ncols=3))
    two_rows = _decode(top_images(images, regions, [3.0, 2.0, 1.0], ncols=2))
    assert two_rows.shape[0] > one_row.shape[0]  # 2 rows are taller than 1
    with pytest.raises(ReportError, match="one region"):
        top_images(images, regions[:2], [1.0, 2.0, 3.0])
    with pytest.raises(ReportError, match=r"regions\[2\]: shape \(16, 16\)"):
        top_images(images, regions[:2] + [RF], None)


def test_best_part_counts_hand_computed():
    m = np.array([[0.1, 0.5], [0.7, 0.2], [0.0, 0.0], [np.nan, 0.3], [np.nan, np.nan]])
    best, assigned, counts = _best_part_counts(m)
    assert best[assigned].tolist() == [1, 0, 1]
    assert assigned.tolist() == [True, True, False, True, False]  # silent / all-NaN rows: no part
    assert counts.tolist() == [1, 2]


def test_part_heatmap_matrix_and_counts():
    names = ["head", "torso", "legs"]
    a = _decode(part_heatmap(RNG.random((60, 3)), names))  # many rows: no per-row labels
    b = _decode(part_heatmap(np.eye(3), names, row_names=["f0", "f1", "f2"]))
    c = _decode(part_heatmap(np.array([4, 0, 2]), names))  # 1-D: counts per part
    assert not np.array_equal(a, b) and c.shape != b.shape
    with pytest.raises(ReportError, match="num_parts = 3"):
        part_heatmap(np.zeros((5, 4)), names)
    with pytest.raises(ReportError, match="row_names has 2 names"):
        part_heatmap(np.zeros((5, 3)), names, row_names=["a", "b"])


def test_location_density_exact():
    pts = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.6], [np.nan, 0.5], [1.5, 0.5]])  # (x, y)
    d = location_density(pts, size=(2, 2), sigma=0)
    # rows are y: y=0.1 -> row 0 (x=0.1 -> col 0, x=0.9 -> col 1); y=0.6 -> row 1; NaN / outside dropped
    np.testing.assert_allclose(d, np.array([[1, 1], [0, 1]]) / 3)
    smooth = location_density(RNG.normal([0.275, 0.775], 0.02, size=(50, 2)), size=(20, 20), sigma=1.5)
    assert np.isclose(smooth.sum(), 1.0) and np.unravel_index(smooth.argmax(), smooth.shape) == (15, 5)
    assert location_density(np.full((3, 2), np.nan)).sum() == 0


def test_location_heatmap_with_and_without_background():
    d = location_density(RNG.random((30, 2)), size=(16, 16))
    plain, on_image = _decode(location_heatmap(d)), _decode(location_heatmap(d, background=IMG, title="parts"))
    assert plain.shape[2] == 3 and not np.array_equal(plain, on_image)


def test_metric_bars_runs_groups_and_references():
    runs = {"ordinary": {"instability": 0.142, "lm": {"head": 0.14, "tail": 0.13}},
            "interpretable": {"instability": 0.071, "lm": {"head": 0.06}}}  # tail missing -> "n/a"
    plain = metric_bars(runs, "instability")
    refs = metric_bars(runs, "instability", references={"random": 0.161, "best fixed unit": 0.074})
    grouped = metric_bars(runs, "lm", ylabel="instability per landmark")
    assert len({plain, refs, grouped}) == 3
    for png in (plain, refs, grouped):
        _decode(png)
    with pytest.raises(ReportError, match="no run has a number for 'accuracy'"):
        metric_bars(runs, "accuracy")
    with pytest.raises(ReportError, match="expected a number"):
        metric_bars({"a": {"m": "high"}}, "m")
