# shellcheck shell=bash
# Shared machinery of the experiment scripts (sourced, not run):
#   - common options (cp_parse_common) and variant specs (coop, csc, middle, m8, csc_middle_m4, init, ...);
#   - a probe pass that finds which runs are missing, so finished grids encode nothing and load no model;
#   - encoding once per dataset (all shots and seeds of the grid in one `coopipe encode`, behind a per-dataset
#     flock so two scripts never encode the same dataset at once);
#   - locked jobs: a run is skipped when its result files exist; otherwise it runs under `flock -n <run>.lock`,
#     and a run whose lock another process holds is skipped (two copies of a script can share a grid);
#   - up to --jobs runs in parallel; a failed run is logged and the grid goes on; a summary at the end.
# Environment: COOPIPE_BIN (the coopipe command; tests point it at a stub), COOPIPE_PYTHON (a Python with
# coopipe installed, used for method labels).

CP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COOPIPE=${COOPIPE_BIN:-$CP_ROOT/.venv/bin/coopipe}
CP_PY=${COOPIPE_PYTHON:-$CP_ROOT/.venv/bin/python}
CP_NAME=${CP_SCRIPT_NAME:-$(basename "${BASH_SOURCE[1]:-$0}")}
CP_PAPER_SHOTS=(1 2 4 8 16)

# ---------------------------------------------------------------- options
CP_DATASETS=() CP_DATA_ROOT="" CP_MODEL=RN50 CP_PRETRAINED=openai CP_VIEWS=16
CP_SHOTS="1,2,4,8,16" CP_SEEDS="1,2,3" CP_CACHE=cache CP_RUNS="" CP_JOBS=auto CP_EPOCHS="" CP_DEVICE=cpu
CP_CSC=0 CP_POSITION=end CP_NCTX=16 CP_CTX_INIT="" CP_VARIANTS="" CP_TRAIN_ARGS="" CP_ENCODE=1
CP_ENCODE_SHOTS="" CP_ENCODE_ARGS="" CP_REPORT=1 CP_REST=()

cp_die() { echo "$CP_NAME: $*" >&2; exit 2; }

cp_usage() {  # print the leading comment block of the script (its usage text)
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$1"
}

cp_list() {  # "1,2, 3" -> "1 2 3"
  echo "${1//,/ }"
}

cp_shots_longest_first() {  # the grid's shots, most first: long runs start first, short ones fill the gaps
  cp_list "$CP_SHOTS" | tr ' ' '\n' | sort -n -r -u | paste -sd' ' -
}

cp_need() { [[ $# -ge 2 && -n $2 ]] || cp_die "option $1 needs a value (see --help)"; }

cp_parse_common() {  # parse the shared options; anything else is left in CP_REST for the script
  CP_REST=()
  while (($#)); do
    case $1 in
      --dataset|--datasets) cp_need "$@"; CP_DATASETS+=($(cp_list "$2")); shift 2 ;;
      --data-root) cp_need "$@"; CP_DATA_ROOT=$2; shift 2 ;;
      --model) cp_need "$@"; CP_MODEL=$2; shift 2 ;;
      --pretrained) cp_need "$@"; CP_PRETRAINED=$2; shift 2 ;;
      --views) cp_need "$@"; CP_VIEWS=$2; shift 2 ;;
      --shots) cp_need "$@"; CP_SHOTS=$2; shift 2 ;;
      --seeds) cp_need "$@"; CP_SEEDS=$2; shift 2 ;;
      --cache) cp_need "$@"; CP_CACHE=$2; shift 2 ;;
      --runs) cp_need "$@"; CP_RUNS=$2; shift 2 ;;
      --jobs|-j) cp_need "$@"; CP_JOBS=$2; shift 2 ;;
      --epochs) cp_need "$@"; CP_EPOCHS=$2; shift 2 ;;
      --device) cp_need "$@"; CP_DEVICE=$2; shift 2 ;;
      --csc) CP_CSC=1; shift ;;
      --position|--class-token-position) cp_need "$@"; CP_POSITION=$2; shift 2 ;;
      --n-ctx) cp_need "$@"; CP_NCTX=$2; shift 2 ;;
      --ctx-init) cp_need "$@"; CP_CTX_INIT=$2; shift 2 ;;
      --variants) cp_need "$@"; CP_VARIANTS=$2; shift 2 ;;
      --train-args) cp_need "$@"; CP_TRAIN_ARGS=$2; shift 2 ;;
      --encode-shots) cp_need "$@"; CP_ENCODE_SHOTS=$2; shift 2 ;;
      --encode-args) cp_need "$@"; CP_ENCODE_ARGS=$2; shift 2 ;;
      --no-encode) CP_ENCODE=0; shift ;;
      --no-report) CP_REPORT=0; shift ;;
      *) CP_REST+=("$1"); shift ;;
    esac
  done
  [[ $CP_JOBS == auto || $CP_JOBS =~ ^[1-9][0-9]*$ ]] || cp_die "--jobs must be a positive integer or auto, got '$CP_JOBS'"
  [[ -z $CP_EPOCHS || $CP_EPOCHS =~ ^[1-9][0-9]*$ ]] || cp_die "--epochs must be a positive integer"
  [[ $CP_POSITION =~ ^(end|middle|front)$ ]] || cp_die "--position must be end, middle or front"
  [[ $CP_NCTX =~ ^[1-9][0-9]*$ ]] || cp_die "--n-ctx must be a positive integer"
  cp_variant_specs >/dev/null  # fail now on a bad --variants name
  local x
  for x in $(cp_list "$CP_SHOTS") $(cp_list "$CP_SEEDS"); do
    [[ $x =~ ^[0-9]+$ ]] || cp_die "--shots and --seeds take comma-separated integers, got '$x'"
  done
  # Quick tries with fewer epochs go to their own runs folder: a 2-epoch result must never be mistaken
  # for (or block) the real run, since the run folder name does not carry the number of epochs.
  if [[ -z $CP_RUNS ]]; then
    CP_RUNS=runs
    if [[ -n $CP_EPOCHS ]]; then CP_RUNS=runs-ep$CP_EPOCHS; fi
  fi
  return 0
}

