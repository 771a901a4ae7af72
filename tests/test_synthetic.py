"""Synthetic scenes: deterministic, in the folder layout, every class and void present, written once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpual.datasets import load_pair, open_dataset, validate_split
from gpual.errors import GpualError
from gpual.synthetic import SYNTHETIC_CLASSES, make_scenes


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("syn") / "scenes", n_train=12, n_val=4, height=48, width=64).root


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, scenes: Path) -> None:
    again = make_scenes(tmp_path / "again", n_train=12, n_val=4, height=48, width=64)
    assert tree_bytes(again.root) == tree_bytes(scenes)
    other = make_scenes(tmp_path / "other", n_train=12, n_val=4, height=48, width=64, seed=1)
    a, b = tree_bytes(other.root), tree_bytes(scenes)
    assert a.keys() == b.keys()
    assert a["train/images/train_0000.png"] != b["train/images/train_0000.png"]


def test_folder_layout_opens(scenes: Path) -> None:
    spec = open_dataset("folder", scenes)
    assert spec.classes == SYNTHETIC_CLASSES and spec.num_classes == 5
    assert spec.splits() == ["train", "val"]
    assert [s.id for s in spec.samples("train")] == [f"train_{i:04d}" for i in range(12)]
    assert validate_split(spec, "train") == 12 and validate_split(spec, "val") == 4


def test_shapes_classes_and_void(scenes: Path) -> None:
    spec = open_dataset("folder", scenes)
    counts = np.zeros(256, np.int64)
    for sample in spec.samples("train"):
        image, label = load_pair(spec, sample)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert label.shape == (48, 64) and label.dtype == np.uint8
        counts += np.bincount(label.ravel(), minlength=256)
    share = counts / counts.sum()
    assert all(share[c] > 0.01 for c in range(len(SYNTHETIC_CLASSES))), share[:5]
    assert 0.001 < share[255] < 0.1  # a thin void ring, not whole shapes
    assert counts[5:255].sum() == 0


def test_images_are_textured_not_flat(scenes: Path) -> None:
    spec = open_dataset("folder", scenes)
    image, label = load_pair(spec, spec.samples("train")[0])
    for c in np.unique(label[label != 255]):
        assert image[label == c].std() > 3.0  # noise and texture everywhere, no flat fills


def test_second_call_does_not_rewrite(scenes: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in scenes.rglob("*")}
    spec = make_scenes(scenes, n_train=12, n_val=4, height=48, width=64)
    assert spec.root == scenes.absolute()
    assert {p: p.stat().st_mtime_ns for p in scenes.rglob("*")} == before


def test_refuses_foreign_or_different_folder(tmp_path: Path, scenes: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GpualError, match="foreign exists and is not the synthetic set"):
        make_scenes(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(GpualError, match="n_train=13"):
        make_scenes(scenes, n_train=13, n_val=4, height=48, width=64)
    assert json.loads((scenes / "synthetic.json").read_text())["n_train"] == 12


def test_partial_set_is_refused(tmp_path: Path) -> None:
    spec = make_scenes(tmp_path / "s", n_train=3, n_val=2, height=32, width=32)
    (spec.root / "val" / "labels" / "val_0001.png").unlink()
    with pytest.raises(GpualError, match="not the synthetic set"):
        make_scenes(tmp_path / "s", n_train=3, n_val=2, height=32, width=32)


def test_empty_existing_folder_is_filled_and_no_temp_left(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    spec = make_scenes(tmp_path / "s", n_train=2, n_val=1, height=32, width=40)
    assert len(spec.samples("train")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(GpualError, match="n_train=0"):
        make_scenes(tmp_path / "s", n_train=0)
    assert not (tmp_path / "s").exists()


def test_default_set_sizes(tmp_path: Path) -> None:
    # Its speed is part of `gpual demo`'s wall time, measured outside the tests.
    spec = make_scenes(tmp_path / "default")
    assert len(spec.samples("train")) == 48 and len(spec.samples("val")) == 16
