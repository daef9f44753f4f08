"""Growing the tree: the closed-form pair scores and the recorded gains against log E computed
from scratch, a hand-made set with a known merge order, the filter selection, stopping."""

import math

import pytest
import torch

from icnn.tree import TreeConfig, TreeError, evaluate_tree, fit_tree
from icnn.tree.learn import _Growth

from .helpers import features, random_features


def log_e(h: torch.Tensor, gamma: float, beta: float, second_layer: int) -> float:
    """log E = sum_i log P(x_i) - beta |V| from scratch (SPEC §1a Step 5)."""
    return float((gamma * h).sum() - len(h) * torch.logsumexp(gamma * h, 0) - beta * second_layer)


def growth_of(feats, **cfg) -> _Growth:
    y = feats.y
    return _Growth(feats.x, feats.g, y, feats.b, 1.0 / float(y.mean()), TreeConfig(**cfg))


def current_h(gr: _Growth) -> torch.Tensor:
    """Each image's score by its second-layer node's own model (not the growth's buffers)."""
    node = gr.node[gr.slot]
    return (gr.alpha[node] * gr.direction[node] * gr.x).sum(1) + gr.bias[node]


def brute_force_gain(gr: _Growth, feats, a: int, t: int, fitted: bool) -> float:
    """Delta log E of merging slots ``a, t``: the new node fitted by the LASSO (``fitted``) or
    with alpha = 1, g_u = normalise(sum g_i) and the least-squares intercept (closed form)."""
    members = (gr.slot == a) | (gr.slot == t)
    h = current_h(gr)
    after = h.clone()
    if fitted:
        fit = gr._fit(torch.tensor([a]), torch.tensor([t]))
        after[fit["rows"][0][fit["valid"][0]]] = fit["h"][0][fit["valid"][0]]
    else:
        g_u = feats.g[members].sum(0)
        g_u = g_u / g_u.norm()
        after[members] = feats.x[members] @ g_u + (feats.y[members] - feats.x[members] @ g_u).mean()
    k = int(gr.alive.sum())
    return log_e(after, gr.gamma, gr.cfg.beta, k - 1) - log_e(h, gr.gamma, gr.cfg.beta, k)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_pair_scores_equal_the_objective_difference(mode):
    feats = random_features(7, 5, seed=4)
    gr = growth_of(feats, mode=mode)
    for _ in range(3):  # at the start and after merges (every buffer updated on the merged row)
        scores = gr.gains(gr.delta)  # (K, K) symmetric, -inf on the diagonal and for dead slots
        assert torch.isfinite(scores).sum() == gr.alive.sum() * (gr.alive.sum() - 1)
        for a, t in torch.nonzero(torch.isfinite(scores).triu(1)).tolist():
            assert scores[a, t].item() == pytest.approx(brute_force_gain(gr, feats, a, t, fitted=mode == "exact"), abs=1e-9)
        assert gr.step()


@pytest.mark.parametrize("alpha_mode", ["binary", "relaxed"])
def test_each_recorded_gain_is_the_change_of_log_e(alpha_mode):
    feats = random_features(12, 6, seed=5)
    tree = fit_tree(feats, TreeConfig(alpha_mode=alpha_mode))
    n, merges = tree.num_leaves, tree.num_merges
    assert merges > 0
    up = tree._upward(torch.arange(n))  # (n, L) each leaf's ancestors, bottom-up
    previous = None
    for k in range(merges + 1):  # after k merges the nodes < n + k exist
        top = torch.where(up < n + k, up, -1).amax(1)  # each image's second-layer node then
        value = log_e(tree.predict(top, feats.x), tree.gamma, 1.0, n - k)
        if previous is not None:
            assert tree.gain[n + k - 1].item() == pytest.approx(value - previous, abs=1e-9)
        previous = value


