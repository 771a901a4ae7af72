"""Shared helpers of the benchmark scripts: machine description, timers, peak memory, JSON results.

Every benchmark writes ``benchmarks/results/<name>-<backend>-<YYYYmmdd-HHMMSS>.json`` with a
``machine`` section (no host name: results are meant to be committed and compared) and
prints a table of its scalar results.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import time
from pathlib import Path
from types import TracebackType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Import name -> distribution the version is reported under.
_PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "cv2": "opencv",
    "fast_slic": "fast-slic",  # no __version__: read from the installed distribution
    "sklearn": "scikit-learn",
    "umap": "umap-learn",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "cupy": "cupy",
    "cuml": "cuml",
    "cudf": "cudf",
}
_DISTRIBUTIONS = {"fast_slic": "fast-slic"}


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and cores, RAM (GiB), Python and library versions, GPU name."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "gpual_commit": _source_commit(),
        "versions": {},
    }
    for module_name, label in _PACKAGES.items():
        version = _version(module_name)
        if version is not None:
            info["versions"][label] = version
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def _source_commit() -> str | None:
    """The git commit of the checkout the benchmark runs from (+ "-dirty" with local changes), or None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _version(module_name: str) -> str | None:
    """A package's version if it imports (heavy imports happen only once per process)."""
    if module_name in _DISTRIBUTIONS:
        from importlib import metadata

        try:
            return metadata.version(_DISTRIBUTIONS[module_name])
        except metadata.PackageNotFoundError:
            return None
    try:
        module = importlib.import_module(module_name)
    except Exception:  # absent, or a GPU package that fails to initialise without a GPU
        return None
    return str(getattr(module, "__version__", "unknown"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory in MiB: this process's peak plus the largest finished child's
    (``ru_maxrss`` of RUSAGE_SELF + RUSAGE_CHILDREN, KiB on Linux): an upper bound of the
    peak while both ran."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


class DeviceMemoryPeak:
    """``with DeviceMemoryPeak(device) as m: ...`` then ``m.peak_mb``: the peak of the device's
    used memory (``cudaMemGetInfo``: total - free) above its level at entry, in MiB.

    Every allocator counts (torch's caching allocator, CuPy's pool, cuML's RMM), which
    per-library peaks miss. A thread samples every ``interval`` seconds, so allocations
    shorter than that can be missed; the level includes other processes on the GPU.
    """

    def __init__(self, device: Any, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self._stop: Any = None
        self._thread: Any = None

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> "DeviceMemoryPeak":
        import threading

        base = self._used()
        peak = [base]
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                peak[0] = max(peak[0], self._used())
                self._stop.wait(self.interval)

        self._base, self._peak = base, peak
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._peak[0] = max(self._peak[0], self._used())
        self.peak_mb = (self._peak[0] - self._base) / 2**20


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall time, perf_counter)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._start


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON to benchmarks/results/<name>-<backend>-<timestamp>.json and print it.

    ``backend`` is ``payload["backend"]`` or ``payload["device"]`` when present, else ``cpu``.
    """
    backend = str(payload.get("backend") or payload.get("device") or "cpu")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{backend}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    print_table(name, payload)
    print(f"wrote {path}")
    return path


def print_table(title: str, payload: dict[str, Any]) -> None:
    """A rich table of the payload's scalar leaves (nested keys joined with '.'); the machine section is skipped."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in _flatten(payload):
        if key.startswith("machine."):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [item for k, v in obj.items() for item in _flatten(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj) and len(obj) <= 8:
            return [(prefix[:-1], ", ".join(map(str, obj)))]
        return [item for i, v in enumerate(obj) for item in _flatten(v, f"{prefix}{i}.")]
    return [(prefix[:-1], obj)]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
