#!/usr/bin/env bash
# tpu_pod.sh: create a Cloud TPU VM (one host or a multi-host pod slice), put this repository on
# every worker, and run `python train.py CONFIG OVERRIDES...` on all workers at once.
#
#   scripts/tpu_pod.sh -h                      # usage, flags, environment variables
#   scripts/tpu_pod.sh --dry-run train ...     # print every gcloud command instead of running it
#
# Run it from your workstation (anywhere the gcloud CLI is installed and authenticated), not
# from the TPU VM. Commands used (gcloud reference, "gcloud compute tpus tpu-vm" group):
#   tpu-vm create NAME --zone --accelerator-type --version [--spot | --preemptible]
#   tpu-vm describe | delete NAME --zone;  tpu-vm ssh NAME --zone --worker=all --command=...
#   tpu-vm scp --recurse SRC NAME: --zone --worker=all
#   queued-resources create NAME --zone --node-id --accelerator-type --runtime-version [--spot]
#   (GA as `gcloud compute tpus queued-resources`; the `alpha` variant is not needed.)
# JAX on a TPU VM: `pip install -U "jax[tpu]"` (libtpu comes from PyPI); here it is the
# project's `tpu` extra, `pip install -e ".[tpu]"`.
#
# Multi-host notes
# * A slice larger than one host (v4-16 and up, v5litepod-16 and up, v5p-16 and up) is several
#   VMs, "workers". JAX is multi-controller: the same command must run on every worker at about
#   the same time, which is what `ssh --worker=all` does; a worker started alone waits for the
#   others (at start-up or at its first cross-host step).
# * Nothing tells the processes who is who: no coordinator address, process id or process count
#   is passed. train.py first calls training/distributed.maybe_initialize(), which calls
#   jax.distributed.initialize() without arguments on a multi-host job; on Cloud TPU VMs JAX then
#   finds the workers, the coordinator and its own process id from the TPU VM metadata.
#   maybe_initialize() takes a job for multi-host when TPU_WORKER_HOSTNAMES lists several
#   workers (or JAX_NUM_PROCESSES / SLURM say so); the `===` line each worker writes to its
#   train log shows the value it had.
# * Each process reads its own rows of every global batch (jax.process_index() of
#   jax.process_count()), so data.batch_size must divide by the number of workers; process 0
#   alone writes metrics and the progress display.
# * Checkpoints: a multi-host run needs a run_dir that every worker sees (a shared file system,
#   e.g. a bucket mounted with gcsfuse at the same path on all workers, or NFS/Filestore). A plain
#   local path gives each worker its own directory on its own disk.
#   A gs:// URL works too: train.py writes its run dir through etils.epath (training/paths.py),
#   which reaches GCS through gcsfs (in the [tpu] extra that setup installs) and Orbax writes each
#   host's shards there. Untested against a real bucket so far; the local path runs the same code.
# * stop sends SIGTERM, on which train.py saves a checkpoint and exits after the current step.
#   On a pod every worker must stop at the same step; if they disagree a worker can wait
#   forever in a collective. Check `logs --worker=all`, and `stop --force` if it hangs.
# * Logs and the pid file are per worker, on the worker's disk: ~/<repo-dir>-logs/train.log.

set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
DEFAULT_SRC=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG [options] COMMAND [args]

Commands
  create                 create the TPU VM, or reuse it when 'describe' finds it
  setup                  put the code on every worker (copy this checkout, or --git URL) and
                         pip install -e ".[tpu]" into ~/REPO_DIR-venv (Python >= 3.12)
  train CONFIG [KEY=VALUE ...]
                         run 'python train.py CONFIG KEY=VALUE... run_dir=RUN_DIR' on all
                         workers at once; foreground (output streamed) unless --detach
  status                 describe the TPU VM (--procs: also whether training runs per worker)
  logs                   print a worker's train log (--worker N|all, -f to follow, -n LINES)
  exec -- CMD ...        run a shell command on the workers, in the repo dir, venv first on PATH
  stop                   SIGTERM the training process on every worker (it saves, then exits);
                         --force: SIGKILL
  delete                 delete the TPU VM (and with --queued, its queued resource)

