"""Explainer networks (paper 003): structure and initialisation copied from the performer, the
performer untouched, p and the norm-layers, the filter loss's gradient kept out of the ordinary
track, lambda_l / lambda_f, and `icnn explain` end to end on tiny synthetic images."""

import json
import math
from pathlib import Path
from collections import OrderedDict

import pytest
import torch
from torch import nn

from icnn.data import build_dataset
from icnn.explainer import (
    ChannelNorm,
    ExplainedNet,
    ExplainerConfig,
    ExplainerError,
    ExplainerLoss,
    build_explainer,
    evaluate_explainer,
    load_explainer,
    performer_targets,
    train_explainer,
)
from icnn.metrics.receptive_field import compose, conv_geometry, layer_geometry
from icnn.models import build_model
from icnn.models.net import fc_head, assemble

torch.set_num_threads(1)


def fc_performer(seed: int = 0) -> nn.Module:
    """A tiny AlexNet-like performer: conv stem, top conv, pool5 -> fc6 -> fc7 -> fc8."""
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 6, 8, 8) at 16 px
    top = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
    net = assemble(stem, top, fc_head(nn.MaxPool2d(2), hidden=10, dropout=0.5), num_classes=1,
                             interpretable=False, image_size=16, arch="tiny_fc")  # fmt: skip
    for m in net.head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.3)
    return net.eval()


def gap_performer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=1, interpretable=False, image_size=32, width=2).eval()


def tiny_set(split="train", n=8, size=32):
    return build_dataset("synthetic", split=split, task="single", image_size=size, num_samples=n)


def cfg(tmp_path, **kw):
    base = dict(epochs=1, batch_size=4, out=str(tmp_path / "run"), device="cpu", progress=False, log_every=0)
    return ExplainerConfig(**{**base, **kw})


# --------------------------------------------------------------------------------- structure


def test_fc_head_shapes_and_initialisation_copied_from_the_performer():
    perf = fc_performer()
    ex = build_explainer(perf).eval()
    assert ex.targets == ["fc6", "fc7"]
    assert list(ex.tail._modules) == ["relu7", "drop7", "fc8"]
    # fc-dec-1/2 are copies of fc6/fc7 (equal values, separate storage)
    for dec, fc in ((ex.decoder["fc_dec_1"], perf.head.fc6), (ex.decoder["fc_dec_2"], perf.head.fc7)):
        assert torch.equal(dec.weight, fc.weight) and torch.equal(dec.bias, fc.bias)
        assert dec.weight.data_ptr() != fc.weight.data_ptr()
    # conv-interp-1 = the performer's next conv: same maps as its "top" layer
    x = torch.rand(3, 3, 16, 16)
    pf = performer_targets(perf, x, "stem", ex.targets)
    o = ex(pf.read)
    assert torch.allclose(o.relu["interp1"], pf.maps.relu["top"], atol=1e-6)
    assert o.relu["interp2"].shape == o.ordin.shape == (3, 6, 8, 8)
    assert o.x_enc.shape == (3, 6, 4, 4)  # pool5 of the performer
    assert [z.shape for z in o.recon] == [(3, 10), (3, 10)]
    assert o.logits.shape == (3, 1)
    # with w_p -> inf the decoder sees the interpretable track only, via the performer's own head
    with torch.no_grad():
        ex.w_p.fill_(50.0)
    o = ex(pf.read)
    assert torch.allclose(o.x_enc, ex.pool(ex.norm_interp(o.masked["interp2"])), atol=1e-6)


def test_batchnorm_of_the_next_conv_is_folded_into_conv_interp_1():
    perf = gap_performer()
    with torch.no_grad():  # non-trivial BN statistics
        for m in perf.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ex = build_explainer(perf).eval()
    assert ex.targets == ["flatten"]  # GAP head: the pooled features the final linear reads
    assert torch.equal(ex.decoder["fc_dec_1"].weight, torch.eye(8))
    pf = performer_targets(perf, torch.rand(2, 3, 32, 32), "stem", ex.targets)
    o = ex(pf.read)
    assert torch.allclose(o.relu["interp1"], pf.maps.relu["top"], atol=1e-5)


