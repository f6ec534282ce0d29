/**
 * One client connection on the server: reads its lines, asks the lock table, writes the replies.
 *
 * A connection's life: a first line (within the first-line timeout), then, for a `lock` request,
 * waiting in the queue and/or holding, during which the connection keeps being read so that a
 * disconnect frees the lock at once. Every reply the server owes is written before the
 * connection is closed; a closing connection is half-closed first and drained for a moment, so a
 * client that pipelined more lines still reads its reply instead of a reset.
 *
 * @module
 */

import { encodeLine, LineReader, type LineResult } from "./lines.ts";
import { type StreamConn, tuneTcp, WriteStall } from "./net.ts";
import type { ClaimHandler, ClaimView, EndReason, LockStore, Refusal } from "./store/types.ts";
import { parseMode } from "./store/rules.ts";
import {
  Action,
  ErrorReason,
  isValidClientId,
  isValidLockName,
  type LockMode,
  parseDecimal,
  parsePositiveInt,
  parseRequest,
  Reply,
  type Request,
} from "./protocol.ts";
import { MultiSession } from "./session_v3.ts";

/** What a session needs from its server. */
export interface SessionHost {
  readonly table: LockStore;
  readonly maxLine: number;
  readonly firstLineTimeoutMs: number;
  /** Is this the configured auth token? (Only called when one is configured.) */
  readonly checkAuth: ((token: string | undefined) => boolean) | undefined;
  readonly allowRemoteShutdown: boolean;
  /** Most live ids per session (`--max-session-locks`). */
  readonly maxSessionLocks: number;
  /** False: answer `session` with `bad-action`, as a version 2 server does. */
  readonly sessions: boolean;
  statsJson(): string;
  /** `.locks` (a promise when the store first catches up with its own writes). */
  locksJson(): string | Promise<string>;
  /** A client asked the server to shut down. */
  requestShutdown(remote: string): void;
  /** The session is over. */
  sessionEnded(session: Session): void;
  /** Calls the session's `tune()` in about a second if it is still open then (holders). */
  tuneSoon(session: Session): void;
  /** The session's first line carried the right token (only called when one is configured). */
  authenticated(session: Session): void;
  /** Something unexpected happened to a connection. */
  warn(message: string, props: Record<string, unknown>): void;
}

/** The stream a session talks over (a `Deno.Conn`, or TLS over one). */
export type Conn = StreamConn;

const encoder = new TextEncoder();
const RESOLVED: Promise<void> = Promise.resolve();
const encoded = new Map<string, Uint8Array>();
/** Connections of the process whose first line is awaited (see {@linkcode Session.awaiting}). */
let firstLinesAwaited = 0;
/** Encodes a reply line, caching the fixed ones. */
function line(text: string, cache = false): Uint8Array {
  if (!cache) return encodeLine(text);
  let bytes = encoded.get(text);
  if (bytes === undefined) {
    bytes = encoder.encode(text + "\n");
    encoded.set(text, bytes);
  }
  return bytes;
}

/** The start of the plain version 1 lock line (see `Session.#first`). */
const LOCK_NAME = `${Action.LOCK},name:`;

/** How long a closing connection is drained, and how much of it is read at most. */
const LINGER_MS = 1000;
const LINGER_BYTES = 1 << 20;
/**
 * A waiter gets at most one `queued,position:P` line per this many ms (its first one at once);
 * a move within the interval is sent when it ends, with the newest position.
 */
const POSITION_INTERVAL_MS = 50;
/** Lines a waiter may send before it is granted (answered once it is). */
const MAX_PENDING_LINES = 64;
/** Reply bytes a connection may owe before it is treated as a reader that has stopped. */
const MAX_OWED_BYTES = 64 * 1024;
const drainBuffer = new Uint8Array(16 * 1024);

/** Formats a peer address as `ip:port` (`[ip6]:port` for IPv6). */
export function formatRemote(addr: Deno.Addr): string {
  if (addr.transport !== "tcp") return String(addr.transport);
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}

/** True for 127.0.0.0/8, ::1 and IPv4-mapped loopback. */
export function isLoopback(addr: Deno.Addr): boolean {
  if (addr.transport !== "tcp") return false;
  const h = addr.hostname;
  return h === "::1" || h.startsWith("127.") || h.startsWith("::ffff:127.");
}

