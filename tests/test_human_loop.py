"""The human loop on a pool without labels: `gpual run` stops where a person must label,
partial rounds are refused or trained with --partial, answers that came from outside the
oracle give the same model as the oracle's, and no training path reads pool ground truth."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli
from gpual.errors import GpualError
from gpual.workspace import Workspace


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(labelled scenes, the same scenes with the pool's labels/ folder removed)."""
    from gpual.synthetic import make_scenes

    root = tmp_path_factory.mktemp("human")
    labelled = make_scenes(root / "labelled", n_train=6, n_val=2, height=48, width=64).root
    unlabelled = root / "unlabelled"
    shutil.copytree(labelled, unlabelled)
    shutil.rmtree(unlabelled / "train" / "labels")
    return labelled, unlabelled


def _init(capsys, root: Path, data: Path) -> Path:
    settings = ["--set", "train.epochs_per_round=1", "--set", "acquisition.init_budget=40", "--set", "acquisition.budget=10"]
    r = run_cli(capsys, "init", root, "--data", data, "--dataset", "folder", "--preset", "demo", *settings)
    assert r.code == 0, r.err
    return root


def answer_from_ground_truth(ws: Workspace, round: int, labelled: Path, only: int | None = None) -> int:
    """A stand-in for a person: answer round ``round``'s queried regions (the first ``only``
    of them) from the ground truth of the labelled copy, through the label store's API."""
    from gpual.datasets import open_dataset, read_label
    from gpual.label_store import answers_from_label_map, record_answers
    from gpual.oracle import reveal
    from gpual.superpixels import load_superpixels, read_index

    spec = open_dataset("folder", labelled)
    samples = {s.id: s for s in spec.samples("train")}
    query = ws.read_query(round).iloc[:only]
    index = read_index(ws)
    answers = []
    for image, group in query.groupby("image"):
        sp = load_superpixels(ws, image, index)
        regions = group["region"].to_numpy(np.int64)
        truth = reveal(read_label(spec, samples[image].label, ws.config.data.scale), sp, regions)
        answers.append(answers_from_label_map(image, truth, sp, regions, void_is_answer=True)[0])
    with ws.lock("test"):
        return record_answers(ws, round, "annotator", answers).regions


def test_unlabelled_pool_runs_as_a_human_loop(capsys, tmp_path: Path, scenes: tuple[Path, Path]) -> None:
    labelled, unlabelled = scenes
    root = _init(capsys, tmp_path / "ws", unlabelled)
    r = run_cli(capsys, "label", root, "--round", "0")
    assert r.code == 1 and "no select step" in r.err
    r = run_cli(capsys, "run", root, "--rounds", "2", "--device", "cpu")
    assert r.code == 0, r.err
    assert "0 / 40 regions answered" in r.out and f"gpual annotate {root} --round 0" in r.out
    ws = Workspace.open(root)
    assert ws.round_state(0).selected and not ws.round_state(0).labeled

    # The oracle cannot label a pool without ground truth; status points at the annotator.
    r = run_cli(capsys, "label", root, "--round", "0")
    assert r.code == 1 and "no ground truth" in r.err and "gpual annotate" in r.err and "\n" not in r.err.strip()
    assert ws.status()["next"] == f"gpual annotate {root} --round 0"

    # Part of the round answered: train refuses with the count and both ways forward.
    assert answer_from_ground_truth(ws, 0, labelled, only=15) == 15
    r = run_cli(capsys, "status", root)
    assert "round 0: 15 / 40 regions answered" in r.out
    r = run_cli(capsys, "train", root, "--round", "0", "--device", "cpu")
    assert r.code == 1 and "15 / 40 regions answered" in r.err and "--partial" in r.err and "gpual annotate" in r.err
    assert not ws.checkpoint_path(0).exists()

    # The rest answered: `run` continues where it stopped (train, evaluate on the labelled
    # val split, select round 1) and stops again for round 1's labels.
    assert answer_from_ground_truth(ws, 0, labelled) == 40
    r = run_cli(capsys, "run", root, "--rounds", "2", "--device", "cpu")
    assert r.code == 0, r.err
    assert ws.round_state(0).evaluated and ws.round_state(1).selected and not ws.round_state(1).labeled
    assert "round 1: 0 / 10 regions answered" in r.out
    # A trained round's answers are fixed.
    with pytest.raises(GpualError, match="can no longer change"):
        answer_from_ground_truth(ws, 0, labelled)


