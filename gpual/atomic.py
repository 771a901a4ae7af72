"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

An exception (or a kill) before the rename leaves the previous file untouched, so an
interrupted command never leaves half-written state behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The temporary names given here: "." + the target's NAME + "." + tempfile's 8 random
# characters + ".tmp", plus NAME's suffix for a file (".checkpoint.pt.k3j9x0ab.tmp.pt").
# Nothing else has them.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps ``path``'s suffix so writers that look at it (``to_parquet``,
    ``torch.save``, ``cv2.imwrite``) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(folder: Path) -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder`` (not below it); return them.

    Only names this module makes (:data:`TEMP_NAME`): files, and folders of
    :func:`atomic_dir` unless ``.NAME.old`` is beside them (a swap cut between its two
    renames: the only copies, left for a person to look at). The caller must hold the
    lock that every writer of ``folder`` holds, so no temporary is still being written.
    Best effort: what cannot be deleted is left (the command then fails where it writes).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None:
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if match["suffix"] is not None or (path.parent / f".{match['name']}.old").exists():
                    continue
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(path: Path, frame: Any) -> None:
    """Write a pandas or cuDF DataFrame to ``path`` atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # NumPy / CuPy scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
