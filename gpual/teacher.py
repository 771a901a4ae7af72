"""The EMA teacher (Algorithm 1, line 14): ``M_t = a * M_t + (1 - a) * M_s`` after every
optimiser step, a = ``train.ema_decay`` (0.99).

The teacher is what acquisition and evaluation use; it never receives gradients.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (same device), in eval mode, without gradients."""
    return freeze(copy.deepcopy(student))


def freeze(model: nn.Module) -> nn.Module:
    """``model`` itself, in eval mode and without gradients (as a teacher is)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: every parameter and floating-point buffer (BN running mean/var) of
    ``teacher`` becomes ``decay * teacher + (1 - decay) * student``; integer buffers
    (BN ``num_batches_tracked``) are copied from the student.

    Both models must have the same architecture (matched by name) and live on the same device.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        raise ValueError("teacher and student have different parameters or buffers: build both with the same config")
    floats = [name for name, t in t_buffers.items() if t.is_floating_point()]
    averaged = list(t_params.values()) + [t_buffers[name] for name in floats]
    towards = [s_params[name].detach() for name in t_params] + [s_buffers[name] for name in floats]
    # Multi-tensor kernels instead of a launch per tensor (a ResNet FCN has hundreds), with
    # the same per-element lerp as Tensor.lerp_: t + (1-a)(s - t) = a t + (1-a) s.
    torch._foreach_lerp_(averaged, towards, 1.0 - decay)
    for name, t in t_buffers.items():
        if not t.is_floating_point():
            t.copy_(s_buffers[name])
