"""The training loop: exact resume (epoch boundary and mid-epoch), non-finite stop, logs.

Every run is a few steps of a 4-filter network on 16x16 images (CPU, deterministic).
"""

import dataclasses
import json

import pytest
import torch

from icnn.loss import FilterLoss
from icnn.mask import PartMask
from icnn.training import NonFiniteLossError, TrainConfig, checkpoint, classify, load_checkpoint, train
from icnn.training.classify import ClassifierObjective
from icnn.training.config import ConfigError

from .fakes import TinyParts, tiny_net


class Killed(Exception):
    """Stands for the process being killed."""


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        arch="tiny", image_size=16, epochs=3, batch_size=4, lr=0.05, lr_schedule="step", lr_step=1, lr_gamma=0.5,
        seed=7, device="cpu", out=str(out), log_every=2, progress=False, augment=True,
        filter_loss={"lambda_": 0.05},
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg, resume=None, **kw):
    # dropout + augmentation exercise every RNG that resume must restore
    return train(cfg, resume=resume, model=tiny_net(dropout=0.5, seed=123), train_set=TinyParts(18, augment=True), eval_set=TinyParts(6, seed=1), **kw)


def _assert_same_checkpoint(a, b):
    wa, sa, _ = load_checkpoint(a)
    wb, sb, _ = load_checkpoint(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["objective"].keys() == sb["objective"].keys()
    for k, v in sa["objective"].items():
        assert torch.equal(v, sb["objective"][k]), k
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])


def _epoch_rows(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    result = _run(_cfg(out))
    return out, result


def test_uninterrupted_run_writes_layout_and_logs(uninterrupted):
    out, result = uninterrupted
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "config.json", "log.csv", "log.jsonl"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["config.json", "model.safetensors", "state.pt"]
    rows = _epoch_rows(out)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["step"] == 15  # 5 batches (18 images, batch 4) x 3 epochs
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12, 14]
    for key in ("loss", "task", "filter/new", "filter/top", "accuracy", "eval/accuracy", "lr", "new/lambda", "new/spatial_entropy"):
        assert key in epochs[-1], key
    assert [r["lr"] for r in epochs] == [0.05, 0.025, 0.0125]  # logged before the epoch's scheduler step
    assert epochs[0]["images"] == 18
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert {"kind", "epoch", "step", "loss", "new/lambda"} <= set(header)
    assert len((out / "log.csv").read_text().splitlines()) == 1 + len(rows)
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    assert len(result.history) == 3 and result.step == 15


