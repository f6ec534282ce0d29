#!/usr/bin/env -S deno run -A
/**
 * Runs a command while holding a tcpnetlock lock: takes the lock, runs the command, releases the
 * lock when the command ends, and exits with the command's exit code. If the lock is lost while
 * the command runs (the server stopped, the connection broke, the lease ran out), the command and
 * every process it started are stopped, and the exit code says so (122).
 *
 * ```sh
 * deno run -A jsr:@x/tcpnetlock/do --lock-name db-migrations --wait 600 -- ./manage.py migrate
 * deno run -A do.ts --host locks.internal --ttl 30 --shell -- 'pg_dump app | gzip > app.sql.gz'
 * ```
 *
 * Options end at `--` or at the first argument that is not an option; everything after that
 * reaches the command untouched. Without `--lock-name` the lock's name comes from the command, as
 * tcpnetlock 0.1.8's `tcpnetlock_do` makes it. The command runs directly (through `sh -c` only with
 * `--shell`), in a process group of its own, with stdin, stdout and stderr inherited and
 * `TCPNETLOCK_LOCK_NAME` and `TCPNETLOCK_FENCING_TOKEN` added to its environment. SIGINT,
 * SIGTERM, SIGHUP and SIGQUIT sent to this program are forwarded to the command's process group.
 * Run with `--help` for every option and the exit codes.
 *
 * @example Run a command under a lock from code
 * ```ts
 * import { main } from "@x/tcpnetlock/do";
 * const code = await main(["--lock-name", "nightly-report", "--wait", "60", "--", "echo", "hi"]);
 * console.log(`exit code ${code}`); // 0, or 123 when the lock was not granted in time
 * ```
 *
 * @module
 */

import {
  ConnectionLostError,
  type HeldLock,
  InvalidClientIdError,
  isValidLockName,
  LockClient,
  type LockClientOptions,
  LockNotGrantedError,
  type LockOptions,
  LockTimeoutError,
  ProtocolError,
  ServerError,
  ServerUnreachableError,
} from "./client.ts";
import {
  choiceFlag,
  type FlagSpec,
  formatFlags,
  intFlag,
  parseFlags,
  readFlagFile,
  secondsFlag,
  UsageError,
} from "./lib/cli.ts";
import { type ProcessGroup, SIGNAL_NUMBERS, spawnGroup } from "./lib/do_child.ts";

/** The exit codes of `do.ts`, besides the command's own. */
export const DoExitCode = {
  /** Bad usage: an unknown option, a bad value, no command. */
  USAGE: 2,
  /** The lock was lost while the command ran; the command was stopped (`--on-lock-loss kill`). */
  LOCK_LOST: 122,
  /** The lock was not granted, or the `--wait` ran out (after every `--retry`). */
  NOT_GRANTED: 123,
  /** The command could not be run (spawning it failed for a reason other than the two below). */
  FAILED: 124,
  /** The server could not be reached, or refused the request (`err,...`). */
  SERVER_UNREACHABLE: 125,
  /** The command was found but is not executable. */
  NOT_EXECUTABLE: 126,
  /** The command was not found. */
  NOT_FOUND: 127,
} as const;

const PROG = "tcpnetlock do";

