#!/usr/bin/env -S deno run --allow-net --allow-env --allow-read
/**
 * The tcpnetlock client: take named locks on a tcpnetlock server, keep them alive, release them,
 * and ask the server for its state.
 *
 * A lock is held by a TCP connection: the server frees it the moment the connection closes, so a
 * crashed process never leaves a lock behind. The locks of a {@linkcode LockClient} share one
 * connection, a session (protocol version 3), opened at the first lock; against an older server
 * each lock opens a connection of its own (see {@linkcode LockClientOptions.transport}). Each admin
 * call opens its own connection. The connection is read all the time: a {@linkcode HeldLock}'s
 * `signal` aborts the moment the lock is lost (the server stopped, the lease ran out), with an
 * error that says why.
 *
 * The client has no third-party dependency and can be imported by URL.
 *
 * @example Hold a lock for the length of a block
 * ```ts
 * import { LockClient } from "@x/tcpnetlock/client";
 *
 * const client = new LockClient(); // TCPNETLOCK_HOST, TCPNETLOCK_PORT or localhost:7654
 * {
 *   await using lock = await client.lock("nightly-report", { wait: 30, ttl: 10 });
 *   console.log(`holding ${lock.name} with fencing token ${lock.token}`);
 *   // ... the work; lock.signal aborts if the lock is lost
 * } // released here
 * ```
 *
 * @example Run a function under a lock
 * ```ts
 * import { LockClient } from "@x/tcpnetlock/client";
 *
 * const client = new LockClient({ host: "locks.internal", clientId: "web-1" });
 * const migrated = await client.withLock("db-migration", async ({ token, signal }) => {
 *   // ... the work; hand `token` to the storage so that it can refuse a stale holder's writes
 *   signal.throwIfAborted(); // the lock is still ours
 *   return token !== undefined;
 * }, { wait: 60, ttl: 15 });
 * ```
 *
 * @example The command line
 * ```sh
 * deno run -A client.ts ping
 * deno run -A client.ts hold db --wait 30 --ttl 10   # prints "granted", holds until SIGTERM
 * deno run -A client.ts locks
 * ```
 *
 * @module
 */

import {
  Action,
  DEFAULT_HOST,
  DEFAULT_PORT,
  ErrorReason,
  formatRequest,
  isValidClientId,
  isValidLockName,
  type LockInfo,
  parseReply,
  Reply,
  type ReplyLine,
  type Stats,
} from "./lib/protocol.ts";
import { LineReader, type LineResult } from "./lib/lines.ts";
import { type OpenResult, SessionLink, type SessionLock } from "./lib/client_session.ts";
import { closeQuietly, describe, expectLine, formatSeconds } from "./lib/client_util.ts";
import {
  ConnectionLostError,
  InvalidClientIdError,
  InvalidLockNameError,
  LockExpiredError,
  LockNotGrantedError,
  LockTimeoutError,
  ProtocolError,
  ServerError,
  ServerUnreachableError,
  TcpNetLockError,
} from "./lib/errors.ts";

export {
  ConnectionLostError,
  InvalidClientIdError,
  InvalidLockNameError,
  isRetriableError,
  LockExpiredError,
  LockNotGrantedError,
  LockTimeoutError,
  ProtocolError,
  ServerError,
  ServerUnreachableError,
  TcpNetLockError,
  type TcpNetLockErrorOptions,
} from "./lib/errors.ts";
export {
  DEFAULT_HOST,
  DEFAULT_PORT,
  type HolderInfo,
  isValidClientId,
  isValidLockName,
  type LockInfo,
  type Stats,
} from "./lib/protocol.ts";

/** The `.locks` reply lists every lock on one line: accepted up to 16 MiB (the buffer grows as needed). */
const LOCKS_MAX_LINE = 16 * 1024 * 1024;
/** Every other reply is short: a longer line is a protocol error. */
const SHORT_MAX_LINE = 64 * 1024;
/** The default {@linkcode LockClientOptions.connectTimeout}, in milliseconds. */
const DEFAULT_CONNECT_TIMEOUT = 10_000;
/** Seconds above this are surely a mistake (and would print in exponent notation). */
const MAX_SECONDS = 1e12;

/**
 * How a {@linkcode LockClient} carries its locks:
 * - `"session"`: every lock over one shared connection (a protocol version 3 session);
 * - `"connection"`: one connection per lock (protocol versions 1 and 2, any server);
 * - `"auto"` (the default): a session, or one connection per lock against a server that does not
 *   know sessions (it answers `session` with `bad-action`).
 */
export type LockTransport = "auto" | "session" | "connection";

/** Where and how a {@linkcode LockClient} connects. Every field is optional. */
export interface LockClientOptions {
  /**
   * The server's host name or IP address. Default: `TCPNETLOCK_HOST`, else `localhost`. For
   * `localhost` the client tries 127.0.0.1 and, if refused, ::1, so it finds a server on
   * `localhost` whichever address family that one bound.
   */
  host?: string;
  /** The server's port. Default: `TCPNETLOCK_PORT`, else 7654. */
  port?: number;
  /**
   * Who this client is, shown in the server's logs and in `.locks`: letters, digits, `.`, `@`,
   * `_`, `-`. Default: `TCPNETLOCK_CLIENT_ID`, else none.
   */
  clientId?: string;
  /** Speak TLS to the server (whose certificate is checked against `host`). Default: false. */
  tls?: boolean;
  /** Extra CA certificates (PEM) to trust for TLS, e.g. for a self-signed server certificate. */
  caCerts?: string[];
  /**
   * The token of a server started with an auth token; sent as `auth:TOKEN` on every request.
   * Default: `TCPNETLOCK_AUTH_TOKEN`, else none.
   */
  authToken?: string;
  /**
   * How long to try to connect (TCP and TLS handshake), in milliseconds, before giving up with a
   * {@linkcode ServerUnreachableError}. Default: 10000. `Infinity` waits as long as the system
   * does. It also bounds how long {@linkcode HeldLock.release} waits for the server to confirm.
   */
  connectTimeout?: number;
  /**
   * How locks travel: `"auto"` (default) takes them all over one session (one connection shared
   * by every lock of this client, opened at the first lock, opened again after it drops), and
   * falls back to one connection per lock against an older server; `"session"` insists on a
   * session (an older server gives {@linkcode ProtocolError}); `"connection"` opens one
   * connection per lock, as tcpnetlock 0.1 clients do. See `docs/sessions.md`.
   */
  transport?: LockTransport;
}

