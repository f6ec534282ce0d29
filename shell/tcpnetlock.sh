# shellcheck shell=bash
#
# tcpnetlock.sh: tcpnetlock locks for bash scripts (bash 4.1 or later). Source it, then:
#
#   run_with_lock [OPTIONS] NAME COMMAND [ARGS...]
#   run_with_lock [OPTIONS] --lock-name NAME [--] COMMAND [ARGS...]
#       Runs COMMAND while holding the lock NAME and returns COMMAND's exit code, or do.ts's own
#       (123 not granted, 125 server unreachable or refused, 122 lock lost, ...: see do.ts --help).
#       OPTIONS are do.ts options, e.g. --shared (-s), -w 60, --wait forever, -E 0.
#
#   lock_in_bg [--shared] [NAME]
#       Takes the lock NAME and holds it in the background for the rest of the script. Without
#       NAME, as in the original helper, the name comes from the script's file name. When the
#       lock is not granted, the script exits with 123 (with do.ts's exit code on other failures).
#       Once held, TCPNETLOCK_LOCK_NAME and TCPNETLOCK_FENCING_TOKEN are exported. Installs EXIT,
#       INT, TERM, HUP and USR1 traps that release the lock (a trap the script sets afterwards
#       replaces it: call release_lock from yours). If the lock is lost, the script gets SIGUSR1
#       and exits with 122 (bash runs the trap once the current foreground command has ended).
#       If the script is killed with SIGKILL, the holder notices that the script is gone (even
#       when a child of the script keeps the pipe open) and releases the lock.
#
#   release_lock
#       Gives the lock of lock_in_bg back, waits until the holder has gone, and puts back the
#       traps that were there before lock_in_bg.
#
# Settings, from the environment:
#   TCPNETLOCK_DO        how to run do.ts: a path to do.ts (run with deno run -A), or a command
#                        such as tnl-do (from deno install -g -A -n tnl-do .../do.ts). Default:
#                        the do.ts of the checkout this file is in, else tnl-do on the PATH.
#   TCPNETLOCK_DO_OPTS   extra do.ts options for both functions, e.g. "--wait 60 --ttl 30".
#                        Split on spaces, tabs and newlines (whatever IFS is), with no quoting
#                        and no globbing: options that need a value with spaces cannot go here.
#   TCPNETLOCK_DENO      the deno command (default: deno).
#   TCPNETLOCK_HOST, TCPNETLOCK_PORT, TCPNETLOCK_CLIENT_ID, TCPNETLOCK_AUTH_TOKEN, ...
#                        read by do.ts itself (see do.ts --help).
#
# When no do.ts can be found, both functions say so and return (lock_in_bg: exit) 127.
# Safe under `set -euo pipefail`.

# The checkout's do.ts, if this file is in a checkout.
_tnl_checkout_do=
_tnl_here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd -P) || _tnl_here=
if [[ -n $_tnl_here && -f $_tnl_here/do.ts ]]; then
  _tnl_checkout_do=$_tnl_here/do.ts
fi
unset _tnl_here

# State of lock_in_bg (kept if the helper is sourced again).
_tnl_pid=${_tnl_pid-}
_tnl_name=${_tnl_name-}
_tnl_dir=${_tnl_dir-}
_tnl_in=${_tnl_in-}
_tnl_out=${_tnl_out-}
_tnl_saved_traps=${_tnl_saved_traps-}
_tnl_env_saved=${_tnl_env_saved-}

# What lock_in_bg runs under the lock: says "granted TOKEN" on stdout, then waits until its stdin
# ends (release_lock, or the script died). Killed by do.ts because the lock was lost (SIGTERM),
# it tells the script ($1) with SIGUSR1. A background command's stdin is /dev/null in sh, hence
# the copy on fd 3.
# shellcheck disable=SC2016 # expanded by sh, not here
_tnl_holder='trap '\''kill -USR1 "$1" 2>/dev/null; exit 143'\'' TERM
printf '\''granted %s\n'\'' "${TCPNETLOCK_FENCING_TOKEN-}"
exec 3<&0
cat <&3 >/dev/null &
c=$!
while kill -0 "$1" 2>/dev/null && kill -0 "$c" 2>/dev/null; do sleep 0.2; done
kill "$c" 2>/dev/null
exit 0'

