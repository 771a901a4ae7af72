"""The plain-masks format, for any tool that reads and writes PNGs.

Export folder::

    gpual-export.json        the stamp, classes, working scale, stored sizes (gpual.interchange.stamp)
    images/<id>.<ext>        a copy of each queried pool image, as stored (a copy, not a
                             symlink: the folder stays valid when moved to the tool's machine)
    regions/<id>.png         uint16 at the stored size: local region id + 1 inside the
                             round's queried regions, 0 elsewhere
    labels/                  empty: the tool writes <id>.png here

Import: ``labels/<id>.png``, one per image, in the dataset's class indices (uint8,
0..C-1, 255 = not labelled), at the stored or the working size. ``<id>`` is the image id
percent-encoded (as in ``images/``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from gpual.errors import GpualError
from gpual.interchange.formats import ExportJob, ImportJob, Parsed
from gpual.interchange.labels import VOID, Canvas
from gpual.interchange.regions import file_stem, image_id_of, queried_map
from gpual.interchange.stamp import read_manifest, stamp_from_dict

IMAGES, REGIONS, LABELS = "images", "regions", "labels"


def write(out: Path, job: ExportJob) -> dict:
    """Copy the images and write each one's queried-region map; returns the files per image."""
    for name in (IMAGES, REGIONS, LABELS):
        (out / name).mkdir()
    files = {}
    for image in job.images:
        shutil.copyfile(image.path, out / IMAGES / image.file_name)
        regions = queried_map(image)
        _write_png(out / REGIONS / f"{file_stem(image.id)}.png", regions.astype(np.uint16))
        files[image.id] = {"image": f"{IMAGES}/{image.file_name}", "regions": f"{REGIONS}/{file_stem(image.id)}.png",
                           "labels": f"{LABELS}/{file_stem(image.id)}.png"}
    return {"files": files}


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise GpualError(f"cannot encode {path}")
    path.write_bytes(data.tobytes())


def read(path: Path, job: ImportJob) -> Parsed:
    """The label PNGs of a masks export folder (``path``: the folder or its gpual-export.json)."""
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest(folder)
    if manifest.get("format") != "masks":
        raise GpualError(f"{folder} is a {manifest.get('format')} export, not a masks one: pass --format {manifest.get('format')}")
    parsed = Parsed(str(folder), stamp_from_dict(manifest.get("stamp"), str(folder)))
    pngs = sorted((folder / LABELS).glob("*.png")) if (folder / LABELS).is_dir() else []
    if not pngs:
        raise GpualError(
            f"{folder / LABELS} holds no label PNG: write one <image>.png per image there (class indices, 255 = not labelled)"
        )
    for png in pngs:
        image = job.image(image_id_of(png.name), str(png))
        labels = read_label_png(png, len(job.labels.classes))
        canvas = Canvas(*labels.shape)
        canvas.labels[:] = labels
        canvas.touched[:] = labels != VOID
        parsed.canvases[image.id] = canvas
    return parsed


def read_label_png(path: Path, num_classes: int) -> np.ndarray:
    """(H, W) uint8 class indices from a label PNG; a damaged file, colours or other values are refused."""
    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise GpualError(f"{path} is not a readable PNG (empty, truncated or corrupt): write it again")
    if array.ndim == 3:
        # A grey map saved as RGB(A) is fine; a colour-coded one has no class indices.
        if not all(np.array_equal(array[:, :, 0], array[:, :, c]) for c in (1, 2)):
            raise GpualError(f"{path} is a colour image: write single-channel PNGs of class indices (255 = not labelled)")
        array = np.ascontiguousarray(array[:, :, 0])
    if array.dtype != np.uint8:
        raise GpualError(f"{path} is {array.dtype}, not 8-bit: write uint8 class indices (255 = not labelled)")
    values = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    bad = values[(values >= num_classes) & (values != VOID)]
    if bad.size:
        raise GpualError(
            f"{path} holds the value {int(bad[0])}, not a class index (0..{num_classes - 1}) or 255 (not labelled): fix the mask"
        )
    return array
