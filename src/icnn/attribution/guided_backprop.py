"""Guided backpropagation (Springenberg et al. 2015; survey §3.1, Fig. 2)."""

from __future__ import annotations

from captum import attr as captum

from .modified_relu import RectifiedBackprop


class GuidedBackprop(RectifiedBackprop):
    """Input gradient where each ReLU passes back ``g * [x > 0] * [g > 0]``: only positive signal
    through units that fired. ``captum.attr.GuidedBackprop``, or our override for functional
    ReLUs (see :mod:`icnn.attribution.modified_relu`). Output ``(B, C, H, W)``."""

    guided = True
    _captum_cls = captum.GuidedBackprop
