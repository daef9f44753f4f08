"""Generation speed of the synthetic part world on one core.

    OMP_NUM_THREADS=1 python benchmarks/bench_synthetic.py [--n 500] [--sizes 32 64 128] [--out bench.json]

Prints a table (images/s and ms per image, split into drawing the scene and rendering it) for the
multi-category scenes and the single-category task (box crops vs whole-scene negatives), and
writes the same rows as JSON to ``--out`` when given. Pin to one core for a clean figure
(``taskset -c 0 ...``).
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from icnn.data.synthetic import SyntheticParts, synthetic_single_category


def bench(ds, n: int) -> dict:
    """Time ``n`` samples: wall clock and this process's CPU time (on a shared machine the CPU
    figure is the one-core throughput; on an idle pinned core the two agree)."""
    ds[0]  # warm up (imports, caches)
    t0, c0 = time.perf_counter(), time.process_time()
    scenes = [ds.scene(i) for i in range(n)]
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(n):
        ds[i]
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "images_per_s_wall": n / (t2 - t1),
        "images_per_s_cpu": n / (c2 - c1),
        "ms_per_image_cpu": 1e3 * (c2 - c1) / n,
        "ms_scene_cpu": 1e3 * (c1 - c0) / n,  # drawing the scene; the rest is rendering
        "ms_render_cpu": 1e3 * ((c2 - c1) - (c1 - c0)) / n,
        "mean_primitives": float(np.mean([len(s.kind) for s, _, _ in scenes])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="samples per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sides")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for size in args.sizes:
        for name, ds in [
            ("multi", SyntheticParts(args.n, image_size=size)),
            ("single", synthetic_single_category(args.n, image_size=size)),
        ]:
            rows.append({"dataset": name, "image_size": size, **bench(ds, args.n)})

    print(f"{'dataset':8} {'size':>5} {'img/s cpu':>10} {'img/s wall':>11} {'ms/img':>7} "
          f"{'scene':>6} {'render':>7} {'prims':>6}")
    for r in rows:
        print(f"{r['dataset']:8} {r['image_size']:>5} {r['images_per_s_cpu']:>10.0f} "
              f"{r['images_per_s_wall']:>11.0f} {r['ms_per_image_cpu']:>7.2f} {r['ms_scene_cpu']:>6.2f} "
              f"{r['ms_render_cpu']:>7.2f} {r['mean_primitives']:>6.1f}")
    if args.out:
        meta = {"n": args.n, "python": platform.python_version(), "numpy": np.__version__,
                "machine": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
