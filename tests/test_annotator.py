"""`gpual annotate`'s server without a browser: what it serves and refuses, the token, body
limits, validation, two clients, exact persistence in the label store, the CLI's refusals
and its Done path. A real uvicorn on a free loopback port; httpx and http.client talk to it."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from cli_runner import run_cli
from gpual.errors import GpualError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Fixtures


def build_workspace(root: Path, budget: int = 6) -> "Workspace":  # noqa: F821
    """2 + 1 synthetic 48x64 scenes, superpixels, a random round-0 query of ``budget`` regions."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    spec = make_scenes(root / "data", n_train=2, n_val=1, height=48, width=64)
    ws = Workspace.create(root / "ws", make_config("demo", {"data": {"root": str(spec.root), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=budget)
    return ws


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace + its data, built once; tests work on copies (:func:`fresh`)."""
    root = tmp_path_factory.mktemp("annotator")
    build_workspace(root)
    return root


@pytest.fixture
def ws(base: Path, tmp_path: Path):
    """A copy of the module's workspace and data (answers written here stay here)."""
    return copy_workspace(base, tmp_path / "copy")


def copy_workspace(base: Path, root: Path):
    from gpual.workspace import CONFIG_NAME, Workspace

    shutil.copytree(base, root, symlinks=True)
    toml = root / "ws" / CONFIG_NAME
    toml.write_text(toml.read_text().replace(str(base / "data"), str(root / "data")))
    return Workspace.open(root / "ws")


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from gpual.annotator.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def session_server(ws, round: int = 0, **options) -> Iterator[tuple[str, "AnnotationSession"]]:  # noqa: F821
    from gpual.annotator.server import AnnotationSession, create_app

    session = AnnotationSession(ws, round, "cpu")
    with serving(create_app(session, **options)) as url:
        yield url, session


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..`` or ``%2e``)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", f"{host}:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def first_regions(session, i: int = 0) -> list[int]:
    return session.images[i].regions.tolist()


def post(client: httpx.Client, i: int, *answers: dict) -> httpx.Response:
    return client.post(f"/api/images/{i}/answers", json={"answers": list(answers)})


# ---------------------------------------------------------------------------------------
# What is served


def test_manifest_image_and_superpixels(ws) -> None:
    from gpual.datasets import open_dataset
    from gpual.superpixels import load_superpixels

    query = ws.read_query(0)
    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        manifest = client.get("/api/session").json()
        assert [c["name"] for c in manifest["classes"]] == ["background", "disc", "box", "triangle", "stripe"]
        assert [c["key"] for c in manifest["classes"]] == ["1", "2", "3", "4", "5"]
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c["color"]) for c in manifest["classes"])
        assert manifest["void"]["id"] == 255 and manifest["model"] is None
        assert [image["id"] for image in manifest["images"]] == sorted(query["image"].unique())
        for image in manifest["images"]:
            expected = sorted(query.loc[query["image"] == image["id"], "region"].tolist())
            assert image["regions"] == expected and (image["height"], image["width"]) == (48, 64)
            rows = query[query["image"] == image["id"]]
            assert image["pixels"] == {str(r): int(n) for r, n in zip(rows["region"], rows["pixels"])}
        assert manifest["progress"] == {"answered": 0, "queried": len(query), "images_done": 0,
                                        "images": query["image"].nunique()}
        assert manifest["answers"] == [{} for _ in manifest["images"]]

        samples = {s.id: s for s in open_dataset("folder", ws.config.data.root).samples("train")}
        for i, image in enumerate(manifest["images"]):
            photo = client.get(f"/api/images/{i}/file")
            assert photo.status_code == 200 and photo.headers["content-type"] == "image/png"
            assert photo.content == samples[image["id"]].image.read_bytes()  # the original file's bytes
            raw = client.get(f"/api/images/{i}/superpixels")
            assert (raw.headers["x-width"], raw.headers["x-height"]) == ("64", "48")
            sp = np.frombuffer(raw.content, dtype="<u2").reshape(48, 64)
            np.testing.assert_array_equal(sp, load_superpixels(ws, image["id"]))
            assert client.get(f"/api/images/{i}/predictions").json()["predictions"] is None  # round 0: no model
            assert client.get(f"/api/images/{i}").json()["answers"] == {}
        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            response = client.get(f"/static/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)


def test_paths_outside_the_round_are_refused(ws) -> None:
    secret = next(line for line in (ws.root / "gpual.toml").read_text().splitlines() if line.startswith("root = "))
    with session_server(ws) as (url, session):
        n = len(session.images)
        for path in [
            "/static/../gpual.toml", "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
            "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/%2Fetc%2Fpasswd", "/static//etc/passwd",
            "/static/index.html", "/static/server.py", "/static/", "/etc/passwd", "//etc/passwd",
            f"/api/images/{n}/file", "/api/images/-1/file", "/api/images/999999/superpixels",
            "/api/images/0/../../../etc/passwd", "/api/images/0/file/../../../../gpual.toml",
            "/api/images/%2e%2e/file", "/api/images/0x0/file", f"/static/{REPO}/gpual/annotator/server.py",
        ]:
            status, body = raw_get(url, path)
            assert status in (400, 403, 404), (path, status)
            assert b"root:" not in body and secret.encode() not in body and b"import" not in body, path
        assert raw_get(url, "/static/app.js")[0] == 200


def test_a_symlink_out_of_the_data_root_is_not_served(ws, tmp_path: Path) -> None:
    from gpual.annotator.server import AnnotationSession

    session = AnnotationSession(ws, 0, "cpu")
    outside_image, inside_image = session.images[0].path, session.images[1].path
    outside = tmp_path / "elsewhere.png"
    shutil.move(outside_image, outside)
    outside_image.symlink_to(outside)  # same bytes, but outside the dataset root
    shutil.copy(inside_image, inside_image.parent.parent / "copy.png")
    inside_image.unlink()
    inside_image.symlink_to(inside_image.parent.parent / "copy.png")  # a symlink within the root is fine
    with session_server(ws) as (url, _), httpx.Client(base_url=url) as client:
        refused = client.get("/api/images/0/file")
        assert refused.status_code == 403 and "outside the dataset root" in refused.json()["error"]
        assert outside.read_bytes() not in refused.content
        assert client.get("/api/images/1/file").content == (inside_image.parent.parent / "copy.png").read_bytes()


# ---------------------------------------------------------------------------------------
# Access


ROUTES = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/style.css"), ("GET", "/api/session"),
          ("GET", "/api/progress"), ("GET", "/api/images/0"), ("GET", "/api/images/0/file"),
          ("GET", "/api/images/0/superpixels"), ("GET", "/api/images/0/predictions"),
          ("POST", "/api/images/0/answers"), ("POST", "/api/done"), ("GET", "/nothing-here")]


