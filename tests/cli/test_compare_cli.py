"""The main job end to end at tiny size: icnn compare, then icnn evaluate on one of its runs."""

import json
import math

import pytest

from icnn.cli import main

# the default recipe (ImageNet EfficientNet-Lite0, stem frozen and cached), tiny
TINY = ["--epochs", "1", "--dataset-option", "num_samples=16", "--test-samples", "16", "--batch-size", "8", "--image-size", "64",
        "--no-progress"]


def _finite_numbers(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--out", str(out), *TINY]) == 0
    return out


def test_compare_writes_metrics_and_report(compare_run):
    metrics = json.loads((compare_run / "metrics.json").read_text())
    for name in ("ordinary", "interpretable"):
        m = metrics[name]
        for key in ("location_instability", "part_interpretability", "accuracy"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
        assert set(m["instability_references"]) >= {"random_unit", "best_fixed_unit"}
        assert 0.0 <= m["accuracy"] <= 1.0
    assert metrics["config"]["arch"] == "efficientnet_lite0" and metrics["config"]["epochs"] == 1
    assert metrics["config"]["freeze_stem"] and metrics["icnn_version"]
    for name in ("ordinary", "interpretable"):
        assert set(metrics[name]["collapse"]) >= {"peak_correlation", "mode_share", "higher_on_category"}
    assert set(metrics["ratios"]) >= {"location_instability", "accuracy"}
    # strict JSON: NaN never written, every number finite
    assert "NaN" not in (compare_run / "metrics.json").read_text()
    for path, value in _finite_numbers(metrics):
        assert math.isfinite(value), path
    html = (compare_run / "report.html").read_text()
    assert "ordinary" in html and "interpretable" in html and "data:image/png;base64" in html
    assert "http://" not in html and "https://" not in html


def test_compare_again_resumes_without_retraining(compare_run, capsys):
    assert main(["compare", "--out", str(compare_run), *TINY]) == 0
    err = capsys.readouterr().err
    assert "(resuming)" in err


def test_evaluate_a_compare_run(compare_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(compare_run / "interpretable"), "--dataset-option", "num_samples=16",
                 "--out", str(out), "--batch-size", "8", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["interpretable"]["location_instability"])
    assert 0.0 <= m["interpretable"]["silent_in_top"] <= 1.0
    assert "location_instability_firing" in m["interpretable"]
    assert (out / "report.html").stat().st_size > 10_000


def test_silent_note_only_where_silent_maps_move_the_figure():
    from icnn.cli.evaluate import silent_note

    assert silent_note(0.0, 0.1) == silent_note(0.049, 0.1) == ""
    assert silent_note(0.25, 0.1234) == " [25% of its top images silent; firing only 0.1234]"


def test_bad_arguments_one_line_exit_2(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x"), "--arch", "nonet", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icnn: error: --arch nonet")
    assert main(["compare", "--out", str(tmp_path / "y"), "--batch-size", "0", "--epochs", "1"]) == 2
    assert "batch" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "z"), "--dataset", "cub200", "--root", str(tmp_path / "nope")]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "w"), "--test-samples", "0", *TINY[:2]]) == 2
    assert "--test-samples 0" in capsys.readouterr().err


def test_the_cub_recipe_file_is_the_measured_configuration(tmp_path):
    """configs/cub200_efficientnet_lite0.toml must give compare's twins the settings of the runs
    in docs/filter_loss.md ("Why the filters collapse, and the fix"): compare's recipe, spelled out."""
    from pathlib import Path

    from icnn.cli import build_parser
    from icnn.cli.compare import build_config as compare_config

    recipe = Path(__file__).resolve().parents[2] / "configs" / "cub200_efficientnet_lite0.toml"
    args = build_parser().parse_args(["compare", "--config", str(recipe), "--root", str(tmp_path / "cub"),
                                      "--negatives", str(tmp_path / "neg"), "--out", str(tmp_path / "run")])
    cfg = compare_config(args)
    assert (cfg.arch, cfg.weights, cfg.dataset, cfg.image_size) == ("efficientnet_lite0", "imagenet", "cub200", 224)
    assert cfg.freeze_stem and cfg.head_norm and cfg.augment and cfg.stem_lr_mult is None
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.backbone_lr_mult, cfg.lr_schedule) == (6, 32, 0.01, 0.1, "cosine")
    assert cfg.mask_warmup_epochs == 0.0 and cfg.dataset_kwargs == {"max_negatives": 300}
    assert cfg.filter_loss == {"mode": "posterior", "lambda_": 1.0, "z_estimate": "batch", "diversity": 0.234375,
                               "decorrelation": 1.5625, "warmup_epochs": 0}
    # ... which is compare's own recipe: the file only spells it out
    from icnn.cli.compare import RECIPE

    assert {k: v for k, v in cfg.filter_loss.items() if k != "warmup_epochs"} == RECIPE["filter_loss"]
    assert cfg.root == str(tmp_path / "cub") and cfg.negatives_root == str(tmp_path / "neg")


def test_the_recipe_caps_negatives_of_single_category_tasks_only(tmp_path):
    # --task multi has no negatives: the recipe's max_negatives must not reach the dataset
    from icnn.cli import build_parser
    from icnn.cli.compare import build_config as compare_config

    common = ["compare", "--dataset", "cub200", "--root", str(tmp_path / "cub"), "--out", str(tmp_path / "run")]
    multi = compare_config(build_parser().parse_args([*common, "--task", "multi"]))
    single = compare_config(build_parser().parse_args([*common, "--negatives", str(tmp_path / "neg")]))
    assert multi.task == "multi" and multi.dataset_kwargs == {}
    assert single.dataset_kwargs == {"max_negatives": 300}
