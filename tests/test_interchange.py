"""`gpual export` / `gpual import`: round trips with Label Studio, CVAT and plain masks.

Each round trip exports a round, lets a simulated annotator label the exported files from
the ground truth (the way a person would in that tool), imports them, and compares with
what the simulated oracle (`gpual label`) gives for the same round in a copy of the
workspace: the training targets per image and the answer tables. Then every refusal of
`gpual import` is checked: one line, exit code 1, the workspace unchanged.
"""
from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd
import pytest

from cli_runner import run_cli
from gpual.datasets import open_dataset, read_label
from gpual.label_store import sparse_targets
from gpual.workspace import Workspace

COLUMNS = ["image", "region", "class", "kind", "labeled_pixels"]
SCALE = 0.5  # stored 96x64, working 48x32: exports are at the stored size, answers at the working one


# --- workspaces --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Synthetic scenes at scale 0.5 with round 0 selected; one label has a void block, so
    some queried regions are all void."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes

    root = tmp_path_factory.mktemp("interchange")
    spec = make_scenes(root / "data", n_train=4, n_val=2, height=64, width=96)
    label_path = spec.root / "train" / "labels" / "train_0001.png"
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[:48, :64] = 255
    cv2.imwrite(str(label_path), label)
    config = make_config("demo", {"data": {"root": str(spec.root), "dataset": "folder", "scale": SCALE},
                                  "superpixels": {"region_pixels": 32}})
    ws = Workspace.create(root / "ws", config)
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=120)
    return ws


def _copy(ws: Workspace, dest: Path, oracle: str = "pixel") -> Workspace:
    shutil.copytree(ws.root, dest)
    toml = dest / "gpual.toml"
    toml.write_text(toml.read_text().replace('oracle = "pixel"', f'oracle = "{oracle}"'))
    return Workspace.open(dest)


@pytest.fixture
def ws(base: Workspace, tmp_path: Path) -> Workspace:
    return _copy(base, tmp_path / "ws")


def oracle_answers(base: Workspace, dest: Path, oracle: str) -> Workspace:
    """A copy of ``base`` labelled by the simulated oracle (`gpual label`)."""
    from gpual.oracle import label_round

    ws = _copy(base, dest, oracle)
    label_round(ws, 0)
    return ws


