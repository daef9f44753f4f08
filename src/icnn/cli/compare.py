"""``icnn compare``: the main job -- an interpretable CNN against its ordinary twin.

Trains the ordinary and the interpretable version of the same network on the same data with the
same schedule and seed (they differ only in the masks and filter losses), evaluates both on the
same images, and writes ``OUT/metrics.json`` (``{"ordinary": {...}, "interpretable": {...},
"ratios": {...}, ...}``) and ``OUT/report.html``. The runs live in ``OUT/ordinary`` and
``OUT/interpretable``; running the same command again resumes whatever is unfinished. With a
frozen stem its outputs are computed once, for both twins and both evaluations (``icnn.cache``).

Settings: the TrainConfig defaults < the recipe (:data:`RECIPE`, docs/filter_loss.md) < ``--config
FILE`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from . import UsageError
from ._common import config_file, existing_paths
from ._flags import build

# The recipe both twins train with (docs/filter_loss.md), on every dataset; icnn train's defaults
# are the paper's, this is what the measurements chose on validation data.
RECIPE = {
    "arch": "efficientnet_lite0",
    "weights": "imagenet",
    "image_size": 224,
    "freeze_stem": True,
    "head_norm": True,
    "augment": True,
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.01,
    "backbone_lr_mult": 0.1,
    "lr_schedule": "cosine",
    "log_every": 0,
    "eval_split": "test",
    "filter_loss": {"mode": "posterior", "lambda_": 1.0, "z_estimate": "batch", "diversity": 0.234375, "decorrelation": 1.5625},
    "dataset_kwargs": {"max_negatives": 300},
}
SYNTHETIC_KWARGS = {"num_samples": 1000}  # the built-in data: training images (half positives)
TEST_SAMPLES = 400  # synthetic test images


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .evaluate import add_eval_flags
    from .train import add_train_flags

    p = subparsers.add_parser(
        "compare",
        help="train an interpretable CNN and its ordinary twin, evaluate both, write a side-by-side report",
        description=(
            "The main job: train the ordinary and the interpretable version of the same network on the same data "
            "and schedule, evaluate both (accuracy, location instability with its reference points, the collapse "
            "figures, part interpretability, Network Dissection) and write OUT/metrics.json and OUT/report.html. "
            "With no options it runs the recipe (ImageNet EfficientNet-Lite0, stem frozen and computed once) on the "
            "built-in synthetic part world. Running it again with the same --out resumes unfinished runs."
        ),
    )
    p.set_defaults(func=run)
    add_train_flags(p, skip=("interpretable", "eval_split"), defaults={**RECIPE, "out": "runs/compare"})
    add_eval_flags(p, skip=("batch_size", "num_workers", "device", "seed", "cache_dir", "progress"))
    p.add_argument("--eval-split", dest="cfg_eval_split", default=argparse.SUPPRESS, metavar="SPLIT",
                   help="split both networks are evaluated on (default test; val while choosing settings)")
    p.add_argument("--test-samples", type=int, default=TEST_SAMPLES, metavar="N", help=f"synthetic: test images (default {TEST_SAMPLES})")
    return p


def build_config(args: argparse.Namespace):
    """The shared TrainConfig of both twins (defaults < recipe < --config < flags)."""
    from icnn.training import TrainConfig

    from .train import train_flags

    file_values, file = config_file(args)
    flags = train_flags(args)
    dataset = flags.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    task = flags.get("task", file_values.get("task", TrainConfig.task))
    # the recipe caps the negatives of a single-category task; a multi-category one has none
    kwargs = SYNTHETIC_KWARGS if dataset == "synthetic" else RECIPE["dataset_kwargs"] if task == "single" else {}
    base = {**RECIPE, "out": "runs/compare", "dataset_kwargs": dict(kwargs)}
    return build(TrainConfig, flags=flags, file_values=file_values, file=file, base=base)


def _existing_run(run_dir: Path):
    from icnn.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        return None


def ratios(ordinary: dict, interpretable: dict) -> dict:
    out = {}
    for key in ("location_instability", "part_interpretability", "accuracy"):
        a, b = ordinary.get(key), interpretable.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
            out[key] = b / a
    if "accuracy" in ordinary and "accuracy" in interpretable:
        out["accuracy_points"] = 100 * (interpretable["accuracy"] - ordinary["accuracy"])
    return out


def run(args: argparse.Namespace) -> int:
    from icnn import __version__
    from icnn.evaluate import evaluate, json_safe
    from icnn.report.run import write_comparison_report
    from icnn.training import load_model, train
    from icnn.training.checkpoint import atomic_write_json, output_dir
    from icnn.training.classify import build_dataset_for, build_model_for, filter_categories, stem_cache_for

    from .evaluate import eval_config, summary_line

    cfg = build_config(args)
    existing_paths(cfg)
    ecfg = eval_config(args, device=cfg.device, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                       cache_dir=cfg.cache_dir, progress=cfg.progress)  # fmt: skip
    out = output_dir(cfg.out)
    split = cfg.eval_split or "test"
    if args.test_samples < 1:
        raise UsageError(f"--test-samples {args.test_samples}: must be a positive integer")
    test_options = {"num_samples": args.test_samples} if cfg.dataset == "synthetic" else {}
    test_set = build_dataset_for(cfg, split, **test_options)
    twin_cfg = dataclasses.replace(cfg, eval_split=None)  # each twin is evaluated once, at the end, here
    cache = None
    if cfg.freeze_stem:
        torch.manual_seed(cfg.seed)
        probe = build_model_for(dataclasses.replace(cfg, interpretable=False), 1)  # the stem both twins share
        cache = stem_cache_for(probe, cfg)
    runs, timing, results = {}, {}, {}
    for name in ("ordinary", "interpretable"):
        run_dir = out / name
        twin = dataclasses.replace(twin_cfg, interpretable=(name == "interpretable"), out=str(run_dir))
        resume = _existing_run(run_dir)
        print(f"[{name}] training {twin.arch} for {twin.epochs} epochs" + (" (resuming)" if resume else ""), file=sys.stderr)
        t0 = time.perf_counter()
        result = train(twin, resume=resume, cache=cache)
        timing[name] = time.perf_counter() - t0
        model, _, state = load_model(result.checkpoint or run_dir)
        data = cache.dataset(test_set, desc=f"stem cache ({split})") if cache is not None else test_set
        print(f"[{name}] evaluating on {len(test_set)} {split} images", file=sys.stderr)
        t0 = time.perf_counter()
        r = evaluate(model, data, ecfg, categories=filter_categories(model, state, ecfg.layer))
        timing[f"{name}_evaluation"] = time.perf_counter() - t0
        runs[name], results[name] = (model, data, r), r.metrics
        print(summary_line(name, r.metrics))
    if cache is not None:
        print(cache.describe(), file=sys.stderr)
    metrics = {
        "ordinary": results["ordinary"], "interpretable": results["interpretable"],
        "ratios": ratios(results["ordinary"], results["interpretable"]), "config": cfg.to_dict(), "eval_split": split,
        "seconds": timing, "icnn_version": __version__, "torch_version": torch.__version__,
    }  # fmt: skip
    atomic_write_json(out / "metrics.json", json_safe(metrics))
    text = ", ".join(f"{k.replace('_', ' ')}: {v:.3f}" for k, v in metrics["ratios"].items())
    write_comparison_report(
        out / "report.html", runs, title=f"icnn compare: {cfg.arch} on {cfg.dataset}", config=cfg.to_dict(),
        meta={"dataset": cfg.dataset, f"{split} images": len(test_set), "epochs": cfg.epochs, "icnn": __version__},
        text=f"interpretable / ordinary -- {text}" if text else "",
    )
    print(f"interpretable / ordinary: {text}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
