"""Training on a round's sparse labels (paper sections 3.2 and 4.2; docs/method.md).

``gpual train WORKSPACE --round N`` trains the student on the pixels revealed so far,
keeps the EMA teacher and the memory bank, and writes ``rounds/NNN/checkpoint.pt``;
``--full`` trains the same network and schedule on every pool label (the reference of
the headline ratio) into ``WORKSPACE/full/``; ``--round N --final`` retrains round N's
labels from fresh weights on that schedule (the paper's final retraining) into
``rounds/NNN/final/``.

Data: every pool image with at least one labelled pixel (:mod:`gpual.training.data`);
no round's training reads the pool's ground truth.

One step (:func:`train_step`) reads top to bottom: forward -> CE on labeled pixels ->
InfoNCE against the memory bank -> backward -> Adam step -> EMA teacher -> memory bank push.
Decisions the brief leaves open:

- The contrastive term and the bank push use the *student's* full-resolution embeddings,
  the values ``SegmentationModel.forward`` returns, so anchors and pushed pixels are
  exactly labeled pixels (no label downsampling). They are read only at the chosen
  pixels (at most 50 anchors and B x 10 pushes per class) by bilinear sampling of the
  native-resolution projection (:func:`gpual.model.embedding_at`), never as a
  (B, 128, H, W) map: that map and its backward were half of a CPU step's time.
- The bank is filled from the student (detached), not from a second teacher forward: a
  queue of P_t = 1000 receives up to B x P_i = 50 vectors per class and step, so it holds
  the student's last ~20 steps, which the teacher (an EMA over ~100 steps) follows closely;
  a teacher forward would cost a third more compute per step.
- Randomness: every epoch reseeds torch's global RNG (dropout), the loader's shuffle and
  the sampling generator (flips, anchors, negatives) from (train.seed, round, epoch) (the
  full reference and every final retraining use FULL_TAG in place of the round), so
  a run resumed from its last finished epoch continues exactly as an uninterrupted one
  would without saving RNG states (bit-identical on CPU; CUDA kernels such as the
  upsampling backward add in a nondeterministic order).
- Each round starts a fresh Adam; round r > 0 starts from round r-1's student, teacher
  and bank unless ``train.reinit_each_round``.
- A step never waits for the device: every tensor's shape is fixed by the config and the
  batch shape (anchors, negatives and bank pushes are fixed-size slots with valid masks,
  :mod:`gpual.losses`, :mod:`gpual.memory_bank`), the step's statistics stay 0-d device
  tensors, and the epoch's mean loss is read once per epoch. On CUDA, AMP runs in bfloat16
  where the device has it, without a GradScaler (float16, with one, elsewhere:
  :func:`gpual.backend.amp_dtype`); Adam is the fused kernel and the model and its input
  are channels-last (cuDNN's native convolution layout). The CPU keeps the plain Adam
  and the contiguous layout.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpual.backend import amp_dtype, amp_enabled, amp_loss_scaling
from gpual.config import Config
from gpual.errors import GpualError
from gpual.losses import contrastive_loss, cross_entropy
from gpual.memory_bank import MemoryBank
from gpual.model import SegmentationModel, build_model, normalize
from gpual.seeding import TRAIN, derive_seed
from gpual.teacher import ema_update, make_teacher
from gpual.training import checkpoints
from gpual.training.checkpoints import OUTPUT_STRIDE
from gpual.training.data import TrainingBatches, TrainingSet, full_training_set, random_hflip, sparse_training_set
from gpual.workspace import ModelRun, Workspace

FULL_TAG = -1  # the "round" of the full reference and of final retrainings in seeds

Progress = Callable[[int, int], None]  # (steps done, steps in total)
StepLog = Callable[[dict[str, Any]], None]  # after every step: epoch, batch, loss, ce, nce (floats), anchors (int)


# ---------------------------------------------------------------------------------------
# The training step


@dataclass
class Trainer:
    """Everything one step reads and updates."""

    student: SegmentationModel
    teacher: SegmentationModel
    bank: MemoryBank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: Config
    amp: bool  # autocast in amp_dtype (bfloat16, or float16 with loss scaling); CUDA only
    # Mean-teacher warm-up for weights trained from scratch: step t uses an EMA decay of
    # min(ema_decay, 1 - 1/(t + 1)), so the teacher tracks the student over the first
    # ~100 steps instead of staying ~the random initial weights (which it would for a
    # round shorter than a few hundred steps). False when continuing a trained round.
    ema_warmup: bool = False
    step: int = 0  # optimiser steps taken by this run (resumed runs continue the count)

    def ema_decay(self) -> float:
        """The EMA decay for the current step (see ``ema_warmup``)."""
        decay = self.config.train.ema_decay
        return min(decay, 1.0 - 1.0 / (self.step + 1)) if self.ema_warmup else decay


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Adam:
    """Adam (beta1, beta2), lr 5e-4, weight decay 2e-4 (paper 4.2); the fused kernel (one
    launch for every parameter) when the parameters are on CUDA."""
    t = config.train
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, **fused)


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """The loss scaler of a run: enabled for float16 AMP only (:func:`gpual.backend.amp_loss_scaling`)."""
    return torch.amp.GradScaler(device.type, enabled=amp_loss_scaling(device, amp))


def memory_format(device: torch.device) -> torch.memory_format:
    """The model's and the input's layout: channels-last on CUDA (cuDNN's native one for
    convolutions), contiguous elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_step(t: Trainer, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch: (B, H, W, 3) uint8 images, (B, H, W) int64 targets (255 =
    unlabeled), both on the model's device. Returns loss, ce, nce (float32) and anchors (int64
    count), detached 0-d tensors on that device: reading them is the caller's (one) wait."""
    cfg = t.config
    x = normalize(images).contiguous(memory_format=memory_format(images.device))
    # Entered only when on: torch.autocast refuses device types it has no rule for (meta,
    # where the tests run the step to prove it never reads data on the host) even disabled.
    with torch.autocast(x.device.type, dtype=amp_dtype(x.device)) if t.amp else contextlib.nullcontext():
        out = t.student.forward_projection(x)
    logits, projection = out["logits"].float(), out["projection"].float()  # losses in float32
    ce = cross_entropy(logits, targets)
    # lambda = 0 is the no-contrastive ablation: skip the sampling
    nce, anchors = ce.new_zeros(()), torch.zeros((), dtype=torch.int64, device=ce.device)
    if cfg.contrastive.weight > 0:
        nce, anchors = contrastive_loss(projection, logits.detach(), targets, t.bank, cfg.contrastive, generator)
    loss = ce + cfg.contrastive.weight * nce
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    ema_update(t.teacher, t.student, t.ema_decay())
    t.step += 1
    # The bank is filled even when contrastive.weight = 0: acquisition fits UMAP on it.
    t.bank.update_from_batch(projection.detach(), torch.softmax(logits.detach(), 1), targets,
                             cfg.contrastive.bank_pixels_per_image)
    return {"loss": loss.detach(), "ce": ce.detach(), "nce": nce.detach(), "anchors": anchors}


