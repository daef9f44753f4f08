"""Backpropagation with rectified ReLU gradients: the engine of deconvnet and guided backprop.

At every ReLU ``y = max(x, 0)`` with incoming gradient ``g = dS/dy`` the signal sent back is

    backprop       g * [x > 0]
    deconvnet      g * [g > 0]              (Zeiler & Fergus 2014, "rectification")
    guided         g * [x > 0] * [g > 0]    (Springenberg et al. 2015)

Captum's ``GuidedBackprop`` / ``Deconvolution`` implement this with hooks on ``nn.ReLU``
*modules*; they handle in-place and reused ReLU modules correctly (tested), but

- a functional ReLU (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu_``) is not hooked and
  silently acts as an ordinary ReLU: the result degrades to the plain gradient;
- the rule is applied to the whole gradient of the ReLU's *input tensor*, so when that tensor
  also feeds another branch (a skip taken before the ReLU) that branch's gradient is rectified
  too. Common CNNs (VGG, torchvision ResNets, AlexNet) never do this.

(``tests/attribution/test_guided_deconv.py`` shows both.) So ``engine="auto"`` counts, once per
method object, the ReLUs a forward calls outside ``nn.ReLU`` modules; if there are any, a
``TorchFunctionMode`` routes *every* ReLU call through :class:`_RectifiedReLU` instead of using
Captum (``engine="override"`` forces this per-call rule). Other activations (ReLU6, LeakyReLU,
SiLU, ...) are backpropagated as they are, by both engines.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import Attribution, AttributionError, OutputSelector

_RELUS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
_INPLACE = frozenset({torch.relu_, torch.Tensor.relu_})
ENGINES = ("auto", "captum", "override")


class _RectifiedReLU(torch.autograd.Function):
    """``max(x, 0)`` whose backward passes ``g * [g > 0]`` (and ``* [x > 0]`` when guided)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, guided: bool) -> torch.Tensor:
        y = x.clamp_min(0)
        ctx.guided = guided
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (y,) = ctx.saved_tensors
        g = g.clamp_min(0)
        return (g * (y > 0) if ctx.guided else g), None


class _ReluOverride(TorchFunctionMode):
    """Routes every ReLU call made while active (module or functional) through _RectifiedReLU."""

    def __init__(self, guided: bool):
        super().__init__()
        self.guided = guided

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        x = args[0]
        y = _RectifiedReLU.apply(x, self.guided)
        inplace = func in _INPLACE or kwargs.get("inplace", False) or (len(args) > 1 and args[1])
        return x.copy_(y) if inplace else y  # in-place callers may keep using x


class _ReluCensus(TorchFunctionMode):
    """Counts ReLU calls made outside ``nn.ReLU`` modules (the ones Captum cannot hook)."""

    def __init__(self):
        super().__init__()
        self.in_module = 0
        self.functional = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS and not self.in_module:
            self.functional += 1
        return func(*args, **(kwargs or {}))


def count_functional_relus(model: nn.Module, x: torch.Tensor) -> int:
    """How many ReLUs ``model(x)`` calls outside ``nn.ReLU`` modules (one no-grad forward)."""
    census = _ReluCensus()

    def enter(*_):
        census.in_module += 1

    def leave(*_):
        census.in_module -= 1

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_pre_hook(enter) for m in relus] + [m.register_forward_hook(leave) for m in relus]
    try:
        with torch.no_grad(), census:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return census.functional


class RectifiedBackprop(Attribution):
    """Base of :class:`GuidedBackprop` and :class:`Deconvnet`; output ``(B, C, H, W)``.

    Args:
        engine: ``"auto"`` (Captum unless the model calls functional ReLUs), ``"captum"`` or
            ``"override"`` (our TorchFunctionMode, any ReLU).
    """

    guided: bool
    _captum_cls: type

    def __init__(self, model: nn.Module, *, output_selector: OutputSelector = None, engine: str = "auto"):
        super().__init__(model, output_selector=output_selector)
        if engine not in ENGINES:
            raise AttributionError(f"engine: expected one of {ENGINES}, got {engine!r}")
        self.engine = engine

    def _attribute(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "auto":  # decided once: the model's code does not change between calls
            self.engine = "override" if count_functional_relus(self.model, x[:1]) else "captum"
        if self.engine == "override":
            with _ReluOverride(self.guided):
                score = self._scorer(x)  # (B,)
            return torch.autograd.grad(score.sum(), x)[0]  # samples are independent in eval mode
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            return self._captum_cls(self._scorer).attribute(x)
