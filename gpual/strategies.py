"""Acquisition strategies on pooled region statistics (method steps 3-5 and the baselines).

Every strategy starts from the same :class:`gpual.pooling.RegionStats`: the candidates'
rows are gathered in torch on the model's device, handed to the backend's namespace
zero-copy (:meth:`gpual.backend.Backend.from_torch`), and ranked there. On the GPU path
nothing is copied to the host: the only host copy is the caller's manifest.

    umap-kmeans-entropy  UMAP fitted on the memory bank -> KMeans (k = budget) -> per cluster max H(S)
    kmeans-entropy       KMeans on the raw pooled embeddings -> per cluster max H(S)   (ablation: no UMAP)
    entropy              top-k H(S)                                                   (ablation: no clustering)
    margin               top-k of -(p1 - p2)
    least-confidence     top-k of 1 - max p
    bald                 top-k BALD mutual information (MC dropout)
    coreset              k-center greedy on the pooled embeddings
    random               uniform without replacement (seeded)
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from array_api_compat import array_namespace, device
from torch import Tensor

from gpual.backend import Backend
from gpual import clustering
from gpual.clustering import kmeans_labels, resolve_levels
from gpual.config import REGION_SCORES, STRATEGIES, KMeansConfig, UmapConfig
from gpual.embedding import umap_embed
from gpual.errors import GpualError
from gpual.pooling import RegionStats
from gpual.ranking import select_per_cluster, top_k

STRATEGY_NAMES = STRATEGIES  # one list, in gpual.config (validated there)
# Config sections besides [acquisition] that a strategy's selection reads, and the
# strategies whose ranking reads acquisition.region_score.
_SECTIONS_READ = {"umap-kmeans-entropy": ("umap", "kmeans"), "kmeans-entropy": ("kmeans",)}
_SCORED = ("umap-kmeans-entropy", "kmeans-entropy", "entropy", "bald")
# Largest (candidates x labeled centres) distance block coreset holds at once (floats).
_CORESET_BLOCK = 1 << 24


@dataclass
class Selection:
    """What a strategy picked.

    Attributes:
        indices: ``xp`` (budget,) int64 distinct positions into the candidate array,
            best first.
        scores: ``xp`` (budget,) float32, the strategy's score of each pick (higher = more
            wanted; coreset: distance to the nearest centre; random: 0).
        timings: seconds per stage ("handoff", "umap_fit", "umap_transform", "kmeans",
            "ranking"), each measured between device synchronisations; only the stages
            the strategy ran.
        notes: adjustments worth telling the user (e.g. UMAP n_neighbors clamped).
    """

    indices: Any
    scores: Any
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def settings_unread(strategy: str) -> tuple[str, ...]:
    """Settings ``strategy``'s selection never reads: whole sections (``"umap"``) or dotted
    keys (``"acquisition.region_score"``). Runs that differ only there select alike."""
    unread = tuple(s for s in ("umap", "kmeans") if s not in _SECTIONS_READ.get(strategy, ()))
    return unread if strategy in _SCORED else (*unread, "acquisition.region_score")


@contextmanager
def _timed(backend: Backend, timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block, bracketed by device syncs, to ``timings[key]``."""
    backend.synchronize()
    t0 = time.perf_counter()
    yield
    backend.synchronize()
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def select_regions(
    strategy: str,
    backend: Backend,
    stats: RegionStats,
    candidates: Tensor,
    budget: int,
    *,
    bank_vectors: Tensor | None = None,
    region_score: str = "sum",
    umap_cfg: UmapConfig | None = None,
    kmeans_cfg: KMeansConfig | None = None,
    seed: int = 0,
    labeled_embedding: Tensor | None = None,
    dask: Any | None = None,
) -> Selection:
    """Pick ``budget`` of the ``candidates`` with ``strategy``.

    Args:
        strategy: one of :data:`STRATEGY_NAMES`.
        backend: libraries and device; every tensor below lives on ``backend.device``.
        stats: pooled statistics of all R regions of the pool.
        candidates: (M,) int64 global ids of the unlabeled regions (distinct, in [0, R)).
        budget: regions to pick, 1 <= budget <= M.
        bank_vectors: (N, D) float32 memory-bank vectors (umap-kmeans-entropy).
        region_score: ``"sum"`` (H(S), Eq. 6) or ``"mean"`` (per pixel) for the entropy
            strategies and BALD.
        umap_cfg, kmeans_cfg: UMAP and KMeans settings (defaults when None).
        seed: random strategy's seed.
        labeled_embedding: (L, D) pooled embeddings of the labeled regions (coreset's
            initial centres; None or L = 0 starts from the candidates alone).
        dask: a :class:`gpual.distributed.DaskCluster` whose workers run the UMAP
            transform and KMeans (umap-kmeans-entropy, kmeans-entropy); None = here.

    Returns:
        :class:`Selection` with positions into ``candidates`` (``xp`` arrays on the
        backend's device).
    """
    if strategy not in STRATEGY_NAMES:
        raise GpualError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_NAMES)}", 2)
    if region_score not in REGION_SCORES:
        raise GpualError(f"region score {region_score!r} is not one of sum, mean: fix acquisition.region_score in gpual.toml", 2)
    if candidates.ndim != 1 or candidates.dtype != torch.int64:
        raise GpualError(f"candidates must be a 1-D int64 tensor of region ids, got {candidates.dtype} {tuple(candidates.shape)}")
    m = candidates.shape[0]
    if m == 0:
        raise GpualError("no unlabeled candidate regions are left: every region of the pool is labeled")
    if budget < 1:
        raise GpualError(f"budget of {budget} regions must be positive: raise --budget")
    if budget > m:
        raise GpualError(f"budget of {budget} regions is larger than the {m} unlabeled candidate regions: lower --budget")
    if strategy == "bald" and stats.bald is None:
        raise GpualError(
            "strategy bald needs Monte-Carlo dropout statistics but the pooled stats have none: "
            "set acquisition.mc_passes > 0 in gpual.toml and select again"
        )
    if strategy == "umap-kmeans-entropy" and bank_vectors is None:
        raise GpualError(
            "strategy umap-kmeans-entropy needs the memory bank of the previous round's checkpoint: train that round first"
        )
    umap_cfg = umap_cfg or UmapConfig()
    kmeans_cfg = kmeans_cfg or KMeansConfig()

    timings: dict[str, float] = {}
    notes: list[str] = []
    with _timed(backend, timings, "handoff"):
        inputs = _handoff(strategy, backend, stats, candidates, bank_vectors, region_score, labeled_embedding, budget, seed)
    scores = inputs["scores"]
    xp = array_namespace(scores)

    if strategy in ("umap-kmeans-entropy", "kmeans-entropy"):
        points = inputs["embedding"]
        if strategy == "umap-kmeans-entropy":
            reduced = umap_embed(backend, inputs["bank"], points, umap_cfg,
                                 transform=dask.umap_transform if dask is not None else None)
            points = reduced.points
            timings.update(reduced.timings)
            notes.extend(reduced.notes)
        n = int(points.shape[0])
        levels = resolve_levels(kmeans_cfg.levels, n, budget)  # once: the note and the clustering agree
        if kmeans_cfg.levels == "auto" and levels == 2:
            notes.append(f"KMeans in two levels ({n} regions x {budget} clusters > {clustering.TWO_LEVELS_ABOVE:.0e}, "
                         "kmeans.levels = \"auto\"): set kmeans.levels = 1 in gpual.toml for one")
        with _timed(backend, timings, "kmeans"):
            clusters = kmeans_labels(backend, points, budget, dataclasses.replace(kmeans_cfg, levels=levels),
                                     fit_predict=dask.kmeans_fit_predict if dask is not None else None)
        with _timed(backend, timings, "ranking"):
            indices = select_per_cluster(scores, clusters, budget, budget)
            picked = xp.take(scores, indices)
    elif strategy == "coreset":
        with _timed(backend, timings, "ranking"):
            indices, picked = kcenter_greedy(inputs["embedding"], budget, inputs.get("centres"))
    elif strategy == "random":
        with _timed(backend, timings, "ranking"):
            indices = inputs["permutation"]
            picked = xp.take(scores, indices)
    else:  # entropy, margin, least-confidence, bald: one score, top-k
        with _timed(backend, timings, "ranking"):
            indices = top_k(scores, budget)
            picked = xp.take(scores, indices)
    return Selection(
        indices=xp.astype(indices, xp.int64), scores=xp.astype(picked, xp.float32), timings=timings, notes=notes
    )


