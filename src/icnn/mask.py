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
from torch.autograd.function import once_differentiable

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


class _MaskedReLU(torch.autograd.Function):
    """``relu(x * m)`` for a constant ``m``: the ReLU in place on the product, and a backward of two
    passes (``threshold_backward``, then ``* m`` in place) -- the same values and gradient as
    autograd's, which keeps a second output and a second gradient alive."""

    @staticmethod
    def forward(ctx, x, m):
        y = torch.mul(x, m).clamp_min_(0.0)
        ctx.save_for_backward(y, m)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, m = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0).mul_(m), None


def masked_relu(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``relu(x * m)``, differentiable in ``x`` only (``m`` is the mask: no gradient)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedReLU.apply(x, m.detach())
    return torch.mul(x, m).clamp_min_(0.0)


class PartMask(nn.Module):
    """Masks each filter's map with the template shape centred at its part location.

    Args:
        beta: template slope (paper: 4), or ``"adaptive"``: one slope per filter, learned as in
            the authors' MATLAB code -- it starts at ``beta_init`` (a nearly flat mask) and each
            training step moves it by ``beta_rate`` towards ``clip(beta_spread / spread,
            *beta_range)``, where ``spread`` is the filter's activation-weighted spatial spread
            (units); slopes are in that code's coordinates (the map spans ``[-1, 1]``, so the
            paper's 4 on an ``n x n`` map is about ``2`` there). Saved in ``state_dict``.
        distance: ``"l1"`` (paper) or ``"l2"`` (round templates).
        mu: ``"argmax"`` (paper) or ``"centroid"`` (original MATLAB code, training).

    Shape: ``(B, C, h, w) -> (B, C, h, w)``; any ``h, w``.
    """

    def __init__(
        self,
        *,
        beta: float | str = 4.0,
        distance: str = "l1",
        mu: str = "argmax",
        beta_init: float = 0.1,
        beta_range: tuple[float, float] = (1.5, 3.0),
        beta_spread: float = 3.0,
        beta_rate: float = 0.05,
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if mu not in MU_MODES:
            raise ValueError(f"mu must be one of {MU_MODES}, got {mu!r}")
        self.adaptive = beta == "adaptive"
        if not self.adaptive:
            if isinstance(beta, str) or not float(beta) > 0:
                raise ValueError(f"beta must be a positive number or 'adaptive', got {beta!r}")
            self.beta = float(beta)
        else:
            lo, hi = (float(v) for v in beta_range)
            if not (0 < lo <= hi and beta_init > 0 and beta_spread > 0 and 0 < beta_rate <= 1):
                raise ValueError("adaptive beta needs 0 < beta_range[0] <= beta_range[1], beta_init > 0, "
                                 f"beta_spread > 0 and 0 < beta_rate <= 1 (got {beta_range}, {beta_init}, {beta_spread}, {beta_rate})")
            self.beta = "adaptive"
            self.beta_init, self.beta_range, self.beta_spread, self.beta_rate = float(beta_init), (lo, hi), float(beta_spread), float(beta_rate)
            # per-filter slopes in the original code's coordinates (map spans [-1, 1]); sized
            # on the first forward (or by load_state_dict)
            self.register_buffer("beta_f", torch.empty(0))
        self.distance = distance
        self.mu = mu
        # 1 = the paper's mask; 0 = identity; in between, ``(1 - s) + s * M``. The training
        # engine ramps it from 0 to 1 over ``TrainConfig.mask_warmup_epochs`` (a fresh new
        # layer and head learn too slowly through the full mask); not saved: a model loaded
        # for inference always applies the full mask.
        self.strength = 1.0
        self._tables: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "beta_f"
        if self.adaptive and key in state_dict and state_dict[key].shape != self.beta_f.shape:
            self.beta_f = torch.empty_like(state_dict[key], device=self.beta_f.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        if self.adaptive:
            return self._adaptive_mask(x)
        if self.mu == "argmax":
            # a table lookup: the shape centred at each map's argmax unit
            idx = x.reshape(b, c, h * w).max(dim=-1).indices  # (B, C): argmax, first on ties (max is faster on CPU)
            return self.shape_table(h, w, x.device, x.dtype).index_select(0, idx.reshape(-1)).reshape(b, c, h, w)
        mu = locate_parts(x, self.mu)  # (B, C, 2)
        return template_shape(mu, h, w, beta=self.beta, distance=self.distance).to(x.dtype)

    def _adaptive_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The original code's mask (getMask.m): ``max(1 - beta_f * d(ij, mu), -1)`` with ``d``
        measured on a map spanning ``[-1, 1]`` in each direction and one slope per filter."""
        b, c, h, w = x.shape
        if self.beta_f.numel() == 0:
            self.beta_f = torch.full((c,), self.beta_init, device=x.device, dtype=torch.float32)
        elif self.beta_f.numel() != c:
            raise ValueError(f"adaptive PartMask has slopes for {self.beta_f.numel()} filters, got maps of {c}")
        mu = locate_parts(x, self.mu)  # (B, C, 2) unit coordinates
        rows = torch.arange(h, device=x.device, dtype=torch.float32)
        cols = torch.arange(w, device=x.device, dtype=torch.float32)
        dr = (rows[None, None, :, None] - mu[..., 0, None, None]) * (2.0 / max(h - 1, 1))  # (B, C, h, 1)
        dc = (cols[None, None, None, :] - mu[..., 1, None, None]) * (2.0 / max(w - 1, 1))  # (B, C, 1, w)
        d = dr.abs() + dc.abs() if self.distance == "l1" else (dr.square() + dc.square()).sqrt()
        return torch.clamp(1.0 - self.beta_f[None, :, None, None] * d, min=-1.0).to(x.dtype)  # (B, C, h, w)

    @torch.no_grad()
    def _update_beta(self, x: torch.Tensor, m: torch.Tensor) -> None:
        """Moves each filter's slope towards ``clip(spread_c / sqrtvar, lo, hi)`` (the original
        code's beta update): ``sqrtvar`` is the activation-weighted spatial spread of a map
        around its centroid (units), averaged over the batch weighted by the masked mean
        activation; a filter whose activations are concentrated gets a sharper mask."""
        b, c, h, w = x.shape
        centre = locate_parts(x, "centroid").round()  # (B, C, 2)
        rows = torch.arange(h, device=x.device, dtype=x.dtype)
        cols = torch.arange(w, device=x.device, dtype=x.dtype)
        d2 = (rows[None, None, :, None] - centre[..., 0, None, None]).square() + (cols[None, None, None, :] - centre[..., 1, None, None]).square()
        mass = x.sum((-2, -1))  # (B, C)
        sqrtvar = ((d2 * x).sum((-2, -1)) / mass.clamp_min(1e-9)).sqrt()
        weight = (x * m).mean((-2, -1)).clamp_min(0.0)  # (B, C)
        total = weight.sum(0)
        spread = (weight * sqrtvar).sum(0) / total.clamp_min(1e-30)
        lo, hi = self.beta_range
        target = torch.clamp(self.beta_spread / spread.clamp_min(1e-9), lo, hi)
        step = torch.where(total > 0, self.beta_rate * (target - self.beta_f), torch.zeros_like(target))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step)
            step /= torch.distributed.get_world_size()
        self.beta_f += step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.strength
        if s <= 0.0 and not self.adaptive:
            return torch.relu(x)
        m = self.mask(x)
        if self.adaptive and self.training and torch.is_grad_enabled():
            self._update_beta(x.detach().float(), m.float())  # the slope used by the next step
        return masked_relu(x, m if s >= 1.0 else (1.0 - s) + s * m)

    def extra_repr(self) -> str:
        extra = "" if self.strength >= 1.0 else f", strength={self.strength:g}"
        beta = repr(self.beta) if self.adaptive else self.beta
        return f"beta={beta}, distance={self.distance!r}, mu={self.mu!r}{extra}"
