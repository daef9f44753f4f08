"""Task losses against hand-computed values (paper §5.1, footnote 4)."""

import math

import pytest
import torch

from icnn.task_loss import (
    TaskLoss,
    correct_count,
    logistic_log_loss,
    per_class_logistic_log_loss,
    softmax_log_loss,
    task_loss_for,
)


def test_logistic_log_loss_by_hand():
    logits = torch.tensor([[2.0], [-1.0], [0.0]])
    labels = torch.tensor([1, 0, 1])  # y = +1, -1, +1
    # log(1+e^-2), log(1+e^-1), log 2
    want = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + math.log(2.0)) / 3
    assert logistic_log_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_logistic_log_loss_no_overflow():
    logits = torch.tensor([1e4, -1e4, 1e4])
    labels = torch.tensor([1, 1, 0])
    # 0, 1e4, 1e4 -> mean 2e4/3
    assert logistic_log_loss(logits, labels).item() == pytest.approx(2e4 / 3, rel=1e-6)


def test_softmax_log_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    labels = torch.tensor([1, 0])
    # p = 3/4 and 1/2
    want = (-math.log(0.75) - math.log(0.5)) / 2
    assert softmax_log_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_per_class_logistic_by_hand():
    logits = torch.tensor([[1.0, -2.0, 0.0]])
    labels = torch.tensor([1])  # y = (-1, +1, -1)
    want = math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.0)) + math.log(2.0)
    assert per_class_logistic_log_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_correct_counts():
    assert correct_count("logistic", torch.tensor([[0.5], [-0.5], [0.0]]), torch.tensor([1, 1, 0])).item() == 2
    assert correct_count("softmax", torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])).item() == 1
    # footnote 4: image 0 gets 2 of 3 outputs right, image 1 gets 3 of 3 -> 2/3 + 1
    logits = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    got = correct_count("per_class_logistic", logits, torch.tensor([0, 2])).item()
    assert got == pytest.approx(2 / 3 + 1)


def test_task_loss_for_and_errors():
    assert task_loss_for("single").kind == "logistic"
    assert task_loss_for("multi").kind == "softmax"
    assert task_loss_for("multi", "per_class_logistic").kind == "per_class_logistic"
    with pytest.raises(ValueError, match="task"):
        task_loss_for("pairs")
    with pytest.raises(ValueError, match="task loss"):
        TaskLoss("hinge")


def test_gradient_of_logistic_loss():
    z = torch.tensor([[0.3]], requires_grad=True)
    logistic_log_loss(z, torch.tensor([1])).backward()
    # d/dz log(1+exp(-z)) = -sigmoid(-z)
    assert z.grad.item() == pytest.approx(-1 / (1 + math.exp(0.3)), rel=1e-6)
