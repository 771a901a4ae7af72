"""CPU twin vs CUDA backend on identical inputs, and the no-host-copy guarantee of the GPU path.

GPU path: not run on this machine (it has no CUDA device); every test here is marked
``gpu`` and ``rapids`` and skipped, with the reason, where either is missing. Run them on
a GPU box with ``pytest -m "gpu or rapids" tests/test_gpu_parity.py``.

The no-host-copy guard (:func:`forbid_host_copies`) works on three levels:

1. Python-level exits to the host are patched to raise: ``cupy.asnumpy``,
   ``torch.Tensor.cpu/.numpy/.item/.tolist`` and, where CuPy's extension type allows it,
   ``cupy.ndarray.get/.item/.tolist``.
2. ``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising torch op raise
   (``.item()``, boolean-mask indexing, ``nonzero``, device-to-host copies).
3. A ``torch.profiler`` CUDA trace (CUPTI, process-wide: it also records CuPy's and
   cuML's work) must contain no device-to-host memcpy; this catches CuPy internals such
   as ``int(x)``/``bool(x)`` or boolean indexing, which level 1 cannot patch.

The timing syncs of ``Backend.synchronize`` are the only ones the stages may do; the
guard replaces that method with a no-op, so any other sync fails. cuML synchronises and
reads small results back internally (``handle.sync()``), so for the UMAP/KMeans
strategies the guard covers pooling, handoff and ranking, with the cuML estimators run
just outside it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from gpual.backend import Backend, cpu_backend, get_backend
from gpual.config import KMeansConfig, UmapConfig
from gpual.acquisition.pooling import RegionPooler, RegionStats
from gpual.acquisition.ranking import cluster_argmax, select_per_cluster, top_k
from gpual.acquisition.strategies import select_regions

pytestmark = [pytest.mark.gpu, pytest.mark.rapids]

RANKED = ("entropy", "margin", "least-confidence", "bald", "coreset")


@pytest.fixture(scope="module")
def cuda() -> Backend:
    return get_backend("cuda")


def _batches(seed: int, n_regions: int = 120, d: int = 16, c: int = 6) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        probs = torch.softmax(3 * torch.randn(2, c, 24, 20, generator=g), dim=1)
        emb = torch.randn(2, d, 6, 5, generator=g)  # a projection map at output stride 4
        ids = torch.randint(-1, n_regions, (2, 24, 20), generator=g)
        mc = torch.softmax(3 * torch.randn(3, 2, c, 24, 20, generator=g), dim=2)
        out.append((probs, emb, ids, mc))
    return out


def _pool(batches: list[tuple[torch.Tensor, ...]], device: torch.device, n_regions: int = 120, d: int = 16,
          compile: bool = False) -> RegionStats:
    pooler = RegionPooler(n_regions, d, device, compile=compile)
    for probs, emb, ids, mc in batches:
        pooler.add(probs.to(device), emb.to(device), ids.to(device), [(0, n_regions)] * len(ids), mc_probs=mc.to(device))
    return pooler.result()


def _stats_to(stats: RegionStats, device: torch.device) -> RegionStats:
    return RegionStats(**{k: (None if v is None else v.to(device)) for k, v in stats.__dict__.items()})


@contextmanager
def forbid_host_copies(backend: Backend) -> Iterator[None]:
    """Fail if the block copies device data to the host or synchronises (see module doc)."""
    import cupy

    def refuse(what: str):
        def _raise(*args, **kwargs):
            raise AssertionError(f"host copy on the GPU path: {what}")

        return _raise

    backend.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backend, "synchronize", lambda: None)
            mp.setattr(cupy, "asnumpy", refuse("cupy.asnumpy"))
            for name in ("cpu", "numpy", "item", "tolist"):
                mp.setattr(torch.Tensor, name, refuse(f"torch.Tensor.{name}"))
            for name in ("get", "item", "tolist"):
                try:
                    mp.setattr(cupy.ndarray, name, refuse(f"cupy.ndarray.{name}"))
                except (TypeError, AttributeError):
                    pass  # immutable extension type: level 3 (the trace) still sees the copy
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
    copies = [e.name for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name]
    assert not copies, f"device-to-host copies on the GPU path: {copies[:5]}"


def test_guard_catches_host_copies(cuda: Backend) -> None:
    """The guard itself must be able to fail (else the no-copy test proves nothing)."""
    import cupy

    x = torch.ones(3, device=cuda.device)
    with pytest.raises(AssertionError, match="Tensor.cpu"):
        with forbid_host_copies(cuda):
            x.cpu()
    with pytest.raises(RuntimeError):  # torch's sync debug mode: a synchronising op
        with forbid_host_copies(cuda):
            x[x > 0]
    with pytest.raises(AssertionError, match="host"):  # CuPy's bool() reads back: patched get or the trace
        with forbid_host_copies(cuda):
            bool(cupy.ones(3).any())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_pooling_parity(cuda: Backend, compile: bool) -> None:
    """The CPU twin (eager) against the GPU path, eager and through torch.compile (Triton)."""
    if compile:
        pytest.importorskip("triton", reason="torch.compile on CUDA needs Triton (installed with PyTorch's CUDA wheels)")
    batches = _batches(0)
    cpu_stats = _pool(batches, torch.device("cpu"))
    gpu_stats = _pool(batches, cuda.device, compile=compile)
    for key, value in cpu_stats.__dict__.items():
        torch.testing.assert_close(getattr(gpu_stats, key).cpu(), value, rtol=1e-5, atol=1e-4, msg=key)


def test_ranking_parity(cuda: Backend) -> None:
    import cupy

    rng = np.random.default_rng(0)
    for n, k in ((50, 7), (500, 40), (3000, 300)):
        scores = (rng.integers(0, 5, n) / 5).astype(np.float32)  # ties
        clusters = rng.integers(0, k // 2, n).astype(np.int64)  # empty clusters
        s_gpu, c_gpu = cupy.asarray(scores), cupy.asarray(clusters)
        np.testing.assert_array_equal(cupy.asnumpy(cluster_argmax(s_gpu, c_gpu, k)), cluster_argmax(scores, clusters, k))
        np.testing.assert_array_equal(
            cupy.asnumpy(select_per_cluster(s_gpu, c_gpu, k, k)), select_per_cluster(scores, clusters, k, k)
        )
        np.testing.assert_array_equal(cupy.asnumpy(top_k(s_gpu, k)), top_k(scores, k))


def test_selection_parity_and_no_host_copy(cuda: Backend) -> None:
    import cupy

    cpu_stats = _pool(_batches(1), torch.device("cpu"))
    gpu_stats = _stats_to(cpu_stats, cuda.device)  # identical inputs on both sides
    candidates = torch.arange(0, 120, 2)
    labeled = cpu_stats.embedding[1::2]
    budget = 12
    # Host-to-device copies of the inputs happen before the guard (pageable copies sync).
    gpu_candidates, gpu_labeled = candidates.to(cuda.device), labeled.to(cuda.device)
    for strategy in RANKED + ("random",):
        want = select_regions(strategy, cpu_backend(), cpu_stats, candidates, budget, labeled_embedding=labeled)
        with forbid_host_copies(cuda):
            got = select_regions(strategy, cuda, gpu_stats, gpu_candidates, budget, labeled_embedding=gpu_labeled)
        assert isinstance(got.indices, cupy.ndarray) and got.indices.dtype == cupy.int64
        indices = cupy.asnumpy(got.indices)
        assert len(np.unique(indices)) == budget
        if strategy != "random":  # torch's CPU and CUDA generators draw different permutations
            np.testing.assert_array_equal(indices, want.indices, err_msg=strategy)
            np.testing.assert_allclose(cupy.asnumpy(got.scores), want.scores, rtol=1e-5, err_msg=strategy)


def test_pooling_makes_no_host_copy(cuda: Backend) -> None:
    batches = [tuple(t.to(cuda.device) for t in batch) for batch in _batches(2)]
    pooler = RegionPooler(120, 16, cuda.device)
    with forbid_host_copies(cuda):
        for probs, emb, ids, mc in batches:
            pooler.add(probs, emb, ids, [(0, 120)] * len(ids), mc_probs=mc)
        stats = pooler.result()
    assert stats.embedding.is_cuda and stats.bald is not None


def test_cluster_strategies_on_cuml(cuda: Backend) -> None:
    """cuML UMAP/KMeans: budget distinct picks on the device; their ranking makes no host copy."""
    import cupy

    from gpual.acquisition.clustering import kmeans_labels

    g = torch.Generator(device=cuda.device).manual_seed(0)
    stats = _stats_to(_pool(_batches(3), torch.device("cpu")), cuda.device)
    candidates = torch.arange(120, device=cuda.device)
    bank = torch.nn.functional.normalize(torch.randn(200, 16, generator=g, device=cuda.device), dim=1)
    for strategy in ("umap-kmeans-entropy", "kmeans-entropy"):
        sel = select_regions(strategy, cuda, stats, candidates, 10, bank_vectors=bank,
                             umap_cfg=UmapConfig(), kmeans_cfg=KMeansConfig())
        assert isinstance(sel.indices, cupy.ndarray)
        assert len(np.unique(cupy.asnumpy(sel.indices))) == 10
    labels = kmeans_labels(cuda, cuda.from_torch(stats.embedding), 10, KMeansConfig())
    assert isinstance(labels, cupy.ndarray) and labels.dtype == cupy.int64
    scores = cuda.from_torch(stats.entropy_sum)
    with forbid_host_copies(cuda):
        picks = select_per_cluster(scores, labels, 10, 10)
    np.testing.assert_array_equal(
        cupy.asnumpy(picks), select_per_cluster(cupy.asnumpy(scores), cupy.asnumpy(labels), 10, 10)
    )
