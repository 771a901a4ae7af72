"""What every ``gpual`` command shares: the consoles, the option definitions (one place
for their help text), table cells, and the workspace the running command named.

Command modules (``cli/<stage>.py``) import from here, and :mod:`cli.main` imports them:
this module imports neither, so there is no cycle.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # commands and paths stay on one line, copy-pasteable
err_console = Console(stderr=True, soft_wrap=True)

# Shared option definitions: one place for their help text.
WorkspaceArg = typer.Argument(..., help="Workspace folder (created by `gpual init`).", show_default=False)
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when torch sees a GPU; selection also needs cuML/cuDF there).")
RoundOpt = typer.Option(..., "--round", "-r", help="Round number (0 = the random initial labels).", min=0)


def cell(value: float | None, form: str) -> str:
    """A table cell: ``value`` in ``form`` (e.g. ".4f", ".2%"), or "-" when it is absent."""
    return "-" if value is None else format(value, form)


def final_columns(rows: list[dict]) -> tuple[str, ...]:
    """The final-retraining column's header when any round row has a ``final_miou``, else none."""
    return ("mIoU, final retraining",) if any(row.get("final_miou") is not None for row in rows) else ()


# The workspace the running command named, for errors that carry no file name (a write
# that ran out of space): set by workspace_path.
current_workspace: Path | None = None


def workspace_path(path: Path) -> Path:
    """Normalise a workspace argument (no existence check: commands decide)."""
    global current_workspace
    current_workspace = Path(path).expanduser()
    return current_workspace
