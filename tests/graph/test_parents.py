"""Parent candidates, parent selection and the parents' prior (getCurDistribution.m)."""

import math

import pytest
import torch

from icnn.graph.parents import candidate_parents, parent_prior, select_parents


def test_parent_prior_hand_values():
    """Two parents, sigma 2, deviations (1, 0) and (3, 0): w = 1/8 each, shift (2, 0), cd 2,
    exponent -1/2 (1/8 + 1/8) = -1/8; fixed normaliser cd^2 prod sigma^(-2/2) = 1, the code's
    cd prod sigma^-1 = 1/2."""
    parents = torch.tensor([[0, 1]])
    dev = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    sigma = torch.tensor([2.0, 2.0])
    for faithful, norm in ((False, 0.0), (True, -math.log(2))):
        shift, cd, log_lam = parent_prior(parents, dev, sigma, scale=1.0, faithful=faithful)
        assert shift.tolist() == [[[2.0, 0.0]]]
        assert cd.tolist() == [2.0]
        assert log_lam.item() == pytest.approx(-0.125 + norm)
    shift, cd, _ = parent_prior(parents, dev, sigma, scale=2.0, faithful=False)  # upper units -> child units
    assert shift.tolist() == [[[4.0, 0.0]]] and cd.tolist() == [4.0]


def test_fixed_lambda_is_the_mass_of_the_product_of_parent_gaussians():
    """prod_U N2(x; dp_U, sigma_U^2)^(1/k) = lambda N2(x; shift, cd^2): integrate both on a grid."""
    g = torch.Generator().manual_seed(0)
    k = 3
    dev = torch.randn(1, k, 2, generator=g, dtype=torch.float64)
    sigma = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    shift, cd, log_lam = parent_prior(torch.arange(k)[None], dev, sigma, scale=1.0, faithful=False)
    xs = torch.linspace(-12, 12, 961, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1)  # (G, G, 2)
    log_n2 = lambda x, m, s: -(x - m).pow(2).sum(-1) / (2 * s**2) - math.log(2 * math.pi) - 2 * torch.log(s)
    product = sum(log_n2(x, dev[0, u], sigma[u]) for u in range(k)) / k
    mass = product.exp().sum() * (xs[1] - xs[0]) ** 2
    assert mass.item() == pytest.approx(log_lam.exp().item(), rel=1e-6)
    assert (product - log_n2(x, shift[0, 0], cd[0]) - log_lam[0, 0]).abs().max() < 1e-9


def test_select_parents_against_brute_force():
    g = torch.Generator().manual_seed(1)
    N, V, M = 6, 5, 7
    child = torch.randn(N, V, 2, generator=g)
    upper = torch.randn(N, M, 2, generator=g)
    peak = torch.randn(N, V, generator=g)
    idx, strength = select_parents(child, peak, upper, top_n=3, chunk_elements=50)  # blocks of 1 child
    for v in range(V):
        d2 = [[float((child[i, v] - upper[i, u]).pow(2).sum()) for u in range(M)] for i in range(N)]
        scale = 2 * sum(map(sum, d2)) / (N * M)
        score = [sum(math.exp(peak[i, v]) * math.exp(-d2[i][u] / scale) for i in range(N)) for u in range(M)]
        best = sorted(range(M), key=lambda u: (-score[u], u))[:3]
        assert idx[v].tolist() == best
        total = sum(math.exp(peak[i, v]) for i in range(N))
        assert strength[v].tolist() == pytest.approx([score[u] / total for u in best], rel=1e-5)


def test_candidate_parents_drops_still_and_border_nodes():
    """Node 0 never moves (dropped: lowest variance), node 1 sits at the border (dropped),
    nodes 2, 3 remain, best total score first."""
    N = 4
    jitter = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [0.5, 0.5], [-0.5, -0.5]])  # (N, 2)
    pos = torch.stack([torch.full((N, 2), 5.0), 0.2 + 0.1 * jitter, 5 + jitter, 6 + 2 * jitter], 1)  # (N, 4, 2)
    log_score = torch.tensor([3.0, 2.0, 0.0, 1.0]).expand(N, 4)
    got = candidate_parents(pos, log_score, top_m=10, min_var_rate=0.25, edge_cut_rate=0.1, side=12, faithful=False)
    assert got.tolist() == [3, 2]
    assert candidate_parents(pos, log_score, top_m=1, min_var_rate=0.25, edge_cut_rate=0.1, side=12, faithful=False).tolist() == [3]
