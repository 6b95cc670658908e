#!/usr/bin/env bash
# Run an experiment entry point on one host with several GPUs: one process owns every visible GPU,
# so no jax.distributed set-up is needed (JAX sees all local devices in a single process).
#
#   launch/gpu_single_host.sh [OPTIONS] [-- ENTRY_ARGS...]
#
# Everything after `--` goes to `python -m ENTRY` unchanged; hyperparameters live in
# experiments/configs/*.py, never here. See launch/README.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly PROG="launch/gpu_single_host.sh"

usage() {
  cat <<EOF
Usage: ${PROG} [OPTIONS] [-- ENTRY_ARGS...]

Runs \`python -m ENTRY ENTRY_ARGS...\` from the repository root in one process that owns all
visible GPUs, with JAX_PLATFORMS=cuda so JAX fails loudly if it finds no GPU.

Options:
  --entry MODULE     entry point module (default: experiments.train; also
                     experiments.evaluate, experiments.translate)
  --gpus LIST        comma-separated GPU indices to use, e.g. 0,1,2,3 (sets
                     CUDA_VISIBLE_DEVICES; default: every GPU on the host)
  --venv DIR         run with DIR/bin/python instead of the python3 on PATH
  --install          install into the venv (created if missing; needs --venv):
                     \`pip install -U "jax[EXTRA]"\` and \`pip install -e .\`
  --jax-extra NAME   jax's pip extra for --install: cuda12 or cuda13 (default: cuda12).
                     jax's install docs now lead with cuda13, which needs a newer driver;
                     cuda12 runs on older drivers. \`nvidia-smi\` shows the driver's CUDA version.
  --dry-run          print the commands instead of running them
  -h, --help         show this help

Example:
  ${PROG} --gpus=0,1,2,3 -- --config=experiments/configs/NAME.py --workdir=/data/runs/NAME
EOF
}

# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"  # die, quote, print_cmd, run

ENTRY="experiments.train"
GPUS=""
VENV=""
INSTALL=0
JAX_EXTRA="cuda12"
DRY_RUN=0

set_option() {
  case "$1" in
    --entry) ENTRY="$2" ;;
    --gpus) GPUS="$2" ;;
    --venv) VENV="$2" ;;
    --jax-extra) JAX_EXTRA="$2" ;;
  esac
}

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --install) INSTALL=1 ;;
      --entry | --gpus | --venv | --jax-extra)
        (($# >= 2)) || die "$1 needs a value"
        set_option "$1" "$2"
        shift ;;
      --entry=* | --gpus=* | --venv=* | --jax-extra=*) set_option "${1%%=*}" "${1#*=}" ;;
      --) shift; PASSTHROUGH=("$@"); return ;;
      *) die "unknown argument '$1' (arguments for the entry point go after --)" ;;
    esac
    shift
  done
}

check_args() {
  [[ "${ENTRY}" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] \
    || die "--entry must be a Python module name like experiments.train, got '${ENTRY}'"
  if [[ -n "${GPUS}" && ! "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    die "--gpus must be comma-separated GPU indices like 0,1,2,3, got '${GPUS}'"
  fi
  case "${JAX_EXTRA}" in
    cuda12 | cuda13) ;;
    *) die "--jax-extra must be cuda12 or cuda13, got '${JAX_EXTRA}'" ;;
  esac
  check_venv_args
}

main() {
  PASSTHROUGH=()
  parse_args "$@"
  check_args

  resolve_python
  setup_venv "jax[${JAX_EXTRA}]"
  local python="${PYTHON}"

  local -a cmd=(env JAX_PLATFORMS=cuda)
  if [[ -n "${GPUS}" ]]; then
    cmd+=("CUDA_VISIBLE_DEVICES=${GPUS}")
  fi
  cmd+=("${python}" -m "${ENTRY}")

  # NOTE: run from the repository root, so `-m experiments.*` and relative config paths resolve
  # whether or not the package is installed.
  run cd "${REPO_ROOT}"
  run "${cmd[@]}" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
}

main "$@"
