/**
 * The command line of `client.ts`: hold a lock from a shell script, and the admin calls (`ping`,
 * `stats`, `locks`, `shutdown`). The exit codes of `hold` are those of tcpnetlock 0.1.8's
 * `tcpnetlock_client`.
 *
 * This file is imported by URL through `client.ts`: it may import only relative, `node:` and
 * versioned `npm:` specifiers, and it has no third-party dependency.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  ConnectionLostError,
  type HeldLock,
  InvalidClientIdError,
  InvalidLockNameError,
  LockClient,
  type LockClientOptions,
  type LockInfo,
  LockNotGrantedError,
  type LockOptions,
  LockTimeoutError,
  ServerUnreachableError,
} from "../client.ts";
import { describeHolders } from "./holders.ts";
import { parseDecimal, parsePositiveInt } from "./protocol.ts";

/** Exit codes of the command line. */
export const ExitCode = {
  /** Done; for `hold`: the lock was held, then released on SIGINT/SIGTERM. */
  OK: 0,
  /** Bad usage (unknown option, missing argument, bad value), or the connection was refused. */
  USAGE: 2,
  /** The connection was refused: nothing listens on the server's port. */
  CONNECTION_REFUSED: 2,
  /** Another connection failure: timeout, unknown host, TLS, connection lost before a reply. */
  CONNECTION_FAILED: 3,
  /** Any other error, e.g. `err,unauthorized`. */
  UNKNOWN: 4,
  /** `hold`: the lock was lost while held (the server stopped or closed, the lease ran out). */
  LOST_WHILE_HOLDING: 122,
  /** `hold`: the lock was not granted, or the wait ran out. */
  NOT_GRANTED: 123,
  /** `hold`: interrupted by SIGINT while waiting for the lock. */
  INTERRUPTED_SIGINT: 130,
  /** `hold`: interrupted by SIGTERM while waiting for the lock. */
  INTERRUPTED_SIGTERM: 143,
} as const;

/** How the usage names this program: `deno run -A client.ts`, or the installed command. */
let invocation = "deno run -A client.ts";

function usage(): string {
  return USAGE.replace("deno run -A client.ts", invocation);
}

const USAGE = `Usage: deno run -A client.ts [OPTIONS] COMMAND [ARGS]

Talks to a tcpnetlock server.

Commands:
  hold NAME        take the lock NAME and keep it until SIGINT or SIGTERM, then release it.
                   Prints "granted" (and "token:T" when the server gave a fencing token) on
                   stdout once the lock is held
      --wait S            wait up to S seconds for the lock if it is taken (0: try once)
      --ttl S             lease: the server frees the lock if it hears nothing for S seconds;
                          keepalives are sent every S/3 seconds
      --limit N           semaphore: up to N holders at once
      --keep-alive-secs S send a keepalive every S seconds
      --keep-alive        send a keepalive every 15 seconds (unless --keep-alive-secs)
      -s, --shared        a shared lock: many shared holders at once (like flock -s)
      -x, --exclusive     an exclusive lock, the default
  ping             check that the server answers
  stats            print the server's counters as JSON
  locks            list the held and awaited locks: a table on a terminal, else JSON
      --json              JSON, also on a terminal
      --table             a table, also when not on a terminal
  shutdown         tell the server to shut down

Options:
  --host HOST             the server (default: TCPNETLOCK_HOST, else localhost)
  --port PORT             its port (default: TCPNETLOCK_PORT, else 7654)
  --client-id ID          who holds the lock, shown by the server (default: TCPNETLOCK_CLIENT_ID)
  --tls                   speak TLS
  --ca-cert FILE          trust this CA certificate (PEM); implies --tls; repeatable
  --auth-token-file FILE  read the server's auth token from FILE (default: TCPNETLOCK_AUTH_TOKEN)
  --connect-timeout S     give up connecting after S seconds (default: 10)
  --prog-name NAME        the name the usage gives this program (set by deno install -n)
  -h, --help              print this help

Exit codes: 0 done; 2 bad usage or connection refused; 3 other connection failure;
4 other error; 122 the lock was lost while held; 123 not granted or the wait ran out;
130/143 SIGINT/SIGTERM while waiting for the lock.
`;

