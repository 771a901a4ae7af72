"""The one object that decides which libraries run each stage: CUDA (CuPy, cuML, cuDF)
or the CPU twin (NumPy, umap-learn, scikit-learn, pandas/pyarrow), and the device rules
every stage shares (:func:`resolve_device`, the AMP rule :func:`amp_enabled` /
:func:`amp_dtype` / :func:`amp_loss_scaling`).

Stage code never imports CuPy, cuML or cuDF itself: it asks the :class:`Backend` for the
array namespace (``backend.xp``), the estimator classes (``backend.umap(...)``,
``backend.kmeans(...)``) and the DataFrame library (``backend.frame``), and hands torch
tensors across with :meth:`Backend.from_torch`, which is zero-copy (DLPack) on both
devices.
"""
from __future__ import annotations

import functools
import importlib
import platform
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from gpual.errors import GpualError

DeviceName = Literal["cpu", "cuda", "auto"]

# The GPU stack gpual is written against (see README: extra `gpu`).
_RAPIDS_MODULES = ("cupy", "cuml", "cudf")


def _import_rapids() -> dict[str, ModuleType]:
    """Import CuPy, cuML and cuDF; raise ImportError naming the one that failed and why.

    A broken install fails inside the package (a missing shared library, a NumPy too new
    for numba), so the message keeps the underlying error, not only the package name.
    """
    modules = {}
    for name in _RAPIDS_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ImportError(f"{name} ({detail})", name=name) from exc
    return modules


@dataclass
class Backend:
    """Libraries and device for every stage after superpixel precomputation.

    Attributes:
        name: ``"cuda"`` or ``"cpu"``.
        device: the torch device models and pooled tensors live on.
        xp: the array namespace of stage code (``cupy`` or ``numpy``).
        frame: the DataFrame library for tables (``cudf`` or ``pandas``).
        reason: why ``auto`` chose this backend (empty when the user chose).
    """

    name: Literal["cpu", "cuda"]
    device: torch.device
    xp: ModuleType
    frame: ModuleType
    reason: str = ""
    _modules: dict[str, ModuleType] = field(default_factory=dict, repr=False)

    @property
    def is_cuda(self) -> bool:
        return self.name == "cuda"

    def amp(self, requested: bool) -> bool:
        """Whether autocast (in :func:`amp_dtype`) runs here: ``requested`` (``train.amp``) and on CUDA."""
        return amp_enabled(self.device, requested)

    # --- estimators: identical constructor arguments on both devices -------------------
    def umap(self, **kwargs: Any) -> Any:
        """A UMAP estimator (cuML on CUDA, umap-learn on CPU) with ``kwargs``."""
        if self.is_cuda:
            from cuml.manifold import UMAP

            return UMAP(output_type="cupy", **kwargs)
        return ExactSmallBankUMAP(**kwargs)

    def kmeans(self, **kwargs: Any) -> Any:
        """A KMeans estimator (cuML on CUDA, scikit-learn on CPU) with ``kwargs``."""
        if self.is_cuda:
            from cuml.cluster import KMeans

            return KMeans(output_type="cupy", **kwargs)
        from sklearn.cluster import KMeans

        return KMeans(**kwargs)

    # --- zero-copy handoff ------------------------------------------------------------
    def from_torch(self, tensor: torch.Tensor) -> Any:
        """``tensor`` as an array of ``xp``, sharing its memory (DLPack; no copy).

        The tensor must live on ``self.device``; gradients are detached first because
        DLPack refuses tensors that require grad. On CPU, NumPy may return a read-only
        view: stage code treats handed-off arrays as inputs, never writes into them.
        """
        if tensor.device.type != self.device.type:
            raise GpualError(
                f"tensor is on {tensor.device} but the backend is {self.name}: move it with .to(backend.device) first",
                2,
            )
        return self.xp.from_dlpack(tensor.detach())

    def to_torch(self, array: Any) -> torch.Tensor:
        """An ``xp`` array as a torch tensor on ``self.device``, sharing memory (DLPack)."""
        return torch.from_dlpack(array)

    def to_host(self, array: Any) -> np.ndarray:
        """A NumPy copy of an ``xp`` array: the one device-to-host copy, for the manifest."""
        if self.is_cuda:
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def frame_to_host(self, table: Any) -> Any:
        """A pandas copy of a ``frame`` table (cuDF -> host); the table itself on CPU."""
        return table.to_pandas() if self.is_cuda else table

    def frame_dtypes(self, dtypes: dict[str, str]) -> dict[str, str]:
        """pandas column dtypes as ``frame`` spells them: cuDF names pandas' ``"string"``
        ``"str"`` (the parquet file written is the same)."""
        if not self.is_cuda:
            return dict(dtypes)
        return {column: ("str" if dtype == "string" else dtype) for column, dtype in dtypes.items()}

    def synchronize(self) -> None:
        """Wait for queued device work (timing); a no-op on CPU."""
        synchronize_device(self.device)
        if self.is_cuda:
            self.xp.cuda.get_current_stream().synchronize()

    def versions(self) -> dict[str, str]:
        """Library versions and machine, for benchmark JSON and reports."""
        info = {
            "backend": self.name,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        }
        if self.is_cuda:
            info["gpu"] = torch.cuda.get_device_name(self.device)
            for name, module in self._modules.items():
                info[name] = getattr(module, "__version__", "?")
        else:
            for name in ("sklearn", "umap", "pandas", "pyarrow"):
                try:
                    info[name] = importlib.import_module(name).__version__
                except ImportError:
                    info[name] = "missing"
        return info


