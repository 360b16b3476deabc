#!/usr/bin/env bash
# Run one DVC stage script (stages/NAME.py) with the project's Python, however DVC was started:
# $COOPIPE_PYTHON if set, else .venv/bin/python (made by scripts/bootstrap.sh), else python3 on PATH.
# Usage (from dvc.yaml): bash scripts/stage.sh NAME [stage arguments...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${COOPIPE_PYTHON:-}"
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
name=$1
shift
exec "$py" "$root/stages/$name.py" "$@"