def step_on_host(stats: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """:func:`train_step`'s statistics as Python numbers (loss, ce, nce floats; anchors int):
    a wait for the device, for logs only."""
    return {name: int(value) if name == "anchors" else float(value) for name, value in stats.items()}


# ---------------------------------------------------------------------------------------
# Rounds


def train_round(ws: Workspace, round: int, device: torch.device, resume: bool = False, progress: Progress | None = None,
                epochs: int | None = None, log: StepLog | None = None, partial: bool = False) -> dict[str, Any]:
    """Train round ``round`` on its cumulative labels; write ``rounds/NNN/checkpoint.pt``.

    Starts from round ``round-1``'s checkpoint (student, teacher, bank) unless round 0 or
    ``train.reinit_each_round``. Writes ``rounds/NNN/train_state.pt`` after every epoch and
    removes it at the end; ``resume`` continues from it. Returns the training summary
    (also stored as ``training`` in the round's metrics). ``partial`` trains on a round
    whose queried regions are not all answered (its unanswered ones return to the pool).
    """
    ws.require(round, "train", "train", partial=partial)
    init = None if round == 0 or ws.config.train.reinit_each_round else ws.checkpoint_path(round - 1)
    return _train(ws, ws.model_run(round), sparse_training_set(ws, round), tag=round, init=init,
                  epochs=ws.config.train.epochs_per_round if epochs is None else epochs, device=device, resume=resume,
                  progress=progress, log=log)


def train_final(ws: Workspace, round: int, device: torch.device, resume: bool = False, progress: Progress | None = None,
                epochs: int | None = None, log: StepLog | None = None) -> dict[str, Any]:
    """The final retraining on round ``round``'s labels (the paper's last stage): fresh
    weights, ``train.final_epochs``, into ``rounds/NNN/final/``.

    It runs the reference's schedule (epochs, optimiser, fresh weights) with the reference's
    seeds for the same ``train.seed`` (initial weights, shuffles, flips, dropout), so against
    :func:`train_full` in the same workspace the labels are the only difference, and
    mIoU(final) / mIoU(full) is the headline ratio of docs/method.md. The training set holds the
    images with a labelled pixel: while some have none, an epoch has fewer steps than the
    reference's. Round ``round`` needs its labels, not its own training.
    """
    ws.require(round, "train", "train --final", partial=ws.round_state(round).trained)
    return _train(ws, ws.model_run(round, final=True), sparse_training_set(ws, round), tag=FULL_TAG, init=None,
                  epochs=ws.config.train.final_epochs if epochs is None else epochs, device=device, resume=resume,
                  progress=progress, log=log)


def train_full(ws: Workspace, device: torch.device, resume: bool = False, progress: Progress | None = None,
               epochs: int | None = None, log: StepLog | None = None) -> dict[str, Any]:
    """The full-supervision reference: every pool label, ``final_epochs``, fresh weights;
    writes ``full/checkpoint.pt`` (and ``training`` in ``full/metrics.json``)."""
    return _train(ws, ws.model_run(None), full_training_set(ws), tag=FULL_TAG, init=None,
                  epochs=ws.config.train.final_epochs if epochs is None else epochs, device=device, resume=resume,
                  progress=progress, log=log)


def _seed(config: Config, tag: int, epoch: int) -> int:
    """Seed of (train.seed, round or FULL_TAG, epoch); epoch -1 seeds the weight initialisation."""
    return derive_seed(config.train.seed, TRAIN, tag, epoch)


def _train(ws: Workspace, run: ModelRun, data: TrainingSet, tag: int, init: Path | None, epochs: int, device: torch.device,
           resume: bool, progress: Progress | None, log: StepLog | None) -> dict[str, Any]:
    """The epoch loop shared by rounds, final retrainings and the full reference; writes
    ``run``'s checkpoint and ``training`` in its metrics. ``tag`` (a round or FULL_TAG)
    picks the seeds."""
    config = ws.config
    command = f"gpual train {ws.root} {run.flags}"
    _check_run(run, epochs, resume, command)
    from gpual.datasets import open_dataset

    classes = list(open_dataset(config.data.dataset, config.data.root).classes)
    meta = checkpoints.model_meta(config, len(classes), classes)
    torch.manual_seed(_seed(config, tag, -1))  # weight initialisation
    t = _make_trainer(config, meta, init, device)
    start_epoch, history, seconds_before = 0, [], 0.0
    if resume:
        start_epoch, history, seconds_before = checkpoints.restore(t, run.state, data, meta, command)

    t0 = time.perf_counter()
    # Resident: every image decoded once, here (after a resume is accepted; within `seconds`).
    train_batches = TrainingBatches(data, device, config.train)
    batches = len(train_batches)
    total_steps, steps = epochs * batches, start_epoch * batches
    t.ema_warmup, t.step = init is None, steps
    for epoch in range(start_epoch, epochs):
        seed = _seed(config, tag, epoch)
        torch.manual_seed(seed)  # dropout
        shuffle = torch.Generator().manual_seed(seed)
        sampling = torch.Generator(device=device).manual_seed(seed)  # flips, anchors, negatives
        loader = train_batches.epoch(shuffle)  # batches on `device`
        loss_sum, done = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device
        for batch, (images, targets) in enumerate(loader):
            if config.train.hflip:
                images, targets = random_hflip(images, targets, sampling)
            stats = train_step(t, images, targets.long(), sampling)
            loss_sum += stats["loss"]
            steps, done = steps + 1, done + 1
            if log:  # converting the statistics waits for the device: only when someone reads them
                log({"epoch": epoch + 1, "epochs": epochs, "batch": batch + 1, "batches": batches, **step_on_host(stats)})
            if progress:
                progress(steps, total_steps)
        history.append({"epoch": epoch + 1, "loss": float(loss_sum) / done})  # the epoch's one wait
        # The RNG needs no saving: every epoch reseeds it.
        checkpoints.save_resume_state(run.state, t, epoch + 1, history, data.fingerprint, meta,
                                      seconds_before + time.perf_counter() - t0)

    seconds = time.perf_counter() - t0
    summary = _summary(t, data, epochs, start_epoch if resume else None, seconds_before + seconds,
                       (epochs - start_epoch) * len(data.images) / seconds if seconds > 0 and epochs > start_epoch else None,
                       total_steps, device, init, history)
    summary["data"] = train_batches.summary()  # resident or streamed, bytes held, decode time
    # A new model: an evaluation of the one it replaces no longer describes it.
    ws.update_run_metrics(run, drop=("evaluation", "evaluations"), training=summary)
    checkpoints.save_checkpoint(run.checkpoint, t, {**meta, "round": run.round, "final": run.final, "epochs": epochs,
                                                    "fingerprint": data.fingerprint})
    run.state.unlink(missing_ok=True)
    return summary


def _check_run(run: ModelRun, epochs: int, resume: bool, command: str) -> None:
    """Refuse a run that cannot start: no epochs, a trained model, a resume state left
    behind (without ``resume``) or none to resume."""
    if epochs < 1:
        raise GpualError(f"epochs = {epochs} must be at least 1: fix --epochs or train.epochs_per_round / final_epochs", 2)
    if run.checkpoint.exists():
        raise GpualError(f"{run.checkpoint} already exists: this model is trained; delete it to train again")
    if run.state.exists() and not resume:
        raise GpualError(f"an interrupted training left {run.state}: continue it with `{command} --resume`, "
                         "or delete the file to start over")
    if resume and not run.state.exists():
        raise GpualError(f"nothing to resume: {run.state} does not exist; run `{command}` without --resume")


def _summary(t: Trainer, data: TrainingSet, epochs: int, resumed_from: int | None, seconds: float,
             images_per_second: float | None, steps: int, device: torch.device, init: Path | None,
             history: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run reports (``training`` in its metrics.json)."""
    return {
        "epochs": epochs,
        "resumed_from_epoch": resumed_from,
        "seconds": seconds,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_per_epoch": [h["loss"] for h in history],
        "images": len(data.images),
        "labeled_pixels": data.labeled_pixels,
        "steps": steps,
        "images_per_second": images_per_second,
        "device": str(device),
        "amp": t.amp,
        "backbone": t.config.model.backbone,
        "bank_filled": [int(n) for n in t.bank.filled()],
        "init": None if init is None else str(init),  # the checkpoint it started from; None: fresh weights
    }


def _make_trainer(config: Config, meta: dict[str, Any], init: Path | None, device: torch.device) -> Trainer:
    """Student, teacher and bank from ``init`` (the previous round's checkpoint) or fresh
    (reading ``model.backbone_checkpoint`` if set); a new Adam and loss scaler."""
    if init is not None:
        student, teacher, bank, init_meta = checkpoints.load_checkpoint(init, device)
        if (init_meta["model"], init_meta["num_classes"], init_meta["bank"]) != (meta["model"], meta["num_classes"], meta["bank"]):
            raise GpualError(
                f"{init} was trained with another model or bank config than gpual.toml now holds: restore the config, "
                "or set train.reinit_each_round = true"
            )
    else:
        student = build_model(config.model, int(meta["num_classes"]), output_stride=OUTPUT_STRIDE).to(device)
        teacher = make_teacher(student)
        bank = MemoryBank(int(meta["num_classes"]), config.contrastive.bank_size, config.model.projection_dim, device)
    student.to(memory_format=memory_format(device)).train()
    teacher.to(memory_format=memory_format(device))
    amp = amp_enabled(device, config.train.amp)
    return Trainer(student, teacher, bank, make_optimizer(student, config), make_scaler(device, amp), config, amp)