class ExactSmallBankUMAP:
    """umap-learn's UMAP with a bounded transform cost whatever the memory bank's size.

    Below 4,096 training vectors umap-learn takes an exact path that computes every
    distance through its numba metric called once per pair from scikit-learn (about 2 us
    a pair: a 55k-region pool against a 3.7k-vector bank took 16 minutes on two cores).
    Here those distances come from scikit-learn's vectorised Euclidean distances and go to
    umap-learn's documented ``metric="precomputed"`` path, which then does exactly what the
    exact path does with them: the same kNN, graph and layout optimisation, as cuML's
    brute-force kNN does on the GPU. The transform runs in chunks of
    :data:`TRANSFORM_CHUNK` regions so its (chunk, bank) distance and sort arrays stay
    bounded. Larger banks go to umap-learn unchanged (its approximate NNDescent index).
    """

    SMALL = 4096  # umap-learn's own threshold for the exact path
    TRANSFORM_CHUNK = 16384

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._bank: np.ndarray | None = None  # kept for the transform's distances (small banks only)
        self.estimator: Any = None

    def fit(self, bank: np.ndarray) -> "ExactSmallBankUMAP":
        """Fit on (N, D) float32 bank vectors (host)."""
        import umap  # slow import (numba): only when a stage needs it
        from sklearn.metrics import pairwise_distances

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if len(bank) >= self.SMALL:
            self.estimator, self._bank = umap.UMAP(**self._kwargs).fit(bank), None
            return self
        self._bank = bank
        with warnings.catch_warnings():
            # The inverse transform, which precomputed input rules out, is never used.
            warnings.filterwarnings("ignore", message=".*inverse_transform will be unavailable.*")
            self.estimator = umap.UMAP(metric="precomputed", **self._kwargs).fit(pairwise_distances(bank))
        return self

    def transform(self, regions: np.ndarray) -> np.ndarray:
        """(R, D) float32 region embeddings -> (R, n_components) float32 layout points (host)."""
        from sklearn.metrics import pairwise_distances

        if self._bank is None:
            return self.estimator.transform(regions)
        regions = np.ascontiguousarray(regions, dtype=np.float32)
        parts = []
        with warnings.catch_warnings():
            # umap-learn reminds that precomputed input must be distances to the training set: it is.
            warnings.filterwarnings("ignore", message=".*precomputed metric.*")
            for start in range(0, len(regions), self.TRANSFORM_CHUNK):
                distances = pairwise_distances(regions[start:start + self.TRANSFORM_CHUNK], self._bank)
                parts.append(self.estimator.transform(self._nearest(distances)))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _nearest(self, distances: np.ndarray) -> Any:
        """(r, N) distances -> a sparse (r, N) matrix of each row's ``n_neighbors`` nearest.

        umap-learn reads only those from precomputed input (its documented sparse form),
        and would otherwise sort every full row: a quarter less transform time at a
        4,000-vector bank, the same points (benchmarks/umap_bank.py).
        """
        import scipy.sparse

        k = min(int(self._kwargs.get("n_neighbors", 15)), distances.shape[1])
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(distances, nearest, axis=1)
        return scipy.sparse.csr_matrix((values.ravel(), nearest.ravel(), np.arange(0, nearest.size + 1, k)),
                                       shape=distances.shape)

    def __getattr__(self, name: str) -> Any:
        """The fitted estimator's attributes (``embedding_``), or the constructor's arguments
        (``init``, ``n_neighbors``) before the fit."""
        if name.startswith("_") or name == "estimator":  # unpickling looks up attributes before __init__ ran
            raise AttributeError(name)
        if self.estimator is not None:
            return getattr(self.estimator, name)
        if name in self._kwargs:
            return self._kwargs[name]
        raise AttributeError(name)


