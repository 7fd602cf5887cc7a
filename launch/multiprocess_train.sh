#!/usr/bin/env bash
# Plain multi-process launch without a cluster manager: the JAX_* coordinator variables that
# uniimage_jax.train.distributed.maybe_initialize_distributed() passes to jax.distributed.initialize.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage:
  one process of a multi-host run (start it on every host, process ids 0..N-1):
    launch/multiprocess_train.sh --coordinator HOST:PORT --num-processes N --process-id I \
        --stage STAGE --workdir DIR [options] [-- --config.key=value ...]
  N processes on this host (testing; each logs to LOG_DIR/process_<i>.log):
    launch/multiprocess_train.sh --local N --stage STAGE --workdir DIR [options] [-- ...]

Exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process.
HOST:PORT is process 0's host and a free port; all hosts must reach it.

Exit status: uniimage-train's (0: finished; 42: stopped on SIGTERM after saving, rerun to resume;
2: bad input; 1: an error; 134: ended by JAX after another process was lost). With --local, a
SIGTERM (or Ctrl-C) to this script goes to every process (they save and exit 42), and when one
process fails the others are killed (a checkpoint needs all of them).

Required:
  --stage STAGE           t2i_pretrain | ti2i_pretrain | finetune
  --workdir DIR           run directory every process sees
  and either --local N, or all of --coordinator, --num-processes, --process-id
Options:
  --preset PRESET         config preset (default: tbac_3b)
  --port PORT             coordinator port with --local (default: 12355)
  --cpu                   with --local: CPU devices, with gloo collectives between processes
  --gpus-per-process K    with --local: process i sees GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES)
  --log-dir DIR           with --local: where process logs go (default: ./uniimage_logs)
  --env KEY=VALUE         extra environment variable (repeatable)
  --dry-run               print the commands, run nothing
  -h, --help              this help
USAGE
}

STAGE="" WORKDIR="" PRESET="tbac_3b" COORD="" NPROC="" PID="" LOCAL="" PORT=12355 CPU=0
GPUS_PER="" LOG_DIR="./uniimage_logs" EXTRA_ENV=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --workdir) need_value "$1" $#; WORKDIR="$2"; shift 2 ;;
    --preset) need_value "$1" $#; PRESET="$2"; shift 2 ;;
    --coordinator) need_value "$1" $#; COORD="$2"; shift 2 ;;
    --num-processes) need_value "$1" $#; NPROC="$2"; shift 2 ;;
    --process-id) need_value "$1" $#; PID="$2"; shift 2 ;;
    --local) need_value "$1" $#; LOCAL="$2"; shift 2 ;;
    --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --gpus-per-process) need_value "$1" $#; GPUS_PER="$2"; shift 2 ;;
    --log-dir) need_value "$1" $#; LOG_DIR="$2"; shift 2 ;;
    --env)
      need_value "$1" $#
      [[ "$2" == *=* ]] || die "--env needs KEY=VALUE, got '$2'"
      EXTRA_ENV+=("$2"); shift 2 ;;
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
train_command "$STAGE" "$PRESET" "$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
BASE_ENV=(PYTHONUNBUFFERED=1 "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}")

is_count() { [[ "$1" =~ ^[0-9]+$ && "$1" -ge 1 ]]; }

if [[ -z "$LOCAL" ]]; then
  # One process of a multi-host run.
  if [[ "$CPU" -eq 1 || -n "$GPUS_PER" ]]; then
    die "--cpu and --gpus-per-process only apply with --local"
  fi
  require "$COORD" "--coordinator (or --local N)"
  require "$NPROC" --num-processes
  require "$PID" --process-id
  [[ "$COORD" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$COORD'"
  is_count "$NPROC" || die "--num-processes must be a positive number, got '$NPROC'"
  [[ "$PID" =~ ^[0-9]+$ && "$PID" -lt "$NPROC" ]] ||
    die "--process-id must be in 0..$((NPROC - 1)), got '$PID'"
  run env "${BASE_ENV[@]}" "JAX_COORDINATOR_ADDRESS=$COORD" "JAX_NUM_PROCESSES=$NPROC" \
    "JAX_PROCESS_ID=$PID" "${TRAIN_CMD[@]}"
  exit 0
fi

# --local N: N processes on this host.
if [[ -n "$COORD$NPROC$PID" ]]; then
  die "--local cannot be combined with --coordinator / --num-processes / --process-id"
fi
is_count "$LOCAL" || die "--local must be a positive number of processes, got '$LOCAL'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ -n "$GPUS_PER" ]]; then
  is_count "$GPUS_PER" || die "--gpus-per-process must be a positive number, got '$GPUS_PER'"
  [[ "$CPU" -eq 0 ]] || die "--cpu and --gpus-per-process are mutually exclusive"
fi
if [[ "$CPU" -eq 1 ]]; then
  # CPU processes exchange collectives through gloo (JAX's default CPU collectives are in-process).
  BASE_ENV+=(JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)
fi

if [[ "$DRY_RUN" -eq 0 ]]; then mkdir -p "$LOG_DIR"; fi
PIDS=()
signal_all() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "-$1" "$p" 2>/dev/null || true; done
}
# A SIGTERM (or Ctrl-C) to this script is a preemption of the whole job: every process gets
# SIGTERM, they agree on a step, save it and exit 42; this script waits for them (below).
trap 'signal_all TERM' TERM INT

for ((i = 0; i < LOCAL; i++)); do
  proc_env=("${BASE_ENV[@]}" "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "JAX_NUM_PROCESSES=$LOCAL"
    "JAX_PROCESS_ID=$i")
  if [[ -n "$GPUS_PER" ]]; then
    proc_env+=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER)) $((i * GPUS_PER + GPUS_PER - 1)))")
  fi
  log="$LOG_DIR/process_$i.log"
  echo "+ $(quote_all env "${proc_env[@]}" "${TRAIN_CMD[@]}") > $(quote "$log") 2>&1 &"
  if [[ "$DRY_RUN" -eq 0 ]]; then
    env "${proc_env[@]}" "${TRAIN_CMD[@]}" >"$log" 2>&1 &
    PIDS+=($!)
  fi
done
if [[ "$DRY_RUN" -eq 0 ]]; then
  # Wait for all. The exit status is uniimage-train's: 0 when all finished, 42 when all stopped
  # on SIGTERM after saving (rerun to resume), else the first failure's. A process that fails
  # leaves the others unable to save (a checkpoint needs every process): they are killed.
  status=0 remaining=$LOCAL ENDED=()
  while [[ "$remaining" -gt 0 ]]; do
    for ((i = 0; i < LOCAL; i++)); do
      if [[ -n "${ENDED[$i]:-}" ]] || kill -0 "${PIDS[$i]}" 2>/dev/null; then continue; fi
      code=0
      wait "${PIDS[$i]}" || code=$?
      ENDED[i]=1
      remaining=$((remaining - 1))
      if [[ "$code" -ne 0 && "$code" -ne 42 ]]; then
        echo "process $i failed (exit status $code); see $LOG_DIR/process_$i.log" >&2
        signal_all KILL
      fi
      if [[ "$status" -eq 0 || ("$status" -eq 42 && "$code" -ne 0) ]]; then status=$code; fi
    done
    sleep 0.2
  done
  exit "$status"
fi