/** Thrown for bad usage; printed with the usage hint. */
class UsageError extends Error {}

const OPTIONS = {
  host: { type: "string" },
  port: { type: "string" },
  "client-id": { type: "string" },
  tls: { type: "boolean" },
  "ca-cert": { type: "string", multiple: true },
  "auth-token-file": { type: "string" },
  "connect-timeout": { type: "string" },
  help: { type: "boolean", short: "h" },
  wait: { type: "string" },
  ttl: { type: "string" },
  limit: { type: "string" },
  "keep-alive-secs": { type: "string" },
  "keep-alive": { type: "boolean" },
  json: { type: "boolean" },
  table: { type: "boolean" },
  shared: { type: "boolean", short: "s" },
  exclusive: { type: "boolean", short: "x" },
  "prog-name": { type: "string" },
} as const;

const COMMAND_OPTIONS: Record<string, readonly string[]> = {
  hold: ["wait", "ttl", "limit", "keep-alive-secs", "keep-alive", "shared", "exclusive"],
  locks: ["json", "table"],
  ping: [],
  stats: [],
  shutdown: [],
};

/**
 * Runs the command line with `args` (without the program name) and resolves to the exit code.
 *
 * @example
 * ```ts
 * import { main } from "./client_cli.ts";
 * Deno.exit(await main(["ping"]));
 * ```
 *
 * @param args the arguments, e.g. `["hold", "db", "--wait", "10"]`
 * @returns the exit code (see {@linkcode ExitCode})
 */
export async function main(args: string[]): Promise<number> {
  let command: string;
  let positionals: string[];
  let values: ReturnType<typeof parse>["values"];
  const prog = args.indexOf("--prog-name");
  if (prog >= 0 && /^[\w.@/-]+$/.test(args[prog + 1] ?? "")) invocation = args[prog + 1];
  try {
    ({ values, positionals } = parse(args));
    if (values.help) {
      console.log(usage().trimEnd());
      return ExitCode.OK;
    }
    if (positionals.length === 0) throw new UsageError("Missing command");
    command = positionals[0];
    const allowed = COMMAND_OPTIONS[command];
    if (allowed === undefined) {
      const near = nearest(command, Object.keys(COMMAND_OPTIONS));
      console.error(
        `error: unknown command "${command}"${near ? `, did you mean "${near}"?` : ""}\n` +
          `Run "${invocation} --help" for the commands and options.`,
      );
      return ExitCode.USAGE;
    }
    for (const [option, value] of Object.entries(values)) {
      if (value !== undefined && OPTIONS_OF_COMMANDS.has(option) && !allowed.includes(option)) {
        throw new UsageError(`Option "--${option}" does not apply to "${command}"`);
      }
    }
    const wanted = command === "hold" ? 2 : 1;
    if (positionals.length < wanted) throw new UsageError(`Missing lock name for "${command}"`);
    if (positionals.length > wanted) {
      throw new UsageError(`Unexpected argument "${positionals[wanted]}"`);
    }
  } catch (e) {
    return usageError(e);
  }

  let client: LockClient;
  try {
    // One lock (or one admin call) per run: one connection per lock, as with any server.
    client = new LockClient({ ...await clientOptions(values), transport: "connection" });
  } catch (e) {
    if (e instanceof UsageError || e instanceof RangeError || e instanceof InvalidClientIdError) {
      return usageError(e);
    }
    throw e;
  }

  try {
    switch (command) {
      case "hold":
        return await hold(client, positionals[1], values);
      case "ping":
        await client.ping();
        console.log("pong");
        return ExitCode.OK;
      case "stats":
        console.log(JSON.stringify(await client.stats(), null, 2));
        return ExitCode.OK;
      case "locks": {
        const locks = await client.locks();
        const table = values.table || (!values.json && Deno.stdout.isTerminal());
        console.log(table ? formatLocks(locks) : JSON.stringify(locks, null, 2));
        return ExitCode.OK;
      }
      default: // shutdown
        await client.shutdown();
        console.log("shutting-down");
        return ExitCode.OK;
    }
  } catch (e) {
    return failure(e);
  } finally {
    await client.close();
  }
}

