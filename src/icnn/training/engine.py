"""The training engine shared by interpretable networks and their ordinary twins (paper §5).

One optimizer step::

    logits, relu = net(images)                     # relu: {layer: (B, C, h, w)} after ReLU, before the mask
    loss = task_loss(logits, labels)               # logistic / softmax log loss (icnn.task_loss)
         + sum_layer filter_loss[layer](relu[layer], labels)   # -MI(X; T), already x lambda (Eq. 1-4)

The ordinary twin is the same network with ``interpretable=False`` and no filter losses; nothing
else differs. Each filter loss updates its weight ``lambda`` at the start of every epoch
(``start_epoch(t)``, t from 1). A non-finite loss stops the run at once with
:class:`NonFiniteLossError` before the optimizer step, so no checkpoint ever holds its effect.

``train(cfg)`` builds everything from a :class:`TrainConfig` and runs the epochs;
``train_one_epoch`` is the loop itself (DINO/MAE style), apart from argument parsing.
Resume is exact on CPU with ``num_workers=0``: the shuffling order is a function of
``(seed, epoch)``, the DataLoader has its own generator, and the checkpoint holds every RNG state.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..mask import PartMask
from ..task_loss import TaskLoss, task_loss_for
from .checkpoint import atomic_write_json, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig
from .distributed import DistEnv, EpochSampler, all_reduce_sum, cleanup_distributed, init_distributed
from .logs import RunLog


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the epoch, the step and the term."""


# ----------------------------------------------------------------------------------------------
# set-up helpers


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cuda"`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r} (use cpu, cuda or auto)") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ForwardWithMaps(nn.Module):
    """``x -> (logits, maps)`` in one ``forward``, so DDP and torch.compile see one call.

    ``model`` is an ``InterpretableNet`` (``forward_features`` / ``forward_head``); ``on`` picks
    the maps the filter losses read: ``"relu"`` (the paper: after ReLU, before the mask) or
    ``"masked"`` (after the mask).
    """

    def __init__(self, model: nn.Module, on: str = "relu"):
        super().__init__()
        self.model = model
        self.on = on

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats.out), (feats.masked if self.on == "masked" else feats.relu)


@torch.no_grad()
def layer_shapes(model: nn.Module, image_size: int, device: torch.device) -> dict[str, tuple[int, int, int]]:
    """``{layer: (C, h, w)}`` of the relu maps, from one forward pass of a blank image."""
    was_training = model.training
    model.eval()
    try:
        feats = model.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return {name: tuple(m.shape[1:]) for name, m in feats.relu.items()}


def build_filter_losses(
    model: nn.Module,
    *,
    num_classes: int,
    image_size: int,
    cfg: dict[str, Any],
    device: torch.device,
    negative_class: int | None = None,
) -> nn.ModuleDict:
    """One ``icnn.FilterLoss`` per interpretable layer of ``model`` (none for the ordinary twin).

    ``num_classes`` counts the dataset's classes (single-category: 2, with ``negative_class=0``
    so that no filter ever targets the negatives).
    """
    names = getattr(model, "interpretable_layers", tuple(model.layers) if getattr(model, "interpretable", False) else ())
    kwargs = dict(cfg)
    kwargs.pop("on", None)  # read by the engine: which maps the losses see
    layers = kwargs.pop("layers", None)  # which interpretable layers carry a filter loss (default: all)
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in getattr(model, "layers", {})]
        if unknown:
            raise ConfigError(f"filter_loss: layers: unknown layer {unknown[0]!r} (choose from {', '.join(model.layers)})")
        names = tuple(n for n in names if n in layers)
    if not names:
        return nn.ModuleDict()
    from ..loss import FilterLoss

    shapes = layer_shapes(model, image_size, device)
    if negative_class is not None:
        kwargs.setdefault("negative_class", negative_class)
    losses = nn.ModuleDict()
    for name in names:
        c, h, w = shapes[name]
        try:
            losses[name] = FilterLoss(c, num_classes, map_size=(h, w), **kwargs)
        except (TypeError, ValueError) as exc:  # an unknown key or bad value of the filter_loss table
            raise ConfigError(f"filter_loss: {exc}") from None
    return losses.to(device)