def test_every_route_needs_the_token_off_loopback(ws) -> None:
    token = "s3cret-token"
    done = threading.Event()
    with session_server(ws, token=token, allowed_hosts=None, on_done=done.set) as (url, session):
        region = first_regions(session)[0]
        body = {"answers": [{"region": region, "class": 1}]}
        with httpx.Client(base_url=url) as client:
            for method, path in ROUTES:
                for headers in ({}, {"X-Gpual-Token": "wrong"}, {"Cookie": "gpual_token=wrong"}):
                    response = client.request(method, path, json=body if method == "POST" else None, headers=headers)
                    assert response.status_code == 403, (method, path, headers)
            assert client.get("/static/app.js", params={"token": "s3cret-tokenX"}).status_code == 403
            assert not ws.answers_path(0).exists() and not done.is_set()  # nothing reached a route

            for method, path in ROUTES[:-3]:
                assert client.request(method, path, headers={"X-Gpual-Token": token},
                                      json=body if method == "POST" else None).status_code == 200, path
        # The first page load carries ?token=; a cookie carries it from there, out of the address bar.
        with httpx.Client(base_url=url) as browser:
            first = browser.get("/", params={"token": token})
            assert first.status_code == 303 and first.headers["location"] == "/"
            assert first.headers["set-cookie"].startswith(f"gpual_token_{url.rsplit(':', 1)[1]}=")  # one per port
            assert "httponly" in first.headers["set-cookie"].lower() and "samesite=strict" in first.headers["set-cookie"].lower()
            assert browser.get("/api/session").status_code == 200  # the cookie, no token in the URL
            assert browser.post("/api/done", json={}).status_code == 200
        wait_until(done.is_set)


