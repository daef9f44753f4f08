"""Run configuration: small dataclasses, one comment per field (nanoGPT style).

:class:`RunConfig` holds how a run trains (epochs, optimizer, schedule, device, output, logging);
:class:`TrainConfig` (interpretable CNNs and their ordinary twins) and the explainer's
``ExplainConfig`` extend it with what they train. Every rule about a field lives here, once:

- ``validate`` checks each field by its annotation (bool, int, float, str, optional, table) and
  the class's rule tables (``CHOICES``, ``POSITIVE``), raising :class:`ConfigError` naming it;
- ``from_dict`` is strict (an unknown key names the key and where it came from);
- ``resume_conflicts`` says which settings a resumed run may not change (``RESUME_OVERRIDABLE``
  lists those it may: how a run runs, not what it computes);
- ``field_help`` reads each field's comment, which the command line shows as the flag's help.

The same config trains the interpretable network and its ordinary twin; they differ only in
``interpretable`` (and hence the filter losses).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad configuration (unknown key, bad value); printed as one line by the CLI.

    ``field`` names the offending config field (``None`` when not about one field) and
    ``reason`` says what is wrong; ``str(err)`` is ``"<field>: <reason>"`` unless a message is given.
    """

    def __init__(self, message: str | None = None, *, field: str | None = None, reason: str | None = None):
        super().__init__(f"{field}: {reason}" if message is None else message)
        self.field = field
        self.reason = reason if reason is not None else message


