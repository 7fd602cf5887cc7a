#!/usr/bin/env bash
# Show a TPU slice's provisioning state and, with --processes, whether training runs on each worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_status.sh --tpu-name NAME --zone ZONE [options]

Required:
  --tpu-name NAME    TPU node name
  --zone ZONE        TPU zone
Options:
  --project PROJECT  GCP project (default: gcloud's configured project)
  --qr-id ID         queued-resource id (default: NAME)
  --processes        also ssh to all workers and report the training process started by tpu_train.sh
  --dry-run          print the commands, run nothing
  -h, --help         this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" QR_ID="" PROCESSES=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --qr-id) need_value "$1" $#; QR_ID="$2"; shift 2 ;;
    --processes) PROCESSES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
QR_ID="${QR_ID:-$TPU_NAME}"
gcloud_scope

run gcloud compute tpus queued-resources describe "$QR_ID" "${GCLOUD_SCOPE[@]}" --format="value(state.state)"
run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_SCOPE[@]}" \
  --format="table(name.basename(),acceleratorType,state,health)"
if [[ "$PROCESSES" -eq 1 ]]; then
  # shellcheck disable=SC2016  # expanded by the workers' shell
  remote='pid_file=$HOME/uniimage_logs/train.pid; if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then echo "$(hostname): training running (pid $(cat "$pid_file"))"; else echo "$(hostname): no training process"; fi'
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_SCOPE[@]}" --command="$remote"
fi
