"""``gpual evaluate``: mIoU, per-class IoU and the confusion matrix of a round's teacher
on the val or test split, at the working scale, void (255) ignored.

The teacher (EMA) is the model the method hands on, so it is the one evaluated; the
projection head is not run (:meth:`SegmentationModel.segment`).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import Dataset

from gpual.backend import amp_dtype, amp_enabled
from gpual.errors import GpualError
from gpual.loading import host_batches, pad_collate
from gpual.metrics import averaged_classes, classes_in_truth, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from gpual.model import normalize
from gpual.training.checkpoints import load_teacher
from gpual.workspace import Workspace


class _LabeledImages(Dataset):
    """Item i: (image (H, W, 3) uint8, label (H, W) uint8) CPU tensors of a split at ``scale``."""

    def __init__(self, spec: Any, samples: list[Any], scale: float) -> None:
        self.spec, self.samples, self.scale = spec, samples, scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from gpual.datasets import load_pair

        image, label = load_pair(self.spec, self.samples[i], self.scale)
        return torch.from_numpy(image), torch.from_numpy(label)


def split_name(ws: Workspace, split: str) -> str:
    """``val`` / ``test`` -> the config's split folder names; any other name is used as is."""
    return {"val": ws.config.data.val_split, "test": ws.config.data.test_split}.get(split, split)


def evaluate(ws: Workspace, round: int | None, split: str, device: torch.device, final: bool = False) -> dict[str, Any]:
    """Evaluate round ``round``'s teacher (``None``: the full-supervision reference; ``final``:
    the final retraining on round ``round``'s labels) on ``split``.

    Returns ``{"split", "miou", "classes_averaged", "classes_in_truth", "classes_total",
    "iou": {class: IoU or None}, "confusion": C x C counts (rows = truth), "pixel_accuracy",
    "images", "seconds", ...}``: mIoU averages the ``classes_averaged`` classes with an IoU
    (in the split's ground truth or predicted) of the dataset's ``classes_total``.

    Records it in that model's metrics JSON (``full/metrics.json`` for the reference,
    ``rounds/NNN/final/metrics.json`` for a final retraining) as ``evaluations[split]``,
    and as ``evaluation`` (the latest split) without the confusion matrix, which C x C
    counts make the largest part of the file: ``evaluation["confusion_in"]`` names the
    entry that holds it. Refuses when the model is not trained.
    """
    from gpual.datasets import open_dataset

    run = ws.model_run(round, final)
    if round is not None and not final:
        ws.require(round, "evaluate", "evaluate")
    elif not run.checkpoint.exists():
        resume = " --resume" if run.state.exists() else ""  # an interrupted training continues
        raise GpualError(f"{run.label} is not trained: run `gpual train {ws.root} {run.flags}{resume}` first")
    path = run.checkpoint
    teacher, meta = load_teacher(path, device)
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    name = split_name(ws, split)
    samples = spec.samples(name)
    if not spec.has_labels(name):
        raise GpualError(
            f"split '{name}' of {spec.root} has no labels/ folder: evaluation needs ground truth; label a validation "
            "split, or evaluate on another one with --split"
        )
    classes = list(spec.classes)
    if len(classes) != teacher.num_classes:
        raise GpualError(f"{path} predicts {teacher.num_classes} classes but {spec.root} has {len(classes)}: evaluate on the dataset it was trained on")

    amp = amp_enabled(device, ws.config.train.amp)
    loader = host_batches(_LabeledImages(spec, samples, ws.config.data.scale), device, ws.config.train.num_workers,
                          batch_size=ws.config.acquisition.batch_size, collate_fn=pad_collate)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
                logits = teacher.segment(normalize(images))
            confusion += confusion_matrix(logits.argmax(1), labels, len(classes), spec.ignore_index)
    seconds = time.perf_counter() - t0
    confusion = confusion.cpu()
    ious = iou_per_class(confusion)
    result = {
        "split": name,
        "miou": mean_iou(confusion),
        "classes_averaged": averaged_classes(confusion),
        "classes_in_truth": classes_in_truth(confusion),
        "classes_total": len(classes),
        "iou": dict(zip(classes, ious)),
        "pixel_accuracy": pixel_accuracy(confusion),
        "confusion": confusion.tolist(),
        "classes": classes,
        "images": len(samples),
        "seconds": seconds,
        "device": str(device),
        "weights": "teacher",
        "scale": ws.config.data.scale,
        "round": round,
        "final": final,
    }
    evaluations = {**ws.read_run_metrics(run).get("evaluations", {}), name: result}
    latest = {**{k: v for k, v in result.items() if k != "confusion"}, "confusion_in": f"evaluations.{name}"}
    ws.update_run_metrics(run, evaluation=latest, evaluations=evaluations)
    return result
