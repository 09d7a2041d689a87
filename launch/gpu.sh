#!/usr/bin/env bash
# Run one command on one GPU host, or on several as one JAX job: on each host (by ssh, in the same checkout
# path) with JAX_COORDINATOR_ADDRESS (the first host), VRFT_NUM_PROCESSES and VRFT_PROCESS_ID set, so the
# command's jax.distributed.initialize() joins them; each host's output in its own log. Ctrl-C or SIGTERM
# sends SIGTERM to the training process on every host, then waits until every one has saved its step and
# exited (a second Ctrl-C sends SIGKILL). The same command again resumes the run from its checkpoint.
#
#   launch/gpu.sh -- python -m vrft_jax.train --config=lvis_fewshot                    # this host, all its GPUs
#   launch/gpu.sh --hosts gpu0,gpu1 --port 8476 -- python -m vrft_jax.train --config=lvis_fewshot:model=7b \
#       --workdir=gs://BUCKET/runs/lvis
#   launch/gpu.sh --dry-run ...                                                        # print the commands
#
# Options: --hosts H1,H2,... (default: this host alone), --port P (coordinator port, default 8476),
# --dir DIR (the checkout on every host, default this one's path, with its .venv), --logdir DIR (default
# logs/gpu; host-N.log), --install (first run `pip install -e ".[gpu]"` into DIR/.venv on every host),
# --name NAME (the job, default gpu), --shared-mount (below).
#
# With several hosts the command's --workdir must be a gs:// URL, or an absolute path on a file system every
# host mounts, declared with --shared-mount (the train command then also gets --config.shared_mount=true);
# anything else is refused before anything starts. The recipe's data and model paths are yours to point there.
# On each host ~/vrft_jax/launch/NAME/rank-N holds the job: pid (the training process), log, rc (its exit
# status). The command runs in DIR; the launcher deletes nothing.
# Environment for the command goes in the command: -- env VRFT_HEARTBEAT_TIMEOUT_S=30 python -m vrft_jax.train ...
set -euo pipefail

dry_run=0 hosts="" port=8476 dir="$PWD" logdir="logs/gpu" install=0 name="gpu" shared_mount=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --hosts) hosts="$2"; shift ;;
    --port) port="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --logdir) logdir="$2"; shift ;;
    --install) install=1 ;;
    --name) name="$2"; shift ;;
    --shared-mount) shared_mount=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "need -- COMMAND" >&2; exit 2; }

host_list=("")  # "": this host, without ssh
[ -z "$hosts" ] || IFS=, read -r -a host_list <<<"$hosts"
count=${#host_list[@]}

workdir="" train=0 previous=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; vrft_jax.train) train=1 ;; esac
  [ "$previous" = --workdir ] && workdir="$arg"
  previous="$arg"