def freeze_stem(model: nn.Module) -> nn.Module:
    """Fixes ``model.stem`` for fine-tuning: no gradient (so autograd records nothing below the
    top conv-layer) and, through ``ctx.frozen``, eval mode in every epoch (BatchNorm uses and
    keeps its pretrained statistics). Returns the stem."""
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Module) or next(stem.parameters(), None) is None:
        reason = "this model has no stem with parameters to freeze"
        raise ConfigError(f"freeze_stem: {reason}", field="freeze_stem", reason=reason)
    return stem.requires_grad_(False).eval()


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone (``stem`` + ``layers["top"]``) at ``lr * backbone_lr_mult``, the rest at ``lr``;
    with ``stem_lr_mult`` set, the stem is its own group at ``lr * stem_lr_mult``; with
    ``freeze_stem`` the stem is in no group (the top layer alone is the backbone group)."""
    stem = list(model.stem.parameters()) if hasattr(model, "stem") and not cfg.freeze_stem else []
    layers = getattr(model, "layers", {})
    top = list(layers["top"].parameters()) if "top" in layers else []
    ids = {id(p) for p in stem + top}
    rest = [p for p in model.parameters() if id(p) not in ids]
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Stepped once per epoch; ``None`` for ``lr_schedule="none"``."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def autocast_for(device: torch.device, cfg: TrainConfig):
    """Mixed precision on GPU only; a no-op context on CPU."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype))
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class StepContext:
    """Everything one optimizer step needs besides the batch."""

    net: nn.Module  # ForwardWithMaps, possibly wrapped in DDP / torch.compile
    model: nn.Module  # the raw InterpretableNet (for clipping, checkpoints)
    task_loss: TaskLoss
    filter_losses: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: Callable[[], Any] = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float = 0.0
    mask_warmup_epochs: float = 0.0  # the masks ramp from identity to full over this many epochs
    frozen: nn.Module | None = None  # a frozen stem, kept in eval mode while the rest trains


def mask_strength(warmup_epochs: float, epoch: int, batch: int, batches_per_epoch: int) -> float:
    """Strength of every ``PartMask`` at ``batch`` (0-based) of ``epoch`` (1-based): a linear
    ramp from 0 (identity) to 1 (the paper's mask) over the first ``warmup_epochs`` epochs."""
    if warmup_epochs <= 0:
        return 1.0
    done = (epoch - 1) + batch / max(batches_per_epoch, 1)  # epochs completed before this step
    return min(1.0, done / warmup_epochs)


def set_mask_strength(model: nn.Module, strength: float) -> None:
    """Sets ``strength`` of every ``PartMask`` in ``model``."""
    for module in model.modules():
        if isinstance(module, PartMask):
            module.strength = float(strength)


# Order of the per-step values gathered into one tensor (one host sync per step).
def _term_names(filter_losses: nn.ModuleDict) -> list[str]:
    return ["loss", "task"] + [f"filter/{name}" for name in filter_losses]