Settings (flag, or environment variable)
  --name NAME            TPU_NAME              TPU VM name (required)
  --zone ZONE            TPU_ZONE              zone, e.g. us-central2-b (required)
  --project ID           TPU_PROJECT           project (default: gcloud's configured project)
  --accelerator-type T   TPU_ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16, v5p-32 (create)
  --runtime-version V    TPU_RUNTIME_VERSION   default from the accelerator type:
                           v4-*: tpu-ubuntu2204-base   v5litepod-*: v2-alpha-tpuv5-lite
                           v5p-*: v2-alpha-tpuv5       v6e-*: v2-alpha-tpuv6e
  --repo-dir DIR         TPU_REPO_DIR          code dir in the worker's home (default: mnemax)
  --run-dir PATH         TPU_RUN_DIR           train.py's run_dir on the workers; absolute,
                                               ~/..., or relative to the repo dir (train)

Options
  --dry-run              print the gcloud commands, run nothing (no gcloud needed)
  --spot | --preemptible create a Spot / preemptible TPU (create)
  --queued               create/status/delete through a queued resource of the same name
  --git URL              setup: git clone (or fetch) URL on every worker instead of copying
  --branch B             setup --git: branch or tag (default: the remote's default branch)
  --src DIR              setup: local checkout to copy (default: $DEFAULT_SRC)
  --python VER           setup: Python for the venv if none >= 3.12 is installed; uv fetches
                         it (default: 3.12)
  --libtpu-link          setup: add -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  --detach nohup|tmux    train: start in the background (a disconnect does not kill it), then
                         follow worker 0's log (Ctrl-C stops following, not training)
  --no-follow            train --detach: return right after starting
  --env KEY=VALUE        train/exec: export on the workers (repeatable), e.g. WANDB_API_KEY
  --worker N|all         logs (default 0), exec (default all)
  -f, --follow           logs: follow
  -n, --lines N          logs: lines to show (default 100)
  --procs                status: also ask every worker whether training is running
  --force                stop: SIGKILL instead of SIGTERM
  --yes                  delete: do not ask for confirmation (gcloud --quiet)
  -h, --help             this text

Example
  export TPU_NAME=mnemax-v4 TPU_ZONE=us-central2-b TPU_ACCELERATOR_TYPE=v4-32
  $PROG create --spot
  $PROG setup
  $PROG train --detach nohup --run-dir /mnt/ckpt/gla-1 configs/gla.yaml train.steps=20000
  $PROG logs -f;  $PROG stop;  $PROG delete
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }     # bad usage or missing setting
fail() { echo "$PROG: error: $*" >&2; exit 1; }    # something went wrong while running
note() { echo "$PROG: $*" >&2; }

# q WORD: WORD quoted for a POSIX shell (unquoted when it is plainly safe).
q() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}
# qjoin WORD...: the words quoted and joined by spaces (one shell command line).
qjoin() {
  local out='' w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# ---------------------------------------------------------------- arguments
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCEL=${TPU_ACCELERATOR_TYPE:-}
RUNTIME=${TPU_RUNTIME_VERSION:-}
REPO_DIR=${TPU_REPO_DIR:-mnemax}
RUN_DIR=${TPU_RUN_DIR:-}
GCLOUD=${GCLOUD:-gcloud}
DRY_RUN=0 SPOT=0 PREEMPTIBLE=0 QUEUED=0 LIBTPU_LINK=0 NO_FOLLOW=0 FOLLOW=0 PROCS=0 FORCE=0 YES=0
GIT_URL='' BRANCH='' SRC=$DEFAULT_SRC PYVER=3.12 DETACH='' WORKER='' LINES=100
ENVS=() POS=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  arg=$1
  if [[ $arg == --*=* ]]; then         # --flag=value -> --flag value
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
    arg=$1
  fi
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --libtpu-link) LIBTPU_LINK=1 ;;
    --no-follow) NO_FOLLOW=1 ;;
    -f|--follow) FOLLOW=1 ;;
    --procs) PROCS=1 ;;
    --force) FORCE=1 ;;
    --yes) YES=1 ;;
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift ;;
    --runtime-version|--version) need_value "$@"; RUNTIME=$2; shift ;;
    --repo-dir) need_value "$@"; REPO_DIR=$2; shift ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift ;;
    --git) need_value "$@"; GIT_URL=$2; shift ;;
    --branch) need_value "$@"; BRANCH=$2; shift ;;
    --src) need_value "$@"; SRC=$2; shift ;;
    --python) need_value "$@"; PYVER=$2; shift ;;
    --detach) need_value "$@"; DETACH=$2; shift ;;
    --env) need_value "$@"; ENVS+=("$2"); shift ;;
    --worker) need_value "$@"; WORKER=$2; shift ;;
    -n|--lines) need_value "$@"; LINES=$2; shift ;;
    --) shift; POS+=("$@"); break ;;
    -?*) die "unknown option '$arg' (see $PROG -h)" ;;
    *) POS+=("$arg") ;;
  esac
  shift