def _handoff(
    strategy: str,
    backend: Backend,
    stats: RegionStats,
    candidates: Tensor,
    bank_vectors: Tensor | None,
    region_score: str,
    labeled_embedding: Tensor | None,
    budget: int,
    seed: int,
) -> dict[str, Any]:
    """Gather the candidates' rows in torch and hand them to ``xp`` (zero-copy).

    Returns ``xp`` arrays: ``scores`` (M,) float32 always; ``embedding`` (M, D) float32
    for clustering and coreset; ``bank`` (N, D) for UMAP; ``centres`` (L, D) for coreset;
    ``permutation`` (budget,) int64 for random.
    """
    if candidates.device.type != backend.device.type:
        raise GpualError(f"candidates are on {candidates.device} but the backend is {backend.name}: move them first", 2)
    with torch.no_grad():
        score = _score_tensor(strategy, stats, candidates, region_score)
        out: dict[str, Any] = {"scores": backend.from_torch(score.to(torch.float32).contiguous())}
        if strategy in ("umap-kmeans-entropy", "kmeans-entropy", "coreset"):
            rows = stats.embedding.index_select(0, candidates).to(torch.float32).contiguous()
            out["embedding"] = backend.from_torch(rows)
        if strategy == "umap-kmeans-entropy":
            out["bank"] = backend.from_torch(bank_vectors.to(torch.float32).contiguous())
        if strategy == "coreset" and labeled_embedding is not None and labeled_embedding.shape[0] > 0:
            if labeled_embedding.shape[1:] != stats.embedding.shape[1:]:
                raise GpualError(
                    f"labeled embeddings have shape {tuple(labeled_embedding.shape)} but region embeddings "
                    f"{tuple(stats.embedding.shape)}: they must come from the same pooling"
                )
            out["centres"] = backend.from_torch(labeled_embedding.to(torch.float32).contiguous())
        if strategy == "random":
            # Seeded on the device itself: the permutation never visits the host.
            generator = torch.Generator(device=candidates.device).manual_seed(seed)
            perm = torch.randperm(candidates.shape[0], generator=generator, device=candidates.device)[:budget]
            out["permutation"] = backend.from_torch(perm.contiguous())
    return out


