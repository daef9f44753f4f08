"""Activation maximisation (survey Eq. 5): it raises the target, finds a known optimum, and is
bit-reproducible per seed."""

import pytest
import torch
from torch import nn

from icnn.attribution import ActivationMaximization, ActMaxConfig, AttributionError

from .nets import SmallCNN

CFG = ActMaxConfig(image_size=(16, 16), steps=30)
ROBUST = ActMaxConfig(image_size=(16, 16), steps=20, jitter=2, scale=(0.9, 1.1), blur_every=4)


class RedMinusGreen(nn.Module):
    """logits = (mean(r - g), mean(g - r)); the best image for class 0 is pure red."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])[:, :, None, None])

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_finds_the_known_optimum_of_a_class_logit():
    cfg = ActMaxConfig(image_size=(8, 8), steps=40, l2=0.0)
    r = ActivationMaximization(RedMinusGreen(), config=cfg)(target=[0, 1])
    torch.testing.assert_close(r.final, torch.ones(2), atol=1e-3, rtol=0)  # the maximum, 1
    assert (r.initial.abs() < 0.1).all()
    red, green = r.image[0, 0], r.image[0, 1]
    assert red.min() > 0.999 and green.max() < 0.001
    assert r.image[1, 1].min() > 0.999 and r.image[1, 0].max() < 0.001


def test_l2_pulls_towards_grey():
    # per pixel: d/dr [mean(r - g)] = 1/64 against 2 * l2 * (r - 0.5): the optimum is r - 0.5 = 1/(128 l2)
    cfg = ActMaxConfig(image_size=(8, 8), steps=300, lr=0.01, l2=0.05, jitter=0)
    r = ActivationMaximization(RedMinusGreen(), config=cfg)(target=0)
    blue = r.image[0, 2]  # no gradient from the net: only the penalty, towards 0.5
    torch.testing.assert_close(r.image[0, 0], torch.full((8, 8), 0.5 + 1 / 6.4), atol=2e-3, rtol=0)
    torch.testing.assert_close(r.image[0, 1], torch.full((8, 8), 0.5 - 1 / 6.4), atol=2e-3, rtol=0)
    assert (blue - 0.5).abs().max() < 0.01


@pytest.mark.parametrize("cfg", [CFG, ROBUST], ids=["plain", "jitter_scale_blur"])
def test_raises_filter_activation(cfg):
    r = ActivationMaximization(SmallCNN().eval(), "features.4", config=cfg)([3, 15], seed=0)
    assert r.image.shape == (2, 3, 16, 16) and r.history.shape == (cfg.steps, 2)
    assert r.image.min() >= 0 and r.image.max() <= 1
    assert (r.final > r.initial + 0.08).all(), (r.initial, r.final)


def test_raises_one_unit():
    # pre-ReLU (a dead ReLU unit has no gradient); no jitter, which would move the unit's field
    cfg = ActMaxConfig(image_size=(16, 16), steps=30, jitter=0)
    act = ActivationMaximization(SmallCNN().eval(), "features.4", config=cfg)
    r = act(2, unit=(3, 4))
    assert r.final.item() > r.initial.item() + 0.5


def test_bit_reproducible_per_seed():
    act = ActivationMaximization(SmallCNN().eval(), "features.4", config=ROBUST)
    a, b, c = act([0, 5], seed=7), act([0, 5], seed=7), act([0, 5], seed=8)
    assert torch.equal(a.image, b.image) and torch.equal(a.history, b.history) and torch.equal(a.final, b.final)
    assert not torch.equal(a.image, c.image)


def test_dataparallel_and_module_layer_give_the_same_result():
    net = SmallCNN().eval()
    a = ActivationMaximization(net, "features.4", config=ROBUST)(1)
    b = ActivationMaximization(nn.DataParallel(net), net.features[4], config=ROBUST)(1)
    assert torch.equal(a.image, b.image)


@pytest.mark.parametrize(
    "layer, kwargs, message",
    [
        ("features.4", {}, "channel/target: give channel= with a layer"),
        (None, {"channel": 1}, "channel/target: give channel= with a layer"),
        ("features.4", {"channel": 1, "target": 1}, "channel/target"),
        ("features.4", {"channel": 16}, "channel: index out of range for a layer with 16 channels"),
        ("features.4", {"channel": -1}, "expected non-negative indices"),
        ("features.4", {"channel": 1, "unit": (8, 0)}, r"unit: \(8, 0\) outside the layer's \(8, 8\) map"),
        (None, {"target": 5}, "target: class index out of range"),
        ("classifier", {"channel": 0}, r"layer: must be called in the forward pass and output one \(B, K, h, w\)"),
    ],
)
def test_bad_requests_are_one_clear_error(layer, kwargs, message):
    act = ActivationMaximization(SmallCNN().eval(), layer, config=ActMaxConfig(image_size=(16, 16), steps=1))
    with pytest.raises(AttributionError, match=message):
        act(**kwargs)
