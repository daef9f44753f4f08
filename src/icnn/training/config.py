"""Training configuration: one dataclass, one comment per field (nanoGPT style).

The same config trains the interpretable network and its ordinary twin; they differ only in
``interpretable`` (and hence the filter losses). ``TrainConfig.from_dict`` is strict: an unknown
key is an error naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad training configuration (unknown key, bad value); printed as one line by the CLI.

    ``field`` names the offending config field (``None`` when not about one field) and
    ``reason`` says what is wrong; ``str(err)`` is ``"<field>: <reason>"``.
    """

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason if reason is not None else message


OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("none", "step", "cosine")
TASKS = ("single", "multi")
MULTI_LOSSES = ("softmax", "per_class_logistic")
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass
class TrainConfig:
    # --- model ---
    arch: str = "small_cnn"  # a name in icnn.models (small_cnn, vgg16, alexnet, vgg_m, vgg_s, resnet18, ...)
    weights: str | None = None  # local backbone weights file (torchvision state dict / safetensors); None = random init
    interpretable: bool = True  # True: masks + filter losses on model.layers; False: the ordinary twin
    filter_loss: dict[str, Any] = field(default_factory=dict)  # keyword arguments of icnn.FilterLoss (mode, lambda, ...)
    mask: dict[str, Any] = field(default_factory=dict)  # keyword arguments of icnn.PartMask (beta, distance, mu; beta="adaptive")
    head_norm: bool = False  # BatchNorm1d before the head's fc (both twins): lets the masked net fit (issue 9)
    mask_warmup_epochs: float = 0.0  # masks ramp linearly from identity to the paper's mask over this many epochs (0 = paper)
    # --- data ---
    dataset: str = "synthetic"  # a name in icnn.data (synthetic, cub, pascal_part, ilsvrc_part, custom)
    root: str | None = None  # dataset root directory (None for the synthetic world)
    negatives_root: str | None = None  # negative images for single-category training
    task: str = "single"  # "single": target vs negatives, (B,1) head; "multi": one output per class
    multi_loss: str = "softmax"  # multi-category loss: "softmax" or "per_class_logistic" (paper footnote 4)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of build_dataset
    image_size: int = 64  # input side in pixels (square)
    augment: bool = False  # the dataset's training augmentation
    eval_split: str | None = "test"  # split evaluated after each epoch; None = no evaluation
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    # --- optimisation ---
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # images per optimizer step, per process (global batch = batch_size * world size)
    optimizer: str = "sgd"  # "sgd" (paper: momentum 0.9) or "adam"
    lr: float = 0.01  # base learning rate (head and new layer)
    momentum: float = 0.9  # SGD momentum (paper: 0.9); Adam's beta1
    weight_decay: float = 5e-4  # L2 weight decay on every parameter
    lr_schedule: str = "none"  # "none", "step" (x lr_gamma every lr_step epochs) or "cosine" (to 0 over epochs)
    lr_step: int = 10  # epochs between decays of the "step" schedule
    lr_gamma: float = 0.1  # decay factor of the "step" schedule
    backbone_lr_mult: float = 1.0  # lr multiplier of the backbone (stem + layers["top"]), e.g. 0.1 when fine-tuning weights
    stem_lr_mult: float | None = None  # lr multiplier of the stem alone (0: keep it fixed); None = backbone_lr_mult
    freeze_stem: bool = False  # stem fixed and in eval mode (BatchNorm statistics frozen, no gradient computed)
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 = no clipping
    # --- run ---
    seed: int = 0  # seeds torch, numpy, python and the per-epoch shuffling order
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU runs are deterministic anyway)
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    amp: bool = True  # mixed precision (autocast) on GPU; ignored on CPU
    amp_dtype: str = "bfloat16"  # autocast dtype; "float16" adds a GradScaler
    compile: bool = False  # torch.compile the training step on GPU; ignored on CPU
    out: str = "runs/train"  # output directory: checkpoint/, log.csv, log.jsonl, config.json
    checkpoint_every: int = 0  # also checkpoint every this many steps inside an epoch (0 = end of epoch only)
    log_every: int = 50  # log a "step" row every this many optimizer steps (0 = epoch rows only)
    progress: bool = True  # tqdm bars (also off when stderr is not a terminal)
    tensorboard: bool = False  # also write TensorBoard events to OUT/tensorboard

    # ------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Checks every value; raises ConfigError naming the first bad field."""

        def bad(name: str, why: str) -> ConfigError:
            reason = f"{why} (got {getattr(self, name)!r})"
            return ConfigError(f"{name}: {reason}", field=name, reason=reason)

        choices = {
            "task": TASKS,
            "multi_loss": MULTI_LOSSES,
            "optimizer": OPTIMIZERS,
            "lr_schedule": LR_SCHEDULES,
            "device": DEVICES,
            "amp_dtype": AMP_DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "image_size", "lr_step"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("num_workers", "checkpoint_every", "log_every", "seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        numbers = ("lr", "momentum", "weight_decay", "lr_gamma", "backbone_lr_mult", "grad_clip", "mask_warmup_epochs")
        for name in numbers + (("stem_lr_mult",) if self.stem_lr_mult is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "must be a finite non-negative number")
        for name in ("interpretable", "head_norm", "freeze_stem", "augment", "deterministic", "amp", "compile", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name in ("arch", "dataset", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "must be a non-empty string")
        for name in ("weights", "root", "negatives_root", "eval_split"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        if self.freeze_stem and self.stem_lr_mult:
            raise bad("stem_lr_mult", f"{self.stem_lr_mult} contradicts freeze_stem (a frozen stem is not trained)")
        if self.mask_warmup_epochs and self.mask_warmup_epochs >= self.epochs:
            raise bad("mask_warmup_epochs", f"must be below epochs ({self.epochs}): the mask must be complete before training ends")
        if not isinstance(self.filter_loss, dict):
            raise bad("filter_loss", "must be a table of FilterLoss keyword arguments")
        if not isinstance(self.mask, dict):
            raise bad("mask", "must be a table of PartMask keyword arguments")
        if self.mask:
            from ..mask import PartMask

            try:
                PartMask(**self.mask)
            except (TypeError, ValueError) as exc:
                reason = str(exc).splitlines()[0]
                raise ConfigError(f"mask: {reason}", field="mask", reason=reason) from None
        if not isinstance(self.dataset_kwargs, dict):
            raise bad("dataset_kwargs", "must be a table of build_dataset keyword arguments")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Builds a config from a mapping; unknown keys raise ConfigError naming ``source``."""
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})", field=key)
        cfg = cls(**values)
        # Accept ints where floats are expected (TOML "lr = 1" is an int).
        for f in dataclasses.fields(cls):
            v = getattr(cfg, f.name)
            if f.type in ("float", "float | None") and isinstance(v, int) and not isinstance(v, bool):
                setattr(cfg, f.name, float(v))
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}", field=exc.field, reason=exc.reason) from None
