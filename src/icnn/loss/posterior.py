"""The posterior objective in closed form: its value and its analytic gradient, at its FLOPs.

The recipe's filter loss (``mode="posterior"``, :mod:`.filter_loss`) is, per layer,

    sum_f lambda_f mean_x -log p(T^|x)  +  w_div collision(p(T|x))  [+ w_dec redundancy(peaks)]

over the template scores ``s = tr(x.T)``. Autograd ran it as a chain of full-size passes over the
``(B, C, T)`` scores (log-softmax, exp, gather, bmm, each with its backward, and ``max``'s backward
scattered into a zeroed copy of the maps), in a layout whose reductions over ``T`` are slow on CPU.
Here the scores are laid out ``(B, T, C)`` (every reduction over ``T`` or the batch is then over a
non-inner dimension, which vectorises), the exps that ``Z_T`` takes over the batch serve the
posterior too (:func:`batch_exp`; where they underflowed, one more exp in log space), and the
gradient is written out (``Z_T`` a constant, as in the autograd path)::

    dL/dA_t = p(t|x) (lambda/B + k w (P(t) - sum_u p(u|x) P(u))) - lambda/B [t = T^]

(``A = s + log p(T) - log Z_T``, ``P`` the category's mean posterior over the positions, ``k w`` the
collision's weight on this map): one ``(B, T, C)`` pass, then one matmul against the templates
gives ``dL/dx``, and the peaks' gradient is added at their units in place. The same values and
gradients as autograd to rounding (``tests/core/test_loss.py`` compares them in float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

_LOG_K_MAX = 60.0  # batch_exp's posterior: exp(m + c) below e^60, so that sum_T E stays finite in float32
_LOG_Z_MARGIN = 40.0  # ... and log z >= max_T (m + c) - 40: an exp flushed below e^-87 weighs < e^-47 in p(T|x)


class PosteriorTerms(NamedTuple):
    """What :func:`posterior_terms` returns; only ``loss`` and ``peaks`` carry a gradient."""

    loss: torch.Tensor  # sum_f lambda_f mean_b -log p(T^|x) + collision_weight * collision
    peaks: torch.Tensor  # (B, C) max_ij x, its gradient landing on each map's argmax unit
    log_norm: torch.Tensor  # (B, C) log sum_T p(T) exp(s_T) / Z_T: log p(x) + log N where Z_T is this batch's
    entropy: torch.Tensor  # (B, C) H(T|x)
    collision: torch.Tensor  # the collision (0 when not asked for)


@torch.no_grad()
def score_maps(x: torch.Tensor, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tr(x.T)`` laid out ``(B, T, C)`` (one matmul), and each map's peak ``max_ij x`` and its
    unit ``(B, C)`` (one ``max``: the first unit in row-major order on ties). No gradient."""
    b, c, h, w = x.shape
    flat = x.detach().reshape(b, c, h * w)
    scores = torch.matmul(templates.reshape(-1, h * w).to(x.dtype), flat.transpose(1, 2))
    peaks, units = flat.max(-1)
    return scores, peaks, units


class BatchExp(NamedTuple):
    """``exp`` of the scores below their batch maximum, shared by ``Z_T`` and the posterior."""

    d: torch.Tensor  # (B, T, C) s - m
    e: torch.Tensor  # (B, T, C) exp(s - m)
    m: torch.Tensor  # (T, C) max_b s
    lse: torch.Tensor  # (C, T) log sum_b exp(s), float64: what FilterStatistics.update takes


@torch.no_grad()
def batch_exp(scores: torch.Tensor, in_place: bool = False) -> BatchExp:
    """:class:`BatchExp` of :func:`score_maps`' scores: the same ``lse`` as ``state.batch_logsumexp``
    (float32 exps below the exact maximum, float64 sums), keeping the exps for the posterior.
    ``in_place``: ``d`` is written over the scores (one full-size buffer less to write)."""
    m = scores.amax(0)
    d = scores.sub_(m) if in_place else torch.sub(scores, m)
    e = d.exp()
    return BatchExp(d, e, m, (e.sum(0).double().log() + m.double()).t())


