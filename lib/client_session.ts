/**
 * The client's side of a session (protocol version 3): one connection that carries every lock a
 * {@linkcode LockClient} takes, requests multiplexed by id. `client.ts` opens one lazily, shares
 * it, and opens a new one (with back-off) after it drops; the locks held on a dropped session are
 * reported lost through their `signal`, like a lock over its own connection.
 *
 * This file is imported by URL through `client.ts`: it may import only relative, `node:` and
 * versioned `npm:` specifiers, and it has no third-party dependency.
 *
 * @module
 */

import { LineReader, type LineResult } from "./lines.ts";
import { closeQuietly, describe, expectLine, formatSeconds } from "./client_util.ts";
import {
  Action,
  formatRequest,
  parseReply,
  Reply,
  type ReplyLine,
  SESSION_VERSION,
} from "./protocol.ts";
import {
  ConnectionLostError,
  LockExpiredError,
  LockNotGrantedError,
  LockTimeoutError,
  ProtocolError,
  type ServerError,
  TcpNetLockError,
} from "./errors.ts";

/** Every reply of a session is short. */
const MAX_LINE = 64 * 1024;
const encoder = new TextEncoder();
const ID_SUFFIX = /,id:([a-zA-Z0-9_-]{1,32})$/;

/** The facts errors carry. */
type Facts = { server: string; lockName: string };
/** Makes the error for an `err,REASON` reply. */
export type ServerErrorFactory = (
  reason: string,
  fail: (what: string) => string,
  facts: Facts,
) => ServerError;

/** What a session needs to know. */
export interface SessionLinkOptions {
  /** The server as `host:port`. */
  server: string;
  /** The session's client id (the client's), if any. */
  clientId: string | undefined;
  /** The auth token, if any. */
  authToken: string | undefined;
  /** Whether the connection is TLS (an unanswered plain one may be talking to a TLS server). */
  tls: boolean;
  /** The session's lease in seconds, if any. */
  ttl: number | undefined;
  /** Seconds between keepalives, if any. */
  keepAlive: number | undefined;
  /** Bounds the wait for `released`. */
  releaseTimeout: number;
  serverError: ServerErrorFactory;
  /** The session is over (dropped or closed). */
  onClose: (link: SessionLink) => void;
}

/** What one lock request asks for. */
export interface SessionLockRequest {
  name: string;
  clientId: string | undefined;
  wait: number | undefined;
  limit: number | undefined;
  mode: "shared" | "exclusive" | undefined;
  onQueued?: (position: number) => void;
  signal: AbortSignal;
  /** Settles when the lock is over (for the client's bookkeeping). */
  onEnd: (lock: SessionLock) => void;
}

/** The result of opening: a session, or the server does not know sessions. */
export type OpenResult = SessionLink | "unsupported";

/** One id's life on the client's side. */
interface Entry {
  /** Handles a reply line for this id (without the id). */
  line(reply: ReplyLine, text: string): void;
  /** The session dropped. */
  drop(reason: "closed" | "failed" | "expired", detail: string, cause?: unknown): void;
}

/**
 * One session. Opening it ({@linkcode SessionLink.open}) sends the `session` line and reads the
 * reply; afterwards a read loop dispatches replies to the requests by id.
 */
export class SessionLink {
  readonly #conn: Deno.Conn;
  readonly #reader: LineReader;
  readonly #options: SessionLinkOptions;
  readonly #entries = new Map<string, Entry>();
  /** `.keepalive` lines sent and not yet answered (their send times, in order). */
  readonly #keepalives: { sentAt: number; resolve: () => void; reject: (e: unknown) => void }[] =
    [];
  #nextId = 0;
  #out: string[] = [];
  #flushing: Promise<void> | undefined;
  #closed = false;
  #referenced = true;
  #keepAliveTimer: ReturnType<typeof setTimeout> | undefined;
  #leaseTimer: ReturnType<typeof setTimeout> | undefined;
  /** When (performance.now()) the server's lease surely started last, as far as we know. */
  #renewedAt: number;
  /** Why the session is over, once it is. */
  #dropReason: TcpNetLockError | undefined;

  private constructor(conn: Deno.Conn, reader: LineReader, options: SessionLinkOptions) {
    this.#conn = conn;
    this.#reader = reader;
    this.#options = options;
    this.#renewedAt = performance.now();
  }