def hand_set():
    """One filter (g = 1, so every node has w = alpha = 1 and h = x + mean b): two pairs of
    identical images, A = {0, 1} (x = 1, b = 0, y = 1) and B = {2, 3} (x = 5, b = -1, y = 4)."""
    return features([[1.0], [1.0], [5.0], [5.0]], [[1.0]] * 4, [1.0, 1.0, 4.0, 4.0], [0.0, 0.0, -1.0, -1.0])


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_hand_set_merge_order_and_gains(mode):
    feats = hand_set()
    gamma = 1 / 2.5
    # A with B: h = x + mean b moves the low scores down and the high ones up (Theta grows), so
    # the identical pairs go first with gain beta = 1 (their h stay y)
    cross = 1 + 4 * (math.log(2 * math.exp(gamma) + 2 * math.exp(4 * gamma)) - math.log(2 * math.exp(0.5 * gamma) + 2 * math.exp(4.5 * gamma)))
    gr = growth_of(feats, mode=mode)
    scores = gr.gains(gr.delta)
    assert scores[0, 1].item() == 1.0 and scores[2, 3].item() == 1.0
    assert scores[0, 2].item() < 1.0
    tree = fit_tree(feats, TreeConfig(mode=mode))
    assert tree.num_merges == 3
    assert sorted(sorted(tree.children(v).tolist()) for v in (4, 5)) == [[0, 1], [2, 3]]
    assert tree.children(6).tolist() == [4, 5] and tree.children(tree.root).tolist() == [6]
    assert tree.gain[4].item() == 1.0 and tree.gain[5].item() == 1.0
    assert tree.gain[6].item() == pytest.approx(cross, abs=1e-12)  # 0.518...
    # identical images need no filter: the LASSO selects none (theta = 0) and b = y; the last
    # node uses the filter (its least-squares slope is 3/4) with b = mean(y - x)
    assert tree.alpha[4:7].flatten().tolist() == [0.0, 0.0, 1.0]
    assert sorted(tree.bias[4:6].tolist()) == [1.0, 4.0] and tree.bias[6].item() == pytest.approx(-0.5, abs=1e-15)


def test_no_merge_without_a_gain_and_max_merges():
    assert fit_tree(hand_set(), TreeConfig(beta=0.0)).num_merges == 0  # every gain is exactly 0
    tree = fit_tree(random_features(10, 4), TreeConfig(max_merges=2))
    assert tree.num_merges == 2 and len(tree.children(tree.root)) == 8


def test_leaves_reproduce_the_network_score():
    feats = random_features(20, 8, seed=6)
    tree = fit_tree(feats)
    leaves = torch.arange(tree.num_leaves)
    assert (tree.predict(leaves, feats.x) - feats.y).abs().max() < 1e-12
    assert evaluate_tree(tree, feats, own=True)["leaves"]["prediction_error"] < 1e-5


def test_alpha_is_sparse_under_a_large_penalty_and_all_ones_without_one():
    feats = random_features(12, 6, seed=7)
    feats.x = torch.rand(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    feats.y = (feats.g * feats.x).sum(1) + feats.b  # no filter is constant on two images (its theta would be 0)
    sparse = fit_tree(feats, TreeConfig(lambda_scale=1e9))
    dense = fit_tree(feats, TreeConfig(lambda_scale=0.0))
    n = sparse.num_leaves
    assert sparse.num_merges > 0 and dense.num_merges > 0
    assert torch.equal(sparse.alpha[n:-1], torch.zeros_like(sparse.alpha[n:-1]))
    assert torch.equal(dense.alpha[n:-1], torch.ones_like(dense.alpha[n:-1]))
    assert torch.equal(dense.alpha[:n], torch.ones(n, 6, dtype=torch.float64))  # the leaves: every filter


def test_relaxed_alpha_is_the_lasso_weights():
    tree = fit_tree(random_features(10, 4, seed=8), TreeConfig(alpha_mode="relaxed"))
    merged = tree.alpha[tree.num_leaves : -1]
    assert not torch.isin(merged, torch.tensor([0.0, 1.0], dtype=torch.float64)).all()


def test_bad_config_and_features():
    for kwargs, name in [(dict(mode="slow"), "mode"), (dict(alpha_mode="soft"), "alpha_mode"), (dict(beta=-1.0), "beta"),
                         (dict(rerank=0), "rerank"), (dict(gamma=0.0), "gamma"), (dict(max_merges=-1), "max_merges")]:  # fmt: skip
        with pytest.raises(TreeError, match=f"config.{name}:"):
            TreeConfig(**kwargs)
    feats = random_features(6, 3)
    with pytest.raises(TreeError, match="no positive images"):
        fit_tree(features(feats.x, feats.g, feats.y, feats.b, positive=[False] * 6))
    with pytest.raises(TreeError, match="positive mean score"):
        fit_tree(features(feats.x, feats.g, -feats.y, feats.b))
    with pytest.raises(TreeError, match="exact_limit=5"):
        fit_tree(feats, TreeConfig(mode="exact", exact_limit=5))
