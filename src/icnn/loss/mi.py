"""The mutual information of Eq. 1 and its decomposition (Eq. 5-7), exact, over a batch.

For one filter with maps ``X = {x}`` (after ReLU, before the mask) and templates ``T``
(:mod:`icnn.templates`)::

    Loss_f = -MI(X; T) = -sum_T p(T) sum_x p(x|T) log(p(x|T) / p(x))            (Eq. 1)
    p(x|T) = exp(tr(x.T)) / Z_T,   Z_T = sum_x exp(tr(x.T)),   tr(x.T) = sum_ij x_ij t_ij   (Eq. 2)
    p(x)   = sum_T p(T) p(x|T)

Everything is in log space: ``exp`` is only taken of non-positive numbers, so activations of 1e4
give neither inf nor NaN.
"""

from __future__ import annotations

import math

import torch

from ..templates import part_templates, template_priors


def template_scores(x: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """``tr(x.T)`` for every map and template: ``(B, C, h, w), (T, h, w) -> (B, C, T)``."""
    b, c, h, w = x.shape
    return (x.reshape(b * c, h * w) @ templates.reshape(-1, h * w).t()).reshape(b, c, -1)


def log_likelihoods(scores: torch.Tensor, log_prior: torch.Tensor, log_z: torch.Tensor):
    """``log p(x|T)`` (B, C, T) and ``log p(x)`` (B, C) from scores and ``log Z_T`` (C, T)."""
    log_px_t = scores - log_z  # (B, C, T)
    return log_px_t, torch.logsumexp(log_px_t + log_prior, dim=-1)


def neg_mi(scores: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Eq. 1 from template scores ``(B, C, T)`` with ``Z_T`` over the batch: ``(C,)``.

    With ``a = log p(x, T) = log p(T) + log p(x|T) <= 0``: ``-MI = H(T|X) - H(T) = -sum_{x,T} p(x,T) a
    + sum_x p(x) log p(x) - H(T)``, with one exp over the scores (the costly step)."""
    a = scores - (torch.logsumexp(scores, dim=0) - log_prior)  # (B, C, T)
    m = a.detach().amax(-1)  # (B, C)
    e = (a - m[..., None]).exp()
    log_px = m + e.sum(-1).log()  # log p(x)
    return (log_px.exp() * log_px).sum(0) - (m.exp() * (e * a).sum(-1)).sum(0) + (log_prior.exp() * log_prior).sum()


def neg_mi_from_posterior(scores, log_post, post, t_hat, log_z, log_prior) -> torch.Tensor:
    """Eq. 1 ``(C,)`` from the template posterior ``log p(T|x)``, ``p(T|x)`` ``(B, C, T)`` computed
    with ``log_z = log mean_x exp(scores)`` of this batch, at no new exp over the scores:
    ``-MI = sum_x p(x) H(T|x) - H(T)``, where ``log p(x) = A_t - log p(t|x) - log B`` for any
    template ``t`` (``A = scores + log p(T) - log_z``), taken at ``t_hat (B, C)``."""
    a_hat = scores.gather(-1, t_hat[..., None])[..., 0] + log_prior[t_hat] - log_z.gather(-1, t_hat.t()).t()
    log_px = a_hat - log_post.gather(-1, t_hat[..., None])[..., 0] - math.log(scores.shape[0])  # (B, C)
    return (log_px.exp() * -(post * log_post).sum(-1)).sum(0) + (log_prior.exp() * log_prior).sum()


def decompose(scores: torch.Tensor, log_prior: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 5-7 terms from template scores ``(B, C, T)`` (``Z_T`` over the batch), each ``(C,)``."""
    log_px_t, log_px = log_likelihoods(scores, log_prior, torch.logsumexp(scores, dim=0))
    prior_entropy = -(log_prior.exp() * log_prior).sum()
    log_joint = log_px_t + log_prior  # log p(T, x)  (B, C, T)
    log_post = log_joint - log_px[..., None]  # log p(T|x)
    log_post_pos = torch.logsumexp(log_post[..., :-1], dim=-1)  # log p(T+|x)  (B, C)
    px = log_px.exp()

    def plogp(logp):
        return torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))

    inter = -(px * (plogp(log_post_pos) + plogp(log_post[..., -1]))).sum(0)  # Eq. 6
    h_spatial = -plogp(log_post[..., :-1] - log_post_pos[..., None]).sum(-1)  # H(T+|X=x), Eq. 7 with its minus
    spatial = (torch.logsumexp(log_joint[..., :-1], dim=-1).exp() * h_spatial).sum(0)  # sum_x p(T+, x) H(T+|x)
    prior_entropy = prior_entropy.expand_as(inter)
    return {"prior_entropy": prior_entropy, "inter_entropy": inter, "spatial_entropy": spatial,
            "neg_mi": -prior_entropy + inter + spatial}  # fmt: skip


def _scores_and_prior(x, tau, beta, alpha, distance):
    if x.dim() != 4:
        raise ValueError(f"expected feature maps of shape (B, C, h, w), got {tuple(x.shape)}")
    x = x if x.dtype == torch.float64 else x.float()
    h, w = x.shape[-2:]
    templates = part_templates(h, w, tau=tau, beta=beta, distance=distance).to(x.device, x.dtype)
    log_prior = template_priors(h, w, alpha=alpha).log().to(x.device, x.dtype)  # (T,)
    return template_scores(x, templates), log_prior


def mutual_information_loss(x: torch.Tensor, *, tau: float | None = None, beta: float = 4.0, alpha: float | None = None,
                            distance: str = "l1") -> torch.Tensor:  # fmt: skip
    """Exact ``-MI(X; T)`` of Eq. 1 over a batch, per filter.

    ``X`` is the batch of maps of each filter (``p(x|T)`` normalised over the batch), ``T`` the
    ``h*w + 1`` templates with priors ``p(T_mu) = alpha / n^2``, ``p(T-) = 1 - alpha``.

    Args:
        x: ``(B, C, h, w)`` feature maps after ReLU.
        tau, beta, alpha, distance: template parameters (paper defaults when ``None``).

    Returns:
        ``(C,)``, differentiable w.r.t. ``x``. Computed in float32 (float64 if ``x`` is).
    """
    return neg_mi(*_scores_and_prior(x, tau, beta, alpha, distance))


def mi_decomposition(x: torch.Tensor, *, tau: float | None = None, beta: float = 4.0, alpha: float | None = None,
                     distance: str = "l1") -> dict[str, torch.Tensor]:  # fmt: skip
    """The three terms of Eq. 5, per filter (each ``(C,)``), over a batch.

    ``-MI = -H(T) + H(T'|X) + sum_x p(T+, x) H(T+|X=x)`` where ``T' = {T-, T+}`` (Eq. 6:
    inter-category entropy) and ``H(T+|X=x) = -sum_mu p~ log p~`` (Eq. 7 read as a true entropy:
    the printed equation drops the minus; with it the decomposition is exact).

    Returns:
        ``prior_entropy`` (H(T)), ``inter_entropy`` (Eq. 6), ``spatial_entropy`` (the last term of
        Eq. 5) and their sum ``neg_mi``.
    """
    return decompose(*_scores_and_prior(x, tau, beta, alpha, distance))
