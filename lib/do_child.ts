/**
 * The command that `do.ts` runs, in a process group of its own, so that a signal reaches the
 * command and everything it started (a shell's pipeline, a grandchild in the background).
 *
 * The command is spawned `detached`: Deno then calls `setsid()` in the child, which makes it the
 * leader of a new session and of a new process group whose id is its pid. Signals go to the whole
 * group with `kill(-pgid, sig)`. Being in a new session, the command no longer receives the
 * terminal's Ctrl-C itself: `do.ts` receives it and forwards it, so it arrives once.
 *
 * A process that has left do.ts's session is not stopped with it: if do.ts itself is killed with
 * SIGKILL (which it cannot forward), the command would run on without the lock. A watchdog guards
 * against that: a tiny `sh`, in a session of its own, started before the command, reading a pipe
 * that only do.ts holds. do.ts writes the command's group id to it as soon as the command runs;
 * when the command ends, do.ts writes `done` and the watchdog leaves; when do.ts dies, the pipe
 * ends and the watchdog stops the command's group itself: SIGTERM, then SIGKILL after the grace
 * time. (If do.ts dies before the group id reached the pipe, the watchdog cannot act.)
 *
 * POSIX only (Linux, macOS): `detached` and negative pids have no meaning on Windows.
 *
 * @module
 */

/** Signal numbers of the signals `do.ts` forwards or sends (the same on Linux and macOS). */
export const SIGNAL_NUMBERS: Readonly<Record<string, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGTERM: 15,
};

/** A command running as the leader of its own process group. */
export interface ProcessGroup {
  /** The command's pid, which is also the group's id. */
  readonly pid: number;
  /** Resolves with the command's exit status (the leader's; the group may live on). */
  readonly status: Promise<Deno.CommandStatus>;
  /** True once the command (the group's leader) has exited. */
  readonly exited: boolean;
  /** Sends `signal` to every process of the group; a group that is gone is not an error. */
  signal(signal: Deno.Signal): void;
  /** True while some process of the group is alive (zombies do not count where /proc tells). */
  alive(): boolean;
  /**
   * Stops the whole group: SIGTERM (and SIGCONT, so a stopped process sees it), then SIGKILL
   * to whatever is left after `graceMs`. Resolves once the leader has exited and the group is
   * gone (or, past SIGKILL, after a short while: SIGKILL cannot be refused).
   */
  stop(graceMs: number): Promise<void>;
  /**
   * Resolves once the watchdog knows the group (it was told the group id), at once without a
   * watchdog. Until then, do.ts dying would leave the command running: the window is as short as
   * one write to a pipe.
   */
  readonly watchdogArmed: Promise<void>;
  /** Sends the watchdog away (if there is one) and waits for it to leave. */
  dismissWatchdog(): Promise<void>;
}

/** Options of {@linkcode spawnGroup}. */
export interface SpawnOptions {
  /**
   * Start a watchdog that stops the group if this process dies while the command runs, with
   * this grace time between SIGTERM and SIGKILL, in milliseconds. Default: no watchdog.
   */
  watchdogGraceMs?: number;
}

/**
 * The watchdog, run by `sh` with the grace time in tenths of a second. Its first line is the
 * group to guard; then a line `done` sends it away, while the end of its stdin means do.ts died.
 * It is started before the command, so that it is ready when the command starts.
 */
const WATCHDOG = `IFS= read -r pgid || exit 0
IFS= read -r line || line=
[ "$line" = done ] && exit 0
kill -s TERM -- "-$pgid" 2>/dev/null || exit 0
echo "tcpnetlock do: do.ts is gone: stopping the command it ran (process group $pgid)" >&2
kill -s CONT -- "-$pgid" 2>/dev/null
n=$1
while [ "$n" -gt 0 ] && kill -s 0 -- "-$pgid" 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
kill -s KILL -- "-$pgid" 2>/dev/null
exit 0`;

