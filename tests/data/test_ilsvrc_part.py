"""ILSVRC-2013 DET Animal-Part: fixtures in the authors' layout (data.mat + truth_partNN.mat)."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from icnn.data import DatasetError, ILSVRCPart

WNID = "n02084071"  # dog


def struct_array(rows):
    fields = list(rows[0])
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows):
        for f in fields:
            arr[0, k][f] = row[f]
    return arr


def write_ilsvrc(root: Path, *, legs=True) -> Path:
    img_dir = root / f"{WNID}_obj" / "img" / "img"
    img_dir.mkdir(parents=True)
    for i in (1, 2):
        Image.fromarray(np.full((30, 40, 3), 70 * i, np.uint8)).save(img_dir / f"{i:05d}.jpg")
    # MATLAB 1-based inclusive boxes
    boxes = [dict(xmin=5.0, ymin=3.0, xmax=34.0, ymax=27.0), dict(xmin=1.0, ymin=1.0, xmax=40.0, ymax=30.0)]
    scipy.io.savemat(root / f"{WNID}_obj" / "img" / "data.mat", {"samples": struct_array([{"obj": {"bndbox": b}} for b in boxes])})
    parts = root / "parts" / WNID
    parts.mkdir(parents=True)
    sbox = {k: str(int(v)) for k, v in boxes[0].items()}  # int2str'd, as readPartTruth.m writes
    head = {  # head box Wmin 10, Wmax 20, Hmin 5, Hmax 11 of image 1
        "obj": {"folder": f"{WNID}_obj/img/img/", "filename": "00001.jpg", "name": "00001.jpg", "bndbox": sbox},
        "pHW_center": np.array([[(8 - 3) / 24 * 224], [(15 - 5) / 29 * 224]]),
        "pHW_scale": np.array([[6 / 24 * 224], [10 / 29 * 224]]),
    }
    empty = {"obj": np.zeros((0, 0)), "pHW_center": np.zeros((0, 0)), "pHW_scale": np.zeros((0, 0))}
    scipy.io.savemat(parts / "truth_part01.mat", {"truth": struct_array([head, empty])})
    if legs:  # two leg boxes on image 1: centres (matlab) (10, 20) and (20, 20), 4 x 4
        legs_e = dict(head, pHW_center=np.array([[17 / 24 * 224, 17 / 24 * 224], [5 / 29 * 224, 15 / 29 * 224]]),
                      pHW_scale=np.array([[4 / 24 * 224] * 2, [4 / 29 * 224] * 2]))  # fmt: skip
        scipy.io.savemat(parts / "truth_part02.mat", {"truth": struct_array([legs_e, empty])})
    return root


def test_ilsvrc_boxes_landmarks_masks(tmp_path):
    root = write_ilsvrc(tmp_path / "det")
    ds = ILSVRCPart(root, split=None, parts_root=root / "parts", image_size=(25, 30))
    assert ds.classes == ["dog"] and ds.landmark_names == ds.part_names == ["head", "front legs"]
    assert len(ds) == 2
    s = ds[0]  # box (4, 2, 34, 27): 30 x 25 -> scale 1
    np.testing.assert_allclose(s["box"], [0, 0, 30, 25])
    # head centre continuous (14.5, 7.5) -> (10.5, 5.5); legs: mean of (9.5, 19.5), (19.5, 19.5)
    np.testing.assert_allclose(s["landmarks"], [[10.5, 5.5], [10.5, 17.5]], atol=1e-4)
    m = s["part_masks"].numpy()
    assert m[0].sum() == 60 and m[0][2:8, 5:15].all()  # rows 4..9, cols 9..18 shifted by (-2, -4)
    assert m[1].sum() == 2 * 16
    s2 = ds[1]
    assert s2["landmarks"].isnan().all() and not s2["part_masks"].any()
    by_name = ILSVRCPart(root, split=None, categories=["dog"], parts_root=root / "parts")
    assert by_name.wnids == [WNID]
    train = ILSVRCPart(root, split="train", parts_root=root / "parts")
    test = ILSVRCPart(root, split="test", parts_root=root / "parts")
    assert len(train) + len(test) == 2


def test_ilsvrc_missing_legs_file_is_absent_part(tmp_path):
    root = write_ilsvrc(tmp_path / "det", legs=False)
    s = ILSVRCPart(root, split=None, parts_root=root / "parts", image_size=(25, 30))[0]
    assert not s["landmarks"][0].isnan().any() and s["landmarks"][1].isnan().all()


def test_ilsvrc_errors(tmp_path):
    root = write_ilsvrc(tmp_path / "det")
    with pytest.raises(DatasetError, match=f"{WNID}/truth_part01.mat: file not found"):
        ILSVRCPart(root, split=None)  # parts_root defaults to root, which has none
    with pytest.raises(DatasetError, match="no <wnid>_obj folders"):
        ILSVRCPart(tmp_path, split=None)
    with pytest.raises(ValueError, match="unknown ILSVRC"):
        ILSVRCPart(root, categories=["unicorn"])
    (root / "parts" / WNID / "truth_part01.mat").write_bytes(b"MATLAB 7.3 MAT-file, garbage")
    with pytest.raises(DatasetError, match="truth_part01.mat"):
        ILSVRCPart(root, split=None, parts_root=root / "parts")
    scipy.io.savemat(root / f"{WNID}_obj" / "img" / "data.mat", {"other": 1})
    with pytest.raises(DatasetError, match="data.mat: no variable 'samples'"):
        ILSVRCPart(root, split=None, parts_root=root / "parts")
