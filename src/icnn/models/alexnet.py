"""AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower layout (64-192-384-256-256
filters, no LRN), so torchvision ``alexnet`` state dicts load. Made interpretable as VGG is:
conv5 + ReLU is the top conv-layer, pool5 opens the fc head (6x6 at 224 px, 1x1 at 64 px).
"""

from __future__ import annotations

from torch import nn

from .net import InterpretableNet
from .registry import register_model
from .vgg import conv_fc_net


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),   # 0-1
        nn.MaxPool2d(kernel_size=3, stride=2),                                           # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),             # 3-4
        nn.MaxPool2d(kernel_size=3, stride=2),                                           # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),            # 6-7
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),            # 8-9
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),            # 10-11 top
        nn.MaxPool2d(kernel_size=3, stride=2),                                           # 12 pool5
    )  # fmt: skip


@register_model
def alexnet(**kw) -> InterpretableNet:
    """AlexNet; ``weights``: a torchvision ``alexnet`` state dict file."""
    return conv_fc_net(alexnet_features(), arch="alexnet", **kw)
