"""Location instability of filters (paper §5.2.2, SPEC §5) and its two reference points.

For filter ``f`` on image ``I`` the inferred part is the argmax unit ``mu_hat`` of its (masked)
map, with score ``x_mu_hat``; ``p(mu_hat)`` is that unit's receptive-field centre on the image::

    d_I(p_k, mu_hat) = ||p_k - p(mu_hat)|| / sqrt(w^2 + h^2)        (image diagonal)
    D_fk = std_I d_I        over the top-100 images (highest x_mu_hat) annotated with landmark k
    score = mean_f mean_k D_fk

Choices that the paper leaves open, fixed here:

- ``std`` is the *population* standard deviation (``ddof = 0``, ``numpy.std``'s default), the
  paper's ``sqrt(var_I)``.
- Top-k ties (equal scores, e.g. silent maps scoring 0): the earlier image in stream order wins,
  so the selection - and every number - is the same whatever the batching.
- A ``(filter, class, landmark)`` with fewer than 2 usable images has no spread: ``D = NaN``, left
  out of the means (``nanmean``); ``counts`` says how many images each ``D`` used.
- Multi-category (paper §5.2.2, last paragraph): ``D`` is accumulated per (filter, class, landmark)
  on images of that class; ``Part_c`` = the landmarks annotated on at least one image of class
  ``c`` (or ``parts_of_class``); the layer score is ``mean_f min_c mean_{k in Part_c} D_fkc`` for
  ordinary nets, or ``mean_f mean_{k in Part_{c_f}} D_fkc_f`` given each filter's category ``c_f``.
  A class without landmarks (e.g. the negatives of a single-category set) drops out of the min.
- A silent map (all zeros) has its argmax at unit (0, 0): such a filter looks like a fixed-unit
  filter. ``silent_fraction`` reports how often each filter's maximum was ``<= 0``;
  ``silent_in_top`` how many of the images behind ``score`` were silent, and ``score_firing`` is
  the same statistic with those images left out (the top-``top_k`` kept per (filter, class,
  landmark) minus its silent ones). The two agree when no kept image is silent; where they part,
  silent maps pinned to unit (0, 0) are moving the figure.

Reference points (SPEC §5): ``instability_references`` gives the same statistic for a filter firing
at a uniformly random unit (seeded Monte-Carlo) and for the best fixed unit of the map, and, as a
floor, for a filter that fires at the unit of one landmark on every image (an exact part detector).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .quantile import MetricError

__all__ = [
    "InstabilityReferences",
    "InstabilityResult",
    "LocationInstability",
    "argmax_units",
    "as_unit_centers",
    "instability_references",
    "landmark_distances",
]


def as_unit_centers(centers, h: int, w: int) -> torch.Tensor:
    """Receptive-field centres ``(h, w, 2)`` as ``(x, y)`` in image pixels, float64.

    ``centers`` is either that tensor already, or a geometry object (duck-typed like
    ``receptive_field.Geometry``): with a ``unit_centers(h, w)`` method, or with ``stride=(sy, sx)``
    and ``offset=(oy, ox)``; unit ``(i, j)`` is centred at
    ``(offset_x + stride_x * j + 0.5, offset_y + stride_y * i + 0.5)`` (docs/DESIGN.md).
    """
    if isinstance(centers, torch.Tensor):
        if tuple(centers.shape) != (h, w, 2):
            raise MetricError(
                f"centers must be (h, w, 2) = ({h}, {w}, 2) for these maps, got {tuple(centers.shape)}"
            )
        return centers.to(torch.float64)
    if hasattr(centers, "unit_centers"):
        return as_unit_centers(torch.as_tensor(centers.unit_centers(h, w)), h, w)
    if hasattr(centers, "stride") and hasattr(centers, "offset"):
        (sy, sx), (oy, ox) = centers.stride, centers.offset
        x = ox + sx * torch.arange(w, dtype=torch.float64) + 0.5
        y = oy + sy * torch.arange(h, dtype=torch.float64) + 0.5
        return torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)
    raise MetricError(
        f"centers must be a (h, w, 2) tensor or a geometry with stride/offset, got {type(centers).__name__}"
    )


def argmax_units(maps: torch.Tensor, centers) -> tuple[torch.Tensor, torch.Tensor]:
    """Inferred part of every map: ``maps (B, C, h, w) -> scores (B, C), unit_xy (B, C, 2)``.

    ``scores`` = ``x_mu_hat`` (the map's maximum), ``unit_xy`` = the RF centre ``(x, y)`` of the
    argmax unit (float64). Ties: the first unit in row-major order (``torch.argmax``).
    """
    if maps.dim() != 4:
        raise MetricError(f"maps must be (B, C, h, w), got shape {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    ctr = as_unit_centers(centers, h, w).to(maps.device).reshape(h * w, 2)
    scores, flat = maps.detach().reshape(b, c, h * w).max(dim=-1)  # (B, C), first max on ties
    return scores, ctr[flat]  # (B, C), (B, C, 2)


def class_indices(values, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    """``values`` as ``(n,)`` int64 class indices in ``[0, num_classes)`` on the CPU (``None``: all 0);
    a MetricError naming ``name`` otherwise (``"labels"``, one per image; ``"categories"``, one per filter)."""
    values = torch.zeros(n, dtype=torch.long) if values is None else torch.as_tensor(values).long().cpu()
    if tuple(values.shape) != (n,) or bool(((values < 0) | (values >= num_classes)).any()):
        raise MetricError(f"{name} must be ({'B' if name == 'labels' else n},) class indices in [0, {num_classes})")
    return values


def _image_hw(image_hw, b: int) -> torch.Tensor:
    """``image_hw`` as ``(B, 2)`` float64 (H, W): from ``(H, W)`` or per image ``(B, 2)``."""
    hw = torch.as_tensor(image_hw, dtype=torch.float64)
    if hw.shape == (2,):
        hw = hw.expand(b, 2)
    if hw.shape != (b, 2) or not bool((hw > 0).all()):
        raise MetricError(f"image_hw must be (H, W) or (B, 2) positive sizes, got {tuple(hw.shape)}")
    return hw


def landmark_distances(unit_xy: torch.Tensor, landmarks: torch.Tensor, image_hw) -> torch.Tensor:
    """``d_I = ||p_k - p(mu_hat)|| / sqrt(w^2 + h^2)``: ``(B, C, 2), (B, K, 2) -> (B, C, K)`` float64.

    NaN where the landmark is absent.
    """
    diag = _image_hw(image_hw, landmarks.shape[0]).pow(2).sum(-1).sqrt()  # (B,)
    diff = landmarks.to(torch.float64)[:, None, :, :] - unit_xy.to(torch.float64)[:, :, None, :]
    return diff.pow(2).sum(-1).sqrt() / diag[:, None, None]  # (B, C, K)


def _population_std(d: torch.Tensor, valid: torch.Tensor, min_count: int = 2) -> tuple:
    """Masked population std along the last dim (two-pass); NaN where fewer than ``min_count``."""
    n = valid.sum(-1)
    dz = torch.where(valid, d, torch.zeros((), dtype=d.dtype))
    mean = dz.sum(-1) / n.clamp_min(1)
    dev = torch.where(valid, d - mean[..., None], torch.zeros((), dtype=d.dtype))
    std = (dev.pow(2).sum(-1) / n.clamp_min(1)).sqrt()
    return torch.where(n >= min_count, std, torch.full_like(std, float("nan"))), n


def _mean_finite(x: torch.Tensor) -> float:
    """Mean of the non-NaN entries; NaN when there are none."""
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


def _nanmin(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min over ``dim`` ignoring NaN (first index on ties); NaN / index 0 where all NaN."""
    filled = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)
    val, idx = filled.min(dim=dim)
    allnan = torch.isnan(x).all(dim=dim)
    return torch.where(allnan, torch.full_like(val, float("nan")), val), idx


