"""Command-line flags made from the config dataclasses, and the one way settings are merged.

Every field of a config becomes a flag named after it (``batch_size`` -> ``--batch-size``; the
exceptions are :data:`RENAMES`), with the field's comment as its help, its type and choices from
the annotation and the class's ``CHOICES``:

- ``bool``: ``--x`` / ``--no-x``;
- ``str | None``, ``float | None``: the word ``none`` gives None;
- ``dict`` (``filter_loss``, ``mask``, ``dataset_kwargs``): one or more ``KEY=VALUE``, the flag repeatable (values are
  JSON when they parse, else strings), merged key by key over the config file's table;
- ``list[str]``: comma-separated.

Precedence (every command): the dataclass defaults < the command's own defaults < ``--config
FILE`` < flags given on the command line. Flags use ``default=argparse.SUPPRESS``, so a flag the
user did not give is absent from the namespace. A bad value names the flag when a flag set it,
the file when the file did (:func:`build`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from . import UsageError

# field -> flag, where the flag is not the field's name
RENAMES = {"negatives_root": "--negatives", "dataset_kwargs": "--dataset-option"}
# field -> example value shown in the help of KEY=VALUE flags
EXAMPLES = {"filter_loss": "mode=posterior", "mask": "beta=adaptive", "dataset_kwargs": "category=dog"}


def flag_of(name: str) -> str:
    return RENAMES.get(name, "--" + name.replace("_", "-"))


def dest_of(name: str) -> str:
    return "cfg_" + name


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip=(), only=None, defaults: dict | None = None,
                     group: str | None = None) -> None:  # fmt: skip
    """One flag per field of config class ``cls`` (see the module doc)."""
    g = parser.add_argument_group(group) if group else parser
    helps, shown = cls.field_help(), {**{f.name: f.default for f in dataclasses.fields(cls)}, **(defaults or {})}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        kind = str(f.type)
        text = helps.get(f.name, f.name.replace("_", " "))
        default = shown.get(f.name)
        if default is not dataclasses.MISSING and not kind.startswith(("dict", "list")) and not callable(default):
            text += f" (default {_show(default)})"
        kw: dict[str, Any] = {"dest": dest_of(f.name), "default": argparse.SUPPRESS, "help": text}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("dict"):
            kw.update(action="extend", nargs="+", metavar="KEY=VALUE")
            kw["help"] += f"; one or more, the flag repeatable, e.g. {flag_of(f.name)} {EXAMPLES.get(f.name, 'key=value')}"
        else:
            kw["metavar"] = "X" if "float" in kind else ("N" if "int" in kind else f.name.split("_")[-1].upper())
            if f.name in cls.CHOICES:
                kw["metavar"] = "{" + ",".join(map(str, cls.CHOICES[f.name])) + "}"
        g.add_argument(flag_of(f.name), **kw)


def _show(v) -> str:
    return "none" if v is None else ("on" if v is True else "off" if v is False else str(v))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(flag: str, items: list[str] | None, example: str = "key=value") -> dict[str, Any]:
    table: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item}: expected KEY=VALUE (e.g. {example})")
        table[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return table


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """``{field: value}`` of the config flags given on the command line, converted to the field's type."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, dest_of(f.name)):
            continue
        v, kind = getattr(args, dest_of(f.name)), str(f.type)
        flag = flag_of(f.name)
        if kind.startswith("dict"):
            v = key_values(flag, v, EXAMPLES.get(f.name, "key=value"))
        elif kind.startswith("list"):
            v = [t.strip() for t in v.split(",") if t.strip()]
        elif kind != "bool":
            if kind.endswith("| None") and isinstance(v, str) and v.lower() == "none":
                v = None
            else:
                base = kind.removesuffix(" | None")
                try:
                    v = int(v) if base == "int" else float(v) if base == "float" else v
                except ValueError:
                    raise UsageError(f"{flag} {v}: expected {'an integer' if base == 'int' else 'a number'}") from None
        out[f.name] = v
    return out


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; tables (dicts) merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls, *, flags: dict[str, Any], file_values: dict[str, Any] | None = None, file: str | None = None,
          base: dict[str, Any] | None = None, source: str = "command line"):  # fmt: skip
    """``cls`` from ``base`` < ``file_values`` < ``flags``; a bad value is a UsageError naming the flag
    that set it, else the file."""
    from icnn.training.config import ConfigError

    file_values = file_values or {}
    if file_values:
        try:
            cls.from_dict(merge(base or {}, file_values), source=f"--config {file}")  # the file alone names the file
        except ConfigError as exc:  # its message names the file
            raise UsageError(str(exc)) from None
    try:
        return cls.from_dict(merge(base or {}, file_values, flags), source=source)
    except ConfigError as exc:
        if exc.field in flags:
            raise UsageError(f"{flag_of(exc.field)}: {exc.reason}") from None
        raise UsageError(str(exc)) from None


def build_run(cls, args: argparse.Namespace, flags: dict[str, Any]):
    """``(config, resume)`` of a command that trains: a fresh run from ``--config`` and flags, or,
    with ``--resume RUN``, the run's saved settings with the flags that only change how it runs
    (a flag or file setting that changes what it computes is refused, naming it)."""
    from icnn.training import CheckpointError, load_checkpoint
    from icnn.training.checkpoint import run_dir_of

    from ._common import config_file

    file_values, file = config_file(args)
    if args.resume is None:
        return build(cls, flags=flags, file_values=file_values, file=file), None
    try:
        saved = load_checkpoint(args.resume)[2]
    except CheckpointError as exc:
        raise UsageError(f"--resume {args.resume}: {exc}") from None
    base = {k: v for k, v in saved.items() if k in cls.field_names()}
    cfg = build(cls, flags={"out": str(run_dir_of(args.resume)), **flags}, file_values=file_values, file=file, base=base,
                source=f"--resume {args.resume}")  # fmt: skip
    conflicts = cfg.resume_conflicts(saved)
    if conflicts:
        key = next(iter(conflicts))
        where = f"--config {file} ({key})" if key in file_values and key not in flags else flag_of(key)
        raise UsageError(f"{where}: a resumed run keeps its checkpoint's setting ({key} = {saved[key]!r}); drop it or start a new run")
    return cfg, args.resume
