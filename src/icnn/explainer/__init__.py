"""Explainer networks (Zhang et al., "Unsupervised Learning of Neural Networks to Explain Neural
Networks", paper 003; SPEC §4): a frozen performer, an encoder that disentangles its features
into part filters (interpretable track + ordinary track, ``p = sigmoid(w_p)``), a decoder that
reconstructs the performer's fc features.

    from icnn.explainer import ExplainerConfig, train_explainer, evaluate_explainer, load_explainer
    result = train_explainer(performer, train_set, ExplainerConfig(epochs=5, out="runs/explain"))
    ev = evaluate_explainer(performer, result.model, test_set)
    explainer, cfg = load_explainer(performer, "runs/explain")  # later: the trained explainer again
"""

from .evaluate import ExplainerEval, evaluate_explainer
from .model import (
    ChannelNorm,
    ExplainedNet,
    Explainer,
    ExplainerError,
    ExplainerOutput,
    PerformerFeatures,
    build_explainer,
    folded_conv,
    performer_targets,
    split_head,
)
from .train import ExplainerConfig, ExplainerLoss, ExplainerObjective, ExplainResult, default_eta, load_explainer, train_explainer

__all__ = [
    "ChannelNorm",
    "ExplainResult",
    "ExplainedNet",
    "Explainer",
    "ExplainerConfig",
    "ExplainerError",
    "ExplainerEval",
    "ExplainerLoss",
    "ExplainerObjective",
    "ExplainerOutput",
    "PerformerFeatures",
    "build_explainer",
    "default_eta",
    "evaluate_explainer",
    "folded_conv",
    "load_explainer",
    "performer_targets",
    "split_head",
    "train_explainer",
]
