"""CVAT: "CVAT for images 1.1" XML out (a polygon per queried region), CVAT's export back in.

Export folder::

    annotations.xml      CVAT for images 1.1: the task (named by the stamp token), the label
                         set, and per image one ``to label`` polygon per outer contour of each
                         queried region (OpenCV contours at the stored size; z_order puts a
                         smaller polygon above a larger one, so a region inside another's
                         outline shows and imports on top)
    labels.json          the same labels for CVAT's "Raw" label editor (type "any")
    images/<id>.<ext>    copies of the queried pool images, to create the CVAT task with
    gpual-export.json    the stamp

Import: CVAT's "CVAT for images 1.1" export (annotations.xml, the zip holding it, or a
folder holding it). ``<polygon>``, ``<box>`` and ``<mask>`` shapes are painted in
z_order, then document order (the later wins where they overlap); polylines, points,
ellipses, cuboids, skeletons and tags are passed over and counted. Polygon vertices are
rounded to pixels and filled with OpenCV, boundary included, so an exported contour fills
exactly its region again. A polygon carries one class, so a region whose pixels differ
needs masks (CVAT's brush) or several polygons.
"""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import cv2
import numpy as np

from gpual.errors import GpualError
from gpual.interchange.formats import ExportJob, ImportJob, Parsed
from gpual.interchange.labels import PLACEHOLDER, SKIP, Canvas, LabelSet
from gpual.interchange.regions import RoundImage, image_id_of, queried_map
from gpual.interchange.stamp import MANIFEST, Stamp, read_manifest, stamp_from_dict, stamp_from_token

ANNOTATIONS, LABELS, IMAGES = "annotations.xml", "labels.json", "images"
PAINTED = ("polygon", "box", "mask")
PASSED_OVER = ("polyline", "points", "ellipse", "cuboid", "skeleton", "tag")


# --- export ------------------------------------------------------------------------------


def region_polygons(regions: np.ndarray, region: int) -> list[np.ndarray]:
    """The outer contours of ``region`` in ``regions`` ((H, W) int map), each (n >= 3, 2) int32 x, y.

    A contour of one or two pixels (a dot, a thin line) repeats its points to make the three
    vertices CVAT requires; it still fills just those pixels.
    """
    mask = (regions == region).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2)
        if len(points) < 3:
            points = np.concatenate([points, points[::-1], points])[:3]
        polygons.append(points.astype(np.int32))
    return polygons


def _points(points: np.ndarray) -> str:
    return ";".join(f"{x},{y}" for x, y in points.tolist())


def _meta(root: ET.Element, job: ExportJob) -> None:
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    for key, value in (("name", job.stamp.token), ("size", str(len(job.images))), ("mode", "annotation"), ("overlap", "0")):
        ET.SubElement(task, key).text = value
    labels = ET.SubElement(task, "labels")
    for name in job.labels.names:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = job.labels.colour(name)
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")


def _image(root: ET.Element, frame: int, image: RoundImage) -> None:
    """One <image> with a placeholder polygon per contour, larger outlines first in z_order."""
    height, width = image.stored
    element = ET.SubElement(root, "image", id=str(frame), name=image.file_name, width=str(width), height=str(height))
    regions = queried_map(image)
    polygons = [p for r in image.regions.tolist() for p in region_polygons(regions, r + 1)]
    order = sorted(range(len(polygons)), key=lambda i: -cv2.contourArea(polygons[i]))
    for z, i in enumerate(order):
        ET.SubElement(element, "polygon", label=PLACEHOLDER, source="manual", occluded="0",
                      points=_points(polygons[i]), z_order=str(z))


def write(out: Path, job: ExportJob) -> dict:
    """annotations.xml, labels.json and the image copies."""
    (out / IMAGES).mkdir()
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _meta(root, job)
    for frame, image in enumerate(job.images):
        shutil.copyfile(image.path, out / IMAGES / image.file_name)
        _image(root, frame, image)
    ET.indent(root)
    ET.ElementTree(root).write(out / ANNOTATIONS, encoding="utf-8", xml_declaration=True)
    raw = [{"name": n, "color": job.labels.colour(n), "type": "any", "attributes": []} for n in job.labels.names]
    (out / LABELS).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return {"task_name": job.stamp.token, "annotations": ANNOTATIONS, "labels": LABELS, "images": IMAGES}


# --- import ------------------------------------------------------------------------------


def _xml_bytes(path: Path) -> bytes:
    """annotations.xml from a file, a folder or CVAT's zip."""
    if path.is_dir():
        path = path / ANNOTATIONS
    try:
        if path.suffix.lower() != ".zip":
            return path.read_bytes()
        with zipfile.ZipFile(path) as archive:
            names = sorted((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == ANNOTATIONS), key=len)
            if not names:
                raise GpualError(f"{path} holds no {ANNOTATIONS}: export the task from CVAT as 'CVAT for images 1.1'")
            return archive.read(names[0])
    except (OSError, zipfile.BadZipFile) as exc:
        raise GpualError(f"{path} is unreadable ({type(exc).__name__}): export the task from CVAT again") from None


