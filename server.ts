#!/usr/bin/env -S deno run --allow-net --allow-env --allow-read --allow-write --allow-sys
/**
 * The tcpnetlock server: keeps named locks for clients that connect over TCP.
 *
 * ```sh
 * deno run -A jsr:@x/tcpnetlock/server --info
 * deno run -A server.ts --listen 0.0.0.0 --port 7654 --info
 * ```
 *
 * Every flag can also come from a `TCPNETLOCK_*` environment variable (the flag wins); see
 * `--help`. SIGINT or SIGTERM stops it: it stops accepting, closes every connection (freeing
 * every lock) and exits 0.
 *
 * @example Start a server from code
 * ```ts
 * import { main } from "./server.ts";
 * const code = await main(["--port", "7654", "--info"]); // runs until SIGINT/SIGTERM
 * ```
 *
 * @module
 */

import {
  env,
  type FlagSpec,
  formatFlags,
  intFlag,
  parseFlags,
  readFlagFile,
  secondsFlag,
  UsageError,
} from "./lib/cli.ts";
import { type HostPort, parseHostPort, startHttpServer } from "./lib/http.ts";
import { STORE_FLAGS, storeFromFlags } from "./lib/etcd_flags.ts";
import { levelFromFlags, setupLogging } from "./lib/log.ts";
import { LockMetrics } from "./lib/metrics.ts";
import { DEFAULT_HOST, DEFAULT_MAX_LINE, DEFAULT_PORT } from "./lib/protocol.ts";
import { ListenError, type LockServer, type ServerOptions, startServer } from "./lib/server.ts";
import { VERSION } from "./lib/version.ts";

export {
  type EtcdServerOptions,
  ListenError,
  type LockServer,
  type ServerOptions,
  startServer,
} from "./lib/server.ts";
export type {
  ClaimHandler,
  ClaimRequest,
  ClaimState,
  ClaimView,
  EndReason,
  HolderDetail,
  LockDetail,
  LockStore,
  Refusal,
  StoreCounters,
  StoreEvent,
  WaiterDetail,
} from "./lib/store/types.ts";
export type { TokenSource } from "./lib/tokens.ts";
export type { EtcdClientOptions } from "./lib/etcd/client.ts";

/** The server's flags; each also from the environment variable named. */
const SERVER_FLAGS: FlagSpec[] = [
  {
    name: "listen",
    type: "string",
    arg: "HOST",
    env: "TCPNETLOCK_LISTEN",
    default: DEFAULT_HOST,
    help: "address to listen on (localhost: 127.0.0.1 and ::1; 0.0.0.0: every IPv4 address)",
  },
  {
    name: "port",
    type: "string",
    arg: "PORT",
    env: "TCPNETLOCK_PORT",
    default: String(DEFAULT_PORT),
    help: "TCP port (0 picks a free one)",
  },
  { name: "info", type: "boolean", env: "TCPNETLOCK_INFO", help: "log every lock event" },
  { name: "debug", type: "boolean", env: "TCPNETLOCK_DEBUG", help: "log even more" },
  {
    name: "log-format",
    type: "string",
    arg: "text|json",
    env: "TCPNETLOCK_LOG_FORMAT",
    default: "text",
    help: "log lines as text or as JSON objects",
  },
  {
    name: "max-line",
    type: "string",
    arg: "BYTES",
    env: "TCPNETLOCK_MAX_LINE",
    default: String(DEFAULT_MAX_LINE),
    help: "longest request line",
  },
  {
    name: "first-line-timeout",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_FIRST_LINE_TIMEOUT",
    default: "60",
    help: "close connections that send no line for this long",
  },
  {
    name: "max-wait",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_MAX_WAIT",
    default: "no cap",
    help: "cut longer `wait:` requests to this",
  },
  {
    name: "max-connections",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_MAX_CONNECTIONS",
    default: "no limit",
    help: "most open connections",
  },
  {
    name: "max-unauthenticated",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_MAX_UNAUTHENTICATED",
    default: "10 % of --max-connections, at least 1; 1000 without it",
    help: "with an auth token: most connections that have not yet sent an authenticated line",
  },
  {
    name: "auth-timeout",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_AUTH_TIMEOUT",
    default: "5",
    help: "with an auth token: the first-line timeout (and TLS handshake) of a new connection",
  },
  {
    name: "write-timeout",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_WRITE_TIMEOUT",
    default: "10",
    help: "close a connection whose owed replies have not moved for this long (its lock is freed)",
  },
  {
    name: "max-waiters",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_MAX_WAITERS",
    default: "no limit",
    help: "most waiters per lock name",
  },
  {
    name: "max-locks",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_MAX_LOCKS",
    default: "no limit",
    help: "most distinct names held or waited on",
  },
  {
    name: "max-session-locks",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_MAX_SESSION_LOCKS",
    default: "10000",
    help: "most locks held or waited for at once by one session",
  },
  {
    name: "state-file",
    type: "string",
    arg: "PATH",
    env: "TCPNETLOCK_STATE_FILE",
    help: "keep the fencing token high-water mark here",
  },
  {
    name: "auth-token-file",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_AUTH_TOKEN_FILE",
    help: "require auth:TOKEN on every request but .ping (or set TCPNETLOCK_AUTH_TOKEN)",
  },
  {
    name: "tls-cert",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_TLS_CERT",
    help: "speak TLS with this PEM certificate (needs --tls-key)",
  },
  {
    name: "tls-key",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_TLS_KEY",
    help: "the PEM private key of --tls-cert",
  },
  {
    name: "http-listen",
    type: "string",
    arg: "HOST:PORT",
    env: "TCPNETLOCK_HTTP_LISTEN",
    default: "off",
    help:
      "serve /metrics, /healthz, /readyz and /locks over HTTP (HTTPS with --tls-cert) here (:PORT: loopback)",
  },
  {
    name: "http-max-connections",
    type: "string",
    arg: "N",
    env: "TCPNETLOCK_HTTP_MAX_CONNECTIONS",
    default: "256",
    help: "most open HTTP connections; more are closed at once",
  },
  {
    name: "http-idle-timeout",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_HTTP_IDLE_TIMEOUT",
    default: "10",
    help: "close an HTTP connection that sends no complete request for this long",
  },
  {
    name: "allow-remote-shutdown",
    type: "boolean",
    env: "TCPNETLOCK_ALLOW_REMOTE_SHUTDOWN",
    help: "obey .server-shutdown from any peer, not only loopback",
  },
  ...STORE_FLAGS,
  {
    name: "prog-name",
    type: "string",
    arg: "NAME",
    help: "the name --help gives this program (set by deno install -n)",
  },
  { name: "help", type: "boolean", short: "h", help: "show this help and exit" },
  { name: "version", type: "boolean", help: "show the version and exit" },
];