done

[[ ${#POS[@]} -gt 0 ]] || { usage >&2; echo >&2; die "no command given"; }
CMD=${POS[0]}
ARGS=("${POS[@]:1}")
case $CMD in
  create|setup|train|status|logs|exec|stop|delete) ;;
  *) die "unknown command '$CMD' (commands: create setup train status logs exec stop delete)" ;;
esac
case $CMD in
  train|exec) ;;
  *) [[ ${#ARGS[@]} -eq 0 ]] || die "'$CMD' takes no arguments, got: ${ARGS[*]}" ;;
esac

[[ -n $NAME ]] || die "no TPU name: set TPU_NAME or pass --name"
[[ -n $ZONE ]] || die "no zone: set TPU_ZONE or pass --zone (e.g. us-central2-b)"
[[ $REPO_DIR =~ ^[A-Za-z0-9._-]+$ && $REPO_DIR != . && $REPO_DIR != .. ]] ||
  die "--repo-dir must be a plain directory name (letters, digits, . _ -), got '$REPO_DIR'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
[[ -z $WORKER || $WORKER == all || $WORKER =~ ^[0-9]+$ ]] ||
  die "--worker must be a worker number or 'all', got '$WORKER'"
[[ -z $DETACH || $DETACH == nohup || $DETACH == tmux ]] ||
  die "--detach must be 'nohup' or 'tmux', got '$DETACH'"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done
# train.py joins the workers through jax.distributed.initialize() (training/distributed.py);
# plain TPU VMs do not always export a worker list it could detect, so say so explicitly
# (JAX then reads the topology from the TPU VM metadata; a single-host slice is 1 process).
ENVS=("MNEMAX_DISTRIBUTED=1" ${ENVS[@]+"${ENVS[@]}"})

# ---------------------------------------------------------------- gcloud
PROJECT_FLAG=()
[[ -z $PROJECT ]] || PROJECT_FLAG=("--project=$PROJECT")
TPU=("$GCLOUD" compute tpus tpu-vm)
QR=("$GCLOUD" compute tpus queued-resources)
WHERE=("--zone=$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"})

if [[ $DRY_RUN == 0 ]] && ! command -v "$GCLOUD" >/dev/null 2>&1; then
  die "'$GCLOUD' not found: install the Google Cloud CLI (or use --dry-run)"
fi

# run CMD...: run it, or print it (one line, shell-quoted) under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then qjoin "$@"; echo; else "$@"; fi
}
# probe CMD...: a command whose result decides what to do next; under --dry-run it is printed
# and taken to fail (nothing exists yet).
probe() {
  if [[ $DRY_RUN == 1 ]]; then qjoin "$@"; echo; return 1; fi
  "$@"
}
# on_workers WORKER SCRIPT: run a bash script on the TPU worker(s).
on_workers() {
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$1" --command="bash -c $(q "$2")"
}

# Paths on the workers. $HOME is expanded there; REPO_DIR is a plain name, so no quoting needed.
R_REPO="\"\$HOME\"/$REPO_DIR"
R_VENV="\"\$HOME\"/$REPO_DIR-venv"
R_LOGS="\"\$HOME\"/$REPO_DIR-logs"
# Remote prelude: strict mode, the paths, and a function telling whether training runs here.
R_PRELUDE="set -euo pipefail; REPO=$R_REPO; VENV=$R_VENV; LOGS=$R_LOGS; \
LOG=\"\$LOGS/train.log\"; PIDFILE=\"\$LOGS/train.pid\"; \
running() { local p; [ -f \"\$PIDFILE\" ] && p=\$(cat \"\$PIDFILE\") && [ -n \"\$p\" ] && \
grep -qaF train.py \"/proc/\$p/cmdline\" 2>/dev/null && echo \"\$p\"; }"

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- commands
cmd_create() {
  [[ -n $ACCEL ]] || die "no accelerator type: set TPU_ACCELERATOR_TYPE or pass --accelerator-type (e.g. v4-32, v5litepod-16)"
  [[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] || die "--spot and --preemptible exclude each other"
  [[ $QUEUED == 0 || $PREEMPTIBLE == 0 ]] || die "queued resources take --spot, not --preemptible"
  if [[ -z $RUNTIME ]]; then
    RUNTIME=$(default_runtime "$ACCEL") ||
      die "no default runtime version for '$ACCEL': set TPU_RUNTIME_VERSION or pass --runtime-version"
  fi
  local state
  if state=$(probe "${TPU[@]}" describe "$NAME" "${WHERE[@]}" \
                   --format='value(state,acceleratorType)' 2>/dev/null); then
    note "TPU VM '$NAME' exists (${state//$'\t'/, }); reusing it"
    case $state in
      READY*) ;;
      PREEMPTED*|TERMINATED*) note "warning: it is ${state%%[[:space:]]*}: '$PROG delete', then create again" ;;
      *) note "warning: it is not READY yet; see '$PROG status'" ;;
    esac
    [[ $state == *"$ACCEL"* ]] ||
      note "warning: it was not created as $ACCEL; delete it first to change the type"
    return 0
  fi
  [[ $DRY_RUN == 0 ]] || echo "$state"
  local kind=()
  [[ $SPOT == 0 ]] || kind=(--spot)
  [[ $PREEMPTIBLE == 0 ]] || kind=(--preemptible)
  if [[ $QUEUED == 1 ]]; then
    if state=$(probe "${QR[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state.state)' \
                     2>/dev/null); then
      note "queued resource '$NAME' exists (state: ${state:-?}); '$PROG status' until ACTIVE"
      return 0
    fi
    [[ $DRY_RUN == 0 ]] || echo "$state"
    run "${QR[@]}" create "$NAME" "${WHERE[@]}" "--node-id=$NAME" "--accelerator-type=$ACCEL" \
        "--runtime-version=$RUNTIME" ${kind[@]+"${kind[@]}"}
    note "queued resource '$NAME' requested; the TPU VM exists once its state is ACTIVE ('$PROG status')"
  else
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCEL" \
        "--version=$RUNTIME" ${kind[@]+"${kind[@]}"}
  fi
}

