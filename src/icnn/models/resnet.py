"""ResNet-18/50 (He et al. 2016), torchvision's layout (v1.5: stride in the 3x3 conv).

Beyond the paper (which leaves residual nets out, §5): the whole last stage ``layer4`` is the
top conv-layer (its output, after the block's final ReLU, is masked) and the new 3x3 layer sits
above it; global average pooling + fc is the head::

    stem = conv1, bn1, relu, maxpool, layer1, layer2, layer3
    top  = layer4                               -> mask     (B, 512|2048, H/32, W/32)
    new  = conv3x3 + ReLU                       -> mask
    head = avgpool -> fc                        (fresh)
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .net import InterpretableNet, linear_head, assemble
from .registry import register_model
from .weights import load_weights


def resnet_net(backbone: nn.Module, *, arch: str, weights=None, dropout: float = 0.0, **kw) -> InterpretableNet:
    """A torchvision ResNet made interpretable; ``**kw``: :func:`assemble`'s (``num_classes``, ...)."""
    load_weights(backbone, weights, arch, ignore=("fc.",))
    b = backbone
    stem = nn.Sequential(OrderedDict(
        conv1=b.conv1, bn1=b.bn1, relu=b.relu, maxpool=b.maxpool, layer1=b.layer1, layer2=b.layer2, layer3=b.layer3,
    ))  # fmt: skip
    top = nn.Sequential(OrderedDict(layer4=b.layer4))
    return assemble(stem, top, linear_head(dropout=dropout), arch=arch, **kw)


@register_model
def resnet18(**kw) -> InterpretableNet:
    """ResNet-18; ``weights``: a torchvision ``resnet18`` state dict file."""
    from torchvision.models import resnet18 as tv_resnet18  # imported here: torchvision.models is slow to import

    return resnet_net(tv_resnet18(weights=None), arch="resnet18", **kw)


@register_model
def resnet50(**kw) -> InterpretableNet:
    """ResNet-50; ``weights``: a torchvision ``resnet50`` state dict file."""
    from torchvision.models import resnet50 as tv_resnet50

    return resnet_net(tv_resnet50(weights=None), arch="resnet50", **kw)
