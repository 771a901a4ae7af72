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


def test_cpu_umap_takes_exact_distances_for_small_banks_and_the_index_above(monkeypatch) -> None:
    """Below umap-learn's 4,096-vector threshold the CPU twin fits and transforms on
    scikit-learn's Euclidean distances (``metric="precomputed"``), in bounded chunks, and
    repeats itself; above it, umap-learn's own index. Both return (R, 2) float32 points."""
    import numpy as np

    from gpual.backend import ExactSmallBankUMAP, cpu_backend

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    regions = rng.normal(size=(500, 16)).astype(np.float32)
    args = dict(n_components=2, n_neighbors=10, min_dist=0.1, random_state=0, init="random")
    small = cpu_backend().umap(**args)
    assert small.init == "random"  # the constructor's arguments before the fit
    points = small.fit(bank).transform(regions)
    assert small.estimator.metric == "precomputed" and points.shape == (500, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(cpu_backend().umap(**args).fit(bank).transform(regions), points)
    # Chunks of the transform: every region gets a finite point near the bank's layout.
    monkeypatch.setattr(ExactSmallBankUMAP, "TRANSFORM_CHUNK", 128)
    chunked = cpu_backend().umap(**args).fit(bank).transform(regions)
    layout = small.embedding_
    assert np.isfinite(chunked).all() and (chunked.min(0) >= layout.min(0) - 5).all() and (chunked.max(0) <= layout.max(0) + 5).all()
    monkeypatch.setattr(ExactSmallBankUMAP, "SMALL", 200)
    large = cpu_backend().umap(**args).fit(bank)
    assert large.estimator.metric == "euclidean" and large.transform(regions).shape == (500, 2)


def test_cpu_umap_transform_of_the_nearest_distances_equals_the_full_rows() -> None:
    """The small-bank transform hands umap-learn only each region's n_neighbors nearest
    distances (sparse): the points are those of the full distance rows, exactly."""
    import warnings

    import numpy as np
    from sklearn.metrics import pairwise_distances

    from gpual.backend import cpu_backend

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(250, 8)).astype(np.float32)
    regions = rng.normal(size=(300, 8)).astype(np.float32)
    reducer = cpu_backend().umap(n_components=2, n_neighbors=7, min_dist=0.1, random_state=0, init="random").fit(bank)
    nearest = reducer._nearest(pairwise_distances(regions, bank))
    assert nearest.shape == (300, 250) and (nearest.getnnz(axis=1) == 7).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = reducer.estimator.transform(pairwise_distances(regions, bank))
    np.testing.assert_array_equal(reducer.transform(regions), full.astype(np.float32))


def test_amp_rule_on_the_cpu() -> None:
    from gpual.backend import amp_dtype, amp_enabled, amp_loss_scaling

    cpu = torch.device("cpu")
    assert not amp_enabled(cpu, True) and not amp_loss_scaling(cpu, True)
    assert amp_dtype(cpu) == torch.float16  # unused there: autocast is off on the CPU
    assert get_backend("cpu").amp(True) is False


@pytest.mark.gpu
def test_amp_rule_on_cuda_bf16_without_loss_scaling() -> None:
    from gpual.backend import amp_dtype, amp_enabled, amp_loss_scaling

    cuda = torch.device("cuda")
    assert amp_enabled(cuda, True) and not amp_enabled(cuda, False)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert amp_dtype(cuda) == torch.bfloat16 and not amp_loss_scaling(cuda, True)
    else:
        assert amp_dtype(cuda) == torch.float16 and amp_loss_scaling(cuda, True)
    assert not amp_loss_scaling(cuda, False)
