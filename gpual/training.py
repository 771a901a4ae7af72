"""Training on a round's sparse labels (paper sections 3.2 and 4.2; docs/method.md).

``gpual train WORKSPACE --round N`` trains the student on the pixels revealed so far,
keeps the EMA teacher and the memory bank, and writes ``rounds/NNN/checkpoint.pt``;
``--full`` trains the same network and schedule on every pool label (the reference of
the headline ratio) into ``WORKSPACE/full/``; ``--round N --final`` retrains round N's
labels from fresh weights on that schedule (the paper's final retraining) into
``rounds/NNN/final/``.

Data: the training set is every pool image with at least one labeled pixel. Its sparse
targets (the label store's answers inside answered regions, 255 elsewhere; no round's
training reads the pool's ground truth) are computed once per call and kept in memory as uint8 maps at the working scale; images are decoded per batch
(in ``train.num_workers`` loader processes).

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
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gpual import atomic
from gpual.config import Config, ModelConfig
from gpual.errors import GpualError
from gpual.loading import host_batches, pad_collate
from gpual.losses import IGNORE_INDEX, contrastive_loss, cross_entropy
from gpual.memory_bank import MemoryBank
from gpual.model import SegmentationModel, build_model, normalize
from gpual.seeding import TRAIN, derive_seed
from gpual.teacher import ema_update, freeze, make_teacher
from gpual.workspace import ModelRun, Workspace

CHECKPOINT_FORMAT = "gpual-checkpoint-1"
RESUME_FORMAT = "gpual-train-state-1"
OUTPUT_STRIDE = 8  # see gpual.model: the fcn_resnet50 geometry for every backbone
FULL_TAG = -1  # the "round" of the full reference and of final retrainings in seeds

Progress = Callable[[int, int], None]  # (steps done, steps in total)
StepLog = Callable[[dict[str, Any]], None]  # after every step: epoch, batch, loss, ce, nce, anchors


# ---------------------------------------------------------------------------------------
# Device


def torch_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:K``) or ``auto`` -> a torch device; training needs torch only.

    Unlike :func:`gpual.backend.get_backend`, CUDA does not require RAPIDS here. ``auto``
    is CUDA when torch sees a GPU. Asking for CUDA without one raises GpualError (exit 2).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise GpualError(
                f"--device {name} was asked for but torch sees no CUDA device (torch {torch.__version__}): "
                "run with --device cpu, or install a CUDA build of torch on a GPU machine",
                2,
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GpualError(f"--device {name}: torch sees only {torch.cuda.device_count()} CUDA device(s)", 2)
        return device
    raise GpualError(f"--device {name!r} is not one of cpu, cuda, auto", 2)


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class TrainingSet:
    """Pool images with labeled pixels and their sparse targets, host memory.

    ``targets[i]``: (H, W) uint8, class ids where labeled, 255 elsewhere, at the working scale.
    """

    ids: list[str]
    images: list[Path]
    targets: list[np.ndarray]
    scale: float
    fingerprint: str  # identifies the labels, so a resume refuses changed ones
    labels: list[Path] | None = None  # the label files the targets were read from (the full reference); None: the label store

    @property
    def labeled_pixels(self) -> int:
        return int(sum(int((t != IGNORE_INDEX).sum()) for t in self.targets))


class _ImageTargets(Dataset):
    """Item i: (image (H, W, 3) uint8, target (H, W) uint8) CPU tensors; images decoded here.
    ``labels``: the label files the targets come from (None: the label store's answers)."""

    def __init__(self, images: list[Path], targets: list[np.ndarray], scale: float, labels: list[Path] | None = None) -> None:
        self.images, self.targets, self.scale, self.labels = images, targets, scale, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from gpual.datasets import read_image

        image = read_image(self.images[i], self.scale)
        target = self.targets[i]
        if image.shape[:2] != target.shape:
            if self.labels is not None:  # a ground-truth label file of another size: the label is at fault
                raise GpualError(
                    f"label {self.labels[i]} is {target.shape[1]}x{target.shape[0]} at scale {self.scale} but its image "
                    f"{self.images[i]} is {image.shape[1]}x{image.shape[0]}: the label file does not match its image; fix or replace it"
                )
            raise GpualError(  # the label store's targets have the size of the image's superpixel map
                f"{self.images[i]} is {image.shape[1]}x{image.shape[0]} at scale {self.scale} but its labels (on its superpixel "
                f"map) are {target.shape[1]}x{target.shape[0]}: the image changed since its superpixels were computed; "
                "restore the original image"
            )
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(target))


