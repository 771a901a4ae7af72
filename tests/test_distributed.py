"""The Dask scale-out on a real two-worker LocalCluster (processes, CPU): sharded pooling
equals one process's bit for bit, a whole umap-kmeans-entropy round runs on the workers,
`gpual select --dask ADDRESS` selects what one process selects, a worker killed mid-round
fails the round with one line and writes nothing, and the option errors.

One cluster serves the module (worker processes pay torch's import and numba's JIT of the
UMAP transform once); its scheduler gives up on a task after one worker death
(allowed-failures 0), so the worker-loss test is deterministic.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import distributed  # a core dependency: its absence fails here, it is not skipped
import numpy as np
import pandas as pd
import pytest
import torch

from cli_runner import run_cli
from gpual.backend import cpu_backend
from gpual.errors import GpualError
from gpual.workspace import Workspace

CPU = torch.device("cpu")
PARTITION = 64  # candidate rows per UMAP-transform partition: several partitions on the tiny pool
FIELDS = ("embedding", "entropy_sum", "entropy_mean", "margin_mean", "maxprob_mean", "bald", "pixels")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose round 0 is selected (60 random regions), labeled and trained (1 epoch);
    batch size 2 so the 6-image pool makes 3 batches (2 shards of unequal size)."""
    from gpual.synthetic import make_scenes
    from gpual.training.loop import train_round
    from test_training import labeled_workspace

    root = tmp_path_factory.mktemp("dask")
    scenes = make_scenes(root / "scenes", n_train=6, n_val=2, height=48, width=64).root
    ws = labeled_workspace(root / "ws", scenes)
    ws.config.acquisition.batch_size = 2
    ws.config.acquisition.mc_passes = 2
    ws.save_config()
    train_round(ws, 0, CPU, epochs=1)
    return ws.root


@pytest.fixture()
def ws(trained: Path, tmp_path: Path) -> Workspace:
    """A private copy of the trained workspace (tests select round 1 in it)."""
    shutil.copytree(trained, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="module")
