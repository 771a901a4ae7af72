"""Superpixel stage throughput: SLIC (fast-slic) and SEEDS (OpenCV) over a pool, two scales.

For each method and scale, over the pool split:

- ``decode``: reading the images (JPEG/PNG decode + resize), one process;
- ``compute``: superpixels of the already decoded images, one process (decode excluded);
- ``build_cold``: ``gpual.superpixels.build_cache`` on a fresh workspace with ``--workers``
  processes: hashing, decode, compute, compressed write, index (decode included);
- ``build_warm``: the same call again, which must skip every image.

Region sizes keep the region count per image constant across scales
(``--region-pixels`` at scale 1, times scale squared below it), as the presets do.

    python benchmarks/superpixels.py                              # CamVid train beside the repo
    python benchmarks/superpixels.py --data /path/to/camvid --limit 100 --workers 2

Without the dataset it falls back to synthetic scenes (and says so in the output and JSON).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Timer, machine_info, peak_rss_mb, write_result  # noqa: E402

from gpual.config import make_config  # noqa: E402
from gpual.datasets import Sample, open_dataset, read_image  # noqa: E402
from gpual.superpixels import build_cache, compute_superpixels  # noqa: E402
from gpual.workspace import Workspace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"


def limited_dataset(samples: list[Sample], split: str, folder: Path) -> Path:
    """A camvid-layout folder of symlinks to ``samples``, so build_cache sees only them.

    Nothing is copied; links are named by sample id, so any layout maps onto it (label
    values do not matter here: the superpixel stage never reads labels).
    """
    for sub in ("images", "labels"):
        (folder / split / sub).mkdir(parents=True)
    for s in samples:
        name = s.id.replace("/", "_")
        (folder / split / "images" / f"{name}{s.image.suffix.lower()}").symlink_to(s.image.resolve())
        (folder / split / "labels" / f"{name}.png").symlink_to((s.label or s.image).resolve())
    return folder


def bench_one(root: Path, kind: str, split: str, samples: list[Sample], method: str, scale: float,
              region_pixels: int, workers: int, scratch: Path) -> dict[str, Any]:
    """Time decode, compute and build_cache (cold, warm) for one method at one scale."""
    with Timer() as t_decode:
        images = [read_image(s.image, scale) for s in samples]
    regions: list[int] = []
    with Timer() as t_compute:
        for image in images:
            labels = compute_superpixels(image, method=method, region_pixels=region_pixels)
            regions.append(int(labels.max()) + 1)
    h, w = images[0].shape[:2]
    del images

    config = make_config(overrides={
        "data": {"root": str(root), "dataset": kind, "pool_split": split, "scale": scale},
        "superpixels": {"method": method, "region_pixels": region_pixels, "workers": workers},
    })
    ws = Workspace.create(scratch / f"ws-{method}-{scale}", config)
    cold = build_cache(ws)
    warm = build_cache(ws)
    n = len(samples)
    return {
        "method": method,
        "scale": scale,
        "region_pixels": region_pixels,
        "height": h,
        "width": w,
        "images": n,
        "target_regions": round(h * w / region_pixels),
        "regions_mean": statistics.fmean(regions),
        "regions_min": min(regions),
        "regions_max": max(regions),
        "decode_s": t_decode.seconds,
        "compute_s": t_compute.seconds,
        "images_per_s_compute": n / t_compute.seconds,  # decode excluded, one process
        "images_per_s_decode_compute": n / (t_decode.seconds + t_compute.seconds),  # decode included, one process
        "build_cold_s": cold.seconds,
        "build_cold_images_per_s": n / cold.seconds,  # decode, hash and write included, `workers` processes
        "build_cold_computed": cold.computed,
        "build_warm_s": warm.seconds,
        "build_warm_computed": warm.computed,
        "workers": workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: ../shared/datasets/camvid)")
    parser.add_argument("--dataset", default="camvid", help="layout of --data (camvid, segnet, cityscapes, folder)")
    parser.add_argument("--split", default="train", help="pool split to time")
    parser.add_argument("--limit", type=int, default=0, help="time only the first N images (0 = all)")
    parser.add_argument("--workers", type=int, default=2, help="processes for build_cache")
    parser.add_argument("--methods", default="slic,seeds")
    parser.add_argument("--scales", default="1.0,0.5")
    parser.add_argument("--region-pixels", type=int, default=400, help="mean region size at scale 1.0")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpual-bench-sp-") as tmp:
        scratch = Path(tmp)
        root, kind, synthetic = args.data, args.dataset, False
        if not root.is_dir():
            from gpual.synthetic import make_scenes

            print(f"{root} not found: timing synthetic scenes instead (96x128, not CamVid)", flush=True)
            root, kind, synthetic = make_scenes(scratch / "scenes", n_train=64, n_val=4).root, "folder", True
        samples = open_dataset(kind, root).samples(args.split)
        if args.limit and args.limit < len(samples):
            samples = samples[: args.limit]
            root, kind = limited_dataset(samples, args.split, scratch / "limited"), "camvid"

        runs = []
        for scale in (float(s) for s in args.scales.split(",") if s):
            region_pixels = max(1, round(args.region_pixels * scale * scale))
            for method in (m for m in args.methods.split(",") if m):
                row = bench_one(root, kind, args.split, samples, method, scale, region_pixels, args.workers, scratch)
                runs.append(row)
                print(
                    f"{method:>5} scale {scale}: {row['regions_mean']:.0f} regions/image, "
                    f"compute {row['images_per_s_compute']:.1f} img/s, decode+compute {row['images_per_s_decode_compute']:.1f} img/s, "
                    f"build_cache cold {row['build_cold_s']:.2f} s ({row['workers']} workers), warm {row['build_warm_s']:.2f} s",
                    flush=True,
                )

    peak = peak_rss_mb()  # before machine_info(), which imports torch to name the GPU
    payload = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "data": str(args.data),
        "synthetic_fallback": synthetic,
        "split": args.split,
        "images": len(samples),
        "workers": args.workers,
        "runs": runs,
        "peak_rss_mb": peak,
    }
    write_result("superpixels", payload)


if __name__ == "__main__":
    main()
