"""Segmentation metrics: confusion matrix, per-class IoU, mIoU (void pixels ignored).

Written once in torch, so the confusion matrix accumulates on the model's device (CPU or
CUDA) and only the final (C, C) matrix is copied to the host.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, same device as the inputs.

    ``pred`` and ``label`` are integer tensors of one shape; pixels whose label is
    ``ignore_index`` (or otherwise outside [0, C)) are left out. Predictions must lie in [0, C).
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    label, pred = label[keep], pred[keep]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> list[float | None]:
    """IoU_c = TP / (TP + FP + FN) per class; None where a class is neither in the ground
    truth nor predicted (its union is empty, so it has no IoU)."""
    conf = confusion.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return [float(t / u) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist())]


def mean_iou(confusion: Tensor) -> float:
    """Mean of the defined per-class IoUs (classes with an empty union are left out); NaN if none."""
    values = _averaged(iou_per_class(confusion))
    return sum(values) / len(values) if values else math.nan


def averaged_classes(confusion: Tensor) -> int:
    """How many classes :func:`mean_iou` averages: those in the ground truth or predicted
    (a non-empty union); the others have no IoU and are left out."""
    return len(_averaged(iou_per_class(confusion)))


def _averaged(ious: list[float | None]) -> list[float]:
    """The per-class IoUs mIoU averages: the defined ones."""
    return [v for v in ious if v is not None]


def classes_in_truth(confusion: Tensor) -> int:
    """How many classes have at least one ground-truth pixel (a non-empty row)."""
    return int((confusion.sum(1) > 0).sum())


def pixel_accuracy(confusion: Tensor) -> float:
    """Correct labeled pixels / labeled pixels; NaN if no pixel is labeled."""
    total = int(confusion.sum())
    return float(confusion.diag().sum()) / total if total else math.nan
