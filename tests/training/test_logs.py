"""Run logs: CSV header growth, truncation on resume, TensorBoard import message."""

import csv
import json
import sys

import pytest

from icnn.training.logs import RunLog, open_tensorboard


def test_csv_grows_columns_and_truncates(tmp_path):
    log = RunLog(tmp_path)
    log.write({"kind": "step", "epoch": 1, "step": 1, "loss": 0.5})
    log.write({"kind": "epoch", "epoch": 1, "step": 2, "loss": 0.4, "eval/accuracy": 0.75})
    log.write({"kind": "step", "epoch": 2, "step": 3, "loss": 0.3})
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["eval/accuracy"] == "" and rows[1]["eval/accuracy"] == "0.75"
    log.truncate_after(2)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "log.csv"))] == ["1", "2"]
    # a new RunLog on the same dir keeps the header
    assert RunLog(tmp_path).fields == ["kind", "epoch", "step", "loss", "eval/accuracy"]


def test_tensorboard_missing_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match=r"--tensorboard needs the 'tensorboard' package"):
        open_tensorboard(tmp_path)
