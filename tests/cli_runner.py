"""Run the real `gpual` entry point in-process: exit code, stdout and stderr."""
from __future__ import annotations

import sys
from dataclasses import dataclass

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
