"""The label store: every answer a round's queried regions received, whoever gave it.

Training, the final retraining and the next round's selection read labels from here and
nowhere else (the full-supervision reference alone reads the pool's ground truth). An
answer is one of two kinds:

- ``region``: one class for the whole region (one click, or the oracle's ``dominant``
  mode; 255 = the region is void);
- ``pixels``: a class per pixel inside the region (the brush of a "mixed" region, an
  imported mask, or the oracle's ``pixel`` mode on a region that holds several classes).

Layout, per round (``rounds/NNN/``)::

    answers.parquet       one row per answered region (columns ``ANSWER_COLUMNS``)
    answers/<image>.png   uint8 label map of the image at the working scale, read only
                          inside the regions the table lists as ``pixels`` answers

The table is the commit: a map pixel outside a region it lists counts for nothing, so an
interrupted write loses at most the answers of that write. Every file is written
atomically. Answers may change (the last write per region wins) until the round is
trained; from then on they are what its model learnt from and are refused.

Host NumPy and pandas: answers are a few thousand rows and small uint8 maps.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from gpual import atomic
from gpual.errors import GpualError
from gpual.workspace import ANSWER_COLUMNS, Workspace, empty_table

VOID = 255
MIXED = -1  # in ImageAnswers.classes: the region's classes are in the label map
SOURCES = ("oracle-pixel", "oracle-dominant", "annotator", "label-studio", "cvat", "masks")


@dataclass
class ImageAnswers:
    """Answers for some queried regions of one image.

    ``regions`` (k,) local region ids; ``classes`` (k,) the class of each whole region
    (0..C-1, or 255 = void), or :data:`MIXED` where ``label_map`` ((H, W) uint8 at the
    working scale, 255 = not labelled) holds the region's pixels; ``seconds`` (k,) time an
    annotator spent per region, or None.
    """

    image: str
    regions: np.ndarray
    classes: np.ndarray
    label_map: np.ndarray | None = None
    seconds: np.ndarray | None = None


@dataclass
class RecordSummary:
    """What :func:`record_answers` wrote."""

    regions: int = 0  # answers written (new or replacing an earlier answer)
    replaced: int = 0  # of which replaced an earlier answer of the same region
    images: int = 0
    per_image: dict[str, int] = field(default_factory=dict)


def mask_path(ws: Workspace, round: int, image: str) -> Path:
    """``rounds/NNN/answers/<image>.png``; the id is percent-encoded (Cityscapes ids hold '/')."""
    return ws.answers_dir(round) / f"{quote(image, safe='')}.png"


def check_writable(ws: Workspace, round: int) -> pd.DataFrame:
    """The round's query, if its answers may still change; else a one-line GpualError."""
    if ws.checkpoint_path(round).exists() or ws.resume_path(round).exists():
        raise GpualError(
            f"round {round} is trained (or training) on its labels, which can no longer change: label round {round + 1} "
            f"after `gpual select {ws.root} --round {round + 1}`"
        )
    return ws.read_query(round)


