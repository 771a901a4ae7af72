"""The CPU twin's umap-kmeans-entropy selection against the memory bank's size (issue 20).

umap-learn takes an exact path below 4,096 training vectors that calls its numba metric
once per (region, bank vector) pair: a 54,797-region pool against a 3,656-vector bank took
946 s of a 1,070 s select on two cores. ``gpual.backend.ExactSmallBankUMAP`` replaces that
path by scikit-learn's vectorised distances and umap-learn's ``metric="precomputed"``;
banks of 4,096 vectors and more go to umap-learn's NNDescent index unchanged. This times
the whole selection after the forward at bank sizes on both sides of the threshold:

    python benchmarks/umap_bank.py                                  # banks 1000,4000,4096,10000; 50,000 regions
    python benchmarks/umap_bank.py --sizes 3000,5000 --regions 20000

Each row is one :func:`gpual.acquisition.strategies.select_regions` call with strategy
``umap-kmeans-entropy`` on the CPU backend, default ``[umap]`` and ``[kmeans]`` settings and
k = the default budget (1,600): its own per-stage seconds (``handoff``, ``umap_fit``,
``umap_transform``, ``kmeans``, ``ranking``), their sum (``total``, the 2-minute target of
a 50k-region pool on 2 cores), which UMAP path ran (read from the fitted reducer, not
inferred from the size), the peak resident memory of the row (this process's own: its
high-water mark is reset before each row through ``/proc/self/clear_refs``; where that is
refused the peak is the process's so far, said in ``peak_rss_scope``) and the load average
around it: the cores may be shared, and a busy machine makes every time pessimistic.

Inputs are synthetic and seeded: bank vectors and region embeddings drawn from the same
mixture of ``--classes`` unit-norm centres in D = ``model.projection_dim`` dimensions
(Gaussian noise of ``--noise`` per dimension, re-normalised to unit length as pooling
does), so UMAP has clusters to find. Before the rows, a small selection per UMAP path runs
twice (``warmup_seconds``): the first compiles umap-learn's and pynndescent's numba code,
which a fresh ``gpual select`` process pays once on top of its row (numba's on-disk cache
does not hold all of it), the second is the same work compiled.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import Timer, machine_info, write_result  # noqa: E402

from gpual.acquisition.pooling import RegionStats  # noqa: E402
from gpual.acquisition.strategies import select_regions  # noqa: E402
from gpual.backend import Backend, ExactSmallBankUMAP, cpu_backend  # noqa: E402
from gpual.config import AcquisitionConfig, KMeansConfig, ModelConfig, UmapConfig  # noqa: E402

SIZES = (1000, 4000, 4096, 10000)  # both sides of umap-learn's 4,096-vector exact-path threshold
REGIONS = 50_000
TARGET_SECONDS = 120.0  # issue 20: a CPU select of a 50k-region pool under 2 minutes on 2 cores
WARMUP_REGIONS = 2000
STAGES = ("handoff", "umap_fit", "umap_transform", "kmeans", "ranking")
# UMAP paths as read from a fitted reducer; "umap-exact" is umap-learn's per-pair numba
# path that this benchmark exists to show is never taken.
PATHS = ("precomputed-distances", "nndescent", "umap-exact")


def mixture(n: int, dim: int, centres: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """(n, dim) float32 CPU unit vectors: a random centre of ``centres`` (C, dim) each, plus
    N(0, noise^2) per dimension, re-normalised (pooled embeddings have unit L2 norm)."""
    cls = torch.randint(0, centres.shape[0], (n,), generator=generator)
    x = centres[cls] + noise * torch.randn(n, dim, generator=generator)
    return torch.nn.functional.normalize(x, dim=1)


def synthetic_pool(n_regions: int, n_bank: int, dim: int, n_classes: int, noise: float, seed: int
                   ) -> tuple[RegionStats, torch.Tensor]:
    """Pooled statistics of ``n_regions`` regions and an (n_bank, dim) float32 memory bank,
    both on the CPU, from one seeded mixture; entropies uniform in [0, log2 C] bits per pixel
    over regions of 200-599 px."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    pixels = torch.randint(200, 600, (n_regions,), generator=g)
    entropy_mean = torch.rand(n_regions, generator=g) * float(np.log2(n_classes))
    stats = RegionStats(
        embedding=mixture(n_regions, dim, centres, noise, g),
        entropy_sum=entropy_mean * pixels,
        entropy_mean=entropy_mean,
        margin_mean=torch.rand(n_regions, generator=g),
        maxprob_mean=torch.rand(n_regions, generator=g),
        bald=None,
        pixels=pixels,
    )
    return stats, mixture(n_bank, dim, centres, noise, g)