# cp_plan_jobs PENDING: set CP_NJOBS (runs at once) and CP_THREADS (torch/BLAS threads of each run) for a
# grid with PENDING runs to do. Measured on 2 cores (CoOp step, K=10): one thread per run is the most work per
# core (2 runs x 1 thread: 62 ms per step each way, against 88 ms for 1 run x 2 threads), a few more
# single-thread runs than cores cost only ~5% (3 runs: 67 ms, 4 runs: 64 ms) and spare the grid a tail where
# the last run trains alone on one core, while runs whose thread counts add up to more than the cores are
# 20-40x slower (OpenMP threads spin-wait on each other). So `--jobs auto` (the default) on the CPU runs
# min(PENDING, 2 x cores) runs of 1 thread each, bounded by memory (2 GiB a run); on cuda one run at a time.
# With --jobs N the cores are split between the N runs. OMP_NUM_THREADS set by the caller is kept as it is.
cp_plan_jobs() {
  local pending=$1 cores mem_kb cap
  cores=$(nproc 2>/dev/null || echo 1)
  if [[ $CP_JOBS == auto ]]; then
    if [[ $CP_DEVICE == cpu ]]; then
      CP_NJOBS=$((pending < 2 * cores ? pending : 2 * cores))
      mem_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || true)
      if [[ -n $mem_kb ]]; then
        cap=$((mem_kb / (2 * 1024 * 1024)))
        if ((cap < CP_NJOBS)); then CP_NJOBS=$cap; fi
      fi
    else
      CP_NJOBS=1
    fi
    if ((CP_NJOBS < 1)); then CP_NJOBS=1; fi
  else
    CP_NJOBS=$CP_JOBS
  fi
  CP_THREADS=$((cores / CP_NJOBS > 0 ? cores / CP_NJOBS : 1))
  if [[ -n ${OMP_NUM_THREADS:-} ]]; then
    CP_THREADS=$OMP_NUM_THREADS
    if ((CP_NJOBS * CP_THREADS > cores)); then
      echo "$CP_NAME: warning: $CP_NJOBS runs x OMP_NUM_THREADS=$CP_THREADS threads exceed the $cores cores; runs" \
        "will be many times slower (unset OMP_NUM_THREADS to let the script split the cores)" >&2
    fi
  fi
  if ((pending)); then
    echo "== $pending run(s) to do: $CP_NJOBS at a time, $CP_THREADS thread(s) each ($cores cores)"
  fi
}

