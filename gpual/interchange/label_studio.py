"""Label Studio: tasks with brush pre-annotations out, its JSON export back in.

Export folder::

    tasks.json             one task per image: data.image is a local-files URL
                           (``/data/local-files/?d=<path relative to the document root>``),
                           data.gpual_* the image id and the stamp; one prediction holding a
                           brush result per queried region, labelled ``to label``
    labeling-config.xml    <Image> + <BrushLabels> with the dataset's classes, void and the placeholder
    gpual-export.json      the stamp, the document root and the storage path to set up

Import: the JSON file of Label Studio's "Export -> JSON" (a list of tasks). Per task the
last annotation not cancelled is read; its ``brushlabels`` results are painted in the
order listed (a later brush wins where two overlap), a brush pixel counting where its
alpha is at least 128. Results of other types are passed over and counted.

The brush run-length code is Label Studio's own (``label_studio_converter.brush``:
``mask2rle`` / ``decode_rle``); masks are at the image's stored size, as Label Studio
decodes them against ``original_width`` x ``original_height``.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from gpual.errors import GpualError
from gpual.interchange.formats import ExportJob, ImportJob, Parsed
from gpual.interchange.labels import PLACEHOLDER, SKIP, Canvas, LabelSet
from gpual.interchange.regions import queried_map
from gpual.interchange.stamp import Stamp, stamp_from_token

TASKS, CONFIG = "tasks.json", "labeling-config.xml"
FROM_NAME, TO_NAME = "label", "image"
URL_PREFIX = "/data/local-files/?d="
DOCUMENT_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"


def _brush() -> Any:
    """Label Studio's brush RLE module (imported on use: the converter package is slow to import)."""
    try:
        from label_studio_converter import brush
    except ImportError:
        raise GpualError("the Label Studio format needs label-studio-converter: pip install label-studio-converter", 2) from None
    return brush


def default_document_root(dataset_root: Path) -> Path:
    """Label Studio's document root: $LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT where set, else the dataset root."""
    return Path(os.environ.get(DOCUMENT_ROOT_ENV) or dataset_root)


def local_files_url(image: Path, document_root: Path) -> str:
    """``/data/local-files/?d=<image relative to document_root>``, percent-encoded."""
    for path, root in ((image.absolute(), document_root.absolute()), (image.resolve(), document_root.resolve())):
        try:
            relative = path.relative_to(root)
            break
        except ValueError:
            continue
    else:
        raise GpualError(
            f"image {image} is not inside the Label Studio document root {document_root}: pass --document-root with a "
            "folder that holds the dataset, and start Label Studio with the same LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
        )
    return URL_PREFIX + quote(relative.as_posix(), safe="/")


def labeling_config(labels: LabelSet) -> str:
    """The project's labelling interface: the image and one brush label per name."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value=f"${TO_NAME}", zoom="true", zoomControl="true")
    brush = ET.SubElement(view, "BrushLabels", name=FROM_NAME, toName=TO_NAME)
    for name in labels.names:
        ET.SubElement(brush, "Label", value=name, background=labels.colour(name))
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def brush_result(result_id: str, mask: np.ndarray, label: str) -> dict[str, Any]:
    """One brush result: ``mask`` (H, W) bool at the image's stored size, labelled ``label``."""
    height, width = mask.shape
    return {
        "id": result_id, "type": "brushlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"format": "rle", "rle": _brush().mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
    }


def write(out: Path, job: ExportJob) -> dict:
    """tasks.json and labeling-config.xml; returns the document root and the storage path to set up."""
    root = job.document_root or default_document_root(job.dataset_root)
    tasks = []
    for image in job.images:
        regions = queried_map(image)
        results = [brush_result(f"region-{r}", regions == r + 1, PLACEHOLDER) for r in image.regions.tolist()]
        tasks.append({
            "data": {TO_NAME: local_files_url(image.path, root), "gpual_image": image.id, "gpual_stamp": job.stamp.token,
                     "gpual_workspace": job.stamp.workspace},
            "predictions": [{"model_version": f"gpual round {job.round} query", "result": results}],
        })
    (out / TASKS).write_text(json.dumps(tasks) + "\n", encoding="utf-8")
    (out / CONFIG).write_text(labeling_config(job.labels), encoding="utf-8")
    storage = Path(os.path.commonpath([str(image.path.absolute().parent) for image in job.images]))
    return {"document_root": str(root), "storage_path": str(storage), "tasks": TASKS, "labeling_config": CONFIG}