# The venv + editable install, as a remote script fragment. TPU VM images (Ubuntu 22.04) have
# Python 3.10 and this project needs >= 3.12: use an installed python3.12+ if `-m venv` works
# with it, else let uv (installed into ~/.local/bin) fetch Python $PYVER.
install_script() {
  local link=''
  [[ $LIBTPU_LINK == 0 ]] || link=' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'
  printf '%s' "if [ ! -x \"\$VENV/bin/python\" ]; then \
for p in python3.13 python3.12 python3; do \
if command -v \$p >/dev/null && \$p -c \"import sys; sys.exit(sys.version_info < (3, 12))\" 2>/dev/null \
&& \$p -m venv \"\$VENV\" >/dev/null 2>&1; then break; fi; rm -rf \"\$VENV\"; done; \
if [ ! -x \"\$VENV/bin/python\" ]; then \
UV=\$(command -v uv || echo \"\$HOME/.local/bin/uv\"); \
[ -x \"\$UV\" ] || curl -LsSf https://astral.sh/uv/install.sh | \
env UV_INSTALL_DIR=\"\$HOME/.local/bin\" UV_NO_MODIFY_PATH=1 INSTALLER_NO_MODIFY_PATH=1 sh; \
[ -x \"\$UV\" ] || { echo \"error: no Python >= 3.12 on \$(hostname) and uv could not be installed\" >&2; exit 1; }; \
\"\$UV\" venv --seed --python $(q "$PYVER") \"\$VENV\"; fi; fi; \
\"\$VENV/bin/python\" -m pip install -q -U pip; \
cd \"\$REPO\" && \"\$VENV/bin/python\" -m pip install -e \".[tpu]\"$link; \
echo \"\$(hostname): \$(\"\$VENV/bin/python\" --version) ready in \$REPO\""
}

