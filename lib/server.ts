/**
 * The lock server as a library: {@linkcode startServer} listens, accepts connections, runs a
 * {@linkcode Session} for each, and keeps the {@linkcode LockTable} and its deadlines.
 *
 * @module
 */

import { tokenMatcher } from "./auth.ts";
import { acceptLoop, type StreamConn, TlsUpgrader, tuneTcp } from "./net.ts";
import { getLogger, levelCheck, startupLog } from "./log.ts";
import { type EtcdServerOptions, EtcdStore } from "./etcd/store.ts";
import { MemoryStore } from "./store/memory_store.ts";
import type { LockStore, StoreEvent } from "./store/types.ts";
import {
  DEFAULT_HOST,
  DEFAULT_MAX_LINE,
  DEFAULT_PORT,
  ErrorReason,
  type LockInfo,
  Reply,
  type Stats,
} from "./protocol.ts";
import { Session, type SessionHost } from "./session.ts";
import { DEFAULT_MAX_SESSION_LOCKS } from "./session_v3.ts";
import { SlotList } from "./slot_list.ts";
import { collectGarbage, SurgeWatch } from "./memory.ts";
import { TokenSequence, type TokenSource } from "./tokens.ts";
import { VERSION } from "./version.ts";

/** Options of {@linkcode startServer}. Times are in seconds. */
export interface ServerOptions {
  /** Address to listen on (default `localhost`: both 127.0.0.1 and ::1 where it exists). */
  hostname?: string;
  /** Port (default 7654; 0 picks a free one). */
  port?: number;
  /** Longest request line in bytes (default 1024). */
  maxLine?: number;
  /** Seconds a new connection has to send its first line (default 60). */
  firstLineTimeout?: number;
  /** Longest `wait` granted, in seconds (default: no cap). */
  maxWait?: number;
  /** Most open connections (default: no limit). */
  maxConnections?: number;
  /**
   * With an auth token: most connections that have not yet sent an authenticated first line
   * (default 10 % of `maxConnections`, at least 1; 1000 without `maxConnections`). Over it, the
   * oldest of them is closed with `err,too many connections`.
   */
  maxUnauthenticated?: number;
  /** With an auth token: seconds a new connection has to send its first line (default 5). */
  authTimeout?: number;
  /**
   * Seconds a connection's owed replies may stay unwritten (the peer stopped reading) before
   * the connection is closed and its lock freed (default 10).
   */
  writeTimeout?: number;
  /** Most waiters per lock name (default: no limit). */
  maxWaiters?: number;
  /** Most distinct names held or waited on (default: no limit). */
  maxLocks?: number;
  /** Most live request ids (locks held or waited for) per session (default 10000). */
  maxSessionLocks?: number;
  /**
   * Accept sessions (protocol version 3; default true). False answers `session` with
   * `bad-action`, as a version 1 or 2 server does: for testing a client's fallback.
   */
  sessions?: boolean;
  /** When set, every request but `.ping` must carry `auth:TOKEN`. */
  authToken?: string;
  /** Speak TLS with this certificate and key (PEM text); the handshake counts as the first line. */
  tls?: { cert: string; key: string };
  /** Obey `.server-shutdown` from any peer, not only loopback ones. */
  allowRemoteShutdown?: boolean;
  /** Keep the fencing token high-water mark in this file. */
  stateFile?: string;
  /** Where the memory store's fencing tokens come from (default: the clock and `stateFile`). */
  tokens?: TokenSource;
  /** Told of every lock store event (metrics). */
  onEvent?: (event: StoreEvent) => void;
  /** Keep the locks in etcd (shared by every server on the same etcd and prefix), not in memory. */
  etcd?: EtcdServerOptions;
}

export type { EtcdServerOptions };

/** A running server. */
export interface LockServer extends AsyncDisposable {
  /** The host name it was asked to listen on. */
  readonly hostname: string;
  /** The port it listens on (the real one when 0 was asked for). */
  readonly port: number;
  /** Every address it listens on. */
  readonly addrs: Deno.NetAddr[];
  /** The lock store: the in-memory table, or the etcd store. */
  readonly table: LockStore;
  /** Resolves once the server has stopped (closed, or shut down by a client). */
  readonly finished: Promise<void>;
  /** What `.stats` answers. */
  stats(): Stats;
  /** What `.locks` answers. */
  locks(): LockInfo[];
  /** Open connections. */
  readonly connections: number;
  /** Stops listening, closes every connection (freeing every lock), and resolves when done. */
  close(): Promise<void>;
}

