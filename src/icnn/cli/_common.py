"""What every subcommand shares besides the config flags (``_flags``): its parser, ``--config FILE``
and the checks of paths a config names."""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from . import UsageError

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def add_command(subparsers, name: str, run, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``kwargs``: its ``help`` and ``description``); ``main``
    calls ``run(args)``."""
    p = subparsers.add_parser(name, **kwargs)
    p.set_defaults(func=run)
    return p


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings file (.toml, .yaml or .json) whose keys are the config's fields; flags given here win")


def config_file(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """``(settings, path)`` of ``--config`` (``({}, None)`` without one)."""
    path = getattr(args, "config", None)
    return (load_config_file(path), path) if path else ({}, None)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A table of settings from a TOML, YAML or JSON file; UsageError naming the file otherwise.

    Keys are config field names (``batch_size``, not ``--batch-size``); dashes are read as
    underscores. Nested tables (e.g. ``[filter_loss]``) stay dicts.
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


def existing_paths(cfg) -> None:
    """The paths and names a TrainConfig refers to exist (one line naming the flag otherwise)."""
    from icnn.models import list_models

    if cfg.root is not None and not Path(cfg.root).exists():
        raise UsageError(f"--root {cfg.root}: no such file or directory")
    if cfg.negatives_root is not None and not Path(cfg.negatives_root).is_dir():
        raise UsageError(f"--negatives {cfg.negatives_root}: no such directory")
    if cfg.weights not in (None, "imagenet") and not Path(cfg.weights).is_file():
        raise UsageError(f"--weights {cfg.weights}: no such file")
    if cfg.arch not in list_models():
        raise UsageError(f"--arch {cfg.arch}: unknown architecture (choose one of {', '.join(list_models())})")
