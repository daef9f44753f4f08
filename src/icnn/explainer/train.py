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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..loss import FilterLoss
from ..task_loss import task_loss_for
from ..models.net import batch_input, eval_mode
from ..training.checkpoint import load_checkpoint
from ..training.config import ConfigError, RunConfig
from ..training.distributed import all_reduce_sum, shard, world_size
from ..training.loop import FitResult, Objective, StepOutput, fit, seed_everything
from .model import Explainer, ExplainerError, ExplainerOutput, PerformerFeatures, build_explainer, performer_targets

OBJECTIVES = ("reconstruct", "cls")


@dataclass
class ExplainerConfig(RunConfig):
    # --- explainer ---
    layer: str = "stem"  # performer map explained: stem (relu4 / relu5_2 / the layer below the top conv-layer) or a layer name
    reconstruct: list[str] | None = None  # performer head modules reconstructed (default fc6,fc7; GAP heads: the pooled features)
    objective: str = "reconstruct"  # reconstruct (the explainer) or cls (the explainer+cls baseline: the classification loss instead)
    eta: float | None = None  # weight of -log p (default 1e6, 1.5e5 for vgg16; paper §4)
    lambda_rec: float = 5e4  # lambda_l = lambda_rec / E||max(x*_l, 0)|| (paper §4)
    lambda_cls: float = 5e4  # weight of the classification loss of objective cls (our choice)
    logit_weight: float = 0.0  # also match the performer's own logits on the reconstruction, this weight relative to lambda_l (label-free; 0: the paper)
    lambda_f_scale: float = 1.0 / 300.0  # lambda_f = scale / epoch * E||dRec/dx_f|| / E||dLoss_f/dx_f|| (the Appendix: 1/300)
    grad_momentum: float = 0.9  # running means of the gradient norms behind lambda_f
    filter_loss: dict[str, Any] = field(default_factory=dict)  # FilterLoss options of the explainer's filter losses (mode, ...)
    mask: dict[str, Any] = field(default_factory=dict)  # PartMask options of the explainer's masks
    norm_momentum: float = 0.1  # running-mean momentum of the norm-layers' alpha
    w_p_init: float = 0.0  # initial w_p (p = sigmoid(w_p) = 0.5)
    p_lr: float = 5e-2  # learning rate of w_p (Adam: w_p moves about this much per step)
    # --- how it trains (RunConfig fields with the explainer's defaults) ---
    optimizer: str = "adam"  # adam (scale-free: the paper's loss is ~1e6) or sgd
    lr: float = 1e-4  # learning rate of the explainer's weights
    weight_decay: float = 0.0  # L2 weight decay on conv/fc weights
    out: str = "runs/explain"  # output directory: checkpoint/, log.csv, log.jsonl, config.json

    CHOICES: ClassVar[dict[str, tuple]] = {**RunConfig.CHOICES, "objective": OBJECTIVES}
    SIGNED: ClassVar[tuple[str, ...]] = ("w_p_init",)
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr_step")  # lr 0 freezes the weights (w_p has its own)

    def validate(self) -> "ExplainerConfig":
        super().validate()
        if not self.grad_momentum < 1:
            raise self._bad("grad_momentum", "must lie in [0, 1)")
        if not 0 < self.norm_momentum <= 1:
            raise self._bad("norm_momentum", "must lie in (0, 1]")
        return self


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
        lam = self.lambda_f(int(self.filter_losses["interp1"].stats.epoch.item()))
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
# the objective on the one loop (icnn.training.loop.fit)


