"""The loop end to end on the CPU twin: `select` after a trained round on a real CamVid
subset, `gpual run` resuming where it stopped, and `select --force` discarding later steps."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cli_runner import run_cli
from gpual.acquisition import clustering
from gpual.acquisition.select import acquire
from gpual.backend import cpu_backend
from gpual.config import make_config
from gpual.active_loop import rounds_summary
from gpual.oracle import label_round
from gpual.superpixels import build_cache, load_superpixels, read_index
from gpual.training.loop import train_round
from gpual.workspace import Workspace

CPU = torch.device("cpu")
STAGES = ("forward", "pooling", "handoff", "umap_fit", "umap_transform", "kmeans", "ranking", "manifest")


def camvid_subset(camvid: Path, dest: Path, n_train: int = 8, n_val: int = 2) -> Path:
    """The first ``n_train`` / ``n_val`` image-label pairs of the real CamVid, same layout."""
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("images", "labels"):
            (dest / split / kind).mkdir(parents=True)
        for image in sorted((camvid / split / "images").glob("*.jpg"))[:n]:
            shutil.copy(image, dest / split / "images" / image.name)
            label = camvid / split / "labels" / f"{image.stem}.png"
            shutil.copy(label, dest / split / "labels" / label.name)
    return dest


def test_select_after_a_trained_round_on_camvid(tmp_path: Path, camvid_root: Path) -> None:
    data = camvid_subset(camvid_root, tmp_path / "camvid")
    config = make_config("cpu-small", {
        "data": {"root": str(data), "dataset": "camvid"},
        "train": {"epochs_per_round": 1},
        "acquisition": {"init_budget": 300, "budget": 40},
    })
    ws = Workspace.create(tmp_path / "ws", config)
    backend = cpu_backend()
    build_cache(ws, workers=1)
    acquire(ws, 0, backend)
    label_round(ws, 0)
    train_round(ws, 0, CPU)

    result = acquire(ws, 1, backend)
    assert result.strategy == "umap-kmeans-entropy"

    query = ws.read_query(1)
    labeled = ws.read_labeled(0)
    assert len(query) == 40 and not query.duplicated(["image", "region"]).any()
    assert (query["round"] == 1).all() and (query["strategy"] == "umap-kmeans-entropy").all()
    taken = set(zip(labeled["image"], labeled["region"]))
    assert not any((i, r) in taken for i, r in zip(query["image"], query["region"]))
    # each row's pixel count is the size of that region in the cached superpixel map
    index = read_index(ws)
    for image, group in query.groupby("image"):
        sp = load_superpixels(ws, image, index)
        sizes = np.bincount(sp.ravel(), minlength=int(sp.max()) + 1)
        assert (group["region"] < len(sizes)).all()
        np.testing.assert_array_equal(group["pixels"].to_numpy(), sizes[group["region"].to_numpy()])
    timings = ws.read_metrics(1)["acquisition"]["timings_s"]
    assert all(stage in timings for stage in STAGES), timings


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpual.synthetic import make_scenes

    return make_scenes(tmp_path_factory.mktemp("data") / "scenes", n_train=6, n_val=2, height=48, width=64).root


def test_rounds_summary_adds_the_epochs_of_continued_rounds(tmp_path: Path) -> None:
    from gpual import atomic

    def epochs(name: str, per_round: tuple[int | None, ...], reinit: bool) -> list[int | None]:
        ws = Workspace.create(tmp_path / name, make_config("demo", {"train": {"reinit_each_round": reinit}}))
        for r, n in enumerate(per_round):
            atomic.write_json(ws.metrics_path(r), {} if n is None else {"training": {"epochs": n}})
        return [row["epochs_trained"] for row in rounds_summary(ws, len(per_round))]

    assert epochs("chain", (2, 3, 3), reinit=False) == [2, 5, 8]
    assert epochs("gap", (2, None, 3), reinit=False) == [2, None, None]  # unknown from the gap on
    assert epochs("fresh", (2, None, 3), reinit=True) == [2, None, 3]  # each round from fresh weights


def test_run_resumes_and_force_reselects(capsys, monkeypatch, tmp_path: Path, scenes: Path) -> None:
    ws_root = tmp_path / "ws"
    assert run_cli(capsys, "init", ws_root, "--data", scenes, "--dataset", "folder", "--preset", "demo").code == 0
    config = ws_root / "gpual.toml"
    text = config.read_text()
    text = text.replace("epochs_per_round = 4", "epochs_per_round = 1").replace("final_epochs = 12", "final_epochs = 2")
    text = text.replace("init_budget = 120", "init_budget = 40").replace("budget = 60", "budget = 10")
    config.write_text(text)

    r = run_cli(capsys, "run", ws_root, "--rounds", "1", "--device", "cpu")
    assert r.code == 0, r.err
    round0 = {k: v for k, v in _files(ws_root).items() if k.startswith("rounds/000/")}
    assert {"rounds/000/query.parquet", "rounds/000/answers.parquet", "rounds/000/checkpoint.pt"} <= set(round0)

    r = run_cli(capsys, "run", ws_root, "--rounds", "2", "--strategy", "entropy", "--device", "cpu")
    assert r.code == 0, r.err
    after = _files(ws_root)
    # round 0 was finished: resuming leaves every one of its files as it was
    assert {k: v for k, v in after.items() if k.startswith("rounds/000/")} == round0
    ws = Workspace.open(ws_root)
    state = ws.round_state(1)
    assert state.selected and state.labeled and state.trained and state.evaluated
    assert len(ws.read_query(1)) == 10 and (ws.read_query(1)["strategy"] == "entropy").all()
    assert len(ws.read_labeled(1)) == 50
    miou = ws.read_metrics(1)["evaluation"]["miou"]
    assert 0.0 <= miou <= 1.0

    # a finished loop: running it again changes nothing
    r = run_cli(capsys, "run", ws_root, "--rounds", "2", "--device", "cpu")
    assert r.code == 0, r.err
    assert {k: v for k, v in _files(ws_root).items() if not k.startswith("rounds/001/overlays")} == {
        k: v for k, v in after.items() if not k.startswith("rounds/001/overlays")}

    # --final adds the final retraining on the last round's labels, and only that
    r = run_cli(capsys, "run", ws_root, "--rounds", "2", "--final", "--device", "cpu")
    assert r.code == 0, r.err
    final = ws.model_run(1, final=True)
    assert "round 1, final retraining: mIoU" in r.out and final.checkpoint.exists()
    assert ws.read_run_metrics(final)["training"]["epochs"] == ws.config.train.final_epochs
    assert ws.read_run_metrics(final)["training"]["init"] is None  # fresh weights, not round 0's
    assert ws.read_metrics(1)["training"]["init"] == str(ws.checkpoint_path(0))
    rows = rounds_summary(ws, 2)  # round 1 continued round 0: one epoch each, two in all
    assert [row["epochs_trained"] for row in rows] == [1, 2]
    assert [row["final_epochs"] for row in rows] == [None, ws.config.train.final_epochs]
    assert rows[0]["final_miou"] is None and rows[1]["final_miou"] == ws.read_run_metrics(final)["evaluation"]["miou"]
    assert {k: v for k, v in _files(ws_root).items() if not k.startswith(("rounds/001/overlays", "rounds/001/final/"))} == {
        k: v for k, v in after.items() if not k.startswith("rounds/001/overlays")}

    # selecting round 1 again needs --force and discards its label/train/evaluate steps
    r = run_cli(capsys, "select", ws_root, "--round", "1", "--strategy", "margin")
    assert r.code == 1 and "--force" in r.err
    r = run_cli(capsys, "select", ws_root, "--round", "1", "--strategy", "margin", "--force")
    assert r.code == 0, r.err
    state = Workspace.open(ws_root).round_state(1)
    assert state.selected and not state.labeled and not state.trained and not state.evaluated
    assert not final.folder.exists() and "training" not in ws.read_metrics(1)
    # round 1 is built on round 0's labels: round 0 cannot be selected again under it
    before = _files(ws_root)
    r = run_cli(capsys, "select", ws_root, "--round", "0", "--force")
    assert r.code == 1 and "round 1 is built on round 0's labels" in r.err
    assert _files(ws_root) == before
    assert (pd.read_parquet(ws_root / "rounds/001/query.parquet")["strategy"] == "margin").all()

    # a strategy's notes reach the user: here "auto" KMeans levels with the threshold at 0
    monkeypatch.setattr(clustering, "TWO_LEVELS_ABOVE", 0)
    r = run_cli(capsys, "select", ws_root, "--round", "1", "--strategy", "kmeans-entropy", "--force")
    assert r.code == 0, r.err
    assert "note: KMeans in two levels" in r.out
    # a long stage is announced before it runs, so a log shows what the select is doing
    assert "select round 1: KMeans: " in r.out and " in two levels" in r.out
    assert any("two levels" in note for note in Workspace.open(ws_root).read_metrics(1)["acquisition"]["notes"])
