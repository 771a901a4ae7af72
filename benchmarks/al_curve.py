"""Learning curves: mIoU vs labelled pixel share per round, for several strategies and seeds,
against the full-supervision reference trained with the same network and schedule.

    python benchmarks/al_curve.py --data ../shared/datasets/camvid --dataset camvid \\
        --preset cpu-small --strategies umap-kmeans-entropy,entropy,random --seeds 0,1 --rounds 4
    python benchmarks/al_curve.py --synthetic --preset demo --rounds 3     # no dataset needed

    python benchmarks/al_curve.py ... --strategies umap-kmeans-entropy --set acquisition.region_score=mean
    python benchmarks/al_curve.py ... --rounds 5 --final 2,4     # the paper's protocol at rounds 2 and 4
    python benchmarks/al_curve.py ... --budget-pixels 1% --final last   # equal cost: 1% of the pool's pixels a round
    python benchmarks/al_curve.py ... --init-budget 800 --rounds 4 --budget-pixels 1%,2%,4%   # rounds at 1, 2, 4, 8%

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
Equal cost (``--budget-pixels SHARE``): every strategy labels SHARE of the pool's pixels
per round after round 0 (``acquisition.budget_unit = "pixels"``: each ranking is cut where
the next region would pass the budget, so the rounds' shares agree to within a region), and
the runs are compared at equal cost, paired by seed (``--budget-pixels 1%,2%,4%`` gives
each round after round 0 its own share: with a round 0 of about 1% the rounds then sit at
2%, 4% and 8% labelled): for each seed, the reference strategy's
(``--reference``, random) cumulative cost at each round is that seed's x, every other
strategy's mIoU is read off its own curve there (linear between its rounds, and along its
end segments for up to a quarter of their length beyond them; nothing further), and the
difference to the reference is taken seed by seed. The report gives per round the mean over seeds, the paired differences' mean and a 95%
t interval (scipy; a seeded bootstrap without it), for two cost models: labelled pixels
(what ``--budget-pixels`` equalises) and clicks (labelled regions, one per region under
``acquisition.oracle = "dominant"``). Without ``--budget-pixels`` the same comparison
interpolates curves of equal region budgets. ``--final`` adds, at the last round it names,
each strategy's ratio of the final retraining to full supervision, with the paired
difference to the reference (final retrainings are not interpolated: at equal cost only
when the budgets were in pixels).

Writes JSON + markdown tables in benchmarks/results/ and a PNG: mIoU against labelled
pixels (mean over seeds and its 95% interval per strategy), and the paired difference to
the reference with its interval.
"""
from __future__ import annotations

import argparse
import math
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

from gpual.acquisition.select import parse_budget_pixels  # noqa: E402
from gpual.backend import get_backend  # noqa: E402
from gpual.config import Config, make_config, merge_tables, parse_settings  # noqa: E402
from gpual.errors import GpualError  # noqa: E402
from gpual.active_loop import LoopOptions, run_loop  # noqa: E402
from gpual.acquisition.strategies import pixel_budget, settings_unread  # noqa: E402
from gpual.workspace import Workspace  # noqa: E402


# Config sections the full-supervision reference never reads: runs that differ only
# there share one base workspace (its superpixels and its reference).
RUN_ONLY_SECTIONS = ("acquisition", "umap", "kmeans")
# What round 0 (a seeded uniform draw of init_budget regions, then training) does not read:
# these acquisition keys (the pixel budget applies from round 1) and the UMAP and KMeans sections.
ROUND_ZERO_IGNORES = (("acquisition", "strategy"), ("acquisition", "region_score"), ("acquisition", "budget_unit"),
                      ("acquisition", "budget_pixels"), ("acquisition", "class_balance"),
                      ("acquisition", "clusters_per_budget"))
ROUND_ZERO_IGNORED_SECTIONS = ("umap", "kmeans")
# Process counts and where the decoded training images are held: they change how fast a
# run goes, never what it computes (flips and shuffling are seeded in the main process;
# resident and streamed batches are bit-identical), so they never separate runs.
SPEED_ONLY = ("train.num_workers", "superpixels.workers", "train.resident")


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