/** Raised when the server cannot listen; the message names the address. */
export class ListenError extends Error {
  /** An error with the message that names the address. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ListenError";
  }
}

const log = getLogger(["tcpnetlock", "server"]);
const infoOn = levelCheck(log, "info");
const encoder = new TextEncoder();
const TOO_MANY_CONNECTIONS = encoder.encode(`${Reply.ERR},${ErrorReason.TOO_MANY_CONNECTIONS}\n`);
/** How long after its grant a holder's socket gets TCP_NODELAY and keepalive (Session.tune). */
const TUNE_DELAY_MS = 1000;

function secondsToMs(value: number | undefined, fallback: number): number {
  return value === undefined ? fallback : Math.max(0, value * 1000);
}

function readMaxRssKb(): number {
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const m = /VmHWM:\s+(\d+)\s*kB/.exec(status);
    if (m) return Number(m[1]);
  } catch {
    // not Linux, or no read permission: fall back to the current size
  }
  return Math.round(Deno.memoryUsage().rss / 1024);
}

/**
 * Logs table events at info level: grants, queueing, not-granted, refusals, timeouts, releases,
 * expiries and disconnects. Every record carries `event`, `lock`, `client_id` (`-` when none) and
 * `peer`; `token` where a grant exists; `waited_s` (granted, timeout, a waiter that left) or
 * `held_s` (released, expired, a holder that disconnected).
 */
function logEvent(event: StoreEvent): void {
  // Nothing is built for a level that is off (the server's default level is warning).
  if (!infoOn()) return;
  const { claim } = event;
  const props = {
    event: event.type as string,
    lock: claim.request.name,
    client_id: claim.request.clientId || "-",
    peer: claim.request.remote,
  };
  switch (event.type) {
    case "granted":
      log.info("Lock {lock} granted to {client_id} at {peer}, token {token}", {
        ...props,
        token: claim.token,
        waited_s: Math.round(event.waitedMs) / 1000,
      });
      break;
    case "queued":
      log.info("Lock {lock}: {client_id} at {peer} waits at position {position}", {
        ...props,
        position: event.position,
      });
      break;
    case "not_granted":
      log.info("Lock {lock} not granted to {client_id} at {peer}", props);
      break;
    case "refused":
      log.info("Lock {lock} refused to {client_id} at {peer}: {reason}", {
        ...props,
        reason: event.reason,
      });
      break;
    case "timeout":
      log.info("Lock {lock}: the wait of {client_id} at {peer} ran out after {waited_s} s", {
        ...props,
        waited_s: Math.round(event.waitedMs) / 1000,
      });
      break;
    case "ended": {
      if (claim.token === 0) {
        // A waiter left the queue (its connection ended, or the server stopped).
        const waited_s = Math.round(performance.now() - claim.requestedAt) / 1000;
        log.info("Lock {lock}: waiter {client_id} at {peer} left the queue after {waited_s} s", {
          ...props,
          event: "disconnected",
          reason: event.reason,
          waited_s,
        });
        break;
      }
      const held_s = Math.round(event.heldMs) / 1000;
      const p = { ...props, event: event.reason, token: claim.token, held_s };
      if (event.reason === "released") {
        log.info("Lock {lock} released by {client_id} at {peer} after {held_s} s", p);
      } else if (event.reason === "expired") {
        log.info(
          "Lock {lock} expired: {client_id} at {peer} sent nothing for its ttl, held {held_s} s",
          p,
        );
      } else {
        log.info(
          "Lock {lock} freed: the connection of {client_id} at {peer} ended after {held_s} s",
          { ...p, event: "disconnected", reason: event.reason },
        );
      }
      break;
    }
  }
}

/**
 * Starts a lock server in this process.
 *
 * @example Start on a free port and stop it
 * ```ts
 * import { startServer } from "./server.ts";
 * await using server = await startServer({ port: 0 });
 * console.log(`listening on port ${server.port}`);
 * ```
 */
export async function startServer(options: ServerOptions = {}): Promise<LockServer> {
  const impl = new ServerImpl(options);
  await impl.listen();
  return impl;
}

