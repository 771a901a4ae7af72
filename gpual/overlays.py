"""Overlay PNGs of a round's most-queried images: every superpixel outlined, the selected
ones filled, so an annotator (or a reviewer) sees at a glance what was asked for."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from gpual.atomic import atomic_dir
from gpual.datasets import read_image
from gpual.superpixels import load_superpixels
from gpual.workspace import Workspace

FILL_BGR = (0, 200, 255)  # amber
EDGE_BGR = (255, 255, 255)


def region_boundaries(superpixels: np.ndarray) -> np.ndarray:
    """(H,W) bool: pixels whose right or lower neighbour lies in another region."""
    edges = np.zeros(superpixels.shape, dtype=bool)
    edges[:, :-1] |= superpixels[:, :-1] != superpixels[:, 1:]
    edges[:-1, :] |= superpixels[:-1, :] != superpixels[1:, :]
    return edges


def render_overlay(image_rgb: np.ndarray, superpixels: np.ndarray, selected: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H,W,3) uint8 BGR: ``image_rgb`` with region edges drawn and ``selected`` region ids filled."""
    out = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    mask = np.isin(superpixels, selected)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(FILL_BGR, dtype=np.float32)
    out[region_boundaries(superpixels)] = 0.5 * out[region_boundaries(superpixels)] + 0.5 * np.array(EDGE_BGR, np.float32)
    selected_edges = region_boundaries(np.where(mask, 1, 0).astype(np.uint8))
    out[selected_edges] = FILL_BGR
    return out.astype(np.uint8)


def write_overlays(ws: Workspace, round: int, index: pd.DataFrame, manifest: pd.DataFrame, count: int) -> list[str]:
    """Write ``rounds/NNN/overlays/<rank>_<image>.png`` for the ``count`` images with the most
    selected regions (replaced whole, atomically). Returns the image ids drawn."""
    if count <= 0 or len(manifest) == 0:
        return []
    per_image = manifest.groupby("image", sort=False)["region"].agg(list)
    top = manifest["image"].value_counts(sort=True).head(count).index.tolist()
    paths = dict(zip(index["image"].astype(str), index["path"]))
    with atomic_dir(ws.overlay_dir(round)) as folder:
        for rank, image_id in enumerate(top):
            sp = load_superpixels(ws, image_id, index)
            image = read_image(paths[image_id], ws.config.data.scale)
            picture = render_overlay(image, sp, np.asarray(per_image[image_id], dtype=sp.dtype))
            safe = str(image_id).replace("/", "__")
            cv2.imwrite(str(folder / f"{rank:02d}_{safe}.png"), picture)
    return top
