"""Bad inputs through the real ``gpual`` entry point, as a table: every case gets a copy of a
prepared workspace, breaks one thing, runs one command and asserts

- the exit code of gpual.errors' rule (2 = bad option, config or environment; 1 = bad data
  or state),
- stderr is exactly one line, ``error: ...``, with no traceback,
- the case folder (the workspace, its dataset and any export beside them) is byte-identical
  afterwards: a listing of every file (path, size, sha256) and folder, before and after.

The prepared workspaces (init, superpixels, round 0 selected / labelled / trained) are built
once, each at the one path every case then uses (``<tmp>/case``), and moved aside; a case
copies one back there. So the absolute paths a workspace keeps (the dataset root in
gpual.toml, the image paths of the superpixel index) stay valid without editing anything,
and copy2 keeps the mtimes the staleness check compares.

Machine refusals that need privileges (a read-only mount, a full tmpfs) run the command in a
user + mount namespace (``unshare -rm``) and skip, saying why, where that is refused.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from cli_runner import cli_quiet, mount_namespace_or_skip, run_cli
from conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[1]
# The real entry point in a fresh process (for runs inside a mount namespace).
GPUAL = [sys.executable, "-c", "import sys; sys.argv[0] = 'gpual'; from cli.main import main; main()"]
TEMPLATES = ("init", "superpixels", "selected", "labeled", "trained")


# --- listing and the one-line rule ------------------------------------------------------------


def listing(root: Path) -> dict[str, tuple[int, str] | str]:
    """Every file (size, sha256 of its bytes) and folder under ``root``, by relative path."""
    out: dict[str, tuple[int, str] | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            out[rel] = "<folder>"
        else:
            data = path.read_bytes()
            out[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return out


# The same listing inside a mount namespace, printed as JSON (the tmpfs exists only there).
LISTING_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
root = Path(sys.argv[1])
out = {}
for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    if path.is_dir() and not path.is_symlink():
        out[rel] = "<folder>"
    else:
        data = path.read_bytes()
        out[rel] = [len(data), hashlib.sha256(data).hexdigest()]
print(json.dumps(out, sort_keys=True))
"""


def one_line_error(code: int, err: str, expected_code: int, needles: tuple[str, ...] = ()) -> str:
    """Assert ``err`` is one ``error:`` line (no traceback) and ``code`` is ``expected_code``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == expected_code, (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- the prepared workspaces ------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Where a case lives (``case``: data/ and ws/ in it) and the templates to copy there."""

    case: Path
    templates: dict[str, Path]

    def fresh(self, template: str) -> Path:
        """``case`` emptied and filled with ``template``'s copy; returns ``case``."""
        if self.case.exists():
            _make_writable(self.case)
            shutil.rmtree(self.case)
        shutil.copytree(self.templates[template], self.case, symlinks=True)
        return self.case


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o700)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    from gpual.synthetic import make_scenes

    top = tmp_path_factory.mktemp("bad_inputs")
    case = top / "case"
    make_scenes(case / "data", n_train=4, n_val=1, height=32, width=48)
    ws = case / "ws"
    steps = {
        "init": ("init", ws, "--data", case / "data", "--dataset", "folder", "--preset", "demo",
                 "--set", "acquisition.init_budget=30", "--set", "acquisition.budget=8",
                 "--set", "acquisition.overlays=1", "--set", "train.epochs_per_round=1"),
        "superpixels": ("superpixels", ws, "--workers", "1"),
        "selected": ("select", ws, "--round", "0", "--device", "cpu"),
        "labeled": ("label", ws, "--round", "0"),
        "trained": ("train", ws, "--round", "0", "--device", "cpu"),
    }
    templates = {}
    for name in TEMPLATES:
        cli_quiet(*steps[name])
        if name == "init":
            (ws / ".lock").touch()  # what every later command leaves: the listings compare it
        templates[name] = top / f"template-{name}"
        shutil.copytree(case, templates[name], symlinks=True)
    return Prepared(case, templates)


# --- how cases break things -----------------------------------------------------------------


def pool_image(case: Path, i: int) -> Path:
    return sorted((case / "data" / "train" / "images").iterdir())[i]


def pool_label(case: Path, i: int) -> Path:
    return sorted((case / "data" / "train" / "labels").iterdir())[i]


def queried_image(case: Path) -> Path:
    import pandas as pd

    image = str(pd.read_parquet(case / "ws" / "rounds" / "000" / "query.parquet")["image"].iloc[0])
    return case / "data" / "train" / "images" / f"{image}.png"


def replace_by_another_scene(image: Path) -> None:
    """``image``'s bytes become another pool scene's (same width and height)."""
    other = next(p for p in sorted(image.parent.iterdir()) if p != image)
    image.write_bytes(other.read_bytes())


