#!/usr/bin/env bash
# The methods side by side on one feature cache: the few-shot grid of every registered method (CoOp, CoCoOp and
# every method module registered in coopipe.methods; a method that needs ordered labels only on age datasets),
# plus zero-shot CLIP and the linear probe, each run evaluated, then the report: per dataset the method x shots
# table (mean ± std over seeds), base / new / H and transfer tables where such runs exist, the cost table in
# Tip-Adapter's Table 1 layout, and the accuracy-vs-shots figure (RUNS/report/report_<dataset>.md,
# accuracy_vs_shots_<dataset>.png).
#
# Usage: bash scripts/methods_grid.sh --dataset eurosat --data-root ../shared/data --pretrained none \
#            --shots 1,16 --seeds 1,2,3
#
#   --dataset LIST       dataset name(s), comma-separated or repeated                   [required]
#   --data-root DIR      CoOp-style $DATA folder (not needed with --no-encode)
#   --methods LIST       method labels instead of every registered one (all = every registered one), e.g.
#                        coop,cocoop or all,coop_csc
#   --model NAME         open_clip model (RN50)
#   --pretrained TAG     open_clip tag, local checkpoint file, or none for random weights (openai)
#   --shots LIST         shots per class (1,2,4,8,16)
#   --seeds LIST         seeds (1,2,3)
#   --views N            augmented views per few-shot train image (16)
#   --cache DIR          feature cache (cache)
#   --runs DIR           runs folder (runs; runs-ep<N> with --epochs N)
#   --jobs N|auto        runs at once (1 here, so that each run's recorded cost is its own, not shared with
#                        other runs on the same cores; auto: as many as the machine holds, faster, costs skewed)
#   --stack auto|on|off  train runs stacked in one text pass (off here: each run's cost is its own)
#   --epochs N           override every method's epochs for quick tries (results go to runs-ep<N>)
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options for every run
#   --no-zeroshot        leave out zero-shot CLIP
#   --no-linear-probe    leave out the linear probe
#   --no-encode          do not call `coopipe encode` (the cache is ready)
#   --no-report          skip the report
#   and every other `coopipe sweep` option.
#
# Re-running does no work once everything is finished; a killed grid completes only the missing runs
# (interrupted ones resume from their checkpoint). A failed run does not stop the others (exit code 1).
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --methods all --zeroshot --linear-probe --jobs 1 --stack off "$@"
