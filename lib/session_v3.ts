/**
 * A session (protocol version 3): one connection that holds many locks and waits at once, its
 * requests pipelined and multiplexed by an id the client chooses. See "Sessions" in
 * `docs/protocol.md` and `docs/sessions.md`.
 *
 * A connection becomes a session when its first line is `session` (handled by `session.ts`,
 * which then hands the connection over to {@linkcode MultiSession.run}). The session talks only
 * to the {@linkcode LockStore} interface, so it works on the memory store and the etcd store alike.
 *
 * @module
 */

import { encodeLine, type LineReader, type LineResult } from "./lines.ts";
import { type StreamConn, WriteStall } from "./net.ts";
import {
  type ClaimHandler,
  type ClaimRequest,
  type ClaimView,
  type EndReason,
  FREED,
  type LockStore,
  type Refusal,
} from "./store/types.ts";
import { parseMode } from "./store/rules.ts";
import { SmallMap } from "./small_set.ts";
import {
  Action,
  ErrorReason,
  isValidClientId,
  isValidLockName,
  parseDecimal,
  parsePositiveInt,
  parseRequest,
  Reply,
  type Request,
  SESSION_ID_RE,
  SESSION_VERSION,
} from "./protocol.ts";

/** What a session needs from its server (a part of `SessionHost`). */
export interface MultiSessionHost {
  readonly table: LockStore;
  /** Most live ids (waiting or holding) per session. */
  readonly maxSessionLocks: number;
  /** Something unexpected happened to a connection. */
  warn(message: string, props: Record<string, unknown>): void;
}

/** The default of `--max-session-locks`. */
export const DEFAULT_MAX_SESSION_LOCKS = 10_000;

/** The start of the two lines read without the general parse (see `MultiSession.#line`). */
const RELEASE_ID = `${Action.RELEASE},id:`;
const LOCK_COMMA = `${Action.LOCK},`;

/** A waiter gets at most one `queued` line per this many ms (its first at once), as in v1/v2. */
const POSITION_INTERVAL_MS = 50;
/** How long a closing session is drained, at most, and how much of it is read. */
const LINGER_MS = 1000;
const LINGER_BYTES = 1 << 20;
const drainBuffer = new Uint8Array(16 * 1024);

/** A waiter's newest position, the last one sent, and when (monotonic ms). */
interface Position {
  last: number;
  sent: number;
  at: number;
}

/** One live id of the session. */
class Entry implements ClaimHandler {
  readonly id: string;
  readonly session: MultiSession;
  claim!: ClaimView;
  /** `pending` until the store answers; `waiting` in the queue; `holding`. */
  state: "pending" | "waiting" | "holding" | "done" = "pending";
  /** Only for a claim that waited: its queue positions (a held lock stays small, < 1 KB each). */
  position: Position | undefined;

  constructor(id: string, session: MultiSession) {
    this.id = id;
    this.session = session;
  }

  granted(token: number): void {
    if (this.state === "done") return;
    this.state = "holding";
    this.position = undefined;
    this.session.line(`${Reply.OK},token:${token},id:${this.id}`);
  }

  queued(position: number): void {
    if (this.state === "done") return;
    this.state = "waiting";
    const p = this.position ??= { last: Infinity, sent: Infinity, at: -Infinity };
    if (position >= p.last) return;
    p.last = position;
    this.session.positionMoved(this);
  }

  notGranted(): void {
    this.session.over(this, Reply.NOT_GRANTED);
  }

  refused(reason: Refusal): void {
    this.session.over(this, `${Reply.ERR},${reason}`);
  }

  timedOut(): void {
    this.session.over(this, Reply.TIMEOUT);
  }

  expired(): void {
    this.session.over(this, Reply.EXPIRED);
  }
}

/**
 * One session: reads its lines, asks the store, writes the replies (batched: the lines that
 * are ready together go out in one write).
 */
