"""`gpual annotate` in a real Chromium (pytest-playwright's ``page``): answer by key and by
click, select regions on the image and in the list, paint a mixed region, reload mid-round,
press Done; then the label store must hold exactly what was given."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser


@pytest.fixture
def annotator(tmp_path: Path):
    """A tiny round-0 workspace (2 images, 6 queried regions) served in-process on a free
    port; yields (url, session, server thread)."""
    from gpual.acquisition.select import acquire
    from gpual.annotator.server import AnnotationSession, AnnotatorServer
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    spec = make_scenes(tmp_path / "data", n_train=2, n_val=1, height=48, width=64)
    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(spec.root), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=6)
    with ws.lock("annotate"):
        session = AnnotationSession(ws, 0, "cpu")
        server = AnnotatorServer(session, "127.0.0.1", 0)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        try:
            yield server.url, session, thread
        finally:
            server.stop()
            thread.join(10)


def ready(page) -> None:
    page.wait_for_selector("body[data-ready='1']")


def settled(page, answered: int) -> None:
    """Every queued save answered by the server, and the store counts ``answered`` regions."""
    page.wait_for_selector(f"body[data-pending='0'][data-answered='{answered}']")


def at(page, where: tuple[int, int]) -> None:
    """Wait until the page's current region is ``where`` = (image, region); moving to
    another image loads it first."""
    page.wait_for_selector(f"body[data-current='{where[0]}:{where[1]}']", timeout=5000)


def deep_pixel(sp: np.ndarray, region: int) -> tuple[int, int]:
    """(x, y) of the pixel of ``region`` farthest from its border: a safe place to click."""
    import cv2

    inside = np.pad((sp == region).astype(np.uint8), 1)
    distance = cv2.distanceTransform(inside, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return int(x), int(y)


def click_pixel(page, sp: np.ndarray, x: int, y: int) -> None:
    """Click the centre of working pixel (x, y) of the image on the canvas."""
    box = page.locator("#overlay").bounding_box()
    h, w = sp.shape
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h)


def test_label_a_round_in_the_browser(page, annotator) -> None:
    from gpual.label_store import sparse_targets
    from gpual.superpixels import load_superpixels

    url, session, thread = annotator
    ws = session.ws
    order = [(i, r) for i, image in enumerate(session.images) for r in image.regions.tolist()]
    assert len(order) == 6 and [i for i, _ in order[:5]] == [0] * 5  # the fixture's random draw: 5 + 1 regions
    sp = {image.id: load_superpixels(ws, image.id) for image in session.images}
    sp0 = sp[session.images[0].id]
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_viewport_size({"width": 1280, "height": 800})

    page.goto(url)
    ready(page)
    at(page, order[0])
    assert page.inner_text("#progress-regions") == "regions 0 / 6"
    assert "no model" in page.inner_text("#suggestion")  # round 0: nothing pre-chosen
    page.keyboard.press("Enter")  # so Enter answers nothing
    assert "nothing is pre-chosen" in page.inner_text("#status")

    page.keyboard.press("2")  # a key: class 1 ("disc"), then on to the next region
    at(page, order[1])
    page.click("#classes button[data-class='2']")  # a click: class 2 ("box")
    at(page, order[2])
    page.keyboard.press("ArrowRight")  # skip order[2]
    at(page, order[3])
    settled(page, 2)

    # A mixed region: a big brush of class 2 over all of it, then one pixel of class 3 with
    # the smallest brush, and a dab outside the region (which must change nothing).
    region = order[3][1]
    inside = sp0 == region
    px, py = deep_pixel(sp0, region)
    ys, xs = np.nonzero(inside)
    reach = int(np.ceil(np.hypot(xs - px, ys - py).max()))
    page.keyboard.press("Shift+M")
    page.wait_for_selector("#paint:not([hidden])")
    page.keyboard.press("3")  # brush class 2
    for _ in range(reach - 3):  # radius 3 -> reach
        page.keyboard.press("]")
    assert page.input_value("#brush") == str(reach)
    click_pixel(page, sp0, px, py)
    for _ in range(reach):
        page.keyboard.press("[")
    assert page.inner_text("#brush-value") == "0"
    page.keyboard.press("4")  # brush class 3
    click_pixel(page, sp0, px, py)
    oy, ox = np.argwhere(~inside & (np.abs(np.arange(48)[:, None] - py) + np.abs(np.arange(64)[None] - px) < 30))[0]
    click_pixel(page, sp0, int(ox), int(oy))
    page.keyboard.press("Enter")  # save the painting
    at(page, order[4])
    settled(page, 3)

    page.reload()  # mid-round: the page continues at the first unanswered region, answers shown
    ready(page)
    at(page, order[2])
    assert page.inner_text("#progress-regions") == "regions 3 / 6"
    assert page.get_attribute(f".chip[data-region='{order[0][1]}']", "aria-label") == f"region {order[0][1]}: disc"
    assert page.get_attribute(f".chip[data-region='{order[3][1]}']", "aria-label") == f"region {order[3][1]}: mixed"
    page.click(f".chip[data-region='{order[3][1]}']")  # its painting comes back from the store
    assert "answered: mixed" in page.inner_text("#answer-state")

    qx, qy = deep_pixel(sp0, order[4][1])
    click_pixel(page, sp0, qx, qy)  # select a region on the image
    at(page, order[4])
    page.keyboard.press("0")  # void
    at(page, order[5])  # the next unanswered one: the second image
    page.keyboard.press("1")  # class 0
    at(page, order[2])  # wraps round to the one skipped
    # Keyboard only, a mixed region: the smallest brush of class 2 at the brush cursor (it
    # starts at the middle of the region's pixels, raster order), then class 1 everywhere else.
    page.keyboard.press("Shift+M")
    page.keyboard.press("3")
    for _ in range(3):
        page.keyboard.press("[")
    page.keyboard.press(" ")
    page.keyboard.press("2")
    page.keyboard.press("Shift+F")
    page.keyboard.press("Enter")
    settled(page, 6)
    assert page.inner_text("#progress-images") == "images 2 / 2 done"
    assert "every region is answered" in page.inner_text("#status")

    page.click("#done")
    page.wait_for_selector("#finished:not([hidden])")
    assert page.inner_text("#finished-next") == f"gpual train {ws.root} --round 0"
    thread.join(10)
    assert not thread.is_alive()  # Done stopped the server
    assert errors == []

    # The label store, exactly.
    table = ws.read_answers(0).set_index("region")
    expected = {order[0][1]: ("region", 1), order[1][1]: ("region", 2), order[2][1]: ("pixels", 1),
                order[3][1]: ("pixels", 2), order[4][1]: ("region", 255), order[5][1]: ("region", 0)}
    assert {int(r): (row["kind"], int(row["class"])) for r, row in table.iterrows()} == expected
    assert (table["source"] == "annotator").all() and (table["round"] == 0).all()
    assert (table["seconds"] > 0).all() and np.isfinite(table["seconds"]).all()  # measured in the page
    assert table.loc[region, "labeled_pixels"] == int(inside.sum())
    targets = sparse_targets(ws, 0)
    painted = np.full(sp0.shape, 255, np.uint8)
    painted[inside] = 2
    painted[py, px] = 3
    target0 = targets[session.images[0].id]
    np.testing.assert_array_equal(target0[inside], painted[inside])
    keyboard = sp0 == order[2][1]
    middle = np.flatnonzero(keyboard.ravel())[int(keyboard.sum()) // 2]
    by_keys = np.full(sp0.size, 1, np.uint8)
    by_keys[middle] = 2
    np.testing.assert_array_equal(target0.ravel()[keyboard.ravel()], by_keys[keyboard.ravel()])
    assert table.loc[order[2][1], "labeled_pixels"] == int(keyboard.sum())
    for r, (kind, k) in expected.items():
        if kind == "region" and r != order[5][1]:
            assert (target0[sp0 == r] == k).all()
    assert (target0[~np.isin(sp0, [r for _, r in order[:5]])] == 255).all()
    sp1 = sp[session.images[1].id]
    assert (targets[session.images[1].id][sp1 == order[5][1]] == 0).all()