def synchronize_device(device: torch.device) -> None:
    """Wait for queued torch work on ``device`` (stage timings); a no-op on CPU.

    For code that holds a torch device but no :class:`Backend` (pooling on a Dask worker,
    benchmarks); :meth:`Backend.synchronize` adds CuPy's stream.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_enabled(device: torch.device, requested: bool) -> bool:
    """The one AMP rule: autocast only on CUDA, in :func:`amp_dtype`, with loss scaling in
    training where :func:`amp_loss_scaling` says so.

    For code that holds a torch device but no :class:`Backend` (training, evaluation, a
    Dask worker's forward); :meth:`Backend.amp` is the same rule.
    """
    return bool(requested) and device.type == "cuda"


@functools.cache
def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bfloat16 on a CUDA device with native bf16 (Ampere
    and later), float16 elsewhere. bfloat16 keeps float32's exponent range, so it needs no
    loss scaling, and training then runs without the GradScaler, whose inf check would make
    every step wait for the device."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def amp_loss_scaling(device: torch.device, requested: bool) -> bool:
    """Whether training scales the loss (``torch.amp.GradScaler``): AMP in float16 only."""
    return amp_enabled(device, requested) and amp_dtype(device) == torch.float16


def _no_cuda(asked: str) -> GpualError:
    return GpualError(
        f"--device {asked} was asked for but torch sees no CUDA device "
        f"(torch {torch.__version__}): run with --device cpu, or install a CUDA build of torch on a GPU machine",
        2,
    )


def _unknown_device(asked: str) -> GpualError:
    return GpualError(f"--device {asked!r} is not one of cpu, cuda, auto", 2)


def resolve_device(name: DeviceName | str = "auto") -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:K``) or ``auto`` -> a torch device, for the stages that
    need torch only (training, evaluation, the annotator's predictions).

    Unlike :func:`get_backend`, CUDA does not require RAPIDS here; ``auto`` is CUDA when
    torch sees a GPU. Asking for CUDA without one raises GpualError (exit 2).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise _no_cuda(name)
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GpualError(f"--device {name}: torch sees only {torch.cuda.device_count()} CUDA device(s)", 2)
        return device
    raise _unknown_device(name)


def cpu_backend(reason: str = "") -> Backend:
    """The CPU twin: NumPy, umap-learn, scikit-learn, pandas."""
    import pandas

    return Backend(name="cpu", device=torch.device("cpu"), xp=np, frame=pandas, reason=reason)


def cuda_backend() -> Backend:
    """The CUDA backend; :class:`GpualError` (exit 2) if CUDA or RAPIDS is missing."""
    if not torch.cuda.is_available():
        raise _no_cuda("cuda")
    try:
        modules = _import_rapids()
    except ImportError as exc:
        raise GpualError(
            f"--device cuda needs CuPy, cuML and cuDF but importing {exc} failed: "
            "install the gpu extra (pip install 'gpual[gpu]') or use a RAPIDS container, or run with --device cpu",
            2,
        ) from None
    return Backend(
        name="cuda",
        device=torch.device("cuda", torch.cuda.current_device()),
        xp=modules["cupy"],
        frame=modules["cudf"],
        _modules=modules,
    )


def get_backend(device: DeviceName | str = "auto") -> Backend:
    """Resolve ``--device cpu|cuda|auto`` to a :class:`Backend`.

    ``auto`` picks CUDA when torch sees a GPU and CuPy, cuML and cuDF import, otherwise
    the CPU twin, and says why in ``Backend.reason``.
    """
    if device == "cpu":
        return cpu_backend()
    if device == "cuda":
        return cuda_backend()
    if device != "auto":
        raise _unknown_device(device)
    if not torch.cuda.is_available():
        return cpu_backend("no CUDA device visible to torch")
    try:
        return cuda_backend()
    except GpualError as exc:
        return cpu_backend(f"CUDA present but RAPIDS missing ({exc})")
