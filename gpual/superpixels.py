"""The superpixel stage: one region map per pool image, computed once and cached.

This is the only stage that runs on the CPU by design: fast-slic and OpenCV's SEEDS
are CPU libraries, and the maps are computed once per workspace, in parallel over
images (one process per worker).

Cache layout (``WORKSPACE/superpixels/``, see :mod:`gpual.workspace`)::

    index.parquet            one row per pool image, in pool order (sorted by id)
    <id>-<key[:16]>.npz      labels: (H, W) uint16 region ids 0..n-1 at the working scale

``key`` hashes the image file's bytes and every parameter that changes the result, so an
edited image or a changed parameter recomputes exactly the maps it affects. Global
region ids (used by acquisition and labeling) are ``offset + local id``, with ``offset``
the cumulative region count of the images before it in index order.

The index also records each image file's ``size``, ``mtime_ns`` and ``digest`` (sha256 of
its bytes) as they were when its map was computed, so the commands that read maps notice
an image replaced since then (:func:`check_images_unchanged`, and :func:`load_superpixels`
for each map it loads): one ``stat`` per image while size and mtime match, the content
hash only where they differ, and only a differing hash is a changed image. Indexes
written before these columns are read as well (every check then hashes the image).

New maps are written into ``.partial/`` and moved beside the index only once every map
is computed, so a failed run leaves the cache as it was; a killed or interrupted run
leaves them there and the next run reuses them.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from gpual import atomic
from gpual.atomic import atomic_path
from gpual.config import SUPERPIXEL_METHODS
from gpual.datasets import open_dataset, read_image
from gpual.errors import GpualError

if TYPE_CHECKING:  # the workspace reads the index through this module: no import back
    from gpual.workspace import Workspace

INDEX_NAME = "index.parquet"
# Pixels per region, one row per region of the pool in global id order (column "pixels"):
# acquisition needs them for every candidate, without decompressing every map.
REGIONS_NAME = "regions.parquet"
# Bumped when the way a map is computed changes, so old caches are recomputed.
CACHE_VERSION = 1
# Region ids are stored as uint16; fast-slic itself refuses more than 65534 components.
MAX_REGIONS = 65534
INDEX_COLUMNS = {
    "image": str,
    "path": str,
    "key": str,
    "file": str,
    "n_regions": "int32",
    "height": "int32",
    "width": "int32",
    "pixels": "int64",
    "offset": "int64",
}
# The image file as its map was computed (indexes from before them lack these columns).
FILE_COLUMNS = {"size": "int64", "mtime_ns": "int64", "digest": str}
# SEEDS settings the brief fixes (OpenCV's defaults except the shape prior).
SEEDS_PRIOR = 2
SEEDS_HISTOGRAM_BINS = 5


@dataclass(frozen=True)
class SuperpixelSummary:
    """What one :func:`build_cache` call did; ``seconds`` is wall time."""

    images: int
    computed: int
    skipped: int
    regions_mean: float
    regions_min: int
    regions_max: int
    seconds: float
    method: str


# ---------------------------------------------------------------------------------------
# One image


def target_regions(height: int, width: int, region_pixels: int) -> int:
    """The regions an image of ``height`` x ``width`` pixels is cut into: about one per
    ``region_pixels`` pixels, never more than its pixels (fast-slic dies with SIGFPE beyond)."""
    return min(height * width, max(1, round(height * width / region_pixels)))


def compute_superpixels(
    image: np.ndarray,
    method: str = "slic",
    region_pixels: int = 400,
    compactness: float = 10.0,
    seeds_levels: int = 3,
    seeds_iterations: int = 4,
    *,
    threads: int = -1,
) -> np.ndarray:
    """Superpixels of one image: (H, W, 3) uint8 RGB host array -> (H, W) uint16 region ids.

    Ids are contiguous, 0..n-1, with n close to ``H*W / region_pixels`` (SLIC hits it
    within a few regions; SEEDS only allows a grid of block sizes, so n is the count it
    can reach nearest to the target). ``threads`` is fast-slic's OpenMP thread count
    (-1 = all cores); it does not change the result.
    """
    if method not in SUPERPIXEL_METHODS:
        raise GpualError(f"unknown superpixel method {method!r}: use one of {', '.join(SUPERPIXEL_METHODS)}", 2)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise GpualError(f"superpixels need an (H, W, 3) uint8 RGB image, got {got}: read it with gpual.datasets.read_image")
    if region_pixels < 1:
        raise GpualError(f"superpixels.region_pixels = {region_pixels} must be at least 1: fix it in gpual.toml", 2)
    h, w = image.shape[:2]
    target = target_regions(h, w, region_pixels)
    if target > MAX_REGIONS:
        raise GpualError(
            f"a {w}x{h} image with superpixels.region_pixels = {region_pixels} needs {target} regions, more than the "
            f"{MAX_REGIONS} a uint16 map holds: raise region_pixels to at least {math.ceil(h * w / MAX_REGIONS)}"
        )
    image = np.ascontiguousarray(image)
    if method == "slic":
        labels = _slic(image, target, compactness, threads)
    else:
        labels = _seeds(image, target, seeds_levels, seeds_iterations)
    return _relabel_contiguous(labels)


def _slic(image: np.ndarray, n_regions: int, compactness: float, threads: int) -> np.ndarray:
    """fast-slic on RGB (it converts to CIELAB itself: ``convert_to_lab=True``) -> (H, W) uint16."""
    slic_class = _slic_class()
    slic = slic_class(num_components=n_regions, compactness=compactness, num_threads=threads)
    # fast-slic returns int16: ids above 32767 wrap to negative values; as uint16 they are right.
    return slic.iterate(image).view(np.uint16)


@lru_cache(maxsize=1)
def _slic_class() -> type:
    """fast-slic's AVX2 kernel where the CPU and the build support it, else the portable one."""
    try:
        from fast_slic.avx2 import SlicAvx2  # raises ImportError without AVX2 support

        return SlicAvx2
    except ImportError:
        from fast_slic import Slic

        return Slic


