"""``icnn compare``: the main job -- an interpretable CNN against its ordinary twin.

Trains the ordinary and the interpretable version of the same network on the same data with the
same schedule and seed (they differ only in the masks and filter losses), evaluates both on the
same test images, and writes ``OUT/metrics.json`` (``{"ordinary": {...}, "interpretable":
{...}, "ratios": {...}, ...}``) and ``OUT/report.html`` with the two side by side. The runs live
in ``OUT/ordinary`` and ``OUT/interpretable``; running the same command again resumes whatever
is unfinished.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from . import UsageError

# The built-in default: the synthetic part world at 64 px, a small CNN, minutes on a CPU.
SYNTHETIC_DEFAULTS = {
    "arch": "small_cnn",
    "image_size": 64,
    "epochs": 10,
    "batch_size": 32,
    "lr": 0.03,
    "lr_schedule": "cosine",
    "log_every": 0,
}
TRAIN_SAMPLES = 2000  # synthetic training images (half positives)
TEST_SAMPLES = 400  # synthetic test images


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .evaluate import add_eval_arguments
    from .train import add_train_arguments

    p = subparsers.add_parser(
        "compare",
        help="train an interpretable CNN and its ordinary twin, evaluate both, write a side-by-side report",
        description=(
            "The main job: train the ordinary and the interpretable version of the same network on the same data "
            "and schedule, evaluate both (accuracy, location instability with its reference points, part "
            "interpretability, Network Dissection) and write OUT/metrics.json and OUT/report.html. With no options "
            f"it runs on the built-in synthetic part world ({TRAIN_SAMPLES} training and {TEST_SAMPLES} test images, "
            "small_cnn at 64 px) in minutes on a CPU. Running it again with the same --out resumes unfinished runs."
        ),
    )
    p.set_defaults(func=run)
    add_train_arguments(p, twin_choice=False, resume=False)
    g = p.add_argument_group("compare")
    g.add_argument("--train-samples", type=int, default=None, metavar="N", help=f"synthetic training images (default {TRAIN_SAMPLES})")
    g.add_argument("--test-samples", type=int, default=None, metavar="N", help=f"synthetic test images (default {TEST_SAMPLES})")
    g.add_argument("--split", default="test", metavar="SPLIT", help="split the two networks are evaluated on (default test)")
    add_eval_arguments(p)
    return p


def build_config(args: argparse.Namespace):
    """The shared TrainConfig of both twins (defaults < synthetic defaults < --config < flags)."""
    from icnn.training import ConfigError, TrainConfig

    from ._common import load_config_file
    from .train import FLAG_OF, _filter_loss_flags, _from_flags

    file_values = load_config_file(args.config) if args.config else {}
    flags = _from_flags(args)
    dataset = flags.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    base = dict(SYNTHETIC_DEFAULTS) if dataset == "synthetic" else {"log_every": 0}
    merged = {**base, **file_values, **flags, "out": flags.get("out", file_values.get("out", "runs/compare"))}
    merged["dataset_kwargs"] = {**file_values.get("dataset_kwargs", {}), **flags.get("dataset_kwargs", {})}
    if dataset == "synthetic":
        merged["dataset_kwargs"].setdefault("num_samples", args.train_samples or TRAIN_SAMPLES)
    elif args.train_samples or args.test_samples:
        raise UsageError("--train-samples/--test-samples: only for the synthetic dataset")
    fl = _filter_loss_flags(args)
    if fl:
        merged["filter_loss"] = {**file_values.get("filter_loss", {}), **fl}
    merged["eval_split"] = None  # evaluation is done once, at the end, by compare itself
    try:
        cfg = TrainConfig.from_dict(merged, source="compare")
    except ConfigError as exc:
        raise UsageError(f"{FLAG_OF.get(exc.field, exc.field)}: {exc.reason}") from None
    return cfg


def _train_twin(cfg, name: str, out: Path):
    """Train (or resume, or reload) one twin into ``out/name``."""
    from icnn.training import train
    from icnn.training.checkpoint import CheckpointError, load_model, resolve_checkpoint

    run_dir = out / name
    twin = dataclasses.replace(cfg, interpretable=(name == "interpretable"), out=str(run_dir))
    resume = None
    try:
        ckpt = resolve_checkpoint(run_dir)
        resume = ckpt
    except CheckpointError:
        pass
    print(f"[{name}] training {twin.arch} for {twin.epochs} epochs" + (" (resuming)" if resume else ""), file=sys.stderr)
    t0 = time.perf_counter()
    result = train(twin, resume=resume)
    seconds = time.perf_counter() - t0
    model, _, state = load_model(result.checkpoint or run_dir, device="cpu")
    history = result.history[-1] if result.history else {}
    return model, state, seconds, history


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
    import torch

    from icnn import __version__
    from icnn.evaluate import evaluate, json_safe
    from icnn.report.run import write_comparison_report
    from icnn.training.checkpoint import atomic_write_json
    from icnn.training.engine import resolve_device

    from .evaluate import dataset_for, eval_config, filter_categories, summary_line
    from .train import _check_paths

    cfg = build_config(args)
    _check_paths(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(cfg.device))
    options = {}
    if cfg.dataset == "synthetic":
        options["num_samples"] = args.test_samples or TEST_SAMPLES
    test_set = dataset_for(cfg, split=args.split, options=options)

    runs, timing, results = {}, {}, {}
    for name in ("ordinary", "interpretable"):
        model, state, seconds, _ = _train_twin(cfg, name, out)
        timing[name] = seconds
        print(f"[{name}] evaluating on {len(test_set)} {args.split} images", file=sys.stderr)
        model = model.to(device)
        result = evaluate(model, test_set, eval_config(args, device), categories=filter_categories(model, state))
        model.cpu()
        runs[name] = (model, test_set, result)
        results[name] = result.metrics
        print(summary_line(name, result.metrics))

    metrics = {
        "ordinary": results["ordinary"],
        "interpretable": results["interpretable"],
        "ratios": ratios(results["ordinary"], results["interpretable"]),
        "config": cfg.to_dict(),
        "train_seconds": timing,
        "icnn_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(out / "metrics.json", json_safe(metrics))
    r = metrics["ratios"]
    text = ", ".join(f"{k.replace('_', ' ')}: {v:.3f}" for k, v in r.items())
    write_comparison_report(
        out / "report.html", runs, title=f"icnn compare: {cfg.arch} on {cfg.dataset}", config=cfg.to_dict(),
        meta={"dataset": cfg.dataset, "test images": len(test_set), "epochs": cfg.epochs, "icnn": __version__},
        text=f"interpretable / ordinary -- {text}" if text else "",
    )
    print(f"interpretable / ordinary: {text}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