# Keys added to gpual after workspaces were made, with the value that does what gpual did
# before them: a gpual.toml without one ran with that value.
AS_BEFORE = {"acquisition.budget_unit": "regions", "acquisition.class_balance": 0.0,
             "acquisition.clusters_per_budget": 1.0}


def _as_before(key: str, want: dict[str, Any]) -> bool:
    """Whether a workspace made before ``key`` existed ran as ``want`` asks (see :data:`AS_BEFORE`)."""
    section, name = key.split(".", 1)
    if key == "acquisition.budget_pixels":  # read only with budget_unit = "pixels"
        return want["acquisition"].get("budget_unit") == "regions"
    return key in AS_BEFORE and want[section][name] == AS_BEFORE[key]


def _absent(written: dict[str, Any], want: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys of ``want`` that a workspace's ``gpual.toml`` (``written``) does not hold
    (those whose wanted value is what gpual did before the key existed aside)."""
    return [f"{section}.{key}" for section in sorted(want) for key in sorted(want[section])
            if key not in written.get(section, {}) and not _skipped(f"{section}.{key}", skip)
            and not _as_before(f"{section}.{key}", want)]


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
    from gpual.training.loop import train_full

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


def pixel_schedule(text: str, rounds: int) -> list[str]:
    """``--budget-pixels``: one share for every round after round 0 ("1%"), or one per round
    ("1%,2%,4%": rounds 1, 2 and 3; a doubling schedule puts rounds at 2%, 4% and 8% after a
    1% round 0). Returns the share's text for rounds 1 .. rounds-1; a bad share or a list
    of the wrong length is refused before anything is written."""
    parts = [part.strip() for part in text.split(",")]
    for part in parts:
        parse_budget_pixels(part)
    if len(parts) == 1:
        return parts * max(rounds - 1, 0)
    if len(parts) != rounds - 1:
        raise GpualError(f"--budget-pixels {text!r} gives {len(parts)} shares for the {rounds - 1} rounds after "
                         f"round 0 of --rounds {rounds}: give one share, or one per round")
    return parts


def within_budget(rows: list[dict[str, Any]], shares: list[float], pool_pixels: int) -> bool:
    """Whether every round r >= 1 labelled at most the pixel budget of ``shares[r - 1]``
    (:func:`gpual.acquisition.strategies.pixel_budget` of the pool's ``pool_pixels``)."""
    labelled = [row["labeled_share"] for row in rows]
    return all((b - a) * pool_pixels <= pixel_budget(share, pool_pixels) + 0.5
               for a, b, share in zip(labelled, labelled[1:], shares) if _finite(a) and _finite(b))


def _finals(runs: list[list[dict[str, Any]]], r: int) -> list[float]:
    """The final-retraining mIoUs of round ``r`` over seeds (those that have one)."""
    return [run[r]["final_miou"] for run in runs if run[r].get("final_miou") is not None]


# Cost models of the equal-cost comparison: the name, the summary row's cumulative cost,
# and how the tables show it.
COST_MODELS = {"pixels": "labeled_share", "clicks": "labeled_regions"}
# How far beyond its first or last round a run's curve may be read, as a share of that end
# segment's length (the segment extended linearly): a pixel budget leaves each round short
# of the budget by less than a region, a small part of a round; a curve that ends more than
# a quarter of a round short of x has no value there.
EXTRAPOLATE = 0.25
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 10_000


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def paired_interval(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of ``values`` (paired differences, or any per-seed numbers) and its two-sided
    ``confidence`` interval: Student's t (scipy.stats), or where scipy is missing a
    percentile bootstrap of the mean (``BOOTSTRAP_DRAWS`` draws, seed 0). Missing values
    (None, NaN) are left out; below two values the interval is None."""
    v = np.array([x for x in values if _finite(x)], dtype=float)
    out: dict[str, Any] = {"n": int(len(v)), "mean": float(v.mean()) if len(v) else None, "low": None, "high": None,
                           "method": None}
    if len(v) < 2:
        return out
    try:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
        out.update(low=out["mean"] - half, high=out["mean"] + half, method="t")
    except ImportError:
        means = np.random.default_rng(0).choice(v, size=(BOOTSTRAP_DRAWS, len(v))).mean(1)
        low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
        out.update(low=float(low), high=float(high), method="bootstrap")
    return out


def at_cost(run: list[dict[str, Any]], key: str, targets: list[float | None], value: str = "miou") -> list[float | None]:
    """``value`` of ``run`` (its summary rows) at cumulative costs ``targets`` (``key``: labelled
    share or regions): linear between its rounds and along its end segments for up to
    ``EXTRAPOLATE`` of their length beyond them; None further out, or where no round has
    the value."""
    points = [(row[key], row[value]) for row in run if _finite(row.get(key)) and _finite(row.get(value))]
    if not points:
        return [None] * len(targets)
    xs, ys = (np.array(c, dtype=float) for c in zip(*points))
    out: list[float | None] = []
    for t in targets:
        if not _finite(t):
            out.append(None)
        elif xs[0] <= t <= xs[-1]:
            out.append(float(np.interp(t, xs, ys)))
        elif len(xs) > 1 and (t < xs[0] and xs[0] - t <= EXTRAPOLATE * (xs[1] - xs[0])
                              or t > xs[-1] and t - xs[-1] <= EXTRAPOLATE * (xs[-1] - xs[-2])):
            i = 0 if t < xs[0] else len(xs) - 2  # the end segment, extended
            out.append(float(ys[i] + (ys[i + 1] - ys[i]) * (t - xs[i]) / (xs[i + 1] - xs[i])))
        else:
            out.append(None)
    return out


def equal_cost(curves: dict[str, list[list[dict[str, Any]]]], reference: str, cost: str = "pixels") -> dict[str, Any]:
    """The paired equal-cost comparison (module docstring) under one cost model.

    ``curves``: label -> runs (one list of round rows per seed, the seeds in one order for
    every label); ``reference``: the label the others are compared to. Returns ``x`` (per
    round, the mean over seeds of the reference's cost; shares for "pixels"),
    ``x_per_seed`` and per label ``miou`` / ``difference`` (per round:
    :func:`paired_interval` of the per-seed values, which are kept too).
    """
    key = COST_MODELS[cost]
    if reference not in curves:
        raise GpualError(f"no runs of the reference {reference!r} to compare with: add it to --strategies or give --reference")
    x_seed = [[row.get(key) for row in run] for run in curves[reference]]
    rounds = len(x_seed[0])
    baseline = [at_cost(run, key, xs) for run, xs in zip(curves[reference], x_seed)]
    out: dict[str, Any] = {"cost": cost, "key": key, "reference": reference,
                           "x": [paired_interval([xs[r] for xs in x_seed])["mean"] for r in range(rounds)],
                           "x_per_seed": x_seed, "strategies": {}}
    for label, runs in curves.items():
        if len(runs) != len(x_seed):
            raise GpualError(f"{label} has {len(runs)} seeds and the reference {len(x_seed)}: pair them seed by seed")
        values = [at_cost(run, key, xs) for run, xs in zip(runs, x_seed)]
        diffs = [[None if not (_finite(v) and _finite(b)) else v - b for v, b in zip(vs, bs)]
                 for vs, bs in zip(values, baseline)]
        out["strategies"][label] = {
            "miou": [paired_interval([vs[r] for vs in values]) for r in range(rounds)],
            "difference": [paired_interval([ds[r] for ds in diffs]) for r in range(rounds)],
            "miou_per_seed": values, "difference_per_seed": diffs,
        }
    return out


def final_comparison(curves: dict[str, list[list[dict[str, Any]]]], reference: str, full: float) -> dict[str, Any] | None:
    """At the last round with a final retraining: per label the ratio of the final mIoU to
    full supervision (:func:`paired_interval` over seeds) and the paired difference of the
    final mIoU to the reference's; None when no final retraining ran."""
    rounds = [r for runs in curves.values() for run in runs for r, row in enumerate(run) if _finite(row.get("final_miou"))]
    if not rounds or reference not in curves:
        return None
    r = max(rounds)
    base = [run[r].get("final_miou") for run in curves[reference]]
    out: dict[str, Any] = {"round": r, "reference": reference, "full_miou": full, "strategies": {}}
    for label, runs in curves.items():
        final = [run[r].get("final_miou") if r < len(run) else None for run in runs]
        diffs = [f - b if _finite(f) and _finite(b) else None for f, b in zip(final, base)]
        out["strategies"][label] = {
            "labeled_share": paired_interval([run[r].get("labeled_share") for run in runs])["mean"],
            "ratio_to_full": paired_interval([f / full if _finite(f) else None for f in final]),
            "difference": paired_interval(diffs),
            "final_per_seed": final, "difference_per_seed": diffs,
        }
    return out


def _interval_text(stat: dict[str, Any], scale: float = 1.0, digits: int = 4) -> str:
    if stat["low"] is None:
        return "-"
    return f"[{scale * stat['low']:+.{digits}f}, {scale * stat['high']:+.{digits}f}]"


def _value_text(x: float | None, digits: int = 4, sign: bool = False) -> str:
    return "-" if x is None else f"{x:{'+' if sign else ''}.{digits}f}"


def markdown_equal_cost(comparison: dict[str, Any]) -> str:
    """One row per (strategy, round): the common x, the mean mIoU there, and the paired
    difference to the reference: its mean, interval and value in each seed."""
    pixels = comparison["cost"] == "pixels"
    reference = comparison["reference"]
    unit = "labelled pixels" if pixels else "labelled regions (clicks)"
    lines = [f"At equal {'labelled pixels' if pixels else 'clicks'} (x: {reference}'s cost at each round of each seed; "
             f"{int(100 * CONFIDENCE)}% t intervals over seeds):", "",
             f"| strategy | round | {unit} | mIoU | seeds | difference to {reference} | {int(100 * CONFIDENCE)}% interval "
             "| per seed |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for label, row in comparison["strategies"].items():
        for r, x in enumerate(comparison["x"]):
            where = "-" if x is None else (f"{100 * x:.2f}%" if pixels else f"{x:.0f}")
            miou, diff = row["miou"][r], row["difference"][r]
            if label == reference:
                lines.append(f"| {label} | {r} | {where} | {_value_text(miou['mean'])} | {miou['n']} | (reference) | - | - |")
                continue
            seeds = " / ".join(_value_text(d[r], sign=True) for d in row["difference_per_seed"])
            lines.append(f"| {label} | {r} | {where} | {_value_text(miou['mean'])} | {miou['n']} | "
                         f"{_value_text(diff['mean'], sign=True)} | {_interval_text(diff)} | {seeds} |")
    return "\n".join(lines) + "\n"


def markdown_final(final: dict[str, Any]) -> str:
    """The final retraining at its last round: ratio to full supervision and the paired difference."""
    reference = final["reference"]
    lines = [f"Final retraining on round {final['round']}'s labels against full supervision ({final['full_miou']:.4f}):", "",
             f"| strategy | labelled pixels | of full, mean | {int(100 * CONFIDENCE)}% interval | per seed | seeds | "
             f"final mIoU minus {reference} | {int(100 * CONFIDENCE)}% interval | per seed |",
             "|---|---:|---:|---|---|---:|---:|---|---|"]
    full = final["full_miou"]
    for label, row in final["strategies"].items():
        ratio, diff = row["ratio_to_full"], row["difference"]
        share = "-" if row["labeled_share"] is None else f"{100 * row['labeled_share']:.2f}%"
        mean = "-" if ratio["mean"] is None else f"{100 * ratio['mean']:.1f}%"
        band = "-" if ratio["low"] is None else f"[{100 * ratio['low']:.1f}%, {100 * ratio['high']:.1f}%]"
        ratios = " / ".join("-" if not _finite(f) else f"{100 * f / full:.1f}%" for f in row["final_per_seed"])
        if label == reference:
            gaps = "(reference) | - | -"
        else:
            seeds = " / ".join(_value_text(d, sign=True) for d in row["difference_per_seed"])
            gaps = f"{_value_text(diff['mean'], sign=True)} | {_interval_text(diff)} | {seeds}"
        lines.append(f"| {label} | {share} | {mean} | {band} | {ratios} | {ratio['n']} | {gaps} |")
    return "\n".join(lines) + "\n"


def plot(comparison: dict[str, Any], full: float, path: Path, final: dict[str, Any] | None = None) -> Any:
    """Two panels against labelled pixels (``comparison``: :func:`equal_cost` under "pixels"):
    each strategy's mean mIoU over seeds with its 95% interval (and the final retrainings,
    if any), and the paired difference to the reference with its interval and the zero line.
    Writes ``path``; returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(13, 5))
    x = np.array([np.nan if v is None else 100 * v for v in comparison["x"]], dtype=float)

    def band(stats: list[dict[str, Any]], key: str) -> np.ndarray:
        return np.array([np.nan if s[key] is None else s[key] for s in stats], dtype=float)

    reference = comparison["reference"]
    for label, row in comparison["strategies"].items():
        line, = ax.plot(x, band(row["miou"], "mean"), marker="o", label=f"{label} (round models)")
        ax.fill_between(x, band(row["miou"], "low"), band(row["miou"], "high"), color=line.get_color(), alpha=0.2)
        if final is not None and label in final["strategies"]:
            f = final["strategies"][label]
            ratio = f["ratio_to_full"]
            if ratio["mean"] is not None and f["labeled_share"] is not None:
                y = ratio["mean"] * full
                err = [[0.0], [0.0]] if ratio["low"] is None else [[y - ratio["low"] * full], [ratio["high"] * full - y]]
                ax.errorbar([100 * f["labeled_share"]], [y], yerr=err, color=line.get_color(), marker="s", mfc="none",
                            capsize=3, label=f"{label} (final retraining, round {final['round']})")
        if label != reference:
            diff = row["difference"]
            gap.plot(x, band(diff, "mean"), marker="o", color=line.get_color(), label=label)
            gap.fill_between(x, band(diff, "low"), band(diff, "high"), color=line.get_color(), alpha=0.2)
    ax.axhline(full, color="k", linestyle="--", label=f"full supervision ({full:.3f})")
    ax.axhline(0.95 * full, color="gray", linestyle=":", label="95% of full")
    ax.set_xlabel("labelled pixels (% of pool)")
    ax.set_ylabel("mIoU")
    ax.set_title(f"mean over seeds, {int(100 * CONFIDENCE)}% interval")
    ax.legend(fontsize=7)
    short = reference.split(" (", 1)[0]  # the strategy, without its settings
    gap.axhline(0.0, color="k", linewidth=1)
    gap.set_xlabel(f"labelled pixels (% of pool; {short}'s, per seed)")
    gap.set_ylabel(f"mIoU minus {short}'s, paired by seed")
    gap.set_title(f"paired difference, {int(100 * CONFIDENCE)}% t interval")
    if len(comparison["strategies"]) > 1:
        gap.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


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
    parser.add_argument("--budget-pixels", metavar="SHARE",
                        help="equal cost: SHARE of the pool's pixels per round after round 0 for every strategy "
                             "(e.g. 1%% or 0.01; acquisition.budget_unit = \"pixels\"), or one share per round "
                             "(1%%,2%%,4%%); not with --budget")
    parser.add_argument("--reference", default="random",
                        help="the strategy the others are compared to, seed by seed (default: random)")
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


def _step_lines(name: str, t0: float) -> Any:
    """A :data:`gpual.active_loop.Reporter` printing one line per finished step of a run, so
    a log shows where a long protocol is."""
    def report(r: int, step: str, info: dict[str, Any]) -> None:
        if step not in ("note", "await labels"):
            print(f"{name} round {r}: {step} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report


def _run(ws: Workspace, backend: Any, args: argparse.Namespace, finals: tuple[int, ...],
         schedule: list[str] | None, report: Any) -> list[dict[str, Any]]:
    """Finish one (strategy, seed) run: its rounds, then the final retrainings of ``finals``.

    Under a pixel schedule each round is run with its own share (the loop resumes the rounds
    already done). The loop is given the share even where the workspace's config holds it:
    a gpual whose selection does not read acquisition.budget_unit still converts it to
    regions of the mean size.
    """
    if schedule is None:
        return run_loop(ws, backend, LoopOptions(args.rounds, split=args.split, final=finals), report)
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        last = r == args.rounds - 1
        rows = run_loop(ws, backend, LoopOptions(r + 1, split=args.split, final=finals if last else (),
                                                 budget_pixels=schedule[r - 1] if r else None), report)
    return rows


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:

    start = time.perf_counter()
    finals = final_rounds(args.final, args.rounds)  # bad input is refused before anything is written
    if args.budget and args.budget_pixels:
        parser.error("give --budget (regions) or --budget-pixels (a share of the pixels), not both")
    schedule = pixel_schedule(args.budget_pixels, args.rounds) if args.budget_pixels else None
    shares = [parse_budget_pixels(text) for text in schedule] if schedule is not None else None
    # The workspaces' acquisition.budget_pixels: round 1's share.
    share = parse_budget_pixels(args.budget_pixels.split(",")[0]) if args.budget_pixels else None
    strategies = args.strategies.split(",")
    reference_strategy = args.reference if args.reference in strategies else strategies[0]
    if reference_strategy != args.reference:
        print(f"note: --reference {args.reference} is not among --strategies: the runs are compared to "
              f"{reference_strategy}", flush=True)
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
    if share is not None:
        acquisition.update(budget_unit="pixels", budget_pixels=share)
    settings = parse_settings(args.settings)
    common = merge_tables(settings, {"data": {"root": str(data), "dataset": kind}, "acquisition": acquisition})
    backend = get_backend(args.device)

    from gpual.superpixels import build_cache, read_index

    reference = {k: v for k, v in common.items() if k not in RUN_ONLY_SECTIONS}
    base = open_or_create(args.out / "base", make_config(args.preset, reference), skip=RUN_ONLY_SECTIONS)
    build_cache(base)
    full = full_reference(base, backend.device, args.split)
    pool_pixels = int(read_index(base)["pixels"].sum())

    curves: dict[str, list[list[dict[str, Any]]]] = {}
    labels: dict[str, str] = {}  # strategy -> its curve's label
    honoured: dict[str, bool] = {}  # workspace -> whether its rounds stayed within the pixel budget
    seeds = [int(s) for s in args.seeds.split(",")]
    for strategy in strategies:
        # Settings this strategy never reads neither name its runs nor keep them from
        # continuing a workspace made without them (random under region_score = mean).
        unread = settings_unread(strategy)
        variant = ",".join(s for s in args.settings if not _skipped(s.split("=", 1)[0].strip(), unread))
        if schedule is not None:
            # A schedule names its runs by its shares ("pixels=1%-2%-4%"): a comma separates settings.
            variant = ",".join(v for v in (f"pixels={'-'.join(dict.fromkeys(schedule))}", variant) if v)
        label = labels[strategy] = f"{strategy} ({variant})" if variant else strategy
        for seed in seeds:
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
            rows = _run(ws, backend, args, finals, schedule, _step_lines(name, t0))
            if shares is not None:
                honoured[name] = within_budget(rows, shares, pool_pixels)
                if not honoured[name]:
                    print(f"warning: {name} labelled more than its pixel budget in a round: this gpual's "
                          "selection does not cut at acquisition.budget_pixels; the comparison interpolates each "
                          "curve at the reference's x", flush=True)
            print(f"{label} seed {seed}: " + ", ".join(
                f"{100 * r['labeled_share']:.2f}% -> {r['miou']:.4f}"
                + (f" (final {r['final_miou']:.4f})" if r["final_miou"] is not None else "") for r in rows)
                + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            curves.setdefault(label, []).append(rows)

    full_epochs = int(base.read_full_metrics()["training"]["epochs"])
    reference = labels[reference_strategy]
    compared = {cost: equal_cost(curves, reference, cost) for cost in COST_MODELS}
    final = final_comparison(curves, reference, full)
    table = "\n".join([markdown(curves, full, full_epochs), markdown_equal_cost(compared["pixels"]),
                       markdown_equal_cost(compared["clicks"])] + ([markdown_final(final)] if final else []))
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
        "seeds": seeds,
        "budget_pixels": shares[0] if shares and len(set(shares)) == 1 else shares,
        "pixel_budget_honoured": honoured if share is not None else None,
        "curves": curves,
        # Paired by seed against the reference, at equal labelled pixels and at equal clicks.
        "equal_cost": compared,
        "final_comparison": final,
        "ratio_to_full": {s: [[row["miou"] / full for row in run] for run in runs] for s, runs in curves.items()},
        # The headline ratio (same network and schedule as the reference), where run.
        "final_ratio_to_full": {s: [[None if row["final_miou"] is None else row["final_miou"] / full for row in run]
                                    for run in runs] for s, runs in curves.items()},
        "wall_seconds": time.perf_counter() - start,
    }
    path = write_result("al_curve", payload)
    path.with_suffix(".md").write_text(table)
    plot(compared["pixels"], full, path.with_suffix(".png"), final)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
