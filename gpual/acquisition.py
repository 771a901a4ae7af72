"""One acquisition round, ``gpual select WORKSPACE --round N``, end to end:

``forward -> pool -> handoff -> (UMAP) -> (KMeans) -> rank -> manifest``

The teacher of round N-1 runs over the pool in batches; per-pixel probabilities and
embeddings never leave the model's device and are pooled per superpixel at once
(:class:`gpual.pooling.RegionPooler`), so memory grows with regions, not pixels. The
pooled statistics go zero-copy (DLPack) to the backend's namespace for the strategy
(:func:`gpual.strategies.select_regions`); only the final manifest is copied to the
host. Round 0 has no model: it draws ``init_budget`` regions uniformly at random.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gpual import atomic
from gpual.backend import Backend
from gpual.datasets import read_image
from gpual.errors import GpualError
from gpual.loading import StageClock, Waited, host_batches
from gpual.seeding import MC_DROPOUT, SELECT, derive_seed
from gpual.strategies import STRATEGY_NAMES, labeled_class_pixels, pixel_budget, select_regions
from gpual.superpixels import check_images_unchanged, load_superpixels, read_index, read_region_pixels
from gpual.workspace import QUERY_COLUMNS, Workspace

Progress = Callable[[int, int], None]


@dataclass
class AcquisitionResult:
    """What one ``select`` wrote, for the CLI's summary."""

    round: int
    strategy: str
    budget: int
    candidates: int
    manifest: pd.DataFrame  # host copy of rounds/NNN/query.parquet
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # adjustments the strategy made (UMAP), one line each


