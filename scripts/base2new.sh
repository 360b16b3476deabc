#!/usr/bin/env bash
# Base-to-new generalisation (CoCoOp's protocol): sort the labels, the first ceil(K/2) classes are "base",
# the rest "new"; train CoOp on the base classes only, then test on base and on new separately; the report
# gives base, new and their harmonic mean H per dataset (and zero-shot CLIP on the same halves).
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
#   --n-ctx M, --position P, --ctx-init WORDS, --variants LIST   the CoOp variant (unified context only:
#                        a class-specific context cannot be used for new classes)
#   --no-zeroshot        leave out zero-shot CLIP
#   --cache DIR          feature cache (cache)
#   --runs DIR           runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto        runs in parallel (auto: one 1-thread run per core, up to 2 per core when that ends the grid in one round)
#   --epochs N           override the epochs for quick tries
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options
#   --no-encode          do not call `coopipe encode`
#   --no-report          skip the report
#
# Finished runs are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/grid.sh"

ZEROSHOT=1 shots_given=0
for arg in "$@"; do if [[ $arg == --shots ]]; then shots_given=1; fi; done
cp_parse_common "$@"
((shots_given)) || CP_SHOTS=16
for arg in "${CP_REST[@]}"; do
  case $arg in
    -h|--help) cp_usage "$0"; exit 0 ;;
    --no-zeroshot) ZEROSHOT=0 ;;
    *) cp_die "unknown option '$arg' (see --help)" ;;
  esac
done
((${#CP_DATASETS[@]})) || cp_die "--dataset is required (see --help)"
while IFS= read -r spec; do
  [[ $(cp_spec_get "$spec" csc) == 0 ]] || cp_die "base-to-new needs a unified context: drop --csc / csc variants"
done < <(cp_variant_specs)
cp_require_data_root

plan() {
  local ds=$1 run
  if ((ZEROSHOT)); then
    run="$CP_RUNS/$ds/base2new/zeroshot"
    cp_job "zeroshot $ds base/new" "$run" "$run/metrics_base.json" "$run/metrics_new.json" -- zeroshot_halves "$ds" "$run"
  fi
  cp_each_coop_run base2new_job "$ds"
}

base2new_job() {  # base2new_job DATASET SPEC LABEL SHOTS SEED: train on base, test on base and on new
  local ds=$1 spec=$2 label=$3 shots=$4 seed=$5
  local run="$CP_RUNS/$ds/base2new/$label/shots${shots}_seed${seed}"
  cp_job "$label $ds base2new ${shots}-shot seed $seed" "$run" "$run/metrics_base.json" "$run/metrics_new.json" -- \
    cp_coop_run "$ds" "$shots" "$seed" "$run" "$spec" base
}

zeroshot_halves() {
  local ds=$1 run=$2 classes
  for classes in base new; do
    "$COOPIPE" zeroshot --features "$CP_CACHE" --dataset "$ds" --out "$run" --model "$CP_MODEL" \
      --pretrained "$CP_PRETRAINED" --classes "$classes" || return
  done
}

cp_run_all plan cp_encode_fewshot
