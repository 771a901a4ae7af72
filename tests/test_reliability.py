"""Reliability: stale superpixel maps refused, failed commands leave the workspace as it
was, OSErrors at the workspace boundary as one line, killed writers' temporaries swept,
advice that works, exit codes that follow gpual.errors' rule, one-line option errors.

Every CLI error here is checked for its exit code, a single ``error:`` line on stderr (no
traceback) and, where the command would write, a workspace byte-identical to before (a
checksum listing of every file and folder in it).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cli_runner import mount_namespace_or_skip, run_cli, works
from gpual.errors import GpualError, os_error
from gpual.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
# The real entry point in a fresh process (for runs inside a mount or user namespace).
GPUAL = [sys.executable, "-c", "import sys; sys.argv[0] = 'gpual'; from cli.main import main; main()"]


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpual.synthetic import make_scenes

    return make_scenes(tmp_path_factory.mktemp("reliability") / "scenes", n_train=6, n_val=2, height=48, width=64).root


def listing(root: Path) -> dict[str, str]:
    """Every file (sha256 of its bytes) and folder under ``root``, by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<folder>" if path.is_dir() and not path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line_error(code: int, err: str, expected_code: int, *needles: str) -> str:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def make_ws(capsys, tmp_path: Path, data: Path, superpixels: bool = True) -> Path:
    """A demo workspace on ``data`` (its superpixels computed through the CLI, which leaves
    the empty .lock every locking command leaves)."""
    ws = tmp_path / "ws"
    r = run_cli(capsys, "init", ws, "--data", data, "--dataset", "folder", "--preset", "demo",
                "--set", "acquisition.init_budget=40", "--set", "train.epochs_per_round=1")
    assert r.code == 0, r.err
    if superpixels:
        r = run_cli(capsys, "superpixels", ws, "--workers", "1")
        assert r.code == 0, r.err
    else:
        (ws / ".lock").touch()
    return ws


def own_data(tmp_path: Path, scenes: Path) -> Path:
    """A copy of the scenes this test may edit."""
    return Path(shutil.copytree(scenes, tmp_path / "data"))


def pool_image(data: Path, i: int) -> Path:
    return sorted((data / "train" / "images").iterdir())[i]


def test_replaced_image_refused_by_select_until_superpixels_recomputes_it(capsys, tmp_path, scenes) -> None:
    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    index = pd.read_parquet(ws / "superpixels" / "index.parquet")
    assert {"size", "mtime_ns", "digest"} <= set(index.columns)
    victim = pool_image(data, 1)
    victim.write_bytes(pool_image(data, 3).read_bytes())  # another scene, the same width and height
    before = listing(ws)
    r = run_cli(capsys, "select", ws, "--round", "0")
    one_line_error(r.code, r.err, 1, f"pool image '{victim.stem}'", "changed since its superpixels were computed",
                   f"gpual superpixels {ws}")
    assert listing(ws) == before

    r = run_cli(capsys, "superpixels", ws, "--workers", "1")
    assert r.code == 0, r.err
    assert run_cli(capsys, "select", ws, "--round", "0").code == 0


def test_touched_image_with_the_same_bytes_is_not_stale(capsys, tmp_path, scenes) -> None:
    from gpual.superpixels import _VERIFIED, check_images_unchanged, read_index

    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    image = pool_image(data, 2)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # mtime differs: the hash decides
    workspace = Workspace.open(ws)
    _VERIFIED.clear()
    check_images_unchanged(workspace, read_index(workspace))
    assert (str(image), stat.st_size, stat.st_mtime_ns + 5_000_000_000) in _VERIFIED  # hashed once, remembered
    r = run_cli(capsys, "select", ws, "--round", "0")
    assert r.code == 0, r.err


def test_size_and_mtime_match_means_no_hashing(capsys, tmp_path, scenes, monkeypatch) -> None:
    import gpual.superpixels as sp

    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    workspace = Workspace.open(ws)
    index = sp.read_index(workspace)
    hashed = []
    monkeypatch.setattr(sp, "file_identity", lambda path: hashed.append(path) or (0, 0, ""))
    sp.check_images_unchanged(workspace, index)
    for image in index["image"]:
        sp.load_superpixels(workspace, image, index)
    assert hashed == []


