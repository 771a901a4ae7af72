"""The annotator's server: one round's queried regions, served to a browser page on this machine.

What it serves, and nothing else:

- the page's own files (``static/``), from a fixed set of names;
- per image of the round, addressed by its position in the round's image list (never by
  a client-supplied path): the original image file (only when it resolves inside the
  dataset root: a symlink out of it is refused), its superpixel map at the working scale
  (raw little-endian uint16, ``X-Width`` / ``X-Height`` headers), its stored answers, and
  the previous round's model's predicted class per queried region;
- ``POST`` answers (validated here, then written into :mod:`gpual.label_store` one request
  at a time under a lock: two tabs never lose an answer, the last write per region wins)
  and ``POST /api/done``, which stops the server.

Bodies are limited to :data:`MAX_BODY_BYTES` (413 beyond). On a host other than this
machine's loopback every request needs the session's random token (``?token=`` once, then
a cookie); on loopback the ``Host`` header must name loopback (no DNS rebinding) and a
POST must be ``application/json`` (no cross-site form posts).

Host NumPy for the maps; torch only for the predictions, one image at a time.
"""
from __future__ import annotations

import json
import math
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request, cookie_parser
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gpual.errors import GpualError
from gpual.label_store import MIXED, VOID, ImageAnswers, check_writable, dominant_class, mask_path, read_mask, record_answers
from gpual.workspace import Workspace

SUPERPIXEL_CACHE = 64  # maps kept in memory: a Cityscapes one at scale 0.5 is 1 MB
MAX_BODY_BYTES = 4 * 1024 * 1024  # a mixed region's pixels as JSON: ~4 bytes a pixel, so ~1 M pixels
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_COOKIE = "gpual_token"  # + "_<port>": cookies are per host, not per port, and sessions may share a host
TOKEN_HEADER = "x-gpual-token"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only files /static/ serves: name -> media type.
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
# The page loads nothing from elsewhere; "data:" is the empty favicon.
CSP = "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'"
# 20 distinct colours (Trubetskoy's list), then golden-angle hues for larger class sets.
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
    "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075", "#a9a9a9", "#ffe119",
)
VOID_COLOR = "#303030"


class ClientError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------
# Classes: names, colours, keys


def class_color(k: int) -> str:
    """Class ``k``'s colour as ``#rrggbb``: the fixed palette, then golden-angle hues."""
    if k < len(PALETTE):
        return PALETTE[k]
    hue = (k * 137.508) % 360.0
    return _hsl_hex(hue, 0.65, 0.55)


def _hsl_hex(hue: float, saturation: float, lightness: float) -> str:
    import colorsys

    r, g, b = colorsys.hls_to_rgb(hue / 360.0, lightness, saturation)
    return "#" + "".join(f"{round(c * 255):02x}" for c in (r, g, b))


def class_key(k: int) -> str | None:
    """The key that picks class ``k``: 1-9 for the first nine, then a-z; None beyond (click only)."""
    if k < 9:
        return str(k + 1)
    if k < 9 + 26:
        return chr(ord("a") + k - 9)
    return None