def test_bad_reconstruction_target_and_layer_are_one_line_errors():
    perf = fc_performer()
    with pytest.raises(ExplainerError, match="'fc9' is not a module"):
        build_explainer(perf, reconstruct=["fc9"])
    with pytest.raises(ExplainerError, match="reads one of stem, top"):
        build_explainer(perf, layer="new")


@pytest.mark.parametrize("targets", [["fc7"], ["relu6"], ["flatten", "fc7"]])
def test_a_target_that_cannot_read_the_one_before_it_is_refused_before_any_forward(tmp_path, targets):
    """fc7 alone (or relu6, or fc7 after the flatten) would read the flatten's 96 features where
    it takes fc6's 10: one line naming the target, when the explainer is built, before training."""
    bad = targets[-1] if targets[-1] == "fc7" else targets[0]
    with pytest.raises(ExplainerError, match=rf"^reconstruct: '{bad}' takes 10 features but would read the 96 of 'flatten' \("):
        build_explainer(fc_performer(), reconstruct=targets)
    with pytest.raises(ExplainerError, match=rf"reconstruct: '{bad}' takes 10 features"):
        train_explainer(fc_performer(), tiny_set(n=4, size=16), cfg(tmp_path, reconstruct=targets))
    assert not (tmp_path / "run").exists()
    build_explainer(fc_performer(), reconstruct=["fc6", "fc8"])  # fc8 reads fc6's 10: fine


def test_receptive_field_of_conv_interp_2_composes_the_layer_read_with_two_3x3_convs():
    perf = fc_performer()
    net = ExplainedNet(perf, build_explainer(perf))
    k3 = conv_geometry(3, 1, 1)
    assert layer_geometry(net, "interp2") == compose(layer_geometry(perf, "stem"), k3, k3)
    assert layer_geometry(net, "interp2") == layer_geometry(perf, "new")  # same depth as the top conv-layer


# --------------------------------------------------------------------------------- norm-layer and p


def test_norm_layer_divides_by_the_running_mean_magnitude():
    norm = ChannelNorm(2, momentum=0.25).train()
    a = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    b = 2 * a
    norm(torch.cat((a, 3 * a)))  # first batch: alpha = E sum_ij max(x, 0) = (4 + 12) / 2, (2 + 6) / 2
    assert torch.equal(norm.alpha, torch.tensor([8.0, 4.0]))
    y = norm(b)  # alpha <- 0.75 alpha + 0.25 * (8, 4) = (8, 4)
    assert torch.equal(norm.alpha, torch.tensor([8.0, 4.0]))
    norm(torch.zeros(1, 2, 2, 2))
    assert torch.equal(norm.alpha, torch.tensor([6.0, 3.0]))
    assert torch.equal(y, b / torch.tensor([8.0, 4.0])[None, :, None, None])
    norm.eval()
    out = norm(a)  # evaluation: no update
    assert torch.equal(norm.alpha, torch.tensor([6.0, 3.0]))
    assert torch.allclose(out[0, 0], a[0, 0] / 6) and torch.allclose(out[0, 1], a[0, 1] / 3)


def test_norm_statistics_after_training_make_channels_equal_magnitude(tmp_path):
    perf = gap_performer()
    res = train_explainer(perf, tiny_set(n=8), cfg(tmp_path, norm_momentum=1.0))
    ex = res.model.train()
    pf = performer_targets(perf, torch.stack([tiny_set(n=8)[i]["image"] for i in range(8)]), "stem", ex.targets)
    o = ex(pf.read)  # momentum 1: alpha = this batch's mean magnitude
    mags = o.ordin_hat.clamp_min(0).sum((-2, -1)).mean(0)
    active = ex.norm_ordin.alpha > 1e-6
    assert torch.allclose(mags[active], torch.ones_like(mags[active]), atol=1e-5)


