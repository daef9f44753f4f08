"""The filter loss of this checkout against another commit's, interleaved in one process.

Copies ``icnn`` of the other commit (``git archive REV src/icnn``) under the name ``icnn_ref``,
builds both ``FilterLoss`` modules with the recipe's settings (``icnn.cli.compare.RECIPE``) and
times forward + backward on the same maps, alternating ``ref, this, ref, this, ...``; prints the
medians. ``keep_freed_memory`` is set as ``icnn.training.loop.fit`` sets it.

    python benchmarks/bench_loss_ab.py --rev a5f2991 --batch-size 32 --threads 1 [--clock thread]
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def load_ref(rev: str):
    root = Path(__file__).resolve().parents[1]
    data = subprocess.run(["git", "archive", rev, "src/icnn"], cwd=root, check=True, capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="icnn_ref_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "src" / "icnn").rename(tmp / "icnn_ref")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("icnn_ref.loss").FilterLoss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the other commit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1280)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall time, or this thread's CPU time (less disturbed by other jobs on the machine; one thread only)")
    args = p.parse_args()
    from icnn import FilterLoss
    from icnn.cli.compare import RECIPE
    from icnn.training.loop import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    b, c, n = args.batch_size, args.channels, args.size
    losses = {}
    for name, cls in ((args.rev, load_ref(args.rev)), ("this checkout", FilterLoss)):
        losses[name] = cls(c, 2, (n, n), negative_class=0, **RECIPE["filter_loss"])
        losses[name].start_epoch(1)
    torch.manual_seed(0)
    maps, labels = torch.relu(torch.randn(b, c, n, n)), torch.arange(b) % 2
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    times: dict[str, list[float]] = {k: [] for k in losses}
    for i in range(args.steps + 3):
        for name, fl in losses.items():
            x = maps.clone().requires_grad_()
            t0 = clock()
            fl(x, labels).backward()
            if i >= 3:
                times[name].append(clock() - t0)
    print(f"FilterLoss forward + backward, maps ({b}, {c}, {n}, {n}), the recipe's settings, {torch.get_num_threads()} threads, "
          f"{args.steps} interleaved steps each, medians of {args.clock} time:")  # fmt: skip
    for name, t in times.items():
        print(f"  {name:16s} {1e3 * statistics.median(t):8.1f} ms")


if __name__ == "__main__":
    main()