def test_label_and_train_refuse_a_replaced_image_once_rounds_exist(capsys, tmp_path, scenes) -> None:
    from gpual.superpixels import load_superpixels, read_index

    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    assert run_cli(capsys, "select", ws, "--round", "0").code == 0
    queried = str(pd.read_parquet(ws / "rounds/000/query.parquet")["image"].iloc[0])
    victim = data / "train" / "images" / f"{queried}.png"
    other = next(p for p in pool_image(data, 0).parent.iterdir() if p != victim)
    original = victim.read_bytes()
    victim.write_bytes(other.read_bytes())
    advice = ("restore the original image", "start a new workspace", f"gpual init NEW --data {data}")

    before = listing(ws)
    r = run_cli(capsys, "label", ws, "--round", "0")
    one_line_error(r.code, r.err, 1, f"pool image '{queried}'", *advice)
    assert listing(ws) == before
    with pytest.raises(GpualError, match="restore the original image"):  # the annotator loads maps this way
        load_superpixels(Workspace.open(ws), queried)

    victim.write_bytes(original)  # restored: the same bytes, a new mtime
    assert run_cli(capsys, "label", ws, "--round", "0").code == 0
    victim.write_bytes(other.read_bytes())
    before = listing(ws)
    r = run_cli(capsys, "train", ws, "--round", "0")
    one_line_error(r.code, r.err, 1, f"pool image '{queried}'", *advice)
    assert listing(ws) == before
    # `gpual superpixels` itself refuses to change the maps under the labels
    r = run_cli(capsys, "superpixels", ws, "--workers", "1")
    one_line_error(r.code, r.err, 1, "new workspace")
    assert listing(ws) == before
    assert read_index(Workspace.open(ws))["digest"].notna().all()


def test_an_index_from_before_the_file_columns_is_read_and_checked_by_hash(capsys, tmp_path, scenes) -> None:
    from gpual.superpixels import FILE_COLUMNS, check_images_unchanged, read_index

    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    path = ws / "superpixels" / "index.parquet"
    pd.read_parquet(path).drop(columns=list(FILE_COLUMNS)).to_parquet(path, index=False)
    workspace = Workspace.open(ws)
    check_images_unchanged(workspace, read_index(workspace))  # unchanged images pass on their key
    pool_image(data, 4).write_bytes(pool_image(data, 5).read_bytes())
    before = listing(ws)
    r = run_cli(capsys, "select", ws, "--round", "0")
    one_line_error(r.code, r.err, 1, f"pool image '{pool_image(data, 4).stem}'", "no longer matches",
                   f"gpual superpixels {ws}")
    assert listing(ws) == before
    assert run_cli(capsys, "superpixels", ws, "--workers", "1").code == 0  # recomputes it, writes the new columns
    assert set(FILE_COLUMNS) <= set(read_index(workspace).columns)


def test_a_deleted_pool_image_is_one_line(capsys, tmp_path, scenes) -> None:
    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    gone = pool_image(data, 0)
    gone.unlink()
    before = listing(ws)
    r = run_cli(capsys, "select", ws, "--round", "0")
    one_line_error(r.code, r.err, 1, str(gone), "restore it")
    assert listing(ws) == before


# --- 2. a failed superpixels run leaves the cache as it was ----------------------------------


def _truncate_as_jpeg(image: Path) -> Path:
    """Replace the PNG ``image`` by a truncated JPEG of it (the same id)."""
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(image)))
    assert ok
    target = image.with_suffix(".jpg")
    target.write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    image.unlink()
    return target


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_second_image_leaves_a_fresh_workspace_as_it_was(capsys, tmp_path, scenes, workers) -> None:
    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data, superpixels=False)
    bad = _truncate_as_jpeg(pool_image(data, 1))
    before = listing(ws)
    r = run_cli(capsys, "superpixels", ws, "--workers", workers)
    one_line_error(r.code, r.err, 1, str(bad), "truncated", "replace or remove it")
    assert listing(ws) == before  # no superpixels/ folder, no first map


