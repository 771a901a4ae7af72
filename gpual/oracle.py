"""The simulated oracle (METHOD.md, "Oracle and budget"): it reveals ground truth inside
the selected superpixels and nothing else.

- ``pixel`` (the paper's protocol): every pixel of a selected region gets its own
  ground-truth class (void stays void);
- ``dominant``: every pixel of a selected region gets the region's majority non-void
  class (one click per region); a region that is all void stays 255.

Host NumPy work on one image at a time at the working scale: labels are small uint8 maps
read from disk, and the result is a table of a few thousand rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gpual.config import ORACLES
from gpual.errors import GpualError
from gpual.workspace import LABELED_COLUMNS, Workspace

IGNORE_INDEX = 255


def region_stats(label: np.ndarray, superpixels: np.ndarray, n_regions: int,
                 ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Per region of one image: (pixels (n_regions,) int64, dominant class (n_regions,) int32).

    ``label`` (H, W) uint8 ground truth, ``superpixels`` (H, W) integer region ids in
    [0, n_regions). ``pixels`` counts all pixels (void too: the annotator sees them);
    ``dominant`` is the most frequent non-void class (ties: lowest class id), or
    ``ignore_index`` if the region is all void.
    """
    if label.shape != superpixels.shape:
        raise ValueError(f"label {label.shape} and superpixels {superpixels.shape} differ in shape")
    regions = superpixels.reshape(-1).astype(np.int64)
    classes = label.reshape(-1).astype(np.int64)
    if regions.size and (regions.min() < 0 or regions.max() >= n_regions):
        raise ValueError(f"superpixel ids must lie in [0, {n_regions})")
    pixels = np.bincount(regions, minlength=n_regions).astype(np.int64)
    keep = classes != ignore_index
    n_classes = int(classes[keep].max()) + 1 if keep.any() else 1
    # (region, class) histogram in one bincount; argmax takes the first (lowest) class on ties.
    hist = np.bincount(regions[keep] * n_classes + classes[keep], minlength=n_regions * n_classes)
    hist = hist.reshape(n_regions, n_classes)
    dominant = hist.argmax(axis=1).astype(np.int32)
    dominant[hist.sum(axis=1) == 0] = ignore_index
    return pixels, dominant