def record_answers(ws: Workspace, round: int, source: str, answers: Iterable[ImageAnswers],
                   superpixels: dict[str, np.ndarray] | None = None, num_classes: int | None = None) -> RecordSummary:
    """Validate ``answers`` and store them as round ``round``'s (the last write per region wins).

    Every region must be in the round's query, every class in ``[0, num_classes)`` or 255;
    a label map must have its image's superpixel size. Nothing is written when any check
    fails (GpualError naming the first bad answer). ``superpixels`` may hold the images'
    maps already loaded. The caller holds the workspace lock (other processes), and callers
    on several threads of one process serialise their calls (the annotator's server does):
    the table is read, merged and rewritten.
    """
    from gpual.datasets import open_dataset
    from gpual.superpixels import load_superpixels, read_index

    if source not in SOURCES:
        raise ValueError(f"unknown answer source {source!r}")
    query = check_writable(ws, round)
    if num_classes is None:
        num_classes = open_dataset(ws.config.data.dataset, ws.config.data.root).num_classes
    queried = {image: set(group.to_numpy(np.int64).tolist()) for image, group in query.groupby("image")["region"]}
    size = dict(zip(query["image"].astype(str) + ":" + query["region"].astype(str), query["pixels"].astype(np.int64)))
    index = read_index(ws)
    superpixels = {} if superpixels is None else superpixels
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    rows, maps, seen = [], {}, set()
    for answer in answers:
        if answer.image in seen:
            raise ValueError(f"{answer.image}: give one ImageAnswers per image and call")
        seen.add(answer.image)
        regions = np.asarray(answer.regions, dtype=np.int64).reshape(-1)
        classes = np.asarray(answer.classes, dtype=np.int64).reshape(-1)
        if regions.size == 0:
            continue
        _check_answer(round, answer, regions, classes, queried, num_classes)
        mixed = classes == MIXED
        labeled = np.where(classes == VOID, 0, [size[f"{answer.image}:{r}"] for r in regions.tolist()]).astype(np.int64)
        if mixed.any():
            sp = superpixels.get(answer.image)
            if sp is None:
                sp = superpixels[answer.image] = load_superpixels(ws, answer.image, index)
            label_map = _check_map(answer, sp, num_classes)
            inside = np.isin(sp, regions[mixed])
            counts = np.bincount(sp[inside & (label_map != VOID)].astype(np.int64), minlength=int(sp.max()) + 1)
            labeled[mixed] = counts[regions[mixed]]
            maps[answer.image] = (sp, regions[mixed], label_map, regions[~mixed])
        seconds = np.full(len(regions), np.nan) if answer.seconds is None else np.asarray(answer.seconds, np.float64)
        rows.append(pd.DataFrame({
            "image": answer.image, "region": regions, "round": round,
            "kind": np.where(mixed, "pixels", "region"), "class": np.where(mixed, _majority(answer, regions, maps), classes),
            "pixels": [size[f"{answer.image}:{r}"] for r in regions.tolist()], "labeled_pixels": labeled,
            "source": source, "written_at": now, "seconds": seconds,
        }))
    summary = RecordSummary()
    if not rows:
        return summary
    new = pd.concat(rows, ignore_index=True).drop_duplicates(["image", "region"], keep="last")
    old = ws.read_answers(round)
    keys = old["image"].astype(str) + ":" + old["region"].astype(str)
    new_keys = set(new["image"].astype(str) + ":" + new["region"].astype(str))
    replaced = keys.isin(new_keys)
    table = pd.concat([old[~replaced], new], ignore_index=True)
    table = table[list(ANSWER_COLUMNS)].astype(ANSWER_COLUMNS).sort_values(["image", "region"]).reset_index(drop=True)

    for image, (sp, mixed_regions, label_map, whole_regions) in maps.items():
        path = mask_path(ws, round, image)
        stored = read_mask(path, sp.shape) if path.exists() else np.full(sp.shape, VOID, np.uint8)
        inside = np.isin(sp, mixed_regions)
        stored[inside] = label_map[inside]
        stored[np.isin(sp, whole_regions)] = VOID  # a region answered whole no longer reads the map
        _write_mask(path, stored)
    ws.write_answers(round, table)  # the commit: written last
    summary.regions, summary.replaced = len(new), int(replaced.sum())
    summary.per_image = new.groupby("image").size().astype(int).to_dict()
    summary.images = len(summary.per_image)
    return summary


def _check_answer(round: int, answer: ImageAnswers, regions: np.ndarray, classes: np.ndarray,
                  queried: dict[str, set[int]], num_classes: int) -> None:
    if classes.shape != regions.shape:
        raise ValueError(f"{answer.image}: {len(regions)} regions but {len(classes)} classes")
    if answer.image not in queried:
        raise GpualError(f"image {answer.image!r} has no queried region in round {round}: answer only the round's query")
    outside = [r for r in regions.tolist() if r not in queried[answer.image]]
    if outside:
        raise GpualError(f"region {outside[0]} of {answer.image!r} is not queried in round {round}: answer only the round's query")
    bad = classes[~((classes >= 0) & (classes < num_classes) | (classes == VOID) | (classes == MIXED))]
    if bad.size:
        raise GpualError(f"class {int(bad[0])} for {answer.image!r} is not one of the {num_classes} classes (0..{num_classes - 1}, 255 = void)")
    if (classes == MIXED).any() and answer.label_map is None:
        raise ValueError(f"{answer.image}: mixed regions need a label map")


def _check_map(answer: ImageAnswers, sp: np.ndarray, num_classes: int) -> np.ndarray:
    label_map = np.asarray(answer.label_map)
    if label_map.shape != sp.shape:
        raise GpualError(
            f"the label map for {answer.image!r} is {label_map.shape[1]}x{label_map.shape[0]} but its superpixels are "
            f"{sp.shape[1]}x{sp.shape[0]} (the working scale): give it at that size"
        )
    values = np.unique(label_map)
    bad = values[(values >= num_classes) & (values != VOID)]
    if bad.size:
        raise GpualError(f"the label map for {answer.image!r} holds class {int(bad[0])}, not one of 0..{num_classes - 1} or 255")
    return label_map.astype(np.uint8, copy=False)