def posterior_terms(x, scores, peaks, units, log_z, log_prior, templates, t_hat, lam, is_target, collision_weight: float = 0.0,
                    shared: BatchExp | None = None) -> PosteriorTerms:  # fmt: skip
    """The posterior objective of maps ``x (B, C, h, w)`` from :func:`score_maps`' ``scores (B, T,
    C)``, ``peaks`` and ``units``: ``log_z (C, T)`` (a constant), ``log_prior (T,)``, the target
    templates ``t_hat (B, C)``, ``lam (C,)``, ``is_target (B, C)`` (the collision's filters per
    image) and the collision's weight (0: not computed); ``shared``, the scores' :func:`batch_exp`,
    saves an exp (it is consumed). Differentiable in ``x`` through the returned ``loss`` and
    ``peaks`` when ``x`` requires a gradient."""
    state = _Posterior(log_z.t().to(scores.dtype), log_prior.to(scores.dtype), t_hat, lam.to(scores.dtype))
    if shared is None or not state.from_batch_exp(shared):
        if shared is not None and shared.d is scores:  # batch_exp(in_place=True) wrote over them (rare: see _LOG_Z_MARGIN)
            scores = score_maps(x, templates)[0]
        state.log_space(scores)
    loss = state.nll_loss()
    collision = scores.new_zeros(())
    if collision_weight > 0:
        collision = state.collision(is_target, collision_weight)
        loss = loss + collision_weight * collision
    if torch.is_grad_enabled() and x.requires_grad:
        state.finish(templates, units)
        loss, peaks = _PosteriorFunction.apply(x, loss, peaks, state)
    return PosteriorTerms(loss, peaks, state.log_norm, state.entropy, collision)


