"""Default layers, the layer maps read by hooks, and the features' normalisation."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import icnn
from icnn.graph import (
    FeatureStore,
    GraphError,
    LayerInfo,
    default_layers,
    write_features,
)
from icnn.graph.features import _layer_maps
from icnn.models import output_shapes
from icnn.models.vgg import vgg16_features


def test_vgg16_default_layers_are_conv4_2_4_3_5_2_5_3_before_relu():
    f = vgg16_features()
    convs = [i for i, m in enumerate(f) if isinstance(m, nn.Conv2d)]
    names = default_layers(SimpleNamespace(arch="vgg16"))
    # the 9th, 10th, 12th and 13th convolutions (the code's validLayers = [9, 10, 12, 13]), in the
    # net's stem up to conv5_2 and its top layer for conv5_3
    assert [int(n.split(".")[-1]) for n in names] == [convs[i - 1] for i in (9, 10, 12, 13)]
    assert all(isinstance(f[int(n.split(".")[-1]) + 1], nn.ReLU) for n in names)


def test_efficientnet_default_layers_are_the_last_two_blocks_of_stages_4_and_5():
    blocks = [[None] * k for k in (1, 3, 3, 4, 4, 5, 1)]  # efficientnet_lite1's stage depths
    model = SimpleNamespace(arch="efficientnet_lite1", stem=SimpleNamespace(blocks=blocks))
    assert default_layers(model) == ("stem.blocks.4.2", "stem.blocks.4.3", "stem.blocks.5.3", "stem.blocks.5.4")
    with pytest.raises(GraphError, match="layers: no default layers for arch 'vgg_m'"):
        default_layers(SimpleNamespace(arch="vgg_m"))


@pytest.mark.parametrize("arch, sizes", [pytest.param("efficientnet_lite0", [(14, 14), (14, 14), (7, 7), (7, 7)], marks=pytest.mark.slow),
                                         ("small_cnn", [(32, 32), (16, 16), (8, 8)])])  # fmt: skip
def test_default_layers_exist_bottom_to_top(arch, sizes):
    model = icnn.build_model(arch, num_classes=1, interpretable=False)
    names = default_layers(model)
    shapes = output_shapes(model, model.image_size, names)
    assert [shapes[n][-2:] for n in names] == sizes


def test_hooks_read_pre_relu_maps_and_are_removed():
    """An in-place ReLU after the hooked conv must not change the map we keep."""
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(2, 1, 1))
    net[0].weight.data = torch.tensor([[[[1.0]]], [[[-1.0]]]])
    x = torch.tensor([[[[1.0, -2.0]]]])
    maps = _layer_maps(net, x, ("0",))
    assert maps["0"].tolist() == [[[[1.0, -2.0]], [[-1.0, 2.0]]]]
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_store_divides_by_sigma_and_keeps_float16_chunks(tmp_path):
    layer = LayerInfo("a", 1, (2, 2), (4, 4), (1.5, 1.5))
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[4.0, 5.0], [6.0, 7.0]]], [[[8.0, 9.0], [1.0, 1.0]]]])
    sigma = {"a": torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])}  # 0: floored at 1e-3 x the mean (7/4)
    chunks = [({"a": maps[:2]}, torch.zeros(2, 1, 2), torch.tensor([5, 6])), ({"a": maps[2:]}, torch.zeros(1, 1, 2), torch.tensor([7]))]
    store = write_features(tmp_path, [layer], chunks, sigma, image_hw=(8, 8), landmark_names=["x"])
    again = FeatureStore(tmp_path)
    assert again.num_images == 3 and again.num_chunks == 2 and again.indices.tolist() == [5, 6, 7]
    assert torch.allclose(again.read(0, 2, 3), torch.tensor([[[[8.0, 4.5], [1 / 1.75e-3, 0.25]]]]))
    assert torch.equal(again.read(0, 1, 3), torch.cat((again.read(0, 1, 2), again.read(0, 2, 3))))  # across files
    assert again.batches(2) == [(0, 2), (2, 3)]
    rms = math.sqrt((1 + 4 + 1.75e-3**2 + 16) / 4)  # sigma_neg="channel": one sigma, the RMS of the channel's units'
    assert torch.allclose(again.read(0, 2, 3, sigma_neg="channel"), maps[2:] / rms)
    with pytest.raises(GraphError, match="sigma_neg"):
        again.read(0, 0, 1, sigma_neg="pixel")
    assert store.layers[0].pixels(torch.tensor([[1.0, 0.5]])).tolist() == [[1.5 + 2 + 0.5, 1.5 + 4 + 0.5]]
    with pytest.raises(GraphError, match="no object images"):
        write_features(tmp_path / "e", [layer], [], sigma, image_hw=(8, 8), landmark_names=[])