/** One connection. */
export class Session implements ClaimHandler {
  readonly remote: string;
  #conn: Conn;
  #host: SessionHost;
  #state: "first" | "waiting" | "holding" | "closing" | "closed" = "first";
  #claim: ClaimView | undefined;
  #extended = false;
  #lastPosition = Infinity;
  /** A `queued` line is in the write chain and not yet written: it will carry the newest position. */
  #positionPending = false;
  /** When the last `queued` line was queued for writing (monotonic ms). */
  #positionSentAt = -Infinity;
  /** Set while a position update waits for {@linkcode POSITION_INTERVAL_MS} to pass. */
  #positionTimer: ReturnType<typeof setTimeout> | undefined;
  #pending: string[] = [];
  #writing: Promise<void> = RESOLVED;
  #owed = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #endReason: EndReason = "disconnected";
  /** Lines from the holder are answered one after another through this chain. */
  #heldChain: Promise<void> = RESOLVED;
  /** The connection's line reader (set by `run`). */
  #reader: LineReader | undefined;
  /** True while `run` waits for the next line. */
  #reading = false;
  /** Set once a last reply is on its way. */
  #finishing: Promise<void> | undefined;
  /** Set when the connection became a session (version 3, `session_v3.ts`). */
  #multi: MultiSession | undefined;
  /** Whether the writes move (for the server's write watchdog). */
  readonly #stall = new WriteStall();
  /** When the first line is due (monotonic ms); 0: it came (or is not awaited). */
  #firstLineBy = 0;
  /** TCP_NODELAY and keepalive are set (see {@linkcode Session.tune}). */
  #tuned = false;
  /** Its index in the server's list of open connections (-1: not in it; lib/slot_list.ts). */
  registrySlot = -1;
  /** Its index in the server's list of holders due for {@linkcode Session.tune} (-1: none). */
  tuneSlot = -1;

  constructor(conn: Conn, host: SessionHost) {
    this.#conn = conn;
    this.#host = host;
    this.remote = formatRemote(conn.remoteAddr);
  }

