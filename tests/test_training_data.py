"""TrainingBatches: resident and streamed training batches, bit-identical and in the same order."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpual.config import TrainConfig
from gpual.errors import GpualError
from gpual.loading import host_batches, pad_collate
from gpual.training.data import ImageTargets, TrainingBatches, TrainingSet, decoded_bytes

# (H, W) of the images: different sizes, so batches are padded; 7 images in batches of 3
# leave a last batch of 1.
SIZES = [(20, 24), (24, 20), (16, 16), (20, 24), (12, 28), (24, 24), (18, 22)]
BATCH = 3
PLENTY = 2**40  # free bytes: room for anything here


def training_set(root: Path, sizes: list[tuple[int, int]] = SIZES) -> TrainingSet:
    """PNG images of ``sizes`` with random pixels, image i's pixel (0, 0) red = i (to tell the
    images apart), and random sparse targets (255 = unlabelled)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ids, images, targets = [], [], []
    for i, (h, w) in enumerate(sizes):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[0, 0, 0] = i
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        target = rng.integers(0, 5, (h, w), dtype=np.uint8)
        target[rng.random((h, w)) < 0.5] = 255
        ids.append(f"img{i}")
        images.append(path)
        targets.append(target)
    return TrainingSet(ids, images, targets, 1.0, "test")


def train_config(resident: bool | str, num_workers: int | str = 0) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), batch_size=BATCH, num_workers=num_workers, resident=resident)


