#!/usr/bin/env bash
# Install JAX for TPU and this repository on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_setup.sh --tpu-name NAME --zone ZONE [options]

Installs "jax[tpu]" and the uniimage_jax package (editable, in ~/uniimage_jax) on ALL workers.
By default the committed HEAD of this checkout is packed with `git archive` and copied to every
worker (uncommitted changes are NOT shipped); --repo-url clones from git instead.

Required:
  --tpu-name NAME       TPU node name
  --zone ZONE           TPU zone
Options:
  --project PROJECT     GCP project (default: gcloud's configured project)
  --repo-url URL        clone this git URL on each worker instead of copying the local checkout
  --ref REF             branch / tag / commit to check out with --repo-url (default: main)
  --jax-spec SPEC       pip requirement for JAX (default: jax[tpu])
  --python PYTHON       Python on the workers (default: python3)
  --dry-run             print the commands, run nothing
  -h, --help            this help
USAGE
}

TPU_NAME="" ZONE="" PROJECT="" REPO_URL="" REF="main" JAX_SPEC="jax[tpu]" PY="python3"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu-name) need_value "$1" $#; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" $#; PROJECT="$2"; shift 2 ;;
    --repo-url) need_value "$1" $#; REPO_URL="$2"; shift 2 ;;
    --ref) need_value "$1" $#; REF="$2"; shift 2 ;;
    --jax-spec) need_value "$1" $#; JAX_SPEC="$2"; shift 2 ;;
    --python) need_value "$1" $#; PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require "$TPU_NAME" --tpu-name
require "$ZONE" --zone
gcloud_scope

# shellcheck disable=SC2088  # the tilde is expanded by the workers' shell, not here
REMOTE_DIR='~/uniimage_jax'
ARCHIVE="uniimage_jax-src.tar.gz"

if [[ -z "$REPO_URL" ]]; then
  REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  LOCAL_ARCHIVE="${TMPDIR:-/tmp}/$ARCHIVE"
  if [[ "$DRY_RUN" -eq 0 && -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "warning: uncommitted changes in $REPO_ROOT are not shipped (git archive HEAD)" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$LOCAL_ARCHIVE" HEAD
  run gcloud compute tpus tpu-vm scp "$LOCAL_ARCHIVE" "${TPU_NAME}:~/${ARCHIVE}" \
    --worker=all "${GCLOUD_SCOPE[@]}"
  fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/$ARCHIVE -C $REMOTE_DIR"
else
  fetch="rm -rf $REMOTE_DIR && git clone $(quote "$REPO_URL") $REMOTE_DIR && git -C $REMOTE_DIR checkout $(quote "$REF")"
fi

remote="set -euo pipefail; $fetch"
remote+="; $PY -m pip install -q -U pip"
remote+="; $PY -m pip install -q -U $(quote "$JAX_SPEC")"
remote+="; $PY -m pip install -q -e $REMOTE_DIR"
# Every worker runs this at once, so the slice's TPU runtime comes up across all hosts.
remote+="; $PY -c 'import jax; print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"local devices\", jax.local_device_count(), \"global\", jax.device_count())'"

run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_SCOPE[@]}" --command="$remote"