def sparse_training_set(ws: Workspace, round: int) -> TrainingSet:
    """The images with answers in rounds 0..``round`` and their sparse targets, read from the
    label store (:func:`gpual.label_store.sparse_targets`), never from the pool's ground
    truth; images whose answers are all void are left out."""
    from gpual.datasets import open_dataset
    from gpual.label_store import sparse_targets

    targets = sparse_targets(ws, round)
    if not targets:
        raise GpualError(f"round {round} has no labelled regions: label it first (`gpual annotate {ws.root} --round {round}`, "
                         f"`gpual import` or the simulated oracle `gpual label`)")
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    samples = {s.id: s for s in spec.samples(ws.config.data.pool_split)}
    ids, images, kept = [], [], []
    digest = hashlib.sha1(str(ws.config.data.scale).encode())
    for image_id, target in targets.items():
        if image_id not in samples:
            raise GpualError(f"labelled image {image_id!r} is not in the pool split of {spec.root}: restore the dataset")
        digest.update(image_id.encode() + b"\0" + target.tobytes())
        if (target != IGNORE_INDEX).any():
            ids.append(image_id)
            images.append(samples[image_id].image)
            kept.append(target)
    if not ids:
        raise GpualError(f"round {round}'s labelled regions are all void: no pixel to train on; select more regions")
    return TrainingSet(ids, images, kept, ws.config.data.scale, digest.hexdigest())


def full_training_set(ws: Workspace) -> TrainingSet:
    """Every pool image with its full ground truth (the full-supervision reference)."""
    from gpual.datasets import open_dataset, read_label

    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    scale = ws.config.data.scale
    ids, images, targets, labels = [], [], [], []
    for sample in spec.samples(ws.config.data.pool_split):
        if sample.label is None:
            raise GpualError(f"pool image {sample.image} has no label file: the full reference needs every label")
        ids.append(sample.id)
        images.append(sample.image)
        labels.append(sample.label)
        targets.append(read_label(spec, sample.label, scale))
    return TrainingSet(ids, images, targets, scale, _fingerprint(["full", str(scale), *ids]), labels)


def _fingerprint(parts: list[str]) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def random_hflip(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (image (H, W, 3), target (H, W)) pair of the batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device).to(images.device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)
    targets = torch.where(flip.view(-1, 1, 1), targets.flip(2), targets)
    return images, targets


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
    amp: bool  # float16 autocast + loss scaling; CUDA only
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
    """Adam (beta1, beta2), lr 5e-4, weight decay 2e-4 (paper 4.2)."""
    t = config.train
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


def train_step(t: Trainer, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    """One optimiser step on a batch: (B, H, W, 3) uint8 images, (B, H, W) int64 targets (255 =
    unlabeled), both on the model's device. Returns loss, ce, nce (floats) and anchors (count)."""
    cfg = t.config
    x = normalize(images)
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=t.amp):
        out = t.student.forward_projection(x)
    logits, projection = out["logits"].float(), out["projection"].float()  # losses in float32
    ce = cross_entropy(logits, targets)
    nce, anchors = ce.new_zeros(()), 0  # lambda = 0 is the no-contrastive ablation: skip the sampling
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
    return {"loss": float(loss.detach()), "ce": float(ce.detach()), "nce": float(nce.detach()), "anchors": anchors}


# ---------------------------------------------------------------------------------------
# Checkpoints


def _model_meta(config: Config, num_classes: int, classes: list[str]) -> dict[str, Any]:
    model = dataclasses.asdict(config.model)
    # The weights are in the checkpoint: never reload the file or the download.
    model["backbone_checkpoint"], model["backbone_weights"] = "", ""
    return {"model": model, "output_stride": OUTPUT_STRIDE, "num_classes": num_classes, "classes": classes,
            "bank": {"capacity": config.contrastive.bank_size, "dim": config.model.projection_dim}}


