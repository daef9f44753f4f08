"""A small CNN trained from scratch: the CPU default for the 64 px synthetic part world.

Four conv-BN-ReLU blocks (3x3, pad 1), a 2x2 max-pool after each of the first three; at 64 px
the top map is 8x8 (stride 8, receptive field of the new layer 54 px)::

    stem = [conv 3->w, pool] [conv w->2w, pool] [conv 2w->4w, pool]     (B, 4w, H/8, W/8)
    top  = conv 4w->4w, BN, ReLU                           -> mask      (B, 4w, H/8, W/8)
    new  = conv3x3 + ReLU                                  -> mask
    head = avgpool -> fc

``width=32`` gives 128 filters per interpretable layer and ~60 MMAC per 64 px image.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .net import InterpretableNet, he_init, linear_head, assemble
from .registry import register_model
from .weights import WeightsError, load_weights


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    conv = he_init(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False))
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c_out), relu=nn.ReLU(inplace=True)))


class SmallFeatures(nn.Module):
    """The reference layout (state dict names ``features.blockN.*``)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(OrderedDict(
            block1=conv_bn_relu(3, w), pool1=nn.MaxPool2d(2),
            block2=conv_bn_relu(w, 2 * w), pool2=nn.MaxPool2d(2),
            block3=conv_bn_relu(2 * w, 4 * w), pool3=nn.MaxPool2d(2),
            block4=conv_bn_relu(4 * w, 4 * w),
        ))  # fmt: skip


@register_model
def small_cnn(
    *, weights=None, image_size=64, width: int = 32, dropout: float = 0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw,
) -> InterpretableNet:  # fmt: skip
    """Small from-scratch CNN (64 px default); ``weights``: a file saved from ``SmallFeatures``;
    ``**kw``: :func:`assemble`'s (``num_classes``, ...)."""
    backbone = SmallFeatures(width)
    if weights == "imagenet":
        raise WeightsError("small_cnn has no ImageNet weights: it trains from scratch")
    load_weights(backbone, weights, "small_cnn")
    f = backbone.features
    head = linear_head(dropout=dropout)
    return assemble(f[:-1], f[-1:], head, image_size=image_size, mean=mean, std=std, arch="small_cnn", **kw)
