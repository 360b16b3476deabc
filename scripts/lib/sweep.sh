# shellcheck shell=bash
# Shared by the experiment scripts (sourced, not run). The work is `coopipe sweep` (coopipe.sweep: plan, encode
# once per dataset, every missing run as a task on dask.distributed, locks, summary); a script only picks the
# preset and prints its usage. Environment: COOPIPE_BIN (the coopipe command; default .venv/bin/coopipe).
CP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COOPIPE=${COOPIPE_BIN:-$CP_ROOT/.venv/bin/coopipe}

cp_help() {  # cp_help SCRIPT ARG...: print SCRIPT's leading comment block and exit when ARG holds -h/--help
  local script=$1 arg
  shift
  for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
      sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$script"
      exit 0
    fi
  done
}
