"""icnn: part-interpretable CNNs (Zhang, Wu, Zhu, CVPR 2018) and the tools to measure and show them.

    net = icnn.make_interpretable(torchvision.models.resnet18(), "layer4", num_classes=1)
    losses = icnn.build_filter_losses(net)                 # one FilterLoss per interpretable layer
    result = icnn.evaluate(net, dataset)                   # every metric the annotations allow
"""

from .mask import PartMask, locate_parts
from .templates import part_templates, template_priors, template_shape

__version__ = "0.2.0"

from .loss import FilterLoss, FilterLossConfig, mi_decomposition, mutual_information_loss  # noqa: E402
from .models import InterpretableNet, build_model, make_interpretable  # noqa: E402
from .evaluate import EvalConfig, evaluate  # noqa: E402
from .training import TrainConfig, build_filter_losses, train  # noqa: E402

__all__ = [
    "EvalConfig",
    "FilterLoss",
    "FilterLossConfig",
    "InterpretableNet",
    "PartMask",
    "TrainConfig",
    "__version__",
    "build_filter_losses",
    "build_model",
    "evaluate",
    "locate_parts",
    "make_interpretable",
    "mi_decomposition",
    "mutual_information_loss",
    "part_templates",
    "template_priors",
    "template_shape",
    "train",
]
