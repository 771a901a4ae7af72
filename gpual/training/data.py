"""The training data of a round: the images with labelled pixels and their sparse targets
(from the label store, never from the pool's ground truth), the full reference's dense
targets, and the flips applied on the device.

Targets are computed once per call and kept in host memory as (H, W) uint8 maps at the
working scale (255 = unlabelled); images are decoded per batch in the loader's processes
(:class:`ImageTargets`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gpual.errors import GpualError
from gpual.losses import IGNORE_INDEX
from gpual.workspace import Workspace


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