class Config:
    """The rules every config dataclass shares (see the module doc); no fields of its own."""

    CHOICES: ClassVar[dict[str, tuple]] = {}
    POSITIVE: ClassVar[tuple[str, ...]] = ()  # > 0, not only >= 0
    SIGNED: ClassVar[tuple[str, ...]] = ()  # numbers that may be negative
    RESUME_OVERRIDABLE: ClassVar[frozenset] = frozenset()

    # ------------------------------------------------------------------ rules
    def _bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(field=name, reason=f"{why} (got {getattr(self, name)!r})")

    def validate(self):
        """Checks every field by its annotation and the rule tables; ConfigError naming the first bad one."""
        for f in dataclasses.fields(self):
            self._check_field(f.name, str(f.type), getattr(self, f.name))
        return self

    def _check_field(self, name: str, kind: str, v: Any) -> None:
        optional = kind.endswith("| None")
        kind = kind.removesuffix(" | None")
        if v is None and optional:
            return
        if kind == "bool" and not isinstance(v, bool):
            raise self._bad(name, "must be true or false")
        if kind == "int":
            least = 1 if name in self.POSITIVE else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise self._bad(name, "must be a positive integer" if least else "must be a non-negative integer")
        if kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise self._bad(name, "must be a finite number")
            if v < 0 and name not in self.SIGNED:
                raise self._bad(name, "must be a finite non-negative number")
            if name in self.POSITIVE and v <= 0:
                raise self._bad(name, "must be positive")
        if kind == "str" and (not isinstance(v, str) or (not v and not optional)):
            raise self._bad(name, "must be a non-empty string" if not optional else "must be a string")
        if kind.startswith("dict") and not isinstance(v, dict):
            raise self._bad(name, "must be a table of keyword arguments")
        if kind.startswith("list") and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise self._bad(name, "must be a list of strings")
        if name in self.CHOICES and v not in self.CHOICES[name]:
            raise self._bad(name, f"must be one of {', '.join(map(str, self.CHOICES[name]))}")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config"):
        """A validated config from a mapping; unknown keys and bad values raise ConfigError naming ``source``."""
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})", field=key)
        cfg = cls(**values)
        for f in dataclasses.fields(cls):  # TOML "lr = 1" is an int where a float is meant
            v = getattr(cfg, f.name)
            if str(f.type).startswith("float") and isinstance(v, int) and not isinstance(v, bool):
                setattr(cfg, f.name, float(v))
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}", field=exc.field, reason=exc.reason) from None

    def resume_conflicts(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{field: (saved value, this config's value)}`` for every setting a resumed run may not change."""
        now = self.to_dict()
        return {k: (saved[k], now[k]) for k in self.field_names()
                if k not in self.RESUME_OVERRIDABLE and k in saved and saved[k] != now[k]}  # fmt: skip

    @classmethod
    @functools.cache
    def field_help(cls) -> dict[str, str]:
        """Each field's trailing comment in the class body (the flags' help), base classes included."""
        out: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if not dataclasses.is_dataclass(klass):
                continue
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):  # no source (frozen app): flags keep their names only
                continue
            for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^\n#]*#\s*(.+)$", source, flags=re.M):
                out[m.group(1)] = m.group(2).strip()
        return out


@dataclass
class RunConfig(Config):
    # --- optimisation ---
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # images per optimizer step and process (global batch = batch size x processes)
    optimizer: str = "sgd"  # sgd (the paper: momentum 0.9) or adam
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # SGD momentum; Adam's beta1
    weight_decay: float = 5e-4  # L2 weight decay
    lr_schedule: str = "none"  # none, step (x lr_gamma every lr_step epochs) or cosine (to 0 at the last epoch)
    lr_step: int = 10  # epochs between decays of the step schedule
    lr_gamma: float = 0.1  # decay factor of the step schedule
    grad_clip: float = 0.0  # clip the global gradient norm to this value (0: no clipping)
    # --- run ---
    seed: int = 0  # seeds weights, shuffling, augmentation
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU; CPU runs are deterministic anyway)
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    amp: bool = True  # mixed precision (autocast) on GPU; ignored on CPU
    amp_dtype: str = "bfloat16"  # autocast dtype on GPU; float16 adds a gradient scaler
    cpu_amp: bool = False  # bfloat16 autocast of the training forward on CPU: faster where the CPU has free AMX units (CUB: 1.6x per epoch), slower elsewhere; changes the numerics (docs/benchmarks.md)
    compile: bool = False  # torch.compile the training step (GPU only)
    num_workers: int = 0  # DataLoader worker processes (resume is bit-exact with 0)
    out: str = "runs/train"  # output directory: checkpoint/, log.csv, log.jsonl, config.json
    train_split: str = "train"  # split trained on: train, or fit (train without the validation images) to choose settings
    checkpoint_every: int = 0  # also checkpoint every this many steps inside an epoch (0: end of epoch only)
    log_every: int = 50  # a log row every this many steps (0: one per epoch)
    progress: bool = True  # progress bars (off when stderr is not a terminal)
    tensorboard: bool = False  # also write TensorBoard events to OUT/tensorboard (needs the tensorboard package)

    CHOICES: ClassVar[dict[str, tuple]] = {
        "optimizer": ("sgd", "adam"),
        "lr_schedule": ("none", "step", "cosine"),
        "amp_dtype": ("bfloat16", "float16"),
        "train_split": ("train", "fit"),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr_step", "lr")  # > 0, not only >= 0
    # what a resumed run may change: how it runs, not what it computes
    RESUME_OVERRIDABLE: ClassVar[frozenset] = frozenset(
        {"epochs", "out", "device", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "amp", "cpu_amp",
         "compile"}
    )

    def validate(self):
        super().validate()
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise self._bad("device", "must be auto, cpu, cuda or cuda:N")
        if not self.momentum < 1:
            raise self._bad("momentum", "must be below 1 (SGD momentum, Adam's beta1): at 1 or more the steps grow without bound")
        return self


@dataclass
class TrainConfig(RunConfig):
    # --- model ---
    arch: str = "small_cnn"  # backbone from icnn.models (small_cnn, vgg16, alexnet, vgg_m, vgg_s, resnet18, resnet50, efficientnet_lite0, ...)
    weights: str | None = None  # backbone weights: a local file (torchvision state dict or .safetensors), or imagenet for efficientnet_lite*; none: random init
    interpretable: bool = True  # true: masks and filter losses; false: the ordinary twin (the same network without them)
    filter_loss: dict[str, Any] = field(default_factory=dict)  # FilterLoss options (icnn.FilterLossConfig: mode, lambda_, ...), plus layers and on
    mask: dict[str, Any] = field(default_factory=dict)  # PartMask options (beta, distance, mu; beta=adaptive)
    head_norm: bool = False  # a BatchNorm1d before the head's fc, in both twins (the masks shrink the pooled features)
    head_hidden: int = 0  # a hidden fc layer of this width (with ReLU) before the head's output layer, in both twins; 0: none
    mask_warmup_epochs: float = 0.0  # ramp the masks linearly from identity to full over this many epochs (0: the paper)
    freeze_stem: bool = False  # keep the stem (the backbone below the top conv-layer) fixed, in eval mode: its outputs are computed once
    backbone_lr_mult: float = 1.0  # learning-rate multiplier of the backbone (stem + top conv-layer)
    stem_lr_mult: float | None = None  # learning-rate multiplier of the stem alone (0 keeps its weights but not its BatchNorm statistics); none: backbone_lr_mult
    # --- data ---
    dataset: str = "synthetic"  # dataset from icnn.data (synthetic, cub200, pascal_part, ilsvrc_part, custom)
    root: str | None = None  # dataset root directory (not needed for the synthetic world)
    negatives_root: str | None = None  # folder of negative images for single-category training
    task: str = "single"  # single: the target category against negatives, logistic loss; multi: one output per class
    multi_loss: str = "softmax"  # loss of the multi-category task: softmax or per_class_logistic (paper footnote 4)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # build_dataset options (category, num_samples, max_negatives, ...)
    image_size: int = 64  # input side in pixels (square)
    augment: bool = False  # random horizontal flips of the training images
    eval_split: str | None = "test"  # split evaluated after every epoch (val while choosing settings); none: no evaluation
    cache_dir: str | None = None  # keep the frozen stem's outputs on disk here (default: in memory)

    CHOICES: ClassVar[dict[str, tuple]] = {
        **RunConfig.CHOICES,
        "task": ("single", "multi"),
        "multi_loss": ("softmax", "per_class_logistic"),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = (*RunConfig.POSITIVE, "image_size")
    RESUME_OVERRIDABLE: ClassVar[frozenset] = RunConfig.RESUME_OVERRIDABLE | {"eval_split", "cache_dir"}

    def validate(self) -> "TrainConfig":
        super().validate()
        if self.freeze_stem and self.stem_lr_mult:
            raise self._bad("stem_lr_mult", f"{self.stem_lr_mult} contradicts freeze_stem (a frozen stem is not trained)")
        if self.mask_warmup_epochs and self.mask_warmup_epochs >= self.epochs:
            raise self._bad("mask_warmup_epochs", f"must be below epochs ({self.epochs}): the mask must be complete before training ends")
        if self.mask:
            from ..mask import PartMask

            try:
                PartMask(**self.mask)
            except (TypeError, ValueError) as exc:
                raise ConfigError(field="mask", reason=str(exc).splitlines()[0]) from None
        return self

    def resume_conflicts(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """As :meth:`Config.resume_conflicts`; an ordinary twin computes nothing with the filter loss
        or the masks, so their settings may change (a compare resumed with another recipe keeps it)."""
        conflicts = super().resume_conflicts(saved)
        if not self.interpretable and not saved.get("interpretable", True):
            for name in ("filter_loss", "mask", "mask_warmup_epochs"):
                conflicts.pop(name, None)
        return conflicts