class ServerImpl implements LockServer, SessionHost {
  readonly hostname: string;
  readonly table: LockStore;
  readonly maxLine: number;
  readonly firstLineTimeoutMs: number;
  readonly writeTimeoutMs: number;
  readonly checkAuth: ((token: string | undefined) => boolean) | undefined;
  readonly allowRemoteShutdown: boolean;
  readonly maxSessionLocks: number;
  readonly sessions: boolean;
  readonly finished: Promise<void>;
  #options: ServerOptions;
  #listeners: Deno.Listener[] = [];
  /** Every open connection (a slot list: see lib/slot_list.ts for why not a `Set`). */
  readonly #sessions = new SlotList<"registrySlot", Session>("registrySlot");
  /** Sessions that have not yet sent an authenticated line, oldest first (only with a token). */
  #unauthenticated = new Set<Session>();
  #maxUnauthenticated: number;
  #tls: TlsUpgrader | undefined;
  #writeWatch: ReturnType<typeof setInterval> | undefined;
  /** Holders whose socket options are set by the next tick of {@linkcode tuneSoon}'s timer. */
  readonly #tuneSoon = new SlotList<"tuneSlot", Session>("tuneSlot");
  /** When a surge of connections is over, the memory it grew is collected (lib/memory.ts). */
  readonly #surge = new SurgeWatch();
  #tuneTimer: ReturnType<typeof setTimeout> | undefined;
  #accepting: Promise<void>[] = [];
  #resolveFinished!: () => void;
  #closing: Promise<void> | undefined;
  #requests = 0;
  #startedAt = performance.now();
  #port = 0;

  constructor(options: ServerOptions) {
    this.#options = options;
    this.hostname = options.hostname ?? DEFAULT_HOST;
    this.maxLine = options.maxLine ?? DEFAULT_MAX_LINE;
    this.allowRemoteShutdown = options.allowRemoteShutdown ?? false;
    this.maxSessionLocks = options.maxSessionLocks ?? DEFAULT_MAX_SESSION_LOCKS;
    this.sessions = options.sessions ?? true;
    this.checkAuth = options.authToken === undefined ? undefined : tokenMatcher(options.authToken);
    let firstLineMs = secondsToMs(options.firstLineTimeout, 60_000);
    // With a token, a connection that has not proved it knows it gets less time.
    if (this.checkAuth !== undefined) {
      firstLineMs = Math.min(firstLineMs, secondsToMs(options.authTimeout, 5_000));
    }
    this.firstLineTimeoutMs = Math.min(2 ** 31 - 1, firstLineMs);
    this.writeTimeoutMs = Math.min(2 ** 31 - 1, secondsToMs(options.writeTimeout, 10_000));
    const max = options.maxConnections;
    this.#maxUnauthenticated = options.maxUnauthenticated ??
      (max === undefined ? 1000 : Math.max(1, Math.floor(max / 10)));
    const onEvent = options.onEvent;
    const book = {
      maxWait: options.maxWait,
      maxWaiters: options.maxWaiters,
      maxLocks: options.maxLocks,
      onEvent: onEvent === undefined ? logEvent : (e: StoreEvent) => {
        logEvent(e);
        onEvent(e);
      },
    };
    this.table = options.etcd !== undefined
      ? new EtcdStore({ ...options.etcd, ...book })
      : new MemoryStore({
        ...book,
        tokens: options.tokens ?? new TokenSequence({ stateFile: options.stateFile }),
      });
    this.finished = new Promise((resolve) => this.#resolveFinished = resolve);
  }

  get port(): number {
    return this.#port;
  }

  get addrs(): Deno.NetAddr[] {
    return this.#listeners.map((l) => l.addr as Deno.NetAddr);
  }

  get connections(): number {
    return this.#sessions.size;
  }

  async listen(): Promise<void> {
    // The store gets ready first (etcd: connects; memory: reserves its first tokens); it
    // cleans up after itself on failure.
    if (this.#options.tls !== undefined) {
      try {
        this.#tls = new TlsUpgrader(this.#options.tls);
      } catch (err) {
        const text = err instanceof Error ? err.message : String(err);
        throw new ListenError(`Cannot use the TLS certificate and key: ${text.split("\n")[0]}`, {
          cause: err,
        });
      }
    }
    await this.table.start();
    const wanted = this.#options.port ?? DEFAULT_PORT;
    // "localhost" may resolve to 127.0.0.1 or to ::1 depending on the machine: listen on both,
    // on the same port, so that a client on its defaults finds the server either way.
    const hosts = this.hostname === "localhost" ? ["127.0.0.1", "::1"] : [this.hostname];
    for (let attempt = 0;; attempt++) {
      try {
        this.#listeners = [];
        let port = wanted;
        for (const [i, host] of hosts.entries()) {
          const listener = this.#listenOne(host, port, i > 0);
          if (listener === undefined) continue;
          this.#listeners.push(listener);
          port = (listener.addr as Deno.NetAddr).port;
        }
        this.#port = port;
        break;
      } catch (err) {
        for (const l of this.#listeners) l.close();
        this.#listeners = [];
        // With port 0 the second address can be taken by chance: pick another port.
        if (wanted === 0 && err instanceof Deno.errors.AddrInUse && attempt < 10) continue;
        await this.table.close();
        throw this.#listenError(err);
      }
    }
    for (const listener of this.#listeners) {
      this.#accepting.push(
        acceptLoop(
          listener,
          (conn) => this.#accept(conn),
          (m, p) => log.warning(m, p),
          "lock",
          () => this.#closing !== undefined,
        ),
      );
    }
    this.#startWriteWatch();
    startupLog.info("tcpnetlock {version} listening on {address} (auth {auth}, TLS {tls})", {
      event: "started",
      version: VERSION,
      auth: this.checkAuth === undefined ? "off" : "on",
      tls: this.#tls === undefined ? "off" : "on",
      address: this.addrs.map((a) =>
        `${a.hostname.includes(":") ? `[${a.hostname}]` : a.hostname}:${a.port}`
      )
        .join(", "),
      port: this.#port,
    });
    await Promise.resolve();
  }

  /** Listens on one address; for an optional one (::1 of localhost), undefined when it has none. */
  #listenOne(host: string, port: number, optional: boolean): Deno.Listener | undefined {
    try {
      // Plain TCP also for TLS: the handshake is run per connection (see lib/net.ts).
      return Deno.listen({ hostname: host, port, transport: "tcp" });
    } catch (err) {
      if (optional && !(err instanceof Deno.errors.AddrInUse)) {
        log.debug("Not listening on {host}: {error}", { host, error: String(err) });
        return undefined;
      }
      throw err;
    }
  }

