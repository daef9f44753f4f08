"""Run logs: ``OUT/log.csv`` and ``OUT/log.jsonl`` (one row per ``log_every`` steps and per
epoch), optional TensorBoard events in ``OUT/tensorboard``.

Each row has ``kind`` ("step", "epoch" or "eval"), ``epoch`` and ``step`` (global optimizer step)
and then floats: losses, accuracy, learning rate and each filter loss's diagnostics as
``<layer>/<key>`` (``new/lambda``, ``new/spatial_entropy``, ...). The CSV header grows when a row
brings new columns (the file is rewritten; logs are small). On resume, rows written after the
checkpoint's step are dropped so that a resumed run's logs read as one run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    """Appends rows to ``log.csv`` / ``log.jsonl`` (and TensorBoard) in ``out``."""

    def __init__(self, out: str | Path, *, tensorboard: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "log.csv"
        self.jsonl_path = self.out / "log.jsonl"
        self.fields: list[str] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                self.fields = next(csv.reader(f), [])
        self.writer = None
        if tensorboard:
            self.writer = open_tensorboard(self.out / "tensorboard")

    def truncate_after(self, step: int) -> None:
        """Drops rows with ``step > step`` (written after the checkpoint a run resumes from)."""
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
            rows = [r for r in rows if int(float(r.get("step") or 0)) <= step]
            self._rewrite_csv(rows)

    def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = [k for k in row if k not in self.fields]
        if new:
            old_rows: list[dict[str, Any]] = []
            if self.csv_path.exists():
                with open(self.csv_path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self.fields += new
            self._rewrite_csv(old_rows)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)
        if self.writer is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k not in ("kind", "epoch", "step") and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"{row.get('kind', 'step')}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool) or isinstance(v, (int, str)) or v is None:
        return v
    return float(v)


def open_tensorboard(logdir: Path):
    """A SummaryWriter, imported lazily; a clear message when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the 'tensorboard' package (pip install 'icnn[tensorboard]')") from None
    return SummaryWriter(log_dir=str(logdir))
