"""The E-step of one graph layer, vectorised over images and nodes (SPEC-trees-graph §2a steps 2-4,
§2d; the authors' ``doE.m``, ``getProb_local_mex.cpp``, ``getOtherProb.cpp`` and
``learn_explanatoryGraph.m:45-86``).

Node ``V`` (filter ``c``, ``P`` nodes per filter) with prior centre ``m = mu_V + shift_V(I)``
(``shift`` = the parents' mean deviation, ``parents.py``) searches ``n x n`` candidate offsets
``o = (o_i, o_j)``, the midpoints of ``n`` equal bins of ``[-h, h]`` on each axis, with
``h = round(min(max_range H / 2, deform_ratio sigma_V))``. For candidate ``k``:

    prob_k  = lambda_V(I) * g(o_i; cd_V) * g(o_j; cd_V)         deformation prior, g = 1-D normal pdf
    prior_k = sum_cells T_k(cell) R(round(m) + cell)            response, T = Gaussian (sigma map_delta H)
    S_V(I)  = sum_k prob_k prior_k                              the node's score
    k*      = argmax_k prob_k prior_k,  p_V(I) = m + o_k*       inferred position (sub-pixel)

The competition among a filter's nodes (``getOtherProb.cpp``): for candidate ``k`` of ``V`` at
``z = m + o_k``, ``sumProb_k = sum_{V' same filter} prob_{V'}(candidate of V' nearest to z)``,
counted where ``z`` lies in the box of ``V'``'s candidates; ``tau = tau_rate * mean_V sum_k prob``
over all nodes of the layer; ``finalProb = prob / (sumProb + tau) * prior`` feeds the M-step.

Vectorised forms:

- response: nodes grouped by ``h`` (a handful of values); the windows are gathered from the
  zero-padded maps ``(B, V_h, 2h+1, 2h+1)``; the code's templates (constant tails, sub-pixel part
  of ``m`` ignored) make a ``(n^2, (2h+1)^2)`` matrix, the fixed ones are separable with the
  sub-pixel offset: ``g_rows @ window @ g_cols^T``.
- competition: ``prob`` is separable, ``lambda g(o_i) g(o_j)``, and the nearest candidate on a
  regular grid is the nearest per axis, ``ceil((z - first) / spacing - 1/2)`` (ties to the lower
  index, as the code's strict ``<``), so a pair ``(V, V')`` adds the outer product of two per-axis
  factors to ``sumProb``; only pairs whose candidate boxes overlap can add anything, and only
  those are computed (``nonzero`` over the ``P x P`` overlaps of each filter): exact, and about
  a quarter of all pairs for the code's densities.
- numerics: ``lambda`` and ``g`` are handled in log space; each sum is taken relative to its
  largest factor (``sumProb`` relative to ``tau``, which bounds every term by ``10 C P``), so
  nothing overflows; a zero response (silent window) gives ``log S = log(max factor) + log(tiny)``,
  finite, still below any firing value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
TAIL = 3.0  # the code's templates are a constant beyond 3 sigma (``tooFar``)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C/MATLAB ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def half_ranges(sigma: torch.Tensor, side: int, max_range: float, deform_ratio: float) -> torch.Tensor:
    """``h = round(min(max_range H / 2, deform_ratio sigma))`` per node (``getBasicSettings.m``)."""
    return round_half_away((sigma * deform_ratio).clamp(max=max_range * side / 2)).long()


def offsets(half: torch.Tensor, n: int) -> torch.Tensor:
    """Candidate offsets ``(..., n)``: midpoints of ``n`` equal bins of ``[-h, h]``."""
    h = half.to(torch.float32)[..., None]
    return -h + (torch.arange(n, dtype=torch.float32) + 0.5) * (2 * h / n)


def code_templates(h: int, n: int, sigma: float) -> torch.Tensor:
    """The code's response templates ``(n*n, (2h+1)^2)`` (``getGaussTemp``): candidate ``(i, j)``
    row-major, window cells row-major; ``exp(-d^2 / 2s^2) / (sqrt(2 pi) s)``, and beyond ``3 s`` the
    constant ``exp(-4.5) / (sqrt(2 pi) s)`` instead of the Gaussian's tail."""
    o = offsets(torch.tensor(h), n)  # (n,)
    d = torch.arange(-h, h + 1, dtype=torch.float32)
    dy = (o[:, None, None, None] - d[None, None, :, None]).pow(2)  # (n, 1, 2h+1, 1)
    dx = (o[None, :, None, None] - d[None, None, None, :]).pow(2)  # (1, n, 1, 2h+1)
    d2 = (dy + dx).reshape(n * n, -1)
    norm = math.sqrt(2 * math.pi) * sigma
    t = torch.exp(-d2 / (2 * sigma**2)) / norm
    return torch.where(d2 < (TAIL * sigma) ** 2, t, torch.full_like(t, math.exp(-(TAIL**2) / 2) / norm))