def test_p_rises_under_minus_eta_log_p(tmp_path):
    """Only -eta log p (no reconstruction, no filter loss): d/dw_p = -eta (1 - p), so plain SGD
    moves w_p by lr * eta * (1 - p) per step."""
    perf = gap_performer()
    c = cfg(tmp_path, lambda_rec=0.0, lambda_f_scale=0.0, optimizer="sgd", momentum=0.0, p_lr=1e-7, lr=0.0)
    res = train_explainer(perf, tiny_set(n=8), c)  # 2 steps
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    w1 = 1e-7 * 1e6 * (1 - sig(0.0))
    w2 = w1 + 1e-7 * 1e6 * (1 - sig(w1))
    assert res.model.w_p.item() == pytest.approx(w2, rel=1e-5)
    assert res.history[0]["p"] == pytest.approx((0.5 + sig(w1)) / 2, rel=1e-5)  # epoch mean of p


# --------------------------------------------------------------------------------- gradients


def _loss_setup(perf, **kw):
    ex = build_explainer(perf).train()
    c = ExplainerConfig(**kw)
    x = torch.rand(4, 3, 16, 16)
    pf = performer_targets(perf, x, "stem", ex.targets)
    o = ex(pf.read)
    loss = ExplainerLoss(ex, (8, 8), c, eta=kw.get("eta", 1e6))
    return ex, loss, o, pf


def test_filter_loss_sends_no_gradient_into_the_ordinary_track():
    perf = fc_performer()
    ex, loss, o, pf = _loss_setup(perf, eta=0.0)
    loss.lambda_l.zero_()  # no reconstruction: the filter losses alone
    loss.rec_norm.fill_(1.0)
    loss.f_norm.fill_(1.0)  # lambda_f = 1/300
    total, _ = loss(o, pf, epoch=1)
    total.backward()
    assert ex.ordin.conv.weight.grad is None or not ex.ordin.conv.weight.grad.any()
    assert ex.layers["interp2"].body.conv.weight.grad.abs().sum() > 0
    assert ex.layers["interp1"].body.conv.weight.grad.abs().sum() > 0
    assert ex.w_p.grad is not None and ex.w_p.grad.item() != 0  # the filter loss acts on p


def test_reconstruction_does_reach_the_ordinary_track():
    perf = fc_performer()
    ex, loss, o, pf = _loss_setup(perf, eta=0.0)
    loss.lambda_l.fill_(1.0)
    total, _ = loss(o, pf, epoch=1)
    total.backward()
    assert ex.ordin.conv.weight.grad.abs().sum() > 0


def test_lambda_f_follows_the_appendix_schedule():
    perf = fc_performer()
    ex, loss, o, pf = _loss_setup(perf)
    loss.lambda_l.fill_(1.0)
    assert torch.equal(loss.lambda_f(1), torch.zeros(2, 6))  # no estimate before the first step
    total, _ = loss(o, pf, epoch=1)
    total.backward()
    loss.after_backward(float(o.p.detach()))
    assert (loss.rec_norm > 0).any() and (loss.f_norm > 0).any()
    ratio = torch.where(loss.f_norm > 0, loss.rec_norm / loss.f_norm, torch.zeros_like(loss.f_norm))
    assert torch.allclose(loss.lambda_f(1), ratio / 300)
    assert torch.allclose(loss.lambda_f(3), ratio / 900)


def test_lambda_l_is_5e4_over_the_mean_norm_of_the_positive_part():
    perf = fc_performer()
    ex, loss, _, _ = _loss_setup(perf)
    a = torch.tensor([[3.0, -4.0], [0.0, -1.0]])  # ||max(x, 0)|| = 3, 0
    b = torch.tensor([[3.0, 4.0], [6.0, 8.0]])  # 5, 10
    loss.estimate_lambda_l([[a, b]])
    assert torch.allclose(loss.lambda_l, torch.tensor([5e4 / 1.5, 5e4 / 7.5]))


def test_lambda_logit_is_5e4_over_the_mean_logit_norm():
    perf = fc_performer()
    ex, loss, _, _ = _loss_setup(perf)
    a = torch.tensor([[3.0, -4.0], [0.0, -1.0]])
    b = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    logits = torch.tensor([[3.0, -4.0], [0.0, 1.0]])  # ||.|| = 5, 1 (signed: logits keep their sign)
    loss.estimate_lambda_l([[a, b, logits]])
    assert torch.allclose(loss.lambda_l, torch.tensor([5e4 / 1.5, 5e4 / 7.5]))
    assert loss.lambda_logit.item() == pytest.approx(5e4 / 3.0)
    loss.estimate_lambda_l([[a, b]])  # no logits given: no logit weight
    assert loss.lambda_logit.item() == 0.0


