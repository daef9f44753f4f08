"""Classification accuracy (paper §5.3, Table 7, footnote 4).

- single-category: the logistic output ``y`` (``(B,)`` or ``(B, 1)``) predicts the target when
  ``y > 0``; labels are ``1`` for the target and ``0`` or ``-1`` for negatives (the paper's ±1 and
  the datasets' 0/1 both work).
- multi-category, softmax: ``argmax_c y_c`` against the label (the first class on ties).
- multi-category, logistic (footnote 4): each output ``y_c`` is an independent binary decision
  "the image is of class c" (``y_c > 0``); the accuracy is the mean over all ``(image, class)``
  decisions - equally, the mean over classes of each binary decision's accuracy, or the mean
  over images of the fraction of its outputs that are right.

Counts are int64, so streaming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantile import MetricError

__all__ = ["AccuracyMeter", "binary_correct", "logistic_correct", "softmax_correct"]


def _labels(labels, b: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape != (b,):
        raise MetricError(f"labels must be (B,) = ({b},), got {tuple(labels.shape)}")
    return labels.long()


def _class_labels(logits: torch.Tensor, labels) -> torch.Tensor:
    """Multi-category: ``(B, NC)`` logits and their ``(B,)`` class indices, checked, on the logits' device."""
    if logits.dim() != 2:
        raise MetricError(f"multi-category logits must be (B, NC), got {tuple(logits.shape)}")
    labels = _labels(labels, logits.shape[0]).to(logits.device)
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise MetricError(f"labels must be class indices in [0, {logits.shape[1]})")
    return labels


def binary_correct(logits: torch.Tensor, labels) -> torch.Tensor:
    """Single-category: ``(B,)`` or ``(B, 1)`` logits, labels 1 / (0 or -1) -> ``(B,)`` bool correct."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.dim() != 1:
        raise MetricError(f"single-category logits must be (B,) or (B, 1), got {tuple(logits.shape)}")
    labels = _labels(labels, logits.shape[0])
    if bool(((labels != 1) & (labels != 0) & (labels != -1)).any()):
        raise MetricError("single-category labels must be 1 (target) or 0 / -1 (negative)")
    return (logits.detach() > 0) == (labels == 1).to(logits.device)


def softmax_correct(logits: torch.Tensor, labels) -> torch.Tensor:
    """Multi-category softmax: ``(B, NC)`` logits, ``(B,)`` class indices -> ``(B,)`` bool correct."""
    return logits.detach().argmax(dim=1) == _class_labels(logits, labels)


def logistic_correct(logits: torch.Tensor, labels) -> torch.Tensor:
    """Footnote 4: ``(B, NC)`` logits -> ``(B, NC)`` bool, each ``y_c > 0`` vs ``label == c``."""
    target = torch.nn.functional.one_hot(_class_labels(logits, labels), logits.shape[1]).bool()
    return (logits.detach() > 0) == target


@dataclass
class AccuracyResult:
    accuracy: float  # single-category: binary; multi-category: softmax argmax
    logistic_accuracy: float | None  # multi-category footnote 4 (None for single-category)
    per_class_logistic: torch.Tensor | None  # (NC,) accuracy of each binary decision
    images: int

    def summary(self) -> dict:
        out = {"accuracy": self.accuracy, "images": self.images}
        if self.logistic_accuracy is not None:
            out["logistic_accuracy"] = self.logistic_accuracy
        return out


class AccuracyMeter:
    """Streaming accuracy. ``num_classes=1``: single-category (logistic output ``(B, 1)``);
    ``num_classes>=2``: softmax accuracy and the footnote-4 logistic accuracy.

    ``update(logits, labels)``; ``compute() -> AccuracyResult``.
    """

    def __init__(self, num_classes: int = 1):
        if num_classes <= 0:
            raise MetricError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.images = 0
        self.correct = 0
        self.class_correct = torch.zeros(self.num_classes, dtype=torch.long)  # logistic, per class

    def update(self, logits: torch.Tensor, labels) -> None:
        if self.num_classes == 1:
            self.correct += int(binary_correct(logits, labels).sum())
        else:
            if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                raise MetricError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
            self.correct += int(softmax_correct(logits, labels).sum())
            self.class_correct += logistic_correct(logits, labels).sum(0).cpu()
        self.images += logits.shape[0]

    def compute(self) -> AccuracyResult:
        if self.images == 0:
            raise MetricError("AccuracyMeter.compute() called before any update()")
        if self.num_classes == 1:
            return AccuracyResult(self.correct / self.images, None, None, self.images)
        per_class = self.class_correct.double() / self.images
        logistic = int(self.class_correct.sum()) / (self.images * self.num_classes)
        return AccuracyResult(self.correct / self.images, logistic, per_class, self.images)