def cluster():
    import dask

    from gpual.distributed import dask_cluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with dask_cluster(workers=2, partition_regions=PARTITION) as c:
            c.client.wait_for_workers(2, timeout=60)
            yield c


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_thread(fn, *args, **kwargs):
    """Run ``fn`` with torch on one thread, as on a Dask worker (OMP_NUM_THREADS=1): a
    convolution's float sums depend on the thread count, not on the sharding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_plan_shards_cover_the_pool_in_whole_batches() -> None:
    from gpual.distributed import plan_shards

    assert plan_shards(6, 2, 2) == [(0, 0, 4), (2, 4, 6)]
    assert plan_shards(7, 2, 3) == [(0, 0, 4), (2, 4, 6), (3, 6, 7)]
    assert plan_shards(3, 16, 4) == [(0, 0, 3)]  # one batch: one shard, whatever the workers
    for n, b, k in ((100, 7, 3), (5, 1, 8), (64, 16, 4)):
        shards = plan_shards(n, b, k)
        rows = [r for _, start, stop in shards for r in range(start, stop)]
        assert rows == list(range(n)) and all(start == first * b for first, start, _ in shards)


@pytest.mark.parametrize("strategy", ["entropy", "bald"])
def test_distributed_pooling_equals_single_process(ws: Workspace, cluster, strategy: str) -> None:
    from gpual.acquisition.forward import pool_with_teacher
    from gpual.superpixels import read_index

    index = read_index(ws)
    n_regions = int(index["n_regions"].sum())
    backend = cpu_backend()
    ref, ref_bank, _ = _one_thread(pool_with_teacher, ws, 1, backend, index, n_regions, strategy, None)
    got, bank, timings = cluster.pool_with_teacher(ws, 1, backend, index, n_regions, strategy, None)
    assert got.n_regions == n_regions and torch.equal(bank, ref_bank)
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        if name == "bald" and strategy != "bald":
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got.pixels > 0).all() and int(got.pixels.sum()) == int(index["pixels"].sum())
    assert {"forward", "pooling", "loader_wait", "pool_wall"} <= set(timings)


def test_pooling_with_loader_processes_equals_in_process_decoding(ws: Workspace) -> None:
    from gpual.acquisition.forward import pool_images
    from gpual.superpixels import read_index
    from gpual.training.checkpoints import load_checkpoint

    index = read_index(ws)
    _, teacher, _, _ = load_checkpoint(ws.checkpoint_path(0), CPU)
    seen: list[int] = []
    ref, _ = pool_images(ws, 1, teacher, index, "entropy", CPU, False, loader_workers=0)
    got, timings = pool_images(ws, 1, teacher, index, "entropy", CPU, False, progress=lambda done, total: seen.append(done),
                               loader_workers=2)
    for name in FIELDS[:-2] + ("pixels",):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    assert seen == [2, 4, 6] and set(timings) == {"forward", "pooling", "loader_wait"} and min(timings.values()) > 0


@pytest.mark.filterwarnings("ignore:n_jobs value")
def test_umap_transform_on_workers_matches_per_partition_transform(cluster) -> None:
    """Partitions go to the workers and come back in row order, each transformed by the
    model fitted here (umap-learn's transform is seeded: same partition, same points)."""
    import umap

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 8)).astype(np.float32)
    regions = rng.normal(size=(150, 8)).astype(np.float32)
    reducer = umap.UMAP(n_neighbors=5, random_state=0, init="random").fit(bank)
    got = cluster.umap_transform(reducer, regions)
    assert got.shape == (150, 2) and got.dtype == np.float32
    want = np.concatenate([reducer.transform(regions[a : a + PARTITION]) for a in range(0, 150, PARTITION)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_umap_kmeans_entropy_round_on_the_workers(ws: Workspace, cluster) -> None:
    from gpual.acquisition.select import acquire

    labeled = ws.read_labeled(0)
    result = acquire(ws, 1, cpu_backend(), strategy="umap-kmeans-entropy", budget=12, cluster=cluster)
    query = pd.read_parquet(ws.query_path(1))
    assert len(query) == 12 and not query.duplicated(["image", "region"]).any()
    taken = set(zip(labeled["image"], labeled["region"]))
    assert not taken & set(zip(query["image"], query["region"])), "a labeled region was selected again"
    assert (query["strategy"] == "umap-kmeans-entropy").all() and (query["pixels"] > 0).all()
    assert {"pool_wall", "umap_fit", "umap_transform", "kmeans", "ranking"} <= set(result.timings)
    metrics = ws.read_metrics(1)["acquisition"]
    assert metrics["dask"].startswith("LocalCluster of 2") and metrics["budget_regions"] == 12


def test_cli_select_on_a_dask_address_equals_one_process(capsys, ws: Workspace, cluster, tmp_path: Path) -> None:
    from gpual.acquisition.select import acquire

    reference = Workspace.open(shutil.copytree(ws.root, tmp_path / "reference"))
    _one_thread(acquire, reference, 1, cpu_backend(), strategy="entropy", budget=10)
    address = cluster.client.scheduler.address
    r = run_cli(capsys, "select", ws.root, "--round", "1", "--strategy", "entropy", "--budget", "10", "--device", "cpu",
                "--dask", address)
    assert r.code == 0, r.err
    assert f"via Dask scheduler {address}" in r.out
    pd.testing.assert_frame_equal(pd.read_parquet(ws.query_path(1)), pd.read_parquet(reference.query_path(1)))


def test_cli_run_selects_later_rounds_on_the_cluster(capsys, ws: Workspace, cluster) -> None:
    address = cluster.client.scheduler.address
    r = run_cli(capsys, "run", ws.root, "--rounds", "2", "--strategy", "entropy", "--budget", "10", "--device", "cpu",
                "--dask", address)
    assert r.code == 0, r.err
    round1 = ws.read_metrics(1)
    assert round1["acquisition"]["dask"] == f"Dask scheduler {address}"
    assert "dask" not in ws.read_metrics(0).get("acquisition", {})  # round 0 (random) was selected before
    query = ws.read_query(1)
    assert len(query) == 10 and not query.duplicated(["image", "region"]).any()
    assert 0.0 <= round1["evaluation"]["miou"] <= 1.0


class _KillFirstShard(distributed.WorkerPlugin):
    """Kills its worker's process when a pooling shard starts executing, once (marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key if isinstance(key, str) else str(key)
        if finish == "executing" and name.startswith("gpual-pool-shard"):
            try:  # atomic: of two workers starting their shards at once, one dies
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)


def test_worker_lost_mid_round_fails_writes_nothing_and_rerun_succeeds(capsys, ws: Workspace, cluster, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    address = cluster.client.scheduler.address
    args = ("select", ws.root, "--round", "1", "--strategy", "entropy", "--budget", "10", "--device", "cpu", "--dask", address)
    before = _files(ws.root)
    cluster.client.register_plugin(_KillFirstShard(str(marker)), name="kill-first-shard")
    try:
        r = run_cli(capsys, *args)
        assert marker.exists(), "no worker was killed"
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert r.code == 1 and len(lines) == 1, r.err
        assert "a Dask worker was lost during round 1" in lines[0] and "nothing was written; run the command again" in lines[0]
        assert _files(ws.root) == before
        cluster.client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
        r = run_cli(capsys, *args)
        assert r.code == 0, r.err
    finally:
        cluster.client.unregister_worker_plugin("kill-first-shard")
    query = pd.read_parquet(ws.query_path(1))
    assert len(query) == 10 and not query.duplicated(["image", "region"]).any()


def test_option_errors_are_one_line_and_write_nothing(capsys, ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import gpual.distributed as gd

    before = _files(ws.root)

    def one_line(r, code: int, text: str) -> None:
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert r.code == code and len(lines) == 1 and text in lines[0], r.err

    monkeypatch.setattr(gd, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ("select", ws.root, "--round", "1", "--device", "cpu")
    one_line(run_cli(capsys, *base, "--dask", f"tcp://127.0.0.1:{port}"), 2, "cannot reach a Dask scheduler")
    one_line(run_cli(capsys, *base, "--dask", "localhost"), 2, "is not a scheduler address")
    one_line(run_cli(capsys, *base, "--gpus", "1"), 2, "--gpus starts GPU workers")
    one_line(run_cli(capsys, *base, "--dask", "tcp://127.0.0.1:1", "--dask-workers", "2"), 2, "give one of")
    assert _files(ws.root) == before
    with pytest.raises(GpualError, match="give one of"):
        with gd.dask_cluster():
            pass


def test_gpus_without_dask_cuda_says_what_to_install() -> None:
    import importlib.util

    from gpual.distributed import dask_cluster

    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here: the missing-package message cannot be reached")
    with pytest.raises(GpualError, match="--gpus needs dask-cuda") as err:
        with dask_cluster(gpus=1):
            pass
    assert err.value.exit_code == 2
