#!/usr/bin/env bash
# Run siglip_jax on Cloud TPU VMs with gcloud: create, setup, run, logs, stop, status, delete.
#
# Every subcommand takes --dry-run: it prints the exact commands, one a line, shell-quoted so
# they can be copy-pasted, and runs nothing. Without --dry-run each command is echoed to stderr
# ("+ ...") and run. `launch/tpu.sh --help` and `launch/tpu.sh CMD --help` describe the flags.
set -euo pipefail

PROG=launch/tpu.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Where things live on every worker (expanded by the worker's shell, hence the literal $HOME).
# shellcheck disable=SC2016
readonly R_REPO='$HOME/siglip_jax'
# shellcheck disable=SC2016
readonly R_VENV='$HOME/siglip_jax_venv'
# shellcheck disable=SC2016
readonly R_LOGS='$HOME/siglip_jax_logs'
readonly R_TARBALL=siglip_jax_src.tar.gz
readonly DEFAULT_PYTHON_VERSION=3.11
readonly DEFAULT_STOP_TIMEOUT=30
readonly DEFAULT_LOG_LINES=100

# ----------------------------------------------------------------------------- help texts

usage_main() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND NAME [options] [--dry-run]

Run siglip_jax on a Cloud TPU VM slice (v4-8 ... v4-1024, also v5e/v5p/v6e) with gcloud.

Commands:
  create NAME   create the TPU VM (or a queued resource with --queued)
  setup  NAME   copy the repo (git archive of HEAD) to all workers, install it with [tpu] extras
  run    NAME   start training on all workers under nohup, logs in ~/siglip_jax_logs/RUN.log
  logs   NAME   show (or --follow) the log of one worker (default 0) or all
  stop   NAME   stop the run on all workers (SIGTERM, then SIGKILL after --timeout s)
  status NAME   describe the TPU VM (or the queued resource with --queued)
  delete NAME   delete the TPU VM (or the queued resource and its node with --queued)
  help [CMD]    this text, or a command's

Common options (every command):
  --project P   Google Cloud project        (env SIGLIP_TPU_PROJECT)
  --zone Z      zone, e.g. us-central2-b    (env SIGLIP_TPU_ZONE)
  --dry-run     print the exact commands, one a line, and run nothing
  -h, --help    help for the command

Typical session:
  export SIGLIP_TPU_PROJECT=my-project SIGLIP_TPU_ZONE=us-central2-b
  launch/tpu.sh create my-tpu --type v4-32
  launch/tpu.sh setup my-tpu
  launch/tpu.sh run my-tpu --config configs/demo.py --workdir gs://my-bucket/demo
  launch/tpu.sh logs my-tpu --follow
  launch/tpu.sh stop my-tpu
  launch/tpu.sh delete my-tpu
EOF
}

usage_create() {
  cat <<'EOF'
Usage: launch/tpu.sh create NAME --type TYPE [--spot | --reserved] [--queued]
                            [--runtime-version V] [--project P] [--zone Z] [--dry-run]

Create a TPU VM slice named NAME (gcloud compute tpus tpu-vm create).

  --type TYPE            accelerator type, e.g. v4-8, v4-32, v4-256   (env SIGLIP_TPU_TYPE)
  --runtime-version V    TPU software version                          (env SIGLIP_TPU_RUNTIME)
                         default by type: v2/v3/v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                 Spot VMs: cheap, may be preempted at any time
  --reserved             use the project's reserved capacity
  --queued               ask for the slice as a queued resource (gcloud compute tpus
                         queued-resources create NAME --node-id NAME): waits in a queue until
                         capacity is free; see `status NAME --queued`, `delete NAME --queued`
EOF
}

