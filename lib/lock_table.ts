/**
 * The lock table: pure state. Holders, FIFO waiters, fencing tokens, leases and wait deadlines.
 * No sockets and no timers: it takes the time from an injected clock, tells its owner the
 * earliest deadline it has (`nextDeadline()`, and `onDeadline` when a new one is set) and acts
 * on deadlines when the owner calls `tick()`.
 *
 * Requests and their outcomes are decoupled: `acquire()` returns a {@linkcode Claim} handle and
 * reports the outcome through the claim's {@linkcode ClaimHandler}. The in-memory table calls the
 * handler before `acquire()` returns; a distributed store (later) may call it afterwards. The
 * session code works with both.
 *
 * @module
 */

import { ErrorReason, type LockInfo } from "./protocol.ts";
import type { TokenSource } from "./tokens.ts";

/**
 * The refusal of a store that cannot reach its backing service (the etcd store while etcd is
 * unreachable or its lease is lost): answered as `err,store unavailable`.
 */
export const STORE_UNAVAILABLE = "store unavailable";

/** Why a request was refused outright. */
export type Refusal =
  | "limit mismatch"
  | "too many waiters"
  | "too many locks"
  | "store unavailable";

/** How a claim ended, for logs and metrics. */
export type EndReason = "released" | "disconnected" | "expired" | "timeout" | "shutdown";

/** What the table tells the owner of a claim. Every method is called at most once per claim, except `queued`. */
export interface ClaimHandler {
  /** The claim holds the lock now. */
  granted(token: number): void;
  /** The claim waits; `position` 1 is next in line. Called again whenever it gets smaller. */
  queued(position: number): void;
  /** Taken and no wait was asked for: the claim is over. */
  notGranted(): void;
  /** Refused by a check (limit mismatch, a table limit): the claim is over. */
  refused(reason: Refusal): void;
  /** The wait ran out: the claim left the queue and is over. */
  timedOut(): void;
  /** The lease ran out: the lock was taken away and the claim is over. */
  expired(): void;
}

/** What a connection asks for. */
export interface ClaimRequest {
  /** The lock name (already validated). */
  name: string;
  /** How many may hold the name at once. */
  limit: number;
  /** Seconds to wait in the queue; 0 means try once. */
  wait: number;
  /** Lease in seconds; undefined means none. */
  ttl?: number;
  /** The client id, `""` when none was given. */
  clientId: string;
  /** The peer as `ip:port`. */
  remote: string;
}

/** The table's record of one request: waiting, holding, or done. */
export class Claim {
  /** Where the claim is. */
  state: "new" | "waiting" | "holding" | "done" = "new";
  /** The fencing token, once granted. */
  token: number = 0;
  /** Monotonic ms when the request arrived. */
  readonly requestedAt: number;
  /** Monotonic ms of the grant. */
  grantedAt: number = 0;
  /** Wall clock ms of the grant (for `since`). */
  grantedWall: number = 0;
  /** Monotonic ms at which the wait or the lease runs out (Infinity: never). */
  deadline: number = Infinity;
  /** The position in the deadline heap, -1 when not in it. */
  heapIndex: number = -1;
  /** The deadline the heap orders this claim by (may lag behind `deadline` after a renewal). */
  heapKey: number = Infinity;

  /** What was asked for. */
  readonly request: ClaimRequest;
  /** Where the outcome goes. */
  readonly handler: ClaimHandler;

  /** A claim for `request`, made at monotonic time `now`. */
  constructor(request: ClaimRequest, handler: ClaimHandler, now: number) {
    this.request = request;
    this.handler = handler;
    this.requestedAt = now;
  }
}

/** A notice for logs and metrics. */
export type TableEvent =
  | { type: "granted"; claim: Claim; waitedMs: number }
  | { type: "queued"; claim: Claim; position: number }
  | { type: "not_granted"; claim: Claim }
  | { type: "refused"; claim: Claim; reason: Refusal }
  | { type: "timeout"; claim: Claim; waitedMs: number }
  | { type: "ended"; claim: Claim; reason: EndReason; heldMs: number };