/** How to take one lock: {@linkcode LockClient.lock}. Every field is optional. */
export interface LockOptions {
  /**
   * If the lock is taken, wait up to this many seconds for it, in a FIFO queue (the server may
   * cap the wait). `0` tries once, and, unlike leaving `wait` out, asks for a fencing token.
   * Without `wait` a taken lock fails at once with {@linkcode LockNotGrantedError}.
   */
  wait?: number;
  /**
   * Lease in seconds: the server frees the lock if it hears nothing from the holder for this
   * long. The lock sends `.keepalive` every third of the ttl by itself; if the process freezes or
   * the network fails, the lock is freed without waiting for TCP to notice.
   */
  ttl?: number;
  /** Counting semaphore: up to this many holders of the name at once. Default: 1. */
  limit?: number;
  /**
   * A readers–writer lock: `"shared"` holds the name beside other shared holders (readers),
   * `"exclusive"` holds it alone (a writer; what a lock without `mode` does). Both wait in one
   * FIFO queue, so a waiting writer is never starved by readers that come after it. Sent as
   * `mode:` on the lock line only when set; `"shared"` takes no `limit` above 1.
   *
   * @example
   * ```ts ignore
   * await using lock = await new LockClient().lock("dataset", { mode: "shared", wait: 60 });
   * ```
   */
  mode?: "shared" | "exclusive";
  /**
   * Send `.keepalive` every this many seconds while held. Default: a third of `ttl`, or never
   * without a ttl. Useful without a ttl to keep idle-connection killers (NAT, proxies) at bay.
   */
  keepAlive?: number;
  /** The client id for this lock, instead of the client's. */
  clientId?: string;
  /** Called each time the server reports the place in the queue (1: next in line). */
  onQueued?: (position: number) => void;
  /**
   * Gives up taking the lock: the promise rejects with the signal's reason and the connection is
   * closed, leaving the queue. It has no effect once the lock is held.
   */
  signal?: AbortSignal;
}

/** Options of the admin calls ({@linkcode LockClient.ping} and the like). */
export interface RequestOptions {
  /** Gives up: the promise rejects with the signal's reason and the connection is closed. */
  signal?: AbortSignal;
}

/**
 * A lock this process holds. The lock lasts as long as its connection; `release()` (or `await
 * using`) frees it. The connection is read all the time, so {@linkcode HeldLock.signal} aborts
 * the moment the lock is lost.
 *
 * @example
 * ```ts
 * import { LockClient } from "@x/tcpnetlock/client";
 * const lock = await new LockClient().lock("db", { wait: 10, ttl: 30 });
 * try {
 *   lock.signal.throwIfAborted();
 *   console.log(lock.name, lock.token);
 * } finally {
 *   await lock.release();
 * }
 * ```
 */
export interface HeldLock extends AsyncDisposable {
  /** The lock's name. */
  readonly name: string;
  /**
   * The fencing token of this grant: larger than every token the server handed out before.
   * `undefined` for a version 1 request (no `wait`, `ttl` or `limit`, over a connection of its
   * own), whose reply carries none; over a session always a number.
   */
  readonly token: number | undefined;
  /** The server as `host:port`. */
  readonly server: string;
  /** The client id the lock was taken with, if any. */
  readonly clientId: string | undefined;
  /** The lease in seconds, if the lock has one. */
  readonly ttl: number | undefined;
  /**
   * Aborts when the lock is lost (not when it is released): the connection closed or failed
   * ({@linkcode ConnectionLostError}), the lease ran out ({@linkcode LockExpiredError}), or the
   * server said something unexpected ({@linkcode ProtocolError}). `signal.reason` says which
   * lock, which server and why. Pass it to work that must stop without the lock.
   */
  readonly signal: AbortSignal;
  /**
   * Settles once the lock is over: with `undefined` after a confirmed release, with the reason
   * when it was lost. It never rejects.
   */
  readonly closed: Promise<TcpNetLockError | undefined>;
  /** True while the lock is held: not lost, and no release started. */
  readonly held: boolean;
  /**
   * Sends `.keepalive` and waits for `alive`, renewing the lease. Rejects with the reason if the
   * lock is lost, and with a {@linkcode TcpNetLockError} after `release()`.
   */
  keepalive(): Promise<void>;
  /**
   * Sends `release` and waits for `released`. Safe to call more than once: every call returns
   * the same promise. If the lock was lost before the server confirmed the release, it rejects
   * with the reason (the work that ran under the lock may not have been protected all along).
   */
  release(): Promise<void>;
  /**
   * Releases the lock, like {@linkcode HeldLock.release}, but never throws: a loss has already
   * been reported through `signal` and `closed`.
   */
  [Symbol.asyncDispose](): Promise<void>;
}

/** What {@linkcode LockClient.withLock} passes to its function. */
export interface LockContext {
  /** The fencing token, `undefined` for a version 1 request (see {@linkcode HeldLock.token}). */
  token: number | undefined;
  /** Aborts if the lock is lost while the function runs. */
  signal: AbortSignal;
  /** The lock itself, e.g. to call `keepalive()`. */
  lock: HeldLock;
}

