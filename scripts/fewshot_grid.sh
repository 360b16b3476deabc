#!/usr/bin/env bash
# CoOp few-shot grid: datasets x shots x seeds (x variants), trained and evaluated on the feature cache.
#
# Usage: bash scripts/fewshot_grid.sh --dataset eurosat --data-root ../shared/data [options]
#
# Encodes each dataset once (all shots and seeds of the grid in one `coopipe encode`; a no-op when the
# stores exist), then trains and evaluates every missing run into RUNS/<dataset>/<method>/shots<K>_seed<S>/
# (method = coop for the default variant, e.g. coop_csc_middle, coop_m8 otherwise).
#
# Data and model:
#   --dataset LIST        dataset name(s), comma-separated or repeated (see `coopipe datasets`)   [required]
#   --data-root DIR       CoOp-style $DATA folder (not needed with --no-encode)
#   --model NAME          open_clip model (RN50)
#   --pretrained TAG      open_clip tag, local checkpoint file, or none for random weights (openai)
#   --views N             augmented views per few-shot train image in the cache (16)
#   --cache DIR           feature cache (cache)
#   --encode-shots LIST   shots to encode for (default: the grid's shots plus the paper's up to the largest,
#                         so every script shares one store)
#   --encode-args "..."   extra `coopipe encode` options, e.g. "--workers 4 --batch-size 128"
#   --no-encode           do not call `coopipe encode` (the cache is ready)
# Grid:
#   --shots LIST          shots per class (1,2,4,8,16)
#   --seeds LIST          seeds (1,2,3)
#   --runs DIR            runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto         runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --epochs N            override CoOp's epochs (50/100/100/200/200 by shots) for quick tries; results go to
#                         runs-ep<N> unless --runs is given, so they never mix with real runs
#   --device DEV          cpu or cuda (cpu)
#   --train-args "..."    extra `coopipe train` options, e.g. "--bf16 --batch-size 32"
#   --report              also write the report (RUNS/report) at the end
# Variant (one):
#   --csc                 class-specific context
#   --position P          class token position: end, middle, front (end)
#   --n-ctx M             context length (16)
#   --ctx-init WORDS      initialise the context from words, e.g. "a photo of a" (sets M)
# Variants (several): --variants LIST, names made of tokens joined by "_": coop (default), csc,
#   end|middle|front, m<N>, init; e.g. --variants coop,csc,middle,csc_middle,m4,m8
#
# Runs whose metrics.json exists are skipped; each run holds `flock -n <run>.lock` while it trains, and runs
# locked by another process are skipped, so two copies of this script can share a grid. A failed run is
# logged (<run>/log.txt) and the grid goes on; a summary lists failures at the end (exit code 1 if any).
# Interrupted runs resume from their last checkpoint when the command is run again.
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --no-report "$@"
