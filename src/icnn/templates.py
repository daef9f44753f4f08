"""Part templates of an interpretable filter (Zhang, Wu, Zhu, CVPR 2018, §3 and Fig. 3).

A filter's feature map ``x`` of size ``h x w`` is matched against ``h*w`` positive templates
``T_mu`` (one per unit ``mu``, the part sitting at that unit) and one negative template ``T-``
(the filter stays silent: the image is not of the filter's category)::

    t+_ij = tau * max(1 - beta * d([i, j], mu) / n, -1)          (paper §3)
    t-_ij = -tau

``d`` is the L1 distance (the paper's choice) or L2 ("round" templates, Fig. 3 caption).
For non-square maps ``n`` is read as ``max(h, w)`` so that a template reaches ``-1`` at the same
fraction of the longer side; for square maps this is the paper's ``n``.
"""

from __future__ import annotations

import torch

DISTANCES = ("l1", "l2")


def default_tau(h: int, w: int) -> float:
    """``tau = 0.5 / n^2`` (paper §5), with ``n^2`` read as the number of units ``h*w``."""
    return 0.5 / (h * w)


def default_alpha(h: int, w: int) -> float:
    """``alpha = n^2 / (1 + n^2)`` (paper §5): the prior mass of all positive templates."""
    return (h * w) / (1.0 + h * w)


def _unit_grid(h: int, w: int, device=None) -> torch.Tensor:
    ii, jj = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack((ii, jj), dim=-1)  # (h, w, 2)


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between ``a (..., 2)`` and ``b (..., 2)`` (broadcast), L1 or L2."""
    if distance == "l1":
        return (a - b).abs().sum(-1)
    if distance == "l2":
        return (a - b).pow(2).sum(-1).sqrt()
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def template_shape(
    mu: torch.Tensor, h: int, w: int, *, beta: float = 4.0, distance: str = "l1"
) -> torch.Tensor:
    """The template *shape* ``max(1 - beta * d(ij, mu) / n, -1)`` for a batch of centres.

    This is ``T_mu / tau``: the mask of paper §3 (the original code applies the unscaled shape).

    Args:
        mu: ``(..., 2)`` centres as (row, column); integer (argmax) or fractional (centroid).
        h, w: map size.
        beta: slope of the template (paper: 4).
        distance: ``"l1"`` (paper) or ``"l2"`` (round templates).

    Returns:
        ``(..., h, w)`` float tensor with values in ``[-1, 1]``.
    """
    n = float(max(h, w))
    grid = _unit_grid(h, w, device=mu.device)  # (h, w, 2)
    mu = mu.to(grid.dtype)[..., None, None, :]  # (..., 1, 1, 2)
    d = _distance(grid, mu, distance)  # (..., h, w)
    return torch.clamp(1.0 - beta * d / n, min=-1.0)


def part_templates(
    h: int,
    w: int,
    *,
    tau: float | None = None,
    beta: float = 4.0,
    distance: str = "l1",
) -> torch.Tensor:
    """All templates of an ``h x w`` map: ``h*w`` positive ones, then the negative one.

    Positive template ``k`` is centred at unit ``mu = (k // w, k % w)`` (row-major).

    Returns:
        ``(h*w + 1, h, w)`` float32 tensor; the last slice is ``-tau`` everywhere.
    """
    if h < 1 or w < 1:
        raise ValueError(f"map size must be positive, got {h}x{w}")
    tau = default_tau(h, w) if tau is None else float(tau)
    mus = _unit_grid(h, w).reshape(h * w, 2)  # (h*w, 2) row-major
    positive = tau * template_shape(mus, h, w, beta=beta, distance=distance)  # (h*w, h, w)
    negative = torch.full((1, h, w), -tau)
    return torch.cat((positive, negative), dim=0)


def template_priors(h: int, w: int, *, alpha: float | None = None) -> torch.Tensor:
    """``p(T)``: ``alpha / n^2`` for each positive template, ``1 - alpha`` for ``T-``."""
    alpha = default_alpha(h, w) if alpha is None else float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    prior = torch.full((h * w + 1,), alpha / (h * w), dtype=torch.float64)
    prior[-1] = 1.0 - alpha
    return prior
