"""Backend.from_torch is zero-copy: the namespace array is a view of the tensor's memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpual.backend import cpu_backend, get_backend
from gpual.errors import GpualError


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.arange(7, dtype=torch.int64)],
    ids=["float32-2d", "int64-1d"],
)
def test_cpu_handoff_shares_memory(tensor: torch.Tensor) -> None:
    backend = cpu_backend()
    array = backend.from_torch(tensor)
    assert isinstance(array, np.ndarray)
    assert array.__array_interface__["data"][0] == tensor.data_ptr()
    assert array.shape == tuple(tensor.shape) and array.dtype == np.dtype(str(tensor.dtype).removeprefix("torch."))
    tensor.view(-1)[1] = 42  # a write on the torch side shows through the array
    assert array.reshape(-1)[1] == 42


def test_cpu_handoff_of_a_tensor_that_requires_grad() -> None:
    weight = torch.ones(2, 3, requires_grad=True)
    array = cpu_backend().from_torch(weight)
    assert array.__array_interface__["data"][0] == weight.data_ptr()
    with torch.no_grad():
        weight[0, 0] = 5.0
    assert array[0, 0] == 5.0


def test_gathered_rows_hand_off_without_copy() -> None:
    # The strategies gather candidate rows in torch, then hand the gathered tensor off.
    rows = torch.randn(10, 4).index_select(0, torch.tensor([7, 2, 5]))
    array = cpu_backend().from_torch(rows)
    assert array.__array_interface__["data"][0] == rows.data_ptr()
    np.testing.assert_array_equal(array, rows.numpy())


def test_handoff_refuses_a_tensor_on_another_device() -> None:
    with pytest.raises(GpualError, match="backend is cpu"):
        cpu_backend().from_torch(torch.empty(3, device="meta"))


@pytest.mark.gpu
@pytest.mark.rapids
def test_cuda_handoff_shares_device_memory() -> None:
    # GPU path: not run on this machine.
    backend = get_backend("cuda")
    for tensor in (torch.randn(5, 3, device=backend.device), torch.arange(9, device=backend.device)):
        array = backend.from_torch(tensor)
        assert isinstance(array, backend.xp.ndarray)
        assert array.data.ptr == tensor.data_ptr()
        tensor.view(-1)[2] = 7
        assert bool(array.reshape(-1)[2] == 7)  # host read in the test only
    weight = torch.ones(4, device=backend.device, requires_grad=True)
    assert backend.from_torch(weight).data.ptr == weight.data_ptr()
