#!/usr/bin/env bash
# Submit launch/slurm_train.sbatch with the node / GPU layout given on the command line.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm_train.sh --stage STAGE --workdir DIR [options] [-- --config.key=value ...]

Submits `sbatch ... launch/slurm_train.sbatch` (srun on every node; JAX auto-detects SLURM).
With --dry-run prints the sbatch command and the srun command the job will run.

Required:
  --stage STAGE         t2i_pretrain | ti2i_pretrain | finetune
  --workdir DIR         run directory on storage every node sees (shared FS or gs://)
Options:
  --preset PRESET       config preset (default: tbac_3b)
  --nodes N             nodes (default: 2)
  --gpus-per-node G     GPUs per node (default: 8)
  --tasks-per gpu|node  one process per GPU (default) or one per node
  --cpus-per-task C     CPUs per process (default: 12 per GPU task, 96 per node task)
  --time T              time limit (default: 48:00:00); SIGTERM comes 5 minutes before it
  --partition P         SLURM partition
  --account A           SLURM account
  --qos Q               SLURM QOS
  --job-name NAME       job name (default: uniimage-STAGE)
  --env KEY=VALUE       extra environment variable for the training processes (repeatable)
  --max-requeues N      times the job requeues itself after a SIGTERM (status 42) or a killed
                        process (128+) before giving up (default: 10; see slurm_train.sbatch)
  --dry-run             print the commands, submit nothing
  -h, --help            this help
USAGE
}

STAGE="" WORKDIR="" PRESET="tbac_3b" NODES=2 GPUS=8 TASKS_PER="gpu" CPUS="" TIME="48:00:00"
PARTITION="" ACCOUNT="" QOS="" JOB_NAME="" MAX_REQUEUES=10 PASS_ENV=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR="$2"; shift 2 ;;
    --preset) need_value "$1" $#; PRESET="$2"; shift 2 ;;
    --nodes) need_value "$1" $#; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$1" $#; GPUS="$2"; shift 2 ;;
    --tasks-per) need_value "$1" $#; TASKS_PER="$2"; shift 2 ;;
    --cpus-per-task) need_value "$1" $#; CPUS="$2"; shift 2 ;;
    --time) need_value "$1" $#; TIME="$2"; shift 2 ;;
    --partition) need_value "$1" $#; PARTITION="$2"; shift 2 ;;
    --account) need_value "$1" $#; ACCOUNT="$2"; shift 2 ;;
    --qos) need_value "$1" $#; QOS="$2"; shift 2 ;;
    --job-name) need_value "$1" $#; JOB_NAME="$2"; shift 2 ;;
    --env) need_value "$1" $#; PASS_ENV+=(--env "$2"); shift 2 ;;
    --max-requeues) need_value "$1" $#; MAX_REQUEUES="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$STAGE" --stage
require "$WORKDIR" --workdir
check_stage "$STAGE"
[[ "$NODES" =~ ^[0-9]+$ && "$NODES" -ge 1 ]] || die "--nodes must be a positive number, got '$NODES'"
[[ "$GPUS" =~ ^[0-9]+$ && "$GPUS" -ge 1 ]] || die "--gpus-per-node must be a positive number, got '$GPUS'"
case "$TASKS_PER" in
  gpu) TASKS_PER_NODE="$GPUS"; CPUS="${CPUS:-12}" ;;
  node) TASKS_PER_NODE=1; CPUS="${CPUS:-96}" ;;
  *) die "--tasks-per must be 'gpu' or 'node', got '$TASKS_PER'" ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SBATCH_SCRIPT="$REPO_ROOT/launch/slurm_train.sbatch"
# --chdir: the job runs in the repository root (configs/ paths, launch/lib.sh).
sbatch_cmd=(sbatch --chdir="$REPO_ROOT" --job-name="${JOB_NAME:-uniimage-$STAGE}" --nodes="$NODES"
  --gpus-per-node="$GPUS" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS"
  --time="$TIME")
if [[ -n "$PARTITION" ]]; then sbatch_cmd+=(--partition="$PARTITION"); fi
if [[ -n "$ACCOUNT" ]]; then sbatch_cmd+=(--account="$ACCOUNT"); fi
if [[ -n "$QOS" ]]; then sbatch_cmd+=(--qos="$QOS"); fi
job_args=(--stage "$STAGE" --workdir "$WORKDIR" --preset "$PRESET" --tasks-per "$TASKS_PER"
  --gpus-per-node "$GPUS" --max-requeues "$MAX_REQUEUES" "${PASS_ENV[@]+"${PASS_ENV[@]}"}")
if [[ ${#OVERRIDES[@]} -gt 0 ]]; then job_args+=(-- "${OVERRIDES[@]}"); fi

run "${sbatch_cmd[@]}" "$SBATCH_SCRIPT" "${job_args[@]}"
if [[ "$DRY_RUN" -eq 1 ]]; then
  echo "# inside the job, srun starts $((NODES * TASKS_PER_NODE)) processes over the $NODES nodes:"
  SLURM_GPUS_ON_NODE="$GPUS" bash "$SBATCH_SCRIPT" --dry-run "${job_args[@]}"
fi
