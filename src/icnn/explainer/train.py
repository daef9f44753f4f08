"""Learning the explainer (paper 003 §3.2, Eq. 1, and its Appendix), label-free.

Per image (Eq. 1)::

    Loss = sum_l lambda_l ||x_l - x*_l||^2  -  eta log p  +  sum_f lambda_f Loss_f(x_f)

* ``x_l`` = fc-dec-l's output, ``x*_l`` the performer's fc6/fc7 output (before their ReLUs);
  ``lambda_l = 5e4 / E_x*[||max(x*_l, 0)||]`` over all training images (§4), measured once
  before training with the frozen performer.
* ``eta`` = 1e6 (AlexNet, VGG-M, VGG-S and any other performer), 1.5e5 for VGG-16 (§4).
* ``Loss_f`` = ``icnn.FilterLoss`` (the same filter loss as the interpretable CNN: templates of
  [44], ``-MI``, its approximate gradient) on conv-interp-1's maps and, for conv-interp-2, on
  ``x'_f = p x_f + (1 - p) x^ordin_f`` with no gradient into the ordinary track (Appendix).
  ``x^ordin`` is the normalised ordinary map, scaled back to ``x_f``'s units by the interpretable
  norm-layer's ``alpha_f`` (so ``x'_f = alpha_f * (p x^interp_f + (1 - p) x^ordin_f)``: the
  proportions of ``x_enc``, and exactly ``x_f`` when ``p = 1``).
* ``lambda_f = 1/(300 N) * E[||dLoss_rec/dx_f||] / E[||dLoss_f/dx_f||]`` in epoch ``N``, per
  filter, "in an online manner" (Appendix): both expectations are running means (momentum
  ``grad_momentum``) of per-image gradient norms, measured on every step by autograd taps and
  used from the next step on (the first step measures only). ``dLoss_rec/dx_f`` is the gradient
  coming down from the upper layers (the total gradient at ``x_f`` less the filter loss's own).

Labels: none. The explainer's filters all belong to one "category" (the images it is trained on):
each ``FilterLoss`` has ``num_classes=1``, ``target_classes=0`` and every label is 0, so the
approximate gradient always uses the positive template ``T_mu_hat`` (Appendix: ``T^ = T_mu^``
when the image is of the filter's category). This is the paper's mode ("[44] computes an
approximate but efficient gradient ... we followed [44]"); ``filter_loss={"mode": "exact"}``
optimises the exact batch ``-MI`` instead (also label-free: its ``T-`` lets a filter learn to
stay silent on images without its part). ``FilterLoss``'s own lambda is fixed to 1 (schedule
"constant"): the weight is the ``lambda_f`` above, applied to its gradient.

Many processes: ``torchrun --nproc_per_node=K -m icnn explain ...`` trains with
DistributedDataParallel exactly as ``icnn train`` does (``icnn.training.distributed``): each
process takes every K-th image of the same per-epoch permutation (``EpochSampler``), so step ``i``
of the K processes with ``batch_size`` B each sees the images of step ``i`` of one process with
batch ``K * B`` (the global batch). Every term of Eq. 1 is a mean over the batch (or, for
``-eta log p``, the same on every process), so DDP's average of the per-process gradients is the
gradient of one process on the global batch. Statistics estimated from data are all-reduced, so
every process holds the values one process on the global batch would: ``lambda_l`` (each process
measures its shard of the training set), the running gradient norms behind ``lambda_f`` (the
per-image gradient at ``x_f`` of the DDP objective is this process's divided by K), the
norm-layers' ``alpha`` (:class:`ChannelNorm`) and ``FilterLoss``'s own statistics. Only rank 0
writes the checkpoint, logs and ``config.json``; epoch rows are means over all processes. The
equivalence is exact up to float round-off when the training set divides by K (else
``EpochSampler`` pads the shards with repeated images, as DistributedSampler does).

"Explainer+cls" (``objective="cls"``) replaces the reconstruction term by ``lambda_cls`` times
the performer's classification loss on the logits of the reconstructed features (through the
performer's fc8); it needs labels, and is a baseline, not an explanation.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..loss import FilterLoss
from ..task_loss import task_loss_for
from ..training.checkpoint import atomic_write_json, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..training.distributed import DistEnv, EpochSampler, all_reduce_sum, cleanup_distributed, init_distributed, world_size
from ..training.engine import NonFiniteLossError, resolve_device, seed_everything
from ..training.logs import RunLog
from .model import Explainer, ExplainerError, ExplainerOutput, PerformerFeatures, build_explainer, performer_targets

OBJECTIVES = ("reconstruct", "cls")


@dataclass
class ExplainerConfig:
    # --- explainer ---
    layer: str = "stem"  # performer map explained: "stem" (relu4 / relu5_2 / small_cnn block3) or a layer name
    reconstruct: list[str] | None = None  # performer head modules reconstructed (None: fc6, fc7; GAP heads: pooled features)
    objective: str = "reconstruct"  # "reconstruct" (the explainer) or "cls" (the explainer+cls baseline)
    eta: float | None = None  # weight of -log p (None: 1e6, or 1.5e5 for vgg16; paper §4)
    lambda_rec: float = 5e4  # lambda_l = lambda_rec / E||max(x*_l, 0)|| (paper §4)
    lambda_cls: float = 5e4  # weight of the classification loss for objective="cls" (our choice)
    logit_weight: float = 0.0  # + logit_weight * lambda_logit ||f(x_L) - f(x*_L)||^2 (f: the performer's classifier; our addition, 0 = paper)
    lambda_f_scale: float = 1.0 / 300.0  # lambda_f = scale / N * E||dRec/dx_f|| / E||dLoss_f/dx_f|| (Appendix)
    grad_momentum: float = 0.9  # running means of the gradient norms behind lambda_f
    filter_loss: dict[str, Any] = field(default_factory=dict)  # FilterLoss overrides (mode, weight_norm, ...)
    mask: dict[str, Any] = field(default_factory=dict)  # PartMask keyword arguments
    norm_momentum: float = 0.1  # running-mean momentum of the norm-layers' alpha
    w_p_init: float = 0.0  # initial w_p (p = sigmoid(w_p) = 0.5)
    # --- optimisation ---
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # images per step, per process (global batch = batch_size * world size under torchrun)
    optimizer: str = "adam"  # "adam" (scale-free: the paper's loss is ~1e6) or "sgd"
    lr: float = 1e-4  # learning rate of the explainer's weights
    p_lr: float = 5e-2  # learning rate of w_p (Adam: w_p moves about this much per step)
    momentum: float = 0.9  # SGD momentum / Adam beta1
    weight_decay: float = 0.0  # L2 weight decay on conv/fc weights
    seed: int = 0  # seeds weights, shuffling
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    num_workers: int = 0  # DataLoader workers
    out: str = "runs/explain"  # output directory
    log_every: int = 50  # a "step" log row every N steps (0: epochs only)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: end of epoch only)
    progress: bool = True  # tqdm bars when stderr is a terminal

    def validate(self) -> "ExplainerConfig":
        if self.objective not in OBJECTIVES:
            raise ExplainerError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ExplainerError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExplainerError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lambda_rec", "lambda_cls", "logit_weight", "lambda_f_scale", "lr", "p_lr", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ExplainerError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.eta is not None and (not math.isfinite(self.eta) or self.eta < 0):
            raise ExplainerError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if not 0 <= self.grad_momentum < 1 or not 0 < self.norm_momentum <= 1:
            raise ExplainerError("grad_momentum must lie in [0, 1) and norm_momentum in (0, 1]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExplainerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExplainerError(f"unknown explainer option(s): {', '.join(unknown)}")
        return cls(**d).validate()


# What a resumed run may change: how it runs, not what it computes.
RESUME_OVERRIDABLE = frozenset({"epochs", "out", "device", "num_workers", "log_every", "checkpoint_every", "progress"})


def resume_conflicts(cfg: ExplainerConfig, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, cfg's value)}`` for every setting a resumed run may not change."""
    fields = {f.name for f in dataclasses.fields(ExplainerConfig)} - RESUME_OVERRIDABLE
    now = cfg.to_dict()
    return {k: (saved[k], now[k]) for k in sorted(fields) if k in saved and saved[k] != now[k]}


