"""The vectorised E-step against a direct transcription of the authors' C++/MATLAB loops."""

import math

import pytest
import torch

from icnn.graph.estep import (
    _axis_factor,
    code_templates,
    competition,
    e_step,
    half_ranges,
    log_gauss,
    log_tau,
    offsets,
    round_half_away,
)


def gauss(d, s):
    return math.exp(-d * d / (2 * s * s)) / (math.sqrt(2 * math.pi) * s)


def cand(h, n):
    """The code's posCand: midpoints of linspace(-h, h, n + 1)."""
    edges = [-h + 2 * h * i / n for i in range(n + 1)]
    return [(edges[i] + edges[i + 1]) / 2 for i in range(n)]


def rnd(x):
    return math.copysign(math.floor(abs(x) + 0.5), x)


def brute(R, mu, half, cd, shift, log_lam, n, smap, faithful, tau=0.1):
    """Plain loops over images, nodes, candidates, window cells (float64), as getProb_local_mex.cpp,
    getOtherProb.cpp and learn_explanatoryGraph.m:59-86."""
    R, mu, shift, log_lam, cd = (t.double().tolist() for t in (R, mu, shift, log_lam, cd))
    B, C, H, W = len(R), len(R[0]), len(R[0][0]), len(R[0][0][0])
    P = len(mu[0])
    out = {k: [[[None] * P for _ in range(C)] for _ in range(B)] for k in ("pos", "S", "pi", "spread", "mass", "gy", "gx")}
    for b in range(B):
        prob, prior, pos = {}, {}, {}
        for c in range(C):
            for p in range(P):
                h = int(half[c][p])
                o = cand(h, n)
                m = [mu[c][p][0] + shift[b][c][p][0], mu[c][p][1] + shift[b][c][p][1]]
                ry, rx = rnd(m[0]), rnd(m[1])
                lam = math.exp(log_lam[b][c][p])
                for i in range(n):
                    for j in range(n):
                        s = 0.0
                        for dy in range(-h, h + 1):
                            for dx in range(-h, h + 1):
                                y, x = int(ry) + dy, int(rx) + dx
                                val = R[b][c][y][x] if 0 <= y < H and 0 <= x < W else 0.0
                                if faithful:
                                    d2 = (o[i] - dy) ** 2 + (o[j] - dx) ** 2
                                    t = gauss(math.sqrt(d2), smap) if d2 < (3 * smap) ** 2 else math.exp(-4.5) / (math.sqrt(2 * math.pi) * smap)
                                else:
                                    d2 = (o[i] + m[0] - ry - dy) ** 2 + (o[j] + m[1] - rx - dx) ** 2
                                    t = gauss(math.sqrt(d2), smap)
                                s += t * val
                        prior[c, p, i, j] = s
                        prob[c, p, i, j] = lam * gauss(o[i], cd[c][p]) * gauss(o[j], cd[c][p])
                        pos[c, p, i, j] = (m[0] + o[i], m[1] + o[j])
        t = tau * sum(prob.values()) / (C * P)
        for c in range(C):
            for p in range(P):
                keys = [(i, j) for i in range(n) for j in range(n)]
                vals = [prob[c, p, i, j] * prior[c, p, i, j] for i, j in keys]
                S = sum(vals)
                best = max(range(len(vals)), key=lambda k: (vals[k], -k))
                out["S"][b][c][p] = S
                out["pi"][b][c][p] = vals[best]
                out["pos"][b][c][p] = pos[(c, p) + keys[best]]
                r2 = [(i - (n - 1) / 2) ** 2 + (j - (n - 1) / 2) ** 2 for i, j in keys]
                out["spread"][b][c][p] = sum(v * r for v, r in zip(vals, r2)) / S
                mass = gy = gx = 0.0
                o = cand(int(half[c][p]), n)
                for i, j in keys:
                    z = pos[c, p, i, j]
                    sum_prob = 0.0
                    for q in range(P):
                        lo, hi = pos[c, q, 0, 0], pos[c, q, n - 1, n - 1]
                        if z[0] < lo[0] or z[1] < lo[1] or z[0] > hi[0] or z[1] > hi[1]:
                            continue
                        best_d, best_p = float("inf"), 0.0
                        for a in range(n):
                            for e in range(n):
                                zz = pos[c, q, a, e]
                                d = (z[0] - zz[0]) ** 2 + (z[1] - zz[1]) ** 2
                                if d < best_d:
                                    best_d, best_p = d, prob[c, q, a, e]
                        sum_prob += best_p
                    den = sum_prob + t
                    if faithful:
                        den = max(den, 1e-7)
                    final = prob[c, p, i, j] / den * prior[c, p, i, j]
                    mass += final
                    gy += final * o[i] / cd[c][p] ** 2
                    gx += final * o[j] / cd[c][p] ** 2
                out["mass"][b][c][p], out["gy"][b][c][p], out["gx"][b][c][p] = mass, gy, gx
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def random_case(seed, B=2, C=2, P=3, H=7, n=4):
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(B, C, H, H, generator=g) * (torch.rand(B, C, H, H, generator=g) > 0.3)
    mu = 1 + torch.rand(C, P, 2, generator=g) * (H - 3)  # windows overlap the map
    half = torch.randint(1, 3, (C, P), generator=g)
    cd = 0.5 + 2 * torch.rand(C, P, generator=g)
    shift = 0.7 * torch.randn(B, C, P, 2, generator=g)
    log_lam = torch.randn(B, C, P, generator=g)
    return R, mu, half, cd, shift, log_lam, n


