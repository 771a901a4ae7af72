"""KMeans stage (method step 4): k = the round's budget clusters over the candidates.

cuML's KMeans on CuPy arrays (GPU) or scikit-learn's on NumPy arrays (CPU), same
arguments; the labels stay in the backend's namespace.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpual.backend import Backend
from gpual.config import KMeansConfig
from gpual.errors import GpualError


def kmeans_labels(backend: Backend, points: Any, k: int, cfg: KMeansConfig,
                  fit_predict: Callable[[Any, dict[str, Any]], Any] | None = None) -> Any:
    """Cluster ``points`` into ``k`` clusters.

    Args:
        backend: chooses cuML (CUDA) or scikit-learn (CPU).
        points: ``xp`` (R, d) float array, R candidate regions (UMAP points or raw
            pooled embeddings).
        k: number of clusters = the round's budget in regions.
        cfg: max_iter, n_init, random_state, tol, init ("default" leaves the library's own).
        fit_predict: ``fit_predict(points, kmeans_params) -> labels`` instead of the
            backend's estimator (the Dask scale-out,
            :meth:`gpual.distributed.DaskCluster.kmeans_fit_predict`).

    Returns:
        ``xp`` (R,) int64 cluster label in [0, k) per region, on the backend's device.

    Raises :class:`GpualError` when k is not in [1, R] (the budget cannot exceed the
    candidates: KMeans needs at least one point per cluster).
    """
    xp = backend.xp
    x = xp.ascontiguousarray(xp.asarray(points, dtype=xp.float32))
    if x.ndim != 2:
        raise GpualError(f"KMeans expects 2-D points (regions, dims), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1:
        raise GpualError(f"budget of {k} regions must be positive: raise --budget")
    if k > n:
        raise GpualError(
            f"budget of {k} regions (KMeans clusters) is larger than the {n} unlabeled candidate regions: lower --budget"
        )
    if cfg.max_iter < 1 or cfg.n_init < 1:
        raise GpualError(
            f"config kmeans.max_iter = {cfg.max_iter} and kmeans.n_init = {cfg.n_init} must be at least 1: fix them in gpual.toml"
        )
    params: dict[str, Any] = dict(n_clusters=k, max_iter=cfg.max_iter, n_init=cfg.n_init, random_state=cfg.random_state,
                                  tol=cfg.tol)
    if cfg.init != "default":
        params["init"] = cfg.init
    labels = fit_predict(x, params) if fit_predict is not None else backend.kmeans(**params).fit_predict(x)
    # scikit-learn gives int32 NumPy, cuML (output_type="cupy") int32 CuPy.
    return xp.asarray(labels).astype(xp.int64)
