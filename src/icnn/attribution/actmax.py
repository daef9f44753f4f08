"""Activation maximisation by gradient ascent (survey §3.2.1, Eq. 5; Simonyan et al. 2014).

    I* = argmax_I  S(I) - lambda * ||I - 0.5||_2^2

``S`` is a filter's activation (mean over its map, or one unit) at a named layer, or a class
logit. We ascend from seeded grey noise along the gradient of Eq. 5 normalised per image (mean
absolute value 1, so ``lr`` is in pixel units whatever the activations' scale; plain
``torch.optim`` would also import ``torch._dynamo``, seconds on first use), keep ``I`` in
``[0, 1]`` by projection, and
use the robustness tricks of Yosinski et al. 2015 / Olah et al. 2017: a random shift (jitter) and
an optional random zoom of the image fed to the network at each step, and an optional Gaussian
blur every few steps. Several filters (or classes) are optimised as one batch, one image each.
The L2 penalty is on the centred image (the image minus mid-grey), so it pulls towards grey
rather than black. Every random draw comes from one ``torch.Generator`` seeded per call, so a
run is bit-reproducible on CPU (on GPU ``grid_sample``'s backward, used by the zoom, is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttributionError, OutputSelector, Releasable, analysis_mode, resolve_layer, select_output, unwrap_model


@dataclass
class ActMaxConfig:
    image_size: tuple[int, int] = (64, 64)  # (H, W) of the optimised image
    steps: int = 128  # gradient-ascent steps
    lr: float = 0.05  # first step: mean absolute change of a pixel, in [0, 1] units; decays linearly to 0
    l2: float = 1e-4  # lambda of Eq. 5, on the centred image I - 0.5
    init_std: float = 0.05  # std of the Gaussian noise around mid-grey at the start
    jitter: int = 4  # random circular shift of up to this many pixels per step (0 = off)
    scale: tuple[float, float] | None = None  # random zoom range per step, e.g. (0.9, 1.1); None = off
    blur_every: int = 0  # blur the image every this many steps (0 = off)
    blur_sigma: float = 0.5  # std (pixels) of that Gaussian blur


@dataclass
class ActMaxResult:
    image: torch.Tensor  # (K, 3, H, W) in [0, 1], one image per filter / class
    history: torch.Tensor  # (steps, K) objective activation at each step (on the jittered input)
    initial: torch.Tensor  # (K,) activation of the starting noise
    final: torch.Tensor  # (K,) activation of the returned image


class _Stop(Exception):
    """Raised by the layer hook: nothing after the layer needs computing."""


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian blur of ``(B, C, H, W)``, reflect padding, radius ``ceil(2 sigma)``."""
    r = max(1, int(2 * sigma + 0.999))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    k = (k / k.sum())[None, None, None]  # (1, 1, 1, 2r+1)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.expand(c, 1, 1, -1), groups=c)  # along rows
    return F.conv2d(x, k.transpose(-1, -2).expand(c, 1, -1, 1), groups=c)  # along columns


