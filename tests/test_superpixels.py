"""The superpixel stage: region maps, the cache and its invalidation, the index, the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import fast_slic
import numpy as np
import pytest
from typer.testing import CliRunner

from gpual.config import make_config
from gpual.datasets import read_image
from gpual.errors import GpualError
from gpual.superpixels import (
    build_cache,
    cache_key,
    compute_superpixels,
    load_superpixels,
    read_index,
    read_region_pixels,
    region_pixel_counts,
    seeds_grid,
    seeds_request,
)
from gpual.synthetic import make_scenes
from gpual.workspace import Workspace

METHODS = ("slic", "seeds")
H, W = 48, 64  # scenes in the workspace tests
REGION_PIXELS = 64  # -> 48 regions per scene


@pytest.fixture(scope="module")
def scene_image(tmp_path_factory) -> np.ndarray:
    """One 96x128 synthetic scene, (H, W, 3) uint8 RGB."""
    spec = make_scenes(tmp_path_factory.mktemp("one") / "scenes", n_train=1, n_val=1)
    return read_image(spec.samples("train")[0].image)


def _workspace(tmp_path: Path, n_train: int = 6, **superpixels) -> Workspace:
    """A fresh workspace over its own scenes (tests edit the images)."""
    root = make_scenes(tmp_path / "scenes", n_train=n_train, n_val=1, height=H, width=W).root
    sp = {"region_pixels": REGION_PIXELS, "workers": 1, **superpixels}
    config = make_config(overrides={"data": {"root": str(root), "dataset": "folder"}, "superpixels": sp})
    return Workspace.create(tmp_path / "ws", config)


def _npz_mtimes(ws: Workspace) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in ws.superpixel_dir.glob("*.npz")}


def _edit_image(path: Path) -> None:
    """Change one pixel of a PNG (new bytes, same size)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    image[0, 0] = 255 - image[0, 0]
    assert cv2.imwrite(str(path), image)


# --- one image ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_ids_are_contiguous_uint16(scene_image, method) -> None:
    labels = compute_superpixels(scene_image, method=method, region_pixels=64)
    assert labels.dtype == np.uint16 and labels.shape == scene_image.shape[:2]
    n = int(labels.max()) + 1
    np.testing.assert_array_equal(np.unique(labels), np.arange(n))


def test_slic_region_count_near_target(scene_image) -> None:
    target = 96 * 128 // 64
    n = int(compute_superpixels(scene_image, "slic", region_pixels=64).max()) + 1
    assert 0.8 * target <= n <= 1.05 * target, (n, target)


def test_seeds_region_count_is_the_reachable_grid_nearest_target(scene_image) -> None:
    # SEEDS only reaches grid counts: 192 is one of them at 96x128 with 4 levels.
    n = int(compute_superpixels(scene_image, "seeds", region_pixels=64, seeds_levels=4).max()) + 1
    assert 0.8 * 192 <= n <= 192
    # On CamVid frames 432 regions are out of reach with 4 levels (300 or 660); the nearest
    # in ratio is asked for, not the 300 that asking for 432 itself happens to give.
    assert seeds_grid(360, 480, seeds_request(360, 480, 432, 4), 4) == 300
    assert seeds_grid(360, 480, seeds_request(360, 480, 432, 3), 3) == 432


def test_seeds_grid_matches_opencv() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(8, 600, size=2))
        levels = int(rng.integers(1, 6))
        n = int(rng.integers(1, min(h * w, 4000) + 1))
        expected = seeds_grid(h, w, n, levels)
        if expected == 0:  # would crash OpenCV; covered by the subprocess test below
            continue
        seeds = cv2.ximgproc.createSuperpixelSEEDS(w, h, 3, n, levels, 2, 5, False)
        assert seeds.getNumberOfSuperpixels() == expected, (h, w, n, levels)
        checked += 1
    assert checked > 200


