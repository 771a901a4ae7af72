"""Acquisition strategies on pooled region statistics (method steps 3-5 and the baselines).

Every strategy starts from the same :class:`gpual.acquisition.pooling.RegionStats`: the candidates'
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

Each strategy is one :class:`Strategy` in :data:`STRATEGIES_BY_NAME` (the names of
:data:`gpual.config.STRATEGIES`, in that order): the :class:`PooledScore` it ranks by (or
none), what it needs declared as fields (UMAP on the memory bank, KMeans, the pooled
embeddings, Monte-Carlo dropout through its score, class balancing), and its own ranking
of the handed-off inputs. :func:`select_regions` and :func:`settings_unread` read only
those declarations: validate -> hand off -> class-balance weighting -> the strategy's
ranking -> :class:`Selection`.

Options every strategy honours where it applies (each off by default):

    budget_pixels        a budget in pixels: each strategy's ranking is cut where the next
                         region would pass it (:func:`gpual.acquisition.ranking.within_pixels`), so every
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from array_api_compat import array_namespace, device
from torch import Tensor

from gpual.acquisition import clustering
from gpual.acquisition.clustering import kmeans_labels, resolve_levels
from gpual.acquisition.pooling import RegionStats
from gpual.acquisition.ranking import (
    by_descending_score,
    class_balanced,
    cluster_priority,
    most_within_pixels,
    select_per_cluster,
    top_k,
    within_pixels,
)
from gpual.acquisition.reduction import umap_embed
from gpual.backend import Backend
from gpual.config import REGION_SCORES, STRATEGIES, KMeansConfig, UmapConfig
from gpual.errors import GpualError

STRATEGY_NAMES = STRATEGIES  # one list, in gpual.config (validated there)
# Settings only some strategies' selections read (a config section or a dotted key), in
# the order settings_unread names them.
_OPTIONAL_SETTINGS = ("umap", "kmeans", "acquisition.region_score", "acquisition.class_balance",
                      "acquisition.clusters_per_budget")
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


# ---------------------------------------------------------------------------------------
# Pooled scores: each candidate's uncertainty in torch, on the stats' device.


@dataclass(frozen=True)
class PooledScore:
    """A per-region uncertainty read from the pooled statistics, higher = pick first.

    Attributes:
        compute: ``compute(stats, candidates, region_score, balance)`` -> (M,) tensor on
            the stats' device for the (M,) int64 ``candidates``; with ``balance`` a
            non-negative one, for the class weights to multiply.
        reads_region_score: whether ``acquisition.region_score`` changes it.
        needs_mc_dropout: whether it reads ``stats.bald`` (Monte-Carlo dropout passes).
    """

    compute: Callable[[RegionStats, Tensor, str, bool], Tensor]
    reads_region_score: bool = False
    needs_mc_dropout: bool = False


def _per_region(stats: RegionStats, candidates: Tensor, total: Tensor, region_score: str) -> Tensor:
    """(M,) a total over each candidate's pixels as ``region_score`` asks: the total itself
    ("sum"), per pixel ("mean") or over sqrt(pixels) ("sqrt"); empty regions count 1 pixel."""
    if region_score == "sum":
        return total
    size = stats.pixels.index_select(0, candidates).clamp_min(1).to(total.dtype)
    return total / (size if region_score == "mean" else size.sqrt())


def _entropy(stats: RegionStats, candidates: Tensor, region_score: str, balance: bool) -> Tensor:
    """H(S) (Eq. 6), per ``region_score``."""
    if region_score == "mean":  # the pooler's own division (bit-identical to what it was)
        return stats.entropy_mean.index_select(0, candidates)
    return _per_region(stats, candidates, stats.entropy_sum.index_select(0, candidates), region_score)


def _margin(stats: RegionStats, candidates: Tensor, region_score: str, balance: bool) -> Tensor:
    """-(p1 - p2); with ``balance`` 1 - (p1 - p2), the same order but non-negative."""
    margin = stats.margin_mean.index_select(0, candidates)
    return (1.0 - margin) if balance else -margin


def _least_confidence(stats: RegionStats, candidates: Tensor, region_score: str, balance: bool) -> Tensor:
    """1 - max p."""
    return 1.0 - stats.maxprob_mean.index_select(0, candidates)


def _bald(stats: RegionStats, candidates: Tensor, region_score: str, balance: bool) -> Tensor:
    """BALD mutual information (MC dropout), per ``region_score``."""
    return _per_region(stats, candidates, stats.bald.index_select(0, candidates), region_score)


ENTROPY = PooledScore(_entropy, reads_region_score=True)
MARGIN = PooledScore(_margin)
LEAST_CONFIDENCE = PooledScore(_least_confidence)
BALD = PooledScore(_bald, reads_region_score=True, needs_mc_dropout=True)


# ---------------------------------------------------------------------------------------
# What a ranking is handed, and the round it ranks for.


@dataclass(frozen=True)
class _Inputs:
    """The candidates' rows handed to the backend's namespace ``xp`` (zero-copy views of
    torch tensors, on ``backend.device``); the fields a strategy does not need are None.

    Attributes:
        scores: (M,) float32, the strategy's pooled score (zeros without one); after the
            class-balance step, the weighted score.
        pixels: (M,) int64 pixels per candidate.
        embedding: (M, D) float32 pooled embeddings (``needs_embedding``).
        bank: (N, D) float32 memory-bank vectors (``needs_bank``).
        centres: (L, D) float32 labeled regions' embeddings, L > 0 (``reads_labeled_embedding``).
        permutation: (P,) int64 seeded positions (``needs_permutation``): P = budget, or M
            with a pixel budget.
        predicted: (M,) int64 predicted class per candidate (class balancing).
        class_pixels: (C,) float32 labelled pixels per class (class balancing).
    """

    scores: Any
    pixels: Any
    embedding: Any | None = None
    bank: Any | None = None
    centres: Any | None = None
    permutation: Any | None = None
    predicted: Any | None = None
    class_pixels: Any | None = None


@dataclass(frozen=True)
class _Job:
    """One selection's resolved settings, and where its stages report.

    Attributes:
        backend: libraries and device of every array.
        budget: regions to pick (with a pixel budget it only sizes KMeans' k).
        budget_pixels: the pixel budget, or None.
        m: candidates.
        k, depth: KMeans' clusters and regions per cluster (:func:`clusters_for`).
        umap_cfg, kmeans_cfg: UMAP and KMeans settings.
        dask: a :class:`gpual.distributed.DaskCluster` for the UMAP transform and KMeans, or None.
        timings, notes: :class:`Selection`'s, filled stage by stage.
        announce: called with one line before each long stage starts (UMAP, KMeans, the
            coreset greedy), so a user watching a log sees what runs; None = silent.
    """

    backend: Backend
    budget: int
    budget_pixels: int | None
    m: int
    k: int
    depth: int
    umap_cfg: UmapConfig
    kmeans_cfg: KMeansConfig
    dask: Any | None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    announce: Callable[[str], None] | None = None

    def stage(self, line: str) -> None:
        """Say that a long stage starts (see ``announce``)."""
        if self.announce is not None:
            self.announce(line)

    def timed(self, key: str) -> AbstractContextManager[None]:
        """A block whose device-synchronised wall time adds to ``timings[key]``."""
        return _timed(self.backend, self.timings, key)

    def cut(self, order: Any, pixels: Any) -> Any:
        """A ranked order (``xp`` (n,) int64 positions), cut to the pixel budget if there is one."""
        return order if self.budget_pixels is None else within_pixels(order, pixels, self.budget_pixels)


# ---------------------------------------------------------------------------------------
# Rankings: handed-off inputs -> (indices (n,) positions best first, picked (n,) scores),
# ``xp`` arrays on the backend's device; each times its own stages.

Ranking = Callable[[_Inputs, _Job], tuple[Any, Any]]


def _rank_top_k(inputs: _Inputs, job: _Job) -> tuple[Any, Any]:
    """The ``budget`` highest scores (with a pixel budget: all M by score, cut to it)."""
    with job.timed("ranking"):
        scores = inputs.scores
        indices = top_k(scores, job.budget) if job.budget_pixels is None else job.cut(top_k(scores, job.m), inputs.pixels)
        return indices, array_namespace(scores).take(scores, indices)


def _rank_umap_clusters(inputs: _Inputs, job: _Job) -> tuple[Any, Any]:
    """UMAP fitted on the (N, D) bank maps the (M, D) embeddings to (M, n_components), then
    :func:`_cluster_and_rank` on those points."""
    job.stage(f"UMAP: fit on {int(inputs.bank.shape[0]):,} memory-bank vectors, transform {job.m:,} candidate regions")
    reduced = umap_embed(job.backend, inputs.bank, inputs.embedding, job.umap_cfg,
                         transform=job.dask.umap_transform if job.dask is not None else None)
    job.timings.update(reduced.timings)
    job.notes.extend(reduced.notes)
    return _cluster_and_rank(inputs, job, reduced.points)


def _rank_clusters(inputs: _Inputs, job: _Job) -> tuple[Any, Any]:
    """:func:`_cluster_and_rank` on the (M, D) pooled embeddings themselves."""
    return _cluster_and_rank(inputs, job, inputs.embedding)


def _cluster_and_rank(inputs: _Inputs, job: _Job, points: Any) -> tuple[Any, Any]:
    """KMeans (k clusters) on the (M, d) ``points``, then each cluster's best regions in
    turns (:func:`gpual.acquisition.ranking.select_per_cluster`; with a pixel budget the whole cluster
    order, cut to it and re-sorted by score)."""
    n = int(points.shape[0])
    levels = resolve_levels(job.kmeans_cfg.levels, n, job.k)  # once: the note and the clustering agree
    if job.kmeans_cfg.levels == "auto" and levels == 2:
        job.notes.append(f"KMeans in two levels ({n} regions x {job.k} clusters > {clustering.TWO_LEVELS_ABOVE:.0e}, "
                         "kmeans.levels = \"auto\"): set kmeans.levels = 1 in gpual.toml for one")
    job.stage(f"KMeans: {job.k:,} clusters of {n:,} regions" + (" in two levels" if levels == 2 else ""))
    with job.timed("kmeans"):
        clusters = kmeans_labels(job.backend, points, job.k, dataclasses.replace(job.kmeans_cfg, levels=levels),
                                 fit_predict=job.dask.kmeans_fit_predict if job.dask is not None else None)
    with job.timed("ranking"):
        scores = inputs.scores
        if job.budget_pixels is None:
            indices = select_per_cluster(scores, clusters, job.k, job.budget, job.depth)
        else:
            indices = by_descending_score(scores, job.cut(cluster_priority(scores, clusters, job.depth), inputs.pixels))
        return indices, array_namespace(scores).take(scores, indices)


def _rank_coreset(inputs: _Inputs, job: _Job) -> tuple[Any, Any]:
    """k-center greedy on the (M, D) embeddings from the (L, D) labeled centres; picked =
    each pick's distance to its nearest centre."""
    with job.timed("ranking"):
        # Greedy picks one at a time: with a pixel budget, as many as could possibly fit, then cut.
        picks = job.budget if job.budget_pixels is None else most_within_pixels(inputs.pixels, job.budget_pixels)
        job.stage(f"coreset: k-center greedy, {picks:,} picks of {job.m:,} regions")
        indices, picked = kcenter_greedy(inputs.embedding, picks, inputs.centres)
        if job.budget_pixels is not None:
            indices = job.cut(indices, inputs.pixels)
            picked = picked[: indices.shape[0]]
        return indices, picked


def _rank_random(inputs: _Inputs, job: _Job) -> tuple[Any, Any]:
    """The seeded (P,) permutation, cut to the pixel budget if there is one; picked = 0."""
    with job.timed("ranking"):
        indices = job.cut(inputs.permutation, inputs.pixels)
        return indices, array_namespace(inputs.scores).take(inputs.scores, indices)


# ---------------------------------------------------------------------------------------
# The strategies.


@dataclass(frozen=True)
class Strategy:
    """One acquisition strategy: what it ranks by, what it needs, how it ranks.

    Attributes:
        name: its ``acquisition.strategy`` name.
        rank: its ranking of the handed-off inputs (``rank(inputs, job) -> (indices, picked)``).
        score: the pooled score it ranks by; None = no per-region uncertainty (coreset
            ranks by distance, random by a permutation).
        class_balanced: ``acquisition.class_balance`` weights its score.
        needs_umap: UMAP fitted on the memory bank (``bank_vectors``; reads ``[umap]``).
        needs_kmeans: KMeans on its points (reads ``[kmeans]`` and
            ``acquisition.clusters_per_budget``).
        needs_embedding: the candidates' pooled embeddings.
        reads_labeled_embedding: the labeled regions' pooled embeddings, when given.
        needs_permutation: a seeded permutation of the candidates.
    """

    name: str
    rank: Ranking
    score: PooledScore | None = None
    class_balanced: bool = False
    needs_umap: bool = False
    needs_kmeans: bool = False
    needs_embedding: bool = False
    reads_labeled_embedding: bool = False
    needs_permutation: bool = False

    def __post_init__(self) -> None:
        if self.class_balanced and self.score is None:
            raise ValueError(f"strategy {self.name}: class balancing weights a score, and it has none")
        if (self.needs_umap or self.needs_kmeans) and not self.needs_embedding:
            raise ValueError(f"strategy {self.name}: UMAP and KMeans run on the pooled embeddings")

    @property
    def needs_bank(self) -> bool:
        """The memory bank of the previous round's checkpoint (UMAP is fitted on it)."""
        return self.needs_umap

    @property
    def needs_mc_dropout(self) -> bool:
        """Monte-Carlo dropout statistics (``stats.bald``)."""
        return self.score is not None and self.score.needs_mc_dropout

    @property
    def reads_region_score(self) -> bool:
        return self.score is not None and self.score.reads_region_score

    @property
    def settings_read(self) -> tuple[str, ...]:
        """Those of the optional settings (sections or dotted keys) its selection reads."""
        read = {"umap": self.needs_umap, "kmeans": self.needs_kmeans,
                "acquisition.region_score": self.reads_region_score,
                "acquisition.class_balance": self.class_balanced,
                "acquisition.clusters_per_budget": self.needs_kmeans}
        return tuple(s for s in _OPTIONAL_SETTINGS if read[s])

    def balances(self, class_balance: float) -> bool:
        """Whether ``class_balance`` weights this strategy's selection."""
        return class_balance > 0 and self.class_balanced


STRATEGIES_BY_NAME: dict[str, Strategy] = {s.name: s for s in (
    # The method: UMAP fitted on the memory bank -> KMeans (k = budget) -> per cluster max H(S).
    Strategy("umap-kmeans-entropy", _rank_umap_clusters, ENTROPY, class_balanced=True,
             needs_umap=True, needs_kmeans=True, needs_embedding=True),
    # Ablation, no UMAP: KMeans on the raw pooled embeddings -> per cluster max H(S).
    Strategy("kmeans-entropy", _rank_clusters, ENTROPY, class_balanced=True, needs_kmeans=True, needs_embedding=True),
    # Ablation, no clustering: top-k H(S).
    Strategy("entropy", _rank_top_k, ENTROPY, class_balanced=True),
    # Top-k of -(p1 - p2).
    Strategy("margin", _rank_top_k, MARGIN, class_balanced=True),
    # Top-k of 1 - max p.
    Strategy("least-confidence", _rank_top_k, LEAST_CONFIDENCE, class_balanced=True),
    # Top-k BALD mutual information (Monte-Carlo dropout).
    Strategy("bald", _rank_top_k, BALD, class_balanced=True),
    # k-center greedy on the pooled embeddings, from the labeled regions' (Sener & Savarese).
    Strategy("coreset", _rank_coreset, needs_embedding=True, reads_labeled_embedding=True),
    # Uniform without replacement, seeded.
    Strategy("random", _rank_random, needs_permutation=True),
)}


def settings_unread(strategy: str) -> tuple[str, ...]:
    """Settings ``strategy``'s selection never reads: whole sections (``"umap"``) or dotted
    keys (``"acquisition.region_score"``). Runs that differ only there select alike."""
    spec = STRATEGIES_BY_NAME.get(strategy)
    read = spec.settings_read if spec is not None else ()  # an unknown name reads none (gpual.config refuses it)
    return tuple(s for s in _OPTIONAL_SETTINGS if s not in read)


def clusters_for(budget: int, clusters_per_budget: float = 1.0) -> tuple[int, int]:
    """(k, depth): KMeans' cluster count for a budget of ``budget`` regions and the regions
    per cluster the ranking takes in turn: k = ceil(clusters_per_budget x budget) (at least
    1), depth = ceil(budget / k). 1.0 gives (budget, 1), the method."""
    if not 0.0 < clusters_per_budget <= 1.0:
        raise ValueError(f"clusters_per_budget = {clusters_per_budget} must lie in (0, 1]")
    k = max(1, math.ceil(clusters_per_budget * budget - 1e-9))  # 0.5 x 10 is 5, not 6 by a rounding error
    return k, math.ceil(budget / k)


def pixel_budget(share: float, pool_pixels: int) -> int:
    """A round's budget in pixels: ``share`` of the pool's pixels, rounded half up, at least 1."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"a pixel budget of {share} is a share of the pool's pixels: it must lie in (0, 1]")
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


# ---------------------------------------------------------------------------------------
# Selection: validate -> hand off -> class-balance weighting -> the strategy's ranking.


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
    announce: Callable[[str], None] | None = None,
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
            takes them in rank order while they fit (:func:`gpual.acquisition.ranking.within_pixels`):
            the selection's length varies, and ``budget`` only sizes KMeans' k (the pixel
            budget in regions of the candidates' mean size, as ``--budget-pixels`` converts it).
        clusters_per_budget: KMeans' k = ceil(clusters_per_budget x budget), each cluster
            giving its best regions in turn (:func:`clusters_for`); 1.0 = the method.
        class_balance: exponent of the class-balanced weight
            (:func:`gpual.acquisition.ranking.class_balance_weights`); 0 = off. Needs
            ``stats.class_votes`` and ``class_pixels``.
        class_pixels: (C,) labelled pixels per class so far (:func:`labeled_class_pixels`).
        announce: called with one line before each long stage (UMAP, KMeans, coreset).

    Returns:
        :class:`Selection` with positions into ``candidates`` (``xp`` arrays on the
        backend's device).
    """
    spec = _validate(strategy, backend, stats, candidates, budget, bank_vectors=bank_vectors, region_score=region_score,
                     labeled_embedding=labeled_embedding, budget_pixels=budget_pixels,
                     clusters_per_budget=clusters_per_budget, class_balance=class_balance, class_pixels=class_pixels)
    k, depth = clusters_for(budget, clusters_per_budget)
    m = candidates.shape[0]
    job = _Job(backend, budget, budget_pixels, m, k, depth, umap_cfg or UmapConfig(), kmeans_cfg or KMeansConfig(), dask,
               announce=announce)
    balance = spec.balances(class_balance)
    with job.timed("handoff"):
        inputs = _handoff(spec, backend, stats, candidates, bank_vectors, region_score, labeled_embedding,
                          m if budget_pixels is not None else budget, seed, balance, class_pixels)
    if balance:
        inputs = _class_balance(inputs, class_balance, job)
    indices, picked = spec.rank(inputs, job)
    return _selection(indices, picked, job)


def _validate(
    strategy: str,
    backend: Backend,
    stats: RegionStats,
    candidates: Tensor,
    budget: int,
    *,
    bank_vectors: Tensor | None,
    region_score: str,
    labeled_embedding: Tensor | None,
    budget_pixels: int | None,
    clusters_per_budget: float,
    class_balance: float,
    class_pixels: Tensor | None,
) -> Strategy:
    """Every check of :func:`select_regions`' inputs, before anything runs; the strategy's
    definition. Arguments as there (tensors on ``backend.device``); the first failing check
    raises, in this order.

    What a user chooses (strategy, budget, scores, shares) is validated once, at the edge
    (:meth:`gpual.config.Config.validate`, :func:`gpual.acquisition.select.resolve_budget`),
    so breaking those preconditions here is a caller's bug: ValueError. What depends on the
    workspace's state (no dropout statistics, no memory bank, no class votes) is the
    user's one-line :class:`GpualError`.
    """
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_NAMES)}")
    spec = STRATEGIES_BY_NAME[strategy]
    if region_score not in REGION_SCORES:
        raise ValueError(f"region score {region_score!r} is not one of {', '.join(REGION_SCORES)}")
    if candidates.ndim != 1 or candidates.dtype != torch.int64:
        raise ValueError(f"candidates must be a 1-D int64 tensor of region ids, got {candidates.dtype} {tuple(candidates.shape)}")
    m = candidates.shape[0]
    if m == 0:
        raise ValueError("no candidate regions: every region of the pool is labelled")
    if budget < 1:
        raise ValueError(f"budget of {budget} regions must be positive")
    if budget > m:
        raise ValueError(f"budget of {budget} regions is larger than the {m} candidate regions")
    if spec.needs_mc_dropout and stats.bald is None:
        raise GpualError(
            f"strategy {spec.name} needs Monte-Carlo dropout statistics but the pooled stats have none: "
            "set acquisition.mc_passes > 0 in gpual.toml and select again"
        )
    if spec.needs_bank and bank_vectors is None:
        raise GpualError(
            f"strategy {spec.name} needs the memory bank of the previous round's checkpoint: train that round first"
        )
    if budget_pixels is not None and budget_pixels < 1:
        raise ValueError(f"a pixel budget of {budget_pixels} pixels must be positive")
    clusters_for(budget, clusters_per_budget)  # refuses a clusters_per_budget outside (0, 1]
    if class_balance < 0:
        raise ValueError(f"class_balance = {class_balance} must not be negative (0 = off)")
    balance = spec.balances(class_balance)
    if balance and (stats.class_votes is None or class_pixels is None):
        raise GpualError(
            f"acquisition.class_balance = {class_balance} needs each region's predicted class (pooled class votes) and the "
            "labelled pixels per class, and this selection was given "
            + ("neither" if stats.class_votes is None and class_pixels is None else
               "no class votes" if stats.class_votes is None else "no labelled pixels per class")
            + ": set acquisition.class_balance = 0 or pool with this gpual"
        )
    if balance and class_pixels.shape != (stats.class_votes.shape[1],):
        raise ValueError(f"class_pixels has shape {tuple(class_pixels.shape)} but the model predicts "
                         f"{stats.class_votes.shape[1]} classes")
    if candidates.device.type != backend.device.type:
        raise ValueError(f"candidates are on {candidates.device} but the backend is {backend.name}: move them first")
    if (spec.reads_labeled_embedding and labeled_embedding is not None and labeled_embedding.shape[0] > 0
            and labeled_embedding.shape[1:] != stats.embedding.shape[1:]):
        raise ValueError(
            f"labeled embeddings have shape {tuple(labeled_embedding.shape)} but region embeddings "
            f"{tuple(stats.embedding.shape)}: they must come from the same pooling"
        )
    return spec


