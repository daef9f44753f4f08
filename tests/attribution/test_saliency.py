"""Saliency maps (survey Eq. 6-7) on the hand-weighted net: exact values, and equal to Captum."""

import pytest
import torch
from captum import attr as captum

from icnn.attribution import AttributionError, Saliency

from .nets import HAND_IMAGE, HandNet

# d logit1 / dI: zero except pixel (0,1): (0, 0.5, 0) and pixel (1,0): (0.125, 0.5, -0.125);
# d logit0 / dI: pixel (0,1): (0, -0.5, 0), pixel (1,0): (0.25, -0.5, -0.25). max_c |.|:
HAND_SALIENCY = torch.tensor([[0.0, 0.5], [0.5, 0.0]])


@pytest.mark.parametrize("relu", ["module", "inplace", "functional"])
@pytest.mark.parametrize("target", [None, 1, 0])
def test_saliency_hand_values(relu, target):
    sal = Saliency(HandNet(relu))(HAND_IMAGE, target=target)
    assert sal.shape == (1, 2, 2)
    torch.testing.assert_close(sal[0], HAND_SALIENCY, rtol=0, atol=0)


def test_saliency_normalize_and_upsample_flags():
    sal = Saliency(HandNet())(HAND_IMAGE, normalize=True, upsample=True)
    torch.testing.assert_close(sal[0], HAND_SALIENCY * 2, rtol=0, atol=0)  # max 0.5 -> 1


def test_saliency_equals_captum(cnn, images):
    target = torch.tensor([0, 3, 4])
    ours = Saliency(cnn)(images, target=target)
    ref = captum.Saliency(cnn).attribute(images.clone().requires_grad_(), target=target, abs=True).amax(dim=1)
    assert ours.shape == (3, 16, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_target_none_is_the_predicted_class(cnn, images):
    predicted = cnn(images).argmax(1)
    torch.testing.assert_close(Saliency(cnn)(images), Saliency(cnn)(images, target=predicted))


@pytest.mark.parametrize(
    "target, message",
    [(5, "out of range"), (torch.tensor([0, 1]), "3 class indices"), (0.5, "float"), (-1, "out of range")],
)
def test_bad_target_is_one_clear_error(cnn, images, target, message):
    with pytest.raises(AttributionError, match=f"target: .*{message}"):
        Saliency(cnn)(images, target=target)


def test_bad_images_is_one_clear_error(cnn):
    with pytest.raises(AttributionError, match=r"images: expected a float tensor \(B, C, H, W\)"):
        Saliency(cnn)(torch.rand(3, 16, 16))
