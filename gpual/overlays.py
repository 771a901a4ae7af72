"""Overlay PNGs of a round's most-queried images, so an annotator (or a reviewer) sees at a
glance what was asked for.

Each overlay is drawn at the image file's own size, times a whole factor for an image
narrower than :data:`MIN_WIDTH` (the superpixel map, computed at the working scale
``data.scale``, is enlarged nearest-neighbour to it):

- every superpixel has a thin light outline;
- this round's queried regions are filled with translucent magenta and outlined by a
  two-tone border, a dark line along the region's edge and a bright one inside it, so the
  outline shows on dark, bright and saturated content alike;
- regions labelled in earlier rounds are greyed out and hatched in cyan;
- a legend strip under the image names the round, the strategy, how many of the round's
  queried regions lie in this image and their score range, and the colour key.

Host NumPy and OpenCV: a handful of images per round (``acquisition.overlays``).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from gpual.atomic import atomic_dir
from gpual.datasets import read_image
from gpual.errors import GpualError
from gpual.interchange.regions import upscale
from gpual.superpixels import load_superpixels
from gpual.workspace import Workspace

QUERY_BGR = (255, 0, 255)  # magenta: rare in street scenes and nature, unlike amber on yellow signs
DARK_BGR = (0, 0, 0)
BRIGHT_BGR = (255, 255, 255)
EARLIER_BGR = (255, 220, 0)  # cyan hatching on the greyed-out earlier labels
EDGE_BGR = (255, 255, 255)
LEGEND_BG = (40, 40, 40)
LEGEND_TEXT = (235, 235, 235)
QUERY_ALPHA = 0.45
EDGE_ALPHA = 0.4
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Narrower images are enlarged by a whole factor (nearest-neighbour: their pixels stay
# square blocks) to at least this width, so outlines and the legend stay readable.
MIN_WIDTH = 400


@dataclass(frozen=True)
class Legend:
    """What the legend strip says about one overlay."""

    round: int
    strategy: str
    image: str
    queried: int  # this round's queried regions in the image
    total_queried: int  # this round's queried regions in the pool
    scores: tuple[float, float] | None  # (lowest, highest) score of the image's queried regions
    earlier: int  # regions of the image labelled in rounds before ``round``


def line_width(height: int, width: int) -> int:
    """Pixels of each of the two border lines: 1 up to 450 px on the short side, then
    growing with the image, so the border reads the same on a phone photo and a 4K frame."""
    return max(1, round(min(height, width) / 450))


def enlarge_small(image: np.ndarray, min_width: int = MIN_WIDTH) -> np.ndarray:
    """``image`` (H, W, C) as it is when W >= ``min_width``, else enlarged nearest-neighbour
    by the smallest whole factor that reaches it."""
    factor = -(-min_width // image.shape[1])
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _region_changes(superpixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((H, W-1), (H-1, W)) bool: where a pixel's right / lower neighbour lies in another region."""
    return superpixels[:, :-1] != superpixels[:, 1:], superpixels[:-1, :] != superpixels[1:, :]


def region_boundaries(superpixels: np.ndarray, both_sides: bool = False) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour lies in another region (a
    one-pixel line between regions), or with ``both_sides`` the pixels on either side of
    each such edge (any 4-neighbour in another region)."""
    right, down = _region_changes(superpixels)
    edges = np.zeros(superpixels.shape, dtype=bool)
    edges[:, :-1] |= right
    edges[:-1, :] |= down
    if both_sides:
        edges[:, 1:] |= right
        edges[1:, :] |= down
    return edges


def _band(edges: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` - 1 pixels (chessboard distance) of an edge pixel."""
    if width <= 1:
        return edges
    kernel = np.ones((2 * width - 1, 2 * width - 1), np.uint8)
    return cv2.dilate(edges.view(np.uint8), kernel).astype(bool)


def _hatch(height: int, width: int, t: int) -> np.ndarray:
    """(H, W) bool: diagonal lines ``t`` px wide, every 5 t px (at least 6)."""
    spacing = max(6, 5 * t)
    yy, xx = np.ogrid[:height, :width]
    return ((yy + xx) % spacing) < t


def _member(superpixels: np.ndarray, ids: np.ndarray, n_ids: int) -> np.ndarray:
    """(H, W) bool: pixels whose region is one of ``ids`` (a lookup table, not a search)."""
    table = np.zeros(max(n_ids, int(np.max(ids)) + 1 if len(ids) else 0), bool)
    table[np.asarray(ids, np.int64)] = True
    return table[superpixels] if len(table) else np.zeros(superpixels.shape, bool)


def _blend(out: np.ndarray, mask: np.ndarray, bgr: tuple[int, int, int], alpha: float) -> None:
    """``out`` (H, W, 3) uint8 BGR blended with colour ``bgr`` inside ``mask``, in place.
    OpenCV's saturating uint8 arithmetic over the whole image, then a masked copy: faster
    than float gathers on a large image."""
    blended = cv2.add(cv2.convertScaleAbs(out, alpha=1 - alpha), tuple(float(c) * alpha for c in bgr) + (0.0,))
    np.copyto(out, blended, where=mask[..., None])


