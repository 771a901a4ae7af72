#!/usr/bin/env bash
# Installs gpual and everything it needs into ./.venv on a machine with Python >= 3.11.
# Idempotent: a second run with unchanged pyproject/constraints returns at once.
#   PYTHON=python3.11 ./install.sh      # choose the interpreter
#   GPUAL_VENV=/opt/venv ./install.sh   # choose the environment folder
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
venv=${GPUAL_VENV:-.venv}
stamp="$venv/.gpual-install"
want=$(cat pyproject.toml constraints.txt install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt)
echo "gpual: installing torch, torchvision and the build tools (pinned in constraints.txt) ..."
"${pip[@]}" torch torchvision numpy cython "setuptools>=64" wheel
# fast-slic 0.4.0 ships only an sdist whose isolated build fetches an old Cython and
# fails; build it against this environment's Cython and NumPy instead.
echo "gpual: building fast-slic ..."
"${pip[@]}" --no-build-isolation fast-slic
echo "gpual: installing gpual and its dependencies ..."
"${pip[@]}" --no-build-isolation -e ".[dev]"
echo "$want" > "$stamp"
echo "gpual: ready ($venv/bin/gpual)"
