"""``gpual label``, ``gpual train`` and ``gpual evaluate``: the oracle, training and mIoU of a round."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.options import RoundOpt, WorkspaceArg, console, workspace_path
from cli.progress import progress_bars
from gpual.errors import GpualError
from gpual.workspace import ModelRun, Workspace

TrainDeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when torch sees a GPU; training needs no RAPIDS).")
OptionalRoundOpt = typer.Option(None, "--round", "-r", help="Round number (0 = the random initial labels).", min=0)
FullOpt = typer.Option(False, "--full", help="The full-supervision reference (every pool label) in WORKSPACE/full/ instead of a round.")
FinalOpt = typer.Option(False, "--final", help="With --round N: the final retraining on round N's labels (fresh weights, "
                        "train.final_epochs, the reference's schedule) in rounds/NNN/final/.")


def _model_run(ws: Workspace, round: int | None, full: bool, final: bool, command: str) -> ModelRun:
    """The model ``gpual COMMAND`` acts on, from its --round / --full / --final flags."""
    if full and round is not None:
        raise GpualError(f"give --round N or --full to `gpual {command}`, not both", 2)
    if final and round is None:
        raise GpualError(f"--final retrains a round's labels: give `gpual {command}` --round N with it", 2)
    if not full and round is None:
        raise GpualError(f"`gpual {command}` needs --round N (or --full for the full-supervision reference)", 2)
    return ws.model_run(None if full else round, final)


def label(workspace: Path = WorkspaceArg, round: int = RoundOpt) -> None:
    """Simulated oracle (the benchmark path): answer round N's queried regions from the pool's ground truth.

    Reads rounds/N/query.parquet, the pool's label files and the superpixel cache; writes
    the answers of the regions that have none yet into the label store
    (rounds/N/answers.parquet and rounds/N/answers/*.png, source oracle-pixel or
    oracle-dominant after acquisition.oracle). A person labels with `gpual annotate`, an
    annotation tool's export comes in with `gpual import`.
    """
    from gpual.oracle import label_round

    ws = Workspace.open(workspace_path(workspace))
    with ws.lock("label"):
        info = label_round(ws, round)
    console.print(
        f"round {round}: {info['answered']} of {info['queried']} regions answered by the oracle ({info['new_pixels']} pixels, "
        f"{', '.join(info['sources'])}); cumulative {info['regions']} regions, {info['pixels']} pixels = "
        f"{info['labeled_share']:.2%} of the pool"
    )
    console.print(f"wrote {ws.answers_path(round)}; next: gpual train {ws.root} --round {round}")


def train(
    workspace: Path = WorkspaceArg,
    round: int = OptionalRoundOpt,
    full: bool = FullOpt,
    final: bool = FinalOpt,
    device: str = TrainDeviceOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training from its last finished epoch."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (default: train.epochs_per_round, or train.final_epochs with --full or --final)."),
    partial: bool = typer.Option(False, "--partial", help="Train a round whose queried regions are not all answered yet "
                                 "on the answers there are (the unanswered regions return to the pool)."),
) -> None:
    """Train the student (CE + contrastive, EMA teacher, memory bank) on round N's labels.

    Reads the label store of rounds 0..N (rounds/*/answers.parquet and answers/*.png; never
    the pool's ground truth), the pool images, the superpixel cache and
    rounds/N-1/checkpoint.pt; writes rounds/N/train_state.pt after every epoch (removed at
    the end), then rounds/N/checkpoint.pt and the training summary in rounds/N/metrics.json.
    With --full: every pool label, into full/checkpoint.pt and full/metrics.json. With
    --round N --final: the final retraining on round N's labels from fresh weights, with the
    reference's schedule and seeds (same train.seed), into rounds/NNN/final/ (the paper's last stage, and the
    model whose mIoU over the reference's is the headline ratio).

    Progress: a bar in a terminal; in a log (not a terminal) a line every 30 s with the
    steps done, elapsed time and ETA (GPUAL_PROGRESS_SECONDS sets the seconds).
    """
    from gpual.backend import resolve_device
    from gpual.training.loop import train_final, train_full, train_round

    ws = Workspace.open(workspace_path(workspace))
    run = _model_run(ws, round, full, final, "train")
    dev = resolve_device(device)
    if run.round is not None:  # refuse before taking the lock or reading any image
        ws.require(run.round, "train", "train --final" if run.final else "train",
                   partial=partial or (run.final and ws.round_state(run.round).trained))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with ws.lock("train"), progress_bars(console, columns) as bars:
        progress = bars(f"train {run.label}", description="training")
        progress.start()

        def log(step: dict[str, Any]) -> None:
            progress.note(description=f"epoch {step['epoch']}/{step['epochs']} batch {step['batch']}/{step['batches']}",
                          detail=f"loss {step['loss']:.4f} (ce {step['ce']:.4f}, nce {step['nce']:.4f})")

        options = dict(resume=resume, progress=progress, epochs=epochs, log=log)
        if run.round is None:
            summary = train_full(ws, dev, **options)
        elif run.final:
            summary = train_final(ws, run.round, dev, **options)
        else:
            summary = train_round(ws, run.round, dev, partial=partial, **options)
    table = Table("epoch", "mean loss", title=f"{run.label}: {summary['images']} images, {summary['labeled_pixels']:,} labelled pixels")
    for i, loss in enumerate(summary["loss_per_epoch"], 1):
        table.add_row(str(i), f"{loss:.4f}")
    console.print(table)
    rate = summary["images_per_second"]
    console.print(
        f"trained {summary['epochs']} epochs in {summary['seconds']:.1f} s on {summary['device']}"
        + (f" ({rate:.1f} images/s)" if rate else "")
    )
    console.print(f"next: gpual evaluate {ws.root} {run.flags} --split val")


def evaluate(
    workspace: Path = WorkspaceArg,
    round: int = OptionalRoundOpt,
    full: bool = FullOpt,
    final: bool = FinalOpt,
    split: str = typer.Option("val", "--split", help="val or test (the config's data.val_split / data.test_split)."),
    device: str = TrainDeviceOpt,
) -> None:
    """mIoU, per-class IoU and confusion matrix of round N's teacher on the val or test split.

    Reads rounds/N/checkpoint.pt and the split's images and labels; writes `evaluation`
    (and `evaluations.<split>`) into rounds/N/metrics.json (full/metrics.json with --full,
    rounds/N/final/metrics.json with --final).
    """
    from gpual.evaluation import evaluate as run_evaluation
    from gpual.backend import resolve_device

    if split not in ("val", "test"):
        raise GpualError(f"--split {split!r} is not val or test", 2)
    ws = Workspace.open(workspace_path(workspace))
    run = _model_run(ws, round, full, final, "evaluate")
    dev = resolve_device(device)
    with ws.lock("evaluate"):
        result = run_evaluation(ws, run.round, split, dev, final=run.final)
    table = Table("class", "IoU", title=f"{run.label} on '{result['split']}' ({result['images']} images)")
    for name, iou in result["iou"].items():
        table.add_row(name, f"{iou:.4f}" if iou is not None else "-")
    table.add_row("[bold]mIoU[/]", f"[bold]{result['miou']:.4f}[/]")
    console.print(table)
    console.print(f"mIoU over {result['classes_averaged']} of {result['classes_total']} classes (the others are neither in "
                  f"'{result['split']}' nor predicted); pixel accuracy {result['pixel_accuracy']:.4f}; "
                  f"{result['seconds']:.1f} s on {result['device']}")
    if run.round is not None and not run.final:
        console.print(f"wrote {run.metrics}; next: gpual select {ws.root} --round {run.round + 1}")
    else:
        console.print(f"wrote {run.metrics}")


def register(app: typer.Typer) -> None:
    # cli.main._register_all may run more than once in one process (tests): register once.
    names = {command.name for command in app.registered_commands}
    for name, function in (("label", label), ("train", train), ("evaluate", evaluate)):
        if name not in names:
            app.command(name)(function)
