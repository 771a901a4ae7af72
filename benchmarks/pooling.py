"""Pooling throughput against the device's memory bandwidth.

Pooling (``gpual.acquisition.pooling.RegionPooler.add``) folds each batch's per-pixel probabilities
(B, C, H, W) and the projection head's (B, D, H/s, W/s) map (s = ``--output-stride``)
into per-region sums: ``index_add_`` for the per-pixel statistics, one (regions x cells)
matrix product per image for the embeddings, which are never built per pixel. Its floor
is reading those inputs once, so the figure of merit is

    effective bandwidth = bytes of the inputs (probs + projection map + int64 region ids) / time

compared with the device's own bandwidth, measured here as a device-to-device copy of a
1 GiB tensor (bytes read + bytes written, per second), median of 10 after warm-up. The
inputs are float32, as the pooler reads them. Generated inputs: Dirichlet-like softmax
probabilities, a random projection map, and a grid of square regions of
``--region-pixels`` per image with global offsets, as ``gpual select`` builds them.

    python benchmarks/pooling.py --device cuda --size 360x480 --classes 11 --batch 16
    python benchmarks/pooling.py --device cuda --size 512x1024 --classes 19 --batch 8
    python benchmarks/pooling.py --device cpu --size 180x240 --batch 8 --region-pixels 100

``--compile both`` times the pooler as ``gpual select`` runs it (eager) and through
``torch.compile`` (``RegionPooler(compile=True)``), recording the compilation's seconds;
``--profile N`` lists the N kernels of one eager batch that take the most device time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import machine_info, peak_rss_mb, write_result  # noqa: E402

from gpual.backend import synchronize_device as sync  # noqa: E402
from gpual.acquisition.pooling import RegionPooler  # noqa: E402


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> list[float]:
    """Wall times of ``fn()`` with device synchronisation around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), median of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device, repeats))
    del src, dst
    return 2 * nbytes / seconds / 1e9


def kernel_profile(fn, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The ``top`` kernels (CPU ops, on the CPU) of one ``fn()`` after a warm-up call, by
    total self time, in microseconds, from ``torch.profiler``, each with its share of all of them.

    On CUDA only the kernel rows are kept (``device_type`` CUDA): the rows of the torch ops
    that launched them would count each kernel twice. (That filter is new since the last
    GPU run, whose files list both.)
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm-up: a cold process's first call (allocations, lazy init) would dominate the profile
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0 and (not cuda or e.device_type == DeviceType.CUDA)]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key, "device_us": getattr(e, attr), "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top]]


def grid_regions(batch: int, h: int, w: int, region_pixels: int, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(B, H, W) int64 global ids of square regions of ~region_pixels, and each image's
    (first region, region count)."""
    side = max(1, int(round(region_pixels ** 0.5)))
    rows, cols = (h + side - 1) // side, (w + side - 1) // side
    yy = torch.arange(h, device=device) // side
    xx = torch.arange(w, device=device) // side
    local = (yy[:, None] * cols + xx[None, :]).expand(batch, h, w)
    per_image = rows * cols
    offsets = torch.arange(batch, device=device)[:, None, None] * per_image
    return (local + offsets).contiguous(), [(i * per_image, per_image) for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="360x480", help="HxW, or several comma-separated")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--region-pixels", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output-stride", type=int, default=8, help="the projection map is H/s x W/s (the model's stride)")
    parser.add_argument("--compile", default="off", choices=("off", "on", "both"),
                        help="time RegionPooler(compile=True) instead of (on) or beside (both) the eager pooler")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="list the N costliest kernels of one eager batch")
    args = parser.parse_args()

    device = torch.device(args.device)
    payload: dict[str, Any] = {"backend": device.type, "machine": machine_info(), "torch": torch.__version__,
                               "classes": args.classes, "dim": args.dim, "batch": args.batch,
                               "region_pixels": args.region_pixels, "output_stride": args.output_stride,
                               "repeats": args.repeats, "results": []}
    if device.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(device)
        payload["copy_bandwidth_gb_s"] = copy_bandwidth(device)
        print(f"device-to-device copy: {payload['copy_bandwidth_gb_s']:.0f} GB/s (read + write)")
    for size in args.size.split(","):
        h, w = (int(v) for v in size.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(args.batch, args.classes, h, w, generator=g, device=device) * 3
        probs = torch.softmax(logits, dim=1)
        del logits
        stride = args.output_stride
        emb = torch.randn(args.batch, args.dim, (h + stride - 1) // stride, (w + stride - 1) // stride, generator=g, device=device)
        ids, spans = grid_regions(args.batch, h, w, args.region_pixels, device)
        nbytes = probs.numel() * 4 + emb.numel() * 4 + ids.numel() * 8
        modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
        for compiled in modes:
            pooler = RegionPooler(spans[-1][0] + spans[-1][1], args.dim, device, compile=compiled)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            pooler.add(probs, emb, ids, spans)  # untimed: compiles (compiled), first-use set-up (both)
            sync(device)
            first_call = time.perf_counter() - t0
            seconds = statistics.median(timed(lambda: pooler.add(probs, emb, ids, spans), device, args.repeats))
            row = {
                "size": size, "mode": "compiled" if compiled else "eager", "first_call_seconds": first_call,
                "regions_per_batch": len(spans) * spans[0][1], "seconds_per_batch": seconds,
                "images_per_second": args.batch / seconds, "input_bytes_per_batch": nbytes,
                "effective_gb_s": nbytes / seconds / 1e9, "peak_rss_mb": peak_rss_mb(),
            }
            if device.type == "cuda":
                row["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["share_of_copy_bandwidth"] = row["effective_gb_s"] / payload["copy_bandwidth_gb_s"]
            if args.profile and not compiled:
                row["profile"] = kernel_profile(lambda: pooler.add(probs, emb, ids, spans), device, args.profile)
            payload["results"].append(row)
            print(f"{size} {row['mode']}: {row['seconds_per_batch'] * 1e3:.2f} ms per batch of {args.batch} "
                  f"(first call {first_call:.2f} s), {row['images_per_second']:.0f} img/s, {row['effective_gb_s']:.1f} GB/s effective"
                  + (f" = {row['share_of_copy_bandwidth']:.1%} of copy bandwidth" if "share_of_copy_bandwidth" in row else ""))
            for k in row.get("profile", []):
                print(f"    {k['device_us']:9.1f} us {k['share']:6.1%}  x{k['calls']:<3d} {k['name'][:90]}")
            del pooler
        del probs, emb, ids
    write_result("pooling", payload)


if __name__ == "__main__":
    main()