def test_a_non_loopback_host_gets_a_random_token(ws) -> None:
    from gpual.annotator.server import AnnotationSession, AnnotatorServer, is_local_host

    assert all(is_local_host(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "LOCALHOST"))
    assert not any(is_local_host(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
    session = AnnotationSession(ws, 0, "cpu")
    local = AnnotatorServer(session, "127.0.0.1", 0)
    local.socket.close()
    assert local.token is None and "token" not in local.url
    server = AnnotatorServer(session, "0.0.0.0", 0)
    assert server.token and len(server.token) >= 32 and server.url.endswith(f"?token={server.token}")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/api/session").status_code == 403
        assert httpx.get(f"{base}/api/session", headers={"X-Gpual-Token": server.token}).status_code == 200
        assert AnnotatorServer(session, "0.0.0.0", 0).token != server.token  # new per session
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_loopback_refuses_foreign_host_headers_and_form_posts(ws) -> None:
    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own Host.
        assert client.get("/api/session", headers={"Host": "evil.example"}).status_code == 403
        assert client.get("/api/session", headers={"Host": "localhost:1234"}).status_code == 200
        region = first_regions(session)[0]
        # A cross-site form can only send form or text bodies: refused before any write.
        form = client.post("/api/images/0/answers", data={"answers": "x"})
        text = client.post("/api/images/0/answers", content=json.dumps({"answers": [{"region": region, "class": 1}]}),
                           headers={"Content-Type": "text/plain"})
        assert form.status_code == text.status_code == 415
        assert client.post("/api/done", content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
        assert not ws.answers_path(0).exists()
        assert client.get("/api/progress").status_code == 200  # still serving


# ---------------------------------------------------------------------------------------
# Bodies and validation


def test_bodies_over_the_limit_get_413(ws) -> None:
    from gpual.annotator.server import MAX_BODY_BYTES

    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        region = first_regions(session)[0]
        big = json.dumps({"answers": [{"region": region, "class": 1}], "pad": "x" * MAX_BODY_BYTES}).encode()
        declared = client.post("/api/images/0/answers", content=big, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and "bytes" in declared.json()["error"]

        def chunks():  # no Content-Length: the server counts what arrives
            for start in range(0, len(big), 256 * 1024):
                yield big[start:start + 256 * 1024]

        streamed = client.post("/api/images/0/answers", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/api/done", content=big, headers={"Content-Type": "application/json"}).status_code == 413
        assert not ws.answers_path(0).exists()
        assert post(client, 0, {"region": region, "class": 1}).status_code == 200  # the limit is not a break


def test_bad_answers_get_400_and_nothing_is_written(ws) -> None:
    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        regions = first_regions(session)
        r = regions[0]
        size = session.region_pixels[f"{session.images[0].id}:{r}"]
        other_image_region = first_regions(session, 1)[0]
        not_queried = next(k for k in range(1000) if k not in regions)
        cases = [
            ({}, "answers"),
            ({"answers": []}, "answers"),
            ({"answers": "1"}, "answers"),
            ({"answers": [5]}, "not an object"),
            ({"answers": [{"class": 1}]}, "region must be an integer"),
            ({"answers": [{"region": str(r), "class": 1}]}, "region must be an integer"),
            ({"answers": [{"region": not_queried, "class": 1}]}, "not queried"),
            ({"answers": [{"region": other_image_region, "class": 1}]} if other_image_region not in regions else
             {"answers": [{"region": not_queried, "class": 1}]}, "not queried"),
            ({"answers": [{"region": r, "class": 5}]}, "not one of 0..4"),
            ({"answers": [{"region": r, "class": -1}]}, "not one of 0..4"),
            ({"answers": [{"region": r, "class": 256}]}, "not one of 0..4"),
            ({"answers": [{"region": r, "class": True}]}, "must be an integer"),
            ({"answers": [{"region": r, "class": 1.0}]}, "must be an integer"),
            ({"answers": [{"region": r, "class": "box"}]}, "must be an integer"),
            ({"answers": [{"region": r, "class": 1, "pixels": [1] * size}]}, "mixed"),
            ({"answers": [{"region": r, "class": "mixed"}]}, f"its {size} pixels"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1)}]}, f"its {size} pixels"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size + 1)}]}, f"its {size} pixels"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1) + [7]}]}, "pixel class 7"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1) + [-1]}]}, "pixel class -1"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1) + [1.5]}]}, "integers"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1) + [10**30]}]}, "pixel class 1000"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": [1] * (size - 1) + [None]}]}, "integers"),
            ({"answers": [{"region": 10**30, "class": 1}]}, "not queried"),
            ({"answers": [{"region": r, "class": 10**30}]}, "not one of 0..4"),
            ({"answers": [{"region": r, "class": None}]}, "must be an integer"),
            ({"answers": [{"region": r, "class": "mixed", "pixels": "\x01" * size}]}, f"its {size} pixels"),
            ({"answers": [{"region": r, "class": 1}, {"region": r, "class": 2}]}, "twice"),
            ({"answers": [{"region": r, "class": 1, "seconds": -1}]}, "seconds"),
            ({"answers": [{"region": r, "class": 1, "seconds": "2"}]}, "seconds"),
            # one bad answer refuses the whole request: the good one is not written either
            ({"answers": [{"region": regions[1], "class": 1}, {"region": r, "class": 9}]}, "not one of 0..4"),
        ]
        for body, message in cases:
            response = client.post("/api/images/0/answers", json=body)
            assert response.status_code == 400, body
            assert message in response.json()["error"], (body, response.json())
        invalid = client.post("/api/images/0/answers", content=b"{not json", headers={"Content-Type": "application/json"})
        assert invalid.status_code == 400 and "JSON" in invalid.json()["error"]
        nan = client.post("/api/images/0/answers", content=b'{"answers": [{"region": %d, "class": 1, "seconds": NaN}]}' % r,
                          headers={"Content-Type": "application/json"})
        assert nan.status_code == 400
        assert post(client, len(session.images), {"region": r, "class": 1}).status_code == 404
        assert not ws.answers_path(0).exists() and not ws.answers_dir(0).exists()
        assert client.get("/api/progress").json()["answered"] == 0