def _score_tensor(strategy: str, stats: RegionStats, candidates: Tensor, region_score: str) -> Tensor:
    """(M,) the strategy's per-candidate score in torch, higher = pick first."""
    def rows(t: Tensor) -> Tensor:
        return t.index_select(0, candidates)

    if strategy in ("umap-kmeans-entropy", "kmeans-entropy", "entropy"):
        return rows(stats.entropy_sum if region_score == "sum" else stats.entropy_mean)
    if strategy == "margin":
        return -rows(stats.margin_mean)
    if strategy == "least-confidence":
        return 1.0 - rows(stats.maxprob_mean)
    if strategy == "bald":
        bald = rows(stats.bald)
        return bald if region_score == "sum" else bald / rows(stats.pixels).clamp_min(1).to(bald.dtype)
    # coreset ranks by distance and random by permutation: no per-region score.
    return torch.zeros(candidates.shape[0], dtype=torch.float32, device=candidates.device)


def kcenter_greedy(points: Any, budget: int, centres: Any | None = None) -> tuple[Any, Any]:
    """Core-set selection by k-center greedy (Sener & Savarese), on the device.

    Args:
        points: ``xp`` (M, D) float32 candidate embeddings.
        budget: picks, 1 <= budget <= M.
        centres: ``xp`` (L, D) float32 already-labeled embeddings, or None.

    Returns:
        (indices (budget,) int64, distances (budget,) float32): each pick is the candidate
        farthest (Euclidean) from every centre and earlier pick; its distance at the time
        of picking (+inf for the first pick when there are no centres). Ties go to the
        lowest index.

    The loop over picks is inherent to the greedy algorithm; each iteration is one
    vectorised (M, D) distance update, and the argmax stays a 0-d device array (no host
    sync). Initial distances to the labeled centres are computed in blocks of at most
    2**24 values so memory stays bounded for large labeled sets.
    """
    xp = array_namespace(points)
    m = points.shape[0]
    dev = device(points)
    if not 1 <= budget <= m:
        raise GpualError(f"budget of {budget} regions must lie between 1 and the {m} candidate regions: lower --budget")
    sq_norm = xp.sum(points * points, axis=1)
    nearest = xp.full(m, float("inf"), dtype=xp.float32, device=dev)  # squared distance to nearest centre
    if centres is not None and centres.shape[0] > 0:
        block = max(1, _CORESET_BLOCK // m)
        centre_sq = xp.sum(centres * centres, axis=1)
        for start in range(0, centres.shape[0], block):
            c = centres[start : start + block]
            d = sq_norm[:, None] + centre_sq[None, start : start + block] - 2.0 * (points @ c.T)
            nearest = xp.minimum(nearest, xp.min(xp.maximum(d, 0.0), axis=1))
    positions = xp.arange(m, dtype=xp.int64, device=dev)
    taken = xp.asarray(-1.0, dtype=xp.float32, device=dev)  # below any distance: never picked twice
    picks = xp.zeros(budget, dtype=xp.int64, device=dev)
    dists = xp.zeros(budget, dtype=xp.float32, device=dev)
    for i in range(budget):
        j = xp.argmax(nearest)  # first maximum: ties -> lowest index; 0-d, stays on the device
        picks[i] = j
        dists[i] = xp.max(nearest)
        chosen = xp.take(points, xp.reshape(j, (1,)), axis=0)  # (1, D)
        diff = points - chosen
        nearest = xp.where(positions == j, taken, xp.minimum(nearest, xp.sum(diff * diff, axis=1)))
    return picks, xp.sqrt(dists)
