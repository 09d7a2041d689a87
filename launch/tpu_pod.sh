#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice: create the slice (or reuse it), ship this checkout's
# code to every worker and install it there, start the command on all workers at once (each worker's output in
# its own log), and on Ctrl-C or SIGTERM stop it: SIGTERM to the training process on every worker, then wait
# until every one has saved its step and exited. The same command again resumes the run from its checkpoint.
#
#   launch/tpu_pod.sh --name rft --zone us-central2-b --type v4-16 -- \
#       python -m vrft_jax.train --config=lvis_fewshot:model=7b --workdir=gs://BUCKET/runs/lvis
#   launch/tpu_pod.sh --dry-run ...        # print every command instead of running it
#
# Options: --project P, --version RUNTIME (default tpu-ubuntu2204-base), --spot, --workers N (default: from
# the type), --logdir DIR (default logs/NAME; each worker's output is appended to DIR/worker-N.log), --delete
# (delete the slice once the command has exited on every worker), --venv DIR (a virtualenv that already exists
# on every worker, e.g. in the image, instead of one installed per code version), --shared-mount (below).
#
# Storage: each worker has its own disk. On a slice of several workers the command's --workdir (checkpoints,
# metrics, model) must be a gs:// URL, or an absolute path on a file system mounted on every worker, declared
# with --shared-mount (the train command then also gets --config.shared_mount=true); anything else is refused
# before the slice is touched. The recipe's data and model paths (data.path, eval.path, model.checkpoint) are
# yours to point at gs:// or at the mount in the same way.
#
# On every worker, under ~/vrft_jax (the command's working directory: relative paths such as runs/, data/ and
# checkpoints/ resolve there; the launcher never deletes anything):
#   code-VERSION/  one commit's code (VERSION: its sha, and the working tree's hash when that has changes),
#                  extracted once, with its .venv; code -> the latest launch's
#   launch/NAME/   the job: pid (the training process), log (its output), rc (its exit status)
# Each worker gets VRFT_DISTRIBUTED=1: the command calls jax.distributed.initialize(), which finds the slice's
# other workers itself. A second Ctrl-C while stopping sends SIGKILL instead (the step in progress is lost).
# Environment for the command goes in the command: -- env VRFT_HEARTBEAT_TIMEOUT_S=30 python -m vrft_jax.train ...
set -euo pipefail

dry_run=0 name="" zone="" type="" project="" version="tpu-ubuntu2204-base" spot=0 workers="" logdir="" delete=0
venv="" shared_mount=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
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
    --venv) venv="$2"; shift ;;
    --shared-mount) shared_mount=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$type" ] && [ $# -gt 0 ] || { echo "need --name, --zone, --type and -- COMMAND" >&2; exit 2; }
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

# The command's workdir must be one every worker sees (refused here, before anything is created).
workdir="" train=0 previous=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; vrft_jax.train) train=1 ;; esac
  [ "$previous" = --workdir ] && workdir="$arg"
  previous="$arg"