cmd_setup() {
  if [[ -n $GIT_URL ]]; then
    local clone=(git clone)
    [[ -z $BRANCH ]] || clone+=(--branch "$BRANCH")
    local update
    if [[ -n $BRANCH ]]; then
      update="git -C \"\$REPO\" fetch origin $(q "$BRANCH") && git -C \"\$REPO\" checkout -B $(q "$BRANCH") FETCH_HEAD"
    else
      update="git -C \"\$REPO\" pull --ff-only"
    fi
    on_workers all "$R_PRELUDE; \
if [ -d \"\$REPO/.git\" ]; then $update; \
elif [ -e \"\$REPO\" ]; then echo \"error: \$REPO exists on \$(hostname) and is not a git clone\" >&2; exit 1; \
else $(qjoin "${clone[@]}" "$GIT_URL") \"\$REPO\"; fi; $(install_script)"
    return
  fi
  [[ -z $BRANCH ]] || die "--branch goes with --git URL"
  # Copy what git sees (tracked + untracked, not ignored: no .git, runs/, venvs or caches), from
  # a staging copy named like the remote dir, so `scp --recurse STAGE/REPO_DIR NAME:` lands in
  # ~/REPO_DIR (merging into it when it exists; files deleted here are not deleted there).
  git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "--src '$SRC' is not a git checkout; use --git URL, or --src with a checkout"
  local top stage
  top=$(git -C "$SRC" rev-parse --show-toplevel)
  if [[ $DRY_RUN == 1 ]]; then
    stage="<staging-dir>/$REPO_DIR"
    echo "# stage the files of $top that git sees into $stage"
  else
    STAGE_TMP=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
    trap 'rm -rf "$STAGE_TMP"' EXIT
    stage=$STAGE_TMP/$REPO_DIR
    mkdir -p "$stage"
    # (a file deleted but still in git's index is skipped)
    (cd "$top" && git ls-files -z -co --exclude-standard |
       while IFS= read -r -d '' f; do if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi; done |
       tar -cf - --null -T - | tar -xf - -C "$stage")
    note "copying $(cd "$stage" && find . -type f | wc -l | tr -d ' ') files from $top"
  fi
  run "${TPU[@]}" scp --recurse "$stage" "$NAME:" "${WHERE[@]}" --worker=all
  on_workers all "$R_PRELUDE; $(install_script)"
}

# A remote `export K=V; ...` prefix for --env.
env_script() {
  local kv out=''
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do out+="export $(q "$kv"); "; done
  printf '%s' "$out"
}

