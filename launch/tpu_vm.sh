#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), install the project on every worker, run an
# entry point on all workers at once, and delete the VM.
#
#   launch/tpu_vm.sh [OPTIONS] STEP... [-- ENTRY_ARGS...]
#
# Everything after `--` goes to `python -m ENTRY` unchanged; hyperparameters live in
# experiments/configs/*.py, never here. See launch/README.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly PROG="launch/tpu_vm.sh"
# Where the code lives on each worker, relative to its home directory.
readonly REMOTE_DIR="transformer"

usage() {
  cat <<EOF
Usage: ${PROG} [OPTIONS] STEP... [-- ENTRY_ARGS...]

Steps (run in this order, whatever order they are given in):
  create   first a preflight, here: python3 -m experiments.plan --topology=TYPE with the run's
           --config and --config.* arguments compiles its train, eval and decode programs for the
           slice with the TPU compiler (pip install -e ".[tpu]") and stops before anything is
           billed if one does not fit; then gcloud compute tpus tpu-vm create NAME
  setup    copy this checkout (tracked and untracked, not git-ignored files) to ~/${REMOTE_DIR}
           on every worker, or git clone --git-url there; then pip install -U "jax[tpu]" and
           pip install -e ~/${REMOTE_DIR}
  run      on all workers at once (--worker=all): cd ~/${REMOTE_DIR} and run
           python3 -m ENTRY [--distributed] ENTRY_ARGS...; --distributed is added on pod slices
           (more than one host: the number in the accelerator type is above 8), where the entry
           point calls jax.distributed.initialize() and JAX finds the other workers itself
  delete   gcloud compute tpus tpu-vm delete NAME; once asked for, it runs when the script
           exits, even if an earlier step failed, so a failed run does not leave a VM billing
  all      create setup run delete

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --accelerator-type TYPE  e.g. v4-8, v5litepod-16, v6e-8 (required by create and run)
  --version VERSION        TPU runtime version (default from the accelerator type:
                           v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                           v5litepod/v5e: v2-alpha-tpuv5-lite, others: tpu-ubuntu2204-base;
                           list them with gcloud compute tpus tpu-vm versions list --zone=ZONE)
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --spot                   create a Spot VM (cheaper, can be preempted)
  --tfds-data-dir DIR      TFDS_DATA_DIR for every worker, e.g. gs://BUCKET/tensorflow_datasets
                           (pod slices need a bucket: a worker's local disk is its own)
  --git-url URL            in setup, git clone URL on every worker instead of copying this checkout
  --git-ref REF            branch, tag or commit to check out after --git-url (default: its default)
  --entry MODULE           entry point module (default: experiments.train; also
                           experiments.evaluate, experiments.translate)
  --no-preflight           create without compiling the run for the slice first
  --dry-run                print the commands instead of running them
  -h, --help               show this help

Example:
  ${PROG} --name=mt-base --zone=us-central2-b --accelerator-type=v4-32 \\
      --tfds-data-dir=gs://BUCKET/tensorflow_datasets all -- \\
      --config=experiments/configs/NAME.py --workdir=gs://BUCKET/runs/NAME
EOF
}

# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"  # die, quote, print_cmd, run

NAME=""
ZONE=""
ACCELERATOR_TYPE=""
VERSION=""
PROJECT=""
SPOT=0
TFDS_DATA_DIR_REMOTE=""
GIT_URL=""
GIT_REF=""
ENTRY="experiments.train"
DRY_RUN=0
PREFLIGHT=1
# The steps asked for, 1 or 0.
DO_CREATE=0
DO_SETUP=0
DO_RUN=0
DO_DELETE=0

set_option() {
  case "$1" in
    --name) NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --accelerator-type) ACCELERATOR_TYPE="$2" ;;
    --version) VERSION="$2" ;;
    --project) PROJECT="$2" ;;
    --tfds-data-dir) TFDS_DATA_DIR_REMOTE="$2" ;;
    --git-url) GIT_URL="$2" ;;
    --git-ref) GIT_REF="$2" ;;
    --entry) ENTRY="$2" ;;
  esac
}

