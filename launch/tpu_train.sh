#!/usr/bin/env bash
# Run one training stage on every worker of a TPU VM slice (detached, one log file per worker).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_train.sh --tpu-name NAME --zone ZONE --stage STAGE --workdir gs://BUCKET/RUN
                           [options] [-- --config.key=value ...]

Starts `uniimage-train --config configs/STAGE.py:PRESET --workdir WORKDIR [overrides]` on ALL
workers at once (JAX needs every host of the slice). Processes run under nohup; each worker logs
to ~/uniimage_logs/STAGE-<hostname>.log (see launch/tpu_logs.sh). Checkpoints and TensorBoard
logs go to WORKDIR/STAGE/. Rerunning the same command after a preemption resumes from the
stage's latest checkpoint.

Required:
  --tpu-name NAME       TPU node name
  --zone ZONE           TPU zone
  --stage STAGE         t2i_pretrain | ti2i_pretrain | finetune
  --workdir DIR         run directory, gs://... (every host must see the same directory)
Options:
  --project PROJECT     GCP project (default: gcloud's configured project)
  --preset PRESET       config preset after the colon (default: tbac_3b)
  --env KEY=VALUE       extra environment variable on the workers (repeatable), e.g.
                        --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --kill-previous       first stop a training run this script started earlier (by its pid file)
  --allow-local-workdir accept a workdir that is not on gs:// (single-host slices only)
  --dry-run             print the commands, run nothing
  -h, --help            this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" STAGE="" WORKDIR="" PRESET="tbac_3b" KILL_PREVIOUS=0 LOCAL_OK=0
EXTRA_ENV=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR="$2"; shift 2 ;;
    --preset) need_value "$1" $#; PRESET="$2"; shift 2 ;;
    --env)
      need_value "$1" $#
      [[ "$2" == *=* ]] || die "--env needs KEY=VALUE, got '$2'"
      EXTRA_ENV+=("$2"); shift 2 ;;
    --kill-previous) KILL_PREVIOUS=1; shift ;;
    --allow-local-workdir) LOCAL_OK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
require "$STAGE" --stage
require "$WORKDIR" --workdir
check_stage "$STAGE"
if [[ "$WORKDIR" != gs://* && "$LOCAL_OK" -eq 0 ]]; then
  die "--workdir must be a gs:// path so every worker shares it (got '$WORKDIR'); pass --allow-local-workdir for a single-host slice"
fi
train_command "$STAGE" "$PRESET" "$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
gcloud_scope

# The environment a pod needs: JAX finds the other hosts through the TPU metadata server, so the
# explicit coordinator variables must NOT leak in from a login profile; unbuffered Python so the
# log files show progress; a persistent compilation cache shared by all workers and reruns.
ENV_VARS=(PYTHONUNBUFFERED=1 "JAX_COMPILATION_CACHE_DIR=${WORKDIR%/}/jax_cache")
ENV_VARS+=("${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}")

# shellcheck disable=SC2016  # $HOME is expanded by the workers' shell
LOG_DIR='$HOME/uniimage_logs'
LOG_FILE="$LOG_DIR/${STAGE}-\$(hostname).log"
PID_FILE="$LOG_DIR/train.pid"

# pip's --user installs put the uniimage-train entry point in ~/.local/bin.
remote="set -euo pipefail; export PATH=\$HOME/.local/bin:\$PATH; mkdir -p $LOG_DIR; cd \$HOME/uniimage_jax"
if [[ "$KILL_PREVIOUS" -eq 1 ]]; then
  remote+="; if [ -f $PID_FILE ]; then kill \$(cat $PID_FILE) 2>/dev/null || true; sleep 5; fi"
fi
remote+="; unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID"
remote+="; nohup env $(quote_all "${ENV_VARS[@]}") $(quote_all "${TRAIN_CMD[@]}") > $LOG_FILE 2>&1 < /dev/null &"
remote+=" echo \$! > $PID_FILE; echo started on \$(hostname): $LOG_FILE"

run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_SCOPE[@]}" --command="$remote"
echo "# follow: launch/tpu_logs.sh --tpu-name $TPU_NAME --zone $ZONE --stage $STAGE"