/** Options of a {@linkcode LockTable}. */
export interface LockTableOptions {
  /** Where fencing tokens come from. */
  tokens: TokenSource;
  /** The monotonic clock in milliseconds (default `performance.now`). */
  now?: () => number;
  /** The wall clock in milliseconds (default `Date.now`). */
  wallNow?: () => number;
  /** Longest wait in seconds; longer waits are cut to it (default: no cap). */
  maxWait?: number;
  /** Most waiters per name (default: no limit). */
  maxWaiters?: number;
  /** Most distinct names held or waited on (default: no limit). */
  maxLocks?: number;
  /** Told when a deadline earlier than any before may have been set. */
  onDeadline?: (at: number) => void;
  /** Told of every grant, queueing, refusal, timeout and end. */
  onEvent?: (event: TableEvent) => void;
}

interface Entry {
  limit: number;
  holders: Set<Claim>;
  waiters: Claim[];
}

/** Counters since the table was made. */
export interface TableCounters {
  /** Grants. */
  acquired: number;
  /** `not-granted` answers. */
  notGranted: number;
  /** Waits that ran out. */
  timedOut: number;
  /** Leases that ran out. */
  expired: number;
  /** Refusals (limit mismatch, table limits). */
  refused: number;
}

/**
 * What the server and its sessions need from a lock store: the in-memory {@linkcode LockTable}
 * and the etcd store (`lib/etcd_store.ts`) both implement it.
 *
 * A store reports a claim's outcome through its {@linkcode ClaimHandler}, either before
 * `acquire()` returns (the memory table) or later (the etcd store: the claim stays in state
 * `"new"` until then, and may be ended meanwhile, which withdraws it).
 */
export interface LockStore {
  /** Asks for a lock; the outcome goes to `handler`, now or later. */
  acquire(request: ClaimRequest, handler: ClaimHandler): Claim;
  /**
   * Ends a claim that is pending, waiting or holding. A store that frees the lock elsewhere
   * returns a promise that resolves once the lock is free there (a `released` reply waits for it).
   */
  end(claim: Claim, reason: EndReason): void | Promise<void>;
  /** Renews a holder's lease (`ttl`). */
  renew(claim: Claim): void;
  /** The earliest deadline the server's timer must call `tick()` for, or undefined. */
  nextDeadline(): number | undefined;
  /** Acts on deadlines that have passed. */
  tick(): void;
  /** What `.locks` shows. */
  snapshot(): LockInfo[];
  /** The monotonic ms of this server's longest-held grant, or undefined. */
  oldestGrant(): number | undefined;
  /** Counters since the store was made (this server's requests). */
  readonly counters: TableCounters;
  /** Names held by this server's connections. */
  readonly heldNames: number;
  /** This server's holders. */
  readonly holders: number;
  /** This server's waiters. */
  readonly waiting: number;
  /** How many tokens were handed out. */
  readonly tokens: Pick<TokenSource, "issued">;
  /** Connects to the backing service; the server awaits it before listening. */
  start?(): Promise<void>;
  /** Lets go of the backing service; the server awaits it after closing its connections. */
  close?(): Promise<void>;
  /** Resolves once `snapshot()` reflects every change this server made (bounded in time). */
  settled?(): Promise<void>;
}

/**
 * The in-memory lock table.
 *
 * @example
 * ```ts
 * import { LockTable } from "./lock_table.ts";
 * import { TokenSequence } from "./tokens.ts";
 * const table = new LockTable({ tokens: new TokenSequence() });
 * const handler = {
 *   granted: (t: number) => console.log("token", t),
 *   queued() {}, notGranted() {}, refused() {}, timedOut() {}, expired() {},
 * };
 * const claim = table.acquire({ name: "db", limit: 1, wait: 0, clientId: "", remote: "" }, handler);
 * table.end(claim, "released");
 * ```
 */
