"""Trees and features saved as JSON + safetensors (no pickle) and loaded back exactly."""

import json

import pytest
import torch

from icnn.tree import (
    TreeConfig,
    TreeError,
    fit_tree,
    load_features,
    load_tree,
    save_features,
    save_tree,
)

from .helpers import random_features


def test_tree_round_trip_is_exact(tmp_path):
    tree = fit_tree(random_features(15, 4), TreeConfig(rerank=2))
    save_tree(tree, tmp_path / "tree")
    meta = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert meta["format"] == "icnn-decision-tree" and meta["config"]["rerank"] == 2
    back = load_tree(tmp_path / "tree")
    for name in ("direction", "alpha", "bias", "parent", "gain"):
        assert torch.equal(getattr(back, name), getattr(tree, name)), name
    assert back.gamma == tree.gamma and back.config == tree.config
    assert not list((tmp_path / "tree").glob(".*.tmp"))  # atomic writes leave no temp file


def test_features_round_trip_is_exact(tmp_path):
    feats = random_features(5, 3)
    save_features(feats, tmp_path / "f.safetensors")
    back = load_features(tmp_path / "f.safetensors")
    assert back.part_drop is None
    feats.part_drop = torch.rand(5, 2, dtype=torch.float64)
    save_features(feats, tmp_path / "f.safetensors")
    back = load_features(tmp_path / "f.safetensors")
    for name in ("x", "g", "y", "b", "norm", "positive", "scale", "index", "part_drop"):
        assert torch.equal(getattr(back, name), getattr(feats, name)), name


def test_not_a_tree(tmp_path):
    with pytest.raises(TreeError, match="not a saved decision tree"):
        load_tree(tmp_path)
    save_tree(fit_tree(random_features(4, 2)), tmp_path)
    meta = json.loads((tmp_path / "tree.json").read_text())
    (tmp_path / "tree.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(TreeError, match="expected 'icnn-decision-tree' v1"):
        load_tree(tmp_path)
    with pytest.raises(TreeError, match="not saved tree features"):
        load_features(tmp_path / "missing.safetensors")
