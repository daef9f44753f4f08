"""The filter loss (paper Eq. 1-7) against brute-force float64 references."""

import math

import pytest
import torch

from icnn import FilterLoss, FilterLossConfig, mi_decomposition, mutual_information_loss, part_templates, template_priors


def brute_force_neg_mi(x: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with plain loops over filters, templates and maps, float64."""
    x = x.double()
    b, c, h, w = x.shape
    templates = part_templates(h, w).double()
    prior = template_priors(h, w)
    out = torch.zeros(c, dtype=torch.float64)
    for f in range(c):
        tr = [[float((x[i, f] * templates[t]).sum()) for t in range(len(templates))] for i in range(b)]
        z = [sum(math.exp(tr[i][t]) for i in range(b)) for t in range(len(templates))]
        p_xt = [[math.exp(tr[i][t]) / z[t] for t in range(len(templates))] for i in range(b)]
        p_x = [sum(prior[t] * p_xt[i][t] for t in range(len(templates))) for i in range(b)]
        mi = 0.0
        for t in range(len(templates)):
            for i in range(b):
                mi += prior[t] * p_xt[i][t] * math.log(p_xt[i][t] / p_x[i])
        out[f] = -mi
    return out


def test_mutual_information_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(5, 3, 3, 4, generator=g, dtype=torch.float64)) * 30
    torch.testing.assert_close(mutual_information_loss(x), brute_force_neg_mi(x), rtol=1e-9, atol=1e-12)


def test_mutual_information_float32_and_gradient():
    g = torch.Generator().manual_seed(1)
    x = (torch.relu(torch.randn(6, 2, 4, 4, generator=g)) * 40).requires_grad_()
    loss = mutual_information_loss(x)
    torch.testing.assert_close(loss.double(), brute_force_neg_mi(x.detach()), rtol=1e-4, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_decomposition_equals_eq1():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64)) * 50
    terms = mi_decomposition(x)
    torch.testing.assert_close(terms["neg_mi"], mutual_information_loss(x), rtol=1e-10, atol=1e-12)
    n2 = 9
    alpha = n2 / (1 + n2)
    h_t = -(alpha * math.log(alpha / n2) + (1 - alpha) * math.log(1 - alpha))
    torch.testing.assert_close(terms["prior_entropy"], torch.full((4,), h_t, dtype=torch.float64))
    assert (terms["inter_entropy"] >= 0).all() and (terms["spatial_entropy"] >= 0).all()


def test_batch_z_and_running_statistics_against_float64_brute_force():
    """``log Z_T`` per batch (float32 exps below the exact maximum, float64 sums) is the float64
    ``logsumexp - log N`` to float32 precision, over scores spanning 0 to ~1e3; the class means,
    mean peak and active flags (from the peaks the loss hands over) equal their brute force."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 5, 4, 4, generator=g) * torch.tensor([0.0, 1e-3, 1.0, 30.0, 1e4])[None, :, None, None]
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    fl = FilterLoss(5, 2, (4, 4), z_estimate="batch", negative_class=0)
    fl(x, labels)
    xd = x.double()
    scores = xd.reshape(6, 5, 16) @ part_templates(4, 4).double().reshape(17, 16).t()
    expected = torch.logsumexp(scores, 0) - math.log(6)
    torch.testing.assert_close(fl.stats.log_z.double(), expected, rtol=2e-7, atol=1e-7)
    peak = xd.amax((-2, -1))
    torch.testing.assert_close(fl.stats.mean_max(), peak.mean(0), rtol=1e-12, atol=0)
    assert fl.stats.active.tolist() == [False, True, True, True, True]
    total = xd.sum((-2, -1))
    torch.testing.assert_close(fl.stats.class_sum[1], total[labels == 1].sum(0), rtol=1e-12, atol=0)


def test_no_inf_nan_for_activations_up_to_1e4():
    x = torch.rand(4, 3, 7, 7) * 1e4
    x[0, 0] = 0.0
    x.requires_grad_()
    loss = mutual_information_loss(x)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    for mode in ("paper", "exact"):
        for norm in ("batch_mean", "none"):
            fl = FilterLoss(3, 2, (7, 7), mode=mode, weight_norm=norm, negative_class=0)
            xx = x.detach().clone().requires_grad_()
            out = fl(xx, torch.tensor([1, 0, 1, 0]))
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(xx.grad).all(), (mode, norm)


def eq4_reference(x, labels, targets):
    """Eq. 4 with the Appendix's minus, Z_T and p(x) over the batch, float64 loops."""
    x = x.double()
    b, c, h, w = x.shape
    templates = part_templates(h, w).double()
    prior = template_priors(h, w)
    grad = torch.zeros_like(x)
    for f in range(c):
        tr = torch.stack([(x[:, f] * templates[t]).sum((-2, -1)) for t in range(len(templates))], 1)  # (B, T)
        z = tr.exp().sum(0)
        for i in range(b):
            if labels[i] == targets[f]:
                t_hat = int(x[i, f].flatten().argmax())
            else:
                t_hat = len(templates) - 1
            p_x = sum(prior[t] * math.exp(tr[i, t]) / z[t] for t in range(len(templates)))
            coeff = -prior[t_hat] * math.exp(tr[i, t_hat]) / z[t_hat] * (tr[i, t_hat] - math.log(z[t_hat]) - math.log(p_x))
            grad[i, f] = coeff * templates[t_hat]
    return grad


def test_paper_gradient_equals_eq4_with_minus():
    g = torch.Generator().manual_seed(3)
    x = (torch.relu(torch.randn(6, 3, 4, 4, generator=g)) * 20).requires_grad_()
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    fl = FilterLoss(3, 2, (4, 4), lambda_=1.0, schedule="constant", weight_norm="none", z_estimate="batch", p_x="exact", negative_class=0)
    fl(x, labels).backward()
    torch.testing.assert_close(x.grad.double(), eq4_reference(x.detach(), labels, [1, 1, 1]), rtol=2e-4, atol=1e-9)


def test_paper_gradient_sign_raises_part_and_silences_negatives():
    # Positive images: peaked maps that fit their template; negatives: faint noise (fit T-).
    x = torch.full((4, 1, 5, 5), 0.05)
    x[0, 0, 1, 2] = 9.0
    x[1, 0, 3, 3] = 8.0
    x = x.requires_grad_()
    labels = torch.tensor([1, 1, 0, 0])
    fl = FilterLoss(1, 2, (5, 5), lambda_=1.0, schedule="constant", weight_norm="none", z_estimate="batch", negative_class=0)
    fl(x, labels).backward()
    step = -x.grad  # gradient descent direction
    assert step[0, 0, 1, 2] > 0 and step[1, 0, 3, 3] > 0  # raises the part's activation
    assert step[0, 0, 4, 4] < 0  # lowers activations far from it
    assert (step[2:] < 0).all()  # negatives pushed towards silence


def test_gradient_does_not_flow_through_mu_choice():
    # Same maps, gradient of the surrogate is linear in the (constant) template: doubling a
    # far-away unit's value below the maximum does not change which template is used.
    x = torch.zeros(2, 1, 4, 4)
    x[:, 0, 1, 1] = 5.0
    x[1, 0, 3, 3] = 1.0
    x = x.requires_grad_()
    fl = FilterLoss(1, 2, (4, 4), lambda_=1.0, schedule="constant", weight_norm="none", z_estimate="batch", negative_class=0)
    fl(x, torch.tensor([1, 1])).backward()
    templates = part_templates(4, 4)
    # each image's gradient is proportional to T_(1,1)
    t = templates[5]
    for i in range(2):
        g = x.grad[i, 0]
        coeff = (g * t).sum() / (t * t).sum()
        assert coeff.abs() > 0
        torch.testing.assert_close(g, coeff * t)


def test_batch_mean_normalisation():
    g = torch.Generator().manual_seed(4)
    x = (torch.relu(torch.randn(8, 3, 4, 4, generator=g)) * 10).requires_grad_()
    labels = torch.tensor([1, 0] * 4)
    raw = FilterLoss(3, 2, (4, 4), negative_class=0, schedule="constant", lambda_=1.0, weight_norm="none", z_estimate="batch")
    raw(x, labels)
    normed = FilterLoss(3, 2, (4, 4), negative_class=0, schedule="constant", lambda_=1.0, z_estimate="batch")
    normed(x, labels).backward()
    assert normed.diagnostics()["weight_abs_mean"] == pytest.approx(1.0, rel=1e-4)  # mean |w| = 1 per filter
    assert raw.diagnostics()["weight_abs_mean"] != pytest.approx(1.0, rel=1e-2)
    assert x.grad.abs().max() <= (0.5 / 16) * 8 / 8 + 1e-7  # tau * max|w'| / B


def test_targets_assigned_from_running_class_means():
    fl = FilterLoss(2, 3, (2, 2), lambda_=1.0)
    x = torch.zeros(3, 2, 2, 2)
    x[0, 0] = 1.0  # class 0 activates filter 0
    x[2, 1] = 2.0  # class 2 activates filter 1
    fl(x, torch.tensor([0, 1, 2]))
    assert fl.targets().tolist() == [0, 2]
    single = FilterLoss(2, 2, (2, 2), negative_class=0)
    assert single.targets().tolist() == [1, 1]
    fixed = FilterLoss(2, 3, (2, 2), target_classes=torch.tensor([2, 1]))
    assert fixed.targets().tolist() == [2, 1]


def test_even_categories_split_the_filters_over_the_classes_and_stay_fixed():
    fl = FilterLoss(5, 3, (2, 2), lambda_=1.0, categories="even")
    assert fl.targets().tolist() == [0, 1, 2, 0, 1]
    x = torch.zeros(3, 5, 2, 2)
    x[2] = 1.0  # class 2 activates every filter: the online rule would give them all class 2
    fl(x, torch.tensor([0, 1, 2]))
    assert fl.targets().tolist() == [0, 1, 2, 0, 1]
    assert FilterLoss(4, 3, (2, 2), negative_class=0, categories="even").targets().tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="categories must be one of"):
        FilterLoss(4, 3, (2, 2), categories="balanced")


