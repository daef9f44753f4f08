"""``icnn layers``: layer names, output shapes and receptive fields of a registered network."""

from __future__ import annotations

import pytest

from icnn.cli import main


def test_layers_small_cnn(capsys):
    assert main(["layers", "--arch", "small_cnn"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("small_cnn at 64x64 px") and "layers.top, layers.new" in out[0]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert rows["stem.pool3"][2] == "128x8x8"
    assert rows["layers.new"][1:3] == ["InterpretableLayer", "128x8x8"]
    assert " ".join(rows["layers.new"][3:]) == "stride 8 size 54 centre(0,0) 4"
    assert rows["head.fc"][2:] == ["1", "-"]


def test_layers_image_size(capsys):
    assert main(["layers", "--arch", "resnet18", "--image-size", "112", "--num-classes", "5"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["layers.new"][2] == "512x4x4" and rows["head.fc"][2] == "5"


def test_layers_errors(capsys):
    assert main(["layers", "--arch", "vgg_m", "--image-size", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnn: error: image size 20x20 is too small") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["layers", "--arch", "nope"])
    assert exc.value.code == 2
