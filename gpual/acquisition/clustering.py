"""KMeans stage (method step 4): k = the round's budget clusters over the candidates.

cuML's KMeans on CuPy arrays (GPU) or scikit-learn's on NumPy arrays (CPU), same
arguments; the labels stay in the backend's namespace. ``kmeans.levels = 2`` clusters in
two levels (coarse groups, then each group into its share of the k clusters) for pools
where one KMeans with k = budget costs too much (n * k distance evaluations per iteration);
``"auto"`` (the default) does so only above :data:`TWO_LEVELS_ABOVE`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gpual.acquisition.ranking import stable_argsort
from gpual.backend import Backend
from gpual.config import KMeansConfig
from gpual.seeding import KMEANS_GROUP, derive_seed

# "auto" clusters in two levels when regions x k exceeds this. Measured (cuML 26.10,
# max_iter 300): 1M x 10k = 1e10 took 6.5 s in one level and 1.8 s in two on an H200
# (8.1 s in one on an H100); 4M x 40k took 74.7 s in one level on an H100 and 6.5 s in two
# on the H200. One level thus costs well under a second up to 1e9, where a CamVid pool
# (160k x 1.6k = 2.6e8) lies.
TWO_LEVELS_ABOVE = 10**9


def resolve_levels(levels: int | str, n: int, k: int) -> int:
    """1 or 2: ``kmeans.levels`` for ``n`` points and ``k`` clusters (``"auto"``: 2 when
    n * k > :data:`TWO_LEVELS_ABOVE`, else 1)."""
    if levels == "auto":
        return 2 if n * k > TWO_LEVELS_ABOVE else 1
    return int(levels)


def kmeans_labels(backend: Backend, points: Any, k: int, cfg: KMeansConfig,
                  fit_predict: Callable[[Any, dict[str, Any]], Any] | None = None) -> Any:
    """Cluster ``points`` into ``k`` clusters.

    Args:
        backend: chooses cuML (CUDA) or scikit-learn (CPU).
        points: ``xp`` (R, d) float array, R candidate regions (UMAP points or raw
            pooled embeddings).
        k: number of clusters = the round's budget in regions.
        cfg: max_iter, n_init, random_state, tol, init ("default" leaves the library's own),
            levels (1: one KMeans; 2: see :func:`two_level_labels`; "auto": see
            :func:`resolve_levels`).
        fit_predict: ``fit_predict(points, kmeans_params) -> labels`` instead of the
            backend's estimator (the Dask scale-out,
            :meth:`gpual.distributed.DaskCluster.kmeans_fit_predict`); with two levels,
            for the first level only (the groups are small).

    Returns:
        ``xp`` (R,) int64 cluster label in [0, k) per region, on the backend's device.

    Raises ValueError when k is not in [1, R] (KMeans needs at least one point per
    cluster; :func:`gpual.acquisition.select.resolve_budget` keeps the user's budget within the
    candidates) or the settings are out of range (:meth:`gpual.config.Config.validate`
    refuses them in gpual.toml).
    """
    xp = backend.xp
    x = xp.ascontiguousarray(xp.asarray(points, dtype=xp.float32))
    if x.ndim != 2:
        raise ValueError(f"KMeans expects 2-D points (regions, dims), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"KMeans: k = {k} clusters must be positive")
    if k > n:
        raise ValueError(f"KMeans: k = {k} clusters is more than the {n} points")
    if cfg.max_iter < 1 or cfg.n_init < 1:
        raise ValueError(f"KMeans: max_iter = {cfg.max_iter} and n_init = {cfg.n_init} must be at least 1")
    if resolve_levels(cfg.levels, n, k) == 2:
        return two_level_labels(backend, x, k, cfg, fit_predict)
    return _fit_predict(backend, x, k, cfg, fit_predict)


def two_level_labels(backend: Backend, x: Any, k: int, cfg: KMeansConfig,
                     fit_predict: Callable[[Any, dict[str, Any]], Any] | None = None) -> Any:
    """``k`` clusters of ``x`` ((R, d) float32 ``xp``) in two levels; (R,) int64 labels.

    KMeans first splits the points into g = round(sqrt(k)) groups; group j (n_j points)
    then gets k_j clusters of its own (:func:`group_shares`: in proportion to n_j, at least
    one, at most n_j, summing to k), numbered after the previous groups'. Per iteration
    that is about n * (g + k / g) = 2 n sqrt(k) distance evaluations instead of n * k. One
    small device-to-host copy (the g group sizes) decides the shares.
    """
    xp = backend.xp
    groups = max(1, min(k, round(math.sqrt(k))))
    coarse = _fit_predict(backend, x, groups, cfg, fit_predict)
    sizes = backend.to_host(xp.bincount(coarse, minlength=groups)).astype(np.int64)
    shares = group_shares(k, sizes)
    order = stable_argsort(coarse)  # members of group 0, then group 1, ...
    labels = xp.empty(x.shape[0], dtype=xp.int64)
    start, first_label = 0, 0
    for j, (size, share) in enumerate(zip(sizes.tolist(), shares.tolist())):
        members = order[start : start + size]
        start += size
        if size == 0:
            continue
        if share == size:  # as many clusters as points: each its own
            local = xp.arange(size, dtype=xp.int64)
        elif share == 1:
            local = xp.zeros(size, dtype=xp.int64)
        else:
            local = _fit_predict(backend, xp.take(x, members, axis=0), share,
                                 dataclasses.replace(cfg, random_state=derive_seed(cfg.random_state, KMEANS_GROUP, j)), None)
        labels[members] = local + first_label
        first_label += share
    return labels


def group_shares(k: int, sizes: np.ndarray) -> np.ndarray:
    """Clusters per group: (G,) int64 summing to ``k``, 0 for empty groups, else between 1
    and the group's size, otherwise in proportion to the sizes (largest remainders first;
    ties to the lower group). Needs sum(sizes) >= k >= the number of non-empty groups."""
    sizes = np.asarray(sizes, dtype=np.int64)
    shares = (sizes > 0).astype(np.int64)
    if not shares.sum() <= k <= sizes.sum():
        raise ValueError(f"cannot split {k} clusters over groups of sizes {sizes.tolist()}")
    ideal = (k - shares.sum()) * sizes / sizes.sum()  # what is left after one each, pro rata
    shares += np.minimum(np.floor(ideal).astype(np.int64), sizes - shares)
    while shares.sum() < k:  # hand out the rest by largest remainder, where a group has room
        room = shares < sizes
        remainder = np.where(room, ideal - (shares - (sizes > 0)), -np.inf)
        take = np.argsort(-remainder, kind="stable")[: min(int(k - shares.sum()), int(room.sum()))]
        shares[take] += 1
    return shares


def _fit_predict(backend: Backend, x: Any, k: int, cfg: KMeansConfig,
                 fit_predict: Callable[[Any, dict[str, Any]], Any] | None) -> Any:
    params: dict[str, Any] = dict(n_clusters=k, max_iter=cfg.max_iter, n_init=cfg.n_init, random_state=cfg.random_state,
                                  tol=cfg.tol)
    if cfg.init != "default":
        params["init"] = cfg.init
    labels = fit_predict(x, params) if fit_predict is not None else backend.kmeans(**params).fit_predict(x)
    # scikit-learn gives int32 NumPy, cuML (output_type="cupy") int32 CuPy.
    return backend.xp.asarray(labels).astype(backend.xp.int64)
