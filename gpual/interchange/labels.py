"""The label names a tool offers, and the canvas an imported image's shapes are painted on.

A tool gets the dataset's classes plus two names of gpual's own:

- ``void``: "nothing to label here" (the dataset's 255); a queried region painted only
  with it is answered void, as the simulated oracle answers an all-void region;
- ``to label``: the placeholder class of the exported pre-annotations (gpual keeps no
  per-region prediction to pre-fill with). A shape still carrying it is not an answer:
  a region the annotator did not relabel or paint over stays unanswered.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from gpual.errors import GpualError

VOID_LABEL = "void"
PLACEHOLDER = "to label"
VOID = 255  # the label store's void, and "not labelled" in a label map
SKIP = -1  # resolve(): a placeholder shape, painted nowhere


@dataclass(frozen=True)
class LabelSet:
    """The dataset's class names (index = class id) plus :data:`VOID_LABEL` and :data:`PLACEHOLDER`."""

    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        taken = [name for name in (VOID_LABEL, PLACEHOLDER) if name in self.classes]
        if taken:
            raise GpualError(
                f"the dataset has a class named {taken[0]!r}, a label name gpual's exports keep for themselves: "
                "rename that class in classes.txt"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a tool offers, classes first."""
        return (*self.classes, VOID_LABEL, PLACEHOLDER)

    def resolve(self, name: str, where: str) -> int:
        """Class id of ``name``, :data:`VOID` for ``void``, :data:`SKIP` for the placeholder."""
        if name == PLACEHOLDER:
            return SKIP
        if name == VOID_LABEL:
            return VOID
        try:
            return self.classes.index(name)
        except ValueError:
            raise GpualError(
                f"{where} uses the label {name!r}, which is not one of the dataset's classes ({', '.join(self.classes)}) "
                f"nor {VOID_LABEL!r}: relabel it in the tool with one of these and export again"
            ) from None

    def colour(self, name: str) -> str:
        """A stable ``#rrggbb`` per name: golden-ratio hues for classes, grey void, magenta placeholder."""
        if name == VOID_LABEL:
            return "#000000"
        if name == PLACEHOLDER:
            return "#ff00ff"
        hue = (self.classes.index(name) * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
        return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


class Canvas:
    """One image's imported answers at the size the tool declared.

    ``labels`` (H, W) uint8: class ids, 255 where nothing (or void) was painted;
    ``touched`` (H, W) uint8: 1 where any label, void included, was painted. Shapes are
    painted in the order given: where they overlap, the later one wins.
    """

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.full((height, width), VOID, dtype=np.uint8)
        self.touched = np.zeros((height, width), dtype=np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape  # type: ignore[return-value]

    def paint(self, mask: np.ndarray, code: int) -> None:
        """Paint (H, W) bool ``mask`` with a :meth:`LabelSet.resolve` code."""
        if code == SKIP:
            return
        self.labels[mask] = code
        self.touched[mask] = 1