done
if [ "$workers" -gt 1 ] && [[ "$workdir" != gs://* ]]; then
  if [ "$shared_mount" = 0 ]; then
    echo "refused: a slice of $workers workers needs the command's --workdir on storage every worker sees: gs://BUCKET/PATH, or an absolute path on a shared mount with --shared-mount (got '${workdir:-none, so runs/NAME on each worker}')" >&2
    exit 2
  elif [[ "$workdir" != /* ]]; then
    echo "refused: with --shared-mount the command's --workdir must be an absolute path on the mount (got '${workdir:-none}')" >&2
    exit 2
  fi
fi
[ "$shared_mount" = 1 ] && [ "$train" = 1 ] && set -- "$@" --config.shared_mount=true
command_line="$(printf '%q ' "$@")"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

run() {  # run a command, or print it with --dry-run
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
background() {  # run a command in the background in its own session (a Ctrl-C at the terminal reaches only this
  # script, which stops the workers itself), its output to file $1; or print it with --dry-run
  local out="$1"; shift
  if [ "$dry_run" = 1 ]; then echo "$(printf '%q ' setsid "$@")>> $out 2>&1 &"; else setsid "$@" >>"$out" 2>&1 & fi
}
wait_job() {  # the exit status of background job $1, waiting through the traps that interrupt `wait`
  local rc
  while :; do
    rc=0; wait "$1" || rc=$?
    if [ "$rc" -le 128 ] || ! kill -0 "$1" 2>/dev/null; then return "$rc"; fi
  done
}

# The code: one directory per version on every worker, so a relaunch of the same code reuses it.
repo="$(cd "$(dirname "$0")/.." && pwd)"
sha="$(git -C "$repo" rev-parse --short=12 HEAD)"
scratch="$(mktemp -d)"  # a scratch index for the working tree's files (the repository's own index is left alone)
GIT_INDEX_FILE="$scratch/index" git -C "$repo" read-tree HEAD
GIT_INDEX_FILE="$scratch/index" git -C "$repo" add -A  # tracked and untracked files, .gitignore applied
tree="$(GIT_INDEX_FILE="$scratch/index" git -C "$repo" write-tree)"
rm -f "$scratch/index"; rmdir "$scratch"
code="code-$sha"
[ "$tree" = "$(git -C "$repo" rev-parse 'HEAD^{tree}')" ] || code="code-$sha-tree-${tree:0:12}"
# shellcheck disable=SC2088  # expanded on the worker
root='~/vrft_jax'
job="launch/$name"

# A dry run prints the create command too (it cannot ask whether the slice exists without running gcloud).
if [ "$dry_run" = 1 ] || ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

archive="/tmp/vrft_jax-$code.tar.gz"
run git -C "$repo" archive --format=tar.gz -o "$archive" "$tree"
run "${gcloud_tpu[@]}" scp "$archive" "$name:~/vrft_jax-$code.tar.gz" "${where[@]}" --worker=all

# A process is the job's when it carries VRFT_LAUNCH=NAME: a stale pid file never signals another process.
ours="ours() { [ -n \"\$1\" ] && { tr '\0' '\n' < /proc/\$1/environ; } 2>/dev/null | grep -qx VRFT_LAUNCH=$name; }"
if [ -n "$venv" ]; then
  activate="$venv/bin/activate" install=":"
else
  activate="$code/.venv/bin/activate"
  install="[ -e $code/.venv/.installed ] || { python3 -m venv $code/.venv && $code/.venv/bin/pip install -q --upgrade pip"
  install+=" && $code/.venv/bin/pip install -q -e './${code}[tpu]' && touch $code/.venv/.installed; }"
fi
setup="set -e; mkdir -p $root/$job; cd $root; $ours; mv -f ~/vrft_jax-$code.tar.gz $code.tar.gz"
setup+="; [ -d $code ] || { new=\$(mktemp -d $code.XXXXXX); tar -xzf $code.tar.gz -C \$new; mv -T \$new $code; }"
setup+="; ln -sfn $code code; $install"
setup+="; if ours \"\$(cat $job/pid 2>/dev/null)\"; then echo \"\$(hostname): $name still runs (PID \$(cat $job/pid)): stop it first (Ctrl-C or SIGTERM to its launcher)\" >&2; exit 3; fi"
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"

# Start: a supervisor in its own session (it outlives the ssh connection) runs the command with its PID in
# launch/NAME/pid (the subshell execs the command, so the PID is the training process's) and writes its exit
# status to launch/NAME/rc; the log keeps every launch's output (offset: where this launch's begins).
inner="(echo \$BASHPID > $job/pid; exec $command_line); echo \$? > $job/rc.new; mv $job/rc.new $job/rc"
start="set -e; cd $root; . $activate; export PYTHONPATH=\$PWD/$code\${PYTHONPATH:+:\$PYTHONPATH} VRFT_DISTRIBUTED=1 VRFT_LAUNCH=$name"
start+="; rm -f $job/pid $job/supervisor $job/rc; stat -c %s $job/log > $job/offset 2>/dev/null || echo 0 > $job/offset"
start+="; setsid nohup bash -c $(printf '%q' "echo \$\$ > $job/supervisor; $inner") >> $job/log 2>&1 < /dev/null &"
start+=" until [ -s $job/pid ] && [ -s $job/supervisor ]; do sleep 0.1; done"
# Follow: this launch's output until the supervisor exits, then the command's exit status.
follow="cd $root/$job && tail -c +\$((\$(cat offset) + 1)) --pid=\$(cat supervisor) -f log; exit \$(cat rc 2>/dev/null || echo 255)"
# Stop: signal $1 to the recorded training process, then wait until it has exited and its status is written.
stop_command() {
  local s="cd $root/$job 2>/dev/null || exit 0; $ours; pid=\$(cat pid 2>/dev/null) || exit 0"
  s+="; if ours \$pid; then echo \"\$(hostname): SIG$1 to PID \$pid\"; kill -$1 \$pid; fi"
  s+="; while ours \$pid; do sleep 1; done; sup=\$(cat supervisor)"
  s+="; while [ ! -e rc ] && kill -0 \$sup 2>/dev/null; do sleep 0.2; done"
  printf '%s' "$s"
}

run mkdir -p "$logdir"
if [ "$dry_run" = 1 ]; then
  background "$logdir/launcher.log" "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$start"
  for (( worker = 0; worker < workers; worker++ )); do
    background "$logdir/worker-$worker.log" "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$follow"
  done
  echo "# on Ctrl-C or SIGTERM:"
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$(stop_command TERM)"
  [ "$delete" = 1 ] && run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
  exit 0
fi

stop_requested=0
# The trap runs a function: a trap string is parsed when the signal arrives, and bash 5.2 can fail to parse
# `$((...))` there when the signal interrupts its parsing of another expansion (seen under load: "trap: line 2:
# unexpected EOF while looking for matching `)'", exit 2); a function body is parsed once, here.
# shellcheck disable=SC2329  # invoked by the trap below
count_stop_request() { stop_requested=$((stop_requested + 1)); }
# The stop commands are made here, before the trap: after it, no command substitution is parsed (the same bash
# failure when the signal arrives while one is parsed).
stop_term="$(stop_command TERM)" stop_kill="$(stop_command KILL)"
trap count_stop_request INT TERM
started=1
background "$logdir/launcher.log" "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$start"
wait_job $! || { started=0; echo "the command did not start on every worker (see $logdir/launcher.log)" >&2; }
followers=()
if [ "$started" = 1 ]; then
  for (( worker = 0; worker < workers; worker++ )); do
    background "$logdir/worker-$worker.log" "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$follow"
    followers+=($!)
  done
  while [ "$stop_requested" = 0 ]; do  # until the command has ended on every worker, or a stop is asked for
    alive=0
    for pid in "${followers[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break
    sleep 1 & wait $! || true
  done
fi
if [ "$stop_requested" -gt 0 ] || [ "$started" = 0 ]; then
  echo "stopping: SIGTERM to the training process on every worker, then waiting until each has saved and exited" >&2
  background "$logdir/launcher.log" "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$stop_term"
  stopper=$! killed=0
  while kill -0 "$stopper" 2>/dev/null; do
    if [ "$stop_requested" -gt 1 ] && [ "$killed" = 0 ]; then
      echo "asked again: SIGKILL to the training process on every worker" >&2
      "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$stop_kill" >>"$logdir/launcher.log" 2>&1 || true
      killed=1
    fi
    sleep 1 & wait $! || true
  done
  wait_job "$stopper" || true
fi
status=$(( 1 - started ))
for pid in "${followers[@]}"; do wait_job "$pid" || { rc=$?; [ "$status" != 0 ] || status=$rc; }; done
[ "$delete" = 1 ] && run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
exit "$status"
