"""Training: config, engine (train / train_one_epoch / evaluate), atomic checkpoints, DDP helpers.

``icnn.engine`` re-exports the same names (the package map in docs/DESIGN.md).
"""

from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import DistEnv, EpochSampler, init_distributed
from .engine import (
    ForwardWithMaps,
    NonFiniteLossError,
    StepContext,
    TrainResult,
    build_filter_losses,
    evaluate,
    make_optimizer,
    make_scheduler,
    train,
    train_one_epoch,
    train_step,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DistEnv",
    "EpochSampler",
    "ForwardWithMaps",
    "NonFiniteLossError",
    "StepContext",
    "TrainConfig",
    "TrainResult",
    "build_filter_losses",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
    "train_one_epoch",
    "train_step",
]