def class_table(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The page's legend: one ``{id, name, color, key}`` per class."""
    return [{"id": k, "name": name, "color": class_color(k), "key": class_key(k)} for k, name in enumerate(names)]


# ---------------------------------------------------------------------------------------
# The session: one round, what may be served, the writes


@dataclass(frozen=True)
class RoundImage:
    """One image of the round: its id, its pool file, its working-scale size and its
    queried regions ((k,) int64 local ids, ascending)."""

    id: str
    path: Path
    height: int
    width: int
    regions: np.ndarray


class AnnotationSession:
    """Round ``round`` of ``ws`` as the annotator serves it.

    Opening refuses (GpualError) a round that is not selected, is trained, or has an empty
    query; it reads the query, the superpixel index and the dataset listing, decodes no
    image. Superpixel maps and predictions are computed on first request and cached.
    Writes go through :meth:`record`, one at a time. The caller holds the workspace lock.
    """

    def __init__(self, ws: Workspace, round: int, device: str = "auto") -> None:
        from gpual.datasets import open_dataset
        from gpual.superpixels import read_index

        query = check_writable(ws, round)  # not selected / trained: one-line GpualError
        if len(query) == 0:
            raise GpualError(f"round {round}'s query is empty: nothing to annotate; select it again with "
                             f"`gpual select {ws.root} --round {round} --force`")
        from gpual.backend import resolve_device

        resolve_device(device)  # a bad --device fails now, not at the first prediction
        self.ws, self.round, self.device_name = ws, round, device
        data = ws.config.data
        spec = open_dataset(data.dataset, data.root)
        self.classes: tuple[str, ...] = spec.classes
        self.data_root = spec.root.resolve()
        self.index = read_index(ws)
        self.images = _round_images(ws, query, self.index, {s.id: s.image for s in spec.samples(data.pool_split)})
        self.position = {image.id: i for i, image in enumerate(self.images)}
        self.region_pixels = {f"{r.image}:{r.region}": int(r.pixels) for r in query.itertuples(index=False)}
        previous = ws.checkpoint_path(round - 1) if round > 0 else None
        self.checkpoint: Path | None = previous if previous is not None and previous.exists() else None
        self._write_lock = threading.Lock()  # one label-store write at a time: read-modify-write of the table
        self._model_lock = threading.Lock()  # one model load / forward at a time
        self._teacher: Any = None
        self._teacher_error: str | None = None  # why round N-1's model cannot predict, once known
        self._device: Any = None
        self._superpixels: OrderedDict[int, np.ndarray] = OrderedDict()  # the last SUPERPIXEL_CACHE images used
        self._cache_lock = threading.Lock()
        self._predictions: dict[int, dict[int, int]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # --- what the page reads -------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The page's start: classes, the round's images (working-scale size, queried regions
        and their pixel counts), every stored answer (without the painted pixels: those come
        with the image) and the progress."""
        table = self.ws.read_answers(self.round)
        return {
            "round": self.round,
            "workspace": str(self.ws.root),
            "classes": class_table(self.classes),
            "void": {"id": VOID, "name": "void", "color": VOID_COLOR, "key": "0"},
            "model": None if self.checkpoint is None else str(self.checkpoint),
            "images": [
                {"index": i, "id": image.id, "width": image.width, "height": image.height,
                 "regions": image.regions.tolist(),
                 "pixels": {str(r): self.region_pixels[f"{image.id}:{r}"] for r in image.regions.tolist()}}
                for i, image in enumerate(self.images)
            ],
            "answers": self._answer_summaries(table),
            "progress": self.progress(table),
        }

    def _answer_summaries(self, table: pd.DataFrame) -> list[dict[str, dict[str, Any]]]:
        """Per image of the round: region id (str) -> ``{class, kind, seconds, source}``."""
        out: list[dict[str, dict[str, Any]]] = [{} for _ in self.images]
        columns = (table[c].tolist() for c in ("image", "region", "class", "kind", "seconds", "source"))
        for image, region, k, kind, seconds, source in zip(*columns):
            i = self.position.get(str(image))
            if i is not None:
                out[i][str(int(region))] = _entry(k, kind, seconds, source)
        return out

    def image(self, i: int) -> RoundImage:
        """Image ``i`` of the round's list (404 outside it)."""
        if not 0 <= i < len(self.images):
            raise ClientError(404, f"image {i} is not in round {self.round} (it has {len(self.images)})")
        return self.images[i]

    def image_file(self, i: int) -> Path:
        """Image ``i``'s original file, resolved; 403 where it resolves outside the dataset root
        (a symlink out of it) or is not a regular file."""
        path = self.image(i).path
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise ClientError(404, f"image file of {self.images[i].id!r} is missing") from None
        if not resolved.is_relative_to(self.data_root) or not resolved.is_file():
            raise ClientError(403, f"image file of {self.images[i].id!r} lies outside the dataset root: not served")
        return resolved

    def superpixels(self, i: int) -> np.ndarray:
        """(H, W) uint16 region ids of image ``i`` at the working scale (cached)."""
        from gpual.superpixels import load_superpixels

        image = self.image(i)
        with self._cache_lock:
            sp = self._superpixels.get(i)
            if sp is not None:
                self._superpixels.move_to_end(i)
                return sp
        sp = load_superpixels(self.ws, image.id, self.index)
        with self._cache_lock:
            self._superpixels[i] = sp
            while len(self._superpixels) > SUPERPIXEL_CACHE:
                self._superpixels.popitem(last=False)
        return sp

    def answers(self, i: int, table: pd.DataFrame | None = None) -> dict[str, dict[str, Any]]:
        """Image ``i``'s stored answers: region id (str) -> ``{class, kind, seconds, source}``;
        ``kind`` "pixels" adds ``pixels``: the region's classes in raster order (255 = unpainted)."""
        image = self.image(i)
        table = self.ws.read_answers(self.round) if table is None else table
        rows = table[table["image"] == image.id]
        out: dict[str, dict[str, Any]] = {}
        stored: np.ndarray | None = None
        columns = (rows[c].tolist() for c in ("region", "class", "kind", "seconds", "source"))
        for region, k, kind, seconds, source in zip(*columns):
            entry = _entry(k, kind, seconds, source)
            if kind == "pixels":
                sp = self.superpixels(i)
                if stored is None:
                    stored = read_mask(mask_path(self.ws, self.round, image.id), sp.shape)
                entry["pixels"] = stored[sp == int(region)].tolist()
            out[str(int(region))] = entry
        return out

    def progress(self, table: pd.DataFrame | None = None) -> dict[str, int]:
        """Answered / queried regions and images whose every queried region is answered."""
        table = self.ws.read_answers(self.round) if table is None else table
        done = set(zip(table["image"].astype(str), table["region"].astype(int)))
        per_image = [sum((image.id, int(r)) in done for r in image.regions) for image in self.images]
        return {
            "answered": int(sum(per_image)),
            "queried": int(sum(len(image.regions) for image in self.images)),
            "images_done": int(sum(n == len(image.regions) for n, image in zip(per_image, self.images))),
            "images": len(self.images),
        }

    def next_command(self, progress: dict[str, int] | None = None) -> str:
        """What to run after annotating: train (``--partial`` while regions are unanswered)."""
        progress = self.progress() if progress is None else progress
        if progress["answered"] == 0:
            return f"gpual annotate {self.ws.root} --round {self.round}"
        partial = "" if progress["answered"] >= progress["queried"] else " --partial"
        return f"gpual train {self.ws.root} --round {self.round}{partial}"

    # --- predictions -----------------------------------------------------------------------
    def predictions(self, i: int) -> dict[str, int] | None:
        """Round N-1's teacher's majority predicted class per queried region of image ``i``
        (region id (str) -> class), computed on first request and cached; None in round 0
        (no model yet)."""
        if self.checkpoint is None:
            return None
        image = self.image(i)
        if i not in self._predictions:
            predicted = self._predict(i)  # (H, W) int64 at the working scale
            sp = self.superpixels(i).astype(np.int64)
            classes = majority_class(sp, predicted, image.regions)
            self._predictions[i] = {int(r): int(c) for r, c in zip(image.regions, classes)}
        return {str(r): c for r, c in self._predictions[i].items()}

    def _predict(self, i: int) -> np.ndarray:
        """(H, W) int64 argmax of the teacher's logits for image ``i`` at the working scale."""
        import torch

        from gpual.datasets import read_image
        from gpual.model import normalize

        path = self.image_file(i)  # the same refusal as the file itself
        with self._model_lock:
            teacher, device = self._load_teacher()
            rgb = read_image(path, self.ws.config.data.scale)  # (H, W, 3) uint8, the superpixels' size
            with torch.inference_mode():
                logits = teacher.segment(normalize(torch.from_numpy(rgb).unsqueeze(0).to(device)))
            return logits.argmax(1)[0].to("cpu").numpy().astype(np.int64)

    def _load_teacher(self) -> tuple[Any, Any]:
        """Round N-1's teacher on the session's device, loaded once (caller holds the model lock)."""
        if self._teacher_error is not None:  # said once, not reloaded per image
            raise GpualError(self._teacher_error)
        if self._teacher is None:
            from gpual.backend import resolve_device
            from gpual.training.checkpoints import load_teacher

            self._device = resolve_device(self.device_name)
            try:
                teacher, _ = load_teacher(self.checkpoint, self._device)
            except GpualError as exc:
                self._teacher_error = str(exc)
                raise
            if teacher.num_classes != self.num_classes:
                self._teacher_error = (f"{self.checkpoint} predicts {teacher.num_classes} classes but the dataset has "
                                       f"{self.num_classes}: nothing is pre-chosen")
                raise GpualError(self._teacher_error)
            self._teacher = teacher
        return self._teacher, self._device

    # --- writes ------------------------------------------------------------------------------
    def record(self, i: int, payload: Any) -> dict[str, Any]:
        """Validate a page's answers for image ``i`` (ClientError 400), then store them
        (the last write per region wins). Returns ``{saved, answers, progress}``."""
        image = self.image(i)
        sp = self.superpixels(i)
        regions, classes, label_map, seconds = parse_answers(payload, image.regions, sp, self.num_classes)
        answer = ImageAnswers(image.id, regions, classes, label_map, seconds)
        with self._write_lock:
            try:
                check_writable(self.ws, self.round)
            except GpualError as exc:
                raise ClientError(409, str(exc)) from None
            try:
                record_answers(self.ws, self.round, "annotator", [answer], superpixels={image.id: sp},
                               num_classes=self.num_classes)
            except GpualError as exc:
                raise ClientError(400, str(exc)) from None
            table = self.ws.read_answers(self.round)  # the table and maps as this write left them
            return {"saved": int(len(regions)), "answers": self.answers(i, table), "progress": self.progress(table)}


def _entry(k: Any, kind: Any, seconds: Any, source: Any) -> dict[str, Any]:
    """One stored answer as the page reads it (NaN seconds: not measured -> null)."""
    seconds = float(seconds)
    return {"class": int(k), "kind": str(kind), "source": str(source), "seconds": None if math.isnan(seconds) else seconds}


def _round_images(ws: Workspace, query: pd.DataFrame, index: pd.DataFrame, pool: dict[str, Path]) -> list[RoundImage]:
    """The round's images in pool order, each with its queried regions ascending."""
    per_image = query.groupby("image")["region"].agg(lambda s: np.unique(s.to_numpy(np.int64)))
    images = []
    for row in index.itertuples(index=False):
        image = str(row.image)
        if image not in per_image.index:
            continue
        if image not in pool:
            raise GpualError(f"image {image!r} of round {query['round'].iloc[0]}'s query is no longer in the pool: "
                             f"restore it in {ws.config.data.root}")
        images.append(RoundImage(image, pool[image], int(row.height), int(row.width), per_image[image]))
    missing = sorted(set(per_image.index.astype(str)) - {image.id for image in images})
    if missing:
        raise GpualError(f"image {missing[0]!r} of the query is not in the superpixel index: run `gpual superpixels {ws.root}`")
    return images


def majority_class(sp: np.ndarray, predicted: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(k,) int64: the most frequent class of ``predicted`` ((H, W) int64 in [0, C)) inside each
    of ``regions`` ((k,) ids of ``sp``, (H, W)); the lower class id wins a tie."""
    return dominant_class(predicted, sp, int(sp.max()) + 1)[regions]


# ---------------------------------------------------------------------------------------
# Validation of a POSTed body


def parse_answers(payload: Any, queried: np.ndarray, sp: np.ndarray, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """A page's ``{"answers": [{"region", "class", "pixels"?, "seconds"?}, ...]}`` for one image
    -> (regions (k,) int64, classes (k,) int64 with MIXED, label map (H, W) uint8 or None,
    seconds (k,) float64 NaN where absent), or ClientError 400 naming the first bad field.

    ``class`` is 0..C-1, 255 (void) or "mixed"; a mixed answer's ``pixels`` holds the class
    of every pixel of the region in raster order (255 = unpainted), so its length is the
    region's size in ``sp`` ((H, W) region ids at the working scale).
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("answers"), list) or not payload["answers"]:
        raise ClientError(400, 'give {"answers": [{"region": id, "class": k}, ...]} with at least one answer')
    allowed = set(queried.tolist())
    regions, classes, seconds, painted = [], [], [], {}
    for n, item in enumerate(payload["answers"]):
        if not isinstance(item, dict):
            raise ClientError(400, f"answer {n} is not an object")
        region = _integer(item.get("region"), f"answer {n}: region")
        if region not in allowed:
            raise ClientError(400, f"region {region} is not queried in this image: answer only its queried regions")
        if region in regions:
            raise ClientError(400, f"region {region} is answered twice in one request: send it once")
        value = item.get("class")
        if value == "mixed":
            painted[region] = _pixels(item.get("pixels"), int((sp == region).sum()), region, num_classes)
            classes.append(MIXED)
        else:
            k = _integer(value, f"region {region}: class")
            if not (0 <= k < num_classes or k == VOID):
                raise ClientError(400, f"region {region}: class {k} is not one of 0..{num_classes - 1}, 255 (void) or \"mixed\"")
            if "pixels" in item:
                raise ClientError(400, f"region {region}: pixels go with class \"mixed\" only")
            classes.append(k)
        regions.append(region)
        seconds.append(_seconds(item.get("seconds"), region))
    label_map = None
    if painted:
        label_map = np.full(sp.shape, VOID, np.uint8)
        for region, values in painted.items():
            label_map[sp == region] = values  # boolean indexing is raster order, as the page sends it
    return np.array(regions, np.int64), np.array(classes, np.int64), label_map, np.array(seconds, np.float64)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientError(400, f"{what} must be an integer, got {json.dumps(value)[:40]}")
    return value


def _pixels(values: Any, size: int, region: int, num_classes: int) -> np.ndarray:
    """A mixed region's painted pixels: (size,) uint8 in 0..C-1 or 255."""
    if not isinstance(values, list) or len(values) != size:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ClientError(400, f"region {region}: pixels must list its {size} pixels in raster order, got {got}")
    allowed = set(range(num_classes)) | {VOID}
    # Checked in Python, before NumPy: a huge integer would overflow an int64 array.
    bad = [v for v in values if type(v) is not int or v not in allowed][:1]
    if bad:
        if type(bad[0]) is not int:
            raise ClientError(400, f"region {region}: pixels must be integers")
        raise ClientError(400, f"region {region}: pixel class {bad[0]} is not one of 0..{num_classes - 1} or 255 (unpainted)")
    return np.array(values, np.uint8)


def _seconds(value: Any, region: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ClientError(400, f"region {region}: seconds must be a number >= 0, got {json.dumps(value)[:40]}")
    return float(value)


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 unless ``application/json`` (a cross-site form cannot send
    that without a preflight this server never answers), 413 beyond ``limit`` bytes (read
    no further), 400 if not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ClientError(415, "send the body as application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ClientError(413, f"request body over {limit:,} bytes: send fewer answers per request")
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body over {limit:,} bytes: send fewer answers per request")
        body += chunk
    try:
        return json.loads(body)
    except ValueError:
        raise ClientError(400, "the body is not valid JSON") from None


# ---------------------------------------------------------------------------------------
# The app


class AccessGuard:
    """ASGI middleware in front of every route: the token (when set) and the Host check
    (when ``allowed_hosts`` is set). A refused request gets 403 and reaches no route."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.token, self.allowed_hosts = app, token, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem:
                await PlainTextResponse(problem, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            return "this annotator answers only on localhost: open the address `gpual annotate` printed"
        if self.token is not None:
            cookies = cookie_parser(headers.get("cookie", ""))
            given = [QueryParams(scope.get("query_string", b"")).get("token"), headers.get(TOKEN_HEADER),
                     *(value for name, value in cookies.items() if name.startswith(TOKEN_COOKIE))]
            if not any(value and secrets.compare_digest(value.encode(), self.token.encode()) for value in given):
                return "access token missing or wrong: open the address with ?token= that `gpual annotate` printed"
        return None


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without port or IPv6 brackets: ``[::1]:8765`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_local_host(host: str) -> bool:
    """Whether ``--host`` serves this machine's loopback only (no token needed)."""
    return host.strip().lower().strip("[]") in LOCAL_HOSTS


def create_app(session: AnnotationSession, token: str | None = None, allowed_hosts: frozenset[str] | None = LOCAL_HOSTS,
               on_done: Callable[[], None] | None = None, max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The annotator's Starlette app for ``session``.

    ``token``: required on every request (``?token=``, the cookie it sets, or the
    ``X-Gpual-Token`` header); ``allowed_hosts``: names the ``Host`` header may carry (None:
    any); ``on_done``: called after ``POST /api/done`` has answered (the runner stops).
    """

    async def index(request: Request) -> Response:
        if token is not None and "token" in request.query_params:
            # The token leaves the address bar (and history): a cookie carries it from here.
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(f"{TOKEN_COOKIE}_{request.url.port or 80}", token, httponly=True, samesite="strict")
            return response
        return _page(STATIC_DIR / "index.html", "text/html; charset=utf-8")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            raise ClientError(404, "not found")
        return _page(STATIC_DIR / name, STATIC_FILES[name])

    async def manifest(request: Request) -> Response:
        return _json(await _threaded(session.manifest))

    async def image_state(request: Request) -> Response:
        i = request.path_params["i"]
        return _json({"index": i, "answers": await _threaded(session.answers, i)})

    async def image_file(request: Request) -> Response:
        path = await _threaded(session.image_file, request.path_params["i"])
        media = IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media,
                            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def superpixels(request: Request) -> Response:
        sp = await _threaded(session.superpixels, request.path_params["i"])
        return Response(sp.astype("<u2").tobytes(), media_type="application/octet-stream",
                        headers={"X-Width": str(sp.shape[1]), "X-Height": str(sp.shape[0]), "Cache-Control": "no-store"})

    async def predictions(request: Request) -> Response:
        i = request.path_params["i"]
        try:
            return _json({"index": i, "predictions": await _threaded(session.predictions, i)})
        except GpualError as exc:  # no usable model: the page pre-chooses nothing and says why
            return _json({"index": i, "predictions": None, "error": str(exc)})

    async def post_answers(request: Request) -> Response:
        payload = await read_json(request, max_body)
        return _json(await _threaded(session.record, request.path_params["i"], payload))

    async def progress(request: Request) -> Response:
        return _json(await _threaded(session.progress))

    async def done(request: Request) -> Response:
        await read_json(request, max_body)  # a JSON POST like the others: no cross-site form can stop the server
        state = await _threaded(session.progress)
        body = {"progress": state, "next": session.next_command(state)}
        return _json(body, background=BackgroundTask(on_done) if on_done is not None else None)

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/session", manifest),
        Route("/api/progress", progress),
        Route("/api/images/{i:int}", image_state),
        Route("/api/images/{i:int}/file", image_file),
        Route("/api/images/{i:int}/superpixels", superpixels),
        Route("/api/images/{i:int}/predictions", predictions),
        Route("/api/images/{i:int}/answers", post_answers, methods=["POST"]),
        Route("/api/done", done, methods=["POST"]),
    ]
    handlers = {ClientError: _client_error, GpualError: _gpual_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(AccessGuard, token=token, allowed_hosts=allowed_hosts)
    return app


async def _threaded(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work (parquet, PNG, torch) off the event loop, so one slow request
    (a first prediction) does not stall the others."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


def _page(path: Path, media_type: str) -> Response:
    return Response(path.read_bytes(), media_type=media_type,
                    headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


def _json(body: Any, background: BackgroundTask | None = None) -> JSONResponse:
    return JSONResponse(body, headers={"Cache-Control": "no-store"}, background=background)


async def _client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _gpual_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=500)


# ---------------------------------------------------------------------------------------
# The runner


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port), or a one-line GpualError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise GpualError(f"--host {host} does not resolve ({exc.strerror}): give an address of this machine, e.g. 127.0.0.1",
                         2) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped session's port; a live one still refuses
        sock.bind(address)
        sock.listen(128)  # the browser may connect before the loop runs: it waits in the backlog
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise GpualError(f"port {port} on {host} is in use: pass another --port, or stop the program that holds it") from None
        raise GpualError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --host or --port") from None
    return sock


class AnnotatorServer:
    """The session's app under uvicorn on a socket bound at construction (so a busy port
    fails before anything runs). Non-loopback hosts get a random token."""

    def __init__(self, session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765) -> None:
        import uvicorn

        self.session, self.host = session, host
        local = is_local_host(host)
        self.token = None if local else secrets.token_urlsafe(24)
        self.socket = bind_socket(host, port)
        self.port = int(self.socket.getsockname()[1])
        app = create_app(session, self.token, LOCAL_HOSTS if local else None, on_done=self.stop)
        # After Done, requests under way (a first prediction on a CPU takes seconds) may finish;
        # idle keep-alive connections are closed at once.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                                timeout_graceful_shutdown=15)
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        """The address to open (with ``?token=`` where one is needed)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # every interface: this machine's name reaches one of them
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        """Serve until :meth:`stop` (``POST /api/done``) or Ctrl-C; closes the socket."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        self.server.should_exit = True
