"""``gpual select``, ``gpual run`` and ``gpual demo``: acquisition rounds and the full loop."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cli.options import DeviceOpt, RoundOpt, WorkspaceArg, cell, console, final_columns, workspace_path
from cli.progress import StepFactory, StepProgress, progress_bars
from gpual.config import STRATEGIES
from gpual.workspace import CONFIG_NAME, Workspace

DaskOpt = typer.Option(
    None, "--dask", metavar="ADDRESS",
    help="Run selection on an existing Dask cluster (scheduler address, e.g. tcp://host:8786); "
    "its workers need gpual and must see the workspace and data at the same paths.",
)
GpusOpt = typer.Option(None, "--gpus", min=1, help="Start N dask-cuda GPU workers on this machine (gpu extra).")
DaskWorkersOpt = typer.Option(None, "--dask-workers", min=1, help="Start N local Dask CPU worker processes.")
StrategyOpt = typer.Option(None, "--strategy", "-s", help=f"One of: {', '.join(STRATEGIES)} (default: the config's).")
BudgetOpt = typer.Option(None, "--budget", "-b", help="Regions to select this round (default: the config's).", min=1)
BudgetPixelsOpt = typer.Option(None, "--budget-pixels", help="Budget as a share of the pool's pixels, e.g. 1.5%.")


def _select_progress(bars: StepFactory, round: int, description: str) -> StepProgress:
    """The progress of round ``round``'s selection: its teacher forward, in images."""
    return bars(f"select round {round} (teacher forward)", unit="images", description=description)


def _loop_progress(ws: Workspace, bars: StepFactory) -> Callable[[str, int | None], StepProgress]:
    """run_loop's ``progress(step, round)``: the step's bar (described as "select", "train"),
    its log lines named with the round it works on."""

    def factory(step: str, round: int | None) -> StepProgress:
        if step == "select" and round is not None:
            return _select_progress(bars, round, step)
        if step in ("train", "final") and round is not None:
            return bars(f"train {ws.model_run(round, step == 'final').label}", description=step)
        return bars(step, unit="images" if step in ("superpixels", "select") else "steps")

    return factory


def select(
    workspace: Path = WorkspaceArg,
    round: int = RoundOpt,
    strategy: str = StrategyOpt,
    budget: int = BudgetOpt,
    budget_pixels: str = BudgetPixelsOpt,
    force: bool = typer.Option(False, "--force", help="Select an already selected round again (discards its later steps)."),
    device: str = DeviceOpt,
    dask: str = DaskOpt,
    gpus: int = GpusOpt,
    dask_workers: int = DaskWorkersOpt,
) -> None:
    """Pick round N's regions to label with round N-1's teacher (round 0: at random).

    Reads the superpixel cache and rounds/N-1/checkpoint.pt; writes rounds/N/query.parquet,
    rounds/N/overlays/*.png and the acquisition times in rounds/N/metrics.json. With
    --dask, --gpus or --dask-workers the teacher forward, pooling, UMAP transform and
    KMeans run on Dask workers; a worker lost meanwhile fails the round, writing nothing.
    """
    from gpual.acquisition.select import acquire
    from gpual.backend import get_backend
    from gpual.distributed import cluster_for

    ws = Workspace.open(workspace_path(workspace))
    backend = get_backend(device)
    with ws.lock("select"), cluster_for(backend, dask, gpus, dask_workers) as cluster, progress_bars(console) as bars:
        where = f" via {cluster.description}" if cluster is not None else ""
        result = acquire(ws, round, backend, strategy, budget, budget_pixels, force,
                         progress=_select_progress(bars, round, "teacher forward"), cluster=cluster,
                         announce=lambda line: _announce(round, line))
    manifest = result.manifest
    console.print(
        f"round {round}: {result.strategy} selected {result.budget} of {result.candidates} candidate regions "
        f"({int(manifest['pixels'].sum())} pixels, {manifest['image'].nunique()} images) on {backend.name}{where}"
        + (f" ({backend.reason})" if backend.reason else "")
    )
    table = Table("stage", "seconds", title="acquisition stages")
    for stage, seconds in result.timings.items():
        table.add_row(stage, f"{seconds:.3f}")
    console.print(table)
    top = manifest.groupby("image").size().sort_values(ascending=False).head(5)
    console.print("most queried images: " + ", ".join(f"{i} ({n})" for i, n in top.items()))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"wrote {ws.query_path(round)}; next: gpual label {ws.root} --round {round}")


