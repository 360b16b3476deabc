#!/usr/bin/env bash
# The paper's few-shot experiment in one command: encode once, then zero-shot CLIP, linear probe and the
# CoOp grid (shots x seeds x variants), each run evaluated, then the report (tables + Figures 3 and 4).
#
# Usage: bash scripts/paper_grid.sh --dataset eurosat --data-root ../shared/data --pretrained none \
#            --shots 1,16 --seeds 1,2,3
#
#   --dataset LIST       dataset name(s), comma-separated or repeated                   [required]
#   --data-root DIR      CoOp-style $DATA folder (not needed with --no-encode)
#   --model NAME         open_clip model (RN50)
#   --pretrained TAG     open_clip tag, local checkpoint file, or none for random weights (openai)
#   --views N            augmented views per few-shot train image (16)
#   --shots LIST         shots per class (1,2,4,8,16)
#   --seeds LIST         seeds (1,2,3)
#   --variants LIST      CoOp variants: tokens joined by "_" from coop, csc, end|middle|front, m<N>, init
#                        (coop = the paper's default: unified context, class token at the end, M = 16);
#                        e.g. coop,csc,middle,m4,m8 (default: coop, or the variant flags below)
#   --csc, --position P, --n-ctx M, --ctx-init WORDS   one variant by flags instead of --variants
#   --no-zeroshot        leave out zero-shot CLIP
#   --no-linear-probe    leave out the linear probe
#   --cache DIR          feature cache (cache)
#   --runs DIR           runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto        runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --epochs N           override CoOp's epochs for quick tries (results go to runs-ep<N>)
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options
#   --encode-shots LIST  shots to encode for (default: the grid's plus the paper's up to the largest)
#   --encode-args "..."  extra `coopipe encode` options, e.g. "--workers 4 --batch-size 128"
#   --no-encode          do not call `coopipe encode` (the cache is ready)
#   --no-report          skip the report
#
# Re-running does no work once everything is finished (no encode, no model load; the report is rewritten
# only when a result changed). Killed mid-grid, a re-run completes only the missing runs (interrupted ones
# resume from their checkpoint). Runs are locked (flock -n <run>.lock), so two copies can share the grid;
# a failed run does not stop the others and is listed at the end (exit code 1).
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --zeroshot --linear-probe "$@"