export class LockTable implements LockStore {
  readonly #entries = new Map<string, Entry>();
  readonly #heap: Claim[] = [];
  readonly #tokens: TokenSource;
  readonly #now: () => number;
  readonly #wallNow: () => number;
  readonly #maxWait: number;
  readonly #maxWaiters: number;
  readonly #maxLocks: number;
  readonly #onDeadline?: (at: number) => void;
  readonly #onEvent?: (event: TableEvent) => void;
  #waiting = 0;
  #held = 0;
  /** During tick(): the names whose waiters moved up (told their positions at its end). */
  #moved: Set<Entry> | undefined;
  /** Counters since the table was made. */
  readonly counters: TableCounters = {
    acquired: 0,
    notGranted: 0,
    timedOut: 0,
    expired: 0,
    refused: 0,
  };

  constructor(options: LockTableOptions) {
    this.#tokens = options.tokens;
    this.#now = options.now ?? (() => performance.now());
    this.#wallNow = options.wallNow ?? Date.now;
    this.#maxWait = options.maxWait ?? Infinity;
    this.#maxWaiters = options.maxWaiters ?? Infinity;
    this.#maxLocks = options.maxLocks ?? Infinity;
    this.#onDeadline = options.onDeadline;
    this.#onEvent = options.onEvent;
  }

  /** Names held or waited on. */
  get size(): number {
    return this.#entries.size;
  }

