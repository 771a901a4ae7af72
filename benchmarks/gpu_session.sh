#!/usr/bin/env bash
# One prepared run on a lent GPU box, from a fresh machine, in one call after the RAPIDS
# wheel parts are carried (benchmarks/gpu_prepare.sh makes them and the data). Everything
# it measures goes to $OUT as it is made: steps.tsv (step, exit code, seconds), one log per
# step, and every JSON a benchmark writes. Budget: about 8 minutes, so that a session with
# 15 device minutes can run it once and rerun once.
#
#   # calls 1..N-1 carry one part each:  carry [".devdata/parts/part.00"] ... command "mkdir -p /tmp/parts && cp .devdata/parts/* /tmp/parts/"
#   # the last call:
#   carry [".devdata/parts/part.12", ".devdata/wheels", ".devdata/camvid", ".devdata/ws"]
#   command "cp .devdata/parts/* /tmp/parts/ 2>/dev/null; PARTS=/tmp/parts benchmarks/gpu_session.sh"
#
# NOT RUN YET on a GPU (written 2026-12-02 in a session without one): its steps are the
# commands the GPU sessions of 2026-11-25/26 ran by hand (benchmarks/results/gpu-*.md),
# put in one script. Step times below are those sessions' measurements where there are any;
# replace them with this script's steps.tsv after its first run.
#   install      join + pip --target             ~10 s (H200, 2026-11-26)
#   gpu tests    pytest -m "gpu or rapids"       ~41 s
#   train step   ResNet-50 360x480 / ResNet-18   ~40 s (not timed as one step before)
#   run          2 CamVid rounds + --final       ~90 s (3 rounds took 93 s on an H100)
#   select       acquisition.py real pool        ~30 s
#   sweep 4M     acquisition.py --sweep 4000000  ~60 s
#   dask         select --gpus 1                 unknown (never run)
#   select cmd   select_command.py, 3 repeats    unknown (never run; the whole command, its parts)
#   paper round  run ws-paper --rounds 1         unknown (never run; 20 epochs of ResNet-50 at 360x480)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT (the device tool does)}
PARTS=${PARTS:-/tmp/parts}
SITE=/tmp/site
mkdir -p "$OUT" "$SITE"
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, time, copy new results to $OUT
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  cp -n benchmarks/results/*.json benchmarks/results/*.png "$OUT/" 2>/dev/null || true
  return 0  # a failed step must not stop the others
}

install() {
  if ! python3 -c "import cuml, cudf" 2>/dev/null; then
    mkdir -p /tmp/w && cat "$PARTS"/part.* | tar -x -C /tmp/w
    python3 -m pip install -q --no-index --no-deps --target "$SITE" /tmp/w/*.whl
  fi
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .devdata/wheels/*.whl
  python3 -c "import cuml, cudf, torch; print('cuml', cuml.__version__, 'cudf', cudf.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Every folder of the carried wheels that holds shared libraries (nvJitLink among them).
LD_LIBRARY_PATH="$(find "$SITE" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
gpual() { python3 -c 'import sys; from cli.main import main; sys.argv[0] = "gpual"; main()' "$@"; }

# The workspace was made on the CPU machine: point it at this box's copy of the data.
sed -i "s|^root = .*|root = \"$PWD/.devdata/camvid\"|" .devdata/ws/gpual.toml .devdata/ws-paper/gpual.toml

step install 120 install
step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or rapids" \
  tests/test_gpu_parity.py tests/test_handoff.py tests/test_loading.py
step train-step-r50 90 python3 benchmarks/train_step.py --device cuda --amp --backbone resnet50 --size 360x480 --batch 8 --steps 20
step train-step-r18 60 python3 benchmarks/train_step.py --device cuda --amp --backbone resnet18 --size 180x240 --batch 16 --steps 20
step run 200 gpual run .devdata/ws --rounds 2 --final --device cuda
for r in .devdata/ws/rounds/*; do cp "$r/metrics.json" "$OUT/metrics-$(basename "$r").json" 2>/dev/null; done
step select-real-pool 90 python3 benchmarks/acquisition.py --workspace .devdata/ws --round 1 --device cuda --sweep "" --repeats 3
step sweep-4M 120 python3 benchmarks/acquisition.py --sweep 4000000 --device cuda --repeats 1
step select-command 90 python3 benchmarks/select_command.py --workspace .devdata/ws --round 2 --device cuda --repeats 3
step dask-gpus-1 120 gpual select .devdata/ws --round 2 --device cuda --gpus 1
# A paper-preset round: select (random) + label + 20 epochs + evaluate; its parts are in
# the round's metrics.json (acquisition.timings_s, training.seconds and images_per_second).
step paper-round 150 gpual run .devdata/ws-paper --rounds 1 --device cuda
cp .devdata/ws-paper/rounds/000/metrics.json "$OUT/metrics-paper-000.json" 2>/dev/null
cat "$OUT/steps.tsv"