def _class_scores(
    d_ck: torch.Tensor, parts: torch.Tensor, categories: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``d_ck (F, NC, K)`` -> ``mean_{k in Part_c}`` per class ``(F, NC)``, per filter ``(F,)``
    (min over classes, or at ``categories``) and the class used ``(F,)``."""
    inpart = parts[None] & ~torch.isnan(d_ck)  # (F, NC, K)
    per_class = torch.where(inpart, d_ck, torch.zeros((), dtype=d_ck.dtype)).sum(-1) / inpart.sum(-1)
    if categories is None:
        per_filter, cat = _nanmin(per_class, dim=1)
    else:
        cat = categories.to(torch.long)
        per_filter = per_class.gather(1, cat[:, None])[:, 0]
    return per_class, per_filter, cat


@dataclass
class InstabilityResult:
    """What ``LocationInstability.compute()`` returns (C filters, NC classes, K landmarks)."""

    score: float  # mean_f [min_c] mean_k D_fk (NaN-filters left out)
    per_filter: torch.Tensor  # (C,) at each filter's category
    per_filter_landmark: torch.Tensor  # (C, K) D_fk at each filter's category
    per_filter_class: torch.Tensor  # (C, NC) mean_{k in Part_c} D_fkc
    per_filter_class_landmark: torch.Tensor  # (C, NC, K) D_fkc
    category: torch.Tensor  # (C,) the class used for each filter
    counts: torch.Tensor  # (C, NC, K) images behind each D (<= top_k)
    annotated: torch.Tensor  # (NC, K) images of class c annotated with landmark k
    silent_fraction: torch.Tensor  # (C,) fraction of images whose map maximum was <= 0
    landmark_names: list[str] = field(default_factory=list)
    silent_in_top: float = 0.0  # share of the kept images behind ``score`` whose maximum was <= 0
    score_firing: float = float("nan")  # ``score`` with those silent images left out

    def summary(self) -> dict:
        return {
            "location_instability": self.score,
            "location_instability_firing": self.score_firing,
            "silent_fraction": float(self.silent_fraction.mean()),
            "silent_in_top": self.silent_in_top,
            "filters_evaluated": int((~torch.isnan(self.per_filter)).sum()),
        }


class LocationInstability:
    """Streaming location instability of one layer (paper §5.2.2; see the module doc).

    Keeps, per (filter, class, landmark), the running top-``top_k`` images by score with their
    distances - exact: the kept set is the first ``top_k`` of the whole stream sorted by
    (score descending, stream position ascending), whatever the batching.

    Args:
        num_filters: C.
        landmarks: K, or the K landmark names.
        num_classes: NC (1: labels may be omitted).
        top_k: images per (filter, class, landmark) (paper: 100).
        parts_of_class: optional ``(NC, K)`` bool, ``Part_c``; default: landmarks annotated on
            at least one image of the class.

    ``update(scores (B, C), unit_xy (B, C, 2), landmarks (B, K, 2), labels (B,), image_hw)``
    (``image_hw`` = ``(H, W)`` or ``(B, 2)``; landmarks NaN where absent), or
    ``update_maps(maps (B, C, h, w), centers, landmarks, labels, image_hw)``.
    """

    def __init__(
        self,
        num_filters: int,
        landmarks: int | Sequence[str],
        num_classes: int = 1,
        top_k: int = 100,
        parts_of_class: torch.Tensor | None = None,
    ):
        names = [f"landmark{k}" for k in range(landmarks)] if isinstance(landmarks, int) else list(landmarks)
        if num_filters <= 0 or not names or num_classes <= 0 or top_k <= 0:
            raise MetricError(
                f"LocationInstability needs positive num_filters, landmarks, num_classes, top_k; got "
                f"{num_filters}, {len(names)}, {num_classes}, {top_k}"
            )
        self.num_filters, self.num_classes, self.top_k = int(num_filters), int(num_classes), int(top_k)
        self.landmark_names = names
        k = len(names)
        if parts_of_class is not None and tuple(parts_of_class.shape) != (num_classes, k):
            raise MetricError(f"parts_of_class must be (num_classes, K) = ({num_classes}, {k})")
        self.parts_of_class = parts_of_class
        shape = (self.num_filters, self.num_classes, k, 0)
        self._score = torch.empty(shape, dtype=torch.float64)  # kept, sorted descending
        self._dist = torch.empty(shape, dtype=torch.float64)
        self._index = torch.empty(shape, dtype=torch.long)  # stream position of each kept image
        self.annotated = torch.zeros(self.num_classes, k, dtype=torch.long)
        self.silent = torch.zeros(self.num_filters, dtype=torch.long)
        self.seen = 0
        self._kept_landmarks: list[torch.Tensor] = []  # for the reference points
        self._kept_labels: list[torch.Tensor] = []
        self._kept_hw: list[torch.Tensor] = []

    @property
    def num_landmarks(self) -> int:
        return len(self.landmark_names)

    def update_maps(self, maps, centers, landmarks, labels=None, image_hw=None) -> None:
        scores, unit_xy = argmax_units(maps, centers)
        self.update(scores, unit_xy, landmarks, labels, image_hw)

    def update(self, scores, unit_xy, landmarks, labels=None, image_hw=None) -> torch.Tensor:
        """Adds a batch; returns its ``landmark_distances`` ``(B, C, K)`` for other metrics of it."""
        b, c, k, nc = scores.shape[0], self.num_filters, self.num_landmarks, self.num_classes
        if tuple(scores.shape) != (b, c):
            raise MetricError(f"scores must be (B, {c}), got {tuple(scores.shape)}")
        if tuple(unit_xy.shape) != (b, c, 2):
            raise MetricError(f"unit_xy must be (B, {c}, 2) = ({b}, {c}, 2), got {tuple(unit_xy.shape)}")
        if tuple(landmarks.shape) != (b, k, 2):
            raise MetricError(f"landmarks must be (B, K, 2) = ({b}, {k}, 2), got {tuple(landmarks.shape)}")
        if image_hw is None:
            raise MetricError("image_hw is required: (H, W) of the input images, or (B, 2)")
        if not bool(torch.isfinite(scores).all()):
            raise MetricError("scores must be finite")
        labels = class_indices(labels, b, nc)
        hw = _image_hw(image_hw, b)
        scores, unit_xy, landmarks = scores.detach().cpu(), unit_xy.detach().cpu(), landmarks.detach().cpu()

        present = ~torch.isnan(landmarks).any(-1)  # (B, K)
        onehot = torch.nn.functional.one_hot(labels, nc).bool()  # (B, NC)
        valid = onehot[:, :, None] & present[:, None, :]  # (B, NC, K)
        self.annotated += valid.sum(0)
        self.silent += (scores <= 0).sum(0)
        self._kept_landmarks.append(landmarks.to(torch.float64))
        self._kept_labels.append(labels)
        self._kept_hw.append(hw)

        dist = landmark_distances(unit_xy, landmarks, hw)  # (B, C, K)
        # candidates (C, NC, K, B): invalid ones score -inf and sort after every valid one
        valid_b = valid.permute(1, 2, 0)[None].expand(c, nc, k, b)
        neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
        cand_score = torch.where(valid_b, scores.to(torch.float64).t()[:, None, None, :], neg_inf)
        cand_dist = dist.permute(1, 2, 0)[:, None].expand(c, nc, k, b)
        cand_index = (self.seen + torch.arange(b)).expand(c, nc, k, b)
        self.seen += b

        # kept entries precede the batch and are already in (score desc, index asc) order, the batch
        # is in index order, so a *stable* descending sort breaks ties by stream position.
        all_score = torch.cat((self._score, cand_score), dim=-1)
        order = torch.sort(all_score, dim=-1, descending=True, stable=True).indices[..., : self.top_k]
        self._score = all_score.gather(-1, order)
        self._dist = torch.cat((self._dist, cand_dist), dim=-1).gather(-1, order)
        self._index = torch.cat((self._index, cand_index), dim=-1).gather(-1, order)
        return dist

    def compute(self, categories: torch.Tensor | None = None) -> InstabilityResult:
        """The layer's instability; ``categories (C,)`` = each filter's class (interpretable nets)."""
        if self.seen == 0:
            raise MetricError("LocationInstability.compute() called before any update()")
        valid = torch.isfinite(self._score)  # (C, NC, K, <=top_k)
        d_ck, n = _population_std(self._dist, valid)  # (C, NC, K)
        parts = self.parts_of_class if self.parts_of_class is not None else self.annotated > 0
        if categories is not None:
            categories = class_indices(categories, self.num_filters, self.num_classes, "categories")
        per_class, per_filter, cat = _class_scores(d_ck, parts.bool(), categories)
        per_fk = d_ck.gather(1, cat[:, None, None].expand(-1, 1, self.num_landmarks))[:, 0]
        score = _mean_finite(per_filter)
        # the same with silent kept images left out, and how many there were behind ``score``
        firing = valid & (self._score > 0)
        d_firing, _ = _population_std(self._dist, firing)
        _, per_filter_firing, _ = _class_scores(d_firing, parts.bool(), categories)
        pick = cat[:, None, None, None].expand(-1, 1, *valid.shape[2:])  # each filter's class
        used = valid.gather(1, pick)[:, 0] & parts.bool()[cat][:, :, None]  # (C, K, kept)
        used &= ~torch.isnan(per_fk)[:, :, None]  # the (filter, landmark)s that enter ``score``
        silent_used = used & (self._score.gather(1, pick)[:, 0] <= 0)
        silent_in_top = float(silent_used.sum().double() / used.sum()) if bool(used.any()) else 0.0
        return InstabilityResult(
            score=score,
            per_filter=per_filter,
            per_filter_landmark=per_fk,
            per_filter_class=per_class,
            per_filter_class_landmark=d_ck,
            category=cat,
            counts=n,
            annotated=self.annotated.clone(),
            silent_fraction=self.silent.double() / self.seen,
            landmark_names=list(self.landmark_names),
            silent_in_top=silent_in_top,
            score_firing=_mean_finite(per_filter_firing),
        )

    def top_images(self) -> torch.Tensor:
        """Stream positions of the kept images ``(C, NC, K, top_k)``, -1 where fewer were available."""
        idx = torch.where(torch.isfinite(self._score), self._index, torch.full_like(self._index, -1))
        pad = self.top_k - idx.shape[-1]
        return torch.nn.functional.pad(idx, (0, pad), value=-1) if pad > 0 else idx

    def references(self, centers, map_hw=None, **kwargs) -> "InstabilityReferences":
        """``instability_references`` on the images seen so far (same landmarks, labels, sizes)."""
        if self.seen == 0:
            raise MetricError("LocationInstability.references() called before any update()")
        kwargs.setdefault("top_k", self.top_k)
        kwargs.setdefault("parts_of_class", self.parts_of_class)
        return instability_references(
            torch.cat(self._kept_landmarks), torch.cat(self._kept_labels), torch.cat(self._kept_hw),
            centers, map_hw=map_hw, num_classes=self.num_classes, **kwargs,
        )


REFERENCE_NAMES = {"random_unit": "random unit", "best_fixed_unit": "best fixed unit", "best_landmark_unit": "best landmark unit"}


def references_text(refs: dict, digits: int = 4) -> str:
    """``random unit .., best fixed unit .., best landmark unit ..`` for those of the references in
    ``refs`` (an ``InstabilityReferences.summary()``, or any dict with its keys)."""
    return ", ".join(f"{name} {refs[key]:.{digits}f}" for key, name in REFERENCE_NAMES.items() if key in refs)


@dataclass
class InstabilityReferences:
    """Reference points for an instability figure (SPEC §5): random unit and best fixed unit, and
    the floor of a filter that follows a landmark exactly (``landmark_unit``)."""

    random: float  # mean over draws of [min_c] mean_k D for a filter firing at a random unit
    random_std: float  # spread of that statistic over the draws
    random_per_class: torch.Tensor  # (NC,) mean over draws of mean_{k in Part_c} D
    fixed: float  # best (lowest) over units of [min_c] mean_k D of an always-that-unit filter
    fixed_unit: tuple[int, int]  # (i, j) of the best fixed unit
    fixed_per_unit: torch.Tensor  # (h, w) [min_c] mean_k D of each fixed unit
    fixed_per_class: torch.Tensor  # (NC,) best fixed unit's value per class
    random_per_landmark: torch.Tensor | None = None  # (K,) mean over draws of [min_c] D_k
    fixed_per_landmark: torch.Tensor | None = None  # (K,) the best fixed unit of each landmark alone
    draws: int = 0
    seed: int = 0
    landmark_unit: torch.Tensor | None = None  # (K,) [min_c] mean_k D of the detector of each landmark

    @property
    def best_landmark_unit(self) -> float:
        """The lowest figure of a filter that follows one landmark exactly (NaN: none annotated)."""
        v = self.landmark_unit[~torch.isnan(self.landmark_unit)]
        return float(v.min()) if len(v) else float("nan")

    @property
    def mean_landmark_unit(self) -> float:
        """The figure of a layer of exact landmark detectors, as many on each landmark."""
        return float(torch.nanmean(self.landmark_unit))

    def summary(self) -> dict:
        out = {"random_unit": self.random, "random_unit_std": self.random_std, "best_fixed_unit": self.fixed}
        if self.landmark_unit is not None:
            out |= {"best_landmark_unit": self.best_landmark_unit, "mean_landmark_unit": self.mean_landmark_unit}
        return out

    def per_landmark(self) -> dict:
        """``{"random_unit": [K], "best_fixed_unit": [K]}``: each landmark's own references (the
        figure "head 0.039" reads against the head's fixed unit, not the mean over landmarks)."""
        return {"random_unit": self.random_per_landmark.tolist(), "best_fixed_unit": self.fixed_per_landmark.tolist()}


def instability_references(
    landmarks: torch.Tensor,
    labels: torch.Tensor | None,
    image_hw,
    centers,
    *,
    map_hw: tuple[int, int] | None = None,
    num_classes: int = 1,
    top_k: int = 100,
    draws: int = 20,
    seed: int = 0,
    parts_of_class: torch.Tensor | None = None,
    fixed_top_k: int | None = None,
    categories: torch.Tensor | None = None,
    chunk_elements: int = 8_000_000,
) -> InstabilityReferences:
    """Location instability of two image-blind filters, and of exact landmark detectors, on the
    same images (SPEC §5).

    - **random unit**: on every image the filter fires at a uniformly random unit with a random
      score, so its top-``top_k`` images per (class, landmark) are a uniformly random subset of the
      annotated ones. Estimated by Monte-Carlo over ``draws`` such filters (a ``torch.Generator``
      seeded with ``seed``: deterministic); the value is what ``LocationInstability`` would report for
      a layer made of them: ``mean_draws [min_c] mean_{k in Part_c} D``.
    - **landmark unit**: the detector of landmark ``j`` fires, on every image showing ``j``, at the
      unit nearest to ``j``, with a constant score (all those images, or the first
      ``fixed_top_k``). It is a perfect part detector on this grid: its ``D_jj`` is the rounding to
      units alone, its ``D_jk`` how far landmark ``k`` moves about ``j``. ``landmark_unit (K,)``
      holds each detector's figure, ``best_landmark_unit`` the lowest. A filter goes below it only
      by following a point steadier than any landmark (one between them) or by the images it
      picks (its top ``top_k``).
    - **best fixed unit**: a filter that always fires at unit ``u`` with a constant score. Its
      scores all tie, so "top-100" is not defined by the scores; we use **all** annotated images
      of the class (``fixed_top_k=None``, the filter's spread on the whole set - independent of
      dataset order), or the first ``fixed_top_k`` in dataset order (what the stream tie rule would
      pick). Reported: the lowest value over all units of the map.

    With ``categories (F,)`` (interpretable nets) both use each filter's class instead of the
    min over classes, averaged over filters (the fixed unit is then chosen per class).

    Args:
        landmarks: ``(N, K, 2)`` ``(x, y)``, NaN where absent.
        labels: ``(N,)`` class indices (None: one class).
        image_hw: ``(H, W)`` or ``(N, 2)``.
        centers: ``(h, w, 2)`` RF centres, or a geometry (then ``map_hw`` is required).
    """
    landmarks = landmarks.to(torch.float64).cpu()
    n, k = landmarks.shape[:2]
    labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().cpu()
    if isinstance(centers, torch.Tensor):
        h, w = centers.shape[:2]
    elif map_hw is not None:
        h, w = map_hw
    else:
        raise MetricError("map_hw=(h, w) is required when centers is a geometry")
    ctr = as_unit_centers(centers, h, w).reshape(h * w, 2)  # (U, 2)
    diag = _image_hw(image_hw, n).pow(2).sum(-1).sqrt()  # (N,)
    present = ~torch.isnan(landmarks).any(-1)  # (N, K)
    onehot = torch.nn.functional.one_hot(labels, num_classes).bool()  # (N, NC)
    valid = onehot[:, :, None] & present[:, None, :]  # (N, NC, K)
    parts = (parts_of_class if parts_of_class is not None else valid.any(0)).bool()  # (NC, K)
    if categories is not None:
        categories = torch.as_tensor(categories).long().cpu()

    def dist_to(units: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``units (..., n)`` for images ``rows (n,)`` -> distances ``(..., n, K)`` (NaN: absent)."""
        diff = landmarks[rows] - ctr[units][..., None, :]
        return diff.pow(2).sum(-1).sqrt() / diag[rows, None]

    # --- random unit: every draw gives each image a random unit and a random score
    gen = torch.Generator().manual_seed(int(seed))
    units = torch.randint(h * w, (draws, n), generator=gen)  # (R, N)
    rscore = torch.rand(draws, n, generator=gen, dtype=torch.float64)  # (R, N)
    d_rck = torch.full((draws, num_classes, k), float("nan"), dtype=torch.float64)
    for c in range(num_classes):  # classes, not images: each image belongs to one class
        rows = (labels == c).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        ok = present[rows].t()[None]  # (1, K, n_c)
        s = torch.where(ok, rscore[:, None, rows], torch.tensor(float("-inf"), dtype=torch.float64))
        top = s.topk(min(top_k, len(rows)), dim=-1)  # (R, K, m): a uniformly random subset
        d = dist_to(units[:, rows], rows).permute(0, 2, 1)  # (R, K, n_c)
        d_rck[:, c], _ = _population_std(d.gather(-1, top.indices), torch.isfinite(top.values))
    rand_class, rand_min, _ = _class_scores(d_rck, parts, None)  # (R, NC), (R,)
    per_k = lambda d: _nanmin(torch.where(parts, d, torch.full_like(d, float("nan"))), dim=-2)[0]  # noqa: E731  (..., NC, K) -> (..., K)
    random_per_landmark = torch.nanmean(per_k(d_rck), dim=0)  # (K,)
    random_per_class = torch.nanmean(rand_class, dim=0)  # (NC,)
    random_vals = rand_min if categories is None else rand_class[:, categories].nanmean(dim=1)  # (R,)
    random = float(torch.nanmean(random_vals))
    finite = random_vals[~torch.isnan(random_vals)]
    random_std = float(finite.std(unbiased=False)) if len(finite) > 1 else 0.0

    # --- fixed units: weights (N, NC, K) select the images each statistic uses
    def constant_score_images(usable: torch.Tensor) -> torch.Tensor:
        """The images ``(N, NC, K)`` a constant-score filter's D uses: every usable one, or the
        first ``fixed_top_k`` in dataset order (what the stream's tie rule would keep)."""
        return usable if fixed_top_k is None else usable & (usable.long().cumsum(0) <= fixed_top_k)

    wts = constant_score_images(valid)
    all_rows = torch.arange(n)

    def spread(d: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Distances ``d (X, N, K)`` of X constant-score filters -> their D ``(X, NC, K)``: the
        population std over the images ``weights (N, NC, K)`` selects, NaN under 2 images."""
        wf = weights.to(torch.float64)
        cnt = wf.sum(0)  # (NC, K)
        d = torch.nan_to_num(d, nan=0.0)
        mean = torch.einsum("unk,nck->uck", d, wf) / cnt.clamp_min(1)  # (X, NC, K)
        dev = d - mean[:, labels, :]  # each image against its own class's mean
        var = torch.einsum("unk,nck->uck", dev.pow(2), wf) / cnt.clamp_min(1)
        return torch.where(cnt >= 2, var.sqrt(), torch.full_like(var, float("nan")))

    step = max(1, chunk_elements // max(1, n * k))
    chunks = []
    for start in range(0, h * w, step):  # chunks of units bound the memory; vectorised inside
        u = torch.arange(start, min(start + step, h * w))
        chunks.append(spread(dist_to(u[:, None].expand(-1, n), all_rows), wts))
    d_uck = torch.cat(chunks)  # (U, NC, K)
    fixed_class, fixed_min, _ = _class_scores(d_uck, parts, None)  # (U, NC), (U,)
    fixed_per_landmark = _nanmin(per_k(d_uck), dim=0)[0]  # (K,)
    fixed_per_class, best_per_class = _nanmin(fixed_class, dim=0)  # (NC,) best unit of each class
    if categories is None:
        fixed, best = _nanmin(fixed_min, dim=0)
    else:  # each filter's class, its best unit; the reported unit is that of the commonest class
        fixed = torch.nanmean(fixed_per_class[categories])
        best = best_per_class[torch.bincount(categories, minlength=num_classes).argmax()]
    fixed, best = float(fixed), int(best)

    # --- landmark units: the detector of landmark j fires, on every image showing j, at the unit
    # nearest to j (a constant score: all those images, as the fixed unit's), so its D_jj is the
    # grid's rounding alone and its D_jk (k != j) how far k moves about j: the floor of a filter
    # that follows landmark j exactly
    lm_units = torch.zeros(n, k, dtype=torch.long)
    filled = torch.nan_to_num(landmarks, nan=0.0)
    rows_step = max(1, chunk_elements // max(1, k * h * w))
    for start in range(0, n, rows_step):  # chunks of images bound the memory
        sl = slice(start, start + rows_step)
        lm_units[sl] = (filled[sl, :, None, :] - ctr[None, None]).pow(2).sum(-1).argmin(-1)  # (n', K)
    at_unit = ctr[lm_units]  # (N, J=K, 2)
    d_jnk = (landmarks[:, None] - at_unit[:, :, None]).pow(2).sum(-1).sqrt() / diag[:, None, None]  # (N, J, K)
    d_jnk = d_jnk.permute(1, 0, 2)  # (J, N, K)
    d_jck = torch.cat([spread(d_jnk[j : j + 1], constant_score_images(valid & present[:, j, None, None]))
                       for j in range(k)])  # (J, NC, K): the images showing j; J is small  # fmt: skip
    det_class, det_min, _ = _class_scores(d_jck, parts, None)  # (J, NC), (J,)
    landmark_unit = det_min if categories is None else det_class[:, categories].nanmean(dim=1)  # (J,)
    return InstabilityReferences(
        random=random,
        random_std=random_std,
        random_per_class=random_per_class,
        fixed=fixed,
        fixed_unit=(best // w, best % w),
        fixed_per_unit=fixed_min.reshape(h, w),
        fixed_per_class=fixed_per_class,
        random_per_landmark=random_per_landmark,
        fixed_per_landmark=fixed_per_landmark,
        draws=draws,
        seed=int(seed),
        landmark_unit=landmark_unit,
    )
