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