/**
 * A client of a tcpnetlock server. Its locks share one session (one connection, opened at the
 * first lock and again after it drops; one per lease, see `docs/sessions.md`), or, against an
 * older server, one connection each; each admin call opens its own. One client can be shared by a
 * whole program. Disposing of the client (or `close()`) releases the locks it still holds,
 * abandons its calls in flight and closes its sessions.
 *
 * @example Try a lock, do not wait
 * ```ts
 * import { LockClient } from "@x/tcpnetlock/client";
 * const client = new LockClient({ host: "locks.internal", port: 7654, clientId: "cron-1" });
 * const lock = await client.tryLock("nightly-report");
 * if (lock === null) {
 *   console.log("another instance is running");
 * } else {
 *   await using _ = lock;
 *   // ... the work
 * }
 * ```
 *
 * @example Wait in line, with a lease and a fencing token
 * ```ts
 * import { LockClient } from "@x/tcpnetlock/client";
 * await using client = new LockClient();
 * await using lock = await client.lock("db", {
 *   wait: 30,
 *   ttl: 10,
 *   onQueued: (position) => console.log(`waiting, position ${position}`),
 * });
 * console.log(`token ${lock.token}`);
 * ```
 */
export class LockClient implements AsyncDisposable {
  /** The server's host. */
  readonly host: string;
  /** The server's port. */
  readonly port: number;
  /** The default client id of this client's locks, if any. */
  readonly clientId: string | undefined;
  /** Whether the client speaks TLS. */
  readonly tls: boolean;
  /** The server as `host:port` (`[::1]:7654` for an IPv6 address), as errors name it. */
  readonly server: string;
  readonly #caCerts: string[] | undefined;
  readonly #authToken: string | undefined;
  readonly #connectTimeout: number;
  readonly #closing = new AbortController();
  readonly #held = new Set<HeldLock>();
  readonly #transport: LockTransport;
  /** Open sessions, by lease (`ttl`/`keepAlive`): locks with the same lease share one. */
  readonly #links = new Map<string, SessionLink>();
  readonly #opening = new Map<string, Promise<OpenResult>>();
  /** Set once the server answered `session` with `bad-action` (auto: one connection per lock). */
  #noSessions = false;
  /** Failed session openings in a row, and when the next one may start (back-off). */
  #openFailures = 0;
  #retryAt = 0;

  /**
   * Checks the options (throws {@linkcode InvalidClientIdError} for a bad client id and
   * `RangeError` for a bad port, timeout or auth token); connects to nothing yet.
   *
   * @param options where and how to connect; unset fields come from the `TCPNETLOCK_*`
   * environment variables when the program may read them, else from the defaults
   */
  constructor(options: LockClientOptions = {}) {
    let host = options.host ?? envVar("TCPNETLOCK_HOST") ?? DEFAULT_HOST;
    if (host.startsWith("[") && host.endsWith("]")) host = host.slice(1, -1);
    if (host === "") throw new RangeError('Invalid host "": give a host name or an IP address');
    this.host = host;

    let port = options.port;
    if (port === undefined) {
      const text = envVar("TCPNETLOCK_PORT");
      port = text === undefined ? DEFAULT_PORT : /^\d+$/.test(text) ? Number(text) : NaN;
      if (!isPort(port)) {
        throw new RangeError(
          `Invalid TCPNETLOCK_PORT "${text}": use a port number from 1 to 65535`,
        );
      }
    }
    if (!isPort(port)) {
      throw new RangeError(`Invalid port "${port}": use a port number from 1 to 65535`);
    }
    this.port = port;

    const clientId = options.clientId ?? envVar("TCPNETLOCK_CLIENT_ID");
    if (clientId !== undefined && !isValidClientId(clientId)) {
      throw new InvalidClientIdError(clientId);
    }
    this.clientId = clientId;

    const authToken = options.authToken ?? envVar("TCPNETLOCK_AUTH_TOKEN")?.trim();
    if (authToken !== undefined && !/^[^,\r\n]+$/.test(authToken)) {
      throw new RangeError(
        'Invalid auth token: it must not be empty nor contain ",", "\\r" or "\\n"',
      );
    }
    this.#authToken = authToken;

    const timeout = options.connectTimeout ?? DEFAULT_CONNECT_TIMEOUT;
    if (!(timeout > 0)) {
      throw new RangeError(
        `Invalid connect timeout "${timeout}": use a number of milliseconds above 0`,
      );
    }
    this.#connectTimeout = timeout;
    this.tls = options.tls ?? false;
    const transport = options.transport ?? "auto";
    if (transport !== "auto" && transport !== "session" && transport !== "connection") {
      throw new RangeError(
        `Invalid transport "${transport}": use "auto", "session" or "connection"`,
      );
    }
    this.#transport = transport;
    this.#caCerts = options.caCerts;
    this.server = `${host.includes(":") ? `[${host}]` : host}:${port}`;
  }

