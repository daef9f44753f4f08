"""Helpers shared by the subcommands: config files, explicit flags, devices, output dirs.

Precedence of settings (every subcommand): the dataclass defaults, then ``--config FILE``, then
flags given explicitly on the command line. To tell explicit flags from defaults, parsers built
with :func:`add_argument` use ``default=argparse.SUPPRESS``: a flag the user did not give is
simply absent from the namespace (:func:`explicit`).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from . import UsageError

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat table of settings from a TOML, YAML or JSON file; UsageError naming the file otherwise.

    Keys are config field names (``batch_size``, not ``--batch-size``); dashes are accepted and
    read as underscores. Nested tables (e.g. ``[filter_loss]``) stay dicts.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise UsageError(f"--config {path}: unknown format {suffix or '(no suffix)'!r} (use .toml, .yaml or .json)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            import json

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # tomllib / yaml / json parse errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"--config {path}: invalid {suffix[1:].upper()} ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of settings at the top level, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def explicit(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """``{field: value}`` of the flags given on the command line (``names``: dest -> field)."""
    return {field: getattr(args, dest) for dest, field in names.items() if hasattr(args, dest)}


def parse_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; UsageError otherwise (and for CUDA without a GPU)."""
    import torch

    value = value.strip().lower()
    if value in ("auto", "cpu"):
        return value
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: CUDA is not available on this machine (use cpu or auto)")
        if ":" in value and int(value[5:]) >= torch.cuda.device_count():
            raise UsageError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s)")
        return value
    raise UsageError(f"--device {value}: expected auto, cpu, cuda or cuda:N")


def existing_dir(flag: str, value: str | None) -> str | None:
    if value is not None and not Path(value).is_dir():
        raise UsageError(f"{flag} {value}: no such directory")
    return value


def existing_file(flag: str, value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise UsageError(f"{flag} {value}: no such file")
    return value


def fresh_out_dir(out: str | os.PathLike, *, marker: str = "checkpoint", hint: str = "") -> Path:
    """``out`` for a new run: refuses a directory that already holds one (``out/marker``)."""
    out = Path(out)
    if (out / marker).exists() or (out / f"{marker}.old").exists():
        raise UsageError(f"--out {out}: already holds a run ({out / marker}){hint}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    return out
