"""The M-step against a direct per-node loop (learn_explanatoryGraph.m:99-105)."""

import math

import pytest
import torch

from icnn.graph.learn import m_step


@pytest.mark.parametrize("faithful", [True, False])
def test_m_step_matches_a_direct_loop(faithful):
    g = torch.Generator().manual_seed(0)
    N, C, P = 5, 2, 3
    mu = torch.rand(C, P, 2, generator=g) * 6
    grad = torch.randn(C, P, 2, generator=g, dtype=torch.float64)
    mass = torch.rand(C, P, generator=g, dtype=torch.float64)
    mass[0, 0] = 0.0  # a node no image assigned mass to: the code's max(., 1e-8) floor
    log_score = torch.randn(N, C, P, generator=g) * 30  # scores far beyond float32's exp range
    spread = torch.rand(N, C, P, generator=g) * 4
    spacing = 0.5 + torch.rand(C, P, generator=g)
    lo, hi = 0.3, 1.7
    new_mu, sigma = m_step(mu, grad, mass, log_score, spread, cd_min=0.8, iteration=3, eta=1.0, spacing=spacing,
                           sigma_range=(lo, hi), faithful=faithful)  # fmt: skip
    step = (0.8 / 3**0.25) ** 2
    for c in range(C):
        for p in range(P):
            want = mu[c, p].double() + grad[c, p] / max(float(mass[c, p]), 1e-8) * step
            torch.testing.assert_close(new_mu[c, p].double(), want, rtol=1e-5, atol=1e-4)
            ls = log_score[:, c, p].double()
            w = (ls - ls.max()).exp()
            var = float((w * spread[:, c, p].double()).sum() / w.sum())
            s = math.sqrt(var if faithful else var / 2) * float(spacing[c, p])
            assert float(sigma[c, p]) == pytest.approx(min(max(s, lo), hi), rel=1e-5)


def test_sigma_is_per_axis_when_fixed():
    """A score spread evenly over a 2-D grid: the radial second moment is twice the per-axis one."""
    n = 6
    r = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2).pow(2)
    radial = float((r[:, None] + r[None, :]).mean())
    spread = torch.full((1, 1, 1), radial)
    args = {"cd_min": 1.0, "iteration": 1, "eta": 1.0, "spacing": torch.ones(1, 1), "sigma_range": (0.01, 100.0)}
    z = torch.zeros(1, 1, 2)
    _, fixed = m_step(z, z.double(), torch.ones(1, 1).double(), torch.zeros(1, 1, 1), spread, faithful=False, **args)
    _, code = m_step(z, z.double(), torch.ones(1, 1).double(), torch.zeros(1, 1, 1), spread, faithful=True, **args)
    assert float(fixed) ** 2 == pytest.approx(float(r.mean()))  # the per-axis variance of the grid
    assert float(code) == pytest.approx(math.sqrt(2) * float(fixed))
