"""Receptive-field geometry: hand-computed values, a gradient probe on every registered backbone,
and hypothesis property tests against a brute-force probe on random conv/pool chains.

The probe: a copy of the network made linear and positive (every conv weight ``1/fan_in``,
bias 0; max-pools -> average pools of the same geometry; activations, BN, LRN -> identity) so
the gradient of one unit w.r.t. the input is strictly positive on every pixel the unit can see
and zero elsewhere. Its support's bounding box must equal the computed receptive-field box
clipped to the part of the image the layer reads at all -- exactly, no tolerance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from icnn.metrics.receptive_field import (
    IDENTITY,
    Geometry,
    GeometryError,
    compose,
    conv_geometry,
    layer_geometry,
    module_geometry,
    unit_centers,
)
from icnn.models import build_model, list_models

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
HEAVY = {"vgg16", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


# --------------------------------------------------------------------------------------------
# The brute-force probe
# --------------------------------------------------------------------------------------------


def linearised(model: nn.Module) -> nn.Module:
    """The network made linear and positive, in place (see the module docstring)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1))
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            elif isinstance(child, (nn.BatchNorm2d, nn.LocalResponseNorm, nn.Dropout)) or (
                type(child).__module__ == "torch.nn.modules.activation"
            ):
                setattr(parent, name, nn.Identity())
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model.eval()