class _Posterior:
    """The posterior ``p(T|x) = E / z`` of every map with ``A = s + log p(T) - log Z_T``, ``E = exp(A
    - r)`` for some ``r (B, 1, C)`` and ``z = sum_T E`` (``E (B, T, C)`` and ``1 / z``: what the
    gradient needs), ``log p(x) + log N = r + log z``, ``H(T|x)`` and ``-log p(T^|x)``."""

    def __init__(self, log_z_t, log_prior, t_hat, lam):
        self.c = (log_prior[:, None] - log_z_t).contiguous()  # (T, C): A = s + c
        self.t_hat, self.lam = t_hat, lam
        self.p_pos = self.kw = None

    @torch.no_grad()
    def log_space(self, scores) -> None:
        """``r = max_T A``: one more exp over the scores; exact for any scores."""
        a = scores + self.c  # (B, T, C)
        m = a.amax(1, keepdim=True)
        d = a.sub_(m)  # log of E: <= 0
        self.e = d.exp()
        z = self.e.sum(1, keepdim=True)  # (B, 1, C), >= 1
        log_zs = z.log()[:, 0]
        self.inv_z = z.reciprocal_()
        self.log_norm = m[:, 0] + log_zs
        self.nll = log_zs - d.gather(1, self.t_hat[:, None, :])[:, 0]  # -log p(T^|x)
        self.entropy = log_zs - d.mul_(self.e).sum(1) * self.inv_z[:, 0]  # -sum p log p, log p = d - log z

    @torch.no_grad()
    def from_batch_exp(self, shared: BatchExp) -> bool:
        """``r = 0``: ``E = exp(s - m) exp(m + c)`` from the exps ``Z_T`` took, where that is as exact
        as ``log_space`` to rounding: ``exp(m + c)`` finite, and every map's ``z`` large enough that
        the exps that underflowed (below ``e^-87``) weigh less than ``e^-47`` in its posterior (with
        ``Z_T`` this batch's own, ``m + c <= log B``: only maps ``~40`` below the batch's maximum at
        every template fail it). Returns whether it was; ``shared.e`` may be consumed either way."""
        log_k = shared.m + self.c  # (T, C)
        k_max = log_k.amax(0)  # (C,)
        if not bool((k_max <= _LOG_K_MAX).all()):
            return False
        e = shared.e.mul_(log_k.exp())  # exp(A)
        z = e.sum(1, keepdim=True)
        log_zs = z.log()[:, 0]
        if not bool((log_zs >= k_max - _LOG_Z_MARGIN).all()):
            return False
        a = shared.d.add_(log_k)  # A
        self.e, self.inv_z, self.log_norm = e, z.reciprocal_(), log_zs
        self.nll = log_zs - a.gather(1, self.t_hat[:, None, :])[:, 0]
        self.entropy = log_zs - a.mul_(e).sum(1) * self.inv_z[:, 0]
        return True

    @torch.no_grad()
    def nll_loss(self) -> torch.Tensor:
        """``sum_f lambda_f mean_b -log p(T^|x)``."""
        return (self.lam * self.nll.mean(0)).sum()

    @torch.no_grad()
    def collision(self, is_target, weight: float) -> torch.Tensor:
        """:func:`.filter_loss.position_collision` of the posterior; keeps what its gradient needs:
        ``P (B, T)`` (0 at ``T-``) and each map's weight ``k w (B, C)`` on it."""
        w = is_target.to(self.e.dtype)  # (B, C)
        count = w.sum(1)
        v = w / count.clamp_min(1)[:, None] * self.inv_z[:, 0]  # p_f = E_f / z_f
        p = torch.bmm(v[:, None, :], self.e.transpose(1, 2))[:, 0]  # (B, T): sum_f w p_f / count
        p[:, -1] = 0.0  # T- is no position
        units = p.shape[-1] - 1
        ok = count > 0
        n_ok = int(ok.sum())
        if n_ok == 0:
            return p.new_zeros(())
        self.p_pos = p
        self.kw = w * (weight * 2.0 * units / n_ok * ok.to(w.dtype) / count.clamp_min(1))[:, None]  # d(weight * collision)/dP(u) = kw P(u)
        return units * p.pow(2).sum(-1)[ok].mean()

    def finish(self, templates, units) -> None:
        """What only the gradient needs: the templates and each map's argmax unit (the peaks')."""
        self.templates, self.units = templates, units

    @torch.no_grad()
    def grad(self, shape, g_loss, g_peaks) -> torch.Tensor:
        """``dL/dx``: the scores' gradient in one pass, one matmul against the templates, and the
        peaks' gradient added at their units."""
        b, c, h, w = shape
        dtype = self.e.dtype
        if g_loss is not None:
            nll = (g_loss * self.lam / b).to(dtype)  # (C,): d/d log p(T^|x) = -lambda / B
            if self.kw is None:
                g = self.e * (self.inv_z * nll)
            else:  # collision: dL/dA = p (k w (P - sum_u p(u) P(u)))
                kw = g_loss * self.kw[:, None, :]  # (B, 1, C)
                q = torch.bmm(self.p_pos[:, None, :], self.e) * self.inv_z  # (B, 1, C): sum_u p(u|x) P(u)
                g = torch.addcmul(self.inv_z * (nll - kw * q), self.p_pos[:, :, None], self.inv_z * kw).mul_(self.e)
            g.scatter_add_(1, self.t_hat[:, None, :], (-nll).expand(b, 1, c))
        dx = self.e.new_empty(shape)  # not a view: autograd may keep it as the gradient without a copy
        flat = dx.view(b, c, h * w)
        if g_loss is None:
            flat.zero_()
        else:
            torch.matmul(g.transpose(1, 2), self.templates.reshape(-1, h * w).to(dtype), out=flat)
        if g_peaks is not None:
            flat.scatter_add_(2, self.units[..., None], g_peaks[..., None].to(dtype))
        return dx


class _PosteriorFunction(torch.autograd.Function):
    """``loss`` and ``peaks`` as computed, their gradient w.r.t. the maps from ``_Posterior.grad``."""

    @staticmethod
    def forward(ctx, x, loss, peaks, state):
        ctx.state, ctx.shape = state, x.shape
        ctx.set_materialize_grads(False)
        return loss.clone(), peaks.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_peaks):
        return ctx.state.grad(ctx.shape, g_loss, g_peaks), None, None, None
