"""The teacher's forward over the pool, pooled per superpixel as it goes (the first step
of ``gpual select``): round N-1's teacher runs over the pool in batches, and per-pixel
probabilities and embeddings never leave the model's device (they are pooled at once by
:class:`gpual.acquisition.pooling.RegionPooler`), so memory grows with regions, not pixels.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gpual.backend import Backend, amp_dtype
from gpual.datasets import read_image
from gpual.errors import GpualError
from gpual.loading import StageClock, Waited, host_batches
from gpual.seeding import MC_DROPOUT, derive_seed
from gpual.superpixels import load_superpixels
from gpual.workspace import Workspace

Progress = Callable[[int, int], None]  # (images done, images in total)


class PoolBatches(Dataset):
    """Batch ``k`` of the pool, as one item: (images (B,H,W,3) uint8, region ids (B,H,W) int32
    global; -1 = padding, spans (B, 2) int64 (first region id, region count) per image),
    host tensors.

    Images of different sizes in one batch are padded to the largest; padded pixels carry
    region id -1 and are ignored by pooling. Batches are formed from consecutive rows of
    ``index`` (which may be a slice of the superpixel index: a Dask shard). Ids travel as
    int32 (half the shared memory and host-to-device copy of int64) and are widened on
    the device.
    """

    def __init__(self, ws: Workspace, index: pd.DataFrame, batch_size: int) -> None:
        self.ws, self.index, self.batch_size = ws, index, batch_size
        if len(index) and int(index["offset"].iloc[-1] + index["n_regions"].iloc[-1]) > np.iinfo(np.int32).max:
            raise GpualError(f"{ws.root}'s pool has more than {np.iinfo(np.int32).max} regions: split it into several workspaces")

    def __len__(self) -> int:
        return (len(self.index) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ws, scale = self.ws, self.ws.config.data.scale
        rows = self.index.iloc[k * self.batch_size : (k + 1) * self.batch_size]
        h, w = int(rows["height"].max()), int(rows["width"].max())
        images = np.zeros((len(rows), h, w, 3), dtype=np.uint8)
        regions = np.full((len(rows), h, w), -1, dtype=np.int32)
        for i, row in enumerate(rows.itertuples()):
            image = read_image(row.path, scale)
            sp = load_superpixels(ws, row.image, self.index)
            if image.shape[:2] != sp.shape:
                raise GpualError(
                    f"{row.path} is {image.shape[1]}x{image.shape[0]} but its superpixels are {sp.shape[1]}x{sp.shape[0]}: "
                    "the image changed since its superpixels were computed; restore the original image (the rounds are labelled on it)"
                )
            images[i, : image.shape[0], : image.shape[1]] = image
            regions[i, : sp.shape[0], : sp.shape[1]] = sp.astype(np.int32) + np.int32(row.offset)
        spans = rows[["offset", "n_regions"]].to_numpy(np.int64)
        return torch.from_numpy(images), torch.from_numpy(regions), torch.from_numpy(np.ascontiguousarray(spans))


def pool_with_teacher(
    ws: Workspace, round: int, backend: Backend, index: pd.DataFrame, n_regions: int, strategy: str,
    progress: Progress | None,
) -> tuple[Any, torch.Tensor, dict[str, float]]:
    """Teacher forward over the pool with per-batch pooling; returns (RegionStats, bank vectors, timings)."""
    from gpual.training.checkpoints import load_bank, load_teacher

    t0 = time.perf_counter()
    teacher, _ = load_teacher(ws.checkpoint_path(round - 1), backend.device)
    bank = load_bank(ws.checkpoint_path(round - 1), backend.device)
    loaded = time.perf_counter() - t0
    stats, timings = pool_images(ws, round, teacher, index, strategy, backend.device, backend.amp(ws.config.train.amp), progress)
    if stats.n_regions != n_regions:
        raise GpualError(f"pooled {stats.n_regions} regions but the index counts {n_regions}: run `gpual superpixels {ws.root}` again")
    bank_vectors, _ = bank.vectors()
    return stats, bank_vectors, {"checkpoint_load": loaded, **timings}


@torch.no_grad()
def pool_images(
    ws: Workspace, round: int, teacher: torch.nn.Module, index: pd.DataFrame, strategy: str, device: torch.device,
    amp: bool, progress: Progress | None = None, first_batch: int = 0, loader_workers: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """Teacher forward + per-superpixel pooling over the images of ``index``.

    ``index`` is the superpixel index or a contiguous slice of its rows (a Dask shard,
    :mod:`gpual.distributed`) starting at batch ``first_batch`` of the whole pool (row
    ``first_batch * acquisition.batch_size``): every batch is then the very batch a
    single-process run forms, so a shard's statistics equal the single-process ones bit
    for bit on CPU at the same torch thread count (a convolution's float sums depend on
    it; Dask workers run one thread). Returns (RegionStats of the slice's regions, global ids
    ``offset[0] ..``, on ``device``; {"forward", "pooling", "loader_wait"} seconds: the
    first two device time on CUDA, the last the host's wait for decoded batches). The
    teacher is in eval mode on ``device``; BALD's Monte-Carlo dropout draws are seeded
    per global batch (config seed, round, batch number), so they too do not depend on the
    sharding.

    Batches are decoded in ``loader_workers`` processes (default ``train.num_workers``;
    0 inside daemonic processes such as Dask workers) into pinned memory on CUDA; stage
    times come from CUDA events, so the loop never waits for the device (one wait at the
    end).
    """
    from gpual.acquisition.pooling import RegionPooler
    from gpual.model import normalize

    if len(index) == 0:
        raise GpualError("no pool images to score: the superpixel index is empty; run `gpual superpixels`")
    offsets = index["offset"].to_numpy(np.int64)
    sizes = index["n_regions"].to_numpy(np.int64)
    if (offsets[1:] != offsets[:-1] + sizes[:-1]).any():
        raise GpualError(f"{ws.root}'s superpixel index has non-cumulative region offsets: run `gpual superpixels {ws.root}` again")
    batch_size = ws.config.acquisition.batch_size
    local = index.assign(offset=offsets - offsets[0])  # region ids relative to this slice's first region
    mc_passes = ws.config.acquisition.mc_passes if strategy == "bald" else 0
    teacher.eval()
    pooler = RegionPooler(int(sizes.sum()), teacher.embedding_dim, device)
    clock = StageClock(device)
    workers = ws.config.train.num_workers if loader_workers is None else loader_workers
    done = 0
    batches = Waited(host_batches(PoolBatches(ws, local, batch_size), device, workers))
    for batch, (images, regions, spans) in enumerate(batches, start=first_batch):
        images, regions = images.to(device, non_blocking=True), regions.to(device, non_blocking=True).long()
        clock.start()
        x = normalize(images)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            out = teacher.forward_projection(x)  # the (B, D, h, w) map: the pooler upsamples it implicitly
        probs = torch.softmax(out["logits"].float(), dim=1)
        mc_seed = derive_seed(ws.config.acquisition.seed, MC_DROPOUT, round, batch)
        mc_probs = _mc_dropout_probs(teacher, x, mc_passes, amp, mc_seed) if mc_passes else None
        clock.mark("forward")
        pooler.add(probs, out["projection"], regions, spans.tolist(), mc_probs=mc_probs)
        clock.mark("pooling")
        done += len(images)
        if progress:
            progress(done, len(index))
    seconds = clock.seconds()
    return pooler.result(), {"forward": seconds.get("forward", 0.0), "pooling": seconds.get("pooling", 0.0),
                             "loader_wait": batches.seconds}


def _mc_dropout_probs(model: torch.nn.Module, x: torch.Tensor, passes: int, amp: bool, seed: int) -> torch.Tensor:
    """(T,B,C,H,W) softmax probabilities with only the dropout layers in training mode (BALD).

    The dropout masks come from ``seed`` (the caller's RNG state is restored afterwards).
    """
    dropouts = model.dropout_modules()
    for m in dropouts:
        m.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            samples = []
            for _ in range(passes):
                with torch.autocast(x.device.type, dtype=amp_dtype(x.device), enabled=amp):
                    samples.append(torch.softmax(model.segment(x).float(), dim=1))
            return torch.stack(samples)
    finally:
        for m in dropouts:
            m.eval()