# Sets _tnl_cmd to the do.ts command line: do.ts, TCPNETLOCK_DO_OPTS, then the arguments.
# Returns 127 (with a message) when there is no do.ts to run.
_tnl_command() {
  local -a opts=() run=()
  if [[ -n ${TCPNETLOCK_DO_OPTS-} ]]; then
    IFS=$' \t\n' read -r -d '' -a opts <<<"$TCPNETLOCK_DO_OPTS" || true
  fi
  local do=${TCPNETLOCK_DO:-$_tnl_checkout_do}
  if [[ -z $do ]] && command -v tnl-do >/dev/null 2>&1; then do=tnl-do; fi
  if [[ -z $do ]]; then
    echo "tcpnetlock.sh: no do.ts to run: set TCPNETLOCK_DO to the path of do.ts or to an" \
      "installed tnl-do (deno install -g -A -n tnl-do PATH/do.ts --prog-name tnl-do)" >&2
    return 127
  fi
  if [[ $do == *.ts || $do == *://* ]]; then
    run=("${TCPNETLOCK_DENO:-deno}" run -A "$do")
  else
    run=("$do")
  fi
  _tnl_cmd=("${run[@]}" ${opts[@]+"${opts[@]}"} "$@")
}

# do.ts options that take a value (the next argument), for splitting run_with_lock's arguments.
_tnl_valued=" --lock-name --host --port --client-id --wait -w --retry --retry-wait --ttl --limit
  --keep-alive-secs --on-lock-loss --kill-after --ca-cert --auth-token-file --conflict-exit-code
  -E --prog-name "

run_with_lock() {
  local -a opts=()
  local named=
  while (($# > 0)) && [[ $1 == -?* && $1 != -- ]]; do
    [[ $1 == --lock-name || $1 == --lock-name=* ]] && named=1
    opts+=("$1")
    if [[ $_tnl_valued == *" $1 "* ]] && (($# > 1)); then
      opts+=("$2")
      shift
    fi
    shift
  done
  local -a _tnl_cmd
  if [[ -n $named ]]; then
    # The original form: run_with_lock --lock-name NAME [--] COMMAND...
    [[ ${1-} == -- ]] && shift
    if (($# < 1)); then
      echo "usage: run_with_lock [OPTIONS] NAME COMMAND [ARGS...]" >&2
      return 2
    fi
    _tnl_command ${opts[@]+"${opts[@]}"} -- "$@" || return
  else
    if (($# < 2)); then
      echo "usage: run_with_lock [OPTIONS] NAME COMMAND [ARGS...]" >&2
      return 2
    fi
    local name=$1
    shift
    _tnl_command ${opts[@]+"${opts[@]}"} --lock-name "$name" -- "$@" || return
  fi
  "${_tnl_cmd[@]}"
}

lock_in_bg() {
  local -a mode=()
  if [[ ${1-} == --shared || ${1-} == -s ]]; then
    mode=(--shared)
    shift
  fi
  if (($# > 1)); then
    echo "usage: lock_in_bg [--shared] [NAME]" >&2
    return 2
  fi
  if [[ -n $_tnl_pid ]]; then
    echo "lock_in_bg: already holding lock \"$_tnl_name\": call release_lock first" >&2
    return 2
  fi
  local name=${1-} line rc
  if [[ -z $name ]]; then
    # As the original helper: the script's file name, "." turned into "-", other signs dropped.
    name=$(basename -- "$0" | tr . - | sed 's/[^0-9a-zA-Z_-]*//g')
  fi
  local -a _tnl_cmd
  _tnl_command ${mode[@]+"${mode[@]}"} --lock-name "$name" -- \
    sh -c "$_tnl_holder" tcpnetlock-holder "$BASHPID" || exit

  _tnl_dir=$(mktemp -d "${TMPDIR:-/tmp}/tcpnetlock.XXXXXX")
  mkfifo "$_tnl_dir/in" "$_tnl_dir/out"
  _tnl_name=$name
  _tnl_saved_traps=$(trap -p EXIT INT TERM HUP USR1)
  "${_tnl_cmd[@]}" <"$_tnl_dir/in" >"$_tnl_dir/out" &
  _tnl_pid=$!
  trap '_tnl_on_exit' EXIT
  trap '_tnl_on_signal INT' INT
  trap '_tnl_on_signal TERM' TERM
  trap '_tnl_on_signal HUP' HUP
  trap '_tnl_on_lost' USR1
  # Opening the FIFOs pairs with the holder's redirections, in the same order.
  exec {_tnl_in}>"$_tnl_dir/in" {_tnl_out}<"$_tnl_dir/out"
  rm -rf -- "$_tnl_dir"
  _tnl_dir=

  line=
  IFS= read -r line <&"$_tnl_out" || true
  if [[ $line == granted* ]]; then
    line=${line#granted}
    _tnl_env_saved="unset TCPNETLOCK_LOCK_NAME TCPNETLOCK_FENCING_TOKEN
$(declare -p TCPNETLOCK_LOCK_NAME TCPNETLOCK_FENCING_TOKEN 2>/dev/null || true)"
    export TCPNETLOCK_LOCK_NAME=$name
    export TCPNETLOCK_FENCING_TOKEN=${line# }
    return 0
  fi

  # Not granted, or do.ts failed: it has said why on stderr. Leave with its exit code.
  rc=0
  wait "$_tnl_pid" || rc=$?
  _tnl_pid=
  _tnl_cleanup
  ((rc != 0)) || rc=124
  exit "$rc"
}

release_lock() {
  [[ -n $_tnl_pid ]] || return 0
  local pid=$_tnl_pid rc
  _tnl_pid=
  # The holder's stdin ends, and SIGHUP in case a process the script started kept a copy of the
  # pipe: either way do.ts stops the holder, releases the lock (confirmed by the server) and exits.
  if [[ -n $_tnl_in ]]; then exec {_tnl_in}>&-; fi
  _tnl_in=
  kill -HUP "$pid" 2>/dev/null || true
  while :; do
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    # Above 128 and still there: a trapped signal interrupted the wait.
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  _tnl_cleanup
}

# Closes the pipes, forgets the lock, puts the script's own traps back.
_tnl_cleanup() {
  if [[ -n $_tnl_in ]]; then exec {_tnl_in}>&-; fi
  if [[ -n $_tnl_out ]]; then exec {_tnl_out}<&-; fi
  if [[ -n $_tnl_dir ]]; then rm -rf -- "$_tnl_dir"; fi
  _tnl_in=
  _tnl_out=
  _tnl_dir=
  _tnl_name=
  if [[ -n $_tnl_env_saved ]]; then
    # The variables as they were before lock_in_bg (e.g. set by an outer do.ts), or unset.
    eval "${_tnl_env_saved//declare /declare -g }"
    _tnl_env_saved=
  fi
  trap - EXIT INT TERM HUP USR1
  eval "$_tnl_saved_traps"
  _tnl_saved_traps=
}

_tnl_on_exit() {
  local rc=$?
  release_lock
  # The script's own EXIT trap, put back by release_lock, would not run any more: run it here.
  local -a previous
  eval "previous=($(trap -p EXIT))"
  if ((${#previous[@]} == 4)); then
    trap - EXIT
    (exit "$rc") || eval "${previous[2]}"
  fi
  exit "$rc"
}

_tnl_on_signal() {
  release_lock
  # Again, now with the script's own trap for it (or none: then the script dies of the signal).
  kill -s "$1" "$BASHPID"
}

_tnl_on_lost() {
  [[ -n $_tnl_pid ]] || return 0
  echo "lock_in_bg: lost lock \"$_tnl_name\", leaving the script" >&2
  release_lock
  exit 122
}