# ---------------------------------------------------------------------------------------
# Writes


def test_answers_are_stored_exactly(ws) -> None:
    from gpual.label_store import sparse_targets
    from gpual.superpixels import load_superpixels

    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        image = session.images[0]
        sp = load_superpixels(ws, image.id)
        a, b, c, d = first_regions(session)[:4]
        size = int((sp == c).sum())
        painted = (np.arange(size) % 3).astype(int)  # classes 0, 1, 2 in turn
        painted[:2] = 255  # two pixels left unpainted
        reply = post(client, 0, {"region": a, "class": 3, "seconds": 1.25}, {"region": b, "class": 255, "seconds": 0.5},
                     {"region": c, "class": "mixed", "pixels": painted.tolist(), "seconds": 7.0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["saved"] == 3 and body["progress"]["answered"] == 3
        assert body["answers"][str(a)] == {"class": 3, "kind": "region", "source": "annotator", "seconds": 1.25}
        assert body["answers"][str(c)]["pixels"] == painted.tolist()  # the page gets its painting back

        table = ws.read_answers(0).set_index("region")
        assert sorted(table.index) == sorted([a, b, c]) and (table["source"] == "annotator").all()
        assert (table["round"] == 0).all() and (table["image"] == image.id).all()
        assert table.loc[a, ["kind", "class"]].tolist() == ["region", 3]
        assert table.loc[b, ["kind", "class", "labeled_pixels"]].tolist() == ["region", 255, 0]
        counts = np.bincount(painted[painted != 255], minlength=3)
        assert table.loc[c, ["kind", "class", "labeled_pixels"]].tolist() == ["pixels", int(counts.argmax()), size - 2]
        assert table.loc[[a, b, c], "seconds"].tolist() == [1.25, 0.5, 7.0]
        assert table.loc[a, "pixels"] == int((sp == a).sum())

        target = sparse_targets(ws, 0)[image.id]
        assert (target[sp == a] == 3).all() and (target[sp == b] == 255).all()
        np.testing.assert_array_equal(target[sp == c], painted)
        assert (target[~np.isin(sp, [a, c])] == 255).all()

        # Changing answers: the last write per region wins; mixed -> whole and whole -> mixed.
        post(client, 0, {"region": c, "class": 1}, {"region": d, "class": "mixed", "pixels": [4] * int((sp == d).sum())})
        post(client, 0, {"region": a, "class": 0})
        table = ws.read_answers(0).set_index("region")
        assert len(table) == 4 and table.loc[[a, b, c, d], "class"].tolist() == [0, 255, 1, 4]
        assert table.loc[[a, c, d], "kind"].tolist() == ["region", "region", "pixels"]
        assert np.isnan(table.loc[d, "seconds"])  # not measured: NaN
        target = sparse_targets(ws, 0)[image.id]
        assert (target[sp == a] == 0).all() and (target[sp == c] == 1).all() and (target[sp == d] == 4).all()
        state = client.get("/api/images/0").json()["answers"]
        assert state[str(c)] == {"class": 1, "kind": "region", "source": "annotator", "seconds": None}
        assert state[str(d)]["pixels"] == [4] * int((sp == d).sum())
        assert client.get("/api/session").json()["answers"][0][str(d)]["kind"] == "pixels"


def test_two_clients_never_lose_an_answer(ws) -> None:
    with session_server(ws) as (url, session), httpx.Client(base_url=url) as tab1, httpx.Client(base_url=url) as tab2:
        regions = first_regions(session)
        a, b = regions[:2]
        # Interleaved: each tab's write keeps the other's; the later write of a region wins.
        assert post(tab1, 0, {"region": a, "class": 1}).status_code == 200
        assert post(tab2, 0, {"region": a, "class": 2}).status_code == 200
        assert post(tab1, 0, {"region": b, "class": 3}).status_code == 200
        table = ws.read_answers(0).set_index("region")
        assert table.loc[[a, b], "class"].tolist() == [2, 3]

        # Concurrent: both tabs write every region of every image many times at once; each
        # request is one read-modify-write of the table, so without the server's lock some
        # would be lost. The tabs' last writes are known: every region ends with its own.
        def hammer(client: httpx.Client, offset: int) -> None:
            for n in range(8):
                for i, image in enumerate(session.images):
                    answers = [{"region": r, "class": (k + n + offset) % 5} for k, r in enumerate(image.regions.tolist())]
                    assert client.post(f"/api/images/{i}/answers", json={"answers": answers}).status_code == 200

        with ThreadPoolExecutor(2) as pool:  # .result() raises a failed assertion of either tab here
            for future in [pool.submit(hammer, tab1, 0), pool.submit(hammer, tab2, 0)]:
                future.result(timeout=120)
        table = ws.read_answers(0)
        assert len(table) == len(ws.read_query(0)) and not table.duplicated(["image", "region"]).any()
        for i, image in enumerate(session.images):
            rows = table[table["image"] == image.id].set_index("region")
            assert rows.loc[image.regions, "class"].tolist() == [(k + 7) % 5 for k in range(len(image.regions))]
        # Distinct regions at once from two tabs: all of them arrive.
        ws.answers_path(0).unlink()
        barrier = threading.Barrier(2)

        def one_each(client: httpx.Client, regions: list[int], k: int) -> None:
            barrier.wait()
            for r in regions:
                assert post(client, 0, {"region": r, "class": k}).status_code == 200

        half = len(regions) // 2
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(one_each, tab1, regions[:half], 1), pool.submit(one_each, tab2, regions[half:], 2)]:
                future.result(timeout=60)
        table = ws.read_answers(0).set_index("region")
        assert table.loc[regions, "class"].tolist() == [1] * half + [2] * (len(regions) - half)


def test_a_round_trained_meanwhile_refuses_answers(ws) -> None:
    with session_server(ws) as (url, session), httpx.Client(base_url=url) as client:
        r = first_regions(session)[0]
        assert post(client, 0, {"region": r, "class": 1}).status_code == 200
        before = ws.answers_path(0).read_bytes()
        ws.checkpoint_path(0).write_bytes(b"trained")  # what `gpual train` leaves
        refused = post(client, 0, {"region": r, "class": 2})
        assert refused.status_code == 409 and "trained" in refused.json()["error"]
        assert ws.answers_path(0).read_bytes() == before


def test_predictions_come_from_the_previous_rounds_teacher(ws) -> None:
    import torch

    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.datasets import read_image
    from gpual.model import normalize
    from gpual.oracle import label_round
    from gpual.superpixels import load_superpixels
    from gpual.training.checkpoints import load_teacher
    from gpual.training.loop import train_round

    label_round(ws, 0)
    train_round(ws, 0, torch.device("cpu"), epochs=1)
    acquire(ws, 1, cpu_backend(), strategy="random", budget=5)
    teacher, _ = load_teacher(ws.checkpoint_path(0), torch.device("cpu"))
    with session_server(ws, round=1) as (url, session), httpx.Client(base_url=url) as client:
        manifest = client.get("/api/session").json()
        assert manifest["model"] == str(ws.checkpoint_path(0))
        for i, image in enumerate(session.images):
            got = client.get(f"/api/images/{i}/predictions").json()["predictions"]
            rgb = read_image(image.path, ws.config.data.scale)
            with torch.inference_mode():
                predicted = teacher.segment(normalize(torch.from_numpy(rgb)[None])).argmax(1)[0].numpy()
            sp = load_superpixels(ws, image.id)
            expected = {str(r): int(np.bincount(predicted[sp == r], minlength=5).argmax()) for r in image.regions}
            assert got == expected
            assert client.get(f"/api/images/{i}/predictions").json()["predictions"] == expected  # cached
        assert set(session._predictions) == set(range(len(session.images)))  # computed once per image


# ---------------------------------------------------------------------------------------
# The command


def test_the_command_refuses_bad_input_writing_nothing(ws, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from gpual.annotator.server import AnnotationSession

    not_selected = run_cli(capsys, "annotate", ws.root, "--round", "1", "--no-open")
    assert not_selected.code == 1 and not_selected.err.startswith("error: round 1 has no selection")
    assert len(not_selected.err.strip().splitlines()) == 1

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        in_use = run_cli(capsys, "annotate", ws.root, "--round", "0", "--port", str(port), "--no-open")
        assert in_use.code == 1 and f"error: port {port} on 127.0.0.1 is in use" in in_use.err
        assert "--port" in in_use.err and len(in_use.err.strip().splitlines()) == 1
    finally:
        busy.close()
    with ws.lock("test"):  # the failed command let go of the lock
        pass

    ws.checkpoint_path(0).write_bytes(b"trained")
    trained = run_cli(capsys, "annotate", ws.root, "--round", "0", "--no-open")
    assert trained.code == 1 and "round 0 is trained" in trained.err and "--round 1" in trained.err
    with pytest.raises(GpualError, match="trained"):
        AnnotationSession(ws, 0)
    assert not ws.answers_path(0).exists() and not ws.answers_dir(0).exists()


def test_the_command_serves_until_done_then_says_what_next(ws) -> None:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [str(Path(sys.executable).parent / "gpual"), "annotate", str(ws.root), "--round", "0", "--port", "0",
               "--no-open", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("annotate at" in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[-1]).group(0)
        with pytest.raises(GpualError, match="locked by `gpual annotate`"), ws.lock("train"):
            pass  # the server holds the workspace lock
        with httpx.Client(base_url=url) as client:
            query = ws.read_query(0)
            image = sorted(query["image"].unique())[0]
            region = int(query.loc[query["image"] == image, "region"].min())
            assert post(client, 0, {"region": region, "class": 2, "seconds": 3.0}).status_code == 200
            done = client.post("/api/done", json={})
            assert done.status_code == 200
            assert done.json()["next"] == f"gpual train {ws.root} --round 0 --partial"
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert f"1 / {len(query)} regions answered (0 / {query['image'].nunique()} images done)" in out
    assert f"next: gpual train {ws.root} --round 0 --partial" in out
    with ws.lock("train"):  # released
        pass
