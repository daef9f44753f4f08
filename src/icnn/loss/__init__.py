"""The filter loss (paper Eq. 1-7): the exact MI (``mi``), the running statistics of one layer
(``state``), and the training-time loss with its three objectives (``filter_loss``)."""

from .filter_loss import MODES, FilterLoss, FilterLossConfig, posterior_nll, target_templates
from .mi import decompose, mi_decomposition, mutual_information_loss, neg_mi, template_scores
from .state import FilterStatistics

__all__ = [
    "MODES",
    "FilterLoss",
    "FilterLossConfig",
    "FilterStatistics",
    "decompose",
    "mi_decomposition",
    "mutual_information_loss",
    "neg_mi",
    "posterior_nll",
    "target_templates",
    "template_scores",
]