cmd_train() {
  [[ ${#ARGS[@]} -ge 1 ]] || die "train needs a config: $PROG train configs/X.yaml [key=value ...]"
  local config=${ARGS[0]} ov has_run_dir=0
  [[ $config != *=* ]] || die "the first train argument must be a config file, got '$config'"
  for ov in ${ARGS[@]+"${ARGS[@]:1}"}; do
    [[ $ov == *=* ]] || die "override '$ov' is not of the form dotted.key=value"
    [[ $ov != run_dir=* ]] || has_run_dir=1
  done
  if [[ -n $RUN_DIR && $has_run_dir == 1 ]]; then
    die "run_dir is given twice (--run-dir/TPU_RUN_DIR and a run_dir= override); keep one"
  fi
  [[ -n $RUN_DIR || $has_run_dir == 1 ]] ||
    die "no run dir: pass --run-dir PATH (or set TPU_RUN_DIR, or a run_dir= override); on a pod it should be a directory all workers share"
  [[ -e $SRC/$config || -n $GIT_URL ]] ||
    note "warning: '$config' is not in $SRC; it must exist in ~/$REPO_DIR on the workers"

  # train.py's argv as a bash array literal; run_dir=~/x becomes run_dir="$HOME"/x.
  local argv="ARGV=(train.py" a
  for a in "${ARGS[@]}"; do argv+=" $(q "$a")"; done
  if [[ -n $RUN_DIR ]]; then
    # shellcheck disable=SC2088  # a literal "~" typed by the user, expanded on the worker
    if [[ $RUN_DIR == "~" || $RUN_DIR == "~/"* ]]; then
      argv+=" run_dir=\"\$HOME\"$(q "${RUN_DIR#\~}")"
    else
      argv+=" $(q "run_dir=$RUN_DIR")"
    fi
  fi
  argv+=")"

  # The pid file must hold the training process itself (what `stop` signals): `$!` of a
  # backgrounded simple command is that command's pid, and nohup execs python in place.
  # tmux runs its command in a new process tree, so there a small bash records its own pid,
  # then execs python.
  local launch
  case $DETACH in
    '') launch="\"\$VENV/bin/python\" \"\${ARGV[@]}\" > >(tee -a \"\$LOG\") 2>&1 < /dev/null & \
echo \$! > \"\$PIDFILE\"; wait \$!" ;;
    nohup) launch="nohup \"\$VENV/bin/python\" \"\${ARGV[@]}\" >> \"\$LOG\" 2>&1 < /dev/null & \
echo \$! > \"\$PIDFILE\";" ;;
    tmux)
      # shellcheck disable=SC2016  # expanded by the bash on the worker
      local inner='echo $$ > "$0"; exec "$@"'
      launch="command -v tmux >/dev/null || { echo \"error: tmux is not installed on \$(hostname); use --detach nohup\" >&2; exit 1; }; \
! tmux has-session -t $(q "$REPO_DIR") 2>/dev/null || { echo \"error: tmux session $REPO_DIR exists on \$(hostname)\" >&2; exit 1; }; \
tmux new-session -d -s $(q "$REPO_DIR") \"\$(printf '%q ' bash -c $(q "$inner") \"\$PIDFILE\" \"\$VENV/bin/python\" \"\${ARGV[@]}\") 2>&1 | tee -a \$(printf '%q' \"\$LOG\")\";" ;;
  esac
  local script
  script="$R_PRELUDE; \
[ -x \"\$VENV/bin/python\" ] || { echo \"error: no \$VENV on \$(hostname); run $PROG setup first\" >&2; exit 1; }; \
cd \"\$REPO\"; mkdir -p \"\$LOGS\"; \
if p=\$(running); then echo \"error: training already runs on \$(hostname) (pid \$p); $PROG stop first\" >&2; exit 1; fi; \
rm -f \"\$PIDFILE\"; $(env_script)$argv; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname) TPU_WORKER_HOSTNAMES=\${TPU_WORKER_HOSTNAMES-<unset>}: python \${ARGV[*]}\" >> \"\$LOG\"; \
$launch"
  if [[ -n $DETACH ]]; then
    script+=" sleep 5; if p=\$(running); then echo \"\$(hostname): training started (pid \$p, log \$LOG)\"; \
else echo \"error: training exited at once on \$(hostname); end of \$LOG:\" >&2; tail -n 20 \"\$LOG\" >&2; exit 1; fi"
  fi
  on_workers all "$script"
  if [[ -n $DETACH && $NO_FOLLOW == 0 ]]; then
    note "following worker 0's log; Ctrl-C stops following, training goes on ('$PROG stop' ends it)"
    on_workers 0 "$R_PRELUDE; tail -n $LINES -F \"\$LOG\"" || true
  fi
}

cmd_status() {
  if [[ $QUEUED == 1 ]]; then
    run "${QR[@]}" describe "$NAME" "${WHERE[@]}"
  fi
  run "${TPU[@]}" describe "$NAME" "${WHERE[@]}"
  if [[ $PROCS == 1 ]]; then
    on_workers all "$R_PRELUDE; if p=\$(running); then echo \"\$(hostname): training (pid \$p)\"; \
else echo \"\$(hostname): not training\"; fi"
  fi
}

cmd_logs() {
  local tail_flags="-n $LINES"
  [[ $FOLLOW == 0 ]] || tail_flags+=" -F"
  on_workers "${WORKER:-0}" "$R_PRELUDE; [ -f \"\$LOG\" ] || { echo \"\$(hostname): no \$LOG yet\" >&2; exit 1; }; tail $tail_flags \"\$LOG\""
}

cmd_exec() {
  [[ ${#ARGS[@]} -ge 1 ]] || die "exec needs a command: $PROG exec -- CMD ..."
  on_workers "${WORKER:-all}" "$R_PRELUDE; cd \"\$REPO\"; export PATH=\"\$VENV/bin:\$PATH\"; $(env_script)${ARGS[*]}"
}

cmd_stop() {
  local sig=TERM
  [[ $FORCE == 0 ]] || sig=KILL
  on_workers all "$R_PRELUDE; \
if ! p=\$(running); then echo \"\$(hostname): no training process\"; exit 0; fi; \
kill -$sig \"\$p\"; echo \"\$(hostname): sent SIG$sig to \$p, waiting up to 600 s\"; \
for i in \$(seq 600); do kill -0 \"\$p\" 2>/dev/null || { echo \"\$(hostname): stopped\"; exit 0; }; sleep 1; done; \
echo \"\$(hostname): still running; $PROG stop --force kills it\" >&2; exit 1"
}

cmd_delete() {
  local quiet=()
  [[ $YES == 0 ]] || quiet=(--quiet)
  if [[ $QUEUED == 1 ]]; then
    # --force deletes the queued resource's TPU VM first.
    run "${QR[@]}" delete "$NAME" "${WHERE[@]}" --force ${quiet[@]+"${quiet[@]}"}
  else
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" ${quiet[@]+"${quiet[@]}"}
  fi
}

"cmd_$CMD"
