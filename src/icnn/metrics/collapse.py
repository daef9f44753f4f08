"""Filter collapse: do a layer's filters each follow their own part, or are they copies of one
detector? (issue 22)

A layer can score well on location instability while its filters are near-copies of one detector
(they all peak at the same unit, so each one looks "stable"), or while they fire harder on other
categories than on their own. These figures say which; all are streamed over one pass.

Per filter ``f`` and image ``I``: the peak score ``s_fI = max_ij x_ij`` and the argmax unit
``u_fI``. A map is *firing* when ``s_fI > 0``.

- ``peak_correlation``: Pearson correlation between two filters' peak scores across the images
  of their category (filters of one category only), summarised by the median (and mean) over
  filter pairs. Over the category's images, not all images: filters that each fire on their
  category and stay silent elsewhere correlate across *all* images by construction (the label
  drives them), so only the within-category figure separates copies from part detectors. The
  all-image figure is reported too (``peak_correlation_all``).
- ``mode_share``: on each image of a filter's category, the share of its firing filters whose
  argmax is the image's most common unit among them; mean over images (``mode_share_other`` on
  the other images). A layer of copies has most filters at one unit; distinct part detectors
  spread over the object.
- ``distinct_units``: the number of distinct argmax units among the firing filters, mean over
  the category's images.
- ``peak_category`` / ``peak_other``: mean peak score on the filter's category vs on the other
  images (mean over filters), and ``higher_on_category`` the share of filters whose mean peak is
  higher on their category (on images of both kinds; filters silent everywhere count as not
  higher).
- ``parts_localised`` (paper Fig. 6 as a number): each filter's part is the landmark whose
  distance to the filter's peak varies least (the lowest standard deviation over the category's
  annotated images on which it fires: the landmark it follows); ``part_shares`` gives the share of
  filters per landmark and ``parts_effective`` ``exp(entropy)`` of those shares (1: every filter
  on one part; K: spread evenly over K landmarks).

Thresholds of the bar the project holds itself to (``COLLAPSE_LIMITS``) are used by
:func:`collapse_warnings` (training prints them as it does silence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantile import MetricError

# the issue-22 bar: median within-category peak correlation, share at the most common unit,
# share of filters peaking higher on their category
COLLAPSE_LIMITS = {"peak_correlation": 0.3, "mode_share": 0.2, "higher_on_category": 0.9}


@dataclass
class CollapseResult:
    peak_correlation: float  # median over filter pairs (same category), within-category images
    peak_correlation_mean: float
    peak_correlation_all: float  # median over pairs, over all images
    mode_share: float  # mean over category images of the share of firing filters at the mode unit
    mode_share_other: float  # the same over the other images (NaN when there are none)
    distinct_units: float  # mean number of distinct argmax units per category image
    peak_category: float  # mean over filters of the mean peak on the filter's category
    peak_other: float  # ... on the other images (NaN when there are none)
    higher_on_category: float  # share of filters whose mean peak is higher on their category
    part_shares: dict = field(default_factory=dict)  # landmark -> share of filters localising it
    parts_effective: float = float("nan")  # exp(entropy) of part_shares
    parts_localised: int = 0  # landmarks that are the part of at least 5% of filters

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class FilterCollapse:
    """Streaming collapse figures of one layer (see the module doc).

    Args:
        num_filters: C.
        num_classes: NC (labels index into it).
        landmark_names: K names (optional: ``parts_localised`` needs them).
        max_pairs_filters: correlations use at most this many filters per category (a seeded
            subset: the ``C x C`` matrix grows quadratically).
    """

    def __init__(self, num_filters: int, num_classes: int, landmark_names=(), *, max_pairs_filters: int = 2048):
        if num_filters <= 0 or num_classes <= 0:
            raise MetricError(f"FilterCollapse needs positive num_filters and num_classes, got {num_filters}, {num_classes}")
        self.c, self.nc = int(num_filters), int(num_classes)
        self.landmark_names = list(landmark_names)
        self.max_pairs = int(max_pairs_filters)
        c, nc, k = self.c, self.nc, len(self.landmark_names)
        dd = torch.float64
        # per class: sums for the correlation across that class's images
        self.n = torch.zeros(nc, dtype=dd)
        self.s1 = torch.zeros(nc, c, dtype=dd)
        self.s2 = torch.zeros(nc, c, c, dtype=dd) if c <= self.max_pairs else None
        self._sub = None if c <= self.max_pairs else torch.randperm(c, generator=torch.Generator().manual_seed(0))[: self.max_pairs].sort().values
        if self.s2 is None:
            self.s2 = torch.zeros(nc, self.max_pairs, self.max_pairs, dtype=dd)
        self.a1 = torch.zeros(c, dtype=dd)  # all images
        self.a2 = torch.zeros(self.s2.shape[1:], dtype=dd)
        self.na = 0
        self.peak_sum = torch.zeros(nc, c, dtype=dd)  # per class: sum of peaks
        self.mode_sum = torch.zeros(nc, dtype=dd)  # per class: sum over images of the mode share
        self.mode_n = torch.zeros(nc, dtype=dd)
        self.distinct_sum = torch.zeros(nc, dtype=dd)
        self.dist_sum = torch.zeros(nc, c, max(k, 1), dtype=dd)  # per class: sum of distances to landmarks
        self.dist_sq = torch.zeros(nc, c, max(k, 1), dtype=dd)
        self.dist_n = torch.zeros(nc, c, max(k, 1), dtype=dd)

    def update(self, scores: torch.Tensor, units: torch.Tensor, labels: torch.Tensor,
               landmark_dist: torch.Tensor | None = None) -> None:
        """``scores (B, C)`` peak values, ``units (B, C)`` flat argmax units, ``labels (B,)``,
        ``landmark_dist (B, C, K)`` distances of each peak to each landmark (NaN: absent)."""
        b = scores.shape[0]
        if tuple(scores.shape) != (b, self.c) or tuple(units.shape) != (b, self.c):
            raise MetricError(f"scores and units must be (B, {self.c}), got {tuple(scores.shape)}, {tuple(units.shape)}")
        s = scores.detach().cpu().double()
        u = units.detach().cpu().long()
        y = torch.as_tensor(labels).cpu().long().reshape(-1)
        onehot = torch.nn.functional.one_hot(y, self.nc).double()  # (B, NC)
        sub = s if self._sub is None else s[:, self._sub]
        self.n += onehot.sum(0)
        self.s1 += onehot.t() @ s
        self.s2 += torch.einsum("bk,bi,bj->kij", onehot, sub, sub)
        self.a1 += s.sum(0)
        self.a2 += sub.t() @ sub
        self.na += b
        self.peak_sum += onehot.t() @ s
        # the mode unit among the firing filters of each image
        firing = s > 0
        n_units = int(u.max()) + 1 if u.numel() else 1
        counts = torch.zeros(b, n_units, dtype=torch.float64).scatter_add_(1, u, firing.double())  # (B, U)
        nfire = firing.sum(1).double()
        ok = nfire > 0
        share = torch.where(ok, counts.amax(1) / nfire.clamp_min(1), torch.zeros_like(nfire))
        self.mode_sum += onehot.t() @ share
        self.mode_n += onehot.t() @ ok.double()
        self.distinct_sum += onehot.t() @ (counts > 0).sum(1).double()
        if landmark_dist is not None and self.landmark_names:
            d = landmark_dist.detach().cpu().double()
            present = ~torch.isnan(d) & firing[..., None]
            dz = torch.where(present, d, torch.zeros((), dtype=torch.float64))
            self.dist_sum += torch.einsum("bk,bcl->kcl", onehot, dz)
            self.dist_sq += torch.einsum("bk,bcl->kcl", onehot, dz * dz)
            self.dist_n += torch.einsum("bk,bcl->kcl", onehot, present.double())

    @staticmethod
    def _corr(n, s1, s2) -> torch.Tensor:
        """Off-diagonal Pearson correlations of the filters with non-zero variance."""
        if n < 2:
            return torch.empty(0, dtype=torch.float64)
        mean = s1 / n
        cov = s2 / n - mean[:, None] * mean[None, :]
        var = cov.diagonal()
        ok = var > 1e-12 * var.abs().max().clamp_min(1e-30)
        cov, var = cov[ok][:, ok], var[ok]
        corr = cov / (var[:, None] * var[None, :]).sqrt()
        iu = torch.triu_indices(len(var), len(var), 1)
        return corr[iu[0], iu[1]]

    def compute(self, categories: torch.Tensor | None = None) -> CollapseResult:
        """``categories (C,)``: each filter's class (default: every filter of class 1 when there are
        two classes, the single-category convention, else of class 0)."""
        if self.na == 0:
            raise MetricError("FilterCollapse.compute() called before any update()")
        if categories is None:
            categories = torch.full((self.c,), 1 if self.nc == 2 else 0, dtype=torch.long)
        cat = torch.as_tensor(categories).long().cpu()
        nan = float("nan")
        # correlations within each category, for that category's filters
        sub_cat = cat if self._sub is None else cat[self._sub]
        pairs = []
        for k in sub_cat.unique().tolist():
            sel = (sub_cat == k).nonzero()[:, 0]
            s1 = self.s1[k] if self._sub is None else self.s1[k][self._sub]
            pairs.append(self._corr(self.n[k], s1[sel], self.s2[k][sel][:, sel]))
        pairs = torch.cat(pairs) if pairs else torch.empty(0, dtype=torch.float64)
        a1 = self.a1 if self._sub is None else self.a1[self._sub]
        allp = self._corr(torch.tensor(float(self.na), dtype=torch.float64), a1, self.a2)
        med = lambda t: float(t.median()) if t.numel() else nan  # noqa: E731
        # peaks on the filter's category vs elsewhere
        idx = torch.arange(self.c)
        on_sum, on_n = self.peak_sum[cat, idx], self.n[cat]
        off_sum, off_n = self.peak_sum.sum(0) - on_sum, self.n.sum() - on_n
        on_mean = on_sum / on_n.clamp_min(1)
        off_mean = off_sum / off_n.clamp_min(1)
        both = (on_n > 0) & (off_n > 0)
        higher = float(((on_mean > off_mean) & both).double().sum() / both.sum()) if bool(both.any()) else nan
        # mode share / distinct units on each filter's category images (the commonest category)
        main = int(torch.bincount(cat, minlength=self.nc).argmax())
        mode = float(self.mode_sum[main] / self.mode_n[main]) if self.mode_n[main] > 0 else nan
        other_n = self.mode_n.sum() - self.mode_n[main]
        mode_other = float((self.mode_sum.sum() - self.mode_sum[main]) / other_n) if other_n > 0 else nan
        distinct = float(self.distinct_sum[main] / self.n[main]) if self.n[main] > 0 else nan
        shares, eff, localised = {}, nan, 0
        if self.landmark_names:
            cnt = self.dist_n[cat, idx]  # (C, K)
            mean_d = self.dist_sum[cat, idx] / cnt
            std_d = (self.dist_sq[cat, idx] / cnt - mean_d**2).clamp_min(0).sqrt()
            std_d = torch.where(cnt >= 2, std_d, torch.full_like(std_d, float("nan")))  # (C, K)
            seen = ~torch.isnan(std_d).all(1)
            part = torch.where(torch.isnan(std_d), torch.full_like(std_d, float("inf")), std_d).argmin(1)[seen]
            if len(part):
                p = torch.bincount(part, minlength=len(self.landmark_names)).double() / len(part)
                shares = dict(zip(self.landmark_names, p.tolist()))
                nz = p[p > 0]
                eff = float((-(nz * nz.log()).sum()).exp())
                localised = int((p >= 0.05).sum())
        return CollapseResult(
            peak_correlation=med(pairs),
            peak_correlation_mean=float(pairs.mean()) if pairs.numel() else nan,
            peak_correlation_all=med(allp),
            mode_share=mode,
            mode_share_other=mode_other,
            distinct_units=distinct,
            peak_category=float(on_mean[on_n > 0].mean()) if bool((on_n > 0).any()) else nan,
            peak_other=float(off_mean[off_n > 0].mean()) if bool((off_n > 0).any()) else nan,
            higher_on_category=higher,
            part_shares=shares,
            parts_effective=eff,
            parts_localised=localised,
        )


def collapse_warnings(result: dict, layer: str) -> list[str]:
    """One-line warnings for a collapsed layer from ``CollapseResult.summary()``."""
    out = []
    corr, mode, higher = result.get("peak_correlation"), result.get("mode_share"), result.get("higher_on_category")
    lim = COLLAPSE_LIMITS
    if corr is not None and corr == corr and corr > lim["peak_correlation"]:
        out.append(f"layer {layer!r}'s filters are near-copies: their peak scores correlate at {corr:.2f} (median over pairs; limit {lim['peak_correlation']})")
    if mode is not None and mode == mode and mode > lim["mode_share"]:
        out.append(f"on a typical image {mode:.0%} of layer {layer!r}'s firing filters peak at the same unit (limit {lim['mode_share']:.0%})")
    if higher is not None and higher == higher and higher < lim["higher_on_category"]:
        out.append(f"only {higher:.0%} of layer {layer!r}'s filters fire harder on their category than elsewhere (limit {lim['higher_on_category']:.0%})")
    return out
