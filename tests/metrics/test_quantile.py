import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icnn.metrics.quantile import MetricError, TopQuantile, num_exceeding, top_quantile


def numpy_threshold(values: np.ndarray, q: float) -> np.ndarray:
    """Reference: the (floor(qN)+1)-th largest value of each row, by sorting."""
    n = values.shape[1]
    k = int(np.floor(round(q * n, 9)))
    return -np.sort(-values, axis=1)[:, k]


def test_num_exceeding_is_exact_rational():
    # float 0.005 * 200 = 1.0000000000000002 and 0.005 * 1000 = 5.000000000000001 in binary;
    # the decimal reading gives exactly 1 and 5
    assert num_exceeding(0.005, 200) == 1
    assert num_exceeding(0.005, 199) == 0
    assert num_exceeding(0.005, 1000) == 5
    assert num_exceeding(0.2, 10) == 2


def test_hand_case():
    # 10 values, q = 0.2: k = 2 may exceed, T = the 3rd largest
    x = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0]])
    t = top_quantile(x, 0.2)
    assert t.tolist() == [7.0]
    assert int((x > t[:, None]).sum()) == 2


def test_ties_counted_with_multiplicity():
    x = torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    t = top_quantile(x, 0.2)  # 3rd largest is 3: nothing exceeds it (fewer than k, as documented)
    assert t.tolist() == [3.0]
    assert int((x > t[:, None]).sum()) == 0


@pytest.mark.parametrize("q", [0.005, 0.01, 0.1, 0.25])
@pytest.mark.parametrize("n", [1, 7, 200, 999])
def test_matches_numpy_inverted_cdf(q, n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 20, size=(4, n)).astype(np.float32)  # many ties
    got = top_quantile(torch.from_numpy(x), q).numpy()
    np.testing.assert_array_equal(got, numpy_threshold(x, q))
    # numpy's inverted_cdf at 1 - q is the same definition, except where (1 - q) * n falls on an
    # integer and float rounding decides; compare there only
    if not np.isclose((1 - q) * n, round((1 - q) * n)):
        ref = np.quantile(x, 1 - q, axis=1, method="inverted_cdf")
        np.testing.assert_array_equal(got, ref)


def test_streaming_equals_one_pass_exactly():
    torch.manual_seed(0)
    maps = torch.relu(torch.randn(37, 5, 6, 6))  # many exact zeros
    one = TopQuantile(5, 37 * 36)
    one.update(maps)
    streamed = TopQuantile(5, 37 * 36)
    for chunk in torch.split(maps, [1, 10, 3, 23]):
        streamed.update(chunk)
    ref = top_quantile(maps.transpose(0, 1).reshape(5, -1), 0.005)
    assert torch.equal(one.compute(), ref)
    assert torch.equal(streamed.compute(), ref)


def test_total_is_an_upper_bound():
    torch.manual_seed(1)
    maps = torch.rand(10, 2, 4, 4)
    tq = TopQuantile(2, 1000, q=0.05)  # capacity for 1000 units, 160 seen
    tq.update(maps)
    assert torch.equal(tq.compute(), top_quantile(maps.transpose(0, 1).reshape(2, -1), 0.05))
    with pytest.raises(MetricError, match="total_units"):
        TopQuantile(2, 100, q=0.05).update(maps)


def test_bad_input():
    with pytest.raises(MetricError, match="maps must be"):
        TopQuantile(3, 100).update(torch.rand(2, 4, 3, 3))
    with pytest.raises(MetricError, match="before any update"):
        TopQuantile(3, 100).compute()
    with pytest.raises(MetricError, match="NaN"):
        TopQuantile(1, 100).update(torch.tensor([[[float("nan")]]]))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=60),
    st.sampled_from([0.005, 0.05, 0.3]),
    st.integers(1, 7),
)
def test_property_exceed_count(vals, q, split):
    x = torch.tensor(vals, dtype=torch.float32).reshape(-1, 1, 1)  # (B, C=1, L=1)
    tq = TopQuantile(1, len(vals), q=q)
    for chunk in torch.split(x, split):
        tq.update(chunk)
    t = float(tq.compute()[0])
    v = torch.tensor(vals, dtype=torch.float32)
    k = num_exceeding(q, len(vals))
    assert int((v > t).sum()) <= k  # at most a fraction q exceeds it
    assert int((v >= t).sum()) >= k + 1  # and no smaller threshold would do
