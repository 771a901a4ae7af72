"""Per-stage acquisition latency: the GPU path and the CPU twin on the same inputs.

Two parts:

1. **Pool** (``--workspace WS --round N``): a real workspace whose round N is trained.
   Times teacher forward and pooling over the whole pool, then every stage after pooling,
   exactly as ``gpual select --round N+1`` runs them (nothing is written to WS).
2. **Sweep** (``--sweep 10000,100000,...``): generated pooled features (unit vectors around
   class centres, as a trained embedding looks; a bank of 1000 vectors per class) for the
   stages after pooling, so region counts up to Cityscapes size (4M) need no dataset.

3. **Dask scaling** (``--dask 1,2,4``): one whole round (teacher forward + pooling sharded
   over the workers, UMAP transform over region partitions, KMeans, ranking) on a
   ``LocalCluster`` of N single-threaded CPU workers (``--device cpu``) or a
   ``LocalCUDACluster`` of N GPUs (``--device cuda``), against the single-process path
   (``workers = 0``), on ``--workspace`` or, without one, a synthetic workspace made under
   ``--dask-out`` (``--dask-images`` scenes, round 0 random, labeled, trained 1 epoch).

Each stage is timed with device synchronisation around it, after a warm-up run (on the
first 5,000 candidates, so that the CPU twin's warm-up costs little), as the
median of ``--repeats``; peak memory is host RSS and, on CUDA, the torch and CuPy
allocators' peaks and the device-wide peak over all allocators (cuML's RMM included),
sampled with ``cudaMemGetInfo``. ``--kmeans-init/--kmeans-max-iter/--kmeans-tol`` set the
sweep's KMeans (the 4M-region round is KMeans-bound). Results: a table, JSON in
benchmarks/results/, and a log-log PNG.

    python benchmarks/acquisition.py --sweep 10000,40000,160000 --device cpu
    python benchmarks/acquisition.py --workspace ws --round 0 --device both
    python benchmarks/acquisition.py --dask 1,2 --device cpu --dask-images 32
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DeviceMemoryPeak, machine_info, peak_rss_mb, write_result  # noqa: E402

from gpual.acquisition.select import _manifest  # noqa: E402
from gpual.backend import Backend, get_backend  # noqa: E402
from gpual.acquisition.clustering import resolve_levels  # noqa: E402
from gpual.config import KMeansConfig, UmapConfig  # noqa: E402
from gpual.acquisition.pooling import RegionStats  # noqa: E402
from gpual.acquisition.strategies import select_regions  # noqa: E402

REGIONS_PER_IMAGE = 432  # a CamVid frame at ~400 px per region
# The warm-up run selects from the first WARMUP_REGIONS candidates only: with the full
# memory bank it runs every code path (umap-learn's numba kernels compile on first call,
# CUDA contexts and cuML handles are made) at a fraction of a full CPU-twin run's cost.
WARMUP_REGIONS = 5000
STAGES = ("forward", "pooling", "handoff", "umap_fit", "umap_transform", "kmeans", "ranking", "manifest")


def synthetic_stats(n_regions: int, dim: int, n_classes: int, bank_per_class: int, device: torch.device, seed: int = 0
                    ) -> tuple[RegionStats, torch.Tensor]:
    """Pooled statistics of ``n_regions`` regions and a memory bank, made on ``device``.

    Embeddings are unit vectors scattered around ``n_classes`` random centres (noise 0.3),
    entropies uniform in [0, log2 C] times a region size of ~400 px.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g, device=device), dim=1)

    def around(n: int) -> torch.Tensor:
        cls = torch.randint(0, n_classes, (n,), generator=g, device=device)
        x = centres[cls] + 0.3 * torch.randn(n, dim, generator=g, device=device)
        return torch.nn.functional.normalize(x, dim=1)

    pixels = torch.randint(200, 600, (n_regions,), generator=g, device=device)
    entropy_mean = torch.rand(n_regions, generator=g, device=device) * float(np.log2(n_classes))
    stats = RegionStats(
        embedding=around(n_regions),
        entropy_sum=entropy_mean * pixels,
        entropy_mean=entropy_mean,
        margin_mean=torch.rand(n_regions, generator=g, device=device),
        maxprob_mean=torch.rand(n_regions, generator=g, device=device),
        bald=None,
        pixels=pixels,
    )
    return stats, around(n_classes * bank_per_class)