def assert_same_answers(imported: Workspace, reference: Workspace, round: int = 0) -> None:
    """Same training targets per image and the same answer table (source and times aside)."""
    targets, expected = sparse_targets(imported, round), sparse_targets(reference, round)
    assert sorted(targets) == sorted(expected)
    for image in expected:
        np.testing.assert_array_equal(targets[image], expected[image], err_msg=image)
    got = imported.read_answers(round)[COLUMNS].sort_values(["image", "region"]).reset_index(drop=True)
    want = reference.read_answers(round)[COLUMNS].sort_values(["image", "region"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _export(capsys, ws: Workspace, fmt: str, out: Path, round: int = 0) -> Path:
    r = run_cli(capsys, "export", ws.root, "--round", round, "--format", fmt, "--out", out)
    assert r.code == 0, r.err
    return out


def _import(capsys, ws: Workspace, path: Path, *extra: str):
    return run_cli(capsys, "import", ws.root, "--round", "0", path, *extra)


# --- the simulated annotator -------------------------------------------------------------


def ground_truth(ws: Workspace, image: str, scale: float = 1.0) -> np.ndarray:
    """(H, W) uint8 ground truth of a pool image (class ids, 255 = void) at ``scale``."""
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    sample = {s.id: s for s in spec.samples(ws.config.data.pool_split)}[image]
    return read_label(spec, sample.label, scale)


def class_name(ws: Workspace, value: int) -> str:
    classes = open_dataset(ws.config.data.dataset, ws.config.data.root).classes
    return "void" if value == 255 else classes[value]


def annotate_label_studio(ws: Workspace, export: Path, dest: Path) -> Path:
    """Label Studio's JSON export after an annotator painted every pre-annotated region with
    its ground truth: per region, one brush per class present (void included)."""
    from label_studio_converter.brush import decode_rle, mask2rle

    tasks = json.loads((export / "tasks.json").read_text())
    for number, task in enumerate(tasks):
        gt = ground_truth(ws, task["data"]["gpual_image"])
        results = []
        for prediction in task["predictions"][0]["result"]:
            h, w = prediction["original_height"], prediction["original_width"]
            region = decode_rle(prediction["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            for value in np.unique(gt[region]).tolist():
                mask = (region & (gt == value)).astype(np.uint8) * 255
                results.append({**prediction, "id": f"{prediction['id']}-{value}",
                                "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [class_name(ws, value)]}})
        # A later annotation that was cancelled is not the answer.
        task["annotations"] = [{"id": 2 * number, "result": results, "was_cancelled": False},
                               {"id": 2 * number + 1, "result": [], "was_cancelled": True}]
        task["id"] = number + 1
    path = dest / "project-1-at-2025.json"
    path.write_text(json.dumps(tasks))
    return path


def cvat_rle(mask: np.ndarray) -> tuple[str, int, int, int, int]:
    """(rle, left, top, width, height) of a CVAT mask: run lengths over its box, 0s first."""
    ys, xs = np.nonzero(mask)
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    flat = mask[top:bottom + 1, left:right + 1].reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    return ", ".join(map(str, runs.tolist())), int(left), int(top), int(right - left + 1), int(bottom - top + 1)


def _polygon_mask(points: str, shape: tuple[int, int]) -> np.ndarray:
    pts = np.array([[float(v) for v in p.split(",")] for p in points.split(";")]).round().astype(np.int32)
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [pts], 1)
    return out.astype(bool)


def annotate_cvat(ws: Workspace, export: Path, dest: Path, mode: str) -> Path:
    """CVAT's "CVAT for images 1.1" export (a zip) after an annotator labelled every polygon:
    ``pixel``: replaced by one mask per ground-truth class inside it (CVAT's brush);
    ``dominant``: relabelled with the region's majority class (void if it has none)."""
    from gpual.oracle import region_stats
    from gpual.superpixels import load_superpixels

    tree = ET.parse(export / "annotations.xml")
    for element in tree.getroot().findall("image"):
        image = element.get("name").rsplit(".", 1)[0]
        shape = (int(element.get("height")), int(element.get("width")))
        gt = ground_truth(ws, image)
        sp = load_superpixels(ws, image).astype(np.int64)
        _, dominant = region_stats(ground_truth(ws, image, SCALE), sp, int(sp.max()) + 1)
        for polygon in element.findall("polygon"):
            inside = _polygon_mask(polygon.get("points"), shape)
            if mode == "dominant":
                small = cv2.resize(inside.astype(np.uint8), sp.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
                region = np.bincount(sp[small]).argmax()
                polygon.set("label", class_name(ws, int(dominant[region])))
                continue
            element.remove(polygon)
            for value in np.unique(gt[inside]).tolist():
                rle, left, top, width, height = cvat_rle(inside & (gt == value))
                ET.SubElement(element, "mask", label=class_name(ws, value), source="manual", occluded="0", rle=rle,
                              left=str(left), top=str(top), width=str(width), height=str(height),
                              z_order=polygon.get("z_order"))
    path = dest / "task_1_annotations.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("annotations.xml", ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True))
    return path


def annotate_masks(ws: Workspace, export: Path, size: str = "stored", everywhere: bool = False) -> Path:
    """Label PNGs in labels/: the ground truth inside the exported regions (everywhere with
    ``everywhere``), 255 elsewhere, at the stored or the working size."""
    from gpual.superpixels import load_superpixels

    manifest = json.loads((export / "gpual-export.json").read_text())
    for entry in manifest["images"]:
        stem = quote(entry["id"], safe="")
        if size == "stored":
            regions = cv2.imread(str(export / "regions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert regions.dtype == np.uint16 and list(regions.shape) == entry["stored_size"]
            gt = ground_truth(ws, entry["id"])
        else:
            sp = load_superpixels(ws, entry["id"])
            regions = np.isin(sp, entry["regions"])
            gt = ground_truth(ws, entry["id"], SCALE)
        label = gt if everywhere else np.where(regions > 0, gt, 255).astype(np.uint8)
        cv2.imwrite(str(export / "labels" / f"{stem}.png"), label)
    return export


# --- round trips -------------------------------------------------------------------------


def test_label_studio_round_trip_equals_the_pixel_oracle(capsys, base: Workspace, ws: Workspace, tmp_path: Path) -> None:
    export = _export(capsys, ws, "label-studio", tmp_path / "ls")
    tasks = json.loads((export / "tasks.json").read_text())
    config = ET.parse(export / "labeling-config.xml").getroot()
    names = [label.get("value") for label in config.iter("Label")]
    assert names == ["background", "disc", "box", "triangle", "stripe", "void", "to label"]
    assert config.find("BrushLabels").get("toName") == config.find("Image").get("name") == "image"
    # Images are served by Label Studio's local files storage, relative to the document root (the dataset root here).
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=train/images/{tasks[0]['data']['gpual_image']}.png"
    assert sum(len(t["predictions"][0]["result"]) for t in tasks) == len(ws.read_query(0))

    r = _import(capsys, ws, annotate_label_studio(ws, export, tmp_path))
    assert r.code == 0, r.err
    assert "0 queried regions left empty" in r.out and "0 labelled pixels outside" in r.out
    assert "120 / 120 regions answered" in r.out
    assert (ws.read_answers(0)["source"] == "label-studio").all()
    reference = oracle_answers(base, tmp_path / "oracle", "pixel")
    assert (reference.read_answers(0)["class"] == 255).any() and (reference.read_answers(0)["kind"] == "pixels").any()
    assert_same_answers(ws, reference)


def test_cvat_masks_round_trip_equals_the_pixel_oracle(capsys, base: Workspace, ws: Workspace, tmp_path: Path) -> None:
    export = _export(capsys, ws, "cvat", tmp_path / "cvat")
    assert sorted(p.name for p in (export / "images").iterdir()) == sorted(f"{i}.png" for i in ws.read_query(0)["image"].unique())
    assert [label["name"] for label in json.loads((export / "labels.json").read_text())][-2:] == ["void", "to label"]
    r = _import(capsys, ws, annotate_cvat(ws, export, tmp_path, "pixel"))
    assert r.code == 0, r.err
    assert (ws.read_answers(0)["source"] == "cvat").all()
    assert_same_answers(ws, oracle_answers(base, tmp_path / "oracle", "pixel"))


def test_cvat_polygons_round_trip_equals_the_dominant_oracle(capsys, base: Workspace, ws: Workspace, tmp_path: Path) -> None:
    """A polygon carries one class: relabelling the exported polygons answers like `gpual label`
    with acquisition.oracle = "dominant" (the polygons fill exactly their regions)."""
    export = _export(capsys, ws, "cvat", tmp_path / "cvat")
    annotated = annotate_cvat(ws, export, tmp_path, "dominant")
    # CVAT exports the XML inside a zip; also read it unpacked, from the export folder.
    (export / "annotations.xml").write_bytes(zipfile.ZipFile(annotated).read("annotations.xml"))
    r = _import(capsys, ws, export)
    assert r.code == 0, r.err
    assert_same_answers(ws, oracle_answers(base, tmp_path / "oracle", "dominant"))


@pytest.mark.parametrize("size", ["stored", "working"])
def test_masks_round_trip_equals_the_pixel_oracle(capsys, base: Workspace, ws: Workspace, tmp_path: Path, size: str) -> None:
    export = annotate_masks(ws, _export(capsys, ws, "masks", tmp_path / "masks"), size)
    manifest = json.loads((export / "gpual-export.json").read_text())
    assert manifest["scale"] == SCALE and manifest["images"][0]["stored_size"] == [64, 96]
    assert manifest["images"][0]["working_size"] == [32, 48] and manifest["stamp"]["round"] == 0
    # 255 is "not labelled": the all-void regions stay unanswered, unless 255 is declared void.
    r = _import(capsys, ws, export)
    assert r.code == 0 and "regions left empty" in r.out and " 0 queried regions left empty" not in r.out
    r = _import(capsys, ws, export, "--empty-is-void")
    assert r.code == 0, r.err
    assert (ws.read_answers(0)["source"] == "masks").all()
    assert_same_answers(ws, oracle_answers(base, tmp_path / "oracle", "pixel"))


def test_labels_outside_the_query_are_counted_and_ignored(capsys, base: Workspace, ws: Workspace, tmp_path: Path) -> None:
    export = annotate_masks(ws, _export(capsys, ws, "masks", tmp_path / "masks"), everywhere=True)
    r = _import(capsys, ws, export, "--empty-is-void")
    assert r.code == 0, r.err
    outside = int(r.out.split("labelled pixels outside")[0].split(",")[-1].split()[-1])
    from gpual.superpixels import read_index

    # Every labelled working pixel outside the 120 queried regions is counted, none is stored.
    assert 0 < outside < int(read_index(ws)["pixels"].sum())
    assert_same_answers(ws, oracle_answers(base, tmp_path / "oracle", "pixel"))


def test_regions_left_empty_are_counted_and_stay_unanswered(capsys, ws: Workspace, tmp_path: Path) -> None:
    export = annotate_masks(ws, _export(capsys, ws, "masks", tmp_path / "masks"))
    kept = sorted((export / "labels").glob("*.png"))[0]
    for png in (export / "labels").glob("*.png"):
        if png != kept:
            png.unlink()
    query = ws.read_query(0)
    r = _import(capsys, ws, export)
    assert r.code == 0, r.err
    answered = len(ws.read_answers(0))
    assert 0 < answered < len(query) and f"{answered} / {len(query)} regions answered" in r.out
    assert f"{len(query) - answered} queried regions left empty" in r.out and "--partial" in r.out
    status = json.loads(run_cli(capsys, "status", ws.root, "--json").out)["rounds"][0]
    assert (status["answered"], status["queried"], status["label"]) == (answered, len(query), False)


# --- refusals: one line, exit 1, nothing written -----------------------------------------


def _refused(capsys, ws: Workspace, path: Path, match: str, *extra: str) -> None:
    before = _files(ws.root)
    r = _import(capsys, ws, path, *extra)
    assert r.code == 1, (r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1 and match in r.err, r.err
    assert _files(ws.root) == before


@pytest.fixture
def masks_export(capsys, ws: Workspace, tmp_path: Path) -> Path:
    return annotate_masks(ws, _export(capsys, ws, "masks", tmp_path / "masks"))


def test_refuses_an_unknown_image(capsys, ws: Workspace, masks_export: Path) -> None:
    shutil.copy(next((masks_export / "labels").glob("*.png")), masks_export / "labels" / "train_9999.png")
    _refused(capsys, ws, masks_export, "'train_9999', which has no queried region in round 0")


def test_refuses_an_unknown_class(capsys, ws: Workspace, masks_export: Path, tmp_path: Path) -> None:
    png = sorted((masks_export / "labels").glob("*.png"))[-1]  # the others are valid: still nothing is written
    label = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 9
    cv2.imwrite(str(png), label)
    _refused(capsys, ws, masks_export, "holds the value 9, not a class index (0..4)")

    export = _export(capsys, ws, "label-studio", tmp_path / "ls")
    path = annotate_label_studio(ws, export, tmp_path)
    tasks = json.loads(path.read_text())
    tasks[-1]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["Dragon"]
    path.write_text(json.dumps(tasks))
    _refused(capsys, ws, path, "uses the label 'Dragon', which is not one of the dataset's classes")


def test_refuses_a_mask_of_another_size(capsys, ws: Workspace, masks_export: Path, tmp_path: Path) -> None:
    png = sorted((masks_export / "labels").glob("*.png"))[0]
    cv2.imwrite(str(png), np.zeros((50, 70), np.uint8))
    _refused(capsys, ws, masks_export, "is 70x50, but masks must be at the image's stored size 96x64 "
             "(scaled to the working scale with nearest neighbour) or at the working size 48x32")

    from label_studio_converter.brush import mask2rle

    export = _export(capsys, ws, "label-studio", tmp_path / "ls")
    path = annotate_label_studio(ws, export, tmp_path)
    tasks = json.loads(path.read_text())
    tasks[0]["annotations"][0]["result"] = [{
        "type": "brushlabels", "original_width": 100, "original_height": 64,
        "value": {"format": "rle", "rle": mask2rle(np.full((64, 100), 255, np.uint8)), "brushlabels": ["disc"]}}]
    path.write_text(json.dumps(tasks))
    _refused(capsys, ws, path, "is 100x64, but masks must be at the image's stored size 96x64")


def test_refuses_another_round_workspace_or_selection(capsys, base: Workspace, ws: Workspace, masks_export: Path,
                                                      tmp_path: Path) -> None:
    manifest_path = masks_export / "gpual-export.json"
    manifest = json.loads(manifest_path.read_text())
    other = _copy(base, tmp_path / "other")  # same data and query, another workspace
    _refused(capsys, other, masks_export, f"was exported from another workspace ({ws.root.resolve()})")
    manifest_path.write_text(json.dumps({**manifest, "stamp": {**manifest["stamp"], "round": 1}}))
    _refused(capsys, ws, masks_export, "is an export of round 1, not round 0: import it with --round 1")
    manifest_path.write_text(json.dumps({**manifest, "stamp": {**manifest["stamp"], "query": "0" * 16}}))
    _refused(capsys, ws, masks_export, "exported from an earlier selection of round 0")

    export = _export(capsys, ws, "cvat", tmp_path / "cvat")
    annotated = annotate_cvat(ws, export, tmp_path, "pixel")
    _refused(capsys, other, annotated, "was exported from another workspace")  # the task name carries the stamp
    xml = zipfile.ZipFile(annotated).read("annotations.xml").decode().replace(
        json.loads((export / "gpual-export.json").read_text())["task_name"], "my task")
    (tmp_path / "renamed.xml").write_text(xml)
    _refused(capsys, ws, tmp_path / "renamed.xml", "carries no gpual stamp: name the CVAT task 'gpual-")
    (export / "annotations.xml").write_text(xml)  # beside its gpual-export.json, the export's stamp applies
    assert _import(capsys, ws, export / "annotations.xml").code == 0


def test_refuses_corrupt_files(capsys, ws: Workspace, masks_export: Path, tmp_path: Path) -> None:
    png = sorted((masks_export / "labels").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:40])
    _refused(capsys, ws, masks_export, "is not a readable PNG")

    bad_json = tmp_path / "export.json"
    bad_json.write_text('[{"data": {"gpual_image": ')
    _refused(capsys, ws, bad_json, "is not readable JSON")

    export = _export(capsys, ws, "label-studio", tmp_path / "ls")
    path = annotate_label_studio(ws, export, tmp_path)
    tasks = json.loads(path.read_text())
    tasks[0]["annotations"][0]["result"][0]["value"]["rle"] = [1, 2, 3]
    path.write_text(json.dumps(tasks))
    _refused(capsys, ws, path, "has a corrupt brush mask")

    bad_xml = tmp_path / "annotations.xml"
    bad_xml.write_text("<annotations><image name=")
    _refused(capsys, ws, bad_xml, "is not readable XML")
    export = _export(capsys, ws, "cvat", tmp_path / "cvat")
    xml = (export / "annotations.xml").read_text().replace('label="to label"', 'label="disc"', 1)
    (export / "annotations.xml").write_text(xml.replace('points="', 'points="x', 1))
    _refused(capsys, ws, export, "has a malformed <polygon>")


def test_refuses_nothing_labelled_and_a_trained_round(capsys, ws: Workspace, tmp_path: Path) -> None:
    export = _export(capsys, ws, "label-studio", tmp_path / "ls")
    # The pre-annotations alone (every region still "to label") answer nothing.
    _refused(capsys, ws, export / "tasks.json", "labels none of round 0's 120 queried regions")
    masks = annotate_masks(ws, _export(capsys, ws, "masks", tmp_path / "masks"))
    ws.checkpoint_path(0).write_bytes(b"")
    _refused(capsys, ws, masks, "round 0 is trained")


def test_export_refuses_to_overwrite(capsys, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = run_cli(capsys, "export", ws.root, "--round", "0", "--format", "masks", "--out", tmp_path / "busy")
    assert r.code == 1 and "is not a gpual export" in r.err and (tmp_path / "busy" / "notes.txt").exists()
    out = _export(capsys, ws, "masks", tmp_path / "out")
    r = run_cli(capsys, "export", ws.root, "--round", "0", "--format", "cvat", "--out", out)
    assert r.code == 1 and "--force" in r.err
    r = run_cli(capsys, "export", ws.root, "--round", "0", "--format", "cvat", "--out", out, "--force")
    assert r.code == 0 and json.loads((out / "gpual-export.json").read_text())["format"] == "cvat"
    r = run_cli(capsys, "export", ws.root, "--round", "1", "--format", "masks", "--out", tmp_path / "r1")
    assert r.code == 1 and "round 0 is not trained" in r.err


def test_scaling_rule_up_then_down_is_exact() -> None:
    """The stored-size region map scales back down to the working map exactly, at any ratio."""
    from gpual.datasets import scaled_size
    from gpual.interchange.regions import upscale

    rng = np.random.default_rng(0)
    for stored, scale in (((64, 96), 0.5), ((720, 960), 0.3), ((1024, 2048), 0.37), ((360, 480), 0.25), ((50, 70), 1.0)):
        h, w = scaled_size(*stored, scale)
        small = rng.integers(0, 500, (h, w)).astype(np.int32)
        big = upscale(small, stored)
        assert big.shape == stored
        np.testing.assert_array_equal(cv2.resize(big, (w, h), interpolation=cv2.INTER_NEAREST), small)


# --- real CamVid: a human loop through `import` matches the oracle loop ------------------


def _camvid_copy(camvid: Path, dest: Path, n_train: int, n_val: int, pool_labels: bool) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        (dest / split / "images").mkdir(parents=True)
        if split == "val" or pool_labels:
            (dest / split / "labels").mkdir(parents=True)
        for image in sorted((camvid / split / "images").glob("*.jpg"))[:n]:
            shutil.copy(image, dest / split / "images" / image.name)
            if split == "val" or pool_labels:
                shutil.copy(camvid / split / "labels" / f"{image.stem}.png", dest / split / "labels")
    return dest


@pytest.mark.slow
def test_camvid_rounds_through_import_match_the_oracle(capsys, camvid_root: Path, tmp_path: Path) -> None:
    """Rounds 0-1 on 6 unlabelled CamVid images, labelled only through `gpual import` (masks
    made from the real ground truth), give the same round-1 query and val mIoU as the same
    rounds labelled by the simulated oracle over a labelled copy."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.evaluation import evaluate
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.backend import resolve_device
    from gpual.training.loop import train_round

    started = time.perf_counter()
    cpu, backend = resolve_device("cpu"), cpu_backend()
    overrides = {"data": {"dataset": "camvid", "scale": 0.25}, "superpixels": {"region_pixels": 50},
                 "train": {"epochs_per_round": 1, "num_workers": 0}, "acquisition": {"init_budget": 60, "budget": 30}}
    workspaces = {}
    for name, labelled in (("human", False), ("oracle", True)):
        data = _camvid_copy(camvid_root, tmp_path / f"camvid-{name}", 6, 2, pool_labels=labelled)
        config = make_config("cpu-small", {**overrides, "data": {**overrides["data"], "root": str(data)}})
        workspaces[name] = ws = Workspace.create(tmp_path / f"ws-{name}", config)
        build_cache(ws, workers=1)
    human, oracle = workspaces["human"], workspaces["oracle"]
    truth = camvid_root / "train" / "labels"
    miou = {}
    for r in (0, 1):
        for ws in (human, oracle):
            acquire(ws, r, backend)
        pd.testing.assert_frame_equal(human.read_query(r), oracle.read_query(r))
        label_round(oracle, r)
        with pytest.raises(Exception, match="no ground truth"):
            label_round(human, r)  # the human workspace's pool has no labels: only import can label it
        out = _export(capsys, human, "masks", tmp_path / f"masks-{r}", r)
        for entry in json.loads((out / "gpual-export.json").read_text())["images"]:
            stem = quote(entry["id"], safe="")
            regions = cv2.imread(str(out / "regions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            gt = cv2.imread(str(truth / f"{entry['id']}.png"), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(out / "labels" / f"{stem}.png"), np.where(regions > 0, gt, 255).astype(np.uint8))
        result = run_cli(capsys, "import", human.root, "--round", r, out, "--empty-is-void")
        assert result.code == 0, result.err
        assert_same_answers(human, oracle, r)
        for ws in (human, oracle):
            train_round(ws, r, cpu)
        miou[r] = [evaluate(ws, r, "val", cpu)["miou"] for ws in (human, oracle)]
    assert miou[0][0] == miou[0][1] and miou[1][0] == miou[1][1], miou
    print(f"CamVid rounds 0-1 through import: val mIoU {miou}, {time.perf_counter() - started:.0f} s")

