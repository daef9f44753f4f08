"""Growing the decision tree (icnn.tree.fit_tree) for 1,000 images after extraction, one CPU core.

The bar (issue 19): at most 2 minutes for 1,000 images. Features are random but shaped like an
interpretable layer's: rationales scattered around a few decision modes (each using a subset
of the filters), pooled features ReLU-sparse and of the size of a 7x7 map's sum (x_d ~ 49 at
the filter's mean), scores ``y = g . x + b`` with a small bias.

    python benchmarks/bench_tree.py                      # n=1000, D=1280 and D=512, fast mode
    python benchmarks/bench_tree.py --n 200 --d 512 --mode exact
"""

from __future__ import annotations

import argparse
import time

import torch

from icnn.tree import Features, TreeConfig, fit_tree


def features(n: int, d: int, modes: int = 12, seed: int = 0) -> Features:
    gen = torch.Generator().manual_seed(seed)
    uses = torch.rand(modes, d, generator=gen) < 0.3  # the filters each mode relies on
    centres = torch.rand(modes, d, generator=gen) * uses
    mode = torch.randint(modes, (n,), generator=gen)
    g = centres[mode] + 0.05 * torch.randn(n, d, generator=gen) * uses[mode]
    g = g / g.norm(dim=1, keepdim=True)
    x = torch.relu(torch.randn(n, d, generator=gen) + 0.3) * 49  # 7x7 maps, x_d = sum / s_d
    b = 0.5 * torch.randn(n, generator=gen)
    y = (g * x).sum(1) + b
    return Features(x.double(), g.double(), y.double(), b.double(), torch.ones(n, dtype=torch.float64),
                    torch.ones(n, dtype=torch.bool), torch.ones(d, dtype=torch.float64), torch.arange(n))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--d", type=int, nargs="+", default=[1280, 512])
    parser.add_argument("--mode", default="fast", choices=["fast", "exact"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for d in args.d:
        feats = features(args.n, d)
        start, cpu = time.perf_counter(), time.process_time()
        tree = fit_tree(feats, TreeConfig(mode=args.mode))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        second = tree.children(tree.root)
        density = tree.alpha[tree.num_leaves : -1].mean().item() if tree.num_merges else float("nan")
        print(f"n={args.n} D={d} {args.mode}: {seconds:.1f} s wall, {cpu:.1f} s CPU ({1e3 * seconds / max(tree.num_merges, 1):.1f} ms/merge), "
              f"{tree.num_merges} merges, {len(second)} second-layer nodes (largest {int(tree.count()[second].max())} images), "
              f"depth {int(tree.depth().max())}, mean alpha of merged nodes {density:.3f}, threads {args.threads}")  # fmt: skip


if __name__ == "__main__":
    main()