def test_seeds_on_tiny_and_thin_images_errors_instead_of_crashing() -> None:
    # These shapes segfault inside OpenCV when passed through; run in a child process so a
    # regression fails this test instead of killing the test run.
    code = (
        "import numpy as np\n"
        "from gpual.superpixels import compute_superpixels\n"
        "from gpual.errors import GpualError\n"
        "rng = np.random.default_rng(0)\n"
        "for h, w, levels, rp in [(5, 40, 4, 20), (7, 3, 4, 127), (8, 1, 3, 8), (54, 5, 2, 5), (58, 28, 4, 1)]:\n"
        "    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)\n"
        "    try:\n"
        "        labels = compute_superpixels(image, 'seeds', rp, seeds_levels=levels)\n"
        "        assert labels.max() + 1 == len(np.unique(labels))\n"
        "    except GpualError as exc:\n"
        "        assert 'slic' in str(exc)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_slic_ids_beyond_int16_stay_distinct() -> None:
    # fast-slic returns int16: ids above 32767 come back negative and must not merge.
    yy, xx = np.mgrid[0:400, 0:400]
    image = np.stack([yy % 256, xx % 256, (yy * xx) % 256], axis=-1).astype(np.uint8)
    labels = compute_superpixels(image, "slic", region_pixels=3)
    n = int(labels.max()) + 1
    assert n > 40000
    raw = fast_slic.Slic(num_components=53333, compactness=10.0).iterate(image)  # int16, the library's own ids
    assert raw.min() < 0  # the wrap-around really happens here
    pairs = np.unique(raw.astype(np.int64) * 65536 + labels, return_counts=False)
    assert len(pairs) == len(np.unique(raw)) == n  # one of our ids per library id, none merged


def test_bad_inputs_raise_gpual_errors(scene_image) -> None:
    with pytest.raises(GpualError) as info:
        compute_superpixels(scene_image, method="quickshift")
    assert info.value.exit_code == 2
    with pytest.raises(GpualError, match="raise region_pixels"):
        compute_superpixels(np.zeros((300, 300, 3), np.uint8), "slic", region_pixels=1)
    with pytest.raises(GpualError, match=r"\(H, W, 3\) uint8"):
        compute_superpixels(scene_image[..., 0], "slic")


def test_relabel_closes_gaps_and_keeps_order() -> None:
    from gpual.superpixels import _relabel_contiguous

    labels = np.array([[7, 7, 2], [40000, 2, 9]], dtype=np.int32)
    out = _relabel_contiguous(labels)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[1, 1, 0], [3, 0, 2]])  # 2, 7, 9, 40000 -> 0, 1, 2, 3


def test_region_pixel_counts() -> None:
    labels = np.array([[0, 0, 1], [2, 2, 2]], dtype=np.uint16)
    counts = region_pixel_counts(labels, 4)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])


def test_cache_key_depends_on_content_and_params_only() -> None:
    params = {"method": "slic", "region_pixels": 400, "scale": 1.0}
    assert cache_key("abc", params) == cache_key("abc", dict(reversed(list(params.items()))))
    assert cache_key("abc", params) != cache_key("abd", params)
    assert cache_key("abc", params) != cache_key("abc", {**params, "region_pixels": 401})


# --- the cache ----------------------------------------------------------------------------


def test_build_writes_index_with_cumulative_offsets(tmp_path) -> None:
    ws = _workspace(tmp_path)
    calls: list[tuple[int, int]] = []
    summary = build_cache(ws, progress=lambda done, total: calls.append((done, total)))
    assert (summary.images, summary.computed, summary.skipped, summary.method) == (6, 6, 0, "slic")
    assert calls[-1] == (6, 6)
    index = read_index(ws)
    assert list(index["image"]) == sorted(index["image"])
    n = index["n_regions"].to_numpy()
    np.testing.assert_array_equal(index["offset"].to_numpy(), np.concatenate([[0], np.cumsum(n)[:-1]]))
    assert (index["pixels"] == H * W).all() and (index["height"] == H).all() and (index["width"] == W).all()
    assert index["n_regions"].dtype == np.int32 and index["offset"].dtype == np.int64
    assert summary.regions_min == n.min() and summary.regions_max == n.max()
    assert 0.6 * H * W / REGION_PIXELS <= summary.regions_mean <= 1.05 * H * W / REGION_PIXELS
    pixels = read_region_pixels(ws, index)
    assert pixels.dtype == np.int64 and len(pixels) == n.sum()
    for row in index.itertuples():
        labels = load_superpixels(ws, row.image, index)
        assert labels.max() + 1 == row.n_regions
        np.testing.assert_array_equal(pixels[row.offset : row.offset + row.n_regions], np.bincount(labels.ravel()))