def _majority(answer: ImageAnswers, regions: np.ndarray, maps: dict) -> np.ndarray:
    """Per region: the most frequent labelled class in the label map (255 if none), for the table."""
    if answer.image not in maps:
        return np.full(len(regions), VOID, np.int64)
    sp, _, label_map, _ = maps[answer.image]
    return dominant_class(label_map, sp, int(sp.max()) + 1)[regions]


def region_histogram(values: np.ndarray, superpixels: np.ndarray, n_regions: int, skip: int | None = None) -> np.ndarray:
    """(n_regions, 256) int64: how many pixels of each region hold each value.

    ``values`` (H, W) integers in [0, 256) (class ids, 255 = void), ``superpixels`` (H, W)
    region ids in [0, n_regions); pixels whose value is ``skip`` are not counted. One
    bincount over (region, value) pairs.
    """
    if values.shape != superpixels.shape:
        raise ValueError(f"values {values.shape} and superpixels {superpixels.shape} differ in shape")
    regions = superpixels.reshape(-1).astype(np.int64)
    flat = values.reshape(-1).astype(np.int64)
    if skip is not None:
        keep = flat != skip
        regions, flat = regions[keep], flat[keep]
    return np.bincount(regions * 256 + flat, minlength=n_regions * 256).reshape(n_regions, 256)


def dominant_class(values: np.ndarray, superpixels: np.ndarray, n_regions: int) -> np.ndarray:
    """(n_regions,) int64: each region's most frequent non-void value (the lowest on ties),
    255 where a region has none (all void, or no pixel)."""
    hist = region_histogram(values, superpixels, n_regions, skip=VOID)
    out = hist.argmax(1)
    out[hist.sum(1) == 0] = VOID
    return out


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A stored answer map, (H, W) uint8; a damaged or resized file is a one-line error."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.shape != tuple(shape) or array.dtype != np.uint8:
        raise GpualError(f"answer map {path} is unreadable or not {shape[1]}x{shape[0]} uint8: delete it and answer its mixed regions again")
    return array


def _write_mask(path: Path, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise GpualError(f"cannot encode answer map {path}")
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def answers_from_label_map(image: str, label_map: np.ndarray, superpixels: np.ndarray, regions: np.ndarray,
                           void_is_answer: bool = False) -> tuple[ImageAnswers, int, np.ndarray]:
    """Turn a label map of one image into answers for its queried ``regions``.

    ``label_map`` (H, W) uint8 at the working scale (class ids, 255 = not labelled),
    ``superpixels`` (H, W) region ids, ``regions`` (k,) the image's queried regions.
    A region holding one value is a ``region`` answer, several values a ``pixels`` one.
    Returns (answers, labelled pixels outside the queried regions, regions left empty:
    all 255; with ``void_is_answer`` they are answered void instead, as the oracle does).
    """
    regions = np.asarray(regions, dtype=np.int64)
    n = int(max(int(superpixels.max(initial=0)), int(regions.max(initial=0)))) + 1
    hist = region_histogram(label_map, superpixels, n)
    queried = np.zeros(n, dtype=bool)
    queried[regions] = True
    outside = int(hist[~queried, :VOID].sum())
    hist = hist[regions]  # the distinct values of each queried region
    distinct = (hist > 0).sum(1)
    labelled = hist[:, :VOID].sum(1)
    classes = np.where(distinct == 1, hist.argmax(1), MIXED)
    empty = labelled == 0
    keep = ~empty | void_is_answer
    classes = np.where(empty, VOID, classes)
    answer = ImageAnswers(image, regions[keep], classes[keep], label_map if (classes[keep] == MIXED).any() else None)
    return answer, outside, regions[~keep]


def sparse_targets(ws: Workspace, round: int) -> dict[str, np.ndarray]:
    """Per image with answers in rounds 0..``round``: its (H, W) uint8 training target at the
    working scale (the answered class inside answered regions, 255 elsewhere), host memory."""
    from gpual.superpixels import load_superpixels, read_index

    labeled = ws.read_labeled(round)
    index = read_index(ws)
    targets: dict[str, np.ndarray] = {}
    for image, group in labeled.groupby("image", sort=True):
        image = str(image)
        sp = load_superpixels(ws, image, index)
        lut = np.full(int(sp.max()) + 1, VOID, np.uint8)
        whole = group[group["kind"] == "region"]
        lut[whole["region"].to_numpy(np.int64)] = whole["class"].to_numpy(np.int64).astype(np.uint8)
        target = lut[sp]
        for r, mixed in group[group["kind"] == "pixels"].groupby("round"):
            inside = np.isin(sp, mixed["region"].to_numpy(np.int64))
            target[inside] = read_mask(mask_path(ws, int(r), image), sp.shape)[inside]
        targets[image] = target
    return targets


def empty_answers() -> pd.DataFrame:
    return empty_table(ANSWER_COLUMNS)
