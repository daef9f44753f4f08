"""Every registered backbone, both twins: forward + backward, identical parameters, masks, the
new layer of paper §5; plus the heads, map sizes, errors and ``make_interpretable``."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from icnn import PartMask
from icnn.models import (
    add_head_hidden,
    MODELS,
    FeatureMaps,
    InterpretableNet,
    ModelError,
    add_head_norm,
    build_model,
    fc_head,
    list_models,
    assemble,
    make_interpretable,
    register_model,
)
from icnn.models.net import linear_head

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
HEAVY = {"vgg16", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
SIZE = 64  # every backbone runs at 64 px (top maps 2x2 .. 8x8)


def test_registry_lists_every_backbone():
    assert set(list_models()) >= {
        "alexnet", "vgg_m", "vgg_s", "vgg16", "resnet18", "resnet50",
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "small_cnn",
    }  # fmt: skip


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in list_models()])
def test_backbone_twins(arch):
    torch.manual_seed(0)
    net = build_model(arch, num_classes=3, interpretable=True, image_size=SIZE)
    torch.manual_seed(0)
    twin = build_model(arch, num_classes=3, interpretable=False, image_size=SIZE)
    assert isinstance(net, InterpretableNet) and net.arch == arch and net.num_classes == 3

    # the ordinary twin: same modules, same parameters for the same seed, no masks
    a, b = net.state_dict(), twin.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert net.layer_names == twin.layer_names == ("top", "new")
    assert net.interpretable_layers == ("top", "new") and twin.interpretable_layers == ()
    assert isinstance(net.layers["new"].mask, PartMask) and twin.layers["top"].mask is None

    # the new conv-layer (paper §5): M filters 3x3xM with bias, zero padding keeping the size
    conv = net.layers["new"].body.conv
    hw = net.map_size(SIZE)
    m = conv.in_channels
    assert (conv.out_channels, conv.kernel_size, conv.padding, conv.stride) == (m, (3, 3), (1, 1), (1, 1))
    assert conv.bias is not None and conv.padding_mode == "zeros"
    assert hw["top"] == hw["new"] and min(hw["new"]) >= 2

    x = torch.rand(2, 3, SIZE, SIZE)
    for model in (net, twin):
        feats = model.forward_features(x)
        assert isinstance(feats, FeatureMaps)
        assert feats.relu["top"].shape == feats.masked["new"].shape == (2, m, *hw["new"])
        assert feats.out is feats.masked["new"]
        logits = model.forward_head(feats.out)
        assert logits.shape == (2, 3)
        (logits.sum() + feats.relu["top"].mean() + feats.relu["new"].mean()).backward()
        first = next(p for p in model.stem.parameters())
        assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
        assert all(p.grad is not None for p in model.layers.parameters())

    feats = twin.forward_features(x)
    assert all(feats.masked[k] is feats.relu[k] for k in ("top", "new"))
    feats = net.forward_features(x)
    for k in ("top", "new"):
        assert (feats.relu[k] >= 0).all()
        torch.testing.assert_close(feats.masked[k], PartMask()(feats.relu[k]))


def test_single_category_head_and_forward():
    net = build_model("small_cnn", num_classes=1).eval()
    x = torch.rand(3, 3, 64, 64)
    assert net(x).shape == (3, 1)
    torch.testing.assert_close(net(x), net.forward_head(net.forward_features(x).out))


def test_normalize_constants():
    assert build_model("resnet18", num_classes=1, image_size=64).normalize.mean.flatten().tolist() == pytest.approx(
        [0.485, 0.456, 0.406]
    )
    lite = build_model("efficientnet_lite0", num_classes=1, image_size=64)
    assert lite.normalize.mean.flatten().tolist() == [0.5] * 3 and lite.normalize.std.flatten().tolist() == [0.5] * 3
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(lite.normalize(x), (x - 0.5) / 0.5)


@pytest.mark.parametrize(
    "arch, size, channels, pool5",
    [("vgg16", 64, 512, 2), ("vgg16", 112, 512, 3), ("vgg_m", 224, 512, 6), ("vgg_s", 224, 512, 6),
     ("alexnet", 224, 256, 6), ("alexnet", 64, 256, 1)],
)  # fmt: skip
def test_fc_head_sized_to_image(arch, size, channels, pool5):
    net = build_model(arch, num_classes=2, image_size=size, hidden=8)  # small fc7 keeps the test fast
    assert net.head.fc6.in_features == channels * pool5 * pool5
    assert net.head.fc6.out_features == 8 and net.head.fc8.out_features == 2
    assert [type(m).__name__ for m in net.head][:3] == ["MaxPool2d", "AdaptiveAvgPool2d", "Flatten"]


def test_head_runs_at_other_image_sizes():
    net = build_model("vgg16", num_classes=2, image_size=64, hidden=8).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 96, 96)).shape == (1, 2)  # the adaptive pool fits pool5 to fc6
    assert net.map_size(96) == {"top": (6, 6), "new": (6, 6)} and net.map_size() == {"top": (4, 4), "new": (4, 4)}


def test_map_size_matches_forward():
    net = build_model("small_cnn", num_classes=2)
    feats = net.forward_features(torch.rand(1, 3, 80, 48))
    assert net.map_size((80, 48)) == {k: tuple(v.shape[-2:]) for k, v in feats.masked.items()} == {
        "top": (10, 6), "new": (10, 6)
    }  # fmt: skip


def test_errors():
    with pytest.raises(ModelError, match="unknown arch 'vgg99'"):
        build_model("vgg99", num_classes=2)
    with pytest.raises(ModelError, match="too small"):
        build_model("vgg_m", num_classes=2, image_size=24, hidden=8)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="small_cnn")
    assert "small_cnn" in MODELS


def test_mask_options_reach_the_layers():
    net = build_model("small_cnn", num_classes=2, mask=dict(beta=2.0, distance="l2", mu="centroid"))
    m = net.layers["top"].mask
    assert (m.beta, m.distance, m.mu) == (2.0, "l2", "centroid")


def test_make_interpretable_by_hand():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    top = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    net = assemble(stem, top, linear_head(), num_classes=5, image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert net.map_size() == {"top": (8, 8), "new": (8, 8)}
    assert net.layers["new"].body.conv.weight.shape == (6, 6, 3, 3)
    assert net.head.fc.weight.shape == (5, 6)
    x = torch.rand(2, 3, 16, 16)
    feats = net.forward_features(x)
    relu_top = top(stem(x))
    torch.testing.assert_close(feats.relu["top"], relu_top)
    torch.testing.assert_close(feats.masked["top"], PartMask()(relu_top))


def test_make_interpretable_torchvision_resnet():
    tv = torchvision.models.resnet18(weights=None).eval()
    net = make_interpretable(tv, "layer4", num_classes=2, image_size=64).eval()
    assert [n for n, _ in net.stem.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    x = torch.rand(1, 3, 64, 64)
    grabbed = {}
    handle = tv.layer4.register_forward_hook(lambda m, i, o: grabbed.setdefault("layer4", o))
    try:
        with torch.no_grad():
            tv(torchvision.transforms.functional.normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
            feats = net.forward_features(x)
    finally:
        handle.remove()
    torch.testing.assert_close(feats.relu["top"], grabbed["layer4"])
    assert net(x).shape == (1, 2)


def test_make_interpretable_conv_takes_its_relu():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 10),
    ))  # fmt: skip
    net = make_interpretable(model, "features.2", num_classes=3, image_size=16)
    assert [type(m).__name__ for m in net.layers["top"].body] == ["Conv2d", "ReLU"]
    assert [type(m).__name__ for m in net.stem] == ["Conv2d", "ReLU"]
    assert net.map_size() == {"top": (16, 16), "new": (16, 16)}
    # a conv without a following activation gets a ReLU appended
    bare = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3))
    net = make_interpretable(bare, "1", num_classes=2, image_size=16)
    assert [type(m).__name__ for m in net.layers["top"].body] == ["Conv2d", "ReLU"]
    with pytest.raises(ModelError, match="no layer named 'features.9'"):
        make_interpretable(model, "features.9", num_classes=2)


def test_map_size_keeps_train_and_eval_modes():
    net = build_model("small_cnn", num_classes=2).eval()
    net.head.train()
    net.map_size(32)
    assert not net.training and not net.stem.training and not net.layers.training and net.head.training


@pytest.mark.parametrize("arch", ["small_cnn", "efficientnet_lite0"])
def test_head_norm_sits_before_dropout_and_fc_and_changes_no_other_weight(arch):
    if arch.startswith("efficientnet"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=1, image_size=SIZE)
    torch.manual_seed(0)
    normed = build_model(arch, num_classes=1, image_size=SIZE, head_norm=True)
    names = [n for n, _ in normed.head.named_children()]
    assert names == ["pool", "flatten", "norm", "drop", "fc"]
    a, b = plain.state_dict(), normed.state_dict()
    assert set(b) - set(a) == {f"head.norm.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert all(torch.equal(a[k], b[k]) for k in a)  # the norm draws no random numbers
    # in eval mode with fresh statistics (mean 0, var 1) the norm is the identity: same logits
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(normed.eval()(x), plain.eval()(x), atol=1e-4, rtol=1e-4)


def test_head_norm_on_the_vgg_head_goes_before_fc6():
    head = fc_head(nn.MaxPool2d(2), hidden=8, dropout=0.5, norm=True)(4, (4, 4), 3)
    names = [n for n, _ in head.named_children()]
    assert names[names.index("flatten") + 1 : names.index("flatten") + 3] == ["norm", "fc6"]
    assert head.norm.num_features == 4 * 2 * 2
    # a (B, C*h*w) batch: training-mode BatchNorm1d makes every fc6 input feature zero-mean, unit-variance
    x = torch.randn(16, 4, 4, 4) * 5 + 3
    z = head.norm(head.flatten(head.fit(head.pool5(x))))
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_head_norm_errors():
    with pytest.raises(ModelError, match="nn.Sequential head"):
        add_head_norm(nn.Linear(3, 1))
    with pytest.raises(ModelError, match="nn.Linear"):
        add_head_norm(nn.Sequential(nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(ModelError, match="already has a layer named 'norm'"):
        add_head_norm(add_head_norm(linear_head()(4, (2, 2), 1)))



def test_head_hidden_replaces_the_output_layer_and_is_exact_by_hand():
    torch.manual_seed(0)
    plain = build_model("small_cnn", num_classes=1, image_size=SIZE, head_norm=True)
    torch.manual_seed(0)
    hidden = build_model("small_cnn", num_classes=1, image_size=SIZE, head_norm=True, head_hidden=3)
    assert [n for n, _ in hidden.head.named_children()] == ["pool", "flatten", "norm", "drop", "hidden", "hidden_relu", "fc"]
    a, b = plain.state_dict(), hidden.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))  # the backbone is untouched
    d = hidden.head.hidden.in_features
    with torch.no_grad():  # by hand: y = fc(relu(W z + c)) on the pooled (and normed) features z
        hidden.head.hidden.weight.zero_()
        hidden.head.hidden.weight[0, 0], hidden.head.hidden.weight[1, 0] = 1.0, -1.0
        hidden.head.hidden.bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
        hidden.head.fc.weight.copy_(torch.tensor([[3.0, 5.0, 0.5]]))
        hidden.head.fc.bias.fill_(-1.0)
    z = torch.tensor([[2.0] + [0.0] * (d - 1), [-4.0] + [0.0] * (d - 1)])
    tail = nn.Sequential(hidden.head.hidden, hidden.head.hidden_relu, hidden.head.fc)
    torch.testing.assert_close(tail(z), torch.tensor([[3 * 2 + 0.5 * 2 - 1.0], [5 * 4 + 0.5 * 2 - 1.0]]))
    with pytest.raises(ModelError, match="head_hidden needs an nn.Sequential head"):
        add_head_hidden(nn.Linear(3, 1), 4)
    with pytest.raises(ModelError, match="width >= 1"):
        add_head_hidden(linear_head()(4, (2, 2), 1), 0)