export class MultiSession {
  readonly remote: string;
  readonly #conn: StreamConn;
  readonly #reader: LineReader;
  readonly #host: MultiSessionHost;
  /** Whether the writes move (for the server's write watchdog). */
  readonly #stall = new WriteStall();
  readonly #clientId: string;
  readonly #ttlMs: number | undefined;
  /** Live ids: waiting, holding, or pending in the store. */
  readonly #entries = new SmallMap<string, Entry>();
  /** Ids whose release is on its way to the store: a new lock with the id waits for it. */
  readonly #ending = new Map<string, Promise<void>>();
  /** Waiters with a position still to send (at most one line per interval each). */
  readonly #moved = new Set<Entry>();
  #positionTimer: ReturnType<typeof setTimeout> | undefined;
  #leaseDeadline = 0;
  #leaseTimer: ReturnType<typeof setTimeout> | undefined;
  #lingerTimer: ReturnType<typeof setTimeout> | undefined;
  #out: string[] = [];
  #outBytes = 0;
  #flushing: Promise<void> | undefined;
  readonly #maxOwed: number;
  #state: "open" | "closing" | "closed" = "open";
  #endReason: EndReason = "disconnected";

  constructor(
    conn: StreamConn,
    reader: LineReader,
    host: MultiSessionHost,
    remote: string,
    clientId: string,
    ttl: number | undefined,
  ) {
    this.#conn = conn;
    this.#reader = reader;
    this.#host = host;
    this.remote = remote;
    this.#clientId = clientId;
    this.#ttlMs = ttl === undefined ? undefined : ttl * 1000;
    // Every live id may owe a few lines; more than that unread means the peer stopped reading.
    this.#maxOwed = Math.max(256 * 1024, host.maxSessionLocks * 128);
  }

  /**
   * Checks the `session` line. Returns the session's settings, or the `err,...` reply that
   * refuses it.
   */
  static parseOpening(req: Request): { clientId: string; ttl: number | undefined } | string {
    const clientId = req.params.get("client-id");
    if (clientId !== undefined && !isValidClientId(clientId)) {
      return `${Reply.ERR},${ErrorReason.INVALID_CLIENT_ID}`;
    }
    const ttlText = req.params.get("ttl");
    let ttl: number | undefined;
    if (ttlText !== undefined) {
      ttl = parseDecimal(ttlText);
      if (ttl === undefined || !(ttl > 0)) return `${Reply.ERR},${ErrorReason.INVALID_TTL}`;
    }
    return { clientId: clientId ?? "", ttl };
  }

  /** Number of live ids. */
  get size(): number {
    return this.#entries.size;
  }

  /** Runs the session to its end (the `session,...` reply first). Never throws. */
  async run(): Promise<void> {
    try {
      this.#send(`session,version:${SESSION_VERSION},max-ids:${this.#host.maxSessionLocks}`);
      this.#renewLease();
      read: while (this.#state === "open") {
        let next: LineResult | undefined = await this.#reader.next();
        // The lines that arrived together are handled in one go: their replies go out together.
        for (; next !== undefined; next = this.#reader.nextBuffered()) {
          if (this.#state !== "open" || next.kind === "eof") break read;
          if (next.kind !== "line") {
            this.#finish(Reply.BAD_REQUEST);
            break read;
          }
          this.#renewLease();
          this.#line(next.line);
        }
      }
      if (this.#state === "closing") await this.#drain();
    } catch {
      // A read or write failed (reset, closed by a timer or by the server): the session ends.
    } finally {
      this.close();
    }
  }

  /** Ends the session from outside (server shutdown): every lock is freed, the socket closed. */
  shutdown(): void {
    this.#endReason = "shutdown";
    this.close();
  }

  // --- What entries report.

  /** Queues a reply line for `id`. */
  reply(text: string, id: string): void {
    this.#send(`${text},id:${id}`);
  }

  /** Queues a whole reply line (its `id:` field included). */
  line(text: string): void {
    this.#send(text);
  }

  /** A claim is over by the store's word (not granted, refused, timed out, expired). */
  over(entry: Entry, text: string): void {
    if (entry.state === "done") return;
    entry.state = "done";
    this.#moved.delete(entry);
    if (this.#entries.get(entry.id) === entry) this.#entries.delete(entry.id);
    this.reply(text, entry.id);
  }

  /** A waiter's position went down: send it now, or at the end of its interval. */
  positionMoved(entry: Entry): void {
    const due = entry.position!.at + POSITION_INTERVAL_MS - performance.now();
    if (due <= 0 && !this.#moved.has(entry)) {
      this.#sendPosition(entry);
      return;
    }
    this.#moved.add(entry);
    this.#positionTimer ??= setTimeout(() => {
      this.#positionTimer = undefined;
      const moved = [...this.#moved];
      this.#moved.clear();
      for (const e of moved) {
        if (e.state === "waiting") this.positionMoved(e);
      }
    }, Math.max(1, due));
  }

  #sendPosition(entry: Entry): void {
    const p = entry.position!;
    if (p.last >= p.sent) return;
    p.sent = p.last;
    p.at = performance.now();
    this.reply(`${Reply.QUEUED},position:${p.last}`, entry.id);
  }

  // --- The protocol.

  #line(text: string): void {
    // The two lines of every cycle in their plain shapes, `release,id:X` and `lock,id:X,name:N`,
    // are read without the general parse (a Map and a string per field; a fifth of a session
    // cycle's JavaScript, CPU profile). Anything else, or anything these checks do not accept
    // (blanks, another field, an invalid value), takes the general path and its answers.
    if (text.startsWith(RELEASE_ID)) {
      const id = text.slice(RELEASE_ID.length);
      if (SESSION_ID_RE.test(id)) return this.#endId(id, Reply.RELEASED, "released");
    } else if (text.startsWith(LOCK_COMMA) && this.#quickLock(text)) {
      return;
    }
    const req = parseRequest(text);
    if (req === null) {
      this.#finish(Reply.BAD_REQUEST);
      return;
    }
    switch (req.action) {
      case Action.LOCK:
        this.#lock(req);
        return;
      case Action.RELEASE:
        this.#end(req, Reply.RELEASED, "released");
        return;
      case Action.CANCEL:
        this.#end(req, Reply.CANCELLED, "disconnected");
        return;
      case Action.PING:
        this.#send(Reply.PONG);
        return;
      case Action.KEEPALIVE:
        this.#send(Reply.ALIVE);
        return;
      default:
        this.#send(Reply.BAD_ACTION);
    }
  }

