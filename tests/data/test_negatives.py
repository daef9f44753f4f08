"""Negative images and the single-category wrapper."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icnn.data import DatasetError, NegativeImages, PartDataset, Record, SingleCategory

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def make_negatives(root: Path, n: int = 7) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        ext = (".jpg", ".JPEG", ".png")[i % 3]
        Image.fromarray(np.full((9, 13, 3), i * 30, np.uint8)).save(folder / f"{i:02d}{ext}", format="PNG" if ext == ".png" else "JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_negatives_whole_images_sorted_recursive(tmp_path):
    root = make_negatives(tmp_path / "neg")
    ds = NegativeImages(root, image_size=(6, 8), landmark_names=["head", "tail"], part_names=["head"])
    assert len(ds) == 7
    names = [r.path.relative_to(root).as_posix() for r in ds.records]
    assert names == sorted(names) and any(n.startswith("sub/") for n in names)
    s = ds[0]
    assert s["image"].shape == (3, 6, 8) and s["label"].item() == 0
    assert s["box"].isnan().all() and s["landmarks"].shape == (2, 2) and s["landmarks"].isnan().all()
    assert s["part_masks"].shape == (1, 6, 8) and not s["part_masks"].any()
    tr, te = NegativeImages(root, split="train"), NegativeImages(root, split="test")
    assert len(tr) + len(te) == 7 and not {r.path for r in tr.records} & {r.path for r in te.records}
    assert NegativeImages(root).landmark_names == [] and "part_masks" not in NegativeImages(root)[0]


def test_negatives_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no .jpg/.jpeg/.png images"):
        NegativeImages(tmp_path / "empty")
    with pytest.raises(DatasetError, match="missing: image folder not found"):
        NegativeImages(tmp_path / "missing")
    root = make_negatives(tmp_path / "neg", 3)
    (root / "00.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match="00.jpg: cannot decode image"):
        NegativeImages(root)[0]
    ds = NegativeImages(root, skip_bad=True)
    assert len(ds) == 2 and ds.num_skipped == 1


class _Pos(PartDataset):
    def __init__(self, path: Path, n: int):
        recs = [Record(path=path, label=0, box=(1.0, 1.0, 9.0, 7.0), landmarks=np.array([[5.0, 4.0]])) for _ in range(n)]
        super().__init__(recs, classes=["dog"], landmark_names=["head"], part_names=["head"], image_size=(6, 8))

    def _load_masks(self, record, width, height):
        return np.ones((1, height, width), dtype=bool)


def test_single_category_labels_balance_determinism(tmp_path):
    neg = NegativeImages(make_negatives(tmp_path / "neg"), image_size=(6, 8))
    img = tmp_path / "pos.png"
    Image.fromarray(np.zeros((9, 13, 3), np.uint8)).save(img)
    pos = _Pos(img, 3)
    ds = SingleCategory(pos, neg, seed=1)
    assert ds.classes == ["negative", "dog"] and len(ds) == 10 and ds.image_size == (6, 8)
    samples = [ds[i] for i in range(len(ds))]
    assert sorted(s["label"].item() for s in samples) == [0] * 7 + [1] * 3
    assert [s["index"].item() for s in samples] == list(range(10))
    for s in samples:
        assert s["landmarks"].shape == (1, 2) and s["part_masks"].shape == (1, 6, 8)
        if s["label"] == 1:
            np.testing.assert_allclose(s["landmarks"][0], [4.0, 3.0])
            assert s["part_masks"].all()
        else:
            assert s["landmarks"].isnan().all() and s["box"].isnan().all() and not s["part_masks"].any()
    batch = torch.utils.data.default_collate(samples)
    assert batch["part_masks"].shape == (10, 1, 6, 8)
    assert (SingleCategory(pos, neg, seed=1).items == ds.items).all()
    assert not (SingleCategory(pos, neg, seed=2).items == ds.items).all()
    under = SingleCategory(pos, neg, balance="undersample")
    assert (under.num_positives, under.num_negatives) == (3, 3)
    over = SingleCategory(pos, neg, balance="oversample")
    assert (over.num_positives, over.num_negatives) == (7, 7)
    capped = SingleCategory(pos, neg, max_negatives=2, max_positives=1)
    assert (capped.num_positives, capped.num_negatives) == (1, 2)
    with pytest.raises(ValueError, match="same image_size"):
        SingleCategory(pos, NegativeImages(tmp_path / "neg", image_size=5))
    with pytest.raises(ValueError, match="balance"):
        SingleCategory(pos, neg, balance="both")


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "negatives").is_dir(), reason="../shared/data absent")
def test_real_negatives():
    ds = NegativeImages(REAL / "negatives", image_size=32)
    assert len(ds) == 1000
    s = ds[999]
    assert s["image"].shape == (3, 32, 32) and 0 <= s["image"].min() and s["image"].max() <= 1


def test_registry_synthetic_is_lazy():
    import importlib.util

    from icnn.data import build_dataset

    if importlib.util.find_spec("icnn.data.synthetic") is None:
        pytest.skip("icnn.data.synthetic not written yet")
    multi = build_dataset("synthetic", split="train", task="multi", image_size=32, num_samples=3)
    single = build_dataset("synthetic", split="test", task="single", image_size=32, num_samples=3, category=1)
    assert len(multi) == 3 and len(single) == 3 and single.classes[0] == "negative"
    s = multi[0]
    assert s["image"].shape == (3, 32, 32) and s["landmarks"].shape == (len(multi.landmark_names), 2)
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("synthetic", "somewhere", split="train", image_size=32)
