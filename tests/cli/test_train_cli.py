"""``icnn train``: flags, config files and their precedence, one-line errors (exit 2), a run and
its resume end to end on a tiny network."""

import argparse
import json

import pytest

from icnn.cli import build_parser, main
from icnn.cli import train as train_cli
from icnn.training import classify, load_checkpoint

from training.fakes import TinyParts, tiny_net


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("icnn: error: ")
    return err[0][len("icnn: error: "):]


def _parse(argv):
    return build_parser().parse_args(["train", *argv])


@pytest.fixture
def tiny(monkeypatch):
    """``--arch tiny`` builds the 4-filter test network; datasets are tiny in-memory ones."""
    from icnn.models import registry

    def builder(*, num_classes, interpretable=True, weights=None, image_size=16, **kw):
        return tiny_net(num_classes=num_classes, interpretable=interpretable, image_size=image_size)

    monkeypatch.setitem(registry.MODELS, "tiny", builder)
    monkeypatch.setattr(classify, "build_dataset_for", lambda cfg, split, **kw: TinyParts(8) if split == "train" else TinyParts(4, seed=1))
    return ["--arch", "tiny", "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def test_every_flag_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["train"]
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size: must be a positive integer (got 0)"),
        (["--epochs", "-1"], "--epochs: must be a positive integer (got -1)"),
        (["--lr", "nan"], "--lr: must be a finite number (got nan)"),
        (["--lr", "fast"], "--lr fast: expected a number"),
        (["--root", "/nonexistent/icnn-data"], "--root /nonexistent/icnn-data: no such file or directory"),
        (["--weights", "/nonexistent/w.pt"], "--weights /nonexistent/w.pt: no such file"),
        (["--device", "tpu"], "--device: must be auto, cpu, cuda or cuda:N (got 'tpu')"),
        (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: checkpoint /nonexistent/run: no such file or directory"),
        (["--filter-loss", "oops"], "--filter-loss oops: expected KEY=VALUE (e.g. mode=posterior)"),
        (["--mask", "beta"], "--mask beta: expected KEY=VALUE (e.g. beta=adaptive)"),
        (["--mask", "beta=oops"], "--mask: beta must be a positive number or 'adaptive', got 'oops'"),
        (["--mask-warmup-epochs", "20"], "--mask-warmup-epochs: must be below epochs (10): the mask must be complete before training ends (got 20.0)"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    assert _error_line(capsys) == message


def test_unknown_arch(capsys, tmp_path):
    assert main(["train", "--arch", "nope", "--out", str(tmp_path)]) == 2
    assert _error_line(capsys).startswith("--arch nope: unknown architecture (choose one of ")


def test_config_file_errors(capsys, tmp_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("epochs = 2\nbacth_size = 4\n")
    assert main(["train", "--config", str(bad_key)]) == 2
    assert _error_line(capsys).startswith(f"--config {bad_key}: unknown key 'bacth_size'")

    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("epochs = = 2\n")
    assert main(["train", "--config", str(bad_toml)]) == 2
    assert _error_line(capsys).startswith(f"--config {bad_toml}: invalid TOML (")

    missing = tmp_path / "missing.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert _error_line(capsys) == f"--config {missing}: cannot read (No such file or directory)"

    bad_value = tmp_path / "v.yaml"
    bad_value.write_text("batch_size: 0\n")
    assert main(["train", "--config", str(bad_value)]) == 2
    assert _error_line(capsys) == f"--config {bad_value}: batch_size: must be a positive integer (got 0)"

    odd = tmp_path / "x.ini"
    odd.write_text("")
    assert main(["train", "--config", str(odd)]) == 2
    assert "unknown format '.ini'" in _error_line(capsys)


def test_config_precedence_defaults_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 2\nlr = 1\noptimizer = "adam"\n[filter_loss]\nlambda_ = 0.2\nmode = "exact"\n')
    cfg, resume = train_cli.build_config(_parse(["--config", str(toml), "--lr", "0.1", "--lambda", "0.3", "--out", str(tmp_path / "o")]))
    assert resume is None
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.batch_size) == (2, 0.1, "adam", 32)  # file, flag, file, default
    assert cfg.filter_loss == {"lambda_": 0.3, "mode": "exact"}
    yaml = tmp_path / "run.yaml"
    yaml.write_text("epochs: 5\ninterpretable: true\ndataset-kwargs: {num_samples: 40}\n")
    cfg, _ = train_cli.build_config(_parse(["--config", str(yaml), "--ordinary", "--dataset-option", "category=stag", "--eval-split", "none"]))
    assert (cfg.epochs, cfg.interpretable, cfg.eval_split) == (5, False, None)
    assert cfg.dataset_kwargs == {"num_samples": 40, "category": "stag"}
    # several KEY=VALUE after one flag, and the flag repeated, merge key by key
    cfg, _ = train_cli.build_config(_parse(["--filter-loss", "mode=posterior", "diversity=0.5", "--filter-loss", "mode=exact",
                                            "--out", str(tmp_path / "o2")]))
    assert cfg.filter_loss == {"mode": "exact", "diversity": 0.5}


def test_train_then_resume_end_to_end(tiny, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny, "--epochs", "1", "--out", str(out), "--lambda", "0.05"]) == 0
    stdout = capsys.readouterr().out
    assert "trained to epoch 1 (step 2)" in stdout and f"checkpoint: {out / 'checkpoint'}" in stdout
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "config.json", "log.csv", "log.jsonl"]
    assert json.loads((out / "config.json").read_text())["filter_loss"] == {"lambda_": 0.05}

    # the same out dir without --resume is refused
    assert main(["train", *tiny, "--out", str(out)]) == 2
    assert "already holds a run" in _error_line(capsys)
    # a resumed run may not change what it computes
    assert main(["train", "--resume", str(out), "--lr", "0.5"]) == 2
    assert _error_line(capsys) == "--lr: a resumed run keeps its checkpoint's setting (lr = 0.01); drop it or start a new run"
    # ... but may train longer
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert "trained to epoch 2 (step 4)" in capsys.readouterr().out
    assert load_checkpoint(out)[1]["epoch"] == 2
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines() if '"kind": "epoch"' in line]
    assert epochs == [1, 2]


def test_non_finite_loss_exits_1_with_one_line(tiny, capsys, tmp_path, monkeypatch):
    from icnn.loss import FilterLoss

    monkeypatch.setattr(FilterLoss, "forward", lambda self, x, y: x.sum() * float("inf"))
    assert main(["train", *tiny, "--epochs", "1", "--out", str(tmp_path / "r")]) == 1
    assert _error_line(capsys).startswith("non-finite loss at epoch 1, step 1 (batch 1 of the epoch): filter/top = ")
