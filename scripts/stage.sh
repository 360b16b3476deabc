#!/usr/bin/env bash
# Run one DVC stage script (stages/NAME.py) with the project's Python, however DVC was started:
# $COOPIPE_PYTHON if set, else .venv/bin/python (made by scripts/bootstrap.sh), else, inside a DVC experiment's
# temporary copy (<workspace>/.dvc/tmp/exps/..., made by `dvc exp run --queue/--temp`, which holds no .venv),
# the workspace's .venv/bin/python, else python3 on PATH. The copy's own pipeline/ comes first on PYTHONPATH, so
# the stage runs the library of the commit it was started from.
# Usage (from dvc.yaml): bash scripts/stage.sh NAME [stage arguments...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${COOPIPE_PYTHON:-}"
if [[ -z $py ]]; then
  workspace=${root%%/.dvc/tmp/exps/*}
  if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python
  elif [[ -x $workspace/.venv/bin/python ]]; then py=$workspace/.venv/bin/python
  else py=python3; fi
fi
export PYTHONPATH="$root/pipeline${PYTHONPATH:+:$PYTHONPATH}"
name=$1
shift
exec "$py" "$root/stages/$name.py" "$@"
