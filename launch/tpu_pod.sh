#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice: create the slice (or reuse it), copy this checkout
# to every worker, install the pinned `tpu` extra there, run the command on all workers at once (each worker's
# output in its own log), and on Ctrl-C or SIGTERM send SIGTERM to the command on every worker (training
# saves its step and exits 0; the same command resumes it).
#
#   launch/tpu_pod.sh --name rft --zone us-central2-b --type v4-16 -- \
#       python -m vrft_jax.train --config=lvis_fewshot:model=7b
#   launch/tpu_pod.sh --dry-run ...        # print every command instead of running it
#
# Options: --project P, --version RUNTIME (default tpu-ubuntu2204-base), --spot, --workers N (default: from
# the type), --logdir DIR (default logs/NAME), --delete (delete the slice when the command ends).
# Every worker gets VRFT_DISTRIBUTED=1: the command calls jax.distributed.initialize(), which finds the
# slice's other workers itself.
set -euo pipefail

dry_run=0 name="" zone="" type="" project="" version="tpu-ubuntu2204-base" spot=0 workers="" logdir="" delete=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --type) type="$2"; shift ;;
    --project) project="$2"; shift ;;
    --version) version="$2"; shift ;;
    --spot) spot=1 ;;
    --workers) workers="$2"; shift ;;
    --logdir) logdir="$2"; shift ;;
    --delete) delete=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$type" ] && [ $# -gt 0 ] || { echo "need --name, --zone, --type and -- COMMAND" >&2; exit 2; }
command_line="$(printf '%q ' "$@")"
logdir="${logdir:-logs/$name}"

# Workers (hosts) of a slice: v4 and v5p count TensorCores, 8 per host; v5e and v6e count chips, 8 on a
# single-host slice and 4 per host beyond it.
if [ -z "$workers" ]; then
  generation="${type%-*}" size="${type##*-}"
  case "$generation" in
    v4|v5p) workers=$(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod|v5e|v6e) workers=$(( size > 8 ? size / 4 : 1 )) ;;
    *) echo "unknown TPU type $type; give --workers" >&2; exit 2 ;;
  esac
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

run() {  # run a command, or print it with --dry-run
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# A dry run prints the create command too (it cannot ask whether the slice exists without running gcloud).
if [ "$dry_run" = 1 ] || ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

archive="/tmp/vrft_jax-$name.tar.gz"
run git archive --format=tar.gz -o "$archive" HEAD
run "${gcloud_tpu[@]}" scp "$archive" "$name:~/vrft_jax.tar.gz" "${where[@]}" --worker=all
setup="rm -rf ~/vrft_jax && mkdir -p ~/vrft_jax && tar -xzf ~/vrft_jax.tar.gz -C ~/vrft_jax && cd ~/vrft_jax"
setup+=" && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"

# shellcheck disable=SC2329  # invoked by the trap below
stop() {
  echo "stopping: SIGTERM to the command on every worker" >&2
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "pkill -TERM -f 'vrft_jax' || true"
  wait
}
trap stop INT TERM

run mkdir -p "$logdir"
for (( worker = 0; worker < workers; worker++ )); do
  remote="cd ~/vrft_jax && . .venv/bin/activate && VRFT_DISTRIBUTED=1 $command_line"
  if [ "$dry_run" = 1 ]; then
    echo "$(printf '%q ' "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$remote")> $logdir/worker-$worker.log 2>&1 &"
  else
    "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$remote" >"$logdir/worker-$worker.log" 2>&1 &
  fi
done
status=0
[ "$dry_run" = 1 ] || wait || status=$?
[ "$delete" = 1 ] && run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
exit "$status"
