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


def test_classes_averaged_counts_what_miou_averages() -> None:
    from gpual.metrics import averaged_classes, classes_in_truth

    # Truth has classes 0 and 1; class 2 is only predicted (IoU 0, averaged); class 3 is
    # neither (no IoU, left out).
    label = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 2, 1, 1, 0])
    conf = confusion_matrix(pred, label, num_classes=4)
    assert iou_per_class(conf)[2] == 0.0 and iou_per_class(conf)[3] is None
    assert averaged_classes(conf) == 3 and classes_in_truth(conf) == 2
    assert mean_iou(conf) == pytest.approx(sum(v for v in iou_per_class(conf) if v is not None) / averaged_classes(conf))
    empty = torch.zeros(4, 4, dtype=torch.int64)
    assert averaged_classes(empty) == 0 and classes_in_truth(empty) == 0


def test_evaluation_records_the_class_count_and_the_confusion_matrix_once(capsys, tmp_path) -> None:
    import json

    from cli_runner import run_cli
    from gpual.evaluation import evaluate
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    data = make_scenes(tmp_path / "data", n_train=3, n_val=2, height=32, width=48).root
    ws_root = tmp_path / "ws"
    assert run_cli(capsys, "init", ws_root, "--data", data, "--dataset", "folder", "--preset", "demo",
                   "--set", "train.epochs_per_round=1", "--set", "acquisition.init_budget=40").code == 0
    for command, *options in (("superpixels",), ("select", "--round", "0"), ("label", "--round", "0"),
                              ("train", "--round", "0", "--device", "cpu")):
        r = run_cli(capsys, command, ws_root, *options)
        assert r.code == 0, r.err
    ws = Workspace.open(ws_root)
    result = evaluate(ws, 0, "val", torch.device("cpu"))
    conf = torch.tensor(result["confusion"])
    ious = list(result["iou"].values())
    assert result["classes_total"] == 5 == conf.shape[0]
    assert result["classes_averaged"] == sum(v is not None for v in ious) >= 1
    assert result["classes_in_truth"] == int((conf.sum(1) > 0).sum()) <= result["classes_averaged"]
    assert result["miou"] == pytest.approx(sum(v for v in ious if v is not None) / result["classes_averaged"])

    def confusions(node) -> int:
        if isinstance(node, dict):
            return sum(k == "confusion" for k in node) + sum(confusions(v) for v in node.values())
        return sum(confusions(v) for v in node) if isinstance(node, list) else 0

    stored = json.loads(ws.metrics_path(0).read_text())
    assert confusions(stored) == 1 and stored["evaluations"]["val"]["confusion"] == result["confusion"]
    latest = stored["evaluation"]
    assert latest["confusion_in"] == "evaluations.val" and latest["miou"] == result["miou"]
    assert latest["classes_averaged"] == result["classes_averaged"] and ws.round_state(0).evaluated
    # Evaluating again (the latest replaced, not added) still holds the matrix once.
    evaluate(ws, 0, "val", torch.device("cpu"))
    assert confusions(json.loads(ws.metrics_path(0).read_text())) == 1
