"""The mask of an interpretable filter (paper §3, Fig. 4).

For each filter's map ``x`` (after ReLU) the layer picks the part location ``mu_hat`` and keeps
only the activations the template centred there allows::

    mu_hat   = argmax_ij x_ij                  (or the activation-weighted centroid)
    x_masked = max(x * M(mu_hat), 0),   M = max(1 - beta * d(ij, mu_hat) / n, -1)

``M`` is the template *shape* (the template without its factor ``tau``). The mask is applied in
training and at inference. Gradients flow through ``x * M`` but never through the choice of
``mu_hat`` (it is an argmax; the centroid is detached too).
"""

from __future__ import annotations

import torch
from torch import nn

from .templates import DISTANCES, template_shape

MU_MODES = ("argmax", "centroid")


def locate_parts(x: torch.Tensor, mode: str = "argmax") -> torch.Tensor:
    """Part location ``mu_hat`` of every map: ``(B, C, h, w) -> (B, C, 2)`` as (row, column).

    ``"argmax"`` returns integer positions (ties: the first unit in row-major order);
    ``"centroid"`` the activation-weighted mean position (the centre of the map for silent
    maps). No gradient flows through either.
    """
    x = x.detach()
    b, c, h, w = x.shape
    if mode == "argmax":
        flat = x.reshape(b, c, h * w).argmax(dim=-1)  # (B, C)
        return torch.stack((flat // w, flat % w), dim=-1).to(torch.float32)
    if mode == "centroid":
        x = x.float()
        mass = x.sum(dim=(-2, -1))  # (B, C)
        rows = torch.arange(h, device=x.device, dtype=x.dtype)
        cols = torch.arange(w, device=x.device, dtype=x.dtype)
        ri = (x.sum(-1) * rows).sum(-1)  # (B, C)
        cj = (x.sum(-2) * cols).sum(-1)
        safe = mass.clamp_min(torch.finfo(x.dtype).tiny)
        centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], device=x.device, dtype=x.dtype)
        mu = torch.stack((ri / safe, cj / safe), dim=-1)
        return torch.where((mass > 0)[..., None], mu, centre)
    raise ValueError(f"mu must be one of {MU_MODES}, got {mode!r}")


class PartMask(nn.Module):
    """Masks each filter's map with the template shape centred at its part location.

    Args:
        beta: template slope (paper: 4).
        distance: ``"l1"`` (paper) or ``"l2"`` (round templates).
        mu: ``"argmax"`` (paper) or ``"centroid"`` (original MATLAB code, training).

    Shape: ``(B, C, h, w) -> (B, C, h, w)``; any ``h, w``.
    """

    def __init__(self, *, beta: float = 4.0, distance: str = "l1", mu: str = "argmax"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if mu not in MU_MODES:
            raise ValueError(f"mu must be one of {MU_MODES}, got {mu!r}")
        self.beta = float(beta)
        self.distance = distance
        self.mu = mu
        self._tables: dict = {}

    def shape_table(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """All ``h*w`` template shapes ``(h*w, h, w)``, row-major in mu; cached per size."""
        key = (h, w, device, dtype)
        if key not in self._tables:
            mus = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
            table = template_shape(mus.reshape(h * w, 2).to(device), h, w, beta=self.beta, distance=self.distance)
            self._tables[key] = table.to(dtype)
        return self._tables[key]

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask ``M`` for every map of ``x``: ``(B, C, h, w)``, no gradient."""
        b, c, h, w = x.shape
        if self.mu == "argmax":
            # a table lookup: the shape centred at each map's argmax unit
            idx = x.reshape(b, c, h * w).argmax(dim=-1)  # (B, C)
            return self.shape_table(h, w, x.device, x.dtype).index_select(0, idx.reshape(-1)).reshape(b, c, h, w)
        mu = locate_parts(x, self.mu)  # (B, C, 2)
        return template_shape(mu, h, w, beta=self.beta, distance=self.distance).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * self.mask(x))

    def extra_repr(self) -> str:
        return f"beta={self.beta}, distance={self.distance!r}, mu={self.mu!r}"
