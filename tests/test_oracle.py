"""The simulated oracle: reveal (pixel / dominant), region statistics, label_round's table and refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpual.errors import GpualError
from gpual.oracle import label_round, region_stats, reveal

# A 3x4 image with 3 regions; 255 = void.
LABEL = np.array([[1, 1, 2, 255], [1, 2, 2, 255], [0, 0, 255, 255]], dtype=np.uint8)
SP = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 1, 2]], dtype=np.uint16)


def test_region_stats_by_hand() -> None:
    pixels, dominant = region_stats(LABEL, SP, n_regions=4)
    # region 0: 1,1,1 -> class 1; region 1: 2,255,2,2,255,255 -> class 2; region 2: 0,0,255 -> class 0; region 3: empty
    assert pixels.tolist() == [3, 6, 3, 0] and pixels.dtype == np.int64
    assert dominant.tolist() == [1, 2, 0, 255] and dominant.dtype == np.int32
    tie = np.array([[3, 1, 1, 3]], dtype=np.uint8)  # two of class 1, two of class 3: the lower id wins
    assert region_stats(tie, np.zeros((1, 4), np.uint16), 1)[1].tolist() == [1]
    void = np.full((1, 2), 255, np.uint8)
    assert region_stats(void, np.zeros((1, 2), np.uint16), 1)[1].tolist() == [255]


def test_reveal_pixel_and_dominant() -> None:
    out = reveal(LABEL, SP, np.array([1]), mode="pixel")
    assert out.dtype == np.uint8
    assert out.tolist() == [[255, 255, 2, 255], [255, 2, 2, 255], [255, 255, 255, 255]]
    out = reveal(LABEL, SP, np.array([0, 2]), mode="pixel")
    assert out.tolist() == [[1, 1, 255, 255], [1, 255, 255, 255], [0, 0, 255, 255]]
    out = reveal(LABEL, SP, np.array([1, 2]), mode="dominant")  # region 1's void pixels get class 2 too
    assert out.tolist() == [[255, 255, 2, 2], [255, 2, 2, 2], [0, 0, 2, 0]]
    all_void = reveal(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint16), np.array([0]), mode="dominant")
    assert (all_void == 255).all()
    assert (reveal(LABEL, SP, np.array([], dtype=np.int64)) == 255).all()
    with pytest.raises(GpualError, match="oracle"):
        reveal(LABEL, SP, np.array([0]), mode="majority")


@pytest.fixture(scope="module")
def selected_ws(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic workspace with superpixels and a random round-0 query."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    root = tmp_path_factory.mktemp("oracle")
    spec = make_scenes(root / "data", n_train=4, n_val=2, height=48, width=64)
    ws = Workspace.create(root / "ws", make_config("demo", {"data": {"root": str(spec.root), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=30)
    return ws


def test_label_round_writes_the_label_store(selected_ws) -> None:
    from gpual.datasets import open_dataset, read_label
    from gpual.label_store import sparse_targets
    from gpual.superpixels import load_superpixels, read_index
    from gpual.workspace import ANSWER_COLUMNS

    ws = selected_ws
    query = ws.read_query(0)
    info = label_round(ws, 0)
    table = ws.read_answers(0)
    assert list(table.columns) == list(ANSWER_COLUMNS)
    assert str(table["region"].dtype) == "int32" and str(table["pixels"].dtype) == "int64"
    assert len(table) == 30 and (table["round"] == 0).all() and (table["source"] == "oracle-pixel").all()
    assert sorted(map(tuple, table[["image", "region"]].astype(str).values)) == sorted(
        map(tuple, query[["image", "region"]].astype(str).values))
    # pixels, class and the kind of answer against the ground truth, recomputed per region with plain NumPy
    spec = open_dataset("folder", ws.config.data.root)
    samples = {s.id: s for s in spec.samples("train")}
    index = read_index(ws)
    for row in table.to_dict("records"):
        gt = read_label(spec, samples[row["image"]].label)
        inside = load_superpixels(ws, row["image"], index) == row["region"]
        assert row["pixels"] == inside.sum()
        values = gt[inside][gt[inside] != 255]
        assert row["class"] == (np.bincount(values).argmax() if values.size else 255)
        assert row["kind"] == ("region" if np.unique(gt[inside]).size == 1 else "pixels")
        assert row["labeled_pixels"] == values.size
    # The training targets equal the ground truth revealed inside the queried regions, exactly.
    targets = sparse_targets(ws, 0)
    for image, group in query.groupby("image"):
        gt = read_label(spec, samples[image].label)
        expected = reveal(gt, load_superpixels(ws, image, index), group["region"].to_numpy(np.int64))
        np.testing.assert_array_equal(targets[image], expected)
    assert info["regions"] == 30 and info["pixels"] == int(table["pixels"].sum())
    assert info["answered"] == info["queried"] == 30 and info["sources"] == {"oracle-pixel": 30}
    assert info["labeled_share"] == pytest.approx(table["pixels"].sum() / (4 * 48 * 64))
    pd.testing.assert_frame_equal(ws.read_labeled(0), table)
    assert ws.round_state(0).labeled
    with pytest.raises(GpualError, match="already labelled"):
        label_round(ws, 0)


def test_label_round_answers_only_what_is_unanswered(selected_ws, tmp_path: Path) -> None:
    import shutil

    from gpual.label_store import ImageAnswers, record_answers
    from gpual.workspace import Workspace

    root = tmp_path / "copy"
    shutil.copytree(selected_ws.root, root)
    ws = Workspace.open(root)
    shutil.rmtree(ws.answers_dir(0), ignore_errors=True)
    ws.answers_path(0).unlink()
    first = ws.read_query(0).iloc[0]
    record_answers(ws, 0, "annotator", [ImageAnswers(str(first["image"]), np.array([first["region"]]), np.array([3]),
                                                     seconds=np.array([1.5]))])
    state = ws.round_state(0)
    assert (state.answered, state.queried, state.labeled) == (1, 30, False)
    with pytest.raises(GpualError, match="1 / 30 regions answered"):
        ws.require(0, "train", "train")
    ws.require(0, "train", "train", partial=True)
    label_round(ws, 0)
    table = ws.read_answers(0)
    mine = table[(table["image"] == first["image"]) & (table["region"] == first["region"])].iloc[0]
    assert (mine["source"], mine["class"], mine["seconds"]) == ("annotator", 3, 1.5)
    assert (table["source"] == "oracle-pixel").sum() == 29 and ws.round_state(0).labeled


def test_label_round_refusals_write_nothing(selected_ws, tmp_path: Path) -> None:
    import shutil

    from gpual.workspace import Workspace

    # A copy whose query names an unknown region, then one that repeats a region.
    root = tmp_path / "copy"
    shutil.copytree(selected_ws.root, root)
    ws = Workspace.open(root)
    shutil.rmtree(ws.answers_dir(0), ignore_errors=True)
    ws.answers_path(0).unlink(missing_ok=True)
    query = ws.read_query(0)
    bad = query.copy()
    bad.loc[0, "region"] = 10_000
    ws.write_query(0, bad)
    with pytest.raises(GpualError, match="region 10000"):
        label_round(ws, 0)
    assert not ws.answers_path(0).exists()
    dup = pd.concat([query, query.iloc[:1]], ignore_index=True)
    ws.write_query(0, dup)
    with pytest.raises(GpualError, match="twice"):
        label_round(ws, 0)
    assert not ws.answers_path(0).exists() and not ws.answers_dir(0).exists()
    ws.query_path(0).unlink()
    with pytest.raises(GpualError, match="no select step"):
        label_round(ws, 0)