def test_logit_weight_adds_the_squared_logit_error():
    """logit_weight * lambda_logit * mean_x ||f(x_L) - f(x*_L)||^2, nothing else changed."""
    perf = fc_performer()
    torch.manual_seed(0)
    ex, plain, o, pf = _loss_setup(perf, eta=0.0, logit_weight=0.0)
    ex2, weighted, _, _ = _loss_setup(perf, eta=0.0, logit_weight=2.0)
    for m in (plain, weighted):
        m.lambda_l.fill_(1.0)
        m.lambda_logit.fill_(3.0)
    base, _ = plain(o, pf, epoch=1)
    total, terms = weighted(o, pf, epoch=1)
    by_hand = ((o.logits - pf.logits) ** 2).sum(1).mean() * 2.0 * 3.0
    assert by_hand.item() > 0
    assert (total - base).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_bad_logit_weight_is_one_line():
    from icnn.training import ConfigError

    with pytest.raises(ConfigError, match=r"logit_weight: must be a finite non-negative number \(got -1.0\)"):
        ExplainerConfig(logit_weight=-1.0).validate()


def test_resume_refuses_a_config_that_changes_what_it_computes(tmp_path):
    perf = gap_performer()
    train_explainer(perf, tiny_set(n=8), cfg(tmp_path, epochs=1))
    with pytest.raises(ExplainerError, match=r"lambda_f_scale: a resumed run keeps its checkpoint's setting .*asked for 3\.0"):
        train_explainer(perf, tiny_set(n=8), cfg(tmp_path, epochs=2, lambda_f_scale=3.0), resume=tmp_path / "run")
    res = train_explainer(perf, tiny_set(n=8), cfg(tmp_path, epochs=2, log_every=1), resume=tmp_path / "run")  # how it runs: fine
    assert [h["epoch"] for h in res.history] == [2]  # the epoch this call trained


def test_load_explainer_gives_the_trained_explainers_outputs(tmp_path):
    """The architecture comes from the run's config (here a non-default reconstruction target and
    norm momentum), the weights and norm statistics from its checkpoint: the loaded explainer, in
    eval mode, computes exactly what the trained one does, from the run or its checkpoint."""
    perf = fc_performer()
    c = cfg(tmp_path, epochs=2, reconstruct=["fc6"], norm_momentum=0.5)
    res = train_explainer(perf, tiny_set(n=8, size=16), c)
    x = torch.stack([tiny_set("test", 4, size=16)[i]["image"] for i in range(4)])
    read = performer_targets(perf, x, "stem", ()).read
    want = res.model.eval()(read)
    for path in (tmp_path / "run", res.checkpoint):
        ex, saved = load_explainer(perf, path)
        assert saved == c and not ex.training and ex.targets == ["fc6"]
        assert all(torch.equal(a, b) for a, b in zip(_tensors(want), _tensors(ex(read)), strict=True))


def _tensors(out):
    """An ExplainerOutput's tensors, in order (its dicts' values and lists' items)."""
    for v in out:
        yield from v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]


# --------------------------------------------------------------------------------- performer untouched


def test_performer_is_bit_identical_after_training_and_evaluation(tmp_path):
    perf = gap_performer()
    perf.train()  # its mode too is restored
    before = {k: v.clone() for k, v in perf.state_dict().items()}
    x = torch.stack([tiny_set("test", 4)[i]["image"] for i in range(4)])
    perf.eval()
    out_before = perf(x).clone()
    perf.train()
    res = train_explainer(perf, tiny_set(n=8), cfg(tmp_path, epochs=2))
    assert perf.training
    evaluate_explainer(perf, res.model, tiny_set("test", 4), config=_ecfg(top_k=3))
    assert perf.training
    after = perf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in perf.parameters())
    perf.eval()
    assert torch.equal(perf(x), out_before)


