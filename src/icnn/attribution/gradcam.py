"""Grad-CAM (Selvaraju et al., ICCV 2017) on any layer of any CNN."""

from __future__ import annotations

import torch
from captum import attr as captum
from torch import nn

from .base import Attribution, AttributionError, OutputSelector, resolve_layer


class GradCAM(Attribution):
    """``L = ReLU(sum_k a_k A^k)``, ``a_k = mean_ij dS/dA^k_ij`` (Grad-CAM Eq. 1-2).

    ``A`` is the output ``(B, K, h, w)`` of ``layer`` (a submodule or a dotted name such as
    ``"layers.new"``). Computed by ``captum.attr.LayerGradCam`` with ``relu_attributions=True``
    (Captum's default leaves out the paper's ReLU). Output ``(B, h, w)``; ``upsample=True`` gives
    ``(B, H, W)`` (bilinear). If the layer runs several times in one forward, the last call counts.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str, *, output_selector: OutputSelector = None):
        super().__init__(model, output_selector=output_selector)
        self.layer: nn.Module | None = resolve_layer(self.model, layer)
        self._layer_name = next(n for n, m in self.model.named_modules() if m is self.layer)  # for messages

    def _attribute(self, x: torch.Tensor) -> torch.Tensor:
        try:
            cam = captum.LayerGradCam(self._scorer, self.layer).attribute(x, relu_attributions=True)
        except AssertionError as e:  # Captum's way of saying the hook saw nothing
            if "did not obtain any outputs" not in str(e):
                raise
            raise AttributionError(f"layer: {self._layer_name!r} is not called in the model's forward pass") from e
        if not torch.is_tensor(cam) or cam.ndim != 4:
            raise AttributionError(f"layer: {self._layer_name!r} must output one (B, K, h, w) tensor for Grad-CAM")
        return cam[:, 0]  # (B, h, w)

    def release(self) -> None:
        super().release()
        self.layer = None
