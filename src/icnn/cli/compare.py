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

import torch

from . import UsageError

# The built-in default: the synthetic part world at 64 px, a small CNN, minutes on a CPU.
SYNTHETIC_DEFAULTS = {
    "arch": "small_cnn",
    "image_size": 64,
    "epochs": 8,
    "batch_size": 32,
    "lr": 0.03,
    "lr_schedule": "cosine",
    "log_every": 0,
}
TRAIN_SAMPLES = 2000  # synthetic training images (half positives)
TEST_SAMPLES = 400  # synthetic test images
PRETRAIN_EPOCHS = 4  # synthetic: epochs of the shared multi-category pretraining (the paper's ImageNet stage)
PRETRAIN_SAMPLES = 3000  # synthetic scenes of all categories for that pretraining
BACKBONE_PREFIXES = ("normalize.", "stem.", "layers.top.")  # what pretraining hands to both twins
# The fine-tuning recipe of both twins' fresh new layer and head (docs/filter_loss.md): the masks
# ramp in over the first quarter of the epochs and the filter loss starts after 3/8 of them. With
# the paper's full masks and loss from step 1 a fresh new layer and head never learn the task.
MASK_WARMUP_FRACTION = 0.25
FILTER_WARMUP_FRACTION = 0.375


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
    g.add_argument("--pretrain-epochs", type=int, default=None, metavar="N",
                   help=f"synthetic: first pretrain one ordinary backbone for N epochs on the multi-category task "
                        f"({PRETRAIN_SAMPLES} scenes of every category), then fine-tune both twins from it, as the paper "
                        f"fine-tunes ImageNet-pretrained backbones (default {PRETRAIN_EPOCHS}; 0: both twins from scratch)")
    g.add_argument("--pretrain-samples", type=int, default=PRETRAIN_SAMPLES, metavar="N",
                   help=f"synthetic scenes for the pretraining (default {PRETRAIN_SAMPLES})")
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
    epochs = merged.get("epochs", TrainConfig.epochs)
    if "mask_warmup_epochs" not in file_values and "mask_warmup_epochs" not in flags and isinstance(epochs, int):
        merged["mask_warmup_epochs"] = MASK_WARMUP_FRACTION * epochs
    merged["filter_loss"] = dict(merged.get("filter_loss", {}))
    if isinstance(epochs, int):
        merged["filter_loss"].setdefault("warmup_epochs", int(FILTER_WARMUP_FRACTION * epochs))
    try:
        cfg = TrainConfig.from_dict(merged, source="compare")
    except ConfigError as exc:
        raise UsageError(f"{FLAG_OF.get(exc.field, exc.field)}: {exc.reason}") from None
    return cfg


def _existing_run(run_dir: Path):
    from icnn.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        return None


def pretrain_backbone(cfg, out: Path, epochs: int, samples: int = PRETRAIN_SAMPLES) -> dict:
    """The shared starting point of both twins: an ordinary network trained on the synthetic
    multi-category task (every category and background scenes), like the paper's ImageNet
    pretraining. Returns its backbone tensors (``normalize``, ``stem``, ``layers.top``)."""
    from icnn.training import train
    from icnn.training.checkpoint import load_model

    run_dir = out / "pretrain"
    kwargs = {k: v for k, v in cfg.dataset_kwargs.items() if k not in ("num_samples", "category", "margin")}
    # the twins' learning-rate multipliers are fine-tuning settings: the pretraining trains the whole
    # backbone (else --stem-lr-mult 0 would hand both twins a random, frozen stem)
    pre = dataclasses.replace(cfg, task="multi", multi_loss="softmax", interpretable=False, epochs=epochs, out=str(run_dir),
                              dataset_kwargs={**kwargs, "num_samples": samples}, filter_loss={},
                              backbone_lr_mult=1.0, stem_lr_mult=None, freeze_stem=False)
    resume = _existing_run(run_dir)
    print(f"[pretrain] {pre.arch} on the multi-category task for {epochs} epochs" + (" (resuming)" if resume else ""),
          file=sys.stderr)
    train(pre, resume=resume)
    model, _, _ = load_model(run_dir, device="cpu")
    return {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


def _train_twin(cfg, name: str, out: Path, backbone: dict | None = None, num_classes: int = 1):
    """Train (or resume, or reload) one twin into ``out/name``, from ``backbone`` if given."""
    from icnn.training import train
    from icnn.training.checkpoint import load_model
    from icnn.training.engine import build_model_for

    run_dir = out / name
    twin = dataclasses.replace(cfg, interpretable=(name == "interpretable"), out=str(run_dir))
    resume = _existing_run(run_dir)
    model = None
    if backbone is not None and resume is None:
        torch.manual_seed(cfg.seed)  # new layer and head: the same initial weights in both twins
        model = build_model_for(twin, num_classes)
        missing = model.load_state_dict(backbone, strict=False)
        if missing.unexpected_keys:
            raise UsageError(f"pretrained backbone does not fit {twin.arch}: {missing.unexpected_keys[0]}")
    print(f"[{name}] training {twin.arch} for {twin.epochs} epochs" + (" (resuming)" if resume else ""), file=sys.stderr)
    t0 = time.perf_counter()
    result = train(twin, resume=resume, model=model)
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
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else (PRETRAIN_EPOCHS if cfg.dataset == "synthetic" else 0)
    if pretrain < 0:
        raise UsageError(f"--pretrain-epochs {pretrain}: must be >= 0")
    if pretrain and cfg.dataset != "synthetic":
        raise UsageError("--pretrain-epochs: only for the synthetic dataset (real data: pass --weights FILE)")
    backbone = None
    if pretrain:
        t0 = time.perf_counter()
        backbone = pretrain_backbone(cfg, out, pretrain, args.pretrain_samples)
        timing["pretrain"] = time.perf_counter() - t0
    for name in ("ordinary", "interpretable"):
        model, state, seconds, _ = _train_twin(cfg, name, out, backbone, 1 if cfg.task == "single" else len(test_set.classes))
        timing[name] = seconds
        print(f"[{name}] evaluating on {len(test_set)} {args.split} images", file=sys.stderr)
        model = model.to(device)
        result = evaluate(model, test_set, eval_config(args, device), categories=filter_categories(model, state))
        model.cpu()
        runs[name] = (model, test_set, result)
        results[name] = result.metrics
        print(summary_line(name, result.metrics))

    metrics = {
        "pretrain_epochs": pretrain,
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
