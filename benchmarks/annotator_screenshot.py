"""A screenshot of `gpual annotate` for the docs (docs/annotator.png), taken in Debian's Chromium.

Builds a synthetic workspace (4 scenes of 240x320, ~190 superpixels each), labels round 0
with the oracle, trains it briefly, selects round 1 at random, serves round 1 (so the
page shows the model's pre-chosen classes), answers a few regions, starts painting a
mixed one, and saves the page as it looks then. Nothing is timed. On a 2-core CPU it
takes about a minute:

    python benchmarks/annotator_screenshot.py                  # -> docs/annotator.png
    python benchmarks/annotator_screenshot.py --out /tmp/a.png --chromium /usr/bin/chromium
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(root: Path):
    """The workspace, with round 0 trained and round 1 selected."""
    import torch

    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.training.loop import train_round
    from gpual.workspace import Workspace

    spec = make_scenes(root / "data", n_train=4, n_val=1, height=240, width=320, seed=3)
    config = make_config("demo", {"data": {"root": str(spec.root), "dataset": "folder"}, "superpixels": {"region_pixels": 400},
                                  "acquisition": {"overlays": 0}})
    ws = Workspace.create(root / "ws", config)
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=120)
    label_round(ws, 0)
    train_round(ws, 0, torch.device("cpu"), epochs=6)
    acquire(ws, 1, cpu_backend(), strategy="random", budget=24)
    return ws


def shoot(ws, out: Path, chromium: str) -> None:
    """Serve round 1, label a little in the page, save the screenshot to ``out``."""
    from playwright.sync_api import sync_playwright

    from gpual.annotator.server import AnnotationSession, AnnotatorServer

    session = AnnotationSession(ws, 1, "cpu")
    server = AnnotatorServer(session, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 860}, device_scale_factor=1)
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_selector("#suggestion:has-text('Enter confirms')")  # the model's guess is in
            for key in ("Enter", "3", "Enter", "1"):  # confirm the model, correct it, confirm, correct
                page.keyboard.press(key)
                page.wait_for_timeout(150)
            page.keyboard.press("ArrowRight")  # skip one
            page.keyboard.press("Shift+M")  # a mixed region: paint part of it another class
            page.keyboard.press("4")
            box = page.locator("#overlay").bounding_box()
            image, region = map(int, page.get_attribute("body", "data-current").split(":"))
            sp = session.superpixels(image)
            x, y = _centre(sp, region)
            cx, cy, sx, sy = box["x"], box["y"], box["width"] / sp.shape[1], box["height"] / sp.shape[0]
            page.mouse.move(cx + (x - 6) * sx, cy + (y - 3) * sy)
            page.mouse.down()
            page.mouse.move(cx + (x + 6) * sx, cy + (y + 3) * sy, steps=8)
            page.mouse.up()
            page.wait_for_selector("body[data-pending='0']")
            page.wait_for_timeout(200)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.stop()
        thread.join(10)


def _centre(sp, region: int) -> tuple[int, int]:
    """(x, y) working pixel in the middle of ``region`` of ``sp`` ((H, W) region ids)."""
    import numpy as np

    ys, xs = np.nonzero(sp == region)
    return int(np.median(xs)), int(np.median(ys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "annotator.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpual-annotator-") as tmp:
        ws = build(Path(tmp))
        with ws.lock("annotate"):
            shoot(ws, args.out, args.chromium)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
