"""Ranking stage (method step 5): per-cluster argmax, top-up, top-k; pixel budgets; class balance.

Written once against the array API (``array_api_compat.array_namespace``), so the same
code runs on NumPy and on CuPy arrays on the device. Every function is one vectorised
pass (sorts, gathers, ``searchsorted``): no Python loop over clusters or regions and no
data-dependent output sizes (boolean indexing would read a count back to the host),
except the pixel-budget cuts (:func:`within_pixels`, :func:`most_within_pixels`), whose
length is the budget's answer: they read one count back.

Ties are broken by the lowest index everywhere, so a selection is a deterministic
function of its scores and clusters.
"""
from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device


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
        raise ValueError(
            f"cluster_argmax: scores {tuple(scores.shape)} and clusters {tuple(clusters.shape)} must be 1-D of one length"
        )
    if k < 1:
        raise ValueError(f"cluster_argmax: k = {k} clusters must be positive")
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


def rank_in_cluster(scores: Any, clusters: Any) -> Any:
    """(n,) int64: each index's place in its cluster by descending score (0 = the cluster's
    best; ties: lower index first), so ``rank == 0`` marks :func:`cluster_argmax`'s winners."""
    xp = array_namespace(scores, clusters)
    n = scores.shape[0]
    if clusters.shape != (n,) or scores.ndim != 1:
        raise ValueError(
            f"rank_in_cluster: scores {tuple(scores.shape)} and clusters {tuple(clusters.shape)} must be 1-D of one length"
        )
    clusters = xp.astype(clusters, xp.int64)
    by_score = stable_argsort(scores, descending=True)
    order = xp.take(by_score, stable_argsort(xp.take(clusters, by_score)))  # by cluster, then score
    sorted_clusters = xp.take(clusters, order)
    run_start = xp.searchsorted(sorted_clusters, sorted_clusters)  # first position of each one's cluster run
    rank_sorted = xp.arange(n, dtype=xp.int64, device=device(scores)) - xp.astype(run_start, xp.int64)
    # Back to index order through the inverse permutation (a sort, not a scatter).
    return xp.take(rank_sorted, stable_argsort(order))


def cluster_priority(scores: Any, clusters: Any, depth: int = 1) -> Any:
    """(n,) int64, every index once, in the order the clustering strategies take them.

    Turn t = 0 .. depth-1 holds each cluster's (t+1)-th best index; after the ``depth``
    turns every other index follows. Within a turn, and in the rest, by descending score
    (ties: lowest index). ``depth = 1`` is the method's order: the cluster winners, then
    the highest scores left (what fills the places of empty clusters); ``depth = 2`` takes
    two regions of every cluster before any third.
    """
    xp = array_namespace(scores, clusters)
    if depth < 1:
        raise ValueError(f"cluster_priority: depth = {depth} turns must be at least 1")
    turn = xp.minimum(rank_in_cluster(scores, clusters), depth)  # depth = "the rest"
    by_score = stable_argsort(scores, descending=True)
    return xp.astype(xp.take(by_score, stable_argsort(xp.take(turn, by_score))), xp.int64)


def select_per_cluster(scores: Any, clusters: Any, k: int, budget: int, depth: int = 1) -> Any:
    """The method's selection: each cluster's best region, topped up to ``budget``.

    Args:
        scores: (n,) float array, higher = more informative (e.g. H(S)).
        clusters: (n,) integer array in [0, k).
        k: number of clusters.
        budget: number of indices to return, 1 <= budget <= n.
        depth: regions per cluster taken in turn before the top-up (:func:`cluster_priority`);
            1 = the method (k = budget clusters, one region each).

    Returns:
        (budget,) int64 distinct indices into ``scores``: the cluster winners (highest
        score per non-empty cluster, ties lowest index) come first in priority (with
        ``depth`` > 1: then each cluster's second best, and so on); the places of empty
        clusters (or any shortfall) go to the highest-scoring indices not yet selected. If
        budget is below the number of winners, the best-scoring winners are kept. The
        result is ordered by descending score, ties by lowest index.
    """
    n = scores.shape[0]
    if not 1 <= budget <= n:
        raise ValueError(f"budget of {budget} regions must lie between 1 and the {n} candidate regions")
    if k < 1:
        raise ValueError(f"select_per_cluster: k = {k} clusters must be positive")
    return by_descending_score(scores, cluster_priority(scores, clusters, depth)[:budget])


