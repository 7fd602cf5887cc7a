#!/usr/bin/env bash
# Print (or follow) the training log that tpu_train.sh writes on each worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_logs.sh --tpu-name NAME --zone ZONE [options]

Required:
  --tpu-name NAME    TPU node name
  --zone ZONE        TPU zone
Options:
  --project PROJECT  GCP project (default: gcloud's configured project)
  --stage STAGE      only this stage's log (default: every stage's log)
  --worker W         all, or one worker index (default: all; worker 0 is enough for metrics)
  --lines N          lines from the end of each log (default: 50)
  --follow           keep following (needs a single --worker)
  --dry-run          print the commands, run nothing
  -h, --help         this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" STAGE="" WORKER="all" LINES=50 FOLLOW=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --worker) need_value "$1" $#; WORKER="$2"; shift 2 ;;
    --lines) need_value "$1" $#; LINES="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
if [[ -n "$STAGE" ]]; then check_stage "$STAGE"; fi
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker index, got '$WORKER'"
if [[ "$FOLLOW" -eq 1 && "$WORKER" == all ]]; then
  die "--follow needs a single --worker (e.g. --worker 0)"
fi
gcloud_scope

pattern="\$HOME/uniimage_logs/${STAGE:-*}-*.log"
tail_flags="-n $LINES"
if [[ "$FOLLOW" -eq 1 ]]; then tail_flags+=" -F"; fi
remote="tail $tail_flags $pattern"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" "${GCLOUD_SCOPE[@]}" --command="$remote"
