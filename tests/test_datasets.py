"""Dataset layouts: listing, pairing, label mapping, scaling, and every bad-input error."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpual.datasets import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    DatasetSpec,
    Sample,
    load_pair,
    open_dataset,
    read_image,
    read_label,
    scaled_size,
    validate_split,
)
from gpual.errors import GpualError


def write_image(path: Path, h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    """Write a random RGB image (BGR on disk, as cv2 does) and return it as RGB."""
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label.astype(np.uint8))


def label_of(values: list[int], h: int = 6, w: int = 8, dtype: type = np.uint8) -> np.ndarray:
    """(h, w) label cycling through ``values`` row-major."""
    return np.resize(np.asarray(values, dtype), h * w).reshape(h, w)


def m(*parts: object) -> str:
    """A regex that matches all of ``parts`` (literally, in order) in one message."""
    return ".*".join(re.escape(str(p)) for p in parts)


# --- fixtures: one tiny dataset per layout ------------------------------------------------


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    root = tmp_path / "camvid"
    write_image(root / "train" / "images" / "b_0002.jpg")
    write_image(root / "train" / "images" / "a_0001.png")
    write_label(root / "train" / "labels" / "a_0001.png", label_of([0, 3, 10, 255]))
    write_label(root / "train" / "labels" / "b_0002.png", label_of([1, 2]))
    write_image(root / "val" / "images" / "c_0003.jpg")
    write_label(root / "val" / "labels" / "c_0003.png", label_of([5]))
    (root / "train" / "images" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    return root


@pytest.fixture
def segnet(tmp_path: Path) -> Path:
    root = tmp_path / "segnet"
    for split, stems in (("train", ["0001TP_006690", "0001TP_006720"]), ("val", ["0016E5_07959"]), ("test", ["Seq05VD_f00000"])):
        for i, stem in enumerate(stems):
            write_image(root / split / f"{stem}.png", seed=i)
            write_label(root / f"{split}annot" / f"{stem}.png", label_of([0, 4, 10, 11]))
    return root


CITY_STEMS = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bochum", "bochum_000000_000313")]


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for city, stem in CITY_STEMS:
        write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        write_label(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", label_of([7, 8, 26, 33, 0, 4, 255]))
        # The other gtFine files must not be taken for labels.
        write_label(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png", label_of([0]))
        write_image(root / "gtFine" / "train" / city / f"{stem}_gtFine_color.png")
        (root / "gtFine" / "train" / city / f"{stem}_gtFine_polygons.json").write_text("{}")
    write_image(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    write_label(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", label_of([23]))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    root.mkdir()
    (root / "classes.txt").write_text("# my classes\nbackground\n\ncat\n  dog  \n# trailing comment\n")
    write_image(root / "train" / "images" / "x1.jpeg")
    write_image(root / "train" / "images" / "x2.PNG")
    write_label(root / "train" / "labels" / "x1.png", label_of([0, 1, 2, 255]))
    write_label(root / "train" / "labels" / "x2.png", label_of([2]))
    return root


# --- the four layouts -----------------------------------------------------------------------


def test_camvid_layout(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    assert spec.kind == "camvid" and spec.root == camvid
    assert spec.classes == CAMVID_CLASSES and spec.num_classes == 11 and spec.ignore_index == IGNORE_INDEX == 255
    assert spec.splits() == ["train", "val"]  # no test split: just not listed
    train = spec.samples("train")
    assert [s.id for s in train] == ["a_0001", "b_0002"]
    assert train[0] == Sample("a_0001", camvid / "train/images/a_0001.png", camvid / "train/labels/a_0001.png")
    assert train[1].image.name == "b_0002.jpg" and train[1].label == camvid / "train/labels/b_0002.png"
    image, label = load_pair(spec, train[0])
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, label_of([0, 3, 10, 255]))
    assert [s.id for s in spec.samples("val")] == ["c_0003"]
    with pytest.raises(GpualError, match=m("'test'", camvid / "test" / "images", "missing")):
        spec.samples("test")


def test_camvid_accepts_string_root_and_relative_path(camvid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(camvid.parent)
    spec = open_dataset("camvid", "camvid")
    assert spec.root == camvid and spec.samples("train")[0].image.is_absolute()


def test_segnet_layout_maps_11_to_void(segnet: Path) -> None:
    spec = open_dataset("segnet", segnet)
    assert spec.classes == CAMVID_CLASSES
    assert spec.splits() == ["test", "train", "val"]
    train = spec.samples("train")
    assert [s.id for s in train] == ["0001TP_006690", "0001TP_006720"]
    assert train[0].image == segnet / "train/0001TP_006690.png"
    assert train[0].label == segnet / "trainannot/0001TP_006690.png"
    np.testing.assert_array_equal(read_label(spec, train[0].label), label_of([0, 4, 10, 255]))
    assert [s.id for s in spec.samples("test")] == ["Seq05VD_f00000"]


def test_cityscapes_layout_maps_label_ids_to_train_ids(cityscapes: Path) -> None:
    spec = open_dataset("cityscapes", cityscapes)
    assert spec.classes == CITYSCAPES_CLASSES and spec.num_classes == 19
    assert spec.splits() == ["train", "val"]
    train = spec.samples("train")
    assert [s.id for s in train] == [f"{city}/{stem}" for city, stem in CITY_STEMS]
    assert train[2].label == cityscapes / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    # 7 road->0, 8 sidewalk->1, 26 car->13, 33 bicycle->18; 0 unlabeled, 4 static, 255 (-1) -> void
    np.testing.assert_array_equal(read_label(spec, train[0].label), label_of([0, 1, 13, 18, 255, 255, 255]))
    _, val_label = load_pair(spec, spec.samples("val")[0])
    assert set(np.unique(val_label).tolist()) == {10}  # 23 sky -> 10


def test_cityscapes_full_table() -> None:
    from gpual.datasets import CITYSCAPES_LABEL_TO_TRAIN

    assert sorted(CITYSCAPES_LABEL_TO_TRAIN.values()) == list(range(19))
    assert [CITYSCAPES_LABEL_TO_TRAIN[i] for i in (7, 11, 17, 21, 24, 28, 31, 32)] == [0, 2, 5, 8, 11, 15, 16, 17]


def test_folder_layout(folder: Path) -> None:
    spec = open_dataset("folder", folder)
    assert spec.classes == ("background", "cat", "dog") and spec.num_classes == 3
    assert spec.splits() == ["train"]
    samples = spec.samples("train")
    assert [s.id for s in samples] == ["x1", "x2"]
    assert samples[0].image.name == "x1.jpeg" and samples[1].image.name == "x2.PNG"
    assert validate_split(spec, "train") == 2
    np.testing.assert_array_equal(read_label(spec, samples[0].label), label_of([0, 1, 2, 255]))


def test_folder_without_classes_txt(folder: Path) -> None:
    (folder / "classes.txt").unlink()
    with pytest.raises(GpualError, match=m(folder / "classes.txt", "missing", "write one")):
        open_dataset("folder", folder)


def test_folder_with_empty_or_duplicate_classes(folder: Path) -> None:
    (folder / "classes.txt").write_text("# nothing\n\n")
    with pytest.raises(GpualError, match=m(folder / "classes.txt", "no classes")):
        open_dataset("folder", folder)
    (folder / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(GpualError, match=m(folder / "classes.txt", "more than once", "a")):
        open_dataset("folder", folder)


def test_folder_label_range_uses_classes_txt(folder: Path) -> None:
    spec = open_dataset("folder", folder)
    bad = folder / "train" / "labels" / "x2.png"
    write_label(bad, label_of([0, 3, 7]))
    with pytest.raises(GpualError, match=m(bad, "3, 7", "0..2 or 255")):
        read_label(spec, bad)


# --- reading and scaling ----------------------------------------------------------------------


def test_scaled_size_rule() -> None:
    assert scaled_size(360, 480, 1.0) == (360, 480)
    assert scaled_size(360, 480, 0.5) == (180, 240)
    assert scaled_size(360, 480, 1 / 3) == (120, 160)
    assert scaled_size(7, 9, 0.5) == (round(3.5), round(4.5)) == (4, 4)
    assert scaled_size(3, 3, 0.01) == (1, 1)  # never zero-sized
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(GpualError, match="scale must be > 0"):
            scaled_size(10, 10, bad)


def test_read_image_is_rgb_and_scales_with_area(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    bgr = np.zeros((10, 14, 3), np.uint8)
    bgr[:, :, 2] = 255  # pure red in OpenCV's BGR order
    bgr[:, 7:, :] = 0
    cv2.imwrite(str(path), bgr)
    image = read_image(path)
    assert image.shape == (10, 14, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0]
    half = read_image(str(path), 0.5)
    assert half.shape == (5, 7, 3)
    # INTER_AREA averages 2x2 blocks: the column straddling the red/black edge is mixed.
    assert half[0, 0].tolist() == [255, 0, 0] and half[0, 3].tolist() == [128, 0, 0] and half[0, 6].tolist() == [0, 0, 0]
    assert read_image(path, 1.5).shape == (15, 21, 3)
    # Thin lines (every 4th column red) survive a 4x reduction as their area share; a
    # point-sampling or bilinear resize would drop them.
    lines = np.zeros((8, 8, 3), np.uint8)
    lines[:, ::4, 2] = 255
    cv2.imwrite(str(path), lines)
    assert read_image(path, 0.25)[:, :, 0].tolist() == [[64, 64], [64, 64]]


def test_read_label_scales_nearest(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    label = np.zeros((12, 16), np.uint8)
    label[:, 8:] = 10
    label[0, 0] = 255
    path = camvid / "train" / "labels" / "a_0001.png"
    write_label(path, label)
    small = read_label(spec, path, 0.5)
    assert small.shape == (6, 8) and small.dtype == np.uint8
    assert set(np.unique(small).tolist()) <= {0, 10, 255}  # no blended values
    np.testing.assert_array_equal(small[:, 4:], 10)
    big = read_label(spec, path, 1 / 3)
    assert big.shape == scaled_size(12, 16, 1 / 3) == (4, 5)


def test_load_pair_scales_both_alike(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    sample = spec.samples("train")[0]
    for scale in (0.5, 0.75, 1 / 3, 2.0):
        image, label = load_pair(spec, sample, scale)
        assert image.shape[:2] == label.shape == scaled_size(6, 8, scale)


def test_grey_label_saved_as_rgb_is_accepted(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    path = camvid / "train" / "labels" / "a_0001.png"
    grey = label_of([1, 2, 255])
    cv2.imwrite(str(path), np.stack([grey] * 3, axis=-1))
    np.testing.assert_array_equal(read_label(spec, path), grey)


# --- errors -----------------------------------------------------------------------------------


def test_image_without_label(camvid: Path) -> None:
    (camvid / "train" / "labels" / "b_0002.png").unlink()
    spec = open_dataset("camvid", camvid)
    with pytest.raises(GpualError, match=m(camvid / "train/images/b_0002.jpg", "no label", camvid / "train/labels/b_0002.png")):
        spec.samples("train")


def test_label_without_image(camvid: Path) -> None:
    write_label(camvid / "train" / "labels" / "z_0009.png", label_of([0]))
    spec = open_dataset("camvid", camvid)
    with pytest.raises(GpualError, match=m(camvid / "train/labels/z_0009.png", "no image")):
        spec.samples("train")


def test_segnet_partner_errors(segnet: Path) -> None:
    spec = open_dataset("segnet", segnet)
    (segnet / "valannot" / "0016E5_07959.png").unlink()
    with pytest.raises(GpualError, match=m(segnet / "val/0016E5_07959.png", "no label", segnet / "valannot")):
        spec.samples("val")
    write_label(segnet / "trainannot" / "extra.png", label_of([0]))
    with pytest.raises(GpualError, match=m(segnet / "trainannot/extra.png", "no image")):
        spec.samples("train")
    import shutil

    shutil.rmtree(segnet / "testannot")
    assert spec.splits() == ["train", "val"]
    with pytest.raises(GpualError, match=m("'test'", segnet / "testannot", "missing")):
        spec.samples("test")


def test_cityscapes_partner_errors(cityscapes: Path) -> None:
    spec = open_dataset("cityscapes", cityscapes)
    label = cityscapes / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(GpualError, match=m("aachen_000001_000019_leftImg8bit.png", "no label", label)):
        spec.samples("train")
    write_label(label, label_of([7]))
    (cityscapes / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png").unlink()
    with pytest.raises(GpualError, match=m("bochum_000000_000313_gtFine_labelIds.png", "no image")):
        spec.samples("train")


def test_duplicate_ids(camvid: Path) -> None:
    write_image(camvid / "train" / "images" / "a_0001.jpg")
    spec = open_dataset("camvid", camvid)
    with pytest.raises(GpualError, match=m("a_0001", "same id")):
        spec.samples("train")


def test_size_mismatch_names_both_files_and_sizes(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    sample = spec.samples("train")[1]
    write_label(sample.label, np.zeros((5, 8), np.uint8))
    with pytest.raises(GpualError, match=m(sample.image, "8x6", sample.label, "8x5")):
        load_pair(spec, sample)
    with pytest.raises(GpualError, match=m(sample.label, "8x5")):
        validate_split(spec, "train")


@pytest.mark.parametrize(
    ("kind", "values", "bad"),
    [("camvid", [0, 11, 12, 200], "11, 12, 200"), ("segnet", [0, 11, 12], "12"), ("cityscapes", [7, 34, 254], "34, 254")],
)
def test_label_values_outside_range(tmp_path: Path, kind: str, values: list[int], bad: str) -> None:
    spec = DatasetSpec(kind, tmp_path, CITYSCAPES_CLASSES if kind == "cityscapes" else CAMVID_CLASSES)
    path = tmp_path / "bad_label.png"
    write_label(path, label_of(values))
    with pytest.raises(GpualError, match=m(path, f"({bad})", kind)):
        read_label(spec, path)


def test_colour_label_rejected(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    path = camvid / "train" / "labels" / "a_0001.png"
    write_image(path)
    with pytest.raises(GpualError, match=m(path, "colour image", "single-channel")):
        read_label(spec, path)


def test_16bit_label(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    path = camvid / "train" / "labels" / "a_0001.png"
    cv2.imwrite(str(path), label_of([3, 255]).astype(np.uint16))
    np.testing.assert_array_equal(read_label(spec, path), label_of([3, 255]))
    cv2.imwrite(str(path), label_of([3, 1000], dtype=np.uint16))
    with pytest.raises(GpualError, match=m(path, "1000")):
        read_label(spec, path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_files(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    a, b = spec.samples("train")
    _truncate(b.image)  # a truncated JPEG
    with pytest.raises(GpualError, match=m("image", b.image, "not a readable image")):
        read_image(b.image)
    with pytest.raises(GpualError, match=m(b.image, "not a readable image")):
        validate_split(spec, "train")
    a.image.write_bytes(b"this is not a PNG at all" * 10)  # garbage bytes
    with pytest.raises(GpualError, match=m(a.image, "not a readable image")):
        load_pair(spec, a)
    a.image.write_bytes(b"")  # empty file
    with pytest.raises(GpualError, match=m(a.image, "not a readable image")):
        read_image(a.image)
    _truncate(a.label)  # a truncated PNG label
    with pytest.raises(GpualError, match=m("label", a.label, "not a readable image")):
        read_label(spec, a.label)


def test_unreadable_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GpualError, match=m(tmp_path / "nope.png", "exists")):
        read_image(tmp_path / "nope.png")


def test_empty_split(camvid: Path) -> None:
    for f in (camvid / "val" / "images").iterdir():
        f.unlink()
    for f in (camvid / "val" / "labels").iterdir():
        f.unlink()
    spec = open_dataset("camvid", camvid)
    with pytest.raises(GpualError, match=m("'val'", "no images", camvid / "val" / "images")):
        spec.samples("val")
    with pytest.raises(GpualError, match=m("'val'", "no images")):
        validate_split(spec, "val")


def test_unknown_kind(camvid: Path) -> None:
    with pytest.raises(GpualError, match=m("unknown dataset kind 'pascal'", "camvid, segnet, cityscapes, folder")) as info:
        open_dataset("pascal", camvid)
    assert info.value.exit_code == 2


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(GpualError, match=m(tmp_path / "absent", "does not exist")):
        open_dataset("camvid", tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GpualError, match=m(tmp_path / "file", "not a folder")):
        open_dataset("camvid", tmp_path / "file")


def test_layout_not_recognised(tmp_path: Path, segnet: Path, camvid: Path, cityscapes: Path) -> None:
    with pytest.raises(GpualError, match=m(segnet, "not a camvid dataset", "expected", "images", "segnet layout")):
        open_dataset("camvid", segnet)
    with pytest.raises(GpualError, match=m(camvid, "not a segnet dataset", "trainannot", "camvid or folder")):
        open_dataset("segnet", camvid)
    with pytest.raises(GpualError, match=m(cityscapes, "not a camvid dataset", "cityscapes layout")):
        open_dataset("camvid", cityscapes)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GpualError, match=m(empty, "not a cityscapes dataset", "leftImg8bit")):
        open_dataset("cityscapes", empty)


def test_a_split_without_labels_is_an_unlabelled_pool(camvid: Path) -> None:
    import shutil

    shutil.rmtree(camvid / "val" / "labels")
    spec = open_dataset("camvid", camvid)
    samples = spec.samples("val")
    assert samples and all(s.label is None for s in samples)
    assert not spec.has_labels("val") and spec.has_labels("train")
    with pytest.raises(GpualError, match=m(samples[0].image, "no label file", "labels/ folder")):
        load_pair(spec, samples[0])


def test_sample_without_label(camvid: Path) -> None:
    spec = open_dataset("camvid", camvid)
    sample = Sample("a_0001", camvid / "train/images/a_0001.png", None)
    with pytest.raises(GpualError, match=m("a_0001", "no label file")):
        load_pair(spec, sample)


# --- the real CamVid --------------------------------------------------------------------------


def test_real_camvid(camvid_root: Path) -> None:
    spec = open_dataset("camvid", camvid_root)
    assert spec.splits() == ["train", "val"]
    train, val = spec.samples("train"), spec.samples("val")
    assert len(train) == 367 and len(val) == 101
    assert train[0].id == "0001TP_006690"
    image, label = load_pair(spec, train[0])
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert label.shape == (360, 480) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= set(range(11)) | {255}
    image, label = load_pair(spec, val[-1], 0.5)
    assert image.shape == (180, 240, 3) and label.shape == (180, 240)