cp_require_data_root() {
  ((CP_ENCODE)) || return 0
  [[ -n $CP_DATA_ROOT ]] || cp_die "--data-root is required to encode (or pass --no-encode when the cache is ready)"
  [[ -d $CP_DATA_ROOT || -f $CP_DATA_ROOT ]] || cp_die "--data-root $CP_DATA_ROOT does not exist"
}

# cp_check_data DATASET...: look for every dataset's files under --data-root before anything is encoded
# (one Python start for all); prints "NAME<TAB>why" for each missing dataset.
cp_check_data() {
  "$CP_PY" - "$CP_DATA_ROOT" "$@" <<'PY'
import sys

from coopipe.datasets import load_dataset
from coopipe.errors import CoopipeError

root = sys.argv[1]
for name in sys.argv[2:]:
    try:
        load_dataset(name, root)
    except CoopipeError as exc:
        print(f"{name}\t{exc}")
PY
}

# ---------------------------------------------------------------- variants
# A variant spec is "csc=0;pos=end;nctx=16;init=" ; named variants are tokens joined by "_":
# coop (the default), csc, end|middle|front, m<N> (context length), init (context from "a photo of a").
cp_variant_from_flags() {
  echo "csc=$CP_CSC;pos=$CP_POSITION;nctx=$CP_NCTX;init=$CP_CTX_INIT"
}