def save_checkpoint(path: Path, t: Trainer, meta: dict[str, Any]) -> None:
    """Write student, teacher and memory bank (+ ``meta``) to ``path`` atomically."""
    state = {"format": CHECKPOINT_FORMAT, "student": t.student.state_dict(), "teacher": t.teacher.state_dict(),
             "bank": t.bank.state_dict(), "meta": meta}
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read(path: Path, what: str, missing: str, mmap: bool = False) -> dict[str, Any]:
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


def _model_from_meta(meta: dict[str, Any], device: torch.device) -> SegmentationModel:
    config = ModelConfig(**{"backbone_weights": "", **meta["model"]})  # checkpoints before backbone_weights
    return build_model(config, int(meta["num_classes"]), output_stride=int(meta["output_stride"])).to(device)


def _bank_from_meta(meta: dict[str, Any], device: torch.device) -> MemoryBank:
    return MemoryBank(int(meta["num_classes"]), int(meta["bank"]["capacity"]), int(meta["bank"]["dim"]), device)


def load_checkpoint(path: Path, device: torch.device) -> tuple[SegmentationModel, SegmentationModel, MemoryBank, dict[str, Any]]:
    """(student (train mode), teacher (eval mode, frozen), memory bank, meta) from a round's
    checkpoint, all on ``device``. The architecture comes from the checkpoint's own meta."""
    state = _read(Path(path), "checkpoint", _missing(path))
    meta = state["meta"]
    student = _model_from_meta(meta, device)
    teacher, bank = make_teacher(student), _bank_from_meta(meta, device)
    _load_weights(student, state["student"], path)
    _load_weights(teacher, state["teacher"], path)
    bank.load_state_dict(state["bank"])
    student.train()
    teacher.eval()
    return student, teacher, bank, meta


def load_teacher(path: Path, device: torch.device) -> tuple[SegmentationModel, dict[str, Any]]:
    """(teacher (eval mode, frozen) on ``device``, meta): what evaluation and pool scoring
    run. The student is neither built nor read from disk."""
    state = _read(Path(path), "checkpoint", _missing(path), mmap=True)
    teacher = _model_from_meta(state["meta"], device)
    _load_weights(teacher, state["teacher"], path)
    return freeze(teacher), state["meta"]


def load_bank(path: Path, device: torch.device) -> MemoryBank:
    """The memory bank of a round's checkpoint on ``device`` (no model is built)."""
    state = _read(Path(path), "checkpoint", _missing(path), mmap=True)
    bank = _bank_from_meta(state["meta"], device)
    bank.load_state_dict(state["bank"])
    return bank