def default_eta(performer: nn.Module) -> float:
    """Paper §4: 1.5e5 for VGG-16 ("more conv-layers"), 1e6 otherwise."""
    return 1.5e5 if getattr(performer, "arch", "") == "vgg16" else 1e6


# ----------------------------------------------------------------------------------------------
# lambda_f: gradient taps


class _Tap(torch.autograd.Function):
    """Identity forward; backward records the incoming gradient and returns it times ``scale``."""

    @staticmethod
    def forward(ctx, x, scale, store, key):
        ctx.scale, ctx.store, ctx.key = scale, store, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.store[ctx.key] = g.detach()
        return g * ctx.scale[None, :, None, None].to(g.dtype), None, None, None


class ExplainerLoss(nn.Module):
    """Eq. 1 of paper 003 with the Appendix's ``lambda_f`` schedule (see the module docstring).

    ``total, terms = loss(out, perf, epoch)`` for an :class:`ExplainerOutput` (whose ``relu``
    maps carry gradients) and the performer's :class:`PerformerFeatures`. Running state in
    buffers: ``lambda_l (m,)``, per-layer running gradient norms ``rec_norm``/``f_norm (2, D)``.
    """

    LAYERS = ("interp1", "interp2")

    def __init__(self, explainer: Explainer, map_size: tuple[int, int], cfg: ExplainerConfig, eta: float,
                 task_kind: str = "logistic"):  # fmt: skip
        super().__init__()
        self.cfg, self.eta = cfg, float(eta)
        d = explainer.layers["interp2"].body.conv.out_channels
        overrides = {"schedule": "constant", "lambda_": 1.0, **cfg.filter_loss}
        self.filter_losses = nn.ModuleDict({
            name: FilterLoss(d, 1, map_size, target_classes=0, **overrides) for name in self.LAYERS
        })  # fmt: skip
        self.register_buffer("lambda_l", torch.zeros(len(explainer.targets)))
        self.register_buffer("lambda_logit", torch.zeros(()))  # lambda_rec / E||f(x*_L)|| (logit_weight > 0)
        self.register_buffer("rec_norm", torch.zeros(2, d))
        self.register_buffer("f_norm", torch.zeros(2, d))
        self.register_buffer("norm_steps", torch.zeros((), dtype=torch.long))
        self._norm = [explainer.norm_interp]  # a reference, not a submodule (its state is the explainer's)
        self.task = task_loss_for("single" if task_kind == "logistic" else "multi", task_kind if task_kind != "logistic" else "softmax")
        self._store: dict[str, torch.Tensor] = {}

    def start_epoch(self, epoch: int) -> None:
        for fl in self.filter_losses.values():
            fl.start_epoch(epoch)

    def lambda_f(self, epoch: int) -> torch.Tensor:
        """``(2, D)``: ``scale / N * E||dRec/dx_f|| / E||dLoss_f/dx_f||`` (0 before any estimate)."""
        ok = self.f_norm > 0
        ratio = torch.where(ok, self.rec_norm / self.f_norm.clamp_min(1e-30), torch.zeros_like(self.f_norm))
        return self.cfg.lambda_f_scale / float(epoch) * ratio

    @torch.no_grad()
    def estimate_lambda_l(self, targets_iter) -> None:
        """``lambda_l = lambda_rec / E||max(x*_l, 0)||`` from an iterable of ``[x*_l (B, F)]``.

        An item may carry one more tensor, the performer's logits ``(B, K)``: then also
        ``lambda_logit = lambda_rec / E||logits||`` (for ``logit_weight``).
        Under DDP each process passes its shard of the images; sums and counts are all-reduced.
        """
        m = len(self.lambda_l)
        sums, n = torch.zeros(m + 1, dtype=torch.float64, device=self.lambda_l.device), 0
        for xs in targets_iter:
            norms = [x.float().clamp_min(0).norm(dim=1).double().sum() for x in xs[:m]]
            norms.append(xs[m].float().norm(dim=1).double().sum() if len(xs) > m else torch.zeros((), dtype=torch.float64))
            sums += torch.stack(norms).cpu().to(sums.device)
            n += xs[0].shape[0]
        if world_size() > 1:
            total = all_reduce_sum(torch.cat((sums, sums.new_tensor([n]))))
            sums, n = total[:-1], int(total[-1].item())
        if n == 0:
            raise ExplainerError("cannot estimate lambda_l: no training images")
        lam = self.cfg.lambda_rec / (sums / n).clamp_min(1e-12)
        self.lambda_l.copy_(lam[:m].to(self.lambda_l.dtype))
        self.lambda_logit.fill_(float(lam[m]) if sums[m] > 0 else 0.0)

    def forward(self, out: ExplainerOutput, perf: PerformerFeatures, epoch: int, labels: torch.Tensor | None = None):
        b = out.x_enc.shape[0]
        zeros = torch.zeros(b, dtype=torch.long, device=out.x_enc.device)  # one category, no labels
        lam = self.lambda_f(epoch).to(out.x_enc.device)
        store = self._store
        store.clear()
        p = out.p
        # conv-interp-1: the filter loss on x_f (after ReLU, before the mask)
        x1 = out.relu["interp1"]
        fl1 = self.filter_losses["interp1"](_Tap.apply(x1, lam[0], store, "f1"), zeros)
        # conv-interp-2: on x'_f = p x_f + (1 - p) alpha_f x^ordin_f, ordinary track detached
        x2 = out.relu["interp2"]
        alpha = self._norm[0].alpha.to(x2.dtype)[None, :, None, None]  # alpha_f of the interpretable norm
        mixed = p * x2 + (1 - p) * alpha * out.ordin_hat.detach()
        fl2 = self.filter_losses["interp2"](_Tap.apply(mixed, lam[1], store, "f2"), zeros)
        if x1.requires_grad:
            x1.register_hook(lambda g: store.__setitem__("g1", g.detach()))
            x2.register_hook(lambda g: store.__setitem__("g2", g.detach()))

        if self.cfg.objective == "reconstruct":
            rec_terms = [((z.float() - t.float()) ** 2).sum(1).mean() for z, t in zip(out.recon, perf.targets.values())]
            main = (self.lambda_l.to(out.x_enc.device) * torch.stack(rec_terms)).sum()
            if self.cfg.logit_weight > 0:  # label-free: match the performer's own logits
                logit_term = ((out.logits.float() - perf.logits.float()) ** 2).sum(1).mean()
                main = main + self.cfg.logit_weight * self.lambda_logit.to(main.device) * logit_term
        else:
            if labels is None:
                raise ExplainerError("objective 'cls' needs labels")
            main = self.cfg.lambda_cls * self.task(out.logits.float(), labels)
        log_p = -self.eta * torch.log(p)
        total = main + log_p + fl1 + fl2
        terms = {"main": main.detach(), "neg_log_p": log_p.detach(), "filter/interp1": fl1.detach(),
                 "filter/interp2": fl2.detach(), "p": p.detach()}  # fmt: skip
        return total, terms

    @torch.no_grad()
    def after_backward(self, p: float) -> None:
        """Folds this step's gradient norms into the running means behind ``lambda_f``.

        Under DDP the batch means are over the global batch, of the gradients of the DDP
        objective (the mean of the per-process losses): this process's gradients divided by the
        world size, as DDP divides the parameters' gradients.
        """
        s = self._store
        if not all(k in s for k in ("f1", "f2", "g1", "g2")):
            return
        lam = self.lambda_f(int(self.filter_losses["interp1"].epoch.item()))
        f1, f2 = s["f1"], s["f2"] * p  # dLoss_f/dx_f (x'_f = p x_f + ...)
        rec1 = s["g1"] - lam[0][None, :, None, None] * f1  # the gradient from the upper layers
        rec2 = s["g2"] - lam[1][None, :, None, None] * f2
        world = world_size()
        if world > 1:
            sums = lambda g: g.float().flatten(2).norm(dim=-1).sum(0)  # noqa: E731  sum_x ||.|| per filter (D,)
            local = torch.cat((sums(rec1), sums(rec2), sums(f1), sums(f2), rec1.new_tensor([rec1.shape[0]], dtype=torch.float32)))
            total = all_reduce_sum(local)
            means = total[:-1] / (total[-1].clamp_min(1.0) * world)
            rec, fl = means.view(4, -1)[:2], means.view(4, -1)[2:]
        else:
            norms = lambda g: g.float().flatten(2).norm(dim=-1).mean(0)  # noqa: E731  E_x ||.|| per filter (D,)
            rec = torch.stack((norms(rec1), norms(rec2)))
            fl = torch.stack((norms(f1), norms(f2)))
        m = self.cfg.grad_momentum if self.norm_steps.item() > 0 else 0.0
        self.rec_norm.mul_(m).add_(rec, alpha=1 - m)
        self.f_norm.mul_(m).add_(fl, alpha=1 - m)
        self.norm_steps += 1
        s.clear()

    def diagnostics(self, epoch: int) -> dict[str, float]:
        lam = self.lambda_f(epoch)
        d = {"interp1/lambda_f": float(lam[0].mean()), "interp2/lambda_f": float(lam[1].mean())}
        for name, fl in self.filter_losses.items():
            for k, v in fl.diagnostics().items():
                if k != "lambda":
                    d[f"{name}/{k}"] = v
        return d


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class ExplainResult:
    explainer: Explainer
    loss: ExplainerLoss
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch rows (means over all processes)
    checkpoint: Path | None = None  # OUT/checkpoint (rank 0; None on the other processes)
    step: int = 0
    rank: int = 0  # this process under torchrun (only rank 0 writes)
    world_size: int = 1  # processes that trained together


