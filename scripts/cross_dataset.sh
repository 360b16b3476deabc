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
#   --jobs N|auto        runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --epochs N           override the epochs for quick tries (ImageNet: 50 by default)
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options
#   --no-encode          do not call `coopipe encode` (and do not check the data)
#   --no-report          skip the report
#
# Finished runs are skipped, each run is locked (flock -n <run>.lock), failures are summarised at the end.
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
SOURCE=imagenet
TARGETS=caltech101,oxford_pets,stanford_cars,oxford_flowers,food101,fgvc_aircraft,sun397,dtd,eurosat,ucf101
rest=()
while (($#)); do
  case $1 in
    --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
    --targets) TARGETS=${2:?--targets needs a value}; shift 2 ;;
    --dataset|--datasets) echo "cross_dataset.sh: use --source and --targets (not --dataset)" >&2; exit 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
exec "$COOPIPE" sweep --dataset "$SOURCE" --targets "$TARGETS" --zeroshot --shots 16 "${rest[@]}"
