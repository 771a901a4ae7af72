"""Host-side batch loading shared by training, evaluation and acquisition.

Images are decoded on the host in ``num_workers`` loader processes (torch's
``DataLoader``), into pinned memory when the batches go to a CUDA device, so the copy to
the device can overlap the previous batch's compute. A :class:`~gpual.errors.GpualError`
raised in a loader process (a corrupt image, a size mismatch) reaches the caller as the
same one-line error, not as torch's "Caught ... in DataLoader worker process" text with
a traceback inside.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from gpual.errors import GpualError
from gpual.losses import IGNORE_INDEX

_WORKER_PREFIX = "Caught GpualError in DataLoader worker process"
_ORIGINAL_MARKER = "GpualError: "


AUTO_WORKERS_MAX = 8


def resolve_workers(setting: int | str, device: torch.device, cores: int | None = None) -> int:
    """Loader processes for ``train.num_workers``: a count as given; ``"auto"``: 0 when the
    model runs on the CPU (its compute uses the cores, and a 2-core machine has none to
    spare), else min(:data:`AUTO_WORKERS_MAX`, ``cores`` - 1) (``cores``: the CPUs this
    process may use), leaving one core to the process feeding the device."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(AUTO_WORKERS_MAX, cores - 1))


def host_batches(
    dataset: Dataset,
    device: torch.device,
    num_workers: int | str,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[Any]:
    """Iterate ``DataLoader(dataset, ...)``: host tensors, pinned when ``device`` is CUDA.

    ``batch_size=None`` yields the dataset's items as they are (datasets whose items are
    whole batches). ``num_workers=0`` decodes in this process (required inside daemonic
    processes such as Dask workers, which cannot start children); ``"auto"``: see
    :func:`resolve_workers`.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn,
                        num_workers=resolve_workers(num_workers, device), pin_memory=device.type == "cuda")
    batches = iter(loader)
    try:
        yield from batches
    except GpualError as exc:
        raise worker_error(exc) from None
    finally:
        # Stop the loader processes now, whether the loop ended, broke off or failed: an
        # iterator kept alive by a traceback would keep them, and with them every pipe they
        # inherited from this process (another child's stdin never reaches its end).
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, target) pairs, padding right/bottom to the largest: images with 0,
    targets with 255 (ignored by every loss and metric). -> ((B, H, W, 3) uint8, (B, H, W) uint8)
    on the pairs' device (host tensors in a loader process, device-resident ones in
    :class:`~gpual.training.data.TrainingBatches`); always new tensors, never views of the inputs."""
    h = max(img.shape[0] for img, _ in batch)
    w = max(img.shape[1] for img, _ in batch)
    device = batch[0][0].device
    images = torch.zeros(len(batch), h, w, 3, dtype=torch.uint8, device=device)
    targets = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.uint8, device=device)
    for i, (img, tgt) in enumerate(batch):
        images[i, : img.shape[0], : img.shape[1]] = img
        targets[i, : tgt.shape[0], : tgt.shape[1]] = tgt
    return images, targets


def worker_error(exc: GpualError) -> GpualError:
    """The GpualError a loader process raised, from torch's re-raised copy of it.

    torch re-raises a worker's exception as ``type(exc)(text)`` where ``text`` holds the
    worker's traceback, whose last line is ``gpual.errors.GpualError: <message>``; the
    exit code does not survive the trip (1, bad input, is what loaders raise).
    """
    text = str(exc.args[0]) if exc.args else ""
    if not text.startswith(_WORKER_PREFIX) or _ORIGINAL_MARKER not in text:
        return exc
    return GpualError(text.rsplit(_ORIGINAL_MARKER, 1)[1].strip(), exc.exit_code)


T = TypeVar("T")


class Waited(Generic[T]):
    """Iterates ``iterable`` and adds up, in ``seconds``, the wall time spent waiting for its
    items (a data loader's share of a loop: decoding in this process, or waiting for the
    loader processes when they fall behind)."""

    def __init__(self, iterable: Iterable[T]) -> None:
        self.iterable = iterable
        self.seconds = 0.0

    def __iter__(self) -> Iterator[T]:
        it = iter(self.iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield item


class StageClock:
    """Seconds spent per named stage of a loop of device work, summed over iterations.

    On CUDA each stage is bracketed by CUDA events, so timing adds no host
    synchronisation per iteration (one at :meth:`seconds`) and measures device time; on
    CPU, where work is synchronous, wall time between :meth:`mark` calls.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._totals: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self._last: Any = None

    def start(self) -> None:
        """Begin a stage sequence (call before the first stage of each iteration)."""
        self._last = self._now()

    def mark(self, stage: str) -> None:
        """End ``stage`` (it began at the previous :meth:`start` or :meth:`mark`)."""
        now = self._now()
        if self.cuda:
            self._events.append((stage, self._last, now))
        else:
            self._totals[stage] = self._totals.get(stage, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> dict[str, float]:
        """{stage: total seconds}; on CUDA waits for the recorded events once."""
        totals = dict(self._totals)
        if self._events:
            self._events[-1][2].synchronize()
            for stage, begin, end in self._events:
                totals[stage] = totals.get(stage, 0.0) + begin.elapsed_time(end) / 1000.0
        return totals

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event
