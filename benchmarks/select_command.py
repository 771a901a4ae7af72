"""Wall time of the whole ``gpual select WS --round N`` command, and its parts.

What a user waits for is the command, not the stages after the forward: process start and
imports, the pool's tables, the checkpoint, the images' decoding, the teacher forward,
pooling, UMAP, KMeans, ranking, the manifest and the overlays. Each repeat runs the real
command in a fresh process on a copy of the workspace that holds rounds 0..N-1 only
(``--workspace`` is never written), and reads the parts from the round's
``metrics.json`` (``acquisition.timings_s``, which ``gpual select`` records). The start
and the imports are timed in a separate fresh process that imports what the command
imports, the backend's libraries included (cuML and cuDF on CUDA).

    python benchmarks/select_command.py --workspace ws --round 2 --device cuda --repeats 3
    python benchmarks/select_command.py --synthetic --device cpu     # a demo workspace, no data needed

Writes benchmarks/results/select_command-<backend>-<date>.json: the command's wall time
(median of the repeats), each part, what the parts leave out (workspace open, lock,
config, printing), and the children's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_info, peak_rss_mb, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The select command's code path and the backend's libraries: what a fresh process imports
# before it can start selecting.
IMPORTS = ("import cli.main, cli.acquire, gpual.acquisition.select, gpual.acquisition.forward; "
           "from gpual.backend import get_backend; get_backend({device!r})")
GPUAL = "import sys; from cli.main import main; sys.argv[0] = 'gpual'; main()"


def copy_before(workspace: Path, round: int, target: Path) -> Path:
    """A copy of ``workspace`` with its rounds below ``round`` (what ``select --round
    round`` reads), so the command can run again and again without touching the original."""
    shutil.copytree(workspace, target, ignore=shutil.ignore_patterns("rounds", "*.lock", ".lock"))
    for r in range(round):
        source = workspace / "rounds" / f"{r:03d}"
        if source.exists():
            shutil.copytree(source, target / "rounds" / f"{r:03d}", ignore=shutil.ignore_patterns("train_state.pt"))
    return target


def _timed(command: list[str]) -> float:
    """Wall seconds of ``command`` in a fresh process run from the repository root; its
    output is shown only if it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} ... exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds


def measure(workspace: Path, round: int, device: str, repeats: int) -> dict[str, Any]:
    """Run the command ``repeats`` times on fresh copies; the medians of its wall time and parts."""
    imports = [_timed([sys.executable, "-c", IMPORTS.format(device=device)]) for _ in range(repeats)]
    walls, parts = [], []
    with tempfile.TemporaryDirectory(prefix="gpual-select-") as tmp:
        for i in range(repeats):
            copy = copy_before(workspace, round, Path(tmp) / f"ws{i}")
            walls.append(_timed([sys.executable, "-c", GPUAL, "select", str(copy), "--round", str(round),
                                 "--device", device]))
            metrics = json.loads((copy / "rounds" / f"{round:03d}" / "metrics.json").read_text())
            parts.append(metrics["acquisition"]["timings_s"])
            shutil.rmtree(copy)
    median = {key: statistics.median(p.get(key, 0.0) for p in parts) for key in parts[0]}
    wall, start = statistics.median(walls), statistics.median(imports)
    return {
        "command_seconds": wall,
        "start_and_imports_seconds": start,
        "parts_seconds": median,
        # Workspace open, lock, config, budget checks and printing: the command's time that
        # neither the imports nor acquire's own total cover.
        "rest_seconds": wall - start - median.get("total", 0.0),
        "command_seconds_each": walls,
        "start_and_imports_seconds_each": imports,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace whose round N-1 is trained")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--synthetic", action="store_true", help="make a demo workspace with round 0 trained instead")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpual-select-ws-") as tmp:
        if args.synthetic:
            from acquisition import synthetic_workspace

            args.workspace, trained = synthetic_workspace(Path(tmp), n_images=12)
            args.round = trained + 1
        elif args.workspace is None:
            parser.error("give --workspace WS (with round N-1 trained) or --synthetic")
        result = measure(args.workspace.resolve(), args.round, args.device, args.repeats)
    from gpual.backend import get_backend

    payload = {"machine": machine_info(), "versions": get_backend(args.device).versions(), "command": " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d"), "workspace": None if args.synthetic else str(args.workspace),
               "round": args.round, "device": args.device, **result, "peak_rss_mb_children": peak_rss_mb()}
    path = write_result("select_command", payload)
    print(f"gpual select --round {args.round} ({args.device}): {result['command_seconds']:.2f} s, of which start and "
          f"imports {result['start_and_imports_seconds']:.2f} s, rest {result['rest_seconds']:.2f} s; parts: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["parts_seconds"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
