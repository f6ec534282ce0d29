/**
 * The server's HTTP side door (`--http-listen`): Prometheus metrics, health probes and the lock
 * list, served by the bounded HTTP/1.1 server of `http_server.ts` (HTTPS with the lock port's
 * certificate when it has one).
 *
 * | path | answers |
 * |---|---|
 * | `/metrics` | the {@linkcode LockMetrics} exposition (text format 0.0.4) |
 * | `/healthz` | `200 ok`: the process is up |
 * | `/readyz` | `200 ok` when the lock port answers `.ping` with `pong`, else `503` |
 * | `/locks` | the JSON array `.locks` answers |
 * | `/` | the live page of the locks (`lib/web/page.ts`, docs/web.md) |
 * | `/events` | the page's Server-Sent Events (`lib/web/events.ts`) |
 *
 * With an auth token, `/metrics`, `/locks` and `/events` want `Authorization: Bearer TOKEN` (`401`
 * otherwise); the probes stay open. Other paths get `404`, methods other than GET and HEAD `405`.
 * The HTTP server stops by itself when the lock server stops.
 *
 * @module
 */

import { tokenMatcher } from "./auth.ts";
import { EtcdStore } from "./etcd/store.ts";
import { getLogger, startupLog } from "./log.ts";
import { LockMetrics, METRICS_CONTENT_TYPE } from "./metrics.ts";
import { ListenError, type LockServer } from "./server.ts";
import { LiveFeed } from "./web/events.ts";
import { pageResponse } from "./web/page.ts";
import { type BoundedHttpServer, serveHttp } from "./http_server.ts";

/** What the HTTP server reads from the lock server. */
export type HttpSource = Pick<
  LockServer,
  "table" | "connections" | "stats" | "locks" | "addrs" | "finished"
>;

/** Options of {@linkcode startHttpServer}. */
export interface HttpServerOptions {
  /** Address to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** Port (0 picks a free one). */
  port: number;
  /** The metrics to serve; they must be the `onEvent` of the lock server (default: fresh ones). */
  metrics?: LockMetrics;
  /** When set, `/metrics`, `/locks` and `/events` want `Authorization: Bearer TOKEN`. */
  authToken?: string;
  /** The lock port speaks TLS: `/readyz` then only checks that it accepts a TCP connection. */
  tls?: boolean;
  /** Seconds `/readyz` gives the lock port to answer (default 2). */
  readyTimeout?: number;
  /** Serve HTTPS with this certificate and key (PEM text): the lock port's, when it speaks TLS. */
  certificate?: { cert: string; key: string };
  /** Most open HTTP connections; more are closed at once (default 256). */
  maxConnections?: number;
  /** Seconds a connection may take to send a whole request (default 10). */
  idleTimeout?: number;
}

/** A running HTTP server. */
export interface HttpServer extends AsyncDisposable {
  /** The address it listens on (the real port when 0 was asked for). */
  readonly addr: Deno.NetAddr;
  /** `host:port` (`[ip6]:port`), as logged. */
  readonly address: string;
  /** Resolves once it has stopped. */
  readonly finished: Promise<void>;
  /** Stops it; resolves when done. */
  close(): Promise<void>;
}

/** A `host:port` pair for a listener. */
export interface HostPort {
  /** The address. */
  hostname: string;
  /** The port, 0 to 65535. */
  port: number;
}

const log = getLogger(["tcpnetlock", "http"]);

/**
 * Reads `HOST:PORT`, `[IPV6]:PORT` or `:PORT` (loopback, 127.0.0.1); undefined when malformed.
 *
 * @example
 * ```ts
 * import { parseHostPort } from "./http.ts";
 * parseHostPort("0.0.0.0:9464"); // { hostname: "0.0.0.0", port: 9464 }
 * ```
 */
export function parseHostPort(text: string): HostPort | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]*)):(\d{1,5})$/.exec(text.trim());
  if (m === null) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { hostname: m[1] ?? (m[2] || "127.0.0.1"), port };
}

/** Formats an address as `host:port` (`[ip6]:port`). */
export function formatHostPort(addr: HostPort): string {
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}