def _missing(path: Path) -> str:
    return f"{path} not found: train that round first (`gpual train`)"


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise GpualError(f"weights in {path} do not fit the model ({first}): delete it and train again") from None


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
    checkpoint, state_path = run.checkpoint, run.state
    if epochs < 1:
        raise GpualError(f"epochs = {epochs} must be at least 1: fix --epochs or train.epochs_per_round / final_epochs", 2)
    if checkpoint.exists():
        raise GpualError(f"{checkpoint} already exists: this model is trained; delete it to train again")
    if state_path.exists() and not resume:
        raise GpualError(f"an interrupted training left {state_path}: continue it with `{command} --resume`, or delete the file to start over")
    if resume and not state_path.exists():
        raise GpualError(f"nothing to resume: {state_path} does not exist; run `{command}` without --resume")

    from gpual.datasets import open_dataset

    classes = list(open_dataset(config.data.dataset, config.data.root).classes)
    meta = _model_meta(config, len(classes), classes)
    torch.manual_seed(_seed(config, tag, -1))  # weight initialisation
    t = _make_trainer(config, meta, init, device)
    start_epoch, history, seconds_before = 0, [], 0.0
    if resume:
        start_epoch, history, seconds_before = _restore(t, state_path, data, meta, command)

    dataset = _ImageTargets(data.images, data.targets, data.scale, data.labels)
    batch_size = config.train.batch_size
    batches = (len(dataset) + batch_size - 1) // batch_size
    total_steps, steps = epochs * batches, start_epoch * batches
    t.ema_warmup, t.step = init is None, steps
    t0 = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        seed = _seed(config, tag, epoch)
        torch.manual_seed(seed)  # dropout
        shuffle = torch.Generator().manual_seed(seed)
        sampling = torch.Generator(device=device).manual_seed(seed)  # flips, anchors, negatives
        loader = host_batches(dataset, device, config.train.num_workers, batch_size=batch_size, collate_fn=pad_collate,
                              shuffle=True, generator=shuffle)
        losses = []
        for batch, (images, targets) in enumerate(loader):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if config.train.hflip:
                images, targets = random_hflip(images, targets, sampling)
            stats = train_step(t, images, targets.long(), sampling)
            losses.append(stats["loss"])
            steps += 1
            if log:
                log({"epoch": epoch + 1, "epochs": epochs, "batch": batch + 1, "batches": batches, **stats})
            if progress:
                progress(steps, total_steps)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        state = {
            "format": RESUME_FORMAT, "student": t.student.state_dict(), "teacher": t.teacher.state_dict(),
            "bank": t.bank.state_dict(), "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(),
            "epoch": epoch + 1, "history": history, "fingerprint": data.fingerprint, "meta": meta,
            "seconds": seconds_before + time.perf_counter() - t0,
        }
        with atomic.atomic_path(state_path) as tmp:  # the RNG needs no saving: epochs reseed it
            torch.save(state, tmp)

    seconds = time.perf_counter() - t0
    run_images = (epochs - start_epoch) * len(dataset)
    summary = {
        "epochs": epochs,
        "resumed_from_epoch": start_epoch if resume else None,
        "seconds": seconds_before + seconds,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_per_epoch": [h["loss"] for h in history],
        "images": len(dataset),
        "labeled_pixels": data.labeled_pixels,
        "steps": total_steps,
        "images_per_second": run_images / seconds if seconds > 0 and run_images else None,
        "device": str(device),
        "amp": t.amp,
        "backbone": config.model.backbone,
        "bank_filled": [int(n) for n in t.bank.filled()],
        "init": None if init is None else str(init),  # the checkpoint it started from; None: fresh weights
    }
    # A new model: an evaluation of the one it replaces no longer describes it.
    ws.update_run_metrics(run, drop=("evaluation", "evaluations"), training=summary)
    save_checkpoint(checkpoint, t, {**meta, "round": run.round, "final": run.final, "epochs": epochs,
                                    "fingerprint": data.fingerprint})
    state_path.unlink(missing_ok=True)
    return summary


def _make_trainer(config: Config, meta: dict[str, Any], init: Path | None, device: torch.device) -> Trainer:
    """Student, teacher and bank from ``init`` (the previous round's checkpoint) or fresh
    (reading ``model.backbone_checkpoint`` if set); a new Adam and loss scaler."""
    if init is not None:
        student, teacher, bank, init_meta = load_checkpoint(init, device)
        if (init_meta["model"], init_meta["num_classes"], init_meta["bank"]) != (meta["model"], meta["num_classes"], meta["bank"]):
            raise GpualError(
                f"{init} was trained with another model or bank config than gpual.toml now holds: restore the config, "
                "or set train.reinit_each_round = true"
            )
    else:
        student = build_model(config.model, int(meta["num_classes"]), output_stride=OUTPUT_STRIDE).to(device)
        teacher = make_teacher(student)
        bank = MemoryBank(int(meta["num_classes"]), config.contrastive.bank_size, config.model.projection_dim, device)
    student.train()
    amp = config.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    return Trainer(student, teacher, bank, make_optimizer(student, config), scaler, config, amp)


def _restore(t: Trainer, state_path: Path, data: TrainingSet, meta: dict[str, Any], command: str) -> tuple[int, list, float]:
    """Load an interrupted run's last epoch into ``t``; (epochs done, loss history, seconds spent)."""
    state = _read(state_path, "training state", f"{state_path} not found")
    if state.get("fingerprint") != data.fingerprint or state["meta"]["model"] != meta["model"]:
        raise GpualError(f"{state_path} was written for other labels or another model config: delete it and run `{command}`")
    _load_weights(t.student, state["student"], state_path)
    _load_weights(t.teacher, state["teacher"], state_path)
    t.bank.load_state_dict(state["bank"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"]), float(state["seconds"])
