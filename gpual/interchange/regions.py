"""A round's queried images as an annotation tool sees them: at their stored size.

Superpixels, answers and training live at the working scale (``data.scale``); a tool shows
the image file as stored. Two rules tie the two sizes together, both built on the one
resize of :func:`gpual.datasets.read_label` (OpenCV nearest neighbour, size from
:func:`gpual.datasets.scaled_size`):

- *down* (import): a label map at the stored size is scaled to the working size with
  nearest neighbour, exactly as the simulated oracle scales the ground truth; a map at the
  working size is taken as it is; any other size is refused.
- *up* (export): each stored pixel takes the region of the working pixel whose nearest-
  neighbour sample point is the last one at or before it, so scaling the exported map back
  down returns the working map exactly, at any scale <= 1.

Host NumPy and OpenCV on one image at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import quote, unquote

import cv2
import numpy as np

from gpual.datasets import DatasetSpec
from gpual.errors import GpualError
from gpual.workspace import Workspace

Size = tuple[int, int]  # (height, width) in pixels


@dataclass
class RoundImage:
    """One image of a round's query; the map and the stored size are read on first use."""

    id: str
    path: Path  # the pool image file
    working: Size  # the superpixel map's size
    regions: np.ndarray  # (k,) int64 local ids of its queried regions, ascending
    load: Callable[[], np.ndarray] = field(repr=False, default=lambda: np.zeros((0, 0), np.uint16))  # -> superpixels

    @cached_property
    def superpixels(self) -> np.ndarray:
        """(h, w) uint16 region ids at the working scale."""
        return self.load()

    @cached_property
    def stored(self) -> Size:
        """(H, W) of the image file; decoding it is the one portable way to know."""
        from gpual.datasets import read_image

        return tuple(read_image(self.path).shape[:2])  # type: ignore[return-value]

    @property
    def file_name(self) -> str:
        """The image's name in an export: its id, percent-encoded (Cityscapes ids hold '/'),
        plus the pool file's suffix."""
        return file_stem(self.id) + self.path.suffix.lower()


def file_stem(image_id: str) -> str:
    """``image_id`` as a file name without suffix (percent-encoded, like the label store's maps)."""
    return quote(image_id, safe="")


def image_id_of(name: str) -> str:
    """The image id from a file name an export wrote (any folder or suffix a tool adds is dropped)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return unquote(stem)


def round_images(ws: Workspace, round: int) -> tuple[DatasetSpec, dict[str, RoundImage]]:
    """(dataset spec, image id -> :class:`RoundImage`) for round ``round``'s query, in id order.

    Refuses (GpualError) a query image that is no longer in the pool split.
    """
    from gpual.datasets import open_dataset
    from gpual.superpixels import load_superpixels, read_index

    query = ws.read_query(round)
    index = read_index(ws)
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    samples = {s.id: s for s in spec.samples(ws.config.data.pool_split)}
    rows = index.set_index(index["image"].astype(str))
    images: dict[str, RoundImage] = {}
    for image, group in sorted(query.groupby(query["image"].astype(str))["region"], key=lambda item: item[0]):
        if image not in samples or image not in rows.index:
            raise GpualError(
                f"queried image {image!r} is not in split '{ws.config.data.pool_split}' of {spec.root}: the dataset changed "
                "since the superpixels were computed; restore it or start a new workspace"
            )
        row = rows.loc[image]
        images[image] = RoundImage(
            id=image, path=samples[image].image, working=(int(row["height"]), int(row["width"])),
            regions=np.sort(group.to_numpy(np.int64)),
            load=lambda image=image: load_superpixels(ws, image, index),
        )
    return spec, images


def check_stored_size(image: RoundImage, scale: float) -> None:
    """Refuse an image file whose size no longer scales to its superpixel map's."""
    from gpual.datasets import scaled_size

    if scaled_size(*image.stored, scale) != image.working:
        (h, w), (sh, sw) = image.stored, image.working
        raise GpualError(
            f"image {image.path} is {w}x{h}, which data.scale = {scale} does not scale to its superpixels' {sw}x{sh}: "
            "the image changed since the superpixels were computed; restore it or start a new workspace"
        )


def _owners(stored: int, working: int) -> np.ndarray:
    """(stored,) int64: the working row (or column) each stored row belongs to (the *up* rule).

    The sample points come from OpenCV itself (resizing an index vector), so they match
    whatever rounding its nearest-neighbour resize uses.
    """
    samples = cv2.resize(np.arange(stored, dtype=np.int32)[None, :], (working, 1), interpolation=cv2.INTER_NEAREST)[0]
    owner = np.searchsorted(samples, np.arange(stored), side="right") - 1
    return np.clip(owner, 0, working - 1)


def upscale(array: np.ndarray, stored: Size) -> np.ndarray:
    """(h, w) working-scale map -> (H, W) at the stored size, by the *up* rule (any dtype)."""
    rows = _owners(stored[0], array.shape[0])
    cols = _owners(stored[1], array.shape[1])
    return array[rows[:, None], cols[None, :]]


def queried_map(image: RoundImage) -> np.ndarray:
    """(H, W) int32 at the stored size: local region id + 1 inside the queried regions, 0 elsewhere."""
    sp = image.superpixels
    lut = np.zeros(int(max(int(sp.max(initial=0)), int(image.regions.max(initial=0)))) + 1, dtype=np.int32)
    lut[image.regions] = image.regions.astype(np.int32) + 1
    return upscale(lut[sp], image.stored)


def to_working(array: np.ndarray, image: RoundImage, what: str) -> np.ndarray:
    """A tool's (H, W) map of ``image`` at the working size (the *down* rule).

    ``what`` names the map in the error: a map must be at the stored size (scaled down with
    nearest neighbour) or at the working size; any other size is refused.
    """
    shape = tuple(array.shape[:2])
    if shape == image.working:
        return array
    if shape == image.stored:
        h, w = image.working
        return cv2.resize(array, (w, h), interpolation=cv2.INTER_NEAREST)
    (sh, sw), (wh, ww) = image.stored, image.working
    raise GpualError(
        f"{what} for image {image.id!r} is {shape[1]}x{shape[0]}, but masks must be at the image's stored size "
        f"{sw}x{sh} (scaled to the working scale with nearest neighbour) or at the working size {ww}x{wh}: "
        "export the mask at the image's own size"
    )