def _grey_out(out: np.ndarray, mask: np.ndarray) -> None:
    """Desaturate ``out`` (uint8 BGR) inside ``mask`` into a mid-grey range (50..203), so
    cyan hatching and the magenta queries stand out from it whatever the content."""
    grey = cv2.convertScaleAbs(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), alpha=0.6, beta=50)
    np.copyto(out, grey[..., None], where=mask[..., None])


def render_overlay(
    image_rgb: np.ndarray,
    superpixels: np.ndarray,
    queried: np.ndarray,
    earlier: np.ndarray | None = None,
    legend: Legend | None = None,
) -> np.ndarray:
    """The overlay of one image, (H + strip, W, 3) uint8 BGR (host).

    ``image_rgb`` (H, W, 3) uint8 RGB at the file's size; ``superpixels`` (h, w) region ids
    at the working scale (enlarged to (H, W) here); ``queried`` and ``earlier`` local region
    ids of this round's queries and of the regions labelled before it. The legend strip
    (under the image) is drawn only when ``legend`` is given.
    """
    height, width = image_rgb.shape[:2]
    # The exports' and the annotator's rule (gpual.interchange.regions.upscale), so an
    # overlay's borders are the very pixels a mask of the same round has.
    sp = upscale(superpixels, (height, width))
    out = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    t = line_width(height, width)
    n_ids = int(superpixels.max()) + 1 if superpixels.size else 0  # the small map: same ids
    if earlier is not None and len(earlier):
        done = _member(sp, earlier, n_ids)
        _grey_out(out, done)
        out[done & _hatch(height, width, t)] = EARLIER_BGR
    mask = _member(sp, queried, n_ids)
    _blend(out, mask, QUERY_BGR, QUERY_ALPHA)
    _blend(out, region_boundaries(sp), EDGE_BGR, EDGE_ALPHA)
    # Both border lines lie inside the queried region: the dark one along its edge, the
    # bright one next to it, so two adjacent queries stay apart and the content outside
    # the query is left as it is.
    edges = region_boundaries(sp, both_sides=True)
    dark = _band(edges, t)
    out[mask & dark] = DARK_BGR
    out[mask & _band(edges, 2 * t) & ~dark] = BRIGHT_BGR
    if legend is None:
        return out
    return np.concatenate([out, legend_strip(legend, width, t)], axis=0)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return text.encode("ascii", "replace").decode("ascii")