usage_setup() {
  cat <<'EOF'
Usage: launch/tpu.sh setup NAME [--ref REF] [--python-version V] [--project P] [--zone Z]
                           [--dry-run]

Copy the repo to every worker and install it (run it again after each commit you want to use).

  1. git archive REF (default HEAD: committed files only) into a local tarball
  2. gcloud compute tpus tpu-vm scp the tarball to all workers (--worker=all)
  3. on all workers: unpack into ~/siglip_jax, create the venv ~/siglip_jax_venv with Python V
     (default 3.11; uv fetches it: the TPU images ship 3.10 and jax>=0.7 needs >=3.11) and
     install '.[tpu]' into it. Refuses while a run is still going on a worker.

  --ref REF              git revision to ship (default HEAD)
  --python-version V     Python version of the venv on the workers (default 3.11)
EOF
}

usage_run() {
  cat <<'EOF'
Usage: launch/tpu.sh run NAME --config CONFIG [--workdir DIR] [--name RUN] [--type TYPE]
                         [--skip-plan] [--project P] [--zone Z] [--dry-run] [-- OVERRIDES...]

Start `python -m siglip_jax.train --config CONFIG --workdir DIR OVERRIDES...` on all workers
of NAME at once, detached (setsid nohup), each writing ~/siglip_jax_logs/RUN.log and RUN.pid.

  --config CONFIG        config file inside the repo, e.g. configs/siglip_b16_224.py[:arg]
  --workdir DIR          where checkpoints and metrics go; must be shared by all workers, so
                         gs://BUCKET/... on a multi-host slice. Default: $SIGLIP_TPU_BUCKET/
                         <config name> (env SIGLIP_TPU_BUCKET=gs://my-bucket)
  --name RUN             run name for the log and pid files (default: run)
  --type TYPE            slice type for the planner, e.g. v4-32          (env SIGLIP_TPU_TYPE)
  --skip-plan            do not run the planner (python -m siglip_jax.plan) before launching
  -- OVERRIDES...        config overrides passed to the trainer verbatim, e.g.
                         -- --config.total_steps=1000 --config.input.data.pattern='gs://my-bucket/web li/*.tar'

The planner runs locally first (it needs --type or SIGLIP_TPU_TYPE; --skip-plan skips it);
a failing plan stops the launch.
EOF
}

usage_logs() {
  cat <<'EOF'
Usage: launch/tpu.sh logs NAME [--worker W] [--follow] [--lines N] [--name RUN]
                          [--project P] [--zone Z] [--dry-run]

Show the last N lines of ~/siglip_jax_logs/RUN.log on a worker.

  --worker W             worker index (default 0), a list/range like 1,3 or 0-3, or all
  --follow, -f           keep printing new lines (tail -F) until Ctrl-C
  --lines N              how many lines to show first (default 100)
  --name RUN             run name given to `run` (default: run)
EOF
}

usage_stop() {
  cat <<'EOF'
Usage: launch/tpu.sh stop NAME [--name RUN] [--timeout S] [--project P] [--zone Z] [--dry-run]

Stop the run on all workers: SIGTERM to its process group, SIGKILL if it is still alive after
S seconds (default 30). Workers without a live run just say so.

  --name RUN             run name given to `run` (default: run)
  --timeout S            seconds to wait between SIGTERM and SIGKILL (default 30)
EOF
}

usage_status() {
  cat <<'EOF'
Usage: launch/tpu.sh status NAME [--queued] [--project P] [--zone Z] [--dry-run]

Describe the TPU VM (state, accelerator type, runtime), or with --queued the queued resource
(wait for state ACTIVE before `setup`).
EOF
}

usage_delete() {
  cat <<'EOF'
Usage: launch/tpu.sh delete NAME [--queued] [--yes] [--project P] [--zone Z] [--dry-run]

Delete the TPU VM. With --queued, delete the queued resource NAME and its node (--force).
Without --queued, a real delete first checks whether NAME is a queued resource (gcloud compute
tpus queued-resources describe) and deletes it that way if so.

  --queued               the slice was created with `create --queued`
  --yes                  do not ask for confirmation (gcloud --quiet)
EOF
}

# ----------------------------------------------------------------------------- helpers

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

note() {
  echo "$PROG: note: $*" >&2
}

# POSIX single-quoting: the word as is when it is made only of safe characters.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Like shquote, but keeps `--flag=` outside the quotes for readability.
quote_arg() {
  local a=$1
  if [[ $a =~ ^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shquote "${BASH_REMATCH[2]}"
  else
    shquote "$a"
  fi
}

quote_cmd() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote_arg "$a")"
  done
  printf '%s\n' "$out"
}

DRY_RUN=0

# Print the command (--dry-run) or echo it to stderr and run it.
run_cmd() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

need_value() {  # need_value FLAG [VALUE ...]: the flag must be followed by a value
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "$CMD: $1 needs a value"
  fi
}

PROJECT=""
ZONE=""
NAME=""
POSITIONALS=()

# Handles the options every command has; returns 1 if $1 is not one of them.
# Sets SHIFT to the number of arguments consumed.
common_opt() {
  SHIFT=1
  case "$1" in
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) "usage_$CMD"; exit 0 ;;
    --) return 1 ;;
    -*) die "$CMD: unknown option '$1' (see $PROG $CMD --help)" ;;
    *) POSITIONALS+=("$1") ;;
  esac
}