def _seeds(image: np.ndarray, n_regions: int, levels: int, iterations: int) -> np.ndarray:
    """OpenCV SEEDS on the HSV image (as OpenCV's SEEDS sample does) -> (H, W) int32."""
    h, w = image.shape[:2]
    request = seeds_request(h, w, n_regions, levels)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(w, h, 3, request, levels, SEEDS_PRIOR, SEEDS_HISTOGRAM_BINS, False)
    seeds.iterate(cv2.cvtColor(image, cv2.COLOR_RGB2HSV), iterations)
    return seeds.getLabels()


def seeds_grid(height: int, width: int, num_superpixels: int, num_levels: int) -> int:
    """Regions OpenCV's SEEDS starts from for these arguments (0 where it would crash).

    A transcription of ``SuperpixelSEEDSImpl::initialize`` (opencv_contrib ximgproc,
    seeds.cpp), float32 arithmetic included: SEEDS starts from a grid of blocks whose
    side is a multiple of 2**(levels-1) pixels, so only a few region counts are
    reachable. Two grids crash OpenCV (segfaults seen on small and thin images), so they
    count as 0: one that has to fall back to a single block level (the parent tables
    are then never filled in) and one with no row or column of top-level blocks.
    """
    f32 = np.float32
    n = max(num_superpixels, 10)
    levels = max(num_levels, 2)
    n_h = int(np.sqrt(f32(n) * f32(height) / f32(width)))
    n_w = n_h * width // height
    if n_h < 1 or n_w < 1:
        return 0
    levels += 1
    while True:
        levels -= 1
        if levels < 2:
            return 0
        wf = f32(width) / f32(n_w) / f32(1 << (levels - 1))
        hf = f32(height) / f32(n_h) / f32(1 << (levels - 1))
        if wf >= 1 and hf >= 1:
            break
    top_w = (width // math.ceil(wf)) >> (levels - 1)
    top_h = (height // math.ceil(hf)) >> (levels - 1)
    return top_w * top_h


@lru_cache(maxsize=256)
def seeds_request(height: int, width: int, target: int, levels: int) -> int:
    """The ``num_superpixels`` to ask SEEDS for so that its grid is nearest ``target`` regions.

    Asking for ``target`` itself can land far off (432 asked on 360x480 with 4 levels gives
    300); this tries requests from target/4 to 4*target and keeps the one whose grid count
    is nearest in ratio (ties: the request nearest ``target``).
    """
    candidates = {min(height * width, max(1, round(target * 2 ** (k / 16)))) for k in range(-32, 33)}
    best: tuple[float, float, int] | None = None
    for request in candidates:
        count = seeds_grid(height, width, request, levels)
        if count < 1:
            continue
        score = (abs(math.log(count / target)), abs(math.log(request / target)), request)
        best = score if best is None or score < best else best
    if best is None:
        raise GpualError(
            f"a {width}x{height} image is too small for SEEDS with {levels} levels and about {target} region(s): "
            "lower superpixels.region_pixels, or use superpixels.method = \"slic\""
        )
    return best[2]


def _relabel_contiguous(labels: np.ndarray) -> np.ndarray:
    """(H, W) non-negative ints with gaps (ids that vanished) -> (H, W) uint16 ids 0..n-1, order kept."""
    present = np.bincount(labels.ravel()) > 0
    n = int(present.sum())
    if n > MAX_REGIONS + 1:
        h, w = labels.shape
        raise GpualError(
            f"{n} superpixels on a {w}x{h} image do not fit a uint16 map: raise superpixels.region_pixels"
        )
    if n == present.size:
        return labels.astype(np.uint16, copy=False)
    lut = (np.cumsum(present) - 1).astype(np.uint16)
    return lut[labels]


def region_pixel_counts(superpixels: np.ndarray, n_regions: int) -> np.ndarray:
    """(H, W) uint16 region ids of one image -> (n_regions,) int64 pixels per region (host NumPy)."""
    counts = np.bincount(superpixels.ravel(), minlength=n_regions)
    if counts.size > n_regions:
        raise ValueError(f"superpixel ids reach {counts.size - 1}, beyond n_regions = {n_regions}")
    return counts.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------
# Cache keys


def cache_key(image_bytes_digest: str, params: dict[str, Any]) -> str:
    """sha256 hex of an image's content digest and the canonical JSON of ``params``."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{image_bytes_digest}\n{canonical}".encode()).hexdigest()


def result_params(ws: Workspace, method: str | None = None) -> dict[str, Any]:
    """The parameters that change a map: the method's own, the working scale and the cache version.

    A SLIC cache does not depend on the SEEDS settings and vice versa, so changing one
    method's settings does not invalidate the other's maps.
    """
    cfg = ws.config.superpixels
    method = method or cfg.method
    if method not in SUPERPIXEL_METHODS:
        raise GpualError(f"unknown superpixel method {method!r}: use one of {', '.join(SUPERPIXEL_METHODS)}", 2)
    params: dict[str, Any] = {
        "version": CACHE_VERSION,
        "method": method,
        "region_pixels": int(cfg.region_pixels),
        "scale": float(ws.config.data.scale),
    }
    if method == "slic":
        params["compactness"] = float(cfg.compactness)
    else:
        params["seeds_levels"] = int(cfg.seeds_levels)
        params["seeds_iterations"] = int(cfg.seeds_iterations)
    return params


def file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes (GpualError if it cannot be read)."""
    return file_identity(path)[2]


def file_identity(path: Path | str) -> tuple[int, int, str]:
    """(size in bytes, mtime in ns, sha256 hex of the bytes) of a file, the stat taken
    before the bytes are read (an edit meanwhile then shows as a changed mtime later).
    GpualError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise GpualError(f"cannot read image {path}: {exc.strerror or exc}; check that it exists and is readable") from None
    _VERIFIED[(str(path), st.st_size, st.st_mtime_ns)] = digest
    return st.st_size, st.st_mtime_ns, digest


# (path, size, mtime_ns) -> sha256 of the bytes, for files hashed by this process: an
# image whose mtime changed but not its bytes (touched, copied) is hashed once per process.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _cache_file_name(image_id: str, key: str) -> str:
    # Cityscapes ids hold a '/'; keep file names flat and portable.
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)}-{key[:16]}.npz"


# ---------------------------------------------------------------------------------------
# The cache


def build_cache(
    ws: Workspace,
    workers: int | None = None,
    method: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SuperpixelSummary:
    """Compute (or reuse) the superpixels of every pool image and write the index.

    Reads the pool split's images; computes the maps of images whose key changed into
    ``superpixels/.partial/``, then, once every map is computed, moves them beside the
    index and replaces ``superpixels/regions.parquet`` (pixels per region) and
    ``superpixels/index.parquet`` (each atomically; the index last), then removes maps no
    longer referenced. An error part-way (an unreadable image, a full disk) leaves the
    workspace as it was: the maps it computed are deleted. An interrupt (Ctrl-C) or a kill
    leaves them in ``.partial/`` for the next run to reuse. ``method``
    overrides ``superpixels.method`` without changing the config; ``workers`` (default
    ``superpixels.workers``) processes compute in parallel, 1 = in this process.
    ``progress(done, total)`` is called in this process as images finish.

    Refuses (GpualError) to change any image's map once the workspace has rounds: the
    labeled region ids would no longer point at the same pixels.
    """
    start = time.perf_counter()
    params = result_params(ws, method)
    workers = ws.config.superpixels.workers if workers is None else workers
    if workers < 1:
        raise GpualError(f"--workers {workers} must be at least 1", 2)
    data = ws.config.data
    pool = open_dataset(data.dataset, data.root).samples(data.pool_split)
    identities = [file_identity(s.image) for s in pool]
    keys = [cache_key(digest, params) for _, _, digest in identities]
    files = [_cache_file_name(s.id, k) for s, k in zip(pool, keys)]
    old = _read_index_or_none(ws)
    _refuse_change_after_rounds(ws, old, [s.id for s in pool], keys)

    meta, todo, staged = _reusable_maps(ws, old, [s.id for s in pool], keys, files)
    staging = ws.superpixel_staging_dir
    made = [folder for folder in (ws.superpixel_dir, staging) if not folder.exists()]  # removed again on an error
    tasks = [(str(pool[i].image), str(staging / files[i]), params) for i in todo]
    try:
        meta.update(_compute_maps(todo, tasks, workers, staging, len(pool), progress))
    except Exception:
        _discard_staged(staging, [files[i] for i in todo], made)
        raise
    staged.update(files[i] for i in todo)

    index, region_pixels = _index_table(pool, keys, files, identities, meta)
    try:
        _commit(ws, old, index, region_pixels, staged)
    except Exception:
        _discard_staged(staging, [files[i] for i in todo], made)
        raise
    shutil.rmtree(staging, ignore_errors=True)  # maps of an interrupted run no longer wanted
    _remove_unreferenced(ws.superpixel_dir, set(files))
    n_regions = index["n_regions"].to_numpy(np.int64)
    total = len(pool)
    return SuperpixelSummary(
        images=total,
        computed=len(todo),
        skipped=total - len(todo),
        regions_mean=float(n_regions.mean()) if total else 0.0,
        regions_min=int(n_regions.min()) if total else 0,
        regions_max=int(n_regions.max()) if total else 0,
        seconds=time.perf_counter() - start,
        method=params["method"],
    )


def _reusable_maps(ws: Workspace, old: pd.DataFrame | None, ids: list[str], keys: list[str],
                   files: list[str]) -> tuple[dict[int, MapMeta], list[int], set[str]]:
    """(meta of the pool positions whose map can be reused, positions still to compute,
    reused maps waiting in staging/).

    A map is reused when the index names it with the same key, or when a file named by
    the key lies beside the index (from an older gpual) or in staging/ (from an
    interrupted run): writes are atomic, so such a file is whole.
    """
    old_rows = {} if old is None else {row.image: row for row in old.itertuples(index=False)}
    staging = ws.superpixel_staging_dir
    meta: dict[int, MapMeta] = {}  # pool position -> (n_regions, height, width, pixels per region)
    todo: list[int] = []
    staged: set[str] = set()
    for i, (image_id, key, name) in enumerate(zip(ids, keys, files)):
        row = old_rows.get(image_id)
        expected = (int(row.height), int(row.width), int(row.n_regions)) if row is not None and row.key == key else None
        found = _cached_meta(ws.superpixel_dir / name, expected)
        if found is None:
            found = _cached_meta(staging / name, None)
            if found is not None:
                staged.add(name)
        if found is None:
            todo.append(i)
        else:
            meta[i] = found
    return meta, todo, staged


def _compute_maps(todo: list[int], tasks: list[tuple[str, str, dict[str, Any]]], workers: int, staging: Path,
                  total: int, progress: Callable[[int, int], None] | None) -> dict[int, MapMeta]:
    """Compute the maps of pool positions ``todo`` into ``staging`` (in this process or in
    ``workers`` spawned processes); their meta by position. The first failure cancels the
    rest and is raised."""
    done = total - len(todo)
    if progress:
        progress(done, total)
    if not todo:
        return {}
    staging.mkdir(parents=True, exist_ok=True)
    meta: dict[int, MapMeta] = {}
    in_process = workers == 1 or len(todo) <= 1  # a process pool costs about a second to start
    # One OpenMP thread per worker process (they already fill the cores); all cores in-process.
    threads = -1 if in_process else 1
    if in_process:
        for i, task in zip(todo, tasks):
            meta[i] = _compute_and_save((*task, threads))
            done += 1
            if progress:
                progress(done, total)
        return meta
    # spawn, not fork: GNU OpenMP (libgomp, under fast-slic) and torch's thread pools
    # can hang in a forked child of a process that already started them.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool_exec:
        futures: dict[Future, int] = {pool_exec.submit(_compute_and_save, (*t, threads)): i for i, t in zip(todo, tasks)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                meta[futures[future]] = future.result()
                done += 1
                if progress:
                    progress(done, total)
        # (leaving the with-block waits for the workers still running: nothing writes after it)
    return meta


def _index_table(pool: list[Any], keys: list[str], files: list[str], identities: list[tuple[int, int, str]],
                 meta: dict[int, MapMeta]) -> tuple[pd.DataFrame, np.ndarray]:
    """(the index: one row per pool image with INDEX_COLUMNS, (R,) int64 pixels per region
    in global id order)."""
    total = len(pool)
    n_regions = np.array([meta[i][0] for i in range(total)], dtype=np.int64)
    region_pixels = np.concatenate([meta[i][3] for i in range(total)]) if total else np.zeros(0, np.int64)
    heights = np.array([meta[i][1] for i in range(total)], dtype=np.int64)
    widths = np.array([meta[i][2] for i in range(total)], dtype=np.int64)
    index = pd.DataFrame(
        {
            "image": [s.id for s in pool],
            "path": [str(s.image) for s in pool],
            "key": keys,
            "file": files,
            "n_regions": n_regions.astype(np.int32),
            "height": heights.astype(np.int32),
            "width": widths.astype(np.int32),
            "pixels": heights * widths,
            "offset": np.concatenate([[0], np.cumsum(n_regions)[:-1]]).astype(np.int64),
            "size": np.array([size for size, _, _ in identities], dtype=np.int64),
            "mtime_ns": np.array([mtime for _, mtime, _ in identities], dtype=np.int64),
            "digest": [digest for _, _, digest in identities],
        }
    )
    return index, region_pixels


def _commit(ws: Workspace, old: pd.DataFrame | None, index: pd.DataFrame, region_pixels: np.ndarray,
            staged: set[str]) -> None:
    """Write the tables that changed, then move the staged maps beside them.

    Both tables are written out before any map moves in, so a full disk fails with the
    cache as it was; the index's temporary is replaced last (an ExitStack unwinds in
    reverse), so the index is the commit.
    """
    stored = _read_regions_or_none(ws)
    writes = []
    if old is None or not _same_table(old, index):
        writes.append((ws.superpixel_dir / INDEX_NAME, index))
    if stored is None or not np.array_equal(stored, region_pixels):
        writes.append((ws.superpixel_dir / REGIONS_NAME, pd.DataFrame({"pixels": region_pixels.astype(np.int32)})))
    staging = ws.superpixel_staging_dir
    with ExitStack() as stack:
        for path, frame in writes:
            frame.to_parquet(stack.enter_context(atomic_path(path)), index=False)
        ws.superpixel_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(staged):  # renames: no space needed
            os.replace(staging / name, ws.superpixel_dir / name)


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Same columns and values (dtypes aside: parquet may read strings back as another dtype)."""
    return list(a.columns) == list(b.columns) and len(a) == len(b) and all(
        a[c].tolist() == b[c].tolist() for c in a.columns
    )


# (n_regions, height, width, (n_regions,) int64 pixels per region) of one cached map.
MapMeta = tuple[int, int, int, np.ndarray]


def _compute_and_save(task: tuple[str, str, dict[str, Any], int]) -> MapMeta:
    """Worker: read one image at the working scale, compute, save; -> its :data:`MapMeta`."""
    image_path, out_path, params, threads = task
    if threads == 1:
        cv2.setNumThreads(1)  # a worker process: one per core already
    image = read_image(Path(image_path), params["scale"])
    labels = compute_superpixels(
        image,
        method=params["method"],
        region_pixels=params["region_pixels"],
        compactness=params.get("compactness", 10.0),
        seeds_levels=params.get("seeds_levels", 4),
        seeds_iterations=params.get("seeds_iterations", 4),
        threads=threads,
    )
    with atomic_path(Path(out_path)) as tmp:
        np.savez_compressed(tmp, labels=labels)
    n = int(labels.max()) + 1
    return n, labels.shape[0], labels.shape[1], region_pixel_counts(labels, n)


def _cached_meta(path: Path, expected: tuple[int, int, int] | None) -> MapMeta | None:
    """The :data:`MapMeta` of a cached map that loads whole and, if given, matches
    ``expected`` = (height, width, n_regions) from the index; None if it must be recomputed."""
    if not path.exists():
        return None
    try:
        labels = _load_labels(path)
    except GpualError:
        return None
    n = int(labels.max()) + 1 if labels.size else 0
    if expected is not None and expected != (labels.shape[0], labels.shape[1], n):
        return None
    return n, labels.shape[0], labels.shape[1], region_pixel_counts(labels, n)


def _load_labels(path: Path) -> np.ndarray:
    """The (H, W) uint16 map stored in ``path`` (GpualError if missing or damaged)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive["labels"]
    except Exception as exc:  # zipfile, zlib, KeyError and ValueError all mean a damaged file
        raise GpualError(f"superpixel file {path} is missing or corrupt ({type(exc).__name__})") from None
    if labels.ndim != 2 or labels.dtype != np.uint16:
        raise GpualError(f"superpixel file {path} holds a {labels.dtype} array of shape {labels.shape}, not (H, W) uint16")
    return labels


def _discard_staged(staging: Path, names: list[str], made: list[Path]) -> None:
    """Undo a failed build: delete the maps it wrote into ``staging`` (and temporaries a
    worker left there), and the folders it created when they are empty again."""
    for name in names:
        (staging / name).unlink(missing_ok=True)
    atomic.sweep(staging)
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (maps of an earlier, interrupted run) or already gone
            pass


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete maps not in ``keep`` and temporaries left by killed runs (the caller holds the lock)."""
    for path in folder.glob("*.npz"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    for path in folder.glob(".*.tmp.npz"):
        path.unlink(missing_ok=True)


def _refuse_change_after_rounds(ws: Workspace, old: pd.DataFrame | None, images: list[str], keys: list[str]) -> None:
    rounds = ws.rounds()
    if not rounds:
        return
    advice = f"start a new workspace (`gpual init NEW --data {ws.config.data.root}`) to use other superpixels"
    if old is None:
        raise GpualError(
            f"{ws.root} has rounds ({len(rounds)}) but no superpixel index: the labeled region ids cannot be checked; "
            f"restore {ws.superpixel_dir / INDEX_NAME} or {advice}"
        )
    if list(old["image"]) != images or list(old["key"]) != keys:
        changed = [i for i, (a, b) in enumerate(zip(old["key"], keys)) if a != b]
        what = (
            f"the pool's images changed ({len(old)} indexed, {len(images)} now)"
            if list(old["image"]) != images
            else f"{len(changed)} of {len(keys)} images' superpixels would change (image bytes or superpixel settings)"
        )
        raise GpualError(
            f"{ws.root} already has labeled rounds and {what}: region ids would no longer match the labels; "
            f"undo the change or {advice}"
        )


# ---------------------------------------------------------------------------------------
# Reading the cache


def read_index(ws: Workspace) -> pd.DataFrame:
    """The superpixel index: one row per pool image in pool order (columns of ``INDEX_COLUMNS``).

    ``offset`` is the global id of the image's region 0 (cumulative ``n_regions``);
    ``pixels`` = height * width at the working scale.
    """
    path = ws.superpixel_dir / INDEX_NAME
    if not path.exists():
        raise GpualError(f"{ws.root} has no superpixels yet: run `gpual superpixels {ws.root}`")
    try:
        index = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise GpualError(f"{path} is unreadable ({type(exc).__name__}): run `gpual superpixels {ws.root}` again") from None
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise GpualError(f"{path} lacks column(s) {', '.join(missing)}: run `gpual superpixels {ws.root}` again")
    return index


def read_region_pixels(ws: Workspace, index: pd.DataFrame) -> np.ndarray:
    """(R,) int64 pixels per region of the pool, by global region id (host), from
    ``superpixels/regions.parquet``; R = ``index["n_regions"].sum()``."""
    pixels = _read_regions_or_none(ws)
    rerun = f"run `gpual superpixels {ws.root}` (it reuses the cached maps)"
    if pixels is None:
        raise GpualError(f"{ws.superpixel_dir / REGIONS_NAME} is missing or unreadable: {rerun}")
    n_regions = int(index["n_regions"].sum())
    if len(pixels) != n_regions:
        raise GpualError(f"{ws.superpixel_dir / REGIONS_NAME} has {len(pixels)} regions but the index counts {n_regions}: {rerun}")
    # Each image's regions must cover its pixels (every image has at least one region): a
    # table left from another build with the same region total fails here.
    per_image = np.add.reduceat(pixels, index["offset"].to_numpy(np.int64)) if n_regions else np.zeros(0, np.int64)
    if not np.array_equal(per_image, index["pixels"].to_numpy(np.int64)):
        raise GpualError(f"{ws.superpixel_dir / REGIONS_NAME} does not match the index's image sizes: {rerun}")
    return pixels


def _read_regions_or_none(ws: Workspace) -> np.ndarray | None:
    """(R,) int64 pixels per region, or None where the file is missing or damaged."""
    path = ws.superpixel_dir / REGIONS_NAME
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path, columns=["pixels"])["pixels"].to_numpy(np.int64)
    except Exception:  # pyarrow raises several types for a damaged file; KeyError for a missing column
        return None


def _read_index_or_none(ws: Workspace) -> pd.DataFrame | None:
    """The index, or None where it is missing or damaged (then everything is recomputed)."""
    try:
        return read_index(ws)
    except GpualError:
        return None


def check_images_unchanged(ws: Workspace, index: pd.DataFrame, images: list[str] | None = None) -> None:
    """Refuse (GpualError, exit code 1) when a pool image of ``index`` (those named in
    ``images``; default all) is no longer the file its superpixel map was computed from:
    replaced, edited or gone. One ``stat`` per image where size and mtime are the
    recorded ones; the file is hashed only where they differ (a touched or copied image
    with the same bytes passes, hashed once per process; `gpual superpixels` records the
    new mtime). The error names the image and what to do: `gpual superpixels` while the
    workspace has no round, restoring the image (or a new workspace) once it has."""
    rows = index if images is None else index[index["image"].isin(list(images))]
    for row in rows.to_dict("records"):
        _check_image_unchanged(ws, row)


def _check_image_unchanged(ws: Workspace, row: dict[str, Any]) -> None:
    """:func:`check_images_unchanged` for one index row (a dict or a Series)."""
    image, path = str(row["image"]), str(row["path"])
    try:
        st = os.stat(path)
    except OSError as exc:
        raise GpualError(
            f"pool image {image!r} is not readable at {path} any more ({exc.strerror or exc}): restore it; if the dataset "
            f"moved, set data.root in {ws.root / 'gpual.toml'} and run `gpual superpixels {ws.root}` (unchanged images keep their maps)"
        ) from None
    size, mtime, digest = (row.get(name) for name in FILE_COLUMNS)
    known = isinstance(digest, str) and bool(digest) and not pd.isna(size) and not pd.isna(mtime)
    if known and int(size) == st.st_size and int(mtime) == st.st_mtime_ns:
        return
    current = _VERIFIED.get((path, st.st_size, st.st_mtime_ns))
    if current is None:
        current = file_identity(path)[2]
    if known:
        if current == digest:
            return
        what = f"pool image {image!r} ({path}) changed since its superpixels were computed"
    else:  # an index from before the file columns: the key also holds the settings
        if cache_key(current, result_params(ws)) == str(row["key"]):
            return
        what = (f"pool image {image!r} ({path}) no longer matches its superpixel map (the image, or the superpixel "
                "settings in gpual.toml, changed since `gpual superpixels`)")
    rounds = ws.rounds()
    if not rounds:
        raise GpualError(f"{what}: run `gpual superpixels {ws.root}` to recompute its map, then run this command again")
    raise GpualError(
        f"{what}, and {ws.root} already has rounds whose labels point at the old map's regions: restore the original "
        f"image, or start a new workspace (`gpual init NEW --data {ws.config.data.root}`) to use the new one"
    )


def load_superpixels(ws: Workspace, image_id: str, index: pd.DataFrame | None = None) -> np.ndarray:
    """(H, W) uint16 region ids (0..n_regions-1, host) of pool image ``image_id``; reads only its file.

    Refuses (GpualError) a map whose image changed since it was computed
    (:func:`check_images_unchanged`: one ``stat`` while the image's size and mtime are
    the recorded ones). Pass ``index`` (from :func:`read_index`) when loading many images.
    """
    index = read_index(ws) if index is None else index
    rows = index[index["image"] == image_id]
    if len(rows) == 0:
        raise GpualError(f"image {image_id!r} is not in {ws.root}'s superpixel index: run `gpual superpixels {ws.root}`")
    row = rows.iloc[0]
    _check_image_unchanged(ws, row)
    path = ws.superpixel_dir / str(row["file"])
    rerun = f"run `gpual superpixels {ws.root}` to recompute it"
    try:
        labels = _load_labels(path)
    except GpualError as exc:
        raise GpualError(f"{exc}: {rerun}") from None
    if labels.shape != (int(row["height"]), int(row["width"])) or (labels.size and int(labels.max()) >= int(row["n_regions"])):
        raise GpualError(
            f"superpixel file {path} ({labels.shape[1]}x{labels.shape[0]}) does not match its index entry "
            f"({int(row['width'])}x{int(row['height'])}, {int(row['n_regions'])} regions): {rerun}"
        )
    return labels