@pytest.mark.parametrize("faithful", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_e_step_matches_direct_loops(faithful, seed):
    R, mu, half, cd, shift, log_lam, n = random_case(seed)
    smap = 0.6
    got = e_step(R, mu, half, cd, n=n, sigma_map=smap, faithful=faithful, shift=shift, log_lam=log_lam)
    ref = brute(R, mu, half, cd, shift, log_lam, n, smap, faithful)
    assert torch.allclose(got.pos.double(), ref["pos"], atol=1e-5)
    assert torch.allclose(got.log_score.double(), ref["S"].log(), atol=1e-4)
    assert torch.allclose(got.log_peak.double(), ref["pi"].log(), atol=1e-4)
    assert torch.allclose(got.spread.double(), ref["spread"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got.mass.double(), ref["mass"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(got.grad[..., 0].double(), ref["gy"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got.grad[..., 1].double(), ref["gx"], rtol=1e-4, atol=1e-6)


def test_huge_and_tiny_lambdas_stay_finite():
    """log lambda of +-300 (e^300 overflows float32) gives finite, shift-covariant scores."""
    R, mu, half, cd, shift, log_lam, n = random_case(3)
    base = e_step(R, mu, half, cd, n=n, sigma_map=0.6, faithful=False, shift=shift, log_lam=log_lam)
    for big in (300.0, -300.0):
        got = e_step(R, mu, half, cd, n=n, sigma_map=0.6, faithful=False, shift=shift, log_lam=log_lam + big)
        for t in got:
            assert torch.isfinite(t).all()
        assert torch.allclose(got.log_score - big, base.log_score, atol=1e-3)
        assert torch.allclose(got.mass, base.mass, rtol=1e-4, atol=1e-6)  # prob / (sumProb + tau) is scale-free


def test_silent_window_is_finite_and_takes_the_first_candidate():
    R = torch.zeros(1, 1, 7, 7)
    mu = torch.tensor([[[3.0, 3.0]]])
    got = e_step(R, mu, torch.tensor([[2]]), torch.tensor([[1.0]]), n=4, sigma_map=0.5, faithful=True)
    assert torch.isfinite(got.log_score).all() and got.log_score.item() < -80
    assert got.pos.flatten().tolist() == [3.0 - 1.5, 3.0 - 1.5]  # MATLAB's max: the first of equal values
    assert got.mass.item() == 0.0


def test_nearest_candidate_gather_against_brute_force():
    """_axis_factor over pairs: q's candidate nearest to z (first on ties), 0 outside q's box."""
    g = torch.Generator().manual_seed(5)
    E, n = 200, 6
    half = torch.randint(0, 4, (E,), generator=g)
    o = offsets(half, n)  # (E, n): q's offsets
    cd = 0.4 + torch.rand(E, generator=g)
    mq = torch.rand(E, generator=g) * 8
    z = torch.rand(E, n, generator=g) * 12 - 2  # V's candidates, some outside q's box
    zq = mq[:, None] + o
    spacing = (o[:, 1] - o[:, 0])[:, None]
    got = _axis_factor(z, zq[:, :1], zq[:, -1:], o[:, :1], spacing, o.pow(2).amin(-1, keepdim=True), 2 * cd[:, None] ** 2)
    L = log_gauss(o, cd)
    want = torch.zeros(E, n)
    for e in range(E):
        for i in range(n):
            zi = float(z[e, i])
            if zq[e, 0] <= zi <= zq[e, -1]:
                best = min(range(n), key=lambda a: (abs(zi - float(zq[e, a])), a))  # strict <: the first
                want[e, i] = math.exp(float(L[e, best] - L[e].max()))
    assert (got > 0).sum() > 50 and (got == 0).sum() > 50  # both cases exercised
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_competition_counts_a_node_itself_so_normprob_is_at_most_one():
    _, mu, half, cd, shift, log_lam, n = random_case(7, P=4)
    m = mu + shift
    o = offsets(half, n)
    L = log_gauss(o, cd)
    log_den = competition(m, o, cd, log_lam, log_tau(L, log_lam, 0.1))
    log_prob = log_lam[..., None, None] + L[..., :, None] + L[..., None, :]
    assert (log_prob <= log_den + 1e-5).all()


def test_code_templates_hand_values():
    """h = 1, n = 2: candidates at +-0.5, sigma 0.5, 3 sigma = 1.5: cell (0, 0) from candidate
    (-0.5, -0.5) is at distance sqrt(0.5) -> Gaussian; cell (1, 1) at sqrt(4.5) > 1.5 -> constant."""
    t = code_templates(1, 2, 0.5)
    norm = math.sqrt(2 * math.pi) * 0.5
    assert t.shape == (4, 9)
    assert t[0, 4].item() == pytest.approx(math.exp(-0.5 / 0.5) / norm)  # cell (0, 0)
    assert t[0, 8].item() == pytest.approx(math.exp(-4.5) / norm)  # cell (1, 1): the constant tail
    assert t[0, 0].item() == pytest.approx(math.exp(-0.5 / 0.5) / norm)  # cell (-1, -1), same distance


def test_half_ranges_and_offsets_match_the_code():
    """getBasicSettings: 28 px map, sigma 4.2 -> round(min(4.2, 12.6)) = 4, spacing 4/3; rounds halves up."""
    assert half_ranges(torch.tensor([4.2, 0.5, 0.45]), 28, 0.3, 3.0).tolist() == [4, 2, 1]
    assert offsets(torch.tensor(4), 6).tolist() == pytest.approx([-4 + 4 / 3 * (k + 0.5) for k in range(6)])
    assert round_half_away(torch.tensor([-2.5, -0.5, 0.5, 1.5])).tolist() == [-3.0, -1.0, 1.0, 2.0]
