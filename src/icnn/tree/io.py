"""Saving trees and features without pickle: JSON for the structure and the config, safetensors
for the tensors. Files are written atomically (a temp file in the same folder, then
``os.replace``); a round trip is exact (float64 tensors, ``repr``-exact JSON floats)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .extract import Features
from .model import DecisionTree, TreeError

FORMAT = "icnn-decision-tree"
VERSION = 1
_TENSORS = ("direction", "alpha", "bias", "gain")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tree(tree: DecisionTree, directory: str | os.PathLike) -> Path:
    """``directory/tree.json`` (format, parent array, gamma, config) and
    ``directory/tree.safetensors`` (direction, alpha, bias, gain). Returns the directory."""
    directory = Path(directory)
    meta = {"format": FORMAT, "version": VERSION, "num_nodes": tree.num_nodes, "num_filters": tree.weight.shape[1],
            "gamma": tree.gamma, "config": tree.config, "parent": tree.parent.tolist()}  # fmt: skip
    tensors = {k: getattr(tree, k).contiguous() for k in _TENSORS}
    _atomic(directory / "tree.safetensors", lambda p: save_file(tensors, p))

    def write_json(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(meta, f)

    _atomic(directory / "tree.json", write_json)
    return directory


def load_tree(directory: str | os.PathLike) -> DecisionTree:
    """The tree :func:`save_tree` wrote to ``directory``."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "tree.json").read_text(encoding="utf-8"))
        tensors = load_file(directory / "tree.safetensors")
    except (OSError, ValueError) as exc:
        raise TreeError(f"{directory}: not a saved decision tree ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TreeError(f"{directory / 'tree.json'}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}")
    parent = torch.tensor(meta["parent"], dtype=torch.long)
    if any(k not in tensors for k in _TENSORS) or len(parent) != meta["num_nodes"] or len(tensors["bias"]) != len(parent):
        raise TreeError(f"{directory}: tree.json and tree.safetensors do not match")
    return DecisionTree(*(tensors[k] for k in ("direction", "alpha", "bias")), parent, tensors["gain"],
                        float(meta["gamma"]), meta["config"])  # fmt: skip


def save_features(features: Features, path: str | os.PathLike) -> Path:
    """All tensors of ``features`` in one safetensors file (``part_drop`` when present)."""
    path = Path(path)
    tensors = {f.name: getattr(features, f.name).contiguous() for f in fields(features) if getattr(features, f.name) is not None}
    _atomic(path, lambda p: save_file(tensors, p, metadata={"format": "icnn-tree-features"}))
    return path


def load_features(path: str | os.PathLike) -> Features:
    """The features :func:`save_features` wrote to ``path``."""
    try:
        tensors = load_file(path)
    except (OSError, ValueError) as exc:
        raise TreeError(f"{path}: not saved tree features ({str(exc).splitlines()[0]})") from None
    missing = [f.name for f in fields(Features) if f.name != "part_drop" and f.name not in tensors]
    if missing:
        raise TreeError(f"{path}: missing {', '.join(missing)}")
    return Features(**{f.name: tensors.get(f.name) for f in fields(Features)})