def umap_path(reducer: Any) -> str:
    """Which of :data:`PATHS` a fitted CPU reducer (``ExactSmallBankUMAP`` or a bare
    ``umap.UMAP``) transforms through, from its fitted state."""
    estimator = getattr(reducer, "estimator", None)
    estimator = reducer if estimator is None else estimator
    if estimator.metric == "precomputed":
        return "precomputed-distances"
    return "umap-exact" if estimator._small_data else "nndescent"


class _ReducerProbe:
    """Stands in select_regions' ``dask`` argument to see the fitted reducer.

    ``select_regions`` hands the fitted UMAP to ``dask.umap_transform(reducer, regions)``
    and uses its own KMeans when ``dask.kmeans_fit_predict`` is None: this transforms
    exactly as the local path does (``reducer.transform``) and notes the reducer's path,
    so the row times the unchanged selection.
    """

    kmeans_fit_predict = None

    def __init__(self) -> None:
        self.path: str | None = None
        self.reducer_class = ""

    def umap_transform(self, reducer: Any, regions: Any) -> Any:
        self.path, self.reducer_class = umap_path(reducer), type(reducer).__name__
        return reducer.transform(regions)


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark to its current RSS (Linux 4.0+,
    ``/proc/self/clear_refs``), so :func:`own_peak_rss_mb` reads the peak since; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def own_peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``ru_maxrss`` of RUSAGE_SELF, KiB on Linux).

    Not ``_report.peak_rss_mb``, which adds RUSAGE_CHILDREN: short children spawned from
    this process (``git`` in :func:`machine_info`, ``uname`` behind ``platform``) report
    about this process's RSS at their start as their peak, which would count it twice.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def select_row(backend: Backend, stats: RegionStats, bank: torch.Tensor, budget: int, umap_cfg: UmapConfig,
               kmeans_cfg: KMeansConfig) -> dict[str, Any]:
    """One umap-kmeans-entropy selection over every region of ``stats``: per-stage seconds,
    their ``total``, the UMAP path, picks, notes, peak RSS (MiB) and load averages."""
    candidates = torch.arange(stats.n_regions)
    load_start = os.getloadavg()
    scoped = reset_peak_rss()
    rss_start = own_peak_rss_mb()
    probe = _ReducerProbe()
    with Timer() as wall:
        selection = select_regions("umap-kmeans-entropy", backend, stats, candidates, budget, bank_vectors=bank,
                                   umap_cfg=umap_cfg, kmeans_cfg=kmeans_cfg, dask=probe)
    row: dict[str, Any] = {stage: selection.timings.get(stage, 0.0) for stage in STAGES}
    row.update({
        "bank": int(bank.shape[0]),
        "regions": stats.n_regions,
        "umap_path": probe.path,
        "reducer": probe.reducer_class,
        "select_rest": row["handoff"] + row["kmeans"] + row["ranking"],
        "total": sum(row[stage] for stage in STAGES),
        "wall": wall.seconds,
        "transform_us_per_region": 1e6 * row["umap_transform"] / stats.n_regions,
        "picked": int(len(selection.indices)),
        "notes": list(selection.notes),
        "rss_start_mb": rss_start,
        "peak_rss_mb": own_peak_rss_mb(),
        "peak_rss_scope": "row" if scoped else "process",
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    })
    row["under_target"] = row["total"] <= TARGET_SECONDS
    return row


