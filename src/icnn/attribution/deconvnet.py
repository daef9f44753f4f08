"""Deconvnet (Zeiler & Fergus, ECCV 2014; survey §3.1, Fig. 1-2)."""

from __future__ import annotations

from captum import attr as captum

from .modified_relu import RectifiedBackprop


class Deconvnet(RectifiedBackprop):
    """Input "reconstruction" where each ReLU passes back ``g * [g > 0]`` (rectification of the
    backward signal, ignoring the forward mask), with convolutions transposed and max-pool
    switches taken from the forward pass (that is what autograd does for conv/max-pool).
    ``captum.attr.Deconvolution``, or our override for functional ReLUs. Output ``(B, C, H, W)``."""

    guided = False
    _captum_cls = captum.Deconvolution
