"""Cost of the interpretable layer: (conv + ReLU + mask + filter loss) vs (conv + ReLU) alone.

Times forward+backward of one 3x3 conv-layer (C -> C channels, the paper's new layer) with and
without the mask and the filter loss, for several map sizes, channel counts and batch sizes.
Prints a table and writes JSON.

    python benchmarks/bench_filter_loss.py --device cpu --out bench_filter_loss.json
    python benchmarks/bench_filter_loss.py --device cuda --sizes 7 14 28 --channels 256 512 --batches 32 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from icnn import FilterLoss, PartMask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def bench_one(n: int, c: int, b: int, device, warmup: int, iters: int, mode: str) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1).to(device)
    mask = PartMask().to(device)
    floss = FilterLoss(c, 2, (n, n), negative_class=0, mode=mode).to(device)
    x = torch.randn(b, c, n, n, device=device)
    labels = torch.randint(0, 2, (b,), device=device)

    def plain():
        conv.zero_grad(set_to_none=True)
        y = torch.relu(conv(x))
        y.square().mean().backward()

    def interpretable():
        conv.zero_grad(set_to_none=True)
        y = torch.relu(conv(x))
        out = mask(y)
        (out.square().mean() + floss(y, labels)).backward()

    t_plain = time_step(plain, device, warmup, iters)
    t_interp = time_step(interpretable, device, warmup, iters)
    conv_flops = 2 * b * n * n * c * c * 9 * 3  # forward + 2x backward
    loss_flops = 2 * b * c * (n * n) * (n * n + 1) * 2  # template scores, forward + backward
    return {
        "map": n, "channels": c, "batch": b, "mode": mode,
        "conv_ms": t_plain * 1e3, "interp_ms": t_interp * 1e3,
        "added_pct": 100 * (t_interp - t_plain) / t_plain,
        "loss_flops_pct_of_conv": 100 * loss_flops / conv_flops,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28])
    ap.add_argument("--channels", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--mode", default="paper", choices=["paper", "exact"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'map':>5} {'C':>5} {'B':>4} {'conv ms':>9} {'+mask+loss ms':>14} {'added %':>8} {'loss/conv FLOPs %':>18}")
    for n in args.sizes:
        for c in args.channels:
            for b in args.batches:
                r = bench_one(n, c, b, device, args.warmup, args.iters, args.mode)
                rows.append(r)
                print(f"{n:>5} {c:>5} {b:>4} {r['conv_ms']:>9.1f} {r['interp_ms']:>14.1f} {r['added_pct']:>8.1f} {r['loss_flops_pct_of_conv']:>18.2f}", flush=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