def time_selection(backend: Backend, stats: RegionStats, bank: torch.Tensor, budget: int, strategy: str,
                   repeats: int, kmeans_cfg: KMeansConfig | None = None) -> dict[str, Any]:
    """Median per-stage seconds of ``select_regions`` and the manifest over ``repeats`` runs
    after one warm-up on the first :data:`WARMUP_REGIONS` candidates."""
    candidates = torch.arange(len(stats.pixels), device=backend.device)
    warmup = candidates[:WARMUP_REGIONS]
    n_images = -(-len(stats.pixels) // REGIONS_PER_IMAGE)
    offsets = np.arange(n_images, dtype=np.int64) * REGIONS_PER_IMAGE
    index = pd.DataFrame({"image": [f"image{i:07d}" for i in range(n_images)], "offset": offsets})

    def one_run(candidates: torch.Tensor = candidates, budget: int = budget,
                kmeans: KMeansConfig | None = kmeans_cfg) -> dict[str, float]:
        selection = select_regions(
            strategy, backend, stats, candidates, budget, bank_vectors=bank, region_score="sum",
            umap_cfg=UmapConfig(), kmeans_cfg=kmeans or KMeansConfig(), seed=0, labeled_embedding=None,
        )
        backend.synchronize()
        t0 = time.perf_counter()
        # The manifest as `gpual select` builds it (image names joined from the index,
        # local region ids), on a made-up pool of 432-region images, written as parquet.
        frame = _manifest(backend, index, offsets, candidates, stats.pixels, selection, 1, strategy)
        frame.to_parquet(f"/tmp/gpual-bench-{backend.name}.parquet", index=False)
        backend.synchronize()
        timings = dict(selection.timings)
        timings["manifest"] = time.perf_counter() - t0
        timings["total"] = sum(v for k, v in timings.items() if k in STAGES)
        notes[:] = selection.notes  # e.g. the two-level KMeans that kmeans.levels = "auto" chose
        return timings

    notes: list[str] = []
    if backend.is_cuda:
        torch.cuda.reset_peak_memory_stats(backend.device)
    # Untimed: JIT compilation, first-call costs. With the KMeans level count the timed runs
    # will use (at 5,000 candidates "auto" would always pick one level).
    cfg = kmeans_cfg or KMeansConfig()
    levels = resolve_levels(cfg.levels, len(candidates), budget)
    one_run(warmup, max(1, min(budget, len(warmup) // 100)), dataclasses.replace(cfg, levels=levels))
    runs = [one_run() for _ in range(repeats)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["warmup_regions"] = len(warmup)
    out["notes"] = list(notes)
    if backend.is_cuda:
        out["peak_device_mb_torch"] = torch.cuda.max_memory_allocated(backend.device) / 2**20
        out["device_pool_mb_cupy"] = backend.xp.get_default_memory_pool().total_bytes() / 2**20
        # One more, untimed run for the device-wide peak over every allocator (cuML's RMM
        # included), with torch's and CuPy's cached blocks released first so that its
        # allocations show; the level before the run (stats, bank) is not counted.
        torch.cuda.empty_cache()
        backend.xp.get_default_memory_pool().free_all_blocks()
        with DeviceMemoryPeak(backend.device) as memory:
            one_run()
        out["peak_device_mb_all_allocators"] = memory.peak_mb
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def ratios(cpu: dict[str, Any], cuda: dict[str, Any]) -> dict[str, float]:
    """CPU-twin seconds / GPU seconds per stage timed on both, and for the stages after the
    forward together (``after_forward``: pooling, when timed, through the manifest)."""
    out = {k: cpu[k] / cuda[k] for k in STAGES if k in cpu and k in cuda and cuda[k] > 0}
    after = [k for k in STAGES[1:] if k in cpu and k in cuda]
    out["after_forward"] = sum(cpu[k] for k in after) / max(sum(cuda[k] for k in after), 1e-12)
    return out


def pool_benchmark(ws_path: Path, round: int, backend: Backend, repeats: int, strategy: str) -> dict[str, Any]:
    """Teacher forward + pooling over a real workspace's pool, then the selection stages."""
    from gpual.acquisition.forward import pool_with_teacher
    from gpual.loading import resolve_workers
    from gpual.superpixels import read_index
    from gpual.workspace import Workspace

    ws = Workspace.open(ws_path)
    index = read_index(ws)
    n_regions = int(index["n_regions"].sum())
    forwards = []
    for i in range(repeats + 1):
        stats, bank, timings = pool_with_teacher(ws, round + 1, backend, index, n_regions, strategy, None)
        if i > 0:
            forwards.append(timings)
    budget = max(1, n_regions // 100)
    result = time_selection(backend, stats, bank, budget, strategy, repeats, ws.config.kmeans)
    result["forward"] = statistics.median(t["forward"] for t in forwards)
    result["pooling"] = statistics.median(t["pooling"] for t in forwards)
    result["loader_wait"] = statistics.median(t["loader_wait"] for t in forwards)
    result.update(images=len(index), regions=n_regions, budget=budget,
                  loader_workers=resolve_workers(ws.config.train.num_workers, backend.device))
    return result


def plot(sweep: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for device, rows in sweep.items():
        xs = [r["regions"] for r in rows]
        for stage in ("umap_fit", "umap_transform", "kmeans", "ranking", "handoff", "total"):
            ys = [max(r.get(stage, 0.0), 1e-6) for r in rows]
            ax.plot(xs, ys, marker="o", linestyle="-" if device == "cuda" else "--", label=f"{device} {stage}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("regions in the pool")
    ax.set_ylabel("seconds (median)")
    ax.set_title("gpual acquisition stages vs pool size")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def synthetic_workspace(out: Path, n_images: int) -> tuple[Path, int]:
    """A demo-preset workspace on ``n_images`` synthetic 96x128 scenes with round 0 trained
    (1 epoch); reused when ``out`` already holds one. Returns (root, trained round)."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.training.loop import train_round
    from gpual.workspace import Workspace

    root = out / f"ws-{n_images}"
    if (root / "rounds" / "000" / "checkpoint.pt").exists():
        return root, 0
    data = make_scenes(out / f"scenes-{n_images}", n_train=n_images, n_val=2)
    ws = Workspace.create(root, make_config("demo", {"data": {"root": str(data.root.resolve()), "dataset": "folder"}}), force=True)
    build_cache(ws)
    acquire(ws, 0, cpu_backend(), force=True)
    label_round(ws, 0)
    train_round(ws, 0, torch.device("cpu"), epochs=1)
    return root, 0


def dask_round(ws: Any, round: int, backend: Backend, strategy: str, budget: int, cluster: Any) -> dict[str, float]:
    """Seconds per stage of one round's computation (nothing written): pooling on the
    workers (or here when ``cluster`` is None), then the strategy with the cluster's hooks."""
    from gpual.acquisition.forward import pool_with_teacher
    from gpual.superpixels import read_index

    index = read_index(ws)
    n_regions = int(index["n_regions"].sum())
    t0 = time.perf_counter()
    pool = cluster.pool_with_teacher if cluster is not None else pool_with_teacher
    stats, bank, timings = pool(ws, round + 1, backend, index, n_regions, strategy, None)
    backend.synchronize()
    timings["pool_wall"] = time.perf_counter() - t0
    candidates = torch.arange(n_regions, device=backend.device)
    selection = select_regions(strategy, backend, stats, candidates, budget, bank_vectors=bank, umap_cfg=ws.config.umap,
                               kmeans_cfg=ws.config.kmeans, dask=cluster)
    backend.synchronize()
    timings.update(selection.timings)
    timings["total"] = time.perf_counter() - t0
    return timings


def dask_benchmark(ws_path: Path, round: int, backend: Backend, worker_counts: list[int], repeats: int, strategy: str,
                   partition_regions: int | None) -> dict[str, Any]:
    """Median stage seconds of a whole round vs the number of Dask workers (0 = one process, no Dask)."""
    from gpual.distributed import dask_cluster
    from gpual.superpixels import read_index
    from gpual.workspace import Workspace

    ws = Workspace.open(ws_path)
    n_regions = int(read_index(ws)["n_regions"].sum())
    budget = max(1, n_regions // 100)
    partition = partition_regions or -(-n_regions // max(worker_counts))
    rows = []
    for n in [0, *worker_counts]:
        kind = {"gpus": n} if backend.is_cuda else {"workers": n}
        t0 = time.perf_counter()
        with (dask_cluster(**kind, partition_regions=partition) if n else nullcontext(None)) as cluster:
            if cluster is not None:
                cluster.client.wait_for_workers(n, timeout=120)
            start = time.perf_counter() - t0
            runs = [dask_round(ws, round, backend, strategy, budget, cluster) for _ in range(repeats + 1)][1:]  # 1 warm-up
        row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row.update(workers=n, cluster_start=start if n else 0.0)
        rows.append(row)
        print(f"{n} workers: " + ", ".join(f"{k} {row[k]:.3f}s" for k in ("pool_wall", "umap_transform", "kmeans", "total")
                                            if k in row), flush=True)
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        if one is not None and r["workers"]:
            r["speedup_vs_1_worker"] = {k: one[k] / r[k] for k in ("pool_wall", "umap_transform", "total") if r.get(k)}
    index = read_index(ws)
    return {"images": len(index), "regions": n_regions, "budget": budget, "partition_regions": partition,
            "batch_size": ws.config.acquisition.batch_size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="both", choices=("cpu", "cuda", "both"))
    parser.add_argument("--workspace", type=Path, help="workspace with a trained round (real pool features)")
    parser.add_argument("--round", type=int, default=0, help="the trained round whose teacher scores the pool")
    parser.add_argument("--sweep", default="10000,40000,160000", help="comma-separated region counts")
    parser.add_argument("--cpu-max-regions", type=int, default=160_000,
                        help="skip the CPU twin above this size (umap-learn's transform takes minutes beyond it)")
    parser.add_argument("--strategy", default="umap-kmeans-entropy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kmeans-init", default="default", help="sweep: kmeans.init (default, k-means++, random)")
    parser.add_argument("--kmeans-max-iter", type=int, default=KMeansConfig.max_iter, help="sweep: kmeans.max_iter")
    parser.add_argument("--kmeans-tol", type=float, default=KMeansConfig.tol, help="sweep: kmeans.tol")
    parser.add_argument("--kmeans-levels", type=lambda v: v if v == "auto" else int(v), default=KMeansConfig.levels,
                        choices=(1, 2, "auto"),
                        help="sweep: kmeans.levels (2: coarse groups, then each group's share of the k clusters; "
                             "auto, the default: two levels above 1e9 regions x k)")
    parser.add_argument("--dask", help="comma-separated Dask worker counts (CPU workers or GPUs): the scaling benchmark")
    parser.add_argument("--dask-images", type=int, default=32, help="pool images of the synthetic workspace (no --workspace)")
    parser.add_argument("--dask-out", type=Path, default=Path("/tmp/gpual-bench-dask"), help="where the synthetic workspace goes")
    parser.add_argument("--partition-regions", type=int, help="UMAP-transform partition rows (default: regions / most workers)")
    args = parser.parse_args()

    if args.dask:
        if args.device == "both":
            parser.error("--dask times one device: give --device cpu or --device cuda")
        backend = get_backend(args.device)
        ws_path, round = (args.workspace, args.round) if args.workspace else synthetic_workspace(args.dask_out, args.dask_images)
        counts = [int(s) for s in args.dask.split(",") if s]
        # Other processes' load skews scaling on a small box: recorded with the result.
        payload = {"backend": f"{args.device}-dask", "machine": machine_info(), "load_average_1m_before": os.getloadavg()[0],
                   "strategy": args.strategy, "repeats": args.repeats,
                   "versions": backend.versions(),
                   "dask": dask_benchmark(ws_path, round, backend, counts, args.repeats, args.strategy, args.partition_regions)}
        write_result("acquisition", payload)
        return

    kmeans_cfg = KMeansConfig(init=args.kmeans_init, max_iter=args.kmeans_max_iter, tol=args.kmeans_tol, levels=args.kmeans_levels)
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    backends = {d: get_backend(d) for d in devices}
    payload: dict[str, Any] = {"backend": "-vs-".join(reversed(devices)), "machine": machine_info(), "strategy": args.strategy,
                               "repeats": args.repeats, "sweep_kmeans": dataclasses.asdict(kmeans_cfg),
                               "versions": {d: b.versions() for d, b in backends.items()}}
    if args.workspace:
        payload["pool"] = {}
        for d, b in backends.items():
            row = payload["pool"][d] = pool_benchmark(args.workspace, args.round, b, args.repeats, args.strategy)
            print(f"{d:>4} real pool, {row['regions']} regions: " + ", ".join(f"{k} {row[k]:.3f}s" for k in STAGES if k in row),
                  flush=True)
        if len(devices) == 2:
            payload["pool_speedup"] = ratios(payload["pool"]["cpu"], payload["pool"]["cuda"])
            print("real pool, CPU twin / GPU: " + ", ".join(f"{k} {v:.0f}x" for k, v in payload["pool_speedup"].items()))
    sweep: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for n in (int(s) for s in args.sweep.split(",") if s):
        for d, b in backends.items():
            if d == "cpu" and n > args.cpu_max_regions:
                continue
            stats, bank = synthetic_stats(n, 128, 11, 1000, b.device)
            row = time_selection(b, stats, bank, max(1, n // 100), args.strategy, args.repeats, kmeans_cfg)
            row.update(regions=n, budget=max(1, n // 100))
            sweep[d].append(row)
            print(f"{d:>4} {n:>9} regions: " + ", ".join(f"{k} {row[k]:.3f}s" for k in STAGES if k in row), flush=True)
    payload["sweep"] = sweep
    if "cpu" in sweep and "cuda" in sweep:
        payload["speedup"] = [{"regions": c["regions"], **ratios(c, g)}
                              for c in sweep["cpu"] for g in sweep["cuda"] if c["regions"] == g["regions"]]
        for row in payload["speedup"]:
            print(f"{row['regions']:>9} regions, CPU twin / GPU: "
                  + ", ".join(f"{k} {v:.0f}x" for k, v in row.items() if k != "regions"))
    path = write_result("acquisition", payload)
    if any(sweep.values()):
        plot(sweep, path.with_suffix(".png"))
        print(f"plot: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
