"""Exact streaming top-q threshold of every filter (paper §5.2.1, Network Dissection).

Part interpretability and Network Dissection threshold each filter ``f`` at ``T_f`` with
``p(x_ij > T_f) = q`` (q = 0.005) over *all units of all maps of the dataset*. The paper's
equation has no exact solution on a finite set, so we fix the definition:

    N   = number of units seen for filter f (images x h x w)
    k   = floor(q * N)                  (how many units may exceed the threshold)
    T_f = the (k+1)-th largest value    (descending order, 1-based; ties counted with multiplicity)

``T_f`` is the smallest value with ``#{x > T_f} <= k``: at most a fraction ``q`` of the units
exceed it (fewer when values tie at ``T_f``), and any smaller value lets more than ``k`` through.
It equals ``numpy.quantile(x, 1 - q, method="inverted_cdf")`` (the smallest ``t`` with
``P(x <= t) >= 1 - q``), and regions are then ``x > T_f`` (strict), so a silent filter (``T_f = 0``)
has empty regions.

``q * N`` is computed in exact rational arithmetic from ``q``'s decimal form (``Fraction("0.005")``
is exactly 1/200), so ``N = 200`` gives ``k = 1``, not 0 through float rounding.

Streaming: ``TopQuantile`` keeps, per filter, the ``floor(q * total_units) + 1`` largest values
seen so far (as a multiset, unordered; an update only looks at values above the smallest kept).
That is enough for any count ``N <= total_units``, so the result is exact - the same values as
sorting everything at once - whatever the batching. Memory is ``C x (q * total_units + 1)``
values: 512 filters x 10,000 images x 14 x 14 at q = 0.005 is 20 MB.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


class MetricError(ValueError):
    """Bad input to a metric: the message names the argument and what is wrong."""


def exact_fraction(x: float | Fraction) -> Fraction:
    """``x`` as the rational its shortest decimal form denotes (0.005 -> 1/200, 0.2 -> 1/5)."""
    if isinstance(x, Fraction):
        return x
    return Fraction(repr(float(x)))


def num_exceeding(q: float | Fraction, n: int) -> int:
    """``k = floor(q * n)``, exactly (rational arithmetic)."""
    return math.floor(exact_fraction(q) * n)


def top_quantile(values: torch.Tensor, q: float = 0.005) -> torch.Tensor:
    """Exact threshold of each row: ``(C, N) -> (C,)``, the ``(floor(q N) + 1)``-th largest value.

    One-pass reference for small tensors; use ``TopQuantile`` to stream a dataset.
    """
    if values.dim() != 2 or values.shape[1] == 0:
        raise MetricError(f"values must be (C, N) with N > 0, got shape {tuple(values.shape)}")
    k = num_exceeding(q, values.shape[1])
    return values.topk(k + 1, dim=1).values[:, k]


class TopQuantile:
    """Streaming exact per-filter threshold ``T_f`` with ``p(x > T_f) = q`` (see module doc).

    Args:
        num_filters: C.
        total_units: the number of units each filter will see in all (images x h x w), or an
            upper bound of it; ``compute()`` is exact for any count up to it.
        q: the fraction of units above the threshold (paper: 0.005).

    ``update(maps)`` takes ``(B, C, h, w)`` (or ``(B, C, L)``) maps after ReLU / mask.
    """

    def __init__(self, num_filters: int, total_units: int, q: float = 0.005):
        if num_filters <= 0:
            raise MetricError(f"num_filters must be positive, got {num_filters}")
        if total_units <= 0:
            raise MetricError(f"total_units must be positive, got {total_units}")
        if not 0 <= float(q) < 1:
            raise MetricError(f"q must be in [0, 1), got {q}")
        self.num_filters = int(num_filters)
        self.total_units = int(total_units)
        self.q = q
        self.capacity = num_exceeding(q, total_units) + 1  # values kept per filter
        self.count = 0  # units seen per filter
        self.top: torch.Tensor | None = None  # (C, <= capacity) the largest values, unordered

    def update(self, maps: torch.Tensor) -> None:
        if maps.dim() < 2 or maps.shape[1] != self.num_filters:
            raise MetricError(
                f"maps must be (B, {self.num_filters}, ...), got shape {tuple(maps.shape)}"
            )
        b = maps.shape[0]
        vals = maps.detach().reshape(b, self.num_filters, -1).transpose(0, 1).reshape(
            self.num_filters, -1
        )  # (C, B*h*w)
        if vals.shape[1] == 0:
            return
        if torch.isnan(vals).any():
            raise MetricError("maps contain NaN")
        if self.count + vals.shape[1] > self.total_units:
            raise MetricError(
                f"TopQuantile saw {self.count + vals.shape[1]} units per filter, more than "
                f"total_units={self.total_units}; pass the dataset's true total"
            )
        self.count += vals.shape[1]
        full = self.top is not None and self.top.shape[1] == self.capacity
        if full:
            # only values above the smallest kept one can change the kept multiset (one equal to it
            # would replace it by an equal value): compact them into (C, M), padded with -inf
            keep = vals > self.top.min(dim=1, keepdim=True).values  # (C, N)
            counts = keep.sum(1)
            if int(counts.max()) == 0:
                return
            rows, cols = keep.nonzero().unbind(1)  # row-major: grouped by filter
            rank = torch.arange(len(rows), device=vals.device) - (counts.cumsum(0) - counts)[rows]
            cand = torch.full(
                (self.num_filters, int(counts.max())), float("-inf"), dtype=self.top.dtype, device=vals.device
            )
            cand[rows, rank] = vals[rows, cols].to(self.top.dtype)
            vals = cand
        comb = vals if self.top is None else torch.cat((self.top, vals.to(self.top.dtype)), dim=1)
        excess = comb.shape[1] - self.capacity
        if excess <= 0:
            self.top = comb
        elif excess < self.capacity:  # drop the few smallest of every row (-inf padding first)
            drop = comb.topk(excess, dim=1, largest=False, sorted=False).indices
            kept = torch.ones_like(comb, dtype=torch.bool).scatter_(1, drop, False)
            self.top = comb[kept].reshape(self.num_filters, self.capacity)
        else:
            self.top = comb.topk(self.capacity, dim=1, sorted=False).values  # (C, capacity), unordered

    def compute(self) -> torch.Tensor:
        """Thresholds ``(C,)`` for the units seen so far."""
        if self.top is None:
            raise MetricError("TopQuantile.compute() called before any update()")
        k = num_exceeding(self.q, self.count)
        return self.top.topk(k + 1, dim=1).values[:, k]

    def state_dict(self) -> dict:
        return {"count": self.count, "top": self.top}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.top = int(state["count"]), state["top"]
