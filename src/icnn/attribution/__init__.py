"""Attribution and visualisation of any CNN (survey §3): saliency, deconvnet, guided backprop,
Grad-CAM (Captum adapters) and activation maximisation.

    with GradCAM(model, "layers.new") as cam:
        heat = cam(images, target=None, upsample=True)  # (B, H, W)
"""

from .actmax import ActivationMaximization, ActMaxConfig, ActMaxResult
from .contributions import (
    ContributionError,
    FilterParts,
    PartContributions,
    assign_filter_parts,
    dataset_part_contributions,
    filter_contributions,
    part_contributions,
)
from .base import Attribution, AttributionError, minmax_normalize, resolve_layer, select_output
from .deconvnet import Deconvnet
from .gradcam import GradCAM
from .guided_backprop import GuidedBackprop
from .saliency import Saliency

__all__ = [
    "ActMaxConfig",
    "ActMaxResult",
    "ActivationMaximization",
    "Attribution",
    "AttributionError",
    "ContributionError",
    "FilterParts",
    "PartContributions",
    "assign_filter_parts",
    "dataset_part_contributions",
    "filter_contributions",
    "part_contributions",
    "Deconvnet",
    "GradCAM",
    "GuidedBackprop",
    "Saliency",
    "minmax_normalize",
    "resolve_layer",
    "select_output",
]
