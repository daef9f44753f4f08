"""Receptive-field geometry of a unit of any layer (paper §5.2, SPEC §5), from the network's
own convolutions and poolings, padding included.

Coordinates (docs/DESIGN.md): continuous pixel coordinates, pixel ``p`` covers ``[p, p+1)``.
A chain of layers maps unit ``j`` (along one axis) to the input pixels::

    first pixel   a_j = stride * j + offset - (size - 1) / 2
    last pixel    b_j = a_j + size - 1                  (pixel indices; may lie in the padding)
    centre        x_j = offset + stride * j + 0.5       (continuous; the middle of [a_j, b_j + 1))

so ``offset`` is the (possibly half-integer) pixel index at the centre of unit 0's receptive
field, ``stride`` the distance between neighbouring units, ``size`` the receptive field's width.
One layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` has::

    stride = s,  offset = (k - 1) * d / 2 - p,  size = (k - 1) * d + 1

and composing ``g1`` (input -> a) with ``g2`` (a -> b) gives::

    stride = s1 * s2,  offset = o1 + s1 * o2,  size = r1 + (r2 - 1) * s1

Poolings count like convolutions (``ceil_mode`` only changes how many units there are);
normalisations, activations, dropout and the part mask are pointwise. Residual blocks count by
their main path (ResNet ``BasicBlock``/``Bottleneck``, timm EfficientNet blocks): the shortcut's
receptive field lies inside the main path's. The receptive field is the *theoretical* one: the
box of all pixels that can influence the unit (tests check it against a gradient probe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "GEOMETRY_RULES",
    "Geometry",
    "GeometryError",
    "IDENTITY",
    "compose",
    "conv_geometry",
    "layer_geometry",
    "module_geometry",
    "unit_centers",
]


class GeometryError(ValueError):
    """The geometry of a module cannot be derived (non-local or unknown operation)."""


@dataclass(frozen=True)
class Geometry:
    """Receptive-field geometry of a layer's units, per axis ``(y, x)``.

    Attributes:
        stride: ``(sy, sx)`` pixels between neighbouring units.
        offset: ``(oy, ox)`` pixel index at the centre of unit ``(0, 0)``'s receptive field.
        size: ``(ry, rx)`` receptive-field size in pixels.
    """

    stride: tuple[int, int] = (1, 1)
    offset: tuple[float, float] = (0.0, 0.0)
    size: tuple[int, int] = (1, 1)

    def unit_centers(self, h: int, w: int) -> torch.Tensor:
        """Centres of all units of an ``h x w`` map: ``(h, w, 2)`` as ``(x, y)``."""
        return unit_centers(self, h, w)

    def boxes(self, h: int, w: int) -> torch.Tensor:
        """Receptive-field boxes ``(x0, y0, x1, y1)`` (continuous, not clipped to the image)
        of all units of an ``h x w`` map: ``(h, w, 4)``."""
        c = unit_centers(self, h, w)  # (h, w, 2)
        half = torch.tensor([self.size[1], self.size[0]], dtype=c.dtype) / 2
        return torch.cat((c - half, c + half), dim=-1)

    def then(self, other: Geometry) -> Geometry:
        """This geometry followed by ``other`` (``compose(self, other)``)."""
        return compose(self, other)


IDENTITY = Geometry()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_geometry(kernel_size, stride=1, padding=0, dilation=1) -> Geometry:
    """Geometry of one convolution or pooling (ints or ``(y, x)`` pairs)."""
    k, s, p, d = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    return Geometry(
        stride=s,
        offset=tuple((k[a] - 1) * d[a] / 2 - p[a] for a in range(2)),
        size=tuple((k[a] - 1) * d[a] + 1 for a in range(2)),
    )


def compose(*geometries: Geometry) -> Geometry:
    """Geometry of a chain of layers, first to last (``compose()`` is the identity)."""
    g = IDENTITY
    for h in geometries:
        g = Geometry(
            stride=tuple(g.stride[a] * h.stride[a] for a in range(2)),
            offset=tuple(g.offset[a] + g.stride[a] * h.offset[a] for a in range(2)),
            size=tuple(g.size[a] + (h.size[a] - 1) * g.stride[a] for a in range(2)),
        )
    return g


def unit_centers(geom: Geometry, h: int, w: int) -> torch.Tensor:
    """``(h, w, 2)`` centres ``(x, y)`` of unit ``(i, j)``: ``(ox + sx*j + 0.5, oy + sy*i + 0.5)``."""
    sy, sx = geom.stride
    oy, ox = geom.offset
    y = oy + sy * torch.arange(h, dtype=torch.float32) + 0.5  # (h,)
    x = ox + sx * torch.arange(w, dtype=torch.float32) + 0.5  # (w,)
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2)


# ---------------------------------------------------------------------------------------------
# Walking a network's modules
# ---------------------------------------------------------------------------------------------

# Children that are not on the main path of a block (shortcuts, squeeze-excitation).
SKIP_CHILDREN = frozenset({"downsample", "shortcut", "skip", "se", "attn"})

# Leaf modules that act on each unit alone (by class; plus every torch.nn activation).
POINTWISE = (
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.GroupNorm, nn.LocalResponseNorm,
    nn.InstanceNorm2d,
)  # fmt: skip
POINTWISE_NAMES = frozenset({"PartMask", "Normalize", "DropPath", "Swish", "HardSwish", "HardSigmoid", "GELUTanh"})

# User hook: GEOMETRY_RULES[MyBlock] = lambda module: Geometry(...)
GEOMETRY_RULES: dict[type, Callable[[nn.Module], Geometry]] = {}


def module_geometry(module: nn.Module) -> Geometry:
    """Geometry of a whole module: its main path, children composed in registration order."""
    rule = GEOMETRY_RULES.get(type(module))
    if rule is not None:
        return rule(module)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and "Same" in type(module).__name__:
        # timm's Conv2dSame / MaxPool2dSame pad by the input size (TF "SAME")
        raise GeometryError(f"{type(module).__name__} pads depending on the input size: register a rule")
    if isinstance(module, nn.Conv2d):
        return _conv_module(module)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        dilation = getattr(module, "dilation", 1)
        return conv_geometry(module.kernel_size, module.stride or module.kernel_size, module.padding, dilation)
    if isinstance(module, POINTWISE) or type(module).__name__ in POINTWISE_NAMES:
        return IDENTITY
    if type(module).__module__ == "torch.nn.modules.activation":
        return IDENTITY
    children = [(n, c) for n, c in module.named_children() if n not in SKIP_CHILDREN]
    if not children:
        raise GeometryError(
            f"unknown receptive-field geometry of {type(module).__name__} (not a conv/pool/pointwise "
            "module): register one in icnn.metrics.receptive_field.GEOMETRY_RULES"
        )
    return compose(*(module_geometry(c) for _, c in children))


def _conv_module(conv: nn.Conv2d) -> Geometry:
    padding = conv.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":  # torch pads (d*(k-1))//2 on the left/top
        padding = tuple((d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return conv_geometry(conv.kernel_size, conv.stride, padding, conv.dilation)


def layer_geometry(model: nn.Module, layer: str) -> Geometry:
    """Geometry of the units of ``layer``'s output, from the input image.

    Args:
        model: an ``InterpretableNet`` (``layer`` in ``model.layer_names``, e.g. ``"new"``) or any
            module whose forward is the chain of its children in registration order along
            ``layer``'s path (dotted name, e.g. ``"features.28"``, ``"layer4.1.conv2"``).
        layer: the layer name.
    """
    path = f"layers.{layer}" if layer in getattr(model, "layer_names", ()) else layer
    modules = dict(model.named_modules())
    if not path or path not in modules:
        raise GeometryError(f"no layer named {layer!r} in {type(model).__name__}")
    return _prefix_geometry(model, path.split("."))


def _prefix_geometry(module: nn.Module, parts: list[str]) -> Geometry:
    """Geometry from ``module``'s input to the output of its descendant ``parts``."""
    if not parts:
        return module_geometry(module)
    g = IDENTITY
    for name, child in module.named_children():
        if name == parts[0]:
            return compose(g, _prefix_geometry(child, parts[1:]))
        if name not in SKIP_CHILDREN:
            g = compose(g, module_geometry(child))
    raise GeometryError(f"no child {parts[0]!r} in {type(module).__name__}")
