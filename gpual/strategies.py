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

Options every strategy honours where it applies (each off by default):

    budget_pixels        a budget in pixels: each strategy's ranking is cut where the next
                         region would pass it (:func:`gpual.ranking.within_pixels`), so every
                         strategy labels the same pixels per round (acquisition.budget_unit)
    class_balance        scores times exp(-class_balance * share of the region's predicted
                         class among the labelled pixels) (uncertainty strategies)
    clusters_per_budget  KMeans into fewer clusters than the budget, several regions each
                         (umap-kmeans-entropy, kmeans-entropy)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from gpual.ranking import (by_descending_score, class_balanced, cluster_priority, most_within_pixels, select_per_cluster,
                           top_k, within_pixels)

STRATEGY_NAMES = STRATEGIES  # one list, in gpual.config (validated there)
# Config sections besides [acquisition] that a strategy's selection reads, and the
# strategies whose ranking reads acquisition.region_score.
_SECTIONS_READ = {"umap-kmeans-entropy": ("umap", "kmeans"), "kmeans-entropy": ("kmeans",)}
_SCORED = ("umap-kmeans-entropy", "kmeans-entropy", "entropy", "bald")
# Strategies with a per-region uncertainty that class balancing weights (coreset ranks by
# distance and random by a permutation: neither has one).
_CLASS_BALANCED = ("umap-kmeans-entropy", "kmeans-entropy", "entropy", "margin", "least-confidence", "bald")
_CLUSTERED = ("umap-kmeans-entropy", "kmeans-entropy")
# Largest (candidates x labeled centres) distance block coreset holds at once (floats).
_CORESET_BLOCK = 1 << 24