parse_args() {
  local with_value="--name|--zone|--accelerator-type|--version|--project|--tfds-data-dir"
  with_value+="|--git-url|--git-ref|--entry"
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --no-preflight) PREFLIGHT=0 ;;
      --spot) SPOT=1 ;;
      --) shift; PASSTHROUGH=("$@"); return ;;
      --*=*)
        [[ "${1%%=*}" =~ ^(${with_value})$ ]] || die "unknown option '${1%%=*}' (arguments for the entry point go after --)"
        set_option "${1%%=*}" "${1#*=}" ;;
      -*)
        [[ "$1" =~ ^(${with_value})$ ]] || die "unknown option '$1' (arguments for the entry point go after --)"
        (($# >= 2)) || die "$1 needs a value"
        set_option "$1" "$2"
        shift ;;
      create) DO_CREATE=1 ;;
      setup) DO_SETUP=1 ;;
      run) DO_RUN=1 ;;
      delete) DO_DELETE=1 ;;
      all) DO_CREATE=1 DO_SETUP=1 DO_RUN=1 DO_DELETE=1 ;;
      *) die "unknown step '$1' (steps: create, setup, run, delete, all)" ;;
    esac
    shift
  done
}

# Hosts in a slice: the accelerator type counts TensorCores (v2-v4, v5p) or chips (v5e, v6e), and
# every generation puts at most 8 of them on one host, so more than 8 means a multi-host pod slice.
is_pod_slice() {
  ((10#${ACCELERATOR_TYPE##*-} > 8))
}

default_version() {
  case "${ACCELERATOR_TYPE}" in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    *) printf 'tpu-ubuntu2204-base' ;;
  esac
}

check_args() {
  ((DO_CREATE + DO_SETUP + DO_RUN + DO_DELETE)) || die "no step given (steps: create, setup, run, delete, all)"
  [[ -n "${NAME}" ]] || die "--name is required"
  [[ "${NAME}" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
    || die "--name must be lower-case letters, digits and dashes, starting with a letter, got '${NAME}'"
  [[ -n "${ZONE}" ]] || die "--zone is required"
  [[ "${ZONE}" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone must look like us-central2-b, got '${ZONE}'"
  if ((DO_CREATE || DO_RUN)); then
    [[ -n "${ACCELERATOR_TYPE}" ]] || die "--accelerator-type is required by the create and run steps"
  fi
  if [[ -n "${ACCELERATOR_TYPE}" && ! "${ACCELERATOR_TYPE}" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]]; then
    die "--accelerator-type must look like v4-8 or v5litepod-16, got '${ACCELERATOR_TYPE}'"
  fi
  [[ "${ENTRY}" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] \
    || die "--entry must be a Python module name like experiments.train, got '${ENTRY}'"
  if [[ -n "${GIT_REF}" && -z "${GIT_URL}" ]]; then
    die "--git-ref needs --git-url"
  fi
  if ((DO_SETUP)) && [[ -z "${GIT_URL}" ]]; then
    git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
      || die "${REPO_ROOT} is not a git checkout, so setup cannot tell code from ignored files: use --git-url"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND NAME ... with the zone and project every call needs.
tpu_vm() {
  local subcommand="$1"
  shift
  local -a cmd=(gcloud compute tpus tpu-vm "${subcommand}")
  # scp names the VM inside its destination argument, the other subcommands as their first.
  [[ "${subcommand}" == "scp" ]] || cmd+=("${NAME}")
  cmd+=("$@" --zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    cmd+=(--project="${PROJECT}")
  fi
  run "${cmd[@]}"
}

on_all_workers() {
  tpu_vm ssh --worker=all --command="$1"
}

# Compiles the run's programs for the slice on this machine (experiments.plan) before create: a
# program that does not fit, or a mesh or batch the slice cannot take, stops here, unbilled.
preflight() {
  local -a plan_args=()
  local i arg
  for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
    arg="${PASSTHROUGH[i]}"
    if [[ "${arg}" == --config=* || "${arg}" == --config.*=* ]]; then
      plan_args+=("${arg}")
    elif [[ "${arg}" == --config || "${arg}" == --config.* ]] && ((i + 1 < ${#PASSTHROUGH[@]})); then
      plan_args+=("${arg}" "${PASSTHROUGH[i + 1]}")
      i=$((i + 1))
    fi
  done
  if ((${#plan_args[@]} == 0)); then
    printf '%s: no --config in the entry arguments: no compile preflight\n' "${PROG}" >&2
    return 0
  fi
  printf '%s: preflight: compiling the run for %s (skip with --no-preflight)\n' "${PROG}" "${ACCELERATOR_TYPE}" >&2
  (cd "${REPO_ROOT}" && run python3 -m experiments.plan --topology="${ACCELERATOR_TYPE}" "${plan_args[@]}") \
    || { printf '%s: preflight failed: no VM created\n' "${PROG}" >&2; exit 1; }
}

create_vm() {
  local -a flags=(--accelerator-type="${ACCELERATOR_TYPE}" --version="${VERSION:-$(default_version)}")
  if ((SPOT)); then
    flags+=(--spot)
  fi
  tpu_vm create "${flags[@]}"
}

setup_workers() {
  local code_dir="\"\$HOME/${REMOTE_DIR}\""  # expanded by the worker's shell
  local fetch
  if [[ -n "${GIT_URL}" ]]; then
    fetch="rm -rf ${code_dir} && git clone $(quote "${GIT_URL}") ${code_dir}"
    if [[ -n "${GIT_REF}" ]]; then
      fetch+=" && git -C ${code_dir} checkout $(quote "${GIT_REF}")"
    fi
  else
    # NOTE: git lists what to copy, so .venv, workdirs and other ignored files stay behind while
    # uncommitted edits travel; --ignore-failed-read skips tracked files deleted in the checkout.
    local archive="${TMPDIR:-/tmp}/${NAME}-${REMOTE_DIR}.tar.gz"
    local pack
    pack="git -C $(quote "${REPO_ROOT}") ls-files -z --cached --others --exclude-standard"
    pack+=" | tar -czf $(quote "${archive}") -C $(quote "${REPO_ROOT}") --ignore-failed-read --null -T -"
    run bash -o pipefail -c "${pack}"
    tpu_vm scp "${archive}" "${NAME}:${REMOTE_DIR}.tar.gz" --worker=all
    run rm -f "${archive}"
    fetch="rm -rf ${code_dir} && mkdir -p ${code_dir} && tar -xzf \"\$HOME/${REMOTE_DIR}.tar.gz\" -C ${code_dir}"
  fi
  # NOTE: no venv: TPU VM images ship python3 without the venv module; pip installs per user.
  on_all_workers "set -e; ${fetch}; python3 -m pip install --upgrade pip;\
 python3 -m pip install --upgrade \"jax[tpu]\"; python3 -m pip install -e ${code_dir}"
}

run_on_workers() {
  local command="cd \"\$HOME/${REMOTE_DIR}\""
  if [[ -n "${TFDS_DATA_DIR_REMOTE}" ]]; then
    command+=" && export TFDS_DATA_DIR=$(quote "${TFDS_DATA_DIR_REMOTE}")"
  fi
  command+=" && exec python3 -m $(quote "${ENTRY}")"
  if is_pod_slice; then
    command+=" --distributed"
  fi
  local arg
  for arg in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
    command+=" $(quote "${arg}")"
  done
  on_all_workers "${command}"
}

delete_vm() {
  tpu_vm delete --quiet
}

main() {
  PASSTHROUGH=()
  parse_args "$@"
  check_args

  # Delete on exit, so a failed setup or run still frees the VM; armed only after create
  # succeeds (when create is a step), so a name clash never deletes someone else's VM.
  if ((DO_DELETE)); then
    trap 'exit 130' INT TERM
  fi
  if ((DO_CREATE)); then
    if ((PREFLIGHT)); then
      preflight
    fi
    create_vm
  fi
  if ((DO_DELETE)); then
    trap delete_vm EXIT
  fi
  if ((DO_SETUP)); then
    setup_workers
  fi
  if ((DO_RUN)); then
    run_on_workers
  fi
}

main "$@"
