"""The documented JSON format for users' own images: reading, and one precise error per mistake."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icnn.data import CustomParts, DatasetError, build_dataset


def write_custom(root: Path, **overrides) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.full((20, 40, 3), 50, np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(np.full((10, 10, 3), 200, np.uint8)).save(root / "images" / "b.png")
    head = np.zeros((20, 40), np.uint8)
    head[4:8, 12:16] = 255
    Image.fromarray(head).save(root / "masks" / "a_head.png")
    doc = {
        "classes": ["bird", "cat"],
        "landmark_names": ["head", "tail"],
        "part_names": ["head", "torso"],
        "images": [
            {"file": "images/a.jpg", "label": "bird", "box": [10, 0, 30, 20], "split": "train",
             "landmarks": {"head": [14.0, 6.0], "tail": None}, "part_masks": {"head": "masks/a_head.png"}},
            {"file": "images/b.png", "label": "cat", "split": "test"},
        ],
    }  # fmt: skip
    doc.update(overrides)
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def test_custom_reads_boxes_landmarks_masks(tmp_path):
    root = write_custom(tmp_path / "c")
    ds = CustomParts(root, split="train", image_size=(10, 10))
    assert ds.classes == ["bird", "cat"] and ds.part_names == ["head", "torso"] and len(ds) == 1
    s = ds[0]  # crop (10, 0, 30, 20): 20 x 20 -> 10 x 10, scale 0.5
    np.testing.assert_allclose(s["landmarks"][0], [2.0, 3.0])
    assert s["landmarks"][1].isnan().all()
    m = s["part_masks"].numpy()
    assert m.shape == (2, 10, 10) and m[0].sum() == 4 and m[0][2:4, 1:3].all() and not m[1].any()
    t = CustomParts(root / "annotations.json", split="test", image_size=8)[0]  # whole image, no box
    assert t["label"].item() == 1 and t["image"].shape == (3, 8, 8)
    np.testing.assert_allclose(t["box"], [0, 0, 8, 8])
    assert len(CustomParts(root, split=None)) == 2


def test_custom_without_splits_is_one_set(tmp_path):
    root = write_custom(tmp_path / "c", images=[{"file": "images/b.png", "label": "cat"}])
    assert len(CustomParts(root, split="train")) == len(CustomParts(root, split="test")) == 1


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"classes": []}, r"annotations.json: 'classes' is empty"),
        ({"classes": "bird"}, r"'classes' must be a list"),
        ({"extra": 1}, r"unknown top-level key"),
        ({"images": []}, r"'images' must be a non-empty list"),
        ({"images": [{"file": "images/b.png", "label": "dog"}]}, r"images\[0\].label: 'dog' is not one of"),
        ({"images": [{"label": "cat"}]}, r"images\[0\].file: required"),
        ({"images": [{"file": "images/b.png", "label": "cat", "box": [5, 5, 1, 9]}]}, r"images\[0\].box: .* is empty"),
        ({"images": [{"file": "images/b.png", "label": "cat", "box": [1, 2, 3]}]}, r"images\[0\].box: must be"),
        ({"images": [{"file": "images/b.png", "label": "cat", "landmarks": {"beak": [1, 2]}}]}, r"images\[0\].landmarks.beak: not in"),
        ({"images": [{"file": "images/b.png", "label": "cat", "landmarks": {"head": [1]}}]}, r"images\[0\].landmarks.head: must be"),
        ({"images": [{"file": "images/b.png", "label": "cat", "part_masks": {"wing": "x.png"}}]}, r"images\[0\].part_masks.wing"),
        ({"images": [{"file": "images/b.png", "label": "cat", "colour": 1}]}, r"images\[0\]: unknown key"),
        ({"images": [{"file": "images/b.png", "label": "cat", "split": "val"}]}, r"images\[0\].split"),
        ({"images": [{"file": "images/b.png", "label": "cat"}, {"file": "images/a.jpg", "label": "cat", "split": "train"}]}, r"images\[0\] has no 'split'"),
    ],
)
def test_custom_json_errors(tmp_path, overrides, match):
    root = write_custom(tmp_path / "c", **overrides)
    with pytest.raises(DatasetError, match=match):
        CustomParts(root)


def test_custom_file_errors_and_skip_bad(tmp_path):
    root = write_custom(tmp_path / "c")
    (root / "annotations.json").write_text('{"classes": ["a"],\n "images": [}')
    with pytest.raises(DatasetError, match=r"annotations.json: invalid JSON at line 2"):
        CustomParts(root)
    with pytest.raises(DatasetError, match="nope.json: file not found"):
        CustomParts(root, annotations="nope.json")
    root = write_custom(tmp_path / "d")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "a_head.png")
    with pytest.raises(DatasetError, match=r"a_head.png: mask is 5x5 but its image .*a.jpg is 40x20"):
        CustomParts(root, split="train")[0]
    (root / "masks" / "a_head.png").unlink()
    with pytest.raises(DatasetError, match="a_head.png: mask file not found"):
        CustomParts(root, split="train")[0]
    root = write_custom(tmp_path / "e", images=[
        {"file": "images/a.jpg", "label": "bird", "box": [0, 0, 400, 20]},
        {"file": "images/b.png", "label": "zebra"},
        {"file": "images/missing.jpg", "label": "cat"},
        {"file": "images/b.png", "label": "cat"},
    ])  # fmt: skip
    ds = CustomParts(root, skip_bad=True)
    assert len(ds) == 1 and ds.num_skipped == 3
    reasons = " ".join(r for _, r in ds.skipped)
    assert "outside the 40x20 image" in reasons and "'zebra'" in reasons and "missing.jpg" in reasons


def test_registry_custom_single_category(tmp_path):
    root = write_custom(tmp_path / "c")
    neg = tmp_path / "neg"
    neg.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), i * 40, np.uint8)).save(neg / f"n{i}.jpg")
    ds = build_dataset("custom", root, split=None, task="single", image_size=12, negatives_root=neg, category="bird", seed=3)
    assert ds.classes == ["negative", "bird"] and ds.part_names == ["head", "torso"] and len(ds) == 4
    samples = [ds[i] for i in range(len(ds))]
    assert {s["part_masks"].shape for s in samples} == {(2, 12, 12)}
    with pytest.raises(ValueError, match="needs category="):
        build_dataset("custom", root, split=None, task="single", image_size=12, negatives_root=neg)
