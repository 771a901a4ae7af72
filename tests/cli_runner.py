"""Run the real `gpual` entry point in-process (exit code, stdout and stderr), and ask
whether this machine lets a test use mount namespaces."""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """``gpual ARGS`` through ``cli.main.main`` (GpualError -> one line + exit code)."""
    from cli import main as cli_main

    argv = sys.argv
    sys.argv = ["gpual", *map(str, args)]
    code = 0
    try:
        cli_main.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def cli_quiet(*args: object) -> None:
    """``gpual ARGS`` in-process for a fixture (which cannot take capsys); it must succeed."""
    from cli import main as cli_main

    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["gpual", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    assert code == 0, (args, out.getvalue(), err.getvalue())


@lru_cache(maxsize=None)
def works(*command: str) -> bool:
    """Whether ``command`` runs here (namespaces and mounts may be refused in CI containers)."""
    try:
        return subprocess.run(list(command), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def mount_namespace_or_skip() -> None:
    """Skip, saying why, where `unshare -rm` cannot mount (a read-only bind, a tiny tmpfs)."""
    if not shutil.which("unshare") or not works("unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"):
        pytest.skip("needs `unshare -rm` with mount (a user + mount namespace) for a read-only bind mount or a "
                    "small tmpfs: refused on this machine")
