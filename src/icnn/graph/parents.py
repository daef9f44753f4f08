"""Parents of a graph node and the deformation prior they give it (SPEC-trees-graph §2a step 1; the
authors' ``getCurDistribution.m``).

A node ``V`` of layer ``l`` has ``top_n`` parents ``U`` in layer ``l + 1``, chosen among ``top_m``
candidates. Each parent's deviation from its own mean, ``dp_U(I) = p_U(I) - E_I p_U``, shifts the
child; the prior on the child's offset is the product of the parents' Gaussians, each raised to
the power ``1 / top_n``::

    w_U = 1 / (top_n sigma_U^2),   W = sum_U w_U
    shift_V(I) = sum_U w_U dp_U(I) / W             (curMu)
    cd_V       = W^(-1/2)                          (curDelta)
    lambda_V(I) = what multiplies N(o; 0, cd_V^2)  (curLambda): exactly
                  cd^2 prod_U sigma_U^(-2/top_n) exp(-1/2 sum_U w_U |shift - dp_U|^2),
                  the code: cd prod_U sigma_U^(-1) exp(-1/2 sum_U w_U |shift - dp_U|^2)

So the edge ``U -> V`` has the displacement ``mu_V - E_I p_U``: the paper's per-edge displacement,
tied through ``mu_V`` (SPEC §2c.6).
"""

from __future__ import annotations

import math

import torch


def candidate_parents(pos: torch.Tensor, log_score: torch.Tensor, *, top_m: int, min_var_rate: float,
                      edge_cut_rate: float, side: int, faithful: bool) -> torch.Tensor:  # fmt: skip
    """Indices ``(M,)`` of the upper nodes that may be parents (``getCurDistribution.m:13-19``).

    Upper nodes by their total score ``sum_I S_U(I)``, descending; without the ``min_var_rate``
    share whose positions vary least (variance over images, ``N - 1``, both axes summed: such nodes
    hardly move, e.g. silent ones pinned to a candidate) and without those whose mean lies within
    ``edge_cut_rate * side`` of the border; the first ``top_m``. ``pos (N, U, 2)``,
    ``log_score (N, U)``. The border test measures from the 1-based position in the code
    (``faithful``, with ``side`` the *child's* map side) or from the unit centre ``p + 0.5``.
    """
    order = torch.logsumexp(log_score, 0).sort(descending=True, stable=True).indices
    var = pos.var(0, correction=1 if pos.shape[0] > 1 else 0).sum(-1)  # (U,)
    keep = torch.ones(pos.shape[1], dtype=torch.bool)
    keep[var.sort(stable=True).indices[: math.ceil(len(var) * min_var_rate)]] = False
    p = pos.mean(0) + (1.0 if faithful else 0.5)
    keep &= (side / 2 - (side / 2 - p).abs()).amin(-1) >= side * edge_cut_rate
    return order[keep[order]][:top_m]


def select_parents(child: torch.Tensor, child_log_peak: torch.Tensor, upper: torch.Tensor, *, top_n: int,
                   chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each child's ``top_n`` parents among the candidates (``getCurDistribution.m:40-54``)::

        score(V, U) = sum_I pi_V(I) exp(-|q_V(I) - Q_U(I)|^2 / (2 mean_{U, I} |q_V(I) - Q_U(I)|^2))

    with ``q``, ``Q`` the centred pixel positions, ``pi_V(I)`` the child's peak value from the
    previous iteration. Blocks of children bound the memory to ``chunk_elements``.

    Args:
        child: ``(N, V, 2)`` centred child positions (pixels); child_log_peak: ``(N, V)``.
        upper: ``(N, M, 2)`` centred candidate positions (pixels).

    Returns:
        ``(V, k)`` indices into the candidates (best first, ties by index) and ``(V, k)`` edge
        strengths ``score / sum_I pi_V(I)`` in ``[0, 1]``; ``k = min(top_n, M)``.
    """
    n, v, _ = child.shape
    m = upper.shape[1]
    k = min(top_n, m)
    rel = child_log_peak - child_log_peak.amax(0)  # (N, V) <= 0: pi relative to each child's best
    total = rel.exp().sum(0)  # (V,)
    # |q - Q|^2 = |q|^2 + |Q|^2 - 2 q.Q; its mean over (U, I) in closed form
    qq, QQ = child.pow(2).sum(-1), upper.pow(2).sum(-1)  # (N, V), (N, M)
    scale = 2 * (qq.mean(0) + QQ.mean() - 2 * (child * upper.mean(1, keepdim=True)).sum(-1).mean(0))
    scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)  # (V,)
    idx = torch.empty(v, k, dtype=torch.long)
    strength = torch.empty(v, k)
    # the exponent as one product with inner dimension 4: [2q/s, rel - |q|^2/s, -1/s] . [Q, 1, |Q|^2]
    a_child = torch.cat((child * (2 / scale)[None, :, None], (rel - qq / scale)[..., None],
                         (-1 / scale).expand(n, v)[..., None]), -1)  # (N, V, 4)  # fmt: skip
    b_upper = torch.cat((upper, torch.ones(n, m, 1), QQ[..., None]), -1).transpose(1, 2).contiguous()  # (N, 4, M)
    step = max(1, chunk_elements // (n * m))
    for a in range(0, v, step):  # blocks of children, vectorised inside
        score = torch.bmm(a_child[:, a : a + step], b_upper).exp_().sum(0)  # (K, M)
        best = score.sort(dim=-1, descending=True, stable=True)
        idx[a : a + step] = best.indices[:, :k]
        strength[a : a + step] = best.values[:, :k] / total[a : a + step, None]
    return idx, strength


def parent_prior(parents: torch.Tensor, upper_dev: torch.Tensor, upper_sigma: torch.Tensor, *, scale: float,
                 faithful: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``shift (B, V, 2)``, ``cd (V,)``, ``log lambda (B, V)`` of every child (module doc).

    Args:
        parents: ``(V, k)`` indices of each child's parents among the upper nodes.
        upper_dev: ``(B, U, 2)`` parents' deviations ``p_U(I) - E_I p_U`` in upper map units.
        upper_sigma: ``(U,)`` parents' sigma in upper map units.
        scale: upper units per child unit (the ratio of strides); the code applies the upper
            units as they are (``scale = 1``, SPEC §2c.2).
        faithful: the code's ``lambda`` normaliser (module doc).
    """
    k = parents.shape[1]
    dev = upper_dev[:, parents] * scale  # (B, V, k, 2)
    sig = upper_sigma[parents] * scale  # (V, k)
    w = 1 / (k * sig.pow(2))
    total = w.sum(-1)  # (V,)
    shift = (w[..., None] * dev).sum(-2) / total[:, None]  # (B, V, 2)
    cd = total.rsqrt()
    expo = -0.5 * (w * (shift[:, :, None] - dev).pow(2).sum(-1)).sum(-1)  # (B, V)
    log_sig = sig.log().sum(-1)
    norm = cd.log() - log_sig if faithful else 2 * cd.log() - (2 / k) * log_sig
    return shift, cd, expo + norm
