"""The human loop on CamVid with the pool's labels hidden from gpual.

Two workspaces, same config and seeds: one over CamVid as it is, labelled by the simulated
oracle (`gpual label`); one over a view of CamVid whose pool split has no `labels/` folder,
so gpual cannot read its ground truth, labelled only through `gpual export --format masks`
-> an annotator stand-in that paints the exported regions from the ground truth (what a
perfect person would answer) -> `gpual import`. Per round it records the query (equal?),
the val mIoU of both and the wall time of each step, and writes JSON to --out.

    python benchmarks/human_loop.py --data ../shared/datasets/camvid --rounds 3 --device cpu \
        --set train.epochs_per_round=1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import machine_info, write_result  # noqa: E402
from gpual.backend import get_backend  # noqa: E402
from gpual.config import make_config, merge_tables, parse_settings  # noqa: E402
from gpual.datasets import open_dataset, read_label  # noqa: E402
from gpual.workspace import Workspace  # noqa: E402


def unlabelled_view(camvid: Path, dest: Path) -> Path:
    """``dest``: the pool split's images only (symlinks), the val split with its labels."""
    (dest / "train").mkdir(parents=True)
    os.symlink((camvid / "train" / "images").resolve(), dest / "train" / "images")
    os.symlink((camvid / "val").resolve(), dest / "val")
    return dest


def annotate_from_ground_truth(export: Path, camvid: Path) -> None:
    """The annotator stand-in: for every exported image, a label PNG (dataset encoding, 255 =
    not labelled) holding the ground truth inside the exported regions, at the stored size."""
    spec = open_dataset("camvid", camvid)
    labels = {s.id: s.label for s in spec.samples("train")}
    manifest = json.loads((export / "gpual-export.json").read_text())
    (export / "labels").mkdir(exist_ok=True)
    for entry in manifest["images"]:
        stem = quote(entry["id"], safe="")
        regions = cv2.imread(str(export / "regions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        truth = read_label(spec, labels[entry["id"]])
        cv2.imwrite(str(export / "labels" / f"{stem}.png"), np.where(regions > 0, truth, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CamVid root (camvid layout, train and val with labels)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE config override")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for the workspaces (default: a temporary one)")
    args = parser.parse_args()

    from gpual.acquisition.select import acquire
    from gpual.evaluation import evaluate
    from gpual.interchange import export_round, import_round
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.training.loop import train_round

    start = time.perf_counter()
    camvid = args.data.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpual-human-loop-"))
    hidden = unlabelled_view(camvid, work / "camvid-unlabelled")
    backend = get_backend(args.device)
    settings = parse_settings(args.settings)
    spaces = {}
    for name, root in (("oracle", camvid), ("import", hidden)):
        config = make_config(args.preset, merge_tables(settings, {"data": {"root": str(root), "dataset": "camvid"}}))
        spaces[name] = Workspace.create(work / name, config)
        build_cache(spaces[name])
    rows = []
    for r in range(args.rounds):
        row: dict = {"round": r}
        for name, ws in spaces.items():
            t0 = time.perf_counter()
            acquire(ws, r, backend)
            t1 = time.perf_counter()
            if name == "oracle":
                label_round(ws, r)
            else:
                export = work / f"export-{r}"
                export_round(ws, r, "masks", export)
                annotate_from_ground_truth(export, camvid)
                summary = import_round(ws, r, export, empty_is_void=True)  # 255 in a mask: void or unlabelled
                row["import_summary"] = {"regions": summary.regions, "empty": summary.empty, "outside": summary.outside}
                shutil.rmtree(export)
            t2 = time.perf_counter()
            train_round(ws, r, backend.device)
            t3 = time.perf_counter()
            miou = evaluate(ws, r, "val", backend.device)["miou"]
            row[name] = {"miou": miou, "labeled_share": ws.labeling(r)["labeled_share"],
                         "seconds": {"select": t1 - t0, "label": t2 - t1, "train": t3 - t2, "evaluate": time.perf_counter() - t3}}
        row["same_query"] = bool(spaces["oracle"].read_query(r).equals(spaces["import"].read_query(r)))
        row["same_miou"] = row["oracle"]["miou"] == row["import"]["miou"]
        print(f"round {r}: oracle mIoU {row['oracle']['miou']:.4f}, import mIoU {row['import']['miou']:.4f}, "
              f"same query {row['same_query']}, labelled {row['oracle']['labeled_share']:.2%}", flush=True)
        rows.append(row)
    result = {"benchmark": "human_loop", "machine": machine_info(), "preset": args.preset, "settings": args.settings,
              "device": backend.name, "wall_s": time.perf_counter() - start, "pool_images": len(open_dataset("camvid", camvid).samples("train")), "rounds": rows}
    write_result("human_loop", result)


if __name__ == "__main__":
    main()