def _print_rounds(rows: list[dict[str, Any]]) -> None:
    extra = final_columns(rows)
    table = Table("round", "strategy", "labelled regions", "labelled pixels (share of pool)", "mIoU", *extra, title="active learning")
    for row in rows:
        table.add_row(
            str(row["round"]),
            str(row["strategy"] or "-"),
            str(row["labeled_regions"] if row["labeled_regions"] is not None else "-"),
            cell(row["labeled_share"], ".2%"),
            cell(row["miou"], ".4f"),
            *((cell(row["final_miou"], ".4f"),) if extra else ()),
        )
    console.print(table)


def _announce(round: int, line: str) -> None:
    """A long stage of round ``round``'s selection starts (UMAP, KMeans): one plain line."""
    console.print(f"select round {round}: {line}", markup=False, highlight=False)


def _reporter(r: int, step: str, info: dict[str, Any]) -> None:
    if step == "evaluate":
        console.print(f"round {r}: mIoU {info.get('miou', float('nan')):.4f}")
    elif step == "evaluate final":
        console.print(f"round {r}, final retraining: mIoU {info.get('miou', float('nan')):.4f}")
    elif step == "final":
        console.print(f"round {r}: final retraining, {info.get('epochs', '?')} epochs from fresh weights in {info.get('seconds', 0):.1f} s")
    elif step == "train":
        console.print(f"round {r}: trained {info.get('epochs', '?')} epochs in {info.get('seconds', 0):.1f} s")
    elif step == "select":
        console.print(f"round {r}: selected {info['regions']} regions ({info['strategy']})")
        for note in info.get("notes", []):
            console.print(f"round {r}: note: {note}")
    elif step == "label":
        console.print(f"round {r}: {info['answered']} regions answered by the simulated oracle ({info['labeled_share']:.2%} of the pool labelled)")
    elif step == "await labels":
        console.print(
            f"round {r}: {info['answered']:,} / {info['queried']:,} regions answered; the pool has no ground truth, so a person "
            f"labels them: `gpual annotate {info['workspace']} --round {r}` (or `gpual export` / `gpual import`), then run again"
        )
    elif step == "note":
        console.print(f"note: {info['text']}")
    elif step == "superpixels":
        console.print(f"superpixels: {info.get('images')} images, {info.get('regions_mean', 0):.0f} regions per image")


def run(
    workspace: Path = WorkspaceArg,
    rounds: int = typer.Option(3, "--rounds", "-n", help="Rounds to finish (round 0 = random initial labels).", min=1),
    strategy: str = StrategyOpt,
    budget: int = BudgetOpt,
    budget_pixels: str = BudgetPixelsOpt,
    split: str = typer.Option(None, "--split", help="Evaluation split (default: the config's val split)."),
    final: bool = typer.Option(False, "--final", help="Then retrain the last round's labels from fresh weights for "
                               "train.final_epochs (the paper's final stage; rounds/NNN/final/) and evaluate it."),
    device: str = DeviceOpt,
    dask: str = DaskOpt,
    gpus: int = GpusOpt,
    dask_workers: int = DaskWorkersOpt,
) -> None:
    """Run rounds 0..R-1: select -> label (simulated oracle) -> train -> evaluate.

    Resumable: re-running continues at the first unfinished step. Writes everything a
    round's steps write (rounds/NNN/*) and the superpixel cache if it is missing. --final
    adds `gpual train --round R-1 --final` and its evaluation at the end. With
    --dask, --gpus or --dask-workers the selection of rounds >= 1 runs on Dask workers
    (training and evaluation stay in this process).
    """
    from gpual.backend import get_backend
    from gpual.distributed import cluster_for
    from gpual.active_loop import LoopOptions, run_loop

    ws = Workspace.open(workspace_path(workspace))
    backend = get_backend(device)
    start = time.perf_counter()
    with ws.lock("run"), cluster_for(backend, dask, gpus, dask_workers) as cluster, progress_bars(console) as bars:
        options = LoopOptions(rounds, strategy, budget, budget_pixels, split, final=(rounds - 1,) if final else ())
        rows = run_loop(ws, backend, options, _reporter, _loop_progress(ws, bars), cluster=cluster,
                        announce=_announce)
    _print_rounds(rows)
    console.print(f"done in {time.perf_counter() - start:.0f} s on {backend.name}; workspace {ws.root}")