def truncated_jpeg(case: Path) -> None:
    """The second pool image becomes a truncated JPEG (the same id)."""
    image = pool_image(case, 1)
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(image)))
    assert ok
    image.with_suffix(".jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    image.unlink()


def resized_label(case: Path) -> None:
    label = queried_label(case)
    cv2.imwrite(str(label), np.zeros((20, 48), np.uint8))


def out_of_range_label(case: Path) -> None:
    label = queried_label(case)
    array = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    array[:4, :4] = 7  # classes are 0..4 (255 = void)
    cv2.imwrite(str(label), array)


def queried_label(case: Path) -> Path:
    return case / "data" / "train" / "labels" / queried_image(case).name


def edit_config(old: str, new: str) -> Callable[[Path], None]:
    def edit(case: Path) -> None:
        config = case / "ws" / "gpual.toml"
        text = config.read_text()
        assert old in text, old
        config.write_text(text.replace(old, new, 1))

    return edit


def garbage(relative: str, keep: int | None = None) -> Callable[[Path], None]:
    """Cut the file at ``relative`` to its first ``keep`` bytes (None: replace by junk)."""

    def damage(case: Path) -> None:
        path = case / relative
        path.write_bytes(b"not what gpual wrote\n" if keep is None else path.read_bytes()[:keep])

    return damage


def delete(relative: str) -> Callable[[Path], None]:
    def remove(case: Path) -> None:
        path = case / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return remove


def no_pool_images(case: Path) -> None:
    for kind in ("images", "labels"):
        for path in (case / "data" / "train" / kind).iterdir():
            path.unlink()


def label_removed(case: Path) -> None:
    pool_label(case, 2).unlink()


def move_data(case: Path) -> None:
    (case / "data").rename(case / "data-moved")


def file_as_workspace(case: Path) -> None:
    (case / "notes.txt").write_text("not a workspace\n")


def file_as_out(case: Path) -> None:
    (case / "out.txt").write_text("not a folder\n")


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    template: str
    args: tuple[str, ...]  # "{ws}", "{data}" and "{case}" are filled in
    code: int
    needles: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = None


CASES = [
    # the dataset
    Case("missing-data-dir-init", "init", ("init", "{case}/ws2", "--data", "{case}/nope", "--dataset", "folder"), 1,
         ("does not exist",)),
    Case("missing-data-dir-later", "init", ("superpixels", "{ws}"), 1, ("does not exist",), move_data),
    Case("image-without-label", "selected", ("label", "{ws}", "--round", "0"), 1, ("has no label", "add it or remove the image"),
         label_removed),
    Case("image-without-label-init", "init", ("init", "{case}/ws2", "--data", "{data}", "--dataset", "folder"), 1,
         ("has no label",), label_removed),
    Case("label-size-mismatch", "selected", ("label", "{ws}", "--round", "0"), 1, ("the label file does not match its image", "fix or replace it"),
         resized_label),
    Case("label-value-out-of-range", "selected", ("label", "{ws}", "--round", "0"), 1,
         ("has values outside the classes (7)", "fix the label"), out_of_range_label),
    Case("truncated-jpeg", "init", ("superpixels", "{ws}", "--workers", "1"), 1, ("truncated", "replace or remove it"),
         truncated_jpeg),
    Case("truncated-jpeg-after-cache", "superpixels", ("superpixels", "{ws}", "--workers", "1", "--region-pixels", "32"), 1,
         ("truncated",), truncated_jpeg),
    Case("empty-pool", "init", ("init", "{case}/ws2", "--data", "{data}", "--dataset", "folder"), 1, ("has no images",),
         no_pool_images),
    Case("unknown-dataset-kind", "init", ("init", "{case}/ws2", "--data", "{data}", "--dataset", "pascal"), 2,
         ("unknown dataset kind 'pascal'",)),
    # options
    Case("unknown-strategy", "trained", ("select", "{ws}", "--round", "1", "--strategy", "oracle-magic"), 2,
         ("oracle-magic",)),
    Case("unknown-strategy-set", "init", ("init", "{case}/ws2", "--data", "{data}", "--dataset", "folder",
                                          "--set", "acquisition.strategy=oracle-magic"), 2, ("oracle-magic",)),
    Case("budget-larger-than-pool", "superpixels", ("select", "{ws}", "--round", "0", "--budget", "100000"), 1,
         ("larger than the",)),
    Case("budget-zero", "superpixels", ("select", "{ws}", "--round", "0", "--budget", "0"), 2,
         ("Invalid value for '--budget'",)),
    Case("budget-negative", "superpixels", ("select", "{ws}", "--round", "0", "--budget", "-4"), 2,
         ("Invalid value for '--budget'",)),
    Case("budget-pixels-not-a-number", "superpixels", ("select", "{ws}", "--round", "0", "--budget-pixels", "lots"), 2,
         ("--budget-pixels",)),
    Case("budget-pixels-zero", "superpixels", ("select", "{ws}", "--round", "0", "--budget-pixels", "0%"), 2,
         ("--budget-pixels",)),
    Case("budget-pixels-negative", "superpixels", ("select", "{ws}", "--round", "0", "--budget-pixels", "-1%"), 2,
         ("--budget-pixels",)),
    Case("budget-pixels-over-100", "superpixels", ("select", "{ws}", "--round", "0", "--budget-pixels", "150%"), 2,
         ("--budget-pixels",)),
    Case("round-negative", "superpixels", ("select", "{ws}", "--round", "-1"), 2, ("Invalid value for '--round'",)),
    Case("unknown-split", "trained", ("evaluate", "{ws}", "--round", "0", "--split", "holdout"), 2, ("holdout",)),
    # round order
    Case("select-before-train", "labeled", ("select", "{ws}", "--round", "1"), 1,
         ("round 0 is not trained", "gpual train")),
    Case("train-before-label", "selected", ("train", "{ws}", "--round", "0"), 1, ("no label step yet", "gpual label")),
    Case("evaluate-before-train", "labeled", ("evaluate", "{ws}", "--round", "0"), 1, ("gpual train",)),
    Case("select-before-superpixels", "init", ("select", "{ws}", "--round", "0"), 1, ("gpual superpixels",)),
    Case("label-before-select", "superpixels", ("label", "{ws}", "--round", "0"), 1, ("gpual select",)),
    Case("select-again-without-force", "selected", ("select", "{ws}", "--round", "0"), 1, ("--force",)),
    # gpual.toml
    Case("config-bad-toml", "superpixels", ("select", "{ws}", "--round", "0"), 2, ("is not valid TOML", "gpual.toml"),
         edit_config("[acquisition]\n", "[acquisition\n")),
    Case("config-unknown-key", "superpixels", ("select", "{ws}", "--round", "0"), 2, ("budgett", "gpual.toml"),
         edit_config("[acquisition]\n", "[acquisition]\nbudgett = 3\n")),
    Case("config-wrong-type", "superpixels", ("select", "{ws}", "--round", "0"), 2, ("init_budget", "gpual.toml"),
         edit_config("init_budget = 30", 'init_budget = "thirty"')),
    Case("config-status-bad-toml", "superpixels", ("status", "{ws}"), 2, ("is not valid TOML",),
         edit_config("[acquisition]\n", "[acquisition\n")),
    # stale or damaged workspace files
    Case("stale-superpixels", "superpixels", ("select", "{ws}", "--round", "0"), 1,
         ("changed since its superpixels were computed", "gpual superpixels"), lambda case: replace_by_another_scene(pool_image(case, 1))),
    Case("changed-labelled-image", "labeled", ("train", "{ws}", "--round", "0"), 1, ("restore the original image",),
         lambda case: replace_by_another_scene(queried_image(case))),
    Case("changed-queried-image-label", "selected", ("label", "{ws}", "--round", "0"), 1, ("restore the original image",),
         lambda case: replace_by_another_scene(queried_image(case))),
    Case("deleted-checkpoint-select", "trained", ("select", "{ws}", "--round", "1"), 1, ("round 0 is not trained",),
         delete("ws/rounds/000/checkpoint.pt")),
    Case("deleted-checkpoint-evaluate", "trained", ("evaluate", "{ws}", "--round", "0"), 1, ("gpual train",),
         delete("ws/rounds/000/checkpoint.pt")),
    Case("truncated-checkpoint-select", "trained", ("select", "{ws}", "--round", "1"), 1, ("checkpoint.pt", "unreadable"),
         garbage("ws/rounds/000/checkpoint.pt", keep=4096)),
    Case("truncated-checkpoint-evaluate", "trained", ("evaluate", "{ws}", "--round", "0"), 1,
         ("checkpoint.pt", "unreadable"), garbage("ws/rounds/000/checkpoint.pt", keep=4096)),
    Case("corrupt-query-label", "selected", ("label", "{ws}", "--round", "0"), 1, ("query.parquet", "unreadable"),
         garbage("ws/rounds/000/query.parquet")),
    Case("corrupt-query-status", "selected", ("status", "{ws}"), 1, ("query.parquet", "unreadable"),
         garbage("ws/rounds/000/query.parquet")),
    Case("truncated-query-train", "labeled", ("train", "{ws}", "--round", "0"), 1, ("query.parquet", "unreadable"),
         garbage("ws/rounds/000/query.parquet", keep=100)),
    Case("corrupt-answers-train", "labeled", ("train", "{ws}", "--round", "0"), 1, ("answers.parquet", "unreadable"),
         garbage("ws/rounds/000/answers.parquet")),
    Case("corrupt-metrics-status", "trained", ("status", "{ws}"), 1, ("metrics.json", "corrupt"),
         garbage("ws/rounds/000/metrics.json")),
    Case("corrupt-superpixel-index", "superpixels", ("select", "{ws}", "--round", "0"), 1, ("index.parquet",),
         garbage("ws/superpixels/index.parquet")),
    Case("deleted-superpixel-map", "selected", ("label", "{ws}", "--round", "0"), 1, ("superpixel",),
         lambda case: next((case / "ws" / "superpixels").glob("*.npz")).unlink()),
    # the workspace path
    Case("workspace-is-a-file", "init", ("superpixels", "{case}/notes.txt"), 1, ("is a file, not a gpual workspace",),
         file_as_workspace),
    Case("workspace-is-a-file-init", "init", ("init", "{case}/notes.txt", "--data", "{data}", "--dataset", "folder"), 1,
         ("exists and is not a folder",), file_as_workspace),
    Case("workspace-missing", "init", ("select", "{case}/nowhere", "--round", "0"), 1, ("gpual init",)),
    Case("rounds-is-a-file", "superpixels", ("select", "{ws}", "--round", "0"), 1, ("is a file where gpual needs a folder",),
         lambda case: (case / "ws" / "rounds").write_text("")),
    Case("export-out-is-a-file", "selected", ("export", "{ws}", "--round", "0", "--format", "masks", "--out",
                                              "{case}/out.txt"), 1, ("is a file",), file_as_out),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(capsys, prepared: Prepared, case: Case) -> None:
    root = prepared.fresh(case.template)
    if case.prepare is not None:
        case.prepare(root)
    before = listing(root)
    args = [a.format(ws=root / "ws", data=root / "data", case=root) for a in case.args]
    r = run_cli(capsys, *args)
    one_line_error(r.code, r.err, case.code, case.needles)
    assert listing(root) == before


# --- cases that need more than a table row ----------------------------------------------------


@pytest.mark.parametrize(("template", "args"), [
    ("superpixels", ("select", "{ws}", "--round", "0", "--device", "cuda")),
    ("labeled", ("train", "{ws}", "--round", "0", "--device", "cuda")),
    ("trained", ("evaluate", "{ws}", "--round", "0", "--device", "cuda")),
])
def test_cuda_asked_for_without_cuda(capsys, prepared: Prepared, template: str, args: tuple[str, ...]) -> None:
    if HAS_CUDA:
        pytest.skip("CUDA is available here: `--device cuda` is not a bad input on this machine")
    root = prepared.fresh(template)
    before = listing(root)
    r = run_cli(capsys, *(a.format(ws=root / "ws") for a in args))
    one_line_error(r.code, r.err, 2, ("cuda",))
    assert listing(root) == before


@pytest.mark.parametrize("args", [("select", "--round", "0"), ("label", "--round", "0"), ("superpixels",),
                                  ("export", "--round", "0", "--format", "masks", "--out", "{case}/export"),
                                  ("import", "--round", "0", "{case}/masks")])
def test_a_second_writer_under_the_lock(capsys, prepared: Prepared, exported: Path, args: tuple[str, ...]) -> None:
    from gpual.workspace import Workspace

    root = prepared.fresh("exported" if args[0] in ("label", "export", "import") else "superpixels")
    before = listing(root)
    ws = Workspace.open(root / "ws")
    with ws.lock("run"):  # another open file description: the command's flock sees another writer
        holder = (root / "ws" / ".lock").read_text()
        r = run_cli(capsys, args[0], root / "ws", *(a.format(case=root) for a in args[1:]))
        one_line_error(r.code, r.err, 1, ("is locked by", holder, "wait for it to finish"))
    assert listing(root) == before


def test_a_second_writer_in_another_process(capsys, prepared: Prepared) -> None:
    """The lock held by a live process (not this one): its pid is named, nothing is written."""
    root = prepared.fresh("superpixels")
    before = listing(root)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gpual.workspace import Workspace\n"
         "with Workspace.open(sys.argv[1]).lock('train'):\n    print('held', flush=True)\n    sys.stdin.read()\n",
         str(root / "ws")], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli(capsys, "select", root / "ws", "--round", "0")
        one_line_error(r.code, r.err, 1, ("is locked by `gpual train`", f"pid {holder.pid}"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert listing(root) == before


# --- bad annotation files for `gpual import` --------------------------------------------------


@pytest.fixture(scope="module")
def exported(prepared: Prepared) -> Path:
    """The selected template plus masks, label-studio and cvat exports of round 0 beside its
    workspace (in the case folder, so every import case's listing covers them), the masks
    one labelled from the ground truth; a new template named "exported"."""

    root = prepared.fresh("selected")
    for fmt in ("masks", "label-studio", "cvat"):
        cli_quiet("export", root / "ws", "--round", "0", "--format", fmt, "--out", root / fmt)
    labels = root / "masks" / "labels"
    for image in sorted((root / "masks" / "images").iterdir()):
        gt = root / "data" / "train" / "labels" / f"{image.stem}.png"
        shutil.copy(gt, labels / f"{image.stem}.png")
    template = prepared.templates["selected"].with_name("template-exported")
    shutil.copytree(root, template, symlinks=True)
    prepared.templates["exported"] = template
    return template


def _first_mask(case: Path) -> Path:
    return sorted((case / "masks" / "labels").glob("*.png"))[0]


def _mask_value(case: Path) -> None:
    png = _first_mask(case)
    array = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    array[0, 0] = 9
    cv2.imwrite(str(png), array)


def _ls_tasks(case: Path) -> Path:
    return case / "label-studio" / "tasks.json"


def _ls_edit(edit: Callable[[list], object]) -> Callable[[Path], None]:
    def apply(case: Path) -> None:
        path = _ls_tasks(case)
        tasks = json.loads(path.read_text())
        edit(tasks)
        path.write_text(json.dumps(tasks))

    return apply


IMPORT_CASES = [
    ("mask-truncated", "{case}/masks", (), 1, ("is not a readable PNG",),
     lambda case: _first_mask(case).write_bytes(_first_mask(case).read_bytes()[:40])),
    ("mask-colour", "{case}/masks", (), 1, ("colour image",),
     lambda case: cv2.imwrite(str(_first_mask(case)), np.full((32, 48, 3), (0, 1, 2), np.uint8))),
    ("mask-16-bit", "{case}/masks", (), 1, ("not 8-bit",),
     lambda case: cv2.imwrite(str(_first_mask(case)), np.zeros((32, 48), np.uint16))),
    ("mask-other-size", "{case}/masks", (), 1, ("is 70x50",),
     lambda case: cv2.imwrite(str(_first_mask(case)), np.zeros((50, 70), np.uint8))),
    ("mask-unknown-class", "{case}/masks", (), 1, ("holds the value 9",), _mask_value),
    ("mask-unknown-image", "{case}/masks", (), 1, ("'train_9999'",),
     lambda case: shutil.copy(_first_mask(case), case / "masks" / "labels" / "train_9999.png")),
    ("masks-no-manifest", "{case}/masks", (), 2, ("cannot tell the format", "pass --format"),
     delete("masks/gpual-export.json")),
    ("masks-no-manifest-format-given", "{case}/masks", ("--format", "masks"), 1, ("gpual-export.json",),
     delete("masks/gpual-export.json")),
    ("masks-manifest-corrupt", "{case}/masks", (), 1, ("gpual-export.json",), garbage("masks/gpual-export.json")),
    ("masks-other-round", "{case}/masks", (), 1, ("round 1",),
     lambda case: (case / "masks" / "gpual-export.json").write_text(json.dumps(
         {**(m := json.loads((case / "masks" / "gpual-export.json").read_text())), "stamp": {**m["stamp"], "round": 1}}))),
    ("label-studio-not-json", "{case}/label-studio/tasks.json", (), 1, ("is not readable JSON",),
     garbage("label-studio/tasks.json", keep=20)),
    ("label-studio-not-a-list", "{case}/label-studio/tasks.json", (), 1, ("list of tasks",),
     lambda case: _ls_tasks(case).write_text('{"tasks": []}')),
    ("label-studio-nothing-labelled", "{case}/label-studio/tasks.json", (), 1, ("labels none of round 0's",), None),
    ("label-studio-no-stamp", "{case}/label-studio/tasks.json", (), 1, ("stamp",),
     _ls_edit(lambda tasks: [t["data"].pop("gpual_stamp", None) for t in tasks])),
    ("cvat-not-xml", "{case}/cvat/annotations.xml", (), 1, ("is not readable XML",),
     lambda case: (case / "cvat" / "annotations.xml").write_text("<annotations><image name=")),
    ("cvat-not-cvat", "{case}/cvat/annotations.xml", (), 1, ("not a CVAT for images 1.1 file",),
     lambda case: (case / "cvat" / "annotations.xml").write_text("<html></html>")),
    ("missing-path", "{case}/nothing-here.json", (), 1, ("does not exist",), None),
    ("unknown-format", "{case}/masks", ("--format", "coco"), 2, ("unknown format 'coco'",), None),
    ("undetectable-format", "{case}/notes.txt", (), 2, ("cannot tell the format",),
     lambda case: (case / "notes.txt").write_text("hello\n")),
]


@pytest.mark.parametrize(("source", "extra", "code", "needles", "prepare"), [c[1:] for c in IMPORT_CASES],
                         ids=[c[0] for c in IMPORT_CASES])
def test_bad_annotation_file(capsys, prepared: Prepared, exported: Path, source, extra, code, needles, prepare) -> None:
    root = prepared.fresh("exported")
    if prepare is not None:
        prepare(root)
    before = listing(root)
    r = run_cli(capsys, "import", root / "ws", "--round", "0", source.format(case=root), *extra)
    one_line_error(r.code, r.err, code, needles)
    assert listing(root) == before


def test_good_annotation_file_imports(capsys, prepared: Prepared, exported: Path) -> None:
    """The control of the import cases: the unbroken masks export imports (so their refusals
    come from what each broke)."""
    root = prepared.fresh("exported")
    r = run_cli(capsys, "import", root / "ws", "--round", "0", root / "masks")
    assert r.code == 0, r.err
    assert (root / "ws" / "rounds" / "000" / "answers.parquet").exists()


# --- the machine refuses: read-only, full disk -----------------------------------------------
#
# As root (CI) chmod changes nothing, so a read-only workspace is a read-only bind mount and a
# full disk a small tmpfs, both in a private user + mount namespace (`unshare -rm`). One
# process in that namespace runs every case in turn (namespace_driver, through cli.main.main
# as run_cli does): the torch import is paid once, not once per case.


def run_in_namespace(spec: dict) -> list[dict]:
    """:func:`namespace_driver` on ``spec`` in a new user + mount namespace; its results."""
    folder = Path(spec["case"]).with_name("namespace")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps(spec))
    code = ("import sys; sys.path.insert(0, 'tests'); import test_bad_inputs as t; "
            "t.namespace_driver(sys.argv[1], sys.argv[2])")
    r = subprocess.run(["unshare", "-rm", sys.executable, "-c", code, str(folder / "spec.json"), str(folder / "out.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((folder / "out.json").read_text())


def namespace_driver(spec_file: str, out_file: str) -> None:
    """Inside the namespace: per case, mount what it needs over ``spec["case"]``, run the
    command through cli.main.main with file descriptor 2 captured (C libraries' messages
    count as lines too), list the workspace where the tmpfs exists, unmount."""
    spec = json.loads(Path(spec_file).read_text())
    case = Path(spec["case"])
    results = []
    for item in spec["cases"]:
        if spec["kind"] == "read-only":
            mounts = [["mount", "--bind", item["source"], str(case)], ["mount", "-o", "remount,bind,ro", str(case)]]
            top = case
        else:  # a tmpfs over the workspace with room bytes to spare, the template's files copied in
            mounts = [["mount", "-t", "tmpfs", "-o", f"size={item['size']}", "tmpfs", str(case / "ws")]]
            top = case / "ws"
        for command in mounts:
            subprocess.run(command, check=True)
        try:
            if spec["kind"] == "full-disk":
                shutil.copytree(item["source"], top, symlinks=True, dirs_exist_ok=True)
            before = listing(top)
            code, err = _run_fd_captured(item["args"])
            results.append({"code": code, "err": err, "same": listing(top) == before})
        finally:
            subprocess.run(["umount", "-l", str(top)], check=True)
    Path(out_file).write_text(json.dumps(results))


def _run_fd_captured(args: list[str]) -> tuple[int, str]:
    """``gpual ARGS`` in this process; (exit code, everything written to fd 2)."""
    import tempfile

    from cli import main as cli_main

    argv, code = sys.argv, 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        sys.argv = ["gpual", *args]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main.main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        except Exception:  # a bug: what Python prints for an uncaught exception, and its exit code
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = argv
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return code, capture.read().decode(errors="replace")


READ_ONLY_CASES = [
    ("superpixels", ("select", "{ws}", "--round", "0", "--device", "cpu")),
    ("labeled", ("train", "{ws}", "--round", "0", "--device", "cpu")),
    ("selected", ("label", "{ws}", "--round", "0")),
]


def test_read_only_workspace(capsys, prepared: Prepared) -> None:
    """Every command on a read-only workspace: one line naming the workspace and the fix
    (exit 2), nothing changed. Not root: chmod a-w; root: a read-only bind mount."""
    root = prepared.fresh("init")
    ws = root / "ws"
    if os.geteuid() != 0:
        for template, args in READ_ONLY_CASES:
            root = prepared.fresh(template)
            before = listing(root)
            _make_read_only(ws)
            try:
                r = run_cli(capsys, *(a.format(ws=ws) for a in args))
            finally:
                _make_writable(ws)
            one_line_error(r.code, r.err, 2, (str(ws), "Permission denied", f"chmod -R u+rwX {ws}"))
            assert listing(root) == before
        return
    mount_namespace_or_skip()
    sources = []
    for i, (template, _) in enumerate(READ_ONLY_CASES):
        source = root.with_name(f"read-only-{i}")
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(prepared.templates[template], source, symlinks=True)
        sources.append(source)
    befores = [listing(source) for source in sources]
    results = run_in_namespace({"kind": "read-only", "case": str(root), "cases": [
        {"source": str(source), "args": [a.format(ws=ws) for a in args]} for source, (_, args) in zip(sources, READ_ONLY_CASES)]})
    for source, before, result, (_, args) in zip(sources, befores, results, READ_ONLY_CASES):
        assert result["same"], args
        one_line_error(result["code"], result["err"], 2, (str(ws), "Read-only file system", "remount", "read-write"))
        assert listing(source) == before, args


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)


# (template, command, room): room is what the tmpfs holds beyond the workspace's files, in
# bytes: the lock's page and small files fit, the command's first large write does not.
FULL_DISK_CASES = [
    ("init", ("superpixels", "{ws}", "--workers", "1"), 8192),
    ("superpixels", ("select", "{ws}", "--round", "0", "--device", "cpu"), 8192),
    ("labeled", ("train", "{ws}", "--round", "0", "--device", "cpu"), 1 << 20),
    ("trained", ("evaluate", "{ws}", "--round", "0", "--device", "cpu"), 4096),
]


@pytest.mark.parametrize("index", range(len(FULL_DISK_CASES)), ids=[c[1][0] for c in FULL_DISK_CASES])
def test_full_disk(full_disk_results: list[dict], index: int) -> None:
    """The workspace on a full tmpfs: one line (exit 2) saying to free space; the workspace
    as it was (listed inside the namespace, where the tmpfs exists)."""
    result = full_disk_results[index]
    one_line_error(result["code"], result["err"], 2, ("No space left on device", "free some space"))
    assert result["same"], FULL_DISK_CASES[index]


@pytest.fixture(scope="module")
def full_disk_results(prepared: Prepared) -> list[dict]:
    """Every FULL_DISK_CASES command run in one namespace process (see run_in_namespace)."""
    mount_namespace_or_skip()
    root = prepared.fresh("init")  # the dataset at case/data; each case's workspace is copied onto the tmpfs
    cases = []
    for template, args, room in FULL_DISK_CASES:
        source = prepared.templates[template] / "ws"
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in source.rglob("*") if p.is_file())
        cases.append({"source": str(source), "size": used + room, "args": [a.format(ws=root / "ws") for a in args]})
    return run_in_namespace({"kind": "full-disk", "case": str(root), "cases": cases})


def test_save_torch_turns_a_full_disk_into_an_os_error(tmp_path: Path) -> None:
    """gpual.atomic.save_torch: /dev/full refuses every write with ENOSPC; torch's own
    failure is an OSError naming the target, which gpual.errors makes one line (exit 2)."""
    import torch

    from gpual.atomic import save_torch, torch_save_to
    from gpual.errors import os_error

    if not Path("/dev/full").exists():
        pytest.skip("SKIPPED LOUDLY: no /dev/full on this machine")
    target = tmp_path / "ws" / "rounds" / "000" / "checkpoint.pt"
    with pytest.raises(OSError) as info:
        torch_save_to({"w": torch.ones(50_000)}, Path("/dev/full"), target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    error = os_error(info.value)
    assert error.exit_code == 2 and str(target) in str(error) and "free some space" in str(error)
    # A path torch opens itself fails the same way (its RuntimeError carries no errno).
    with pytest.raises(RuntimeError):
        torch.save({"w": torch.ones(50_000)}, "/dev/full")
    # And a good write lands whole under the final name, no temporary beside it.
    save_torch({"w": torch.arange(10)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(10))
    assert torch.equal(torch.load(target, weights_only=True, mmap=True)["w"], torch.arange(10))
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.pt"]


def test_save_torch_on_a_full_tmpfs_leaves_the_old_file(tmp_path: Path) -> None:
    """save_torch on a real full file system (a 64 KiB tmpfs): ENOSPC as an OSError that
    names the target, the previous file intact, no temporary left."""
    mount_namespace_or_skip()
    folder = tmp_path / "small"
    folder.mkdir()
    code = (
        "import errno, sys, torch\nfrom pathlib import Path\nfrom gpual.atomic import save_torch\n"
        "target = Path(sys.argv[1]) / 'checkpoint.pt'\n"
        "save_torch({'w': torch.arange(4)}, target)\n"
        "try:\n    save_torch({'w': torch.ones(1_000_000)}, target)\n"
        "except OSError as exc:\n    assert exc.errno == errno.ENOSPC and exc.filename == str(target), exc\n"
        "else:\n    raise SystemExit('no error')\n"
        "assert torch.equal(torch.load(target, weights_only=True)['w'], torch.arange(4))\n"
        "print(sorted(p.name for p in target.parent.iterdir()))\n"
    )
    script = f'mount -t tmpfs -o size=65536 tmpfs "{folder}" && exec "$@"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-c", code, str(folder)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['checkpoint.pt']"


# --- commits are durable: fsync before and after every rename ---------------------------------


def test_every_commit_fsyncs_its_bytes_before_and_its_folder_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    """A power loss after a command returned must not leave an empty file under a final name
    (ext4 may persist a rename before the data): gpual.atomic fsyncs the temporary's bytes
    (every file of an atomic_dir) before the rename and the folder after it. os.fsync is
    wrapped to record what each call flushed (its /proc/self/fd link) and whether the
    target was in place then; the flushes themselves are real."""
    import pandas as pd
    import torch

    from gpual import atomic

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("SKIPPED LOUDLY: needs /proc/self/fd (Linux) to see what each fsync flushed")
    calls: list[tuple[str, bool]] = []
    real_fsync = os.fsync
    target: list[Path] = []

    def recording_fsync(fd: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), target[0].exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    writers = {
        "text.txt": lambda p: atomic.write_text(p, "x"),
        "m.json": lambda p: atomic.write_json(p, {"a": 1}),
        "t.parquet": lambda p: atomic.write_parquet(p, pd.DataFrame({"a": [1, 2]})),
        "c.pt": lambda p: atomic.save_torch({"w": torch.ones(3)}, p),
    }
    for name, write in writers.items():
        calls.clear()
        target[:] = [tmp_path / "ws" / name]
        write(target[0])
        (file_flushed, existed_before), (folder_flushed, existed_after) = calls
        assert atomic.TEMP_NAME.match(Path(file_flushed).name) and Path(file_flushed).parent == target[0].parent, name
        assert not existed_before and existed_after, name  # the bytes before the rename, the folder after it
        assert Path(folder_flushed) == target[0].parent, name

    calls.clear()
    target[:] = [tmp_path / "ws" / "overlays"]
    with atomic.atomic_dir(target[0]) as folder:
        (folder / "a.png").write_bytes(b"a")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.png").write_bytes(b"b")
    flushed = [(Path(path), existed) for path, existed in calls]
    temporary = flushed[-2][0]
    assert atomic.TEMP_NAME.match(temporary.name)
    assert {p.relative_to(temporary) for p, _ in flushed[:-1]} == {Path("a.png"), Path("sub"), Path("sub/b.png"), Path(".")}
    assert not any(existed for _, existed in flushed[:-1])
    assert flushed[-1] == (target[0].parent, True)


def test_a_failed_write_leaves_no_folder_it_made(tmp_path: Path) -> None:
    """atomic_path / atomic_dir create the target's missing folders; a write that fails
    removes them again (a full disk during the first overlay of a round left rounds/NNN/)."""
    from gpual import atomic

    (tmp_path / "ws").mkdir()
    for context in (atomic.atomic_path, atomic.atomic_dir):
        with pytest.raises(OSError, match="No space left"):
            with context(tmp_path / "ws" / "rounds" / "000" / "target") as tmp:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["ws"], context.__name__
    (tmp_path / "ws" / "rounds" / "001").mkdir(parents=True)  # a folder with other content stays
    (tmp_path / "ws" / "rounds" / "001" / "keep").write_text("")
    with pytest.raises(OSError):
        with atomic.atomic_path(tmp_path / "ws" / "rounds" / "001" / "new" / "x.json"):
            raise OSError(errno.EIO, "I/O error")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "ws", "ws/rounds", "ws/rounds/001", "ws/rounds/001/keep"]
    atomic.write_text(tmp_path / "ws" / "rounds" / "002" / "ok.txt", "ok")  # a commit keeps what it made
    assert (tmp_path / "ws" / "rounds" / "002" / "ok.txt").read_text() == "ok"
