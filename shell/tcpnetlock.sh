# shellcheck shell=bash
#
# tcpnetlock.sh: tcpnetlock locks for bash scripts (bash 4.1 or later). Source it, then:
#
#   run_with_lock NAME COMMAND [ARGS...]
#       Runs COMMAND while holding the lock NAME and returns COMMAND's exit code, or do.ts's own
#       (123 not granted, 125 server unreachable, 122 lock lost, ...: see do.ts --help).
#
#   lock_in_bg NAME
#       Takes the lock NAME and holds it in the background for the rest of the script. When the
#       lock is not granted, the script exits with 123 (with do.ts's exit code on other failures).
#       Once held, TCPNETLOCK_LOCK_NAME and TCPNETLOCK_FENCING_TOKEN are exported. Installs EXIT,
#       INT, TERM, HUP and USR1 traps that release the lock (a trap the script sets afterwards
#       replaces it: call release_lock from yours). If the lock is lost, the script gets SIGUSR1
#       and exits with 122 (bash runs the trap once the current foreground command has ended).
#       If the script is killed with SIGKILL, the holder notices that its stdin closed and
#       releases the lock.
#
#   release_lock
#       Gives the lock of lock_in_bg back, waits until the holder has gone, and puts back the
#       traps that were there before lock_in_bg.
#
# Settings, from the environment:
#   TCPNETLOCK_DO_OPTS   extra do.ts options for both functions, e.g. "--wait 60 --ttl 30".
#                        Split on spaces, tabs and newlines (whatever IFS is), with no quoting
#                        and no globbing: options that need a value with spaces cannot go here.
#   TCPNETLOCK_DENO      the deno command (default: deno).
#   TCPNETLOCK_HOST, TCPNETLOCK_PORT, TCPNETLOCK_CLIENT_ID, TCPNETLOCK_AUTH_TOKEN, ...
#                        read by do.ts itself (see do.ts --help).
#
# From a checkout, the do.ts next to this file's folder is used; otherwise jsr:@x/tcpnetlock/do.
# Safe under `set -euo pipefail`.

# The do.ts to run: the checkout's, else the published one.
_tnl_do_ts=jsr:@x/tcpnetlock/do
_tnl_here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd -P) || _tnl_here=
if [[ -n $_tnl_here && -f $_tnl_here/do.ts ]]; then
  _tnl_do_ts=$_tnl_here/do.ts
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
wait "$!"'

# Sets _tnl_cmd to the do.ts command line: deno, do.ts, TCPNETLOCK_DO_OPTS, then the arguments.
_tnl_command() {
  local -a opts=()
  if [[ -n ${TCPNETLOCK_DO_OPTS-} ]]; then
    IFS=$' \t\n' read -r -d '' -a opts <<<"$TCPNETLOCK_DO_OPTS" || true
  fi
  _tnl_cmd=("${TCPNETLOCK_DENO:-deno}" run -A "$_tnl_do_ts" ${opts[@]+"${opts[@]}"} "$@")
}

run_with_lock() {
  if (($# < 2)); then
    echo "usage: run_with_lock NAME COMMAND [ARGS...]" >&2
    return 2
  fi
  local name=$1
  shift
  local -a _tnl_cmd
  _tnl_command --lock-name "$name" -- "$@"
  "${_tnl_cmd[@]}"
}

lock_in_bg() {
  if (($# != 1)); then
    echo "usage: lock_in_bg NAME" >&2
    return 2
  fi
  if [[ -n $_tnl_pid ]]; then
    echo "lock_in_bg: already holding lock \"$_tnl_name\": call release_lock first" >&2
    return 2
  fi
  local name=$1 line rc
  local -a _tnl_cmd
  _tnl_command --lock-name "$name" -- sh -c "$_tnl_holder" tcpnetlock-holder "$BASHPID"

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
