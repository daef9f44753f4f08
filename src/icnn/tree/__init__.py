"""Decision trees over interpretable filters (Zhang, Yang, Ma, Wu, CVPR 2019; survey §4.2).

The decision modes of a network's top interpretable layer mined into a tree, generic modes at the
top and one leaf per training image; an image is explained by its parse path and by how much each
filter, and each object part, contributed to its score::

    feats = extract(model, train_set, site="post_mask")             # x, g, y of every image
    tree = fit_tree(feats, TreeConfig())                            # bottom-up merges
    parts = assign_filter_parts(model, train_set)                   # icnn.attribution
    test = extract(model, test_set, scale=feats.scale, parts=parts) # + part ablations
    why = explain(tree, test, layer=2, parts=parts)                 # path, w * x, A (w * x)
    table = evaluate_tree(tree, test, parts=parts)                  # per-layer metrics
    save_tree(tree, "runs/x/tree")

``extract.py`` Step 1 (features, rationale), ``learn.py`` Steps 2-6 (the objective, the merges),
``lasso.py`` the batched sparse fit, ``explain.py`` Step 7, ``evaluate.py`` §1b, ``io.py`` files.
"""

from .evaluate import evaluate_tree, jaccard
from .explain import Explanation, explain, parse
from .extract import SITES, Features, extract, layer_head, rationale
from .io import load_features, load_tree, save_features, save_tree
from .lasso import LassoFit, lasso
from .learn import TreeConfig, fit_tree
from .model import DecisionTree, TreeError

__all__ = [
    "SITES",
    "DecisionTree",
    "Explanation",
    "Features",
    "LassoFit",
    "TreeConfig",
    "TreeError",
    "evaluate_tree",
    "explain",
    "extract",
    "fit_tree",
    "jaccard",
    "lasso",
    "layer_head",
    "load_features",
    "load_tree",
    "parse",
    "rationale",
    "save_features",
    "save_tree",
]