def test_answers_from_a_person_train_the_same_model_as_the_oracle(capsys, tmp_path: Path, scenes: tuple[Path, Path]) -> None:
    """Same seed and config: answers given through the label store from ground truth, on a
    pool gpual cannot see the labels of, give the oracle's round exactly (query, model, mIoU)."""
    from gpual.backend import cpu_backend
    from gpual.active_loop import LoopOptions, run_loop

    labelled, unlabelled = scenes
    oracle = Workspace.open(_init(capsys, tmp_path / "oracle", labelled))
    run_loop(oracle, cpu_backend(), LoopOptions(rounds=2))
    human = Workspace.open(_init(capsys, tmp_path / "human", unlabelled))
    for r in range(2):
        run_loop(human, cpu_backend(), LoopOptions(rounds=2))
        assert human.read_query(r).equals(oracle.read_query(r))
        answer_from_ground_truth(human, r, labelled)
    run_loop(human, cpu_backend(), LoopOptions(rounds=2))
    for r in range(2):
        assert human.read_metrics(r)["evaluation"]["miou"] == oracle.read_metrics(r)["evaluation"]["miou"]
    assert (human.read_answers(1)["source"] == "annotator").all()


def test_partial_round_trains_and_its_unanswered_regions_return_to_the_pool(capsys, tmp_path: Path,
                                                                          scenes: tuple[Path, Path]) -> None:
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend

    labelled, unlabelled = scenes
    root = _init(capsys, tmp_path / "ws", unlabelled)
    assert run_cli(capsys, "superpixels", root).code == 0
    ws = Workspace.open(root)
    acquire(ws, 0, cpu_backend())
    answer_from_ground_truth(ws, 0, labelled, only=25)
    r = run_cli(capsys, "train", root, "--round", "0", "--partial", "--device", "cpu")
    assert r.code == 0, r.err
    state = ws.round_state(0)
    assert state.trained and state.labeled and (state.answered, state.queried) == (25, 40)
    assert len(ws.read_labeled(0)) == 25
    # The 15 unanswered regions are candidates again in round 1.
    result = acquire(ws, 1, cpu_backend(), strategy="random", budget=10)
    assert result.candidates == int(ws.status()["pool_regions"]) - 25


@pytest.mark.slow
def test_demo_annotate_serves_round_one_then_trains_on_the_answers(tmp_path: Path) -> None:
    """`gpual demo --annotate`: round 0 by the oracle, round 1 served; a client answers every
    region (class 1 as a stand-in for a person) and presses Done; the demo then trains round 1
    on those answers and prints its mIoU."""
    import os
    import re
    import subprocess
    import sys

    import httpx

    root = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [str(Path(sys.executable).parent / "gpual"), "demo", "--annotate", "--no-open", "--port", "0",
               "-w", str(root), "--device", "cpu"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        while not any("annotate at" in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[-1]).group(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            for image in client.get("/api/session").json()["images"]:
                answers = [{"region": r, "class": 1, "seconds": 1.0} for r in image["regions"]]
                assert client.post(f"/api/images/{image['index']}/answers", json={"answers": answers}).status_code == 200
            assert client.post("/api/done", json={}).status_code == 200
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    out = "".join(lines) + out
    assert process.returncode == 0, out
    assert "round 1: 60 / 60 regions answered" in out and "round 1: mIoU" in out
    ws = Workspace.open(root)
    answers = ws.read_answers(1)
    assert len(answers) == 60 and (answers["source"] == "annotator").all() and (answers["class"] == 1).all()
    assert ws.round_state(1).evaluated and ws.read_metrics(1)["training"]["labeled_pixels"] > 0


def test_run_without_val_labels_skips_evaluation_with_a_note(capsys, tmp_path: Path, scenes: tuple[Path, Path]) -> None:
    labelled, _ = scenes
    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    shutil.rmtree(data / "val" / "labels")
    root = _init(capsys, tmp_path / "ws", data)
    r = run_cli(capsys, "run", root, "--rounds", "1", "--device", "cpu")
    assert r.code == 0, r.err
    assert "split 'val'" in r.out and "has no labels: rounds are not evaluated" in r.out
    ws = Workspace.open(root)
    assert ws.round_state(0).trained and not ws.round_state(0).evaluated
    r = run_cli(capsys, "evaluate", root, "--round", "0", "--device", "cpu")
    assert r.code == 1 and "has no labels/ folder: evaluation needs ground truth" in r.err
