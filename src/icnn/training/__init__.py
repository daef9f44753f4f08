"""Training: the one loop (``loop.fit``), its configs, atomic checkpoints and DDP helpers, and the
classifier objective (``classify``: interpretable CNNs and their ordinary twins)."""

from .checkpoint import CheckpointError, NonFiniteLossError, RunDirError, load_checkpoint, resolve_checkpoint, save_checkpoint
from .classify import ClassifierObjective, build_filter_losses, build_model_for, load_model, train
from .config import Config, ConfigError, RunConfig, TrainConfig
from .distributed import DistEnv, EpochSampler, init_distributed
from .loop import FitResult, Objective, StepOutput, fit

__all__ = [
    "CheckpointError",
    "ClassifierObjective",
    "Config",
    "ConfigError",
    "DistEnv",
    "EpochSampler",
    "FitResult",
    "NonFiniteLossError",
    "Objective",
    "RunConfig",
    "RunDirError",
    "StepOutput",
    "TrainConfig",
    "build_filter_losses",
    "build_model_for",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