  /**
   * Takes the lock `name`, and resolves once it is held.
   *
   * Over a session every lock has a fencing token. Over one connection per lock, without `wait`,
   * `ttl`, `limit` and `mode` this is a version 1 request (`lock,name:NAME`), which any tcpnetlock
   * server understands; the lock then has no token. With any of them the server answers with a
   * fencing token and may queue the request.
   *
   * Rejects with {@linkcode LockNotGrantedError} (taken, no wait), {@linkcode LockTimeoutError}
   * (the wait ran out), {@linkcode ServerError} (`err,...`), {@linkcode ServerUnreachableError},
   * {@linkcode ConnectionLostError}, {@linkcode ProtocolError}, or the `signal`'s reason; throws
   * {@linkcode InvalidLockNameError} / {@linkcode InvalidClientIdError} before connecting.
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * await using lock = await new LockClient().lock("db", { wait: 10, ttl: 30 });
   * ```
   *
   * @param name the lock: 1 to 255 letters, digits, `_` and `-`
   * @param options wait, lease, semaphore limit, shared mode, keepalive, client id, queue callback, signal
   * @returns the held lock
   */
  async lock(name: string, options: LockOptions = {}): Promise<HeldLock> {
    const { wait, ttl, limit, mode, keepAlive, onQueued } = options;
    if (!isValidLockName(name)) throw new InvalidLockNameError(name);
    const clientId = options.clientId ?? this.clientId;
    if (clientId !== undefined && !isValidClientId(clientId)) {
      throw new InvalidClientIdError(clientId);
    }
    checkSeconds("wait", wait, 0);
    checkSeconds("ttl", ttl, 0.001);
    checkSeconds("keepAlive", keepAlive, 0.001);
    if (limit !== undefined && !(Number.isSafeInteger(limit) && limit >= 1)) {
      throw new RangeError(`Invalid limit "${limit}": use a whole number of at least 1`);
    }
    if (mode !== undefined && mode !== "shared" && mode !== "exclusive") {
      throw new RangeError(`Invalid mode "${mode}": use "shared" or "exclusive"`);
    }
    if (mode === "shared" && limit !== undefined && limit > 1) {
      throw new RangeError(`Invalid mode "shared" with limit ${limit}: a shared lock has no limit`);
    }
    if (ttl !== undefined && keepAlive !== undefined && keepAlive >= ttl) {
      throw new RangeError(
        `Invalid keepAlive "${keepAlive}": it must be shorter than the ttl of ${ttl} s`,
      );
    }
    if (this.#transport !== "connection" && !this.#noSessions) {
      const signal = this.#signal(options.signal);
      const every = keepAlive ?? (ttl === undefined ? undefined : ttl / 3);
      const link = await this.#link(ttl, every, signal, name);
      if (link !== undefined) {
        const lock: SessionLock = await link.lock({
          name,
          clientId,
          wait,
          limit,
          mode,
          onQueued,
          signal,
          onEnd: (l) => this.#held.delete(l),
        });
        const held: HeldLock = lock;
        this.#held.add(held);
        return held;
      }
    }
    const extended = wait !== undefined || ttl !== undefined || limit !== undefined ||
      mode !== undefined;
    const request = formatRequest(Action.LOCK, {
      name,
      "client-id": clientId,
      wait: formatSeconds(wait),
      ttl: formatSeconds(ttl),
      limit,
      mode,
      auth: this.#authToken,
    });

    const where = `lock "${name}" on "${this.server}"`;
    const fail = (what: string) => `Cannot acquire ${where}: ${what}`;
    const facts = { server: this.server, lockName: name };
    const signal = this.#signal(options.signal);
    const wire = await this.#connect(signal, SHORT_MAX_LINE);
    let holding: Holding | undefined;
    const onAbort = () => wire.close();
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      await wire.write(request).catch((e) => {
        throw new ConnectionLostError(fail(`cannot send the request (${describe(e)})`), {
          ...facts,
          cause: e,
        });
      });
      for (;;) {
        const result = await wire.read().catch((e) => {
          throw new ConnectionLostError(fail(`connection lost (${describe(e)})`), {
            ...facts,
            cause: e,
          });
        });
        signal.throwIfAborted();
        const reply = expectLine(result, fail, facts, this.tls);
        switch (reply.word) {
          case Reply.QUEUED: {
            const position = Number(reply.fields.get("position"));
            if (!extended || !Number.isSafeInteger(position) || position < 1) {
              throw unexpected(result, fail, facts);
            }
            onQueued?.(position);
            continue;
          }
          case Reply.OK: {
            const tokenText = reply.fields.get("token");
            let token: number | undefined;
            if (tokenText !== undefined) {
              token = /^\d+$/.test(tokenText) ? Number(tokenText) : NaN;
              if (!Number.isSafeInteger(token)) throw unexpected(result, fail, facts);
            }
            if (extended && token === undefined) {
              throw new ProtocolError(
                fail(
                  'the server granted it without a fencing token, so it ignored "wait", "ttl", ' +
                    '"limit" and "mode" (a version 1 server?)',
                ),
                reply.word,
                facts,
              );
            }
            holding = new Holding(wire, {
              name,
              token,
              server: this.server,
              clientId,
              ttl,
              keepAlive: keepAlive ?? (ttl === undefined ? undefined : ttl / 3),
              releaseTimeout: this.#connectTimeout,
              onEnd: (h) => this.#held.delete(h),
            });
            this.#held.add(holding);
            return holding;
          }
          case Reply.NOT_GRANTED:
            throw new LockNotGrantedError(fail("not granted, held by another client"), facts);
          case Reply.TIMEOUT:
            throw new LockTimeoutError(
              fail(`still held by another client when the wait of ${wait} s ran out`),
              facts,
            );
          case Reply.ERR:
            throw serverError(reply.rest, fail, facts);
          default:
            throw unexpected(result, fail, facts);
        }
      }
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
      if (holding === undefined) wire.close();
    }
  }

  /**
   * Like {@linkcode LockClient.lock}, but resolves to `null` instead of rejecting when the lock
   * is taken ({@linkcode LockNotGrantedError}) or the wait runs out ({@linkcode LockTimeoutError}).
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * await using lock = await new LockClient().tryLock("nightly-report");
   * if (lock === null) console.log("someone else is on it");
   * ```
   *
   * @param name the lock
   * @param options as for {@linkcode LockClient.lock}
   * @returns the held lock, or `null`
   */
  async tryLock(name: string, options: LockOptions = {}): Promise<HeldLock | null> {
    try {
      return await this.lock(name, options);
    } catch (e) {
      if (e instanceof LockNotGrantedError || e instanceof LockTimeoutError) return null;
      throw e;
    }
  }

  /**
   * Takes the lock, runs `fn`, releases the lock (also when `fn` throws) and returns what `fn`
   * returned. It resolves only if the lock was held for the whole of `fn`: if the lock was lost
   * meanwhile, it rejects with the reason even when `fn` succeeded. An error thrown by `fn` wins
   * over a failed release.
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * const client = new LockClient();
   * await client.withLock("db-migration", async ({ token, signal }) => {
   *   await fetch("https://example.com/migrate?fence=" + token, { signal });
   * }, { wait: 60, ttl: 15 });
   * ```
   *
   * @param name the lock
   * @param fn the work; it gets the token, a signal that aborts if the lock is lost, and the lock
   * @param options as for {@linkcode LockClient.lock}
   * @returns what `fn` returned
   */
  async withLock<T>(
    name: string,
    fn: (context: LockContext) => T | Promise<T>,
    options: LockOptions = {},
  ): Promise<T> {
    const lock = await this.lock(name, options);
    let result: T;
    try {
      result = await fn({ token: lock.token, signal: lock.signal, lock });
    } catch (e) {
      await lock.release().catch(() => {});
      throw e;
    }
    await lock.release();
    return result;
  }

  /**
   * Asks the server for `pong`.
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * const ms = await new LockClient().ping();
   * console.log(`server answered in ${ms.toFixed(1)} ms`);
   * ```
   *
   * @param options a signal to give up
   * @returns the round trip in milliseconds, connecting included
   */
  async ping(options: RequestOptions = {}): Promise<number> {
    const start = performance.now();
    await this.#ask(Action.PING, Reply.PONG, "ping", options);
    return performance.now() - start;
  }

  /**
   * Fetches the server's counters (`.stats`).
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * const stats = await new LockClient().stats();
   * console.log(`${stats.lock_count} locks held`);
   * ```
   *
   * @param options a signal to give up
   * @returns the counters
   */
  async stats(options: RequestOptions = {}): Promise<Stats> {
    const fail = this.#failer("get the stats of");
    const reply = await this.#ask(Action.STATS, Reply.STATS, "get the stats of", options);
    const stats = parseJson(reply.rest, fail, this.server);
    if (typeof stats !== "object" || stats === null || Array.isArray(stats)) {
      throw new ProtocolError(fail("the stats are not a JSON object"), reply.rest, {
        server: this.server,
      });
    }
    return stats as Stats;
  }

  /**
   * Lists the names held or waited on (`.locks`), with their holders.
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * for (const lock of await new LockClient().locks()) {
   *   console.log(lock.name, lock.holders.map((h) => h.client_id), lock.waiting);
   * }
   * ```
   *
   * @param options a signal to give up
   * @returns one entry per name
   */
  async locks(options: RequestOptions = {}): Promise<LockInfo[]> {
    const fail = this.#failer("list the locks of");
    const reply = await this.#ask(Action.LOCKS, Reply.LOCKS, "list the locks of", options);
    const locks = parseJson(reply.rest, fail, this.server);
    if (!Array.isArray(locks)) {
      throw new ProtocolError(fail("the list of locks is not a JSON array"), reply.rest, {
        server: this.server,
      });
    }
    return locks as LockInfo[];
  }

  /**
   * Tells the server to shut down (`.server-shutdown`); resolves once it answered
   * `shutting-down`. A server obeys only loopback clients unless started with
   * `--allow-remote-shutdown` (else {@linkcode ServerError} with reason `forbidden`).
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * await new LockClient().shutdown();
   * ```
   *
   * @param options a signal to give up
   */
  async shutdown(options: RequestOptions = {}): Promise<void> {
    await this.#ask(Action.SHUTDOWN, Reply.SHUTTING_DOWN, "shut down", options);
  }

  /**
   * Releases every lock this client still holds and abandons its calls in flight (they reject).
   * Later calls reject. Idempotent.
   *
   * @example
   * ```ts
   * import { LockClient } from "@x/tcpnetlock/client";
   * const client = new LockClient();
   * await client.lock("a");
   * await client.close(); // "a" is released
   * ```
   */
  async close(): Promise<void> {
    if (!this.#closing.signal.aborted) {
      this.#closing.abort(
        new TcpNetLockError(`The client of "${this.server}" is closed`, {
          server: this.server,
        }),
      );
    }
    await Promise.all([...this.#held].map((h) => h[Symbol.asyncDispose]()));
    for (const link of [...this.#links.values()]) link.close();
    await Promise.allSettled([...this.#opening.values()]);
  }

  /**
   * The session for locks with this lease, opened if need be (one opening at a time per lease,
   * shared by every caller; after failures, the next opening waits a back-off of 100 ms doubling
   * up to 5 s, at most the connect timeout). `undefined` when the server does not know sessions
   * and the transport is `"auto"`.
   */
  async #link(
    ttl: number | undefined,
    keepAlive: number | undefined,
    signal: AbortSignal,
    name: string,
  ): Promise<SessionLink | undefined> {
    const key = `${ttl ?? ""}/${keepAlive ?? ""}`;
    for (;;) {
      const open = this.#links.get(key);
      if (open !== undefined && !open.closed) return open;
      let opening = this.#opening.get(key);
      if (opening === undefined) {
        // Shared by every caller: only closing the client gives it up, not one caller's signal.
        opening = this.#openLink(key, ttl, keepAlive, this.#closing.signal);
        this.#opening.set(key, opening);
        opening.finally(() => this.#opening.delete(key)).catch(() => {});
      }
      const result = await untilAborted(opening, signal);
      if (result === "unsupported") {
        if (this.#transport === "auto") {
          this.#noSessions = true;
          return undefined;
        }
        throw new ProtocolError(
          `Cannot acquire lock "${name}" on "${this.server}": the server does not know sessions ` +
            '(an older server?); use transport "auto" or "connection"',
          Reply.BAD_ACTION,
          { server: this.server, lockName: name },
        );
      }
      if (!result.closed) return result;
    }
  }

  async #openLink(
    key: string,
    ttl: number | undefined,
    keepAlive: number | undefined,
    signal: AbortSignal,
  ): Promise<OpenResult> {
    const delay = Math.min(this.#retryAt - performance.now(), this.#connectTimeout);
    if (delay > 0) {
      await new Promise<void>((resolve, reject) => {
        const timer = later(() => {
          signal.removeEventListener("abort", onAbort);
          resolve();
        }, delay);
        const onAbort = () => {
          clearTimeout(timer);
          reject(signal.reason);
        };
        signal.addEventListener("abort", onAbort, { once: true });
      });
    }
    try {
      const conn = await this.#connectConn(signal);
      const result = await SessionLink.open(conn, {
        server: this.server,
        clientId: this.clientId,
        authToken: this.#authToken,
        tls: this.tls,
        ttl,
        keepAlive,
        releaseTimeout: this.#connectTimeout,
        serverError,
        onClose: (link) => {
          if (this.#links.get(key) === link) this.#links.delete(key);
        },
      }, signal);
      this.#openFailures = 0;
      this.#retryAt = 0;
      if (result !== "unsupported") {
        if (this.#closing.signal.aborted) {
          result.close();
          throw this.#closing.signal.reason;
        }
        this.#links.set(key, result);
      }
      return result;
    } catch (e) {
      if (!signal.aborted) {
        this.#openFailures++;
        this.#retryAt = performance.now() + Math.min(5000, 100 * 2 ** (this.#openFailures - 1));
      }
      throw e;
    }
  }

  /** Same as {@linkcode LockClient.close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** One request, one reply line, connection closed. */
  async #ask(
    action: string,
    expect: string,
    verb: string,
    options: RequestOptions,
  ): Promise<ReplyLine> {
    const fail = this.#failer(verb);
    const facts = { server: this.server };
    const signal = this.#signal(options.signal);
    const wire = await this.#connect(
      signal,
      action === Action.LOCKS ? LOCKS_MAX_LINE : SHORT_MAX_LINE,
    );
    const onAbort = () => wire.close();
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      await wire.write(formatRequest(action, { auth: this.#authToken })).catch((e) => {
        throw new ConnectionLostError(fail(`cannot send the request (${describe(e)})`), {
          ...facts,
          cause: e,
        });
      });
      const result = await wire.read().catch((e) => {
        throw new ConnectionLostError(fail(`connection lost (${describe(e)})`), {
          ...facts,
          cause: e,
        });
      });
      signal.throwIfAborted();
      const reply = expectLine(result, fail, facts, this.tls);
      if (reply.word === expect) return reply;
      if (reply.word === Reply.ERR) throw serverError(reply.rest, fail, facts);
      if (reply.word === Reply.BAD_ACTION) {
        throw new ProtocolError(
          fail(`the server does not know "${action}" (an older server?)`),
          reply.word,
          facts,
        );
      }
      throw unexpected(result, fail, facts);
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
      wire.close();
    }
  }

  #failer(verb: string): (what: string) => string {
    return (what) => `Cannot ${verb} tcpnetlock server "${this.server}": ${what}`;
  }

  /** The caller's signal combined with the client's own (aborted by `close()`). */
  #signal(signal: AbortSignal | undefined): AbortSignal {
    const own = this.#closing.signal;
    const combined = signal === undefined ? own : AbortSignal.any([signal, own]);
    combined.throwIfAborted();
    return combined;
  }

  /**
   * Opens a connection: TCP (for `localhost`: 127.0.0.1, then ::1 if refused), then TLS if
   * asked, all within the connect timeout.
   */
  async #connect(signal: AbortSignal, maxLine: number): Promise<Wire> {
    return new Wire(await this.#connectConn(signal), maxLine);
  }

  /** {@linkcode LockClient.#connect}'s connection, without a reader. */
  async #connectConn(signal: AbortSignal): Promise<Deno.Conn> {
    const server = this.server;
    const timeout = this.#connectTimeout;
    const attempt = new AbortController();
    let timedOut = false;
    const timer = Number.isFinite(timeout)
      ? later(() => {
        timedOut = true;
        attempt.abort();
      }, timeout)
      : undefined;
    const onAbort = () => attempt.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    let conn: Deno.Conn | undefined;
    try {
      const hostnames = this.host === "localhost" ? ["127.0.0.1", "::1"] : [this.host];
      let refused: unknown;
      let tcp: Deno.TcpConn | undefined;
      for (const hostname of hostnames) {
        try {
          conn = tcp = await Deno.connect({ hostname, port: this.port, signal: attempt.signal });
          break;
        } catch (e) {
          if (attempt.signal.aborted) throw e;
          if (!(e instanceof Deno.errors.ConnectionRefused)) {
            if (refused !== undefined) continue; // e.g. no IPv6 at all: report the refusal
            throw e;
          }
          refused ??= e;
        }
      }
      if (tcp === undefined) {
        throw new ServerUnreachableError(server, "connection refused", {
          refused: true,
          cause: refused,
        });
      }
      if (!this.tls) return tcp;
      // If startTls fails, the catch below closes the TCP connection.
      const tlsConn = await Deno.startTls(tcp, { hostname: this.host, caCerts: this.#caCerts });
      conn = tlsConn;
      const onAttemptAbort = () => tlsConn.close();
      attempt.signal.addEventListener("abort", onAttemptAbort, { once: true });
      try {
        await tlsConn.handshake();
      } catch (e) {
        if (attempt.signal.aborted) throw e;
        throw new ServerUnreachableError(server, `TLS handshake failed (${describe(e)})`, {
          cause: e,
        });
      } finally {
        attempt.signal.removeEventListener("abort", onAttemptAbort);
      }
      return tlsConn;
    } catch (e) {
      closeQuietly(conn);
      if (signal.aborted) throw signal.reason;
      if (timedOut) {
        throw new ServerUnreachableError(server, `no connection within ${timeout} ms`, {
          cause: e,
        });
      }
      if (e instanceof TcpNetLockError || e instanceof Deno.errors.NotCapable) throw e;
      if (e instanceof Deno.errors.ConnectionRefused) {
        throw new ServerUnreachableError(server, "connection refused", { refused: true, cause: e });
      }
      throw new ServerUnreachableError(server, describe(e), { cause: e });
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
    }
  }
}

/** The reader and writer of one connection. */
class Wire {
  readonly #conn: Deno.Conn;
  readonly #reader: LineReader;
  #writing: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(conn: Deno.Conn, maxLine: number) {
    this.#conn = conn;
    this.#reader = new LineReader(conn, maxLine);
  }

  /** Reads the next line. */
  read(): Promise<LineResult> {
    return this.#reader.next();
  }

  /** Writes all of `text`, after the writes before it. */
  write(text: string): Promise<void> {
    const bytes = encoder.encode(text);
    const done = this.#writing.then(async () => {
      for (let at = 0; at < bytes.length;) at += await this.#conn.write(bytes.subarray(at));
    });
    this.#writing = done.catch(() => {});
    return done;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Closes the connection (idempotent); a pending read or write then fails. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeQuietly(this.#conn);
  }
}

