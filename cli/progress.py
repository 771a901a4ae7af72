"""The progress of long steps, one reporter for every command: bars in a terminal, lines in a log.

In a terminal (``console.is_terminal``) each step is a transient rich bar. Otherwise (a
log file, ``| tee``, CI) a step writes plain one-line progress, e.g.::

    train round 1: 120/360 steps, 1m05s elapsed, ETA 2m10s

one line at its first update, then at most one every ``interval`` seconds, and one when it
completes (done == total). The interval is 30 s; the environment variable
``GPUAL_PROGRESS_SECONDS`` sets another (0: a line at every update). Elapsed time counts
from when the step was created; the ETA is the work left at the rate since the step's
first update ("-" until there is a rate to go by). Lines are printed when an update
arrives (no timer thread), so a step that stops reporting writes nothing more.

Usage::

    with progress_bars(console) as bars:
        train_round(..., progress=bars("train round 1"))
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from gpual.errors import GpualError

ENV_INTERVAL = "GPUAL_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
Clock = Callable[[], float]  # seconds, monotonic

# The bar of select, run and demo (and the default): step, bar, done/total, elapsed.
DEFAULT_COLUMNS: tuple[ProgressColumn, ...] = (
    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
)


class StepProgress(Protocol):
    """One step's progress: called as ``step(done, total)`` by the code doing the work."""

    def __call__(self, done: int, total: int | None) -> None: ...

    def start(self) -> None:
        """Show the step now, before its first update (a terminal bar with no total yet)."""

    def note(self, description: str | None = None, detail: str | None = None) -> None:
        """Set the bar's description and its ``detail`` field (a terminal); in a log both
        are appended to the step's next lines."""


class StepFactory(Protocol):
    """``bars(name, unit="steps", description=None)``: the progress of one new step."""

    def __call__(self, name: str, unit: str = "steps", description: str | None = None) -> StepProgress: ...


def interval_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds between two progress lines of a step: ``GPUAL_PROGRESS_SECONDS`` or 30."""
    raw = environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise GpualError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds >= 0: set it to e.g. 30 "
                         f"(0 = a line per update), or unset it", 2)
    return value


def format_duration(seconds: float) -> str:
    """``45s``, ``1m05s``, ``2h03m``: whole seconds, rounded."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def eta_seconds(first_time: float, first_done: int, now: float, done: int, total: int | None) -> float | None:
    """Seconds left at the rate since the first update ``(first_time, first_done)``; None
    while there is no rate (no work done since then, or no total)."""
    if total is None:
        return None
    if done >= total:
        return 0.0
    if done <= first_done or now <= first_time:
        return None
    rate = (done - first_done) / (now - first_time)
    return (total - done) / rate


class _LineStep:
    """A step in a log: a line at its first update, then at most one per interval, and one
    when it completes."""

    def __init__(self, console: Console, name: str, unit: str, interval: float, clock: Clock,
                 lock: threading.Lock) -> None:
        self._console, self._name, self._unit = console, name, unit
        self._interval, self._clock, self._lock = interval, clock, lock
        self._created = clock()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update
        self._last_line: float | None = None
        self._finished = False
        self._description: str | None = None
        self._detail: str | None = None

    def start(self) -> None:
        pass  # a log line needs a done/total: the first update writes it

    def note(self, description: str | None = None, detail: str | None = None) -> None:
        with self._lock:
            if description is not None:
                self._description = description
            if detail is not None:
                self._detail = detail

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        with self._lock:
            if self._first is None:
                self._first = (now, done)
            complete = total is not None and done >= total
            if complete and self._finished:
                return  # one completion line, however often the last update repeats
            if not (complete or self._last_line is None or now - self._last_line >= self._interval):
                return
            self._last_line, self._finished = now, complete
            self._console.print(self._line(now, done, total), markup=False, highlight=False, emoji=False,
                                soft_wrap=True)

    def _line(self, now: float, done: int, total: int | None) -> str:
        assert self._first is not None
        eta = eta_seconds(*self._first, now, done, total)
        count = f"{done}/{total}" if total is not None else f"{done}"
        line = (f"{self._name}: {count} {self._unit}, {format_duration(now - self._created)} elapsed, "
                f"ETA {'-' if eta is None else format_duration(eta)}")
        extra = [text for text in (self._description, self._detail) if text]
        return line + ("; " + ", ".join(extra) if extra else "")


class _BarStep:
    """A step in a terminal: a rich task, keyed by its description so that a step that
    comes again (the next round's train) reuses its bar, restarted."""

    def __init__(self, bars: Progress, tasks: dict[str, Any], key: str) -> None:
        self._bars, self._tasks, self._key = bars, tasks, key
        self._task: Any = None
        self._description, self._detail = key, ""

    def start(self) -> None:
        self._show(None)

    def _show(self, total: int | None) -> None:
        if self._task is not None:
            return
        if self._key in self._tasks:
            self._task = self._tasks[self._key]
            self._bars.reset(self._task, total=total, completed=0, description=self._description, detail=self._detail)
        else:
            self._task = self._tasks[self._key] = self._bars.add_task(self._description, total=total, detail=self._detail)

    def note(self, description: str | None = None, detail: str | None = None) -> None:
        if description is not None:
            self._description = description
        if detail is not None:
            self._detail = detail
        self._show(None)
        self._bars.update(self._task, description=self._description, detail=self._detail)

    def __call__(self, done: int, total: int | None) -> None:
        self._show(total)
        self._bars.update(self._task, completed=done, total=total)


@contextmanager
def progress_bars(console: Console, columns: Sequence[ProgressColumn] | None = None, interval: float | None = None,
                  clock: Clock = time.monotonic) -> Iterator[StepFactory]:
    """Yield ``bars(name, unit="steps", description=None) -> step``, one ``step(done, total)``
    per step of the work.

    ``name`` heads the step's log lines (e.g. "train round 1"), ``unit`` names what is
    counted, ``description`` is the terminal bar's text (default: ``name``). ``columns``
    are the terminal bars' (default :data:`DEFAULT_COLUMNS`; every task has a ``detail``
    field for a ``TextColumn("{task.fields[detail]}")``). ``interval`` (seconds between a
    step's log lines) defaults to :func:`interval_from_env`; ``clock`` is for tests.
    Raises GpualError (exit 2) for a bad ``GPUAL_PROGRESS_SECONDS``.
    """
    every = interval_from_env() if interval is None else interval
    if not console.is_terminal:
        lock = threading.Lock()

        def line_step(name: str, unit: str = "steps", description: str | None = None) -> StepProgress:
            return _LineStep(console, name, unit, every, clock, lock)

        yield line_step
        return
    with Progress(*(columns or DEFAULT_COLUMNS), console=console, transient=True, get_time=clock) as bars:
        tasks: dict[str, Any] = {}

        def bar_step(name: str, unit: str = "steps", description: str | None = None) -> StepProgress:
            return _BarStep(bars, tasks, description or name)

        yield bar_step
