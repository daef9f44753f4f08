"""``icnn train``: train an interpretable CNN (paper §5) or its ordinary twin.

Settings: TrainConfig defaults < ``--config FILE`` (TOML/YAML/JSON, keys = TrainConfig fields)
< flags given on the command line. Writes ``OUT/checkpoint/`` (model.safetensors, state.pt,
config.json), ``OUT/log.csv``, ``OUT/log.jsonl`` and ``OUT/config.json``. ``--resume OUT``
continues a run exactly where its last checkpoint left it; under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from . import UsageError
from ._common import existing_dir, existing_file, explicit, fresh_out_dir, load_config_file, parse_device

# argparse dest -> TrainConfig field
FLAGS: dict[str, str] = {
    "arch": "arch",
    "weights": "weights",
    "dataset": "dataset",
    "root": "root",
    "negatives": "negatives_root",
    "task": "task",
    "multi_loss": "multi_loss",
    "interpretable": "interpretable",
    "image_size": "image_size",
    "augment": "augment",
    "eval_split": "eval_split",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "lr_schedule": "lr_schedule",
    "backbone_lr_mult": "backbone_lr_mult",
    "stem_lr_mult": "stem_lr_mult",
    "freeze_stem": "freeze_stem",
    "grad_clip": "grad_clip",
    "mask_warmup_epochs": "mask_warmup_epochs",
    "head_norm": "head_norm",
    "seed": "seed",
    "deterministic": "deterministic",
    "device": "device",
    "amp": "amp",
    "compile": "compile",
    "num_workers": "num_workers",
    "out": "out",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
    "progress": "progress",
    "tensorboard": "tensorboard",
}
FLAG_OF = {field: "--" + dest.replace("_", "-") for dest, field in FLAGS.items()}
FLAG_OF.update({"negatives_root": "--negatives", "progress": "--no-progress", "interpretable": "--interpretable/--ordinary", "dataset_kwargs": "--dataset-option", "filter_loss": "--filter-loss", "mask": "--mask"})

# What a resumed run may change: how it runs, not what it computes.
RESUME_OVERRIDABLE = {"epochs", "out", "device", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "amp", "compile", "eval_split"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train an interpretable CNN or its ordinary twin",
        description=(
            "Train an interpretable CNN (Zhang, Wu, Zhu, CVPR 2018): the top conv-layer's filters and a new "
            "conv-layer above it become interpretable, each pushed by a filter loss to fire on one part of one "
            "category. --ordinary trains the same network without masks and filter losses (the baseline). "
            "Settings: defaults < --config FILE < flags given here. Multi-GPU: torchrun --nproc_per_node=K -m icnn train ..."
        ),
    )
    p.set_defaults(func=run)
    add_train_arguments(p)
    return p


def add_train_arguments(p: argparse.ArgumentParser, *, twin_choice: bool = True, resume: bool = True) -> None:
    """The TrainConfig flags (shared with ``icnn compare``, which trains both twins)."""
    from icnn.training import TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=S, metavar="NAME", help=f"backbone from icnn.models (small_cnn, vgg16, alexnet, vgg_m, vgg_s, resnet18, resnet50, efficientnet_lite0, ...; default {d.arch})")
    g.add_argument("--weights", default=S, metavar="FILE", help="local backbone weights (torchvision state dict or .safetensors; 'imagenet' for efficientnet_lite*); default: random init")
    if twin_choice:
        mode = g.add_mutually_exclusive_group()
        mode.add_argument("--interpretable", dest="interpretable", action="store_true", default=S, help="train the interpretable network: masks and filter losses (default)")
        mode.add_argument("--ordinary", dest="interpretable", action="store_false", default=S, help="train the ordinary twin: same network, no masks, no filter losses")
    g.add_argument("--lambda", dest="lambda_", type=float, default=S, metavar="X", help="base weight of the filter losses (FilterLoss lambda_; default: the FilterLoss default)")
    g.add_argument("--mask-warmup-epochs", type=float, default=S, metavar="N", help="ramp the masks in linearly over the first N epochs (a fresh new layer and head learn too slowly through the full mask; default: %s)" % d.mask_warmup_epochs)
    g.add_argument("--head-norm", action=argparse.BooleanOptionalAction, default=S, help="a BatchNorm1d before the head's fc layer, in both twins: the masks shrink the pooled features ~10x and without it a fine-tuned interpretable net may not fit (default %s)" % ("on" if d.head_norm else "off"))
    g.add_argument("--mask", dest="mask_option", action="append", default=S, metavar="KEY=VALUE", help="a PartMask option, e.g. beta=adaptive (the original code's learned per-filter slope), mu=centroid, distance=l2 (repeatable)")
    g.add_argument("--filter-loss", dest="filter_loss", action="append", default=S, metavar="KEY=VALUE", help="a FilterLoss option, e.g. mode=exact or schedule=paper (repeatable)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="NAME", help=f"dataset from icnn.data (synthetic, cub200, pascal_part, ilsvrc_part, custom; default {d.dataset})")
    g.add_argument("--dataset-option", dest="dataset_option", action="append", default=S, metavar="KEY=VALUE", help="a build_dataset option, e.g. category=dog or num_samples=500 (repeatable)")
    g.add_argument("--root", default=S, metavar="DIR", help="dataset root directory (not needed for the synthetic world)")
    g.add_argument("--negatives", default=S, metavar="DIR", help="directory of negative images for single-category training")
    g.add_argument("--task", default=S, choices=("single", "multi"), help=f"single: target category vs negatives, logistic log loss; multi: one output per class (default {d.task})")
    g.add_argument("--multi-loss", default=S, choices=("softmax", "per_class_logistic"), help=f"loss of --task multi: softmax log loss or per-class logistic log loss (paper footnote 4; default {d.multi_loss})")
    g.add_argument("--image-size", type=int, default=S, metavar="PX", help=f"input side in pixels (default {d.image_size})")
    g.add_argument("--augment", action="store_true", default=S, help="use the dataset's training augmentation")
    g.add_argument("--eval-split", default=S, metavar="SPLIT", help=f"split evaluated after every epoch, or 'none' (default {d.eval_split})")
    g.add_argument("--num-workers", type=int, default=S, metavar="N", help=f"DataLoader worker processes (default {d.num_workers}; resume is bit-exact only with 0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, metavar="N", help=f"passes over the training set (default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=S, metavar="N", help=f"images per step and process (default {d.batch_size})")
    g.add_argument("--optimizer", default=S, choices=("sgd", "adam"), help=f"optimizer (default {d.optimizer}; the paper uses SGD with momentum 0.9)")
    g.add_argument("--lr", type=float, default=S, metavar="X", help=f"learning rate of the new layers and head (default {d.lr})")
    g.add_argument("--momentum", type=float, default=S, metavar="X", help=f"SGD momentum / Adam beta1 (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, default=S, metavar="X", help=f"L2 weight decay (default {d.weight_decay})")
    g.add_argument("--lr-schedule", default=S, choices=("none", "step", "cosine"), help=f"learning-rate schedule over epochs (default {d.lr_schedule})")
    g.add_argument("--backbone-lr-mult", type=float, default=S, metavar="X", help=f"learning-rate multiplier of the backbone (stem + top layer), e.g. 0.1 with --weights (default {d.backbone_lr_mult})")
    g.add_argument("--stem-lr-mult", type=float, default=S, metavar="X", help="learning-rate multiplier of the stem alone (the backbone below the top conv-layer); 0 keeps it fixed (default: --backbone-lr-mult)")
    g.add_argument("--freeze-stem", action=argparse.BooleanOptionalAction, default=S, help="keep the stem (the backbone below the top conv-layer) fixed, in eval mode: pretrained BatchNorm statistics, no gradient computed below the top layer (EfficientNet-Lite0 at 224 px on a CPU: 1.7x faster steps, half the memory). Unlike --stem-lr-mult 0 its BatchNorm statistics do not move (default %s)" % ("on" if d.freeze_stem else "off"))
    g.add_argument("--grad-clip", type=float, default=S, metavar="X", help="clip the gradient norm to X (default: no clipping)")
    g.add_argument("--seed", type=int, default=S, metavar="N", help=f"random seed: weights, shuffling, augmentation (default {d.seed})")
    g.add_argument("--deterministic", action="store_true", default=S, help="torch.use_deterministic_algorithms (GPU; CPU runs are deterministic anyway)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default=S, metavar="DEV", help=f"auto, cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S, help="mixed precision on GPU (default on; ignored on CPU)")
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the training step (GPU only)")
    g.add_argument("--out", default=S, metavar="DIR", help=f"output directory: checkpoint/, log.csv, log.jsonl, config.json (default {d.out}; with --resume: the resumed run's directory)")
    if resume:
        g.add_argument("--resume", default=None, metavar="PATH", help="continue the run in PATH (its output directory or its checkpoint/ directory) from its last checkpoint")
    g.add_argument("--config", default=None, metavar="FILE", help="settings file (.toml, .yaml or .json) whose keys are TrainConfig fields; flags given here override it")
    g.add_argument("--checkpoint-every", type=int, default=S, metavar="N", help="also checkpoint every N steps inside an epoch (default: at the end of each epoch only)")
    g.add_argument("--log-every", type=int, default=S, metavar="N", help=f"write a log row every N steps (0: one per epoch; default {d.log_every})")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars (they are also off when stderr is not a terminal)")
    g.add_argument("--tensorboard", action="store_true", default=S, help="also write TensorBoard events to OUT/tensorboard (needs the tensorboard package)")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(flag: str, items: list[str] | None, example: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item}: expected KEY=VALUE (e.g. {example})")
        table[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return table


def _filter_loss_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    table = _key_values("--filter-loss", getattr(args, "filter_loss", None), "mode=exact")
    if hasattr(args, "lambda_"):
        table["lambda_"] = args.lambda_
    return table or None


def _from_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = explicit(args, {k: v for k, v in FLAGS.items() if k != "filter_loss"})
    if isinstance(flags.get("eval_split"), str) and flags["eval_split"].lower() == "none":
        flags["eval_split"] = None
    if "device" in flags:
        flags["device"] = parse_device(flags["device"])
    if hasattr(args, "dataset_option"):
        flags["dataset_kwargs"] = _key_values("--dataset-option", args.dataset_option, "category=dog")
    if hasattr(args, "mask_option"):
        flags["mask"] = _key_values("--mask", args.mask_option, "beta=adaptive")
    return flags


def build_config(args: argparse.Namespace):
    """The run's TrainConfig and the checkpoint to resume (or None). Raises UsageError."""
    from icnn.training import ConfigError, TrainConfig
    from icnn.training.checkpoint import CONFIG_FILE, CheckpointError, resolve_checkpoint

    file_values = load_config_file(args.config) if args.config else {}
    source = f"--config {args.config}"
    if file_values:
        TrainConfig.from_dict(file_values, source=source)  # errors name the file
    flags = _from_flags(args)
    fl_flags = _filter_loss_flags(args)

    if args.resume is None:
        merged = {**file_values, **flags}
        if "dataset_kwargs" in flags:
            merged["dataset_kwargs"] = {**file_values.get("dataset_kwargs", {}), **flags["dataset_kwargs"]}
        if fl_flags:
            merged["filter_loss"] = {**file_values.get("filter_loss", {}), **fl_flags}
        try:
            cfg = TrainConfig.from_dict(merged, source="command line")
        except ConfigError as exc:
            if exc.field in flags or (exc.field == "filter_loss" and fl_flags):
                raise UsageError(f"{FLAG_OF.get(exc.field, exc.field)}: {exc.reason}") from None
            raise UsageError(f"{source}: {exc.reason if exc.field is None else f'{exc.field}: {exc.reason}'}") from None
        fresh_out_dir(cfg.out, hint=f"; continue it with --resume {cfg.out} or choose another --out")
        return cfg, None

    try:
        ckpt_dir = resolve_checkpoint(args.resume)
        saved = json.loads((ckpt_dir / CONFIG_FILE).read_text())
        base = TrainConfig.from_dict(saved, source=str(ckpt_dir / CONFIG_FILE))
    except (CheckpointError, ConfigError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--resume {args.resume}: {exc}") from None
    base = dataclasses.replace(base, out=str(ckpt_dir.parent))
    overrides = {**file_values, **flags}
    if "dataset_kwargs" in flags:
        overrides["dataset_kwargs"] = {**base.dataset_kwargs, **flags["dataset_kwargs"]}
    if fl_flags:
        overrides["filter_loss"] = {**base.filter_loss, **fl_flags}
    changes = {}
    for key, value in overrides.items():
        if key in RESUME_OVERRIDABLE:
            changes[key] = value
        elif getattr(base, key) != value:
            where = FLAG_OF.get(key, key) if key in flags or key == "filter_loss" else f"{source} ({key})"
            raise UsageError(
                f"{where}: a resumed run keeps its checkpoint's setting ({key} = {getattr(base, key)!r}); "
                "drop it or start a new run"
            )
    try:
        cfg = dataclasses.replace(base, **changes).validate()
    except ConfigError as exc:
        raise UsageError(f"{FLAG_OF.get(exc.field, exc.field)}: {exc.reason}") from None
    return cfg, ckpt_dir


def _check_paths(cfg) -> None:
    existing_dir("--root", cfg.root)
    existing_dir("--negatives", cfg.negatives_root)
    if cfg.weights not in (None, "imagenet"):
        existing_file("--weights", cfg.weights)
    try:
        from icnn.models import list_models
    except ImportError:  # models not importable: build_model reports the problem itself
        return
    names = list_models()
    if cfg.arch not in names:
        raise UsageError(f"--arch {cfg.arch}: unknown architecture (choose one of {', '.join(names)})")


def run(args: argparse.Namespace) -> int:
    from icnn.training import NonFiniteLossError, train

    cfg, ckpt = build_config(args)
    _check_paths(cfg)
    try:
        result = train(cfg, resume=ckpt)
    except NonFiniteLossError as exc:
        print(f"icnn: error: {exc}", file=sys.stderr)
        return 1
    if result.history:
        last = result.history[-1]
        msg = f"trained to epoch {last['epoch']} (step {result.step}): loss {last['loss']:.4f}, accuracy {last['accuracy']:.3f}"
        if "eval/accuracy" in last:
            msg += f", eval accuracy {last['eval/accuracy']:.3f}"
        print(msg)
    else:
        print(f"nothing to do: the run in {cfg.out} already reached epoch {cfg.epochs} (raise --epochs to continue)")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0
