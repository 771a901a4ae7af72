"""UMAP stage (method step 3): fit on the memory bank, transform the pooled regions.

The same call runs cuML's UMAP on CuPy arrays (GPU) or umap-learn on NumPy arrays (CPU);
the backend picks the class, the arguments are identical.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpual.backend import Backend
from gpual.config import UmapConfig
from gpual.errors import GpualError

log = logging.getLogger(__name__)

SPECTRAL_FAILED = "Spectral initialisation failed"
SPECTRAL_NOTE = ("UMAP's spectral initialisation did not converge on the memory bank's neighbour graph; "
                 "umap-learn used a random initial layout instead")

# UMAP's neighbour graph needs n_neighbors >= 2, hence at least 3 bank vectors.
MIN_BANK_VECTORS = 3


@dataclass
class UmapEmbedding:
    """Result of :func:`umap_embed`.

    Attributes:
        points: ``xp`` (R, n_components) float32, the regions in UMAP space, on the
            backend's device.
        timings: seconds for ``"umap_fit"`` and ``"umap_transform"`` (device-synchronised).
        notes: human-readable adjustments made to the configuration (e.g. n_neighbors
            clamped to a small bank); empty when none.
    """

    points: Any
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def umap_embed(backend: Backend, bank_vectors: Any, region_embedding: Any, cfg: UmapConfig,
               transform: Callable[[Any, Any], Any] | None = None) -> UmapEmbedding:
    """Fit UMAP on the memory bank and map the pooled region embeddings into its space.

    Args:
        backend: chooses cuML (CUDA) or umap-learn (CPU).
        bank_vectors: ``xp`` (N, D) float32, the memory bank's vectors (all classes).
        region_embedding: ``xp`` (R, D) float32, pooled region embeddings.
        cfg: n_components, n_neighbors, min_dist, random_state, init.
        transform: ``transform(fitted_reducer, regions) -> points`` instead of
            ``fitted_reducer.transform(regions)`` (the Dask scale-out,
            :meth:`gpual.distributed.DaskCluster.umap_transform`).

    Returns:
        :class:`UmapEmbedding` with points ``xp`` (R, n_components) float32.

    n_neighbors larger than N - 1 is clamped to N - 1 (said in ``notes`` and logged).
    Raises :class:`GpualError` when the bank holds fewer than 3 vectors or the
    dimensions of bank and regions differ.
    """
    xp = backend.xp
    bank = xp.ascontiguousarray(xp.asarray(bank_vectors, dtype=xp.float32))
    regions = xp.ascontiguousarray(xp.asarray(region_embedding, dtype=xp.float32))
    if bank.ndim != 2 or regions.ndim != 2:
        raise GpualError(
            f"UMAP expects 2-D bank vectors and region embeddings, got shapes {tuple(bank.shape)} and {tuple(regions.shape)}"
        )
    n_bank, dim = bank.shape
    if regions.shape[1] != dim:
        raise GpualError(
            f"memory-bank vectors have {dim} dims but region embeddings have {regions.shape[1]}: "
            "the checkpoint and the pooled features come from different models; retrain the round"
        )
    if n_bank < MIN_BANK_VECTORS:
        raise GpualError(
            f"the memory bank holds {n_bank} vectors but UMAP needs at least {MIN_BANK_VECTORS}: "
            "train the previous round first (the bank fills during training), or use --strategy kmeans-entropy"
        )
    if regions.shape[0] == 0:
        raise GpualError("no candidate regions to embed: every region is already labeled")

    notes: list[str] = []
    n_neighbors = cfg.n_neighbors
    if n_neighbors > n_bank - 1:
        n_neighbors = n_bank - 1
        notes.append(f"umap.n_neighbors {cfg.n_neighbors} > bank size - 1; clamped to {n_neighbors} ({n_bank} bank vectors)")
        log.warning(notes[-1])
    if n_neighbors < 2:
        raise GpualError(f"config umap.n_neighbors = {cfg.n_neighbors} must be at least 2: fix it in gpual.toml")

    reducer = backend.umap(
        n_components=cfg.n_components,
        n_neighbors=n_neighbors,
        min_dist=cfg.min_dist,
        random_state=cfg.random_state,
        init=cfg.init,
    )
    timings: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # umap-learn says that a fixed random_state disables its parallelism: expected,
        # it is the price of reproducible selections.
        warnings.filterwarnings("ignore", message=".*n_jobs value .* overridden.*")
        backend.synchronize()
        t0 = time.perf_counter()
        reducer.fit(bank)
        backend.synchronize()
        t1 = time.perf_counter()
        points = transform(reducer, regions) if transform is not None else reducer.transform(regions)
        backend.synchronize()
        t2 = time.perf_counter()
    for w in caught:
        if SPECTRAL_FAILED in str(w.message):
            # umap-learn's multi-line warning, once per attempt: its eigensolver found too
            # small an eigengap in the bank's graph; it falls back to a random layout.
            if SPECTRAL_NOTE not in notes:
                notes.append(SPECTRAL_NOTE)
                log.warning(SPECTRAL_NOTE)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    timings["umap_fit"] = t1 - t0
    timings["umap_transform"] = t2 - t1
    # cuML (output_type="cupy") returns CuPy and umap-learn NumPy: both are ``xp`` already;
    # asarray only fixes the dtype (no copy when it is float32).
    return UmapEmbedding(points=xp.asarray(points, dtype=xp.float32), timings=timings, notes=notes)
