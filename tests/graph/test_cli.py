"""``icnn graph`` end to end at tiny size: outputs, resuming per layer, one-line errors."""

import json

import pytest

from icnn.cli import main
from icnn.graph import ExplanatoryGraph

NET = ["--arch", "small_cnn", "--dataset", "synthetic", "--dataset-option", "num_samples=16", "--image-size", "32"]
RUN = ["--iterations", "2", "--top-units", "4", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph") / "g"
    assert main(["graph", *NET, *RUN, "--out", str(out)]) == 0
    return out


def test_writes_graph_metrics_and_report(done, capsys):
    m = json.loads((done / "metrics.json").read_text())
    li = m["metrics"]["location_instability"]
    assert len(li["layers"]) == 3 and {"nodes", "raw_filters", "random_unit", "best_fixed_unit", "ratio"} <= set(li)
    assert "part_localisation" in m["metrics"] and m["images"] == 8
    graph = ExplanatoryGraph.load(done / "graph")
    assert graph.complete and graph.config.iterations == 2
    assert not list((done / "graph").glob("*.pt")) and not list(done.rglob("*.pkl"))  # safetensors + JSON only
    html = (done / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "location instability" in html  # 3 layers' patches + edges


def test_rerun_reuses_features_and_learned_layers(done, capsys):
    before = (done / "graph" / "graph.json").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (done / "graph").glob("layer_*.safetensors")}
    assert main(["graph", *NET, *RUN, "--out", str(done)]) == 0
    assert "features: reusing" in capsys.readouterr().out
    assert json.loads((done / "graph" / "graph.json").read_text())["history"] == json.loads(before)["history"]
    assert {p.name: p.stat().st_mtime_ns for p in (done / "graph").glob("layer_*.safetensors")} == stamps
    # the chunk size changes memory, not the graph: allowed on a rerun
    assert main(["graph", *NET, *RUN, "--chunk-images", "3", "--out", str(done)]) == 0


def test_resume_learns_only_missing_layers(done, tmp_path, capsys):
    import shutil

    out = tmp_path / "g"
    shutil.copytree(done, out)
    meta = json.loads((out / "graph" / "graph.json").read_text())
    meta["learned"][0] = False  # as if interrupted before the bottom layer
    meta["history"] = [h for h in meta["history"] if h["layer"] != "stem.block2.bn"]
    (out / "graph" / "graph.json").write_text(json.dumps(meta))
    (out / "graph" / "layer_0.safetensors").unlink()
    top = (out / "graph" / "layer_2.safetensors").stat().st_mtime_ns
    assert main(["graph", *NET, *RUN, "--out", str(out)]) == 0
    graph = ExplanatoryGraph.load(out / "graph")
    assert graph.complete and [h["layer"] for h in graph.history].count("stem.block2.bn") == 2
    assert (out / "graph" / "layer_2.safetensors").stat().st_mtime_ns == top


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-n", "3"], "--top-n: the graph in"),  # another graph config into the same DIR
        (["--max-images", "4"], "--max-images: --out"),  # other features into the same DIR
        (["--faithful"], "--faithful: the graph in"),
    ],
)
def test_another_setting_into_the_same_dir_is_a_one_line_error(done, capsys, extra, message):
    assert main(["graph", *NET, *RUN, *extra, "--out", str(done)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "synthetic", "--image-size", "32"], "--arch: needed"),
        ([*NET, "--top-n", "0"], "--top-n: must be a positive integer"),
        ([*NET, "--density", "0.1,x"], "--density: expected numbers"),
        ([*NET, "--min-var-rate", "1.5"], "--min-var-rate: must be in [0, 1)"),
        ([*NET, "--layers", "stem.nope"], "layers: no module named 'stem.nope'"),
        ([*NET, "--max-images", "0"], "--max-images 0: must be >= 1"),
        ([*NET, "--weights", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, argv, message):
    assert main(["graph", *argv, *RUN, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_checkpoint_of_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    data = ["--dataset", "synthetic", "--dataset-option", "num_samples=16", "--image-size", "32"]
    assert main(["train", *data, "--epochs", "1", "--batch-size", "8", "--eval-split", "none", "--no-progress", "--device", "cpu",
                 "--out", str(run)]) == 0  # fmt: skip
    out = tmp_path / "g"
    assert main(["graph", "--checkpoint", str(run), *RUN, "--out", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["arch"] == "small_cnn"
    assert ExplanatoryGraph.load(out / "graph").complete
    capsys.readouterr()
    assert main(["graph", "--checkpoint", str(run), "--arch", "vgg16", *RUN, "--out", str(tmp_path / "h")]) == 2
    assert "--arch: not with --checkpoint" in capsys.readouterr().err


def test_a_failed_extraction_does_not_bind_the_settings(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["graph", *NET, *RUN, "--layers", "stem.nope", "--out", str(out)]) == 2  # fails in the extraction
    assert "no module named 'stem.nope'" in capsys.readouterr().err
    assert main(["graph", *NET, *RUN, "--max-images", "4", "--out", str(out)]) == 0