def warm_up(backend: Backend, sizes: list[int], regions: int, args: argparse.Namespace, umap_cfg: UmapConfig,
            kmeans_cfg: KMeansConfig) -> dict[str, dict[str, float]]:
    """Per UMAP path the rows take, the seconds of one small selection run twice: ``first``
    compiles umap-learn's (and for NNDescent pynndescent's) numba code, as a fresh
    ``gpual select`` process does, ``again`` is the same work compiled; their difference is
    about the compilation."""
    banks = {"precomputed-distances": 64} if min(sizes) < ExactSmallBankUMAP.SMALL else {}
    if max(sizes) >= ExactSmallBankUMAP.SMALL:
        banks["nndescent"] = ExactSmallBankUMAP.SMALL
    out = {}
    n = min(WARMUP_REGIONS, regions)
    for path, n_bank in banks.items():
        stats, bank = synthetic_pool(n, n_bank, args.dim, args.classes, args.noise, args.seed + 1)
        out[path] = {}
        for run in ("first", "again"):
            with Timer() as t:
                select_regions("umap-kmeans-entropy", backend, stats, torch.arange(n), min(args.budget, n),
                               bank_vectors=bank, umap_cfg=umap_cfg, kmeans_cfg=kmeans_cfg)
            out[path][run] = t.seconds
        out[path]["bank"] = n_bank
        out[path]["regions"] = n
    return out


def parse_sizes(text: str) -> list[int]:
    """``"1000,4000"`` -> [1000, 4000]; each at least 3 (UMAP's smallest bank)."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r} is not a comma-separated list of bank sizes") from None
    if not sizes or min(sizes) < 3:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: give bank sizes of at least 3 vectors")
    return sizes


def main(argv: list[str] | None = None) -> Path:
    """Run the rows, print the table, write benchmarks/results/umap_bank-cpu-<time>.json; its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=list(SIZES), help="memory-bank sizes, comma-separated")
    parser.add_argument("--regions", type=int, default=REGIONS, help="candidate regions transformed and clustered")
    parser.add_argument("--budget", type=int, default=AcquisitionConfig().budget, help="regions picked (KMeans' k)")
    parser.add_argument("--dim", type=int, default=ModelConfig().projection_dim, help="embedding dimensions")
    parser.add_argument("--classes", type=int, default=59, help="mixture components (issue 20's dataset: 59 classes)")
    parser.add_argument("--noise", type=float, default=0.05, help="per-dimension standard deviation around a centre")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.regions < 3:
        parser.error("--regions must be at least 3")
    budget = min(args.budget, args.regions)

    backend = cpu_backend()
    umap_cfg, kmeans_cfg = UmapConfig(), KMeansConfig()
    payload: dict[str, Any] = {
        "backend": "cpu", "machine": machine_info(), "regions": args.regions, "budget": budget, "dim": args.dim,
        "classes": args.classes, "noise": args.noise, "seed": args.seed, "sizes": args.sizes,
        "exact_threshold": ExactSmallBankUMAP.SMALL, "transform_chunk": ExactSmallBankUMAP.TRANSFORM_CHUNK,
        "umap": dataclasses.asdict(umap_cfg), "kmeans": dataclasses.asdict(kmeans_cfg),
        "target": {"regions": REGIONS, "seconds": TARGET_SECONDS, "cores": 2},
        "torch_threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg()),
    }
    payload["warmup_seconds"] = warm_up(backend, args.sizes, args.regions, args, umap_cfg, kmeans_cfg)
    payload["results"] = []
    started = time.perf_counter()
    for n_bank in args.sizes:
        stats, bank = synthetic_pool(args.regions, n_bank, args.dim, args.classes, args.noise, args.seed)
        row = select_row(backend, stats, bank, budget, umap_cfg, kmeans_cfg)
        payload["results"].append(row)
        print(f"bank {n_bank:>6}: {row['umap_path']:<21} fit {row['umap_fit']:7.2f} s  transform {row['umap_transform']:7.2f} s  "
              f"rest {row['select_rest']:6.2f} s  total {row['total']:7.2f} s  peak {row['peak_rss_mb']:6.0f} MiB  "
              f"load {row['loadavg_start'][0]:.2f}->{row['loadavg_end'][0]:.2f}", flush=True)
        del stats, bank
    payload["rows_seconds"] = time.perf_counter() - started
    payload["loadavg_end"] = list(os.getloadavg())
    return write_result("umap_bank", payload)


if __name__ == "__main__":
    main()
