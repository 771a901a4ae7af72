"""Host batch loading: errors from loader processes, pinned batches, stage clock."""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import Dataset

from gpual.errors import GpualError
from gpual.loading import AUTO_WORKERS_MAX, StageClock, Waited, host_batches, resolve_workers, worker_error

MESSAGE = "image /data/x.png is unreadable (truncated file): restore it or remove it from the pool"


class _FailsAt(Dataset):
    """Items are (i,) tensors; item ``bad`` raises GpualError."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise GpualError(MESSAGE)
        return torch.tensor([i])


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_loader_process_arrives_as_its_own_line(workers) -> None:
    with pytest.raises(GpualError) as info:
        list(host_batches(_FailsAt(6, bad=3), torch.device("cpu"), workers))
    assert str(info.value) == MESSAGE


def test_auto_workers_none_on_the_cpu_and_up_to_eight_beside_a_gpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert resolve_workers("auto", cpu, cores=16) == 0
    assert [resolve_workers("auto", cuda, cores=n) for n in (1, 2, 4, 16, 64)] == [0, 1, 3, AUTO_WORKERS_MAX, AUTO_WORKERS_MAX]
    assert resolve_workers(3, cpu) == 3 and resolve_workers(0, cuda, cores=16) == 0  # a count is kept as given
    usable = len(os.sched_getaffinity(0))  # default: the cores this process may run on
    assert resolve_workers("auto", cuda) == max(0, min(AUTO_WORKERS_MAX, usable - 1))


def test_items_come_in_order_with_batch_size_none() -> None:
    items = list(host_batches(_FailsAt(5, bad=-1), torch.device("cpu"), 2))
    assert [int(t) for t in items] == [0, 1, 2, 3, 4]


def test_worker_error_leaves_other_errors_alone() -> None:
    plain = GpualError("budget too large: lower --budget", 2)
    assert worker_error(plain) is plain


def test_waited_adds_up_the_wait_for_each_item() -> None:
    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    waited = Waited(slow())
    seen = []
    start = time.perf_counter()
    for i in waited:
        seen.append(i)
        time.sleep(0.05)  # the loop's own work is not counted
    elapsed = time.perf_counter() - start
    assert seen == [0, 1, 2]
    # Sleeps last at least their time, so these hold however loaded the machine is.
    assert 0.06 <= waited.seconds <= elapsed - 0.15


def test_stage_clock_sums_each_stage_on_cpu() -> None:
    clock = StageClock(torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(3):
        clock.start()
        time.sleep(0.01)
        clock.mark("a")
        time.sleep(0.02)
        clock.mark("b")
    elapsed = time.perf_counter() - start
    seconds = clock.seconds()
    assert set(seconds) == {"a", "b"}
    # Lower bounds from the sleeps, an upper bound from the wall time: no timing order.
    assert seconds["a"] >= 0.03 and seconds["b"] >= 0.06 and seconds["a"] + seconds["b"] <= elapsed


@pytest.mark.gpu
def test_stage_clock_times_device_work_on_cuda_and_batches_are_pinned() -> None:
    # GPU path: written against torch.cuda.Event; not run on the CPU machine.
    device = torch.device("cuda", torch.cuda.current_device())
    clock = StageClock(device)
    x = torch.randn(2048, 2048, device=device)
    for _ in range(3):
        clock.start()
        x = (x @ x).tanh_()
        clock.mark("matmul")
    seconds = clock.seconds()
    assert seconds["matmul"] > 0
    batch = next(host_batches(_FailsAt(2, bad=-1), device, 0))
    assert batch.is_pinned()