interface HoldingInit {
  name: string;
  token: number | undefined;
  server: string;
  clientId: string | undefined;
  ttl: number | undefined;
  keepAlive: number | undefined;
  releaseTimeout: number;
  onEnd: (holding: Holding) => void;
}

interface Pending {
  expect: string;
  sentAt: number;
  resolve: () => void;
  reject: (reason: unknown) => void;
}

/** The one implementation of {@linkcode HeldLock}. */
class Holding implements HeldLock {
  readonly name: string;
  readonly token: number | undefined;
  readonly server: string;
  readonly clientId: string | undefined;
  readonly ttl: number | undefined;
  readonly closed: Promise<TcpNetLockError | undefined>;
  readonly #wire: Wire;
  readonly #lost = new AbortController();
  readonly #pending: Pending[] = [];
  readonly #keepAliveMs: number | undefined;
  readonly #releaseTimeout: number;
  readonly #onEnd: (holding: Holding) => void;
  #state: "held" | "releasing" | "released" | "lost" = "held";
  #release: Promise<void> | undefined;
  #settle!: (reason: TcpNetLockError | undefined) => void;
  #keepAliveTimer: ReturnType<typeof setTimeout> | undefined;
  #leaseTimer: ReturnType<typeof setTimeout> | undefined;
  #releaseTimer: ReturnType<typeof setTimeout> | undefined;
  /** When (performance.now()) the lease surely started last, as far as this side knows. */
  #renewedAt: number;

