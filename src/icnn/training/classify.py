"""Training an interpretable CNN or its ordinary twin (paper §5): the classifier objective.

One optimizer step::

    logits, maps = net(images)                     # maps: {layer: (B, C, h, w)} after ReLU, before the mask
    loss = task_loss(logits, labels)               # logistic / softmax log loss (icnn.task_loss)
         + sum_layer filter_loss[layer](maps[layer], labels)   # already x lambda (icnn.loss)

The ordinary twin is the same network with ``interpretable=False`` and no filter losses; nothing
else differs. With ``freeze_stem`` the stem is fixed in eval mode and, by default, computed once
(``icnn.cache``): the batches then carry the stem's outputs and the loop runs the top layers only.

``train(cfg)`` builds the data, the network and the objective from a :class:`TrainConfig` and runs
``icnn.training.loop.fit``; ``load_model`` rebuilds a trained network from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..mask import PartMask
from ..metrics.collapse import FilterCollapse, collapse_warnings
from ..models.net import batch_input
from ..task_loss import task_loss_for
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import all_reduce_sum
from .loop import FitResult, Objective, StepOutput, fit, resolve_device, seed_everything


class ForwardWithMaps(nn.Module):
    """``x -> (logits, maps)`` in one ``forward``, so DDP and torch.compile see one call.

    ``x`` is a batch of images, or of the stem's outputs when ``from_stem`` (a cached frozen
    stem). ``on`` picks the maps the filter losses read: ``"relu"`` (the paper: after ReLU,
    before the mask) or ``"masked"``.
    """

    def __init__(self, model: nn.Module, on: str = "relu"):
        super().__init__()
        self.model, self.on = model, on

    def forward(self, x: torch.Tensor, from_stem: bool = False):
        feats = self.model.features_from_stem(x) if from_stem else self.model.forward_features(x)
        return self.model.forward_head(feats.out), (feats.masked if self.on == "masked" else feats.relu), feats.masked


def build_filter_losses(model: nn.Module, *, num_classes: int = 2, negative_class: int | None = 0,
                        image_size: int | None = None, cfg: dict[str, Any] | None = None) -> nn.ModuleDict:  # fmt: skip
    """One ``icnn.FilterLoss`` per interpretable layer of ``model`` (none for the ordinary twin).

    ``num_classes`` counts the dataset's classes (single-category: 2, with ``negative_class=0`` so
    that no filter ever targets the negatives; multi-category: ``negative_class=None``).
    ``image_size`` defaults to the one the model was built for. ``cfg``: ``FilterLossConfig``
    options, plus ``layers`` (limit the losses to some layers); ``on`` is the engine's.
    """
    cfg = cfg or {}
    from ..loss import FilterLoss

    kwargs = {k: v for k, v in cfg.items() if k not in ("on", "layers")}
    names = tuple(getattr(model, "interpretable_layers", ()))
    layers = cfg.get("layers")
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in layers if n not in getattr(model, "layers", {})]
        if unknown:
            raise ConfigError(f"filter_loss: layers: unknown layer {unknown[0]!r} (choose from {', '.join(model.layers)})",
                              field="filter_loss", reason=f"layers: unknown layer {unknown[0]!r}")  # fmt: skip
        names = tuple(n for n in names if n in layers)
    if negative_class is not None:
        kwargs.setdefault("negative_class", negative_class)
    losses = nn.ModuleDict()
    shapes = model.layer_shapes(image_size) if names else {}
    for name in names:
        channels, h, w = shapes[name]
        try:
            losses[name] = FilterLoss(channels, num_classes, map_size=(h, w), **kwargs)
        except (TypeError, ValueError) as exc:  # an unknown key or bad value of the filter_loss table
            raise ConfigError(field="filter_loss", reason=str(exc)) from None
    return losses


def freeze_stem(model: nn.Module) -> nn.Module:
    """Fixes ``model.stem``: no gradient (autograd records nothing below the top conv-layer) and
    eval mode in every epoch (BatchNorm uses and keeps its pretrained statistics)."""
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Module) or next(stem.parameters(), None) is None:
        raise ConfigError(field="freeze_stem", reason="this model has no stem with parameters to freeze")
    return stem.requires_grad_(False).eval()


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone (``stem`` + ``layers["top"]``) at ``lr * backbone_lr_mult``, the rest at ``lr``;
    with ``stem_lr_mult`` set, the stem is its own group at ``lr * stem_lr_mult``; with
    ``freeze_stem`` the stem is in no group (the top layer alone is the backbone group)."""
    stem = list(model.stem.parameters()) if hasattr(model, "stem") and not cfg.freeze_stem else []
    layers = getattr(model, "layers", {})
    top = list(layers["top"].parameters()) if "top" in layers else []
    ids = {id(p) for p in stem + top}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "name": "new"}]
    if cfg.stem_lr_mult is None:
        if stem + top:
            groups.insert(0, {"params": stem + top, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"})
        return groups
    if top:
        groups.insert(0, {"params": top, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "top"})
    if stem:
        groups.insert(0, {"params": stem, "lr": cfg.lr * cfg.stem_lr_mult, "name": "stem"})
    return groups


def mask_strength(warmup_epochs: float, epoch: int, batch: int, batches_per_epoch: int) -> float:
    """Strength of every ``PartMask`` at ``batch`` (0-based) of ``epoch`` (1-based): a linear
    ramp from 0 (identity) to 1 (the paper's mask) over the first ``warmup_epochs`` epochs."""
    if warmup_epochs <= 0:
        return 1.0
    done = (epoch - 1) + batch / max(batches_per_epoch, 1)  # epochs completed before this step
    return min(1.0, done / warmup_epochs)


def set_mask_strength(model: nn.Module, strength: float) -> None:
    for module in model.modules():
        if isinstance(module, PartMask):
            module.strength = float(strength)


SILENT_WARNING = 0.25  # fraction of a layer's filters silent over an epoch that triggers a warning
RUNAWAY_WARNING = 100.0  # growth of a layer's mean max_ij x over the run that triggers a warning
COLLAPSE_FILTERS = 256  # filters whose peak correlations the per-epoch evaluation tracks (a seeded subset of larger layers)
COLLAPSE_MIN_FILTERS = 50  # fewer filters share units by chance (4 filters on 64 units: ~30% at the commonest)


def cliff_warnings(row: dict[str, Any], first: dict[str, Any] | None = None) -> list[str]:
    """Warnings for a diverging run (the task loss grew ``RUNAWAY_WARNING``-fold) and for a
    too-strong filter loss: a layer with more than ``SILENT_WARNING`` of its
    filters silent in the epoch, a layer whose mean ``max_ij x`` grew more than
    ``RUNAWAY_WARNING``-fold since the first epoch, and a layer whose filters collapsed into
    copies of one detector (``icnn.metrics.collapse``)."""
    out = []
    task, task0 = row.get("task"), (first or {}).get("task")
    if task is not None and task0 and row is not first and task > RUNAWAY_WARNING * task0:
        out.append(f"the task loss grew {task / task0:.3g}-fold since the first epoch ({task0:.3g} -> {task:.3g}): "
                   "training diverges (lower --lr or --momentum)")  # fmt: skip
    for k, v in (first or {}).items():
        now = row.get(k)
        if k.endswith("/mean_max") and now is not None and v > 0 and now > RUNAWAY_WARNING * v:
            out.append(f"the activations of layer {k[: -len('/mean_max')]!r} grew {now / v:.3g}-fold since the first epoch "
                       "(mean max): the filter loss is running away (lower --lambda)")  # fmt: skip
    for k, v in row.items():
        if k.endswith("/silent_fraction") and v > SILENT_WARNING:
            out.append(f"{v:.0%} of layer {k[: -len('/silent_fraction')]!r}'s filters were silent in epoch {row['epoch']}: "
                       "the filter loss is too strong for this run (lower --lambda)")  # fmt: skip
    for k in sorted(k for k in row if k.endswith("/peak_correlation")):
        prefix = k[: -len("/peak_correlation")]
        if row.get(f"{prefix}/filters", 0) >= COLLAPSE_MIN_FILTERS:
            figures = {key: row.get(f"{prefix}/{key}") for key in ("peak_correlation", "mode_share", "higher_on_category")}
            out += collapse_warnings(figures, prefix.removeprefix("eval/"))
    return out


class ClassifierObjective(Objective):
    """Task loss + the filter losses of the interpretable layers (none for the ordinary twin).

    Its per-epoch evaluation also measures, per interpretable layer, the collapse figures of the
    masked maps (``icnn.metrics.collapse``: peak correlation, share at the commonest unit, peaks on
    and off the category; this process's share of the evaluated images); they are logged and warned
    about.
    """

    counts_correct = True

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.task_loss = task_loss_for(cfg.task, cfg.multi_loss)
        on = cfg.filter_loss.get("on", "relu")
        if on not in ("relu", "masked"):
            raise ConfigError(field="filter_loss", reason=f"on must be 'relu' or 'masked', got {on!r}")
        self.filter_losses = build_filter_losses(model, num_classes=num_classes, image_size=cfg.image_size, cfg=cfg.filter_loss,
                                                 negative_class=0 if cfg.task == "single" else None)  # fmt: skip
        self.frozen = freeze_stem(model) if cfg.freeze_stem else None
        self.net = ForwardWithMaps(model, on)
        self.num_classes = num_classes

    def param_groups(self, cfg):
        return param_groups(self.model, cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        return self

    def start_epoch(self, epoch: int) -> None:
        for fl in self.filter_losses.values():
            fl.start_epoch(epoch)

    def before_step(self, epoch: int, batch_index: int, batches: int) -> None:
        if self.cfg.mask_warmup_epochs > 0:
            set_mask_strength(self.model, mask_strength(self.cfg.mask_warmup_epochs, epoch, batch_index, batches))

    def _forward(self, batch):
        device = next(self.model.parameters()).device
        x, from_stem = batch_input(batch)
        with self.autocast():
            return self.net(x.to(device, non_blocking=True), from_stem)

    def step(self, batch) -> StepOutput:
        labels = batch["label"].to(next(self.model.parameters()).device, non_blocking=True).long()
        logits, maps, masked = self._forward(batch)
        terms = {"task": self.task_loss(logits.float(), labels)}
        for name, fl in self.filter_losses.items():
            terms[f"filter/{name}"] = fl(maps[name].float(), labels)
        total = torch.stack(list(terms.values())).sum()
        return StepOutput(total, {k: v.detach() for k, v in terms.items()}, labels.shape[0],
                          self.task_loss.correct(logits.detach(), labels))  # fmt: skip

    def diagnostics(self) -> dict[str, float]:
        return {f"{name}/{k}": float(v) for name, fl in self.filter_losses.items() for k, v in fl.diagnostics().items()}

    def warnings(self, row, first):
        return cliff_warnings(row, first)

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        sums = torch.zeros(3, dtype=torch.float64)  # loss x n, correct, n
        collapse: dict[str, FilterCollapse] = {}
        for batch in loader:
            labels = batch["label"].to(next(self.model.parameters()).device).long()
            logits, _, masked = self._forward(batch)
            logits = logits.float()
            for name in self.filter_losses:
                m = masked[name].float()
                b, c = m.shape[:2]
                scores, units = m.reshape(b, c, -1).max(-1)
                collapse.setdefault(name, FilterCollapse(c, self.num_classes, max_pairs_filters=COLLAPSE_FILTERS))
                collapse[name].update(scores.cpu(), units.cpu(), labels.cpu())
            n = labels.shape[0]
            sums += torch.tensor([self.task_loss(logits, labels).item() * n, self.task_loss.correct(logits, labels).item(), n],
                                 dtype=torch.float64)  # fmt: skip
        sums = all_reduce_sum(sums)
        n = max(sums[2].item(), 1.0)
        row = {"task": sums[0].item() / n, "accuracy": sums[1].item() / n, "images": int(sums[2].item())}
        for name, col in collapse.items():
            r = col.compute(self.filter_losses[name].targets().cpu()).summary()
            row.update({f"{name}/{k}": r[k] for k in ("peak_correlation", "mode_share", "higher_on_category")})
            row[f"{name}/filters"] = col.c
        return row


# ----------------------------------------------------------------------------------------------
# building a run from its config


def build_model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``icnn.models.build_model`` for this config."""
    from ..models import build_model  # unknown arch / unreadable weights: icnn.models.ModelError

    return build_model(cfg.arch, num_classes=num_classes, interpretable=cfg.interpretable, image_size=cfg.image_size,
                       weights=cfg.weights, head_norm=cfg.head_norm, head_hidden=cfg.head_hidden,
                       **({"mask": dict(cfg.mask)} if cfg.mask else {}))  # fmt: skip


def build_dataset_for(cfg: TrainConfig, split: str, *, augment: bool = False, **overrides):
    """``icnn.data.build_dataset`` with this config's dataset settings (``overrides`` on top)."""
    from ..data import build_dataset

    kwargs = {**cfg.dataset_kwargs, **overrides}
    return build_dataset(cfg.dataset, cfg.root, split=split, task=cfg.task, image_size=cfg.image_size,
                         negatives_root=cfg.negatives_root, augment=augment, **kwargs)  # fmt: skip


def stem_cache_for(model: nn.Module, cfg: TrainConfig, device=None):
    """The frozen stem's cache of this run (``icnn.cache.StemCache``)."""
    from ..cache import StemCache

    dev = device if device is not None else resolve_device(cfg.device)
    model.to(dev)
    return StemCache(nn.Sequential(model.normalize, model.stem), cache_dir=cfg.cache_dir, device=dev, batch_size=cfg.batch_size,
                     progress=cfg.progress)  # fmt: skip


def train(cfg: TrainConfig, *, resume: str | Path | None = None, model: nn.Module | None = None, train_set=None,
          eval_set=None, cache=None) -> FitResult:  # fmt: skip
    """Trains ``cfg.epochs`` epochs (or continues ``resume``, a run's OUT dir or checkpoint dir).

    ``model``, ``train_set`` and ``eval_set`` replace what the config would build (tests,
    notebooks); ``eval_set`` is only built from the config when ``train_set`` is too. With
    ``freeze_stem`` the stem's outputs are computed once (``cache``: a ``StemCache`` to share,
    e.g. between the twins of a compare; given datasets are then served from it too).
    """
    cfg.validate()
    seed_everything(cfg.seed)  # same on every process: identical initial weights
    from ..data import augments_by_flipping

    flips = cfg.augment and (augments_by_flipping(cfg.dataset) or train_set is not None)  # a given dataset: augment means flip
    if train_set is None:
        train_set = build_dataset_for(cfg, cfg.train_split, augment=flips and not cfg.freeze_stem)
        if cfg.eval_split:
            eval_set = build_dataset_for(cfg, cfg.eval_split)
    if model is None:
        model = build_model_for(cfg, 1 if cfg.task == "single" else len(train_set.classes))  # single: one logistic output
    objective = ClassifierObjective(model, cfg, num_classes=len(train_set.classes))
    if cfg.freeze_stem and not getattr(train_set, "augment", False):
        cache = cache or stem_cache_for(model, cfg)
        train_set = cache.dataset(train_set, flips=flips, desc="stem cache (train)")
        if eval_set is not None:
            eval_set = cache.dataset(eval_set, desc="stem cache (eval)")
        print(cache.describe(), file=sys.stderr)
    return fit(objective, train_set, cfg, resume=resume, eval_set=eval_set)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuilds a trained network from a checkpoint: ``(model, TrainConfig, state)``.

    The architecture comes from the checkpoint's ``config.json``, the weights from its
    ``model.safetensors`` (the backbone weights file it was initialised from is not needed).
    ``state["objective"]`` holds the filter losses' state (e.g. the filters' categories).
    Raises CheckpointError naming the file on any problem.
    """
    weights, state, config = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(config, source=f"checkpoint {path} config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    cfg = dataclasses.replace(cfg, weights=None)  # the checkpoint holds the weights
    model = build_model_for(cfg, int(state.get("num_classes") or 1))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit {cfg.arch} ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, state


def filter_categories(model: nn.Module, state: dict | None, layer: str = "new") -> torch.Tensor | None:
    """Each filter's target category from the filter loss's state (multi-category interpretable
    nets), else None (single-category: every filter's category is the target)."""
    from ..categories import assign_categories

    prefix = f"filter_losses.{layer}.stats."
    st = {k[len(prefix):]: v for k, v in ((state or {}).get("objective") or {}).items() if k.startswith(prefix)}
    if not getattr(model, "interpretable", False) or not st or model.num_classes == 1:
        return None
    return assign_categories(st["class_sum"], st["class_count"], fixed=st["fixed_targets"])
