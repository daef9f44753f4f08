"""Saliency maps (Simonyan et al. 2014; survey §3.2.2, Eq. 6-7)."""

from __future__ import annotations

import torch
from captum import attr as captum

from .base import Attribution


class Saliency(Attribution):
    """``M_ij = max_c |dS_c / dI|_(c, i, j)``: the largest absolute input gradient over channels.

    ``w = dS_c/dI`` at the image (Eq. 6) comes from ``captum.attr.Saliency`` (``abs=True``); the
    channel max is Eq. 7. Output ``(B, H, W)``.
    """

    def _attribute(self, x: torch.Tensor) -> torch.Tensor:
        grad = captum.Saliency(self._scorer).attribute(x, abs=True)  # (B, C, H, W)
        return grad.amax(dim=1)  # (B, H, W)
