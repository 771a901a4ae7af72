"""Dataset layouts on disk: which image goes with which label, and how labels are mapped.

Four layouts (``DatasetSpec.kind``):

- ``camvid``: ``<root>/<split>/images/<id>.jpg|png`` + ``<root>/<split>/labels/<id>.png``;
  labels 0..10, 255 = void (the layout of ``shared/datasets/camvid``).
- ``segnet``: the SegNet CamVid tutorial: ``<root>/train/*.png`` + ``<root>/trainannot/*.png``
  (same for val/test); labels 0..10 and 11 = void, mapped to 255.
- ``cityscapes``: ``<root>/leftImg8bit/<split>/<city>/<city>_<a>_<b>_leftImg8bit.png`` +
  ``<root>/gtFine/<split>/<city>/<city>_<a>_<b>_gtFine_labelIds.png``; the 34 labelIds are
  mapped to the 19 train ids, everything else to 255.
- ``folder``: ``<root>/classes.txt`` + ``<root>/<split>/images/<id>.png|jpg|jpeg`` +
  ``<root>/<split>/labels/<id>.png``; labels 0..C-1 and 255.

Listing (:meth:`DatasetSpec.samples`) never decodes a file. Reading returns host NumPy
arrays: images (H, W, 3) uint8 RGB, labels (H, W) uint8 class indices with 255 = void.
Every bad file raises :class:`GpualError` naming the file and what to do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from gpual.errors import GpualError

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
IGNORE_INDEX = 255
KINDS: tuple[str, ...] = ("camvid", "segnet", "cityscapes", "folder")

# Official Cityscapes labelId -> trainId table (cityscapesScripts labels.py); ids not
# listed (0..6, 9, 10, 14..16, 18, 29, 30, and -1 = license plate) are void.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
SEGNET_VOID = 11

_CAMVID_IMAGE_SUFFIXES = (".jpg", ".png")
_FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITY_IMAGE_SUFFIX = "_leftImg8bit.png"
_CITY_LABEL_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Sample:
    """One image and its label map on disk.

    ``id`` is unique within its split: the file stem (``0001TP_006690``), or
    ``city/stem`` for Cityscapes (``aachen/aachen_000000_000019``).
    """

    id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset folder of a known layout; ``classes`` are the *mapped* label classes.

    Label maps read through :func:`read_label` hold values in ``[0, num_classes)`` or
    ``ignore_index`` (255).
    """

    kind: str
    root: Path
    classes: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> list[str]:
        """Names of the splits present on disk (sorted); a test split is optional."""
        if self.kind in ("camvid", "folder"):
            return sorted(d.name for d in _subdirs(self.root) if (d / "images").is_dir())
        if self.kind == "segnet":
            names = {d.name for d in _subdirs(self.root)}
            return sorted(n for n in names if not n.endswith("annot") and f"{n}annot" in names)
        if self.kind == "cityscapes":
            return sorted(d.name for d in _subdirs(self.root / "leftImg8bit"))
        raise _unknown_kind(self.kind)

    def samples(self, split: str) -> list[Sample]:
        """Every (image, label) pair of ``split``, sorted by id; lists files, decodes none.

        Raises GpualError if the split's folders are missing, the split is empty, an id
        appears twice, or an image has no label (or a label no image). In the ``camvid`` and
        ``folder`` layouts a split without a ``labels/`` folder is an unlabelled pool: its
        samples have ``label = None`` (people label it through gpual's label store).
        """
        if self.kind in ("camvid", "folder"):
            suffixes = _CAMVID_IMAGE_SUFFIXES if self.kind == "camvid" else _FOLDER_IMAGE_SUFFIXES
            base = self.root / split
            images = _by_stem(_require_dir(base / "images", split, self), suffixes)
            if (base / "labels").is_dir():
                labels = _by_stem(base / "labels", (".png",))
                samples = _pair(images, labels, base / "labels", ".png", base / "images")
            else:
                samples = [Sample(stem, image, None) for stem, image in images.items()]
        elif self.kind == "segnet":
            images = _by_stem(_require_dir(self.root / split, split, self), (".png",))
            label_dir = self.root / f"{split}annot"
            labels = _by_stem(_require_dir(label_dir, split, self), (".png",))
            samples = _pair(images, labels, label_dir, ".png", self.root / split)
        elif self.kind == "cityscapes":
            samples = self._cityscapes_samples(split)
        else:
            raise _unknown_kind(self.kind)
        if not samples:
            raise GpualError(
                f"split '{split}' of {self.root} has no images ({self.kind} layout): "
                f"put the images in {self._image_dir_hint(split)}"
            )
        return sorted(samples, key=lambda s: s.id)

    def has_labels(self, split: str) -> bool:
        """Whether ``split`` has ground truth (False for an unlabelled pool)."""
        return all(sample.label is not None for sample in self.samples(split))

    def _cityscapes_samples(self, split: str) -> list[Sample]:
        image_root = _require_dir(self.root / "leftImg8bit" / split, split, self)
        label_root = _require_dir(self.root / "gtFine" / split, split, self)
        images: dict[str, Path] = {}
        for city in _subdirs(image_root):
            for f in _files(city):
                if f.name.endswith(_CITY_IMAGE_SUFFIX):
                    images[f"{city.name}/{f.name[: -len(_CITY_IMAGE_SUFFIX)]}"] = f
        labels: dict[str, Path] = {}
        for city in _subdirs(label_root):
            # gtFine also holds _color, _instanceIds, _labelTrainIds and _polygons.json: only labelIds count.
            for f in _files(city):
                if f.name.endswith(_CITY_LABEL_SUFFIX):
                    labels[f"{city.name}/{f.name[: -len(_CITY_LABEL_SUFFIX)]}"] = f
        for key, image in images.items():
            if key not in labels:
                expected = label_root / f"{key}{_CITY_LABEL_SUFFIX}"
                raise GpualError(f"image {image} has no label: expected {expected}; add it or remove the image")
        for key, label in labels.items():
            if key not in images:
                expected = image_root / f"{key}{_CITY_IMAGE_SUFFIX}"
                raise GpualError(f"label {label} has no image: expected {expected}; add it or remove the label")
        return [Sample(key, images[key], labels[key]) for key in images]

    def _image_dir_hint(self, split: str) -> Path:
        if self.kind == "segnet":
            return self.root / split
        if self.kind == "cityscapes":
            return self.root / "leftImg8bit" / split / "<city>"
        return self.root / split / "images"


