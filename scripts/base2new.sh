#!/usr/bin/env bash
# Base-to-new generalisation (CoCoOp's protocol): sort the labels, the first ceil(K/2) classes are "base",
# the rest "new"; train the prompt on the base classes only (without --methods: the CoOp row of CoCoOp's table,
# CoOp's vit_b16_ctxv1 = M 4 from "a photo of a", run folder coop_init-a-photo-of-a; --methods coop,cocoop
# names CoOp's own setting and CoCoOp), then
# test on base and on new separately; the report gives base, new and their harmonic mean H per dataset (and
# zero-shot CLIP on the same halves).
#
# Usage: bash scripts/base2new.sh --dataset eurosat --data-root ../shared/data [options]
#
# Runs: RUNS/<dataset>/base2new/<method>/shots<K>_seed<S>/ (train on base; metrics_base.json and
# metrics_new.json; the new-class classifier is built from the learned context with the new class names)
# and RUNS/<dataset>/base2new/zeroshot/metrics_{base,new}.json.
#
#   --dataset LIST       dataset name(s), comma-separated or repeated                   [required]
#   --data-root DIR      CoOp-style $DATA folder (not needed with --no-encode)
#   --shots LIST         shots per class (16, as CoCoOp)
#   --seeds LIST         seeds (1,2,3)
#   --model NAME         open_clip model (RN50; CoCoOp used ViT-B-16)
#   --pretrained TAG     open_clip tag, local checkpoint file, or none (openai)
#   --views N            augmented views per few-shot train image (16)
#   --methods LIST       coop, cocoop, or CoOp variants (default: coop_init-a-photo-of-a, CoCoOp's CoOp row;
#                        unified context only: a class-specific context cannot be
#                        used for new classes); also --n-ctx M, --position P, --ctx-init WORDS
#   --no-zeroshot        leave out zero-shot CLIP
#   --cache DIR          feature cache (cache)
#   --runs DIR           runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto        runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --epochs N           override the epochs for quick tries
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options
#   --no-encode          do not call `coopipe encode`
#   --no-report          skip the report
#
# Finished runs are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --no-fewshot --base2new --zeroshot --shots 16 "$@"