const OPTIONS_OF_COMMANDS = new Set(Object.values(COMMAND_OPTIONS).flat());

function parse(args: string[]) {
  try {
    return parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
}

type Values = ReturnType<typeof parse>["values"];

async function clientOptions(values: Values): Promise<LockClientOptions> {
  const options: LockClientOptions = { host: values.host, clientId: values["client-id"] };
  if (values.port !== undefined) {
    const port = parsePositiveInt(values.port);
    if (port === undefined || port > 65535) {
      throw new UsageError(`Invalid --port "${values.port}": use a port number from 1 to 65535`);
    }
    options.port = port;
  }
  if (values.tls || values["ca-cert"] !== undefined) options.tls = true;
  if (values["ca-cert"] !== undefined) {
    options.caCerts = await Promise.all(values["ca-cert"].map((f) => readFile("--ca-cert", f)));
  }
  if (values["auth-token-file"] !== undefined) {
    const token = (await readFile("--auth-token-file", values["auth-token-file"])).trim();
    if (token === "") {
      throw new UsageError(`The --auth-token-file "${values["auth-token-file"]}" is empty`);
    }
    options.authToken = token;
  }
  if (values["connect-timeout"] !== undefined) {
    options.connectTimeout = seconds("--connect-timeout", values["connect-timeout"], true) * 1000;
  }
  return options;
}

async function readFile(option: string, path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    throw new UsageError(
      `Cannot read the ${option} file "${path}": ${e instanceof Error ? e.message : e}`,
    );
  }
}

function seconds(option: string, text: string, positive: boolean): number {
  const value = parseDecimal(text);
  if (value === undefined || (positive && value === 0)) {
    throw new UsageError(
      `Invalid ${option} "${text}": use a number of seconds${positive ? " above 0" : ""}, e.g. 1.5`,
    );
  }
  return value;
}

