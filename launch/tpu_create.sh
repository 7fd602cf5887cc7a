#!/usr/bin/env bash
# Request a Cloud TPU slice as a queued resource (the way to get multi-host pods, spot or reserved).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_create.sh --tpu-name NAME --zone ZONE [options]

Creates a queued resource that provisions a TPU VM slice named NAME.

Required:
  --tpu-name NAME            TPU node name (also the queued-resource id unless --qr-id is given)
  --zone ZONE                e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)
Options:
  --project PROJECT          GCP project (default: gcloud's configured project)
  --accelerator-type TYPE    slice type (default: v5p-64)
  --runtime-version VERSION  TPU VM image (default: chosen from the accelerator type:
                             v5p -> v2-alpha-tpuv5, v5litepod -> v2-alpha-tpuv5-lite,
                             v6e -> v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base)
  --qr-id ID                 queued-resource id (default: NAME)
  --spot                     spot capacity (preemptible; resume by rerunning tpu_train.sh)
  --reserved                 use the project's reservation
  --valid-until DURATION     give up if not provisioned within DURATION (e.g. 6h)
  --dry-run                  print the gcloud command, run nothing
  -h, --help                 this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" ACCEL="v5p-64" RUNTIME="" QR_ID="" SPOT=0 RESERVED=0 VALID_UNTIL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$1" $#; ACCEL="$2"; shift 2 ;;
    --runtime-version) need_value "$1" $#; RUNTIME="$2"; shift 2 ;;
    --qr-id) need_value "$1" $#; QR_ID="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --valid-until) need_value "$1" $#; VALID_UNTIL="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
if [[ "$SPOT" -eq 1 && "$RESERVED" -eq 1 ]]; then
  die "--spot and --reserved are mutually exclusive"
fi
if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *) die "no default --runtime-version for accelerator type '$ACCEL'; pass --runtime-version" ;;
  esac
fi
QR_ID="${QR_ID:-$TPU_NAME}"
gcloud_scope

cmd=(gcloud compute tpus queued-resources create "$QR_ID"
  --node-id="$TPU_NAME" "${GCLOUD_SCOPE[@]}"
  --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
if [[ "$SPOT" -eq 1 ]]; then cmd+=(--spot); fi
if [[ "$RESERVED" -eq 1 ]]; then cmd+=(--reserved); fi
if [[ -n "$VALID_UNTIL" ]]; then cmd+=(--valid-until-duration="$VALID_UNTIL"); fi
run "${cmd[@]}"
echo "# then wait for state ACTIVE: launch/tpu_status.sh --tpu-name $TPU_NAME --zone $ZONE"
