"""Confusion matrix, per-class IoU and mIoU with void pixels, by hand."""
from __future__ import annotations

import math

import pytest
import torch

from gpual.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_iou_miou_with_ignore_by_hand() -> None:
    label = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [1, 2, 0, 0]])
    conf = confusion_matrix(pred, label, num_classes=4)
    # rows = truth, columns = prediction; the two void pixels are not counted.
    assert conf.tolist() == [
        [2, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
    ]
    ious = iou_per_class(conf)
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 2, FP 2, FN 0 -> 1/2; class 2: TP 0 -> 0; class 3: absent -> None
    assert ious[0] == pytest.approx(2 / 3) and ious[1] == pytest.approx(0.5) and ious[2] == 0.0 and ious[3] is None
    assert mean_iou(conf) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert pixel_accuracy(conf) == pytest.approx(4 / 6)


def test_confusion_accumulates_and_handles_empty() -> None:
    conf = torch.zeros(2, 2, dtype=torch.int64)
    conf += confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    conf += confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    assert conf.tolist() == [[1, 1], [0, 1]]
    empty = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 255]), 2)
    assert empty.sum() == 0 and math.isnan(mean_iou(empty)) and math.isnan(pixel_accuracy(empty))
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), 2)