async function hold(client: LockClient, name: string, values: Values): Promise<number> {
  const options: LockOptions = {};
  try {
    if (values.wait !== undefined) options.wait = seconds("--wait", values.wait, false);
    if (values.ttl !== undefined) options.ttl = seconds("--ttl", values.ttl, true);
    if (values.limit !== undefined) {
      options.limit = parsePositiveInt(values.limit);
      if (options.limit === undefined) {
        throw new UsageError(`Invalid --limit "${values.limit}": use a whole number from 1`);
      }
    }
    if (values["keep-alive-secs"] !== undefined) {
      options.keepAlive = seconds("--keep-alive-secs", values["keep-alive-secs"], true);
    } else if (values["keep-alive"]) {
      options.keepAlive = 15;
    }
    if (values.shared && values.exclusive) {
      throw new UsageError("Give --shared (-s) or --exclusive (-x), not both");
    }
    if (values.shared) options.mode = "shared";
    if (values.exclusive) options.mode = "exclusive";
    if (options.ttl !== undefined && options.keepAlive !== undefined) {
      if (options.keepAlive >= options.ttl) {
        throw new UsageError(
          `Invalid --keep-alive-secs "${options.keepAlive}": it must be shorter than the --ttl`,
        );
      }
    }
  } catch (e) {
    return usageError(e);
  }

  // SIGINT/SIGTERM: while waiting, give up; while holding, release.
  const interrupt = new AbortController();
  let stop!: (signal: Deno.Signal) => void;
  const stopped = new Promise<Deno.Signal>((resolve) => stop = resolve);
  const listeners: [Deno.Signal, () => void][] = [];
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    const listener = () => {
      interrupt.abort();
      stop(signal);
    };
    try {
      Deno.addSignalListener(signal, listener);
      listeners.push([signal, listener]);
    } catch {
      // SIGTERM cannot be listened to on Windows
    }
  }

  let askedAt = -Infinity;
  try {
    let lock: HeldLock;
    try {
      lock = await client.lock(name, {
        ...options,
        signal: interrupt.signal,
        onQueued: (position) => {
          const where = `Waiting for lock "${name}" on "${client.server}": position ${position}`;
          // Who holds it: asked at most every 10 s (a long queue must not flood the server).
          if (performance.now() - askedAt < 10_000) {
            console.error(`${where} in the queue`);
            return;
          }
          askedAt = performance.now();
          void client.locks({ signal: AbortSignal.timeout(2000) }).then(
            (locks) => describeHolders(name, locks),
            () => undefined,
          ).then((holders) =>
            console.error(`${where} in the queue${holders === undefined ? "" : `; ${holders}`}`)
          );
        },
      });
    } catch (e) {
      if (interrupt.signal.aborted) {
        return (await stopped) === "SIGINT"
          ? ExitCode.INTERRUPTED_SIGINT
          : ExitCode.INTERRUPTED_SIGTERM;
      }
      if (e instanceof LockNotGrantedError || e instanceof LockTimeoutError) {
        const holders = await client.locks({ signal: AbortSignal.timeout(2000) }).then(
          (locks) => describeHolders(name, locks),
          () => undefined,
        );
        console.error(`error: ${e.message}${holders === undefined ? "" : `: ${holders}`}`);
        return ExitCode.NOT_GRANTED;
      }
      return failure(e);
    }

    console.log(lock.token === undefined ? "granted" : `granted\ntoken:${lock.token}`);
    const outcome = await Promise.race([lock.closed, stopped.then(() => "stop" as const)]);
    if (outcome === "stop") {
      try {
        await lock.release();
        return ExitCode.OK;
      } catch (e) {
        console.error(`error: ${e instanceof Error ? e.message : e}`);
        return ExitCode.LOST_WHILE_HOLDING;
      }
    }
    console.error(`error: ${outcome?.message ?? `Lost lock "${name}"`}`);
    return ExitCode.LOST_WHILE_HOLDING;
  } finally {
    for (const [signal, listener] of listeners) Deno.removeSignalListener(signal, listener);
  }
}

function usageError(e: unknown): number {
  const message = e instanceof Error ? e.message : String(e);
  console.error(`error: ${message}\n\n${usage().trimEnd()}`);
  return ExitCode.USAGE;
}

/** The candidate one edit away from `word` (a typo: one letter wrong, missing, extra, swapped). */
function nearest(word: string, candidates: readonly string[]): string | undefined {
  return candidates.find((c) => editDistance(word.toLowerCase(), c) <= 1) ??
    candidates.find((c) => c.startsWith(word.toLowerCase()) && word.length >= 2);
}

/** Damerau-Levenshtein distance (optimal string alignment) between two short words. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.length][b.length];
}

function failure(e: unknown): number {
  const message = e instanceof Error ? e.message : String(e);
  console.error(`error: ${message}`);
  if (e instanceof InvalidLockNameError || e instanceof InvalidClientIdError) {
    return ExitCode.USAGE;
  }
  if (e instanceof ServerUnreachableError) {
    return e.refused ? ExitCode.CONNECTION_REFUSED : ExitCode.CONNECTION_FAILED;
  }
  if (e instanceof ConnectionLostError) return ExitCode.CONNECTION_FAILED;
  return ExitCode.UNKNOWN;
}

/** The locks as an aligned table, one row per holder (or per name without holders). */
function formatLocks(locks: LockInfo[]): string {
  if (locks.length === 0) return "No locks held";
  const rows = [["NAME", "LIMIT", "WAITING", "CLIENT ID", "TOKEN", "SINCE", "REMOTE"]];
  for (const lock of locks) {
    const holders = lock.holders.length > 0 ? lock.holders : [undefined];
    for (const holder of holders) {
      rows.push([
        lock.name,
        String(lock.limit),
        String(lock.waiting),
        holder === undefined ? "-" : holder.client_id || "-",
        holder === undefined ? "-" : String(holder.token),
        holder === undefined ? "-" : holder.since,
        holder === undefined ? "-" : holder.remote,
      ]);
    }
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd()).join("\n");
}
