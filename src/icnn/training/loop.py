"""The one training loop: epochs, DDP, sampler, resume, RNG, logs, progress, checkpoints, the
finite checks and the cliff warnings -- for every network this project trains.

What is trained, and how one step computes its loss, is an :class:`Objective` (an ``nn.Module``
owning the trained network, its losses and their running state)::

    fit(objective, train_set, cfg)          # cfg: a RunConfig (TrainConfig, ExplainConfig)
      for epoch:                            objective.start_epoch(epoch)
        for batch:                          out = objective.step(batch)       -> total, terms
                                            backward, (clip), optimizer step, objective.after_step()
        [eval]                              objective.evaluate(eval_loader)
        log row, warnings, checkpoint       (weights, optimizer, objective state, RNG, sampler position)

``icnn.training.classify`` (interpretable CNNs and their ordinary twins) and
``icnn.explainer.train`` (explainer networks) are the two objectives.

Exact resume (CPU, ``num_workers=0``): the shuffling order is a function of ``(seed, epoch)``
(:class:`EpochSampler`), the DataLoader has its own generator, the checkpoint holds every RNG state,
and the learning rate of an epoch is a function of ``(epoch, cfg)`` alone, so a resumed run with a
longer schedule follows the new one (a cosine run extended from 1 to 2 epochs trains its second
epoch at half the base rate, not at 0).

Nothing is lost or silently wrong:

- A non-finite loss term stops the run before the optimizer step (:class:`NonFiniteLossError`
  naming the epoch, the step and the term); so does a non-finite buffer (BatchNorm statistics,
  running filter-loss state) after a step, and every tensor of a checkpoint is checked finite
  before it is written (``checkpoint.save_checkpoint``): the last checkpoint on disk is always a
  good one.
- A run directory belongs to one run: :class:`checkpoint.RunLock` refuses a directory that holds
  another run (a resumed run writes into its own) or is in use by another process.
- Under ``torchrun`` every process takes every ``world``-th image of the same permutation, DDP
  averages the gradients and BatchNorm layers that train are synchronised over the global batch
  (``distributed.sync_batchnorm``), so ``k`` processes match one process on the same global batch.
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
from torch.utils.data import DataLoader

from . import checkpoint as ckpt_io
from .checkpoint import NonFiniteLossError, RunLock
from .config import ConfigError, RunConfig
from .distributed import DistEnv, EpochSampler, all_reduce_sum, cleanup_distributed, init_distributed, shard, sync_batchnorm
from .logs import RunLog


# ----------------------------------------------------------------------------------------------
# the objective contract


@dataclass
class StepOutput:
    """One step's loss: ``total`` (with gradient) and its detached ``terms`` (means over the batch)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    images: int
    correct: torch.Tensor | None = None  # correct decisions in the batch (classifiers)


class Objective(nn.Module):
    """What ``fit`` trains. Subclasses set ``self.model`` (saved as the checkpoint's weights) and
    ``self.net`` (the module called inside ``step``; ``fit`` may wrap it in DDP / torch.compile),
    and implement ``param_groups`` and ``step``. Every other submodule and buffer (losses, their
    running statistics) is the objective's state, checkpointed and restored with it."""

    model: nn.Module
    net: nn.Module
    counts_correct: bool = False  # step() reports correct decisions: rows get an accuracy
    autocast: Callable[[], Any] = contextlib.nullcontext  # set by fit: mixed precision around the forward pass

    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of ``epoch`` (1-based)."""

    def before_step(self, epoch: int, batch_index: int, batches: int) -> None:
        """Called before every step (schedules inside an epoch)."""

    def step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def diagnostics(self) -> dict[str, float]:
        """Floats logged with every row (``<layer>/<key>``)."""
        return {}

    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Per-epoch evaluation on ``loader``; summed over processes under DDP."""
        return {}

    def warnings(self, row: dict[str, Any], first: dict[str, Any]) -> list[str]:
        """One-line warnings for an epoch row (``first``: the first row this run logged)."""
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The objective's state outside the model (filter-loss buffers ...), for the checkpoint."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("model.", "net."))}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.load_state_dict(state, strict=False)
        extra = [k for k in missing.missing_keys if not k.startswith(("model.", "net."))]
        if missing.unexpected_keys or extra:
            raise KeyError(f"objective state does not match: {(missing.unexpected_keys or extra)[0]}")


