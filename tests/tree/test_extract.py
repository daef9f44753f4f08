"""Step 1 of the tree (x, g, y, b), on hand-weighted nets with exact expected values."""

import math

import pytest
import torch

from icnn.attribution.contributions import FilterParts
from icnn.tree import TreeError, extract, rationale

from .helpers import FC_BIAS, FC_WEIGHT, constant_images, hand_net

A = torch.tensor(FC_WEIGHT, dtype=torch.float64)


def batch(images, labels):
    return [{"image": images, "label": torch.tensor(labels)}]


def test_linear_head_exact_values_and_one_rationale_for_all():
    # channel means: image 0 (1, 2, 4), image 1 (3, 0, 2); 2x2 maps, so sum_ij = 4 * mean
    feats = extract(hand_net(), batch(constant_images((1, 2, 4), (3, 0, 2)), [1, 1]))
    s = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)  # mean over the positives of the spatial means
    assert torch.equal(feats.scale, s)
    x = torch.tensor([[4, 8, 16], [12, 0, 8]], dtype=torch.float64) / s
    g = A / 4 * s  # mean_ij dy/dX = a_d / (h w), the same for every image
    norm = g.norm()
    y = torch.tensor([2 - 2 + 2 + FC_BIAS, 6 - 0 + 1 + FC_BIAS], dtype=torch.float64)
    torch.testing.assert_close(feats.x, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(feats.g, (g / norm).expand(2, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(feats.y, y / norm, rtol=0, atol=1e-12)
    torch.testing.assert_close(feats.b, torch.full((2,), FC_BIAS / norm.item(), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(feats.norm, norm.expand(2), rtol=0, atol=1e-12)
    torch.testing.assert_close((feats.g * feats.x).sum(1) + feats.b, feats.y, rtol=0, atol=1e-12)


def test_rationale_of_a_nonlinear_head_is_per_image():
    # y = sum_d a_d sum_ij X_dij^2, so dy/dX = 2 a_d X: maps (B=2, D=2, 1, 2)
    a = torch.tensor([1.0, -0.5])
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]], [[[0.0, 2.0]], [[4.0, 0.0]]]])
    feats = rationale(maps, lambda X: (X.pow(2).sum((2, 3)) * a).sum(1, keepdim=True))
    assert torch.equal(feats.scale, torch.tensor([1.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(feats.x, torch.tensor([[8 / 3, 2.0], [4 / 3, 2.0]], dtype=torch.float64))
    r52 = math.sqrt(52)
    torch.testing.assert_close(feats.g, torch.tensor([[6 / r52, -4 / r52], [0.6, -0.8]], dtype=torch.float64))
    torch.testing.assert_close(feats.y, torch.tensor([6 / r52, -0.8], dtype=torch.float64))
    torch.testing.assert_close(feats.b, torch.tensor([-2 / r52, 0.0], dtype=torch.float64))


def test_pre_mask_rationale_goes_through_the_mask_post_mask_does_not():
    # on 2x2 maps the mask keeps only the argmax unit (M = 1 there, -1 elsewhere)
    images = constant_images((1, 2, 4), (3, 0, 2))
    post = extract(hand_net(mask=True), batch(images, [1, 1]), site="post_mask")
    pre = extract(hand_net(mask=True), batch(images, [1, 1]), site="pre_mask")
    # the network's score is the same; y / |g| is not, since g differs
    torch.testing.assert_close(post.y * post.norm, pre.y * pre.norm)
    # post: X is the masked map (one unit), linear head -> one rationale, s from the masked maps
    s_post = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64) / 4
    assert torch.equal(post.scale, s_post)
    torch.testing.assert_close(post.g[0], post.g[1])
    # pre: dy/dX_ij = (a_d / 4) M_ij 1[X_ij M_ij > 0]: only the argmax unit of a firing filter
    s_pre = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    fires = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.float64)
    g = A / 4 / 4 * fires * s_pre
    torch.testing.assert_close(pre.g, g / g.norm(dim=1, keepdim=True))
    assert pre.g[1, 1] == 0 and pre.g[0, 1] != 0


def test_part_ablation_of_a_linear_head_is_its_linear_contribution():
    parts = FilterParts(torch.tensor([0, 1, 0]), ["head", "tail"], torch.zeros(3, 2), torch.zeros(3))
    feats = extract(hand_net(), batch(constant_images((1, 2, 4), (3, 0, 2)), [1, 1]), parts=parts)
    means = torch.tensor([[1, 2, 4], [3, 0, 2]], dtype=torch.float64)
    drop = torch.stack(((A * means)[:, [0, 2]].sum(1), (A * means)[:, 1]), 1)  # filters 0, 2 -> head; 1 -> tail
    torch.testing.assert_close(feats.part_drop, drop / feats.norm[:, None])


def test_scale_of_the_training_set_is_reused_and_a_silent_filter_gets_one():
    train = extract(hand_net(), batch(constant_images((1, 0, 4), (3, 0, 2)), [1, 1]))
    assert train.scale.tolist() == [2.0, 0.0, 3.0]
    assert torch.equal(train.x[:, 1], torch.zeros(2, dtype=torch.float64))
    test = extract(hand_net(), batch(constant_images((2, 5, 2)), [0]), scale=train.scale)
    torch.testing.assert_close(test.x, torch.tensor([[8 / 2, 20 / 1, 8 / 3]], dtype=torch.float64))  # s_1 = 0 -> 1
    assert not test.positive.any()


def test_a_cached_stem_output_gives_the_same_features():
    images = constant_images((1, 2, 4), (3, 0, 2))
    from_images = extract(hand_net(mask=True), batch(images, [1, 1]))
    from_stem = extract(hand_net(mask=True), [{"stem": images, "label": torch.tensor([1, 1])}])  # identity stem
    for name in ("x", "g", "y", "b", "scale"):
        assert torch.equal(getattr(from_stem, name), getattr(from_images, name))


def test_labels_select_the_positives():
    feats = extract(hand_net(), batch(constant_images((1, 2, 4), (3, 0, 2), (5, 5, 5)), [1, 0, 1]))
    assert feats.positive.tolist() == [True, False, True]
    assert torch.equal(feats.scale, torch.tensor([3.0, 3.5, 4.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer="conv5"), "layer:"),
        (dict(site="after"), "site:"),
        (dict(target=1), "target:"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(TreeError, match=message):
        extract(hand_net(), batch(constant_images((1, 2, 4)), [1]), **kwargs)


def test_user_mistakes_are_one_line_errors():
    with pytest.raises(TreeError, match="model: expected an icnn InterpretableNet"):
        extract(torch.nn.Linear(2, 2), [])
    with pytest.raises(TreeError, match="data: no images"):
        extract(hand_net(), [])
    with pytest.raises(TreeError, match="data: no positive images"):
        extract(hand_net(), batch(constant_images((1, 2, 4)), [0]))
    with pytest.raises(TreeError, match="label"):
        extract(hand_net(), [{"image": constant_images((1, 2, 4))}])
    with pytest.raises(TreeError, match="maps: expected a float tensor"):
        rationale(torch.zeros(2, 3), lambda X: X)