def _text_width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _wrap(text: str, max_width: int, scale: float, thickness: int) -> list[str]:
    """``text`` in lines no wider than ``max_width`` px, broken at spaces (a single word
    wider than that stays whole, clipped by the strip's edge)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_width(f"{lines[-1]} {word}", scale, thickness) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def legend_items(legend: Legend) -> list[tuple[str | None, str]]:
    """The legend's entries, in order: (None, a line of text) or (colour key, its label);
    keys are "query", "earlier" (rounds after 0 only) and "edge"."""
    if legend.scores is None:
        scores = "no scores (random draw)"
    elif legend.scores[0] == legend.scores[1]:
        scores = f"score {legend.scores[0]:.4g}"
    else:
        scores = f"scores {legend.scores[0]:.4g} to {legend.scores[1]:.4g}"
    items: list[tuple[str | None, str]] = [
        (None, f"round {legend.round}, {legend.strategy}: {legend.image}"),
        (None, f"{legend.queried:,} of the round's {legend.total_queried:,} queried regions here, {scores}"),
        ("query", f"queried in round {legend.round}"),
    ]
    if legend.round > 0:
        rounds = "round 0" if legend.round == 1 else f"rounds 0-{legend.round - 1}"
        items.append(("earlier", f"labelled in {rounds} ({legend.earlier:,} here)"))
    items.append(("edge", "superpixel boundary"))
    return items


def legend_strip(legend: Legend, width: int, t: int) -> np.ndarray:
    """(h, width, 3) uint8 BGR: the legend's text and colour key, wrapped to ``width``."""
    scale = float(np.clip(width / 1100, 0.35, 1.0))
    thickness = 1 if scale < 0.7 else 2
    (_, text_h), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    line_h = text_h + baseline + max(4, text_h // 2)
    swatch = text_h + baseline
    pad = max(4, text_h // 2)
    gap = max(8, text_h)
    items = legend_items(legend)
    # Greedy flow layout: the first three items each start a line, the colour keys after
    # them share lines while they fit; a text too long for the strip wraps at its spaces.
    placed: list[tuple[int, int, str | None, str]] = []  # (line, x, key, text)
    line, x = 0, pad
    for n, (key, text) in enumerate(items):
        indent = swatch + pad if key else 0
        parts = _wrap(_ascii(text), width - 2 * pad - indent, scale, thickness)
        item_w = indent + max(_text_width(part, scale, thickness) for part in parts)
        if x > pad and (n <= 2 or len(parts) > 1 or x + item_w > width - pad):
            line, x = line + 1, pad
        placed.append((line, x, key, parts[0]))
        placed.extend((line + k, x + indent, None, part) for k, part in enumerate(parts[1:], 1))
        if len(parts) > 1:
            line, x = line + len(parts) - 1, width  # nothing shares a wrapped item's last line
        else:
            x += item_w + gap
    strip = np.empty(((line + 1) * line_h + pad, width, 3), np.uint8)
    strip[:] = LEGEND_BG
    for row, x0, key, text in placed:
        top = pad + row * line_h
        if key:
            _draw_swatch(strip, key, x0, top, swatch, t)
            x0 += swatch + pad
        cv2.putText(strip, text, (x0, top + text_h), FONT, scale, LEGEND_TEXT, thickness, cv2.LINE_AA)
    return strip


def _draw_swatch(strip: np.ndarray, key: str, x: int, y: int, size: int, t: int) -> None:
    """A ``size`` square at (x, y) of ``strip`` drawn as the overlay draws ``key``."""
    patch = np.full((size, size, 3), 128, np.uint8)
    inside = np.ones((size, size), bool)
    if key == "query":
        _blend(patch, inside, QUERY_BGR, QUERY_ALPHA)
        ring = np.ones((size, size), bool)
        ring[t:-t or None, t:-t or None] = False
        inner = np.ones((size, size), bool)
        inner[2 * t:-2 * t or None, 2 * t:-2 * t or None] = False
        patch[inner & ~ring] = BRIGHT_BGR
        patch[ring] = DARK_BGR
    elif key == "earlier":
        _grey_out(patch, inside)
        patch[_hatch(size, size, t)] = EARLIER_BGR
    else:  # a boundary between two regions
        line = np.zeros((size, size), bool)
        line[:, size // 2] = True
        _blend(patch, line, EDGE_BGR, EDGE_ALPHA)
    h = min(size, strip.shape[0] - y)
    w = min(size, strip.shape[1] - x)
    if h > 0 and w > 0:
        strip[y:y + h, x:x + w] = patch[:h, :w]


def write_overlays(ws: Workspace, round: int, index: pd.DataFrame, manifest: pd.DataFrame, count: int) -> list[str]:
    """Write ``rounds/NNN/overlays/<rank>_<image>.png`` for the ``count`` images with the most
    queried regions of ``manifest`` (round ``round``'s selection, host pandas with
    ``QUERY_COLUMNS``), at each image's file size (:func:`enlarge_small` for narrow ones),
    with a legend; the folder is replaced whole, atomically. Regions labelled in the rounds
    before ``round`` are read from the label store and drawn apart. Returns the image ids
    drawn, most queried first."""
    if count <= 0 or len(manifest) == 0:
        return []
    earlier_table = ws.read_labeled(round - 1) if round > 0 else None
    earlier_by_image = (earlier_table.groupby("image", sort=False)["region"].agg(list)
                        if earlier_table is not None and len(earlier_table) else pd.Series(dtype=object))
    per_image = manifest.groupby("image", sort=False)
    regions, scores = per_image["region"].agg(list), per_image["score"].agg(["min", "max"])
    top = manifest["image"].value_counts(sort=True).head(count).index.tolist()
    paths = dict(zip(index["image"].astype(str), index["path"]))
    strategy = str(manifest["strategy"].iloc[0])
    with atomic_dir(ws.overlay_dir(round)) as folder:
        for rank, image_id in enumerate(top):
            sp = load_superpixels(ws, image_id, index)
            image = enlarge_small(read_image(paths[image_id], 1.0))  # the file's own size, not the working scale
            earlier = np.asarray(earlier_by_image.get(image_id, []), dtype=sp.dtype)
            low, high = (float(v) for v in scores.loc[image_id])
            legend = Legend(
                round=round, strategy=strategy, image=str(image_id), queried=len(regions[image_id]),
                total_queried=len(manifest), earlier=len(earlier),
                scores=None if strategy == "random" else (low, high),
            )
            picture = render_overlay(image, sp, np.asarray(regions[image_id], dtype=sp.dtype), earlier, legend)
            safe = str(image_id).replace("/", "__")
            path = folder / f"{rank:02d}_{safe}.png"
            ok, png = cv2.imencode(".png", picture)  # encoded here: a full disk is then Python's OSError, one line
            if ok:
                path.write_bytes(png.tobytes())
            else:
                raise GpualError(f"could not write {ws.overlay_dir(round) / path.name}: check that {ws.root} is writable "
                                 f"and has free space, then run `gpual select {ws.root} --round {round}` again")
    return top