def support_boxes(grad: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` (inclusive) of each image's non-zero gradient."""
    out = []
    for g in grad:  # (3, H, W)
        nz = g.abs().sum(0) > 0
        rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
        out.append((int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())))
    return out


def expected_box(g: Geometry, i: int, j: int, extent) -> tuple[int, int, int, int]:
    """Unit (i, j)'s receptive field in pixel indices, clipped to ``extent``."""
    x0 = g.stride[1] * j + g.offset[1] - (g.size[1] - 1) / 2
    y0 = g.stride[0] * i + g.offset[0] - (g.size[0] - 1) / 2
    box = (x0, y0, x0 + g.size[1] - 1, y0 + g.size[0] - 1)
    assert all(float(v).is_integer() for v in box)
    return (max(box[0], extent[0]), max(box[1], extent[1]), min(box[2], extent[2]), min(box[3], extent[3]))


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------


def test_conv_geometry_by_hand():
    assert conv_geometry(3, 1, 1) == Geometry((1, 1), (0.0, 0.0), (3, 3))
    assert conv_geometry(2, 2, 0) == Geometry((2, 2), (0.5, 0.5), (2, 2))  # 2x2 pool: centre between pixels
    assert conv_geometry(11, 4, 2) == Geometry((4, 4), (3.0, 3.0), (11, 11))
    assert conv_geometry(3, 1, 2, 2) == Geometry((1, 1), (0.0, 0.0), (5, 5))  # dilated, "same"
    assert conv_geometry((1, 3), (1, 2), (0, 1)) == Geometry((1, 2), (0.0, 0.0), (1, 3))


def test_compose_by_hand():
    # VGG block: conv3 p1, conv3 p1, pool2 -> stride 2, RF 6, unit 0 centred on pixel 1.5 -> x = 2.0
    g = compose(conv_geometry(3, 1, 1), conv_geometry(3, 1, 1), conv_geometry(2, 2))
    assert g == Geometry((2, 2), (0.5, 0.5), (6, 6))
    assert compose() == IDENTITY and compose(g) == g and compose(IDENTITY, g, IDENTITY) == g
    assert g.then(conv_geometry(3, 1, 1)) == compose(g, conv_geometry(3, 1, 1)) == Geometry((2, 2), (0.5, 0.5), (10, 10))


def test_unit_centers_and_boxes():
    g = Geometry(stride=(8, 4), offset=(3.5, -1.0), size=(10, 6))
    c = unit_centers(g, 2, 3)  # (h, w, 2) as (x, y)
    assert c.shape == (2, 3, 2)
    assert c[0, 0].tolist() == [-0.5, 4.0]
    assert c[1, 2].tolist() == [-1.0 + 8 + 0.5, 3.5 + 8 + 0.5]
    assert torch.equal(g.unit_centers(2, 3), c)
    b = g.boxes(2, 3)  # (x0, y0, x1, y1)
    assert b[1, 2].tolist() == [7.5 - 3, 12.0 - 5, 7.5 + 3, 12.0 + 5]


@pytest.mark.parametrize(
    "arch, stride, offset, size",
    [
        ("vgg16", 16, 7.5, 228),  # conv5_3 RF 196 (+2*16 for the new 3x3 layer)
        ("alexnet", 16, 15.0, 195),  # conv5 RF 163
        ("vgg_m", 16, 17.0, 171),  # conv5 RF 139
        ("vgg_s", 12, 20.0, 137),  # conv5 RF 113
        ("small_cnn", 8, 3.5, 54),
        ("resnet18", 32, 0.0, 499),  # layer4 RF 435
    ],
)
def test_backbone_geometry_by_hand(arch, stride, offset, size):
    model = build_model(arch, num_classes=2, image_size=64, hidden=8) if arch in {"vgg16", "alexnet", "vgg_m", "vgg_s"} \
        else build_model(arch, num_classes=2, image_size=64)  # fmt: skip
    g = layer_geometry(model, "new")
    assert g == Geometry((stride, stride), (offset, offset), (size, size))
    top = layer_geometry(model, "top")  # the new 3x3 layer adds one unit each side
    assert top.stride == g.stride and top.offset == g.offset and top.size[0] == size - 2 * stride
    assert layer_geometry(model, "layers.new.body.conv") == g  # dotted names too


def test_geometry_errors():
    model = build_model("small_cnn", num_classes=2)
    with pytest.raises(GeometryError, match="no layer named"):
        layer_geometry(model, "nope")
    with pytest.raises(GeometryError, match="AdaptiveAvgPool2d"):
        layer_geometry(model, "head.pool")

    class Warp(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(GeometryError, match="Warp"):
        module_geometry(nn.Sequential(nn.Conv2d(1, 1, 3), Warp()))


# --------------------------------------------------------------------------------------------
# Gradient probe on every registered backbone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in list_models()]
)
def test_gradient_probe_matches_geometry(arch):
    size = 64  # the smallest size every backbone supports with a top map of 2x2 or more
    torch.manual_seed(0)
    model = build_model(arch, num_classes=2, interpretable=False, image_size=size)
    geom = layer_geometry(model, "new")
    h, w = model.map_size(size)["new"]
    units = sorted({(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w - 1)})
    probe = linearised(model)
    # one backward pass: image k carries unit k's gradient; the last image carries the whole map
    x = torch.ones(len(units) + 1, 3, size, size, requires_grad=True)
    out = probe.forward_features(x).relu["new"]  # (N, C, h, w)
    total = sum(out[k, :, i, j].sum() for k, (i, j) in enumerate(units)) + out[-1].sum()
    (grad,) = torch.autograd.grad(total, x)
    boxes = support_boxes(grad)
    extent = boxes[-1]  # the pixels the layer reads at all (VGG-M/S never read the last column)
    for (i, j), box in zip(units, boxes):
        assert box == expected_box(geom, i, j, extent), (arch, (i, j))


def test_probe_on_units_far_from_the_border():
    """small_cnn at 64 px: units whose RF lies inside the image have their exact centre."""
    model = build_model("small_cnn", num_classes=2, interpretable=False)
    g = layer_geometry(model, "new")
    probe = linearised(model)
    x = torch.ones(1, 3, 64, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(probe.forward_features(x).relu["new"][0, :, 3, 4].sum(), x)
    x0, y0, x1, y1 = support_boxes(grad)[0]
    centre = unit_centers(g, 8, 8)[3, 4].tolist()
    assert (x1 - x0 + 1, y1 - y0 + 1) == g.size  # not clipped
    assert [(x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2] == centre == [36.0, 28.0]


def test_probe_on_a_torchvision_model_by_dotted_name():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    g = layer_geometry(model, "layer2.0.conv2")  # inside a block with a downsample shortcut
    assert g == compose(module_geometry(nn.Sequential(model.conv1, model.maxpool, model.layer1)),
                        conv_geometry(3, 2, 1), conv_geometry(3, 1, 1))  # fmt: skip
    stem = linearised(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2))
    x = torch.ones(2, 3, 96, 96, requires_grad=True)
    out = stem(x)  # (2, 128, 12, 12)
    (grad,) = torch.autograd.grad(out[0, :, 5, 6].sum() + out[1].sum(), x)
    box, extent = support_boxes(grad)
    assert box == expected_box(layer_geometry(model, "layer2"), 5, 6, extent)


# --------------------------------------------------------------------------------------------
# Property tests: random conv/pool chains against the brute-force probe
# --------------------------------------------------------------------------------------------


@st.composite
def chains(draw):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, 4))
        s = draw(st.integers(1, 3))
        if draw(st.booleans()):
            d = draw(st.integers(1, 2))
            layers.append(nn.Conv2d(1, 1, k, stride=s, padding=draw(st.integers(0, (k - 1) * d)), dilation=d))
        else:
            layers.append(nn.MaxPool2d(k, stride=s, padding=draw(st.integers(0, k // 2)), ceil_mode=draw(st.booleans())))
    return nn.Sequential(*layers)


def _output_size(chain: nn.Sequential, n: int) -> int:
    try:
        with torch.no_grad():
            return chain(torch.zeros(1, 1, n, n)).shape[-1]
    except RuntimeError:  # the image is too small for the chain
        return 0


@settings(max_examples=60, deadline=None)
@given(chain=chains(), extra=st.integers(0, 12))
def test_geometry_matches_brute_force_probe(chain, extra):
    g = module_geometry(chain)
    assert g == compose(*(module_geometry(m) for m in chain))
    n = g.size[0] + g.stride[0] * 2 + extra  # big enough for units whose RF is inside the image
    h = _output_size(chain, n)
    if h < 1:
        return
    probe = linearised(copy.deepcopy(chain)).double()
    x = torch.ones(h * h, 1, n, n, dtype=torch.float64, requires_grad=True)
    out = probe(x)  # (h*h, 1, h, w)
    idx = torch.arange(h * h)
    (grad,) = torch.autograd.grad(out[idx, 0, idx // h, idx % h].sum(), x)
    checked = 0
    for k in range(h * h):
        i, j = divmod(k, h)
        box = expected_box(g, i, j, (-10**9, -10**9, 10**9, 10**9))
        if box[0] < 0 or box[1] < 0 or box[2] > n - 1 or box[3] > n - 1:
            continue  # clipped by padding: only the unclipped extremes are exact with strided holes
        assert support_boxes(grad[k : k + 1])[0] == box
        centre = unit_centers(g, h, h)[i, j].tolist()
        assert centre == [(box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2]
        checked += 1
    assert checked > 0


@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2)), min_size=3, max_size=3
    )
)
def test_compose_is_associative(params):
    a, b, c = (conv_geometry(k, s, p, d) for k, s, p, d in params)
    assert compose(compose(a, b), c) == compose(a, compose(b, c)) == compose(a, b, c)
