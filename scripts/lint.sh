#!/usr/bin/env bash
# Lint and type checks (ruff on the tree, mypy on the library), as .ci/run runs them. Creates .venv if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check --quiet pipeline stages tests benchmarks cli.py
.venv/bin/mypy --no-error-summary
echo "lint: ruff and mypy passed"