def _handoff(
    spec: Strategy,
    backend: Backend,
    stats: RegionStats,
    candidates: Tensor,
    bank_vectors: Tensor | None,
    region_score: str,
    labeled_embedding: Tensor | None,
    permuted: int,
    seed: int,
    balance: bool = False,
    class_pixels: Tensor | None = None,
) -> _Inputs:
    """Gather the candidates' rows in torch on the stats' device and hand what ``spec``
    needs to ``xp`` zero-copy (:class:`_Inputs`: shapes, dtypes; on ``backend.device``).

    ``permuted``: the length P of random's seeded permutation (the budget, or M with a
    pixel budget); ``balance``: also hand off the (M,) predicted classes and the (C,)
    ``class_pixels``.
    """
    with torch.no_grad():
        if spec.score is not None:
            score = spec.score.compute(stats, candidates, region_score, balance)
        else:  # coreset ranks by distance and random by permutation: no per-region score.
            score = torch.zeros(candidates.shape[0], dtype=torch.float32, device=candidates.device)
        pixels = stats.pixels.index_select(0, candidates).to(torch.int64).contiguous()
        out: dict[str, Any] = {"scores": backend.from_torch(score.to(torch.float32).contiguous()),
                               "pixels": backend.from_torch(pixels)}
        if balance:
            predicted = stats.predicted_class.index_select(0, candidates).contiguous()
            out["predicted"] = backend.from_torch(predicted)
            out["class_pixels"] = backend.from_torch(class_pixels.to(predicted.device, torch.float32).contiguous())
        if spec.needs_embedding:
            rows = stats.embedding.index_select(0, candidates).to(torch.float32).contiguous()
            out["embedding"] = backend.from_torch(rows)
        if spec.needs_bank:
            out["bank"] = backend.from_torch(bank_vectors.to(torch.float32).contiguous())
        if spec.reads_labeled_embedding and labeled_embedding is not None and labeled_embedding.shape[0] > 0:
            out["centres"] = backend.from_torch(labeled_embedding.to(torch.float32).contiguous())
        if spec.needs_permutation:
            # Seeded on the device itself: the permutation never visits the host.
            generator = torch.Generator(device=candidates.device).manual_seed(seed)
            perm = torch.randperm(candidates.shape[0], generator=generator, device=candidates.device)[:permuted]
            out["permutation"] = backend.from_torch(perm.contiguous())
    return _Inputs(**out)


def _class_balance(inputs: _Inputs, class_balance: float, job: _Job) -> _Inputs:
    """``inputs`` with its (M,) scores times the (M,) class weights of the candidates'
    predicted classes (:func:`gpual.acquisition.ranking.class_balanced`; float32, same ``xp`` and device)."""
    with job.timed("ranking"):
        return dataclasses.replace(
            inputs, scores=class_balanced(inputs.scores, inputs.predicted, inputs.class_pixels, class_balance))


def _selection(indices: Any, picked: Any, job: _Job) -> Selection:
    """The ranking's (n,) positions and (n,) scores as a :class:`Selection` (int64 and
    float32 ``xp`` arrays on the backend's device) with the job's timings and notes."""
    xp = array_namespace(picked)
    return Selection(indices=xp.astype(indices, xp.int64), scores=xp.astype(picked, xp.float32),
                     timings=job.timings, notes=job.notes)


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
        raise ValueError(f"budget of {budget} regions must lie between 1 and the {m} candidate regions")
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