def _progress(iterable, enabled: bool, total: int, desc: str):
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _param_groups(explainer: Explainer, cfg: ExplainerConfig) -> list[dict[str, Any]]:
    rest = [p for n, p in explainer.named_parameters() if p.requires_grad and n != "w_p"]
    return [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "explainer"},
            {"params": [explainer.w_p], "lr": cfg.p_lr, "weight_decay": 0.0, "name": "w_p"}]  # fmt: skip


def train_explainer(
    performer: nn.Module,
    train_set,
    cfg: ExplainerConfig | None = None,
    *,
    resume: str | Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> ExplainResult:
    """Trains an explainer for ``performer`` on ``train_set`` (labels unused unless ``cls``).

    The performer is only read: its parameters, buffers and outputs are the same afterwards (its
    ``training`` flag is restored). Writes ``cfg.out/{checkpoint/, log.csv, log.jsonl,
    config.json}``; ``resume`` (a run directory or its checkpoint) continues exactly.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this with the same arguments and
    its performer on its own device (``cuda:LOCAL_RANK`` on GPUs); they train together with DDP
    (see the module docstring) and only rank 0 writes.
    """
    cfg = (cfg or ExplainerConfig()).validate()
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(resume) if resume is not None else None
    seed_everything(cfg.seed)  # same on every process: identical initial weights
    was_training = performer.training
    performer.eval()
    denv: DistEnv = init_distributed(device.type)
    try:
        if denv.enabled and device.type == "cuda":
            device = torch.device("cuda", denv.local_rank)
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # "cuda" is the current GPU
        return _train(performer, train_set, cfg, device, ckpt, extra_config or {}, denv)
    finally:
        cleanup_distributed()
        performer.train(was_training)


def _train(performer, train_set, cfg: ExplainerConfig, device, ckpt, extra_config, denv: DistEnv = DistEnv()) -> ExplainResult:
    if next(performer.parameters()).device != device:
        raise ExplainerError(f"the performer is on {next(performer.parameters()).device}, the run on {device}: move it first")
    explainer = build_explainer(performer, layer=cfg.layer, reconstruct=cfg.reconstruct, mask=cfg.mask,
                                norm_momentum=cfg.norm_momentum, w_p_init=cfg.w_p_init).to(device)  # fmt: skip
    h, w = train_set.image_size
    with torch.no_grad():
        read = performer_targets(performer, torch.zeros(1, 3, h, w, device=device), cfg.layer, ()).read
        map_size = tuple(explainer.layers["interp1"].body(read).shape[-2:])
    kind = "logistic" if performer.num_classes == 1 else "softmax"
    eta = default_eta(performer) if cfg.eta is None else cfg.eta
    loss_mod = ExplainerLoss(explainer, map_size, cfg, eta, kind).to(device)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    opt_kw = {"betas": (cfg.momentum, 0.999)} if cfg.optimizer == "adam" else {"momentum": cfg.momentum}
    optimizer = opt_cls(_param_groups(explainer, cfg), lr=cfg.lr, **opt_kw)

    sampler = EpochSampler(train_set, num_replicas=denv.world_size, rank=denv.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")  # fmt: skip
    epoch, step, batches_done = 1, 0, 0
    if ckpt is not None:
        weights, state, saved = ckpt
        conflicts = resume_conflicts(cfg, saved or {})
        if conflicts:
            key, (was, now) = next(iter(conflicts.items()))
            raise ExplainerError(f"resume: the checkpoint was trained with {key} = {was!r}, this run asks for {now!r}; "
                                 "a resumed run keeps what it computes (only epochs, device, workers and logging may change)")  # fmt: skip
        try:
            explainer.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            loss_mod.load_state_dict(state["loss"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ExplainerError(f"resume: checkpoint does not match this explainer ({str(exc).splitlines()[0]})") from None
        epoch, step, batches_done = state["epoch"], state["step"], state["batches_done"]
        if state["epoch_done"]:
            epoch, batches_done = epoch + 1, 0
    else:
        # lambda_l from the performer's features of all training images (paper §4); under DDP
        # each process reads every world-th image and estimate_lambda_l all-reduces the sums
        shard = Subset(train_set, range(denv.rank, len(train_set), denv.world_size)) if denv.enabled else train_set
        plain = DataLoader(shard, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
        def target_rows(b):
            f = performer_targets(performer, b["image"].to(device), cfg.layer, explainer.targets)
            return [*f.targets.values(), f.logits]

        loss_mod.estimate_lambda_l(target_rows(b) for b in plain)

    net: nn.Module = explainer
    if denv.enabled:  # averages the gradients of the per-process means (one all-reduce per step)
        net = nn.parallel.DistributedDataParallel(explainer, device_ids=[device.index] if device.type == "cuda" else None)

    out = Path(cfg.out)
    run_config = {**extra_config, **cfg.to_dict(), "eta_used": eta}
    log = None
    if denv.is_main:  # only rank 0 writes (after the collectives above: every process is past its checks)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", run_config)
        log = RunLog(out)
        if ckpt is not None:
            log.truncate_after(step)
    if ckpt is not None:
        set_rng_state(ckpt[1]["rng"])
    if denv.rank:
        seed_everything(cfg.seed + 1_000_003 * denv.rank + step)  # per-process randomness, as icnn train

    def save(ep: int, bd: int, st: int, done: bool, metrics: dict | None = None) -> Path | None:
        if not denv.is_main:
            return None
        state = {"epoch": ep, "batches_done": bd, "epoch_done": done, "step": st, "optimizer": optimizer.state_dict(),
                 "loss": loss_mod.state_dict(), "rng": rng_state(), "metrics": metrics or {}}  # fmt: skip
        if denv.enabled:
            state["world_size"] = denv.world_size
        return save_checkpoint(out, explainer, state, run_config)

    result = ExplainResult(explainer, loss_mod, step=step, rank=denv.rank, world_size=denv.world_size)
    names = ["loss", "main", "neg_log_p", "filter/interp1", "filter/interp2", "p"]
    try:
        while epoch <= cfg.epochs:
            if batches_done == 0:
                loss_mod.start_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.set_start(batches_done * cfg.batch_size)
            net.train()
            n_batches = math.ceil(sampler.num_samples / cfg.batch_size)
            sums, n_img, t0 = torch.zeros(len(names), dtype=torch.float64), 0, time.perf_counter()
            for batch in _progress(loader, cfg.progress and denv.is_main, len(loader), f"explain epoch {epoch}"):
                images = batch["image"].to(device)
                perf = performer_targets(performer, images, cfg.layer, explainer.targets)
                o = net(perf.read)
                labels = batch["label"].to(device) if cfg.objective == "cls" else None
                total, terms = loss_mod(o, perf, epoch, labels)
                values = torch.stack([total.detach(), *terms.values()]).double().cpu()
                if not torch.isfinite(values).all():
                    bad = ", ".join(f"{k} = {v:.4g}" for k, v in zip(names, values.tolist()))
                    raise NonFiniteLossError(f"non-finite explainer loss at epoch {epoch}, step {step + 1}: {bad}; "
                                             "stopped before the optimizer step")  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loss_mod.after_backward(float(o.p.detach()))
                b = images.shape[0]
                sums += values * b
                n_img += b
                step += 1
                batches_done += 1
                if log is not None and cfg.log_every and step % cfg.log_every == 0:  # this process's running means
                    log.write({"kind": "step", "epoch": epoch, "step": step, **dict(zip(names, (sums / n_img).tolist())),
                               **loss_mod.diagnostics(epoch)})  # fmt: skip
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batches_done < n_batches:
                    save(epoch, batches_done, step, done=False)
            if denv.enabled:  # epoch means over all processes
                total = all_reduce_sum(torch.cat((sums, sums.new_tensor([n_img]))).to(device)).cpu()
                sums, n_img = total[:-1], int(total[-1].item())
            row = {"kind": "epoch", "epoch": epoch, "step": step, **dict(zip(names, (sums / max(n_img, 1)).tolist())),
                   "images_per_s": n_img / max(time.perf_counter() - t0, 1e-9), **loss_mod.diagnostics(epoch)}  # fmt: skip
            if log is not None:
                log.write(row)
                print(f"explain epoch {epoch}/{cfg.epochs}  loss {row['loss']:.4g}  p {row['p']:.3f}  "
                      f"main {row['main']:.4g}  lambda_f {row['interp2/lambda_f']:.3g}", file=sys.stderr, flush=True)  # fmt: skip
            result.history.append(row)
            result.checkpoint = save(epoch, 0, step, done=True, metrics=row)
            result.step = step
            epoch, batches_done = epoch + 1, 0
    finally:
        if log is not None:
            log.close()
    explainer.eval()
    return result


def load_explainer(performer: nn.Module, path: str | Path) -> tuple[Explainer, ExplainerConfig]:
    """An explainer saved by :func:`train_explainer` (a run directory or its checkpoint)."""
    weights, _, config = load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(ExplainerConfig)}
    cfg = ExplainerConfig.from_dict({k: v for k, v in config.items() if k in known})
    explainer = build_explainer(performer, layer=cfg.layer, reconstruct=cfg.reconstruct, mask=cfg.mask,
                                norm_momentum=cfg.norm_momentum, w_p_init=cfg.w_p_init)  # fmt: skip
    explainer.load_state_dict(weights)
    return explainer.to(next(performer.parameters()).device).eval(), cfg
