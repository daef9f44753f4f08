"""Templates (paper §3, Fig. 3) against hand-written values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icnn import part_templates, template_priors, template_shape

TAU = 0.5 / 9
R2 = 1 - 4 * math.sqrt(2) / 3  # L2 shape at distance sqrt(2) on a 3x3 map


def test_3x3_l1_templates_match_hand_values():
    t = part_templates(3, 3)
    assert t.shape == (10, 3, 3)
    corner = torch.tensor([[1, -1 / 3, -1], [-1 / 3, -1, -1], [-1, -1, -1]]) * TAU  # mu = (0, 0)
    centre = torch.tensor([[-1, -1 / 3, -1], [-1 / 3, 1, -1 / 3], [-1, -1 / 3, -1]]) * TAU  # mu = (1, 1)
    right = torch.tensor([[-1, -1 / 3, 1], [-1, -1, -1 / 3], [-1, -1, -1]]) * TAU  # mu = (0, 2)
    torch.testing.assert_close(t[0], corner)
    torch.testing.assert_close(t[4], centre)
    torch.testing.assert_close(t[2], right)
    torch.testing.assert_close(t[-1], torch.full((3, 3), -TAU))


def test_3x3_l2_round_templates_match_hand_values():
    t = part_templates(3, 3, distance="l2")
    corner = torch.tensor([[1, -1 / 3, -1], [-1 / 3, R2, -1], [-1, -1, -1]]) * TAU
    centre = torch.tensor([[R2, -1 / 3, R2], [-1 / 3, 1, -1 / 3], [R2, -1 / 3, R2]]) * TAU
    torch.testing.assert_close(t[0], corner)
    torch.testing.assert_close(t[4], centre)
    torch.testing.assert_close(t[-1], torch.full((3, 3), -TAU))


def test_custom_tau_beta_and_errors():
    t = part_templates(3, 3, tau=2.0, beta=1.0)
    # beta = 1: shape = 1 - d/3, never clamped on a 3x3 map (d <= 4 -> -1/3)
    torch.testing.assert_close(t[0], 2.0 * (1 - torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4.0]]) / 3))
    torch.testing.assert_close(t[-1], torch.full((3, 3), -2.0))
    with pytest.raises(ValueError, match="distance"):
        part_templates(3, 3, distance="l3")
    with pytest.raises(ValueError, match="map size"):
        part_templates(0, 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from(["l1", "l2"]))
def test_templates_properties_non_square(h, w, distance):
    t = part_templates(h, w, distance=distance)
    tau = 0.5 / (h * w)
    assert t.shape == (h * w + 1, h, w)
    pos = t[:-1].reshape(h * w, h * w)
    # each positive template peaks (value tau) exactly at its own unit, row-major order
    torch.testing.assert_close(pos.diagonal(), torch.full((h * w,), tau))
    assert torch.all(pos <= tau + 1e-9) and torch.all(pos >= -tau - 1e-9)
    # symmetric: t_mu(nu) == t_nu(mu)
    torch.testing.assert_close(pos, pos.t())


def test_template_shape_fractional_centre_and_batch():
    mu = torch.tensor([[[0.5, 0.5]]])  # (1, 1, 2) between four units
    s = template_shape(mu, 2, 2, beta=4.0)
    # every unit at L1 distance 1 from the centre: 1 - 4 * 1 / 2 = -1
    torch.testing.assert_close(s, torch.full((1, 1, 2, 2), -1.0))


def test_priors():
    p = template_priors(3, 3)
    alpha = 9 / 10
    torch.testing.assert_close(p[:-1], torch.full((9,), alpha / 9, dtype=torch.float64))
    assert p[-1].item() == pytest.approx(1 - alpha)
    assert p.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alpha"):
        template_priors(3, 3, alpha=1.0)
