"""extract -> fit -> explain -> evaluate -> report on a tiny small_cnn and the synthetic parts."""

import pytest
import torch

import icnn
from icnn.attribution import assign_filter_parts
from icnn.data import build_dataset
from icnn.report import render_report
from icnn.report.tree import explanation_figure, tree_sections
from icnn.tree import TreeConfig, evaluate_tree, explain, extract, fit_tree


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = icnn.build_model("small_cnn", num_classes=1, interpretable=True, image_size=32)
    data = build_dataset("synthetic", split="train", task="single", image_size=32, num_samples=32)
    return model, data, assign_filter_parts(model, data)


def test_pipeline(setup):
    model, data, parts = setup
    feats = extract(model, data, site="pre_mask", parts=parts, batch_size=16)
    assert len(feats) == 32 and feats.positive.sum() == 16 and feats.part_drop.shape == (32, len(data.landmark_names))
    tree = fit_tree(feats, TreeConfig())
    assert tree.num_leaves == 16
    why = explain(tree, feats, layer=2, parts=parts)
    assert why.parts.shape == (32, len(data.landmark_names) + 1)
    torch.testing.assert_close(why.parts.sum(1), why.filters.sum(1))  # every filter in one column
    table = evaluate_tree(tree, feats, parts=parts)
    assert {"cnn", "2", "leaves"} <= set(table) and set(table["2"]) == {"nodes", "accuracy", "prediction_error", "fitness", "part_error"}
    assert evaluate_tree(tree, feats, own=True)["leaves"]["prediction_error"] < 1e-5
    i = int(torch.nonzero(feats.positive)[0])
    top = why.filters[i].abs().topk(2).indices
    maps = model.forward_features(data[i]["image"][None]).masked["new"][0, top].detach()
    png = explanation_figure(data[i]["image"], maps, top.tolist(), why.filters[i, top].tolist(), part_names=why.part_names,
                             part_values=why.parts[i], path=why.path[i].tolist())  # fmt: skip
    html = render_report("tree", tree_sections(tree, table, [(png, f"image {i}")]))
    assert html.count("data:image/png;base64,") == 2 and "layer 2" in html


def test_post_mask_rationale_of_a_linear_head_is_one_for_all(setup):
    # GAP + fc is linear in the masked map: every image has the same g and the tree is one mode
    model, data, _ = setup
    feats = extract(model, data, site="post_mask")
    torch.testing.assert_close(feats.g, feats.g[:1].expand_as(feats.g))
    tree = fit_tree(feats)
    assert evaluate_tree(tree, feats)["leaves"]["prediction_error"] < 1e-5  # one linear model fits every image
