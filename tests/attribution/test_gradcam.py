"""Grad-CAM on the hand-weighted net (exact values), vs Captum, layer lookup and its errors."""

import pytest
import torch
import torch.nn.functional as F
from captum import attr as captum
from torch import nn

from icnn.attribution import AttributionError, GradCAM

from .nets import HAND_IMAGE, HandNet, SmallCNN


def test_gradcam_hand_values_on_the_conv_layer():
    # class 1: dS/dA = 0.5 * 0.25 * [A_pre > 0] -> mean 1/32; dS/dB = 0.25 * [B_pre > 0] -> mean 1/8
    # L = ReLU(A_pre / 32 + B_pre / 8) = ReLU([[-9/32, 7/32], [9/32, -3/16]])
    cam = GradCAM(HandNet(), "conv")(HAND_IMAGE)
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.21875], [0.28125, 0.0]]]), rtol=0, atol=0)


def test_gradcam_hand_values_on_the_relu_layer():
    # after the ReLU the gradients are constant: 0.125 for A, 0.25 for B
    # L = ReLU(0.125 * [[0,0],[1,0]] + 0.25 * [[0,2],[2,0]])
    net = HandNet()
    cam = GradCAM(net, net.relu)(HAND_IMAGE, target=1)
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.5], [0.625, 0.0]]]), rtol=0, atol=0)


def test_gradcam_hand_values_class_0():
    # class 0 on the conv layer: dS/dA = 0.25 [A_pre > 0] -> mean 1/16; dS/dB = -0.25 [B_pre > 0]
    # -> mean -1/8; L = ReLU(A_pre / 16 - B_pre / 8) = ReLU([[3/16, -5/16], [-3/16, 0]])
    cam = GradCAM(HandNet(), "conv")(HAND_IMAGE, target=0)
    torch.testing.assert_close(cam, torch.tensor([[[0.1875, 0.0], [0.0, 0.0]]]), rtol=0, atol=0)


def test_gradcam_equals_captum_and_names_equal_modules(cnn, images):
    target = torch.tensor([1, 2, 0])
    ours = GradCAM(cnn, "features.4")(images, target=target)
    same = GradCAM(cnn, cnn.features[4])(images, target=target)
    ref = captum.LayerGradCam(cnn, cnn.features[4]).attribute(images, target=target, relu_attributions=True)
    assert ours.shape == (3, 8, 8)
    torch.testing.assert_close(ours, ref[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(same, ours, rtol=0, atol=0)


def test_gradcam_upsample_is_bilinear_and_normalize_is_per_sample(cnn, images):
    cam = GradCAM(cnn, "features.4")
    raw = cam(images)
    up = cam(images, upsample=True, normalize=True)
    expected = F.interpolate(raw[:, None], size=(16, 16), mode="bilinear")[:, 0]
    lo, hi = expected.amin((1, 2), keepdim=True), expected.amax((1, 2), keepdim=True)
    torch.testing.assert_close(up, (expected - lo) / (hi - lo))
    assert up.shape == (3, 16, 16)


def test_inplace_relu_after_the_layer_does_not_change_the_cam(images):
    inplace, plain = SmallCNN().eval(), SmallCNN().eval()
    plain.features[5].inplace = False
    torch.testing.assert_close(GradCAM(inplace, "features.4")(images), GradCAM(plain, "features.4")(images))


def test_missing_layer_names_the_name_and_suggests():
    message = r"layer: no submodule named 'featurs.4' in SmallCNN; did you mean 'features.4'"
    with pytest.raises(AttributionError, match=message):
        GradCAM(SmallCNN(), "featurs.4")


def test_foreign_module_is_rejected():
    with pytest.raises(AttributionError, match="layer: the given Conv2d is not a submodule"):
        GradCAM(SmallCNN(), nn.Conv2d(3, 3, 1))


def test_layer_not_called_in_forward(images):
    net = SmallCNN().eval()
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(AttributionError, match="layer: 'unused' is not called"):
        GradCAM(net, "unused")(images)


def test_layer_with_a_flat_output_is_rejected(images):
    with pytest.raises(AttributionError, match=r"layer: 'classifier' must output one \(B, K, h, w\) tensor"):
        GradCAM(SmallCNN().eval(), "classifier")(images)
