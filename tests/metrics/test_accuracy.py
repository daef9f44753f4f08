import pytest
import torch

from icnn.metrics.accuracy import AccuracyMeter, binary_correct, logistic_correct, softmax_correct
from icnn.metrics.quantile import MetricError


def test_binary_hand_case_both_label_conventions():
    logits = torch.tensor([[2.0], [-1.0], [0.0], [0.5]])  # y > 0 predicts the target; 0 does not
    assert binary_correct(logits, torch.tensor([1, 0, 0, 0])).tolist() == [True, True, True, False]
    assert binary_correct(logits, torch.tensor([1, -1, 1, -1])).tolist() == [True, True, False, False]
    m = AccuracyMeter(1)
    m.update(logits, torch.tensor([1, 0, 0, 0]))
    r = m.compute()
    assert r.accuracy == 0.75 and r.logistic_accuracy is None


def test_softmax_and_logistic_hand_case():
    logits = torch.tensor([[3.0, -1.0, 0.5], [0.2, 0.1, -2.0], [-1.0, -1.0, -1.0]])
    labels = torch.tensor([0, 1, 2])
    assert softmax_correct(logits, labels).tolist() == [True, False, False]  # row 2: tie -> class 0
    # decisions y_c > 0 vs (label == c):
    # row 0: [T, F, T] vs [1, 0, 0] -> right, right, wrong
    # row 1: [T, T, F] vs [0, 1, 0] -> wrong, right, right
    # row 2: [F, F, F] vs [0, 0, 1] -> right, right, wrong
    assert logistic_correct(logits, labels).sum().item() == 6
    m = AccuracyMeter(3)
    m.update(logits, labels)
    r = m.compute()
    assert r.accuracy == pytest.approx(1 / 3)
    assert r.logistic_accuracy == pytest.approx(6 / 9)
    assert r.per_class_logistic.tolist() == pytest.approx([2 / 3, 1.0, 1 / 3])
    # footnote 4: mean over classes of per-class accuracy == mean over images of per-image accuracy
    per_image = logistic_correct(logits, labels).double().mean(1).mean()
    assert r.per_class_logistic.mean().item() == pytest.approx(per_image.item())


def test_streaming_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(31, 4, generator=g)
    labels = torch.randint(0, 4, (31,), generator=g)
    one = AccuracyMeter(4)
    one.update(logits, labels)
    many = AccuracyMeter(4)
    for lg, lb in zip(logits.split(5), labels.split(5)):
        many.update(lg, lb)
    assert one.compute().accuracy == many.compute().accuracy
    assert torch.equal(one.class_correct, many.class_correct)
    assert one.compute().accuracy == (logits.argmax(1) == labels).double().mean().item()


def test_bad_input():
    with pytest.raises(MetricError, match="labels"):
        binary_correct(torch.zeros(3, 1), torch.tensor([2, 0, 1]))
    with pytest.raises(MetricError, match="logits"):
        AccuracyMeter(3).update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(MetricError, match="class indices"):
        softmax_correct(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(MetricError, match="before any update"):
        AccuracyMeter(2).compute()
