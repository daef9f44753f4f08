"""Training step: the ordinary twin vs the interpretable network, interleaved in one process.

Both twins are built from the same seed and trained through the product's own objective
(``icnn.training.classify.ClassifierObjective.step``, backward, SGD step). Steps alternate
ordinary, interpretable, ordinary, ... so that machine noise lands on both sides alike; the
medians over ``--steps`` steps each and their ratio are printed, and the median and quartiles of
the per-pair ratios (each interpretable step against the ordinary step just before it). As
``fit`` does, glibc's malloc is set to keep freed memory (``--malloc-default`` leaves it). ``--cached`` feeds the stem's
outputs (what a frozen stem's cache serves: ``icnn.cache``), so the step is the top conv-layer, the
new layer, the head and the losses only -- where the mask and the filter loss weigh most.

    python benchmarks/bench_train.py --arch efficientnet_lite0 --image-size 224 --batch-size 32 --cached [--amp] [--clock thread]
    python benchmarks/bench_train.py --arch vgg16 --image-size 224 --batch-size 64 --device cuda [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args, interpretable: bool):
    from icnn.cli.compare import RECIPE
    from icnn.training import TrainConfig
    from icnn.training.classify import ClassifierObjective, build_model_for
    from icnn.training.loop import autocast_for, make_optimizer

    cfg = TrainConfig(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, device=args.device, amp=args.amp, cpu_amp=args.amp,
                      freeze_stem=args.cached, head_norm=True, interpretable=interpretable, backbone_lr_mult=0.1,
                      filter_loss={**RECIPE["filter_loss"], **({"mode": args.mode} if args.mode else {})})  # fmt: skip
    torch.manual_seed(0)
    model = build_model_for(cfg, 1).to(args.device)
    objective = ClassifierObjective(model, cfg, num_classes=2).to(args.device)
    objective.autocast = lambda: autocast_for(torch.device(args.device), cfg)
    if args.compile:
        objective.net = torch.compile(objective.net)
    for fl in objective.filter_losses.values():
        fl.start_epoch(1)
    return objective, make_optimizer(objective.param_groups(cfg), cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--mode", default=None, help="filter-loss mode of the interpretable twin (default: the recipe's, icnn.cli.compare.RECIPE)")
    p.add_argument("--cached", action="store_true", help="the stem frozen and its outputs given (the cached path)")
    p.add_argument("--malloc-default", action="store_true", help="leave glibc's malloc as it is (fit() sets keep_freed_memory)")
    p.add_argument("--amp", action="store_true", help="mixed precision: amp on GPU, cpu_amp (bfloat16) on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall time, or this thread's CPU time (less disturbed by other jobs on the machine; with --threads 1 only)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.malloc_default:
        from icnn.training.loop import keep_freed_memory

        keep_freed_memory()  # as icnn.training.loop.fit does
    twins = {name: build(args, name == "interpretable") for name in ("ordinary", "interpretable")}
    model = twins["ordinary"][0].model
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    batch = {"label": (torch.arange(args.batch_size) % 2).to(args.device)}
    if args.cached:
        with torch.no_grad():
            batch["stem"] = model.stem(model.normalize(images))
    else:
        batch["image"] = images
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    times: dict[str, list[float]] = {name: [] for name in twins}
    for i in range(args.warmup + args.steps):
        for name, (objective, optimizer) in twins.items():  # interleaved: one step each, in turn
            sync()
            t0 = clock()
            out = objective.step(batch)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            sync()
            if i >= args.warmup:
                times[name].append(clock() - t0)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = med["interpretable"] / med["ordinary"]
    # each interpretable step against the ordinary step just before it: machine noise that lasts
    # longer than a step cancels in the pair
    pairs = sorted(i / o for o, i in zip(times["ordinary"], times["interpretable"]))
    q1, q2, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    print(f"{args.arch} {args.image_size}px batch {args.batch_size} {'cached stem' if args.cached else 'full network'} "
          f"({args.device}, {torch.get_num_threads()} threads, {args.steps} interleaved steps each, medians of {args.clock} time)")  # fmt: skip
    for name in twins:
        print(f"  {name:14s} {med[name]:8.1f} ms/step  {1e3 * args.batch_size / med[name]:7.1f} images/s")
    print(f"  interpretable / ordinary: {ratio:.3f}x (ratio of medians); paired steps: median {q2:.3f}x, quartiles {q1:.3f}-{q3:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "step_ms": med, "ratio": ratio, "paired_ratios": pairs}, f, indent=2)


if __name__ == "__main__":
    main()