  constructor(wire: Wire, init: HoldingInit) {
    this.#wire = wire;
    this.name = init.name;
    this.token = init.token;
    this.server = init.server;
    this.clientId = init.clientId;
    this.ttl = init.ttl;
    this.#onEnd = init.onEnd;
    this.#releaseTimeout = init.releaseTimeout;
    this.#keepAliveMs = init.keepAlive === undefined ? undefined : init.keepAlive * 1000;
    this.closed = new Promise((resolve) => this.#settle = resolve);
    this.#renewedAt = performance.now();
    this.#scheduleKeepAlive();
    this.#scheduleLeaseCheck();
    this.#readLoop();
  }

  get signal(): AbortSignal {
    return this.#lost.signal;
  }

  get held(): boolean {
    return this.#state === "held";
  }

  keepalive(): Promise<void> {
    if (this.#state === "lost") return Promise.reject(this.#lost.signal.reason);
    if (this.#state !== "held") {
      return Promise.reject(
        new TcpNetLockError(`Cannot keep ${this.#where()} alive: it was released`, {
          server: this.server,
          lockName: this.name,
        }),
      );
    }
    return this.#send(Action.KEEPALIVE, Reply.ALIVE);
  }

  release(): Promise<void> {
    if (this.#release === undefined) {
      if (this.#state === "lost") {
        this.#release = Promise.reject(this.#lost.signal.reason);
      } else {
        this.#state = "releasing";
        this.#stopTimers();
        this.#release = this.#send(Action.RELEASE, Reply.RELEASED);
        if (Number.isFinite(this.#releaseTimeout)) {
          // A server that does not confirm: closing the connection frees the lock all the same.
          this.#releaseTimer = later(() => {
            this.#lose(
              new ConnectionLostError(
                `Cannot release ${this.#where()}: no confirmation within ` +
                  `${this.#releaseTimeout} ms, so the connection was closed (which frees the lock)`,
                this.#facts(),
              ),
            );
          }, this.#releaseTimeout);
        }
      }
    }
    return this.#release;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release().catch(() => {});
  }

  #where(): string {
    return `lock "${this.name}" on "${this.server}"`;
  }

