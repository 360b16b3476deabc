#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything coopipe needs.
# Idempotent: does nothing when .venv already matches pyproject.toml and constraints.txt.
# torch is pinned by constraints.txt to the CPU build (without the pin pip pulls a multi-GB CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COOPIPE_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp_now=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.coopipe-stamp" 2>/dev/null)" = "$stamp_now" ]; then
  exit 0
fi
echo "bootstrap: creating $VENV (one-time, about a minute)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import coopipe, zarr, faiss, dask, distributed, h5py, typer, dvc" \
  || { echo "bootstrap: install failed (see pip output above)" >&2; exit 1; }
echo "$stamp_now" > "$VENV/.coopipe-stamp"