def open_dataset(kind: str, root: Path | str) -> DatasetSpec:
    """Check that ``root`` holds a dataset of layout ``kind`` and describe it.

    Only folders are inspected here (and ``classes.txt`` for ``folder``); files are
    checked when listed (:meth:`DatasetSpec.samples`) and read.
    """
    if kind not in KINDS:
        raise GpualError(f"unknown dataset kind '{kind}': use one of {', '.join(KINDS)}", exit_code=2)
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise GpualError(f"dataset folder {root} does not exist: check the path")
    if not root.is_dir():
        raise GpualError(f"dataset root {root} is not a folder: give the folder that holds the splits")
    if kind == "folder":
        classes = _read_classes(root)
    elif kind == "cityscapes":
        classes = CITYSCAPES_CLASSES
    else:
        classes = CAMVID_CLASSES
    spec = DatasetSpec(kind, root, classes)
    if not spec.splits():
        raise GpualError(f"{root} is not a {kind} dataset: expected {_EXPECTED[kind]}{_guess_hint(root, kind)}")
    return spec


_EXPECTED = {
    "camvid": "<root>/<split>/images/<id>.jpg|png and <root>/<split>/labels/<id>.png",
    "segnet": "<root>/train/*.png and <root>/trainannot/*.png (same for val, test)",
    "cityscapes": "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png",
    "folder": "<root>/classes.txt, <root>/<split>/images/<id>.png|jpg|jpeg and <root>/<split>/labels/<id>.png",
}


def _guess_hint(root: Path, kind: str) -> str:
    """'; it looks like X: use --dataset X' when another layout matches ``root``."""
    names = {d.name for d in _subdirs(root)}
    if kind != "cityscapes" and {"leftImg8bit", "gtFine"} <= names:
        guess = "cityscapes"
    elif kind != "segnet" and any(f"{n}annot" in names for n in names):
        guess = "segnet"
    elif kind in ("segnet", "cityscapes") and any((root / n / "images").is_dir() for n in names):
        guess = "camvid or folder"
    else:
        return ""
    return f"; it looks like the {guess} layout: open it as that kind"