def test_resume_after_epoch_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
    out_a, _ = uninterrupted
    real_save = checkpoint.save_checkpoint
    calls = []

    def save_then_die(*a, **k):
        path = real_save(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            raise Killed  # killed right after the epoch-1 checkpoint
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(_cfg(tmp_path))
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    result = _run(_cfg(tmp_path), resume=tmp_path)
    assert [r["epoch"] for r in result.history] == [2, 3]
    _assert_same_checkpoint(out_a, tmp_path)
    assert _epoch_rows(out_a) == _epoch_rows(tmp_path)


def test_resume_mid_epoch_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
    out_a, _ = uninterrupted
    real_step = ClassifierObjective.step
    calls = []

    def step_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 10:  # killed in epoch 2 after step 9, one step past the step-8 checkpoint
            raise Killed
        return real_step(*a, **k)

    monkeypatch.setattr(ClassifierObjective, "step", step_then_die)
    cfg = _cfg(tmp_path, checkpoint_every=4, log_every=1)
    with pytest.raises(Killed):
        _run(cfg)
    assert [r["step"] for r in _epoch_rows(tmp_path) if r["kind"] == "step"][-1] == 9
    state = load_checkpoint(tmp_path)[1]
    assert (state["epoch"], state["batches_done"], state["step"], state["epoch_done"]) == (2, 3, 8, False)
    monkeypatch.setattr(ClassifierObjective, "step", real_step)
    _run(cfg, resume=tmp_path)
    _assert_same_checkpoint(out_a, tmp_path)
    assert [r["step"] for r in _epoch_rows(tmp_path) if r["kind"] == "step"] == list(range(1, 16))
    # the resumed run's log reads as one run (rows after the checkpoint were dropped)
    assert [r for r in _epoch_rows(tmp_path) if r["kind"] == "epoch"] == [r for r in _epoch_rows(out_a) if r["kind"] == "epoch"]


def test_resume_of_finished_run_does_nothing(uninterrupted, tmp_path):
    out_a, _ = uninterrupted
    result = _run(_cfg(out_a), resume=out_a)
    assert result.history == [] and result.step == 15


def test_non_finite_filter_loss_stops_loudly_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = FilterLoss.forward

    def nan_in_epoch_2(self, x, labels):
        loss = real(self, x, labels)
        return loss * float("nan") if int(self.stats.epoch) == 2 else loss

    monkeypatch.setattr(FilterLoss, "forward", nan_in_epoch_2)
    cfg = _cfg(tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 6 \(batch 1 of the epoch\): filter/top = nan") as err:
        _run(cfg)
    assert "filter/new = nan" in str(err.value) and "task = " in str(err.value)
    weights, state, _ = load_checkpoint(tmp_path)
    assert state["epoch"] == 1 and state["epoch_done"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sorted(p.name for p in (tmp_path).iterdir()) == [".lock", "checkpoint", "config.json", "log.csv", "log.jsonl"]


def test_non_finite_task_loss_names_the_task_term(tmp_path):
    data = TinyParts(8)
    data.images[:] = float("nan")
    cfg = _cfg(tmp_path, epochs=1, eval_split=None)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 .*task = nan"):
        train(cfg, model=tiny_net(interpretable=False), train_set=data)
    assert not (tmp_path / "checkpoint").exists()


def test_ordinary_twin_has_no_filter_losses(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, interpretable=False)
    result = train(cfg, model=tiny_net(interpretable=False), train_set=TinyParts(8))
    row = result.history[0]
    assert not any(k.startswith("filter/") for k in row)
    assert row["loss"] == pytest.approx(row["task"])
    assert not any(k.startswith("filter_losses.") for k in load_checkpoint(tmp_path)[1]["objective"])


def test_backbone_lr_multiplier_and_optimizers():
    from icnn.training.loop import make_optimizer

    model = tiny_net()
    cfg = TrainConfig(lr=0.1, backbone_lr_mult=0.1)
    opt = make_optimizer(classify.param_groups(model, cfg), cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["new"]["lr"] == 0.1
    n_backbone = sum(p.numel() for p in list(model.stem.parameters()) + list(model.layers["top"].parameters()))
    assert sum(p.numel() for p in groups["backbone"]["params"]) == n_backbone
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    adam = dataclasses.replace(cfg, optimizer="adam")
    assert isinstance(make_optimizer(classify.param_groups(model, adam), adam), torch.optim.Adam)


def test_bad_filter_loss_option_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, filter_loss={"lambda": 0.1})
    with pytest.raises(ConfigError, match="filter_loss: unknown filter loss option"):
        train(cfg, model=tiny_net(), train_set=TinyParts(8))


def test_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'bacth_size'"):
        TrainConfig.from_dict({"bacth_size": 3}, source="run.toml")
    with pytest.raises(ConfigError, match=r"batch_size: must be a positive integer \(got 0\)") as err:
        TrainConfig.from_dict({"batch_size": 0})
    assert err.value.field == "batch_size"
    with pytest.raises(ConfigError, match="optimizer: must be one of sgd, adam"):
        TrainConfig.from_dict({"optimizer": "rmsprop"})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0 and isinstance(TrainConfig.from_dict({"lr": 1}).lr, float)


def test_filter_loss_layers_and_maps_options(tmp_path, monkeypatch):
    # "layers": only the named interpretable layers carry a filter loss
    cfg = _cfg(tmp_path / "a", epochs=1, filter_loss={"lambda_": 0.05, "layers": ["new"]})
    row = train(cfg, model=tiny_net(), train_set=TinyParts(8)).history[0]
    assert any(k.startswith("filter/new") for k in row) and not any(k.startswith("filter/top") for k in row)
    with pytest.raises(ConfigError, match="unknown layer 'fc9'"):
        train(_cfg(tmp_path / "b", epochs=1, filter_loss={"layers": ["fc9"]}), model=tiny_net(), train_set=TinyParts(8))
    # "on": the losses read the masked maps instead of the ReLU maps
    seen = []
    real_forward = FilterLoss.forward

    def spy(self, x, labels):
        seen.append(x.detach().clone())
        return real_forward(self, x, labels)

    monkeypatch.setattr(FilterLoss, "forward", spy)
    model = tiny_net()
    train(_cfg(tmp_path / "c", epochs=1, batch_size=8, lr=1e-9, filter_loss={"lambda_": 0.0, "on": "masked", "layers": "new"}),
          model=model, train_set=TinyParts(8))
    assert len(seen) == 1
    m = model.layers["new"].mask.mask(seen[0])
    assert (seen[0][m <= 0] == 0).all() and (seen[0] > 0).any()  # masked maps: zero wherever the template is <= 0
    with pytest.raises(ConfigError, match="on must be"):
        train(_cfg(tmp_path / "d", epochs=1, filter_loss={"on": "pre"}), model=tiny_net(), train_set=TinyParts(8))


def test_mask_strength_schedule_values():
    assert classify.mask_strength(0.0, 1, 0, 10) == 1.0  # no warm-up: the paper's mask from the start
    assert classify.mask_strength(2.0, 1, 0, 10) == 0.0
    assert classify.mask_strength(2.0, 1, 5, 10) == pytest.approx(0.25)
    assert classify.mask_strength(2.0, 2, 5, 10) == pytest.approx(0.75)
    assert classify.mask_strength(2.0, 3, 0, 10) == 1.0
    assert classify.mask_strength(0.5, 1, 9, 10) == 1.0


def test_mask_warmup_ramps_the_masks_during_training(tmp_path, monkeypatch):
    seen = []
    real_step = ClassifierObjective.step

    def spy(self, batch):
        seen.append(sorted({m.strength for m in self.model.modules() if isinstance(m, PartMask)}))
        return real_step(self, batch)

    monkeypatch.setattr(ClassifierObjective, "step", spy)
    model = tiny_net()
    train(_cfg(tmp_path, epochs=2, batch_size=4, mask_warmup_epochs=1.0), model=model, train_set=TinyParts(8))
    # 2 steps per epoch: strengths 0, 0.5 in epoch 1, then the full mask
    assert seen == [[0.0], [0.5], [1.0], [1.0]]
    assert all(m.strength == 1.0 for m in model.modules() if isinstance(m, PartMask))
    with pytest.raises(ConfigError, match=r"mask_warmup_epochs: must be below epochs \(2\)"):
        _cfg(tmp_path, epochs=2, mask_warmup_epochs=2.0).validate()
    with pytest.raises(ConfigError, match="mask_warmup_epochs: must be a finite non-negative number"):
        _cfg(tmp_path, mask_warmup_epochs=-1.0).validate()


def test_mask_options_reach_the_model_and_the_checkpoint(tmp_path):
    from icnn.training import load_model

    cfg = _cfg(tmp_path, arch="small_cnn", epochs=1, batch_size=8, mask={"beta": "adaptive", "beta_rate": 0.5},
               filter_loss={"lambda_": 0.0})
    model = train(cfg, train_set=TinyParts(8), eval_set=TinyParts(4, seed=1)).model
    masks = [m for m in model.modules() if isinstance(m, PartMask)]
    assert len(masks) == 2 and all(m.adaptive and m.beta_f.numel() == 128 for m in masks)
    assert not torch.allclose(masks[0].beta_f, torch.full_like(masks[0].beta_f, 0.1))  # moved during training
    loaded, loaded_cfg, _ = load_model(tmp_path)
    for a, b in zip(masks, [m for m in loaded.modules() if isinstance(m, PartMask)]):
        assert b.adaptive and torch.equal(a.beta_f, b.beta_f)
    assert loaded_cfg.mask == {"beta": "adaptive", "beta_rate": 0.5}
    with pytest.raises(ConfigError, match="mask: beta must be a positive number"):
        _cfg(tmp_path, mask={"beta": "nope"}).validate()
    with pytest.raises(ConfigError, match="mask: .*unexpected keyword"):
        _cfg(tmp_path, mask={"bta": 3}).validate()


def test_cliff_warning_names_the_layer_whose_filters_fell_silent(tmp_path, capsys):
    row = {"epoch": 3, "top/silent_fraction": 0.25, "new/silent_fraction": 0.625, "new/lambda": 0.1}
    (warning,) = classify.cliff_warnings(row)  # 25% is not above the threshold
    assert warning.startswith("62% of layer 'new''s filters were silent in epoch 3") and "--lambda" in warning
    from icnn.training.loop import _print_epoch

    _print_epoch({"loss": 0.5, "accuracy": 0.5, **row}, 4, classify.cliff_warnings(row))
    assert "warning: 62% of layer 'new'" in capsys.readouterr().err
    assert classify.cliff_warnings({"epoch": 1, "new/silent_fraction": 0.0}) == []


def test_runaway_warning_compares_the_mean_max_with_the_first_epoch():
    first = {"top/mean_max": 2.0, "new/mean_max": 1.5}
    row = {"epoch": 4, "top/mean_max": 200.0, "new/mean_max": 1500.0}  # top: exactly 100x, not above
    (warning,) = classify.cliff_warnings(row, first)
    assert "layer 'new' grew 1e+03-fold since the first epoch" in warning and "lower --lambda" in warning
    assert classify.cliff_warnings(row) == []  # no baseline yet


def test_stem_lr_multiplier_splits_the_backbone_and_zero_keeps_the_stem_fixed(tmp_path):
    model = tiny_net()
    groups = {g["name"]: g for g in classify.param_groups(model, TrainConfig(lr=0.1, backbone_lr_mult=0.1, stem_lr_mult=0))}
    assert [groups[k]["lr"] for k in ("stem", "top", "new")] == [0.0, pytest.approx(0.01), 0.1]
    assert {id(p) for p in groups["stem"]["params"]} == {id(p) for p in model.stem.parameters()}
    assert {id(p) for p in groups["top"]["params"]} == {id(p) for p in model.layers["top"].parameters()}
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items() if v.is_floating_point()}
    top_before = [p.detach().clone() for p in model.layers["top"].parameters()]
    cfg = _cfg(tmp_path, epochs=1, stem_lr_mult=0.0, backbone_lr_mult=0.5, augment=False)
    trained = train(cfg, model=model, train_set=TinyParts(8), eval_set=None).model
    for name, p in trained.stem.named_parameters():  # lr 0: weights (not BN statistics) unchanged
        assert torch.equal(p.detach(), stem_before[name]), name
    assert any(not torch.equal(a, b.detach()) for a, b in zip(top_before, trained.layers["top"].parameters()))
    with pytest.raises(ConfigError, match="stem_lr_mult: must be a finite non-negative number"):
        TrainConfig.from_dict({"stem_lr_mult": -1})
    assert TrainConfig.from_dict({"stem_lr_mult": 0}).stem_lr_mult == 0.0


def test_resume_with_another_stem_lr_mult_names_the_option(tmp_path):
    _run(_cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"stem_lr_mult: a resumed run keeps its checkpoint's setting \(stem_lr_mult = None"):
        _run(_cfg(tmp_path, epochs=2, stem_lr_mult=0.0), resume=tmp_path)


def _bn_stem_net(seed: int = 0):
    from torch import nn

    from icnn.models import linear_head, assemble

    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    top = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    return assemble(stem, top, linear_head(), num_classes=1, interpretable=True, image_size=16, arch="tiny")


def test_freeze_stem_keeps_weights_and_batchnorm_statistics_and_computes_no_stem_gradient(tmp_path):
    model = _bn_stem_net()
    groups = {g["name"]: g for g in classify.param_groups(model, TrainConfig(lr=0.1, backbone_lr_mult=0.1, freeze_stem=True))}
    assert sorted(groups) == ["backbone", "new"]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.layers["top"].parameters()}
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    top_before = [p.detach().clone() for p in model.layers["top"].parameters()]
    cfg = _cfg(tmp_path / "frozen", epochs=2, freeze_stem=True, backbone_lr_mult=0.5, augment=False)
    trained = train(cfg, model=model, train_set=TinyParts(8), eval_set=TinyParts(4, seed=1)).model
    for name, v in trained.stem.state_dict().items():  # weights and running statistics, bit for bit
        assert torch.equal(v, stem_before[name]), name
    assert all(not p.requires_grad and p.grad is None for p in trained.stem.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(top_before, trained.layers["top"].parameters()))
    # --stem-lr-mult 0 keeps the weights but not the BatchNorm statistics: what --freeze-stem adds
    cfg = _cfg(tmp_path / "lr0", epochs=2, stem_lr_mult=0.0, backbone_lr_mult=0.5, augment=False)
    moved = train(cfg, model=_bn_stem_net(), train_set=TinyParts(8), eval_set=None).model.stem.state_dict()
    assert torch.equal(moved["0.weight"], stem_before["0.weight"])
    assert not torch.equal(moved["1.running_mean"], stem_before["1.running_mean"])


def test_freeze_stem_config_errors_and_resume_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match="stem_lr_mult: 0.5 contradicts freeze_stem"):
        TrainConfig.from_dict({"freeze_stem": True, "stem_lr_mult": 0.5})
    assert TrainConfig.from_dict({"freeze_stem": True, "stem_lr_mult": 0}).freeze_stem
    with pytest.raises(ConfigError, match="freeze_stem: must be true or false"):
        TrainConfig.from_dict({"freeze_stem": "yes"})
    _run(_cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"freeze_stem: a resumed run keeps its checkpoint's setting \(freeze_stem = False"):
        _run(_cfg(tmp_path, epochs=2, freeze_stem=True), resume=tmp_path)


