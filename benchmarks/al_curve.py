"""Learning curves: mIoU vs labelled pixel share per round, for several strategies and seeds,
against the full-supervision reference trained with the same network and schedule.

    python benchmarks/al_curve.py --data ../shared/datasets/camvid --dataset camvid \\
        --preset cpu-small --strategies umap-kmeans-entropy,entropy,random --seeds 0,1 --rounds 4
    python benchmarks/al_curve.py --synthetic --preset demo --rounds 3     # no dataset needed

    python benchmarks/al_curve.py ... --strategies umap-kmeans-entropy --set acquisition.region_score=mean
    python benchmarks/al_curve.py ... --rounds 5 --final 2,4     # the paper's protocol at rounds 2 and 4

Two mIoUs per round. The round's model is fine-tuned round after round, so round r has
trained ``epochs_per_round`` x (r + 1) epochs (the table says how many) while the reference
trains ``final_epochs`` from fresh weights: their ratio mixes labels with training time.
``--final`` adds, for the rounds it names, the paper's final retraining (``gpual train
--round N --final``): fresh weights and ``final_epochs`` as the reference, so
mIoU(final) / mIoU(full) is the headline ratio of docs/method.md. The reference is trained once,
with the preset's ``train.seed`` (0 unless ``--set train.seed=...``); the run of that seed
shares its seeds too (initial weights, shuffles, flips, dropout), so there the labels are
the only difference; the other seeds' runs differ from it in their seeds as well.

Each (strategy, seed) gets its own workspace under ``--out`` (superpixels are computed
once and copied); ``--set`` values name the workspaces and the curves, so variants live
side by side, except values a strategy never reads (``random`` under
``acquisition.region_score=mean``): its runs are shared across them. Round 0 is random, seeded, and reads neither the strategy, the region
score nor the UMAP and KMeans settings, so it runs once per seed and is copied into any other workspace under ``--out``
that may share it. The full-supervision reference is trained once per ``--out`` and
reused by every run whose settings differ only in what it does not read (acquisition,
UMAP, KMeans); a workspace made with other settings is refused, never silently reused.
Writes JSON + a markdown table in benchmarks/results/ and a PNG with the mean and
spread (min..max) over seeds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_info, write_result  # noqa: E402

from gpual.backend import get_backend  # noqa: E402
from gpual.config import Config, make_config, merge_tables, parse_settings  # noqa: E402
from gpual.errors import GpualError  # noqa: E402
from gpual.loop import LoopOptions, run_loop  # noqa: E402
from gpual.strategies import settings_unread  # noqa: E402
from gpual.workspace import Workspace  # noqa: E402


# Config sections the full-supervision reference never reads: runs that differ only
# there share one base workspace (its superpixels and its reference).
RUN_ONLY_SECTIONS = ("acquisition", "umap", "kmeans")
# What round 0 (a seeded uniform draw, then training) does not read: two acquisition
# keys and the UMAP and KMeans sections.
ROUND_ZERO_IGNORES = (("acquisition", "strategy"), ("acquisition", "region_score"))
ROUND_ZERO_IGNORED_SECTIONS = ("umap", "kmeans")
# Process counts: they change how fast a run goes, never what it computes (flips and
# shuffling are seeded in the main process), so they never separate runs.
SPEED_ONLY = ("train.num_workers", "superpixels.workers")


def _skipped(key: str, skip: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is in ``skip`` (itself or by its section) or in :data:`SPEED_ONLY`."""
    return key in skip or key.split(".", 1)[0] in skip or key in SPEED_ONLY


