#!/usr/bin/env bash
# Zero-shot CLIP baseline (the dataset's hand-crafted prompt) on the cached test features.
#
# Usage: bash scripts/zeroshot.sh --dataset eurosat[,dtd,...] --data-root ../shared/data [options]
#
# Encodes only the test split of each dataset (shared with the few-shot scripts: same store) and writes
# RUNS/<dataset>/zeroshot/metrics.json (RUNS/<dataset>/zeroshot_ensemble/ with --ensemble).
#
#   --dataset LIST     dataset name(s), comma-separated or repeated                     [required]
#   --data-root DIR    CoOp-style $DATA folder (not needed with --no-encode)
#   --model NAME       open_clip model (RN50)
#   --pretrained TAG   open_clip tag, local checkpoint file, or none (openai)
#   --cache DIR        feature cache (cache)
#   --runs DIR         runs folder (runs)
#   --ensemble         prompt ensembling over CLIP's 80 ImageNet templates instead of the hand-crafted prompt
#   --jobs N|auto      datasets in parallel (auto)
#   --device DEV       cpu or cuda, for encoding (cpu)
#   --no-encode        do not call `coopipe encode`
#   --report           also write the report (RUNS/report)
#
# Finished datasets are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/grid.sh"

CP_REPORT=0 ENSEMBLE=""
cp_parse_common "$@"
for arg in "${CP_REST[@]}"; do
  case $arg in
    -h|--help) cp_usage "$0"; exit 0 ;;
    --ensemble) ENSEMBLE=--ensemble ;;
    --report) CP_REPORT=1 ;;
    *) cp_die "unknown option '$arg' (see --help)" ;;
  esac
done
((${#CP_DATASETS[@]})) || cp_die "--dataset is required (see --help)"
cp_require_data_root

plan() { cp_zeroshot_jobs "$1" $ENSEMBLE; }
encode_test() { cp_encode "$1" --split test; }

cp_run_all plan encode_test
