#!/usr/bin/env bash
# Run one training stage as an xpk workload on a GKE TPU cluster (for teams that use GKE + xpk).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/xpk/xpk_train.sh --cluster CLUSTER --zone ZONE --stage STAGE --workdir gs://BUCKET/RUN
                               --docker-image IMAGE [options] [-- --config.key=value ...]

Creates `xpk workload create ...` running `uniimage-train` in IMAGE on every host of the slice(s).
Build IMAGE from launch/xpk/Dockerfile (the repo with jax[tpu] installed) and push it to a
registry the cluster can pull from.

Restarts: xpk's JobSet restarts the whole workload (up to --max-restarts times) when a pod ends
with status 42 (uniimage-train stopped on SIGTERM after saving: a preemption, a maintenance
event) or 127-255 (a process killed, or ended by JAX after another was lost), and fails it for
other statuses (1: an error, 2: bad input). The stage resumes from its latest checkpoint in
WORKDIR/STAGE/. The container execs uniimage-train, so SIGTERM reaches it; --grace-period must
cover `stop_check_every` steps plus one checkpoint save. On Spot VMs GKE grants pods 15 s after
a preemption notice whatever the setting (up to 120 s where the node pool is configured so):
there the periodic checkpoints (`checkpoint.every_steps`) are what a preemption falls back on.

Required:
  --cluster CLUSTER      xpk / GKE cluster name
  --zone ZONE            cluster zone
  --stage STAGE          t2i_pretrain | ti2i_pretrain | finetune
  --workdir DIR          gs:// run directory
  --docker-image IMAGE   e.g. us-docker.pkg.dev/PROJECT/REPO/uniimage-jax:latest
Options:
  --project PROJECT      GCP project (default: gcloud's configured project)
  --tpu-type TYPE        slice type (default: v5p-64)
  --num-slices N         number of slices (default: 1)
  --workload NAME        workload name (default: uniimage-STAGE with _ replaced by -)
  --preset PRESET        config preset (default: tbac_3b)
  --max-restarts N       restarts after preemptions / lost processes (default: 10)
  --grace-period S       seconds from SIGTERM to SIGKILL (--termination-grace-period-seconds;
                         default: 300)
  --dry-run              print the command, run nothing
  -h, --help             this help
USAGE
}

CLUSTER="" ZONE="" PROJECT="" STAGE="" WORKDIR="" IMAGE="" TPU_TYPE="v5p-64" NUM_SLICES=1
WORKLOAD="" PRESET="tbac_3b" MAX_RESTARTS=10 GRACE=300 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) need_value "$1" $#; CLUSTER="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR="$2"; shift 2 ;;
    --docker-image) need_value "$1" $#; IMAGE="$2"; shift 2 ;;
    --tpu-type) need_value "$1" $#; TPU_TYPE="$2"; shift 2 ;;
    --num-slices) need_value "$1" $#; NUM_SLICES="$2"; shift 2 ;;
    --workload) need_value "$1" $#; WORKLOAD="$2"; shift 2 ;;
    --preset) need_value "$1" $#; PRESET="$2"; shift 2 ;;
    --max-restarts) need_value "$1" $#; MAX_RESTARTS="$2"; shift 2 ;;
    --grace-period) need_value "$1" $#; GRACE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$CLUSTER" --cluster
require "$ZONE" --zone
require "$STAGE" --stage
require "$WORKDIR" --workdir
require "$IMAGE" --docker-image
check_stage "$STAGE"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR')"
WORKLOAD="${WORKLOAD:-uniimage-${STAGE//_/-}}"
train_command "$STAGE" "$PRESET" "$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
gcloud_scope

[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$MAX_RESTARTS'"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace-period must be a number of seconds, got '$GRACE'"

# exec: uniimage-train replaces the shell xpk starts it from, so xpk's SIGTERM reaches it and its
# exit status is the pod's. UNIIMAGE_RUN_ID: a restarted attempt takes over the stage lock that a
# killed process 0 of the previous attempt left behind.
container_cmd="cd /app && exec env PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$(quote "${WORKDIR%/}/jax_cache") UNIIMAGE_RUN_ID=$(quote "xpk-$WORKLOAD") $(quote_all "${TRAIN_CMD[@]}")"
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" \
  --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --docker-image="$IMAGE" \
  --max-restarts="$MAX_RESTARTS" --termination-grace-period-seconds="$GRACE" \
  "${GCLOUD_SCOPE[@]}" --command="$container_cmd"
