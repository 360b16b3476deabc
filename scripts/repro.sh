#!/usr/bin/env bash
# Run the whole pipeline with DVC on params.yaml (creating .venv first if needed), then print the headline tables
# of the report and its path.
# Without arguments: `dvc repro`. With `-S key=value` (DVC's --set-param) anywhere in the arguments:
# `dvc exp run -S ...`, which applies the values to params.yaml and runs the pipeline as an experiment, e.g.
#   bash scripts/repro.sh -S model.pretrained=none      # random weights: runs offline
# Other arguments go to dvc unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DVC_NO_ANALYTICS=1 PATH="$PWD/.venv/bin:$PATH"
run=(dvc repro)
for arg in "$@"; do
  case $arg in
    -S|--set-param|--set-param=*) run=(dvc exp run) ;;
  esac
done
"${run[@]}" "$@"
echo
bash scripts/stage.sh report --params params.yaml --show
