"""Training throughput: the ordinary twin vs the interpretable network on the same backbone.

One full optimizer step each (forward, task loss, filter losses for the interpretable net,
backward, SGD step) through the engine's own ``train_step``, on random images. Each mode runs
in a fresh subprocess so that peak memory is its own: ``torch.cuda.max_memory_allocated`` on
GPU, the process's peak RSS (``resource.ru_maxrss``) on CPU. Prints a table and writes JSON.

    python benchmarks/bench_train.py --arch small_cnn --image-size 64 --batch-size 8 --steps 5 --device cpu
    python benchmarks/bench_train.py --arch vgg16 --image-size 224 --batch-size 64 --steps 30 --device cuda --compile
    python benchmarks/bench_train.py --arch efficientnet_lite0 --image-size 224 --batch-size 16 --freeze-stem
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

MODES = ("ordinary", "interpretable")


def run_mode(args) -> dict:
    """Times ``args.steps`` steps of one mode in this process; returns its figures."""
    from icnn.models import build_model
    from icnn.training import StepContext, TrainConfig, build_filter_losses, make_optimizer, train_step
    from icnn.training.engine import ForwardWithMaps, autocast_for, freeze_stem
    from icnn.task_loss import task_loss_for

    torch.manual_seed(0)
    device = torch.device(args.device)
    interpretable = args.mode == "interpretable"
    cfg = TrainConfig(arch=args.arch, lr=args.lr, image_size=args.image_size, batch_size=args.batch_size, device=args.device, amp=args.amp, compile=args.compile,
                      freeze_stem=args.freeze_stem)
    model = build_model(args.arch, num_classes=1, interpretable=interpretable, image_size=args.image_size).to(device)
    frozen = freeze_stem(model) if args.freeze_stem else None
    filter_losses = build_filter_losses(model, num_classes=2, image_size=args.image_size, cfg={}, device=device, negative_class=0)
    net = ForwardWithMaps(model)
    if args.compile and device.type == "cuda":
        net = torch.compile(net)
    ctx = StepContext(
        net=net, model=model, task_loss=task_loss_for("single"), filter_losses=filter_losses,
        optimizer=make_optimizer(model, cfg), device=device, autocast=lambda: autocast_for(device, cfg), frozen=frozen,
    )
    for fl in filter_losses.values():
        fl.start_epoch(1)
    batch = {
        "image": torch.rand(args.batch_size, 3, args.image_size, args.image_size),
        "label": torch.arange(args.batch_size) % 2,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step(ctx, batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(ctx, batch)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "process peak RSS"
    return {
        "mode": args.mode,
        "step_ms": seconds * 1e3,
        "images_per_s": args.batch_size / seconds,
        "peak_mib": peak,
        "peak_kind": peak_kind,
        "filter_layers": list(filter_losses.keys()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_cnn", help="backbone name in icnn.models")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (small: the same batch is repeated; speed does not depend on it)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (GPU)")
    p.add_argument("--freeze-stem", action="store_true", help="the stem fixed in eval mode, as icnn train --freeze-stem")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.mode:  # child process
        print(json.dumps(run_mode(args)))
        return 0

    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in (argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["step_ms"]
    print(f"{args.arch} @ {args.image_size}px, batch {args.batch_size}, {args.steps} steps, {args.device}"
          + (", stem frozen" if args.freeze_stem else "")
          + f" ({torch.get_num_threads()} threads), {rows[0]['peak_kind']}")
    print(f"{'mode':<14}{'step ms':>10}{'images/s':>11}{'peak MiB':>10}{'vs ordinary':>13}")
    for r in rows:
        print(f"{r['mode']:<14}{r['step_ms']:>10.1f}{r['images_per_s']:>11.1f}{r['peak_mib']:>10.0f}{r['step_ms'] / base:>12.2f}x")
    result = {
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "device": args.device, "amp": args.amp, "compile": args.compile, "freeze_stem": args.freeze_stem, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