def test_cpu_amp_runs_the_forward_in_bfloat16_and_keeps_the_weights_float32(tmp_path):
    """``cpu_amp``: the training forward runs under CPU bfloat16 autocast (the convs' outputs are
    bf16), the weights and the checkpoint stay float32 and finite, and the run differs from the
    float32 one only by that precision. Without it CPU runs are untouched by ``amp``."""
    from icnn.training.loop import autocast_for

    cpu = torch.device("cpu")
    with autocast_for(cpu, _cfg(tmp_path)):  # amp is GPU-only: no autocast on CPU
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for(cpu, _cfg(tmp_path, cpu_amp=True)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    dtypes = []
    runs = {}
    for amp in (False, True):
        out = tmp_path / f"amp{int(amp)}"
        model = tiny_net(dropout=0.5, seed=123)
        model.layers["new"].register_forward_hook(lambda m, i, o: dtypes.append(o[0].dtype) if torch.is_grad_enabled() else None)  # its maps
        train(_cfg(out, epochs=1, cpu_amp=amp), model=model, train_set=TinyParts(18, augment=True), eval_set=TinyParts(6, seed=1))
        weights, _, _ = load_checkpoint(out / "checkpoint")
        assert all(v.dtype != torch.bfloat16 and bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
        runs[amp] = weights
    assert set(dtypes) == {torch.float32, torch.bfloat16}
    assert any(not torch.equal(runs[False][k], runs[True][k]) for k in runs[False] if runs[False][k].is_floating_point())
