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
