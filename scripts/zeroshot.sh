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
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --no-fewshot --zeroshot --no-report "$@"
