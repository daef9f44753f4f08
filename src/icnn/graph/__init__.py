"""Explanatory graphs of a pretrained CNN (Zhang, Cao, Shi, Wu, Zhu, AAAI 2018; survey 004 §4.3).

Each filter of a few conv-layers gets several nodes, each a part pattern with a mean position and
a deformation range, tied to parent nodes in the layer above; learned top-down without any
annotation from the layers' maps over object crops (SPEC-trees-graph Method 2, docs/graph.md)::

    store = extract_features(model, dataset, "run/features")       # features.py
    graph = learn_graph(store, "run/graph", GraphConfig())          # learn.py (resumable per layer)
    nodes = match(graph, store)                                     # match.py
    metrics = evaluate_graph(graph, store)                          # evaluate.py
"""

from .config import GraphConfig, GraphError
from .evaluate import (
    evaluate_graph,
    location_instability,
    part_localisation,
    raw_filters,
    top_units,
)
from .features import (
    FeatureStore,
    LayerInfo,
    default_layers,
    extract_features,
    write_features,
)
from .learn import learn_graph
from .match import Match, match
from .model import ExplanatoryGraph, LayerNodes

__all__ = [
    "ExplanatoryGraph",
    "FeatureStore",
    "GraphConfig",
    "GraphError",
    "LayerInfo",
    "LayerNodes",
    "Match",
    "default_layers",
    "evaluate_graph",
    "extract_features",
    "learn_graph",
    "location_instability",
    "match",
    "part_localisation",
    "raw_filters",
    "top_units",
    "write_features",
]
