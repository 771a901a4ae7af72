"""Helpers of the benchmark scripts that decide what a result means: the source commit
recorded with it, and the round 0 that al_curve shares between strategies."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpual import atomic
from gpual.config import make_config
from gpual.errors import GpualError
from gpual.acquisition.strategies import settings_unread
from gpual.workspace import Workspace

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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
    final = ws.model_run(0, final=True)
    final.folder.mkdir()
    final.checkpoint.write_bytes(b"final weights")
    final.state.write_bytes(b"final resume state")
    return ws


def test_share_round_zero_copies_only_between_equal_configs(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    source = _finished_round_zero(tmp_path / "a", "umap-kmeans-entropy")
    # Other process counts (how fast, not what): still the same round 0.
    same = Workspace.create(tmp_path / "b", make_config("demo", {"acquisition": {"strategy": "random"},
                                                                 "train": {"num_workers": "auto"}, "superpixels": {"workers": 1}}))
    other = Workspace.create(tmp_path / "c", make_config("demo", {"acquisition": {"strategy": "random", "init_budget": 7}}))

    assert al_curve.share_round_zero(source, same)
    assert (same.round_dir(0) / "checkpoint.pt").read_bytes() == b"weights"
    assert not (same.round_dir(0) / "train_state.pt").exists()
    assert same.read_metrics(0)["evaluation"]["miou"] == 0.25
    # Its final retraining (same labels, same training settings) comes along, finished only.
    final = same.model_run(0, final=True)
    assert final.checkpoint.read_bytes() == b"final weights" and not final.state.exists()
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
    assert al_curve.open_or_create(tmp_path / "ws", config, skip=settings_unread("entropy")).root == ws.root


def test_settings_a_strategy_never_reads_do_not_separate_its_runs(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    assert settings_unread("umap-kmeans-entropy") == ()
    assert settings_unread("kmeans-entropy") == ("umap",)
    assert settings_unread("entropy") == ("umap", "kmeans", "acquisition.clusters_per_budget")
    assert settings_unread("random") == ("umap", "kmeans", "acquisition.region_score", "acquisition.class_balance",
                                         "acquisition.clusters_per_budget")
    ws = al_curve.open_or_create(tmp_path / "ws", make_config("demo", {"acquisition": {"strategy": "random"}}))
    mean = make_config("demo", {"acquisition": {"strategy": "random", "region_score": "mean"}, "umap": {"init": "spectral"}})
    assert al_curve.open_or_create(tmp_path / "ws", mean, skip=settings_unread("random")).root == ws.root
    with pytest.raises(GpualError, match=r"other settings \(acquisition.region_score\)"):
        al_curve.open_or_create(tmp_path / "ws", mean, skip=settings_unread("kmeans-entropy"))
    # Process counts change the speed, never the result: they never separate runs.
    faster = make_config("demo", {"acquisition": {"strategy": "random"}, "train": {"num_workers": 4},
                                  "superpixels": {"workers": 1}})
    assert al_curve.open_or_create(tmp_path / "ws", faster).root == ws.root


def test_final_rounds_and_the_curve_table() -> None:
    al_curve = _load("al_curve")
    assert al_curve.final_rounds("", 5) == () and al_curve.final_rounds("last", 5) == (4,)
    assert al_curve.final_rounds("all", 3) == (0, 1, 2) and al_curve.final_rounds("4,2,2", 5) == (2, 4)
    for bad in ("5", "-1", "two"):
        with pytest.raises(GpualError, match="--final"):
            al_curve.final_rounds(bad, 5)

    def row(r: int, miou: float, final: float | None) -> dict:
        return {"round": r, "labeled_share": 0.01 * (r + 1), "miou": miou, "epochs_trained": 3 * (r + 1),
                "final_miou": final, "final_epochs": None if final is None else 9}

    curves = {"sum": [[row(0, 0.2, None), row(1, 0.3, 0.36)], [row(0, 0.2, None), row(1, 0.5, None)]]}
    table = al_curve.markdown(curves, 0.4, 9)
    assert "final retraining mIoU (9 epochs)" in table.splitlines()[0]
    assert "| sum | 0 | 1.00% | 0.2000 | 3 | 50.0% | - | - |" in table
    assert "| sum | 1 | 2.00% | 0.4000 | 6 | 100.0% | 0.3600 (1 of 2 seeds) | 90.0% |" in table
    assert "| full supervision | - | 100% | 0.4000 | 9 | 100% | - | - |" in table
    plain = al_curve.markdown({"sum": [[row(0, 0.2, None)]]}, 0.4, 9)
    assert "final" not in plain and plain.splitlines()[-1] == "| full supervision | - | 100% | 0.4000 | 9 | 100% |"


def test_kmeans_levels_inertia_is_the_squared_distance_to_cluster_means() -> None:
    from gpual.backend import get_backend

    bench = _load("kmeans_levels")
    points = bench.blobs(500, 5)
    labels = np.random.default_rng(0).integers(0, 8, 500)
    want = sum(float(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum()) for j in range(8))
    assert bench.inertia(get_backend("cpu"), points, labels, 8) == pytest.approx(want, rel=1e-6)


def test_targets_report_met_not_met_stale_and_unmeasured(tmp_path: Path) -> None:
    targets = _load("targets")
    stages = {"pooling": 0.5, "handoff": 0.01, "umap_fit": 0.3, "umap_transform": 0.1, "kmeans": 0.5, "ranking": 0.05,
              "manifest": 0.04}  # 1.5 s after the forward
    cpu = {k: 100 * v for k, v in stages.items()}
    new, old = "a" * 40, "b" * 40
    # "-dirty": run from a checkout of `new` with local changes, which still postdates e3a9070.
    (tmp_path / "acquisition-cuda-vs-cpu-20261201-100000.json").write_text(json.dumps({
        "machine": {"gpual_commit": new + "-dirty", "gpu": "NVIDIA H200"}, "pool": {"cuda": {**stages, "regions": 154611}, "cpu": cpu},
        "sweep": {"cuda": [{"regions": 4_000_000, "total": 12.0, "peak_device_mb_all_allocators": 20 * 1024}]},
        "sweep_kmeans": {"levels": 2}}))
    (tmp_path / "pooling-cuda-20261201-090000.json").write_text(json.dumps({
        "machine": {"gpual_commit": old}, "copy_bandwidth_gb_s": 3000.0,
        "results": [{"size": "360x480", "share_of_copy_bandwidth": 0.6, "effective_gb_s": 1800.0},
                    # --compile: not how `gpual select` pools, so not the target's value
                    {"size": "360x480", "mode": "compiled", "share_of_copy_bandwidth": 0.9, "effective_gb_s": 2700.0}]}))
    (tmp_path / "broken-cpu-20261201-110000.json").write_text("{not json")
    rows = {r["target"]: r for r in targets.check(targets._results(tmp_path), is_ancestor=lambda a, b: b == new)}
    assert rows["CamVid-size round after the forward (GPU)"]["value"] == pytest.approx(1.5)
    assert [r["status"] for r in rows.values()] == ["met", "met", "met", "NOT met", "stale (met before e3a9070)"]
    assert rows["CamVid-size round: GPU vs CPU twin"]["value"] == pytest.approx(100.0)
    assert rows["Pooling, share of copy bandwidth (GPU)"]["value"] == pytest.approx(60.0)
    assert "kmeans.levels=2" in rows["4M-region round, stages after pooling (GPU)"]["note"]
    assert rows["CamVid-size round: GPU vs CPU twin"]["gpu"] == "NVIDIA H200"  # the targets name an H100: say which ran
    assert rows["Pooling, share of copy bandwidth (GPU)"]["gpu"] == ""
    # Only the torch and CuPy allocators counted: within the bound proves nothing.
    (tmp_path / "acquisition-cuda-20261202-100000.json").write_text(json.dumps({
        "machine": {"gpual_commit": new}, "sweep": {"cuda": [{"regions": 4_000_000, "total": 30.0,
                                                               "peak_device_mb_torch": 4096.0}]}}))
    rows = targets.check(targets._results(tmp_path), is_ancestor=lambda a, b: b == new)
    assert [r["status"] for r in rows][2:4] == ["NOT met", "open (lower bound)"]
    assert [r["status"] for r in targets.check([])] == ["not measured"] * len(targets.TARGETS)
    assert "| 4M-region round, peak device memory | <= 16 GB | 4 | open (lower bound) |  |" in targets.markdown(rows)


def test_selection_timing_warms_up_on_a_subset_and_reports_every_stage() -> None:
    from gpual.backend import get_backend

    bench = _load("acquisition")
    backend = get_backend("cpu")
    n = bench.WARMUP_REGIONS + 1000
    stats, bank = bench.synthetic_stats(n, 16, 4, 50, backend.device)
    out = bench.time_selection(backend, stats, bank, n // 100, "kmeans-entropy", repeats=1)
    assert out["warmup_regions"] == bench.WARMUP_REGIONS
    assert {"handoff", "kmeans", "ranking", "manifest", "total", "peak_rss_mb"} <= set(out)
    assert out["total"] == pytest.approx(sum(out[k] for k in ("handoff", "kmeans", "ranking", "manifest")))
    assert all(out[k] > 0 for k in ("kmeans", "manifest"))


def test_selection_timing_records_the_strategys_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep row says when kmeans.levels = "auto" chose two levels (here by lowering the
    threshold: 6,000 x 60 is far below the real 1e9)."""
    from gpual.acquisition import clustering
    from gpual.backend import get_backend

    bench = _load("acquisition")
    backend = get_backend("cpu")
    n = bench.WARMUP_REGIONS + 1000
    stats, bank = bench.synthetic_stats(n, 16, 4, 50, backend.device)
    monkeypatch.setattr(clustering, "TWO_LEVELS_ABOVE", 1000)
    out = bench.time_selection(backend, stats, bank, n // 100, "kmeans-entropy", repeats=1)
    assert any("two levels" in note for note in out["notes"])


def test_ratios_cover_the_stages_after_the_forward() -> None:
    bench = _load("acquisition")
    cpu = {"forward": 6.0, "pooling": 1.0, "umap_fit": 5.0, "kmeans": 14.0, "manifest": 0.0, "regions": 10}
    cuda = {"forward": 0.1, "pooling": 0.05, "umap_fit": 0.1, "kmeans": 0.25, "manifest": 0.0, "regions": 10}
    out = bench.ratios(cpu, cuda)
    assert out["forward"] == pytest.approx(60) and out["kmeans"] == pytest.approx(56)
    assert "manifest" not in out and "regions" not in out  # no division by a zero GPU time; not a stage
    assert out["after_forward"] == pytest.approx(20.0 / 0.4)


def test_real_pool_benchmark_times_forward_pooling_and_records_loader_processes(tmp_path: Path) -> None:
    """acquisition.py --workspace on the CPU twin: a demo workspace with round 0 trained."""
    from gpual.backend import get_backend

    bench = _load("acquisition")
    root, trained = bench.synthetic_workspace(tmp_path, n_images=6)
    out = bench.pool_benchmark(root, trained, get_backend("cpu"), repeats=1, strategy="kmeans-entropy")
    assert out["images"] == 6 and out["regions"] > 0 and out["budget"] == max(1, out["regions"] // 100)
    assert out["forward"] > 0 and out["pooling"] > 0 and out["kmeans"] > 0
    assert out["loader_workers"] == 0  # the demo preset says 0


def test_kernel_profile_lists_the_costliest_ops_with_their_shares() -> None:
    bench = _load("pooling")
    x = torch.rand(512, 512)
    rows = bench.kernel_profile(lambda: (x @ x).exp().sum(), torch.device("cpu"), 2)
    assert len(rows) == 2 and rows[0]["device_us"] >= rows[1]["device_us"] > 0
    assert 0 < rows[1]["share"] <= rows[0]["share"] <= 1 and all(r["calls"] >= 1 for r in rows)
    # Which op is costliest depends on the machine and its load: only that the rows are ops
    # of the profiled function, never the order, is asserted (a cold first run once put
    # the matrix product third).
    every = bench.kernel_profile(lambda: (x @ x).exp().sum(), torch.device("cpu"), 100)
    names = {r["name"] for r in every}
    assert {r["name"] for r in rows} <= names and {"aten::mm", "aten::exp", "aten::sum"} <= names
    assert sum(r["share"] for r in every) == pytest.approx(1.0)


def test_umap_bank_benchmark_writes_a_row_per_bank_size_on_the_bounded_umap_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """umap_bank.py at a tiny size: its JSON has the machine, the load averages and one row
    per bank size with every selection stage, and each row's UMAP path, read from the fitted
    reducer, is the precomputed-distances one, never umap-learn's per-pair exact path."""
    import umap

    bench = _load("umap_bank")
    monkeypatch.setattr(sys.modules[bench.write_result.__module__], "RESULTS_DIR", tmp_path)
    path = bench.main(["--sizes", "40,200", "--regions", "400", "--budget", "8"])
    assert path.parent == tmp_path and path.name.startswith("umap_bank-cpu-")
    payload = json.loads(path.read_text())
    assert {"machine", "loadavg_start", "loadavg_end", "warmup_seconds", "target", "results"} <= set(payload)
    assert "umap-learn" in payload["machine"]["versions"] and len(payload["loadavg_end"]) == 3
    assert payload["dim"] == 128 and list(payload["warmup_seconds"]) == ["precomputed-distances"]
    assert [row["bank"] for row in payload["results"]] == [40, 200]
    for row in payload["results"]:
        assert (row["umap_path"], row["reducer"]) == ("precomputed-distances", "ExactSmallBankUMAP")
        assert row["regions"] == 400 and row["picked"] == 8
        assert row["total"] == pytest.approx(sum(row[stage] for stage in bench.STAGES))
        assert row["umap_fit"] > 0 and row["umap_transform"] > 0 and row["kmeans"] > 0
        assert row["peak_rss_mb"] >= row["rss_start_mb"] > 0 and len(row["loadavg_start"]) == 3
    # The path is read from the reducer's state: umap-learn's own small-data path is told apart.
    bank = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    assert bench.umap_path(umap.UMAP(n_neighbors=5, n_epochs=5, random_state=0, n_jobs=1).fit(bank)) == "umap-exact"


def test_select_command_benchmark_runs_the_real_command_on_a_copy_and_reads_its_parts(tmp_path: Path) -> None:
    """select_command.py on a demo workspace: the whole command in a fresh process, its parts
    from the round's metrics, the workspace itself never written."""
    bench, acquisition = _load("select_command"), _load("acquisition")
    root, trained = acquisition.synthetic_workspace(tmp_path, n_images=6)
    out = bench.measure(root, trained + 1, "cpu", repeats=1)
    assert out["command_seconds"] > 0 and out["start_and_imports_seconds"] > 0
    assert {"pool_read", "checkpoint_load", "forward", "pooling", "loader_wait", "manifest", "overlays", "total"} <= out["parts_seconds"].keys()
    assert out["rest_seconds"] == pytest.approx(out["command_seconds"] - out["start_and_imports_seconds"]
                                                - out["parts_seconds"]["total"])
    assert not (root / "rounds" / f"{trained + 1:03d}").exists()
