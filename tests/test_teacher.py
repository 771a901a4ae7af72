"""EMA teacher: parameters and BN running statistics by hand, integer buffers copied, and the
multi-tensor update equal to per-tensor lerps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gpual.teacher import ema_update, make_teacher


def _net(weight: float, bias: float, running_mean: float, running_var: float, batches: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[0].bias.fill_(bias)
        net[1].weight.fill_(1.0)
        net[1].bias.fill_(0.0)
        net[1].running_mean.fill_(running_mean)
        net[1].running_var.fill_(running_var)
        net[1].num_batches_tracked.fill_(batches)
    return net


def test_ema_update_by_hand() -> None:
    teacher = make_teacher(_net(1.0, -2.0, 0.0, 1.0, 5))
    student = _net(3.0, 2.0, 10.0, 3.0, 17)
    ema_update(teacher, student, decay=0.99)
    assert teacher[0].weight.item() == pytest.approx(0.99 * 1.0 + 0.01 * 3.0)  # 1.02
    assert teacher[0].bias.item() == pytest.approx(0.99 * -2.0 + 0.01 * 2.0)  # -1.96
    assert teacher[1].running_mean.item() == pytest.approx(0.1)
    assert teacher[1].running_var.item() == pytest.approx(1.02)
    assert teacher[1].num_batches_tracked.item() == 17  # copied, not averaged
    assert student[0].weight.item() == 3.0  # the student is untouched
    ema_update(teacher, student, decay=0.5)  # a second step compounds: 0.5 * 1.02 + 0.5 * 3
    assert teacher[0].weight.item() == pytest.approx(2.01)
    ema_update(teacher, student, decay=0.0)
    assert teacher[0].weight.item() == 3.0


def test_teacher_is_frozen_copy_in_eval_mode() -> None:
    student = _net(1.0, 0.0, 0.0, 1.0, 0)
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError):
        ema_update(teacher, student, decay=1.5)
    with pytest.raises(ValueError, match="different"):
        ema_update(teacher, nn.Sequential(nn.Linear(1, 1)), decay=0.9)


def test_ema_update_equals_the_per_tensor_lerps() -> None:
    # The multi-tensor update is the per-tensor Tensor.lerp_ bit for bit, on a real network.
    from gpual.config import make_config
    from gpual.model import build_model

    torch.manual_seed(0)
    config = make_config("demo")
    student, reference = build_model(config.model, 3), build_model(config.model, 3)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1)
    for name, buffer in reference.named_buffers():
        if buffer.is_floating_point():
            buffer.add_(0.5)
    teacher = make_teacher(reference)
    expected = {name: t.clone() for name, t in teacher.state_dict().items()}
    s_state = student.state_dict()
    for name, t in expected.items():
        if t.is_floating_point():
            t.lerp_(s_state[name], 1.0 - 0.97)
        else:
            t.copy_(s_state[name])
    ema_update(teacher, student, decay=0.97)
    for name, t in teacher.state_dict().items():
        assert torch.equal(t, expected[name]), name
