"""One acquisition round scaled out over a Dask cluster (``gpual select --dask/--gpus/--dask-workers``).

How the round's work is split (the stages and their results are those of the
single-process path, :func:`gpual.acquisition.select.acquire`):

    teacher forward + pooling  the pool's images in contiguous shards of whole batches, one
                               shard per worker; each worker loads the checkpoint and runs
                               the same code as one process (:func:`gpual.acquisition.forward.pool_images`)
                               on its images and their cached superpixels, and returns only
                               its regions' pooled statistics (host NumPy). Shards carry the
                               global region offsets of the superpixel index, so the client
                               concatenates them in global-id order.
    UMAP                       fitted once on the memory bank, on the client; the candidates'
                               transform runs on the workers over partitions of at most
                               ``partition_regions`` rows.
    KMeans                     GPU: ``cuml.dask.cluster.KMeans`` over the partitioned points;
                               CPU: scikit-learn on the gathered points (UMAP's (M, 2): cheap).
    ranking, manifest          on the client (:mod:`gpual.acquisition.ranking`), on the small result.

Where the workers run:

    --dask ADDRESS       an existing scheduler (``dask scheduler`` + ``dask worker`` /
                         ``dask cuda worker``); its workers must have gpual installed and
                         see the workspace and the dataset at the client's paths.
    --gpus N             ``dask_cuda.LocalCUDACluster``: one worker process per GPU of this
                         machine (needs the ``gpu`` extra).
    --dask-workers N     ``dask.distributed.LocalCluster`` of N single-threaded CPU worker
                         processes (the CPU analogue, used by the tests).

A worker lost during a round (its process killed, the scheduler gone) makes the round
fail with one line and write nothing (the query file is written last, after every Dask
computation); running the command again selects the round. Dask itself first retries a
task whose worker died, up to its ``distributed.scheduler.allowed-failures`` (default 3).

Reproducibility: on CPU the pooled statistics equal the single-process ones bit for bit
(shards are whole batches) when that process runs torch on one thread, as each worker
does (Dask sets OMP_NUM_THREADS=1); more threads change the last bits of a convolution's
sums, not the sharding. On CUDA, atomics make the last bits vary. The UMAP points may
depend on how the candidates are partitioned (umap-learn seeds each transform call;
cuML's transform is stochastic): the partitions depend only on ``partition_regions``,
not on the number of workers.

GPU path (``LocalCUDACluster``, ``cuml.dask.manifold.UMAP``, ``cuml.dask.cluster.KMeans``):
written against the documented RAPIDS 26.x APIs but NOT run by the test suite, which has
no GPU; the CPU path is tested for real on a ``LocalCluster``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gpual.backend import amp_enabled, cpu_backend
from gpual.errors import GpualError

if TYPE_CHECKING:
    from gpual.backend import Backend
    from gpual.acquisition.pooling import RegionStats
    from gpual.workspace import Workspace

# Candidate rows per UMAP-transform partition: big enough to amortise a task (and, on the
# GPU, a kernel launch sequence), small enough to spread a Cityscapes-size pool (~4M regions).
DEFAULT_PARTITION_REGIONS = 100_000
# Seconds to wait for a scheduler (and its first worker) before giving up.
CONNECT_TIMEOUT_S = 10.0

_STAT_FIELDS = ("embedding", "entropy_sum", "entropy_mean", "margin_mean", "maxprob_mean", "bald", "pixels", "class_votes")


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    """What Dask raises when a worker or the scheduler goes away mid-computation."""
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    # FutureCancelledError (and its group) derive from concurrent.futures.CancelledError.
    return (KilledWorker, CommClosedError, concurrent.futures.CancelledError, TimeoutError)


class DaskCluster:
    """A Dask client and, for the local kinds, the cluster it started.

    Attributes:
        client: the ``distributed.Client``.
        description: what it is connected to, for the CLI's summary.
        partition_regions: candidate rows per UMAP-transform partition.
    """

    def __init__(self, client: Any, description: str, owned: Any = None,
                 partition_regions: int = DEFAULT_PARTITION_REGIONS) -> None:
        if partition_regions < 1:
            raise GpualError(f"partition_regions = {partition_regions} must be at least 1", 2)
        self.client = client
        self.description = description
        self.partition_regions = partition_regions
        self._owned = owned

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def close(self) -> None:
        """Close the client, and the cluster if this object started it."""
        self.client.close()
        if self._owned is not None:
            self._owned.close()

    # --- failures -------------------------------------------------------------------
    @contextmanager
    def round_guard(self, round: int) -> Iterator[None]:
        """Turn a worker or scheduler lost during the block into one :class:`GpualError`.

        The caller writes nothing inside the block, so nothing was written when it fails.
        """
        try:
            yield
        except GpualError:
            raise
        except _lost_worker_errors() as exc:
            raise GpualError(
                f"a Dask worker was lost during round {round} ({_describe_loss(exc)}): nothing was written; run the command again"
            ) from None

    # --- stage 1: teacher forward + pooling, sharded over the workers --------------
    def pool_with_teacher(
        self, ws: Workspace, round: int, backend: Backend, index: pd.DataFrame, n_regions: int, strategy: str,
        progress: Any = None,
    ) -> tuple[RegionStats, torch.Tensor, dict[str, float]]:
        """The distributed twin of ``acquisition.pool_with_teacher``: same arguments, same result.

        Returns (RegionStats of all R regions on ``backend.device``, memory-bank vectors
        (N, D) float32 on ``backend.device``, timings): ``forward`` and ``pooling`` are the
        slowest shard's seconds, ``pool_wall`` the client's wall time for the stage
        (workers loading the checkpoint and the transfer included).
        """
        from gpual.acquisition.pooling import RegionStats
        from gpual.training.checkpoints import load_bank

        t0 = time.perf_counter()
        # The client reads the checkpoint too: it needs the bank, and a missing checkpoint
        # fails here with the usual message before any worker is asked.
        bank = load_bank(ws.checkpoint_path(round - 1), backend.device)
        bank_vectors, _ = bank.vectors()
        shards = plan_shards(len(index), ws.config.acquisition.batch_size, max(1, self.n_workers))
        # Absolute image paths: a worker's working directory need not be the client's.
        index = index.assign(path=[os.path.abspath(p) for p in index["path"].astype(str)])
        root = str(Path(ws.root).resolve())
        token = uuid.uuid4().hex[:8]
        futures = [
            self.client.submit(
                pool_shard, root, ws.config, round, backend.device.type, index.iloc[start:stop], strategy, first_batch,
                key=f"gpual-pool-shard-{round}-{i}-{token}", pure=False, retries=0,
            )
            for i, (first_batch, start, stop) in enumerate(shards)
        ]
        try:
            results = self._gather_in_order(futures, [stop - start for _, start, stop in shards], len(index), progress)
        finally:
            self.client.cancel(futures)
        fields: dict[str, torch.Tensor | None] = {}
        for name in _STAT_FIELDS:
            parts = [r["stats"][name] for r in results]
            fields[name] = None if any(p is None for p in parts) else torch.from_numpy(np.concatenate(parts)).to(backend.device)
        stats = RegionStats(**fields)
        if stats.n_regions != n_regions:
            raise GpualError(f"the workers pooled {stats.n_regions} regions but the index counts {n_regions}: "
                             f"run `gpual superpixels {ws.root}` again")
        timings = {
            "forward": max(r["timings"]["forward"] for r in results),
            "pooling": max(r["timings"]["pooling"] for r in results),
            "loader_wait": max(r["timings"]["loader_wait"] for r in results),
            "pool_wall": time.perf_counter() - t0,
        }
        return stats, bank_vectors, timings

    def _gather_in_order(self, futures: list[Any], sizes: list[int], total: int, progress: Any) -> list[Any]:
        """Results of ``futures`` in submission order, reporting images done as shards finish."""
        from distributed import as_completed

        position = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        done = 0
        for future in as_completed(futures):
            i = position[future.key]
            results[i] = future.result()  # re-raises the worker's exception (GpualError included)
            done += sizes[i]
            if progress:
                progress(done, total)
        return results

    # --- stage 3: UMAP transform over region partitions ---------------------------
    def umap_transform(self, reducer: Any, regions: Any) -> Any:
        """``reducer`` (fitted on the bank, on the client) applied to ``regions`` on the workers.

        Args:
            reducer: a fitted ``cuml.manifold.UMAP`` (CuPy input) or ``umap.UMAP``.
            regions: ``xp`` (M, D) float32 candidate embeddings (CuPy or NumPy).

        Returns:
            ``xp`` (M, n_components) float32 in row order, on the client.

        GPU: ``cuml.dask.manifold.UMAP(model=reducer)`` over a Dask CuPy array chunked by
        ``partition_regions`` rows (cuML sends the fitted model to each worker). CPU: the
        fitted umap-learn model is broadcast once and each partition is transformed by a
        task on a worker.
        """
        from array_api_compat import is_cupy_array

        m = regions.shape[0]
        if is_cupy_array(regions):  # GPU path: not run by the test suite
            import cupy
            import dask.array as da
            from cuml.dask.manifold import UMAP as DaskUMAP

            chunks = da.from_array(regions, chunks=(self.partition_regions, -1), asarray=False)
            points = DaskUMAP(model=reducer, client=self.client).transform(chunks).compute()
            return cupy.asarray(points, dtype=cupy.float32)
        bounds = _partition_bounds(m, self.partition_regions)
        model = self.client.scatter(reducer, broadcast=True)
        parts = self.client.scatter([np.ascontiguousarray(regions[a:b]) for a, b in bounds])
        token = uuid.uuid4().hex[:8]
        futures = [
            self.client.submit(_umap_transform_part, model, part, key=f"gpual-umap-transform-{i}-{token}", retries=0)
            for i, part in enumerate(parts)
        ]
        try:
            points = self.client.gather(futures)
        finally:
            self.client.cancel([*futures, *parts, model])
        return np.concatenate(points).astype(np.float32, copy=False)

    # --- stage 4: KMeans -------------------------------------------------------------
    def kmeans_fit_predict(self, points: Any, params: dict[str, Any]) -> Any:
        """Cluster labels (M,) of ``points`` (M, d) with KMeans(**params).

        GPU: ``cuml.dask.cluster.KMeans`` on a Dask CuPy array chunked by
        ``partition_regions`` rows (only centroids move between workers), labels gathered
        as CuPy. CPU: scikit-learn on the client, on the gathered points (UMAP's (M, 2):
        cheap).
        """
        from array_api_compat import is_cupy_array

        if is_cupy_array(points):  # GPU path: not run by the test suite
            import dask.array as da
            from cuml.dask.cluster import KMeans as DaskKMeans

            chunks = da.from_array(points, chunks=(self.partition_regions, -1), asarray=False)
            return DaskKMeans(client=self.client, **params).fit_predict(chunks).compute()
        return cpu_backend().kmeans(**params).fit_predict(points)


def _describe_loss(exc: BaseException) -> str:
    """A short account of a lost worker: which task died where, or the error's first words."""
    task, worker = getattr(exc, "task", None), getattr(getattr(exc, "last_worker", None), "address", None)
    if task is not None and worker is not None:  # KilledWorker
        return f"task {task} died with worker {worker}, {exc.allowed_failures + 1} time(s)"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def plan_shards(n_images: int, batch_size: int, n_shards: int) -> list[tuple[int, int, int]]:
    """Split ``n_images`` pool rows into at most ``n_shards`` contiguous shards of whole batches.

    Returns [(first_batch, first_row, stop_row)], in pool order, covering every row once;
    shard sizes differ by at most one batch.
    """
    if batch_size < 1:
        raise GpualError(f"acquisition.batch_size = {batch_size} must be at least 1: fix it in gpual.toml", 2)
    n_batches = -(-n_images // batch_size)
    groups = np.array_split(np.arange(n_batches), min(max(1, n_shards), max(1, n_batches)))
    return [(int(g[0]), int(g[0]) * batch_size, min(n_images, (int(g[-1]) + 1) * batch_size)) for g in groups if len(g)]


def _partition_bounds(m: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges of at most ``size`` rows covering ``0 .. m``."""
    return [(a, min(m, a + size)) for a in range(0, m, size)]


def pool_shard(root: str, config: Any, round: int, device_type: str, shard: pd.DataFrame, strategy: str,
               first_batch: int) -> dict[str, Any]:
    """Runs on a worker: teacher forward + pooling over one shard of the pool.

    Args:
        root: the workspace folder (absolute; the worker must see it).
        config: the client's :class:`gpual.config.Config` (batch size, MC passes, seed and
            scale as the client planned the shards with, whatever the file says now).
        round: the round being selected (its teacher is round - 1's).
        device_type: ``"cuda"`` (the worker's GPU) or ``"cpu"``.
        shard: contiguous rows of the superpixel index, with global ``offset`` values.
        strategy: the round's strategy (BALD adds Monte-Carlo dropout passes).
        first_batch: the global number of the shard's first batch.

    Returns:
        {"stats": {field: host NumPy array of the shard's regions, or None}, "timings":
        {"forward", "pooling", "loader_wait"} seconds}.
    """
    from gpual.acquisition.forward import pool_images
    from gpual.training.checkpoints import load_teacher
    from gpual.workspace import Workspace

    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise GpualError(
                f"Dask worker on {os.uname().nodename} sees no CUDA device but the round runs on cuda: "
                "start GPU workers (`dask cuda worker`) or select with --device cpu", 2,
            )
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    ws = Workspace(Path(root), config)
    teacher, _ = load_teacher(ws.checkpoint_path(round - 1), device)
    # Dask workers are daemonic processes, which may not start loader processes.
    stats, timings = pool_images(ws, round, teacher, shard, strategy, device, amp_enabled(device, ws.config.train.amp),
                                 first_batch=first_batch, loader_workers=0)
    host = {name: (None if getattr(stats, name) is None else getattr(stats, name).cpu().numpy()) for name in _STAT_FIELDS}
    return {"stats": host, "timings": timings}


def _umap_transform_part(reducer: Any, part: np.ndarray) -> np.ndarray:
    """Runs on a worker: (m, D) float32 -> (m, n_components) float32 with a fitted umap-learn model."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value .* overridden.*")
        return np.asarray(reducer.transform(part), dtype=np.float32)


@contextmanager
def dask_cluster(address: str | None = None, gpus: int | None = None, workers: int | None = None, *,
                 partition_regions: int = DEFAULT_PARTITION_REGIONS, timeout: float | None = None,
                 ) -> Iterator[DaskCluster]:
    """Connect to ``address``, or start ``gpus`` CUDA workers or ``workers`` CPU workers here.

    Exactly one of the three. Raises :class:`GpualError` (exit 2) when the scheduler is
    unreachable or has no worker, when dask-cuda is missing for ``gpus``, or when this
    machine has fewer GPUs than asked for. ``timeout``: seconds to wait for the scheduler
    and its first worker (default :data:`CONNECT_TIMEOUT_S`). Closes what it started on exit.
    """
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    given = [name for name, v in (("--dask", address), ("--gpus", gpus), ("--dask-workers", workers)) if v is not None]
    if len(given) != 1:
        raise GpualError(f"give one of --dask ADDRESS, --gpus N, --dask-workers N (got {', '.join(given) or 'none'})", 2)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise GpualError("Dask scale-out needs dask.distributed: pip install 'dask[distributed]'", 2) from None

    owned = None
    if address is not None:
        try:
            client = Client(address, timeout=timeout)
        except ValueError as exc:  # no port, unknown scheme
            raise GpualError(f"--dask {address!r} is not a scheduler address ({exc}): write e.g. tcp://HOST:8786", 2) from None
        except (OSError, TimeoutError) as exc:
            raise GpualError(
                f"cannot reach a Dask scheduler at {address} ({type(exc).__name__}): start one with `dask scheduler` "
                "and workers with `dask worker ADDRESS`, or fix --dask", 2,
            ) from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            client.close()
            raise GpualError(f"the Dask scheduler at {address} has no workers: start some with `dask worker {address}`", 2) from None
        description = f"Dask scheduler {address}"
    elif gpus is not None:
        if gpus < 1:
            raise GpualError(f"--gpus {gpus} must be at least 1", 2)
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise GpualError("--gpus needs dask-cuda: install the gpu extra (pip install 'gpual[gpu]'), or use --dask ADDRESS", 2) from None
        visible = torch.cuda.device_count()
        if gpus > visible:
            raise GpualError(f"--gpus {gpus} but torch sees {visible} CUDA device(s) here: lower --gpus", 2)
        owned = LocalCUDACluster(n_workers=gpus, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(owned)
        description = f"LocalCUDACluster of {gpus} GPU worker(s)"
    else:
        if workers < 1:
            raise GpualError(f"--dask-workers {workers} must be at least 1", 2)
        owned = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                             silence_logs=logging.ERROR)
        client = Client(owned)
        description = f"LocalCluster of {workers} CPU worker(s)"
    cluster = DaskCluster(client, description, owned, partition_regions)
    try:
        yield cluster
    finally:
        cluster.close()


def cluster_for(backend: Backend, address: str | None = None, gpus: int | None = None, workers: int | None = None,
                **kwargs: Any) -> AbstractContextManager[DaskCluster | None]:
    """The CLI's choice: :func:`dask_cluster` for one of the options, or ``None`` (one process).

    ``--gpus`` needs the CUDA backend and ``--dask-workers`` (CPU worker processes) the
    CPU one; :class:`GpualError` (exit 2) otherwise.
    """
    if address is None and gpus is None and workers is None:
        return nullcontext(None)
    if gpus is not None and not backend.is_cuda:
        raise GpualError(f"--gpus starts GPU workers but the round runs on {backend.name}: use --device cuda on a GPU machine, "
                         "or --dask-workers N for CPU workers", 2)
    if workers is not None and backend.is_cuda:
        raise GpualError("--dask-workers starts CPU workers but the round runs on cuda: use --gpus N, or --device cpu", 2)
    return dask_cluster(address, gpus, workers, **kwargs)
