"""The training data of a round: the images with labelled pixels and their sparse targets
(from the label store, never from the pool's ground truth), the full reference's dense
targets, and the flips applied on the device.

Targets are computed once per call and kept in host memory as (H, W) uint8 maps at the
working scale (255 = unlabelled); images are decoded in the loader's processes
(:class:`ImageTargets`). :class:`TrainingBatches` feeds a run's epochs: streamed (images
decoded again every epoch, batches copied to the device) or resident (decoded once, images
and targets kept on the device, batches formed there), with the same batches in the same
order either way (``train.resident``).
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpual.config import TrainConfig
from gpual.errors import GpualError
from gpual.loading import host_batches, pad_collate
from gpual.losses import IGNORE_INDEX
from gpual.workspace import Workspace

# train.resident = "auto" keeps the decoded training set on the device when it takes at
# most 1 / RESIDENT_SHARE of the device's free memory: the rest is the model's, its
# activations' and the acquisition's (and, on the CPU, the page cache's and other processes').
RESIDENT_SHARE = 4


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


class ImageTargets(Dataset):
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


class TrainingBatches:
    """A run's training batches, one pass per :meth:`epoch`: ((B, H, W, 3) uint8 images,
    (B, H, W) uint8 targets) on ``device``, padded right/bottom as :func:`~gpual.loading.pad_collate`
    pads (images 0, targets 255), ``train.batch_size`` images each (the last batch holds the rest).

    Resident (``resident`` True): every image is decoded once, here, through the same loader
    processes (``train.num_workers``) and errors as the streamed path, and the images and
    targets are kept on ``device``; an epoch forms its batches there by indexing and padding
    and reads no file. Streamed: every epoch decodes the images again in the loader processes
    and copies each batch to ``device``. An epoch's order is the one torch's
    ``DataLoader(shuffle=True, generator=generator)`` draws, in both modes from a DataLoader
    built the same way, so both give bit-identical batches in the same order and switching
    mode never changes a run's numbers.

    ``train.resident``: ``"auto"``: resident when :attr:`decoded_bytes` is at most
    1 / :data:`RESIDENT_SHARE` of the device's free memory; ``True``: resident, refused with a
    one-line error when the set exceeds the free memory; ``False``: streamed. ``free_bytes``:
    the free memory to decide against (default: :func:`free_memory_bytes` of ``device``).

    Attributes for the run's summary: ``resident``; ``decoded_bytes`` (H x W x 4 summed over
    the images, from the targets' shapes); ``resident_bytes`` (bytes held on ``device``, 0
    when streamed); ``free_bytes`` (what the choice was made against; None with
    ``train.resident = false`` or where the free memory is unknown); ``decode_seconds`` (the
    one decoding pass, 0 when streamed).
    """

    def __init__(self, data: TrainingSet, device: torch.device, train: TrainConfig, free_bytes: int | None = None) -> None:
        self.device, self.batch_size, self.num_workers = device, train.batch_size, train.num_workers
        self.dataset = ImageTargets(data.images, data.targets, data.scale, data.labels)
        self.decoded_bytes = decoded_bytes(data.targets)
        if train.resident is not False and free_bytes is None:
            free_bytes = free_memory_bytes(device)
        self.free_bytes = None if train.resident is False or free_bytes is None else int(free_bytes)
        self.resident = choose_resident(train.resident, self.decoded_bytes, self.free_bytes, len(self.dataset), device)
        self._images: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self.decode_seconds = 0.0
        if self.resident:
            self._decode()
        self.resident_bytes = sum(t.nbytes for t in self._images) + sum(t.nbytes for t in self._targets)

    def __len__(self) -> int:
        """Batches per epoch."""
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches on ``device``, shuffled by ``generator`` (a CPU torch.Generator,
        advanced exactly as a streamed epoch's DataLoader advances it). Resident batches are
        new tensors: nothing done to them changes the held set."""
        if not self.resident:
            for images, targets in host_batches(self.dataset, self.device, self.num_workers, batch_size=self.batch_size,
                                                collate_fn=pad_collate, shuffle=True, generator=generator):
                yield images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            return
        # The indices from torch's own sampling, not a copy of it: its DataLoader draws a seed
        # from the generator before the sampler's permutation, and a bare RandomSampler would not.
        order = DataLoader(range(len(self.dataset)), batch_size=self.batch_size, shuffle=True, generator=generator,
                           collate_fn=list)
        for index in order:
            yield pad_collate([(self._images[i], self._targets[i]) for i in index])

    def summary(self) -> dict[str, object]:
        """What a run's training summary records about its data path."""
        return {"resident": self.resident, "resident_bytes": self.resident_bytes, "decoded_bytes": self.decoded_bytes,
                "free_bytes": self.free_bytes, "decode_seconds": self.decode_seconds}

    def _decode(self) -> None:
        t0 = time.perf_counter()
        # In order, with the loader's processes and its one-line errors (a corrupt image, a size
        # mismatch); a generator of its own, so that decoding draws nothing from torch's global RNG.
        for image, target in host_batches(self.dataset, self.device, self.num_workers, generator=torch.Generator()):
            # copy=True on the CPU too: a tensor from a loader process lives in shared memory
            # holding a file descriptor open, and a run would hold one per image.
            self._images.append(image.to(self.device, non_blocking=True, copy=True))
            self._targets.append(target.to(self.device, non_blocking=True, copy=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.decode_seconds = time.perf_counter() - t0


def decoded_bytes(targets: list[np.ndarray]) -> int:
    """Bytes of a training set decoded into (H, W, 3) uint8 images and (H, W) uint8 targets:
    H x W x 4 per image, from the targets' shapes (an image must have its target's), without decoding."""
    return sum(4 * int(t.shape[0]) * int(t.shape[1]) for t in targets)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA: ``torch.cuda.mem_get_info``'s free bytes (the
    whole device's, other processes' use counted); CPU: free physical pages x page size
    (``os.sysconf``; memory the page cache could give back is not counted). None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):  # not every platform has SC_AVPHYS_PAGES
            return None
    return None


def choose_resident(setting: bool | str, needed: int, free: int | None, images: int, device: torch.device) -> bool:
    """``train.resident`` -> whether ``needed`` bytes of decoded training data (``images``
    images) are kept on ``device`` with ``free`` bytes free (None: unknown): ``"auto"``: when
    they fit in 1 / :data:`RESIDENT_SHARE` of ``free``; ``True``: yes, unless they exceed
    ``free`` (a one-line error, exit code 2); ``False``: no."""
    if setting is False:
        return False
    if setting is True:
        if free is not None and needed > free:
            raise GpualError(
                f"config train.resident = true, but the {images} decoded training images take {_mib(needed)} and {device} "
                f"has {_mib(free)} free: set train.resident = \"auto\" (resident only when they fit in a quarter of the "
                "free memory) or false (decode them from disk every epoch) in gpual.toml", 2)
        return True
    return free is not None and needed * RESIDENT_SHARE <= free


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


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