def _stamp(root: ET.Element, path: Path, job: ImportJob) -> Stamp:
    """The stamp: a gpual token in the meta (the task name), else the export's gpual-export.json beside the file."""
    meta = root.find("meta")
    for element in meta.iter() if meta is not None else ():
        found = stamp_from_token(element.text)
        if found is not None:
            return found
    folder = path if path.is_dir() else path.parent
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        return stamp_from_dict(manifest.get("stamp"), str(folder / MANIFEST))
    raise GpualError(
        f"{path} carries no gpual stamp: name the CVAT task {job.stamp.token!r} (as `gpual export` printed) and export it "
        f"again, or put the file into the folder `gpual export` wrote, beside its {MANIFEST}"
    )


def read(path: Path, job: ImportJob) -> Parsed:
    """CVAT for images 1.1 -> one canvas per image that has a painted shape."""
    try:
        root = ET.fromstring(_xml_bytes(path))
    except ET.ParseError as exc:
        raise GpualError(f"{path} is not readable XML ({exc}): export the task from CVAT as 'CVAT for images 1.1' again") from None
    if root.tag != "annotations":
        raise GpualError(f"{path} is not a CVAT for images 1.1 file (root <{root.tag}>): export it from CVAT in that format")
    if root.find("track") is not None:
        raise GpualError(f"{path} is a 'CVAT for video' export (it has tracks): export the task as 'CVAT for images 1.1'")
    parsed = Parsed(str(path), _stamp(root, path, job))
    for element in root.findall("image"):
        where = f"{path} (image {element.get('name')!r})"
        image = job.image(image_id_of(element.get("name") or ""), where)
        if image.id in parsed.canvases:
            raise GpualError(f"{where} appears twice: keep each image once in the CVAT task")
        canvas, ignored = _paint(element, job.labels, where)
        parsed.ignored += ignored
        if canvas is not None:
            parsed.canvases[image.id] = canvas
    return parsed


def _paint(element: ET.Element, labels: LabelSet, where: str) -> tuple[Canvas | None, int]:
    """(canvas of one <image>'s shapes, or None when it has none; shapes passed over)."""
    shapes = [(i, child) for i, child in enumerate(element) if child.tag in PAINTED]
    ignored = sum(child.tag in PASSED_OVER for child in element)
    if not shapes:
        return None, ignored
    try:
        height, width = int(element.get("height", "")), int(element.get("width", ""))
    except ValueError:
        raise GpualError(f"{where} has no width / height: export the task from CVAT again") from None
    canvas = Canvas(height, width)
    for _, shape in sorted(shapes, key=lambda item: (_int(item[1].get("z_order", "0"), where), item[0])):
        code = labels.resolve(shape.get("label", ""), where)
        if code != SKIP:
            canvas.paint(_rasterize(shape, height, width, where), code)
    return canvas, ignored


def _int(text: str, where: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise GpualError(f"{where} has a malformed number {text!r}: export the task from CVAT again") from None


def _rasterize(shape: ET.Element, height: int, width: int, where: str) -> np.ndarray:
    """(H, W) bool pixels of one polygon, box or mask."""
    try:
        if shape.tag == "mask":
            return _mask(shape, height, width)
        if shape.tag == "box":
            corners = _box(shape)
        else:
            corners = np.array([[float(v) for v in pair.split(",")] for pair in shape.get("points", "").split(";")])
            if corners.ndim != 2 or corners.shape[1] != 2:
                raise ValueError(shape.get("points"))
    except (ValueError, TypeError):
        raise GpualError(f"{where} has a malformed <{shape.tag}>: export the task from CVAT again") from None
    out = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(out, [np.round(corners).astype(np.int32)], 1)
    return out.astype(bool)


def _box(shape: ET.Element) -> np.ndarray:
    """(4, 2) corners of a (possibly rotated: degrees, clockwise) box."""
    x0, y0, x1, y1 = (float(shape.get(k, "")) for k in ("xtl", "ytl", "xbr", "ybr"))
    rotation = float(shape.get("rotation", "0"))
    return cv2.boxPoints((((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0), rotation))


def _mask(shape: ET.Element, height: int, width: int) -> np.ndarray:
    """A CVAT mask: run lengths over its box (row-major, starting with a run of 0s)."""
    left, top, box_w, box_h = (int(float(shape.get(k, ""))) for k in ("left", "top", "width", "height"))
    counts = np.array([int(c) for c in shape.get("rle", "").split(",") if c.strip()], dtype=np.int64)
    if box_w < 1 or box_h < 1 or (counts < 0).any() or counts.sum() > box_w * box_h:
        raise ValueError("mask runs do not fit its box")
    bits = np.repeat((np.arange(len(counts)) % 2).astype(bool), counts)
    bits = np.concatenate([bits, np.zeros(box_w * box_h - bits.size, dtype=bool)]).reshape(box_h, box_w)
    out = np.zeros((height, width), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + box_h, height), min(left + box_w, width)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = bits[y0 - top:y1 - top, x0 - left:x1 - left]
    return out
