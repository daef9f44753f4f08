"""icnn: part-interpretable CNNs (Zhang, Wu, Zhu, CVPR 2018) and the tools to measure and show them."""

from .mask import PartMask, locate_parts
from .templates import part_templates, template_priors, template_shape

__version__ = "0.1.0"

__all__ = [
    "PartMask",
    "locate_parts",
    "part_templates",
    "template_priors",
    "template_shape",
    "__version__",
]

from .loss import FilterLoss, FilterLossConfig, mi_decomposition, mutual_information_loss  # noqa: E402

__all__ += ["FilterLoss", "FilterLossConfig", "mi_decomposition", "mutual_information_loss"]

from .models import InterpretableNet, build_model, make_interpretable  # noqa: E402

__all__ += ["InterpretableNet", "build_model", "make_interpretable"]
