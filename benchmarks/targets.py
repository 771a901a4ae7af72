"""The acquisition targets, checked against the results in benchmarks/results/.

Reads the newest result JSON that measures each target and says whether it is met, not
met, not measured, or stale (measured on code that the commit named in ``since`` has
replaced). Nothing is timed here: run the benchmarks first, e.g. on a GPU machine

    python benchmarks/acquisition.py --workspace WS --round 0 --device both
    python benchmarks/acquisition.py --sweep 10000,100000,1000000,4000000 --device both --cpu-max-regions 100000
    python benchmarks/pooling.py --device cuda --size 360x480 --classes 11 --batch 16
    python benchmarks/targets.py               # a table; --markdown for the README

Targets (one H100; each row names the GPU its file was measured on): a CamVid-size round (~160k regions, budget ~1.6k) in <= 2 s after the
teacher forward (pooling through the manifest), >= 50x the CPU twin on the same machine;
a 4M-region round (stages after pooling) in <= 20 s with <= 16 GB of device memory;
pooling at >= 50% of the device's copy bandwidth (``pooling.py`` says how that is measured).
"""
from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

RESULTS = Path(__file__).resolve().parent / "results"
# The stages of a round after the teacher forward, as acquisition.py and `gpual select` time them.
AFTER_FORWARD = ("pooling", "handoff", "umap_fit", "umap_transform", "kmeans", "ranking", "manifest")
CAMVID_REGIONS = (100_000, 250_000)  # what counts as a CamVid-size pool (~155k regions at 360x480)
CITYSCAPES_REGIONS = 4_000_000
# Commit whose pooling (projection-map A @ P, batched) replaced what older results measured.
POOLING_SINCE = "e3a9070"


@dataclass
class Measurement:
    """One measured value of a target and where it comes from."""

    value: float
    source: str  # result file name
    commit: str | None  # gpual commit recorded in the file (None before eed6e79)
    note: str = ""
    since: str | None = None  # a value measured before this commit measured replaced code
    lower_bound: bool = False  # the true value may be larger (not everything was counted)
    proxy: bool = False  # measured on something standing in for what the target names


@dataclass
class Target:
    """A bound on a measured value: ``value <= limit`` (``at_most``) or ``value >= limit``."""

    name: str
    limit: float
    unit: str
    at_most: bool
    find: Callable[[list[tuple[str, dict[str, Any]]]], Measurement | None]


