"""First use: `gpual status` while another command works, `gpual presets` shows what each
sets, and a classes.txt of `index name` lines is read as such (void left out, gaps refused)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_runner import run_cli
from gpual.errors import GpualError


def test_status_names_the_command_that_holds_the_lock(capsys, tmp_path: Path) -> None:
    from gpual.config import make_config
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    data = make_scenes(tmp_path / "data", n_train=2, n_val=1, height=32, width=48).root
    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(data), "dataset": "folder"}}))
    assert ws.holder() is None and ws.status()["running"] is None
    with ws.lock("run"):  # another open file description: the probe sees it as another writer
        holder = ws.holder()
        assert holder.startswith("`gpual run` (pid ")
        r = run_cli(capsys, "status", ws.root)
        assert r.code == 0 and f"running: {holder}" in r.out and "next: wait: `gpual run`" in r.out
    assert ws.holder() is None and "running" not in run_cli(capsys, "status", ws.root).out


def test_presets_show_their_values(capsys) -> None:
    r = run_cli(capsys, "presets")
    assert r.code == 0
    lines = {line.split(":")[0]: line for line in r.out.splitlines()}
    assert 'model.backbone_weights = "imagenet"' in lines["paper"] and "data.scale = 0.5" in lines["cpu-small"]
    assert "acquisition.budget = 60" in lines["demo"]


def _classes(tmp_path: Path, text: str):
    from gpual.datasets import open_dataset

    root = tmp_path / "folder"
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(text)
    return open_dataset("folder", root)


def test_indexed_classes_file(tmp_path: Path) -> None:
    spec = _classes(tmp_path, "0\tbackground\n1\tcar\n2 traffic sign\n255\tignore\n")
    assert spec.classes == ("background", "car", "traffic sign")
    assert _classes(tmp_path, "1 car\n0 road\n").classes == ("road", "car")  # by value, not by line
    with pytest.raises(GpualError, match=r"must be 0\.\.1 with none missing \(missing \[1\]\)"):
        _classes(tmp_path, "0 road\n2 car\n")
    with pytest.raises(GpualError, match="gives label value 1 twice"):
        _classes(tmp_path, "0 road\n1 car\n1 bus\n")
    # Plain names stay plain, digits inside included.
    assert _classes(tmp_path, "road\n3d sign\n").classes == ("road", "3d sign")


def test_init_prints_the_budget_as_a_share_of_the_pool(capsys, tmp_path: Path) -> None:
    from gpual.synthetic import make_scenes

    data = make_scenes(tmp_path / "data", n_train=6, n_val=1, height=48, width=64).root
    # demo: 64 px regions, so 48 x 64 / 64 = 48 regions per image, 288 in the pool.
    r = run_cli(capsys, "init", tmp_path / "ws", "--data", data, "--dataset", "folder", "--preset", "demo")
    assert r.code == 0, r.err
    assert "budget: 60 regions per round = about 20.8% of the pool's about 288 regions, about 20.8% of its pixels" in r.out
    assert "round 0 (acquisition.init_budget): 120 regions = about 41.7% of its regions" in r.out
    assert "estimated from the sizes of all 6 pool images at data.scale 1 and superpixels.region_pixels = 64" in r.out
    assert "more than the pool" not in r.out
    # Half size: 12 regions per image; a pixel budget is converted to regions.
    r = run_cli(capsys, "init", tmp_path / "half", "--data", data, "--dataset", "folder", "--preset", "demo",
                "--set", "data.scale=0.5", "--set", "acquisition.budget_unit=pixels", "--set", "acquisition.budget_pixels=0.25")
    assert r.code == 0, r.err
    assert "budget: 25.0% of the pool's pixels per round = about 18 regions of about 64 px, of the pool's about 72" in r.out
    assert "120 regions = about 167% of its regions" in r.out and "more than the pool's regions" in r.out
    assert str(tmp_path / "half" / "gpual.toml") in r.out

    # After `gpual superpixels`, status gives the exact share of the regions it computed.
    ws = tmp_path / "ws"
    assert run_cli(capsys, "superpixels", ws).code == 0
    from gpual.workspace import Workspace

    regions = Workspace.open(ws).status()["pool_regions"]
    r = run_cli(capsys, "status", ws)
    assert r.code == 0 and (f"budget: 60 regions per round = {60 / regions:.1%} of the pool's {regions:,} regions "
                            f"(round 0: 120 = {120 / regions:.1%} of its regions)") in r.out
    import json

    budget = json.loads(run_cli(capsys, "status", ws, "--json").out)["budget"]
    assert budget["per_round_regions"] == 60 and budget["per_round_share_of_regions"] == pytest.approx(60 / regions)


def test_status_table_says_labelled_pixels_share_of_pool(capsys, monkeypatch, tmp_path: Path) -> None:
    from gpual.synthetic import make_scenes

    data = make_scenes(tmp_path / "data", n_train=3, n_val=1, height=32, width=48).root
    ws = tmp_path / "ws"
    assert run_cli(capsys, "init", ws, "--data", data, "--dataset", "folder", "--preset", "demo",
                   "--set", "acquisition.init_budget=20").code == 0
    for command in ("superpixels", "select", "label"):
        assert run_cli(capsys, command, ws, *(() if command == "superpixels" else ("--round", "0"))).code == 0
    from cli import options

    monkeypatch.setattr(options.console, "width", 200)  # the whole header on one line
    out = run_cli(capsys, "status", ws).out
    header = next(line for line in out.splitlines() if "round" in line and "select" in line)
    assert "labelled regions" in header and "labelled pixels (share of pool)" in header
    assert "labeled" not in out


def test_pool_estimate_samples_a_few_images_and_skips_unreadable_ones(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from cli.workspace import SIZE_SAMPLE, estimate_pool
    from gpual.config import make_config

    paths = []
    for i in range(40):
        path = tmp_path / f"{i:02d}.png"
        cv2.imwrite(str(path), np.zeros((40, 60, 3), np.uint8))
        paths.append(path)
    paths[0].write_bytes(b"not an image")  # the first sampled image
    config = make_config(None, {"superpixels": {"region_pixels": 100}, "data": {"scale": 0.5}})
    regions, pixels, measured = estimate_pool(config, paths)
    assert measured == SIZE_SAMPLE - 1  # the others of the sample, not every image
    assert pixels == 40 * 20 * 30 and regions == 40 * 6  # 20 x 30 px at half size, 600 / 100 regions each
    assert estimate_pool(config, []) is None and estimate_pool(config, paths[:1]) is None
