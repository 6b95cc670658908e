#!/usr/bin/env bash
# Run an experiment entry point on this machine, in one process (CPU, or whatever JAX finds).
#
#   launch/local.sh [OPTIONS] [-- ENTRY_ARGS...]
#
# Everything after `--` goes to `python -m ENTRY` unchanged; hyperparameters live in
# experiments/configs/*.py, never here. See launch/README.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly PROG="launch/local.sh"

usage() {
  cat <<EOF
Usage: ${PROG} [OPTIONS] [-- ENTRY_ARGS...]

Runs \`python -m ENTRY ENTRY_ARGS...\` from the repository root, in one process.

Options:
  --entry MODULE     entry point module (default: experiments.train; also
                     experiments.evaluate, experiments.translate)
  --platform NAME    auto | cpu | gpu (default: auto). cpu and gpu set JAX_PLATFORMS
                     (cpu / cuda) so JAX fails loudly instead of silently falling back.
  --venv DIR         run with DIR/bin/python instead of the python3 on PATH
  --install          install into the venv (created if missing; needs --venv):
                     \`pip install -e .\`, which brings jax's CPU build
  --dry-run          print the commands instead of running them
  -h, --help         show this help

Example:
  ${PROG} --platform=cpu -- --config=experiments/configs/NAME.py --workdir=/tmp/run
EOF
}

# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"  # die, quote, print_cmd, run

ENTRY="experiments.train"
PLATFORM="auto"
VENV=""
INSTALL=0
DRY_RUN=0

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --install) INSTALL=1 ;;
      --entry | --platform | --venv)
        (($# >= 2)) || die "$1 needs a value"
        set_option "$1" "$2"
        shift ;;
      --entry=* | --platform=* | --venv=*) set_option "${1%%=*}" "${1#*=}" ;;
      --) shift; PASSTHROUGH=("$@"); return ;;
      *) die "unknown argument '$1' (arguments for the entry point go after --)" ;;
    esac
    shift
  done
}

set_option() {
  case "$1" in
    --entry) ENTRY="$2" ;;
    --platform) PLATFORM="$2" ;;
    --venv) VENV="$2" ;;
  esac
}

check_args() {
  [[ "${ENTRY}" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] \
    || die "--entry must be a Python module name like experiments.train, got '${ENTRY}'"
  case "${PLATFORM}" in
    auto | cpu | gpu) ;;
    *) die "--platform must be auto, cpu or gpu, got '${PLATFORM}'" ;;
  esac
  check_venv_args
}

main() {
  PASSTHROUGH=()
  parse_args "$@"
  check_args

  resolve_python
  setup_venv
  local python="${PYTHON}"

  local -a cmd=()
  case "${PLATFORM}" in
    cpu) cmd=(env JAX_PLATFORMS=cpu) ;;
    gpu) cmd=(env JAX_PLATFORMS=cuda) ;;
  esac
  cmd+=("${python}" -m "${ENTRY}")

  # NOTE: run from the repository root, so `-m experiments.*` and relative config paths resolve
  # whether or not the package is installed.
  run cd "${REPO_ROOT}"
  run "${cmd[@]}" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
}

main "$@"
