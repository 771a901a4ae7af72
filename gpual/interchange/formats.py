"""What every format's writer is given and every reader returns, and telling formats apart.

A writer (``write(out, job)``) puts one round's queried regions into the folder ``out`` in
its tool's format; a reader (``read(path, job)``) turns the tool's export back into one
:class:`~gpual.interchange.labels.Canvas` per image, at the size the file declares. Sizes,
the stamp and the conversion into answers are checked in :mod:`gpual.interchange`, the
same way for every format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpual.errors import GpualError
from gpual.interchange.labels import Canvas, LabelSet
from gpual.interchange.regions import RoundImage
from gpual.interchange.stamp import MANIFEST, Stamp, read_manifest

FORMATS = ("label-studio", "cvat", "masks")  # also the label store's source names of their answers


@dataclass
class ExportJob:
    """One round to export: its stamp, label names, images (id order) and working scale."""

    root: Path  # the workspace
    round: int
    stamp: Stamp
    labels: LabelSet
    images: list[RoundImage]
    scale: float
    dataset_root: Path
    document_root: Path | None = None  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT


@dataclass
class ImportJob:
    """What a reader checks a file against."""

    root: Path
    round: int
    stamp: Stamp  # the round's current stamp
    labels: LabelSet
    images: dict[str, RoundImage]

    def image(self, image_id: str, where: str) -> RoundImage:
        """The queried image ``image_id``; any other is a one-line error."""
        if image_id not in self.images:
            raise GpualError(
                f"{where} names image {image_id!r}, which has no queried region in round {self.round}: "
                "import only the files exported for this round"
            )
        return self.images[image_id]


@dataclass
class Parsed:
    """A tool's export read back: canvases by image id, and what was passed over."""

    where: str  # the file, for messages
    stamp: Stamp | None
    canvases: dict[str, Canvas] = field(default_factory=dict)
    ignored: int = 0  # shapes or results of kinds gpual does not read (points, lines, other tags)


def detect_format(path: Path) -> str:
    """The format of ``path``: a Label Studio JSON export, a CVAT XML / zip (or a folder
    with ``annotations.xml``), or a masks export folder (``gpual-export.json`` + ``labels/``)."""
    if not path.exists():
        raise GpualError(f"{path} does not exist: give the file or folder the annotation tool exported")
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file():
            kind = read_manifest(manifest).get("format")
            if kind == "masks":
                return "masks"
            if kind == "cvat" and (path / "annotations.xml").is_file():
                return "cvat"
            if kind == "label-studio":
                raise GpualError(
                    f"{path} is the folder `gpual export` wrote for Label Studio: import the JSON file Label Studio "
                    "exports (Export -> JSON), not this folder"
                )
        if (path / "annotations.xml").is_file():
            return "cvat"
        raise GpualError(f"cannot tell the format of {path}: pass --format ({', '.join(FORMATS)})", 2)
    suffix = path.suffix.lower()
    if suffix in (".xml", ".zip"):
        return "cvat"
    if path.name == MANIFEST:
        return detect_format(path.parent)
    if suffix == ".json":
        return "label-studio"
    raise GpualError(f"cannot tell the format of {path}: pass --format ({', '.join(FORMATS)})", 2)