def _read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise GpualError(
            f"{path} is missing: write one class name per line (line k = label value k, 255 = void) for the folder layout"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GpualError(f"cannot read {path} ({e}): write it as UTF-8 text, one class name per line") from e
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    classes = _indexed_classes(path, lines) if lines and all(_INDEXED.match(line) for line in lines) else tuple(lines)
    if not classes:
        raise GpualError(f"{path} lists no classes: write one class name per line")
    if len(classes) > IGNORE_INDEX:
        raise GpualError(f"{path} lists {len(classes)} classes: at most {IGNORE_INDEX} fit in uint8 labels (255 = void)")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise GpualError(f"{path} lists classes more than once ({', '.join(dupes)}): make every name unique")
    return classes


# "3<TAB>car" or "3 car": a class file that gives each name its label value.
_INDEXED = re.compile(r"^(\d+)\s+(\S.*)$")


def _indexed_classes(path: Path, lines: list[str]) -> tuple[str, ...]:
    """Names from ``index name`` lines: value 255 (void) is left out, the others must be
    0..C-1, each once."""
    by_value: dict[int, str] = {}
    for line in lines:
        value, name = _INDEXED.match(line).groups()
        value = int(value)
        if value == IGNORE_INDEX:
            continue  # void is 255 in every layout, not a class
        if value in by_value:
            raise GpualError(f"{path} gives label value {value} twice ({by_value[value]!r}, {name.strip()!r}): give each value one name")
        by_value[value] = name.strip()
    if sorted(by_value) != list(range(len(by_value))):
        missing = sorted(set(range(max(by_value, default=-1) + 1)) - set(by_value))
        raise GpualError(
            f"{path} names label values {sorted(by_value)[:5]}...: they must be 0..{len(by_value) - 1} with none missing "
            f"(missing {missing[:5]}); 255 is void"
        )
    return tuple(by_value[v] for v in range(len(by_value)))


def _unknown_kind(kind: str) -> GpualError:
    return GpualError(f"unknown dataset kind '{kind}': use one of {', '.join(KINDS)}", exit_code=2)


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]


def _require_dir(path: Path, split: str, spec: DatasetSpec) -> Path:
    if not path.is_dir():
        present = ", ".join(spec.splits()) or "none"
        raise GpualError(
            f"split '{split}' not found: folder {path} is missing (splits present in {spec.root}: {present})"
        )
    return path


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for files with one of ``suffixes`` (case-insensitive); other files are ignored."""
    out: dict[str, Path] = {}
    for f in sorted(_files(folder)):
        if f.suffix.lower() not in suffixes:
            continue
        if f.stem in out:
            raise GpualError(f"{out[f.stem]} and {f} have the same id '{f.stem}': keep only one of them")
        out[f.stem] = f
    return out


def _pair(
    images: dict[str, Path], labels: dict[str, Path], label_dir: Path, label_suffix: str, image_dir: Path
) -> list[Sample]:
    for stem, image in images.items():
        if stem not in labels:
            raise GpualError(
                f"image {image} has no label: expected {label_dir / (stem + label_suffix)}; add it or remove the image"
            )
    for stem, label in labels.items():
        if stem not in images:
            raise GpualError(f"label {label} has no image in {image_dir}; add the image or remove the label")
    return [Sample(stem, images[stem], labels[stem]) for stem in images]


# ---------------------------------------------------------------------------------------
# Reading


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(height, width) in pixels of an (h, w) image read at ``scale``: (round(h*s), round(w*s)).

    Every stage (images, labels, superpixels, predictions) uses this one rule so sizes agree.
    """
    if not scale > 0:
        raise GpualError(f"scale must be > 0, got {scale}: set data.scale to a positive factor such as 0.5", exit_code=2)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _decode(path: Path | str, flags: int, what: str) -> np.ndarray:
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise GpualError(f"cannot read {what} {path}: {e.strerror or e}; check that the file exists and is readable") from e
    array = None
    if data.size:
        # A JPEG without its end-of-image marker is truncated; older OpenCV decodes it to a
        # grey-filled image with only a warning.
        truncated_jpeg = data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-64:].tobytes()
        if not truncated_jpeg:
            array = cv2.imdecode(data, flags)
    if array is None:
        raise GpualError(f"{what} {path} is not a readable image (empty, truncated or corrupt): replace or remove it")
    return array