def epoch(batches: TrainingBatches, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(batches.epoch(torch.Generator().manual_seed(seed)))


def image_order(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    return [images[:, 0, 0, 0].tolist() for images, _ in batches]


def assert_same_batches(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert images_a.dtype == images_b.dtype == torch.uint8 and targets_a.dtype == targets_b.dtype == torch.uint8
        assert images_a.shape == images_b.shape and targets_a.shape == targets_b.shape
        assert torch.equal(images_a.cpu(), images_b.cpu()) and torch.equal(targets_a.cpu(), targets_b.cpu())


@pytest.mark.parametrize("workers", [0, 2])
def test_resident_and_streamed_batches_are_bit_identical_in_the_dataloaders_order(tmp_path, workers) -> None:
    data = training_set(tmp_path / "images")
    cpu = torch.device("cpu")
    resident = TrainingBatches(data, cpu, train_config(True, workers), free_bytes=PLENTY)
    streamed = TrainingBatches(data, cpu, train_config(False, workers))
    assert resident.resident and not streamed.resident and len(resident) == len(streamed) == 3
    orders = []
    for seed in (0, 1, 2):
        g_resident, g_streamed, g_today = (torch.Generator().manual_seed(seed) for _ in range(3))
        from_resident = list(resident.epoch(g_resident))
        from_streamed = list(streamed.epoch(g_streamed))
        # Today's call in the epoch loop, literally: the order both modes must reproduce.
        today = list(host_batches(ImageTargets(data.images, data.targets, data.scale), cpu, workers, batch_size=BATCH,
                                  collate_fn=pad_collate, shuffle=True, generator=g_today))
        assert_same_batches(from_resident, from_streamed)
        assert_same_batches(from_resident, today)
        # The generator is left where the DataLoader leaves it.
        assert torch.equal(g_resident.get_state(), g_today.get_state())
        assert torch.equal(g_streamed.get_state(), g_today.get_state())
        order = image_order(from_resident)
        assert [len(b) for b in order] == [3, 3, 1] and sorted(sum(order, [])) == list(range(len(SIZES)))
        orders.append(order)
        # Padding as pad_collate's: right/bottom, images 0, targets 255.
        for (images, targets), ids in zip(from_resident, order):
            assert images.shape[1:3] == (max(SIZES[i][0] for i in ids), max(SIZES[i][1] for i in ids))
            for row, i in enumerate(ids):
                h, w = SIZES[i]
                assert torch.equal(targets[row, :h, :w], torch.from_numpy(data.targets[i]))
                assert (targets[row, h:] == 255).all() and (targets[row, :, w:] == 255).all()
                assert (images[row, h:] == 0).all() and (images[row, :, w:] == 0).all()
    assert orders[0] != orders[1] or orders[1] != orders[2]  # the seeds shuffle differently
    assert any(o != [[0, 1, 2], [3, 4, 5], [6]] for o in orders)  # shuffled at all


def test_auto_is_resident_when_the_set_fits_in_a_quarter_of_the_free_memory(tmp_path) -> None:
    data = training_set(tmp_path / "images")
    needed = sum(h * w * 4 for h, w in SIZES)
    assert decoded_bytes(data.targets) == needed
    cpu = torch.device("cpu")
    fits = TrainingBatches(data, cpu, train_config("auto"), free_bytes=4 * needed)
    assert fits.resident and fits.resident_bytes == fits.decoded_bytes == needed and fits.free_bytes == 4 * needed
    assert fits.decode_seconds > 0
    short = TrainingBatches(data, cpu, train_config("auto"), free_bytes=4 * needed - 1)
    assert not short.resident and short.resident_bytes == 0 and short.decoded_bytes == needed
    off = TrainingBatches(data, cpu, train_config(False), free_bytes=PLENTY)
    assert not off.resident and off.free_bytes is None
    assert off.summary() == {"resident": False, "resident_bytes": 0, "decoded_bytes": needed, "free_bytes": None,
                             "decode_seconds": 0.0}
    default = TrainingBatches(data, cpu, train_config("auto"))  # this machine's free memory: a few KiB fit
    assert default.resident and default.free_bytes > 4 * needed


def test_resident_true_that_cannot_fit_is_one_line_error_naming_the_key(tmp_path) -> None:
    data = training_set(tmp_path / "images")
    needed = decoded_bytes(data.targets)
    cpu = torch.device("cpu")
    with pytest.raises(GpualError) as info:
        TrainingBatches(data, cpu, train_config(True), free_bytes=needed - 1)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert "train.resident = true" in message and 'train.resident = "auto"' in message and "or false" in message
    assert "7 decoded training images" in message and "gpual.toml" in message
    # true does not apply auto's quarter: the set need only fit in the free memory.
    assert TrainingBatches(data, cpu, train_config(True), free_bytes=needed).resident


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_or_resized_image_is_the_streamed_paths_one_line_error_when_resident(tmp_path, workers) -> None:
    data = training_set(tmp_path / "images")
    cpu = torch.device("cpu")
    data.images[4].write_bytes(b"not a png")
    cv2.imwrite(str(data.images[5]), np.zeros((10, 10, 3), np.uint8))  # another size than its target
    for bad, needle in ((4, "is not a readable image"), (5, "the image changed since its superpixels were computed")):
        keep = [0, 1, 2, 3, bad]  # good images and one bad one
        items = TrainingSet([data.ids[i] for i in keep], [data.images[i] for i in keep], [data.targets[i] for i in keep],
                            1.0, "test")
        with pytest.raises(GpualError) as streamed:
            epoch(TrainingBatches(items, cpu, train_config(False, workers)), 0)
        with pytest.raises(GpualError) as resident:
            TrainingBatches(items, cpu, train_config(True, workers), free_bytes=PLENTY)
        assert str(resident.value) == str(streamed.value) and "\n" not in str(resident.value)
        assert str(data.images[bad]) in str(resident.value) and needle in str(resident.value)


def test_a_resident_epoch_reads_no_file_and_its_batches_are_copies(tmp_path) -> None:
    data = training_set(tmp_path / "images")
    cpu = torch.device("cpu")
    resident = TrainingBatches(data, cpu, train_config(True), free_bytes=PLENTY)
    first = epoch(resident, 7)
    for images, targets in first:  # what training does to a batch must not reach the held set
        images.zero_()
        targets.fill_(0)
    for path in data.images:
        path.unlink()
    (tmp_path / "images").rename(tmp_path / "gone")
    again = epoch(resident, 7)
    assert_same_batches(again, epoch(resident, 7))
    assert image_order(again) != [[0, 0, 0], [0, 0, 0], [0]]
    streamed = TrainingBatches(data, cpu, train_config(False))
    with pytest.raises(GpualError, match="cannot read image"):
        epoch(streamed, 7)


@pytest.mark.gpu
def test_resident_batches_live_on_the_cuda_device(tmp_path) -> None:
    # GPU path: not run on the CPU machine.
    data = training_set(tmp_path / "images")
    cuda = torch.device("cuda", torch.cuda.current_device())
    resident = TrainingBatches(data, cuda, train_config("auto", 2))  # a few KiB: auto keeps them on the device
    streamed = TrainingBatches(data, cuda, train_config(False, 2))
    assert resident.resident and resident.resident_bytes == resident.decoded_bytes
    assert 0 < resident.free_bytes <= torch.cuda.mem_get_info(cuda)[1]
    assert all(t.device == cuda for t in resident._images + resident._targets)
    from_resident, from_streamed = epoch(resident, 3), epoch(streamed, 3)
    assert all(images.device == cuda and targets.device == cuda for images, targets in from_resident + from_streamed)
    assert_same_batches(from_resident, from_streamed)
