"""Networks: backbones made interpretable by one transformation (paper §5), by name.

    model = build_model("vgg16", num_classes=1, interpretable=True, image_size=224)
    feats = model.forward_features(images)   # FeatureMaps(relu, masked, out)
"""

from . import alexnet, efficientnet, resnet, small_cnn, vgg  # noqa: F401  (register the backbones)
from .net import (
    FeatureMaps,
    InterpretableLayer,
    InterpretableNet,
    ModelError,
    Normalize,
    add_head_hidden,
    add_head_norm,
    fc_head,
    linear_head,
    assemble,
    make_interpretable,
    output_shapes,
)
from .registry import MODELS, build_model, list_models, register_model
from .weights import WeightsError, load_backbone_weights, read_state_dict

__all__ = [
    "MODELS",
    "FeatureMaps",
    "InterpretableLayer",
    "InterpretableNet",
    "ModelError",
    "Normalize",
    "WeightsError",
    "add_head_hidden",
    "add_head_norm",
    "build_model",
    "fc_head",
    "linear_head",
    "list_models",
    "load_backbone_weights",
    "assemble",
    "make_interpretable",
    "output_shapes",
    "read_state_dict",
    "register_model",
]
