"""What every attribution method shares: the model, its output, the target, a clean model state.

A method object (``Saliency(model)``, ``GradCAM(model, layer)``, ...) holds the unwrapped model
and a :class:`_Scorer` that maps images to the score of each sample's target class, ``(B,)``.
That scorer is the ``forward_func`` handed to Captum, so Captum never sees tuples, dicts or
class indices. During a call the model is put in eval mode with frozen parameters and both are
restored afterwards, even when the model raises; hooks are only ever registered for the duration
of one call (Captum's own ``try/finally`` or ours), so nothing outlives a call.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from captum.attr import LayerAttribution
from torch import nn

from ..models.net import eval_mode

Target = int | Sequence[int] | torch.Tensor | None
OutputSelector = Callable[[Any], torch.Tensor] | str | int | None


class AttributionError(ValueError):
    """Bad input to an attribution method; the message is one line naming the argument."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (any depth)."""
    if not isinstance(model, nn.Module):
        raise AttributionError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """``layer`` as a module of ``model``: a submodule object or a dotted name (``"layers.new"``).

    Names may keep the ``module.`` prefix of a DataParallel/DDP wrapper.
    """
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise AttributionError(f"layer: the given {type(layer).__name__} is not a submodule of the model")
        return layer
    if not isinstance(layer, str):
        raise AttributionError(f"layer: expected a module or a dotted name, got {type(layer).__name__}")
    names = dict(model.named_modules())
    for name in (layer, layer.removeprefix("module.")):
        if name in names:
            return names[name]
    close = difflib.get_close_matches(layer, [n for n in names if n], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise AttributionError(f"layer: no submodule named {layer!r} in {type(model).__name__}{hint}")


def select_output(output: Any, selector: OutputSelector = None) -> torch.Tensor:
    """The logits ``(B, K)`` among a model's outputs.

    ``selector``: a callable, a key or an index; by default the tensor itself, key ``"logits"``
    of a mapping, or the first tensor of a tuple/list. A ``(B,)`` output counts as ``(B, 1)``.
    """
    if callable(selector):
        out = selector(output)
    elif selector is not None:
        out = output[selector]
    elif isinstance(output, Mapping):
        out = output.get("logits")
    elif isinstance(output, (tuple, list)):
        out = next((o for o in output if torch.is_tensor(o)), None)
    else:
        out = output
    if not torch.is_tensor(out):
        raise AttributionError(
            f"output_selector: cannot find the logits in a model output of type {type(output).__name__}; "
            "pass output_selector= (a key, an index or a callable)"
        )
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise AttributionError(f"output_selector: expected logits (B, K), got shape {tuple(out.shape)}")
    return out


def resolve_target(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """One class index per sample, ``(B,)`` int64 on the logits' device.

    ``None``: the predicted class (index 0 for a single-output logistic model ``(B, 1)``).
    """
    b, k = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)  # (B,), all 0 when K == 1
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex() or t.ndim > 1 or (t.ndim == 1 and len(t) != b):
        raise AttributionError(
            f"target: expected an int or {b} class indices, got {t.dtype} of shape {tuple(t.shape)}"
        )
    t = t.long().expand(b)
    if ((t < 0) | (t >= k)).any():
        raise AttributionError(f"target: class index out of range for a model with {k} output(s)")
    return t


class _Scorer(nn.Module):
    """images ``(B, C, H, W)`` -> score of each sample's target class ``(B,)``; Captum's forward_func."""

    def __init__(self, model: nn.Module, output_selector: OutputSelector):
        super().__init__()
        self.model = model
        self.output_selector = output_selector
        self.target: Target = None  # set for the duration of one call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = select_output(self.model(x), self.output_selector)  # (B, K)
        return logits.gather(1, resolve_target(logits, self.target)[:, None])[:, 0]


@contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters, gradients enabled; all restored on exit, even on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with eval_mode(model), torch.enable_grad():
            yield
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def minmax_normalize(a: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to ``[0, 1]`` over all but the batch dim (constant maps -> 0)."""
    flat = a.flatten(1)  # (B, N)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    return out.view_as(a)


class Releasable:
    """A method object as a context manager: ``release()`` (the model's references dropped) on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Attribution(Releasable):
    """Base of the per-image methods: ``method(images, target=None, normalize=False, upsample=False)``.

    Subclasses implement ``_attribute(x) -> (B, h, w) or (B, C, H, W)`` with ``self._scorer`` as
    the forward function. Usable as a context manager; ``release()`` drops the model.

    Args:
        model: any ``nn.Module`` mapping ``(B, C, H, W)`` images to logits (DataParallel/DDP are
            unwrapped).
        output_selector: how to find the logits in a tuple/dict output (see :func:`select_output`).
    """

    def __init__(self, model: nn.Module, *, output_selector: OutputSelector = None):
        self.model: nn.Module | None = unwrap_model(model)
        self._scorer = _Scorer(self.model, output_selector)

    def _attribute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, images: torch.Tensor, target: Target = None, normalize: bool = False, upsample: bool = False
    ) -> torch.Tensor:
        """Attributions of ``images (B, C, H, W)`` for ``target`` (``None``: the predicted class).

        ``normalize``: per-sample min-max to ``[0, 1]``; ``upsample``: bilinear to ``(H, W)``.
        Returns a detached tensor on the images' device; raw (unnormalised) by default.
        """
        if self.model is None:
            raise AttributionError(f"{type(self).__name__}: used after release()")
        if not (torch.is_tensor(images) and images.ndim == 4 and images.is_floating_point()):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise AttributionError(f"images: expected a float tensor (B, C, H, W), got {got}")
        x = images.detach().requires_grad_(True)  # a new tensor: the caller's flags stay as they were
        self._scorer.target = target
        try:
            with analysis_mode(self.model):
                attr = self._attribute(x).detach()
        finally:
            self._scorer.target = None
        if upsample and attr.shape[-2:] != images.shape[-2:]:
            squeeze = attr.ndim == 3
            attr = attr[:, None] if squeeze else attr  # (B, c, h, w)
            attr = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")
            attr = attr[:, 0] if squeeze else attr
        return minmax_normalize(attr) if normalize else attr

    def release(self) -> None:
        """Drop the references to the model (no hooks are held between calls)."""
        self.model = None
        self._scorer = None
