"""Task (classification) losses of the paper's experiments (§5.1) and their accuracies.

Three heads, one loss each:

- single-category (``"logistic"`` on a ``(B, 1)`` head): labels are ``0`` (negative) / ``1``
  (target), read as ``y = 2 * label - 1`` in ``{-1, +1}``; the logistic log loss
  ``log(1 + exp(-y * logit))``, averaged over the batch.
- multi-category, softmax log loss (``"softmax"``): ``-log softmax(logits)[label]``, averaged.
- multi-category, per-class logistic log loss (``"per_class_logistic"``, paper footnote 4): every
  class output is an independent single-class classifier with ``y_c = +1`` for the image's class
  and ``-1`` otherwise; ``sum_c log(1 + exp(-y_c * logit_c))`` per image (summed over classes as
  MatConvNet's ``vl_nnloss`` does), averaged over the batch. Its accuracy is the footnote's
  "average accuracy of the multiple classification outputs of an image".

``log(1 + exp(-z))`` is ``softplus(-z)``: no overflow for large ``|z|``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASK_LOSSES = ("logistic", "softmax", "per_class_logistic")


def logistic_log_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Single-category logistic log loss, mean over the batch.

    Args:
        logits: ``(B, 1)`` or ``(B,)`` scores of the target class.
        labels: ``(B,)`` integer labels in ``{0, 1}`` (1 = target).
    """
    z = logits.reshape(-1).float()  # (B,)
    y = 2.0 * labels.reshape(-1).to(z.dtype) - 1.0  # (B,) in {-1, +1}
    return F.softplus(-y * z).mean()


def softmax_log_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-category softmax log loss (cross-entropy), mean over the batch. ``(B, K), (B,)``."""
    return F.cross_entropy(logits.float(), labels.long())


def per_class_logistic_log_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper footnote 4: one independent logistic loss per class output, summed over classes.

    Args:
        logits: ``(B, K)``.
        labels: ``(B,)`` class indices; ``y_c = +1`` for the labelled class, ``-1`` for the others.
    """
    z = logits.float()  # (B, K)
    y = 2.0 * F.one_hot(labels.long(), z.shape[1]).to(z.dtype) - 1.0  # (B, K)
    return F.softplus(-y * z).sum(dim=1).mean()


_LOSSES = {
    "logistic": logistic_log_loss,
    "softmax": softmax_log_loss,
    "per_class_logistic": per_class_logistic_log_loss,
}


def correct_count(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of correct decisions in the batch (a float tensor, summed, not averaged).

    ``"logistic"``: ``sign(logit) == y`` per image (a logit of exactly 0 counts as negative).
    ``"softmax"``: ``argmax == label``. ``"per_class_logistic"``: the footnote-4 accuracy, i.e.
    per image the fraction of the ``K`` class outputs whose sign is right, summed over images.
    """
    if kind == "logistic":
        return ((logits.reshape(-1) > 0).long() == labels.reshape(-1).long()).sum().float()
    if kind == "softmax":
        return (logits.argmax(dim=1) == labels.long()).sum().float()
    if kind == "per_class_logistic":
        target = F.one_hot(labels.long(), logits.shape[1]).bool()  # (B, K)
        return ((logits > 0) == target).float().mean(dim=1).sum()
    raise ValueError(f"task loss must be one of {TASK_LOSSES}, got {kind!r}")


class TaskLoss(nn.Module):
    """The classification loss of one head: ``loss = task_loss(logits, labels)``.

    Args:
        kind: ``"logistic"`` (single-category, ``(B, 1)`` head), ``"softmax"`` or
            ``"per_class_logistic"`` (multi-category, ``(B, K)`` head).
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind not in _LOSSES:
            raise ValueError(f"task loss must be one of {TASK_LOSSES}, got {kind!r}")
        self.kind = kind

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _LOSSES[self.kind](logits, labels)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Number of correct decisions in the batch (see :func:`correct_count`)."""
        return correct_count(self.kind, logits, labels)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def task_loss_for(task: str, multi_loss: str = "softmax") -> TaskLoss:
    """The loss of a task: ``"single"`` -> logistic; ``"multi"`` -> ``multi_loss``."""
    if task == "single":
        return TaskLoss("logistic")
    if task == "multi":
        if multi_loss not in ("softmax", "per_class_logistic"):
            raise ValueError(
                f"multi-category loss must be 'softmax' or 'per_class_logistic', got {multi_loss!r}"
            )
        return TaskLoss(multi_loss)
    raise ValueError(f"task must be 'single' or 'multi', got {task!r}")
