"""The tree's report figures and sections: valid PNGs, table rows, input checks."""

import pytest
import torch

from icnn.report import ReportError
from icnn.report.tree import (
    explanation_figure,
    metrics_table,
    tree_figure,
    tree_sections,
)

from .helpers import toy_tree

PNG = b"\x89PNG\r\n\x1a\n"


def test_tree_figure_and_sections():
    tree = toy_tree()
    assert tree_figure(tree, layers=3).startswith(PNG)
    metrics = {"cnn": {"accuracy": 0.9}, "2": {"nodes": 2, "accuracy": 0.8, "fitness": 0.5}, "leaves": {"nodes": 3, "accuracy": 0.7, "fitness": 1.0}}
    table = metrics_table(metrics)
    assert table.columns == ["layer", "nodes", "accuracy", "fitness"]
    assert [row[0] for row in table.rows] == ["cnn", "layer 2", "leaves"] and table.rows[0][1] is None
    sections = tree_sections(tree, metrics, [(tree_figure(tree), "an image")])
    assert len(sections) == 2 and "1 merges" in sections[0].text
    with pytest.raises(ReportError, match="layers must be >= 2"):
        tree_figure(tree, layers=1)


def test_explanation_figure_checks_its_input():
    image = torch.rand(3, 16, 16)
    assert explanation_figure(image, torch.rand(2, 4, 4), [0, 1], [0.5, -0.2]).startswith(PNG)
    with pytest.raises(ReportError, match="one \\(h, w\\) map and value per filter"):
        explanation_figure(image, torch.rand(2, 4, 4), [0], [0.5])
    with pytest.raises(ReportError, match="2 part names for 3 part values"):
        explanation_figure(image, torch.rand(1, 4, 4), [0], [0.5], part_names=["a", "b"], part_values=[1, 2, 3])
    with pytest.raises(ReportError, match="metrics is empty"):
        metrics_table({})