def by_descending_score(scores: Any, chosen: Any) -> Any:
    """``chosen`` (distinct indices into ``scores``) reordered by descending score, ties by lowest index."""
    xp = array_namespace(scores, chosen)
    chosen = xp.sort(xp.astype(chosen, xp.int64))  # index order, so the stable sort breaks ties by index
    return xp.take(chosen, stable_argsort(xp.take(scores, chosen), descending=True))


def within_pixels(order: Any, pixels: Any, budget_pixels: int) -> Any:
    """The longest prefix of ``order`` whose regions hold at most ``budget_pixels`` pixels
    together, and never less than its first region (a round always labels something).

    Args:
        order: (m,) int64 distinct positions, in the order a strategy takes them.
        pixels: (n,) integer pixel counts, indexed by those positions.
        budget_pixels: the round's budget in pixels, >= 1.

    Returns:
        ``order[:count]``. The regions are taken as ranked, never reordered or skipped to
        fill the budget better: the shortfall is below the size of the region that did not
        fit. One count is read back to the host (the answer's length).
    """
    xp = array_namespace(order, pixels)
    if budget_pixels < 1:
        raise ValueError(f"a pixel budget of {budget_pixels} pixels must be positive")
    if order.shape[0] == 0:
        return order
    spent = xp.cumulative_sum(xp.astype(xp.take(pixels, order), xp.int64))
    count = int(xp.searchsorted(spent, xp.asarray([budget_pixels], dtype=xp.int64, device=device(order)), side="right")[0])
    return order[: max(1, count)]


def most_within_pixels(pixels: Any, budget_pixels: int) -> int:
    """The most regions any selection within ``budget_pixels`` can hold: as many of the
    smallest as fit (at least 1, at most all). A bound for greedy strategies that pick one
    region at a time (coreset)."""
    n = pixels.shape[0]
    if n == 0:
        return 0
    return int(within_pixels(stable_argsort(pixels), pixels, budget_pixels).shape[0])


def class_balance_weights(predicted: Any, class_pixels: Any, exponent: float) -> Any:
    """Per-region weights exp(-exponent * f_c) of class-balanced acquisition.

    After Cai et al., "Revisiting superpixels for active learning in semantic segmentation
    with realistic annotation costs" (CVPR 2021), whose code multiplies a region's
    uncertainty by exp(-p_c). Here f_c is the share of class c among the labelled pixels
    so far and c the region's dominant predicted class: a region predicted as a class the
    labels rarely hold keeps its score, one of the most labelled class is damped the most
    (by exp(-exponent) at most, if every labelled pixel is that class).

    Args:
        predicted: (n,) integer dominant predicted class per region, in [0, C).
        class_pixels: (C,) labelled pixels per class (void excluded); all zero = no
            labels yet, then every weight is 1.
        exponent: >= 0; 0 gives weights 1 (off), 1 is Cai et al.'s weight.

    Returns:
        (n,) float32 weights in [exp(-exponent), 1].
    """
    xp = array_namespace(predicted, class_pixels)
    if exponent < 0:
        raise ValueError(f"class_balance = {exponent} must not be negative (0 = off)")
    if class_pixels.ndim != 1 or predicted.ndim != 1:
        raise ValueError(f"class_balance_weights: predicted {tuple(predicted.shape)} and class_pixels "
                         f"{tuple(class_pixels.shape)} must be 1-D")
    counts = xp.astype(class_pixels, xp.float64)
    share = counts / xp.maximum(xp.sum(counts), xp.asarray(1.0, dtype=xp.float64, device=device(counts)))
    weight = xp.astype(xp.exp(-exponent * share), xp.float32)
    return xp.take(weight, xp.astype(predicted, xp.int64))


def class_balanced(scores: Any, predicted: Any, class_pixels: Any, exponent: float) -> Any:
    """``scores`` (n,) times :func:`class_balance_weights`: float32, same library and device.

    The scores should be non-negative uncertainties (entropy, BALD, 1 - max p, 1 - margin):
    a weight below 1 must lower a region's priority, which it does only for scores >= 0.
    """
    xp = array_namespace(scores, predicted, class_pixels)
    return xp.astype(scores, xp.float32) * class_balance_weights(predicted, class_pixels, exponent)


def top_k(scores: Any, k: int) -> Any:
    """The ``k`` highest scores' indices, (k,) int64, by descending score, ties by lowest index."""
    xp = array_namespace(scores)
    n = scores.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"budget of {k} regions must lie between 0 and the {n} candidate regions")
    return xp.astype(stable_argsort(scores, descending=True)[:k], xp.int64)
