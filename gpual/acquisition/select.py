"""One acquisition round, ``gpual select WORKSPACE --round N``, end to end:

``forward -> pool -> handoff -> (UMAP) -> (KMeans) -> rank -> manifest``

The teacher of round N-1 runs over the pool in batches; per-pixel probabilities and
embeddings never leave the model's device and are pooled per superpixel at once
(:class:`gpual.acquisition.pooling.RegionPooler`), so memory grows with regions, not pixels. The
pooled statistics go zero-copy (DLPack) to the backend's namespace for the strategy
(:func:`gpual.acquisition.strategies.select_regions`); only the final manifest is copied to the
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

from gpual import atomic
from gpual.acquisition.forward import pool_with_teacher
from gpual.acquisition.strategies import STRATEGY_NAMES, labeled_class_pixels, pixel_budget, select_regions
from gpual.backend import Backend
from gpual.errors import GpualError
from gpual.seeding import SELECT, derive_seed
from gpual.superpixels import check_images_unchanged, read_index, read_region_pixels
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
    if len(candidate_pixels) == 0:
        raise GpualError(f"every region of the pool is labelled after round {round - 1}: nothing is left to select; "
                         f"retrain on these labels (`gpual train {ws.root} --round {round - 1} --final`) or add images to the pool")
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
    announce: Callable[[str], None] | None = None,
) -> AcquisitionResult:
    """Select round ``round``'s regions and write ``rounds/NNN/query.parquet`` (+ overlays, metrics).

    Refuses, writing nothing, when round ``round-1`` is not trained, when round ``round`` is
    already selected (unless ``force``), for an unknown strategy or a budget larger than
    the candidates. ``cluster`` (a :class:`gpual.distributed.DaskCluster`) runs the
    teacher forward, pooling, UMAP transform and KMeans on its workers; a worker lost
    meanwhile fails the round before anything is written. ``progress(done, total)`` follows
    the teacher forward (images); ``announce(line)`` is told before each later long stage
    (UMAP, KMeans) starts.
    """
    strategy = strategy or ("random" if round == 0 else ws.config.acquisition.strategy)
    _check_request(ws, round, strategy, force)
    t_start = time.perf_counter()
    pool = _Pool.read(ws, round)
    budget, cap = _round_budget(ws, round, budget, budget_pixels, pool)

    timings: dict[str, float] = {"pool_read": time.perf_counter() - t_start}  # index, image checks, labels
    device = backend.device
    candidates = torch.from_numpy(np.flatnonzero(pool.candidate_mask)).to(device)
    acq = ws.config.acquisition
    # Every Dask computation happens inside the guard, before anything is written.
    with cluster.round_guard(round) if cluster is not None else nullcontext():
        if strategy == "random":
            stats, bank_vectors, labeled_embedding = _random_stats(pool.region_pixels, device), None, None
        else:
            score_pool = cluster.pool_with_teacher if cluster is not None else pool_with_teacher
            stats, bank_vectors, scored = score_pool(ws, round, backend, pool.index, pool.n_regions, strategy, progress)
            timings.update(scored)
            labeled_embedding = (stats.embedding[torch.from_numpy(pool.labeled_ids).to(device)]
                                 if strategy == "coreset" else None)
        class_pixels = None  # labelled pixels per class, for acquisition.class_balance
        if acq.class_balance > 0 and stats.class_votes is not None:
            class_pixels = labeled_class_pixels(pool.labeled, stats.class_votes.shape[1], device)
        selection = select_regions(
            strategy, backend, stats, candidates, budget,
            bank_vectors=bank_vectors,
            region_score=acq.region_score,
            umap_cfg=ws.config.umap,
            kmeans_cfg=ws.config.kmeans,
            seed=derive_seed(acq.seed, SELECT, round),
            labeled_embedding=labeled_embedding,
            dask=cluster,
            budget_pixels=cap,
            clusters_per_budget=acq.clusters_per_budget,
            class_balance=acq.class_balance,
            class_pixels=class_pixels,
            announce=announce,
        )
    timings.update(selection.timings)

    t0 = time.perf_counter()
    manifest = _manifest(backend, pool.index, pool.offsets, candidates, stats.pixels, selection, round, strategy)
    host = backend.frame_to_host(manifest)
    timings["manifest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from gpual.overlays import write_overlays  # drawing is host work on the final, small selection

    write_overlays(ws, round, pool.index, host, acq.overlays)
    timings["overlays"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    n_candidates = int(pool.candidate_mask.sum())
    ws.update_metrics(round, acquisition={
        "strategy": strategy,
        "budget_regions": budget,
        **({"budget_pixels": cap, "selected_regions": int(len(host))} if cap is not None else {}),
        "candidates": n_candidates,
        "selected_pixels": int(host["pixels"].sum()),
        "backend": backend.name,
        **({"dask": cluster.description} if cluster is not None else {}),
        "timings_s": timings,
        **({"notes": selection.notes} if selection.notes else {}),
    })
    _discard_later_steps(ws, round)
    # The query file is the step's commit marker: written last, atomically.
    ws.write_query(round, manifest)
    return AcquisitionResult(round, strategy, budget, n_candidates, host, timings, list(selection.notes))


def _check_request(ws: Workspace, round: int, strategy: str, force: bool) -> None:
    """Refuse, before reading anything large: an unknown strategy, a model-based one for
    round 0, a round whose previous one is not trained, a selected round without
    ``force``, or a forced re-selection under later rounds."""
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


@dataclass
class _Pool:
    """The pool as round ``round`` sees it (host arrays): the superpixel index, the regions
    labelled in earlier rounds and the candidates (every other region)."""

    index: pd.DataFrame
    offsets: np.ndarray  # (images,) int64 first global region id of each image
    n_regions: int
    labeled: pd.DataFrame  # the label store's answers of rounds < round
    labeled_ids: np.ndarray  # (L,) int64 global ids of the labelled regions
    region_pixels: np.ndarray  # (R,) int64 pixels per region
    candidate_mask: np.ndarray  # (R,) bool: not labelled yet

    @classmethod
    def read(cls, ws: Workspace, round: int) -> "_Pool":
        index = read_index(ws)
        check_images_unchanged(ws, index)  # every region of the pool is a candidate: no stale map
        n_regions = int(index["n_regions"].sum())
        labeled = ws.read_labeled(round - 1)
        labeled_ids = _global_ids(index, labeled)
        candidate_mask = np.ones(n_regions, dtype=bool)
        candidate_mask[labeled_ids] = False
        return cls(index, index["offset"].to_numpy(np.int64), n_regions, labeled, labeled_ids,
                   read_region_pixels(ws, index), candidate_mask)


def _round_budget(ws: Workspace, round: int, budget: int | None, budget_pixels: str | None, pool: _Pool) -> tuple[int, int | None]:
    """(budget in regions, budget in pixels or None): the pixel cap applies when the config
    counts the budget in pixels (``acquisition.budget_unit = "pixels"``) and no ``--budget``
    was given; the regions then only size KMeans' k."""
    acq = ws.config.acquisition
    cap = None
    if round > 0 and budget is None and acq.budget_unit == "pixels":
        budget_pixels = budget_pixels or str(acq.budget_pixels)
        cap = pixel_budget(parse_budget_pixels(budget_pixels), int(pool.index["pixels"].sum()))
    return resolve_budget(ws, round, budget, budget_pixels, pool.region_pixels[pool.candidate_mask]), cap


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
    from gpual.acquisition.pooling import RegionStats

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
    return table[list(QUERY_COLUMNS)].reset_index(drop=True).astype(backend.frame_dtypes(QUERY_COLUMNS))