def _differences(have: dict[str, Any], want: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts (sections or keys in ``skip`` left out)."""
    out = []
    for section in sorted(set(have) | set(want)):
        a, b = have.get(section, {}), want.get(section, {})
        out += [f"{section}.{key}" for key in sorted(set(a) | set(b))
                if a.get(key) != b.get(key) and not _skipped(f"{section}.{key}", skip)]
    return out


def _absent(written: dict[str, Any], want: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys of ``want`` that a workspace's ``gpual.toml`` (``written``) does not hold."""
    return [f"{section}.{key}" for section in sorted(want) for key in sorted(want[section])
            if key not in written.get(section, {}) and not _skipped(f"{section}.{key}", skip)]


def open_or_create(root: Path, config: Config, skip: tuple[str, ...] = ()) -> Workspace:
    """The workspace at ``root``, created with ``config`` if absent.

    An existing one must have been made with the same config (sections or dotted keys in
    ``skip`` aside):
    a run never silently continues under other settings.
    """
    if not (root / "gpual.toml").exists():
        return Workspace.create(root, config)
    ws = Workspace.open(root)
    differ = _differences(ws.config.to_dict(), config.to_dict(), skip)
    # A key its gpual.toml lacks was added to gpual after the workspace was made: its
    # default now may not be what its rounds ran with (umap.init was spectral before).
    written = tomllib.loads((root / "gpual.toml").read_text())
    differ += [f"{key} (not in its gpual.toml: made by an older gpual)" for key in _absent(written, config.to_dict(), skip)]
    if differ:
        raise GpualError(f"{root} was made with other settings ({', '.join(differ[:4])}): give another --out or remove it")
    return ws


def workspace_for(out: Path, name: str, base: Workspace, config: Config, skip: tuple[str, ...] = ()) -> Workspace:
    """A workspace for one run, sharing the base workspace's superpixel cache (copied).

    ``skip``: config sections or keys the run never reads (see :func:`open_or_create`).
    """
    fresh = not (out / name / "gpual.toml").exists()
    ws = open_or_create(out / name, config, skip)
    if fresh:
        shutil.copytree(base.superpixel_dir, ws.superpixel_dir, dirs_exist_ok=True)
    return ws


def share_round_zero(source: Workspace, target: Workspace) -> bool:
    """Copy a finished round 0 (query, labels, checkpoint, metrics, and its final retraining
    if any: it reads the same labels and training settings) from ``source`` to ``target``.

    Only where the two configs are equal but for what round 0 does not read (the strategy,
    the region score, UMAP and KMeans settings) and process counts (:data:`SPEED_ONLY`), and
    ``target`` has no round 0 yet. The copy goes to a temporary folder
    renamed into place, so an interrupted copy leaves no half round. Returns whether it copied.
    """
    if target.round_dir(0).exists() or not source.round_state(0).evaluated:
        return False
    ours, theirs = source.config.to_dict(), target.config.to_dict()
    for section, key in ROUND_ZERO_IGNORES + tuple(tuple(k.split(".")) for k in SPEED_ONLY):
        ours[section][key] = theirs[section][key]
    for section in ROUND_ZERO_IGNORED_SECTIONS:
        ours[section] = theirs[section]
    if ours != theirs:
        return False
    tmp = target.round_dir(0).with_name(".000.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.round_dir(0), tmp, ignore=shutil.ignore_patterns("train_state.pt"))
    os.replace(tmp, target.round_dir(0))
    return True


def share_round_zero_from_any(out: Path, target: Workspace) -> Workspace | None:
    """Give ``target`` a round 0 from any finished workspace under ``out`` it may share one with."""
    for root in sorted(p.parent for p in out.glob("*/gpual.toml")):
        if root.resolve() == target.root.resolve():
            continue
        source = Workspace.open(root)
        if share_round_zero(source, target):
            return source
    return None


def full_reference(base: Workspace, device: Any, split: str) -> float:
    """mIoU of the same network and schedule trained on every pool label (cached in base/full)."""
    from gpual.evaluation import evaluate
    from gpual.training import train_full

    miou = base.read_full_metrics().get("evaluation", {}).get("miou")
    if miou is not None:
        return float(miou)
    train_full(base, device, resume=(base.full_dir / "train_state.pt").exists())
    return float(evaluate(base, None, split, device)["miou"])


def final_rounds(text: str, rounds: int) -> tuple[int, ...]:
    """``--final``: "" (none), "last", "all" or comma-separated round numbers below ``rounds``."""
    text = text.strip()
    if not text:
        return ()
    if text in ("last", "all"):
        return (rounds - 1,) if text == "last" else tuple(range(rounds))
    try:
        chosen = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise GpualError(f"--final {text!r}: give last, all or round numbers such as 2,4") from None
    if chosen[0] < 0 or chosen[-1] >= rounds:
        raise GpualError(f"--final {text!r}: rounds run from 0 to {rounds - 1} with --rounds {rounds}")
    return chosen


def _finals(runs: list[list[dict[str, Any]]], r: int) -> list[float]:
    """The final-retraining mIoUs of round ``r`` over seeds (those that have one)."""
    return [run[r]["final_miou"] for run in runs if run[r].get("final_miou") is not None]


def plot(curves: dict[str, list[list[dict[str, Any]]]], full: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for strategy, runs in curves.items():
        share = np.array([[row["labeled_share"] for row in run] for run in runs], dtype=float) * 100
        miou = np.array([[row["miou"] for row in run] for run in runs], dtype=float)
        line, = ax.plot(share.mean(0), miou.mean(0), marker="o", label=f"{strategy} (round models)")
        ax.fill_between(share.mean(0), miou.min(0), miou.max(0), alpha=0.2)
        final = [(share.mean(0)[r], np.mean(v), min(v), max(v)) for r in range(share.shape[1]) if (v := _finals(runs, r))]
        if final:
            x, y, lo, hi = (np.array(c) for c in zip(*final))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], color=line.get_color(), marker="s", mfc="none", linestyle="--",
                        capsize=3, label=f"{strategy} (final retraining)")
    ax.axhline(full, color="k", linestyle="--", label=f"full supervision ({full:.3f})")
    ax.axhline(0.95 * full, color="gray", linestyle=":", label="95% of full")
    ax.set_xlabel("labelled pixels (% of pool)")
    ax.set_ylabel("mIoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(curves: dict[str, list[list[dict[str, Any]]]], full: float, full_epochs: int) -> str:
    """One row per (strategy, round): means over seeds of the round models and, where
    they ran, of the final retrainings (with how many seeds have one if not all)."""
    finals = any(_finals(runs, r) for runs in curves.values() for r in range(len(runs[0])))
    head = "| strategy | round | labelled pixels | round model mIoU | epochs trained | % of full |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if finals:
        head += f" final retraining mIoU ({full_epochs} epochs) | % of full, same schedule |"
        rule += "---:|---:|"
    lines = [head, rule]
    for strategy, runs in curves.items():
        for r in range(len(runs[0])):
            share = np.mean([run[r]["labeled_share"] for run in runs]) * 100
            miou = np.mean([run[r]["miou"] for run in runs])
            epochs = runs[0][r].get("epochs_trained")
            row = f"| {strategy} | {r} | {share:.2f}% | {miou:.4f} | {epochs if epochs is not None else '-'} | {100 * miou / full:.1f}% |"
            if finals:
                values = _finals(runs, r)
                seeds = "" if len(values) in (0, len(runs)) else f" ({len(values)} of {len(runs)} seeds)"
                row += (f" {np.mean(values):.4f}{seeds} | {100 * np.mean(values) / full:.1f}% |" if values else " - | - |")
            lines.append(row)
    lines.append(f"| full supervision | - | 100% | {full:.4f} | {full_epochs} | 100% |" + (" - | - |" if finals else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--synthetic", action="store_true", help="use generated scenes instead of --data")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--strategies", default="umap-kmeans-entropy,entropy,random")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, help="regions per round after round 0 (default: the preset's)")
    parser.add_argument("--init-budget", type=int, help="round-0 regions (default: the preset's)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--final", default="", metavar="ROUNDS",
                        help="rounds whose labels also get the final retraining (fresh weights, final_epochs, as the "
                             "reference): last, all, or e.g. 2,4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="config value for every run, e.g. acquisition.region_score=mean (repeatable); "
                             "names the runs and their curves")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpual-al-curve"))
    args = parser.parse_args()
    try:
        run(args, parser)
    except GpualError as exc:
        sys.exit(f"error: {exc}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:

    start = time.perf_counter()
    finals = final_rounds(args.final, args.rounds)  # bad input is refused before anything is written
    args.out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        from gpual.synthetic import make_scenes

        data, kind = make_scenes(args.out / "data").root, "folder"
    else:
        if args.data is None:
            parser.error("give --data PATH or --synthetic")
        data, kind = args.data.resolve(), args.dataset
    acquisition: dict[str, Any] = {}
    if args.budget:
        acquisition["budget"] = args.budget
    if args.init_budget:
        acquisition["init_budget"] = args.init_budget
    settings = parse_settings(args.settings)
    common = merge_tables(settings, {"data": {"root": str(data), "dataset": kind}, "acquisition": acquisition})
    backend = get_backend(args.device)

    from gpual.superpixels import build_cache

    reference = {k: v for k, v in common.items() if k not in RUN_ONLY_SECTIONS}
    base = open_or_create(args.out / "base", make_config(args.preset, reference), skip=RUN_ONLY_SECTIONS)
    build_cache(base)
    full = full_reference(base, backend.device, args.split)

    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for strategy in args.strategies.split(","):
        # Settings this strategy never reads neither name its runs nor keep them from
        # continuing a workspace made without them (random under region_score = mean).
        unread = settings_unread(strategy)
        variant = ",".join(s for s in args.settings if not _skipped(s.split("=", 1)[0].strip(), unread))
        label = f"{strategy} ({variant})" if variant else strategy
        for seed in (int(s) for s in args.seeds.split(",")):
            # A seed moves every random draw: round 0, training, UMAP and KMeans.
            config = make_config(args.preset, merge_tables(common, {
                "acquisition": {"strategy": strategy, "seed": seed}, "train": {"seed": seed},
                "umap": {"random_state": seed}, "kmeans": {"random_state": seed}}))
            name = f"{strategy}{'+' + variant.replace('/', '_') if variant else ''}-seed{seed}"
            ws = workspace_for(args.out, name, base, config, skip=unread)
            source = share_round_zero_from_any(args.out, ws)
            if source is not None:
                print(f"{name}: round 0 copied from {source.root.name}", flush=True)
            t0 = time.perf_counter()
            rows = run_loop(ws, backend, LoopOptions(args.rounds, split=args.split, final=finals))
            print(f"{label} seed {seed}: " + ", ".join(
                f"{100 * r['labeled_share']:.2f}% -> {r['miou']:.4f}"
                + (f" (final {r['final_miou']:.4f})" if r["final_miou"] is not None else "") for r in rows)
                + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            curves.setdefault(label, []).append(rows)

    full_epochs = int(base.read_full_metrics()["training"]["epochs"])
    table = markdown(curves, full, full_epochs)
    print(table)
    payload = {
        "machine": machine_info(),
        "versions": backend.versions(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "settings": args.settings,
        "data": str(data),
        "rounds": args.rounds,
        "full_supervision_miou": full,
        "full_supervision_epochs": full_epochs,
        "final_rounds": list(finals),
        "curves": curves,
        "ratio_to_full": {s: [[row["miou"] / full for row in run] for run in runs] for s, runs in curves.items()},
        # The headline ratio (same network and schedule as the reference), where run.
        "final_ratio_to_full": {s: [[None if row["final_miou"] is None else row["final_miou"] / full for row in run]
                                    for run in runs] for s, runs in curves.items()},
        "wall_seconds": time.perf_counter() - start,
    }
    path = write_result("al_curve", payload)
    path.with_suffix(".md").write_text(table)
    plot(curves, full, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
