"""Per-image feature ``x``, rationale ``g`` and score ``y`` of the top interpretable layer
(Zhang et al., CVPR 2019, §3.1 "a decision mode"; SPEC Method 1, Step 1).

For an image with map ``X (D, h, w)`` of the layer and the target-class score ``y`` before the
softmax (a single-category net: its one logit)::

    s_d = E_{I in Omega+} [ mean_ij X_dij ]          per-filter scale, over the positive images
    x_d = (1 / s_d) sum_ij X_dij                     pooled feature (a sum, not a mean)
    g_d = (s_d / (h w)) sum_ij dy/dX_dij             pooled rationale
    b   = y - g . x                                  before the normalisation (s_d cancels in g . x)
    g, y, b  <-  g / |g|, y / |g|, b / |g|           so that y = g . x + b still holds

``pooled`` runs the head once forward and once backward per batch; ``normalise`` applies the
scale, which is a dataset statistic: ``extract`` pools every batch first and normalises once at
the end (one pass over the data), and a test set is normalised with its training set's ``scale``.
A filter silent on every positive image (``s_d = 0``) gets ``s_d = 1``: ``g_d x_d`` does not
depend on ``s_d``, and its ``x_d`` stays finite on other images.

Which map ``X`` is (``site``):

- ``"post_mask"`` (the paper, §3.1: "the feature map of the top conv-layer after a ReLU and mask
  operation"): the layer's masked map; ``g`` through the layers above and the head.
- ``"pre_mask"`` (the [VR] port, ``NEW_INTER_MAP``): the map after the ReLU, before the mask;
  ``g`` through the mask, the layers above and the head.

A head linear in ``X`` (GAP + BatchNorm in eval mode + fc, as the small CNN and EfficientNet
recipes) has ``dy/dX_dij = a_d / (h w)`` for every image, so the post-mask rationale is the same
for all images: every cosine is 1 and the tree is degenerate (one decision mode), though correct.
``pre_mask`` gives per-image rationales there, through the mask's dependence on ``X``.

Part ablations (the ground truth of part contributions, SPEC §1b.4): with a filter -> part
assignment, ``drop_p = y - y(X with the filters of part p set to 0)``, all parts of a batch in
one forward of the head, in the units of the normalised ``y``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.base import as_batches
from ..models.net import batch_features
from ..training.loop import progress as progress_bar
from .model import TreeError

if TYPE_CHECKING:
    from icnn.attribution.contributions import FilterParts

SITES = ("post_mask", "pre_mask")
Head = Callable[[torch.Tensor], torch.Tensor]  # X (B, D, h, w) -> logits (B, K)


@dataclass
class Features:
    """What the tree reads, one row per image (module docstring); float64."""

    x: torch.Tensor  # (B, D) pooled, scaled feature
    g: torch.Tensor  # (B, D) rationale, unit norm (zero where dy/dX = 0)
    y: torch.Tensor  # (B,) score / |g|
    b: torch.Tensor  # (B,) y - g . x
    norm: torch.Tensor  # (B,) |g| before the normalisation: y * norm is the network's score
    positive: torch.Tensor  # (B,) bool: an image of the target category
    scale: torch.Tensor  # (D,) s_d
    index: torch.Tensor  # (B,) int64 position in the dataset
    part_drop: torch.Tensor | None = None  # (B, M) y - y(part p switched off), normalised as y

    def __len__(self) -> int:
        return len(self.y)

    def select(self, rows: torch.Tensor) -> Features:
        """The images ``rows`` (a bool mask or indices) as a new ``Features``."""
        take = lambda t: t if t is None or t is self.scale else t[rows]
        return Features(**{f.name: take(getattr(self, f.name)) for f in fields(self)})


def pooled(maps: torch.Tensor, head: Head, target: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_ij X (B, D), mean_ij dy/dX (B, D), y (B,))`` of ``maps (B, D, h, w)``, float64.

    One forward and one backward of ``head`` for the whole batch: the images are independent
    (eval mode), so the gradient of ``sum_b y_b`` is every image's own gradient.
    """
    if not (torch.is_tensor(maps) and maps.ndim == 4 and maps.is_floating_point()):
        got = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise TreeError(f"maps: expected a float tensor (B, D, h, w), got {got}")
    X = maps.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head(X)  # (B, K)
        if logits.ndim != 2 or not 0 <= target < logits.shape[1]:
            raise TreeError(f"target: {target} is not an output of a head with logits of shape {tuple(logits.shape)}")
        y = logits[:, target]
        (grad,) = torch.autograd.grad(y.sum(), X)
    return X.detach().double().sum((2, 3)), grad.double().mean((2, 3)), y.detach().double()


