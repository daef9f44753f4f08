"""The mask layer (paper §3, Fig. 4)."""

import torch

from icnn import PartMask, locate_parts, template_shape


def test_mask_hand_computed_3x3():
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 5.0, 1.0], [0.0, 3.0, 4.0]])[None, None]
    out = PartMask()(x)
    # mu = (1, 1); shape: centre 1, edge neighbours -1/3, corners -1 -> relu keeps only the centre
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 1, 1] = 5.0
    torch.testing.assert_close(out, expected)


def test_mask_keeps_near_units_on_large_maps():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 4.0
    x[0, 0, 3, 4] = 2.0  # L1 distance 1: shape 1 - 4/8 = 0.5
    x[0, 0, 0, 7] = 3.0  # far: shape -1 -> removed
    out = PartMask()(x)
    assert out[0, 0, 3, 3] == 4.0 and out[0, 0, 3, 4] == 1.0 and out[0, 0, 0, 7] == 0.0


def test_mask_batched_matches_per_map_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, 6, 7, generator=g)
    for mu_mode in ("argmax", "centroid"):
        layer = PartMask(mu=mu_mode, distance="l2")
        out = layer(x)
        for b in range(3):
            for c in range(5):
                mu = locate_parts(x[b : b + 1, c : c + 1], mu_mode)[0, 0]
                m = template_shape(mu, 6, 7, distance="l2")
                torch.testing.assert_close(out[b, c], torch.relu(x[b, c] * m))


def test_gradient_flows_through_x_times_mask_only():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 4, 5, 5, generator=g, requires_grad=True)
    layer = PartMask()
    out = layer(x)
    w = torch.rand(out.shape, generator=g)
    (out * w).sum().backward()
    m = layer.mask(x.detach())
    expected = w * m * (x.detach() * m > 0)
    torch.testing.assert_close(x.grad, expected)


def test_centroid_mode():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 2, 2] = 1.0  # centroid (1, 1)
    mu = locate_parts(x, "centroid")
    torch.testing.assert_close(mu[0, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(mu[0, 1], torch.tensor([1.0, 1.0]))  # silent map: centre


def test_mask_in_eval_mode_too_and_large_values_finite():
    x = torch.full((1, 1, 4, 4), 1e4)
    x[0, 0, 2, 1] = 2e4
    layer = PartMask().eval()
    out = layer(x)
    assert torch.isfinite(out).all() and out[0, 0, 2, 1] == 2e4 and out[0, 0, 0, 3] == 0


def test_mask_strength_interpolates_between_identity_and_the_mask():
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 5.0, 1.0], [0.0, 3.0, 4.0]])[None, None]
    layer = PartMask()
    layer.strength = 0.0
    torch.testing.assert_close(layer(x), x)  # identity on a ReLU map
    layer.strength = 0.5
    # shape: centre 1, edge neighbours 1 - 4/3 = -1/3, corners -1; factor (1 - s) + s * shape
    factor = torch.tensor([[0.0, 1 / 3, 0.0], [1 / 3, 1.0, 1 / 3], [0.0, 1 / 3, 0.0]])
    torch.testing.assert_close(layer(x), x * factor)
    assert "strength=0.5" in repr(layer)
    layer.strength = 1.0
    torch.testing.assert_close(layer(x), PartMask()(x))


def test_adaptive_beta_hand_computed_mask_and_update():
    layer = PartMask(beta="adaptive")
    x = torch.zeros(1, 2, 3, 3)
    x[0, :, 1, 1] = 1.0
    x[0, 1, 0, 0] = 1.0  # filter 1: two units -> centroid (0.5, 0.5) rounds to (0, 0): spread sqrt(2/2) = 1
    layer.eval()
    m = layer.mask(x)
    # beta_init 0.1 on a map spanning [-1, 1]: one unit = distance 1 -> 1 - 0.1 * d
    expected = torch.tensor([[0.8, 0.9, 0.8], [0.9, 1.0, 0.9], [0.8, 0.9, 0.8]])
    torch.testing.assert_close(m[0, 0], expected)
    assert torch.equal(layer.beta_f, torch.full((2,), 0.1))  # eval: no update
    layer.train()
    layer(x)
    # filter 0: spread 0 -> target clip(3 / 0, 1.5, 3) = 3; filter 1: spread 1 -> target 3
    torch.testing.assert_close(layer.beta_f, torch.full((2,), 0.1 + 0.05 * (3.0 - 0.1)))
    y = torch.zeros(1, 1, 5, 5)
    y[0, 0, 0, 0] = y[0, 0, 4, 4] = 1.0  # centroid (2, 2): spread sqrt(8) -> target clip(3 / 2.83) = 1.5
    wide = PartMask(beta="adaptive", beta_rate=1.0, mu="centroid")
    wide.train()
    wide(y)
    torch.testing.assert_close(wide.beta_f, torch.tensor([1.5]))
    with torch.no_grad():  # no grad: no update (evaluation under no_grad in train mode)
        wide(y * 0 + 1)
    torch.testing.assert_close(wide.beta_f, torch.tensor([1.5]))


def test_adaptive_beta_state_dict_and_errors():
    import pytest

    a = PartMask(beta="adaptive")
    a.train()
    a(torch.rand(2, 4, 5, 5))
    b = PartMask(beta="adaptive")
    b.load_state_dict(a.state_dict())  # sized from the checkpoint
    assert torch.equal(a.beta_f, b.beta_f) and b.beta_f.shape == (4,)
    assert "beta_f" not in PartMask().state_dict()  # fixed-beta masks keep their old state_dict
    with pytest.raises(ValueError, match="slopes for 4 filters, got maps of 3"):
        b.mask(torch.rand(1, 3, 5, 5))
    with pytest.raises(ValueError, match="beta must be a positive number or 'adaptive'"):
        PartMask(beta="learned")
    with pytest.raises(ValueError, match="adaptive beta needs"):
        PartMask(beta="adaptive", beta_range=(3.0, 1.0))


def test_masked_relu_equals_autograd_of_relu_x_times_m():
    """The mask's fused multiply-ReLU: the same output and gradient, to the bit, as autograd of
    ``relu(x * m)``, on maps with zeros, negatives and ties, at full and partial strength."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 6, generator=g)
    x[0, 0] = 0.0
    x[1, 1] = 1.0  # tied everywhere
    w = torch.randn(x.shape, generator=g)
    for strength in (1.0, 0.3):
        layer = PartMask()
        layer.strength = strength
        xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = layer(xa)
        (out * w).sum().backward()
        m = layer.mask(x)
        ref = torch.relu(xr * (m if strength >= 1.0 else (1.0 - strength) + strength * m))
        (ref * w).sum().backward()
        assert torch.equal(out, ref) and torch.equal(xa.grad, xr.grad)
    with torch.no_grad():
        assert torch.equal(PartMask()(x), torch.relu(x * PartMask().mask(x)))
