#!/usr/bin/env -S deno run -A
/**
 * Runs a command while holding a tcpnetlock lock: takes the lock, runs the command, releases the
 * lock when the command ends, and exits with the command's exit code. If the lock is lost while
 * the command runs (the server stopped, the connection broke, the lease ran out), the command and
 * every process it started are stopped, and the exit code says so (122).
 *
 * ```sh
 * deno run -A do.ts db-migrations -- ./manage.py migrate          # taken: exit 123 at once
 * deno run -A do.ts -w 600 --ttl 30 db-migrations -- ./manage.py migrate
 * deno run -A do.ts --wait forever backup -c 'pg_dump app | gzip > app.sql.gz'
 * deno run -A do.ts --lock-name db-migrations -- ./manage.py migrate   # tcpnetlock_do's form
 * ```
 *
 * A single argument before `--` is the lock name (flock, etcdctl lock, consul lock style). Options
 * end at `--` or at the first argument that is not an option; everything after `--` reaches the
 * command untouched. Without a name the lock's name comes from the command, as tcpnetlock 0.1.8's
 * `tcpnetlock_do` makes it. By default a taken lock fails at once (as with tcpnetlock_do);
 * `-w SECONDS` or `--wait forever` waits in the server's FIFO queue. The command runs directly (through `sh -c` only with
 * `--shell`), in a process group of its own, with stdin, stdout and stderr inherited and
 * `TCPNETLOCK_LOCK_NAME` and `TCPNETLOCK_FENCING_TOKEN` added to its environment. SIGINT,
 * SIGTERM, SIGHUP and SIGQUIT sent to this program are forwarded to the command's process group.
 * Run with `--help` for every option and the exit codes.
 *
 * @example Run a command under a lock from code
 * ```ts
 * import { main } from "@x/tcpnetlock/do";
 * const code = await main(["--wait", "60", "nightly-report", "--", "echo", "hi"]);
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
import type { LockInfo } from "./lib/protocol.ts";
import {
  choiceFlag,
  type FlagSpec,
  type FlagValues,
  formatFlags,
  intFlag,
  parseFlags,
  readFlagFile,
  secondsFlag,
  UsageError,
} from "./lib/cli.ts";
import { type ProcessGroup, SIGNAL_NUMBERS, spawnGroup } from "./lib/do_child.ts";
import { describeHolders } from "./lib/holders.ts";

/** The exit codes of `do.ts`, besides the command's own. */
export const DoExitCode = {
  /** Bad usage: an unknown option, a bad value, no command. */
  USAGE: 2,
  /** The lock was lost while the command ran; the command was stopped (`--on-lock-loss kill`). */
  LOCK_LOST: 122,
  /** The lock was not granted, or the `--wait` ran out (after every `--retry`); `-E` changes it. */
  NOT_GRANTED: 123,
  /** The command could not be run (spawning it failed for a reason other than the two below). */
  FAILED: 124,
  /**
   * The server could not be reached, or refused the request: every `err,...` reply (including
   * `too many connections`, `unauthorized`, `limit mismatch`).
   */
  SERVER_UNREACHABLE: 125,
  /** The command was found but is not executable. */
  NOT_EXECUTABLE: 126,
  /** The command was not found. */
  NOT_FOUND: 127,
} as const;

/** How messages name this program: `tcpnetlock do`, or the installed command's name. */
let PROG = "tcpnetlock do";
/** How the usage names the command to run: `deno run -A do.ts`, or the installed command. */
let INVOCATION = "deno run -A do.ts";