  /** Names with at least one holder. */
  get heldNames(): number {
    let n = 0;
    for (const e of this.#entries.values()) if (e.holders.size > 0) n++;
    return n;
  }

  /** Holders across all names. */
  get holders(): number {
    return this.#held;
  }

  /** Waiters across all names. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Where the fencing tokens come from. */
  get tokens(): TokenSource {
    return this.#tokens;
  }

  /**
   * Asks for a lock. The outcome goes to `handler` (for this table, before this returns).
   * Checks in protocol order: table limit for a new name, limit mismatch, then grant, queue
   * (checking the waiter limit) or not-granted.
   */
  acquire(request: ClaimRequest, handler: ClaimHandler): Claim {
    const now = this.#now();
    const claim = new Claim(request, handler, now);
    let entry = this.#entries.get(request.name);
    if (entry === undefined) {
      if (this.#entries.size >= this.#maxLocks) {
        this.#refuse(claim, ErrorReason.TOO_MANY_LOCKS);
        return claim;
      }
    } else if (entry.limit !== request.limit) {
      this.#refuse(claim, ErrorReason.LIMIT_MISMATCH);
      return claim;
    }
    if (entry === undefined || (entry.holders.size < entry.limit && entry.waiters.length === 0)) {
      if (entry === undefined) {
        entry = { limit: request.limit, holders: new Set(), waiters: [] };
        this.#entries.set(request.name, entry);
      }
      this.#grant(entry, claim, now);
      return claim;
    }
    const wait = Math.min(request.wait, this.#maxWait);
    if (!(wait > 0)) {
      claim.state = "done";
      this.counters.notGranted++;
      this.#onEvent?.({ type: "not_granted", claim });
      handler.notGranted();
      return claim;
    }
    if (entry.waiters.length >= this.#maxWaiters) {
      this.#refuse(claim, ErrorReason.TOO_MANY_WAITERS);
      return claim;
    }
    claim.state = "waiting";
    entry.waiters.push(claim);
    this.#waiting++;
    this.#setDeadline(claim, now + wait * 1000);
    const position = entry.waiters.length;
    this.#onEvent?.({ type: "queued", claim, position });
    handler.queued(position);
    return claim;
  }

  /**
   * Ends a claim that is waiting or holding (a release, a disconnect, a shutdown): it leaves the
   * queue, or gives up the lock, which passes to the next waiters. Does nothing for a claim that
   * is already over.
   */
  end(claim: Claim, reason: EndReason): void {
    const entry = this.#entries.get(claim.request.name);
    if (claim.state === "holding" && entry) {
      this.#removeHolder(entry, claim, reason);
    } else if (claim.state === "waiting" && entry) {
      this.#removeWaiter(entry, claim);
      claim.state = "done";
      this.#onEvent?.({ type: "ended", claim, reason, heldMs: 0 });
    } else {
      claim.state = "done";
    }
  }

  /** Renews a holder's lease: its deadline moves to now + ttl. */
  renew(claim: Claim): void {
    if (claim.state !== "holding" || claim.request.ttl === undefined) return;
    // The heap keeps the old, earlier key; tick() re-files the claim when that key comes up.
    claim.deadline = this.#now() + claim.request.ttl * 1000;
  }

  /** The earliest deadline the table knows of (monotonic ms), or undefined. */
  nextDeadline(): number | undefined {
    return this.#heap.length > 0 ? this.#heap[0].heapKey : undefined;
  }

  /** Acts on every deadline that has passed: leases expire, waits time out. */
  tick(): void {
    const now = this.#now();
    // Fault-suite fix: waiters that time out in one tick (a queue of 10,000 with the same wait)
    // used to tell everyone behind them their new position once per timeout: quadratic work in
    // one tick, a 260-460 ms stall of the whole server. Now positions are told once, at the end.
    const moved = this.#moved = new Set<Entry>();
    try {
      this.#expire(now);
    } finally {
      this.#moved = undefined;
      for (const entry of moved) {
        for (let j = 0; j < entry.waiters.length; j++) entry.waiters[j].handler.queued(j + 1);
      }
    }
  }

  #expire(now: number): void {
    while (this.#heap.length > 0 && this.#heap[0].heapKey <= now) {
      const claim = this.#heap[0];
      if (claim.deadline > now) {
        // Renewed since it was filed: file it again under its current deadline.
        this.#heapRemove(claim);
        this.#heapInsert(claim, claim.deadline);
        continue;
      }
      this.#heapRemove(claim);
      const entry = this.#entries.get(claim.request.name)!;
      if (claim.state === "holding") {
        this.counters.expired++;
        this.#removeHolder(entry, claim, "expired");
        claim.handler.expired();
      } else if (claim.state === "waiting") {
        this.#removeWaiter(entry, claim);
        claim.state = "done";
        this.counters.timedOut++;
        this.#onEvent?.({ type: "timeout", claim, waitedMs: now - claim.requestedAt });
        claim.handler.timedOut();
      }
    }
  }

  /** What `.locks` shows: every name held or waited on. */
  snapshot(): LockInfo[] {
    const out: LockInfo[] = [];
    for (const [name, entry] of this.#entries) {
      out.push({
        name,
        limit: entry.limit,
        waiting: entry.waiters.length,
        holders: [...entry.holders].map((c) => ({
          client_id: c.request.clientId,
          token: c.token,
          since: new Date(c.grantedWall).toISOString(),
          remote: c.request.remote,
        })),
      });
    }
    return out;
  }

  /** The holder that has held longest (monotonic ms of its grant), or undefined. */
  oldestGrant(): number | undefined {
    let oldest: number | undefined;
    for (const entry of this.#entries.values()) {
      for (const c of entry.holders) {
        if (oldest === undefined || c.grantedAt < oldest) oldest = c.grantedAt;
      }
    }
    return oldest;
  }

  #refuse(claim: Claim, reason: Refusal): void {
    claim.state = "done";
    this.counters.refused++;
    this.#onEvent?.({ type: "refused", claim, reason });
    claim.handler.refused(reason);
  }

