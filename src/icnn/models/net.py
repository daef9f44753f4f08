"""The interpretable network and the one transformation that makes a CNN interpretable (paper §5).

Zhang, Wu, Zhu (CVPR 2018), §5 "Four types of CNNs": *"we modified all filters in the top
conv-layer of the original network into interpretable filters. Then, we inserted a new conv-layer
with M filters above the original top conv-layer, where M is the channel number of the input of
the new conv-layer. We also set filters in the new conv-layer as interpretable filters. Each
filter was a 3x3xM tensor with a bias term. We added zero padding to input feature maps to ensure
that output feature maps were of the same size as the input."* FC layers and the new conv-layer
are initialised fresh; the other conv-layers come from the backbone.

``assemble(stem, top, head)`` is that transformation, written once for every backbone (and
``make_interpretable(model, layer)`` cuts any ready-made model into the three pieces)::

    image (B,3,H,W) in [0,1]
      -> normalize                       (x - mean) / std
      -> stem                            backbone below its top conv-layer
      -> layers["top"]  = top  + mask    backbone's top conv-layer (ends in a ReLU)  (B,M,h,w)
      -> layers["new"]  = conv3x3(M->M, bias, pad 1) + ReLU + mask                   (B,M,h,w)
      -> head                            pooling / fc layers -> logits (B, num_classes)

The ordinary twin is the same call with ``interpretable=False``: the same modules built in the
same order (so the same seed gives the same parameters), with no masks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from ..mask import PartMask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# head(in_channels, map_size (h, w) of the new layer, num_classes) -> nn.Module
HeadFactory = Callable[[int, tuple[int, int], int], nn.Module]


class ModelError(ValueError):
    """A wrong model argument (unknown arch, image too small, bad layer name); one line."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; images enter every network in ``[0, 1]``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.3f}" for v in t.flatten().tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class FeatureMaps(NamedTuple):
    """What ``InterpretableNet.forward_features`` returns.

    ``relu[name]``: the layer's map after its ReLU, before the mask -- what the filter loss reads
    (paper §3: the loss is on ``x`` after ReLU). ``masked[name]``: after the mask -- what the
    next layer and the metrics read (for the ordinary twin ``masked[name] is relu[name]``).
    ``out``: the last layer's masked map, the head's input.
    """

    relu: dict[str, torch.Tensor]
    masked: dict[str, torch.Tensor]
    out: torch.Tensor


class InterpretableLayer(nn.Module):
    """A conv-layer whose filters are interpretable: ``body`` (ends in a ReLU) then the mask.

    Args:
        body: the conv-layer (e.g. conv + ReLU; for ResNet the whole last stage).
        mask: a ``PartMask``, or ``None`` for the ordinary twin.

    Shape: ``(B, C_in, H, W) -> (relu (B, C, h, w), masked (B, C, h, w))``.
    """

    def __init__(self, body: nn.Module, mask: PartMask | None = None):
        super().__init__()
        self.body = body
        self.mask = mask

    @property
    def interpretable(self) -> bool:
        return self.mask is not None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        relu = self.body(x)
        masked = relu if self.mask is None else self.mask(relu)
        return relu, masked


def chain_layers(layers: nn.ModuleDict, x: torch.Tensor) -> FeatureMaps:
    """``InterpretableLayer`` s in order on ``x``, each reading the previous one's masked map (paper Fig. 2)."""
    relu, masked = {}, {}
    for name, layer in layers.items():
        relu[name], masked[name] = layer(x)  # (B, C, h, w) each
        x = masked[name]
    return FeatureMaps(relu, masked, x)