  #listenError(err: unknown): ListenError {
    const where = `${this.hostname}:${this.#options.port ?? DEFAULT_PORT}`;
    if (err instanceof Deno.errors.AddrInUse) {
      return new ListenError(`Cannot listen on "${where}": address already in use`, { cause: err });
    }
    if (err instanceof Deno.errors.AddrNotAvailable) {
      return new ListenError(`Cannot listen on "${where}": address not available`, { cause: err });
    }
    const text = err instanceof Error ? err.message : String(err);
    return new ListenError(`Cannot listen on "${where}": ${text.split("\n")[0]}`, { cause: err });
  }

  /**
   * One watchdog for every connection's deadlines: the first line not come by the first-line
   * (or auth) timeout, and a write that has not moved for the write timeout (a peer that stopped
   * reading); the connection is closed (its lock freed). A deadline is acted on within a quarter
   * of its timeout (at most a second) after it passed. It also sees a surge of connections end
   * (lib/memory.ts).
   */
  #startWriteWatch(): void {
    const shortest = Math.min(this.writeTimeoutMs, this.firstLineTimeoutMs);
    const every = Math.max(20, Math.min(1000, shortest / 4));
    this.#writeWatch = setInterval(() => {
      const now = performance.now();
      // Thousands of idle holders: nothing to look at (and no walk over them every tick).
      if (Session.awaiting > 0) {
        this.#sessions.forEach((s) => s.checkDeadlines(now, this.writeTimeoutMs));
      }
      const peak = this.#surge.isOver(this.#sessions.size);
      if (peak > 0) this.#giveMemoryBack(peak);
    }, every);
    Deno.unrefTimer(this.#writeWatch);
  }

  /** A surge of `peak` connections is over: what it grew is collected and given back. */
  async #giveMemoryBack(peak: number): Promise<void> {
    const before = Deno.memoryUsage();
    if (!(await collectGarbage())) return;
    const after = Deno.memoryUsage();
    const mb = (bytes: number) => Math.round(bytes / 2 ** 20 * 10) / 10;
    log.info(
      "A surge of {peak} connections is over: heap {heap_before_mb} MB collected to " +
        "{heap_after_mb} MB (RSS {rss_before_mb} MB before)",
      {
        event: "memory",
        peak,
        heap_before_mb: mb(before.heapUsed),
        heap_after_mb: mb(after.heapUsed),
        rss_before_mb: mb(before.rss),
      },
    );
  }

  #accept(tcp: Deno.Conn): void {
    if (this.#closing !== undefined) {
      tcp.close();
      return;
    }
    this.#requests++;
    // TLS: the handshake's flights. Plain TCP: the session sets them when it needs them.
    if (this.#tls !== undefined) tuneTcp(tcp);
    const max = this.#options.maxConnections;
    if (max !== undefined && this.#sessions.size >= max && !this.#evictUnauthenticated()) {
      log.warning("Refused a connection: too many connections ({max})", {
        event: "refused",
        reason: "too many connections",
        max,
      });
      if (this.#tls !== undefined) {
        // No handshake for a connection that is refused anyway.
        tcp.close();
        return;
      }
      tcp.write(TOO_MANY_CONNECTIONS).then(() => tcp.closeWrite()).catch(() => {}).finally(
        () => {
          try {
            tcp.close();
          } catch {
            // already closed
          }
        },
      );
      return;
    }
    const conn: StreamConn = this.#tls === undefined ? tcp : this.#tls.upgrade(tcp);
    const session = new Session(conn, this);
    this.#sessions.add(session);
    this.#surge.opened(this.#sessions.size);
    if (this.checkAuth !== undefined) {
      this.#unauthenticated.add(session);
      if (this.#unauthenticated.size > this.#maxUnauthenticated) this.#evictUnauthenticated();
    }
    session.run();
  }

  /** Closes the oldest connection that has not authenticated yet; false when there is none. */
  #evictUnauthenticated(): boolean {
    const oldest = this.#unauthenticated.values().next();
    if (oldest.done) return false;
    const session = oldest.value;
    this.#unauthenticated.delete(session);
    log.warning(
      "Closed the unauthenticated connection of {peer}: too many unauthenticated connections ({max})",
      {
        event: "refused",
        reason: "too many unauthenticated connections",
        peer: session.remote,
        max: this.#maxUnauthenticated,
      },
    );
    session.evict();
    return true;
  }

  // --- SessionHost

  statsJson(): string {
    return JSON.stringify(this.stats());
  }

  async locksJson(): Promise<string> {
    // The etcd store answers once its view includes this server's own latest changes.
    await this.table.settled();
    return JSON.stringify(this.locks());
  }

  requestShutdown(remote: string): void {
    log.warning("Shutting down: asked by {peer}", { event: "shutdown", peer: remote });
    // Let the reply go out first.
    setTimeout(() => this.close(), 0);
  }

  sessionEnded(session: Session): void {
    this.#sessions.delete(session);
    this.#unauthenticated.delete(session);
    this.#tuneSoon.delete(session);
  }

  tuneSoon(session: Session): void {
    this.#tuneSoon.add(session);
    if (this.#tuneTimer !== undefined) return;
    // One timer for every holder granted this second: a lock released at once never pays for
    // the socket options; the timer is not armed while nobody waits for it (idle CPU stays 0).
    this.#tuneTimer = setTimeout(() => {
      this.#tuneTimer = undefined;
      for (const s of this.#tuneSoon.drain()) s.tune();
    }, TUNE_DELAY_MS);
    Deno.unrefTimer(this.#tuneTimer);
  }

  authenticated(session: Session): void {
    this.#unauthenticated.delete(session);
  }

  warn(message: string, props: Record<string, unknown>): void {
    log.warning(message, props);
  }

  // --- LockServer

  stats(): Stats {
    const c = this.table.counters;
    return {
      lock_count: this.table.heldNames,
      maxrss: readMaxRssKb(),
      requests_count: this.#requests,
      lock_acquired_count: c.acquired,
      lock_not_acquired_count: c.notGranted + c.timedOut,
      connections: this.#sessions.size,
      waiting: this.table.waiting,
      lock_expired_count: c.expired,
      uptime_s: Math.round(performance.now() - this.#startedAt) / 1000,
      version: VERSION,
    };
  }

  locks(): LockInfo[] {
    return this.table.snapshot();
  }

  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    clearInterval(this.#writeWatch);
    clearTimeout(this.#tuneTimer);
    this.#tuneTimer = undefined;
    for (const l of this.#listeners) {
      try {
        l.close();
      } catch {
        // already closed
      }
    }
    await Promise.all(this.#accepting);
    for (const s of this.#sessions.toArray()) s.shutdown();
    // The etcd store deletes its keys (revokes its lease) and disconnects.
    await this.table.close();
    log.info("Stopped", { event: "stopped" });
    this.#resolveFinished();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
