"""The active-learning loop, ``gpual run``: per round select -> label -> train -> evaluate,
then optionally the final retraining on chosen rounds' labels; resumable (each step is
skipped when its file exists; an interrupted training resumes from its last epoch)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpual.backend import Backend
from gpual.workspace import Workspace

# Called as report(round, step, info) after each step that ran; info is the step's summary.
Reporter = Callable[[int, str, dict[str, Any]], None]


@dataclass
class LoopOptions:
    """What ``gpual run`` may override for the rounds it selects (round 0 is always random)."""

    rounds: int
    strategy: str | None = None
    budget: int | None = None
    budget_pixels: str | None = None
    split: str | None = None  # evaluation split; the config's val split by default
    final: tuple[int, ...] = ()  # rounds whose labels get the final retraining (fresh weights, train.final_epochs)


def run_loop(ws: Workspace, backend: Backend, options: LoopOptions, report: Reporter | None = None,
             progress: Callable[[str, int | None], Callable[[int, int], None] | None] | None = None,
             cluster: Any | None = None, announce: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
    """Finish rounds ``0 .. options.rounds-1``; returns one summary row per round.

    ``progress(step, round)`` (round None for superpixels) may return a callback ``(done,
    total)`` for that step's progress bar;
    ``announce(round, line)`` is told before each long stage of a selection (UMAP, KMeans).
    ``cluster`` (a :class:`gpual.distributed.DaskCluster`) runs the selection of rounds
    >= 1 on its workers; round 0 is random and needs none.
    """
    from gpual.acquisition.select import acquire
    from gpual.datasets import open_dataset
    from gpual.evaluation import evaluate
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.training.loop import train_final, train_round

    report = report or (lambda r, s, i: None)
    progress = progress or (lambda step, round: None)
    if not (ws.superpixel_dir / "index.parquet").exists():
        summary = build_cache(ws, progress=progress("superpixels", None))
        report(-1, "superpixels", vars(summary))
    split = options.split or ws.config.data.val_split
    spec = open_dataset(ws.config.data.dataset, ws.config.data.root)
    oracle = spec.has_labels(ws.config.data.pool_split)  # the simulated oracle needs the pool's ground truth
    scored = split in spec.splits() and spec.has_labels(split)
    if not scored:
        report(-1, "note", {"text": f"split '{split}' of {spec.root} has no labels: rounds are not evaluated"})
    for r in range(options.rounds):
        state = ws.round_state(r)
        if not state.selected:
            result = acquire(ws, r, backend, strategy=options.strategy if r > 0 else None,
                             budget=options.budget if r > 0 else None,
                             budget_pixels=options.budget_pixels if r > 0 else None,
                             progress=progress("select", r), cluster=cluster if r > 0 else None,
                             announce=(lambda line, r=r: announce(r, line)) if announce else None)
            report(r, "select", {"strategy": result.strategy, "regions": result.budget, "timings_s": result.timings,
                                 "notes": result.notes})
        if not state.labeled and not oracle:
            # A human loop: the round waits for its answers (annotate or import), then `run` continues.
            report(r, "await labels", {**ws.labeling(r), "workspace": str(ws.root)})
            return rounds_summary(ws, options.rounds)
        if not state.labeled:
            report(r, "label", label_round(ws, r))
        if not state.trained:
            info = train_round(ws, r, backend.device, resume=ws.resume_path(r).exists(), progress=progress("train", r))
            report(r, "train", info)
        if not state.evaluated and scored:
            info = evaluate(ws, r, split, backend.device)
            report(r, "evaluate", info)
    for r in sorted(set(options.final)):
        run = ws.model_run(r, final=True)
        if not run.checkpoint.exists():
            info = train_final(ws, r, backend.device, resume=run.state.exists(), progress=progress("final", r))
            report(r, "final", info)
        if "evaluation" not in ws.read_run_metrics(run) and scored:
            info = evaluate(ws, r, split, backend.device, final=True)
            report(r, "evaluate final", info)
    return rounds_summary(ws, options.rounds)


def rounds_summary(ws: Workspace, rounds: int) -> list[dict[str, Any]]:
    """Per round: strategy, labeled regions, labeled pixel share, mIoU and cumulative
    training epochs of the round's model, and the final retraining's mIoU and epochs where
    it ran (else None), from the metrics JSON files."""
    rows: list[dict[str, Any]] = []
    epochs: int | None = 0
    for r in range(rounds):
        metrics = ws.read_metrics(r)
        labeling = ws.labeling(r) if ws.query_path(r).exists() else {}
        trained = metrics.get("training", {}).get("epochs")
        # Rounds continue from the last one unless reinit_each_round: their epochs add up
        # (unknown from the first round without a training record on).
        if ws.config.train.reinit_each_round:
            epochs = trained
        else:
            epochs = None if trained is None or epochs is None else epochs + trained
        final = ws.read_run_metrics(ws.model_run(r, final=True))
        rows.append(
            {
                "round": r,
                "strategy": metrics.get("acquisition", {}).get("strategy"),
                "labeled_regions": labeling.get("regions"),
                "labeled_share": labeling.get("labeled_share"),
                "miou": metrics.get("evaluation", {}).get("miou"),
                "epochs_trained": epochs,
                "final_miou": final.get("evaluation", {}).get("miou"),
                "final_epochs": final.get("training", {}).get("epochs"),
            }
        )
    return rows