class InterpretableNet(nn.Module):
    """A CNN whose top conv-layers are interpretable (or its ordinary twin).

    Attributes:
        normalize: ``Normalize`` (images come in ``[0, 1]``).
        stem: the backbone below its top conv-layer.
        layers: ``{"top": InterpretableLayer, "new": InterpretableLayer}``; ``"new"`` is the
            evaluated layer (the paper's top conv-layer after the transformation).
        head: pooling / fc layers -> logits ``(B, num_classes)`` (``(B, 1)`` single-category).
        interpretable: ``False`` for the ordinary twin (no masks).
        num_classes: width of the logits.
        image_size: ``(H, W)`` the head was sized for (other sizes work too: the head pools
            adaptively).
    """

    def __init__(
        self,
        normalize: Normalize,
        stem: nn.Module,
        layers: nn.ModuleDict,
        head: nn.Module,
        *,
        num_classes: int,
        image_size: tuple[int, int],
        arch: str = "custom",
    ):
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.layers = layers
        self.head = head
        self.num_classes = int(num_classes)
        self.image_size = tuple(image_size)
        self.arch = arch

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the feature layers, bottom to top: ``("top", "new")``."""
        return tuple(self.layers.keys())

    @property
    def interpretable_layers(self) -> tuple[str, ...]:
        """Names of the layers whose filters are interpretable (``()`` for the ordinary twin)."""
        return tuple(name for name, layer in self.layers.items() if layer.interpretable)

    @property
    def interpretable(self) -> bool:
        return len(self.interpretable_layers) > 0

    def forward_features(self, x: torch.Tensor) -> FeatureMaps:
        return self.features_from_stem(self.stem(self.normalize(x)))  # (B, 3, H, W) -> stem -> layers

    def features_from_stem(self, x: torch.Tensor) -> FeatureMaps:
        """The interpretable layers on the stem's output (e.g. cached: ``icnn.cache``)."""
        return chain_layers(self.layers, x)

    def forward_head(self, out: torch.Tensor) -> torch.Tensor:
        return self.head(out)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x).out)

    def layer_shapes(self, image_size: int | tuple[int, int] | None = None) -> dict[str, tuple[int, int, int]]:
        """``(C, h, w)`` of every feature layer's map for images of ``image_size`` (no compute)."""
        hw = self.image_size if image_size is None else _pair(image_size)
        # the bodies only: masks keep the size, and the head may not fit every image size
        bodies = OrderedDict((n, layer.body) for n, layer in self.layers.items())
        chain = nn.Sequential(OrderedDict(normalize=self.normalize, stem=self.stem, **bodies))
        shapes = output_shapes(chain, hw, names=list(bodies))
        return {n: tuple(shapes[n]) for n in bodies}

    def map_size(self, image_size: int | tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
        """``(h, w)`` of every feature layer's map for images of ``image_size``."""
        return {n: s[-2:] for n, s in self.layer_shapes(image_size).items()}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, interpretable={self.interpretable}"


def batch_input(batch: dict) -> tuple[torch.Tensor, bool]:
    """What a network reads of a batch of samples, and whether it is the stem's output: the
    stem's outputs when the batch carries them (``stem``: a frozen stem's cache, ``icnn.cache``),
    else its ``image``."""
    return (batch["stem"], True) if "stem" in batch else (batch["image"], False)


def batch_features(model: nn.Module, batch: dict, device: torch.device | str) -> FeatureMaps:
    """``model``'s feature maps of a batch of samples (from the stem's outputs when it has them)."""
    x, from_stem = batch_input(batch)
    return model.features_from_stem(x.to(device)) if from_stem else model.forward_features(x.to(device))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def output_shapes(
    model: nn.Module, image_size: int | tuple[int, int], names: Sequence[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Output shape ``(C, h, w)`` (or ``(F,)``) of named submodules for one image, computed on
    the ``meta`` device: no memory, no FLOPs, parameters untouched.

    Args:
        model: any module taking ``(1, 3, H, W)``.
        image_size: ``H`` or ``(H, W)``.
        names: dotted submodule names (default: the direct children).

    Raises ``ModelError`` when the image is too small for the network.
    """
    h, w = _pair(image_size)
    modules = dict(model.named_modules())
    names = list(names) if names is not None else [n for n, _ in model.named_children()]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in names:
        if name not in modules:
            raise ModelError(f"no layer named {name!r} in {type(model).__name__}")

        def hook(_m, _inp, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            shapes[name] = tuple(out.shape[1:])

        hooks.append(modules[name].register_forward_hook(hook))
    state = {k: torch.empty_like(v, device="meta") for k, v in model.named_parameters()}
    state.update({k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()})
    try:
        with eval_mode(model):  # BatchNorm on a 1x1 map in training mode refuses a batch of one
            functional_call(model, state, (torch.zeros(1, 3, h, w, device="meta"),))
    except RuntimeError as exc:
        raise ModelError(f"image size {h}x{w} is too small for this network: {str(exc).splitlines()[0]}") from None
    finally:
        for handle in hooks:
            handle.remove()
    return shapes


@contextmanager
def eval_mode(*modules: nn.Module):
    """``modules`` in eval mode inside the block; every submodule back in its own mode after it."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def linear_head(*, dropout: float = 0.0, norm: bool = False) -> HeadFactory:
    """Global average pooling + (dropout) + one fc layer (ResNet, EfficientNet, small CNN).

    ``norm=True`` adds a ``BatchNorm1d`` on the pooled features before the fc (see
    ``add_head_norm``).
    """

    def build(in_channels: int, map_size: tuple[int, int], num_classes: int) -> nn.Module:
        fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
        head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),  # (B, C, 1, 1)
                flatten=nn.Flatten(1),  # (B, C)
                drop=nn.Dropout(dropout),
                fc=fc,  # (B, num_classes)
            )
        )
        return add_head_norm(head) if norm else head

    return build


