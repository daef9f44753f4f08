"""Parse paths and contributions on a toy tree whose cosines are worked out by hand."""

import pytest
import torch

from icnn.attribution.contributions import FilterParts
from icnn.tree import TreeError, explain, parse
from icnn.tree.explain import children_table

from .helpers import features, toy_tree

R10 = 10**0.5


def test_tree_structure():
    tree = toy_tree()
    assert (tree.num_nodes, tree.num_leaves, tree.num_merges, tree.root) == (5, 3, 1, 4)
    assert tree.depth().tolist() == [3, 3, 2, 2, 1]
    assert tree.count().tolist() == [1, 1, 1, 2, 3]
    assert tree.children(4).tolist() == [2, 3]
    assert children_table(tree).tolist() == [[-1, -1], [-1, -1], [-1, -1], [0, 1], [2, 3]]
    assert tree.ancestors(torch.tensor([1, 2, 3])).tolist() == [[4, 3, 1], [4, 2, 2], [4, 3, 3]]


def test_parse_path_follows_the_best_cosine_at_each_layer():
    # g = (0.6, 0.8): cos with w_3 = (0.6 * 3 + 0.8) / sqrt 10 = 0.822 > cos with w_2 = 0.8, then
    # cos with leaf 1 = 0.96 > leaf 0 = 0.6. g = (0, 1) goes to leaf 2 at once (padded)
    g = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert parse(toy_tree(), g).tolist() == [[4, 3, 1], [4, 2, 2], [4, 3, 0]]
    assert parse(toy_tree(), 5 * g).tolist() == [[4, 3, 1], [4, 2, 2], [4, 3, 0]]  # cosines: the scale of g is moot


def test_filter_and_part_contributions():
    feats = features([[2.0, 1.0], [1.0, 3.0]], [[0.6, 0.8], [0.0, 1.0]], [3.0, 2.0], [0.0, 0.0])
    parts = FilterParts(torch.tensor([0, -1]), ["head"], torch.zeros(2, 1), torch.zeros(2))
    why = explain(toy_tree(), feats, layer=2, parts=parts)
    assert why.node.tolist() == [3, 2]
    rho = torch.tensor([[6 / R10, 1 / R10], [0.0, 3.0]], dtype=torch.float64)  # w_v * x
    torch.testing.assert_close(why.filters, rho, rtol=0, atol=1e-15)
    torch.testing.assert_close(why.prediction, torch.tensor([7 / R10 + 0.25, 3.0 - 0.5], dtype=torch.float64))
    torch.testing.assert_close(why.parts, rho)  # filter 0 -> head, filter 1 -> none
    assert why.part_names == ["head", "none"]
    leaves = explain(toy_tree(), feats)  # layer None: the end of the path
    assert leaves.node.tolist() == [1, 2] and leaves.parts is None


def test_own_paths_follow_the_training_leaves():
    # a positive whose rationale prefers another branch still follows its own leaf's ancestors
    feats = features([[1.0, 1.0]] * 3, [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], [1.0] * 3, [0.0] * 3)
    assert explain(toy_tree(), feats, own=True).path.tolist() == [[4, 3, 0], [4, 3, 1], [4, 2, 2]]
    with pytest.raises(TreeError, match="own paths need the tree's 3 training images"):
        explain(toy_tree(), features([[1.0, 1.0]], [[0.0, 1.0]], [1.0], [0.0]), own=True)


def test_bad_arguments():
    feats = features([[1.0, 1.0]], [[0.0, 1.0]], [1.0], [0.0])
    with pytest.raises(TreeError, match="layer: expected an int >= 2"):
        explain(toy_tree(), feats, layer=1)
    with pytest.raises(TreeError, match="g: expected rationales"):
        parse(toy_tree(), torch.zeros(2, 3))
    with pytest.raises(TreeError, match="parts: \\(3,\\) filter assignments"):
        explain(toy_tree(), feats, parts=FilterParts(torch.tensor([0, 0, 0]), ["a"], torch.zeros(3, 1), torch.zeros(3)))
