#!/usr/bin/env bash
# The CPU side of a lent-GPU session: everything benchmarks/gpu_session.sh needs, made here
# (where PyPI and ../shared are reachable) into the git-ignored .devdata/, in pieces that
# fit the device tool's 64 MiB per call.
#
#   benchmarks/gpu_prepare.sh [CAMVID]        # default ../shared/datasets/camvid
#
# Writes:
#   .devdata/parts/part.NN   cuML + cuDF (RAPIDS 26.10, CUDA 13, Python 3.12) in 60 MiB parts
#                            (../shared/tools/rapids-wheel-parts.sh), one per call
#   .devdata/wheels/         gpual's pure-Python dependencies the box lacks (Python 3.12)
#   .devdata/camvid/         CamVid train + val (images and labels)
#   .devdata/ws/             a cpu-small workspace on it with its superpixels computed here
#                            (fast-slic is not built on the box)
#   .devdata/ws-paper/       a paper-preset workspace (ResNet-50, 360x480) with its superpixels,
#                            random initial weights (the box cannot download ImageNet's; the
#                            timing of a round does not depend on them)
# Then, on the device: carry one part per call (`carry: [".devdata/parts/part.00"]`, ...),
# and in the last call carry .devdata/wheels, .devdata/camvid and .devdata/ws and run
# `benchmarks/gpu_session.sh` (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
camvid=${1:-../shared/datasets/camvid}
py=.venv/bin/python
mkdir -p .devdata
[ -d .devdata/parts ] || ../shared/tools/rapids-wheel-parts.sh .devdata/parts
rm -rf .devdata/wheels && mkdir -p .devdata/wheels
# Pure-Python packages (and dask-cuda for `--gpus`); the box has torch, CuPy, NumPy,
# scikit-learn, pandas, pyarrow, OpenCV and numba.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .devdata/wheels \
  typer click rich markdown-it-py mdurl pygments shellingham typing-extensions starlette anyio sniffio idna \
  uvicorn h11 tomli-w array-api-compat dask distributed cloudpickle fsspec partd locket toolz zict tblib \
  sortedcontainers msgpack psutil tornado pyyaml jinja2 markupsafe importlib-metadata zipp packaging \
  dask-cuda==26.10.* pynvml nvidia-ml-py
rm -rf .devdata/camvid && mkdir -p .devdata/camvid
cp -r "$camvid/train" "$camvid/val" .devdata/camvid/
rm -rf .devdata/ws
.venv/bin/gpual init .devdata/ws --data .devdata/camvid --dataset camvid --preset cpu-small
.venv/bin/gpual superpixels .devdata/ws
rm -rf .devdata/ws-paper
.venv/bin/gpual init .devdata/ws-paper --data .devdata/camvid --dataset camvid --preset paper --set model.backbone_weights=
.venv/bin/gpual superpixels .devdata/ws-paper
du -sh .devdata/parts .devdata/wheels .devdata/camvid .devdata/ws .devdata/ws-paper