cp_variant_from_name() {
  local csc=0 pos=end nctx=16 init="" token
  local IFS=_
  for token in $1; do
    case $token in
      coop|"") ;;
      csc) csc=1 ;;
      end|middle|front) pos=$token ;;
      init) init="a photo of a" ;;
      m[0-9]*) [[ ${token#m} =~ ^[0-9]+$ ]] || cp_die "bad variant token '$token' in '$1'"; nctx=${token#m} ;;
      *) cp_die "unknown variant token '$token' in '$1' (use coop, csc, end, middle, front, m<N>, init)" ;;
    esac
  done
  echo "csc=$csc;pos=$pos;nctx=$nctx;init=$init"
}

cp_variant_specs() {  # one spec per line: from --variants, else from the variant flags
  local name
  if [[ -n $CP_VARIANTS ]]; then
    for name in $(cp_list "$CP_VARIANTS"); do cp_variant_from_name "$name"; done
  else
    cp_variant_from_flags
  fi
}

cp_spec_get() {  # cp_spec_get SPEC KEY
  local part
  local IFS=';'
  for part in $1; do
    if [[ ${part%%=*} == "$2" ]]; then echo "${part#*=}"; return 0; fi
  done
}

cp_variant_args() {  # fill CP_VARGS with the `coopipe train` options of SPEC
  CP_VARGS=(--n-ctx "$(cp_spec_get "$1" nctx)" --class-token-position "$(cp_spec_get "$1" pos)")
  if [[ $(cp_spec_get "$1" csc) == 1 ]]; then CP_VARGS+=(--csc); fi
  local init
  init=$(cp_spec_get "$1" init)
  if [[ -n $init ]]; then CP_VARGS+=(--ctx-init "$init"); fi
}

declare -A CP_LABELS=()
cp_method_label() {  # CP_LABEL = the method label coopipe gives SPEC (coopipe.lookup.method_label)
  local spec=$1
  if [[ -z ${CP_LABELS[$spec]:-} ]]; then
    CP_LABELS[$spec]=$("$CP_PY" -c '
import sys
from coopipe.lookup import method_label
csc, pos, nctx, init = sys.argv[1:5]
print(method_label({"csc": csc == "1", "class_token_position": pos, "n_ctx": int(nctx), "ctx_init": init or None}))
' "$(cp_spec_get "$spec" csc)" "$(cp_spec_get "$spec" pos)" "$(cp_spec_get "$spec" nctx)" "$(cp_spec_get "$spec" init)") \
      || cp_die "cannot compute the method label with $CP_PY (set COOPIPE_PYTHON to a Python with coopipe)"
  fi
  CP_LABEL=${CP_LABELS[$spec]}
}

# ---------------------------------------------------------------- encoding
cp_encode_shots() {  # the grid's shots plus the paper's shots up to the largest: every script shares one store
  local max=0 k all=()
  for k in $(cp_list "$CP_SHOTS"); do
    all+=("$k")
    if ((k > max)); then max=$k; fi
  done
  for k in "${CP_PAPER_SHOTS[@]}"; do
    if ((k <= max)); then all+=("$k"); fi
  done
  printf '%s\n' "${all[@]}" | sort -n -u | paste -sd, -
}

# cp_encode DATASET [extra `coopipe encode` options]: encode once, behind a per-dataset lock (waits for
# another process encoding the same dataset, then finds its stores and does nothing).
cp_encode() {
  local ds=$1
  shift
  mkdir -p -- "$CP_CACHE"
  echo "== encode $ds ($CP_MODEL, $CP_PRETRAINED) into $CP_CACHE"
  (
    exec 8>>"$CP_CACHE/.encode-$ds.lock"
    if ! flock -n 8; then
      echo "   another process is encoding $ds: waiting for it"
      flock 8
    fi
    # shellcheck disable=SC2086  # --encode-args is split into words on purpose
    "$COOPIPE" encode --dataset "$ds" --data-root "$CP_DATA_ROOT" --model "$CP_MODEL" --pretrained "$CP_PRETRAINED" \
      --cache "$CP_CACHE" --device "$CP_DEVICE" $CP_ENCODE_ARGS "$@"
  )
}

# cp_encode_fewshot DATASET: train/val few-shot subsets (all shots and seeds at once) and the full test split.
cp_encode_fewshot() {
  cp_encode "$1" --views "$CP_VIEWS" --shots "${CP_ENCODE_SHOTS:-$(cp_encode_shots)}" --seeds "$CP_SEEDS"
}

# ---------------------------------------------------------------- jobs
CP_MODE=run CP_PENDING=0 CP_STATUS="" CP_T0=$SECONDS CP_NJOBS=1 CP_THREADS=1

cp_start() {  # set up the status file and the interrupt handler; call once before submitting jobs
  CP_STATUS=$(mktemp "${TMPDIR:-/tmp}/coopipe-grid.XXXXXX")
  trap 'cp_interrupt' INT TERM
  trap 'rm -f -- "$CP_STATUS"' EXIT
}

cp_kill_tree() {  # cp_kill_tree PID: end a job this script started and everything it started, children first
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do cp_kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}

cp_interrupt() {
  trap - INT TERM
  echo "$CP_NAME: interrupted; stopping running jobs (finished runs are kept, interrupted ones resume on re-run)" >&2
  local pid
  for pid in $(jobs -pr); do cp_kill_tree "$pid"; done
  wait 2>/dev/null || true
  cp_summary || true
  exit 130
}

cp_note() {  # cp_note STATUS LABEL DETAIL: one line to the terminal and to the status file
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$CP_STATUS"
  printf '[%s] %s%s\n' "$1" "$2" "${3:+  ($3)}"
}

cp_all_exist() {
  local f
  for f in "$@"; do [[ -e $f ]] || return 1; done
  return 0
}

# cp_job LABEL RUN_DIR DONE_FILE... -- COMMAND...
# Skip when every DONE_FILE exists; else run COMMAND under `flock -n RUN_DIR.lock` (skip if another process
# holds it), logging to RUN_DIR/log.txt. In probe mode only note whether anything is pending.
cp_job() {
  local label=$1 run=$2
  shift 2
  local done_files=()
  while (($#)) && [[ $1 != -- ]]; do done_files+=("$1"); shift; done
  shift
  if cp_all_exist "${done_files[@]}"; then
    [[ $CP_MODE == probe ]] || cp_note skipped "$label" "finished: ${done_files[0]}"
    return 0
  fi
  if [[ $CP_MODE == probe ]]; then CP_PENDING=$((CP_PENDING + 1)); return 0; fi
  # Always in the background (--jobs 1 included) so that Ctrl-C / SIGTERM reach the script's handler at once.
  while (($(jobs -pr | wc -l) >= CP_NJOBS)); do wait -n 2>/dev/null || true; done
  cp_run_locked "$label" "$run" "${done_files[@]}" -- "$@" </dev/null &
}

cp_run_locked() {
  local label=$1 run=$2
  shift 2
  local done_files=()
  while (($#)) && [[ $1 != -- ]]; do done_files+=("$1"); shift; done
  shift
  mkdir -p -- "$(dirname -- "$run")"
  (
    set +e  # a job reports its own failure; it must never end silently under the script's errexit
    exec 9>>"$run.lock"
    if ! flock -n 9; then
      cp_note held "$label" "another process holds $run.lock"
      exit 0
    fi
    if cp_all_exist "${done_files[@]}"; then  # finished by another process since we looked
      cp_note skipped "$label" "finished: ${done_files[0]}"
      exit 0
    fi
    mkdir -p -- "$run"
    export OMP_NUM_THREADS=$CP_THREADS MKL_NUM_THREADS=$CP_THREADS  # this run's share of the cores
    local log="$run/log.txt" t0=$SECONDS
    printf '== %s %s\n' "$(date '+%F %T')" "$label" >>"$log"
    if "$@" >>"$log" 2>&1 && cp_all_exist "${done_files[@]}"; then
      local acc
      acc=$(grep -o 'accuracy [0-9.]*%' "$log" | tail -n 1 || true)
      cp_note done "$label" "$((SECONDS - t0))s${acc:+, $acc}"
    else
      cp_note failed "$label" "see $log"
    fi
  )
}

cp_wait() {  # wait for every running job
  while [[ -n $(jobs -pr) ]]; do wait -n 2>/dev/null || true; done
  wait 2>/dev/null || true
}

cp_summary() {  # print the summary; returns 1 when a run failed
  local total done skipped held failed
  total=$(wc -l <"$CP_STATUS")
  done=$(grep -c '^done' "$CP_STATUS" || true)
  skipped=$(grep -c '^skipped' "$CP_STATUS" || true)
  held=$(grep -c '^held' "$CP_STATUS" || true)
  failed=$(grep -c '^failed' "$CP_STATUS" || true)
  echo "== $CP_NAME: $total run(s) in $((SECONDS - CP_T0))s: $done done, $skipped already finished, $held held by another process, $failed failed"
  if ((held)); then
    echo "   held by another process (re-run when it has finished to pick up what it left):"
    grep '^held' "$CP_STATUS" | cut -f2 | sed 's/^/     /'
  fi
  if ((failed)); then
    echo "   failed (the grid went on; re-run to retry them):"
    grep '^failed' "$CP_STATUS" | awk -F'\t' '{print "     " $2 "  (" $3 ")"}'
    return 1
  fi
  return 0
}

# ---------------------------------------------------------------- run bodies
# cp_coop_run DATASET SHOTS SEED RUN_DIR SPEC [CLASSES]: train (resumes / skips when finished), then evaluate.
cp_coop_run() {
  local ds=$1 shots=$2 seed=$3 run=$4 spec=$5 classes=${6:-all}
  cp_variant_args "$spec"
  local extra=()
  if [[ -n $CP_EPOCHS ]]; then extra+=(--epochs "$CP_EPOCHS"); fi
  # shellcheck disable=SC2206  # --train-args is split into words on purpose
  if [[ -n $CP_TRAIN_ARGS ]]; then extra+=($CP_TRAIN_ARGS); fi
  "$COOPIPE" train --features "$CP_CACHE" --dataset "$ds" --shots "$shots" --seed "$seed" --out "$run" \
    --model "$CP_MODEL" --pretrained "$CP_PRETRAINED" --device "$CP_DEVICE" --classes "$classes" --no-progress \
    "${CP_VARGS[@]}" "${extra[@]}" || return
  if [[ $classes == all ]]; then
    "$COOPIPE" eval "$run" --features "$CP_CACHE"
  else  # base-to-new: trained on base, tested on base and on new separately
    "$COOPIPE" eval "$run" --features "$CP_CACHE" --classes base --out "$run/metrics_base.json" \
      --pretrained "$CP_PRETRAINED" --device "$CP_DEVICE" &&
      "$COOPIPE" eval "$run" --features "$CP_CACHE" --classes new --out "$run/metrics_new.json" \
        --pretrained "$CP_PRETRAINED" --device "$CP_DEVICE"
  fi
}

# cp_each_coop_run FN [ARG...]: call `FN ARG... SPEC LABEL SHOTS SEED` for every variant x shots (most first)
# x seed of the grid (LABEL: the variant's method label, its runs folder name).
cp_each_coop_run() {
  local spec shots seed
  while IFS= read -r -u 7 spec; do
    cp_method_label "$spec"
    for shots in $(cp_shots_longest_first); do
      for seed in $(cp_list "$CP_SEEDS"); do
        "$@" "$spec" "$CP_LABEL" "$shots" "$seed"
      done
    done
  done 7< <(cp_variant_specs)
}

# cp_fewshot_jobs DATASET: CoOp runs of every variant x shots x seed of the grid.
cp_fewshot_jobs() {
  cp_each_coop_run cp_fewshot_job "$1"
}

cp_fewshot_job() {  # cp_fewshot_job DATASET SPEC LABEL SHOTS SEED
  local ds=$1 spec=$2 label=$3 shots=$4 seed=$5
  local run="$CP_RUNS/$ds/$label/shots${shots}_seed${seed}"
  cp_job "$label $ds ${shots}-shot seed $seed" "$run" "$run/metrics.json" -- \
    cp_coop_run "$ds" "$shots" "$seed" "$run" "$spec"
}

cp_zeroshot_jobs() {  # cp_zeroshot_jobs DATASET [--ensemble]
  local ds=$1 method=zeroshot
  if [[ ${2:-} == --ensemble ]]; then method=zeroshot_ensemble; fi
  local run="$CP_RUNS/$ds/$method"
  cp_job "$method $ds" "$run" "$run/metrics.json" -- \
    "$COOPIPE" zeroshot --features "$CP_CACHE" --dataset "$ds" --out "$run" --model "$CP_MODEL" \
    --pretrained "$CP_PRETRAINED" ${2:+"$2"}
}

cp_linear_probe_jobs() {  # cp_linear_probe_jobs DATASET
  local ds=$1 shots seed run
  for shots in $(cp_list "$CP_SHOTS"); do
    for seed in $(cp_list "$CP_SEEDS"); do
      run="$CP_RUNS/$ds/linear_probe/shots${shots}_seed${seed}"
      cp_job "linear_probe $ds ${shots}-shot seed $seed" "$run" "$run/metrics.json" -- \
        "$COOPIPE" linear-probe --features "$CP_CACHE" --dataset "$ds" --shots "$shots" --seed "$seed" \
        --out "$run" --model "$CP_MODEL" --pretrained "$CP_PRETRAINED"
    done
  done
}

# cp_report: `coopipe report` on the runs folder, unless no result changed since the last report.
cp_report() {
  ((CP_REPORT)) || return 0
  local summary="$CP_RUNS/report/summary.json"
  [[ -d $CP_RUNS ]] || return 0
  if [[ -e $summary ]] && [[ -z $(find "$CP_RUNS" -name 'metrics*.json' -newer "$summary" -print -quit) ]]; then
    echo "== report $CP_RUNS/report is up to date"
    return 0
  fi
  echo "== report"
  "$COOPIPE" report "$CP_RUNS" --out "$CP_RUNS/report"
}

# cp_run_plan PLAN_FUNCTION ENCODE_FUNCTION: probe each dataset, encode those with missing runs, then run.
# Datasets whose encoding fails are reported as failed and their runs left out.
cp_run_plan() {
  local plan=$1 encode=$2 ds pending=0
  local ready=()
  for ds in "${CP_DATASETS[@]}"; do
    CP_MODE=probe CP_PENDING=0
    "$plan" "$ds"
    if ((CP_PENDING)) && ((CP_ENCODE)); then
      if ! "$encode" "$ds"; then  # encoding runs alone, with every core
        cp_note failed "encode $ds" "see the error above"
        continue
      fi
    fi
    pending=$((pending + CP_PENDING))
    ready+=("$ds")
  done
  cp_plan_jobs "$pending"
  CP_MODE=run
  for ds in "${ready[@]}"; do "$plan" "$ds"; done
  cp_wait
}

cp_main_grid() {  # cp_main_grid JOBS_FN "$@": parse options, encode once, run the jobs, summarise, report
  local jobs_fn=$1; shift
  CP_REPORT=0
  cp_parse_common "$@"
  local arg
  for arg in "${CP_REST[@]}"; do
    case $arg in
      -h|--help) cp_usage "$0"; exit 0 ;;
      --report) CP_REPORT=1 ;;
      *) cp_die "unknown option '$arg' (see --help)" ;;
    esac
  done
  ((${#CP_DATASETS[@]})) || cp_die "--dataset is required (see --help)"
  cp_require_data_root
  cp_run_all "$jobs_fn" cp_encode_fewshot
}

cp_run_all() {  # cp_run_all PLAN_FN ENCODE_FN: run every job of the plan, then summarise and report
  cp_start
  cp_run_plan "$1" "$2"
  local status=0
  cp_summary || status=1
  cp_report || status=1
  return $status
}