def response(R: torch.Tensor, m: torch.Tensor, half: torch.Tensor, n: int, sigma_map: float, faithful: bool) -> torch.Tensor:
    """``prior (B, C, P, n, n)``: each candidate's pooled response (module doc).

    Args:
        R: ``(B, C, H, W)`` normalised maps, ``>= 0``.
        m: ``(B, C, P, 2)`` node centres (row, col) in map units.
        half: ``(C, P)`` integer half-ranges.
        faithful: the code's templates (window at ``round(m)``, constant tails) or the fixed ones
            (Gaussian centred at the sub-pixel ``m + o``, no constant tails).
    """
    b, c, H, W = R.shape
    p = m.shape[2]
    pad = 2 * int(half.max()) + 1  # a window clamped to [-h-1, H+h] is then wholly inside the padding
    hp, wp = H + 2 * pad, W + 2 * pad
    flat = F.pad(R, (pad, pad, pad, pad)).reshape(b, c * hp * wp)
    centre = round_half_away(m).reshape(b, c * p, 2)
    frac = m.reshape(b, c * p, 2) - centre
    channel = torch.arange(c).repeat_interleave(p)  # (CP,)
    out = R.new_empty(b, c * p, n, n)
    for h in torch.unique(half).tolist():  # a handful of half-ranges, not nodes
        sel = (half.reshape(-1) == h).nonzero()[:, 0]  # (V,)
        d = torch.arange(-h, h + 1)
        cy = centre[:, sel, 0].long().clamp(-h - 1, H + h)[..., None, None]  # (B, V, 1, 1)
        cx = centre[:, sel, 1].long().clamp(-h - 1, W + h)[..., None, None]
        idx = channel[sel][:, None, None] * (hp * wp) + (cy + pad + d[:, None]) * wp + (cx + pad + d[None, :])
        win = flat.gather(1, idx.reshape(b, -1)).reshape(b, len(sel), 2 * h + 1, 2 * h + 1)
        if faithful:
            t = code_templates(h, n, sigma_map)  # (n*n, cells)
            out[:, sel] = (win.reshape(b, len(sel), -1) @ t.T).reshape(b, len(sel), n, n)
        else:
            o = offsets(torch.tensor(h), n)  # (n,)
            gy = (o[:, None] + frac[:, sel, 0, None, None] - d).pow(2)  # (B, V, n, 2h+1)
            gx = (o[:, None] + frac[:, sel, 1, None, None] - d).pow(2)
            gy = torch.exp(-gy / (2 * sigma_map**2))
            gx = torch.exp(-gx / (2 * sigma_map**2)) / (math.sqrt(2 * math.pi) * sigma_map)
            out[:, sel] = gy @ win @ gx.transpose(-1, -2)
    return out.reshape(b, c, p, n, n)


def log_gauss(o: torch.Tensor, cd: torch.Tensor) -> torch.Tensor:
    """``log g(o; cd)`` of the 1-D normal pdf: ``o (C, P, n)``, ``cd (C, P)`` -> ``(C, P, n)``."""
    return -o.pow(2) / (2 * cd[..., None].pow(2)) - torch.log(cd)[..., None] - LOG_SQRT_2PI


def log_tau(L: torch.Tensor, log_lam: torch.Tensor, tau: float) -> torch.Tensor:
    """``log tau (B,)``: ``tau * mean over the layer's nodes of sum_k prob_k`` (``learn:61``)."""
    per_node = log_lam + 2 * torch.logsumexp(L, -1)  # (B, C, P): log sum_k prob_k, prob separable
    return math.log(tau) + torch.logsumexp(per_node.flatten(1), 1) - math.log(per_node[0].numel())