def add_head_norm(head: nn.Module) -> nn.Sequential:
    """``head`` with a ``BatchNorm1d`` named ``norm`` inserted before its first fc layer (and
    before the dropout in front of it).

    Why (issue 9): the part masks zero most of every map, so the pooled features reaching the fc
    layer are ~10x smaller in the interpretable net than in its ordinary twin; with a fresh fc
    initialised at std 0.01 the interpretable twin then barely trains (CUB, EfficientNet-Lite0:
    task loss 0.69 -> 0.66 in 4 epochs). Normalising the fc's input per feature removes the
    scale gap; the ordinary twin gets the same layer, so the twins still differ only by the
    masks and the filter loss. The norm adds no randomness: every other weight is initialised
    exactly as without it.
    """
    if not isinstance(head, nn.Sequential):
        raise ModelError(f"head_norm needs an nn.Sequential head, got {type(head).__name__}")
    children = list(head.named_children())
    at = next((i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)), None)
    if at is None:
        raise ModelError("head_norm needs a head with an nn.Linear layer")
    if any(name == "norm" for name, _ in children):
        raise ModelError("the head already has a layer named 'norm'")
    features = children[at][1].in_features
    while at > 0 and isinstance(children[at - 1][1], nn.Dropout):  # normalise before dropout, as BN-Inception
        at -= 1
    children.insert(at, ("norm", nn.BatchNorm1d(features)))
    return nn.Sequential(OrderedDict(children))


def add_head_hidden(head: nn.Module, width: int) -> nn.Sequential:
    """``head`` with its last fc layer ``fc`` (``D -> K``) replaced by ``hidden`` (``D -> width``),
    ``hidden_relu`` and ``fc`` (``width -> K``): a head that is not linear in the pooled features,
    so that a decision tree over them (``icnn.tree``) sees per-image rationales. ``hidden`` keeps
    PyTorch's default init; the new ``fc`` the head's (normal, std 0.01; zero bias)."""
    if not isinstance(head, nn.Sequential):
        raise ModelError(f"head_hidden needs an nn.Sequential head, got {type(head).__name__}")
    children = list(head.named_children())
    at = max((i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)), default=None)
    if at is None or int(width) < 1:
        raise ModelError(f"head_hidden needs a head with an nn.Linear layer and a width >= 1 (got {width})")
    last = children[at][1]
    fc = nn.Linear(int(width), last.out_features)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    children[at : at + 1] = [("hidden", nn.Linear(last.in_features, int(width))), ("hidden_relu", nn.ReLU()), ("fc", fc)]
    return nn.Sequential(OrderedDict(children))


def fc_head(pool5: nn.Module, *, hidden: int = 4096, dropout: float = 0.5, norm: bool = False) -> HeadFactory:
    """AlexNet/VGG head: pool5 -> fc6 -> ReLU -> drop6 -> fc7 -> ReLU -> drop7 -> fc8.

    fc6's input is sized to pool5's output for the build image size (VGG-16: 7x7 at 224 px,
    2x2 at 64 px); an adaptive average pool to that size lets other image sizes run too (at the
    build size it is the identity). ``norm=True`` adds a ``BatchNorm1d`` before fc6
    (``add_head_norm``).
    """

    def build(in_channels: int, map_size: tuple[int, int], num_classes: int) -> nn.Module:
        ph, pw = _pool_output(pool5, in_channels, map_size)  # pool5's output at the build size
        fcs = [nn.Linear(in_channels * ph * pw, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes)]
        for fc in fcs:  # torchvision's VGG init
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
        head = nn.Sequential(
            OrderedDict(
                pool5=pool5,
                fit=nn.AdaptiveAvgPool2d((ph, pw)),  # (B, C, ph, pw); identity at the build size
                flatten=nn.Flatten(1),
                fc6=fcs[0],
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(dropout),
                fc7=fcs[1],
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(dropout),
                fc8=fcs[2],  # (B, num_classes)
            )
        )
        return add_head_norm(head) if norm else head

    return build


def _pool_output(pool: nn.Module, channels: int, map_size: tuple[int, int]) -> tuple[int, int]:
    try:
        out = pool(torch.zeros(1, channels, *map_size, device="meta"))
    except RuntimeError:
        raise ModelError(f"the top map {map_size} is too small for pool5: use larger images") from None
    return int(out.shape[-2]), int(out.shape[-1])


# ---------------------------------------------------------------------------------------------
# The transformation
# ---------------------------------------------------------------------------------------------