/** The options of `do.ts`; most also come from the `TCPNETLOCK_*` variable named. */
const DO_FLAGS: FlagSpec[] = [
  {
    name: "lock-name",
    type: "string",
    arg: "NAME",
    help: "the lock (default: made from the command, as tcpnetlock_do makes it)",
  },
  {
    name: "host",
    type: "string",
    arg: "HOST",
    env: "TCPNETLOCK_HOST",
    default: "localhost",
    help: "the server",
  },
  {
    name: "port",
    type: "string",
    arg: "PORT",
    env: "TCPNETLOCK_PORT",
    default: "7654",
    help: "the server's port",
  },
  {
    name: "client-id",
    type: "string",
    arg: "ID",
    env: "TCPNETLOCK_CLIENT_ID",
    help: "who holds the lock, as the server shows it",
  },
  {
    name: "wait",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_WAIT",
    default: "0",
    help: "if the lock is taken, wait for it in the FIFO queue",
  },
  {
    name: "retry",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_RETRY",
    default: "0",
    help: "when not granted, try N more times",
  },
  {
    name: "retry-wait",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_RETRY_WAIT",
    default: "10",
    help: "pause between tries",
  },
  {
    name: "ttl",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_TTL",
    help: "lease, renewed every ttl/3 by keepalives",
  },
  {
    name: "limit",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_LIMIT",
    help: "semaphore: up to N holders at once",
  },
  {
    name: "keep-alive",
    type: "boolean",
    env: "TCPNETLOCK_KEEP_ALIVE",
    help: "send keepalives while the command runs",
  },
  {
    name: "keep-alive-secs",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_KEEP_ALIVE_SECS",
    default: "15",
    help: "seconds between keepalives; implies --keep-alive",
  },
  {
    name: "on-lock-loss",
    type: "string",
    arg: "kill|ignore",
    env: "TCPNETLOCK_ON_LOCK_LOSS",
    default: "kill",
    help: "lock lost: stop the command (exit 122) or let it go on",
  },
  {
    name: "kill-after",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_KILL_AFTER",
    default: "10",
    help: "SIGKILL what is left of the command this long after SIGTERM",
  },
  {
    name: "shell",
    type: "boolean",
    help: "run the command, one argument, with sh -c",
  },
  { name: "tls", type: "boolean", env: "TCPNETLOCK_TLS", help: "speak TLS to the server" },
  {
    name: "ca-cert",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_CA_CERT",
    help: "trust this CA certificate (PEM); implies --tls",
  },
  {
    name: "auth-token-file",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_AUTH_TOKEN_FILE",
    help: "the server's auth token, from FILE (or TCPNETLOCK_AUTH_TOKEN)",
  },
  {
    name: "quiet",
    type: "boolean",
    env: "TCPNETLOCK_QUIET",
    help: "no waiting status, no message when not granted",
  },
  { name: "info", type: "boolean", env: "TCPNETLOCK_INFO", help: "log what happens" },
  { name: "debug", type: "boolean", env: "TCPNETLOCK_DEBUG", help: "log even more" },
  { name: "help", type: "boolean", short: "h", help: "show this help and exit" },
];

const SYNOPSIS = "Usage: deno run -A do.ts [options] [--] command [args...]";

function usage(): string {
  return `${SYNOPSIS}

Takes a tcpnetlock lock, runs the command while holding it, releases the lock when the command
ends, and exits with the command's exit code. Options end at "--" or at the first argument that
is not an option; everything after that reaches the command untouched. The command gets
TCPNETLOCK_LOCK_NAME and TCPNETLOCK_FENCING_TOKEN in its environment.

Options:
${formatFlags(DO_FLAGS)}

Exit codes: the command's own; 128+N when signal N ended it (or reached do.ts while waiting for
the lock); 2 bad usage; 122 the lock was lost while the command ran (the command was stopped);
123 not granted, or the wait ran out; 124 the command could not be run; 125 the server could not
be reached or refused the request; 126 the command is not executable; 127 command not found.`;
}

/**
 * The lock name `tcpnetlock_do` (tcpnetlock 0.1.8) makes from a command: the words joined with
 * spaces; spaces, dots and slashes turned into `_`; `_` stripped from both ends; then every
 * character that is not a letter, a digit, `_` or `-` dropped. May be empty.
 *
 * @example
 * ```ts
 * import { lockNameFromCommand } from "@x/tcpnetlock/do";
 * console.log(lockNameFromCommand(["./manage.py", "migrate"])); // manage_py_migrate
 * ```
 *
 * @param command the command and its arguments
 * @returns the lock name, or `""` when nothing is left
 */
export function lockNameFromCommand(command: readonly string[]): string {
  return command.join(" ")
    .replace(/[ ./]/g, "_")
    .replace(/^_+|_+$/g, "")
    .replace(/[^a-zA-Z0-9_-]/g, "");
}

/** Everything `main` needs, from the command line and the environment. */
interface Config {
  name: string;
  /** The name was made from the command. */
  derived: boolean;
  program: string;
  args: string[];
  client: LockClientOptions;
  lock: LockOptions;
  /** `--wait`, `--ttl` or `--limit` was given: a version 1 server cannot serve this. */
  needsV2: boolean;
  retry: number;
  retryWait: number;
  onLockLoss: "kill" | "ignore";
  killAfter: number;
  quiet: boolean;
  level: "debug" | "info" | "warning";
}