/** How `--help` names this program: `deno run -A server.ts`, or the installed command. */
let invocation = "deno run -A server.ts";

/** The `--help` text. */
export function usage(): string {
  return `tcpnetlock server ${VERSION}: named locks over TCP

Usage: ${invocation} [options]

Options:
${formatFlags(SERVER_FLAGS)}

Exit codes: 0 stopped by a signal or .server-shutdown; 2 bad usage or cannot listen;
3 an unexpected failure while serving (a bug: please report it with the log).
`;
}

/** Reads the command line and environment into server options and logging settings. */
export function parseServerArgs(
  args: string[],
):
  | {
    options: ServerOptions;
    level: "debug" | "info" | "warning";
    json: boolean;
    /** Where to serve HTTP (`--http-listen`); absent when off. */
    http?: { hostname: string; port: number };
    /** `--http-max-connections` and `--http-idle-timeout` (seconds), when given. */
    httpLimits: { maxConnections?: number; idleTimeout?: number };
  }
  | "help"
  | "version" {
  const { values } = parseFlags(args, SERVER_FLAGS);
  if (values.help) return "help";
  if (values.version) return "version";
  const format = values["log-format"] ?? "text";
  if (format !== "text" && format !== "json") {
    throw new UsageError(`Invalid value for --log-format: "${format}" (expected text or json)`);
  }
  const options: ServerOptions = {
    hostname: (values.listen as string | undefined)?.trim() || DEFAULT_HOST,
    port: intFlag(values, "port", 0, 65535) ?? DEFAULT_PORT,
    maxLine: intFlag(values, "max-line", 16, 1 << 20),
    firstLineTimeout: secondsFlag(values, "first-line-timeout"),
    maxWait: secondsFlag(values, "max-wait", true),
    maxConnections: intFlag(values, "max-connections", 1),
    maxWaiters: intFlag(values, "max-waiters", 0),
    maxLocks: intFlag(values, "max-locks", 1),
    maxSessionLocks: intFlag(values, "max-session-locks", 1),
    allowRemoteShutdown: values["allow-remote-shutdown"] === true,
    stateFile: values["state-file"] as string | undefined,
  };
  const etcd = storeFromFlags(values);
  if (etcd !== undefined) options.etcd = etcd;
  const tokenFile = values["auth-token-file"] as string | undefined;
  if (tokenFile !== undefined) {
    const token = readFlagFile(tokenFile, "the auth token file").trim();
    if (token === "") {
      throw new UsageError(`The auth token file "${tokenFile}" is empty (or only white space)`);
    }
    checkToken(token, `the auth token file "${tokenFile}"`);
    options.authToken = token;
  } else {
    const raw = env("TCPNETLOCK_AUTH_TOKEN");
    if (raw !== undefined) {
      // Set but blank used to turn auth off without a word: refuse it instead.
      const token = raw.trim();
      if (token === "") {
        throw new UsageError("TCPNETLOCK_AUTH_TOKEN is set but empty (or only white space)");
      }
      checkToken(token, "TCPNETLOCK_AUTH_TOKEN");
      options.authToken = token;
    }
  }
  const maxUnauthenticated = intFlag(values, "max-unauthenticated", 1);
  if (maxUnauthenticated !== undefined) options.maxUnauthenticated = maxUnauthenticated;
  const authTimeout = secondsFlag(values, "auth-timeout");
  if (authTimeout !== undefined) options.authTimeout = authTimeout;
  const writeTimeout = secondsFlag(values, "write-timeout");
  if (writeTimeout !== undefined) options.writeTimeout = writeTimeout;
  const cert = values["tls-cert"] as string | undefined;
  const key = values["tls-key"] as string | undefined;
  if ((cert === undefined) !== (key === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (cert !== undefined && key !== undefined) {
    options.tls = {
      cert: readFlagFile(cert, "the TLS certificate"),
      key: readFlagFile(key, "the TLS key"),
    };
  }
  const httpMaxConnections = intFlag(values, "http-max-connections", 1);
  const httpIdleTimeout = secondsFlag(values, "http-idle-timeout");
  let http: HostPort | undefined;
  const httpListen = values["http-listen"] as string | undefined;
  if (httpListen !== undefined) {
    http = parseHostPort(httpListen);
    if (http === undefined) {
      throw new UsageError(
        `Invalid value for --http-listen: "${httpListen}" (expected HOST:PORT, [IPV6]:PORT or :PORT)`,
      );
    }
  }
  return {
    options,
    level: levelFromFlags({ debug: values.debug === true, info: values.info === true }),
    json: format === "json",
    ...(http === undefined ? {} : { http }),
    httpLimits: { maxConnections: httpMaxConnections, idleTimeout: httpIdleTimeout },
  };
}

/**
 * Refuses a token no client could send: `auth:TOKEN` ends at a `,`, and white space around it
 * is trimmed, so a token with a comma, white space or a control character never matches.
 */
function checkToken(token: string, where: string): void {
  // deno-lint-ignore no-control-regex
  const bad = /[,\s\x00-\x1f\x7f\p{Cc}]/u.exec(token);
  if (bad !== null) {
    const what = bad[0] === ","
      ? "a comma"
      : /\s/u.test(bad[0])
      ? "white space"
      : "a control character";
    throw new UsageError(
      `The auth token from ${where} contains ${what}: no client could send it (use letters, digits and punctuation other than ",")`,
    );
  }
}

/**
 * Runs the server until SIGINT, SIGTERM or `.server-shutdown`; resolves to the exit code.
 *
 * @example
 * ```ts
 * import { main } from "./server.ts";
 * Deno.exit(await main(Deno.args));
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const prog = args.indexOf("--prog-name");
  if (prog >= 0 && /^[\w.@/-]+$/.test(args[prog + 1] ?? "")) invocation = args[prog + 1];
  let parsed;
  try {
    parsed = parseServerArgs(args);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`tcpnetlock server: ${err.message}\nTry --help for the options.`);
      return 2;
    }
    throw err;
  }
  if (parsed === "help") {
    console.log(usage());
    return 0;
  }
  if (parsed === "version") {
    console.log(VERSION);
    return 0;
  }
  setupLogging({ level: parsed.level, format: parsed.json ? "json" : "text" });
  const options = parsed.options;
  const metrics = parsed.http === undefined ? undefined : new LockMetrics();
  if (metrics !== undefined) options.onEvent = metrics.onEvent;
  let server: LockServer;
  try {
    server = await startServer(options);
  } catch (err) {
    if (err instanceof ListenError) {
      console.error(`tcpnetlock server: ${err.message}`);
      return 2;
    }
    console.error(`tcpnetlock server: ${err instanceof Error ? err.message : err}`);
    return 2;
  }
  let http: { finished: Promise<void> } | undefined;
  if (parsed.http !== undefined) {
    try {
      // It stops by itself when the lock server stops.
      http = await startHttpServer(server, {
        ...parsed.http,
        metrics,
        authToken: options.authToken,
        tls: options.tls !== undefined,
        ...(options.tls === undefined ? {} : { certificate: options.tls }),
        ...(parsed.httpLimits.maxConnections === undefined
          ? {}
          : { maxConnections: parsed.httpLimits.maxConnections }),
        ...(parsed.httpLimits.idleTimeout === undefined
          ? {}
          : { idleTimeout: parsed.httpLimits.idleTimeout }),
      });
    } catch (err) {
      await server.close();
      console.error(`tcpnetlock server: ${err instanceof Error ? err.message : err}`);
      return 2;
    }
  }
  const stop = () => {
    server.close();
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const s of signals) Deno.addSignalListener(s, stop);
  try {
    await server.finished;
    await http?.finished;
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, stop);
  }
  return 0;
}

if (import.meta.main) {
  Deno.exit(
    await main(Deno.args).catch((err) => {
      console.error(`tcpnetlock server: unexpected failure: ${err?.stack ?? err}`);
      return 3;
    }),
  );
}
