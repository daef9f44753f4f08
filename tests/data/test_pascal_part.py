"""Pascal-Part: a .mat written by scipy in the Pascal-Part structure; paper §5.2.1 merging."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from icnn.data import DatasetError, PascalPart
from icnn.data.pascal_part import PART_MERGE, mask_box, mask_centroid, merge_parts

H, W = 20, 30


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def struct_array(rows, fields):
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows):
        for f in fields:
            arr[0, k][f] = row[f]
    return arr


def obj(cls, mask, parts):
    parts_arr = struct_array([{"part_name": n, "mask": m} for n, m in parts], ("part_name", "mask")) if parts else np.zeros((0, 0))
    return {"class": cls, "class_ind": 3, "mask": mask, "parts": parts_arr}


def write_pascal(root: Path) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations_Part").mkdir()
    # image 1: a bird (x 2..22, y 2..18) with head+beak+eyes, torso, neck, a wing, legs, tail;
    # and a person (ignored)
    bird = obj("bird", rect(2, 2, 22, 18), [
        ("head", rect(2, 2, 6, 6)), ("beak", rect(0, 3, 2, 5)), ("leye", rect(3, 3, 4, 4)),
        ("torso", rect(8, 6, 18, 14)), ("neck", rect(6, 4, 8, 8)), ("lwing", rect(10, 4, 16, 6)),
        ("lleg", rect(10, 14, 11, 18)), ("rfoot", rect(14, 17, 16, 18)), ("tail", rect(18, 8, 22, 10)),
    ])  # fmt: skip
    person = obj("person", rect(25, 0, 30, 20), [("head", rect(25, 0, 30, 4))])
    anno = {"imname": "img1", "objects": struct_array([bird, person], ("class", "class_ind", "mask", "parts"))}
    scipy.io.savemat(root / "Annotations_Part" / "img1.mat", {"anno": anno})
    # image 2: a cow with horn and hoof-less legs, and a cat without parts
    cow = obj("cow", rect(0, 0, 20, 20), [
        ("head", rect(0, 0, 5, 5)), ("lhorn", rect(5, 0, 6, 2)), ("lfuleg", rect(2, 15, 4, 20)),
        ("rblleg", rect(15, 15, 17, 20)), ("tail", rect(19, 5, 20, 8)), ("torso", rect(5, 5, 19, 15)),
    ])  # fmt: skip
    cat = obj("cat", rect(22, 5, 28, 12), [])
    anno = {"imname": "img2", "objects": struct_array([cow, cat], ("class", "class_ind", "mask", "parts"))}
    scipy.io.savemat(root / "Annotations_Part" / "img2.mat", {"anno": anno})
    for name in ("img1", "img2"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img1\nimg2\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("")
    return root


def test_merge_tables_match_paper():
    assert PART_MERGE["bird"]["head"] == ("head", "beak", "leye", "reye")
    assert set(PART_MERGE["bird"]) == {"head", "torso", "legs", "tail"}
    assert set(PART_MERGE["cat"]) == set(PART_MERGE["dog"]) == {"head", "torso", "front legs", "back legs", "tail"}
    for c in ("cow", "horse", "sheep"):
        assert set(PART_MERGE[c]) == {"head", "torso", "front legs", "back legs"}  # tail omitted
    assert "lhorn" in PART_MERGE["cow"]["head"] and "lhorn" in PART_MERGE["sheep"]["head"]
    assert "muzzle" in PART_MERGE["dog"]["head"] and "lfho" in PART_MERGE["horse"]["front legs"]


def test_merge_parts_unions_exactly():
    parts = [("head", rect(0, 0, 2, 2)), ("leye", rect(5, 5, 6, 6)), ("lleg", rect(9, 9, 10, 10)), ("wheel", rect(1, 1, 3, 3))]
    out = merge_parts([(n, m.astype(bool)) for n, m in parts], "bird", ["head", "torso", "legs", "tail"], (H, W))
    assert out[0].sum() == 4 + 1 and out[0][5, 5] and not out[1].any() and out[2].sum() == 1 and not out[3].any()
    assert mask_box(rect(2, 3, 5, 9).astype(bool)) == (2.0, 3.0, 5.0, 9.0)
    np.testing.assert_allclose(mask_centroid(rect(2, 3, 5, 9).astype(bool)), [3.5, 6.0])


def test_pascal_objects_masks_and_landmarks(tmp_path):
    root = write_pascal(tmp_path / "voc")
    ds = PascalPart(root, split="train", image_size=(H, W))  # crops are resized, so compare in crop frame
    assert ds.classes == list(("bird", "cat", "cow", "dog", "horse", "sheep"))
    assert ds.part_names == ["head", "torso", "legs", "front legs", "back legs", "tail"]
    assert len(ds) == 3 and ds.landmark_names == ["head", "neck", "torso"]
    b = PascalPart(root, split="train", categories=("bird",), image_size=(16, 20))
    assert len(b) == 1 and b.part_names == ["head", "torso", "legs", "tail"]
    s = b[0]  # bird box (2, 2, 22, 18) -> 20 x 16: scale 1, shift (-2, -2)
    np.testing.assert_allclose(s["box"], [0, 0, 20, 16])
    np.testing.assert_allclose(s["landmarks"], [[2.0, 2.0], [5.0, 4.0], [11.0, 8.0]])  # centroids - 2
    pm = s["part_masks"].numpy()
    assert pm.shape == (4, 16, 20) and pm.dtype == bool
    head = np.zeros((H, W), bool)
    for r in ((2, 2, 6, 6), (0, 3, 2, 5), (3, 3, 4, 4)):
        head |= rect(*r).astype(bool)
    np.testing.assert_array_equal(pm[0], head[2:18, 2:22])
    torso = rect(8, 6, 18, 14).astype(bool) | rect(6, 4, 8, 8).astype(bool) | rect(10, 4, 16, 6).astype(bool)
    np.testing.assert_array_equal(pm[1], torso[2:18, 2:22])
    assert pm[2].sum() == 4 + 2 and pm[3].sum() == 8  # legs: lleg 1x4 + rfoot 2x1; tail 4x2
    cow = PascalPart(root, split="train", categories=("cow", "cat"), image_size=(20, 20))
    assert cow.part_names == ["head", "torso", "front legs", "back legs", "tail"]
    s = cow[0]  # cow: box (0, 0, 20, 20), tail is not merged for cows
    m = s["part_masks"].numpy()
    assert m[0].sum() == 25 + 2 and m[2].sum() == 10 and m[3].sum() == 10 and not m[4].any()
    assert s["landmarks"][1].isnan().all()  # no neck
    cat = cow[1]
    assert cat["label"].item() == 1 and not cat["part_masks"].any() and cat["landmarks"].isnan().all()
    assert len(PascalPart(root, split="test")) == 0


def test_pascal_errors(tmp_path):
    root = write_pascal(tmp_path / "voc")
    (root / "Annotations_Part" / "img2.mat").write_bytes(b"garbage, not a mat file")
    with pytest.raises(DatasetError, match="img2.mat: cannot read MATLAB file"):
        PascalPart(root, split="train")
    scipy.io.savemat(root / "Annotations_Part" / "img2.mat", {"something": np.eye(2)})
    with pytest.raises(DatasetError, match="img2.mat: no struct 'anno'"):
        PascalPart(root, split="train")
    (root / "Annotations_Part" / "img2.mat").unlink()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "JPEGImages" / "img1.jpg")
    ds = PascalPart(root, split="train")
    with pytest.raises(DatasetError, match="img1"):
        ds[0]  # the box (2, 2, 22, 18) lies outside the (now) 5x5 image
    with pytest.raises(DatasetError, match="missing_root: Pascal-Part root not found"):
        PascalPart(tmp_path / "missing_root", split="train")
    (tmp_path / "no_images" / "Annotations_Part").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no_images/JPEGImages: VOC2010 image folder not found"):
        PascalPart(tmp_path / "no_images", split="train")
