"""``icnn train``: train an interpretable CNN (paper §5) or its ordinary twin.

Every flag is a field of :class:`icnn.training.TrainConfig` (``icnn.cli._flags``). Writes
``OUT/checkpoint/`` (model.safetensors, state.pt, config.json), ``OUT/log.csv``,
``OUT/log.jsonl`` and ``OUT/config.json``. ``--resume RUN`` continues a run exactly where its last
checkpoint left it, with its saved settings (only how it runs may change); under ``torchrun`` it
trains with DDP.
"""

from __future__ import annotations

import argparse

from ._common import add_command, add_common_flags, existing_paths
from ._flags import add_config_flags, build_run, given


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "train", run,
        help="train an interpretable CNN or its ordinary twin",
        description="Train an interpretable CNN (Zhang, Wu, Zhu, CVPR 2018): the top conv-layer's filters and a new "
        "conv-layer above it become interpretable, each pushed by a filter loss to fire on one part of one "
        "category. --no-interpretable trains the same network without masks and filter losses (the baseline). "
        "Settings: defaults < --config FILE < flags given here. Multi-GPU: torchrun --nproc_per_node=K -m icnn train ...",
    )
    add_train_flags(p)
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in RUN (its output directory or checkpoint/) "
                   "with its saved settings; --epochs, --device, workers and logging may change")
    return p


def add_train_flags(p: argparse.ArgumentParser, *, skip=(), defaults: dict | None = None) -> None:
    """The TrainConfig flags (shared with ``icnn compare``) and ``--lambda``, ``--config``."""
    from icnn.training import TrainConfig

    add_config_flags(p, TrainConfig, skip=skip, defaults=defaults, group="training (icnn.training.TrainConfig)")
    if "interpretable" not in skip:
        p.add_argument("--ordinary", dest="cfg_interpretable", action="store_false", default=argparse.SUPPRESS,
                       help="same as --no-interpretable: the ordinary twin")
    p.add_argument("--lambda", dest="lambda_", type=float, default=argparse.SUPPRESS, metavar="X",
                   help="shortcut for --filter-loss lambda_=X: the base weight of the filter losses")
    add_common_flags(p)


def train_flags(args: argparse.Namespace) -> dict:
    from icnn.training import TrainConfig

    flags = given(args, TrainConfig)
    if hasattr(args, "lambda_"):
        flags["filter_loss"] = {**flags.get("filter_loss", {}), "lambda_": args.lambda_}
    return flags


def build_config(args: argparse.Namespace):
    """The run's config and the run to resume (or None); a resumed run keeps its settings."""
    from icnn.training import TrainConfig

    return build_run(TrainConfig, args, train_flags(args))


def run(args: argparse.Namespace) -> int:
    from icnn.training import train

    cfg, resume = build_config(args)
    existing_paths(cfg)
    result = train(cfg, resume=resume)
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
