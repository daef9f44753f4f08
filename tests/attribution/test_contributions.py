"""Part contributions (explainer paper 003, Fig. 5): filters -> parts by the landmark nearest to
their argmax unit, and each part's share of the class score by gradient x activation."""

import math

import pytest
import torch
from captum.attr import LayerGradientXActivation
from torch import nn

from icnn.attribution.contributions import (
    ContributionError,
    FilterParts,
    assign_filter_parts,
    dataset_part_contributions,
    filter_contributions,
    part_contributions,
)
from icnn.models import InterpretableLayer, InterpretableNet, Normalize, build_model

NAN = float("nan")


def hand_net(interpretable: bool = False) -> InterpretableNet:
    """Identity stem, identity 1x1 convs + ReLU as "top" and "new" (maps = the image's channels),
    head GAP + fc with W = [[2, -1, 0.5], [-1, 1, 3]], b = [0.25, -0.5]."""
    from icnn.mask import PartMask

    def identity_layer():
        conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
            conv.bias.zero_()
        return InterpretableLayer(nn.Sequential(conv, nn.ReLU()), PartMask() if interpretable else None)

    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, 3.0]]))
        fc.bias.copy_(torch.tensor([0.25, -0.5]))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)
    layers = nn.ModuleDict({"top": identity_layer(), "new": identity_layer()})
    return InterpretableNet(Normalize((0, 0, 0), (1, 1, 1)), nn.Identity(), layers, head, num_classes=2, image_size=(2, 2))


