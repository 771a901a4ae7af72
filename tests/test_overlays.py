"""Overlays: drawn at the image file's size, this round's queries outlined in two tones that
show on any content, earlier labels drawn apart from unlabelled regions, and a legend."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cli_runner import run_cli
from gpual.interchange.regions import upscale
from gpual.overlays import (
    BRIGHT_BGR,
    DARK_BGR,
    EARLIER_BGR,
    QUERY_ALPHA,
    QUERY_BGR,
    Legend,
    enlarge_small,
    legend_items,
    line_width,
    region_boundaries,
    render_overlay,
    write_overlays,
)


def _grid(height: int, width: int, cell: int) -> np.ndarray:
    """(height, width) uint16 region ids: square cells of ``cell`` px, row-major."""
    cols = (width + cell - 1) // cell
    return ((np.arange(height)[:, None] // cell) * cols + np.arange(width)[None, :] // cell).astype(np.uint16)


def test_overlays_enlarge_the_map_by_the_exports_rule() -> None:
    """The overlay's full-size map is the one the exports and the annotator draw
    (gpual.interchange.regions.upscale): the same pixels belong to each region."""
    sp = np.array([[0, 1, 2], [3, 4, 5]], np.uint16)
    big = upscale(sp, (4, 6))
    assert big.dtype == np.uint16 and big.shape == (4, 6)
    assert np.array_equal(big, np.repeat(np.repeat(sp, 2, axis=0), 2, axis=1))
    assert np.array_equal(upscale(sp, (2, 3)), sp)
    # A non-integer factor: every source region still appears, in order, nothing out of range.
    odd = upscale(sp, (5, 7))
    assert odd.shape == (5, 7) and set(np.unique(odd)) == set(range(6))
    assert list(odd[0]) == [0, 0, 1, 1, 2, 2, 2] and list(odd[:, 0]) == [0, 0, 3, 3, 3]
    # The overlay draws its query on exactly those pixels.
    image = np.zeros((5, 7, 3), np.uint8)
    out = render_overlay(image, sp, np.array([4]), None, None)
    assert ((out != 0).any(axis=2) & (odd != 4) & ~region_boundaries(odd)).sum() == 0


def test_small_images_are_enlarged_by_a_whole_factor() -> None:
    small = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarge_small(small, min_width=7)
    assert big.shape == (6, 9, 3) and np.array_equal(big[::3, ::3], small) and np.array_equal(big[2, 5], small[0, 1])
    wide = np.zeros((10, 500, 3), np.uint8)
    assert enlarge_small(wide) is wide


def test_query_border_is_two_tone_on_yellow_and_earlier_labels_are_greyed() -> None:
    # A yellow image (where the old amber fill vanished), 20 px regions at half size.
    height, width = 400, 600
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (255, 220, 0)  # RGB yellow
    sp = _grid(height // 2, width // 2, 10)
    queried, earlier = np.array([31], np.uint16), np.array([33], np.uint16)
    out = render_overlay(image, sp, queried, earlier)
    assert out.shape == (height, width, 3)  # the file's size, not the working scale
    full = upscale(sp, (height, width))
    t = line_width(height, width)
    ys, xs = np.nonzero(full == 31)
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    # Dark line along the region's edge, bright line inside it, fill in the middle.
    assert (out[top, left + 5 * t] == DARK_BGR).all() and (out[top + t, left + 5 * t] == BRIGHT_BGR).all()
    assert (out[bottom - t + 1, left + 5 * t] == DARK_BGR).all() and (out[bottom - t, left + 5 * t] == BRIGHT_BGR).all()
    centre = out[(top + bottom) // 2, (left + right) // 2].astype(int)
    yellow_bgr = np.array([0, 220, 255])
    expected = (1 - QUERY_ALPHA) * yellow_bgr + QUERY_ALPHA * np.array(QUERY_BGR)
    assert np.abs(centre - expected).max() <= 2 and np.abs(centre - yellow_bgr).max() > 80
    # The pixels just outside the query are the content (a thin boundary line aside).
    outside = out[(top + bottom) // 2, right + 4].astype(int)
    assert np.array_equal(outside, yellow_bgr)
    # An earlier label: grey (B = G = R) or the cyan hatching (off the thin region outlines).
    done = out[(full == 33) & ~region_boundaries(full)].astype(int)
    grey = (done[:, 0] == done[:, 1]) & (done[:, 1] == done[:, 2])
    hatch = (done == EARLIER_BGR).all(axis=1)
    assert (grey | hatch).all() and hatch.any() and grey.any()
    # An unlabelled, unqueried region far from both keeps its colours inside.
    ys, xs = np.nonzero(full == 200)
    assert np.array_equal(out[ys.mean().astype(int), xs.mean().astype(int)], yellow_bgr)


def test_adjacent_queries_stay_apart_and_a_dark_image_shows_the_bright_line() -> None:
    height, width = 120, 160
    image = np.zeros((height, width, 3), np.uint8)
    sp = _grid(height, width, 40)
    out = render_overlay(image, sp, np.array([0, 1], np.uint16))
    # The shared edge of regions 0 and 1 (x = 39 | 40) is dark on both sides, bright next to it.
    assert (out[20, 39] == DARK_BGR).all() and (out[20, 40] == DARK_BGR).all()
    assert (out[20, 38] == BRIGHT_BGR).all() and (out[20, 41] == BRIGHT_BGR).all()


def test_legend_names_round_strategy_counts_scores_and_keys() -> None:
    legend = Legend(round=3, strategy="umap-kmeans-entropy", image="0001TP_006690", queried=7, total_queried=1600,
                    scores=(0.25, 3.5), earlier=12)
    items = legend_items(legend)
    texts = [text for _, text in items]
    assert texts[0] == "round 3, umap-kmeans-entropy: 0001TP_006690"
    assert texts[1] == "7 of the round's 1,600 queried regions here, scores 0.25 to 3.5"
    assert [key for key, _ in items[2:]] == ["query", "earlier", "edge"]
    assert "labelled in rounds 0-2 (12 here)" in texts
    first = legend_items(Legend(0, "random", "a", 2, 10, None, 0))
    assert "earlier" not in {key for key, _ in first} and "no scores (random draw)" in first[1][1]
    assert "labelled in round 0 (0 here)" in [t for _, t in legend_items(Legend(1, "entropy", "a", 1, 1, (2.0, 2.0), 0))]
    # The strip sits under the image and wraps on a narrow image instead of losing text.
    image = np.full((100, 600, 3), 90, np.uint8)
    sp = _grid(100, 600, 20)
    wide = render_overlay(image, sp, np.array([1], np.uint16), legend=legend)
    narrow = render_overlay(image[:, :150], sp[:, :150], np.array([1], np.uint16), legend=legend)
    assert wide.shape[1] == 600 and wide.shape[0] > 100 and narrow.shape[1] == 150
    assert narrow.shape[0] - 100 > wide.shape[0] - 100  # more lines
    assert np.array_equal(wide[:100], render_overlay(image, sp, np.array([1], np.uint16)))


@pytest.fixture()
def labelled_ws(capsys, tmp_path: Path) -> Path:
    """Round 0 selected and labelled by the oracle, superpixels at half the files' size."""
    from gpual.synthetic import make_scenes

    data = make_scenes(tmp_path / "data", n_train=4, n_val=1, height=64, width=96).root
    ws = tmp_path / "ws"
    assert run_cli(capsys, "init", ws, "--data", data, "--dataset", "folder", "--preset", "demo",
                   "--set", "data.scale=0.5", "--set", "superpixels.region_pixels=24",
                   "--set", "acquisition.init_budget=20").code == 0
    for command in ("superpixels", "select", "label"):
        r = run_cli(capsys, command, ws, *(() if command == "superpixels" else ("--round", "0")))
        assert r.code == 0, r.err
    return ws


