#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N CPU processes, each with cpu_devices/N emulated
# devices, joined through a coordinator on 127.0.0.1 (gloo collectives).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multihost.sh N [--port PORT] [--logdir DIR] [--grace SECONDS]
                                 [--heartbeat SECONDS] -- TRAIN_ARGS...

Starts N processes of `python -m siglip_jax.train TRAIN_ARGS --coordinator 127.0.0.1:PORT
--num_processes N --process_id I`, waits for all of them, and fails if any fails. Process 0's
output goes to the terminal; every process's output goes to DIR/process_I.log.

If a process fails, the others get GRACE seconds (default 30) to notice and exit, then they
are killed; the script exits with the first failing process's code.

  --port PORT        coordinator port (default: a free one)
  --logdir DIR       where the per-process logs go (default: a new temporary folder)
  --grace SECONDS    how long the others may run on after one failed (default 30)
  --heartbeat S      seconds after which JAX counts a silent process as dead (default 20)

Example:
  launch/local_multihost.sh 2 -- --config configs/demo.py:steps=20 --workdir /tmp/mh
EOF
}

die() { echo "local_multihost: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
num="$1"; shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$num'"
port="" logdir="" grace=30 heartbeat=20
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --logdir) logdir="${2:?--logdir needs a value}"; shift 2 ;;
    --grace) grace="${2:?--grace needs a value}"; shift 2 ;;
    --heartbeat) heartbeat="${2:?--heartbeat needs a value}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no train arguments after -- (need at least --config and --workdir)"
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logdir="${logdir:-$(mktemp -d -t siglip_multihost.XXXXXX)}"
mkdir -p "$logdir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo "local_multihost: interrupted; stopping all processes" >&2; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  log="$logdir/process_$i.log"
  args=("$@" --coordinator "127.0.0.1:$port" --num_processes "$num" --process_id "$i"
        --heartbeat_timeout "$heartbeat")
  if [[ $i -eq 0 ]]; then
    "$python" -m siglip_jax.train "${args[@]}" > >(tee "$log") 2>&1 &
  else
    "$python" -m siglip_jax.train "${args[@]}" > "$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local_multihost: started $num processes (coordinator 127.0.0.1:$port, logs in $logdir)" >&2

# How likely an exit code is the cause of a failure rather than a reaction to another's.
cause_rank() {
  if [[ $1 -gt 128 && $1 -ne 134 ]]; then echo 2; elif [[ $1 -gt 128 ]]; then echo 1; else echo 0; fi
}

# Wait for all; after the first failure, give the rest `grace` seconds, then kill them.
first_failure="" failed_code=0 deadline=""
remaining=$num
declare -A done_pids=()
while [[ $remaining -gt 0 ]]; do
  # Failures seen in one poll: a process killed from outside (a signal other than SIGABRT) is
  # taken as the cause, then one that aborted itself (134: e.g. gloo's C++ terminate when a peer
  # vanishes mid-collective), then any other failure.
  round_failure="" round_code=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      code=0
      wait "$pid" || code=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      if [[ $code -ne 0 ]]; then
        echo "local_multihost: process $i exited with code $code" \
             "(log: $logdir/process_$i.log)" >&2
        if [[ -z "$round_failure" ]] || [[ $(cause_rank "$code") -gt $(cause_rank "$round_code") ]]; then
          round_failure=$i round_code=$code
        fi
      fi
    fi
  done
  if [[ -n "$round_failure" && -z "$first_failure" ]]; then
    first_failure=$round_failure failed_code=$round_code deadline=$((SECONDS + grace))
    [[ $remaining -gt 0 ]] && echo "local_multihost: the other processes get ${grace}s to stop" >&2
  fi
  if [[ -n "$deadline" && $SECONDS -ge $deadline && $remaining -gt 0 ]]; then
    echo "local_multihost: killing the $remaining process(es) still running" >&2
    cleanup
    break
  fi
  sleep 0.5
done
trap - EXIT
if [[ -n "$first_failure" ]]; then
  echo "local_multihost: FAILED: process $first_failure exited with code $failed_code;" \
       "last lines of its log:" >&2
  tail -n 5 "$logdir/process_$first_failure.log" >&2 || true
  exit "$failed_code"
fi
echo "local_multihost: all $num processes finished" >&2
