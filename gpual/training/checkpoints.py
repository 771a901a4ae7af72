"""Checkpoints and resume states of a training run.

A checkpoint (``rounds/NNN/checkpoint.pt``, ``final/``, ``full/``) holds the student, the
EMA teacher, the memory bank and the meta that rebuilds the network without the config
(backbone, classes, bank size); a resume state (``train_state.pt``, written after every
epoch) adds the optimiser, the loss scaler, the loss history and the labels' fingerprint.
Both are read as CPU tensors with ``weights_only`` and checked for their format, so a
truncated or foreign file is a one-line error.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpual import atomic
from gpual.config import Config, ModelConfig
from gpual.errors import GpualError
from gpual.memory_bank import MemoryBank
from gpual.model import SegmentationModel, build_model
from gpual.teacher import freeze, make_teacher

if TYPE_CHECKING:
    from gpual.training.data import TrainingSet
    from gpual.training.loop import Trainer

CHECKPOINT_FORMAT = "gpual-checkpoint-1"
RESUME_FORMAT = "gpual-train-state-1"
OUTPUT_STRIDE = 8  # see gpual.model: the fcn_resnet50 geometry for every backbone


def model_meta(config: Config, num_classes: int, classes: list[str]) -> dict[str, Any]:
    model = dataclasses.asdict(config.model)
    # The weights are in the checkpoint: never reload the file or the download.
    model["backbone_checkpoint"], model["backbone_weights"] = "", ""
    return {"model": model, "output_stride": OUTPUT_STRIDE, "num_classes": num_classes, "classes": classes,
            "bank": {"capacity": config.contrastive.bank_size, "dim": config.model.projection_dim}}


def save_checkpoint(path: Path, t: Trainer, meta: dict[str, Any]) -> None:
    """Write student, teacher and memory bank (+ ``meta``) to ``path`` atomically."""
    state = {"format": CHECKPOINT_FORMAT, "student": t.student.state_dict(), "teacher": t.teacher.state_dict(),
             "bank": t.bank.state_dict(), "meta": meta}
    atomic.save_torch(state, path)


def save_resume_state(path: Path, t: Trainer, epochs_done: int, history: list[dict[str, Any]], fingerprint: str,
                      meta: dict[str, Any], seconds: float) -> None:
    """Write what resumes a run after its ``epochs_done``-th epoch to ``path`` atomically:
    the checkpoint's tensors plus the optimiser, the loss scaler and the loss history."""
    state = {
        "format": RESUME_FORMAT, "student": t.student.state_dict(), "teacher": t.teacher.state_dict(),
        "bank": t.bank.state_dict(), "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(),
        "epoch": epochs_done, "history": history, "fingerprint": fingerprint, "meta": meta, "seconds": seconds,
    }
    atomic.save_torch(state, path)


def read_state(path: Path, what: str, missing: str, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint or resume state as CPU tensors. With ``mmap`` the file is memory-mapped,
    so tensors that are never touched (the student, for inference) are never read."""
    if not path.exists():
        raise GpualError(missing)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # zip, pickle and torch errors alike
        raise GpualError(f"{what} {path} is unreadable ({type(exc).__name__}): delete it and train again") from None
    if not isinstance(state, dict) or state.get("format") not in (CHECKPOINT_FORMAT, RESUME_FORMAT):
        raise GpualError(f"{path} is not a gpual {what}: delete it and train again")
    return state


def model_from_meta(meta: dict[str, Any], device: torch.device) -> SegmentationModel:
    config = ModelConfig(**{"backbone_weights": "", **meta["model"]})  # checkpoints before backbone_weights
    return build_model(config, int(meta["num_classes"]), output_stride=int(meta["output_stride"])).to(device)


def bank_from_meta(meta: dict[str, Any], device: torch.device) -> MemoryBank:
    return MemoryBank(int(meta["num_classes"]), int(meta["bank"]["capacity"]), int(meta["bank"]["dim"]), device)


def load_checkpoint(path: Path, device: torch.device) -> tuple[SegmentationModel, SegmentationModel, MemoryBank, dict[str, Any]]:
    """(student (train mode), teacher (eval mode, frozen), memory bank, meta) from a round's
    checkpoint, all on ``device``. The architecture comes from the checkpoint's own meta."""
    state = read_state(Path(path), "checkpoint", _missing(path))
    meta = state["meta"]
    student = model_from_meta(meta, device)
    teacher, bank = make_teacher(student), bank_from_meta(meta, device)
    load_weights(student, state["student"], path)
    load_weights(teacher, state["teacher"], path)
    bank.load_state_dict(state["bank"])
    student.train()
    teacher.eval()
    return student, teacher, bank, meta


def load_teacher(path: Path, device: torch.device) -> tuple[SegmentationModel, dict[str, Any]]:
    """(teacher (eval mode, frozen) on ``device``, meta): what evaluation and pool scoring
    run. The student is neither built nor read from disk."""
    state = read_state(Path(path), "checkpoint", _missing(path), mmap=True)
    teacher = model_from_meta(state["meta"], device)
    load_weights(teacher, state["teacher"], path)
    return freeze(teacher), state["meta"]


def load_bank(path: Path, device: torch.device) -> MemoryBank:
    """The memory bank of a round's checkpoint on ``device`` (no model is built)."""
    state = read_state(Path(path), "checkpoint", _missing(path), mmap=True)
    bank = bank_from_meta(state["meta"], device)
    bank.load_state_dict(state["bank"])
    return bank


def _missing(path: Path) -> str:
    return f"{path} not found: train that round first (`gpual train`)"


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise GpualError(f"weights in {path} do not fit the model ({first}): delete it and train again") from None


def restore(t: Trainer, state_path: Path, data: TrainingSet, meta: dict[str, Any], command: str) -> tuple[int, list, float]:
    """Load an interrupted run's last epoch into ``t``; (epochs done, loss history, seconds spent)."""
    state = read_state(state_path, "training state", f"{state_path} not found")
    if state.get("fingerprint") != data.fingerprint or state["meta"]["model"] != meta["model"]:
        raise GpualError(f"{state_path} was written for other labels or another model config: delete it and run `{command}`")
    load_weights(t.student, state["student"], state_path)
    load_weights(t.teacher, state["teacher"], state_path)
    t.bank.load_state_dict(state["bank"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"]), float(state["seconds"])
