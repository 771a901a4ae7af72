"""``gpual init`` and ``gpual status``: create a workspace, show where its rounds stand."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from cli.main import WorkspaceArg, cell, console, final_columns, workspace_path
from gpual.config import DATASET_KINDS, make_config, merge_tables, parse_settings, preset_names
from gpual.errors import GpualError
from gpual.workspace import Workspace


def init(
    workspace: Path = WorkspaceArg,
    data: Path = typer.Option(..., "--data", help="Dataset root folder.", show_default=False),
    dataset: str = typer.Option("camvid", "--dataset", help=f"Layout: {', '.join(DATASET_KINDS)}."),
    preset: str = typer.Option("", "--preset", help="Config preset laid over the defaults (paper, cpu-small, demo)."),
    settings: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE laid over the preset, e.g. acquisition.region_score=mean (repeatable).", show_default=False
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing workspace config."),
) -> None:
    """Create WORKSPACE/gpual.toml with every default of the method (docs/method.md) (and the preset's values).

    Reads the dataset folder to check its layout and pool split; writes only gpual.toml.
    """
    from gpual.datasets import open_dataset

    root = Path(data).expanduser().resolve()
    spec = open_dataset(dataset, root)
    overrides = merge_tables(parse_settings(settings), {"data": {"root": str(root), "dataset": dataset}})
    try:
        config = make_config(preset or None, overrides)
    except GpualError as exc:  # a --set value (or the preset's) out of range: an option error, and no gpual.toml yet
        raise GpualError(str(exc).replace("fix it in gpual.toml", "fix the --set value"), 2) from None
    pool = spec.samples(config.data.pool_split)
    ws = Workspace.create(workspace_path(workspace), config, force=force)
    console.print(
        f"workspace [bold]{ws.root}[/]: {dataset} at {root}, {len(pool)} pool images in '{config.data.pool_split}', "
        f"{spec.num_classes} classes, preset {preset or 'defaults'}"
    )
    console.print(f"next: gpual superpixels {ws.root}")


def status(
    workspace: Path = WorkspaceArg,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show rounds, labeled regions, labeled pixel share and the next command. Reads only."""
    ws = Workspace.open(workspace_path(workspace))
    info = ws.status()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console.print(
        f"[bold]{info['workspace']}[/]  {info['dataset']} at {info['data']}\n"
        f"pool: {info['pool_images']} images, {info['pool_regions']} regions, {info['pool_pixels']} pixels"
    )
    extra = final_columns(info["rounds"])
    table = Table("round", "select", "label", "train", "evaluate", "labeled regions", "labeled share", "mIoU", *extra)
    mark = {True: "[green]done[/]", False: "-"}
    for r in info["rounds"]:
        table.add_row(
            str(r["round"]),
            mark[r["select"]],
            mark[True] if r["label"] else (f"{r['answered']:,}/{r['queried']:,}" if r["select"] else "-"),
            *(mark[r[s]] for s in ("train", "evaluate")),
            str(r.get("labeled_regions", "-")),
            cell(r.get("labeled_share"), ".2%"),
            cell(r.get("miou"), ".4f"),
            *((cell(r.get("final_miou"), ".4f"),) if extra else ()),
        )
    if info["rounds"]:
        console.print(table)
    for r in info["rounds"]:
        if r["select"] and not r["label"]:
            console.print(f"round {r['round']}: {r['answered']:,} / {r['queried']:,} regions answered")
    if info["full_miou"] is not None:
        console.print(f"full-supervision reference: mIoU {info['full_miou']:.4f}")
    if info["running"]:
        console.print(f"running: {info['running']}", highlight=False)
    console.print(f"next: [bold]{info['next']}[/]")


def presets() -> None:
    """List the config presets shipped with gpual and the values each sets over the defaults."""
    from gpual.config import load_preset

    for name in preset_names():
        values = load_preset(name)
        settings = ", ".join(f"{section}.{key} = {json.dumps(value)}" for section, table in values.items() for key, value in table.items())
        console.print(f"[bold]{name}[/]: {settings or 'the defaults'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("status")(status)
    app.command("presets")(presets)