def test_lambda_schedules():
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0] = 4.0
    x[1, 0, 1, 1] = 2.0  # mean max = 3
    labels = torch.tensor([1, 0])
    expect = {"paper": 0.5 * 3 / 2, "inverse_epoch": 0.5 / 2, "constant": 0.5}
    for schedule, value in expect.items():
        fl = FilterLoss(1, 2, (2, 2), lambda_=0.5, schedule=schedule, negative_class=0)
        fl.start_epoch(2)
        fl(x, labels)
        assert fl.diagnostics()["lambda"] == pytest.approx(value), schedule


def test_state_dict_round_trip_and_silent_fraction():
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(6, 4, 3, 3, generator=g))
    x[:, 3] = 0.0  # a silent filter
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    a = FilterLoss(4, 3, (3, 3), p_x="exact")
    a.start_epoch(2)
    a(x, labels)
    assert a.diagnostics()["silent_fraction"] == pytest.approx(0.25)
    b = FilterLoss(4, 3, (3, 3), p_x="exact")
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = a(xa, labels), b(xb, labels)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad)


def test_exact_mode_gradient_is_autograd_of_eq1():
    g = torch.Generator().manual_seed(6)
    x = (torch.relu(torch.randn(5, 2, 3, 3, generator=g)) * 10).requires_grad_()
    fl = FilterLoss(2, 2, (3, 3), mode="exact", lambda_=1.0, schedule="constant")
    fl(x, torch.zeros(5, dtype=torch.long)).backward()
    x2 = x.detach().clone().requires_grad_()
    mutual_information_loss(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_running_z_estimates():
    x1 = torch.rand(4, 1, 2, 2)
    x2 = torch.rand(4, 1, 2, 2) * 3
    labels = torch.tensor([1, 1, 0, 0])
    scores = lambda x: (x.reshape(4, 4) @ part_templates(2, 2).reshape(5, 4).t()).double()  # noqa: E731
    lm1 = torch.logsumexp(scores(x1), 0) - math.log(4)
    lm2 = torch.logsumexp(scores(x2), 0) - math.log(4)
    per_batch = FilterLoss(1, 2, (2, 2), z_estimate="batch", negative_class=0)
    per_batch(x1, labels)
    per_batch(x2, labels)
    torch.testing.assert_close(per_batch.stats.log_z[0].double(), lm2, rtol=1e-5, atol=1e-6)
    run = FilterLoss(1, 2, (2, 2), z_estimate="running", z_momentum=0.9, negative_class=0)
    run(x1, labels)
    run(x2, labels)
    expected = torch.log(0.9 * lm1.exp() + 0.1 * lm2.exp())
    torch.testing.assert_close(run.stats.log_z[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        FilterLossConfig(schedule="weekly")
    with pytest.raises(ValueError, match="unknown filter loss option"):
        FilterLoss(1, 2, (2, 2), lamda=1.0)
    fl = FilterLoss(2, 2, (3, 3))
    with pytest.raises(ValueError, match="expects maps"):
        fl(torch.zeros(1, 2, 4, 4), torch.zeros(1, dtype=torch.long))


def test_posterior_mode_gradient_and_saturation():
    # -log p(T^|x): gradient = -(t^ - E_p(T|x)[t]) / B per map, Z_T from the batch, lambda = 1.
    g = torch.Generator().manual_seed(7)
    x = (torch.relu(torch.randn(4, 2, 3, 3, generator=g)) * 5).requires_grad_()
    labels = torch.tensor([1, 0, 1, 0])
    fl = FilterLoss(2, 2, (3, 3), mode="posterior", lambda_=1.0, schedule="constant", z_estimate="batch", negative_class=0)
    fl(x, labels).backward()
    xd = x.detach().double()
    templates = part_templates(3, 3).double()
    prior = template_priors(3, 3)
    scores = torch.einsum("bchw,thw->bct", xd, templates)
    log_z = torch.logsumexp(scores, 0) - math.log(4)
    post = torch.softmax(scores - log_z + prior.log(), -1)  # (B, C, T)
    expected = torch.zeros_like(xd)
    for b in range(4):
        for c in range(2):
            t_hat = int(xd[b, c].flatten().argmax()) if labels[b] == 1 else 9
            expected[b, c] = -(templates[t_hat] - torch.einsum("t,thw->hw", post[b, c], templates)) / 4
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-9)
    # saturation: a confidently peaked positive map gets (almost) no gradient at large scale
    big = torch.zeros(2, 1, 3, 3)
    big[0, 0, 1, 1] = 1e4
    big.requires_grad_()
    fl2 = FilterLoss(1, 2, (3, 3), mode="posterior", lambda_=1.0, schedule="constant", z_estimate="batch", negative_class=0)
    fl2(big, torch.tensor([1, 0])).backward()
    assert torch.isfinite(big.grad).all() and big.grad[0].abs().max() < 1e-6


def test_batch_map_norm_is_scale_free():
    g = torch.Generator().manual_seed(8)
    x = torch.relu(torch.randn(6, 3, 4, 4, generator=g)) * 3
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    values, grads = [], []
    for scale in (1.0, 50.0):
        xx = (x * scale).requires_grad_()
        fl = FilterLoss(3, 2, (4, 4), mode="posterior", map_norm="batch", sharpness=2.0, lambda_=1.0,
                        schedule="constant", z_estimate="batch", negative_class=0)
        values.append(fl(xx, labels))
        values[-1].backward()
        grads.append(xx.grad * scale)  # d/dx of a scale-free loss scales as 1/scale
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # no incentive to grow: the gradient is orthogonal to scaling all maps of a filter
    assert abs(float((grads[0] * x).sum())) < 1e-4


def test_warmup_epochs_delay_lambda():
    x = torch.rand(2, 1, 2, 2)
    fl = FilterLoss(1, 2, (2, 2), lambda_=0.4, schedule="inverse_epoch", warmup_epochs=2, negative_class=0)
    got = []
    for epoch in (1, 2, 3, 4):
        fl.start_epoch(epoch)
        fl(x, torch.tensor([1, 0]))
        got.append(fl.diagnostics()["lambda"])
    assert got == [0.0, 0.0, pytest.approx(0.4), pytest.approx(0.2)]


def test_z_scope_category_normalises_each_template_over_its_own_images():
    g = torch.Generator().manual_seed(9)
    x = torch.relu(torch.randn(6, 1, 2, 2, generator=g)) * 3
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    fl = FilterLoss(1, 2, (2, 2), z_estimate="batch", z_scope="category", negative_class=0)
    fl(x, labels)
    s = (x.reshape(6, 4) @ part_templates(2, 2).reshape(5, 4).t()).double()  # (B, T)
    pos, neg = labels == 1, labels == 0
    expected = torch.cat([torch.logsumexp(s[pos, :4], 0) - math.log(3), (torch.logsumexp(s[neg, 4], 0) - math.log(3))[None]])
    torch.testing.assert_close(fl.stats.log_z[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_weight_sign_variants_of_eq4():
    # a negative image that fires above the batch's typical level: Eq. 4 pushes it *up*
    x = torch.zeros(4, 1, 3, 3)
    x[0, 0, 1, 1], x[1, 0, 0, 0], x[2, 0, 2, 2] = 6.0, 5.0, 9.0  # 0, 1 positives; 2 a firing negative; 3 silent
    labels = torch.tensor([1, 1, 0, 0])
    steps = {}
    for sign in ("paper", "negatives", "target"):
        xx = x.clone().requires_grad_()
        FilterLoss(1, 2, (3, 3), lambda_=1.0, schedule="constant", weight_norm="none", z_estimate="batch", negative_class=0,
                   weight_sign=sign)(xx, labels).backward()
        steps[sign] = -xx.grad  # the descent direction
    assert steps["paper"][2, 0, 2, 2] > 0  # the paper's sign: the firing negative fires more
    assert steps["negatives"][2, 0, 2, 2] < 0 and steps["target"][2, 0, 2, 2] < 0  # the variants silence it
    torch.testing.assert_close(steps["negatives"][:2], steps["paper"][:2])  # positives as Eq. 4


def test_position_collision_counts_filters_that_share_a_position():
    from icnn.loss.filter_loss import position_collision, template_posterior

    # 4 filters, 2x2 maps: decisive posteriors (large scores) all at unit 0, or one unit each
    same, spread = torch.zeros(1, 4, 5), torch.zeros(1, 4, 5)
    same[0, :, 0] = 50.0
    spread[0, torch.arange(4), torch.arange(4)] = 50.0
    zeros, prior = torch.zeros(4, 5), torch.zeros(5)
    target = torch.ones(1, 4, dtype=torch.bool)

    def collision(scores, is_target):
        return float(position_collision(template_posterior(scores, zeros, prior)[1], is_target))

    assert collision(same, target) == pytest.approx(4.0)  # U: all at one unit
    assert collision(spread, target) == pytest.approx(1.0)  # even spread
    # only the filters of the image's category count; an image with none drops out
    mixed = torch.cat([same, spread])
    target2 = torch.tensor([[True] * 4, [False] * 4])
    assert collision(mixed, target2) == pytest.approx(4.0)


def test_template_posterior_is_the_softmax_with_its_gradient():
    from icnn.loss.filter_loss import template_posterior

    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(6, 3, 10, generator=g, dtype=torch.float64) * 30).requires_grad_()
    log_z, log_prior = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(6, 3, 10, generator=g, dtype=torch.float64), torch.randn(6, 3, 10, generator=g, dtype=torch.float64)
    log_post, post = template_posterior(scores, log_z, log_prior)
    (grad,) = torch.autograd.grad((w1 * log_post).sum() + (w2 * post).sum(), scores)
    ref_log = torch.log_softmax(scores - log_z + log_prior, -1)
    (ref_grad,) = torch.autograd.grad((w1 * ref_log).sum() + (w2 * ref_log.exp()).sum(), scores)
    torch.testing.assert_close(log_post, ref_log, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post, ref_log.exp(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_diversity_pushes_filters_at_one_position_apart():
    x = torch.zeros(2, 2, 3, 3)
    x[:, :, 1, 1] = 4.0  # both filters peak at the centre of both (positive) images
    x[:, 1, 0, 0] = 3.0  # filter 1 also has a weaker peak in the corner
    grads = {}
    for div in (0.0, 1.0):
        xx = x.clone().requires_grad_()
        fl = FilterLoss(2, 2, (3, 3), mode="posterior", lambda_=1e-9, schedule="constant", z_estimate="batch", negative_class=0, diversity=div)
        fl(xx, torch.tensor([1, 1])).backward()
        grads[div] = -xx.grad
    assert grads[1.0][:, :, 1, 1].sum() < grads[0.0][:, :, 1, 1].sum()  # the shared peak is lowered ...
    assert torch.isfinite(grads[1.0]).all()


def test_peak_decorrelation_is_one_for_copies_and_zero_for_independent_filters():
    from icnn.loss.filter_loss import peak_decorrelation

    g = torch.Generator().manual_seed(10)
    peaks = torch.rand(50, 1, generator=g)
    copies = peaks.expand(50, 3)  # three filters, the same responses
    labels, targets = torch.ones(50, dtype=torch.long), torch.ones(3, dtype=torch.long)
    assert float(peak_decorrelation(copies, labels, targets)) == pytest.approx(1.0, abs=0.02)  # (the std has an epsilon)
    independent = torch.rand(2000, 3, generator=g)
    assert float(peak_decorrelation(independent, torch.ones(2000, dtype=torch.long), targets)) < 0.01
    # only the category's images and filters: the negatives' responses do not count
    mixed = torch.cat([copies, torch.rand(50, 3, generator=g)])
    assert float(peak_decorrelation(mixed, torch.cat([labels, torch.zeros(50, dtype=torch.long)]), targets)) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("cfg", [dict(mode="posterior", z_estimate="batch", diversity=0.5),  # -MI from the posterior
                                 dict(mode="posterior", z_estimate="running"), dict(mode="paper")])  # fmt: skip
def test_filter_loss_value_is_lambda_times_the_batch_neg_mi(cfg):
    g = torch.Generator().manual_seed(4)
    fl = FilterLoss(3, 2, (4, 4), negative_class=0, lambda_=0.5, schedule="constant", **cfg)
    fl.start_epoch(1)
    for _ in range(3):  # the running Z_T moves away from the batch's; the value stays the batch's -MI
        x = torch.relu(torch.randn(8, 3, 4, 4, generator=g)) * 5
        labels = torch.tensor([0, 1] * 4)
        value = fl(x.clone().requires_grad_(), labels)
        assert float(value.detach()) == pytest.approx(0.5 * float(brute_force_neg_mi(x.double()).sum()), rel=1e-4, abs=1e-6)


def test_batch_collapse_against_brute_force():
    from icnn.loss.filter_loss import batch_collapse

    g = torch.Generator().manual_seed(11)
    for trial in range(5):
        b, c, u = 12, 7, 5
        peaks = torch.rand(b, c, generator=g, dtype=torch.float64) * (torch.rand(b, c, generator=g) > 0.2)  # some silent maps
        units = torch.randint(0, u, (b, c), generator=g)
        labels = torch.randint(0, 3, (b,), generator=g)
        labels[:3] = torch.tensor([1, 2, 2])
        targets = torch.randint(1, 3, (c,), generator=g)
        targets[:2] = torch.tensor([1, 2])
        mode, corr = batch_collapse(peaks, units, labels, targets, u).tolist()
        shares, cors = [], []
        for i in range(b):  # each image: its category's firing filters, the share at their commonest unit
            f = [j for j in range(c) if targets[j] == labels[i] and peaks[i, j] > 0]
            if f:
                shares.append(max(sum(int(units[i, j]) == k for j in f) for k in range(u)) / len(f))
        for k in targets.unique().tolist():  # each category: the mean correlation over its filter pairs
            s = peaks[labels == k][:, targets == k]
            if s.shape[0] >= 3 and s.shape[1] >= 2:
                z = (s - s.mean(0)) / (s.std(0) + 1e-3)
                r = z.t() @ z / (s.shape[0] - 1)
                cors.append(float(r[~torch.eye(s.shape[1], dtype=torch.bool)].mean()))
        assert mode == pytest.approx(sum(shares) / len(shares), abs=1e-12)
        assert corr == pytest.approx(sum(cors) / len(cors), abs=1e-9) if cors else math.isnan(corr)


def test_adapt_rate_moves_the_terms_weights_towards_their_targets_and_resumes():
    # 8 filters, every one at the centre unit and a copy of the others: both figures above target, both weights grow
    copies = torch.zeros(8, 8, 3, 3)
    copies[:, :, 1, 1] = torch.arange(1, 9, dtype=torch.float32)[:, None]
    labels = torch.ones(8, dtype=torch.long)
    fl = FilterLoss(8, 2, (3, 3), mode="posterior", lambda_=1.0, z_estimate="batch", negative_class=0,
                    diversity=0.1, decorrelation=0.2, adapt_rate=0.1, mode_target=0.15, corr_target=0.2)  # fmt: skip
    fl.start_epoch(1)
    fl(copies.clone().requires_grad_(), labels).backward()
    # measured: mode share 1, mean correlation ~1 -> log factors += 0.1 * (1/0.15 - 1), 0.1 * (~1/0.2 - 1)
    assert fl.log_scale.tolist() == pytest.approx([0.1 * (1 / 0.15 - 1), 0.1 * (1 / 0.2 - 1)], rel=1e-2)
    div_w, decor_w = fl.term_weights()
    assert div_w == pytest.approx(0.1 * math.exp(0.1 * (1 / 0.15 - 1)), rel=1e-2) and decor_w > 0.2
    # each filter at its own unit (mode share 1/8) with independent peaks: both below target, both weights shrink
    g = torch.Generator().manual_seed(0)
    spread = torch.zeros(8, 8, 9)
    spread[:, torch.arange(8), torch.arange(8)] = torch.rand(8, 8, generator=g) + 1
    before = fl.log_scale.clone()
    fl(spread.view(8, 8, 3, 3).clone().requires_grad_(), labels).backward()
    assert (fl.log_scale < before).all()
    # no step without gradient (evaluation), and the factors are state: saved and restored
    after = fl.log_scale.clone()
    with torch.no_grad():
        fl(copies, labels)
    assert torch.equal(fl.log_scale, after)
    fresh = FilterLoss(8, 2, (3, 3), mode="posterior", negative_class=0, diversity=0.1, decorrelation=0.2, adapt_rate=0.1)
    fresh.load_state_dict(fl.state_dict())
    assert fresh.term_weights() == fl.term_weights()
    # without adapt_rate the weights are the config's and the state has no factors (old checkpoints load)
    fixed = FilterLoss(8, 2, (3, 3), mode="posterior", negative_class=0, diversity=0.1, decorrelation=0.2)
    assert fixed.term_weights() == (0.1, 0.2) and "log_scale" not in fixed.state_dict()


def test_adapt_rate_factors_stay_in_range():
    from icnn.loss.filter_loss import _LOG_SCALE_RANGE

    fl = FilterLoss(4, 2, (3, 3), mode="posterior", lambda_=1.0, z_estimate="batch", negative_class=0,
                    diversity=0.1, decorrelation=0.2, adapt_rate=50.0)  # fmt: skip
    fl.start_epoch(1)
    x = torch.zeros(8, 4, 3, 3)
    x[:, :, 1, 1] = torch.arange(1, 9, dtype=torch.float32)[:, None]
    fl(x.requires_grad_(), torch.ones(8, dtype=torch.long)).backward()
    assert fl.log_scale.tolist() == pytest.approx([_LOG_SCALE_RANGE, _LOG_SCALE_RANGE])


def test_given_units_replace_the_argmax_as_targets():
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(6, 3, 4, 4, generator=g)) * 3
    labels = torch.tensor([1, 0, 1, 1, 0, 1])
    own = x.flatten(2).argmax(-1)

    def grad(units):
        fl = FilterLoss(3, 2, (4, 4), mode="posterior", lambda_=1.0, z_estimate="batch", negative_class=0)
        fl.start_epoch(1)
        xx = x.clone().requires_grad_()
        fl(xx, labels, units).backward()
        return xx.grad

    torch.testing.assert_close(grad(None), grad(own))  # the default is each map's argmax
    moved = (own + 5) % 16
    gm = grad(moved)
    # on the category's images the map is pulled towards the given unit's template (its peak there rises most)
    pos = labels == 1
    at_given = -gm.flatten(2)[pos].gather(-1, moved[pos][..., None])
    assert (at_given > 0).all()
    with pytest.raises(ValueError, match="units must be"):
        grad(torch.full((6, 3), 16))


def _maps_with_silence_and_ties(seed: int, scale: float) -> torch.Tensor:
    """Random float64 maps (8, 6, 4, 5) after ReLU with silent maps, all-tied maps and tied peaks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(8, 6, 4, 5, generator=g, dtype=torch.float64)) * scale
    x[0, 0] = 0.0  # silent
    x[1, :3] = 0.0
    x[2, 1] = scale  # every unit tied
    x[3, 2, :, :2] = x[3, 2].max()  # the peak tied over two columns
    return x


def _posterior_by_autograd(x, templates, log_z, log_prior, t_hat, lam, is_target, collision_weight, decor_weight, labels, targets):
    """The posterior objective as ``FilterLoss`` ran it through autograd before session 13."""
    from icnn.loss.filter_loss import peak_decorrelation, position_collision, posterior_nll, template_posterior
    from icnn.loss.mi import template_scores

    log_post, post = template_posterior(template_scores(x, templates), log_z, log_prior)
    loss = (lam * posterior_nll(log_post, t_hat).mean(0)).sum()
    if collision_weight:
        loss = loss + collision_weight * position_collision(post, is_target)
    if decor_weight:
        loss = loss + decor_weight * peak_decorrelation(x.flatten(2).max(-1).values, labels, targets)
    return loss, log_post


@pytest.mark.parametrize("scale", [3.0, 1e4])  # 1e4: batch_exp's exps underflow, the log-space path takes over
@pytest.mark.parametrize("shared", ["copy", "in place", None])
@pytest.mark.parametrize("terms", ["recipe", "nll", "collision", "decorrelation"])
def test_fused_posterior_equals_autograd_in_float64(terms, shared, scale):
    """:mod:`icnn.loss.posterior` (the analytic gradient ``FilterLoss`` uses in posterior mode) against
    autograd of the same objective, float64: value, gradient, H(T|x) and log p(x), for the recipe's
    weights and for each term alone; targets at the argmax on most maps, elsewhere given units."""
    from icnn.cli.compare import RECIPE
    from icnn.loss.filter_loss import peak_decorrelation, target_templates
    from icnn.loss.mi import template_scores
    from icnn.loss.posterior import batch_exp, posterior_terms, score_maps

    recipe = RECIPE["filter_loss"]
    weights = {"recipe": (1.0, recipe["diversity"] * 6, recipe["decorrelation"] * 6), "nll": (1.0, 0.0, 0.0),
               "collision": (0.0, 0.5, 0.0), "decorrelation": (0.0, 0.0, 2.0)}[terms]  # fmt: skip
    x = _maps_with_silence_and_ties(12, scale)
    b, c, h, w = x.shape
    templates = part_templates(h, w).double()
    log_prior = template_priors(h, w).log().double()
    labels = torch.tensor([1, 1, 0, 1, 2, 1, 0, 2])
    targets = torch.tensor([1, 1, 2, 1, 2, 0])
    is_target = labels[:, None] == targets[None, :]
    lam = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 1.0], dtype=torch.float64) * weights[0]
    scores, peaks, units = score_maps(x, templates)
    given = units.clone()
    given[5:] = torch.randint(0, h * w, (3, c), generator=torch.Generator().manual_seed(1))
    t_hat = target_templates(given, is_target, h * w)
    log_z = torch.logsumexp(scores, 0).t() - math.log(b)  # Z_T of this batch, (C, T)

    xa = x.clone().requires_grad_()
    ref, log_post = _posterior_by_autograd(xa, templates, log_z, log_prior, t_hat, lam, is_target, weights[1], weights[2], labels, targets)
    ref.backward()
    xf = x.clone().requires_grad_()
    out = posterior_terms(xf, scores, peaks, units, log_z, log_prior, templates, t_hat, lam, is_target, collision_weight=weights[1],
                          shared=batch_exp(scores if shared == "copy" else scores.clone(), in_place=shared == "in place") if shared else None)  # fmt: skip
    loss = out.loss + (weights[2] * peak_decorrelation(out.peaks, labels, targets) if weights[2] else 0.0)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xf.grad, xa.grad, rtol=1e-9, atol=1e-14)
    log_post = log_post.detach()
    torch.testing.assert_close(out.entropy, -(log_post.exp() * log_post).sum(-1), rtol=1e-9, atol=1e-12)
    log_norm = torch.logsumexp(template_scores(x, templates) + log_prior - log_z, -1)  # log p(x) + log B
    torch.testing.assert_close(out.log_norm, log_norm, rtol=1e-10, atol=1e-10)


def test_fused_posterior_without_gradient_and_with_no_category_images():
    """No graph when nothing needs a gradient; a batch without any image of a filter's category has
    no collision (0, no gradient from it), as ``position_collision`` gives."""
    from icnn.loss.filter_loss import position_collision, template_posterior
    from icnn.loss.posterior import posterior_terms, score_maps

    x = _maps_with_silence_and_ties(13, 2.0)
    b, c, h, w = x.shape
    templates, log_prior = part_templates(h, w).double(), template_priors(h, w).log().double()
    scores, peaks, units = score_maps(x, templates)
    log_z = torch.logsumexp(scores, 0).t() - math.log(b)
    none = torch.zeros(b, c, dtype=torch.bool)
    out = posterior_terms(x, scores, peaks, units, log_z, log_prior, templates, units, torch.ones(c, dtype=torch.float64), none, 1.0)
    assert out.loss.grad_fn is None and out.peaks.grad_fn is None
    post = template_posterior(scores.transpose(1, 2), log_z, log_prior)[1]
    assert float(out.collision) == float(position_collision(post, none)) == 0.0


def test_recipe_loss_finite_for_activations_up_to_1e4():
    from icnn.cli.compare import RECIPE

    x = torch.rand(6, 4, 7, 7) * 1e4
    x[0, 0] = 0.0
    x[1, 1] = 1e4  # tied everywhere
    fl = FilterLoss(4, 2, (7, 7), negative_class=0, **RECIPE["filter_loss"])
    fl.start_epoch(1)
    x.requires_grad_()
    out = fl(x, torch.tensor([1, 0, 1, 1, 0, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert all(math.isfinite(v) for k, v in fl.diagnostics().items() if k not in ("batch_peak_correlation",))
