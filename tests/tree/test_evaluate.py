"""Per-layer metrics with hand-computed values on the toy tree."""

import pytest
import torch

from icnn.attribution.contributions import FilterParts
from icnn.tree import Features, TreeError, evaluate_tree, jaccard

from .helpers import features, toy_tree

R10 = 10**0.5


def test_jaccard_by_hand():
    rho_true = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rho_tree = torch.tensor([[0.5, -3.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # rho+ = max(rho_tree sign(rho_true), 0) = (0.5, 3, 0): min sums to 2.5, max to 4.5
    assert jaccard(rho_true, rho_tree).tolist() == [5 / 9, 1.0]


def test_metrics_per_layer_by_hand():
    # image 0 (positive): layer 2 -> node 3, leaf 1; image 1 (negative): node 2 at both
    feats = features([[2.0, 1.0], [1.0, 3.0]], [[0.6, 0.8], [0.0, 1.0]], [3.0, -1.0], [0.0, 0.0], positive=[True, False])
    feats.part_drop = torch.tensor([[1.5], [0.5]], dtype=torch.float64)
    parts = FilterParts(torch.tensor([0, -1]), ["head"], torch.zeros(2, 1), torch.zeros(2))
    table = evaluate_tree(toy_tree(), feats, parts=parts)
    assert list(table) == ["cnn", "2", "leaves"]
    h2 = 7 / R10 + 0.25  # node 3 on image 0; node 2 gives the negative 3 - 0.5 > 0: wrong
    assert table["2"]["accuracy"] == 0.5 and table["cnn"]["accuracy"] == 1.0
    assert table["2"]["prediction_error"] == pytest.approx(abs(h2 - 3.0) / 1.0)  # one positive: range 1
    rho_true = torch.tensor([[1.2, 0.8]], dtype=torch.float64)  # g * x of image 0
    assert table["2"]["fitness"] == pytest.approx(jaccard(rho_true, torch.tensor([[6 / R10, 1 / R10]]).double()).item())
    assert table["2"]["part_error"] == pytest.approx(abs(6 / R10 - 1.5) / 3.0)
    assert table["cnn"]["part_error"] == pytest.approx(abs(1.2 - 1.5) / 3.0)
    leaf = torch.tensor([1.6, 0.6], dtype=torch.float64)  # leaf 1: w = (0.8, 0.6)
    assert table["leaves"]["prediction_error"] == pytest.approx(abs(2.2 - 3.0))
    assert table["leaves"]["fitness"] == pytest.approx(jaccard(rho_true, leaf[None]).item())
    assert table["leaves"]["nodes"] == 2


def test_errors():
    feats = features([[2.0, 1.0]], [[0.6, 0.8]], [3.0], [0.0])
    parts = FilterParts(torch.tensor([0, -1]), ["head"], torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(TreeError, match="no part ablations"):
        evaluate_tree(toy_tree(), feats, parts=parts)
    with pytest.raises(TreeError, match="no positive images"):
        evaluate_tree(toy_tree(), features([[2.0, 1.0]], [[0.6, 0.8]], [3.0], [0.0], positive=[False]))
    with pytest.raises(TreeError, match="no images"):
        evaluate_tree(toy_tree(), feats.select(torch.zeros(1, dtype=torch.bool)))
    assert isinstance(feats.select(torch.tensor([0])), Features)