def _results(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, payload) of every result JSON, newest first (names end in a timestamp)."""
    out = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stem.rsplit("-", 2)[-2:], reverse=True):
        try:
            out.append((path.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _commit(payload: dict[str, Any]) -> str | None:
    machine = payload.get("machine")
    return machine.get("gpual_commit") if isinstance(machine, dict) else None


def _gpu(payload: dict[str, Any]) -> str:
    machine = payload.get("machine")
    return str(machine.get("gpu") or "") if isinstance(machine, dict) else ""


def _after_forward(stages: dict[str, Any]) -> float:
    return sum(float(stages.get(k, 0.0)) for k in AFTER_FORWARD)


def _acquisition(results: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((name, p) for name, p in results if name.startswith("acquisition-") and "-dask-" not in name)


def camvid_round(results: list[tuple[str, dict[str, Any]]]) -> Measurement | None:
    """Seconds after the forward on the GPU: the real pool of acquisition.py, else a `gpual run` round >= 1."""
    for name, payload in _acquisition(results):
        pool = payload.get("pool", {}).get("cuda")
        if pool:
            return Measurement(_after_forward(pool), name, _commit(payload), f"real pool, {pool['regions']:,} regions",
                               since=POOLING_SINCE)
    for name, payload in results:
        if not name.startswith("run-") or "cuda" not in name:
            continue
        rounds = [r["acquisition"]["timings_s"] for key, r in sorted(payload.get("rounds", {}).items())
                  if int(key) >= 1 and "timings_s" in r.get("acquisition", {})]
        if rounds:
            return Measurement(min(_after_forward(t) for t in rounds), name, _commit(payload),
                               f"`gpual run`, best of rounds 1-{len(rounds)}, one measurement each", since=POOLING_SINCE)
    return None


def camvid_speedup(results: list[tuple[str, dict[str, Any]]]) -> Measurement | None:
    """CPU twin / GPU seconds after the forward, both in one file (the same machine)."""
    for name, payload in _acquisition(results):
        pool = payload.get("pool", {})
        if pool.get("cuda") and pool.get("cpu"):
            return Measurement(_after_forward(pool["cpu"]) / _after_forward(pool["cuda"]), name, _commit(payload), "real pool",
                               since=POOLING_SINCE)
        sweep = payload.get("sweep", {})
        cpu = {r["regions"]: r for r in sweep.get("cpu", [])}
        both = [r for r in sweep.get("cuda", []) if r["regions"] in cpu and CAMVID_REGIONS[0] <= r["regions"] <= CAMVID_REGIONS[1]]
        if both:
            row = both[-1]
            n = row["regions"]
            return Measurement(cpu[n]["total"] / row["total"], name, _commit(payload),
                               f"generated features, {n:,} regions, stages after pooling", proxy=True)
    return None


def _cityscapes_row(results: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    for name, payload in _acquisition(results):
        for row in payload.get("sweep", {}).get("cuda", []):
            if row["regions"] >= CITYSCAPES_REGIONS:
                return name, payload, row
    return None


def _kmeans_note(payload: dict[str, Any]) -> str:
    kmeans = payload.get("sweep_kmeans") or {}
    return ", ".join(f"kmeans.{k}={kmeans[k]}" for k in ("levels", "init", "max_iter") if k in kmeans) or "default KMeans"


def cityscapes_round(results: list[tuple[str, dict[str, Any]]]) -> Measurement | None:
    """Seconds of the stages after pooling at 4M regions on the GPU."""
    found = _cityscapes_row(results)
    if found is None:
        return None
    name, payload, row = found
    return Measurement(float(row["total"]), name, _commit(payload), _kmeans_note(payload))


def cityscapes_memory(results: list[tuple[str, dict[str, Any]]]) -> Measurement | None:
    """Peak device GB at 4M regions: over all allocators where measured, else torch + CuPy only."""
    found = _cityscapes_row(results)
    if found is None:
        return None
    name, payload, row = found
    if "peak_device_mb_all_allocators" in row:
        return Measurement(row["peak_device_mb_all_allocators"] / 1024, name, _commit(payload), "all allocators")
    partial = (row.get("peak_device_mb_torch", 0.0) + row.get("device_pool_mb_cupy", 0.0)) / 1024
    return Measurement(partial, name, _commit(payload), "torch + CuPy only: cuML's RMM not counted", lower_bound=True)


def pooling_bandwidth(results: list[tuple[str, dict[str, Any]]]) -> Measurement | None:
    """Best share of the measured copy bandwidth over the sizes of the newest CUDA pooling run,
    pooling as `gpual select` runs it (eager, not ``--compile``)."""
    for name, payload in results:
        if not name.startswith("pooling-cuda-"):
            continue
        rows = [r for r in payload.get("results", []) if r.get("mode", "eager") == "eager"]
        if rows:
            row = max(rows, key=lambda r: r["share_of_copy_bandwidth"])
            return Measurement(100 * row["share_of_copy_bandwidth"], name, _commit(payload),
                               f"{row['size']}, {row['effective_gb_s']:.0f} of {payload['copy_bandwidth_gb_s']:.0f} GB/s",
                               since=POOLING_SINCE)
    return None


TARGETS = (
    Target("CamVid-size round after the forward (GPU)", 2.0, "s", True, camvid_round),
    Target("CamVid-size round: GPU vs CPU twin", 50.0, "x", False, camvid_speedup),
    Target("4M-region round, stages after pooling (GPU)", 20.0, "s", True, cityscapes_round),
    Target("4M-region round, peak device memory", 16.0, "GB", True, cityscapes_memory),
    Target("Pooling, share of copy bandwidth (GPU)", 50.0, "%", False, pooling_bandwidth),
)


def git_is_ancestor(older: str, newer: str) -> bool | None:
    """Whether commit ``older`` is in ``newer``'s history; None when git cannot say."""
    try:
        done = subprocess.run(["git", "-C", str(RESULTS.parent), "merge-base", "--is-ancestor", older, newer],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: True, 1: False}.get(done.returncode)


def check(results: list[tuple[str, dict[str, Any]]],
          is_ancestor: Callable[[str, str], bool | None] = git_is_ancestor) -> list[dict[str, Any]]:
    """One row per target: name, bound, value, status, source, note.

    Status: ``met``, ``NOT met``, ``not measured``, ``stale (...)`` when the value was
    measured before the commit that replaced the code it times, ``open (lower bound)``
    when only part of the value was counted and that part is within the bound; ``(proxy)``
    when the value stands in for it (generated features instead of the real pool).
    """
    rows = []
    payloads = dict(results)
    for target in TARGETS:
        bound = f"{'<=' if target.at_most else '>='} {target.limit:g} {target.unit}"
        found = target.find(results)
        row: dict[str, Any] = {"target": target.name, "bound": bound, "value": None, "status": "not measured",
                               "gpu": "", "source": "", "note": ""}
        if found is not None:
            met = found.value <= target.limit if target.at_most else found.value >= target.limit
            status = "met" if met else "NOT met"
            if found.lower_bound and met:
                status = "open (lower bound)"
            elif found.proxy:
                status += " (proxy)"
            row.update(value=found.value, status=status, source=found.source, note=found.note,
                       gpu=_gpu(payloads.get(found.source, {})))
            if found.since is not None:
                # "-dirty": run from a checkout of that commit with local changes on top.
                current = is_ancestor(found.since, found.commit.removesuffix("-dirty")) if found.commit else False
                if current is False:
                    row["status"] = f"stale ({status} before {found.since})"
                elif current is None:
                    row["note"] += f"; could not check it postdates {found.since}"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | bound | measured | status | GPU | source |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.3g}"
        source = f"`{r['source']}` ({r['note']})" if r["source"] else ""
        lines.append(f"| {r['target']} | {r['bound']} | {value} | {r['status']} | {r['gpu']} | {source} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    args = parser.parse_args()
    rows = check(_results(args.results))
    if args.markdown:
        print(markdown(rows), end="")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gpual acquisition targets")
    for column in ("target", "bound", "measured", "status", "GPU", "source"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["target"], r["bound"], "" if r["value"] is None else f"{r['value']:.3g}", r["status"], r["gpu"],
                      f"{r['source']}\n{r['note']}" if r["source"] else "")
    Console().print(table)


if __name__ == "__main__":
    main()