class ExplainerObjective(Objective):
    """The explainer (``model``, what the checkpoint holds) and its loss; the performer is read only."""

    def __init__(self, performer: nn.Module, explainer: Explainer, loss: "ExplainerLoss", cfg: ExplainerConfig):
        super().__init__()
        self.model = self.net = explainer
        self.loss = loss
        self.cfg = cfg
        self._performer = [performer]  # not a submodule: never saved, moved, or put in training mode
        self.epoch = 1

    @property
    def performer(self) -> nn.Module:
        return self._performer[0]

    def param_groups(self, cfg):
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and n != "w_p"]
        return [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "explainer"},
                {"params": [self.model.w_p], "lr": cfg.p_lr, "weight_decay": 0.0, "name": "w_p"}]  # fmt: skip

    def train(self, mode: bool = True):
        super().train(mode)
        self.performer.eval()
        return self

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loss.start_epoch(epoch)

    def targets(self, batch) -> PerformerFeatures:
        device = next(self.performer.parameters()).device
        x, from_stem = batch_input(batch)
        return performer_targets(self.performer, x.to(device), self.cfg.layer, self.model.targets, from_stem=from_stem)  # no grad

    def step(self, batch) -> StepOutput:
        perf = self.targets(batch)
        with self.autocast():
            out = self.net(perf.read)
        labels = batch["label"].to(out.x_enc.device) if self.cfg.objective == "cls" else None
        total, terms = self.loss(out, perf, self.epoch, labels)
        self._p = float(out.p.detach())
        return StepOutput(total, terms, perf.read.shape[0])

    def after_step(self) -> None:
        self.loss.after_backward(self._p)

    def diagnostics(self) -> dict[str, float]:
        return self.loss.diagnostics(self.epoch)

    @torch.no_grad()
    def measure_lambda_l(self, train_set, device) -> None:
        """``lambda_l`` from the performer's features of all training images (paper §4); under
        DDP each process reads every world-th image and ``estimate_lambda_l`` all-reduces."""
        plain = DataLoader(shard(train_set), batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)

        def rows(b):
            f = self.targets(b)
            return [*f.targets.values(), f.logits]

        self.loss.estimate_lambda_l(rows(b) for b in plain)


ExplainResult = FitResult  # .objective.model is the explainer


def train_explainer(performer: nn.Module, train_set, cfg: ExplainerConfig | None = None, *, resume: str | Path | None = None,
                    extra_config: dict[str, Any] | None = None) -> FitResult:  # fmt: skip
    """Trains an explainer for ``performer`` on ``train_set`` (labels unused unless ``cls``).

    The performer is only read: its parameters, buffers and outputs are the same afterwards (its
    ``training`` flag is restored). Writes ``cfg.out/{checkpoint/, log.csv, log.jsonl,
    config.json}``; ``resume`` (a run directory or its checkpoint) continues exactly. Under
    ``torchrun`` every process calls this with the same arguments (its performer on its own
    device); they train together with DDP (see the module docstring) and only rank 0 writes.
    ``train_set`` may be a ``CachedDataset`` of the performer's frozen stem (``layer="stem"``).
    """
    cfg = (cfg or ExplainerConfig()).validate()
    seed_everything(cfg.seed)  # same on every process: identical initial weights
    device = next(performer.parameters()).device
    try:
        with eval_mode(performer):  # read only: each module's own mode comes back after
            explainer = build_explainer(performer, layer=cfg.layer, reconstruct=cfg.reconstruct, mask=cfg.mask,
                                        norm_momentum=cfg.norm_momentum, w_p_init=cfg.w_p_init).to(device)  # fmt: skip
            with torch.no_grad():
                x, from_stem = batch_input(train_set[0])
                read = performer_targets(performer, x[None].to(device), cfg.layer, (), from_stem=from_stem).read
                map_size = tuple(explainer.layers["interp1"].body(read).shape[-2:])
            kind = "logistic" if performer.num_classes == 1 else "softmax"
            eta = default_eta(performer) if cfg.eta is None else cfg.eta
            objective = ExplainerObjective(performer, explainer, ExplainerLoss(explainer, map_size, cfg, eta, kind), cfg)
            run_config = {**(extra_config or {}), **cfg.to_dict(), "eta_used": eta}
            if resume is not None:
                saved = load_checkpoint(resume)[2]
                for key in ("performer_weights_sha256",):
                    if key in saved and key in run_config and saved[key] != run_config[key]:
                        raise ExplainerError(f"resume: not the performer the run in {resume} explains ({saved.get('performer')}, "
                                             f"weights sha256 {saved[key][:12]}...)")
            result = fit(objective, train_set, cfg, resume=resume, run_config=run_config,
                         on_start=lambda obj, dev: obj.measure_lambda_l(train_set, dev))  # fmt: skip
    except ConfigError as exc:
        raise ExplainerError(str(exc)) from None
    return result


def load_explainer(performer: nn.Module, path: str | Path) -> tuple[Explainer, ExplainerConfig]:
    """An explainer saved by :func:`train_explainer` (a run directory or its checkpoint)."""
    weights, _, config = load_checkpoint(path)
    cfg = ExplainerConfig.from_dict({k: v for k, v in config.items() if k in ExplainerConfig.field_names()})
    explainer = build_explainer(performer, layer=cfg.layer, reconstruct=cfg.reconstruct, mask=cfg.mask,
                                norm_momentum=cfg.norm_momentum, w_p_init=cfg.w_p_init)  # fmt: skip
    explainer.load_state_dict(weights)
    return explainer.to(next(performer.parameters()).device).eval(), cfg