/**
 * Spawns `program` with `args` in a new session and process group, with stdin, stdout and stderr
 * inherited and `env` added to the environment. Throws what `Deno.Command.spawn` throws
 * (`Deno.errors.NotFound`, `Deno.errors.PermissionDenied`, ...).
 *
 * @param program the command (looked up in PATH unless it contains a `/`)
 * @param args its arguments, untouched
 * @param env variables to add to the inherited environment
 * @param options a watchdog
 * @returns the running group
 */
export function spawnGroup(
  program: string,
  args: string[],
  env: Record<string, string>,
  options: SpawnOptions = {},
): ProcessGroup {
  let watchdog: { process: Deno.ChildProcess; stdin: WritableStreamDefaultWriter } | undefined;
  if (options.watchdogGraceMs !== undefined) {
    try {
      const process = new Deno.Command("sh", {
        args: [
          "-c",
          WATCHDOG,
          "tcpnetlock-watchdog",
          String(Math.ceil(options.watchdogGraceMs / 100)),
        ],
        stdin: "piped",
        stdout: "null",
        stderr: "inherit",
        detached: true,
      }).spawn();
      watchdog = { process, stdin: process.stdin.getWriter() };
    } catch {
      // No sh: run without a watchdog.
    }
  }
  const tell = (line: string, close: boolean): Promise<void> => {
    if (watchdog === undefined) return Promise.resolve();
    const { stdin } = watchdog;
    return (async () => {
      try {
        if (line !== "") await stdin.write(new TextEncoder().encode(line));
        if (close) await stdin.close();
      } catch {
        // it is gone already
      }
    })();
  };

  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(program, {
      args,
      env,
      stdin: "inherit",
      stdout: "inherit",
      stderr: "inherit",
      detached: true,
    }).spawn();
  } catch (e) {
    void tell("", true); // the end of its stdin before a group: it leaves
    throw e;
  }
  const pgid = child.pid;
  const armed = tell(`${pgid}\n`, false);
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });

  const signal = (sig: Deno.Signal): boolean => {
    try {
      Deno.kill(-pgid, sig);
      return true;
    } catch {
      // ESRCH: nobody left in the group. Try the leader alone in case the group call was refused.
      if (exited) return false;
      try {
        child.kill(sig);
        return true;
      } catch {
        return false;
      }
    }
  };

  const alive = (): boolean => {
    const members = groupMembers(pgid);
    if (members !== undefined) return members > 0;
    // No /proc (macOS): SIGCONT is harmless to a running process and fails once nobody is left.
    return signal("SIGCONT");
  };

  let dismissed: Promise<void> | undefined;
  const dismissWatchdog = (): Promise<void> => {
    dismissed ??= (async () => {
      await armed;
      await tell("done\n", true);
      await watchdog?.process.status;
    })();
    return dismissed;
  };

  const stop = async (graceMs: number): Promise<void> => {
    signal("SIGTERM");
    signal("SIGCONT");
    const deadline = performance.now() + graceMs;
    await within(status, graceMs);
    while (alive() && performance.now() < deadline) {
      await delay(Math.min(25, Math.max(0, deadline - performance.now())));
    }
    if (!exited || alive()) signal("SIGKILL");
    await status;
    // SIGKILL takes effect at once, but the kernel may take a moment to tear the processes down.
    const killDeadline = performance.now() + 1000;
    while (alive() && performance.now() < killDeadline) await delay(10);
  };

  return {
    pid: pgid,
    status,
    get exited() {
      return exited;
    },
    signal: (sig) => void signal(sig),
    alive,
    stop,
    watchdogArmed: armed,
    dismissWatchdog,
  };
}

/**
 * How many live (not zombie) processes belong to process group `pgid`, from /proc; `undefined`
 * where /proc cannot be read.
 */
function groupMembers(pgid: number): number | undefined {
  let count = 0;
  try {
    for (const entry of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(entry.name)) continue;
      let stat: string;
      try {
        stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      } catch {
        continue; // exited meanwhile
      }
      // pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(fields[2]) === pgid && fields[0] !== "Z" && fields[0] !== "X") count++;
    }
  } catch {
    return undefined;
  }
  return count;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits for `promise`, but no longer than `ms`; leaves no timer behind. */
async function within(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([promise, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
  } finally {
    clearTimeout(timer);
  }
}
