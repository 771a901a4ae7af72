"""Shared fixtures and the loud skipping of `gpu` / `rapids` tests where those are absent."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"

HAS_CUDA = torch.cuda.is_available()
MISSING_RAPIDS = [m for m in ("cupy", "cuml", "cudf") if importlib.util.find_spec(m) is None]
# Debian's Chromium (`apt-get install -y chromium`); playwright's own browser download is not used.
CHROMIUM = Path(os.environ.get("GPUAL_CHROMIUM", "/usr/bin/chromium"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"gpual: torch {torch.__version__}, CUDA {'available' if HAS_CUDA else 'NOT available'}"]
    if MISSING_RAPIDS:
        lines.append(f"gpual: RAPIDS missing ({', '.join(MISSING_RAPIDS)}): tests marked `rapids` are SKIPPED")
    if not HAS_CUDA:
        lines.append("gpual: tests marked `gpu` are SKIPPED (no CUDA device); run `pytest -m 'gpu or rapids'` on a GPU box")
    if not CHROMIUM.exists():
        lines.append(f"gpual: no Chromium at {CHROMIUM}: tests marked `browser` are SKIPPED (apt-get install -y chromium)")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    skip_rapids = pytest.mark.skip(reason=f"needs RAPIDS: {', '.join(MISSING_RAPIDS)} not importable")
    skip_browser = pytest.mark.skip(reason=f"needs Chromium at {CHROMIUM}: apt-get install -y chromium, or set GPUAL_CHROMIUM")
    for item in items:
        if "browser" in item.keywords and not CHROMIUM.exists():
            item.add_marker(skip_browser)
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


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's launch arguments, pointed at Debian's Chromium (no sandbox: CI runs as root)."""
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": ["--no-sandbox"]}
