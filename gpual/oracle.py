"""The simulated oracle: it reveals ground truth inside the selected superpixels and
nothing else, and writes it to the label store (:mod:`gpual.label_store`) as one source
of answers among others (a person in ``gpual annotate``, an annotation tool's export).

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
from gpual.label_store import VOID, answers_from_label_map, dominant_class, record_answers
from gpual.workspace import Workspace

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
    if superpixels.size and (int(superpixels.min()) < 0 or int(superpixels.max()) >= n_regions):
        raise ValueError(f"superpixel ids must lie in [0, {n_regions})")
    pixels = np.bincount(superpixels.reshape(-1).astype(np.int64), minlength=n_regions).astype(np.int64)
    dominant = dominant_class(np.where(label == ignore_index, VOID, label), superpixels, n_regions)
    return pixels, dominant.astype(np.int32)


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


def label_round(ws: Workspace, round: int) -> dict:
    """The simulated oracle answers round ``round``'s queried regions that have no answer yet,
    from the pool's ground truth, into the label store (source ``oracle-pixel`` or
    ``oracle-dominant``, after ``acquisition.oracle``).

    Returns the labelling summary (:meth:`Workspace.labeling`). Refuses, writing nothing,
    when the round is not selected, every region already has an answer, the pool has no
    ground truth, or a queried region is already labelled or unknown.
    """
    from gpual.datasets import open_dataset, read_label
    from gpual.superpixels import load_superpixels, read_index

    ws.require(round, "label", "label")
    state = ws.round_state(round)
    if state.labeled:
        raise GpualError(f"round {round} is already labelled ({state.answered:,} regions answered): next run `gpual train {ws.root} --round {round}`")
    query = ws.read_query(round)
    previous = ws.read_labeled(round - 1)
    index = read_index(ws)
    _check_query(ws, round, query, previous, index)
    done = ws.read_answers(round)
    done_keys = set(done["image"].astype(str) + ":" + done["region"].astype(str))
    query = query[~(query["image"].astype(str) + ":" + query["region"].astype(str)).isin(done_keys)]

    mode = ws.config.acquisition.oracle
    if mode not in ORACLES:
        raise GpualError(f"acquisition.oracle = {mode!r} is not one of {', '.join(ORACLES)}: fix it in gpual.toml", 2)
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    samples = {s.id: s for s in spec.samples(ws.config.data.pool_split)}
    answers, maps = [], {}
    for image, group in query.groupby("image", sort=True):
        image = str(image)
        if image not in samples:
            raise GpualError(
                f"queried image {image!r} is not in split '{ws.config.data.pool_split}' of {spec.root}: "
                "the dataset changed since the superpixels were computed; restore it or start a new workspace"
            )
        if samples[image].label is None:
            raise GpualError(
                f"the pool split '{ws.config.data.pool_split}' of {spec.root} has no ground truth for the simulated oracle: "
                f"label round {round} with `gpual annotate {ws.root} --round {round}` or `gpual import`"
            )
        gt = read_label(spec, samples[image].label, ws.config.data.scale)
        sp = maps[image] = load_superpixels(ws, image, index)
        if gt.shape != sp.shape:
            raise GpualError(
                f"label {samples[image].label} is {gt.shape[1]}x{gt.shape[0]} at scale {ws.config.data.scale} but its "
                f"superpixels are {sp.shape[1]}x{sp.shape[0]}: the label file does not match its image; fix or replace it"
            )
        regions = group["region"].to_numpy(np.int64)
        answer = reveal(gt, sp, regions, mode, spec.ignore_index)
        answers.append(answers_from_label_map(image, answer, sp, regions, void_is_answer=True)[0])
    record_answers(ws, round, f"oracle-{mode}", answers, superpixels=maps, num_classes=spec.num_classes)
    return ws.labeling(round)


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
