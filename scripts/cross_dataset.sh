#!/usr/bin/env bash
# Cross-dataset transfer: learn a CoOp prompt on a source dataset (ImageNet in the papers) and evaluate it on
# other datasets' test splits; each target's classifier is built from the learned context with the target's
# class names through the text encoder (`coopipe eval RUN --dataset T --transfer`).
#
# Usage: bash scripts/cross_dataset.sh --source imagenet --targets caltech101,dtd,eurosat \
#            --data-root ../shared/data [options]
#
# Source runs are the ordinary few-shot runs RUNS/<source>/<method>/shots<K>_seed<S>/ (shared with the
# few-shot grid); transfer results go to <run>/transfer/<target>/metrics.json; zero-shot CLIP is run on the
# source and every target for comparison. The report shows the transfer table.
#
#   --source NAME        source dataset (imagenet)
#   --targets LIST       target datasets (the other 10 of CoOp's benchmark)
#   --data-root DIR      CoOp-style $DATA folder (not needed with --no-encode)
#   --skip-missing       leave out targets whose data is missing (default: stop with an error before any work)
#   --shots LIST         shots per class (16)
#   --seeds LIST         seeds (1,2,3)
#   --model NAME         open_clip model (RN50)
#   --pretrained TAG     open_clip tag, local checkpoint file, or none (openai)
#   --views N            augmented views per few-shot train image (16)
#   --n-ctx M, --position P, --ctx-init WORDS, --variants LIST   the CoOp variant (unified context only)
#   --no-zeroshot        leave out zero-shot CLIP
#   --cache DIR          feature cache (cache)
#   --runs DIR           runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto        runs in parallel (auto: one 1-thread run per core, up to 2 per core when that ends the grid in one round)
#   --epochs N           override the epochs for quick tries (ImageNet: 50 by default)
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options
#   --no-encode          do not call `coopipe encode` (and do not check the data)
#   --no-report          skip the report
#
# Finished runs are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/grid.sh"

SOURCE=imagenet
TARGETS=caltech101,oxford_pets,stanford_cars,oxford_flowers,food101,fgvc_aircraft,sun397,dtd,eurosat,ucf101
ZEROSHOT=1 SKIP_MISSING=0 shots_given=0
for arg in "$@"; do if [[ $arg == --shots ]]; then shots_given=1; fi; done
cp_parse_common "$@"
((shots_given)) || CP_SHOTS=16
((${#CP_DATASETS[@]} == 0)) || cp_die "use --source and --targets (not --dataset)"
set -- "${CP_REST[@]}"
while (($#)); do
  case $1 in
    -h|--help) cp_usage "${CP_USAGE_FILE:-$0}"; exit 0 ;;
    --source) cp_need "$@"; SOURCE=$2; shift 2 ;;
    --targets) cp_need "$@"; TARGETS=$2; shift 2 ;;
    --skip-missing) SKIP_MISSING=1; shift ;;
    --no-zeroshot) ZEROSHOT=0; shift ;;
    *) cp_die "unknown option '$1' (see --help)" ;;
  esac
done
read -r -a TARGET_LIST <<<"$(cp_list "$TARGETS")"
((${#TARGET_LIST[@]})) || cp_die "--targets is empty"
while IFS= read -r spec; do
  [[ $(cp_spec_get "$spec" csc) == 0 ]] || cp_die "transfer needs a unified context: drop --csc / csc variants"
done < <(cp_variant_specs)
cp_require_data_root

if ((CP_ENCODE)); then  # all data present? Checked before anything is encoded or trained.
  declare -A MISSING=()
  while IFS=$'\t' read -r name why; do MISSING[$name]=$why; done < <(cp_check_data "$SOURCE" "${TARGET_LIST[@]}")
  kept=() lost=()
  if [[ -n ${MISSING[$SOURCE]:-} ]]; then lost+=("  $SOURCE (source): ${MISSING[$SOURCE]}"); fi
  for t in "${TARGET_LIST[@]}"; do
    if [[ -z ${MISSING[$t]:-} ]]; then
      kept+=("$t")
    elif ((SKIP_MISSING)); then
      printf '%s: warning: leaving out target %s, its data is missing: %s\n' "$CP_NAME" "$t" "${MISSING[$t]}" >&2
    else
      lost+=("  $t: ${MISSING[$t]}")
    fi
  done
  if ((${#lost[@]})); then
    printf '%s: data missing under %s for %d dataset(s):\n' "$CP_NAME" "$CP_DATA_ROOT" "${#lost[@]}" >&2
    printf '%s\n' "${lost[@]}" >&2
    echo "Put each into CoOp's \$DATA layout under $CP_DATA_ROOT (see CoOp's DATASETS.md; \`coopipe datasets\`" >&2
    echo "lists the folder each one expects), or leave missing targets out with --skip-missing or --targets." >&2
    exit 2
  fi
  ((${#kept[@]})) || cp_die "no target dataset left to evaluate on"
  TARGET_LIST=("${kept[@]}")
fi

source_plan() {  # the source runs (train + eval) and zero-shot CLIP everywhere
  if ((ZEROSHOT)); then
    local ds
    for ds in "$SOURCE" "${TARGET_LIST[@]}"; do cp_zeroshot_jobs "$ds"; done
  fi
  cp_fewshot_jobs "$SOURCE"
}

transfer_plan() {  # every finished source run on every target
  cp_each_coop_run transfer_jobs
}

transfer_jobs() {  # transfer_jobs SPEC LABEL SHOTS SEED: one source run on every target
  local label=$2 shots=$3 seed=$4 target out
  local run="$CP_RUNS/$SOURCE/$label/shots${shots}_seed${seed}"
  for target in "${TARGET_LIST[@]}"; do
    out="$run/transfer/$target"
    cp_job "$label $SOURCE->$target ${shots}-shot seed $seed" "$out" "$out/metrics.json" -- \
      transfer_eval "$run" "$target" "$out"
  done
}

transfer_eval() {
  local run=$1 target=$2 out=$3
  if [[ ! -e $run/metrics.json ]]; then
    echo "source run $run is not finished (failed, or held by another process); re-run when it is" >&2
    return 1
  fi
  "$COOPIPE" eval "$run" --features "$CP_CACHE" --dataset "$target" --transfer --out "$out/metrics.json" \
    --pretrained "$CP_PRETRAINED" --device "$CP_DEVICE"
}

cp_start
# Probe: which datasets need their stores (the source for training, the targets for zero-shot and transfer).
CP_MODE=probe CP_PENDING=0
source_plan
transfer_plan
if ((CP_PENDING && CP_ENCODE)); then
  cp_encode_fewshot "$SOURCE" || { cp_note failed "encode $SOURCE" "see the error above"; cp_summary; exit 1; }
  for t in "${TARGET_LIST[@]}"; do
    if [[ $t == "$SOURCE" ]]; then continue; fi
    cp_encode "$t" --split test || { cp_note failed "encode $t" "see the error above"; cp_summary; exit 1; }
  done
fi
CP_MODE=run
source_plan
cp_wait
transfer_plan
cp_wait
status=0
cp_summary || status=1
cp_report || status=1
exit $status
