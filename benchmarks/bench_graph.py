"""Benchmark: learning a 4-layer explanatory graph on 500 object crops (issue 20: <= 20 min on 2 CPU
cores), with the cost per iteration and per layer and the peak memory; optionally the evaluation.

    python benchmarks/bench_graph.py                                   # efficientnet_lite0 (ImageNet), synthetic crops
    python benchmarks/bench_graph.py --data cub --evaluate             # CUB crops, instability table
    python benchmarks/bench_graph.py --arch vgg16 --images 100         # the paper's layer sizes (random weights)

Features are extracted once into ``--out/features`` (timed apart; a rerun reuses them) and the
graph is learned into ``--out/graph_<mode>`` (a rerun resumes it: delete the folder to time again).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import icnn
import icnn.data
from icnn.graph import (
    FeatureStore,
    GraphConfig,
    GraphError,
    evaluate_graph,
    extract_features,
    learn_graph,
)

CUB = Path(__file__).resolve().parents[1] / "../shared/data/cub200-subset/CUB_200_2011"
NEGATIVES = Path(__file__).resolve().parents[1] / "../shared/data/negatives"


def dataset(kind: str, images: int, size: int):
    if kind == "cub":
        return icnn.data.build_dataset("cub200", CUB, split=None, task="single", image_size=size, negatives_root=NEGATIVES)
    # as many negatives as objects: the synthetic single-category set alternates them
    return icnn.data.build_dataset("synthetic", split="train", task="single", image_size=size, num_samples=2 * images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet", help="'imagenet', a file, or 'none' (random init)")
    ap.add_argument("--data", choices=("synthetic", "cub"), default="synthetic")
    ap.add_argument("--images", type=int, default=500, help="object crops")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--chunk-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faithful", action="store_true", help="the code's quirks (default: fixed)")
    ap.add_argument("--sigma-neg", default="auto", choices=("auto", "unit", "channel"), help="GraphConfig.sigma_neg (default auto: unit with --faithful, else channel)")
    ap.add_argument("--seed", type=int, default=0, help="GraphConfig.seed (the nodes' initial positions)")
    ap.add_argument("--evaluate", action="store_true", help="instability and part localisation afterwards")
    ap.add_argument("--memory-probe", metavar="SIZES", help="comma-separated chunk sizes: learn 2 iterations per layer with each "
                    "(ascending) and report the peak resident memory above the layer's start, then exit")  # fmt: skip
    ap.add_argument("--out", default="runs/bench_graph")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    out = Path(args.out)

    weights = None if args.weights == "none" else args.weights
    if args.arch == "vgg16" and weights == "imagenet":
        weights = None  # no VGG-16 weights ship with icnn: the cost does not depend on them
    t0 = time.perf_counter()
    try:
        store = FeatureStore(out / "features")
        extract_s = None
    except GraphError:
        torch.manual_seed(0)
        model = icnn.build_model(args.arch, num_classes=1, interpretable=False, weights=weights, image_size=args.image_size)
        store = extract_features(model, dataset(args.data, args.images, args.image_size), out / "features",
                                 max_images=args.images)  # fmt: skip
        extract_s = time.perf_counter() - t0
    print(f"features: {store.num_images} crops, layers {[(L.name, L.channels, L.size) for L in store.layers]}, "
          f"extraction {'reused' if extract_s is None else f'{extract_s:.0f} s'}")  # fmt: skip

    if args.memory_probe:
        memory_probe(store, out, sorted(int(t) for t in args.memory_probe.split(",")), args.faithful)
        return
    cfg = GraphConfig(iterations=args.iterations, chunk_images=args.chunk_images, faithful=args.faithful, sigma_neg=args.sigma_neg,
                      seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    name = f"graph_{'faithful' if args.faithful else 'fixed'}" + ("" if args.sigma_neg == "auto" else f"_{args.sigma_neg}") \
        + ("" if args.seed == 0 else f"_seed{args.seed}")
    graph = learn_graph(store, out / name, cfg)
    learn_s = time.perf_counter() - t0
    per_layer = defaultdict(list)
    for h in graph.history:
        per_layer[h["layer"]].append(h)
    print(f"\n{'layer':<24} {'nodes':>7} {'s/iter':>8} {'parents s':>9} {'E-step s':>9} {'layer s':>8} {'peak RSS MiB':>12}")
    for L, nodes in zip(store.layers, graph.nodes):
        hs = per_layer[L.name]
        tot = sum(h["seconds"] for h in hs)
        print(f"{L.name:<24} {nodes.num_nodes:>7} {tot / len(hs):>8.2f} {sum(h['parents_s'] for h in hs) / len(hs):>9.2f} "
              f"{sum(h['estep_s'] for h in hs) / len(hs):>9.2f} {tot:>8.1f} {max(h['peak_rss_mb'] or 0 for h in hs):>12.0f}")  # fmt: skip
    total = sum(h["seconds"] for h in graph.history)
    print(f"learning: {total:.0f} s in {len(graph.history)} iterations ({learn_s:.0f} s this run), "
          f"{args.threads} threads, chunks of {args.chunk_images} images")  # fmt: skip
    result = dict(vars(args), num_images=store.num_images, extract_s=extract_s, learn_s=total,
                  per_layer={k: sum(h["seconds"] for h in v) for k, v in per_layer.items()})  # fmt: skip
    if args.evaluate:
        result["metrics"] = {src: evaluate_graph(graph, store, source=src) for src in ("records", "match")}
        for src, m in result["metrics"].items():
            li, pl = m["location_instability"], m["part_localisation"]
            print(f"\n[{src}] location instability (top {li['top_units']} units, top {li['top_images']} images)")
            print(f"{'layer':<24} {'nodes':>7} {'raw':>7} {'random':>7} {'fixed':>7}")
            for r in li["layers"] + [dict(li, layer="mean")]:
                print(f"{r['layer']:<24} {r['nodes']:>7.4f} {r['raw_filters']:>7.4f} {r['random_unit']:>7.4f} {r['best_fixed_unit']:>7.4f}")
            print(f"nodes / raw = {li['ratio']:.3f}; part localisation ({pl['shots']} shots): nodes {pl['nodes']:.4f}, "
                  f"raw {pl['raw_filters']:.4f}, mean of shots {pl['mean_shot']:.4f}")  # fmt: skip
    (out / f"bench_{name}.json").write_text(json.dumps(result, indent=1, default=str))


def memory_probe(store, out: Path, sizes: list[int], faithful: bool) -> None:
    """Peak RSS above each layer's start (Linux VmHWM, reset per layer) for 2 iterations (the second
    one selects parents), per chunk size; smallest first, so a freed larger working set cannot hide in the peak."""
    import shutil

    rows = {}
    for size in sizes:
        root = out / f"probe_{size}"
        shutil.rmtree(root, ignore_errors=True)
        graph = learn_graph(store, root, GraphConfig(iterations=2, chunk_images=size, faithful=faithful), progress_bar=False)
        rows[size] = {h["layer"]: h for h in graph.history}
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'chunk images':>12} " + " ".join(f"{L.name:>16}" for L in store.layers) + "   (peak RSS MiB above the layer's start, "
          "E-step s/image)")  # fmt: skip
    for size, hs in rows.items():
        cells = [f"{hs[L.name]['peak_above_mb']:>7.0f} {hs[L.name]['estep_s'] / store.num_images * 1e3:>6.1f}ms" for L in store.layers]
        print(f"{size:>12} " + " ".join(f"{c:>16}" for c in cells))
    (out / "memory_probe.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
