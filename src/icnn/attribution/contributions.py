"""Which object parts a prediction used: filters assigned to parts, and each part's share of the
class score (explainer paper 003, Fig. 5: "58 head filters contributing 12.8%").

Two steps, both streaming and vectorised over filters and images:

1. :func:`assign_filter_parts` gives each filter of an interpretable layer the annotated part
   (landmark) it most often localises. On image ``I`` filter ``f`` localises the landmark ``k``
   nearest to the receptive-field centre of its argmax unit ``mu_hat`` (the inferred part of
   location instability, paper 001 §5.2.2). Only images of the filter's category with at least
   one annotated landmark vote, and only where the filter fires (``x_mu_hat > 0``); optionally
   only its ``top_n`` highest-scoring such images. The majority vote gives the part; a filter
   without any vote (silent on its category) gets ``-1`` ("none").
2. :func:`part_contributions` splits the score ``y`` of the target class into filter
   contributions by gradient x activation (first-order Taylor expansion at the layer's map ``x``)::

       c_f = sum_ij x_fij * dy/dx_fij

   For a head that is linear in the pooled map (GAP + fc, ``y = sum_f w_f mean_ij x_fij + b``)
   this is exact: ``c_f = w_f mean_ij x_fij`` and ``sum_f c_f = y - b``. Otherwise (fc heads with
   ReLUs, the ``"top"`` layer below ``"new"``) it is the local linear approximation. A part's
   contribution is the sum over its filters, ``C_k = sum_{f in k} c_f``; the filters without a
   part form the extra column ``"none"``. Its share of the score is, per image,

       share="abs" (default):    s_k = C_k / sum_f |c_f|            (signed; sum_k |s_k| <= 1)
       share="positive":         s_k = sum_{f in k} max(c_f, 0) / sum_f max(c_f, 0)

   With ``"abs"`` a part that speaks against the class gets a negative share, and the shares add
   up to ``(P - N) / (P + N)`` (``P``, ``N``: total positive and negative contribution), i.e. to
   1 exactly when no filter speaks against the class. With ``"positive"`` the shares lie in
   ``[0, 1]`` and add up to 1 (0 when nothing contributes positively), as in Fig. 5. An image
   whose filters contribute nothing gets shares 0. Over a dataset the share is the mean over
   images of the per-image shares (each image counts once).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..categories import assign_categories
from ..data.base import as_batches
from ..models.net import batch_features
from .base import AttributionError, Target, analysis_mode, resolve_target, select_output, unwrap_model

SHARES = ("abs", "positive")


class ContributionError(AttributionError):
    """Bad input to part assignment / contributions; one line naming the argument."""


# ----------------------------------------------------------------------------------------------
# helpers


def _check_net(model: nn.Module, layer: str) -> nn.Module:
    model = unwrap_model(model)
    names = getattr(model, "layer_names", None)
    if names is None or not hasattr(model, "forward_features"):
        raise ContributionError(f"model: expected an icnn InterpretableNet, got {type(model).__name__}")
    if layer not in names:
        raise ContributionError(f"layer: {layer!r} is not one of the network's layers {', '.join(names)}")
    return model


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dataset_attr(data, name: str):
    """``name`` of the dataset behind a loader / Subset / wrapper (``None`` if nowhere)."""
    obj = data
    for _ in range(8):
        if obj is None:
            return None
        if hasattr(obj, name):
            return getattr(obj, name)
        obj = getattr(obj, "dataset", None)
    return None


# ----------------------------------------------------------------------------------------------
# 1. filters -> parts


@dataclass
class FilterParts:
    """Each filter's part: the result of :func:`assign_filter_parts`.

    ``part_of_filter (C,)`` int64: index into ``part_names``, ``-1`` = none (silent filter);
    ``votes (C, K)`` int64: images on which the filter localised each part (its category only);
    ``category (C,)`` int64: the class whose images voted (``-1``: none with landmarks).
    """

    part_of_filter: torch.Tensor  # (C,)
    part_names: list[str]  # K landmark names
    votes: torch.Tensor  # (C, K)
    category: torch.Tensor  # (C,)
    layer: str = "new"

    @property
    def num_filters(self) -> int:
        return len(self.part_of_filter)

    @property
    def column_names(self) -> list[str]:
        """The K parts then ``"none"``: the columns of :class:`PartContributions`."""
        return [*self.part_names, "none"]

    def counts(self) -> torch.Tensor:
        """Filters per part ``(K + 1,)``, the last entry counting the filters without a part."""
        k = len(self.part_names)
        col = torch.where(self.part_of_filter < 0, k, self.part_of_filter)
        return torch.bincount(col.cpu(), minlength=k + 1)

    def filters_of(self, part: str | int) -> torch.Tensor:
        """Indices of the filters assigned to ``part`` (a name, ``"none"`` or an index)."""
        if isinstance(part, str):
            if part == "none":
                part = -1
            elif part in self.part_names:
                part = self.part_names.index(part)
            else:
                raise ContributionError(f"part: {part!r} is not one of {', '.join(self.column_names)}")
        return torch.nonzero(self.part_of_filter == part).flatten()

    def summary(self) -> list[str]:
        """One line per part: ``"58 head filters"`` ... ``"44 filters without a part"``."""
        counts = self.counts().tolist()
        lines = [f"{n} {name} filter{'s' * (n != 1)}" for name, n in zip(self.part_names, counts)]
        lines.append(f"{counts[-1]} filter{'s' * (counts[-1] != 1)} without a part")
        return lines


def assign_filter_parts(
    model: nn.Module,
    data: DataLoader | Dataset | Iterable[dict],
    layer: str = "new",
    *,
    top_n: int | None = None,
    categories: torch.Tensor | Sequence[int] | None = None,
    part_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    batch_size: int = 32,
) -> FilterParts:
    """Assign each filter of ``layer`` to the landmark it most often localises (majority vote).

    For every image, filter ``f``'s inferred part is the argmax unit of its masked map, placed on
    the image at its receptive-field centre (``metrics.receptive_field``); it votes for the
    nearest annotated landmark. Votes count only on images of the filter's category that have at
    least one landmark, where the filter fires (max > 0); with ``top_n``, only on its ``top_n``
    highest-scoring such images (ties: earlier images first). Ties between parts go to the first
    part in ``part_names``. A filter with no vote gets part ``-1``.

    Args:
        model: an ``InterpretableNet`` (DataParallel/DDP unwrapped), used in eval mode.
        data: a Dataset or an iterable of batches of DESIGN sample dicts (``image``, ``label``,
            ``landmarks``), e.g. a ``DataLoader``.
        layer: ``"new"`` or ``"top"``.
        top_n: only each filter's ``top_n`` highest-scoring images vote (``None``: all).
        categories: each filter's category ``(C,)``; default ``c_f = argmax_c mean_{I in I_c}
            sum_ij x_fij`` over the data (paper 001 §3.1), among classes with landmarks (so the
            negatives of a single-category set never count).
        part_names: landmark names (default: the dataset's ``landmark_names``).
        num_classes: number of labels (default: ``len(dataset.classes)``).
        batch_size: when ``data`` is a Dataset.
    """
    from icnn.metrics.instability import argmax_units
    from icnn.metrics.receptive_field import layer_geometry

    model = _check_net(model, layer)
    if top_n is not None and (isinstance(top_n, bool) or int(top_n) < 1):
        raise ContributionError(f"top_n: expected a positive integer or None, got {top_n!r}")
    part_names = list(part_names) if part_names is not None else _dataset_attr(data, "landmark_names")
    if not part_names:
        raise ContributionError("data: the dataset has no landmark names (pass part_names=)")
    if num_classes is None:
        classes = _dataset_attr(data, "classes")
        if classes is None:
            raise ContributionError("data: cannot tell the number of classes (pass num_classes=)")
        num_classes = len(classes)
    geom = layer_geometry(model, layer)
    device = _device(model)
    k_parts, n_cls = len(part_names), int(num_classes)

    votes = best_score = best_part = None  # allocated at the first batch, when C is known
    class_sum = class_count = has_landmarks = None
    with analysis_mode(model), torch.no_grad():
        for batch in as_batches(data, batch_size):
            labels = torch.as_tensor(batch["label"]).long().to(device).flatten()  # (B,)
            landmarks = torch.as_tensor(batch["landmarks"]).to(device, torch.float64)  # (B, K, 2)
            if landmarks.shape[1:] != (k_parts, 2):
                raise ContributionError(
                    f"data: landmarks of shape {tuple(landmarks.shape)}, expected (B, {k_parts}, 2) for parts {part_names}"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
                raise ContributionError(f"data: label {int(labels.max())} out of range for {n_cls} classes")
            maps = batch_features(model, batch, device).masked[layer].float()  # (B, C, h, w)
            b, c = maps.shape[:2]
            if votes is None:
                votes = torch.zeros(c, n_cls, k_parts, dtype=torch.long, device=device)
                class_sum = torch.zeros(n_cls, c, dtype=torch.float64, device=device)
                class_count = torch.zeros(n_cls, dtype=torch.float64, device=device)
                has_landmarks = torch.zeros(n_cls, dtype=torch.bool, device=device)
                if top_n is not None:
                    best_score = torch.full((c, n_cls, top_n), -torch.inf, device=device)
                    best_part = torch.full((c, n_cls, top_n), -1, dtype=torch.long, device=device)
            class_sum.index_add_(0, labels, maps.sum(dim=(2, 3)).double())
            class_count += torch.bincount(labels, minlength=n_cls).double()
            present = ~landmarks.isnan().any(-1)  # (B, K)
            annotated = present.any(-1)  # (B,)
            has_landmarks[labels[annotated]] = True

            scores, unit_xy = argmax_units(maps, geom)  # (B, C), (B, C, 2)
            d2 = (landmarks[:, None] - unit_xy.to(device)[:, :, None]).pow(2).sum(-1)  # (B, C, K)
            nearest = torch.where(present[:, None], d2, torch.inf).argmin(-1)  # (B, C)
            valid = annotated[:, None] & (scores > 0)  # (B, C)

            if top_n is None:
                flat = (torch.arange(c, device=device)[None] * n_cls + labels[:, None]) * k_parts + nearest  # (B, C)
                votes += torch.bincount(flat[valid], minlength=c * n_cls * k_parts).view(c, n_cls, k_parts)
                continue
            # streaming top-n per (filter, class) over the classes present in this batch
            cls = labels.unique()  # (U,)
            of_cls = labels[None] == cls[:, None]  # (U, B)
            s = torch.where(valid, scores.float(), -torch.inf).t()  # (C, B)
            cand_s = torch.where(of_cls[None], s[:, None], -torch.inf)  # (C, U, B)
            cand_p = nearest.t()[:, None].expand(c, len(cls), b)  # (C, U, B)
            all_s = torch.cat((best_score[:, cls], cand_s), -1)  # (C, U, n + B)
            all_p = torch.cat((best_part[:, cls], cand_p), -1)
            order = all_s.sort(dim=-1, descending=True, stable=True).indices[..., :top_n]  # earlier first on ties
            best_score[:, cls] = all_s.gather(-1, order)
            best_part[:, cls] = all_p.gather(-1, order)

    if votes is None:
        raise ContributionError("data: no images")
    if not has_landmarks.any():
        raise ContributionError("data: no image has an annotated landmark; parts cannot be assigned")
    c = votes.shape[0]
    if categories is None:
        category = assign_categories(class_sum, class_count, has_landmarks)  # (C,) icnn.categories
    else:
        category = torch.as_tensor(categories, dtype=torch.long, device=device).flatten()
        if category.shape != (c,) or (category < 0).any() or (category >= n_cls).any():
            raise ContributionError(f"categories: expected {c} class indices in [0, {n_cls}), got shape {tuple(category.shape)}")
    if top_n is None:
        filter_votes = votes[torch.arange(c, device=device), category]  # (C, K)
    else:
        top_part = best_part[torch.arange(c, device=device), category]  # (C, n)
        ok = top_part >= 0
        filter_votes = torch.zeros(c, k_parts + 1, dtype=torch.long, device=device)
        filter_votes.scatter_add_(1, torch.where(ok, top_part, k_parts), ok.long())
        filter_votes = filter_votes[:, :k_parts]
    part = torch.where(filter_votes.sum(1) > 0, filter_votes.argmax(1), -1)  # argmax: first max on ties
    category = torch.where(has_landmarks[category], category, -1)
    return FilterParts(part.cpu(), list(part_names), filter_votes.cpu(), category.cpu(), layer)


# ----------------------------------------------------------------------------------------------
# 2. contributions


def filter_contributions(
    model: nn.Module, images: torch.Tensor, *, layer: str = "new", target: Target = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient x activation of each filter of ``layer`` for the target score.

    Returns ``(contributions (B, C), spatial (B, h, w), score (B,), target (B,))``: ``c_f = sum_ij
    x_fij dy/dx_fij`` on the layer's masked map (what the layers above read), its per-unit sum
    over filters, the target logit ``y`` and the target class (``None``: the predicted class).
    """
    model = _check_net(model, layer)
    if not (torch.is_tensor(images) and images.ndim == 4 and images.is_floating_point()):
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ContributionError(f"images: expected a float tensor (B, 3, H, W), got {got}")
    x = images.detach().to(_device(model)).requires_grad_(True)  # parameters are frozen: the graph starts here
    with analysis_mode(model):
        feats = model.forward_features(x)
        fmap = feats.masked[layer]  # (B, C, h, w)
        logits = select_output(model.forward_head(feats.out))  # (B, K)
        t = resolve_target(logits, target)
        score = logits.gather(1, t[:, None])[:, 0]  # (B,)
        (grad,) = torch.autograd.grad(score.sum(), fmap)  # images are independent in eval mode
    gx = (grad * fmap).detach()  # (B, C, h, w)
    return gx.sum(dim=(2, 3)), gx.sum(dim=1), score.detach(), t


@dataclass
class PartContributions:
    """Contributions of parts to the target class score, per image (module docstring).

    ``columns``: the K part names then ``"none"``; ``filters_per_part (K + 1,)``.
    """

    columns: list[str]
    filters_per_part: torch.Tensor  # (K+1,)
    filter: torch.Tensor  # (B, C) c_f
    per_image: torch.Tensor  # (B, K+1) C_k = sum_{f in k} c_f
    share: torch.Tensor  # (B, K+1) per-image shares (see `mode`)
    score: torch.Tensor  # (B,) target logit y
    target: torch.Tensor  # (B,) target class
    mode: str = "abs"

    @property
    def rest(self) -> torch.Tensor:
        """``y - sum_f c_f`` ``(B,)``: the head's bias for a linear head."""
        return self.score - self.filter.sum(1)

    def mean_share(self) -> torch.Tensor:
        """Each part's share over the images, ``(K + 1,)``: mean of the per-image shares."""
        return self.share.mean(0) if len(self.share) else torch.full((len(self.columns),), float("nan"))

    def summary(self) -> list[str]:
        """``["58 head filters contribute 12.8%", ..., "44 other filters contribute 0.2%"]``."""
        shares = self.mean_share().tolist()
        counts = self.filters_per_part.tolist()
        lines = []
        for i, (name, n, s) in enumerate(zip(self.columns, counts, shares)):
            name = "other" if i == len(self.columns) - 1 else name
            pct = round(100 * s, 1) + 0.0  # + 0.0: no "-0.0%"
            lines.append(f"{n} {name} filter{'s' if n != 1 else ''} contribute{'s' if n == 1 else ''} {pct:.1f}%")
        return lines

    @classmethod
    def concat(cls, parts: Sequence["PartContributions"]) -> "PartContributions":
        """The images of several results (same parts and mode) as one."""
        if not parts:
            raise ContributionError("concat: nothing to concatenate")
        first = parts[0]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return cls(first.columns, first.filters_per_part, cat("filter"), cat("per_image"), cat("share"),
                   cat("score"), cat("target"), first.mode)  # fmt: skip


def _shares(c: torch.Tensor, onehot: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, C) contributions, (C, K+1) filter->column -> (B, K+1)`` shares (module docstring)."""
    if mode == "positive":
        c = c.clamp_min(0)
    total = c.abs().sum(1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, (c @ onehot) / total.clamp_min(torch.finfo(c.dtype).tiny), 0.0)


def part_contributions(
    model: nn.Module,
    images: torch.Tensor,
    filter_parts: FilterParts,
    *,
    layer: str | None = None,
    target: Target = None,
    share: str = "abs",
) -> PartContributions:
    """Each part's contribution to the target class score for ``images (B, 3, H, W)`` in [0, 1].

    ``c_f`` by gradient x activation (:func:`filter_contributions`; exact for a linear GAP head),
    summed per part of ``filter_parts`` (filters without a part in ``"none"``), and shares per
    ``share`` (``"abs"`` or ``"positive"``; see the module docstring). ``target``: a class index,
    one per image, or ``None`` for the predicted class. ``layer`` defaults to the layer the
    parts were assigned on.
    """
    if share not in SHARES:
        raise ContributionError(f"share: expected one of {', '.join(SHARES)}, got {share!r}")
    layer = filter_parts.layer if layer is None else layer
    c, _, score, t = filter_contributions(model, images, layer=layer, target=target)
    if c.shape[1] != filter_parts.num_filters:
        raise ContributionError(
            f"filter_parts: assigned {filter_parts.num_filters} filters, layer {layer!r} has {c.shape[1]}"
        )
    k = len(filter_parts.part_names)
    col = torch.where(filter_parts.part_of_filter < 0, k, filter_parts.part_of_filter).to(c.device)
    onehot = torch.nn.functional.one_hot(col, k + 1).to(c.dtype)  # (C, K+1)
    return PartContributions(
        filter_parts.column_names, filter_parts.counts(), c, c @ onehot, _shares(c, onehot, share), score, t, share
    )


def dataset_part_contributions(
    model: nn.Module,
    data: DataLoader | Dataset | Iterable[dict],
    filter_parts: FilterParts,
    *,
    layer: str | None = None,
    target: Target | str = None,
    share: str = "abs",
    annotated_only: bool = True,
    batch_size: int = 32,
) -> PartContributions:
    """:func:`part_contributions` over a dataset, streamed; ``mean_share()`` / ``summary()`` then
    average over its images.

    ``target``: as for :func:`part_contributions`, or ``"label"`` for each image's own label.
    ``annotated_only``: keep only images with at least one annotated landmark (the objects; the
    negatives of a single-category set have none).
    """
    device = _device(unwrap_model(model))
    results = []
    for batch in as_batches(data, batch_size):
        images = batch["image"]
        labels = torch.as_tensor(batch["label"]).long().flatten()
        keep = torch.ones(len(images), dtype=torch.bool)
        if annotated_only:
            keep = (~torch.as_tensor(batch["landmarks"]).isnan().any(-1)).any(-1).cpu()
        if not keep.any():
            continue
        t = labels[keep].to(device) if isinstance(target, str) and target == "label" else target
        if isinstance(t, str):
            raise ContributionError(f"target: expected a class index, None or 'label', got {t!r}")
        results.append(part_contributions(model, images[keep], filter_parts, layer=layer, target=t, share=share))
    if not results:
        raise ContributionError("data: no images" + (" with annotated landmarks" if annotated_only else ""))
    return PartContributions.concat(results)