def _zoom(x: torch.Tensor, s: float) -> torch.Tensor:
    """Zoom by ``s`` about the centre, same size, reflection at the borders."""
    theta = torch.tensor([[1 / s, 0, 0], [0, 1 / s, 0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


class ActivationMaximization(Releasable):
    """Images that maximise a filter of ``layer`` (or, with ``layer=None``, a class logit).

    Args:
        model: any ``nn.Module`` on images ``(B, 3, H, W)`` in ``[0, 1]`` (DataParallel/DDP unwrapped).
        layer: submodule or dotted name whose output ``(B, K, h, w)`` holds the filters; ``None``
            to maximise logits.
        output_selector: how to find the logits in a tuple/dict output (logit mode only).
        config: :class:`ActMaxConfig`.

    ``act(channel, unit=None, seed=0)`` for filters, ``act(target=c, seed=0)`` for classes;
    ``channel``/``target`` may be an int or a sequence (one image per entry, one batch).
    Gradient ascent cannot start from a dead ReLU unit (zero gradient): prefer the layer before
    the ReLU. For one ``unit``, jitter moves the unit's receptive field around the image from
    step to step; use little or none.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str | None = None,
        *,
        output_selector: OutputSelector = None,
        config: ActMaxConfig | None = None,
    ):
        self.model: nn.Module | None = unwrap_model(model)
        self.layer = None if layer is None else resolve_layer(self.model, layer)
        self.output_selector = output_selector
        self.config = config or ActMaxConfig()

    def _objective(
        self, image: torch.Tensor, index: torch.Tensor, top: int, unit: tuple[int, int] | None
    ) -> torch.Tensor:
        """Activation ``(K,)`` of filter/class ``index[k]`` for image ``k``; ``top = max(index)``."""
        if self.layer is None:
            logits = select_output(self.model(image), self.output_selector)  # (K, classes)
            if top >= logits.shape[1]:
                raise AttributionError(f"target: class index out of range for {logits.shape[1]} outputs")
            return logits.gather(1, index[:, None])[:, 0]
        captured = []

        def hook(module, inputs, output):
            captured.append(output)
            raise _Stop

        handle = self.layer.register_forward_hook(hook)
        try:
            self.model(image)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured or not torch.is_tensor(captured[0]) or captured[0].ndim != 4:
            raise AttributionError("layer: must be called in the forward pass and output one (B, K, h, w) tensor")
        a = captured[0]  # (K, C, h, w)
        if top >= a.shape[1]:
            raise AttributionError(f"channel: index out of range for a layer with {a.shape[1]} channels")
        maps = a[torch.arange(len(a), device=a.device), index]  # (K, h, w)
        if unit is None:
            return maps.mean(dim=(1, 2))
        i, j = unit
        if not (0 <= i < maps.shape[1] and 0 <= j < maps.shape[2]):
            raise AttributionError(f"unit: {unit} outside the layer's {tuple(maps.shape[1:])} map")
        return maps[:, i, j]

    def __call__(
        self,
        channel: int | Sequence[int] | torch.Tensor | None = None,
        *,
        unit: tuple[int, int] | None = None,
        target: int | Sequence[int] | torch.Tensor | None = None,
        seed: int = 0,
    ) -> ActMaxResult:
        if self.model is None:
            raise AttributionError("ActivationMaximization: used after release()")
        if (self.layer is None) != (channel is None) or (self.layer is None) == (target is None):
            raise AttributionError("channel/target: give channel= with a layer, or target= (a class) without one")
        index = torch.as_tensor(channel if self.layer is not None else target).long().flatten()  # (K,)
        if len(index) == 0 or index.min() < 0:
            raise AttributionError(f"channel/target: expected non-negative indices, got {index.tolist()}")
        cfg = self.config
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        top, index = int(index.max()), index.to(device)
        gen = torch.Generator().manual_seed(seed)  # CPU generator: the same draws on every device
        h, w = cfg.image_size
        x = (cfg.init_std * torch.randn(len(index), 3, h, w, generator=gen)).clamp(-0.5, 0.5).to(device)
        x.requires_grad_(True)  # centred image I - 0.5, (K, 3, H, W)
        history = []
        with analysis_mode(self.model):
            with torch.no_grad():
                initial = self._objective(0.5 + x, index, top, unit)
            for step in range(cfg.steps):
                image = 0.5 + x
                if cfg.scale is not None:
                    lo, hi = cfg.scale
                    image = _zoom(image, lo + (hi - lo) * torch.rand((), generator=gen).item())
                if cfg.jitter:
                    dy, dx = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist()
                    image = torch.roll(image, shifts=(dy, dx), dims=(2, 3))
                act = self._objective(image, index, top, unit)  # (K,)
                objective = act.sum() - cfg.l2 * x.pow(2).sum()  # Eq. 5, summed over independent images
                (g,) = torch.autograd.grad(objective, x)  # (K, 3, H, W)
                with torch.no_grad():
                    lr = cfg.lr * (1 - step / cfg.steps)  # linear decay: the last steps settle
                    x += lr * g / g.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                    if cfg.blur_every and (step + 1) % cfg.blur_every == 0:
                        x.copy_(_blur(x, cfg.blur_sigma))
                    x.clamp_(-0.5, 0.5)
                history.append(act.detach())
            with torch.no_grad():
                final = self._objective(0.5 + x, index, top, unit)
        history = torch.stack(history) if history else torch.empty(0, len(index), device=device)
        return ActMaxResult(image=(0.5 + x).detach(), history=history, initial=initial, final=final)

    def release(self) -> None:
        """Drop the references to the model (no hooks are held between calls)."""
        self.model = None
        self.layer = None
