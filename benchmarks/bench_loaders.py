"""Images/s of each dataset loader through a DataLoader (num_workers 0 and 2).

Real data when present (``../shared/data``: the CUB subset and the 1,000 negatives), small
fixtures written to a temporary folder otherwise (and always for Pascal-Part, ILSVRC
Animal-Part and the custom JSON format, which are not shipped). Fixture images are 500x375 JPEGs,
the size of VOC/ImageNet photos.

    python benchmarks/bench_loaders.py [--image-size 224] [--max-images 256] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from icnn.data import CUB200, CustomParts, ILSVRCPart, NegativeImages, PascalPart, SingleCategory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
W, H = 500, 375


def _photo(rng: np.random.Generator, path: Path) -> None:
    # smooth noise compresses like a photo (pure noise would make JPEG decoding unrealistically slow)
    small = rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((W, H), Image.Resampling.BILINEAR).save(path, quality=90)


def _structs(rows: list[dict]) -> np.ndarray:
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in rows[0]])
    for k, row in enumerate(rows):
        for f, v in row.items():
            arr[0, k][f] = v
    return arr


def _rect(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def fixture_pascal(root: Path, n: int, rng) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations_Part").mkdir()
    for i in range(n):
        _photo(rng, root / "JPEGImages" / f"{i:06d}.jpg")
        parts = [("head", _rect(100, 80, 160, 140)), ("leye", _rect(120, 100, 125, 105)), ("torso", _rect(160, 120, 360, 260)),
                 ("neck", _rect(150, 110, 175, 150)), ("lfleg", _rect(180, 260, 200, 340)), ("lbleg", _rect(320, 260, 340, 340)),
                 ("tail", _rect(360, 130, 420, 150))]  # fmt: skip
        obj = {"class": "cat", "class_ind": 8, "mask": _rect(100, 80, 420, 340),
               "parts": _structs([{"part_name": a, "mask": m} for a, m in parts])}  # fmt: skip
        scipy.io.savemat(root / "Annotations_Part" / f"{i:06d}.mat", {"anno": {"imname": f"{i:06d}", "objects": _structs([obj])}}, do_compression=True)
    return root


def fixture_ilsvrc(root: Path, n: int, rng) -> Path:
    wnid = "n02084071"
    img = root / f"{wnid}_obj" / "img" / "img"
    img.mkdir(parents=True)
    for i in range(n):
        _photo(rng, img / f"{i + 1:05d}.jpg")
    box = {"xmin": 51.0, "ymin": 41.0, "xmax": 450.0, "ymax": 340.0}
    scipy.io.savemat(img.parent / "data.mat", {"samples": _structs([{"obj": {"bndbox": box}} for _ in range(n)])})
    (root / wnid).mkdir()
    sbox = {k: str(int(v)) for k, v in box.items()}
    for f in ("truth_part01.mat", "truth_part02.mat"):
        rows = [{"obj": {"filename": f"{i + 1:05d}.jpg", "bndbox": sbox}, "pHW_center": np.array([[60.0], [50.0]]),
                 "pHW_scale": np.array([[40.0], [40.0]])} for i in range(n)]  # fmt: skip
        scipy.io.savemat(root / wnid / f, {"truth": _structs(rows)})
    return root


def fixture_custom(root: Path, n: int, rng) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(_rect(100, 80, 160, 140) * 255).save(root / "masks" / "head.png")
    entries = []
    for i in range(n):
        _photo(rng, root / "images" / f"{i}.jpg")
        entries.append({"file": f"images/{i}.jpg", "label": "cat", "box": [100, 80, 420, 340],
                        "landmarks": {"head": [130, 110]}, "part_masks": {"head": "masks/head.png"}})  # fmt: skip
    doc = {"classes": ["cat"], "landmark_names": ["head"], "part_names": ["head"], "images": entries}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def fixture_images(root: Path, n: int, rng) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        _photo(rng, root / f"{i:05d}.jpg")
    return root


def measure(ds, workers: int, batch_size: int, max_images: int) -> dict:
    """Steady-state images/s: the clock starts when the first batch arrives (worker start-up
    and the first decode excluded), over at most ``max_images`` images."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    it = iter(loader)
    first = next(it)["image"].shape[0]
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch["image"].shape[0]
        if n + first >= max_images:
            break
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1) if n else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-images", type=int, default=256)
    ap.add_argument("--fixture-images", type=int, default=96)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    size = args.image_size
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cub_root = SHARED / "cub200-subset" / "CUB_200_2011"
        neg_root = SHARED / "negatives"
        real_cub, real_neg = cub_root.is_dir(), neg_root.is_dir()
        if not real_neg:
            neg_root = fixture_images(tmp / "neg", args.fixture_images, rng)
        datasets = {}
        if real_cub:
            datasets["cub200 (real subset, all 543)"] = CUB200(cub_root, split=None, image_size=size)
            datasets["single: cub bird vs negatives"] = SingleCategory(
                CUB200(cub_root, split=None, labels="bird", image_size=size),
                NegativeImages(neg_root, landmark_names=["head", "back", "tail"], image_size=size),
            )
        datasets[f"negatives ({'real' if real_neg else 'fixture'})"] = NegativeImages(neg_root, image_size=size)
        datasets["pascal_part (fixture)"] = PascalPart(fixture_pascal(tmp / "voc", args.fixture_images, rng), split=None, image_size=size)
        ilsvrc = fixture_ilsvrc(tmp / "det", args.fixture_images, rng)
        datasets["ilsvrc_part (fixture)"] = ILSVRCPart(ilsvrc, split=None, image_size=size)
        datasets["custom (fixture)"] = CustomParts(fixture_custom(tmp / "custom", args.fixture_images, rng), image_size=size)
        print(f"image_size {size}, batch {args.batch_size}, cpus {os.cpu_count()}, torch threads 1")
        print(f"{'loader':36s} {'samples':>7s} " + " ".join(f"{'w=' + str(w) + ' img/s':>11s}" for w in args.workers))
        for name, ds in datasets.items():
            row = {"loader": name, "samples": len(ds)}
            for w in args.workers:
                row[f"workers_{w}"] = measure(ds, w, args.batch_size, args.max_images)
            results.append(row)
            print(f"{name:36s} {len(ds):7d} " + " ".join(f"{row[f'workers_{w}']['images_per_s']:11.1f}" for w in args.workers))
    if args.out:
        args.out.write_text(json.dumps({"image_size": size, "batch_size": args.batch_size, "results": results}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