def filter_scale(sum_x: torch.Tensor, hw: int, positive: torch.Tensor | None = None) -> torch.Tensor:
    """``s_d = mean over the positive images of mean_ij X_dij`` ``(D,)`` from ``sum_x (B, D)``."""
    rows = sum_x if positive is None else sum_x[positive]
    if len(rows) == 0:
        raise TreeError("data: no positive images to compute the filter scale from")
    return rows.mean(0) / hw


def normalise(sum_x: torch.Tensor, mean_grad: torch.Tensor, y: torch.Tensor, scale: torch.Tensor):
    """``(x, g, y, b, norm)`` from the pooled sums and the scale (module docstring)."""
    s = torch.where(scale > 0, scale, 1.0).to(sum_x)  # (D,)
    x = sum_x / s
    g = mean_grad * s
    b = y - (sum_x * mean_grad).sum(1)  # = y - g . x, exactly, for any s
    norm = g.norm(dim=1)
    safe = torch.where(norm > 0, norm, 1.0)[:, None]
    return x, g / safe, y / safe[:, 0], b / safe[:, 0], norm


def rationale(maps: torch.Tensor, head: Head, *, target: int = 0, scale: torch.Tensor | None = None) -> Features:
    """Features of one batch of maps ``(B, D, h, w)`` of the positive images (Step 1).

    ``scale``: the per-filter ``s_d``; ``None``: computed from these maps. Every image counts as
    a positive.
    """
    sum_x, mean_grad, y = pooled(maps, head, target)
    s = filter_scale(sum_x, maps.shape[2] * maps.shape[3]) if scale is None else torch.as_tensor(scale).double()
    x, g, y, b, norm = normalise(sum_x, mean_grad, y, s)
    ones = torch.ones(len(y), dtype=torch.bool)
    return Features(x, g, y, b, norm, ones, s, torch.arange(len(y)))


def part_drop(maps: torch.Tensor, head: Head, part_of_filter: torch.Tensor, num_parts: int, target: int = 0) -> torch.Tensor:
    """``y - y(X with part p's filters zeroed)`` ``(B, M)``, float64, unnormalised; one forward
    of the head over the ``M`` ablated copies of the batch."""
    part = torch.as_tensor(part_of_filter, device=maps.device)
    if part.shape != (maps.shape[1],):
        raise TreeError(f"parts: {tuple(part.shape)} filter assignments for a layer of {maps.shape[1]} filters")
    keep = part[None] != torch.arange(num_parts, device=maps.device)[:, None]  # (M, D)
    b = len(maps)
    with torch.no_grad():
        y = head(maps)[:, target]  # (B,)
        off = maps[None] * keep[:, None, :, None, None].to(maps.dtype)  # (M, B, D, h, w)
        y_off = head(off.flatten(0, 1))[:, target].view(num_parts, b)
    return (y[None] - y_off).t().double()


