#!/usr/bin/env bash
# Run the whole pipeline with `dvc repro` on params.yaml (creating .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DVC_NO_ANALYTICS=1 PATH="$PWD/.venv/bin:$PATH"
exec dvc repro "$@"
