"""The batched LASSO against a reference solver (L-BFGS-B on the split, smooth form, float64)."""

import numpy as np
import pytest
import scipy.optimize
import torch

from icnn.tree import TreeError, lasso


def reference(z: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin (1/m) |z theta + b - y|^2 + lam |theta|_1 with theta = u - v, u, v >= 0."""
    m, d = z.shape
    zc, yc = z - z.mean(0), y - y.mean()

    def objective(uv):
        r = zc @ (uv[:d] - uv[d:]) - yc
        grad = 2 * zc.T @ r / m
        return r @ r / m + lam * uv.sum(), np.concatenate([grad + lam, lam - grad])

    res = scipy.optimize.minimize(objective, np.zeros(2 * d), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * d),
                                  options=dict(ftol=1e-16, gtol=1e-13, maxiter=50000, maxcor=50))  # fmt: skip
    theta = res.x[:d] - res.x[d:]
    return theta, float(y.mean() - z.mean(0) @ theta)


def problems(sizes, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(sizes), max(sizes), d, generator=gen, dtype=torch.float64)
    y = z @ torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(len(sizes), max(sizes), generator=gen, dtype=torch.float64)
    mask = torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]
    return z, y, mask


def test_matches_the_reference_on_small_padded_problems():
    sizes, lam = [12, 7, 12, 9, 12], torch.tensor([0.0, 0.02, 0.1, 0.4, 1.0], dtype=torch.float64)
    z, y, mask = problems(sizes, 5)
    fit = lasso(z, y, lam, mask=mask, tol=1e-13, max_iter=20000)
    for k, m in enumerate(sizes):
        theta, b = reference(z[k, :m].numpy(), y[k, :m].numpy(), float(lam[k]))
        np.testing.assert_allclose(fit.theta[k].numpy(), theta, atol=1e-6)
        assert abs(float(fit.intercept[k]) - b) < 1e-6
        assert fit.gap[k] <= 1e-13
    assert (fit.theta[4] == 0).sum() > (fit.theta[0] == 0).sum()  # a larger penalty, a sparser fit


def test_a_problem_does_not_depend_on_its_batch():
    z, y, mask = problems([10, 4, 8], 6, seed=1)
    together = lasso(z, y, 0.05, mask=mask, tol=1e-12, max_iter=5000)
    for k, m in enumerate([10, 4, 8]):
        alone = lasso(z[k : k + 1, :m], y[k : k + 1, :m], 0.05, tol=1e-12, max_iter=5000)
        torch.testing.assert_close(together.theta[k], alone.theta[0], rtol=0, atol=1e-12)
        assert together.iterations[k] == alone.iterations[0]


def test_penalty_above_lambda_max_gives_zero_and_zero_penalty_least_squares():
    z, y, _ = problems([6], 10, seed=2)
    zc, yc = z[0] - z[0].mean(0), y[0] - y[0].mean()
    lam_max = float(2 * (zc.t() @ yc).abs().max() / 6)
    sparse = lasso(z, y, lam_max * 1.001)
    assert torch.equal(sparse.theta, torch.zeros_like(sparse.theta))
    assert torch.isclose(sparse.intercept[0], y[0].mean())
    # lam = 0 with fewer rows than filters: from theta = 0, FISTA converges to the minimum-norm
    # least-squares fit, which uses every filter
    dense = lasso(z, y, 0.0, tol=1e-14, max_iter=20000)
    torch.testing.assert_close(dense.theta[0], torch.linalg.pinv(zc) @ yc, rtol=0, atol=1e-8)
    assert (dense.theta != 0).all()


def test_a_warm_start_reaches_the_same_solution():
    z, y, _ = problems([15], 4, seed=3)
    cold = lasso(z, y, 0.1, tol=1e-13, max_iter=5000)
    warm = lasso(z, y, 0.1, theta0=cold.theta + 0.01, tol=1e-13, max_iter=5000)
    torch.testing.assert_close(warm.theta, cold.theta, rtol=0, atol=1e-7)
    assert warm.iterations[0] < cold.iterations[0]


def test_bad_input():
    with pytest.raises(TreeError, match="lasso: expected z"):
        lasso(torch.zeros(2, 3), torch.zeros(2), 0.1)
    with pytest.raises(TreeError, match="penalty"):
        lasso(torch.zeros(1, 3, 2), torch.zeros(1, 3), -1.0)
    with pytest.raises(TreeError, match="no rows"):
        lasso(torch.zeros(1, 3, 2), torch.zeros(1, 3), 0.1, mask=torch.zeros(1, 3, dtype=torch.bool))