def parse_budget_pixels(text: str) -> float:
    """``"1.5%"`` or ``"0.015"`` -> 0.015 (a share of the pool's pixels)."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise GpualError(f"--budget-pixels {text!r} is not a share: write e.g. 1.5% or 0.015", 2) from None
    if not 0 < share <= 1:
        raise GpualError(f"--budget-pixels {text!r} must be above 0% and at most 100%", 2)
    return share


def resolve_budget(ws: Workspace, round: int, budget: int | None, budget_pixels: str | None,
                   candidate_pixels: np.ndarray) -> int:
    """The round's budget in regions: ``--budget``, else ``--budget-pixels`` converted with the
    candidates' mean region size, else the config (``init_budget`` for round 0)."""
    if budget is not None and budget_pixels is not None:
        raise GpualError("give --budget (regions) or --budget-pixels (share), not both", 2)
    if budget_pixels is not None:
        share = parse_budget_pixels(budget_pixels)
        mean_pixels = float(candidate_pixels.mean()) if len(candidate_pixels) else 1.0
        pool_pixels = float(read_index(ws)["pixels"].sum())
        budget = max(1, round_half_up(share * pool_pixels / mean_pixels))
    if budget is None:
        budget = ws.config.acquisition.init_budget if round == 0 else ws.config.acquisition.budget
    if budget <= 0:
        raise GpualError(f"budget {budget} must be a positive number of regions", 2)
    if budget > len(candidate_pixels):
        raise GpualError(
            f"budget of {budget} regions is larger than the {len(candidate_pixels)} unlabeled candidate regions: lower --budget"
        )
    return budget


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def acquire(
    ws: Workspace,
    round: int,
    backend: Backend,
    strategy: str | None = None,
    budget: int | None = None,
    budget_pixels: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    cluster: Any | None = None,
) -> AcquisitionResult:
    """Select round ``round``'s regions and write ``rounds/NNN/query.parquet`` (+ overlays, metrics).

    Refuses, writing nothing, when round ``round-1`` is not trained, when round ``round`` is
    already selected (unless ``force``), for an unknown strategy or a budget larger than
    the candidates. ``cluster`` (a :class:`gpual.distributed.DaskCluster`) runs the
    teacher forward, pooling, UMAP transform and KMeans on its workers; a worker lost
    meanwhile fails the round before anything is written.
    """
    strategy = strategy or ("random" if round == 0 else ws.config.acquisition.strategy)
    if strategy not in STRATEGY_NAMES:
        raise GpualError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_NAMES)}", 2)
    if round == 0 and strategy != "random":
        raise GpualError("round 0 has no trained model to score regions: it is drawn at random; use --strategy random or omit it", 2)
    ws.require(round, "select", "select")
    if ws.query_path(round).exists() and not force:
        raise GpualError(f"round {round} is already selected: pass --force to select it again (its later steps are discarded)")
    later = [r for r in ws.rounds() if r > round]
    if force and later:
        raise GpualError(
            f"round {later[0]} is built on round {round}'s labels: selecting round {round} again would leave it stale; "
            f"delete {ws.round_dir(later[0])} and the rounds after it first, or start a new workspace"
        )

    t_start = time.perf_counter()
    index = read_index(ws)
    check_images_unchanged(ws, index)  # every region of the pool is a candidate: no stale map
    offsets = index["offset"].to_numpy(np.int64)
    n_regions = int(index["n_regions"].sum())
    labeled = ws.read_labeled(round - 1)
    labeled_ids = _global_ids(index, labeled)
    region_pixels = read_region_pixels(ws, index)

    candidate_mask = np.ones(n_regions, dtype=bool)
    candidate_mask[labeled_ids] = False
    acq = ws.config.acquisition
    cap = None  # the round's budget in pixels (acquisition.budget_unit = "pixels"), else None
    if round > 0 and budget is None and acq.budget_unit == "pixels":
        budget_pixels = budget_pixels or str(acq.budget_pixels)
        cap = pixel_budget(parse_budget_pixels(budget_pixels), int(index["pixels"].sum()))
    budget = resolve_budget(ws, round, budget, budget_pixels, region_pixels[candidate_mask])

    timings: dict[str, float] = {}
    device = backend.device
    candidates = torch.from_numpy(np.flatnonzero(candidate_mask)).to(device)
    # Every Dask computation happens inside the guard, before anything is written.
    with cluster.round_guard(round) if cluster is not None else nullcontext():
        if strategy == "random":
            stats, bank_vectors, labeled_embedding = _random_stats(region_pixels, device), None, None
        else:
            pool = cluster.pool_with_teacher if cluster is not None else _pool_with_teacher
            stats, bank_vectors, timings = pool(ws, round, backend, index, n_regions, strategy, progress)
            labeled_embedding = stats.embedding[torch.from_numpy(labeled_ids).to(device)] if strategy == "coreset" else None
        class_pixels = None  # labelled pixels per class, for acquisition.class_balance
        if acq.class_balance > 0 and stats.class_votes is not None:
            class_pixels = labeled_class_pixels(labeled, stats.class_votes.shape[1], device)

        selection = select_regions(
            strategy,
            backend,
            stats,
            candidates,
            budget,
            bank_vectors=bank_vectors,
            region_score=ws.config.acquisition.region_score,
            umap_cfg=ws.config.umap,
            kmeans_cfg=ws.config.kmeans,
            seed=derive_seed(ws.config.acquisition.seed, SELECT, round),
            labeled_embedding=labeled_embedding,
            dask=cluster,
            budget_pixels=cap,
            clusters_per_budget=acq.clusters_per_budget,
            class_balance=acq.class_balance,
            class_pixels=class_pixels,
        )
    timings.update(selection.timings)

    t0 = time.perf_counter()
    manifest = _manifest(backend, index, offsets, candidates, stats.pixels, selection, round, strategy)
    host = manifest.to_pandas() if backend.is_cuda else manifest
    timings["manifest"] = time.perf_counter() - t0

    from gpual.overlays import write_overlays  # drawing is host work on the final, small selection

    t0 = time.perf_counter()
    write_overlays(ws, round, index, host, ws.config.acquisition.overlays)
    timings["overlays"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    ws.update_metrics(
        round,
        acquisition={
            "strategy": strategy,
            "budget_regions": budget,
            **({"budget_pixels": cap, "selected_regions": int(len(host))} if cap is not None else {}),
            "candidates": int(candidate_mask.sum()),
            "selected_pixels": int(host["pixels"].sum()),
            "backend": backend.name,
            **({"dask": cluster.description} if cluster is not None else {}),
            "timings_s": timings,
            **({"notes": selection.notes} if selection.notes else {}),
        },
    )
    _discard_later_steps(ws, round)
    # The query file is the step's commit marker: written last, atomically.
    ws.write_query(round, manifest)
    return AcquisitionResult(round, strategy, budget, int(candidate_mask.sum()), host, timings, list(selection.notes))


def _discard_later_steps(ws: Workspace, round: int) -> None:
    """A forced re-selection invalidates this round's answers (the answer table first: it
    is the label store's commit), model, final retraining and their records (labeling, training, evaluation)."""
    for path in (ws.answers_path(round), ws.checkpoint_path(round), ws.resume_path(round)):
        path.unlink(missing_ok=True)
    for folder in (ws.final_dir(round), ws.answers_dir(round)):
        if folder.exists():  # renamed first (atomic), so an interruption never leaves half of it
            gone = folder.with_name(f".{folder.name}.discarded")
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(folder, gone)
            shutil.rmtree(gone)
    metrics = ws.read_metrics(round)
    stale = {"labeling", "training", "evaluation", "evaluations"} & set(metrics)
    if stale:
        atomic.write_json(ws.metrics_path(round), {k: v for k, v in metrics.items() if k not in stale})


def _global_ids(index: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """(image, region) rows -> global region ids (offset of the image + local id)."""
    if len(table) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = pd.Series(index["offset"].to_numpy(np.int64), index=index["image"].astype(str))
    missing = set(table["image"].astype(str)) - set(offsets.index)
    if missing:
        raise GpualError(f"labeled images {sorted(missing)[:3]} are not in the superpixel index: was the pool changed? start a new workspace")
    return offsets.loc[table["image"].astype(str)].to_numpy() + table["region"].to_numpy(np.int64)


def _random_stats(region_pixels: np.ndarray, device: torch.device) -> Any:
    """Statistics for the random strategy: only pixel counts are needed (for the manifest)."""
    from gpual.pooling import RegionStats

    pixels = torch.from_numpy(region_pixels).to(device)
    zeros = torch.zeros(len(region_pixels), dtype=torch.float32, device=device)
    return RegionStats(
        embedding=torch.zeros(len(region_pixels), 1, device=device),
        entropy_sum=zeros,
        entropy_mean=zeros,
        margin_mean=zeros,
        maxprob_mean=zeros,
        bald=None,
        pixels=pixels,
    )


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


def _pool_with_teacher(
    ws: Workspace, round: int, backend: Backend, index: pd.DataFrame, n_regions: int, strategy: str,
    progress: Progress | None,
) -> tuple[Any, torch.Tensor, dict[str, float]]:
    """Teacher forward over the pool with per-batch pooling; returns (RegionStats, bank vectors, timings)."""
    from gpual.training import load_bank, load_teacher

    teacher, _ = load_teacher(ws.checkpoint_path(round - 1), backend.device)
    bank = load_bank(ws.checkpoint_path(round - 1), backend.device)
    stats, timings = pool_images(ws, round, teacher, index, strategy, backend.device, backend.is_cuda and ws.config.train.amp, progress)
    if stats.n_regions != n_regions:
        raise GpualError(f"pooled {stats.n_regions} regions but the index counts {n_regions}: run `gpual superpixels {ws.root}` again")
    bank_vectors, _ = bank.vectors()
    return stats, bank_vectors, timings


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
    from gpual.model import normalize
    from gpual.pooling import RegionPooler

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
        with torch.autocast(device.type, enabled=amp):
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
                with torch.autocast(x.device.type, enabled=amp):
                    samples.append(torch.softmax(model.segment(x).float(), dim=1))
            return torch.stack(samples)
    finally:
        for m in dropouts:
            m.eval()


def _manifest(
    backend: Backend, index: pd.DataFrame, offsets: np.ndarray, candidates: torch.Tensor, pixels: torch.Tensor,
    selection: Any, round: int, strategy: str,
) -> Any:
    """The selection as a DataFrame of ``backend.frame`` (cuDF on GPU) with QUERY_COLUMNS.

    Global ids are split into (image, local region) in the array namespace; image names
    are gathered from a small frame-library Series of the index's names by position, so no
    per-region host copy is needed before the frame exists.
    """
    xp = backend.xp
    chosen = xp.asarray(backend.from_torch(candidates))[selection.indices]
    region_pixels = xp.asarray(backend.from_torch(pixels))[chosen]
    offsets_xp = xp.asarray(offsets)
    image_pos = xp.searchsorted(offsets_xp, chosen, side="right") - 1
    local = chosen - offsets_xp[image_pos]
    frame = backend.frame
    names = frame.Series(index["image"].astype(str).tolist())
    table = frame.DataFrame(
        {
            "image": names.take(image_pos).reset_index(drop=True),
            "region": local.astype(xp.int32),
            "score": xp.asarray(selection.scores).astype(xp.float64),
            "pixels": region_pixels.astype(xp.int64),
        }
    )
    table["round"] = round
    table["strategy"] = strategy
    # cuDF spells pandas' "string" dtype "str"; the parquet file is the same.
    dtypes = {k: ("str" if backend.is_cuda and v == "string" else v) for k, v in QUERY_COLUMNS.items()}
    return table[list(QUERY_COLUMNS)].reset_index(drop=True).astype(dtypes)
