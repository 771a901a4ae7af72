"""KMeans with k = budget in one level or two (``kmeans.levels``): time and quality.

One KMeans over n regions with k = the budget costs n * k distance evaluations per
iteration (74.7 s of a 75.7 s round at 4M regions, k = 40,000, on an H100). Two levels
(about sqrt(k) groups, then each group into its share of the k clusters) cost about
2 n sqrt(k). This script times both on the same points and reports the quality price as
the inertia ratio (sum of squared distances to the cluster means, two-level / flat).

Points: 2-D, as UMAP gives them (``umap.n_components = 2``): Gaussian blobs around
``--blobs`` random centres, the shape a memory-bank UMAP layout of a few classes has.

    python benchmarks/kmeans_levels.py --regions 160000 --budget 1600 --device cpu
    python benchmarks/kmeans_levels.py --regions 1000000,4000000 --device cuda   # budget 1%
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import DeviceMemoryPeak, machine_info, peak_rss_mb, write_result  # noqa: E402

from gpual.backend import Backend, get_backend  # noqa: E402
from gpual.acquisition.clustering import kmeans_labels  # noqa: E402
from gpual.config import KMeansConfig  # noqa: E402


def blobs(n: int, n_blobs: int, seed: int = 0) -> np.ndarray:
    """(n, 2) float32 points around ``n_blobs`` centres in [0, 20)^2 (noise 0.6)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 20, (n_blobs, 2))
    return (centres[rng.integers(0, n_blobs, n)] + rng.normal(0, 0.6, (n, 2))).astype(np.float32)


def inertia(backend: Backend, points: Any, labels: Any, k: int) -> float:
    """Sum over clusters of squared distances to the cluster mean, in ``backend.xp``."""
    xp = backend.xp
    counts = xp.bincount(labels, minlength=k).astype(xp.float64)
    total = float(xp.sum(points.astype(xp.float64) ** 2))
    for dim in range(points.shape[1]):
        sums = xp.bincount(labels, weights=points[:, dim].astype(xp.float64), minlength=k)
        total -= float(xp.sum(sums**2 / xp.maximum(counts, 1.0)))
    return total


def timed_labels(backend: Backend, points: Any, k: int, cfg: KMeansConfig) -> tuple[Any, float, float | None]:
    """(labels, seconds, device-wide peak MiB on CUDA else None) of one synchronised run."""
    peak = DeviceMemoryPeak(backend.device) if backend.is_cuda else None
    backend.synchronize()
    with peak if peak is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        labels = kmeans_labels(backend, points, k, cfg)
        backend.synchronize()
        seconds = time.perf_counter() - t0
    return labels, seconds, (peak.peak_mb if peak is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--regions", default="160000", help="comma-separated point counts")
    parser.add_argument("--budget", type=int, help="k (default: 1%% of the regions)")
    parser.add_argument("--blobs", type=int, default=60)
    parser.add_argument("--max-iter", type=int, default=KMeansConfig.max_iter)
    parser.add_argument("--init", default=KMeansConfig.init)
    args = parser.parse_args()

    backend = get_backend(args.device)
    payload: dict[str, Any] = {"backend": backend.name, "machine": machine_info(), "versions": backend.versions(),
                               "blobs": args.blobs, "max_iter": args.max_iter, "init": args.init, "results": []}
    warm = backend.xp.asarray(blobs(2000, args.blobs, seed=1))
    kmeans_labels(backend, warm, 20, KMeansConfig(levels=2))  # first-call costs (imports, CUDA context) out of the timings
    for n in (int(v) for v in args.regions.split(",")):
        k = args.budget or max(1, n // 100)
        points = backend.xp.asarray(blobs(n, args.blobs))
        row: dict[str, Any] = {"regions": n, "budget": k}
        for levels in (1, 2):
            cfg = dataclasses.replace(KMeansConfig(max_iter=args.max_iter, init=args.init), levels=levels)
            labels, seconds, peak = timed_labels(backend, points, k, cfg)
            row[f"levels{levels}_seconds"] = seconds
            row[f"levels{levels}_inertia"] = inertia(backend, points, labels, k)
            if peak is not None:
                row[f"levels{levels}_peak_device_mb_all_allocators"] = peak
        row["speedup"] = row["levels1_seconds"] / row["levels2_seconds"]
        row["inertia_ratio"] = row["levels2_inertia"] / row["levels1_inertia"]
        row["peak_rss_mb"] = peak_rss_mb()
        payload["results"].append(row)
        print(f"{n} regions, k = {k}: one level {row['levels1_seconds']:.2f} s, two levels {row['levels2_seconds']:.2f} s "
              f"({row['speedup']:.1f}x), inertia x{row['inertia_ratio']:.3f}", flush=True)
    write_result("kmeans_levels", payload)


if __name__ == "__main__":
    main()
