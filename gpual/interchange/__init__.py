"""Round trips with annotation tools: ``gpual export`` writes a round's queried regions in a
tool's format, ``gpual import`` reads the tool's export back into the label store.

Formats (one module each): ``label-studio`` (:mod:`.label_studio`: tasks with brush
pre-annotations), ``cvat`` (:mod:`.cvat`: CVAT for images 1.1 XML with a polygon per
region) and ``masks`` (:mod:`.masks`: PNGs for any other tool). Every export carries a
stamp (:mod:`.stamp`) naming the workspace, the round and its query, and is written whole
or not at all. Files are at the images' stored size; :mod:`.regions` holds the scaling rule.

An import checks everything before it writes: the stamp, every image, label name, size
and file; then one :func:`gpual.label_store.record_answers` call stores the answers (source
= the format's name). Labels outside the queried regions are passed over and counted;
queried regions with nothing painted stay unanswered and are counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpual.errors import GpualError
from gpual.interchange.formats import FORMATS, ExportJob, ImportJob, Parsed, detect_format
from gpual.interchange.labels import PLACEHOLDER, VOID_LABEL, LabelSet
from gpual.interchange.regions import RoundImage, check_stored_size, round_images, to_working
from gpual.interchange.stamp import MANIFEST, check_stamp, make_stamp, write_manifest
from gpual.label_store import ImageAnswers
from gpual.workspace import Workspace

__all__ = ["FORMATS", "ExportSummary", "ImportSummary", "detect_format", "export_round", "import_round"]


@dataclass
class ExportSummary:
    format: str
    out: Path
    images: int
    regions: int
    info: dict[str, Any]  # the format's own facts (Label Studio: document root, storage path; CVAT: task name)


@dataclass
class ImportSummary:
    format: str
    path: str
    images: int  # images with labels in the file
    regions: int  # queried regions answered by this import
    kinds: dict[str, int] = field(default_factory=dict)  # "region" (one class), "pixels" (several), "void"
    empty: int = 0  # queried regions left with nothing painted (unanswered by this import)
    outside: int = 0  # labelled pixels (working scale) outside the queried regions, passed over
    ignored: int = 0  # shapes / results of kinds gpual does not read
    replaced: int = 0  # answers that replaced an earlier answer of the same region
    answered: int = 0  # the round's answered regions after the import
    queried: int = 0


def _module(fmt: str) -> Any:
    if fmt not in FORMATS:
        raise GpualError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}", 2)
    from gpual.interchange import cvat, label_studio, masks

    return {"label-studio": label_studio, "cvat": cvat, "masks": masks}[fmt]


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write over anything but an earlier export (and that only with ``force``)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GpualError(f"--out {out} is a file: give a folder for the export")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise GpualError(f"--out {out} exists and is not a gpual export: choose a new folder")
    if not force:
        raise GpualError(f"--out {out} already holds an export: choose a new folder, or pass --force to replace it (and what was labelled in it)")


def export_round(ws: Workspace, round: int, fmt: str, out: Path, document_root: Path | None = None, force: bool = False) -> ExportSummary:
    """Write round ``round``'s queried regions to the folder ``out`` in format ``fmt``.

    ``out`` is written whole (built beside it, then renamed) with ``gpual-export.json``;
    ``document_root`` is Label Studio's local-files document root (default
    ``$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, else the dataset root).
    """
    from gpual.atomic import atomic_dir

    module = _module(fmt)
    ws.require(round, "label", "export")
    query = ws.read_query(round)
    spec, images = round_images(ws, round)
    for image in images.values():
        check_stored_size(image, ws.config.data.scale)
    out = Path(out)
    _check_out(out, force)
    job = ExportJob(root=ws.root, round=round, stamp=make_stamp(ws, round, query), labels=LabelSet(spec.classes),
                    images=list(images.values()), scale=ws.config.data.scale, dataset_root=Path(spec.root),
                    document_root=document_root)
    with atomic_dir(out) as tmp:
        info = module.write(tmp, job)
        write_manifest(tmp, _manifest(ws, job, fmt, info))
    return ExportSummary(fmt, out, len(images), int(sum(len(i.regions) for i in images.values())), info)


def _manifest(ws: Workspace, job: ExportJob, fmt: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": fmt, "stamp": job.stamp.to_dict(), "workspace": job.stamp.workspace, "round": job.round,
        "dataset": ws.config.data.dataset, "classes": list(job.labels.classes),
        "labels": {"void": VOID_LABEL, "placeholder": PLACEHOLDER}, "scale": job.scale,
        "images": [{"id": i.id, "file": str(i.path), "stored_size": list(i.stored), "working_size": list(i.working),
                    "regions": i.regions.tolist()} for i in job.images],
        **info,
    }


def import_round(ws: Workspace, round: int, path: Path, fmt: str | None = None, empty_is_void: bool = False) -> ImportSummary:
    """Read a tool's export ``path`` into round ``round``'s label store (the caller holds the lock).

    ``empty_is_void``: in an image where something was labelled, a queried region left
    with nothing painted is answered void instead of left unanswered (for tools whose 255
    means void). Nothing is written unless every check passes.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    module = _module(fmt)
    from gpual.label_store import check_writable, record_answers

    ws.require(round, "label", "import")
    query = check_writable(ws, round)
    spec, images = round_images(ws, round)
    job = ImportJob(ws.root, round, make_stamp(ws, round, query), LabelSet(spec.classes), images)
    parsed = module.read(path, job)
    if parsed.stamp is None:
        raise GpualError(f"{parsed.where} carries no gpual stamp: import only what `gpual export` wrote")
    check_stamp(parsed.stamp, job.stamp, parsed.where, ws.root)
    answers, summary = _answers(parsed, images, ws.config.data.scale, empty_is_void)
    summary.format, summary.path, summary.queried = fmt, parsed.where, len(query)
    if not answers:
        raise GpualError(
            f"{parsed.where} labels none of round {round}'s {len(query)} queried regions: label them in the tool "
            "(a region still 'to label' is no answer) and export again"
        )
    written = record_answers(ws, round, fmt, answers, superpixels={i: images[i].superpixels for i in parsed.canvases},
                             num_classes=len(spec.classes))
    summary.replaced = written.replaced
    summary.answered = ws.round_state(round).answered
    return summary