def train_step(ctx: StepContext, batch: dict[str, torch.Tensor], *, where: str = "") -> torch.Tensor:
    """One optimizer step on ``batch``; returns ``[total, task, filter..., correct, n]`` on the CPU.

    Raises NonFiniteLossError (before ``optimizer.step``) when any term is NaN/inf.
    """
    images = batch["image"].to(ctx.device, non_blocking=True)  # (B, 3, H, W)
    labels = batch["label"].to(ctx.device, non_blocking=True)  # (B,)
    with ctx.autocast():
        logits, relu = ctx.net(images)  # (B, K), {layer: (B, C, h, w)}
    task = ctx.task_loss(logits.float(), labels)
    terms = [task]
    for name, fl in ctx.filter_losses.items():
        terms.append(fl(relu[name].float(), labels))
    total = torch.stack(terms).sum()
    correct = ctx.task_loss.correct(logits.detach(), labels)
    values = torch.stack([total.detach(), *[t.detach().float() for t in terms], correct]).cpu()  # one sync
    if not torch.isfinite(values[:-1]).all():
        named = list(zip(_term_names(ctx.filter_losses), values[:-1].tolist()))
        parts = named[1:] if not all(math.isfinite(v) for _, v in named[1:]) else named[:1]  # the culprit terms
        bad = [f"{n} = {v}" for n, v in parts if not math.isfinite(v)]
        good = [f"{n} = {v:.4g}" for n, v in named[1:] if math.isfinite(v)]
        raise NonFiniteLossError(
            f"non-finite loss{' ' + where if where else ''}: {', '.join(bad)}"
            + (f" ({', '.join(good)})" if good else "")
            + "; training stopped before the optimizer step, the last checkpoint is untouched"
        )
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None and ctx.scaler.is_enabled():
        ctx.scaler.scale(total).backward()
        if ctx.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        total.backward()
        if ctx.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteLossError(f"non-finite gradient norm {where}; training stopped before the optimizer step")
        ctx.optimizer.step()
    return torch.cat([values, torch.tensor([float(labels.shape[0])])])


def _progress(iterable, *, enabled: bool, total: int, desc: str):
    enabled = enabled and sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _summary(filter_losses: nn.ModuleDict, sums: torch.Tensor) -> dict[str, float]:
    """Means over images from the summed ``[loss, task, filter..., correct, n]`` values."""
    names = _term_names(filter_losses)
    n = max(sums[-1].item(), 1.0)
    row = {name: sums[i].item() / n for i, name in enumerate(names)}
    row["accuracy"] = sums[len(names)].item() / n
    row["images"] = int(sums[-1].item())
    return row


def _diagnostics(filter_losses: nn.ModuleDict) -> dict[str, float]:
    return {f"{name}/{k}": float(v) for name, fl in filter_losses.items() for k, v in fl.diagnostics().items()}


