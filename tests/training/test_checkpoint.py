"""Checkpoints: atomic directory swap (crash simulations), RNG round trip, clear read errors."""

import os
import random

import numpy as np
import pytest
import torch

from icnn.training import checkpoint as ck
from icnn.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint


def _model(fill: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(fill)
        m.bias.fill_(-fill)
    return m


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_save_load_round_trip(tmp_path):
    save_checkpoint(tmp_path, _model(1.0), {"epoch": 3, "x": torch.arange(4)}, {"arch": "tiny"})
    weights, state, config = load_checkpoint(tmp_path)
    assert torch.equal(weights["weight"], torch.ones(2, 3))
    assert state["epoch"] == 3 and torch.equal(state["x"], torch.arange(4))
    assert config == {"arch": "tiny"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["config.json", "model.safetensors", "state.pt"]


def test_crash_while_writing_a_file_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _model(1.0), {"epoch": 1}, {"v": 1})
    before = _files(tmp_path / "checkpoint")
    real = ck.atomic_write_bytes

    def crash_on_state(path, data):
        if path.name == ck.STATE_FILE:  # half the bytes reach the disk, then the process dies
            with open(path.with_name(".partial"), "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError("simulated crash")
        real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", crash_on_state)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, _model(2.0), {"epoch": 2}, {"v": 2})
    assert _files(tmp_path / "checkpoint") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no half-written dir left
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1


def test_atomic_write_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_crash_between_directory_renames_falls_back_to_old(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _model(1.0), {"epoch": 1}, {"v": 1})
    before = _files(tmp_path / "checkpoint")
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if str(src).endswith(f"-{os.getpid()}") and os.path.basename(dst) == "checkpoint":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_final_rename)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _model(2.0), {"epoch": 2}, {"v": 2})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists()
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    assert _files(resolve_checkpoint(tmp_path)) == before
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1
    # the next save completes and cleans up
    save_checkpoint(tmp_path, _model(3.0), {"epoch": 3}, {"v": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert load_checkpoint(tmp_path)[1]["epoch"] == 3


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(5), np.random.rand(5), random.random()
    save_checkpoint(tmp_path, _model(0.0), {"rng": ck.rng_state()}, {})
    want = (torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(load_checkpoint(tmp_path)[1]["rng"])
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_unreadable_checkpoints_raise_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "run", _model(1.0), {"epoch": 1}, {})
    state = tmp_path / "run" / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match="state.pt: unreadable state") as err:
        load_checkpoint(tmp_path / "run")
    assert "\n" not in str(err.value)
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable weights"):
        load_checkpoint(tmp_path / "run" / "checkpoint")


def test_head_norm_travels_through_the_config_to_a_loaded_model(tmp_path):
    from icnn.training import TrainConfig
    from icnn.training import build_model_for, load_model
    from icnn.training.config import ConfigError

    cfg = TrainConfig(arch="small_cnn", image_size=32, head_norm=True, out=str(tmp_path))
    net = build_model_for(cfg, num_classes=1)
    assert isinstance(net.head.norm, torch.nn.BatchNorm1d)
    with torch.no_grad():  # statistics that make the eval-mode norm far from the identity
        net.head.norm.running_mean.fill_(2.0)
        net.head.norm.running_var.fill_(9.0)
    save_checkpoint(tmp_path, net, {"num_classes": 1}, cfg.to_dict())
    model, loaded_cfg, _ = load_model(tmp_path)
    assert loaded_cfg.head_norm is True
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(x), net.eval()(x))
    old = {k: v for k, v in cfg.to_dict().items() if k != "head_norm"}  # a checkpoint from before the option
    assert TrainConfig.from_dict(old).head_norm is False
    with pytest.raises(ConfigError, match="head_norm"):
        TrainConfig.from_dict({"head_norm": "yes"})


def test_resume_conflicts_name_what_a_run_computes():
    """A resumed run may change how it runs (epochs, device), not what it computes (lr, lambda);
    an ordinary twin computes nothing with the filter loss or the masks."""
    from icnn.training import TrainConfig

    saved = TrainConfig(interpretable=True, filter_loss={"lambda_": 0.6}).to_dict()
    now = TrainConfig(interpretable=True, filter_loss={"lambda_": 0.3}, epochs=9, lr=0.5)
    assert now.resume_conflicts(saved) == {"lr": (0.01, 0.5), "filter_loss": ({"lambda_": 0.6}, {"lambda_": 0.3})}
    saved = TrainConfig(interpretable=False, filter_loss={"lambda_": 0.6}).to_dict()
    now = TrainConfig(interpretable=False, filter_loss={"diversity": 1.0}, mask={"beta": "adaptive"}, epochs=9)
    assert now.resume_conflicts(saved) == {}
    # an interpretable run may not resume an ordinary one
    conflicts = TrainConfig(interpretable=True, filter_loss={"lambda_": 0.6}).resume_conflicts(saved)
    assert conflicts == {"interpretable": (False, True)}


def test_head_hidden_travels_through_the_config_to_a_loaded_model(tmp_path):
    from icnn.training import TrainConfig
    from icnn.training import build_model_for, load_model

    cfg = TrainConfig(arch="small_cnn", image_size=32, head_norm=True, head_hidden=5, out=str(tmp_path))
    net = build_model_for(cfg, num_classes=1)
    assert net.head.hidden.out_features == 5 and net.head.fc.in_features == 5
    save_checkpoint(tmp_path, net, {"num_classes": 1}, cfg.to_dict())
    model, loaded_cfg, _ = load_model(tmp_path)
    assert loaded_cfg.head_hidden == 5
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(x), net.eval()(x))
    assert TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "head_hidden"}).head_hidden == 0