def _answers(parsed: Parsed, images: dict[str, RoundImage], scale: float, empty_is_void: bool) -> tuple[list[ImageAnswers], ImportSummary]:
    """Every canvas as answers at the working scale, with the counts for the summary."""
    from gpual.label_store import MIXED, VOID

    summary = ImportSummary("", "", images=len(parsed.canvases), regions=0, ignored=parsed.ignored)
    summary.empty = int(sum(len(image.regions) for i, image in images.items() if i not in parsed.canvases))
    answers = []
    for image_id, canvas in parsed.canvases.items():
        image = images[image_id]
        check_stored_size(image, scale)
        what = f"the mask in {parsed.where}"
        answer, outside, empty = image_answers(image, to_working(canvas.labels, image, what),
                                               to_working(canvas.touched, image, what), empty_is_void)
        summary.outside += outside
        summary.empty += empty
        if answer is not None:
            answers.append(answer)
            summary.regions += len(answer.regions)
            for kind, count in (("pixels", (answer.classes == MIXED).sum()), ("void", (answer.classes == VOID).sum())):
                summary.kinds[kind] = summary.kinds.get(kind, 0) + int(count)
            summary.kinds["region"] = summary.kinds.get("region", 0) + int(((answer.classes != MIXED) & (answer.classes != VOID)).sum())
    return answers, summary


def image_answers(image: RoundImage, labels: np.ndarray, touched: np.ndarray,
                  empty_is_void: bool = False) -> tuple[ImageAnswers | None, int, int]:
    """One image's answers from its working-scale maps.

    ``labels`` (h, w) uint8 class ids (255 = nothing), ``touched`` (h, w) uint8 (1 = some
    label, void included, was painted). A queried region with class pixels is answered as
    :func:`gpual.label_store.answers_from_label_map` says; one with none is answered void
    where void was painted in it (or, with ``empty_is_void``, in any image with some paint),
    else left empty. Returns (ImageAnswers or None, labelled pixels outside the queried
    regions, regions left empty).
    """
    from gpual.label_store import VOID, answers_from_label_map

    sp = image.superpixels
    answer, outside, empty = answers_from_label_map(image.id, labels, sp, image.regions)
    if empty.size:
        n = int(max(int(sp.max(initial=0)), int(image.regions.max(initial=0)))) + 1
        painted = np.bincount(sp.reshape(-1).astype(np.int64), weights=touched.reshape(-1), minlength=n)[empty] > 0
        void = empty if (empty_is_void and touched.any()) else empty[painted]
        empty = np.setdiff1d(empty, void)
        if void.size:
            answer = ImageAnswers(image.id, np.concatenate([answer.regions, void]),
                                  np.concatenate([answer.classes, np.full(void.size, VOID, np.int64)]), answer.label_map)
    return (answer if len(answer.regions) else None), int(outside), int(empty.size)
