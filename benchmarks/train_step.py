"""Training-step throughput and peak memory: the real :func:`gpual.training.loop.train_step`
(forward, CE, InfoNCE against a full memory bank, backward, Adam, EMA, bank push).

    python benchmarks/train_step.py                                   # resnet18, 180x240, CPU
    python benchmarks/train_step.py --backbone resnet50 --size 360x480 --device cuda --amp

Inputs are synthetic (images of noise, label maps of random 16x16-pixel blocks of
``--classes`` classes, ``--labeled`` of the blocks labeled, the rest 255): content does not
change the cost. The bank starts full (``bank_size`` random unit vectors per class), so
every step pays the steady-state contrastive cost (1024 negatives per anchor).
Warm-up steps are excluded from the timings; a step only queues device work (it never
waits for the GPU), so each timed step ends with a device synchronisation. Peak memory is the process's peak RSS on
CPU (it includes the interpreter and libraries), ``torch.cuda.max_memory_allocated``
after the warm-up on CUDA. ``--no-contrastive`` adds a run with lambda = 0 (the bank is
still filled) to show the contrastive term's share.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_info, peak_rss_mb, write_result  # noqa: E402

from gpual.backend import amp_dtype, amp_enabled, resolve_device, synchronize_device  # noqa: E402
from gpual.config import BACKBONES, make_config  # noqa: E402
from gpual.memory_bank import MemoryBank  # noqa: E402
from gpual.model import OUTPUT_STRIDES, build_model  # noqa: E402
from gpual.teacher import make_teacher  # noqa: E402
from gpual.training.loop import Trainer, make_optimizer, make_scaler, memory_format, train_step  # noqa: E402


def synthetic_batch(batch: int, h: int, w: int, classes: int, labeled: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, H, W, 3) uint8 noise, (B, H, W) int64 labels: 16x16 blocks, ``labeled`` share of them, else 255)."""
    images = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=g)
    bh, bw = -(-h // 16), -(-w // 16)
    blocks = torch.randint(0, classes, (batch, 1, bh, bw), generator=g).float()
    keep = torch.rand(batch, 1, bh, bw, generator=g) < labeled
    blocks[~keep] = 255
    labels = F.interpolate(blocks, scale_factor=16, mode="nearest")[:, 0, :h, :w].long()
    return images, labels


def bench(size: tuple[int, int], args: argparse.Namespace, device: torch.device, weight: float) -> dict[str, Any]:
    h, w = size
    config = make_config(overrides={
        "model": {"backbone": args.backbone},
        "train": {"batch_size": args.batch, "amp": args.amp},
        "contrastive": {"weight": weight},
    })
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model(config.model, args.classes, output_stride=args.output_stride).to(device,
                                                                                        memory_format=memory_format(device))
    bank = MemoryBank(args.classes, config.contrastive.bank_size, config.model.projection_dim, device)
    for c in range(args.classes):
        bank.push(c, F.normalize(torch.randn(config.contrastive.bank_size, config.model.projection_dim, generator=g), dim=1))
    amp = amp_enabled(device, args.amp)
    trainer = Trainer(model, make_teacher(model), bank, make_optimizer(model, config), make_scaler(device, amp), config, amp)
    sampling = torch.Generator(device=device).manual_seed(0)
    batches = [synthetic_batch(args.batch, h, w, args.classes, args.labeled, g) for _ in range(min(4, args.steps))]
    batches = [(x.to(device), y.to(device)) for x, y in batches]

    for i in range(args.warmup):
        train_step(trainer, *batches[i % len(batches)], sampling)
    synchronize_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, anchors = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        stats = train_step(trainer, *batches[i % len(batches)], sampling)  # queues device work only
        synchronize_device(device)
        times.append(time.perf_counter() - t0)
        anchors.append(int(stats["anchors"]))  # after the timing: the read waits for the device
    step = statistics.mean(times)
    result = {
        "size": f"{h}x{w}",
        "contrastive_weight": weight,
        "images_per_second": args.batch / step,
        "step_seconds_mean": step,
        "step_seconds_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "anchors_per_step": statistics.mean(anchors),
        "steps_timed": args.steps,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_mb"] = peak_rss_mb()
        result["memory_kind"] = "peak RSS of the process (cumulative over the runs before it)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", choices=BACKBONES)
    parser.add_argument("--size", default="180x240", help="HxW, or several comma-separated (180x240,360x480)")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--labeled", type=float, default=0.1, help="share of 16x16 label blocks that are labeled")
    parser.add_argument("--output-stride", type=int, default=8, choices=OUTPUT_STRIDES)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--amp", action="store_true",
                        help="autocast (CUDA only): bfloat16 where the GPU has it, else float16 + GradScaler")
    parser.add_argument("--no-contrastive", action="store_true", help="also time lambda = 0")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.size.split(",")]
    results = []
    for size in sizes:
        for weight in ([0.1, 0.0] if args.no_contrastive else [0.1]):
            results.append(bench(size, args, device, weight))
            print(f"{results[-1]['size']} lambda={weight}: {results[-1]['images_per_second']:.2f} img/s, "
                  f"peak {results[-1]['peak_memory_mb']:.0f} MiB", flush=True)
    payload = {
        "benchmark": "train_step",
        "device": device.type,
        "backbone": args.backbone,
        "output_stride": args.output_stride,
        "batch": args.batch,
        "classes": args.classes,
        "labeled_blocks": args.labeled,
        "amp": amp_enabled(device, args.amp),
        "amp_dtype": str(amp_dtype(device)).removeprefix("torch.") if amp_enabled(device, args.amp) else None,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "machine": machine_info(),
    }
    write_result("train_step", payload)


if __name__ == "__main__":
    main()