def demo(
    workspace: Path = typer.Option(Path("gpual-demo"), "--workspace", "-w", help="Where to put the synthetic data and rounds."),
    rounds: int = typer.Option(3, "--rounds", "-n", min=1, help="Active-learning rounds."),
    device: str = DeviceOpt,
    annotate: bool = typer.Option(False, "--annotate", help="Label round 1 yourself: round 0 runs with the simulated "
                                  "oracle, then round 1's regions are served in the browser; after Done the demo trains "
                                  "on your answers and evaluates."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="With --annotate: the page's port (0: any free one)."),
    open_browser: bool = typer.Option(True, "--open/--no-open", help="With --annotate: open the page in this machine's browser."),
) -> None:
    """The whole loop on synthetic scenes, no download: data, workspace, superpixels, `run`.

    Writes synthetic scenes and a workspace with the `demo` preset under --workspace,
    then runs the rounds and prints the mIoU and labelled pixel share per round. With
    --annotate, a person labels round 1 in the browser (`gpual annotate`) and the demo
    trains on those answers (all of them, or the ones given before Done)."""
    from gpual.backend import get_backend
    from gpual.config import make_config
    from gpual.active_loop import LoopOptions, run_loop
    from gpual.synthetic import make_scenes

    root = workspace_path(workspace)
    start = time.perf_counter()
    data = make_scenes(root / "data")
    if (root / CONFIG_NAME).exists():
        ws = Workspace.open(root)
    else:
        ws = Workspace.create(root, make_config("demo", {"data": {"root": str(data.root.resolve()), "dataset": "folder"}}))
    backend = get_backend(device)
    console.print(f"demo: {len(data.samples('train'))} synthetic pool images, {data.num_classes} classes, workspace {ws.root}, {backend.name}")
    with ws.lock("demo"), progress_bars(console) as bars:
        options = LoopOptions(1 if annotate else rounds)
        rows = run_loop(ws, backend, options, _reporter, _loop_progress(ws, bars), announce=_announce)
    if annotate:
        rows = _annotate_round_one(ws, backend, port, open_browser)
    _print_rounds(rows)
    console.print(f"demo done in {time.perf_counter() - start:.0f} s; inspect it with `gpual status {ws.root}`")


def _annotate_round_one(ws: Workspace, backend: Any, port: int, open_browser: bool) -> list[dict[str, Any]]:
    """Select round 1, serve it to a person, then train and evaluate on their answers."""
    from cli.annotate import report, serve
    from gpual.acquisition.select import acquire
    from gpual.evaluation import evaluate
    from gpual.active_loop import rounds_summary
    from gpual.training.loop import train_round

    with ws.lock("demo --annotate"):
        if not ws.round_state(1).selected:
            with progress_bars(console) as bars:
                result = acquire(ws, 1, backend, progress=_select_progress(bars, 1, "select"))
            _reporter(1, "select", {"strategy": result.strategy, "regions": result.budget, "notes": result.notes})
        state = ws.round_state(1)
        if not state.trained:
            session = serve(ws, 1, "127.0.0.1", port, backend.device.type, open_browser)
            report(session)
            if ws.round_state(1).answered == 0:
                console.print(f"no answers given: run `gpual demo --annotate -w {ws.root}` again to label round 1")
                return rounds_summary(ws, 2)
            with progress_bars(console) as bars:
                _reporter(1, "train", train_round(ws, 1, backend.device, partial=True,
                                                  progress=_loop_progress(ws, bars)("train", 1),
                                                  resume=ws.resume_path(1).exists()))
        if not ws.round_state(1).evaluated:
            _reporter(1, "evaluate", evaluate(ws, 1, ws.config.data.val_split, backend.device))
    return rounds_summary(ws, 2)


def register(app: typer.Typer) -> None:
    app.command("select")(select)
    app.command("run")(run)
    app.command("demo")(demo)
