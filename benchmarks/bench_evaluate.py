"""Evaluation cost: ``icnn.evaluate`` (one streaming pass + metrics) vs the forward passes alone.

    python benchmarks/bench_evaluate.py --arch small_cnn --image-size 64 --samples 400
    python benchmarks/bench_evaluate.py --arch vgg16 --image-size 224 --samples 64 --device cuda

The dataset (synthetic part world) is generated and cached before timing, so both figures
measure the network and the metrics, not the data generation. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from icnn.data import build_dataset
from icnn.evaluate import EvalConfig, evaluate
from icnn.models import build_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rf-mode", default="upsample", choices=["upsample", "rf"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ds = build_dataset("synthetic", split="test", task="single", image_size=args.image_size, num_samples=args.samples)
    for i in range(len(ds)):  # fill the in-memory cache
        ds[i]
    model = build_model(args.arch, num_classes=1, interpretable=True, image_size=args.image_size).to(args.device).eval()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        t0 = time.perf_counter()
        for batch in DataLoader(ds, batch_size=args.batch_size):
            feats = model.forward_features(batch["image"].to(args.device))
            model.forward_head(feats.out)
        sync()
        forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate(model, ds, EvalConfig(batch_size=args.batch_size, device=args.device, rf_mode=args.rf_mode, progress=False))
    sync()
    total = time.perf_counter() - t0
    row = {"arch": args.arch, "image_size": args.image_size, "images": len(ds), "forward_s": forward, "evaluate_s": total,
           "evaluate_images_per_s": len(ds) / total, "metrics_overhead": (total - forward) / forward,
           "threads": torch.get_num_threads(), "device": args.device}
    print(f"{'arch':>10} {'px':>4} {'images':>6} {'forward s':>9} {'evaluate s':>10} {'images/s':>9} {'metrics/forward':>15}")
    print(f"{args.arch:>10} {args.image_size:>4} {len(ds):>6} {forward:>9.2f} {total:>10.2f} {row['evaluate_images_per_s']:>9.1f} "
          f"{row['metrics_overhead']:>15.2f}")
    print({k: result.metrics[k] for k in ("location_instability", "part_interpretability", "accuracy")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