/** The options of `do.ts`; most also come from the `TCPNETLOCK_*` variable named. */
const DO_FLAGS: FlagSpec[] = [
  {
    name: "lock-name",
    type: "string",
    arg: "NAME",
    help: "the lock, as NAME before -- does (default: made from the command, as tcpnetlock_do)",
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
    short: "w",
    arg: "SECONDS|forever",
    env: "TCPNETLOCK_WAIT",
    default: "0",
    help: "if the lock is taken, wait for it in the FIFO queue (forever, inf: no limit)",
  },
  {
    name: "no-wait",
    type: "boolean",
    short: "n",
    help: "do not wait: fail at once if the lock is taken (the default; overrides TCPNETLOCK_WAIT)",
  },
  {
    name: "conflict-exit-code",
    type: "string",
    short: "E",
    arg: "CODE",
    env: "TCPNETLOCK_CONFLICT_EXIT_CODE",
    default: "123",
    help: "exit with CODE (0 to 255) when the lock is not granted or the wait runs out",
  },
  {
    name: "shared",
    type: "boolean",
    short: "s",
    help: "take a shared lock: many shared holders at once, no exclusive one (like flock -s)",
  },
  {
    name: "exclusive",
    type: "boolean",
    short: "x",
    help: "take an exclusive lock, the default (like flock -x)",
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
  {
    name: "command",
    type: "string",
    short: "c",
    arg: "CMDLINE",
    help: 'run CMDLINE with sh -c, as flock -c does: do.ts NAME -c "a | b"',
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
  {
    name: "prog-name",
    type: "string",
    arg: "NAME",
    help: "the name messages and --help give this program (set by deno install -n)",
  },
  { name: "help", type: "boolean", short: "h", help: "show this help and exit" },
];

function synopsis(): string {
  return `Usage: ${INVOCATION} [options] NAME -- command [args...]
       ${INVOCATION} [options] NAME -c "shell command line"
       ${INVOCATION} [options] [--lock-name NAME] [--] command [args...]`;
}

function usage(): string {
  return `${synopsis()}

Takes the tcpnetlock lock NAME, runs the command while holding it, releases the lock when the
command ends, and exits with the command's exit code. Options end at "--" or at the first
argument that is not an option; everything after "--" reaches the command untouched. A single
argument before "--" is the lock name; without one (and without --lock-name) the name is made
from the command, as tcpnetlock_do makes it. By default a taken lock fails at once (exit 123);
-w SECONDS or --wait forever waits for it in the server's FIFO queue. The command gets
TCPNETLOCK_LOCK_NAME and TCPNETLOCK_FENCING_TOKEN in its environment.

Options:
${formatFlags(DO_FLAGS)}

Exit codes: the command's own; 128+N when signal N ended it (or reached do.ts while waiting for
the lock); 2 bad usage (before anything was run; the message starts with "${PROG}:"); 122 the lock
was lost while the command ran (the command was stopped); 123 (or -E CODE) not granted, or the
wait ran out; 124 the command could not be run; 125 the server could not be reached or refused
the request (every "err,..." reply); 126 the command is not executable; 127 command not found.`;
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
  /** `--wait`, `--ttl`, `--limit` or a mode was given: a version 1 server cannot serve this. */
  needsV2: boolean;
  retry: number;
  retryWait: number;
  /** The exit code when the lock is not granted (`-E`), 123 by default. */
  conflictCode: number;
  onLockLoss: "kill" | "ignore";
  killAfter: number;
  quiet: boolean;
  level: "debug" | "info" | "warning";
}

/** Waiting with no limit: `--wait forever` asks the server for this many seconds (31 years). */
const FOREVER_SECONDS = 1e9;

/** The argument at `i` is an option: how many arguments it takes (1, or 2 with its value). */
function optionLength(args: readonly string[], i: number): number {
  const arg = args[i];
  if (arg.startsWith("--")) {
    if (arg.includes("=")) return 1;
    const spec = DO_FLAGS.find((s) => s.name === arg.slice(2));
    return spec?.type === "string" ? 2 : 1;
  }
  // A group of short flags: the first that takes a value takes the rest, or the next argument.
  for (let k = 1; k < arg.length; k++) {
    const spec = DO_FLAGS.find((s) => s.short === arg[k]);
    if (spec?.type === "string") return k === arg.length - 1 ? 2 : 1;
  }
  return 1;
}

function isOption(arg: string | undefined): boolean {
  return arg !== undefined && arg.startsWith("-") && arg !== "-" && arg !== "--";
}

/** Skips options from `i`; returns the index of the first argument that is not one. */
function skipOptions(args: readonly string[], i: number): number {
  while (i < args.length && isOption(args[i])) i += optionLength(args, i);
  return Math.min(i, args.length);
}

/** True when the options in `args` include `-c`/`--command`. */
function hasCommandFlag(args: readonly string[]): boolean {
  for (let i = 0; i < args.length; i += optionLength(args, i)) {
    const arg = args[i];
    if (arg === "--command" || arg.startsWith("--command=")) return true;
    if (!arg.startsWith("--")) {
      for (let k = 1; k < arg.length; k++) {
        if (arg[k] === "c") return true;
        if (DO_FLAGS.find((s) => s.short === arg[k])?.type === "string") break;
      }
    }
  }
  return false;
}

/**
 * Splits the arguments into do.ts's options, the lock name given as an argument, and the
 * command. `NAME -- CMD...` and `NAME -c CMDLINE` give a name (options may come before and after
 * NAME); otherwise options end at `--` or at the first argument that is not an option, and the
 * rest is the command, as with tcpnetlock_do.
 */
function splitArgs(args: string[]): { options: string[]; name?: string; command: string[] } {
  const i = skipOptions(args, 0);
  if (i >= args.length) return { options: args, command: [] };
  if (args[i] === "--") return { options: args.slice(0, i), command: args.slice(i + 1) };
  const j = skipOptions(args, i + 1);
  const options = [...args.slice(0, i), ...args.slice(i + 1, j)];
  if (args[j] === "--") return { options, name: args[i], command: args.slice(j + 1) };
  if (j >= args.length && hasCommandFlag(options)) return { options, name: args[i], command: [] };
  return { options: args.slice(0, i), command: args.slice(i) };
}

/** `--wait`: seconds, or `forever`/`inf`/`infinity`; `-n` wins over TCPNETLOCK_WAIT. */
function waitSeconds(values: FlagValues): number | undefined {
  if (values["no-wait"]) return 0;
  const text = values.wait;
  if (typeof text === "string" && /^\s*(forever|inf|infinity)\s*$/i.test(text)) {
    return FOREVER_SECONDS;
  }
  try {
    return secondsFlag(values, "wait", true);
  } catch (e) {
    if (e instanceof UsageError) throw new UsageError(e.message.replace(/\)$/, ', or "forever")'));
    throw e;
  }
}

/** `--prog-name NAME` (given by an installed command's shim), looked for before parsing. */
function setProgName(options: readonly string[]): void {
  for (let i = 0; i < options.length; i += optionLength(options, i)) {
    const arg = options[i];
    const value = arg === "--prog-name"
      ? options[i + 1]
      : arg.startsWith("--prog-name=")
      ? arg.slice("--prog-name=".length)
      : undefined;
    if (value !== undefined && /^[\w.@/-]+$/.test(value.trim())) {
      PROG = value.trim();
      INVOCATION = value.trim();
    }
  }
}

function parseConfig(argv: string[]): Config | "help" {
  const { options, name: positionalName, command } = splitArgs(argv);
  setProgName(options);
  const { values } = parseFlags(options, DO_FLAGS);
  if (values.help) return "help";
  const commandLine = values.command as string | undefined;
  if (commandLine !== undefined) {
    if (command.length > 0) {
      throw new UsageError(
        `Give the command either with -c or after the options, not both ("${command[0]}")`,
      );
    }
    if (values.shell) throw new UsageError("-c and --shell do the same: give one of them");
  } else if (command.length === 0) {
    throw new UsageError(
      positionalName === undefined
        ? "Missing the command to run"
        : `Missing the command to run under lock "${positionalName}" (after "--")`,
    );
  }
  if (values.shell && command.length !== 1) {
    throw new UsageError(
      `With --shell, give the command as one argument (quote it), not ${command.length}`,
    );
  }
  if (values.shared && values.exclusive) {
    throw new UsageError("Give --shared (-s) or --exclusive (-x), not both");
  }
  if (values["no-wait"] && options.some((o) => o === "--wait" || /^-[^-]*w/.test(o))) {
    throw new UsageError("Give --no-wait (-n) or --wait (-w), not both");
  }

  let name = values["lock-name"] as string | undefined;
  if (name !== undefined && positionalName !== undefined) {
    throw new UsageError(
      `Give the lock name once: "${positionalName}" before "--" or --lock-name "${name}"`,
    );
  }
  name ??= positionalName;
  const derived = name === undefined;
  const words = commandLine !== undefined ? [commandLine] : command;
  if (name === undefined) {
    name = lockNameFromCommand(words);
    if (name === "") {
      throw new UsageError(
        "Cannot make a lock name from the command: give one, as in: NAME -- command",
      );
    }
    if (!isValidLockName(name)) {
      throw new UsageError(
        `The lock name made from the command is too long (${name.length} characters, at most ` +
          "255): give one, as in: NAME -- command",
      );
    }
  } else if (!isValidLockName(name)) {
    throw new UsageError(
      `Invalid lock name "${name}" (use 1 to 255 letters, digits, "_" and "-")`,
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

  const wait = waitSeconds(values);
  const ttl = secondsFlag(values, "ttl");
  const limit = intFlag(values, "limit", 1);
  const conflictCode = intFlag(values, "conflict-exit-code", 0, 255) ?? DoExitCode.NOT_GRANTED;
  const mode = values.shared
    ? "shared" as const
    : values.exclusive
    ? "exclusive" as const
    : undefined;
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
  if (mode !== undefined) lock.mode = mode;
  if (keepAlive !== undefined) lock.keepAlive = keepAlive;

  const viaShell = values.shell || commandLine !== undefined;
  return {
    name,
    derived,
    program: viaShell ? "sh" : command[0],
    args: viaShell ? ["-c", words[0]] : command.slice(1),
    client,
    lock,
    needsV2: (wait !== undefined && wait > 0) || values.wait !== undefined ||
      ttl !== undefined || limit !== undefined || mode !== undefined,
    retry: intFlag(values, "retry", 0) ?? 0,
    retryWait: secondsFlag(values, "retry-wait", true) ?? 10,
    conflictCode,
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

/** Not granted, or the wait ran out: exit 123 (or `-E`). */
function isNotGranted(error: unknown): boolean {
  return error instanceof LockNotGrantedError || error instanceof LockTimeoutError;
}

/** Worth trying again with `--retry`: not granted, or the server is at one of its limits. */
function isRetriable(error: unknown): boolean {
  return isNotGranted(error) ||
    (error instanceof ServerError && error.reason.startsWith("too many "));
}

/**
 * The client's message, in do.ts's words: the library names its `authToken` option, do.ts its
 * own flag and variable.
 */
function describeError(error: unknown): string {
  const text = message(error);
  if (error instanceof ServerError && error.reason === "unauthorized") {
    return text.replace(
      /\(authToken, TCPNETLOCK_AUTH_TOKEN\)/,
      "(--auth-token-file FILE, or TCPNETLOCK_AUTH_TOKEN)",
    );
  }
  if (error instanceof ConnectionLostError) {
    return text.replace(
      "(--tls, TCPNETLOCK_TLS=1, or the tls option)",
      "(--tls, TCPNETLOCK_TLS=1)",
    );
  }
  return text;
}

/** The `.locks` list, or `undefined` if it cannot be had (quickly). */
async function fetchLocks(client: LockClient): Promise<LockInfo[] | undefined> {
  try {
    return await client.locks({ signal: AbortSignal.timeout(2000) });
  } catch {
    return undefined; // an old server, no permission: say nothing more
  }
}

/** Who holds the lock, from `.locks`, or `undefined` if that cannot be told. */
async function holderText(client: LockClient, name: string): Promise<string | undefined> {
  const locks = await fetchLocks(client);
  return locks === undefined ? undefined : describeHolders(name, locks);
}

/**
 * While waiting, `.locks` is asked at most this often (a long queue of waiters must not flood
 * the server with `.locks`); the durations shown are computed afresh at every status line.
 */
const HOLDERS_REFRESH_MS = 10_000;

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
        `${PROG}: ${message(e)}\n${synopsis()}\nRun "${INVOCATION} --help" for the options.\n`,
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
  let lastPosition = 0;
  let known: LockInfo[] | undefined;
  let askedAt = -Infinity;
  for (let attempt = 0; lock === undefined;) {
    const since = performance.now();
    const options: LockOptions = {
      ...(v1 ? { ...config.lock, wait: undefined } : config.lock),
      signal: signals.interrupt.signal,
      onQueued: (position) => {
        lastPosition = position;
        const show = () => {
          const holders = known === undefined ? undefined : describeHolders(name, known);
          out.status(
            `waiting for lock "${name}" on "${client.server}": position ${position} in the queue` +
              (holders === undefined ? "" : `; ${holders}`),
          );
        };
        show();
        log.debug(`Lock "${name}": position ${position} in the queue`);
        // Who holds it (the status line shows it once known), asked again now and then.
        if (performance.now() - askedAt < HOLDERS_REFRESH_MS) return;
        askedAt = performance.now();
        void fetchLocks(client).then((locks) => {
          if (locks === undefined) return;
          known = locks;
          if (lastPosition === position && lock === undefined) show();
        });
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
      const why = isNotGranted(e) && !config.quiet
        ? await holderText(client, name).then((t) => t === undefined ? "" : `: ${t}`)
        : "";
      if (isRetriable(e) && attempt < config.retry) {
        attempt++;
        out.note(
          `${describeError(e)}${why}; trying again in ${config.retryWait} s ` +
            `(try ${attempt + 1} of ${config.retry + 1})`,
        );
        await pause(config.retryWait, signals.interrupt.signal);
        if (signals.received !== undefined) return signalExit(signals.received);
        continue;
      }
      if (isNotGranted(e)) {
        out.note(`${describeError(e)}${why}`);
        return config.conflictCode;
      }
      out.error(describeError(e));
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
      out.error(
        `command not found: "${config.program}"` +
          (config.derived && config.args.length > 0
            ? ` (to take the lock "${config.program}", write: ${INVOCATION} ${config.program} -- ` +
              `${config.args.join(" ")})`
            : ""),
      );
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
