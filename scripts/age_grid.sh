#!/usr/bin/env bash
# Age estimation in one command: encode once (the largest shots; smaller draws nest in it), then
# zero-shot with the age prompt and prompt ensembling, the rank linear probe, the ridge probe and the prompt
# methods (OrdinalCLIP's comparison: its CoOp row, the context from "age estimation: the age of the person is"
# and the rank names learned; CoCoOp; rank prompts) for shots x seeds, each run evaluated (MAE by expectation and arg-max, CS curve, the
# constant predictor beside it), then the report and the age report (RUNS/age_report: MAE table by method x
# shots, CS curves, predicted-vs-true plots).
#
# Usage: bash scripts/age_grid.sh --dataset utkface --data-root ../shared/data --pretrained none \
#            --shots 1,2,4,8,16 --seeds 1,2,3 [--epochs N]
#
#   --dataset LIST       age dataset(s): utkface, morph, agemanifest (see `coopipe datasets`)     [required]
#   --data-root DIR      $DATA folder (utkface: DIR/utkface/images; not needed with --no-encode)
#   --model NAME         open_clip model (RN50)
#   --pretrained TAG     open_clip tag, local checkpoint file, or none for random weights (openai)
#   --methods LIST       prompt methods (ordcoop,cocoop,rank): labels or tokens (coop, age, init, m<N>, ...)
#   --shots LIST         shots per age (1,2,4,8,16); an age with fewer images keeps them all
#   --seeds LIST         seeds (1,2,3)
#   --epochs N           override the paper's epochs (CoOp 50-200, CoCoOp 10, rank 100) for quick tries;
#                        results go to runs-ep<N> and the age table says the training was shortened; the
#                        first epoch is CoOp's warm-up (lr 1e-5): with --epochs 1 add
#                        --train-args "--warmup-epoch 0", or the prompts barely move
#   --views N            augmented views per few-shot train image in the cache (16); training reads one per
#                        epoch, so with --epochs N, --views N encodes no view that is never read
#   --runs DIR           runs folder (runs, or runs-ep<N> with --epochs N)
#   --cache DIR          feature cache (cache)
#   --jobs N|auto        runs in parallel (auto: 1-thread runs, up to 2 per core, 1 per 2 GiB of memory)
#   --device DEV         cpu or cuda (cpu)
#   --train-args "..."   extra `coopipe train` options, e.g. "--batch-size 32"
#   --encode-args "..."  extra `coopipe encode` options, e.g. "--workers 4 --batch-size 128"
#   --no-encode          the cache is ready
#   --no-report          skip the reports
#   Any other `coopipe sweep` option passes through (`coopipe sweep --help`).
#
# Cost on a CPU: a CoOp or rank step runs the text tower over 101 rank prompts; CoCoOp runs it per image (101
# prompts for each training and each test image), far beyond a CPU for the full grid: use a GPU, or leave it
# out with --methods coop_age,rank. Re-running does no work once everything is finished; killed mid-grid, a
# re-run completes only the missing runs. A failed run does not stop the others (exit code 1).
set -euo pipefail
source "$(dirname "$0")/lib/sweep.sh"
cp_help "$0" "$@"
exec "$COOPIPE" sweep --zeroshot --linear-probe --ridge "$@"