  /** The request's id, or undefined after answering `err,invalid id`. */
  #id(req: Request): string | undefined {
    const id = req.params.get("id");
    if (id === undefined || !SESSION_ID_RE.test(id)) {
      this.#send(`${Reply.ERR},${ErrorReason.INVALID_ID}`);
      return undefined;
    }
    return id;
  }

  /**
   * `lock,id:X,name:N` (the two fields in either order, nothing else): true once handled; false
   * when the line is not in that shape or a value is not valid (the general path answers it).
   */
  #quickLock(text: string): boolean {
    const comma = text.indexOf(",", LOCK_COMMA.length);
    if (comma < 0 || text.indexOf(",", comma + 1) >= 0) return false;
    const first = text.slice(LOCK_COMMA.length, comma);
    const second = text.slice(comma + 1);
    let id: string, name: string;
    if (first.startsWith("id:") && second.startsWith("name:")) {
      id = first.slice(3);
      name = second.slice(5);
    } else if (first.startsWith("name:") && second.startsWith("id:")) {
      name = first.slice(5);
      id = second.slice(3);
    } else {
      return false;
    }
    if (!SESSION_ID_RE.test(id) || !isValidLockName(name)) return false;
    // What #check makes of these two fields alone (the session's client id was checked when it
    // opened).
    const refusal = this.#entries.has(id)
      ? ErrorReason.DUPLICATE_ID
      : this.#entries.size >= this.#host.maxSessionLocks
      ? ErrorReason.TOO_MANY_LOCKS
      : { name, limit: 1, mode: undefined, wait: 0, clientId: this.#clientId, remote: this.remote };
    this.#lockAs(id, refusal);
    return true;
  }

  #lock(req: Request): void {
    const id = this.#id(req);
    if (id === undefined) return;
    this.#lockAs(id, this.#entries.has(id) ? ErrorReason.DUPLICATE_ID : this.#check(req.params));
  }

  /** A lock request for `id`: the claim asked for, or the reason it is refused. */
  #lockAs(id: string, refusal: ClaimRequest | string): void {
    if (typeof refusal === "string") {
      this.#replyInOrder(`${Reply.ERR},${refusal}`, id);
      return;
    }
    const entry = new Entry(id, this);
    this.#entries.set(id, entry);
    const ending = this.#ending.get(id);
    // Replies for one id come in order: a lock that reuses an id being released waits for the
    // `released` line first.
    if (ending === undefined) this.#acquire(entry, refusal);
    else ending.then(() => this.#acquire(entry, refusal));
  }

  /** The claim a lock request asks for, or why it is refused (an `err,...` reason). */
  #check(p: Map<string, string>): ClaimRequest | string {
    const name = p.get("name") ?? "";
    if (!isValidLockName(name)) return ErrorReason.INVALID_LOCK_NAME;
    const clientId = p.get("client-id") ?? this.#clientId;
    if (clientId !== "" && !isValidClientId(clientId)) return ErrorReason.INVALID_CLIENT_ID;
    let wait = 0;
    const waitText = p.get("wait");
    if (waitText !== undefined) {
      const v = parseDecimal(waitText);
      if (v === undefined) return ErrorReason.INVALID_WAIT;
      wait = v;
    }
    // The lease belongs to the session: a ttl per lock has no meaning here.
    if (p.has("ttl")) return ErrorReason.INVALID_TTL;
    let limit = 1;
    const limitText = p.get("limit");
    if (limitText !== undefined) {
      const v = parsePositiveInt(limitText);
      if (v === undefined) return ErrorReason.INVALID_LIMIT;
      limit = v;
    }
    const mode = parseMode(p.get("mode"), limit);
    if (mode === null) return ErrorReason.INVALID_MODE;
    if (this.#entries.size >= this.#host.maxSessionLocks) return ErrorReason.TOO_MANY_LOCKS;
    return { name, limit, mode, wait, clientId, remote: this.remote };
  }

  #acquire(entry: Entry, request: ClaimRequest): void {
    if (entry.state === "done" || this.#state !== "open") return;
    entry.claim = this.#host.table.acquire(request, entry);
  }

  /** `release` / `cancel`: ends whatever the id is doing (holding, waiting or pending). */
  #end(req: Request, word: string, reason: EndReason): void {
    const id = this.#id(req);
    if (id !== undefined) this.#endId(id, word, reason);
  }

  #endId(id: string, word: string, reason: EndReason): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) {
      this.#replyInOrder(`${Reply.ERR},${ErrorReason.UNKNOWN_ID}`, id);
      return;
    }
    this.#entries.delete(id);
    this.#moved.delete(entry);
    entry.state = "done";
    // `released` goes once the lock is free in the store (for etcd: once the key is gone), and
    // after the replies owed to the id before it.
    const before = this.#ending.get(id);
    if (before === undefined) {
      const freed = this.#endClaim(entry, reason);
      // Free already (the memory store): answered now, not a promise step later.
      if (freed === FREED) this.reply(word, id);
      else this.#afterEnd(id, word, freed);
    } else {
      this.#afterEnd(id, word, before.then(() => this.#endClaim(entry, reason)));
    }
  }

  #endClaim(entry: Entry, reason: EndReason): Promise<void> {
    const claim = entry.claim as ClaimView | undefined;
    return claim === undefined ? FREED : this.#host.table.end(claim, reason);
  }

  /** `word` goes to `id` once `freed` resolves; a lock or reply for the id waits for it. */
  #afterEnd(id: string, word: string, freed: Promise<void>): void {
    const done: Promise<void> = freed.then(
      () => {
        if (this.#ending.get(id) === done) this.#ending.delete(id);
        this.reply(word, id);
      },
      () => this.close(),
    );
    this.#ending.set(id, done);
  }

  /** A reply to `id` that must come after the `released` / `cancelled` still owed to it. */
  #replyInOrder(text: string, id: string): void {
    const ending = this.#ending.get(id);
    if (ending === undefined) this.reply(text, id);
    else ending.then(() => this.reply(text, id));
  }

  // --- The lease.

  #renewLease(): void {
    if (this.#ttlMs === undefined) return;
    this.#leaseDeadline = performance.now() + this.#ttlMs;
    // One timer, re-armed only when it fires early: renewing costs no timer call per line.
    this.#leaseTimer ??= setTimeout(() => this.#leaseCheck(), this.#ttlMs);
  }

  #leaseCheck(): void {
    this.#leaseTimer = undefined;
    if (this.#state !== "open") return;
    const left = this.#leaseDeadline - performance.now();
    if (left > 0) {
      this.#leaseTimer = setTimeout(() => this.#leaseCheck(), left);
      return;
    }
    // Every holder gets `expired`, every waiter `timeout`; then the connection is closed.
    const entries = [...this.#entries.values()];
    this.#entries.clear();
    for (const entry of entries) {
      const holding = entry.state === "holding";
      entry.state = "done";
      if (entry.claim !== undefined) {
        this.#host.table.end(entry.claim, holding ? "expired" : "timeout");
      }
      this.reply(holding ? Reply.EXPIRED : Reply.TIMEOUT, entry.id);
    }
    this.#host.warn("Session of {peer} expired: it sent nothing for its ttl", {
      event: "expired",
      peer: this.remote,
      locks: entries.length,
    });
    this.#finish();
  }

  // --- Output and closing.

  /** Queues a line; lines queued together go out in one write. */
  #send(text: string): void {
    if (this.#state === "closed") return;
    this.#out.push(text);
    this.#outBytes += text.length + 1;
    if (this.#outBytes > this.#maxOwed) {
      this.#host.warn("Closing the session of {peer}: it does not read its replies", {
        event: "disconnected",
        reason: "slow reader",
        peer: this.remote,
      });
      this.close();
      return;
    }
    this.#flushing ??= this.#flush();
  }

  async #flush(): Promise<void> {
    try {
      // Let the replies of the same turn join in: a pipelined batch, the grants the store hands
      // out in one go (one microtask after the requests), then one write, not many.
      await undefined;
      await undefined;
      while (this.#out.length > 0 && this.#state !== "closed") {
        const bytes = encodeLine(this.#out.join("\n"));
        this.#out = [];
        let done = 0;
        while (done < bytes.length) {
          this.#stall.begin();
          // The first try writes the bytes as they are: no new view per reply.
          done += await this.#conn.write(done === 0 ? bytes : bytes.subarray(done));
        }
        this.#stall.end();
        this.#outBytes -= bytes.length;
      }
    } catch {
      this.close();
    } finally {
      this.#flushing = undefined;
    }
  }

  /** Sends a last line (if any), frees everything, and closes once it is written. */
  #finish(text?: string): void {
    if (this.#state !== "open") return;
    if (text !== undefined) this.#send(text);
    this.#endAll();
    this.#state = "closing";
    (async () => {
      while (this.#flushing !== undefined) await this.#flushing;
      if (this.#state !== "closing") return;
      try {
        await this.#conn.closeWrite();
      } catch {
        this.close();
        return;
      }
      // Closed meanwhile (the server stopped, the peer reset): no timer for a closed socket.
      if (this.#state !== "closing") return;
      this.#lingerTimer = setTimeout(() => this.close(), LINGER_MS);
    })();
  }

  /**
   * Reads and drops what the peer still sends, until it closes or the linger runs out (the last
   * lines are written first, then the write side is closed): a peer that pipelined more lines
   * reads its replies instead of a reset.
   */
  async #drain(): Promise<void> {
    let total = 0;
    while (this.#state === "closing" && total < LINGER_BYTES) {
      const n = await this.#conn.read(drainBuffer);
      if (n === null) break;
      total += n;
    }
    // The peer closed: what is still owed goes out before the socket is closed.
    while (this.#flushing !== undefined && this.#state === "closing") await this.#flushing;
  }

  /** Frees every lock and leaves every queue. */
  #endAll(): void {
    const table = this.#host.table;
    for (const entry of this.#entries.values()) {
      entry.state = "done";
      if (entry.claim !== undefined) table.end(entry.claim, this.#endReason);
    }
    this.#entries.clear();
    this.#moved.clear();
  }

  /**
   * Called (through the connection's {@linkcode Session}) by the server's write watchdog: a
   * session whose peer has not read for more than `limitMs` is closed, every lock of it freed.
   */
  checkWrite(now: number, limitMs: number): void {
    if (this.#stall.stalledFor(now) <= limitMs) return;
    if (this.#state === "closed") return;
    this.#host.warn(
      "Closing the session of {peer}: it has not read its replies for {seconds} s",
      {
        event: "disconnected",
        reason: "write timeout",
        peer: this.remote,
        seconds: Math.round(limitMs) / 1000,
      },
    );
    this.#stall.end();
    this.close();
  }

  /** Closes the socket at once and frees whatever the session held or waited for. */
  close(): void {
    if (this.#state === "closed") return;
    this.#endAll();
    this.#state = "closed";
    this.#out = [];
    clearTimeout(this.#positionTimer);
    clearTimeout(this.#leaseTimer);
    clearTimeout(this.#lingerTimer);
    this.#positionTimer = this.#leaseTimer = this.#lingerTimer = undefined;
    this.#stall.end();
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
  }
}
