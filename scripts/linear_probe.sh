#!/usr/bin/env bash
# Linear-probe CLIP baseline: logistic regression on the few-shot features, C searched on the few-shot val split.
#
# Usage: bash scripts/linear_probe.sh --dataset eurosat --data-root ../shared/data [options]
#
# Encodes each dataset once for all shots and seeds (the same stores as the CoOp grid) and writes
# RUNS/<dataset>/linear_probe/shots<K>_seed<S>/metrics.json.
#
#   --dataset LIST     dataset name(s), comma-separated or repeated                     [required]
#   --data-root DIR    CoOp-style $DATA folder (not needed with --no-encode)
#   --shots LIST       shots per class (1,2,4,8,16)
#   --seeds LIST       seeds (1,2,3)
#   --model NAME       open_clip model (RN50)
#   --pretrained TAG   open_clip tag, local checkpoint file, or none (openai)
#   --views N          augmented views per train image in the cache, for sharing the CoOp store (16)
#   --cache DIR        feature cache (cache)
#   --runs DIR         runs folder (runs)
#   --jobs N|auto      runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --device DEV       cpu or cuda, for encoding (cpu)
#   --no-encode        do not call `coopipe encode`
#   --report           also write the report (RUNS/report)
#
# Finished runs are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --no-fewshot --linear-probe --no-report "$@"
