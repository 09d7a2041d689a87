#!/usr/bin/env bash
# Run one command on one GPU host, or on several as one JAX job: on each host (by ssh, in the same checkout
# path) with JAX_COORDINATOR_ADDRESS (the first host), VRFT_NUM_PROCESSES and VRFT_PROCESS_ID set, so the
# command's jax.distributed.initialize() joins them; each host's output in its own log. Ctrl-C or SIGTERM
# sends SIGTERM to the command on every host (training saves its step and exits 0).
#
#   launch/gpu.sh -- python -m vrft_jax.train --config=lvis_fewshot                    # this host, all its GPUs
#   launch/gpu.sh --hosts gpu0,gpu1 --port 8476 -- python -m vrft_jax.train --config=lvis_fewshot:model=7b
#   launch/gpu.sh --dry-run ...                                                        # print the commands
#
# Options: --hosts H1,H2,... (default: this host alone), --port P (coordinator port, default 8476),
# --dir DIR (the checkout on every host, default this one's path, with its .venv), --logdir DIR (default
# logs/gpu), --install (first run `pip install -e ".[gpu]"` into DIR/.venv on every host).
set -euo pipefail

dry_run=0 hosts="" port=8476 dir="$PWD" logdir="logs/gpu" install=0
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --hosts) hosts="$2"; shift ;;
    --port) port="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --logdir) logdir="$2"; shift ;;
    --install) install=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "need -- COMMAND" >&2; exit 2; }
command_line="$(printf '%q ' "$@")"

run() {  # run a command, or print it with --dry-run
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ -z "$hosts" ]; then  # one host: every local GPU is a device of this one process
  [ "$install" = 1 ] && run bash -c "cd $(printf '%q' "$dir") && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gpu]'"
  run "$@"
  exit
fi

IFS=, read -r -a host_list <<<"$hosts"
count=${#host_list[@]}
coordinator="${host_list[0]}:$port"
run mkdir -p "$logdir"
if [ "$install" = 1 ]; then
  for host in "${host_list[@]}"; do
    run ssh "$host" "cd $(printf '%q' "$dir") && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gpu]'"
  done
fi

# shellcheck disable=SC2329  # invoked by the trap below
stop() {
  echo "stopping: SIGTERM to the command on every host" >&2
  for host in "${host_list[@]}"; do run ssh "$host" "pkill -TERM -f 'vrft_jax' || true"; done
  wait
}
trap stop INT TERM

for (( rank = 0; rank < count; rank++ )); do
  host="${host_list[$rank]}"
  remote="cd $(printf '%q' "$dir") && . .venv/bin/activate && JAX_COORDINATOR_ADDRESS=$coordinator"
  remote+=" VRFT_NUM_PROCESSES=$count"
  remote+=" VRFT_PROCESS_ID=$rank $command_line"
  if [ "$dry_run" = 1 ]; then
    echo "$(printf '%q ' ssh "$host" "$remote")> $logdir/host-$rank.log 2>&1 &"
  else
    # shellcheck disable=SC2029  # the command line is built here, on purpose
    ssh "$host" "$remote" >"$logdir/host-$rank.log" 2>&1 &
  fi
done
status=0
[ "$dry_run" = 1 ] || wait || status=$?
exit "$status"