def reveal(label: np.ndarray, superpixels: np.ndarray, regions: np.ndarray, mode: str = "pixel",
           ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) uint8 sparse label: the oracle's answer inside ``regions``, ``ignore_index`` elsewhere.

    ``label`` (H, W) uint8 ground truth; ``superpixels`` (H, W) uint16 region ids;
    ``regions`` (k,) ids of this image's labeled regions.
    """
    if mode not in ORACLES:
        raise GpualError(f"acquisition.oracle = {mode!r} is not one of {', '.join(ORACLES)}: fix it in gpual.toml", 2)
    if label.shape != superpixels.shape:
        raise ValueError(f"label {label.shape} and superpixels {superpixels.shape} differ in shape")
    regions = np.asarray(regions, dtype=np.int64)
    n_regions = int(max(int(superpixels.max(initial=0)), int(regions.max(initial=0)))) + 1
    selected = np.zeros(n_regions, dtype=bool)
    selected[regions] = True
    inside = selected[superpixels]
    if mode == "pixel":
        answer = label
    else:
        _, dominant = region_stats(label, superpixels, n_regions, ignore_index)
        answer = dominant.astype(np.uint8)[superpixels]
    return np.where(inside, answer, np.uint8(ignore_index)).astype(np.uint8)


def label_round(ws: Workspace, round: int) -> pd.DataFrame:
    """Label round ``round``'s query: write the cumulative ``rounds/NNN/labeled.parquet``.

    Reads the query and the previous round's labeled set, counts the pixels and the
    dominant ground-truth class of every selected region at the working scale, records
    the labeling summary in the round's metrics and returns the cumulative table
    (columns ``workspace.LABELED_COLUMNS``). Refuses, writing nothing, when the round is
    not selected or already labeled, or when a queried region is already labeled or unknown.
    """
    from gpual.datasets import open_dataset, read_label
    from gpual.superpixels import load_superpixels, read_index

    ws.require(round, "label", "label")
    if ws.labeled_path(round).exists():
        raise GpualError(
            f"round {round} is already labeled ({ws.labeled_path(round)}): next run `gpual train {ws.root} --round {round}`"
        )
    query = ws.read_query(round)
    previous = ws.read_labeled(round - 1)
    index = read_index(ws)
    _check_query(ws, round, query, previous, index)

    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    samples = {s.id: s for s in spec.samples(ws.config.data.pool_split)}
    n_regions = dict(zip(index["image"].astype(str), index["n_regions"].astype(int)))
    query = query.reset_index(drop=True)
    pixels_col = np.zeros(len(query), dtype=np.int64)
    dominant_col = np.zeros(len(query), dtype=np.int32)
    for image, group in query.groupby("image", sort=False):
        image = str(image)
        if image not in samples:
            raise GpualError(
                f"queried image {image!r} is not in split '{ws.config.data.pool_split}' of {spec.root}: "
                "the dataset changed since the superpixels were computed; restore it or start a new workspace"
            )
        gt = read_label(spec, samples[image].label, ws.config.data.scale)
        sp = load_superpixels(ws, image, index)
        if gt.shape != sp.shape:
            raise GpualError(
                f"label {samples[image].label} is {gt.shape[1]}x{gt.shape[0]} at scale {ws.config.data.scale} but its "
                f"superpixels are {sp.shape[1]}x{sp.shape[0]}: run `gpual superpixels {ws.root}` again"
            )
        pixels, dominant = region_stats(gt, sp, n_regions[image], spec.ignore_index)
        ids = group["region"].to_numpy(np.int64)
        pixels_col[group.index] = pixels[ids]
        dominant_col[group.index] = dominant[ids]
    new = pd.DataFrame({"image": query["image"].astype(str), "region": query["region"], "round": round,
                        "pixels": pixels_col, "dominant": dominant_col})  # in query order
    table = pd.concat([previous, new], ignore_index=True)
    table = table[list(LABELED_COLUMNS)].astype(LABELED_COLUMNS).reset_index(drop=True)

    pool_pixels = int(index["pixels"].sum())
    labeled_pixels = int(table["pixels"].sum())
    ws.update_metrics(
        round,
        labeling={
            "regions": int(len(table)),
            "pixels": labeled_pixels,
            "labeled_share": labeled_pixels / pool_pixels if pool_pixels else 0.0,
            "new_regions": int(len(query)),
            "new_pixels": int(new["pixels"].sum()),
            "images": int(table["image"].nunique()),
            "all_void_regions": int((table["dominant"] == spec.ignore_index).sum()),
            "oracle": ws.config.acquisition.oracle,
        },
    )
    ws.write_labeled(round, table)  # the step's commit marker: written last, atomically
    return table


def _check_query(ws: Workspace, round: int, query: pd.DataFrame, previous: pd.DataFrame, index: pd.DataFrame) -> None:
    """Refuse duplicate, unknown or already labeled regions in the query."""
    redo = f"run `gpual select {ws.root} --round {round} --force`"
    keys = query[["image", "region"]].astype({"image": str, "region": np.int64})
    dup = keys[keys.duplicated()]
    if len(dup):
        first = dup.iloc[0]
        raise GpualError(f"round {round}'s query lists region {first['region']} of {first['image']} twice: {redo}")
    bounds = keys["image"].map(dict(zip(index["image"].astype(str), index["n_regions"].astype(np.int64))))
    bad = keys[bounds.isna() | (keys["region"] < 0) | (keys["region"] >= bounds.fillna(0))]
    if len(bad):
        first = bad.iloc[0]
        raise GpualError(
            f"round {round}'s query names region {first['region']} of image {first['image']!r}, which the superpixel "
            f"index does not hold: {redo}"
        )
    done = previous[["image", "region"]].astype({"image": str, "region": np.int64})
    both = keys.merge(done, on=["image", "region"], how="inner")
    if len(both):
        first = both.iloc[0]
        raise GpualError(
            f"round {round}'s query selects region {first['region']} of {first['image']}, already labeled before round {round}: {redo}"
        )