def test_overlays_of_a_workspace_at_file_size_with_earlier_labels_apart(labelled_ws: Path) -> None:
    from gpual.superpixels import load_superpixels, read_index
    from gpual.workspace import Workspace

    ws = Workspace.open(labelled_ws)
    round0 = sorted(ws.overlay_dir(0).iterdir())
    assert round0, "select wrote no overlay"
    first = cv2.imread(str(round0[0]))
    # The file's 96 px width, enlarged 5 times to reach MIN_WIDTH (400); image plus legend strip.
    assert first.shape[1] == 480 and first.shape[0] > 320

    # A round-1 selection drawn by hand: three unlabelled regions of the most-labelled image.
    labelled = ws.read_labeled(0)
    image_id = labelled["image"].value_counts().index[0]
    index = read_index(ws)
    sp = load_superpixels(ws, image_id, index)
    done = labelled.loc[labelled["image"] == image_id, "region"].to_numpy()
    fresh = np.setdiff1d(np.arange(int(sp.max()) + 1), done)[:3]
    manifest = pd.DataFrame({"image": image_id, "region": fresh.astype(np.int32), "round": 1,
                             "strategy": "entropy", "score": [1.0, 2.0, 3.0], "pixels": 1})
    assert write_overlays(ws, 1, index, manifest, 4) == [image_id]
    (path,) = ws.overlay_dir(1).iterdir()
    out = cv2.imread(str(path))
    from gpual.datasets import read_image

    original = cv2.cvtColor(read_image(str(index.set_index("image").loc[image_id, "path"]), 1.0), cv2.COLOR_RGB2BGR)
    original = enlarge_small(original)
    assert original.shape[:2] == (320, 480) and out.shape[1] == 480 and out.shape[0] > 320
    out = out[:320]
    full = upscale(sp, (320, 480))
    earlier = out[np.isin(full, done) & ~region_boundaries(full)].astype(int)
    grey = (earlier[:, 0] == earlier[:, 1]) & (earlier[:, 1] == earlier[:, 2])
    assert (grey | (earlier == EARLIER_BGR).all(axis=1)).all()
    # Unlabelled, unqueried pixels off the thin region outlines keep the photo's colours.
    plain = ~np.isin(full, np.concatenate([done, fresh])) & ~region_boundaries(full)
    assert np.array_equal(out[plain], original[plain])
    assert not np.array_equal(out[np.isin(full, done)], original[np.isin(full, done)])
    assert write_overlays(ws, 1, index, manifest, 0) == []
