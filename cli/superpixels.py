"""``gpual superpixels``: compute (or reuse) the superpixel cache of a workspace's pool."""
from __future__ import annotations

import copy
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cli.options import WorkspaceArg, console, workspace_path
from cli.progress import progress_bars
from gpual.config import SUPERPIXEL_METHODS
from gpual.workspace import Workspace


class _ImagesPerSecond(ProgressColumn):
    """Images per second over the last few updates (rich's own speed estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "- img/s", style="progress.data.speed")


def superpixels(
    workspace: Path = WorkspaceArg,
    method: str = typer.Option(None, "--method", "-m", help=f"{' or '.join(SUPERPIXEL_METHODS)} (default: the config's); saved to gpual.toml after a successful run."),
    workers: int = typer.Option(None, "--workers", "-j", min=1, help="Processes computing in parallel (default: the config's superpixels.workers)."),
    region_pixels: int = typer.Option(None, "--region-pixels", min=1, help="Mean region size in pixels (default: the config's); saved to gpual.toml after a successful run."),
) -> None:
    """Compute the superpixels of every pool image, once; later runs reuse them.

    Reads the pool split's images and WORKSPACE/gpual.toml; writes WORKSPACE/superpixels/
    (one .npz per image and index.parquet) and, when --method or --region-pixels is given,
    their new values into gpual.toml. Images and settings that did not change are skipped.
    Refused once the workspace has rounds, if any image's superpixels would change.
    """
    from gpual.superpixels import build_cache

    ws = Workspace.open(workspace_path(workspace))
    saved = copy.deepcopy(ws.config)
    # build_cache reads the settings from ws.config: change them in memory only, and
    # write gpual.toml once the cache matches them (an unknown method fails in build_cache).
    if method is not None:
        ws.config.superpixels.method = method
    if region_pixels is not None:
        ws.config.superpixels.region_pixels = region_pixels
    columns = (TextColumn("superpixels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), _ImagesPerSecond())
    with ws.lock("superpixels"):
        try:
            with progress_bars(console, columns) as bars:
                progress = bars("superpixels", unit="images")
                progress.start()
                summary = build_cache(ws, workers=workers, progress=progress)
        except BaseException:
            ws.config = saved  # the file was never touched; keep the object consistent with it
            raise
        if ws.config != saved:
            ws.save_config()

    table = Table(title=f"superpixels ({summary.method}) in {ws.superpixel_dir}")
    for name in ("images", "computed", "skipped", "regions / image (mean, min, max)", "seconds", "images / s"):
        table.add_column(name, justify="right")
    rate = summary.computed / summary.seconds if summary.computed and summary.seconds > 0 else 0.0
    table.add_row(
        str(summary.images),
        str(summary.computed),
        str(summary.skipped),
        f"{summary.regions_mean:.1f}, {summary.regions_min}, {summary.regions_max}",
        f"{summary.seconds:.2f}",
        f"{rate:.1f}" if summary.computed else "-",
    )
    console.print(table)
    if ws.config != saved:
        console.print(f"saved superpixels.method = {ws.config.superpixels.method!r}, region_pixels = {ws.config.superpixels.region_pixels} to gpual.toml")
    round, step = ws.next_step()
    console.print(f"next: gpual {step} {ws.root} --round {round}")


def register(app: typer.Typer) -> None:
    # cli.main._register_all may run more than once in one process (tests): register once.
    if not any(command.name == "superpixels" for command in app.registered_commands):
        app.command("superpixels")(superpixels)
