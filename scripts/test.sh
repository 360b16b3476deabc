#!/usr/bin/env bash
# Run the test suite (creating .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONHASHSEED=0
exec .venv/bin/python -m pytest "$@"
