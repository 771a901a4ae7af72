"""Workspace: atomic writes, the writer lock, round order and status."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from gpual import atomic
from gpual.config import make_config
from gpual.errors import GpualError
from gpual.workspace import Workspace


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "ws", make_config(overrides={"data": {"root": str(tmp_path), "dataset": "folder"}}))


def _query(round: int, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": pd.Series([f"img{i}" for i in range(n)], dtype="string"),
            "region": pd.Series(range(n), dtype="int32"),
            "round": pd.Series([round] * n, dtype="int32"),
            "strategy": pd.Series(["random"] * n, dtype="string"),
            "score": pd.Series([0.5] * n, dtype="float64"),
            "pixels": pd.Series([100] * n, dtype="int64"),
        }
    )


def test_interrupted_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "state.json"
    atomic.write_json(path, {"v": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_interrupted_parquet_write_keeps_the_old_table(ws: Workspace) -> None:
    ws.write_query(0, _query(0))
    before = ws.query_path(0).read_bytes()

    class Exploding(pd.DataFrame):
        def to_parquet(self, path, **kwargs):  # writes a partial file, then fails
            open(path, "wb").write(b"PAR1 partial")
            raise OSError("disk full")

    with pytest.raises(OSError):
        ws.write_query(0, Exploding(_query(0, 5)))
    assert ws.query_path(0).read_bytes() == before
    assert len(ws.read_query(0)) == 3


def test_atomic_dir_replaces_whole(tmp_path) -> None:
    target = tmp_path / "overlays"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a.png").write_text("a")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "b.png").write_text("b")
            raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a.png"]
    with atomic.atomic_dir(target) as tmp:
        (tmp / "c.png").write_text("c")
    assert sorted(p.name for p in target.iterdir()) == ["c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays"]


def test_lock_refuses_a_second_writer(ws: Workspace) -> None:
    with ws.lock("select"):
        with pytest.raises(GpualError, match=r"locked by `gpual select`"):
            with ws.lock("train"):
                pass
        code = (
            "import sys; from gpual.workspace import Workspace; from gpual.errors import GpualError\n"
            f"ws = Workspace.open({str(ws.root)!r})\n"
            "try:\n    ws.lock('label').__enter__()\nexcept GpualError as e:\n    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 3 and "locked by `gpual select`" in out.stdout
    with ws.lock("train"):  # released after the first holder is done
        pass


def test_round_order_is_enforced(ws: Workspace) -> None:
    assert ws.next_step() == (0, "select")
    with pytest.raises(GpualError, match="round 0 has no select step"):
        ws.require(0, "label", "label")
    ws.write_query(0, _query(0))
    assert ws.next_step() == (0, "label")
    ws.require(0, "label", "label")
    with pytest.raises(GpualError, match="round 0 is not trained"):
        ws.require(1, "select", "select")


def test_create_refuses_to_overwrite(ws: Workspace) -> None:
    with pytest.raises(GpualError, match="already exists"):
        Workspace.create(ws.root, ws.config)
    Workspace.create(ws.root, ws.config, force=True)
    with pytest.raises(GpualError, match="not a gpual workspace"):
        Workspace.open(ws.root / "nowhere")


def test_corrupt_table_is_a_clear_error(ws: Workspace) -> None:
    ws.query_path(0).parent.mkdir(parents=True)
    ws.query_path(0).write_bytes(b"not parquet")
    with pytest.raises(GpualError, match="unreadable"):
        ws.read_query(0)


def test_a_status_probe_does_not_make_a_starting_writer_fail(ws: Workspace) -> None:
    """`gpual status` probes the lock with a shared flock for an instant; a command taking
    the lock then waits it out instead of refusing. A writer that really holds it is still
    refused (one line)."""
    import fcntl
    import os
    import threading

    probe = os.open(ws.root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.03, fcntl.flock, (probe, fcntl.LOCK_UN))
    release.start()
    try:
        with ws.lock("select"):
            assert ws.holder() is not None
    finally:
        release.join()
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer that stays
    try:
        with pytest.raises(GpualError, match="is locked by"):
            with ws.lock("select"):
                pass
    finally:
        os.close(probe)
