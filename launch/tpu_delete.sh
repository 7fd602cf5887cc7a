#!/usr/bin/env bash
# Delete a TPU slice and its queued resource (checkpoints on gs:// are kept).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_delete.sh --tpu-name NAME --zone ZONE [options]

Deletes the queued resource and, with it (--force), the TPU VMs. Data on the workers' disks
(logs under ~/uniimage_logs) is lost; the workdir on gs:// is not touched.

Required:
  --tpu-name NAME    TPU node name
  --zone ZONE        TPU zone
Options:
  --project PROJECT  GCP project (default: gcloud's configured project)
  --qr-id ID         queued-resource id (default: NAME)
  --yes              do not ask for confirmation
  --dry-run          print the command, run nothing
  -h, --help         this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" QR_ID="" YES=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --qr-id) need_value "$1" $#; QR_ID="$2"; shift 2 ;;
    --yes) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
QR_ID="${QR_ID:-$TPU_NAME}"
gcloud_scope

if [[ "$DRY_RUN" -eq 0 && "$YES" -eq 0 ]]; then
  if [[ ! -t 0 ]]; then
    die "refusing to delete '$TPU_NAME' without confirmation; pass --yes"
  fi
  read -r -p "Delete TPU '$TPU_NAME' (queued resource '$QR_ID') in $ZONE? [y/N] " answer
  [[ "$answer" == y || "$answer" == Y ]] || die "not deleted"
fi
run gcloud compute tpus queued-resources delete "$QR_ID" "${GCLOUD_SCOPE[@]}" --force --quiet
