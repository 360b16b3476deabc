#!/usr/bin/env bash
# Run the tests (creating .venv first if needed). Two tiers:
#   bash scripts/test.sh          the fast tier: every test not marked `slow` (run it after each change)
#   bash scripts/test.sh --all    everything, the slow tests too, with the 25 slowest listed (what .ci/run runs)
# Other arguments go to pytest, e.g. `bash scripts/test.sh tests/test_report.py -x`.
# Both tiers run in two pytest-xdist worker processes (most tests use one core), each test file whole on one worker
# so that its module fixtures are built once; COOPIPE_TEST_WORKERS=N sets the number (0: one process, for --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONHASHSEED=0
workers=(-n "${COOPIPE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
if [[ ${1:-} == --all ]]; then
  shift
  exec .venv/bin/python -m pytest "${workers[@]}" -q --durations=25 "$@"
fi
exec .venv/bin/python -m pytest "${workers[@]}" -m "not slow" "$@"
