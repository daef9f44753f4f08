"""VGG-16 (Simonyan & Zisserman 2015) and VGG-M / VGG-S (Chatfield et al., BMVC 2014), the
paper's conv + fc backbones (§5 "Four types of CNNs").

Each is a ``features`` ``nn.Sequential`` whose indices match its reference (torchvision's
``vgg16().features``, so torchvision state dicts load; Caffe's ``VGG_CNN_M``/``VGG_CNN_S``
layer order for the Chatfield nets), made interpretable by ``assemble``: the last
conv + ReLU is the top conv-layer, what comes before it the stem, and pool5 opens the fc head::

    stem = features[:k]          conv1 ... conv5_2 (VGG-16), conv1 ... conv4 (VGG-M/S)
    top  = features[k:k+2]       conv5(_3) + ReLU              -> mask
    new  = conv3x3(512) + ReLU                                 -> mask
    head = pool5 -> fit -> fc6 -> fc7 -> fc8                   (fresh, fc6 sized to the image)

Chatfield et al. Table 1 (Caffe/MatConvNet models, max-pooling rounds up)::

    CNN-M: conv1 96x7x7 st.2, LRN, pool 3/2 | conv2 256x5x5 st.2 pad 1, LRN, pool 3/2 |
           conv3-5 512x3x3 pad 1 | pool5 3/2 | fc6 4096, fc7 4096 (dropout) | fc8
    CNN-S: conv1 96x7x7 st.2, LRN, pool 3/3 | conv2 256x5x5 st.1, pool 2/2 |
           conv3-5 512x3x3 pad 1 | pool5 3/3 | fc6 4096, fc7 4096 (dropout) | fc8

At 224 px both give 6x6 after pool5 (13x13 and 17x17 top maps); VGG-16 gives 14x14 / 7x7.
LRN is Caffe's across-channel normalisation (size 5, alpha 5e-4, beta 0.75, k 2), which
``nn.LocalResponseNorm`` computes with the same ``alpha / size`` scaling.
"""

from __future__ import annotations

from torch import nn

from .net import InterpretableNet, fc_head, he_init, assemble
from .registry import register_model
from .weights import load_weights

# torchvision's configuration "D" (VGG-16): channels, "M" = 2x2 max-pool
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class ConvFeatures(nn.Module):
    """A backbone in its reference layout: ``features`` only (the classifier is built fresh)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        for m in features.modules():  # torchvision's VGG conv init
            if isinstance(m, nn.Conv2d):
                he_init(m)


def vgg16_features() -> nn.Sequential:
    layers, c = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


def _conv3_to_pool5(pool5_stride: int) -> list[nn.Module]:
    """conv3-5 of CNN-M/S (512x3x3 pad 1, each + ReLU; conv5 + ReLU is the top conv-layer) and pool5."""
    convs = [m for c_in in (256, 512, 512) for m in (nn.Conv2d(c_in, 512, kernel_size=3, padding=1), nn.ReLU(inplace=True))]
    return [*convs, nn.MaxPool2d(kernel_size=3, stride=pool5_stride, ceil_mode=True)]


def vgg_m_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), _lrn(),        # 0-2
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),                           # 3
        nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=1), nn.ReLU(inplace=True), _lrn(),  # 4-6
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),                           # 7
        *_conv3_to_pool5(2),                                                             # 8-13 (12-13 top), 14 pool5
    )  # fmt: skip


def vgg_s_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), _lrn(),        # 0-2
        nn.MaxPool2d(kernel_size=3, stride=3, ceil_mode=True),                           # 3
        nn.Conv2d(96, 256, kernel_size=5, stride=1), nn.ReLU(inplace=True),              # 4-5
        nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),                           # 6
        *_conv3_to_pool5(3),                                                             # 7-12 (11-12 top), 13 pool5
    )  # fmt: skip


def conv_fc_net(features: nn.Sequential, *, arch: str, weights=None, hidden: int = 4096, dropout: float = 0.5,
                **kw) -> InterpretableNet:  # fmt: skip
    """An AlexNet/VGG-style ``features`` (ending conv, ReLU, pool5) made interpretable; ``**kw``:
    :func:`assemble`'s (``num_classes``, ...)."""
    load_weights(ConvFeatures(features), weights, arch, ignore=("classifier.",))
    k = max(i for i, m in enumerate(features) if isinstance(m, nn.Conv2d))  # the top conv
    head = fc_head(features[k + 2], hidden=hidden, dropout=dropout)
    return assemble(features[:k], features[k : k + 2], head, arch=arch, **kw)


@register_model
def vgg16(**kw) -> InterpretableNet:
    """VGG-16 (torchvision layout); ``weights``: a torchvision ``vgg16`` state dict file."""
    return conv_fc_net(vgg16_features(), arch="vgg16", **kw)


@register_model
def vgg_m(**kw) -> InterpretableNet:
    """VGG-M (Chatfield et al. 2014, CNN-M)."""
    return conv_fc_net(vgg_m_features(), arch="vgg_m", **kw)


@register_model
def vgg_s(**kw) -> InterpretableNet:
    """VGG-S (Chatfield et al. 2014, CNN-S)."""
    return conv_fc_net(vgg_s_features(), arch="vgg_s", **kw)
