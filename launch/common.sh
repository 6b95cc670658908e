# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). They expect PROG (the script's name, for
# messages) and, when `run` is called, DRY_RUN (1: print commands instead of running them).
# launch/slurm_multinode.sbatch keeps its own copy: sbatch runs a spooled copy of the script, which
# cannot rely on finding files beside it.

die() {
  printf '%s: error: %s\n' "${PROG}" "$1" >&2
  printf 'Try %s --help\n' "${PROG}" >&2
  exit 2
}

# Quotes one word for a shell, leaving plain words bare so printed commands stay readable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local line="" arg
  for arg in "$@"; do line+="$(quote "${arg}") "; done
  printf '%s\n' "${line% }"
}

# Prints the command in dry-run mode; otherwise logs it to stderr and runs it.
run() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    printf '+ %s\n' "$(print_cmd "$@")" >&2
    "$@"
  fi
}

# Checks --venv DIR / --install (globals VENV, INSTALL).
check_venv_args() {
  if ((INSTALL)) && [[ -z "${VENV}" ]]; then
    die "--install needs --venv DIR (we do not pip install into the system python)"
  fi
  if [[ -n "${VENV}" && ! -x "${VENV}/bin/python" ]] && ((!INSTALL)); then
    die "no virtual environment at '${VENV}' (add --install to make one)"
  fi
}

# Sets PYTHON, the interpreter to run (python3, or the venv's), making VENV absolute: the scripts
# cd to the repository root before running.
resolve_python() {
  PYTHON="python3"
  if [[ -n "${VENV}" ]]; then
    [[ "${VENV}" == /* ]] || VENV="${PWD}/${VENV}"
    PYTHON="${VENV}/bin/python"
  fi
}

# With --install: creates the venv if needed, then installs the extra requirements given (if any)
# and the project into PYTHON's venv. Usage: setup_venv [REQUIREMENT...] (after resolve_python)
# shellcheck disable=SC2120  # the requirements are optional
setup_venv() {
  local python="${PYTHON}"
  ((INSTALL)) || return 0
  if [[ ! -x "${python}" ]]; then
    run python3 -m venv "${VENV}"
  fi
  run "${python}" -m pip install --upgrade pip
  if (($#)); then
    run "${python}" -m pip install --upgrade "$@"
  fi
  run "${python}" -m pip install -e "${REPO_ROOT}"
}