@dataclass
class Selection:
    """What a strategy picked.

    Attributes:
        indices: ``xp`` (budget,) int64 distinct positions into the candidate array,
            best first (with a pixel budget: as many as fit in it).
        scores: ``xp`` float32, one per pick: the strategy's score (higher = more wanted;
            with class balancing the weighted score; coreset: distance to the nearest
            centre; random: 0).
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
    if strategy not in _SCORED:
        unread += ("acquisition.region_score",)
    if strategy not in _CLASS_BALANCED:
        unread += ("acquisition.class_balance",)
    if strategy not in _CLUSTERED:
        unread += ("acquisition.clusters_per_budget",)
    return unread


def clusters_for(budget: int, clusters_per_budget: float = 1.0) -> tuple[int, int]:
    """(k, depth): KMeans' cluster count for a budget of ``budget`` regions and the regions
    per cluster the ranking takes in turn: k = ceil(clusters_per_budget x budget) (at least
    1), depth = ceil(budget / k). 1.0 gives (budget, 1), the method."""
    if not 0.0 < clusters_per_budget <= 1.0:
        raise GpualError(f"clusters_per_budget = {clusters_per_budget} must lie in (0, 1]: fix acquisition.clusters_per_budget", 2)
    k = max(1, math.ceil(clusters_per_budget * budget - 1e-9))  # 0.5 x 10 is 5, not 6 by a rounding error
    return k, math.ceil(budget / k)


def pixel_budget(share: float, pool_pixels: int) -> int:
    """A round's budget in pixels: ``share`` of the pool's pixels, rounded half up, at least 1."""
    if not 0.0 < share <= 1.0:
        raise GpualError(f"a pixel budget of {share} is a share of the pool's pixels: it must lie in (0, 1]", 2)
    return max(1, int(math.floor(share * pool_pixels + 0.5)))


def labeled_class_pixels(labeled: Any, n_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """(C,) float32 labelled pixels per class of a labelled set (``Workspace.read_labeled``):
    each region's ``labeled_pixels`` counted under its ``class``.

    Exact for one-class answers (``acquisition.oracle = "dominant"``, the annotator's
    one-click regions); for answers of kind "pixels" ``class`` is the region's most
    frequent labelled class, so its other classes' pixels count there too. Void (255)
    and classes outside [0, C) count nowhere.
    """
    classes = np.asarray(labeled["class"], dtype=np.int64)
    pixels = np.asarray(labeled["labeled_pixels"], dtype=np.float64)
    keep = (classes >= 0) & (classes < n_classes)
    counts = np.bincount(classes[keep], weights=pixels[keep], minlength=n_classes)
    return torch.from_numpy(counts.astype(np.float32)).to(device)


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
    budget_pixels: int | None = None,
    clusters_per_budget: float = 1.0,
    class_balance: float = 0.0,
    class_pixels: Tensor | None = None,
) -> Selection:
    """Pick ``budget`` of the ``candidates`` with ``strategy`` (or, with ``budget_pixels``,
    as many as fit in that many pixels).

    Args:
        strategy: one of :data:`STRATEGY_NAMES`.
        backend: libraries and device; every tensor below lives on ``backend.device``.
        stats: pooled statistics of all R regions of the pool.
        candidates: (M,) int64 global ids of the unlabeled regions (distinct, in [0, R)).
        budget: regions to pick, 1 <= budget <= M.
        bank_vectors: (N, D) float32 memory-bank vectors (umap-kmeans-entropy).
        region_score: ``"sum"`` (H(S), Eq. 6), ``"mean"`` (per pixel) or ``"sqrt"``
            (H(S) / sqrt(pixels)) for the entropy strategies and BALD.
        umap_cfg, kmeans_cfg: UMAP and KMeans settings (defaults when None).
        seed: random strategy's seed.
        labeled_embedding: (L, D) pooled embeddings of the labeled regions (coreset's
            initial centres; None or L = 0 starts from the candidates alone).
        dask: a :class:`gpual.distributed.DaskCluster` whose workers run the UMAP
            transform and KMeans (umap-kmeans-entropy, kmeans-entropy); None = here.
        budget_pixels: the round's budget in pixels (``acquisition.budget_unit =
            "pixels"``), or None. Every strategy then ranks all candidates its way and
            takes them in rank order while they fit (:func:`gpual.ranking.within_pixels`):
            the selection's length varies, and ``budget`` only sizes KMeans' k (the pixel
            budget in regions of the candidates' mean size, as ``--budget-pixels`` converts it).
        clusters_per_budget: KMeans' k = ceil(clusters_per_budget x budget), each cluster
            giving its best regions in turn (:func:`clusters_for`); 1.0 = the method.
        class_balance: exponent of the class-balanced weight
            (:func:`gpual.ranking.class_balance_weights`); 0 = off. Needs
            ``stats.class_votes`` and ``class_pixels``.
        class_pixels: (C,) labelled pixels per class so far (:func:`labeled_class_pixels`).

    Returns:
        :class:`Selection` with positions into ``candidates`` (``xp`` arrays on the
        backend's device).
    """
    if strategy not in STRATEGY_NAMES:
        raise GpualError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_NAMES)}", 2)
    if region_score not in REGION_SCORES:
        raise GpualError(f"region score {region_score!r} is not one of {', '.join(REGION_SCORES)}: "
                         "fix acquisition.region_score in gpual.toml", 2)
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
    if budget_pixels is not None and budget_pixels < 1:
        raise GpualError(f"a pixel budget of {budget_pixels} pixels must be positive: raise acquisition.budget_pixels")
    k, depth = clusters_for(budget, clusters_per_budget)
    if class_balance < 0:
        raise GpualError(f"class_balance = {class_balance} must not be negative (0 = off): fix acquisition.class_balance", 2)
    balance = class_balance > 0 and strategy in _CLASS_BALANCED
    if balance and (stats.class_votes is None or class_pixels is None):
        raise GpualError(
            f"acquisition.class_balance = {class_balance} needs each region's predicted class (pooled class votes) and the "
            "labelled pixels per class, and this selection was given "
            + ("neither" if stats.class_votes is None and class_pixels is None else
               "no class votes" if stats.class_votes is None else "no labelled pixels per class")
            + ": set acquisition.class_balance = 0 or pool with this gpual"
        )
    if balance and class_pixels.shape != (stats.class_votes.shape[1],):
        raise GpualError(f"class_pixels has shape {tuple(class_pixels.shape)} but the model predicts "
                         f"{stats.class_votes.shape[1]} classes: count the labelled pixels of each of them")
    umap_cfg = umap_cfg or UmapConfig()
    kmeans_cfg = kmeans_cfg or KMeansConfig()

    timings: dict[str, float] = {}
    notes: list[str] = []
    with _timed(backend, timings, "handoff"):
        inputs = _handoff(strategy, backend, stats, candidates, bank_vectors, region_score, labeled_embedding,
                          m if budget_pixels is not None else budget, seed, balance, class_pixels)
    scores = inputs["scores"]
    xp = array_namespace(scores)
    pixels = inputs["pixels"]
    if balance:
        with _timed(backend, timings, "ranking"):
            scores = class_balanced(scores, inputs["predicted"], inputs["class_pixels"], class_balance)

    def cut(order: Any) -> Any:
        """A ranked order, cut to the pixel budget if there is one."""
        return order if budget_pixels is None else within_pixels(order, pixels, budget_pixels)

    if strategy in ("umap-kmeans-entropy", "kmeans-entropy"):
        points = inputs["embedding"]
        if strategy == "umap-kmeans-entropy":
            reduced = umap_embed(backend, inputs["bank"], points, umap_cfg,
                                 transform=dask.umap_transform if dask is not None else None)
            points = reduced.points
            timings.update(reduced.timings)
            notes.extend(reduced.notes)
        n = int(points.shape[0])
        levels = resolve_levels(kmeans_cfg.levels, n, k)  # once: the note and the clustering agree
        if kmeans_cfg.levels == "auto" and levels == 2:
            notes.append(f"KMeans in two levels ({n} regions x {k} clusters > {clustering.TWO_LEVELS_ABOVE:.0e}, "
                         "kmeans.levels = \"auto\"): set kmeans.levels = 1 in gpual.toml for one")
        with _timed(backend, timings, "kmeans"):
            clusters = kmeans_labels(backend, points, k, dataclasses.replace(kmeans_cfg, levels=levels),
                                     fit_predict=dask.kmeans_fit_predict if dask is not None else None)
        with _timed(backend, timings, "ranking"):
            if budget_pixels is None:
                indices = select_per_cluster(scores, clusters, k, budget, depth)
            else:
                indices = by_descending_score(scores, cut(cluster_priority(scores, clusters, depth)))
            picked = xp.take(scores, indices)
    elif strategy == "coreset":
        with _timed(backend, timings, "ranking"):
            # Greedy picks one at a time: with a pixel budget, as many as could possibly fit, then cut.
            picks = budget if budget_pixels is None else most_within_pixels(pixels, budget_pixels)
            indices, picked = kcenter_greedy(inputs["embedding"], picks, inputs.get("centres"))
            if budget_pixels is not None:
                indices = cut(indices)
                picked = picked[: indices.shape[0]]
    elif strategy == "random":
        with _timed(backend, timings, "ranking"):
            indices = cut(inputs["permutation"])
            picked = xp.take(scores, indices)
    else:  # entropy, margin, least-confidence, bald: one score, top-k
        with _timed(backend, timings, "ranking"):
            indices = top_k(scores, budget) if budget_pixels is None else cut(top_k(scores, m))
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
    balance: bool = False,
    class_pixels: Tensor | None = None,
) -> dict[str, Any]:
    """Gather the candidates' rows in torch and hand them to ``xp`` (zero-copy).

    Returns ``xp`` arrays: ``scores`` (M,) float32 and ``pixels`` (M,) int64 always;
    ``embedding`` (M, D) float32 for clustering and coreset; ``bank`` (N, D) for UMAP;
    ``centres`` (L, D) for coreset; ``permutation`` (budget,) int64 for random;
    ``predicted`` (M,) int64 and ``class_pixels`` (C,) float32 with ``balance``.
    """
    if candidates.device.type != backend.device.type:
        raise GpualError(f"candidates are on {candidates.device} but the backend is {backend.name}: move them first", 2)
    with torch.no_grad():
        score = _score_tensor(strategy, stats, candidates, region_score, balance)
        pixels = stats.pixels.index_select(0, candidates).to(torch.int64).contiguous()
        out: dict[str, Any] = {"scores": backend.from_torch(score.to(torch.float32).contiguous()),
                               "pixels": backend.from_torch(pixels)}
        if balance:
            predicted = stats.predicted_class.index_select(0, candidates).contiguous()
            out["predicted"] = backend.from_torch(predicted)
            out["class_pixels"] = backend.from_torch(class_pixels.to(predicted.device, torch.float32).contiguous())
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


def _score_tensor(strategy: str, stats: RegionStats, candidates: Tensor, region_score: str,
                  balance: bool = False) -> Tensor:
    """(M,) the strategy's per-candidate score in torch, higher = pick first; with ``balance``
    a non-negative one (margin: 1 - (p1 - p2), the same order as -(p1 - p2)), for the class weights."""
    def rows(t: Tensor) -> Tensor:
        return t.index_select(0, candidates)

    def per_region(total: Tensor) -> Tensor:
        if region_score == "sum":
            return total
        size = rows(stats.pixels).clamp_min(1).to(total.dtype)
        return total / (size if region_score == "mean" else size.sqrt())

    if strategy in ("umap-kmeans-entropy", "kmeans-entropy", "entropy"):
        if region_score == "mean":  # the pooler's own division (bit-identical to what it was)
            return rows(stats.entropy_mean)
        return per_region(rows(stats.entropy_sum))
    if strategy == "margin":
        return (1.0 - rows(stats.margin_mean)) if balance else -rows(stats.margin_mean)
    if strategy == "least-confidence":
        return 1.0 - rows(stats.maxprob_mean)
    if strategy == "bald":
        return per_region(rows(stats.bald))
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