/** Splits the arguments into do.ts's options and the command (at `--` or the first non-option). */
function splitArgs(args: string[]): { options: string[]; command: string[] } {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") return { options: args.slice(0, i), command: args.slice(i + 1) };
    if (!arg.startsWith("-") || arg === "-") {
      return { options: args.slice(0, i), command: args.slice(i) };
    }
    if (arg.startsWith("--") && !arg.includes("=")) {
      const spec = DO_FLAGS.find((s) => s.name === arg.slice(2));
      if (spec?.type === "string") i++; // its value, whatever it looks like
    }
  }
  return { options: args, command: [] };
}

function parseConfig(argv: string[]): Config | "help" {
  const { options, command } = splitArgs(argv);
  const { values } = parseFlags(options, DO_FLAGS);
  if (values.help) return "help";
  if (command.length === 0) throw new UsageError("Missing the command to run");
  if (values.shell && command.length !== 1) {
    throw new UsageError(
      `With --shell, give the command as one argument (quote it), not ${command.length}`,
    );
  }

  let name = values["lock-name"] as string | undefined;
  const derived = name === undefined;
  if (name === undefined) {
    name = lockNameFromCommand(command);
    if (name === "") {
      throw new UsageError(
        "Cannot make a lock name from the command: give one with --lock-name",
      );
    }
    if (!isValidLockName(name)) {
      throw new UsageError(
        `The lock name made from the command is too long (${name.length} characters, at most ` +
          "255): give one with --lock-name",
      );
    }
  } else if (!isValidLockName(name)) {
    throw new UsageError(
      `Invalid value for --lock-name: "${name}" (use 1 to 255 letters, digits, "_" and "-")`,
    );
  }

  const client: LockClientOptions = {};
  const host = (values.host as string | undefined)?.trim();
  if (host !== undefined && host !== "") client.host = host;
  client.port = intFlag(values, "port", 1, 65535);
  const clientId = values["client-id"] as string | undefined;
  if (clientId !== undefined && clientId !== "") client.clientId = clientId;
  const caCert = values["ca-cert"] as string | undefined;
  if (values.tls || caCert !== undefined) client.tls = true;
  if (caCert !== undefined) client.caCerts = [readFlagFile(caCert, "the CA certificate file")];
  const tokenFile = values["auth-token-file"] as string | undefined;
  if (tokenFile !== undefined) {
    const token = readFlagFile(tokenFile, "the auth token file").trim();
    if (token === "") throw new UsageError(`The auth token file "${tokenFile}" is empty`);
    client.authToken = token;
  }

  const wait = secondsFlag(values, "wait", true);
  const ttl = secondsFlag(values, "ttl");
  const limit = intFlag(values, "limit", 1);
  const secsGiven = values["keep-alive-secs"] !== undefined;
  let keepAlive = values["keep-alive"] || secsGiven
    ? secondsFlag(values, "keep-alive-secs") ?? 15
    : undefined;
  if (ttl !== undefined && keepAlive !== undefined && keepAlive >= ttl) {
    if (secsGiven) {
      throw new UsageError(
        `Invalid value for --keep-alive-secs: "${keepAlive}" (it must be shorter than the --ttl ` +
          `of ${ttl} s)`,
      );
    }
    keepAlive = undefined; // the default 15 s does not fit this ttl: keep alive every ttl/3
  }
  const lock: LockOptions = { wait: wait ?? 0 };
  if (ttl !== undefined) lock.ttl = ttl;
  if (limit !== undefined) lock.limit = limit;
  if (keepAlive !== undefined) lock.keepAlive = keepAlive;

  return {
    name,
    derived,
    program: values.shell ? "sh" : command[0],
    args: values.shell ? ["-c", command[0]] : command.slice(1),
    client,
    lock,
    needsV2: wait !== undefined || ttl !== undefined || limit !== undefined,
    retry: intFlag(values, "retry", 0) ?? 0,
    retryWait: secondsFlag(values, "retry-wait", true) ?? 10,
    onLockLoss: choiceFlag(values, "on-lock-loss", ["kill", "ignore"] as const) ?? "kill",
    killAfter: secondsFlag(values, "kill-after", true) ?? 10,
    quiet: values.quiet === true,
    level: values.debug ? "debug" : values.info ? "info" : "warning",
  };
}

const encoder = new TextEncoder();