def he_init(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` initialised fresh: He-normal (fan-out), as torchvision's VGG and the original
    MatConvNet code ("xavierimproved") do; bias 0."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def new_conv_layer(channels: int) -> nn.Sequential:
    """The inserted conv-layer: M filters 3x3xM with bias, zero padding 1 (size kept), ReLU;
    initialised fresh (paper §5, :func:`he_init`)."""
    conv = he_init(nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=True))
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))


def assemble(
    stem: nn.Module,
    top: nn.Module,
    head: HeadFactory,
    *,
    num_classes: int,
    interpretable: bool = True,
    image_size: int | tuple[int, int] = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mask: dict | None = None,
    arch: str = "custom",
) -> InterpretableNet:
    """Make a CNN interpretable (paper §5): mask its top conv-layer, add a new masked layer.

    Args:
        stem: the backbone below its top conv-layer (weights kept).
        top: the backbone's top conv-layer, ending in a ReLU (weights kept); its filters become
            interpretable.
        head: builds the head from ``(M, (h, w), num_classes)``; initialised fresh.
        num_classes: logits width; 1 for single-category (logistic) classification.
        interpretable: ``False`` gives the ordinary twin: same modules, same init, no masks.
        image_size: ``H`` or ``(H, W)`` used to size the head.
        mean, std: the network's input normalisation (images come in ``[0, 1]``).
        mask: keyword arguments of ``PartMask`` (``beta``, ``distance``, ``mu``).
        arch: a name for ``repr`` and checkpoints.

    Returns:
        ``InterpretableNet`` with ``layers = {"top": top + mask, "new": conv3x3 + ReLU + mask}``.
    """
    hw = _pair(image_size)
    normalize = Normalize(mean, std)
    shape = output_shapes(nn.Sequential(OrderedDict(normalize=normalize, stem=stem, top=top)), hw, names=["top"])["top"]
    if len(shape) != 3:
        raise ModelError(f"the top conv-layer must output (C, h, w) maps, got {shape}")
    channels, h, w = shape
    mask_kw = dict(mask or {})

    def part_mask() -> PartMask | None:
        return PartMask(**mask_kw) if interpretable else None

    layers = nn.ModuleDict(
        OrderedDict(
            top=InterpretableLayer(top, part_mask()),
            new=InterpretableLayer(new_conv_layer(channels), part_mask()),
        )
    )
    return InterpretableNet(
        normalize, stem, layers, head(channels, (h, w), num_classes),
        num_classes=num_classes, image_size=hw, arch=arch,
    )


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LocalResponseNorm)


def make_interpretable(
    model: nn.Module,
    layer: str,
    *,
    num_classes: int,
    head: HeadFactory | None = None,
    **kwargs,
) -> InterpretableNet:
    """Make a ready-made model (any torchvision or timm classifier) interpretable (paper §5).

    ``layer`` (a dotted module name, as in ``model.named_modules()``) becomes the top conv-layer.
    Everything registered before it along its path is the stem; everything after it is dropped
    and replaced by ``head`` (default: global average pooling + fc). If ``layer`` names a
    ``Conv2d``, the norm/activation modules that follow it in the same container join the top
    layer (``features.28`` of VGG-16 takes ``features.29``, its ReLU); if none is an
    activation, a ReLU is appended. Any other module (a ResNet stage ``layer4``, a
    conv-BN-act block) is taken as is and must end in a ReLU-like activation.

    Limitation: the model's forward must be the chain of its children in registration order
    at every level of ``layer``'s path (true for ``nn.Sequential`` models, torchvision
    VGG/AlexNet/ResNet/MobileNet/EfficientNet). Functional ops in ``forward`` between those
    children (``torch.flatten``, ``F.relu``) and skips around the path are not seen; the stem
    of such a model may not compute what the original does.

    Keyword arguments go to :func:`assemble` (``interpretable``, ``image_size``, ``mean``, ``std``,
    ``mask``, ``arch``). Example: ``make_interpretable(torchvision.models.resnet18(), "layer4",
    num_classes=1)``.
    """
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        raise ModelError(f"no layer named {layer!r} in {type(model).__name__}; see `icnn layers` or model.named_modules()")
    stem: list[tuple[str, nn.Module]] = []
    parent, prefix = model, ""
    parts = layer.split(".")
    for depth, part in enumerate(parts):
        children = list(parent.named_children())
        index = [n for n, _ in children].index(part)
        stem += [(prefix + n, m) for n, m in children[:index]]
        if depth == len(parts) - 1:
            top_mods = [(prefix + part, children[index][1])]
            if isinstance(children[index][1], nn.Conv2d):
                for n, m in children[index + 1 :]:
                    if not isinstance(m, _ACTIVATIONS + _NORMS):
                        break
                    top_mods.append((prefix + n, m))
                if not any(isinstance(m, _ACTIVATIONS) for _, m in top_mods):
                    top_mods.append((prefix + part + "_relu", nn.ReLU()))
        parent, prefix = children[index][1], prefix + part + "."
    clean = lambda items: OrderedDict((n.replace(".", "_"), m) for n, m in items)  # noqa: E731
    return assemble(
        nn.Sequential(clean(stem)), nn.Sequential(clean(top_mods)), head or linear_head(),
        num_classes=num_classes, **kwargs,
    )