def test_truncated_second_image_keeps_the_previous_cache_and_config(capsys, tmp_path, scenes) -> None:
    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data)
    bad = _truncate_as_jpeg(pool_image(data, 1))
    before = listing(ws)
    r = run_cli(capsys, "superpixels", ws, "--workers", "1", "--region-pixels", "32")  # every map is recomputed
    one_line_error(r.code, r.err, 1, str(bad))
    assert listing(ws) == before
    # fixed: the maps of the unchanged images are reused, only the replaced one is computed
    bad.unlink()
    shutil.copy2(pool_image(scenes, 1), bad.with_suffix(".png"))
    from gpual.superpixels import build_cache

    assert build_cache(Workspace.open(ws), workers=1).computed == 0  # the same bytes as before: its old map


def test_an_interrupted_run_leaves_its_maps_staged_for_the_next(capsys, tmp_path, scenes, monkeypatch) -> None:
    import gpual.superpixels as sp

    data = own_data(tmp_path, scenes)
    ws = make_ws(capsys, tmp_path, data, superpixels=False)
    workspace = Workspace.open(ws)
    real, calls = sp._compute_and_save, []

    def interrupted(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task)
        return real(task)

    monkeypatch.setattr(sp, "_compute_and_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sp.build_cache(workspace, workers=1)
    assert len(list(workspace.superpixel_staging_dir.glob("*.npz"))) == 3
    assert not (workspace.superpixel_dir / "index.parquet").exists()
    monkeypatch.setattr(sp, "_compute_and_save", real)
    summary = sp.build_cache(workspace, workers=1)
    assert (summary.computed, summary.skipped) == (3, 3)
    assert not workspace.superpixel_staging_dir.exists()
    assert len(list(workspace.superpixel_dir.glob("*.npz"))) == 6


# --- 3. OSErrors at the workspace boundary ----------------------------------------------------


def test_read_only_workspace_is_one_line(tmp_path, capsys, scenes) -> None:
    mount_namespace_or_skip()
    ws = make_ws(capsys, tmp_path, scenes)
    before = listing(ws)
    script = f'mount --bind "{ws}" "{ws}" && mount -o remount,bind,ro "{ws}" && exec "$@"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *GPUAL, "superpixels", str(ws)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    one_line_error(r.returncode, r.stderr, 2, f"{ws}/.lock", "Read-only file system", "remount", "read-write")
    assert listing(ws) == before


def test_disk_full_is_one_line_and_leaves_the_workspace_as_it_was(tmp_path, capsys, scenes) -> None:
    mount_namespace_or_skip()
    ws = make_ws(capsys, tmp_path, scenes, superpixels=False)
    small = tmp_path / "small"
    small.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    inside = small / "ws"
    # A 16 KiB tmpfs holds the config and the lock, not six maps and the index.
    script = (
        f'mount -t tmpfs -o size=16k tmpfs "{small}" && cp -a "{ws}" "{inside}" && '
        f'(cd "{inside}" && find . | sort && find . -type f | sort | xargs sha256sum) > "{out}/before" && '
        f'"$@" 2> "{out}/err"; echo $? > "{out}/rc"; '
        f'(cd "{inside}" && find . | sort && find . -type f | sort | xargs sha256sum) > "{out}/after"'
    )
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *GPUAL, "superpixels", str(inside), "--workers", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    err = (out / "err").read_text()
    one_line_error(int((out / "rc").read_text()), err, 2, "No space left on device", str(inside), "free some space")
    assert (out / "after").read_text() == (out / "before").read_text()
    assert "superpixels" not in (out / "after").read_text()


def test_permission_denied_is_one_line(tmp_path, capsys, scenes) -> None:
    ws = make_ws(capsys, tmp_path, scenes)
    before = listing(ws)
    paths = [ws, *ws.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(modes[p] & ~0o222)
    try:
        if os.geteuid() != 0:
            r = run_cli(capsys, "superpixels", ws)
            code, err = r.code, r.err
        else:  # root ignores permissions: run as an unprivileged user of a user namespace, mapped to us
            if not shutil.which("unshare") or not works("unshare", "--user", "--map-user=1000", "--map-group=1000", "true"):
                pytest.skip("runs as root, which ignores chmod, and `unshare --user --map-user` is refused here")
            r = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", *GPUAL, "superpixels", str(ws)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
            code, err = r.returncode, r.stderr
        one_line_error(code, err, 2, f"{ws}/.lock", "Permission denied", f"chmod -R u+rwX {ws}")
    finally:
        for p in paths:
            p.chmod(modes[p])
    assert listing(ws) == before


def test_workspace_path_that_is_a_file(capsys, tmp_path, scenes) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a workspace\n")
    for command in (("status", path), ("superpixels", path), ("select", path, "--round", "0"), ("train", path, "--round", "0")):
        r = run_cli(capsys, *command)
        line = one_line_error(r.code, r.err, 1, f"{path} is a file, not a gpual workspace folder")
        assert "gpual init " + str(path) not in line  # no advice to init over the file
    r = run_cli(capsys, "init", path, "--data", scenes, "--dataset", "folder")
    one_line_error(r.code, r.err, 1, f"{path} exists and is not a folder")
    assert path.read_text() == "not a workspace\n"


def test_a_file_where_the_workspace_keeps_a_folder(capsys, tmp_path, scenes) -> None:
    """A real NotADirectoryError (iterdir of ``rounds`` made a file) through the CLI's handler."""
    ws = make_ws(capsys, tmp_path, scenes)
    (ws / "rounds").write_text("")
    before = listing(ws)
    for command in (("select", ws, "--round", "0"), ("status", ws)):
        r = run_cli(capsys, *command)
        one_line_error(r.code, r.err, 1, f"{ws}/rounds is a file where gpual needs a folder", "move it away")
    assert listing(ws) == before


def test_os_error_names_the_target_of_a_temporary_and_the_fix(tmp_path) -> None:
    temp = tmp_path / "missing" / ".index.parquet.abcd1234.tmp.parquet"
    with pytest.raises(OSError) as info:
        os.open(temp, os.O_WRONLY | os.O_CREAT)
    error = os_error(info.value)
    assert isinstance(error, GpualError) and error.exit_code == 1
    assert str(tmp_path / "missing" / "index.parquet") in str(error) and ".tmp" not in str(error)
    with pytest.raises(OSError) as info:
        os.open(tmp_path, os.O_RDWR)  # a folder opened for writing
    assert info.value.errno == errno.EISDIR and "is a folder" in str(os_error(info.value))
    text = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's form
    error = os_error(text, tmp_path)
    assert error.exit_code == 2 and "free some space" in str(error) and str(tmp_path) in str(error)


# --- 4. temporaries of killed writers -----------------------------------------------------


def test_lock_sweeps_only_atomic_temporaries(capsys, tmp_path, scenes) -> None:
    ws = make_ws(capsys, tmp_path, scenes)
    stale = [
        ws / ".gpual.toml.ab12cd34.tmp.toml",
        ws / "superpixels" / ".index.parquet.zz99yy88.tmp.parquet",
        ws / "rounds" / "000" / ".train_state.pt.k3j4h5g6.tmp.pt",
        ws / "rounds" / "000" / "final" / ".checkpoint.pt.aaaa_aaa.tmp.pt",
        ws / "full" / ".metrics.json.q1w2e3r4.tmp.json",
    ]
    stale_dir = ws / "rounds" / "000" / ".overlays.bbbbbbbb.tmp"  # an atomic_dir folder
    kept = [
        ws / "rounds" / "000" / "notes.tmp.pt",
        ws / "rounds" / "000" / ".train_state.pt",
        ws / "rounds" / "000" / ".x.tmp",
        ws / "rounds" / "000" / "keep.abcdefgh.tmp.pt",  # no leading dot: not atomic's
        ws / "rounds" / "000" / ".answers.cccccccc.tmp" / "a.png",  # a swap cut between its renames:
        ws / "rounds" / "000" / ".answers.old" / "a.png",  # both copies stay for a person
    ]
    for path in [*stale, stale_dir / "0.png", *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    before = listing(ws)
    r = run_cli(capsys, "superpixels", ws, "--workers", "1")  # any command that takes the lock
    assert r.code == 0, r.err
    after = listing(ws)
    gone = {str(p.relative_to(ws)) for p in [*stale, stale_dir, stale_dir / "0.png"]}
    assert set(before) - set(after) == gone
    assert after == {k: v for k, v in before.items() if k not in gone}


# --- 5. advice that works, and the exit-code rule --------------------------------------------


def test_label_of_another_size_says_to_fix_the_label(tmp_path, scenes) -> None:
    from gpual.datasets import load_pair, open_dataset
    from gpual.training.data import ImageTargets

    data = own_data(tmp_path, scenes)
    spec = open_dataset("folder", data)
    sample = spec.samples("train")[0]
    cv2.imwrite(str(sample.label), np.zeros((40, 64), np.uint8))
    with pytest.raises(GpualError, match="fix or replace the label") as info:
        load_pair(spec, sample)
    assert "superpixels" not in str(info.value)
    from gpual.datasets import read_label

    targets = ImageTargets([sample.image], [read_label(spec, sample.label)], 1.0, [sample.label])
    with pytest.raises(GpualError, match="fix or replace it") as info:
        targets[0]
    assert str(sample.label) in str(info.value) and "superpixels" not in str(info.value)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda text: text + "\nbudget = = 3\n", ("is not valid TOML", "fix line")),
        (lambda text: text.replace("[acquisition]\n", "[acquisition]\nbudgett = 3\n"), ("unknown key(s) budgett", "fix it in")),
        (lambda text: text.replace("init_budget = 40", 'init_budget = "forty"'), ("acquisition.init_budget must be int", "fix it in")),
        (lambda text: text.replace("init_budget = 40", "init_budget = 0"), ("acquisition.init_budget = 0 must be positive", "fix it in")),
    ],
    ids=["bad-toml", "unknown-key", "wrong-type", "out-of-range"],
)
def test_a_bad_config_names_the_file_and_the_fix_with_exit_code_2(capsys, tmp_path, scenes, edit, needles) -> None:
    ws = make_ws(capsys, tmp_path, scenes, superpixels=False)
    config = ws / "gpual.toml"
    config.write_text(edit(config.read_text()))
    before = listing(ws)
    for command in (("status", ws), ("superpixels", ws)):
        r = run_cli(capsys, *command)
        line = one_line_error(r.code, r.err, 2, str(config), *needles)
        assert "--force" not in line
    assert listing(ws) == before
    if needles[0] == "is not valid TOML":
        lines = config.read_text().splitlines()
        assert f"line {len(lines)} of {config}" in line