/** Writes to stderr, synchronously, never throwing (stderr may be closed). */
function writeStderr(text: string): void {
  const bytes = encoder.encode(text);
  try {
    for (let done = 0; done < bytes.length;) done += Deno.stderr.writeSync(bytes.subarray(done));
  } catch {
    // nowhere to write
  }
}

/** Messages for a person: one status line redrawn in place on a terminal, plain lines elsewhere. */
class Output {
  readonly #quiet: boolean;
  readonly #tty: boolean;
  #statusShown = false;

  /**
   * @param quiet no status, no notes
   * @param redraw redraw the status in place if stderr is a terminal (not when log lines, which
   * know nothing of it, go there too)
   */
  constructor(quiet: boolean, redraw: boolean) {
    this.#quiet = quiet;
    let tty = false;
    try {
      tty = redraw && Deno.stderr.isTerminal();
    } catch {
      // not a terminal
    }
    this.#tty = tty;
  }

  /** A progress message: redrawn in place on a terminal; nothing with --quiet. */
  status(text: string): void {
    if (this.#quiet) return;
    if (!this.#tty) return writeStderr(`${PROG}: ${text}\n`);
    let line = `${PROG}: ${text}`;
    let columns = 0;
    try {
      columns = Deno.consoleSize().columns;
    } catch {
      // unknown width
    }
    if (columns > 1 && line.length >= columns) line = line.slice(0, columns - 2) + "…";
    writeStderr(`\r\x1b[2K${line}`);
    this.#statusShown = true;
  }

  /** A message that --quiet silences. */
  note(text: string): void {
    if (this.#quiet) return;
    this.error(text);
  }

  /** A message that is always written. */
  error(text: string): void {
    this.clear();
    writeStderr(`${PROG}: ${text}\n`);
  }

  /** Erases the status line, if one is shown. */
  clear(): void {
    if (!this.#statusShown) return;
    writeStderr("\r\x1b[2K");
    this.#statusShown = false;
  }
}

/** Info and debug logging through LogTape, loaded only when asked for (start-up stays light). */
interface Log {
  info(message: string): void;
  debug(message: string): void;
}

async function makeLog(level: Config["level"]): Promise<Log> {
  if (level === "warning") return { info: () => {}, debug: () => {} };
  const { getLogger, setupLogging } = await import("./lib/log.ts");
  setupLogging({ level });
  const logger = getLogger(["tcpnetlock", "do"]);
  return {
    info: (message) => logger.info(message.replaceAll("{", "{{").replaceAll("}", "}}")),
    debug: (message) => logger.debug(message.replaceAll("{", "{{").replaceAll("}", "}}")),
  };
}

const FORWARDED_SIGNALS: readonly Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"];

/**
 * The signals do.ts listens to. Before the command runs, the first one interrupts (waiting for
 * the lock, pausing between tries); while it runs, each is forwarded to its process group.
 */
class Signals implements Disposable {
  /** The first signal received before the command ran. */
  received: Deno.Signal | undefined;
  /** Aborts when a signal arrives before the command runs. */
  readonly interrupt = new AbortController();
  /** The running command, once there is one. */
  group: ProcessGroup | undefined;
  /** Set when do.ts leaves without waiting for the release to be confirmed. */
  abandoned = false;
  /** Resolves with the first signal received after the command ended. */
  readonly afterExit: Promise<Deno.Signal>;
  #afterExit!: (signal: Deno.Signal) => void;
  readonly #log: Log;
  readonly #listeners: [Deno.Signal, () => void][] = [];

  constructor(log: Log) {
    this.#log = log;
    this.afterExit = new Promise((resolve) => this.#afterExit = resolve);
    for (const signal of FORWARDED_SIGNALS) {
      const listener = () => this.#handle(signal);
      try {
        Deno.addSignalListener(signal, listener);
        this.#listeners.push([signal, listener]);
      } catch {
        // a signal this platform does not have
      }
    }
  }

  #handle(signal: Deno.Signal): void {
    const group = this.group;
    if (group === undefined) {
      this.received ??= signal;
      this.interrupt.abort(new Error(`Interrupted by ${signal}`));
    } else if (!group.exited) {
      this.#log.debug(`Forwarding ${signal} to the command's process group ${group.pid}`);
      group.signal(signal);
    } else {
      this.#afterExit(signal);
    }
  }

  [Symbol.dispose](): void {
    for (const [signal, listener] of this.#listeners) Deno.removeSignalListener(signal, listener);
    this.#listeners.length = 0;
  }
}

function signalExit(signal: Deno.Signal): number {
  return 128 + (SIGNAL_NUMBERS[signal] ?? 0);
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Not granted, the wait ran out, or the server is at one of its limits: worth trying again. */
function isNotGranted(error: unknown): boolean {
  return error instanceof LockNotGrantedError || error instanceof LockTimeoutError ||
    (error instanceof ServerError && error.reason.startsWith("too many "));
}

/** Waits `seconds`, or less if `signal` aborts. */
function pause(seconds: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, seconds * 1000);
    signal.addEventListener("abort", done, { once: true });
    if (signal.aborted) done();
  });
}

/**
 * Runs `do.ts` with `args` (without the program name) and resolves to its exit code: the
 * command's, or one of {@linkcode DoExitCode}, or 128+N for a signal.
 *
 * @example
 * ```ts
 * import { main } from "@x/tcpnetlock/do";
 * Deno.exit(await main(["--wait", "30", "--", "./backup.sh", "--full"]));
 * ```
 *
 * @param args the options, then the command, as on the command line
 * @returns the exit code
 */
export async function main(args: string[]): Promise<number> {
  let config: Config | "help";
  let client: LockClient;
  try {
    config = parseConfig(args);
    if (config === "help") {
      console.log(usage());
      return 0;
    }
    // One lock per run: a session buys nothing here, and one connection per lock keeps the wire
    // exactly as with any server (no `session` probe against an older one).
    client = new LockClient({ ...config.client, transport: "connection" });
  } catch (e) {
    if (e instanceof UsageError || e instanceof RangeError || e instanceof InvalidClientIdError) {
      writeStderr(
        `${PROG}: ${message(e)}\n${SYNOPSIS}\nRun "deno run -A do.ts --help" for the options.\n`,
      );
      return DoExitCode.USAGE;
    }
    throw e;
  }

  const log = await makeLog(config.level);
  const out = new Output(config.quiet, config.level === "warning");
  using signals = new Signals(log);
  try {
    return await run(config, client, log, out, signals);
  } catch (e) {
    out.error(`unexpected failure: ${message(e)}`);
    return DoExitCode.FAILED;
  } finally {
    out.clear();
    if (signals.abandoned) void client.close();
    else await client.close();
  }
}

async function run(
  config: Config,
  client: LockClient,
  log: Log,
  out: Output,
  signals: Signals,
): Promise<number> {
  const { name } = config;
  if (config.derived) log.info(`Lock name "${name}", made from the command`);

  // Take the lock.
  let lock: HeldLock | undefined;
  let v1 = false;
  for (let attempt = 0; lock === undefined;) {
    const since = performance.now();
    const options: LockOptions = {
      ...(v1 ? { ...config.lock, wait: undefined } : config.lock),
      signal: signals.interrupt.signal,
      onQueued: (position) => {
        out.status(
          `waiting for lock "${name}" on "${client.server}": position ${position} in the queue`,
        );
        log.debug(`Lock "${name}": position ${position} in the queue`);
      },
    };
    try {
      lock = await client.lock(name, options);
      out.clear();
      const waited = (performance.now() - since) / 1000;
      log.info(
        `Lock "${name}" granted by "${client.server}"` +
          `${lock.token === undefined ? "" : `, token ${lock.token}`}` +
          `${waited >= 0.1 ? ` after ${waited.toFixed(1)} s` : ""}`,
      );
    } catch (e) {
      out.clear();
      if (signals.received !== undefined) return signalExit(signals.received);
      if (
        !v1 && !config.needsV2 && e instanceof ProtocolError && e.line === "ok"
      ) {
        // A version 1 server (tcpnetlock 0.1.8) granted the lock without a token, ignoring
        // "wait:0". The lock is free: take it the version 1 way, without a token.
        log.info(`"${client.server}" speaks protocol version 1: no fencing token`);
        v1 = true;
        continue;
      }
      if (isNotGranted(e)) {
        if (attempt < config.retry) {
          attempt++;
          out.note(
            `${message(e)}; trying again in ${config.retryWait} s ` +
              `(try ${attempt + 1} of ${config.retry + 1})`,
          );
          await pause(config.retryWait, signals.interrupt.signal);
          if (signals.received !== undefined) return signalExit(signals.received);
          continue;
        }
        out.note(message(e));
        return DoExitCode.NOT_GRANTED;
      }
      out.error(message(e));
      if (
        e instanceof ServerUnreachableError || e instanceof ConnectionLostError ||
        e instanceof ServerError || e instanceof ProtocolError
      ) {
        return DoExitCode.SERVER_UNREACHABLE;
      }
      return DoExitCode.FAILED;
    }
  }

  // A signal between the grant and the start: do not start.
  if (signals.received !== undefined) {
    await lock.release().catch(() => {});
    return signalExit(signals.received);
  }

  // Run the command.
  let group: ProcessGroup;
  try {
    group = spawnGroup(
      config.program,
      config.args,
      {
        TCPNETLOCK_LOCK_NAME: name,
        TCPNETLOCK_FENCING_TOKEN: lock.token === undefined ? "" : String(lock.token),
      },
      // Should do.ts die (SIGKILL), the watchdog stops the command, which lost its lock with it.
      { watchdogGraceMs: config.onLockLoss === "kill" ? config.killAfter * 1000 : undefined },
    );
  } catch (e) {
    await lock.release().catch(() => {});
    if (e instanceof Deno.errors.NotFound) {
      out.error(`command not found: "${config.program}"`);
      return DoExitCode.NOT_FOUND;
    }
    if (e instanceof Deno.errors.PermissionDenied) {
      out.error(`command not executable: "${config.program}"`);
      return DoExitCode.NOT_EXECUTABLE;
    }
    out.error(`cannot run "${config.program}": ${message(e)}`);
    return DoExitCode.FAILED;
  }
  signals.group = group;
  log.info(`Running the command (pid ${group.pid}) under lock "${name}"`);
  if (config.onLockLoss === "kill") {
    void group.watchdogArmed.then(() => log.debug(`Watchdog armed for process group ${group.pid}`));
  }

  const held = lock;
  const lost = new Promise<unknown>((resolve) => {
    if (held.signal.aborted) return resolve(held.signal.reason);
    held.signal.addEventListener("abort", () => resolve(held.signal.reason), { once: true });
  });
  const first = await Promise.race([
    group.status.then((status) => ({ kind: "exited" as const, status })),
    lost.then((reason) => ({ kind: "lost" as const, reason })),
  ]);

  if (first.kind === "lost") {
    if (config.onLockLoss === "kill") {
      out.error(
        `${message(first.reason)}; stopping the command: SIGTERM now, SIGKILL after ` +
          `${config.killAfter} s`,
      );
      await group.stop(config.killAfter * 1000);
      await group.dismissWatchdog();
      log.info(`The command was stopped`);
      return DoExitCode.LOCK_LOST;
    }
    out.error(
      `warning: ${message(first.reason)}; the command goes on without the lock ` +
        `(--on-lock-loss ignore)`,
    );
    const status = await group.status;
    log.info(`The command exited with code ${status.code}, without the lock`);
    return status.code;
  }

  // The command ended: give the lock back.
  const code = first.status.code;
  log.info(
    `The command exited with code ${code}${
      first.status.signal ? ` (${first.status.signal})` : ""
    }; releasing lock "${name}"`,
  );
  const release = lock.release().then(() => "released" as const, (e) => {
    out.error(`warning: the command ended, then ${lowerFirst(message(e))}`);
    return "lost" as const;
  });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const [outcome] = await Promise.all([
    Promise.race([
      release,
      signals.afterExit.then(() => "signal" as const),
      new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), 10_000)),
    ]),
    group.dismissWatchdog(),
  ]);
  clearTimeout(timer);
  if (outcome === "released") log.info(`Lock "${name}" released`);
  if (outcome === "timeout") {
    out.error(
      `warning: "${client.server}" did not confirm the release of lock "${name}" within 10 s; ` +
        "leaving (the server frees the lock once the connection closes)",
    );
  }
  // Do not wait for the release any longer: exiting closes the connection, which frees the lock.
  if (outcome === "timeout" || outcome === "signal") signals.abandoned = true;
  return code;
}

function lowerFirst(text: string): string {
  return text.length > 0 ? text[0].toLowerCase() + text.slice(1) : text;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