def read_image(path: Path | str, scale: float = 1.0) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB on the host, resized with INTER_AREA if ``scale != 1``.

    Grey images are expanded to 3 channels and alpha is dropped; 16-bit images are
    reduced to 8 bits. Output size follows :func:`scaled_size`.
    """
    image = _decode(path, cv2.IMREAD_COLOR, "image")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return _resize(image, scale, cv2.INTER_AREA)


def _resize(array: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
    h, w = array.shape[:2]
    size = scaled_size(h, w, scale)
    if size == (h, w):
        return array
    return cv2.resize(array, (size[1], size[0]), interpolation=interpolation)


@lru_cache(maxsize=None)
def _label_table(kind: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(lut (256,) uint8 raw -> mapped, valid (256,) bool raw values allowed, description of allowed raw values)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    valid[IGNORE_INDEX] = True
    if kind == "cityscapes":
        # Raw labelIds are 0..33 (255 stands for -1); all are allowed, most map to void.
        valid[:34] = True
        for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
            lut[label_id] = train_id
        allowed = "labelIds 0..33 or 255"
    else:
        lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
        valid[:num_classes] = True
        allowed = f"0..{num_classes - 1} or 255"
        if kind == "segnet":
            valid[SEGNET_VOID] = True  # lut already maps it to 255
            allowed = f"0..{num_classes - 1}, {SEGNET_VOID} (void) or 255"
    lut.flags.writeable = valid.flags.writeable = False  # cached and shared between calls
    return lut, valid, allowed


def _decode_label(spec: DatasetSpec, path: Path | str) -> np.ndarray:
    """Full-size mapped label map, (H, W) uint8 in [0, C) or 255."""
    path = Path(path)
    raw = _decode(path, cv2.IMREAD_UNCHANGED, "label")
    if raw.ndim == 3:
        # A grey label saved as RGB is fine; a colour-coded one cannot be read as indices.
        if raw.shape[2] == 4:
            raw = raw[:, :, :3]
        if not (np.array_equal(raw[:, :, 0], raw[:, :, 1]) and np.array_equal(raw[:, :, 0], raw[:, :, 2])):
            raise GpualError(
                f"label {path} is a colour image: labels must be single-channel PNGs of class indices; convert it"
            )
        raw = np.ascontiguousarray(raw[:, :, 0])
    if raw.dtype != np.uint8:
        big = np.unique(raw[raw > 255]) if np.issubdtype(raw.dtype, np.integer) else np.array([])
        if not np.issubdtype(raw.dtype, np.integer) or big.size:
            shown = ", ".join(str(v) for v in big[:10].tolist()) or str(raw.dtype)
            raise GpualError(f"label {path} has values outside uint8 ({shown}): labels must be 8-bit class indices")
        raw = raw.astype(np.uint8)
    lut, valid, allowed = _label_table(spec.kind, spec.num_classes)
    # bincount over uint8 is one pass and gives every value present, for the error message.
    present = np.bincount(raw.ravel(), minlength=256).astype(bool)
    bad = np.flatnonzero(present & ~valid)
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
        raise GpualError(
            f"label {path} has values outside the classes ({shown}); the {spec.kind} layout allows {allowed}: fix the label"
        )
    return lut[raw]


def read_label(spec: DatasetSpec, path: Path | str, scale: float = 1.0) -> np.ndarray:
    """Decode and map a label file to (H, W) uint8 in ``[0, spec.num_classes)`` or 255, host memory.

    Resized with nearest neighbour if ``scale != 1`` (output size as :func:`scaled_size`).
    Raw values the layout does not allow raise GpualError naming the file and the values.
    """
    return _resize(_decode_label(spec, path), scale, cv2.INTER_NEAREST)


def load_pair(spec: DatasetSpec, sample: Sample, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 RGB, label (H, W) uint8) of one sample, both at ``scale``.

    The stored image and label must have the same size (checked before scaling).
    """
    if sample.label is None:
        raise GpualError(
            f"image {sample.image} has no label file (its split has no labels/ folder): evaluation and the full reference "
            "need ground truth; give this split a labels/ folder"
        )
    image = _decode(sample.image, cv2.IMREAD_COLOR, "image")
    label = _decode_label(spec, sample.label)
    if image.shape[:2] != label.shape:
        (ih, iw), (lh, lw) = image.shape[:2], label.shape
        raise GpualError(
            f"image {sample.image} is {iw}x{ih} but its label {sample.label} is {lw}x{lh} (width x height): "
            "a label must be the size of its image; fix or replace the label file"
        )
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return _resize(image, scale, cv2.INTER_AREA), _resize(label, scale, cv2.INTER_NEAREST)


def validate_split(spec: DatasetSpec, split: str, scale: float = 1.0) -> int:
    """Read every pair of ``split`` (full decode); raise on the first bad file; return the pair count."""
    samples = spec.samples(split)
    scaled_size(1, 1, scale)  # a bad scale fails before any decoding
    for sample in samples:
        load_pair(spec, sample, scale)
    return len(samples)