def test_exit_codes_follow_the_rule(capsys, tmp_path, scenes) -> None:
    ws = make_ws(capsys, tmp_path, scenes)
    before = listing(ws)
    r = run_cli(capsys, "select", ws, "--round", "0", "--budget", "100000")  # data / state: 1
    one_line_error(r.code, r.err, 1, "larger than the")
    assert listing(ws) == before
    r = run_cli(capsys, "init", tmp_path / "other", "--data", scenes, "--dataset", "folder",
                "--set", "acquisition.budget=0")  # an option: 2, and no gpual.toml to fix yet
    one_line_error(r.code, r.err, 2, "acquisition.budget = 0 must be positive", "fix the --set value")
    assert not (tmp_path / "other").exists()


# --- 6. option errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("select", "{ws}", "--round", "-1"), ("Invalid value for '--round'", "see `gpual select --help`")),
        (("select", "{ws}", "--round", "0", "--budget", "0"), ("Invalid value for '--budget'", "see `gpual select --help`")),
        (("select", "{ws}", "--round", "0", "--bogus"), ("No such option: --bogus", "see `gpual select --help`")),
        (("train", "{ws}", "--round", "zero"), ("Invalid value for '--round'", "see `gpual train --help`")),
        (("select",), ("Missing argument", "see `gpual select --help`")),
        (("frobnicate",), ("No such command 'frobnicate'", "see `gpual --help`")),
    ],
)
def test_option_errors_are_one_line(capsys, tmp_path, args, needles) -> None:
    r = run_cli(capsys, *(a.format(ws=tmp_path) for a in args))
    one_line_error(r.code, r.err, 2, *needles)
    assert "Usage:" not in r.err and "Try '" not in r.err and r.out == ""
