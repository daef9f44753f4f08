"""CUB-200-2011 loader: fixtures in the dataset's own layout, error cases, and the real subset."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icnn.data import CUB200, DatasetError, build_dataset

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
         "nape", "right eye", "right leg", "right wing", "tail", "throat"]  # fmt: skip


def write_cub(root: Path, *, size=(60, 40)) -> Path:
    """3 images, 2 classes; image 1 & 3 train, 2 test. Image size (W, H) = size."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir()
    files = ["001.A/a1.jpg", "001.A/a2.jpg", "002.B/b1.jpg"]
    for f in files:
        (root / "images" / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(root / "images" / f)
    (root / "images.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(files, 1)))
    (root / "bounding_boxes.txt").write_text("1 10.0 5.0 40.0 30.0\n2 0.0 0.0 60.0 40.0\n3 20.0 10.0 20.0 20.0\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (root / "classes.txt").write_text("1 001.A\n2 002.B\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (root / "parts" / "parts.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(PARTS, 1)))
    locs = []
    for img in (1, 2, 3):
        for pid, name in enumerate(PARTS, 1):
            if img == 1 and name == "crown":
                locs.append(f"{img} {pid} 20.0 10.0 1\n")
            elif img == 1 and name == "forehead":
                locs.append(f"{img} {pid} 30.0 14.0 1\n")
            elif img == 1 and name == "tail":
                locs.append(f"{img} {pid} 45.0 30.0 1\n")
            elif img == 3 and name == "forehead":
                locs.append(f"{img} {pid} 25.0 15.0 1\n")
            else:
                locs.append(f"{img} {pid} 0.0 0.0 0\n")
    (root / "parts" / "part_locs.txt").write_text("".join(locs))
    return root


def test_cub_fixture_split_labels_and_landmarks(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011")
    train = CUB200(tmp_path, split="train", image_size=(30, 80))  # parent folder is accepted
    test = CUB200(root, split="test", image_size=(30, 80))
    assert len(train) == 2 and len(test) == 1 and len(CUB200(root, split=None)) == 3
    assert train.classes == ["001.A", "002.B"] and train.landmark_names == ["head", "back", "tail"]
    assert train.part_names == []
    s = train[0]  # image 1: box (10, 5, 50, 35) -> (W, H) = (80, 30): sx = 2, sy = 1
    assert s["label"].item() == 0 and s["image"].shape == (3, 30, 80)
    # head = mean(crown (20, 10), forehead (30, 14)) = (25, 12) -> ((25-10)*2, 12-5)
    np.testing.assert_allclose(s["landmarks"][0], [30.0, 7.0])
    assert torch.isnan(s["landmarks"][1]).all()  # back not visible
    np.testing.assert_allclose(s["landmarks"][2], [70.0, 25.0])  # tail (45, 30)
    np.testing.assert_allclose(s["box"], [0, 0, 80, 30])
    s3 = train[1]  # image 3, class 2; head = forehead alone (25, 15); box (20, 10, 40, 30) -> sx 4, sy 1.5
    assert s3["label"].item() == 1
    np.testing.assert_allclose(s3["landmarks"][0], [20.0, 7.5])
    bird = CUB200(root, split="train", labels="bird")
    assert bird.classes == ["bird"] and {bird[i]["label"].item() for i in range(2)} == {0}
    full = CUB200(root, split="train", landmarks="all", image_size=(30, 80))
    assert full.landmark_names == PARTS
    np.testing.assert_allclose(full[0]["landmarks"][PARTS.index("crown")], [20.0, 5.0])


def test_cub_margin_and_flip(tmp_path):
    root = write_cub(tmp_path / "c")
    ds = CUB200(root, split="train", image_size=(30, 80), margin=0.25)
    # image 1: box (10, 5, 50, 35) grows 10 / 7.5 px: crop (0, 0, 60, 40) (clamped) -> sx 80/60, sy 30/40
    np.testing.assert_allclose(ds[0]["landmarks"][0], [25 * 80 / 60, 12 * 30 / 40], rtol=1e-5)
    np.testing.assert_allclose(ds[0]["box"], [10 * 80 / 60, 5 * 0.75, 50 * 80 / 60, 35 * 0.75], rtol=1e-5)
    aug = CUB200(root, split="train", image_size=(30, 80), augment=True)
    torch.manual_seed(0)
    xs = {round(aug[0]["landmarks"][0, 0].item(), 4) for _ in range(20)}
    assert xs == {30.0, 50.0}  # unflipped x or 80 - x


@pytest.mark.parametrize(
    "file, content, match",
    [
        ("images.txt", None, "images.txt: file not found"),
        ("bounding_boxes.txt", "1 10.0 5.0 40.0\n", "bounding_boxes.txt:1: expected 5 fields"),
        ("bounding_boxes.txt", "1 10.0 5.0 40.0 30.0\n2 0 0 60 40\n", "bounding_boxes.txt: no line for image id 3"),
        ("bounding_boxes.txt", "1 a 5 40 30\n2 0 0 60 40\n3 20 10 20 20\n", "bounding_boxes.txt.*not a number"),
        ("bounding_boxes.txt", "1 10 5 0 30\n2 0 0 60 40\n3 20 10 20 20\n", "bounding_boxes.txt: image 1: box width"),
        ("parts/part_locs.txt", "9 1 0 0 0\n", "part_locs.txt:1: image id 9"),
        ("parts/part_locs.txt", "1 99 0 0 0\n", "part_locs.txt:1: part id 99"),
        ("parts/part_locs.txt", "1 1 0 0 2\n", "part_locs.txt:1: visible must be 0 or 1"),
        ("image_class_labels.txt", "1 7\n2 1\n3 2\n", "image_class_labels.txt: image 1: class id 7"),
        ("train_test_split.txt", "", "train_test_split.txt: file is empty"),
        ("parts/parts.txt", "1 back\n", "parts.txt: no part named 'crown'"),
    ],
)
def test_cub_index_errors(tmp_path, file, content, match):
    root = write_cub(tmp_path / "c")
    if content is None:
        (root / file).unlink()
    else:
        (root / file).write_text(content)
    with pytest.raises(DatasetError, match=match):
        CUB200(root, split="train")


def test_cub_image_errors_and_skip_bad(tmp_path):
    root = write_cub(tmp_path / "c")
    (root / "images" / "001.A" / "a1.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "images" / "002.B" / "b1.jpg").unlink()
    ds = CUB200(root, split="train")
    with pytest.raises(DatasetError, match="a1.jpg: cannot decode image"):
        ds[0]
    with pytest.raises(DatasetError, match="b1.jpg: image file not found"):
        ds[1]
    skip = CUB200(root, split=None, skip_bad=True)
    assert len(skip) == 1 and skip.num_skipped == 2


def test_cub_box_outside_image(tmp_path):
    root = write_cub(tmp_path / "c")
    (root / "bounding_boxes.txt").write_text("1 10 5 400 30\n2 0 0 60 40\n3 20 10 20 20\n")
    with pytest.raises(DatasetError, match=r"a1.jpg \(image id 1\): box .* outside the 60x40 image"):
        CUB200(root, split="train")[0]
    assert CUB200(root, split="train", skip_bad=True).num_skipped == 1


def test_registry_cub_single_and_multi(tmp_path):
    root = write_cub(tmp_path / "c")
    neg = tmp_path / "neg"
    neg.mkdir()
    for i in range(6):
        Image.fromarray(np.full((10, 12, 3), i * 20, np.uint8)).save(neg / f"{i}.png")
    multi = build_dataset("cub200", root, split="train", task="multi", image_size=16)
    assert isinstance(multi, CUB200) and len(multi.classes) == 2
    single = build_dataset("cub200", root, split=None, task="single", image_size=16, negatives_root=neg)
    assert single.classes == ["negative", "bird"] and len(single) == 3 + 6
    labels = sorted(single[i]["label"].item() for i in range(len(single)))
    assert labels == [0] * 6 + [1] * 3
    with pytest.raises(DatasetError, match="negatives_root"):
        build_dataset("cub200", root, split="train", image_size=16)
    with pytest.raises(DatasetError, match="nowhere"):
        build_dataset("cub200", tmp_path / "nowhere", split="train", image_size=16)
    with pytest.raises(DatasetError, match="needs a root"):
        build_dataset("pascal_part", None, split="train", image_size=16)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", root, split="train", image_size=16)


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "cub200-subset" / "CUB_200_2011").is_dir(), reason="../shared/data absent")
def test_real_cub_subset():
    root = REAL / "cub200-subset" / "CUB_200_2011"
    train, test = CUB200(root, split="train", landmarks="all"), CUB200(root, split="test", landmarks="all")
    assert (len(train), len(test), len(CUB200(root, split=None))) == (300, 243, 543)
    boxes = {int(r[0]): [float(v) for v in r[1:]] for r in (l.split() for l in (root / "bounding_boxes.txt").read_text().splitlines())}
    locs = {}
    for line in (root / "parts" / "part_locs.txt").read_text().splitlines():
        i, p, x, y, v = line.split()
        locs[int(i), int(p)] = (float(x), float(y), int(v))
    checked = 0
    for ds in (train, test):
        for k in (0, 7, 50, len(ds) - 1):
            rec, s = ds.records[k], ds[k]
            img_id = rec.extra["image_id"]
            x, y, w, h = boxes[img_id]
            assert s["image"].shape == (3, 224, 224)
            for pid in range(1, 16):
                px, py, vis = locs[img_id, pid]
                got = s["landmarks"][pid - 1]
                want = np.array([(px - x) * 224 / w, (py - y) * 224 / h])
                inside = vis and 0 <= want[0] <= 224 and 0 <= want[1] <= 224
                if inside:
                    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-3)
                    checked += 1
                else:
                    assert torch.isnan(got).all()
    assert checked > 50
    paper = CUB200(root, split="test")
    assert paper.landmark_names == ["head", "back", "tail"]
    lm = torch.stack([paper[k]["landmarks"] for k in range(20)])
    assert (~torch.isnan(lm[:, 0, 0])).sum() >= 15  # the head is visible on most birds


def test_species_classes_are_those_the_images_show(tmp_path):
    # classes.txt lists 3 species, the images show 001 and 003 (as the first-10 subset of the
    # full 200): the head is made for those two, labels index them, the same on both splits
    root = write_cub(tmp_path / "CUB_200_2011")
    (root / "classes.txt").write_text("1 001.A\n2 002.B\n3 003.C\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 3\n")
    train, test = CUB200(root, split="train"), CUB200(root, split="test")
    assert train.classes == test.classes == ["001.A", "003.C"]
    assert [train[i]["label"].item() for i in range(2)] == [0, 1] and test[0]["label"].item() == 0
    only_c = CUB200(root, split="train", species="3")
    assert only_c.classes == ["003.C"] and len(only_c) == 1 and only_c[0]["label"].item() == 0