# ----------------------------------------------------------------------------------------------
# set-up helpers


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; cuda without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(field="device", reason=f"{name!r} requested but CUDA is not available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r}: only {torch.cuda.device_count()} CUDA device(s)", field="device",
                              reason=f"only {torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r} (use cpu, cuda, cuda:N or auto)", field="device") from None


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse (a process-wide setting, as jemalloc or
    tcmalloc would). By default it hands blocks of a few MiB back to the kernel when freed, so
    every step's activations come back as fresh zero-filled pages: on a 2-core machine a (32,
    1280, 50) float32 temporary costs 6 ms of page faults against 0.5 ms reused, and the filter
    loss's -MI 40 ms against 9 (docs/benchmarks.md). Blocks up to 32 MiB then come from the heap,
    which is not trimmed below 2 GiB. A no-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(groups: list[dict[str, Any]], cfg: RunConfig) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("base_lr", g["lr"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(cfg: RunConfig, epoch: int) -> float:
    """The learning-rate factor of ``epoch`` (1-based): a function of the config alone."""
    e = epoch - 1
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** (e // cfg.lr_step)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / cfg.epochs))
    return 1.0


def autocast_for(device: torch.device, cfg: RunConfig):
    """Mixed precision around the forward pass: on GPU with ``amp`` (``amp_dtype``), on CPU with
    ``cpu_amp`` (bfloat16); otherwise a no-op context. A frozen stem's cache is filled outside it,
    in float32, so its entries do not depend on the setting."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype))
    if device.type == "cpu" and cfg.cpu_amp:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(iterable, *, enabled: bool, total: int | None, desc: str, initial: int = 0):
    """A tqdm bar on stderr when it is a terminal (and ``enabled``); the iterable itself otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, initial=initial)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class FitResult:
    objective: Objective
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch trained by this call
    checkpoint: Path | None = None  # OUT/checkpoint (rank 0)
    step: int = 0  # global optimizer steps done in total
    rank: int = 0  # this process under torchrun (only rank 0 writes)
    world_size: int = 1

    @property
    def model(self) -> nn.Module:
        return self.objective.model


def fit(
    objective: Objective,
    train_set,
    cfg: RunConfig,
    *,
    resume: str | Path | None = None,
    eval_set=None,
    run_config: dict[str, Any] | None = None,
    on_start: Callable[[Objective, torch.device], None] | None = None,
) -> FitResult:
    """Trains ``objective`` on ``train_set`` for ``cfg.epochs`` epochs (or continues ``resume``).

    ``run_config`` is what ``OUT/config.json`` and the checkpoint's config record (default
    ``cfg.to_dict()``); a resumed run must not change what ``cfg.resume_conflicts`` protects.
    ``on_start(objective, device)`` runs once on a fresh run, after the objective is on its
    device and before the first step (e.g. statistics measured before training).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    keep_freed_memory()
    denv: DistEnv = init_distributed(device.type)
    try:
        if denv.enabled and device.type == "cuda":
            device = torch.device("cuda", denv.local_rank)
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with RunLock(cfg.out, resume) if denv.is_main else contextlib.nullcontext():
            return _fit(objective, train_set, cfg, device, denv, resume, eval_set, run_config or cfg.to_dict(), on_start)
    finally:
        cleanup_distributed()


def _fit(objective, train_set, cfg, device, denv, resume, eval_set, run_config, on_start) -> FitResult:
    if len(train_set) == 0:
        raise ConfigError("the training set is empty: nothing to train on")
    loaded = ckpt_io.load_checkpoint(resume) if resume is not None else None
    if loaded is not None:
        conflicts = cfg.resume_conflicts(loaded[2])
        if conflicts:
            key, (was, now) = next(iter(conflicts.items()))
            raise ConfigError(f"{key}: a resumed run keeps its checkpoint's setting ({key} = {was!r}, asked for {now!r}); "
                              "drop it or start a new run", field=key, reason=f"a resumed run keeps its checkpoint's "
                              f"setting ({key} = {was!r}); drop it or start a new run")  # fmt: skip
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    objective.to(device)
    if denv.enabled:
        sync_batchnorm(objective.model, device)
    optimizer = make_optimizer(objective.param_groups(cfg), cfg)
    use_fp16 = device.type == "cuda" and cfg.amp and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)

    epoch, batches_done, step, sums = 1, 0, 0, None
    if loaded is not None:
        weights, state, _ = loaded
        try:
            objective.model.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            objective.load_state_tensors(state["objective"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            why = str(exc).splitlines()[0]
            raise ConfigError(f"resume {resume}: the checkpoint does not match this model/config ({why})") from None
        epoch, batches_done, step, sums = state["epoch"], state["batches_done"], state["step"], state.get("sums")
        if state["epoch_done"]:
            epoch, batches_done, sums = epoch + 1, 0, None
    elif on_start is not None:
        on_start(objective, device)

    net = objective.net
    if denv.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)
    objective.net = net
    objective.autocast = lambda: autocast_for(device, cfg)

    sampler = EpochSampler(train_set, num_replicas=denv.world_size, rank=denv.rank, shuffle=True, seed=cfg.seed)
    loader_gen = torch.Generator()
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", generator=loader_gen, worker_init_fn=_seed_worker)  # fmt: skip
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(shard(eval_set), batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)

    out = Path(cfg.out)
    log = None
    if denv.is_main:
        ckpt_io.atomic_write_json(out / "config.json", run_config)
        log = RunLog(out, tensorboard=cfg.tensorboard)
        if loaded is not None:
            log.truncate_after(step)

    def save(epoch_: int, batches_done_: int, step_: int, sums_, done: bool, metrics: dict | None = None) -> Path | None:
        if not denv.is_main:
            return None
        state = {
            "epoch": epoch_, "batches_done": batches_done_, "epoch_done": done, "step": step_,
            "sums": None if sums_ is None else sums_.clone(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "objective": objective.state_tensors(), "rng": ckpt_io.rng_state(), "world_size": denv.world_size,
            "num_classes": int(getattr(objective.model, "num_classes", 0)) or None, "metrics": metrics or {},
        }  # fmt: skip
        return ckpt_io.save_checkpoint(out, objective.model, state, run_config)

    # Restore the RNGs last: everything above may draw random numbers, the run continues from here.
    if loaded is not None:
        ckpt_io.set_rng_state(loaded[1]["rng"])
    if denv.rank:
        seed_everything(cfg.seed + 1_000_003 * denv.rank + step)  # per-process dropout/augmentation

    result = FitResult(objective, step=step, rank=denv.rank, world_size=denv.world_size)
    first_row: dict[str, Any] = {}
    buffers = {f"model.{k}": v for k, v in objective.model.named_buffers()} | {k: v for k, v in objective.named_buffers() if not k.startswith(("model.", "net."))}
    try:
        while epoch <= cfg.epochs:
            if batches_done == 0:
                objective.start_epoch(epoch)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(cfg, epoch)
            sampler.set_epoch(epoch)
            sampler.set_start(batches_done * cfg.batch_size)
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            n_batches = math.ceil(sampler.num_samples / cfg.batch_size)
            objective.train()
            names: list[str] | None = None
            t0 = time.perf_counter()
            bar = progress(loader, enabled=cfg.progress and denv.is_main, total=n_batches, desc=f"epoch {epoch}", initial=batches_done)
            for batch in bar:
                where = f"at epoch {epoch}, step {step + 1} (batch {batches_done + 1} of the epoch)"
                objective.before_step(epoch, batches_done, n_batches)
                out_ = objective.step(batch)
                names = ["loss", *out_.terms]
                values = torch.stack([out_.total.detach().float(), *[t.detach().float() for t in out_.terms.values()]]).cpu()
                if not torch.isfinite(values).all():
                    named = list(zip(names, values.tolist()))
                    bad = [f"{n} = {v}" for n, v in named[1:] if not math.isfinite(v)] or [f"loss = {values[0].item()}"]
                    good = [f"{n} = {v:.4g}" for n, v in named[1:] if math.isfinite(v)]
                    raise NonFiniteLossError(f"non-finite loss {where}: {', '.join(bad)}" + (f" ({', '.join(good)})" if good else "")
                                             + "; training stopped before the optimizer step, the last checkpoint is untouched")  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                _backward_step(out_.total, optimizer, scaler, objective, cfg.grad_clip, where)
                objective.after_step()
                bad_buffer = ckpt_io.first_nonfinite(buffers.items())
                if bad_buffer is not None:
                    raise NonFiniteLossError(f"non-finite buffer {bad_buffer} after the step {where}; training stopped, "
                                             "the last checkpoint is untouched (lower --lr or --lambda)")  # fmt: skip
                n = float(out_.images)
                row = torch.cat([values.double() * n, torch.tensor([float(out_.correct) if out_.correct is not None else 0.0, n], dtype=torch.float64)])
                sums = row if sums is None else sums + row
                step += 1
                batches_done += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{values[0].item():.4f}")
                if log is not None and cfg.log_every and step % cfg.log_every == 0:
                    log.write({"kind": "step", "epoch": epoch, "step": step, **_means(names, sums, objective.counts_correct),
                               "lr": optimizer.param_groups[-1]["lr"], **objective.diagnostics()})  # fmt: skip
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batches_done < n_batches:
                    save(epoch, batches_done, step, sums, done=False)
            seconds = time.perf_counter() - t0
            sums = all_reduce_sum(sums) if sums is not None else torch.zeros(2, dtype=torch.float64)
            row = {"kind": "epoch", "epoch": epoch, "step": step, **_means(names or [], sums, objective.counts_correct)}
            row["lr"] = optimizer.param_groups[-1]["lr"]
            row["images_per_s"] = row["images"] / max(seconds, 1e-9)
            row.update(objective.diagnostics())
            if eval_loader is not None:
                objective.eval()
                row.update({f"eval/{k}": v for k, v in objective.evaluate(eval_loader).items()})
                objective.train()
            if log is not None:
                log.write(row)
                first_row = first_row or dict(row)
                _print_epoch(row, cfg.epochs, objective.warnings(row, first_row))
            result.history.append(row)
            result.checkpoint = save(epoch, 0, step, None, done=True, metrics=row)
            result.step = step
            epoch, batches_done, sums = epoch + 1, 0, None
    finally:
        if log is not None:
            log.close()
        objective.net = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else objective.net
    objective.eval()
    return result


def _backward_step(total, optimizer, scaler, objective, grad_clip: float, where: str) -> None:
    if scaler.is_enabled():
        scaler.scale(total).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return
    total.backward()
    if grad_clip > 0:
        norm = nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(f"non-finite gradient norm {where}; training stopped before the optimizer step")
    optimizer.step()


def _means(names: list[str], sums: torch.Tensor, with_accuracy: bool) -> dict[str, float]:
    """Means over images from the summed ``[term x n ..., correct, n]`` values."""
    n = max(sums[-1].item(), 1.0)
    row = {name: sums[i].item() / n for i, name in enumerate(names)}
    if with_accuracy:
        row["accuracy"] = sums[-2].item() / n
    row["images"] = int(sums[-1].item())
    return row


def _print_epoch(row: dict[str, Any], epochs: int, warnings: list[str]) -> None:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}" if "loss" in row else ""]
    if "accuracy" in row:
        parts.append(f"acc {row['accuracy']:.3f}")
    if "eval/accuracy" in row:
        parts.append(f"eval acc {row['eval/accuracy']:.3f}")
    for k, v in row.items():
        if k.endswith(("/lambda", "/silent_fraction", "/lambda_f")) or k == "p":
            parts.append(f"{k} {v:.3g}")
    print("  ".join(p for p in parts if p), file=sys.stderr, flush=True)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