/**
 * Starts the HTTP server for `lock`. It stops when `lock` stops (also after `.server-shutdown`).
 * Throws {@linkcode ListenError} when it cannot listen.
 *
 * @example
 * ```ts
 * import { LockMetrics } from "./metrics.ts";
 * import { startServer } from "./server.ts";
 * import { startHttpServer } from "./http.ts";
 * const metrics = new LockMetrics();
 * await using server = await startServer({ port: 0, onEvent: metrics.onEvent });
 * await using http = await startHttpServer(server, { port: 0, metrics });
 * console.log(`metrics on http://${http.address}/metrics`);
 * ```
 */
export function startHttpServer(
  lock: HttpSource,
  options: HttpServerOptions,
): Promise<HttpServer> {
  const hostname = options.hostname ?? "127.0.0.1";
  const metrics = options.metrics ?? new LockMetrics();
  const authorized = options.authToken === undefined
    ? undefined
    : makeBearerCheck(options.authToken);
  const readyTimeoutMs = Math.max(1, (options.readyTimeout ?? 2) * 1000);
  const feed = new LiveFeed(lock, {
    store: lock.table instanceof EtcdStore ? "etcd" : "memory",
  });

  const handle = async (req: Request, peer: string): Promise<Response> => {
    const path = new URL(req.url).pathname;
    const route = ROUTES.get(path);
    if (route === undefined) return text(404, "not found");
    if (req.method !== "GET" && req.method !== "HEAD") {
      return text(405, "method not allowed", { allow: "GET, HEAD" });
    }
    if (route.private && authorized !== undefined) {
      const verdict = authorized(req.headers.get("authorization"));
      if (verdict !== "ok") {
        log.warning("Refused an HTTP request from {peer} for {path}: unauthorized", {
          event: "refused",
          reason: "unauthorized",
          peer,
          path,
        });
        const challenge = verdict === "wrong"
          ? 'Bearer realm="tcpnetlock", error="invalid_token"'
          : 'Bearer realm="tcpnetlock"';
        return text(401, "unauthorized", { "www-authenticate": challenge });
      }
    }
    switch (path) {
      case "/metrics":
        return new Response(metrics.render(lock), {
          headers: { "content-type": METRICS_CONTENT_TYPE, "cache-control": "no-store" },
        });
      case "/healthz":
        return text(200, "ok");
      case "/":
        return pageResponse({ auth: authorized !== undefined }, req.method === "HEAD");
      case "/events":
        return feed.respond(req);
      case "/readyz": {
        const problem = await probeLockServer(lock, options.tls ?? false, readyTimeoutMs);
        if (problem === undefined) return text(200, "ok");
        log.warning("Not ready: the lock port {problem}", { event: "not_ready", problem });
        return text(503, `not ready: the lock port ${problem}`);
      }
      default: // "/locks"
        return new Response(JSON.stringify(lock.locks()), {
          headers: { "content-type": "application/json", "cache-control": "no-store" },
        });
    }
  };

  let server: BoundedHttpServer;
  try {
    server = serveHttp({
      hostname,
      port: options.port,
      ...(options.certificate === undefined ? {} : { tls: options.certificate }),
      maxConnections: options.maxConnections ?? 256,
      idleTimeout: options.idleTimeout ?? 10,
      warn: (message, props) => log.warning(message, props),
      onError: (err) => {
        log.error("HTTP request failed: {error}", { event: "http_error", error: String(err) });
        return text(500, "internal error");
      },
    }, async (req, info) => {
      const peer = formatHostPort(info.remoteAddr);
      const res = await handle(req, peer);
      log.debug("HTTP {method} {path} {status} for {peer}", {
        event: "http_request",
        method: req.method,
        path: new URL(req.url).pathname,
        status: res.status,
        peer,
      });
      return res;
    });
  } catch (err) {
    return Promise.reject(listenError(`${hostname}:${options.port}`, err));
  }

  const address = formatHostPort(server.addr);
  const scheme = options.certificate === undefined ? "http" : "https";
  startupLog.info(`${scheme} listening on {address}`, {
    event: "http_started",
    address,
    port: server.addr.port,
    scheme,
  });
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    // The pages' event streams end first: shutdown waits for every response to finish.
    feed.close();
    closing ??= server.shutdown().then(() => {
      log.info("HTTP stopped", { event: "http_stopped" });
    });
    return closing;
  };
  // The HTTP server lives as long as the lock server: stop with it.
  lock.finished.then(close).catch((err) => {
    log.error("Stopping HTTP failed: {error}", { event: "http_error", error: String(err) });
  });
  return Promise.resolve({
    addr: server.addr,
    address,
    finished: server.finished.then(() => closing),
    close,
    [Symbol.asyncDispose]: close,
  });
}

