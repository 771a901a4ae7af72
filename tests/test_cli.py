"""The CLI's contract for bad input: one line, what to do, non-zero exit, nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from gpual.config import make_config
from gpual.synthetic import make_scenes
from gpual.workspace import Workspace


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("data") / "scenes", n_train=6, n_val=2, height=48, width=64).root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_line_error(result, code: int, match: str) -> None:
    assert result.code == code, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    assert match in lines[0], lines[0]


def test_init_status_superpixels(capsys, tmp_path, scenes) -> None:
    ws = tmp_path / "ws"
    r = run_cli(capsys, "init", ws, "--data", scenes, "--dataset", "folder", "--preset", "demo")
    assert r.code == 0 and (ws / "gpual.toml").exists()
    r = run_cli(capsys, "status", ws)
    assert r.code == 0 and f"gpual superpixels {ws}" in r.out
    r = run_cli(capsys, "superpixels", ws)
    assert r.code == 0, r.err
    r = run_cli(capsys, "status", ws, "--json")
    assert '"pool_images": 6' in r.out and f"gpual select {ws} --round 0" in r.out


def test_init_errors(capsys, tmp_path, scenes) -> None:
    _one_line_error(run_cli(capsys, "init", tmp_path / "ws", "--data", tmp_path / "missing", "--dataset", "camvid"), 1, "missing")
    assert not (tmp_path / "ws").exists()
    _one_line_error(run_cli(capsys, "init", tmp_path / "ws", "--data", scenes, "--dataset", "folder", "--preset", "huge"), 2, "unknown preset")
    assert not (tmp_path / "ws" / "gpual.toml").exists()
    _one_line_error(run_cli(capsys, "status", tmp_path / "nowhere"), 1, "not a gpual workspace")
    for setting, message in (("acquisition.regionscore=mean", "unknown key(s) regionscore"),
                             ("acquisition.region_score=max", "is not one of"), ("budget", "is not KEY=VALUE")):
        _one_line_error(run_cli(capsys, "init", tmp_path / "ws", "--data", scenes, "--dataset", "folder", "--set", setting), 2, message)
        assert not (tmp_path / "ws" / "gpual.toml").exists()


def test_init_set_lays_values_over_the_preset(capsys, tmp_path, scenes) -> None:
    ws = tmp_path / "ws"
    r = run_cli(capsys, "init", ws, "--data", scenes, "--dataset", "folder", "--preset", "demo",
                "--set", "acquisition.region_score=mean", "--set", "kmeans.max_iter=50")
    assert r.code == 0, r.err
    config = Workspace.open(ws).config
    assert (config.acquisition.region_score, config.kmeans.max_iter) == ("mean", 50)
    assert config.model.backbone == make_config("demo").model.backbone  # the preset still applies


@pytest.fixture()
def ready_ws(capsys, tmp_path, scenes) -> Path:
    ws = tmp_path / "ws"
    assert run_cli(capsys, "init", ws, "--data", scenes, "--dataset", "folder", "--preset", "demo").code == 0
    assert run_cli(capsys, "superpixels", ws).code == 0
    return ws


def test_select_refusals_write_nothing(capsys, ready_ws: Path) -> None:
    before = _files(ready_ws)
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "1"), 1, "round 0 is not trained")
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "0", "--budget", "100000"), 1, "larger than the")
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "0", "--strategy", "best"), 2, "unknown strategy")
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "0", "--budget-pixels", "abc"), 2, "is not a share")
    _one_line_error(run_cli(capsys, "label", ready_ws, "--round", "0"), 1, "no select step")
    _one_line_error(run_cli(capsys, "train", ready_ws, "--round", "0"), 1, "no select step")
    assert _files(ready_ws) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error path cannot be reached")
def test_cuda_asked_for_but_absent(capsys, ready_ws: Path) -> None:
    before = _files(ready_ws)
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "0", "--device", "cuda"), 2, "--device cuda")
    _one_line_error(run_cli(capsys, "train", ready_ws, "--round", "0", "--device", "cuda"), 2, "cuda")
    assert _files(ready_ws) == before


def test_round_zero_select_and_label(capsys, ready_ws: Path) -> None:
    r = run_cli(capsys, "select", ready_ws, "--round", "0", "--budget-pixels", "5%")
    assert r.code == 0, r.err
    import pandas as pd

    query = pd.read_parquet(ready_ws / "rounds/000/query.parquet")
    assert list(query.columns) == ["image", "region", "round", "strategy", "score", "pixels"]
    assert not query.duplicated(["image", "region"]).any() and (query["strategy"] == "random").all()
    total = 6 * 48 * 64
    assert 0.03 < query["pixels"].sum() / total < 0.07
    _one_line_error(run_cli(capsys, "select", ready_ws, "--round", "0"), 1, "already selected")
    assert run_cli(capsys, "label", ready_ws, "--round", "0").code == 0
    labeled = pd.read_parquet(ready_ws / "rounds/000/answers.parquet")
    assert len(labeled) == len(query) and (labeled["source"] == "oracle-pixel").all()
    assert any((ready_ws / "rounds/000/overlays").iterdir())
