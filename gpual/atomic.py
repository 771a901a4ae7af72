"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

An exception (or a kill) before the rename leaves the previous file untouched, so an
interrupted command never leaves half-written state behind; a write that fails also removes
the (empty) folders it created for its file. Every commit is durable too:
the temporary's bytes are fsynced before the rename and the folder after it, so a power
loss or a kernel crash after a command returned cannot leave an empty or torn file under
the final name (ext4 and xfs may otherwise persist the rename before the data).
"""
from __future__ import annotations

import errno
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
    made = make_parents(path)
    committed = False
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
            committed = True
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        if not committed:
            remove_empty(made)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    made = make_parents(path)
    committed = False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            fsync_tree(tmp)
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            committed = True
            fsync_dir(path.parent)  # the new folder is in place before the old copy goes
            # Also the copy a swap cut between its two renames left (no folder at ``path``,
            # its previous version in .NAME.old): the new folder supersedes it.
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not committed:
            remove_empty(made)


def make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return them, outermost first."""
    missing = [parent for parent in reversed(path.parents) if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first, as :func:`make_parents` returns them) that are
    empty, innermost first: a write that failed leaves no folder it made for itself."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (another write landed there) or already gone
            return


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (its writer has closed it). An error is the
    write's own failure (EIO, or ENOSPC of a delayed allocation): it propagates."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsync of a folder: refused by file systems that cannot (EINVAL), by some network file
# systems (ENOTSUP) and on platforms where a folder cannot be opened (Windows: EACCES).
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}


def fsync_dir(path: Path) -> None:
    """Flush the folder ``path``'s entries (a rename into it) to the disk, where the
    platform can: Linux and macOS open a folder read-only for this; elsewhere, and on file
    systems that refuse it, this does nothing (the rename itself is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIR_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """:func:`fsync_file` every file under ``root`` and :func:`fsync_dir` every folder
    (``root`` included), deepest first: a folder about to be renamed into place whole."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(folder))


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


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` atomically; a write the disk refuses is an ``OSError``.

    torch reports a failed write of a file it opened itself as a ``RuntimeError``
    ("[enforce fail at inline_container.cc] ... unexpected pos" or "PytorchStreamWriter
    failed writing file ... : file write failed"), which carries no errno: gpual.errors
    could not make it one line. Writing through a Python file lets the system's own
    ``OSError`` (ENOSPC, EIO, EDQUOT, EFBIG) come through; any write failure still reported
    as a ``RuntimeError`` becomes ``OSError(ENOSPC)``. Either names ``path``, not the
    temporary. Tensors may be on any device (torch.save copies them to the host).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch_save_to(obj, tmp, path)


# torch's messages for a write that failed part-way (caffe2/serialize/inline_container.cc).
_TORCH_WRITE_FAILED = re.compile(r"failed writing|file write failed|unexpected pos|write failed", re.IGNORECASE)


def torch_save_to(obj: Any, file: Path, name: Path | None = None) -> None:
    """``torch.save(obj)`` into ``file`` through a Python file object; a failed write is an
    ``OSError`` whose file name is ``name`` (default ``file``): see :func:`save_torch`."""
    import torch

    name = Path(name if name is not None else file)
    try:
        with open(file, "wb") as stream:
            torch.save(obj, stream)
    except OSError as exc:  # the system's own error (from torch's writes or the close's flush)
        raise _named(exc, name) from exc
    except RuntimeError as exc:
        cause = _os_error_in(exc)
        if cause is not None:
            raise _named(cause, name) from exc
        if _TORCH_WRITE_FAILED.search(str(exc)) is None:
            raise  # not a write failure (an unpicklable object, a bug): keep it as it is
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name)) from exc


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain of causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _named(exc: OSError, name: Path) -> OSError:
    """``exc`` with ``name`` as its file name (a failed ``write`` carries none)."""
    code = exc.errno if exc.errno is not None else errno.EIO
    return OSError(code, exc.strerror or os.strerror(code), str(name))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # NumPy / CuPy scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