# Split --flag=value into --flag value (up to a bare --).
ARGS=()
normalize_args() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --) ARGS+=("$@"); return ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

resolve_name() {
  ((${#POSITIONALS[@]} >= 1)) || die "$CMD: missing the TPU name (usage: $PROG $CMD NAME ...)"
  ((${#POSITIONALS[@]} == 1)) || die "$CMD: unexpected argument '${POSITIONALS[1]}'"
  NAME=${POSITIONALS[0]}
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "$CMD: bad TPU name '$NAME': use lowercase letters, digits and '-', starting with a letter"
}

resolve_settings() {
  PROJECT=${PROJECT:-${SIGLIP_TPU_PROJECT:-}}
  ZONE=${ZONE:-${SIGLIP_TPU_ZONE:-}}
  [[ -n $PROJECT ]] || die "$CMD: no project: pass --project PROJECT or set SIGLIP_TPU_PROJECT"
  [[ -n $ZONE ]] || die "$CMD: no zone: pass --zone ZONE or set SIGLIP_TPU_ZONE (e.g. us-central2-b)"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "$CMD: gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  fi
}

check_type() {
  [[ $1 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "$CMD: bad accelerator type '$1': expected e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8"
}

default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "$CMD: no default runtime for '$1': pass --runtime-version V or set SIGLIP_TPU_RUNTIME" ;;
  esac
}

check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9_.-]+$ ]] || die "$CMD: bad run name '$1': use letters, digits, '_', '.', '-'"
}

gcloud_ssh() {  # gcloud_ssh WORKER REMOTE_COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------- commands

cmd_create() {
  local type=${SIGLIP_TPU_TYPE:-} runtime=${SIGLIP_TPU_RUNTIME:-} spot=0 reserved=0 queued=0
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --type) need_value "$@"; type=$2; shift 2 ;;
      --runtime-version) need_value "$@"; runtime=$2; shift 2 ;;
      --spot) spot=1; shift ;;
      --reserved) reserved=1; shift ;;
      --queued) queued=1; shift ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  [[ -n $type ]] || die "$CMD: no accelerator type: pass --type TYPE (e.g. v4-32) or set SIGLIP_TPU_TYPE"
  check_type "$type"
  ((spot + reserved < 2)) || die "$CMD: --spot and --reserved exclude each other"
  [[ -n $runtime ]] || runtime=$(default_runtime "$type")
  resolve_settings
  local capacity=()
  ((spot)) && capacity=(--spot)
  ((reserved)) && capacity=(--reserved)
  if ((queued)); then
    run_cmd gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" \
      --project="$PROJECT" --node-id="$NAME" --accelerator-type="$type" \
      --runtime-version="$runtime" ${capacity[@]+"${capacity[@]}"}
    ((DRY_RUN)) || note "queued: wait for state ACTIVE ($PROG status $NAME --queued), then setup"
  else
    run_cmd gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$type" --version="$runtime" ${capacity[@]+"${capacity[@]}"}
  fi
}