# channel means 2, 1, 1
HAND_IMAGE = torch.tensor([[[[1.0, 2.0], [3.0, 2.0]], [[0.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
PARTS = FilterParts(torch.tensor([0, 1, -1]), ["head", "torso"], torch.zeros(3, 2, dtype=torch.long), torch.ones(3, dtype=torch.long))


def test_contributions_exact_on_linear_gap_head():
    net = hand_net()
    c, spatial, score, t = filter_contributions(net, HAND_IMAGE)  # predicted class: 0 (3.75 > 1.5)
    assert t.tolist() == [0]
    torch.testing.assert_close(c, torch.tensor([[4.0, -1.0, 0.5]]))  # w_0f * mean x_f
    torch.testing.assert_close(score, torch.tensor([3.75]))
    # per unit: sum_f w_f x_fij / 4
    torch.testing.assert_close(spatial, torch.tensor([[[2.5 / 4, 0.5 / 4], [6.5 / 4, 4.5 / 4]]]))
    c1, _, score1, _ = filter_contributions(net, HAND_IMAGE, target=1)
    torch.testing.assert_close(c1, torch.tensor([[-2.0, 1.0, 3.0]]))
    torch.testing.assert_close(score1, torch.tensor([1.5]))
    pc = part_contributions(net, HAND_IMAGE, PARTS, target=1)
    torch.testing.assert_close(pc.rest, torch.tensor([-0.5]))  # y - sum_f c_f = the bias


def test_part_shares_abs_and_positive():
    net = hand_net()
    pc = part_contributions(net, HAND_IMAGE, PARTS)
    assert pc.columns == ["head", "torso", "none"]
    assert pc.filters_per_part.tolist() == [1, 1, 1]
    torch.testing.assert_close(pc.per_image, torch.tensor([[4.0, -1.0, 0.5]]))
    torch.testing.assert_close(pc.share, torch.tensor([[4 / 5.5, -1 / 5.5, 0.5 / 5.5]]))
    assert math.isclose(pc.share.sum().item(), (4.5 - 1) / (4.5 + 1), rel_tol=1e-6)  # (P - N) / (P + N)
    torch.testing.assert_close(pc.rest, torch.tensor([0.25]))
    assert pc.summary() == [
        "1 head filter contributes 72.7%",
        "1 torso filter contributes -18.2%",
        "1 other filter contributes 9.1%",
    ]
    pos = part_contributions(net, HAND_IMAGE, PARTS, share="positive")
    torch.testing.assert_close(pos.share, torch.tensor([[4 / 4.5, 0.0, 0.5 / 4.5]]))
    assert math.isclose(pos.share.sum().item(), 1.0, rel_tol=1e-6)
    with pytest.raises(ContributionError, match="share"):
        part_contributions(net, HAND_IMAGE, PARTS, share="bogus")


def test_zero_image_gives_zero_shares():
    pc = part_contributions(hand_net(), torch.zeros(1, 3, 2, 2), PARTS)
    assert pc.share.tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("layer, reader", [("new", "head"), ("top", "layers.new")])
def test_matches_captum_gradient_x_activation(layer, reader):
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=3, image_size=32, width=4).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c, _, _, t = filter_contributions(net, images, layer=layer, target=[2, 1])
    module = dict(net.named_modules())[reader]
    ref = LayerGradientXActivation(net, module).attribute(images, target=[2, 1], attribute_to_layer_input=True)
    torch.testing.assert_close(c, ref.sum(dim=(2, 3)), rtol=1e-4, atol=1e-6)
    assert t.tolist() == [2, 1]


def test_exact_on_masked_small_cnn_linear_head():
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=3, image_size=32, width=4).eval()
    nn.init.normal_(net.head.fc.weight)
    nn.init.normal_(net.head.fc.bias)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    c, _, score, t = filter_contributions(net, images)
    with torch.no_grad():
        x = net.forward_features(images).masked["new"].mean(dim=(2, 3))  # (B, C)
    w, b = net.head.fc.weight[t], net.head.fc.bias[t]
    torch.testing.assert_close(c, w * x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.sum(1), score - b, rtol=1e-5, atol=1e-5)
    assert net.training is False and all(p.requires_grad for p in net.parameters())  # state restored


# --------------------------------------------------------------------------------------------
# assignment on hand-made maps: the hand net's "new" maps are the image's channels (4x4, stride 1,
# unit (i, j) centred at (j + 0.5, i + 0.5))


class HandParts(torch.utils.data.Dataset):
    """Positives (label 1) 0-1: filter 0 fires (5) at the head; 2-4: filter 0 fires (1) at the torso.
    Filter 1 fires at the torso on every positive; filter 2 fires only on the negatives (label 0,
    no landmarks). "tail" is never annotated."""

    classes = ["negative", "bird"]
    landmark_names = ["head", "torso", "tail"]

    def __init__(self):
        self.samples = []
        for k in range(5):
            head, torso = (k % 2, 0), (3, 3 - k % 2)  # (column, row) of the unit under each landmark
            image = torch.zeros(3, 4, 4)
            at = head if k < 2 else torso
            image[0, at[1], at[0]] = 5.0 if k < 2 else 1.0
            image[1, torso[1], torso[0]] = 2.0
            lm = torch.tensor([[head[0] + 0.5, head[1] + 0.5], [torso[0] + 0.5, torso[1] + 0.5], [NAN, NAN]])
            self.samples.append((image, 1, lm))
        for _ in range(2):
            image = torch.zeros(3, 4, 4)
            image[2, 1, 1] = 9.0
            self.samples.append((image, 0, torch.full((3, 2), NAN)))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image, label, lm = self.samples[i]
        return {"image": image, "label": torch.tensor(label), "landmarks": lm, "index": torch.tensor(i)}


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_assign_filter_parts_majority_vote(batch_size):
    fp = assign_filter_parts(hand_net(), HandParts(), batch_size=batch_size)
    assert fp.part_names == ["head", "torso", "tail"]
    assert fp.votes.tolist() == [[2, 3, 0], [0, 5, 0], [0, 0, 0]]
    assert fp.part_of_filter.tolist() == [1, 1, -1]  # filter 2 is silent on birds: none
    assert fp.category.tolist() == [1, 1, 1]  # negatives (no landmarks) are never a category
    assert fp.counts().tolist() == [0, 2, 0, 1]
    assert fp.filters_of("torso").tolist() == [0, 1] and fp.filters_of("none").tolist() == [2]
    assert fp.summary() == ["0 head filters", "2 torso filters", "0 tail filters", "1 filter without a part"]


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_assign_filter_parts_top_n(batch_size):
    fp = assign_filter_parts(hand_net(), HandParts(), top_n=2, batch_size=batch_size)
    assert fp.votes.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]  # filter 0's two strongest: at the head
    assert fp.part_of_filter.tolist() == [0, 1, -1]
    # a filter firing at the head landmark is assigned "head", whatever the mask does to its map
    fp_masked = assign_filter_parts(hand_net(interpretable=True), HandParts(), top_n=2)
    assert fp_masked.part_names[fp_masked.part_of_filter[0]] == "head"


def test_dataset_contributions_average_over_annotated_images():
    net, data = hand_net(), HandParts()
    fp = assign_filter_parts(net, data, top_n=2)
    pc = dataset_part_contributions(net, data, fp, batch_size=3, target=0)
    assert len(pc.share) == 5  # the two negatives have no landmarks
    images = torch.stack([data[i]["image"] for i in range(5)])
    ref = part_contributions(net, images, fp, target=0)
    torch.testing.assert_close(pc.share, ref.share)
    torch.testing.assert_close(pc.mean_share(), ref.share.mean(0))
    by_label = dataset_part_contributions(net, data, fp, target="label", annotated_only=False)
    assert by_label.target.tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_errors_are_one_line():
    net = hand_net()
    with pytest.raises(ContributionError, match="layer: 'mid' is not one of"):
        filter_contributions(net, HAND_IMAGE, layer="mid")
    with pytest.raises(ContributionError, match="filter_parts: assigned 2 filters"):
        part_contributions(net, HAND_IMAGE, FilterParts(torch.tensor([0, 1]), ["a", "b"], torch.zeros(2, 2), torch.zeros(2)))
    with pytest.raises(ContributionError, match="top_n"):
        assign_filter_parts(net, HandParts(), top_n=0)
    with pytest.raises(ContributionError, match="no image has an annotated landmark"):
        assign_filter_parts(net, torch.utils.data.Subset(HandParts(), [5, 6]))
    with pytest.raises(ContributionError, match="InterpretableNet"):
        filter_contributions(nn.Conv2d(3, 3, 1), HAND_IMAGE)
