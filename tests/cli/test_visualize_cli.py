"""``icnn visualize``: overlays as PNG files and a report section from a tiny random small_cnn
checkpoint; one-line errors (exit 2)."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from icnn.cli import build_parser, main
from icnn.cli import visualize as vis
from icnn.models import build_model
from icnn.report import Section, Table, write_report
from icnn.training.checkpoint import save_checkpoint
from icnn.training.config import TrainConfig


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("icnn: error: ")
    return err[0][len("icnn: error: "):]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a random small_cnn checkpoint (32 px, synthetic data of 8 images)."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(arch="small_cnn", image_size=32, dataset_kwargs={"num_samples": 8}, out=str(out))
    torch.manual_seed(0)
    save_checkpoint(out, build_model("small_cnn", num_classes=1, image_size=32), {}, cfg.to_dict())
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8), mode="L").save(d / "b.jpg")  # grey JPEG
    return d


def test_every_flag_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["visualize"]._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_load_model_reads_arch_and_logits_width(tmp_path):
    cfg = TrainConfig(arch="small_cnn", image_size=32, task="multi", interpretable=False, out=str(tmp_path))
    torch.manual_seed(1)
    net = build_model("small_cnn", num_classes=3, image_size=32, interpretable=False)
    save_checkpoint(tmp_path, net, {"num_classes": 3}, cfg.to_dict())
    from icnn.cli.evaluate import load_run

    model, config, _ = load_run(str(tmp_path))  # the OUT dir; its checkpoint/ is found
    assert model.num_classes == 3 and not model.interpretable and not model.training
    assert config.task == "multi"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), net.eval()(x))


def test_visualize_writes_pngs_and_report(run_dir, image_dir, tmp_path, capsys):
    report = tmp_path / "report.html"
    write_report(report, "run x", [Section("Metrics", tables=[Table(["metric", "value"], [["instability", 0.07]])])], config={"lr": 0.01})
    out = tmp_path / "vis"
    common = ["visualize", "--checkpoint", str(run_dir), "--images", str(image_dir), "--out", str(out), "--report", str(report), "--device", "cpu"]
    assert main([*common, "--method", *vis.METHODS, "--steps", "2"]) == 0, capsys.readouterr().err
    for name, (w, h) in {"a": (256, 171), "b": (256, 256)}.items():  # longer side scaled to 256
        for method in vis.METHODS:
            with Image.open(out / f"{name}.{method}.png") as im:
                im.load()
                if method not in ("contributions", "actmax"):
                    assert im.size == (w, h) and im.mode == "RGB"
    page = (out / "visualizations.html").read_text()
    assert page.count("data:image/png;base64,") == 12 and "Visualisations" in page
    assert "head filter" in page  # the contributions summary: "N head filters contribute x%"
    text = report.read_text()
    assert text.count('<section id="visualisations">') == 1 and "instability" in text
    assert text.index('<section id="visualisations">') < text.index('<section id="config">')
    assert '<li><a href="#visualisations">Visualisations</a></li>' in text
    # a second run replaces the section, the rest of the report is kept
    assert main([*common, "--method", "gradcam"]) == 0
    again = report.read_text()
    assert again.count('<section id="visualisations">') == 1 and again.count('href="#visualisations"') == 1
    assert again.count("data:image/png;base64,") == 2 and "instability" in again


def test_new_report_is_created(run_dir, image_dir, tmp_path):
    report = tmp_path / "sub" / "new.html"
    argv = ["visualize", "--checkpoint", str(run_dir / "checkpoint"), "--images", str(image_dir / "a.png"),
            "--out", str(tmp_path / "o"), "--report", str(report), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    text = report.read_text()
    assert text.count('<section id="visualisations">') == 1 and 'href="#visualisations"' in text


def test_splice_refuses_a_foreign_page():
    from icnn.report.visualize import splice_section

    assert splice_section("<html><body>hello</body></html>", Section("Visualisations")) is None


def test_bad_arguments_exit_2_with_one_line(run_dir, image_dir, tmp_path, capsys):
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign.html").write_text("<html><body>hello</body></html>")
    ok = ["--checkpoint", str(run_dir), "--images", str(image_dir / "a.png"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], f"--checkpoint {tmp_path / 'nope'}: checkpoint {tmp_path / 'nope'}: no such file or directory"),
        (["--checkpoint", str(tmp_path / "empty")], f"--checkpoint {tmp_path / 'empty'}: checkpoint {tmp_path / 'empty'}: no complete checkpoint there"),
        (["--images", str(tmp_path / "broken.png")], f"--images {tmp_path / 'broken.png'}: cannot read image (not an image PIL can read)"),
        (["--images", str(tmp_path / "missing.png")], f"--images {tmp_path / 'missing.png'}: no such file or directory"),
        (["--images", str(tmp_path / "empty")], f"--images {tmp_path / 'empty'}: no image files in this folder"),
        (["--method", "lime"], "--method lime: unknown method; choose from saliency, guided"),
        (["--layer", "layers.bogus"], "--layer layers.bogus: no submodule named 'layers.bogus'"),
        (["--method", "contributions", "--layer", "stem.block1"], "--layer stem.block1: contributions need one of the network's layers top, new"),
        (["--target", "5"], "target: class index out of range for a model with 1 output(s)"),
        (["--alpha", "2"], "--alpha must be in [0, 1], got 2.0"),
        (["--method", "contributions", "--top-n", "0"], "--top-n must be positive, got 0"),
        (["--method", "contributions", "--dataset", "cub200", "--root", str(tmp_path / "nocub")], f"{tmp_path / 'nocub'}: dataset root for 'cub200' not found"),
        (["--report", str(tmp_path / "foreign.html")], f"--report {tmp_path / 'foreign.html'}: not an icnn HTML report (left unchanged)"),
    ]
    for extra, message in cases:
        argv = ["visualize", *ok, *extra]
        assert main(argv) == 2, extra
        assert _error_line(capsys).startswith(message), extra
    assert (tmp_path / "foreign.html").read_text() == "<html><body>hello</body></html>"