def test_cpu_amp_trains_the_explainer_in_bfloat16_and_leaves_the_performer_untouched(tmp_path):
    """``cpu_amp`` reaches the explainer's training forward (the same loop): it runs, its weights
    stay float32 and finite, the performer stays bit-identical, and the result differs from the
    float32 run's."""
    perf = gap_performer()
    before = {k: v.clone() for k, v in perf.state_dict().items()}
    runs = {amp: train_explainer(perf, tiny_set(n=8), cfg(tmp_path / f"amp{int(amp)}", epochs=2, cpu_amp=amp)) for amp in (False, True)}
    weights = {amp: r.model.state_dict() for amp, r in runs.items()}
    for w in weights.values():
        assert all(v.dtype != torch.bfloat16 and bool(torch.isfinite(v).all()) for v in w.values() if v.is_floating_point())
    assert any(not torch.equal(weights[False][k], weights[True][k]) for k in weights[False] if weights[False][k].is_floating_point())
    assert all(torch.equal(before[k], v) for k, v in perf.state_dict().items())


# --------------------------------------------------------------------------------- end to end


def test_icnn_explain_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    from icnn.cli import main
    from icnn.models import registry
    from icnn.models.small_cnn import small_cnn
    from icnn.training import TrainConfig
    from icnn.training.checkpoint import save_checkpoint

    monkeypatch.setitem(registry.MODELS, "small_cnn_w2", lambda **kw: small_cnn(width=2, **kw))
    tcfg = TrainConfig(arch="small_cnn_w2", interpretable=False, image_size=32, dataset_kwargs={"num_samples": 8},
                       head_norm=True, out=str(tmp_path / "perf"))  # fmt: skip
    torch.manual_seed(0)
    model = build_model("small_cnn_w2", num_classes=1, interpretable=False, image_size=32, head_norm=True)
    save_checkpoint(tmp_path / "perf", model, {"epoch": 1}, tcfg.to_dict())
    out = tmp_path / "ex"
    argv = ["explain", "--performer", str(tmp_path / "perf"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--top-k", "4", "--panels", "1", "--no-progress",
            "--config", str(tmp_path / "explain.toml"), "--lambda-f-scale", "0.01"]  # fmt: skip
    (tmp_path / "explain.toml").write_text("logit_weight = 0.5\nlambda_f_scale = 1.0\n")  # the flag wins over the file
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["logit_weight"] == 0.5 and saved["lambda_f_scale"] == 0.01
    m = json.loads((out / "metrics.json").read_text())
    for key in ("p", "performer_error", "explainer_error", "delta_error", "instability_ratio"):
        assert math.isfinite(m[key]), key
    for view in ("explainer", "performer_top", "performer_read"):
        assert math.isfinite(m[view]["location_instability"]) and 0.0 <= m[view]["silent_in_top"] <= 1.0
        assert "location_instability_firing" in m[view] and "peak_correlation" in m[view]["collapse"]
    assert 0 < m["p"] < 1
    assert (out / "report.html").read_text().count("<img") >= 2  # explainer and performer panels
    assert main(argv) == 2  # --out holds a run
    assert "already holds a run" in capsys.readouterr().err
    # a resumed run keeps what it computes: a flag that changes it is refused, naming the flag ...
    assert main([*argv[:argv.index("--lambda-f-scale")], "--lambda-f-scale", "3", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icnn: error: --lambda-f-scale: a resumed run keeps")
    # ... or, when it comes from --config, the file
    (tmp_path / "other.toml").write_text("logit_weight = 2.0\n")
    assert main([*argv[:argv.index("--config")], "--config", str(tmp_path / "other.toml"), "--lambda-f-scale", "0.01", "--resume", str(out)]) == 2
    assert "other.toml (logit_weight): a resumed run keeps its checkpoint's setting (logit_weight = 0.5)" in capsys.readouterr().err
    # ... and --resume with --epochs alone continues with the saved settings, not the defaults
    short = ["explain", "--performer", str(tmp_path / "perf"), "--out", str(out), "--epochs", "2", "--device", "cpu",
             "--top-k", "4", "--panels", "1", "--no-progress", "--resume", str(out)]  # fmt: skip
    assert main(short) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["logit_weight"], saved["lambda_f_scale"], saved["batch_size"], saved["epochs"]) == (0.5, 0.01, 4, 2)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    # another performer (different weights) cannot continue it
    torch.manual_seed(1)
    other = build_model("small_cnn_w2", num_classes=1, interpretable=False, image_size=32, head_norm=True)
    save_checkpoint(tmp_path / "perf2", other, {"epoch": 1}, tcfg.to_dict())
    short[short.index("--performer") + 1] = str(tmp_path / "perf2")
    assert main(short) == 2
    assert "not the performer the run in" in capsys.readouterr().err
    assert main(["explain", "--performer", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "--performer" in capsys.readouterr().err


def test_icnn_explain_refuses_a_target_that_cannot_read_the_one_before_it(tmp_path, capsys, monkeypatch):
    """A performer head with a hidden fc: its output fc reads the hidden layer's 5 features, not
    the flatten's 8, so it cannot be the only target; one line, exit 2, nothing written."""
    from icnn.cli import main
    from icnn.models import registry
    from icnn.models.small_cnn import small_cnn
    from icnn.training import TrainConfig
    from icnn.training.checkpoint import save_checkpoint

    monkeypatch.setitem(registry.MODELS, "small_cnn_w2", lambda **kw: small_cnn(width=2, **kw))
    tcfg = TrainConfig(arch="small_cnn_w2", interpretable=False, image_size=32, dataset_kwargs={"num_samples": 8},
                       head_hidden=5, out=str(tmp_path / "perf"))  # fmt: skip
    torch.manual_seed(0)
    model = build_model("small_cnn_w2", num_classes=1, interpretable=False, image_size=32, head_hidden=5)
    save_checkpoint(tmp_path / "perf", model, {"epoch": 1}, tcfg.to_dict())
    out = tmp_path / "ex"
    assert main(["explain", "--performer", str(tmp_path / "perf"), "--out", str(out), "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--reconstruct", "fc"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["icnn: error: reconstruct: 'fc' takes 5 features but would read the 8 of 'flatten' (each target reads "
                   "the output of the target before it, the first that of the flatten)"]  # fmt: skip
    assert not out.exists()


def test_icnn_explain_trains_on_the_train_split_it_is_given(tmp_path, monkeypatch):
    """``--train-split fit --eval-split val`` (choosing settings): the explainer trains on the
    training images without the validation ones and is evaluated on those; the split is saved."""
    import icnn.training.classify as classify
    from icnn.cli import main
    from icnn.models import registry
    from icnn.models.small_cnn import small_cnn
    from icnn.training import TrainConfig
    from icnn.training.checkpoint import save_checkpoint

    monkeypatch.setitem(registry.MODELS, "small_cnn_w2", lambda **kw: small_cnn(width=2, **kw))
    tcfg = TrainConfig(arch="small_cnn_w2", interpretable=False, image_size=32, dataset_kwargs={"num_samples": 8},
                       head_norm=True, out=str(tmp_path / "perf"))  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "perf", build_model("small_cnn_w2", num_classes=1, interpretable=False, image_size=32, head_norm=True),
                    {"epoch": 1}, tcfg.to_dict())  # fmt: skip
    splits, real = [], classify.build_dataset_for
    monkeypatch.setattr(classify, "build_dataset_for", lambda cfg, split, **kw: splits.append(split) or real(cfg, split, **kw))
    out = tmp_path / "ex"
    assert main(["explain", "--performer", str(tmp_path / "perf"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--device", "cpu", "--top-k", "4", "--panels", "1", "--no-progress", "--train-split", "fit",
                 "--eval-split", "val"]) == 0  # fmt: skip
    assert splits == ["fit", "val"]
    assert json.loads((out / "config.json").read_text())["train_split"] == "fit"
    assert json.loads((out / "metrics.json").read_text())["eval_split"] == "val"


# --------------------------------------------------------------------------------- part interpretability


class _NoParts:
    """``tiny_set`` without part annotations (no ``part_names``, no ``part_masks``)."""

    def __init__(self, base):
        self.base, self.image_size, self.classes = base, base.image_size, base.classes
        self.landmark_names = base.landmark_names

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {k: v for k, v in self.base[i].items() if k != "part_masks"}


def _ecfg(**kw):
    from icnn.evaluate import EvalConfig

    return EvalConfig(**{"reference_draws": 1, "progress": False, "device": "cpu", **kw})


def test_part_interpretability_of_the_three_views_matches_icnn_evaluate_on_the_top_layer():
    from icnn.evaluate import EvalConfig, evaluate

    perf = gap_performer()
    ex = build_explainer(perf).eval()
    data = tiny_set("test", n=16)
    assert data.part_names
    # settings where an untrained net's filters do hit parts (the default 0.5% / upsample gives 0 here)
    settings = dict(quantile=0.05, iou_threshold=0.2, rf_mode="rf")
    m = evaluate_explainer(perf, ex, data, config=_ecfg(batch_size=4, top_k=3, **settings)).metrics
    for name in ("explainer", "performer_top", "performer_read"):
        v = m[name]["part_interpretability"]
        assert math.isfinite(v) and 0.0 <= v <= 1.0, name
    # the performer's top conv-layer is the layer icnn.evaluate reads by default ("new")
    assert m["performer_top_layer"] == perf.layer_names[-1] == EvalConfig().layer
    ref = evaluate(perf, data, EvalConfig(batch_size=4, top_k=3, reference_draws=1, progress=False, **settings))
    assert ref.metrics["part_interpretability"] > 0  # not a trivial 0 == 0
    assert m["performer_top"]["part_interpretability"] == pytest.approx(ref.metrics["part_interpretability"], abs=1e-6)
    top = m["performer_top"]["part_interpretability"]
    assert m["part_interpretability_ratio"] == pytest.approx(m["explainer"]["part_interpretability"] / top)
    # exact streaming: the batching does not change any view's value
    m3 = evaluate_explainer(perf, ex, data, config=_ecfg(batch_size=3, top_k=3, **settings)).metrics
    for name in ("explainer", "performer_top", "performer_read"):
        assert m3[name]["part_interpretability"] == pytest.approx(m[name]["part_interpretability"], abs=1e-6)


def test_part_interpretability_is_skipped_without_part_masks():
    perf = gap_performer()
    ex = build_explainer(perf).eval()
    m = evaluate_explainer(perf, ex, _NoParts(tiny_set("test", n=8)), config=_ecfg(batch_size=4, top_k=3)).metrics
    assert not any("part_interpretability" in k for k in [*m, *m["explainer"]])
    assert math.isfinite(m["explainer"]["location_instability"])  # the rest is still measured


def test_weak_filter_loss_hint_only_when_the_filters_hardly_moved():
    from icnn.cli.explain import weak_filter_loss_hint

    assert weak_filter_loss_hint({}, 1 / 300) == ""  # no landmarks: no instability
    assert weak_filter_loss_hint({"instability_ratio": 0.66}, 8.0) == ""
    assert weak_filter_loss_hint({"instability_ratio": float("nan")}, 1 / 300) == ""
    hint = weak_filter_loss_hint({"instability_ratio": 0.95}, 1 / 300)
    assert hint.startswith("icnn: note:") and "ratio 0.95 at --lambda-f-scale 0.003333" in hint


def test_explain_config_file_holds_the_measured_settings(tmp_path):
    from icnn.cli import explain as cli
    from icnn.cli import UsageError

    path = Path(__file__).resolve().parents[2] / "configs" / "explain_cub200_efficientnet_lite0.toml"
    from icnn.cli import build_parser

    def config_of(file):
        return cli.build_config(build_parser().parse_args(["explain", "--performer", "p", "--out", str(tmp_path / "o"), "--config", str(file)]))[0]

    cfg = config_of(path)
    # the settings behind docs/explainer.md's "Real birds" 3-seed row
    assert (cfg.epochs, cfg.lr, cfg.logit_weight, cfg.lambda_f_scale) == (5, 1e-3, 10.0, 8.0)
    bad = tmp_path / "bad.toml"
    bad.write_text("lambda_f_scale = -1\n")
    with pytest.raises(UsageError, match=r"^--config .*bad\.toml: lambda_f_scale: must be a finite non-negative number"):
        config_of(bad)
    bad.write_text("lamda_f_scale = 8\n")
    with pytest.raises(UsageError, match=r"^--config .*bad\.toml: unknown key 'lamda_f_scale'"):
        config_of(bad)