def test_missing_region_table_says_what_to_run_and_a_warm_rebuild_restores_it(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    index = read_index(ws)
    expected = read_region_pixels(ws, index)
    (ws.superpixel_dir / "regions.parquet").unlink()
    with pytest.raises(GpualError, match=f"gpual superpixels {ws.root}"):
        read_region_pixels(ws, index)
    before = _npz_mtimes(ws)
    assert build_cache(ws).computed == 0
    assert _npz_mtimes(ws) == before
    np.testing.assert_array_equal(read_region_pixels(ws, index), expected)
    # A table from another build with the same region total is refused, not misread.
    import pandas as pd

    moved = expected.copy()  # one pixel moved from image 0's first region to image 1's
    moved[0] -= 1
    moved[int(index["offset"].iloc[1])] += 1
    pd.DataFrame({"pixels": moved.astype(np.int32)}).to_parquet(ws.superpixel_dir / "regions.parquet")
    with pytest.raises(GpualError, match="does not match the index's image sizes"):
        read_region_pixels(ws, index)


def test_second_build_recomputes_nothing(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    before = _npz_mtimes(ws)
    index_path = ws.superpixel_dir / "index.parquet"
    index_mtime = index_path.stat().st_mtime_ns
    summary = build_cache(ws)
    assert summary.computed == 0 and summary.skipped == 6
    assert _npz_mtimes(ws) == before
    assert index_path.stat().st_mtime_ns == index_mtime  # nothing changed, nothing written


def test_changed_image_bytes_recompute_only_that_image(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    before = _npz_mtimes(ws)
    index = read_index(ws)
    edited = index.iloc[2]
    _edit_image(Path(edited["path"]))
    summary = build_cache(ws)
    assert summary.computed == 1 and summary.skipped == 5
    after = _npz_mtimes(ws)
    assert edited["file"] not in after  # the stale map is gone
    unchanged = {k: v for k, v in before.items() if k != edited["file"]}
    assert {k: after[k] for k in unchanged} == unchanged
    new_file = read_index(ws).iloc[2]["file"]
    assert new_file != edited["file"] and new_file in after


def test_changed_parameter_recomputes_all_and_removes_old_files(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    before = set(_npz_mtimes(ws))
    ws.config.superpixels.region_pixels = 32
    summary = build_cache(ws)
    assert summary.computed == 6
    after = set(_npz_mtimes(ws))
    assert len(after) == 6 and not (before & after)
    assert summary.regions_mean > 1.5 * H * W / 64


def test_method_argument_overrides_config_without_changing_it(tmp_path) -> None:
    ws = _workspace(tmp_path)
    summary = build_cache(ws, method="seeds")
    assert summary.method == "seeds" and ws.config.superpixels.method == "slic"
    assert "method = \"slic\"" in (ws.root / "gpual.toml").read_text()
    with pytest.raises(GpualError) as info:
        build_cache(ws, method="watershed")
    assert info.value.exit_code == 2


def test_parallel_build_matches_in_process_compute(tmp_path) -> None:
    ws = _workspace(tmp_path, workers=2)
    assert build_cache(ws).computed == 6
    index = read_index(ws)
    for row in index.itertuples():
        expected = compute_superpixels(read_image(Path(row.path)), "slic", REGION_PIXELS)
        np.testing.assert_array_equal(load_superpixels(ws, row.image, index), expected)


def test_load_superpixels_reads_only_its_file(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    index = read_index(ws)
    for name in index["file"][1:]:
        (ws.superpixel_dir / name).unlink()
    labels = load_superpixels(ws, index["image"][0])
    assert labels.shape == (H, W) and labels.dtype == np.uint16
    with pytest.raises(GpualError, match="gpual superpixels"):
        load_superpixels(ws, index["image"][1], index)
    with pytest.raises(GpualError, match="not in"):
        load_superpixels(ws, "no-such-image", index)


def test_corrupt_file_errors_and_rebuild_repairs_it(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    index = read_index(ws)
    path = ws.superpixel_dir / index["file"][3]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(GpualError, match=f"gpual superpixels {ws.root}"):
        load_superpixels(ws, index["image"][3], index)
    assert build_cache(ws).computed == 1
    assert load_superpixels(ws, index["image"][3]).shape == (H, W)


def test_missing_index_says_what_to_run(tmp_path) -> None:
    ws = _workspace(tmp_path)
    with pytest.raises(GpualError, match=f"gpual superpixels {ws.root}"):
        read_index(ws)


def test_refuses_to_change_superpixels_once_rounds_exist(tmp_path) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    ws.round_dir(0).mkdir(parents=True)
    before = _npz_mtimes(ws)
    index_bytes = (ws.superpixel_dir / "index.parquet").read_bytes()
    assert build_cache(ws).computed == 0  # same settings: allowed
    ws.config.superpixels.region_pixels = 32
    with pytest.raises(GpualError, match="new workspace"):
        build_cache(ws)
    with pytest.raises(GpualError, match="new workspace"):
        build_cache(ws, method="seeds")
    ws.config.superpixels.region_pixels = REGION_PIXELS
    _edit_image(Path(read_index(ws)["path"][0]))
    with pytest.raises(GpualError, match="new workspace"):
        build_cache(ws)
    assert _npz_mtimes(ws) == before
    assert (ws.superpixel_dir / "index.parquet").read_bytes() == index_bytes


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_build_keeps_previous_index(tmp_path, workers) -> None:
    ws = _workspace(tmp_path, workers=workers)
    build_cache(ws)
    index_path = ws.superpixel_dir / "index.parquet"
    index_bytes = index_path.read_bytes()
    old_files = set(_npz_mtimes(ws))
    bad = Path(read_index(ws)["path"][3])
    bad.write_bytes(b"not a png at all")
    ws.config.superpixels.region_pixels = 32  # every image is recomputed, the 4th fails
    with pytest.raises(GpualError, match=bad.name):
        build_cache(ws)
    assert index_path.read_bytes() == index_bytes
    assert old_files <= set(_npz_mtimes(ws))
    ws.config.superpixels.region_pixels = REGION_PIXELS
    assert load_superpixels(ws, read_index(ws)["image"][0]).shape == (H, W)


# --- the command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_app():
    from cli import main as cli_main

    cli_main._register_all()
    cli_main._register_all()  # a second call must not register the command twice
    assert sum(c.name == "superpixels" for c in cli_main.app.registered_commands) == 1
    return cli_main.app


def test_cli_superpixels_with_method_seeds(tmp_path, cli_app) -> None:
    ws = _workspace(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["superpixels", str(ws.root), "--method", "seeds", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "computed" in result.output and "seeds" in result.output
    assert Workspace.open(ws.root).config.superpixels.method == "seeds"
    assert len(read_index(ws)) == 6

    result = runner.invoke(cli_app, ["superpixels", str(ws.root), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert build_cache(Workspace.open(ws.root)).computed == 0  # the cache is the seeds one

    help_text = runner.invoke(cli_app, ["superpixels", "--help"]).output
    assert "Reads" in help_text and "writes" in help_text


def test_cli_failure_leaves_config_unchanged(tmp_path, cli_app) -> None:
    ws = _workspace(tmp_path)
    build_cache(ws)
    ws.round_dir(0).mkdir(parents=True)
    config_bytes = (ws.root / "gpual.toml").read_bytes()
    runner = CliRunner()
    result = runner.invoke(cli_app, ["superpixels", str(ws.root), "--region-pixels", "32"])
    assert isinstance(result.exception, GpualError) and "new workspace" in str(result.exception)
    result = runner.invoke(cli_app, ["superpixels", str(ws.root), "--method", "felzenszwalb"])
    assert isinstance(result.exception, GpualError) and result.exception.exit_code == 2
    assert (ws.root / "gpual.toml").read_bytes() == config_bytes


def test_cli_main_entry_point_one_line_error(tmp_path, capsys) -> None:
    from cli_runner import run_cli

    ws = _workspace(tmp_path)
    result = run_cli(capsys, "superpixels", ws.root, "--method", "felzenszwalb")
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "slic, seeds" in lines[0]
