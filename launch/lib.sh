# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, not run): argument checks, dry-run aware command
# execution, and shell quoting that prints commands a user can copy and paste.

# shellcheck disable=SC2034  # set by the sourcing script's --dry-run
DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}

# require VALUE FLAG: fail naming the missing setting.
require() {
  if [[ -z "$1" ]]; then
    die "missing required setting $2 (see --help)"
  fi
}

# need_value FLAG ARGC: an option that takes a value was given without one.
need_value() {
  if [[ "$2" -lt 2 ]]; then
    die "option $1 needs a value"
  fi
}

# quote ARG: ARG as it would be typed in a shell (single quotes only when needed).
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# quote_all ARGS...: the whole command line, each word quoted as needed.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print the command (prefixed with '+'), then run it unless --dry-run.
run() {
  echo "+ $(quote_all "$@")"
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

# gcloud_scope: the --zone/--project flags every gcloud TPU command takes.
gcloud_scope() {
  # shellcheck disable=SC2034  # read by the script that sources this file
  GCLOUD_SCOPE=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_SCOPE+=(--project="$PROJECT")
  fi
}

# check_stage STAGE: one of the three training stages.
check_stage() {
  case "$1" in
    t2i_pretrain | ti2i_pretrain | finetune) ;;
    *) die "unknown --stage '$1' (expected t2i_pretrain, ti2i_pretrain or finetune)" ;;
  esac
}

# train_command STAGE PRESET WORKDIR [--config.key=value ...]: sets TRAIN_CMD, the training
# command every launcher runs (the config path is relative to the repository root).
train_command() {
  local stage="$1" preset="$2" workdir="$3"
  shift 3
  local arg
  for arg in "$@"; do
    if [[ "$arg" != --config.* ]]; then
      die "extra argument '$arg' is not a --config.key=value override"
    fi
  done
  # shellcheck disable=SC2034  # read by the script that sources this file
  TRAIN_CMD=("${UNIIMAGE_TRAIN:-uniimage-train}" --config "configs/${stage}.py:${preset}" --workdir "$workdir" "$@")
}
