"""``icnn tree`` end to end at tiny size, and its one-line errors."""

import json

from icnn.cli import main

S = ["--dataset", "synthetic", "--dataset-option", "num_samples=24", "--image-size", "32", "--batch-size", "8",
     "--no-progress", "--device", "cpu"]


def test_icnn_tree_writes_the_tree_metrics_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *S, "--epochs", "1", "--eval-split", "none", "--out", str(run)]) == 0
    out = tmp_path / "tree"
    assert main(["tree", "--checkpoint", str(run), "--out", str(out), "--dataset-option", "num_samples=24", "--no-progress",
                 "--device", "cpu", "--site", "pre_mask"]) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["leaves"] == 12 and {"cnn", "2", "leaves"} <= set(m["layers"])
    assert {"accuracy", "prediction_error", "fitness", "part_error"} <= set(m["layers"]["2"]), m["layers"]["2"]
    assert (out / "tree" / "tree.json").is_file() and (out / "report.html").stat().st_size > 5000
    assert "tree:" in capsys.readouterr().out
    assert main(["tree", "--checkpoint", str(run), "--out", str(tmp_path / "t2"), "--beta", "-1"]) == 2
    assert "--beta" in capsys.readouterr().err
    assert main(["tree", "--checkpoint", str(run), "--out", str(tmp_path / "t3"), "--layer", "fc9"]) == 2
    assert "--layer fc9: not a layer" in capsys.readouterr().err