def layer_head(model: nn.Module, layer: str, site: str) -> Head:
    """``X -> logits`` of ``model`` from ``layer``'s map at ``site``: (its mask,) the layers
    above it, the head."""
    names = list(model.layers.keys())
    above = [model.layers[n] for n in names[names.index(layer) + 1 :]]
    mask = model.layers[layer].mask if site == "pre_mask" else None

    def head(X: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            X = mask(X)
        for lay in above:
            X = lay(X)[1]  # the next layer reads the masked map
        return model.forward_head(X)

    return head


def _check(model: nn.Module, layer: str, site: str, target: int | None) -> int:
    """The target output index; raises ``TreeError`` on a wrong model / layer / site / target."""
    if not (hasattr(model, "forward_features") and isinstance(getattr(model, "layers", None), nn.ModuleDict)):
        raise TreeError(f"model: expected an icnn InterpretableNet with interpretable layers, got {type(model).__name__}")
    if layer not in model.layers:
        raise TreeError(f"layer: {layer!r} is not one of the network's layers {', '.join(model.layers)}")
    if site not in SITES:
        raise TreeError(f"site: expected one of {', '.join(SITES)}, got {site!r}")
    k = int(getattr(model, "num_classes", 1))
    if target is None:
        if k != 1:
            raise TreeError(f"target: a network with {k} outputs needs the target class index")
        return 0
    if not 0 <= int(target) < k:
        raise TreeError(f"target: {target} is out of range for a network with {k} output(s)")
    return int(target)


def extract(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable[dict],
    *,
    layer: str = "new",
    site: str = "post_mask",
    target: int | None = None,
    scale: torch.Tensor | None = None,
    parts: FilterParts | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Features:
    """Features of every image of ``data`` through ``model`` (one pass, module docstring).

    Args:
        model: an ``icnn`` ``InterpretableNet`` (the ordinary twin works too: its maps have no
            mask, so both sites are the same map). Used in eval mode, parameters frozen.
        data: a Dataset or an iterable of batches of sample dicts (``image`` or, from a
            frozen-stem cache, ``stem``; ``label``).
        layer: the layer whose maps the tree reads (``"new"``: the paper's top conv-layer).
        site: ``"post_mask"`` (paper) or ``"pre_mask"`` ([VR]); see the module docstring.
        target: the class whose score is ``y``; ``None`` for a single-category net (one logit,
            positives are label 1). For a multi-class net the positives are label ``target``.
        scale: ``s_d`` of the training set (for a test set); ``None``: from ``data``'s positives.
        parts: the filters' parts (``icnn.attribution.assign_filter_parts``): also computes
            ``part_drop``, one column per part name.
        batch_size: when ``data`` is a Dataset.
        device: where the network runs (the model is moved there; default: where its
            parameters are).
    """
    from icnn.attribution.base import analysis_mode

    t = _check(model, layer, site, target)
    single = int(getattr(model, "num_classes", 1)) == 1
    device = torch.device(device) if device is not None else next(model.parameters()).device
    data = as_batches(data, batch_size)
    head = layer_head(model, layer, site)
    out: dict[str, list] = {k: [] for k in ("sum_x", "grad", "y", "label", "index", "drop")}
    seen, hw = 0, 1
    with analysis_mode(model.to(device)):
        for batch in progress_bar(data, enabled=progress, total=len(data) if hasattr(data, "__len__") else None, desc="tree features"):
            if "label" not in batch:
                raise TreeError("data: samples need a 'label' to tell the positive images")
            with torch.no_grad():
                feats = batch_features(model, batch, device)
            maps = (feats.relu if site == "pre_mask" else feats.masked)[layer]  # (B, D, h, w)
            hw = maps.shape[2] * maps.shape[3]
            sum_x, grad, y = pooled(maps, head, t)
            out["sum_x"].append(sum_x.cpu())
            out["grad"].append(grad.cpu())
            out["y"].append(y.cpu())
            out["label"].append(torch.as_tensor(batch["label"]).long().flatten())
            out["index"].append(torch.as_tensor(batch.get("index", torch.arange(seen, seen + len(y)))).long().flatten())
            if parts is not None:
                out["drop"].append(part_drop(maps, head, parts.part_of_filter, len(parts.part_names), t).cpu())
            seen += len(y)
    if seen == 0:
        raise TreeError("data: no images")
    cat = {k: torch.cat(v) for k, v in out.items() if v}
    positive = cat["label"] == (1 if single else t)
    s = filter_scale(cat["sum_x"], hw, positive) if scale is None else torch.as_tensor(scale).double().cpu()
    if s.shape != cat["sum_x"].shape[1:]:
        raise TreeError(f"scale: {tuple(s.shape)} values for a layer of {cat['sum_x'].shape[1]} filters")
    x, g, y, b, norm = normalise(cat["sum_x"], cat["grad"], cat["y"], s)
    drop = cat["drop"] / torch.where(norm > 0, norm, 1.0)[:, None] if parts is not None else None
    return Features(x, g, y, b, norm, positive, s, cat["index"], drop)
