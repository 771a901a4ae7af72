"""Shared fixtures and the loud skipping of `gpu` / `rapids` tests where those are absent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"

HAS_CUDA = torch.cuda.is_available()
MISSING_RAPIDS = [m for m in ("cupy", "cuml", "cudf") if importlib.util.find_spec(m) is None]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"gpual: torch {torch.__version__}, CUDA {'available' if HAS_CUDA else 'NOT available'}"]
    if MISSING_RAPIDS:
        lines.append(f"gpual: RAPIDS missing ({', '.join(MISSING_RAPIDS)}): tests marked `rapids` are SKIPPED")
    if not HAS_CUDA:
        lines.append("gpual: tests marked `gpu` are SKIPPED (no CUDA device); run `pytest -m 'gpu or rapids'` on a GPU box")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    skip_rapids = pytest.mark.skip(reason=f"needs RAPIDS: {', '.join(MISSING_RAPIDS)} not importable")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "rapids" in item.keywords and MISSING_RAPIDS:
            item.add_marker(skip_rapids)


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The real CamVid folder beside the checkout (skips where it is absent)."""
    if not (CAMVID / "train" / "images").is_dir():
        pytest.skip(f"real CamVid not found at {CAMVID}")
    return CAMVID