  #facts(): { server: string; lockName: string } {
    return { server: this.server, lockName: this.name };
  }

  #send(action: string, expect: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.#pending.push({ expect, sentAt: performance.now(), resolve, reject });
      this.#wire.write(formatRequest(action)).catch((e) => {
        this.#lose(
          new ConnectionLostError(
            `Lost ${this.#where()}: cannot write to the connection (${describe(e)})`,
            { ...this.#facts(), cause: e },
          ),
        );
      });
    });
  }

  async #readLoop(): Promise<void> {
    for (;;) {
      let result: LineResult;
      try {
        result = await this.#wire.read();
      } catch (e) {
        this.#lose(
          new ConnectionLostError(`Lost ${this.#where()}: connection failed (${describe(e)})`, {
            ...this.#facts(),
            cause: e,
          }),
        );
        return;
      }
      if (this.#state === "lost") return;
      if (result.kind === "eof") {
        this.#lose(
          new ConnectionLostError(`Lost ${this.#where()}: the server closed the connection`, {
            ...this.#facts(),
          }),
        );
        return;
      }
      if (result.kind !== "line") {
        this.#lose(
          new ProtocolError(
            `Lost ${this.#where()}: the server sent ${
              result.kind === "too-long" ? "a line too long" : "a line that is not UTF-8"
            }`,
            undefined,
            this.#facts(),
          ),
        );
        return;
      }
      const reply = parseReply(result.line);
      if (reply.word === Reply.EXPIRED) {
        const lease = this.ttl === undefined ? "the lease" : `the lease of ${this.ttl} s`;
        this.#lose(
          new LockExpiredError(
            `Lost ${this.#where()}: ${lease} ran out on the server`,
            this.#facts(),
          ),
        );
        return;
      }
      const pending = this.#pending.shift();
      if (pending === undefined || reply.word !== pending.expect) {
        const to = pending === undefined
          ? ""
          : ` to "${pending.expect === Reply.ALIVE ? Action.KEEPALIVE : Action.RELEASE}"`;
        this.#lose(
          new ProtocolError(
            `Lost ${this.#where()}: unexpected reply "${result.line}"${to} from the server`,
            result.line,
            this.#facts(),
          ),
          pending,
        );
        return;
      }
      if (reply.word === Reply.ALIVE) {
        this.#renewedAt = Math.max(this.#renewedAt, pending.sentAt);
        this.#scheduleLeaseCheck();
        pending.resolve();
        continue;
      }
      // released
      this.#state = "released";
      this.#end(undefined);
      pending.resolve();
      return;
    }
  }

  /** Marks the lock lost (once), closes the connection, rejects what waits, aborts the signal. */
  #lose(reason: TcpNetLockError, alsoReject?: Pending): void {
    alsoReject?.reject(reason);
    if (this.#state === "lost" || this.#state === "released") return;
    this.#state = "lost";
    for (const pending of this.#pending.splice(0)) pending.reject(reason);
    this.#end(reason);
    this.#lost.abort(reason);
  }

  #end(reason: TcpNetLockError | undefined): void {
    this.#stopTimers();
    this.#wire.close();
    this.#onEnd(this);
    this.#settle(reason);
  }

  #stopTimers(): void {
    clearTimeout(this.#keepAliveTimer);
    clearTimeout(this.#leaseTimer);
    clearTimeout(this.#releaseTimer);
    this.#keepAliveTimer = this.#leaseTimer = this.#releaseTimer = undefined;
  }

  #scheduleKeepAlive(): void {
    if (this.#keepAliveMs === undefined || this.#state !== "held") return;
    this.#keepAliveTimer = later(() => {
      this.#keepAliveTimer = undefined;
      if (this.#state !== "held") return;
      // One keepalive in flight is enough: a slow reply must not pile up more.
      if (!this.#pending.some((p) => p.expect === Reply.ALIVE)) {
        this.#send(Action.KEEPALIVE, Reply.ALIVE).catch(() => {}); // a loss is reported by #lose
      }
      this.#scheduleKeepAlive();
    }, this.#keepAliveMs);
  }

  /**
   * With a ttl, the server's lease surely runs at least until the last confirmed renewal plus the
   * ttl. Past that, the server may have freed the lock without this side hearing of it (a
   * network partition), so the lock counts as lost.
   */
  #scheduleLeaseCheck(): void {
    if (this.ttl === undefined || this.#state !== "held") return;
    clearTimeout(this.#leaseTimer);
    const deadline = this.#renewedAt + this.ttl * 1000;
    this.#leaseTimer = later(() => {
      this.#leaseTimer = undefined;
      if (performance.now() < deadline) return this.#scheduleLeaseCheck();
      this.#lose(
        new LockExpiredError(
          `Lost ${this.#where()}: no keepalive was confirmed within the ttl of ${this.ttl} s`,
          this.#facts(),
        ),
      );
    }, Math.max(0, deadline - performance.now()));
  }
}

