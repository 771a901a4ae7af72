"""Helpers of the benchmark scripts that decide what a result means: the source commit
recorded with it, and the round 0 that al_curve shares between strategies."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpual import atomic
from gpual.config import make_config
from gpual.errors import GpualError
from gpual.strategies import sections_read
from gpual.workspace import Workspace

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_machine_info_records_the_source_commit() -> None:
    report = _load("_report")
    head = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert report.machine_info()["gpual_commit"].split("-")[0] == head.stdout.strip()


def _finished_round_zero(root: Path, strategy: str, **acquisition) -> Workspace:
    ws = Workspace.create(root, make_config("demo", {"acquisition": {"strategy": strategy, **acquisition}}))
    ws.round_dir(0).mkdir(parents=True)
    (ws.round_dir(0) / "checkpoint.pt").write_bytes(b"weights")
    (ws.round_dir(0) / "train_state.pt").write_bytes(b"resume state")
    atomic.write_json(ws.metrics_path(0), {"evaluation": {"miou": 0.25}})
    return ws


def test_share_round_zero_copies_only_between_equal_configs(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    source = _finished_round_zero(tmp_path / "a", "umap-kmeans-entropy")
    same = Workspace.create(tmp_path / "b", make_config("demo", {"acquisition": {"strategy": "random"}}))
    other = Workspace.create(tmp_path / "c", make_config("demo", {"acquisition": {"strategy": "random", "init_budget": 7}}))

    assert al_curve.share_round_zero(source, same)
    assert (same.round_dir(0) / "checkpoint.pt").read_bytes() == b"weights"
    assert not (same.round_dir(0) / "train_state.pt").exists()
    assert same.read_metrics(0)["evaluation"]["miou"] == 0.25
    assert not list(same.rounds_dir.glob(".*"))  # no temporary folder left
    assert not al_curve.share_round_zero(source, same)  # already there
    assert not al_curve.share_round_zero(source, other)  # another round-0 budget
    assert not other.round_dir(0).exists()


def test_round_zero_is_shared_across_region_scores_and_kmeans_but_not_seeds(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    _finished_round_zero(tmp_path / "a", "random")
    mean = Workspace.create(tmp_path / "b", make_config("demo", {"acquisition": {"strategy": "entropy", "region_score": "mean"},
                                                                 "kmeans": {"levels": 2}}))
    seed = Workspace.create(tmp_path / "c", make_config("demo", {"acquisition": {"strategy": "entropy", "seed": 1}}))
    assert al_curve.share_round_zero_from_any(tmp_path, mean).root == tmp_path / "a"
    assert al_curve.share_round_zero_from_any(tmp_path, seed) is None
    assert not seed.round_dir(0).exists()


def test_existing_workspace_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    config = make_config("demo", {"acquisition": {"region_score": "mean"}})
    ws = al_curve.open_or_create(tmp_path / "ws", config)
    assert al_curve.open_or_create(tmp_path / "ws", config).config == ws.config
    other = make_config("demo", {"acquisition": {"region_score": "sum"}, "train": {"epochs_per_round": 7}})
    with pytest.raises(GpualError, match=r"other settings \(acquisition.region_score, train.epochs_per_round\)"):
        al_curve.open_or_create(tmp_path / "ws", other)
    # The full-supervision base ignores what it never reads.
    assert al_curve.open_or_create(tmp_path / "ws", make_config("demo"), skip=al_curve.RUN_ONLY_SECTIONS).root == ws.root


def test_workspace_from_an_older_gpual_is_refused_where_a_new_key_matters(tmp_path: Path) -> None:
    """A key missing from gpual.toml ran with the old behaviour, whatever its default is now."""
    al_curve = _load("al_curve")
    config = make_config("demo")
    ws = al_curve.open_or_create(tmp_path / "ws", config)
    path = ws.root / "gpual.toml"
    path.write_text(path.read_text().replace('init = "random"\n', ""))
    assert 'init = "random"' not in path.read_text()
    with pytest.raises(GpualError, match=r"umap.init \(not in its gpual.toml: made by an older gpual\)"):
        al_curve.open_or_create(tmp_path / "ws", config)
    # A run whose strategy never reads UMAP (random, entropy) may still continue it.
    assert al_curve.open_or_create(tmp_path / "ws", config, skip=("umap", "kmeans")).root == ws.root
    assert set(al_curve.ROUND_ZERO_IGNORED_SECTIONS) - set(sections_read("random")) == {"umap", "kmeans"}
    assert sections_read("umap-kmeans-entropy") == ("umap", "kmeans")


def test_kmeans_levels_inertia_is_the_squared_distance_to_cluster_means() -> None:
    from gpual.backend import get_backend

    bench = _load("kmeans_levels")
    points = bench.blobs(500, 5)
    labels = np.random.default_rng(0).integers(0, 8, 500)
    want = sum(float(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum()) for j in range(8))
    assert bench.inertia(get_backend("cpu"), points, labels, 8) == pytest.approx(want, rel=1e-6)
