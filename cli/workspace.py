"""``gpual init`` and ``gpual status``: create a workspace, show where its rounds stand."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from cli.options import WorkspaceArg, cell, console, final_columns, workspace_path
from gpual.config import DATASET_KINDS, Config, make_config, merge_tables, parse_settings, preset_names
from gpual.errors import GpualError
from gpual.workspace import Workspace

# Pool images whose sizes `gpual init` reads to estimate the pool's regions and pixels
# (decoding every image of a large pool would take minutes; the superpixel step counts them).
SIZE_SAMPLE = 8


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

    Reads the dataset folder to check its layout and pool split, and the sizes of up to 8
    pool images to print the budget as a share of the pool; writes only gpual.toml.
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
    for line in _init_budget_lines(config, [s.image for s in pool], ws.root / "gpual.toml"):
        console.print(line, highlight=False)
    console.print(f"next: gpual superpixels {ws.root}")


def _share(value: float) -> str:
    """A share as a percentage with two significant digits or more (2.8%, 0.35%, 140%)."""
    return f"{value:.0%}" if value >= 1 else f"{value:.1%}" if value >= 0.01 else f"{value:.2%}"


def _about(count: float) -> str:
    """An estimated count rounded to 3 significant digits, with thousands separators."""
    if count < 1000:
        return f"{round(count):,}"
    digits = len(str(int(count))) - 3
    return f"{round(count, -digits):,.0f}"


def estimate_pool(config: Config, images: list[Path]) -> tuple[float, float, int] | None:
    """(regions, pixels, images measured): the pool's superpixel count and pixel count at
    the working scale, estimated from the sizes of up to :data:`SIZE_SAMPLE` images spread
    evenly over it, each image taking the region count `gpual superpixels` aims at
    (its pixels / ``superpixels.region_pixels``). None for an empty pool or when none of
    the sampled images can be read (`gpual superpixels` then names the bad file)."""
    from gpual.datasets import read_image, scaled_size
    from gpual.superpixels import target_regions

    if not images:
        return None
    k = min(SIZE_SAMPLE, len(images))
    picks = [round(i * (len(images) - 1) / max(1, k - 1)) for i in range(k)]  # distinct: the step is >= 1
    regions, pixels, measured = 0, 0, 0
    for i in picks:
        try:
            h, w = read_image(images[i]).shape[:2]
        except GpualError:
            continue
        h, w = scaled_size(h, w, config.data.scale)
        regions += target_regions(h, w, config.superpixels.region_pixels)
        pixels += h * w
        measured += 1
    if not measured:
        return None
    per_image = len(images) / measured
    return regions * per_image, pixels * per_image, measured


def _init_budget_lines(config: Config, images: list[Path], config_file: Path) -> list[str]:
    """What `gpual init` says about the budget: per round and for round 0, as an estimated
    share of the pool's regions and pixels (:func:`estimate_pool`)."""
    acq = config.acquisition
    estimate = estimate_pool(config, images)
    if acq.budget_unit == "pixels":
        per_round = f"budget: {_share(acq.budget_pixels)} of the pool's pixels per round"
    else:
        per_round = f"budget: {acq.budget:,} regions per round"
    if estimate is None:
        return [f"{per_round}, {acq.init_budget:,} regions in round 0 (the pool's size is not known until `gpual superpixels`)"]
    regions, pixels, measured = estimate
    region_px = config.superpixels.region_pixels
    if acq.budget_unit == "pixels":
        per_round += (f" = about {_about(acq.budget_pixels * regions)} regions of about {region_px} px, "
                      f"of the pool's about {_about(regions)}")
    else:
        per_round += (f" = about {_share(acq.budget / regions)} of the pool's about {_about(regions)} regions, "
                      f"about {_share(acq.budget * region_px / pixels)} of its pixels")
    round0 = (f"round 0 (acquisition.init_budget): {acq.init_budget:,} regions = about {_share(acq.init_budget / regions)} "
              f"of its regions, about {_share(acq.init_budget * region_px / pixels)} of its pixels")
    sampled = f"all {measured:,}" if measured == len(images) else f"{measured} of the {len(images):,}"
    how = (f"  (estimated from the sizes of {sampled} pool images at data.scale {config.data.scale:g} "
           f"and superpixels.region_pixels = {region_px}; `gpual status` gives the exact shares after `gpual superpixels`)")
    lines = [per_round, round0, how]
    largest = max(acq.init_budget, acq.budget if acq.budget_unit == "regions" else 0)
    if largest > regions:
        lines.append(f"  that is more than the pool's regions: lower acquisition.budget / acquisition.init_budget (or "
                     f"superpixels.region_pixels) in {config_file}")
    return lines


def _status_budget(config: Config, pool_regions: int, pool_pixels: int) -> dict | None:
    """The budget as an exact share of the pool (after `gpual superpixels`), or None before."""
    from gpual.acquisition.strategies import pixel_budget

    if not pool_regions:
        return None
    acq = config.acquisition
    out: dict = {"unit": acq.budget_unit, "round_0_regions": acq.init_budget,
                 "round_0_share_of_regions": acq.init_budget / pool_regions}
    if acq.budget_unit == "pixels":
        out.update(per_round_share_of_pixels=acq.budget_pixels, per_round_pixels=pixel_budget(acq.budget_pixels, pool_pixels))
    else:
        out.update(per_round_regions=acq.budget, per_round_share_of_regions=acq.budget / pool_regions)
    return out


def _budget_line(budget: dict, pool_regions: int, pool_pixels: int) -> str:
    round0 = f"round 0: {budget['round_0_regions']:,} = {_share(budget['round_0_share_of_regions'])} of its regions"
    if budget["unit"] == "pixels":
        return (f"budget: {_share(budget['per_round_share_of_pixels'])} of the pool's {pool_pixels:,} pixels per round = "
                f"{budget['per_round_pixels']:,} pixels ({round0})")
    return (f"budget: {budget['per_round_regions']:,} regions per round = {_share(budget['per_round_share_of_regions'])} "
            f"of the pool's {pool_regions:,} regions ({round0})")


def status(
    workspace: Path = WorkspaceArg,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show rounds, labelled regions, labelled pixels (share of the pool), the budget's share of the pool and the next command. Reads only."""
    ws = Workspace.open(workspace_path(workspace))
    info = ws.status()
    info["budget"] = _status_budget(ws.config, info["pool_regions"], info["pool_pixels"])
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console.print(
        f"[bold]{info['workspace']}[/]  {info['dataset']} at {info['data']}\n"
        f"pool: {info['pool_images']:,} images, {info['pool_regions']:,} regions, {info['pool_pixels']:,} pixels"
    )
    if info["budget"] is not None:
        console.print(_budget_line(info["budget"], info["pool_regions"], info["pool_pixels"]), highlight=False)
    extra = final_columns(info["rounds"])
    table = Table("round", "select", "label", "train", "evaluate", "labelled regions", "labelled pixels (share of pool)",
                  "mIoU", *extra)
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