const encoder = new TextEncoder();

function unexpected(
  result: LineResult,
  fail: (what: string) => string,
  facts: { server: string; lockName?: string },
): ProtocolError {
  const line = result.kind === "line" ? result.line : "";
  return new ProtocolError(fail(`unexpected reply "${line}" from the server`), line, facts);
}

const REASON_HINTS: Record<string, string> = {
  [ErrorReason.UNAUTHORIZED]: "give the server's auth token (authToken, TCPNETLOCK_AUTH_TOKEN)",
  [ErrorReason.FORBIDDEN]:
    "the server obeys this only from its own host unless started with --allow-remote-shutdown",
  [ErrorReason.LIMIT_MISMATCH]: "the lock is held or awaited with a different limit",
  [ErrorReason.INVALID_MODE]: 'mode is "shared" or "exclusive", and a shared lock has no limit',
  [ErrorReason.TOO_MANY_CONNECTIONS]: "the server is at its --max-connections, try again later",
  [ErrorReason.TOO_MANY_WAITERS]: "the queue is at the server's --max-waiters, try again later",
  [ErrorReason.TOO_MANY_LOCKS]: "the server is at its --max-locks, try again later",
};

function serverError(
  reason: string,
  fail: (what: string) => string,
  facts: { server: string; lockName?: string },
): ServerError {
  const hint = REASON_HINTS[reason];
  const what = `the server answered "${reason}"${hint === undefined ? "" : ` (${hint})`}`;
  return new ServerError(fail(what), reason, facts);
}

function parseJson(text: string, fail: (what: string) => string, server: string): unknown {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ProtocolError(fail("the reply is not valid JSON"), text, { server, cause: e });
  }
}

/** Reads an environment variable if the program may, without ever prompting or throwing. */
function envVar(name: string): string | undefined {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") {
      return undefined;
    }
    const value = Deno.env.get(name);
    return value === "" ? undefined : value;
  } catch {
    return undefined;
  }
}

function isPort(port: number): boolean {
  return Number.isInteger(port) && port >= 1 && port <= 65535;
}

function checkSeconds(what: string, value: number | undefined, min: number): void {
  if (value === undefined) return;
  if (!(typeof value === "number" && value >= min && value <= MAX_SECONDS)) {
    throw new RangeError(
      `Invalid ${what} "${value}": use a number of seconds ${min === 0 ? "from 0" : `from ${min}`}`,
    );
  }
}

/** The longest delay `setTimeout` takes (about 24.8 days); longer ones would fire at once. */
const MAX_DELAY = 2 ** 31 - 1;

/** `setTimeout` with the delay cut to what it can take (callers re-check their deadlines). */
function later(fn: () => void, ms: number): ReturnType<typeof setTimeout> {
  return setTimeout(fn, Math.min(Math.max(0, ms), MAX_DELAY));
}

/** `promise`, or the signal's reason as soon as it aborts (the promise goes on regardless). */
function untilAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

if (import.meta.main) {
  // No top-level await: the command line imports this module, which must have finished loading.
  import("./lib/client_cli.ts").then(async ({ main }) => Deno.exit(await main(Deno.args)));
}
