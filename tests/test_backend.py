"""The backend object: device resolution, errors without CUDA, zero-copy on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpual.backend import get_backend
from gpual.errors import GpualError


def test_cpu_backend_libraries() -> None:
    b = get_backend("cpu")
    assert b.xp is np and b.frame.__name__ == "pandas" and b.device.type == "cpu"
    assert type(b.kmeans(n_clusters=2)).__module__.startswith("sklearn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error path cannot be reached")
def test_cuda_requested_without_cuda_is_exit_2() -> None:
    with pytest.raises(GpualError, match="--device cuda was asked for") as info:
        get_backend("cuda")
    assert info.value.exit_code == 2
    assert get_backend("auto").name == "cpu" and get_backend("auto").reason


def test_unknown_device() -> None:
    with pytest.raises(GpualError, match="not one of cpu, cuda, auto"):
        get_backend("tpu")


def test_handoff_refuses_wrong_device_and_shares_memory() -> None:
    b = get_backend("cpu")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = b.from_torch(t)
    assert a.__array_interface__["data"][0] == t.data_ptr()
    t[0, 0] = 42
    assert a[0, 0] == 42
    back = b.to_torch(a)
    assert back.data_ptr() == t.data_ptr()