cmd_setup() {
  local ref=HEAD pyver=$DEFAULT_PYTHON_VERSION
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --ref) need_value "$@"; ref=$2; shift 2 ;;
      --python-version) need_value "$@"; pyver=$2; shift 2 ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  [[ $pyver =~ ^3\.[0-9]+$ ]] || die "$CMD: bad --python-version '$pyver': expected e.g. 3.11"
  resolve_settings
  if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    if [[ $ref == HEAD && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
      note "uncommitted changes are not shipped: setup copies the committed HEAD"
    fi
  elif ((!DRY_RUN)); then
    die "$CMD: $REPO_ROOT is not a git checkout: setup ships 'git archive $ref'"
  fi
  local tarball="${TMPDIR:-/tmp}/siglip_jax-$NAME.tar.gz"
  local remote
  remote="set -e; for p in \"$R_LOGS\"/*.pid; do if [ -f \"\$p\" ] && kill -0 \"\$(cat \"\$p\")\" 2>/dev/null;"
  remote+=" then echo \"\$(hostname): a run is still going (\$p): stop it first\" >&2; exit 1; fi; done;"
  remote+=" rm -rf \"$R_REPO\"; tar -xzf \"\$HOME/$R_TARBALL\" -C \"\$HOME\"; rm -f \"\$HOME/$R_TARBALL\";"
  remote+=" python3 -m pip install --user --quiet --upgrade uv;"
  remote+=" python3 -m uv venv --clear --python $pyver \"$R_VENV\";"
  remote+=" cd \"$R_REPO\"; python3 -m uv pip install --quiet --python \"$R_VENV/bin/python\" \".[tpu]\";"
  remote+=" \"$R_VENV/bin/python\" -c \"import jax, siglip_jax\";"
  remote+=" echo \"\$(hostname): siglip_jax installed in $R_VENV\""
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz --prefix=siglip_jax/ -o "$tarball" "$ref"
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$R_TARBALL" --zone="$ZONE" \
    --project="$PROJECT" --worker=all
  ((DRY_RUN)) || rm -f "$tarball"
  gcloud_ssh all "$remote"
}

cmd_run() {
  local config="" workdir="" run_name=run type=${SIGLIP_TPU_TYPE:-} skip_plan=0
  local overrides=()
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --config) need_value "$@"; config=$2; shift 2 ;;
      --workdir) need_value "$@"; workdir=$2; shift 2 ;;
      --name) need_value "$@"; run_name=$2; shift 2 ;;
      --type) need_value "$@"; type=$2; shift 2 ;;
      --skip-plan) skip_plan=1; shift ;;
      --config.*) die "$CMD: put config overrides after --: $PROG run NAME --config C -- $1=..." ;;
      --) shift; overrides=("$@"); break ;;
      *) common_opt "$@"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  check_run_name "$run_name"
  [[ -n $config ]] || die "$CMD: no config: pass --config configs/NAME.py"
  local o
  for o in ${overrides[@]+"${overrides[@]}"}; do
    [[ $o == --* ]] || die "$CMD: override '$o' is not a flag: write --config.key=value"
    [[ $o != --dry-run ]] || die "$CMD: --dry-run after -- would go to the trainer: put it before --"
  done
  # The config must be a file of the repo (setup ships the repo): make it repo-relative.
  local cfg_file=${config%%:*} cfg_arg=""
  [[ $config == *:* ]] && cfg_arg=":${config#*:}"
  if [[ $cfg_file != /* && -f $REPO_ROOT/$cfg_file ]]; then
    :  # already relative to the repo
  elif [[ -f $cfg_file ]]; then
    local abs
    abs="$(cd "$(dirname "$cfg_file")" && pwd)/$(basename "$cfg_file")"
    [[ $abs == "$REPO_ROOT"/* ]] ||
      die "$CMD: config $cfg_file is outside the repo $REPO_ROOT (setup ships only the repo)"
    cfg_file=${abs#"$REPO_ROOT"/}
  elif [[ $cfg_file == /* ]]; then
    die "$CMD: config not found: $cfg_file"
  fi
  [[ -f $REPO_ROOT/$cfg_file ]] || die "$CMD: config not found: $cfg_file (relative to $REPO_ROOT)"
  config=$cfg_file$cfg_arg
  if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 &&
    ! git -C "$REPO_ROOT" ls-files --error-unmatch -- "$cfg_file" >/dev/null 2>&1; then
    note "$cfg_file is not committed: the workers only have what setup shipped"
  fi
  if [[ -z $workdir ]]; then
    [[ -n ${SIGLIP_TPU_BUCKET:-} ]] ||
      die "$CMD: no workdir: pass --workdir gs://BUCKET/RUN or set SIGLIP_TPU_BUCKET=gs://BUCKET"
    local stem
    stem=$(basename "$cfg_file" .py)
    workdir="${SIGLIP_TPU_BUCKET%/}/$stem"
  fi
  [[ $workdir == gs://* ]] ||
    note "workdir $workdir is not on gs://: on a multi-host slice all workers must share it"
  resolve_settings

  # 1. The planner, locally, before anything runs on the pod.
  if ((skip_plan)); then
    :
  elif [[ ! -f $REPO_ROOT/siglip_jax/plan.py ]]; then
    note "siglip_jax/plan.py does not exist yet: skipping the planner"
  else
    [[ -n $type ]] ||
      die "$CMD: the planner needs the slice type: pass --type TYPE (or set SIGLIP_TPU_TYPE), or --skip-plan"
    check_type "$type"
    # With libtpu installed locally the planner also compiles the step for the slice.
    local compile=()
    if "${PYTHON:-python3}" -c "import libtpu" >/dev/null 2>&1; then compile=(--compile); fi
    (cd "$REPO_ROOT" && run_cmd "${PYTHON:-python3}" -m siglip_jax.plan --config="$config" \
      --topology="$type" ${compile[@]+"${compile[@]}"} ${overrides[@]+"${overrides[@]}"}) ||
      die "$CMD: the planner rejected $config on $type (skip it with --skip-plan)"
  fi

  # 2. Start the trainer on all workers, detached, one log per worker.
  local train log="$R_LOGS/$run_name.log" pid="$R_LOGS/$run_name.pid" remote
  train=$(quote_cmd -m siglip_jax.train --config="$config" --workdir="$workdir" \
    ${overrides[@]+"${overrides[@]}"})
  remote="mkdir -p \"$R_LOGS\"; cd \"$R_REPO\" || { echo \"\$(hostname): no $R_REPO: run"
  remote+=" $PROG setup $NAME first\" >&2; exit 1; };"
  remote+=" if [ -f \"$pid\" ] && kill -0 \"\$(cat \"$pid\")\" 2>/dev/null; then echo \"\$(hostname):"
  remote+=" $run_name is already running (pid \$(cat \"$pid\")): stop it first\" >&2; exit 1; fi;"
  remote+=" if [ -f \"$log\" ]; then mv \"$log\" \"$log.prev\"; fi;"
  remote+=" PYTHONUNBUFFERED=1 setsid nohup \"$R_VENV/bin/python\" $train > \"$log\" 2>&1 < /dev/null &"
  remote+=" echo \$! > \"$pid\"; echo \"\$(hostname): started $run_name (pid \$!), log $log\""
  gcloud_ssh all "$remote"
}

cmd_logs() {
  local worker=0 follow=0 lines=$DEFAULT_LOG_LINES run_name=run
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --worker) need_value "$@"; worker=$2; shift 2 ;;
      --follow | -f) follow=1; shift ;;
      --lines | -n) need_value "$@"; lines=$2; shift 2 ;;
      --name) need_value "$@"; run_name=$2; shift 2 ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  check_run_name "$run_name"
  [[ $worker =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] ||
    die "$CMD: bad --worker '$worker': expected an index (0), a list/range (1,3 or 0-3) or all"
  [[ $lines =~ ^[0-9]+$ ]] || die "$CMD: bad --lines '$lines': expected a number"
  resolve_settings
  local log="$R_LOGS/$run_name.log" tail_opts="-n $lines"
  ((follow)) && tail_opts+=" -F"
  gcloud_ssh "$worker" "if [ ! -f \"$log\" ]; then echo \"\$(hostname): no log $log\" >&2; exit 1;\
 fi; echo \"== \$(hostname): $log ==\"; tail $tail_opts \"$log\""
}

cmd_stop() {
  local run_name=run timeout=$DEFAULT_STOP_TIMEOUT
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --name) need_value "$@"; run_name=$2; shift 2 ;;
      --timeout) need_value "$@"; timeout=$2; shift 2 ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  check_run_name "$run_name"
  [[ $timeout =~ ^[0-9]+$ ]] || die "$CMD: bad --timeout '$timeout': expected seconds"
  resolve_settings
  local pid="$R_LOGS/$run_name.pid" r
  # alive: the process exists and is not a zombie waiting to be reaped.
  r="alive() { kill -0 \"\$1\" 2>/dev/null && [ \"\$(ps -o stat= -p \"\$1\" | cut -c1)\" != Z ]; };"
  r+=" if [ -f \"$pid\" ] && p=\$(cat \"$pid\") && alive \"\$p\"; then"
  r+=" kill -TERM -- \"-\$p\" 2>/dev/null || kill -TERM \"\$p\"; i=0;"
  r+=" while alive \"\$p\" && [ \"\$i\" -lt $timeout ]; do sleep 1; i=\$((i + 1)); done;"
  r+=" if alive \"\$p\"; then kill -KILL -- \"-\$p\" 2>/dev/null || kill -KILL \"\$p\";"
  r+=" echo \"\$(hostname): killed $run_name (pid \$p) after ${timeout}s\";"
  r+=" else echo \"\$(hostname): stopped $run_name (pid \$p)\"; fi;"
  r+=" else echo \"\$(hostname): $run_name is not running\"; fi; rm -f \"$pid\""
  gcloud_ssh all "$r"
}

cmd_status() {
  local queued=0
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --queued) queued=1; shift ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  resolve_settings
  if ((queued)); then
    run_cmd gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" --project="$PROJECT"
  else
    run_cmd gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --project="$PROJECT"
  fi
}

cmd_delete() {
  local queued=0 yes=()
  normalize_args "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --queued) queued=1; shift ;;
      --yes | -y) yes=(--quiet); shift ;;
      *) common_opt "$@" || die "$CMD: unexpected '--'"; shift "$SHIFT" ;;
    esac
  done
  resolve_name
  resolve_settings
  # Without --queued, a real delete first looks for a queued resource of that name.
  if ((!queued)); then
    if ((DRY_RUN)); then
      note "without --queued, a real delete first checks for a queued resource $NAME" \
        "(gcloud compute tpus queued-resources describe) and deletes that instead if it exists"
    else
      local probe=(gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE"
        --project="$PROJECT" "--format=value(name)")
      echo "+ $(quote_cmd "${probe[@]}")" >&2
      if "${probe[@]}" >/dev/null 2>&1; then
        note "$NAME is a queued resource: deleting it and its node"
        queued=1
      fi
    fi
  fi
  if ((queued)); then
    run_cmd gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" \
      --project="$PROJECT" --force ${yes[@]+"${yes[@]}"}
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" \
      ${yes[@]+"${yes[@]}"}
  fi
}

# ----------------------------------------------------------------------------- main

main() {
  (($#)) || { usage_main >&2; exit 2; }
  CMD=$1
  shift
  case "$CMD" in
    -h | --help) usage_main; exit 0 ;;
    help)
      if (($#)); then
        CMD=$1
        if [[ $CMD == main ]] || ! declare -F "usage_$CMD" >/dev/null; then
          die "unknown command '$CMD' (see $PROG --help)"
        fi
        "usage_$CMD"
      else
        usage_main
      fi
      exit 0
      ;;
    create | setup | run | logs | stop | status | delete) "cmd_$CMD" "$@" ;;
    *) die "unknown command '$CMD': expected create, setup, run, logs, stop, status or delete" ;;
  esac
}

CMD=""
main "$@"