done
if [ "$count" -gt 1 ] && [[ "$workdir" != gs://* ]]; then
  if [ "$shared_mount" = 0 ]; then
    echo "refused: $count hosts need the command's --workdir on storage every host sees: gs://BUCKET/PATH, or an absolute path on a shared mount with --shared-mount (got '${workdir:-none, so runs/NAME on each host}')" >&2
    exit 2
  elif [[ "$workdir" != /* ]]; then
    echo "refused: with --shared-mount the command's --workdir must be an absolute path on the mount (got '${workdir:-none}')" >&2
    exit 2
  fi
fi
[ "$shared_mount" = 1 ] && [ "$train" = 1 ] && set -- "$@" --config.shared_mount=true
command_line="$(printf '%q ' "$@")"

run() {  # run a command, or print it with --dry-run
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on() {  # on() HOST SCRIPT: the command that runs SCRIPT on HOST ("" for this host)
  if [ -z "$1" ]; then printf '%s\n' bash -c "$2"; else printf '%s\n' ssh "$1" "$2"; fi
}
background() {  # background OUT HOST SCRIPT: in its own session (a Ctrl-C reaches only this script), output to
  # OUT ("-": this terminal); or print it with --dry-run. No command or process substitution here: this runs
  # after the stop trap is set, and bash 5.2 can fail parsing one when a signal arrives in the middle of it.
  local out="$1" argv
  if [ -z "$2" ]; then argv=(bash -c "$3"); else argv=(ssh "$2" "$3"); fi
  if [ "$dry_run" = 1 ]; then
    echo "$(printf '%q ' setsid "${argv[@]}")$([ "$out" = - ] || echo ">> $out 2>&1 ")&"
  elif [ "$out" = - ]; then setsid "${argv[@]}" &
  else setsid "${argv[@]}" >>"$out" 2>&1 &
  fi
}
wait_job() {  # the exit status of background job $1, waiting through the traps that interrupt `wait`
  local rc
  while :; do
    rc=0; wait "$1" || rc=$?
    if [ "$rc" -le 128 ] || ! kill -0 "$1" 2>/dev/null; then return "$rc"; fi
  done
}

quoted_dir="$(printf '%q' "$dir")"
# shellcheck disable=SC2088  # expanded on the host
jobs_dir='~/vrft_jax/launch'
ours="ours() { [ -n \"\$1\" ] && { tr '\0' '\n' < /proc/\$1/environ; } 2>/dev/null | grep -qx VRFT_LAUNCH=$name; }"
job() { printf '%s' "$jobs_dir/$name/rank-$1"; }
start_command() {  # start_command RANK: the command, under a supervisor that outlives the connection, its PID
  # (the subshell execs it) in JOB/pid and its exit status in JOB/rc; refused while the job's last process lives
  local j activate="" env=""
  j="$(job "$1")"
  [ "$count" = 1 ] || activate=". .venv/bin/activate; "
  [ "$count" = 1 ] || env=" JAX_COORDINATOR_ADDRESS=${host_list[0]}:$port VRFT_NUM_PROCESSES=$count VRFT_PROCESS_ID=$1"
  local inner="(echo \$BASHPID > $j/pid; exec $command_line); echo \$? > $j/rc.new; mv $j/rc.new $j/rc"
  local s="set -e; mkdir -p $j; cd $quoted_dir; $ours"
  s+="; if ours \"\$(cat $j/pid 2>/dev/null)\"; then echo \"\$(hostname): $name still runs (PID \$(cat $j/pid)): stop it first\" >&2; exit 3; fi"
  s+="; ${activate}export VRFT_LAUNCH=$name$env; rm -f $j/pid $j/supervisor $j/rc"
  s+="; stat -c %s $j/log > $j/offset 2>/dev/null || echo 0 > $j/offset"
  s+="; setsid nohup bash -c $(printf '%q' "echo \$\$ > $j/supervisor; $inner") >> $j/log 2>&1 < /dev/null &"
  s+=" until [ -s $j/pid ] && [ -s $j/supervisor ]; do sleep 0.1; done"
  printf '%s' "$s"
}
follow_command() {  # this launch's output until the supervisor exits, then the command's exit status
  printf '%s' "cd $(job "$1") && tail -c +\$((\$(cat offset) + 1)) --pid=\$(cat supervisor) -f log; exit \$(cat rc 2>/dev/null || echo 255)"
}
stop_command() {  # stop_command RANK SIGNAL: signal the recorded training process, wait until it has exited
  local s
  s="cd $(job "$1") 2>/dev/null || exit 0; $ours; pid=\$(cat pid 2>/dev/null) || exit 0"
  s+="; if ours \$pid; then echo \"\$(hostname): SIG$2 to PID \$pid\"; kill -$2 \$pid; fi"
  s+="; while ours \$pid; do sleep 1; done; sup=\$(cat supervisor)"
  s+="; while [ ! -e rc ] && kill -0 \$sup 2>/dev/null; do sleep 0.2; done"
  printf '%s' "$s"
}
log_of() { if [ "$count" = 1 ]; then echo -; else echo "$logdir/host-$1.log"; fi; }
side_log="-"  # the start and stop commands' own output
[ "$count" = 1 ] || side_log="$logdir/launcher.log"

[ "$count" = 1 ] || run mkdir -p "$logdir"
if [ "$install" = 1 ]; then
  for host in "${host_list[@]}"; do
    mapfile -t argv < <(on "$host" "cd $quoted_dir && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gpu]'")
    run "${argv[@]}"
  done
fi

if [ "$dry_run" = 1 ]; then
  for (( rank = 0; rank < count; rank++ )); do
    background "$side_log" "${host_list[$rank]}" "$(start_command "$rank")"
  done
  for (( rank = 0; rank < count; rank++ )); do
    background "$(log_of "$rank")" "${host_list[$rank]}" "$(follow_command "$rank")"
  done
  echo "# on Ctrl-C or SIGTERM:"
  for (( rank = 0; rank < count; rank++ )); do
    background "$side_log" "${host_list[$rank]}" "$(stop_command "$rank" TERM)"
  done
  exit 0
fi

stop_requested=0
# The trap runs a function: a trap string is parsed when the signal arrives, and bash 5.2 can fail to parse
# `$((...))` there when the signal interrupts its parsing of another expansion (seen under load: "trap: line 2:
# unexpected EOF while looking for matching `)'", exit 2); a function body is parsed once, here.
# shellcheck disable=SC2329  # invoked by the trap below
count_stop_request() { stop_requested=$((stop_requested + 1)); }
# Every command the loops below run is made here, before the trap: after it, no command substitution is parsed
# (the same bash failure when the signal arrives while one is parsed, seen in test_launchers under load).
start_cmds=() follow_cmds=() logs=() stop_term=() stop_kill=()
for (( rank = 0; rank < count; rank++ )); do
  start_cmds+=("$(start_command "$rank")") follow_cmds+=("$(follow_command "$rank")") logs+=("$(log_of "$rank")")
  stop_term+=("$(stop_command "$rank" TERM)") stop_kill+=("$(stop_command "$rank" KILL)")
done
trap count_stop_request INT TERM
starters=() followers=() started=1
for (( rank = 0; rank < count; rank++ )); do
  background "$side_log" "${host_list[$rank]}" "${start_cmds[$rank]}"
  starters+=($!)
done
for pid in "${starters[@]}"; do wait_job "$pid" || started=0; done
[ "$started" = 1 ] || echo "the command did not start on every host (see $side_log)" >&2
if [ "$started" = 1 ]; then
  for (( rank = 0; rank < count; rank++ )); do
    background "${logs[$rank]}" "${host_list[$rank]}" "${follow_cmds[$rank]}"
    followers+=($!)
  done
  while [ "$stop_requested" = 0 ]; do  # until the command has ended on every host, or a stop is asked for
    alive=0
    for pid in "${followers[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break
    sleep 1 & wait $! || true
  done
fi
if [ "$stop_requested" -gt 0 ] || [ "$started" = 0 ]; then
  echo "stopping: SIGTERM to the training process on every host, then waiting until each has saved and exited" >&2
  signal=TERM
  while :; do
    stoppers=()
    for (( rank = 0; rank < count; rank++ )); do
      if [ "$signal" = TERM ]; then stop="${stop_term[$rank]}"; else stop="${stop_kill[$rank]}"; fi
      background "$side_log" "${host_list[$rank]}" "$stop"
      stoppers+=($!)
    done
    asked=$stop_requested
    for pid in "${stoppers[@]}"; do
      while kill -0 "$pid" 2>/dev/null && [ "$stop_requested" = "$asked" ]; do sleep 1 & wait $! || true; done
    done
    [ "$stop_requested" != "$asked" ] && [ "$signal" = TERM ] || break
    echo "asked again: SIGKILL to the training process on every host" >&2
    signal=KILL
  done
  for pid in "${stoppers[@]}"; do wait_job "$pid" || true; done
fi
status=$(( 1 - started ))
for pid in "${followers[@]}"; do wait_job "$pid" || { rc=$?; [ "$status" != 0 ] || status=$rc; }; done
exit "$status"