  /**
   * Opens a session over `conn`: sends `session`, reads the reply. Resolves to the session, or to
   * `"unsupported"` when the server answers `bad-action` (a version 1 or 2 server; `conn` is then
   * closed). Rejects with the error for anything else (and closes `conn`).
   */
  static async open(
    conn: Deno.Conn,
    options: SessionLinkOptions,
    signal: AbortSignal,
  ): Promise<OpenResult> {
    const fail = (what: string) => `Cannot open a session on "${options.server}": ${what}`;
    const facts = { server: options.server };
    const reader = new LineReader(conn, MAX_LINE);
    const onAbort = () => closeQuietly(conn);
    signal.addEventListener("abort", onAbort, { once: true });
    const sentAt = performance.now();
    try {
      const opening = formatRequest(Action.SESSION, {
        "client-id": options.clientId,
        ttl: formatSeconds(options.ttl),
        auth: options.authToken,
      });
      await writeAll(conn, encoder.encode(opening)).catch((e) => {
        throw new ConnectionLostError(fail(`cannot send the request (${describe(e)})`), {
          ...facts,
          cause: e,
        });
      });
      const result = await reader.next().catch((e) => {
        throw new ConnectionLostError(fail(`connection lost (${describe(e)})`), {
          ...facts,
          cause: e,
        });
      });
      signal.throwIfAborted();
      const reply = expectLine(result, fail, facts, options.tls);
      if (reply.word === Reply.BAD_ACTION) {
        closeQuietly(conn);
        return "unsupported";
      }
      if (reply.word === Reply.ERR) {
        throw options.serverError(reply.rest, fail, { ...facts, lockName: "" });
      }
      if (reply.word !== Reply.SESSION || reply.fields.get("version") !== String(SESSION_VERSION)) {
        const line = reply.rest === "" ? reply.word : `${reply.word},${reply.rest}`;
        throw new ProtocolError(fail(`unexpected reply "${line}" from the server`), line, facts);
      }
      const link = new SessionLink(conn, reader, options);
      link.#renewedAt = sentAt;
      link.#start();
      return link;
    } catch (e) {
      closeQuietly(conn);
      if (signal.aborted) throw signal.reason;
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  }

  /** True once the session is over: a new lock needs a new session. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Requests in flight or locks held on this session. */
  get size(): number {
    return this.#entries.size;
  }

  /** Takes a lock over the session; resolves to the held lock. */
  lock(req: SessionLockRequest): Promise<SessionLock> {
    const { name, signal } = req;
    const server = this.#options.server;
    const facts = { server, lockName: name };
    const fail = (what: string) => `Cannot acquire lock "${name}" on "${server}": ${what}`;
    if (this.#closed) {
      return Promise.reject(
        this.#dropReason ?? new ConnectionLostError(fail("the session is closed"), facts),
      );
    }
    const id = (this.#nextId++).toString(36);
    const { promise, resolve, reject } = Promise.withResolvers<SessionLock>();
    let state: "asking" | "abandoned" = "asking";
    const onAbort = () => {
      if (state !== "asking") return;
      state = "abandoned";
      reject(signal.reason);
      // Leave the queue; a grant that crossed the cancel on the wire is released.
      this.#send(formatRequest(Action.CANCEL, { id }));
    };
    const settle = () => signal.removeEventListener("abort", onAbort);
    const done = () => {
      settle();
      this.#delete(id);
    };
    this.#set(id, {
      line: (reply, text) => {
        if (state === "abandoned") {
          if (reply.word === Reply.OK) this.#send(formatRequest(Action.RELEASE, { id }));
          else if (reply.word !== Reply.QUEUED) this.#delete(id);
          return;
        }
        switch (reply.word) {
          case Reply.QUEUED: {
            const position = Number(reply.fields.get("position"));
            if (!Number.isSafeInteger(position) || position < 1) break;
            req.onQueued?.(position);
            return;
          }
          case Reply.OK: {
            const tokenText = reply.fields.get("token") ?? "";
            const token = /^\d+$/.test(tokenText) ? Number(tokenText) : NaN;
            if (!Number.isSafeInteger(token)) break;
            settle();
            const held = new SessionLock(this, id, {
              name,
              token,
              server,
              clientId: req.clientId,
              ttl: this.#options.ttl,
              releaseTimeout: this.#options.releaseTimeout,
              onEnd: req.onEnd,
            });
            this.#set(id, held);
            resolve(held);
            return;
          }
          case Reply.NOT_GRANTED:
            done();
            reject(new LockNotGrantedError(fail("not granted, held by another client"), facts));
            return;
          case Reply.TIMEOUT:
            done();
            reject(
              new LockTimeoutError(
                fail(`still held by another client when the wait of ${req.wait} s ran out`),
                facts,
              ),
            );
            return;
          case Reply.ERR:
            done();
            reject(this.#options.serverError(reply.rest, fail, facts));
            return;
        }
        done();
        const error = new ProtocolError(
          fail(`unexpected reply "${text}" from the server`),
          text,
          facts,
        );
        reject(error);
        this.fail(error);
      },
      drop: (reason, detail, cause) => {
        settle();
        if (state !== "asking") return;
        state = "abandoned";
        const what = reason === "expired"
          ? `the session's lease ran out (${detail})`
          : `connection lost (${detail})`;
        reject(new ConnectionLostError(fail(what), { ...facts, cause }));
      },
    });
    signal.addEventListener("abort", onAbort, { once: true });
    this.#send(formatRequest(Action.LOCK, {
      id,
      name,
      "client-id": req.clientId === this.#options.clientId ? undefined : req.clientId,
      wait: formatSeconds(req.wait),
      limit: req.limit,
      mode: req.mode,
    }));
    return promise;
  }

  /** Sends `.keepalive` and resolves on `alive`. */
  keepalive(): Promise<void> {
    if (this.#closed) return Promise.reject(this.#dropReason);
    return new Promise((resolve, reject) => {
      this.#keepalives.push({ sentAt: performance.now(), resolve, reject });
      this.#send(formatRequest(Action.KEEPALIVE));
    });
  }

  /** Sends a line for an id (release). */
  sendFor(action: string, id: string): void {
    this.#send(formatRequest(action, { id }));
  }

  /** Forgets an id (its lock is over). */
  forget(id: string): void {
    this.#delete(id);
  }

  /** Ends the session on an error: every lock on it is lost with a message built from it. */
  fail(error: TcpNetLockError): void {
    this.#drop("failed", describe(error), error);
  }

  /** Closes the session: the server frees whatever it still holds for it. */
  close(): void {
    this.#drop("closed", "the session was closed");
  }

  // --- Internals.

  #set(id: string, entry: Entry): void {
    const before = this.#entries.size;
    this.#entries.set(id, entry);
    if (before === 0 && this.#entries.size > 0) this.#ref(true);
  }

  #delete(id: string): void {
    if (this.#entries.delete(id) && this.#entries.size === 0) this.#ref(false);
  }

  /** A session with nothing in flight must not keep the program alive. */
  #ref(on: boolean): void {
    if (this.#referenced === on) return;
    this.#referenced = on;
    try {
      if (on) this.#conn.ref();
      else this.#conn.unref();
    } catch {
      // a connection without ref/unref: keeps the program alive, as before
    }
    for (const t of [this.#keepAliveTimer, this.#leaseTimer]) {
      if (t === undefined) continue;
      refTimer(t, on);
    }
  }

  #timer(fn: () => void, ms: number): ReturnType<typeof setTimeout> {
    const t = setTimeout(fn, Math.min(Math.max(0, ms), 2 ** 31 - 1));
    if (!this.#referenced) refTimer(t, false);
    return t;
  }

  #start(): void {
    this.#ref(false);
    this.#readLoop();
    this.#scheduleKeepAlive();
    this.#scheduleLeaseCheck();
  }

  #send(line: string): void {
    if (this.#closed) return;
    this.#out.push(line);
    this.#flushing ??= this.#flush();
  }

  async #flush(): Promise<void> {
    try {
      // The requests of the same turn go out in one write (a few steps: a release that follows
      // a grant at once, the next lock after a release).
      for (let i = 0; i < 4; i++) await undefined;
      while (this.#out.length > 0 && !this.#closed) {
        const bytes = encoder.encode(this.#out.join(""));
        this.#out = [];
        await writeAll(this.#conn, bytes);
      }
    } catch (e) {
      this.#drop("failed", `cannot write to the connection (${describe(e)})`, e);
    } finally {
      this.#flushing = undefined;
    }
  }

  async #readLoop(): Promise<void> {
    for (;;) {
      let result: LineResult;
      try {
        // The replies that arrived together are handled in one go (no turn between them).
        result = this.#reader.nextBuffered() ?? await this.#reader.next();
      } catch (e) {
        this.#drop("failed", `connection failed (${describe(e)})`, e);
        return;
      }
      if (this.#closed) return;
      if (result.kind === "eof") {
        this.#drop("closed", "the server closed the connection");
        return;
      }
      if (result.kind !== "line") {
        this.#drop(
          "failed",
          `the server sent ${
            result.kind === "too-long" ? "a line too long" : "a line that is not UTF-8"
          }`,
        );
        return;
      }
      const text = result.line;
      const m = ID_SUFFIX.exec(text);
      if (m === null) {
        if (text === Reply.ALIVE) {
          const k = this.#keepalives.shift();
          if (k !== undefined) {
            this.#renewedAt = Math.max(this.#renewedAt, k.sentAt);
            k.resolve();
            continue;
          }
        }
        if (text === Reply.PONG) continue;
        this.#drop("failed", `unexpected reply "${text}" from the server`);
        return;
      }
      const entry = this.#entries.get(m[1]);
      if (entry === undefined) continue; // a late reply to a request given up on
      const bare = text.slice(0, m.index);
      entry.line(parseReply(bare), bare);
    }
  }

  #drop(reason: "closed" | "failed" | "expired", detail: string, cause?: unknown): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#dropReason = new ConnectionLostError(
      `The session on "${this.#options.server}" is over: ${detail}`,
      { server: this.#options.server, cause },
    );
    clearTimeout(this.#keepAliveTimer);
    clearTimeout(this.#leaseTimer);
    closeQuietly(this.#conn);
    for (const k of this.#keepalives.splice(0)) k.reject(this.#dropReason);
    const entries = [...this.#entries.values()];
    this.#entries.clear();
    for (const entry of entries) entry.drop(reason, detail, cause);
    this.#options.onClose(this);
  }

  #scheduleKeepAlive(): void {
    const every = this.#options.keepAlive;
    if (every === undefined || this.#closed) return;
    this.#keepAliveTimer = this.#timer(() => {
      if (this.#closed) return;
      // One keepalive in flight is enough: a slow reply must not pile up more.
      if (this.#keepalives.length === 0) this.keepalive().catch(() => {});
      this.#scheduleKeepAlive();
    }, every * 1000);
  }

  /**
   * With a ttl, the server's lease surely runs at least until the last confirmed renewal plus the
   * ttl. Past that, the server may have freed the locks without this side hearing of it (a
   * network partition), so they count as lost and the session is closed.
   */
  #scheduleLeaseCheck(): void {
    const ttl = this.#options.ttl;
    if (ttl === undefined || this.#closed) return;
    const deadline = this.#renewedAt + ttl * 1000;
    this.#leaseTimer = this.#timer(() => {
      if (this.#closed) return;
      if (performance.now() < this.#renewedAt + ttl * 1000) return this.#scheduleLeaseCheck();
      this.#drop("expired", `no keepalive was confirmed within the ttl of ${ttl} s`);
    }, deadline - performance.now());
  }
}

interface SessionLockInit {
  name: string;
  token: number;
  server: string;
  clientId: string | undefined;
  ttl: number | undefined;
  releaseTimeout: number;
  onEnd: (lock: SessionLock) => void;
}

/**
 * A lock held over a session: the `HeldLock` of `client.ts` (checked there, structurally; not
 * imported here, which would make an import cycle).
 */
export class SessionLock implements Entry, AsyncDisposable {
  readonly name: string;
  readonly token: number;
  readonly server: string;
  readonly clientId: string | undefined;
  readonly ttl: number | undefined;
  readonly closed: Promise<TcpNetLockError | undefined>;
  readonly #link: SessionLink;
  readonly #id: string;
  readonly #lost = new AbortController();
  readonly #releaseTimeout: number;
  readonly #onEnd: (lock: SessionLock) => void;
  #state: "held" | "releasing" | "released" | "lost" = "held";
  #release: Promise<void> | undefined;
  #released: PromiseWithResolvers<void> | undefined;
  #releaseTimer: ReturnType<typeof setTimeout> | undefined;
  #settle!: (reason: TcpNetLockError | undefined) => void;

  constructor(link: SessionLink, id: string, init: SessionLockInit) {
    this.#link = link;
    this.#id = id;
    this.name = init.name;
    this.token = init.token;
    this.server = init.server;
    this.clientId = init.clientId;
    this.ttl = init.ttl;
    this.#releaseTimeout = init.releaseTimeout;
    this.#onEnd = init.onEnd;
    this.closed = new Promise((resolve) => this.#settle = resolve);
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
        new TcpNetLockError(`Cannot keep ${this.#where()} alive: it was released`, this.#facts()),
      );
    }
    return this.#link.keepalive().catch(() => {
      // The session dropped meanwhile: the lock's own reason says why.
      throw this.#lost.signal.reason ??
        new ConnectionLostError(`Lost ${this.#where()}: the session is over`, this.#facts());
    });
  }

  release(): Promise<void> {
    if (this.#release === undefined) {
      if (this.#state === "lost") {
        this.#release = Promise.reject(this.#lost.signal.reason);
      } else {
        this.#state = "releasing";
        this.#released = Promise.withResolvers<void>();
        this.#release = this.#released.promise;
        this.#link.sendFor(Action.RELEASE, this.#id);
        if (Number.isFinite(this.#releaseTimeout)) {
          // A server that does not confirm: closing the session frees the lock all the same.
          this.#releaseTimer = setTimeout(() => {
            this.#lose(
              new ConnectionLostError(
                `Cannot release ${this.#where()}: no confirmation within ` +
                  `${this.#releaseTimeout} ms, so the connection was closed (which frees the lock)`,
                this.#facts(),
              ),
            );
            this.#link.close();
          }, Math.min(this.#releaseTimeout, 2 ** 31 - 1));
        }
      }
    }
    return this.#release;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release().catch(() => {});
  }

  // --- Entry

  line(reply: ReplyLine, text: string): void {
    if (reply.word === Reply.RELEASED && this.#state === "releasing") {
      this.#state = "released";
      this.#end(undefined);
      this.#released!.resolve();
      return;
    }
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
    const error = new ProtocolError(
      `Lost ${this.#where()}: unexpected reply "${text}" from the server`,
      text,
      this.#facts(),
    );
    this.#lose(error);
    this.#link.fail(error);
  }

  drop(reason: "closed" | "failed" | "expired", detail: string, cause?: unknown): void {
    if (reason === "expired") {
      this.#lose(new LockExpiredError(`Lost ${this.#where()}: ${detail}`, this.#facts()));
    } else {
      this.#lose(
        new ConnectionLostError(`Lost ${this.#where()}: ${detail}`, { ...this.#facts(), cause }),
      );
    }
  }

  // --- Internals

  #where(): string {
    return `lock "${this.name}" on "${this.server}"`;
  }

  #facts(): Facts {
    return { server: this.server, lockName: this.name };
  }

  #lose(reason: TcpNetLockError): void {
    if (this.#state === "lost" || this.#state === "released") return;
    this.#state = "lost";
    this.#released?.reject(reason);
    this.#end(reason);
    this.#lost.abort(reason);
  }

  #end(reason: TcpNetLockError | undefined): void {
    clearTimeout(this.#releaseTimer);
    this.#releaseTimer = undefined;
    this.#link.forget(this.#id);
    this.#onEnd(this);
    this.#settle(reason);
  }
}

/** Lets a timer keep the program alive, or not (Node-style timer objects, or Deno's ids). */
function refTimer(timer: ReturnType<typeof setTimeout>, on: boolean): void {
  const t = timer as unknown as { ref?: () => void; unref?: () => void };
  if (typeof t.ref === "function" && typeof t.unref === "function") {
    if (on) t.ref();
    else t.unref();
  } else if (on) Deno.refTimer(timer as unknown as number);
  else Deno.unrefTimer(timer as unknown as number);
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
}