def read(path: Path, job: ImportJob) -> Parsed:
    """A Label Studio JSON export (list of tasks) -> one canvas per annotated task."""
    tasks = _load(path)
    parsed = Parsed(str(path), None)
    for number, task in enumerate(tasks):
        where = f"{path} (task {task.get('id', number + 1) if isinstance(task, dict) else number + 1})"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "gpual_image" not in data:
            raise GpualError(f"{where} has no gpual_image in its data: import only tasks that `gpual export` wrote")
        stamp = _task_stamp(data, where)
        if parsed.stamp is not None and stamp != parsed.stamp:
            raise GpualError(f"{where} comes from another export than the tasks before it: export one project per round")
        parsed.stamp = stamp
        image = job.image(str(data["gpual_image"]), where)
        if image.id in parsed.canvases:
            raise GpualError(f"{where} repeats image {image.id!r}: delete the duplicate task in Label Studio and export again")
        annotation = _last_annotation(task, where)
        if annotation is not None:
            canvas, ignored = _paint(annotation, job.labels, where)
            parsed.ignored += ignored
            if canvas is not None:
                parsed.canvases[image.id] = canvas
    return parsed


def _load(path: Path) -> list:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GpualError(f"{path} is not readable JSON ({type(exc).__name__}): export the project from Label Studio again") from None
    if isinstance(tasks, dict) and "data" in tasks:
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise GpualError(f"{path} is not a Label Studio JSON export (a list of tasks): use Export -> JSON in Label Studio")
    return tasks


def _task_stamp(data: dict, where: str) -> Stamp:
    stamp = stamp_from_token(str(data.get("gpual_stamp", "")))
    if stamp is None:
        raise GpualError(f"{where} carries no valid gpual_stamp: import only tasks that `gpual export` wrote")
    return Stamp(str(data.get("gpual_workspace", "")), stamp.workspace_id, stamp.round, stamp.query)


def _last_annotation(task: dict, where: str) -> dict | None:
    """The task's last annotation not cancelled (the latest one written), or None."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise GpualError(f"{where} has a malformed annotations list: export the project from Label Studio again")
    kept = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    return kept[-1] if kept else None


def _paint(annotation: dict, labels: LabelSet, where: str) -> tuple[Canvas | None, int]:
    """(canvas of the annotation's brush results, results of other kinds passed over)."""
    canvas, ignored = None, 0
    for result in annotation.get("result") or []:
        if not isinstance(result, dict) or str(result.get("type", "")).lower() != "brushlabels":
            ignored += 1
            continue
        value = result.get("value") or {}
        names = sorted(set(value.get("brushlabels") or []))
        if not names:
            ignored += 1
            continue
        if len(names) > 1:
            raise GpualError(f"{where} has a brush with several labels ({', '.join(names)}): give every brush one label")
        code = labels.resolve(names[0], where)
        try:
            height, width = int(result["original_height"]), int(result["original_width"])
        except (KeyError, TypeError, ValueError):
            raise GpualError(f"{where} has a brush result without original_width / original_height: export it again") from None
        if canvas is None:
            canvas = Canvas(height, width)
        if canvas.shape != (height, width):
            raise GpualError(f"{where} has brush results for images of two sizes: export the project from Label Studio again")
        if code != SKIP:
            canvas.paint(_decode(value, height, width, where), code)
    return canvas, ignored


def _decode(value: dict, height: int, width: int, where: str) -> np.ndarray:
    """(H, W) bool: where a brush result's alpha is at least half."""
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        raise GpualError(f"{where} has a brush result that is not run-length encoded: export it as JSON from Label Studio again")
    try:
        rgba = _brush().decode_rle(value["rle"])
    except Exception:  # the converter raises what its bit reader hits (ValueError, IndexError) on damaged input
        rgba = None
    if rgba is None or rgba.size != height * width * 4:
        raise GpualError(f"{where} has a corrupt brush mask (its run-length code does not decode to {width}x{height}): export it again")
    return rgba.reshape(height, width, 4)[:, :, 3] >= 128