  #grant(entry: Entry, claim: Claim, now: number): void {
    claim.state = "holding";
    claim.token = this.#tokens.next();
    claim.grantedAt = now;
    claim.grantedWall = this.#wallNow();
    entry.holders.add(claim);
    this.#held++;
    this.counters.acquired++;
    if (claim.request.ttl !== undefined) {
      this.#setDeadline(claim, now + claim.request.ttl * 1000);
    } else {
      claim.deadline = Infinity;
    }
    this.#onEvent?.({ type: "granted", claim, waitedMs: now - claim.requestedAt });
    claim.handler.granted(claim.token);
  }

  #removeHolder(entry: Entry, claim: Claim, reason: EndReason): void {
    const now = this.#now();
    entry.holders.delete(claim);
    this.#held--;
    claim.state = "done";
    this.#heapRemove(claim);
    this.#onEvent?.({ type: "ended", claim, reason, heldMs: now - claim.grantedAt });
    this.#handOver(entry, claim.request.name, now);
  }

  #removeWaiter(entry: Entry, claim: Claim): void {
    const i = entry.waiters.indexOf(claim);
    if (i >= 0) {
      entry.waiters.splice(i, 1);
      this.#waiting--;
      this.#heapRemove(claim);
      // Everyone behind moved up by one (told at the end of tick() when in one).
      if (this.#moved !== undefined) this.#moved.add(entry);
      else for (let j = i; j < entry.waiters.length; j++) entry.waiters[j].handler.queued(j + 1);
    }
    if (entry.holders.size === 0 && entry.waiters.length === 0) {
      this.#entries.delete(claim.request.name);
    } else {
      this.#handOver(entry, claim.request.name, this.#now());
    }
  }

  /** Grants to the head of the queue while there is room, then tells the rest their position. */
  #handOver(entry: Entry, name: string, now: number): void {
    let granted = 0;
    while (entry.holders.size < entry.limit && entry.waiters.length > 0) {
      const next = entry.waiters.shift()!;
      this.#waiting--;
      this.#heapRemove(next);
      this.#grant(entry, next, now);
      granted++;
    }
    if (granted > 0) {
      for (let j = 0; j < entry.waiters.length; j++) entry.waiters[j].handler.queued(j + 1);
    }
    if (entry.holders.size === 0 && entry.waiters.length === 0) this.#entries.delete(name);
  }

  #setDeadline(claim: Claim, at: number): void {
    claim.deadline = at;
    this.#heapRemove(claim);
    this.#heapInsert(claim, at);
    if (claim.heapIndex === 0) this.#onDeadline?.(at);
  }

  // A binary min-heap of claims keyed by heapKey, with each claim's index kept for removal.
  #heapInsert(claim: Claim, key: number): void {
    claim.heapKey = key;
    claim.heapIndex = this.#heap.length;
    this.#heap.push(claim);
    this.#siftUp(claim.heapIndex);
  }

  #heapRemove(claim: Claim): void {
    const i = claim.heapIndex;
    if (i < 0) return;
    const last = this.#heap.pop()!;
    claim.heapIndex = -1;
    if (last !== claim) {
      this.#heap[i] = last;
      last.heapIndex = i;
      this.#siftUp(i);
      this.#siftDown(last.heapIndex);
    }
  }

  #siftUp(i: number): void {
    const heap = this.#heap;
    const item = heap[i];
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (heap[parent].heapKey <= item.heapKey) break;
      heap[i] = heap[parent];
      heap[i].heapIndex = i;
      i = parent;
    }
    heap[i] = item;
    item.heapIndex = i;
  }

  #siftDown(i: number): void {
    const heap = this.#heap;
    const n = heap.length;
    const item = heap[i];
    for (;;) {
      let child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && heap[child + 1].heapKey < heap[child].heapKey) child++;
      if (heap[child].heapKey >= item.heapKey) break;
      heap[i] = heap[child];
      heap[i].heapIndex = i;
      i = child;
    }
    heap[i] = item;
    item.heapIndex = i;
  }
}