  /** Runs the connection to its end. Never throws. */
  async run(): Promise<void> {
    const reader = new LineReader(this.#conn, this.#host.maxLine);
    this.#reader = reader;
    try {
      // The server's watchdog closes the connection if no line comes by then (one interval for
      // every connection: no timer set and cleared per connection).
      this.#firstLineBy = performance.now() + this.#host.firstLineTimeoutMs;
      firstLinesAwaited++;
      this.#reading = true;
      const first = await reader.next();
      this.#reading = false;
      this.#firstLineCame();
      if (first.kind === "too-long") return await this.#overLong();
      await this.#first(first);
      while (this.#state === "waiting" || this.#state === "holding") {
        this.#reading = true;
        const next = await reader.next();
        this.#reading = false;
        if (next.kind === "eof") break;
        if (next.kind !== "line") {
          if (next.kind === "too-long") return await this.#overLong();
          this.#finish(Reply.BAD_REQUEST);
        } else if (this.#state === "waiting") {
          if (this.#pending.length >= MAX_PENDING_LINES) this.#finish(Reply.BAD_REQUEST);
          else this.#pending.push(next.line);
        } else if (this.#state === "holding") {
          await this.#enqueueHeld(next.line);
        }
      }
      if (this.#finishing !== undefined) {
        await this.#finishing;
        await this.#drain();
      }
    } catch {
      // A read or write failed (reset, closed by a timer or by the server): the session ends.
    } finally {
      this.#close();
      // No read is pending any more (each was awaited): the buffer goes to the next connection.
      reader.dispose();
    }
  }

  /** Ends the session from outside (server shutdown): the lock is freed, the socket closed. */
  shutdown(): void {
    this.#endReason = "shutdown";
    this.#multi?.shutdown();
    this.#close();
  }

  /**
   * Closes a connection that has not authenticated to make room for a newer one: it gets
   * `err,too many connections` if that can be written at once, and is closed either way.
   */
  evict(): void {
    if (this.#state !== "first") return;
    this.#state = "closing";
    const conn = this.#conn;
    const bytes = line(`${Reply.ERR},${ErrorReason.TOO_MANY_CONNECTIONS}`, true);
    const timer = setTimeout(() => this.#close(), 100);
    conn.write(bytes).catch(() => {}).finally(() => {
      clearTimeout(timer);
      this.#close();
    });
  }

  /**
   * Sets TCP_NODELAY and keepalive on the socket, once. Not at accept: a lock taken and released
   * at once answers each line the peer sent, which Nagle's algorithm never delays, and the two
   * socket options were a tenth of such a cycle's cost (bench, CPU profile). A connection gets
   * them as soon as it sends lines the peer did not ask for in between (`queued`, a session, the
   * replies kept while waiting), and a holder about a second after its grant (keepalive finds a
   * peer that vanished; no sooner than hours anyway).
   */
  tune(): void {
    if (this.#tuned || this.#state === "closed") return;
    this.#tuned = true;
    tuneTcp(this.#conn);
  }

  /**
   * Called by the server's watchdog: closes the connection (freeing its lock) when its first
   * line has not come by its deadline, or when a write has been waiting for the peer to read for
   * more than `limitMs`.
   */
  checkDeadlines(now: number, limitMs: number): void {
    if (this.#firstLineBy !== 0 && now > this.#firstLineBy) {
      this.#firstLineCame();
      this.#close();
      return;
    }
    if (this.#multi !== undefined) return this.#multi.checkWrite(now, limitMs);
    if (this.#stall.stalledFor(now) <= limitMs) return;
    if (this.#state === "closed") return;
    this.#host.warn(
      "Closing the connection of {peer}: it has not read its replies for {seconds} s",
      {
        event: "disconnected",
        reason: "write timeout",
        peer: this.remote,
        seconds: Math.round(limitMs) / 1000,
      },
    );
    this.#stall.end();
    this.#close();
  }

  // --- ClaimHandler: what the lock table tells this connection.

  granted(token: number): void {
    if (this.#state !== "waiting" && this.#state !== "first") return;
    this.#state = "holding";
    this.#stopPositionTimer();
    // Replies to lines kept while waiting follow the `ok` with no line from the peer between.
    if (this.#pending.length > 0) this.tune();
    else if (!this.#tuned) this.#host.tuneSoon(this);
    this.#send(this.#extended ? `${Reply.OK},token:${token}` : Reply.OK, !this.#extended);
    // Lines sent while waiting are answered now, in order, before any later line.
    const pending = this.#pending;
    this.#pending = [];
    for (const l of pending) this.#enqueueHeld(l).catch(() => this.#close());
  }

  queued(position: number): void {
    if (this.#state !== "first" && this.#state !== "waiting") return;
    this.#state = "waiting";
    if (position >= this.#lastPosition) return;
    this.#lastPosition = position;
    // A line already on its way (or due) carries the newest position when it is written.
    if (this.#positionPending || this.#positionTimer !== undefined) return;
    const due = this.#positionSentAt + POSITION_INTERVAL_MS - performance.now();
    if (due > 0) {
      // Under contention the queue moves on every grant: one line per move per waiter made
      // position updates most of a hand-over's work (13 lines per grant with 16 waiters, bench).
      this.#positionTimer = setTimeout(() => {
        this.#positionTimer = undefined;
        this.#sendPosition();
      }, due);
    } else {
      this.#sendPosition();
    }
  }

  /**
   * Sends `queued,position:P` with the newest P. When the queue moves faster than lines go out
   * (thousands of waiters ahead time out or leave at once), the line still waiting in the write
   * chain is brought up to date instead of queueing one line per move, which was quadratic in
   * the queue length (fault suite: 2,000 waiters timing out made 2 M lines and 1.7 GB). Positions
   * sent only go down, and the newest one is always sent.
   */
  #sendPosition(): void {
    if (this.#state !== "waiting") return;
    // `queued` lines and the `ok` after them go out with nothing from the peer in between.
    this.tune();
    this.#positionPending = true;
    this.#positionSentAt = performance.now();
    this.#send(`${Reply.QUEUED},position:${this.#lastPosition}`, false, () => {
      this.#positionPending = false;
      return `${Reply.QUEUED},position:${this.#lastPosition}`;
    });
  }

  #stopPositionTimer(): void {
    if (this.#positionTimer !== undefined) {
      clearTimeout(this.#positionTimer);
      this.#positionTimer = undefined;
    }
  }

  notGranted(): void {
    this.#claim = undefined;
    this.#finish(Reply.NOT_GRANTED);
  }

  refused(reason: Refusal): void {
    this.#claim = undefined;
    this.#finish(`${Reply.ERR},${reason}`);
  }

  timedOut(): void {
    this.#claim = undefined;
    this.#finish(Reply.TIMEOUT);
  }

  expired(): void {
    this.#claim = undefined;
    this.#finish(Reply.EXPIRED);
  }

  // --- The protocol.

  /** Handles the first line; true when the connection goes on (waiting or holding). */
  async #first(result: LineResult): Promise<boolean> {
    if (result.kind === "eof") return false;
    if (result.kind !== "line") {
      await this.#finish(Reply.BAD_REQUEST);
      return false;
    }
    const host = this.#host;
    // The plain lock line of every version 1 client, `lock,name:N`, is read without the general
    // parse (a Map and a string per field) when no auth is asked for; anything else, or a name
    // the pattern refuses, takes the general path and its answers.
    const text = result.line;
    if (host.checkAuth === undefined && text.startsWith(LOCK_NAME)) {
      const name = text.slice(LOCK_NAME.length);
      if (isValidLockName(name)) {
        return this.#claimLock(name, undefined, 0, undefined, 1, undefined);
      }
    }
    const req = parseRequest(text);
    if (req === null) {
      await this.#finish(Reply.BAD_REQUEST);
      return false;
    }
    if (host.checkAuth !== undefined && req.action !== Action.PING) {
      if (!host.checkAuth(req.params.get("auth"))) {
        host.warn("Refused a request from {peer}: unauthorized", {
          event: "refused",
          reason: "unauthorized",
          peer: this.remote,
          action: req.action,
        });
        await this.#finish(`${Reply.ERR},${ErrorReason.UNAUTHORIZED}`);
        return false;
      }
      host.authenticated(this);
    }
    switch (req.action) {
      case Action.LOCK:
        return this.#lock(req);
      case Action.SESSION: {
        if (!host.sessions) {
          await this.#finish(Reply.BAD_ACTION);
          return false;
        }
        const opening = MultiSession.parseOpening(req);
        if (typeof opening === "string") {
          await this.#finish(opening);
          return false;
        }
        // A session's replies follow one another without a line from the peer in between.
        this.tune();
        this.#multi = new MultiSession(
          this.#conn,
          this.#reader!,
          host,
          this.remote,
          opening.clientId,
          opening.ttl,
        );
        await this.#multi.run();
        return false;
      }
      case Action.PING:
        await this.#finish(Reply.PONG);
        return false;
      case Action.STATS:
        await this.#finish(`${Reply.STATS},${host.statsJson()}`);
        return false;
      case Action.LOCKS:
        await this.#finish(`${Reply.LOCKS},${await host.locksJson()}`);
        return false;
      case Action.SHUTDOWN:
        if (!host.allowRemoteShutdown && !isLoopback(this.#conn.remoteAddr)) {
          host.warn("Refused a shutdown request from {peer}: not a loopback peer", {
            event: "refused",
            reason: "forbidden",
            peer: this.remote,
          });
          await this.#finish(`${Reply.ERR},${ErrorReason.FORBIDDEN}`);
          return false;
        }
        await this.#finish(Reply.SHUTTING_DOWN);
        host.requestShutdown(this.remote);
        return false;
      default:
        await this.#finish(Reply.BAD_ACTION);
        return false;
    }
  }

  #lock(req: Request): boolean | Promise<boolean> {
    const p = req.params;
    const name = p.get("name") ?? "";
    const fail = async (reason: string): Promise<boolean> => {
      await this.#finish(`${Reply.ERR},${reason}`);
      return false;
    };
    if (!isValidLockName(name)) return fail(ErrorReason.INVALID_LOCK_NAME);
    const clientId = p.get("client-id");
    if (clientId !== undefined && !isValidClientId(clientId)) {
      return fail(ErrorReason.INVALID_CLIENT_ID);
    }
    const waitText = p.get("wait");
    const ttlText = p.get("ttl");
    const limitText = p.get("limit");
    const modeText = p.get("mode");
    this.#extended = waitText !== undefined || ttlText !== undefined || limitText !== undefined ||
      modeText !== undefined;
    let wait = 0;
    if (waitText !== undefined) {
      const v = parseDecimal(waitText);
      if (v === undefined) return fail(ErrorReason.INVALID_WAIT);
      wait = v;
    }
    let ttl: number | undefined;
    if (ttlText !== undefined) {
      ttl = parseDecimal(ttlText);
      if (ttl === undefined || !(ttl > 0)) return fail(ErrorReason.INVALID_TTL);
    }
    let limit = 1;
    if (limitText !== undefined) {
      const v = parsePositiveInt(limitText);
      if (v === undefined) return fail(ErrorReason.INVALID_LIMIT);
      limit = v;
    }
    const mode = parseMode(modeText, limit);
    if (mode === null) return fail(ErrorReason.INVALID_MODE);
    return this.#claimLock(name, clientId, wait, ttl, limit, mode);
  }

  /** Asks the store for the lock (the request's fields checked). */
  #claimLock(
    name: string,
    clientId: string | undefined,
    wait: number,
    ttl: number | undefined,
    limit: number,
    mode: LockMode | undefined,
  ): boolean {
    // The outcome comes later (a store answers asynchronously): meanwhile the connection is
    // read like a waiter's (early lines kept, a disconnect withdraws the claim).
    this.#claim = this.#host.table.acquire(
      { name, limit, mode, wait, ttl, clientId: clientId ?? "", remote: this.remote },
      this,
    );
    this.#state = "waiting";
    return true;
  }

  /** Queues a holder's line behind the ones before it; resolves once it is answered. */
  #enqueueHeld(text: string): Promise<void> {
    this.#heldChain = this.#heldChain.then(() => {
      if (this.#state === "holding") return this.#held(text);
    });
    return this.#heldChain;
  }

  /** A line from a holder: renews the lease, then release, keepalive or bad-action. */
  async #held(text: string): Promise<void> {
    const claim = this.#claim!;
    const table = this.#host.table;
    table.renew(claim);
    // As in the original, only the action counts here; parameters are ignored.
    const comma = text.indexOf(",");
    const action = (comma < 0 ? text : text.slice(0, comma)).trim();
    if (action === Action.RELEASE) {
      this.#claim = undefined;
      // `released` goes once the lock is free in the store (for etcd: once the key is gone).
      await table.end(claim, "released");
      await this.#finish(Reply.RELEASED);
    } else if (action === Action.KEEPALIVE) {
      await this.#send(Reply.ALIVE, true);
    } else {
      await this.#send(Reply.BAD_ACTION, true);
    }
  }

  // --- Output and closing.

  /**
   * Queues a reply; resolves when it has been written. With `late`, the line written is the one
   * `late()` returns when its turn comes (no longer than `text`, which sizes it until then).
   */
  #send(text: string, cache = false, late?: () => string): Promise<void> {
    if (this.#state === "closing" || this.#state === "closed") return this.#writing;
    const reserved = line(text, cache);
    // Fault-suite fix: judge the reader by what it owed before this reply, so that one long
    // reply is still sent (`.locks` with ~450 held names is over 64 KiB and used to be dropped,
    // the connection closed as a "slow reader" before a byte was written).
    const owedBefore = this.#owed;
    this.#owed += reserved.length;
    if (owedBefore > MAX_OWED_BYTES) {
      // The peer stopped reading: don't buffer for it without bound.
      this.#host.warn("Closing the connection of {peer}: it does not read its replies", {
        event: "disconnected",
        reason: "slow reader",
        peer: this.remote,
      });
      this.#close();
      return this.#writing;
    }
    const conn = this.#conn;
    this.#writing = this.#writing.then(async () => {
      const bytes = late === undefined ? reserved : line(late());
      let done = 0;
      while (done < bytes.length) {
        this.#stall.begin();
        done += await conn.write(done === 0 ? bytes : bytes.subarray(done));
      }
      this.#stall.end();
      this.#owed -= reserved.length;
    });
    this.#writing.catch(() => this.#close());
    return this.#writing;
  }

  /** Sends a last reply, half-closes, and leaves the connection to be drained and closed. */
  #finish(text: string): Promise<void> {
    if (this.#state === "closing" || this.#state === "closed") {
      return this.#finishing ?? this.#writing;
    }
    this.#finishing = this.#finishNow(text);
    return this.#finishing;
  }

  async #finishNow(text: string): Promise<void> {
    if (this.#claim !== undefined) {
      // Leaving while waiting or holding (a bad line, a slow reader): free it first.
      const claim = this.#claim;
      this.#claim = undefined;
      this.#host.table.end(claim, "disconnected");
    }
    const written = this.#send(text);
    this.#state = "closing";
    try {
      await written;
      if (!this.#reading && this.#reader?.buffered === 0) {
        // Everything the peer sent has been read and answered: close at once (FIN). Only a
        // peer with unread input left (pipelined lines, an over-long line) or a reply sent
        // while its next line may be arriving gets the half-close and the drain below.
        this.#close();
        return;
      }
      await this.#conn.closeWrite();
    } catch {
      this.#close();
      return;
    }
    // Closed meanwhile (the server stopped, the peer reset): no timer for a closed socket.
    if (this.#state !== "closing") return;
    // Wake the reader if it is parked in a read: the drain (or the timer) closes the socket.
    if (this.#timer === undefined) {
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.#close();
      }, LINGER_MS);
    }
  }

  /**
   * A line over the limit: `bad-request` goes out at once (a waiter's or holder's claim is ended
   * first), then the rest of the line is dropped, then the connection is closed.
   */
  async #overLong(): Promise<void> {
    const claim = this.#claim;
    this.#claim = undefined;
    if (claim !== undefined) this.#host.table.end(claim, "disconnected");
    const written = this.#send(Reply.BAD_REQUEST);
    // Nothing else is sent from now on.
    this.#state = "closing";
    this.#stopPositionTimer();
    await written;
    await this.#dropRest();
  }

  /**
   * After a line over the limit: reads and drops the rest of that line up to its newline (or the
   * end of the stream), however long it is, without a half-close first. Each read's new bytes
   * are scanned once and nothing is kept. A read of bytes already there does not wait for the
   * event loop, so every 1 MiB the drop waits for a timer turn: other connections are served
   * meanwhile (`.ping` p99 during a 100 MB line: 1.6-2.1 ms against the floor's 2.6-3.9 ms, from
   * 3.7-17 ms; the line takes some 210 ms to drop instead of 105). The connection is closed if nothing comes for
   * {@linkcode LINGER_MS}.
   */
  async #dropRest(): Promise<void> {
    const buf = new Uint8Array(64 * 1024);
    // The idle check looks at a read counter once a linger period, not at a clock per read.
    let reads = 0;
    let seen = -1;
    const check = (): void => {
      if (reads === seen) {
        this.#timer = undefined;
        this.#close();
        return;
      }
      seen = reads;
      this.#timer = setTimeout(check, LINGER_MS);
    };
    clearTimeout(this.#timer);
    this.#timer = setTimeout(check, LINGER_MS);
    try {
      for (;;) {
        const n = await this.#conn.read(buf);
        if (n === null) return;
        // Every 1 MiB, a turn of the event loop's timers phase for the other connections.
        if ((++reads & 15) === 0) await new Promise((r) => setTimeout(r, 0));
        if ((n === buf.length ? buf : buf.subarray(0, n)).indexOf(0x0a) >= 0) return;
      }
    } finally {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
  }

  /** Reads and drops what the peer still sends, until it closes or the linger runs out. */
  async #drain(): Promise<void> {
    let total = 0;
    while (this.#state === "closing" && total < LINGER_BYTES) {
      const n = await this.#conn.read(drainBuffer);
      if (n === null) break;
      total += n;
    }
  }

  /**
   * Connections (of every server in the process) that may have a deadline for the watchdog: a
   * first line awaited, or a write in progress. None: the watchdog walks no connection.
   */
  static get awaiting(): number {
    return firstLinesAwaited + WriteStall.inFlight;
  }

  /** The first line came (or will not: the connection closes). */
  #firstLineCame(): void {
    if (this.#firstLineBy === 0) return;
    this.#firstLineBy = 0;
    firstLinesAwaited--;
  }

  /** Closes the socket at once and frees whatever the connection held or waited for. */
  #close(): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#firstLineCame();
    this.#stall.end();
    this.#stopPositionTimer();
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    const claim = this.#claim;
    this.#claim = undefined;
    if (claim !== undefined) this.#host.table.end(claim, this.#endReason);
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
    this.#host.sessionEnded(this);
  }
}
