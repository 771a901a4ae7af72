"""Ranking stage (method step 5): per-cluster argmax, top-up, top-k.

Written once against the array API (``array_api_compat.array_namespace``), so the same
code runs on NumPy and on CuPy arrays on the device. Every function is one vectorised
pass (sorts, gathers, ``searchsorted``): no Python loop over clusters or regions and no
data-dependent output sizes (boolean indexing would read a count back to the host).

Ties are broken by the lowest index everywhere, so a selection is a deterministic
function of its scores and clusters.
"""
from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device

from gpual.errors import GpualError


def stable_argsort(x: Any, *, descending: bool = False) -> Any:
    """Indices sorting 1-D ``x``; equal values keep index order (also when descending).

    NumPy needs ``kind="stable"``; CuPy's sort is always stable. The array-API wrapper
    asks both for a stable sort and builds the descending order from a flipped ascending
    one, so ties stay lowest-index-first.
    """
    xp = array_namespace(x)
    return xp.argsort(x, stable=True, descending=descending)


def cluster_argmax(scores: Any, clusters: Any, k: int) -> Any:
    """Per cluster, the index of its highest score.

    Args:
        scores: (n,) float array (NumPy or CuPy).
        clusters: (n,) integer array, values in [0, k), same library and device.
        k: number of clusters.

    Returns:
        (k,) int64: for cluster c the index i maximising ``scores[i]`` among
        ``clusters == c`` (ties: lowest i), or -1 when cluster c is empty.

    Method (RAPIDS.md section 5a): order by descending score (stable), then stably by
    cluster; each cluster's run then starts with its winner, found with ``searchsorted``.
    """
    xp = array_namespace(scores, clusters)
    n = scores.shape[0]
    if clusters.shape != (n,) or scores.ndim != 1:
        raise GpualError(
            f"cluster_argmax: scores {tuple(scores.shape)} and clusters {tuple(clusters.shape)} must be 1-D of one length"
        )
    if k < 1:
        raise GpualError(f"cluster_argmax: k = {k} clusters must be positive")
    ids = xp.arange(k, dtype=xp.int64, device=device(scores))
    if n == 0:
        return xp.full(k, -1, dtype=xp.int64, device=device(scores))
    clusters = xp.astype(clusters, xp.int64)
    by_score = stable_argsort(scores, descending=True)
    order = xp.take(by_score, stable_argsort(xp.take(clusters, by_score)))
    sorted_clusters = xp.take(clusters, order)
    start = xp.searchsorted(sorted_clusters, ids)  # first position of each cluster's run
    # in range also for clusters past the last present one (minimum, not the array-API
    # clip wrapper, which masks with boolean indexing and would sync on CuPy)
    at = xp.minimum(start, n - 1)
    present = xp.take(sorted_clusters, at) == ids
    empty = xp.asarray(-1, dtype=xp.int64, device=device(scores))
    return xp.where(present, xp.astype(xp.take(order, at), xp.int64), empty)


def select_per_cluster(scores: Any, clusters: Any, k: int, budget: int) -> Any:
    """The method's selection: each cluster's best region, topped up to ``budget``.

    Args:
        scores: (n,) float array, higher = more informative (e.g. H(S)).
        clusters: (n,) integer array in [0, k).
        k: number of clusters.
        budget: number of indices to return, 1 <= budget <= n.

    Returns:
        (budget,) int64 distinct indices into ``scores``: the cluster winners (highest
        score per non-empty cluster, ties lowest index) come first in priority; the places
        of empty clusters (or any shortfall) go to the highest-scoring indices not yet
        selected. If budget is below the number of winners, the best-scoring winners are
        kept. The result is ordered by descending score, ties by lowest index.
    """
    xp = array_namespace(scores, clusters)
    n = scores.shape[0]
    if not 1 <= budget <= n:
        raise GpualError(f"budget of {budget} regions must lie between 1 and the {n} candidate regions: lower --budget")
    winners = cluster_argmax(scores, clusters, k)
    positions = xp.arange(n, dtype=xp.int64, device=device(scores))
    # Index i is its cluster's winner iff winners[clusters[i]] == i; no scatter needed.
    is_winner = xp.take(winners, xp.astype(clusters, xp.int64)) == positions
    by_score = stable_argsort(scores, descending=True)
    # Winners first (each group still by descending score), then everything else.
    loser_rank = xp.astype(~xp.take(is_winner, by_score), xp.int8)
    priority = xp.take(by_score, stable_argsort(loser_rank))
    chosen = xp.sort(priority[:budget])  # index order, so the final stable sort breaks ties by index
    return xp.take(chosen, stable_argsort(xp.take(scores, chosen), descending=True))


def top_k(scores: Any, k: int) -> Any:
    """The ``k`` highest scores' indices, (k,) int64, by descending score, ties by lowest index."""
    xp = array_namespace(scores)
    n = scores.shape[0]
    if not 0 <= k <= n:
        raise GpualError(f"budget of {k} regions must lie between 0 and the {n} candidate regions: lower --budget")
    return xp.astype(stable_argsort(scores, descending=True)[:k], xp.int64)
