"""Nothing lost, nothing silently wrong (issue 18): each defect an adversarial run found, as the
command that showed it. User mistakes give one line and exit 2; a stopped run exits 1."""

import json

import pytest
import torch
from PIL import Image

from icnn.cli import main
from icnn.training import load_checkpoint

S = ["--dataset", "synthetic", "--dataset-option", "num_samples=32", "--image-size", "32", "--batch-size", "16",
     "--eval-split", "none", "--no-progress", "--device", "cpu"]


def _line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if e.startswith("icnn: error: ")]
    assert len(err) == 1, err
    return err[0][len("icnn: error: "):]


def _weights(run):
    return {k: v.clone() for k, v in load_checkpoint(run)[0].items()}


# ------------------------------------------------------------------------------- 1. data loss


def test_a_resumed_run_never_writes_into_another_runs_directory(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", *S, "--epochs", "1", "--out", str(a)]) == 0
    assert main(["train", *S, "--epochs", "1", "--arch", "resnet18", "--out", str(b)]) == 0
    before, log = _weights(a), (a / "log.csv").read_text()
    assert main(["train", "--resume", str(b), "--out", str(a), "--epochs", "2"]) == 2
    assert "a resumed run writes into its own directory" in _line(capsys)
    assert all(torch.equal(v, _weights(a)[k]) for k, v in before.items()) and (a / "log.csv").read_text() == log


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    from icnn.training.checkpoint import RunLock

    with RunLock(tmp_path / "busy"):
        assert main(["train", *S, "--epochs", "1", "--out", str(tmp_path / "busy")]) == 2
    assert "in use by another running icnn process" in _line(capsys)


# ------------------------------------------------------------------------------- 2. schedules


def test_extending_a_cosine_run_trains_at_the_new_schedules_rate(tmp_path):
    c = tmp_path / "C"
    assert main(["train", *S, "--lr-schedule", "cosine", "--epochs", "1", "--lr", "0.01", "--out", str(c)]) == 0
    before = _weights(c)
    assert main(["train", "--resume", str(c), "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (c / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    lrs = [r["lr"] for r in rows if r["kind"] == "epoch"]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.005)  # cosine over 2 epochs: half at epoch 2
    after = _weights(c)
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


# ------------------------------------------------------------------------------- 3. poisoned state


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    from icnn.training import NonFiniteLossError
    from icnn.training.checkpoint import save_checkpoint

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    save_checkpoint(tmp_path, net, {"epoch": 1}, {})
    good = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    net[1].running_var[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"non-finite values in 1\.running_var"):
        save_checkpoint(tmp_path, net, {"epoch": 2}, {})
    net[1].running_var[0] = 1.0
    with pytest.raises(NonFiniteLossError, match=r"state\.optimizer\.m"):
        save_checkpoint(tmp_path, net, {"epoch": 2, "optimizer": {"m": torch.tensor([float("nan")])}}, {})
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == good
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1


def test_a_non_finite_batch_leaves_the_filter_loss_state_untouched():
    from icnn.loss import FilterLoss

    fl = FilterLoss(2, 2, (3, 3), negative_class=0, z_estimate="running")
    x = torch.rand(4, 2, 3, 3)
    fl(x, torch.tensor([0, 1, 0, 1]))
    state = {k: v.clone() for k, v in fl.state_dict().items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(fl(bad, torch.tensor([0, 1, 0, 1])))
    assert all(torch.equal(v, fl.state_dict()[k]) for k, v in state.items())


def test_a_buffer_that_runs_away_stops_training_before_the_next_checkpoint(tmp_path, capsys):
    from icnn.training import TrainConfig, train
    from icnn.training.checkpoint import NonFiniteLossError

    from icnn.models.net import add_head_norm

    from training.fakes import TinyParts, tiny_net

    net = tiny_net(interpretable=False)
    net.head = add_head_norm(net.head)  # a BatchNorm whose statistics each step updates
    # huge but finite activations: the batch variance overflows float32 while the normalised
    # output (and so the loss) stays finite -- only the buffer shows it
    hook = net.head.pool.register_forward_hook(lambda m, i, o: o * 1e25 if net.training else o)
    cfg = TrainConfig(arch="tiny", image_size=16, epochs=1, batch_size=4, device="cpu", out=str(tmp_path / "r"),
                      progress=False, eval_split=None, interpretable=False)  # fmt: skip
    with pytest.raises(NonFiniteLossError):
        train(cfg, model=net, train_set=TinyParts(8))
    hook.remove()
    assert not (tmp_path / "r" / "checkpoint").exists()


# ------------------------------------------------------------------------------- 5. one-line errors


def test_user_mistakes_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["train", *S, "--dataset-option", "foo=1", "--out", str(tmp_path / "o1")], "dataset option 'foo': not an option of dataset 'synthetic'"),
        (["train", "--config", "configs/cub200_efficientnet_lite0.toml", *S, "--out", str(tmp_path / "o2")],
         "dataset option 'max_negatives': not an option of dataset 'synthetic'"),
        (["train", *S, "--out", str(afile / "sub")], f"--out {afile / 'sub'}: {afile} is a file, not a directory"),
        (["train", *S, "--momentum", "5", "--out", str(tmp_path / "o3")], "--momentum: must be below 1"),
        (["train", *S, "--device", "cuda:0", "--out", str(tmp_path / "o4")], "device: 'cuda:0' requested but CUDA is not available"),
        (["train", *S, "--dataset-option", "num_samples=0", "--out", str(tmp_path / "o5")], "the training set is empty: nothing to train on"),
    ]
    for argv, message in cases:
        if "cuda:0" in argv and torch.cuda.is_available():
            continue
        assert main(argv) == 2, argv
        assert message in _line(capsys), argv
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none"), "--out", str(afile)]) == 2
    assert f"--out {afile}: exists and is not a directory" in _line(capsys)


def _custom(tmp_path, entries, **extra):
    root = tmp_path / "custom"
    (root / "img").mkdir(parents=True, exist_ok=True)
    for e in entries:
        p = root / e["file"]
        if not p.exists():
            Image.new("RGB", (40, 30), (100, 150, 200)).save(p)
    doc = {"classes": ["thing"], "landmark_names": ["head"], "images": entries, **extra}
    (root / "annotations.json").write_text(json.dumps(doc))
    neg = tmp_path / "neg"
    neg.mkdir(exist_ok=True)
    for i in range(6):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(neg / f"n{i}.png")
    return root, neg


def _entry(i, split="train"):
    return {"file": f"img/{i}.png", "label": "thing", "box": [2, 2, 30, 25], "split": split, "landmarks": {"head": [10, 10]}}


def test_own_data_mistakes_are_named(tmp_path, capsys):
    from icnn.data import DatasetError, build_dataset

    root, neg = _custom(tmp_path, [_entry(0), _entry(0), _entry(1, "test")])
    with pytest.raises(DatasetError, match=r"images\[1\] repeats images\[0\]"):
        build_dataset("custom", root, split="train", image_size=32, negatives_root=neg)
    root, neg = _custom(tmp_path, [_entry(0), {**_entry(0), "split": "test", "box": [0, 0, 20, 20]}])
    with pytest.raises(DatasetError, match=r"images\[1\] \(test\) and images\[0\] \(train\) use the same file"):
        build_dataset("custom", root, split="train", image_size=32, negatives_root=neg)
    root, neg = _custom(tmp_path, [_entry(0), _entry(1)])
    with pytest.raises(DatasetError, match=r"no positive images in split 'test'"):
        build_dataset("custom", root, split="test", image_size=32, negatives_root=neg)
    with pytest.raises(DatasetError, match=r"needs negative images: --negatives DIR"):
        build_dataset("custom", root, split="train", image_size=32)
    (root / "annotations.json").write_text(json.dumps({"classes": ["thing"], "images": [{**_entry(0), "file": "img/gone.png"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\]\.file: .*gone\.png not found"):
        build_dataset("custom", root, split="train", image_size=32, negatives_root=neg)


def test_own_data_json_as_root_and_a_bad_image_in_a_worker(tmp_path, capsys):
    root, neg = _custom(tmp_path, [_entry(i) for i in range(4)] + [_entry(9, "test")])
    (root / "img" / "2.png").write_bytes(b"not a png")
    argv = ["train", "--dataset", "custom", "--root", str(root / "annotations.json"), "--negatives", str(neg), "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--num-workers", "1", "--eval-split", "none", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    line = _line(capsys)
    assert "2.png" in line and "Traceback" not in line


def test_max_negatives_caps_training_splits_only(tmp_path):
    from icnn.data import build_dataset

    root, neg = _custom(tmp_path, [_entry(0), _entry(1, "test")])
    kw = dict(image_size=32, negatives_root=neg, max_negatives=1, negatives_test_fraction=0.5)
    train_set, test_set = build_dataset("custom", root, split="train", **kw), build_dataset("custom", root, split="test", **kw)
    assert train_set.num_negatives == 1 and test_set.num_negatives > 1


# ------------------------------------------------------------------------------- 7-8. library rules


def test_resume_rules_live_in_the_library(tmp_path):
    import dataclasses

    from icnn.training import ConfigError, TrainConfig, train

    from training.fakes import TinyParts, tiny_net

    cfg = TrainConfig(arch="tiny", image_size=16, epochs=1, batch_size=4, device="cpu", out=str(tmp_path / "r"), progress=False,
                      eval_split=None, lr=0.01)  # fmt: skip
    train(cfg, model=tiny_net(), train_set=TinyParts(8))
    for change in ({"lr": 5.0}, {"seed": 3}, {"filter_loss": {"mode": "exact"}}):
        with pytest.raises(ConfigError, match=f"{next(iter(change))}: a resumed run keeps its checkpoint's setting"):
            train(dataclasses.replace(cfg, epochs=2, **change), resume=tmp_path / "r", model=tiny_net(), train_set=TinyParts(8))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.01


def test_each_layer_keeps_its_own_categories(tmp_path):
    from icnn.training.classify import filter_categories

    from training.fakes import tiny_net

    model = tiny_net(num_classes=3)
    state = {"objective": {
        "filter_losses.top.stats.class_sum": torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 5]]),
        "filter_losses.top.stats.class_count": torch.ones(3), "filter_losses.top.stats.fixed_targets": torch.full((4,), -1),
        "filter_losses.new.stats.class_sum": torch.tensor([[0.0, 0, 0, 5], [0, 0, 5, 0], [5, 5, 0, 0]]),
        "filter_losses.new.stats.class_count": torch.ones(3), "filter_losses.new.stats.fixed_targets": torch.full((4,), -1)}}  # fmt: skip
    assert filter_categories(model, state, "top").tolist() == [0, 1, 2, 2]
    assert filter_categories(model, state, "new").tolist() == [2, 2, 1, 0]
