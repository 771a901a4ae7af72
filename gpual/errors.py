"""The one error type gpual raises for bad input or a bad environment.

The CLI turns a :class:`GpualError` into a single line on stderr and a non-zero exit
code; library code raises it with a message that says what is wrong *and what to do*.

Exit codes (``GpualError.exit_code``), the rule every command keeps:

- **1: bad data or state.** A file of the dataset or the workspace is missing, damaged
  or not what it should be (an unreadable image, a label of the wrong size, a changed
  pool image, a corrupt table), or the workspace is not at the step the command needs
  (round order, an already selected round, a budget larger than the pool's candidates).
- **2: bad option, config or environment.** A command-line option or ``--set`` value is
  out of range or unknown (Click's usage errors included), ``gpual.toml`` is not valid
  TOML or holds an unknown key, a value of the wrong type or out of range, or the
  machine refuses (CUDA asked for but absent, a read-only or full disk, no permission).

130 is an interrupt (Ctrl-C). Anything else is a bug: it keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class GpualError(Exception):
    """A user-facing failure: one line that says what is wrong and what to do.

    ``exit_code`` is 1 for bad data or state (files, sizes, round order, budgets) and 2
    for a bad option, config or environment (see the module docstring).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # keep exit_code across process boundaries (worker pools)
        return (type(self), (self.args[0], self.exit_code))

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.args[0]).split())


# Refusals of the machine, not of the data: exit code 2.
_ENVIRONMENT = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                errno.ENOMEM, errno.EIO, errno.ENXIO, errno.ENODEV}


def os_error(exc: OSError, workspace: Path | str | None = None) -> GpualError:
    """A one-line :class:`GpualError` for an ``OSError`` met reading or writing files:
    which path, what the system said, and what to do about it.

    ``workspace`` is named when the error carries no file name (a ``write`` that ran out
    of space). A temporary file of :mod:`gpual.atomic` is named by its target.
    """
    code = exc.errno if exc.errno is not None else _errno_in_text(str(exc))
    name = exc.filename if exc.filename is not None else exc.filename2
    path = _target_name(name) if name is not None else None
    where = f"{path}" if path is not None else (f"the workspace {workspace}" if workspace is not None else "a file")
    reason = exc.strerror or (os.strerror(code) if code is not None else str(exc) or type(exc).__name__)
    folder = Path(workspace) if workspace is not None else (Path(path).parent if path is not None else None)
    if code == errno.EROFS:
        fix = (f"gpual writes into the workspace: remount {folder or 'that disk'} read-write, or copy the workspace "
               "to a writable disk and run the command there")
    elif code in (errno.EACCES, errno.EPERM):
        owner = f"`chmod -R u+rwX {folder}`" if folder is not None else "`chmod u+rw`"
        fix = f"give your user access ({owner}, or run as the files' owner) and run the command again"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = ("the disk (or your quota) is full: free some space and run the command again "
               "(the step that failed left its previous files as they were)")
    elif code == errno.ENOTDIR:
        blocker = _file_in_path(path)
        fix = (f"{blocker} is a file where gpual needs a folder: move it away, or give another workspace path"
               if blocker is not None else "a part of that path is a file where gpual needs a folder: move it away")
    elif code == errno.EISDIR:
        fix = "that path is a folder where gpual expects a file: move it away and run the command again"
    elif code == errno.ENOENT:
        fix = "it does not exist (deleted or moved while gpual ran?): check the path and run the command again"
    elif code in (errno.EMFILE, errno.ENFILE):
        fix = "too many open files: raise the limit (`ulimit -n 4096`) or use fewer workers"
    else:
        fix = "check the disk and the path, then run the command again"
    return GpualError(f"cannot access {where}: {reason}; {fix}", 2 if code in _ENVIRONMENT else 1)


def _target_name(name: str | bytes | os.PathLike | int) -> str:
    """``name``, or the target of gpual.atomic's temporary file ``name`` (dir/.x.pt.abcd1234.tmp.pt -> dir/x.pt)."""
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    path = Path(text)
    from gpual.atomic import TEMP_NAME

    match = TEMP_NAME.match(path.name)
    return str(path.with_name(match["name"])) if match else text


def _file_in_path(path: str | None) -> Path | None:
    """The first component of ``path`` that exists and is not a folder (ENOTDIR's cause)."""
    if path is None:
        return None
    for part in reversed([Path(path), *Path(path).parents]):
        try:
            if part.exists() and not part.is_dir():
                return part
        except OSError:
            return None
    return None


def _errno_in_text(text: str) -> int | None:
    """pyarrow's IO errors carry the errno in their message only: "... [errno 28] No space left on device"."""
    match = re.search(r"\[errno (\d+)\]", text, re.IGNORECASE)
    return int(match[1]) if match else None