def train_one_epoch(
    ctx: StepContext,
    loader: DataLoader,
    *,
    epoch: int,
    step: int = 0,
    batches_done: int = 0,
    sums: torch.Tensor | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 0,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """Trains one epoch from batch ``batches_done`` on; returns ``(epoch means, global step)``.

    ``sums`` carries the epoch's running sums across a mid-epoch resume. ``on_step(batches_done,
    step, sums)`` runs after every step (checkpointing); ``log`` receives a "step" row every
    ``log_every`` steps (this process's running epoch means).
    """
    ctx.net.train()
    if ctx.frozen is not None:
        ctx.frozen.eval()
    width = 3 + len(ctx.filter_losses)
    sums = torch.zeros(width + 1, dtype=torch.float64) if sums is None else sums.clone()
    bar = _progress(loader, enabled=progress, total=len(loader) + batches_done, desc=f"epoch {epoch}")
    if hasattr(bar, "update") and batches_done:
        bar.update(batches_done)
    n_batches = len(loader) + batches_done
    for batch in bar:
        if ctx.mask_warmup_epochs > 0:
            set_mask_strength(ctx.model, mask_strength(ctx.mask_warmup_epochs, epoch, batches_done, n_batches))
        values = train_step(ctx, batch, where=f"at epoch {epoch}, step {step + 1} (batch {batches_done + 1} of the epoch)")
        v = values.double()
        n = v[-1]
        sums[:-2] += v[:-2] * n  # loss terms: mean x images
        sums[-2] += v[-2]  # correct decisions
        sums[-1] += n
        step += 1
        batches_done += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{v[0].item():.4f}")
        if log is not None and log_every and step % log_every == 0:
            row = {"kind": "step", "epoch": epoch, "step": step, **_summary(ctx.filter_losses, sums)}
            row["lr"] = ctx.optimizer.param_groups[-1]["lr"]
            row.update(_diagnostics(ctx.filter_losses))
            log(row)
        if on_step is not None:
            on_step(batches_done, step, sums)
    sums = all_reduce_sum(sums)
    if ctx.mask_warmup_epochs > 0:  # evaluation after the epoch sees the mask of the next step
        set_mask_strength(ctx.model, mask_strength(ctx.mask_warmup_epochs, epoch + 1, 0, 1))
    return _summary(ctx.filter_losses, sums), step


@torch.no_grad()
def evaluate(net: nn.Module, task_loss: TaskLoss, loader: DataLoader, device: torch.device, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Task loss and accuracy over ``loader`` (summed over processes under DDP)."""
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss x n, correct, n
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast():
            logits, _ = net(images)
        logits = logits.float()
        n = labels.shape[0]
        sums += torch.tensor([task_loss(logits, labels).item() * n, task_loss.correct(logits, labels).item(), n], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    n = max(sums[2].item(), 1.0)
    return {"task": sums[0].item() / n, "accuracy": sums[1].item() / n, "images": int(sums[2].item())}


# ----------------------------------------------------------------------------------------------
# building a run from its config


def build_datasets(cfg: TrainConfig):
    """``(train, eval or None)`` from ``icnn.data.build_dataset``."""
    from ..data import build_dataset

    common = dict(task=cfg.task, image_size=cfg.image_size, negatives_root=cfg.negatives_root, **cfg.dataset_kwargs)
    train_set = build_dataset(cfg.dataset, cfg.root, split="train", augment=cfg.augment, **common)
    eval_set = build_dataset(cfg.dataset, cfg.root, split=cfg.eval_split, **common) if cfg.eval_split else None
    return train_set, eval_set


def build_model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``icnn.models.build_model`` for this config."""
    from ..models import build_model  # unknown arch / unreadable weights: icnn.models.ModelError

    return build_model(
        cfg.arch, num_classes=num_classes, interpretable=cfg.interpretable, image_size=cfg.image_size, weights=cfg.weights,
        head_norm=cfg.head_norm, **({"mask": dict(cfg.mask)} if cfg.mask else {}),
    )


def head_classes(cfg: TrainConfig, dataset) -> int:
    """Outputs of the head: 1 for single-category (logistic on +-1 labels), else one per class."""
    return 1 if cfg.task == "single" else len(dataset.classes)


@dataclass
class TrainResult:
    model: nn.Module  # the trained raw network (not wrapped)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch trained by this call
    checkpoint: Path | None = None  # OUT/checkpoint (rank 0)
    step: int = 0  # global optimizer steps done in total


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    model: nn.Module | None = None,
    train_set=None,
    eval_set=None,
) -> TrainResult:
    """Trains ``cfg.epochs`` epochs (or continues ``resume``, a run's OUT dir or checkpoint dir).

    ``model``, ``train_set`` and ``eval_set`` replace what the config would build (tests,
    notebooks); ``eval_set`` is only built from the config when ``train_set`` is too.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    denv: DistEnv = init_distributed(device.type)
    try:
        if denv.enabled and device.type == "cuda":
            device = torch.device("cuda", denv.local_rank)
        return _train(cfg, device, denv, resume=resume, model=model, train_set=train_set, eval_set=eval_set)
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, device: torch.device, denv: DistEnv, *, resume, model, train_set, eval_set) -> TrainResult:
    ckpt = load_checkpoint(resume) if resume is not None else None
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)  # same on every process: identical initial weights
    if train_set is None:
        train_set, eval_set = build_datasets(cfg)
    if model is None:
        model = build_model_for(cfg, head_classes(cfg, train_set))
    model = model.to(device)
    task_loss = task_loss_for(cfg.task, cfg.multi_loss)
    filter_losses = build_filter_losses(
        model,
        num_classes=len(train_set.classes),
        image_size=cfg.image_size,
        cfg=cfg.filter_loss,
        device=device,
        negative_class=0 if cfg.task == "single" else None,
    )
    frozen = freeze_stem(model) if cfg.freeze_stem else None
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    use_fp16 = device.type == "cuda" and cfg.amp and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)

    epoch, batches_done, step, sums, epoch_done = 1, 0, 0, None, True
    if ckpt is not None:
        weights, state, _ = ckpt
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            for name, fl in filter_losses.items():
                fl.load_state_dict(state["filter_losses"][name])
        except (RuntimeError, KeyError, ValueError) as exc:
            why = str(exc).splitlines()[0]
            if "parameter groups" in why or "size of optimizer's group" in why:  # the groups depend on both
                why += "; were stem_lr_mult (--stem-lr-mult) or freeze_stem (--freeze-stem) set differently in the resumed run?"
            raise ConfigError(f"resume {resume}: checkpoint does not match this model/config ({why})") from None
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        epoch_done = state["epoch_done"]
        sums = state.get("sums")
        if epoch_done:
            epoch, batches_done, sums = epoch + 1, 0, None

    on = cfg.filter_loss.get("on", "relu")
    if on not in ("relu", "masked"):
        raise ConfigError(f"filter_loss: on must be 'relu' or 'masked', got {on!r}", field="filter_loss", reason=f"on must be 'relu' or 'masked', got {on!r}")
    net: nn.Module = ForwardWithMaps(model, on)
    if denv.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)
    ctx = StepContext(
        net=net,
        model=model,
        task_loss=task_loss,
        filter_losses=filter_losses,
        optimizer=optimizer,
        device=device,
        autocast=lambda: autocast_for(device, cfg),
        scaler=scaler,
        grad_clip=cfg.grad_clip,
        mask_warmup_epochs=cfg.mask_warmup_epochs,
        frozen=frozen,
    )

    sampler = EpochSampler(train_set, num_replicas=denv.world_size, rank=denv.rank, shuffle=True, seed=cfg.seed)
    loader_gen = torch.Generator()
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=loader_gen,  # worker seeds come from here, never from the global RNG
        worker_init_fn=_seed_worker,
    )
    eval_loader = None
    if eval_set is not None:
        shard = Subset(eval_set, range(denv.rank, len(eval_set), denv.world_size)) if denv.enabled else eval_set
        eval_loader = DataLoader(shard, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)

    out = Path(cfg.out)
    log_file = None
    if denv.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        log_file = RunLog(out, tensorboard=cfg.tensorboard)
        if ckpt is not None:
            log_file.truncate_after(step)

    def save(epoch_: int, batches_done_: int, step_: int, sums_, done: bool, metrics: dict | None = None) -> Path | None:
        if not denv.is_main:
            return None
        state = {
            "epoch": epoch_,
            "batches_done": batches_done_,
            "epoch_done": done,
            "step": step_,
            "sums": None if sums_ is None else sums_.clone(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "filter_losses": {name: fl.state_dict() for name, fl in filter_losses.items()},
            "rng": rng_state(),
            "world_size": denv.world_size,
            "num_classes": int(getattr(model, "num_classes", 0)) or None,
            "metrics": metrics or {},
        }
        return save_checkpoint(out, model, state, cfg.to_dict())

    # Restore the RNGs last: everything above may draw random numbers, the run continues from here.
    if ckpt is not None:
        set_rng_state(ckpt[1]["rng"])
    if denv.rank:
        seed_everything(cfg.seed + 1_000_003 * denv.rank + step)  # per-process dropout/augmentation

    result = TrainResult(model=model, step=step)
    baseline: dict[str, float] = {}  # each layer's mean max in the first epoch this process logs
    try:
        while epoch <= cfg.epochs:
            if batches_done == 0:
                for fl in filter_losses.values():
                    fl.start_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.set_start(batches_done * cfg.batch_size)
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            t0 = time.perf_counter()

            n_batches = math.ceil(sampler.num_samples / cfg.batch_size)

            def on_step(b: int, s: int, running: torch.Tensor, _epoch=epoch, _n=n_batches) -> None:
                # Mid-epoch checkpoints; the epoch's last step is covered by the epoch checkpoint.
                if s % cfg.checkpoint_every == 0 and b < _n:
                    save(_epoch, b, s, running, done=False)

            train_row, step = train_one_epoch(
                ctx,
                loader,
                epoch=epoch,
                step=step,
                batches_done=batches_done,
                sums=sums,
                log=log_file.write if log_file is not None else None,
                log_every=cfg.log_every,
                on_step=on_step if cfg.checkpoint_every else None,
                progress=cfg.progress and denv.is_main,
            )
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": step, **train_row}
            row["lr"] = optimizer.param_groups[-1]["lr"]
            row["images_per_s"] = train_row["images"] / max(seconds, 1e-9)
            row.update(_diagnostics(filter_losses))
            if scheduler is not None:
                scheduler.step()
            if eval_loader is not None:
                row.update({f"eval/{k}": v for k, v in evaluate(net, task_loss, eval_loader, device, ctx.autocast).items()})
            if log_file is not None:
                log_file.write(row)
                baseline = baseline or {k: v for k, v in row.items() if k.endswith("/mean_max")}
                _print_epoch(row, cfg.epochs, baseline)
            result.history.append(row)
            result.checkpoint = save(epoch, 0, step, None, done=True, metrics=row)
            result.step = step
            epoch, batches_done, sums = epoch + 1, 0, None
    finally:
        if log_file is not None:
            log_file.close()
    return result


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _print_epoch(row: dict[str, Any], epochs: int, baseline: dict[str, float] | None = None) -> None:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"acc {row['accuracy']:.3f}"]
    if "eval/accuracy" in row:
        parts.append(f"eval acc {row['eval/accuracy']:.3f}")
    for k, v in row.items():
        if k.endswith("/lambda") or k.endswith("/silent_fraction"):
            parts.append(f"{k} {v:.3g}")
    print("  ".join(parts), file=sys.stderr, flush=True)
    for warning in cliff_warnings(row, baseline):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


SILENT_WARNING = 0.25  # fraction of a layer's filters silent over an epoch that triggers a warning
RUNAWAY_WARNING = 100.0  # growth of a layer's mean max_ij x over the run that triggers a warning


def cliff_warnings(row: dict[str, Any], baseline: dict[str, float] | None = None) -> list[str]:
    """Warnings for the two cliffs of a too-strong filter loss: a layer with more than
    ``SILENT_WARNING`` of its filters silent in the epoch (SPEC §9: every filter silent, chance
    accuracy), and a layer whose mean ``max_ij x`` grew more than ``RUNAWAY_WARNING``-fold over
    ``baseline`` (its value in the first epoch of the run: Eq. 4 rewards scale, docs/filter_loss.md)."""
    out = []
    for k, v in (baseline or {}).items():
        now = row.get(k)
        if now is not None and v > 0 and now > RUNAWAY_WARNING * v:
            out.append(f"the activations of layer {k[: -len('/mean_max')]!r} grew {now / v:.3g}-fold since the first epoch "
                       "(mean max): the filter loss is running away (lower --lambda)")
    for k, v in row.items():
        if k.endswith("/silent_fraction") and v > SILENT_WARNING:
            layer = k[: -len("/silent_fraction")]
            out.append(f"{v:.0%} of layer {layer!r}'s filters were silent in epoch {row['epoch']}: "
                       "the filter loss is too strong for this run (lower --lambda)")
    return out