def _axis_factor(z: torch.Tensor, first: torch.Tensor, last: torch.Tensor, o0: torch.Tensor, spacing: torch.Tensor,
                 omin: torch.Tensor, var: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One axis of the competition for ``E`` pairs ``(V, q)``: ``z (E, n)`` = ``V``'s candidate
    coordinates; the rest ``(E, 1)``: ``q``'s first and last candidate coordinates, first offset,
    spacing, smallest squared offset, ``2 cd_q^2``. Returns ``(E, n)``: ``g(o_q(a); cd_q) / max_a g``
    at ``q``'s candidate ``a`` nearest to ``z``, 0 where ``z`` lies outside ``[first, last]``."""
    inside = (z >= first) & (z <= last)
    inv = 1 / torch.where(spacing > 0, spacing, torch.ones_like(spacing))
    a = ((z - first) * inv).sub_(0.5).ceil_()  # nearest candidate, ties to the lower (the code's strict <)
    oa = a.mul_(spacing).add_(o0)
    return oa.square_().sub_(omin).mul_(-1 / var).exp_().mul_(inside)


def competition(m: torch.Tensor, o: torch.Tensor, cd: torch.Tensor, log_lam: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """``log(sumProb + tau)`` ``(B, C, P, n, n)`` for every candidate ``(i, j)`` of every node.

    Only pairs of nodes of one filter whose candidate boxes overlap on both axes can meet (a
    candidate of ``V`` lies in ``V``'s box), so the sum runs over those pairs (``nonzero``), exact.

    Args:
        m: ``(B, C, P, 2)`` centres; o: ``(C, P, n)`` offsets; cd: ``(C, P)``;
        log_lam: ``(B, C, P)``; log_t: ``(B,)`` = ``log tau``.
    """
    b, c, p, _ = m.shape
    n = o.shape[-1]
    w = torch.exp(log_lam + 2 * log_gauss(o, cd).amax(-1) - log_t[:, None, None])  # max_k prob_q / tau <= 10 C P
    lo, hi = m + o[..., :1], m + o[..., -1:]  # (B, C, P, 2) first and last candidate
    near = (lo[:, :, :, None, 0] <= hi[:, :, None, :, 0]) & (lo[:, :, None, :, 0] <= hi[:, :, :, None, 0])
    near &= (lo[:, :, :, None, 1] <= hi[:, :, None, :, 1]) & (lo[:, :, None, :, 1] <= hi[:, :, :, None, 1])
    pair = near.reshape(-1, p).nonzero()  # E pairs (V, q) (V itself among them), V flat over (B, C, P)
    v, q = pair[:, 0], pair[:, 0] - pair[:, 0] % p + pair[:, 1]
    node_v, node_q = v % (c * p), q % (c * p)  # flat over (C, P)
    spacing = o[..., 1] - o[..., 0] if n > 1 else torch.zeros_like(o[..., 0])
    per_q = torch.stack((o[..., 0], spacing, o.pow(2).amin(-1), 2 * cd.pow(2)), -1).reshape(c * p, 4)[node_q]
    o_v = o.reshape(c * p, n)[node_v]  # (E, n)
    m_v, lo_q, hi_q = m.reshape(-1, 2)[v], lo.reshape(-1, 2)[q], hi.reshape(-1, 2)[q]
    f = [_axis_factor(m_v[:, ax, None] + o_v, lo_q[:, ax, None], hi_q[:, ax, None], *per_q[:, :, None].unbind(1))
         for ax in (0, 1)]  # fmt: skip
    fy = f[0].mul_(w.reshape(-1)[q, None])
    outer = (fy[:, :, None] * f[1][:, None, :]).reshape(-1, n * n)
    ratio = torch.zeros(b * c * p, n * n).scatter_add_(0, v[:, None].expand(-1, n * n), outer)  # sum over q
    return log_t[:, None, None, None, None] + torch.log1p(ratio.reshape(b, c, p, n, n))  # log(sumProb/tau + 1) + log tau


class EStep(NamedTuple):
    """Per image and node (``B`` images, ``C`` filters, ``P`` nodes per filter)."""

    pos: torch.Tensor  # (B, C, P, 2) inferred position m + o_k* (row, col), map units
    log_score: torch.Tensor  # (B, C, P) log S = log sum_k prob prior
    log_peak: torch.Tensor  # (B, C, P) log of prob prior at k* (the code's inferredProb)
    spread: torch.Tensor  # (B, C, P) sum_k w_k |idx_k - centre|^2, w = prob prior / S (candidate steps^2)
    mass: torch.Tensor | None  # (B, C, P) sum_k finalProb (None without the competition)
    grad: torch.Tensor | None  # (B, C, P, 2) sum_k finalProb o_k / cd^2


def e_step(
    R: torch.Tensor,
    mu: torch.Tensor,
    half: torch.Tensor,
    cd: torch.Tensor,
    *,
    n: int,
    sigma_map: float,
    faithful: bool,
    tau: float = 0.1,
    shift: torch.Tensor | None = None,
    log_lam: torch.Tensor | None = None,
    compete: bool = True,
) -> EStep:
    """The E-step of one layer on a chunk of images (module doc).

    Args:
        R: ``(B, C, H, W)`` normalised maps; mu: ``(C, P, 2)`` node means; half: ``(C, P)``.
        cd: ``(C, P)`` prior sigma of the offsets (``curDelta``); n: candidates per axis.
        shift: ``(B, C, P, 2)`` = ``curMu`` (None: 0); log_lam: ``(B, C, P)`` (None: 0).
        compete: also compute the competition and the M-step sums (learning; matching needs none).
    """
    b, c = R.shape[:2]
    p = mu.shape[1]
    m = mu.expand(b, c, p, 2) if shift is None else mu + shift  # (B, C, P, 2)
    log_lam = torch.zeros(b, c, p) if log_lam is None else log_lam
    o = offsets(half, n)  # (C, P, n)
    L = log_gauss(o, cd)  # (C, P, n)
    Lmax = L.amax(-1)  # (C, P)
    E = torch.exp(L - Lmax[..., None])
    prior = response(R, m, half, n, sigma_map, faithful)  # (B, C, P, n, n)
    v = E[..., :, None] * E[..., None, :] * prior  # prob prior / exp(log_lam + 2 Lmax)
    vs = v.sum((-1, -2))  # (B, C, P)
    scale = log_lam + 2 * Lmax
    log_score = scale + torch.log(vs.clamp_min(torch.finfo(v.dtype).tiny))
    peak, k = v.flatten(-2).max(-1)  # first maximum on ties, as MATLAB's max
    log_peak = scale + torch.log(peak.clamp_min(torch.finfo(v.dtype).tiny))
    oi = o[None].expand(b, -1, -1, -1).gather(-1, (k // n)[..., None])[..., 0]
    oj = o[None].expand(b, -1, -1, -1).gather(-1, (k % n)[..., None])[..., 0]
    pos = m + torch.stack((oi, oj), -1)
    r = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2).pow(2)
    r2 = r[:, None] + r[None, :]  # (n, n) squared distance to the grid centre, candidate steps
    spread = torch.where(vs > 0, (v * r2).sum((-1, -2)) / vs.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(vs))
    if not compete:
        return EStep(pos, log_score, log_peak, spread, None, None)
    log_t = log_tau(L, log_lam, tau)
    log_den = competition(m, o, cd, log_lam, log_t)
    if faithful:  # the code's max(sumProb + tau, 1e-7)
        log_den = log_den.clamp_min(math.log(1e-7))
    log_prob = log_lam[..., None, None] + L[..., :, None] + L[..., None, :]
    final = torch.exp(log_prob - log_den) * prior  # prob / (sumProb + tau) <= 1, times the response
    mass = final.sum((-1, -2))
    gy = (final.sum(-1) * o).sum(-1) / cd.pow(2)  # sum_k finalProb o_i / cd^2
    gx = (final.sum(-2) * o).sum(-1) / cd.pow(2)
    return EStep(pos, log_score, log_peak, spread, mass, torch.stack((gy, gx), -1))