interface Route {
  /** Needs the Bearer token when one is configured. */
  private: boolean;
}

const ROUTES = new Map<string, Route>([
  ["/metrics", { private: true }],
  ["/locks", { private: true }],
  ["/events", { private: true }],
  ["/", { private: false }],
  ["/healthz", { private: false }],
  ["/readyz", { private: false }],
]);

function text(status: number, body: string, headers: Record<string, string> = {}): Response {
  return new Response(body, {
    status,
    headers: {
      "content-type": "text/plain; charset=utf-8",
      "cache-control": "no-store",
      ...headers,
    },
  });
}

function listenError(where: string, err: unknown): ListenError {
  const reason = err instanceof Deno.errors.AddrInUse
    ? "address already in use"
    : err instanceof Deno.errors.AddrNotAvailable
    ? "address not available"
    : (err instanceof Error ? err.message : String(err)).split("\n")[0];
  return new ListenError(`Cannot listen for HTTP on "${where}": ${reason}`, { cause: err });
}

/**
 * A constant-time check of an `Authorization` header against `Bearer TOKEN`. `missing` when
 * there is no Bearer token at all.
 */
function makeBearerCheck(token: string): (header: string | null) => "ok" | "missing" | "wrong" {
  const matches = tokenMatcher(token);
  return (header) => {
    const m = header === null ? null : /^\s*Bearer\s+(\S+)\s*$/i.exec(header);
    if (m === null) return "missing";
    return matches(m[1]) ? "ok" : "wrong";
  };
}

const PING = new TextEncoder().encode(".ping\n");

/**
 * Opens a connection to the lock server's first address and sends `.ping`; resolves to
 * `undefined` when it answers `pong` (for TLS: when it accepts the connection), else to what went
 * wrong, e.g. `refused the connection`.
 */
export async function probeLockServer(
  lock: Pick<LockServer, "addrs">,
  tls: boolean,
  timeoutMs: number,
): Promise<string | undefined> {
  const addr = lock.addrs[0];
  if (addr === undefined) return "is not listening";
  // A wildcard listener is reached over loopback.
  const hostname = addr.hostname === "0.0.0.0"
    ? "127.0.0.1"
    : addr.hostname === "::"
    ? "::1"
    : addr.hostname;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let conn: Deno.TcpConn | undefined;
  try {
    conn = await Deno.connect({ hostname, port: addr.port, signal: abort.signal });
    if (tls) return undefined;
    let done = 0;
    while (done < PING.length) done += await conn.write(PING.subarray(done));
    const reply = await readLine(conn, 64);
    if (reply === "pong") return undefined;
    return reply === null
      ? "closed the connection without answering .ping"
      : `answered .ping with "${reply}"`;
  } catch (err) {
    if (abort.signal.aborted) return `did not answer .ping within ${timeoutMs} ms`;
    if (err instanceof Deno.errors.ConnectionRefused) return "refused the connection";
    return `failed: ${(err instanceof Error ? err.message : String(err)).split("\n")[0]}`;
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch {
      // closed by the abort
    }
  }
}

/** Reads one short line (without `\n` or `\r`); null when the peer closes first. */
async function readLine(conn: Deno.Conn, max: number): Promise<string | null> {
  const buf = new Uint8Array(max);
  let len = 0;
  while (len < max) {
    const n = await conn.read(buf.subarray(len));
    if (n === null) break;
    len += n;
    const nl = buf.subarray(0, len).indexOf(10);
    if (nl >= 0) return new TextDecoder().decode(buf.subarray(0, nl)).replace(/\r$/, "");
  }
  return len === 0 ? null : new TextDecoder().decode(buf.subarray(0, len));
}
