/**
 * The claim book: one claim's life, kept once for both stores. A store composes a book and
 * decides only *where* the state lives and *when* it changes; the book does the rest:
 *
 * - the claim's states (`pending` → `waiting` → `holding` → `done`) and every transition's
 *   bookkeeping: this server's holders and waiters per name, the counters, the events for logs
 *   and metrics;
 * - the checks that are this server's own: `--max-locks` (names this server's connections hold
 *   or wait on), `--max-waiters` per name, `--max-wait`;
 * - the deadlines of waits and `ttl` leases, on its own timer (the clock is injected);
 * - the outcomes, delivered to each claim's handler asynchronously (one microtask per batch), in
 *   order, and never after the owner ended the claim: a store never runs session code inside
 *   its own call.
 *
 * When a claim leaves (its owner ended it, its wait ran out, its lease ran out) the book tells
 * the store through {@linkcode BookHooks.left}, so that the store frees the lock where it lives.
 *
 * A name whose last claim ended keeps its entry for a while (idle), so that a name locked and
 * released over and over does not add and delete a map entry each time. A `Map` that does
 * replaces its hash table every few operations, and V8 keeps a replaced table linked to the
 * next one: once one of them sat in the old generation, the later tables and the entries they
 * pointed to survived young collections and were promoted. At 30,000 cycles/s over sessions
 * that was ~200 KB per scavenge and ~2 µs of collection per cycle (`--trace-gc-nvp`;
 * tests/gc_promotion_test.ts).
 * Idle entries are not names held or waited on (`size`, `--max-locks`, `entry()`, `entries()`
 * leave them out). They go in a sweep run from {@linkcode ClaimBook.open}, at most once a
 * second, which deletes the entries idle since the sweep before; and all at once when there
 * are more idle entries than {@linkcode MIN_IDLE_KEPT} and the names in use. No timer: an idle
 * server does nothing, and keeps at most that many.
 *
 * @module
 */

import { type Clock, systemClock, type TimerHandle } from "./clock.ts";
import { DeadlineHeap, type HeapItem } from "./deadline_heap.ts";
import { emptyGroup, type HolderGroup, join } from "./rules.ts";
import { SmallSet } from "../small_set.ts";
import {
  type ClaimHandler,
  type ClaimRequest,
  type ClaimState,
  type ClaimView,
  type EndReason,
  FREED,
  type Refusal,
  STORE_UNAVAILABLE,
  type StoreCounters,
  type StoreEvent,
} from "./types.ts";

/** The book's record of one request. `X` is what the store keeps with it (the etcd key). */
export class Claim<X = unknown> implements ClaimView, HeapItem {
  state: ClaimState = "pending";
  token = 0;
  grantedAt = 0;
  /** Monotonic ms at which the wait or the lease runs out (Infinity: never). */
  deadline = Infinity;
  heapIndex = -1;
  heapKey = Infinity;
  /** The owner ended the claim: its handler hears nothing more. */
  closed = false;
  /** A position waiting in the outbox (0: none). */
  positionDue = 0;
  /** The last position told (positions only go down). */
  positionTold = Infinity;
  readonly requestedAt: number;
  readonly request: ClaimRequest;
  readonly handler: ClaimHandler;
  /** The store's own data for this claim. */
  readonly ext: X;
  /** Its name's entry in the book, once filed (a refused claim may have none). */
  entry: BookEntry<X> | undefined;

  readonly #clock: Clock;
  /** The wall-clock time of the grant, once read (0: not yet). */
  #wall = 0;

  constructor(request: ClaimRequest, handler: ClaimHandler, clock: Clock, ext: X) {
    this.request = request;
    this.handler = handler;
    this.#clock = clock;
    this.requestedAt = clock.now();
    this.ext = ext;
  }

  /**
   * Wall-clock ms of the grant (0 before): worked out from the monotonic clock when first read
   * (`.locks`, the live page), then the same on every read. Reading the wall clock at every grant
   * was a noticeable part of a session cycle (CPU profile) for a figure few grants are asked for.
   */
  get grantedWall(): number {
    if (this.#wall === 0 && this.state === "holding") {
      this.#wall = Math.round(this.#clock.wallNow() - (this.#clock.now() - this.grantedAt));
    }
    return this.#wall;
  }
}

/** This server's claims on one name, in arrival order. */
export interface BookEntry<X> {
  readonly name: string;
  /**
   * -1 while the entry has claims; once it has none, the book's sweep round it went idle in
   * (the book keeps idle entries for a while: see {@linkcode ClaimBook}).
   */
  idle: number;
  /** Claims whose outcome the store has not decided yet. */
  readonly pending: SmallSet<Claim<X>>;
  /** Claims holding the name, in grant order. */
  readonly holders: SmallSet<Claim<X>>;
  /** Claims waiting, in arrival order. */
  readonly waiters: Claim<X>[];
}

/** What the book tells its store. */
export interface BookHooks<X> {
  /**
   * A claim left (`from` is the state it left): its owner ended it, its wait or lease ran out.
   * The store frees it where it lives; the promise (an owner's `end()` returns it) resolves
   * once the lock is free there.
   */
  left(claim: Claim<X>, from: ClaimState, reason: EndReason): Promise<void> | void;
}

/** Idle entries kept at most, beyond one per name in use (see the module doc). */
export const MIN_IDLE_KEPT = 256;
/** How often idle entries are swept, at most (ms). */
const SWEEP_MS = 1000;

function isEmpty(e: BookEntry<unknown>): boolean {
  return e.pending.size === 0 && e.holders.size === 0 && e.waiters.length === 0;
}

/** Options of a {@linkcode ClaimBook}. */
export interface ClaimBookOptions {
  /** Time and timers (default: the real clock). */
  clock?: Clock;
  /** Longest wait in seconds; longer waits are cut to it (default: no cap). */
  maxWait?: number;
  /** Most waiters per name on this server (default: no limit). */
  maxWaiters?: number;
  /** Most distinct names this server's claims hold, wait on or ask for (default: no limit). */
  maxLocks?: number;
  /** Told of every grant, queueing, refusal, timeout and end. */
  onEvent?: (event: StoreEvent) => void;
}

// What the outbox delivers.
const GRANTED = 0, QUEUED = 1, NOT_GRANTED = 2, REFUSED = 3, TIMED_OUT = 4, EXPIRED = 5;
type Note =
  | typeof GRANTED
  | typeof QUEUED
  | typeof NOT_GRANTED
  | typeof REFUSED
  | typeof TIMED_OUT
  | typeof EXPIRED;

/**
 * The claim book (see the module doc). Stores call its transitions; it never decides who gets a
 * lock: that is the store's (with the rules of `rules.ts`).
 *
 * @example
 * ```ts
 * import { ClaimBook } from "./claim_book.ts";
 * const book = new ClaimBook<undefined>({ left: () => {} });
 * const claim = book.open(
 *   { name: "db", limit: 1, wait: 0, clientId: "", remote: "" },
 *   {
 *     granted: (t) => console.log("granted", t),
 *     queued() {}, notGranted() {}, refused() {}, timedOut() {}, expired() {},
 *   },
 *   undefined,
 * );
 * book.grant(claim, 1);
 * await book.end(claim, "released");
 * book.close();
 * ```
 */
export class ClaimBook<X> {
  readonly #hooks: BookHooks<X>;
  readonly #clock: Clock;
  readonly #maxWait: number;
  readonly #maxWaiters: number;
  readonly #maxLocks: number;
  readonly #onEvent: ((event: StoreEvent) => void) | undefined;
  /** Every name with claims, and idle names (no claims) not yet swept. */
  readonly #entries = new Map<string, BookEntry<X>>();
  /** Entries without claims in `#entries`. */
  #idle = 0;
  /** The sweep round (entries idle since an earlier round go at the next sweep). */
  #round = 0;
  #sweepAt = 0;
  readonly #heap = new DeadlineHeap<Claim<X>>();
  #timer: TimerHandle | undefined;
  #timerAt = Infinity;
  #held = 0;
  #waiting = 0;
  #closed = false;
  // The outbox: (claim, note, argument) triples, delivered in one microtask. Two arrays take
  // turns (the notes handlers cause during a delivery go to the other one): no new array and no
  // new closure per delivery.
  #outbox: unknown[] = [];
  #outboxLength = 0;
  #spare: unknown[] = [];
  #flushing = false;
  readonly #flushNow = () => this.#flush();
  /** Counters since the book was made. */
  readonly counters: StoreCounters = {
    acquired: 0,
    notGranted: 0,
    timedOut: 0,
    expired: 0,
    refused: 0,
  };

  constructor(hooks: BookHooks<X>, options: ClaimBookOptions = {}) {
    this.#hooks = hooks;
    this.#clock = options.clock ?? systemClock;
    this.#maxWait = options.maxWait ?? Infinity;
    this.#maxWaiters = options.maxWaiters ?? Infinity;
    this.#maxLocks = options.maxLocks ?? Infinity;
    this.#onEvent = options.onEvent;
  }

  /** The clock the book runs on. */
  get clock(): Clock {
    return this.#clock;
  }

  /** This server's holders. */
  get holders(): number {
    return this.#held;
  }

  /** This server's waiters. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Names this server's claims hold, wait on or ask for. */
  get size(): number {
    return this.#entries.size - this.#idle;
  }

  /** Idle entries kept (names with no claim, not yet swept: see the module doc). */
  get idleEntries(): number {
    return this.#idle;
  }

  /** Names held by this server's claims. */
  get heldNames(): number {
    let n = 0;
    for (const e of this.#entries.values()) if (e.holders.size > 0) n++;
    return n;
  }

  /** This server's claims on `name`, or undefined when it has none. */
  entry(name: string): BookEntry<X> | undefined {
    const entry = this.#entries.get(name);
    return entry === undefined || entry.idle >= 0 ? undefined : entry;
  }

  /** Every name this server's claims are on. */
  *entries(): IterableIterator<BookEntry<X>> {
    for (const entry of this.#entries.values()) if (entry.idle < 0) yield entry;
  }

  /** The holder group of an entry (for the rules): how many hold, with which limit and mode. */
  group(entry: BookEntry<X>): HolderGroup {
    // Holders of a name all hold in one mode (the rules never mix them): the first one says.
    const g = emptyGroup();
    const first = entry.holders.first();
    if (first !== undefined) join(g, first.request);
    g.count = entry.holders.size;
    return g;
  }

  /** The monotonic ms of the longest-held grant, or undefined. */
  oldestGrant(): number | undefined {
    let oldest: number | undefined;
    for (const entry of this.#entries.values()) {
      for (const c of entry.holders) {
        if (oldest === undefined || c.grantedAt < oldest) oldest = c.grantedAt;
      }
    }
    return oldest;
  }

  /** Every claim that is not over (for a store that shuts down or loses its backing service). */
  live(): Claim<X>[] {
    const out: Claim<X>[] = [];
    for (const e of this.#entries.values()) out.push(...e.pending, ...e.holders, ...e.waiters);
    return out;
  }

  // --- Transitions

  /**
   * A new request: a pending claim on its name, or, when it would be a new name past
   * `--max-locks`, a claim refused with `too many locks` (state `done`).
   */
  open(request: ClaimRequest, handler: ClaimHandler, ext: X): Claim<X> {
    const claim = new Claim(request, handler, this.#clock, ext);
    if (this.#closed) {
      this.refuse(claim, STORE_UNAVAILABLE);
      return claim;
    }
    if (this.#idle > 0 && claim.requestedAt >= this.#sweepAt) this.#sweep(false);
    let entry = this.#entries.get(request.name);
    if (entry === undefined || entry.idle >= 0) {
      if (this.#entries.size - this.#idle >= this.#maxLocks) {
        this.refuse(claim, "too many locks");
        return claim;
      }
      if (entry === undefined) {
        entry = {
          name: request.name,
          idle: -1,
          pending: new SmallSet(),
          holders: new SmallSet(),
          waiters: [],
        };
        this.#entries.set(request.name, entry);
      } else {
        entry.idle = -1;
        this.#idle--;
      }
    }
    claim.entry = entry;
    entry.pending.add(claim);
    // The wait runs from the request's arrival, also while the store decides.
    const wait = this.waitOf(request);
    if (wait > 0) this.#setDeadline(claim, claim.requestedAt + wait * 1000);
    return claim;
  }

  /** How long a request may wait, in seconds, `--max-wait` applied (0: it does not wait). */
  waitOf(request: ClaimRequest): number {
    const wait = Math.min(request.wait, this.#maxWait);
    return wait > 0 ? wait : 0;
  }

  /**
   * The claim holds the lock (from pending or waiting), with `token`; `at` is the monotonic time
   * of the grant when the store has it already (a grant in the call that opened the claim: its
   * `requestedAt`), else the clock is read.
   */
  grant(claim: Claim<X>, token: number, at?: number): void {
    if (claim.state !== "pending" && claim.state !== "waiting") return;
    const entry = this.#detach(claim)!;
    const now = at ?? this.#clock.now();
    claim.state = "holding";
    claim.token = token;
    claim.grantedAt = now;
    entry.holders.add(claim);
    this.#held++;
    this.counters.acquired++;
    if (claim.request.ttl !== undefined) this.#setDeadline(claim, now + claim.request.ttl * 1000);
    this.#onEvent?.({ type: "granted", claim, waitedMs: now - claim.requestedAt });
    this.#note(claim, GRANTED, token);
  }

  /**
   * A pending claim that cannot be granted now: with no wait it is not granted; past
   * `--max-waiters` it is refused; else it waits at `position` (1: next in line). True when it
   * waits.
   */
  queue(claim: Claim<X>, position: number): boolean {
    if (claim.state !== "pending") return false;
    if (this.waitOf(claim.request) === 0) {
      this.notGranted(claim);
      return false;
    }
    const entry = claim.entry!;
    if (entry.waiters.length >= this.#maxWaiters) {
      this.refuse(claim, "too many waiters");
      return false;
    }
    entry.pending.delete(claim);
    claim.state = "waiting";
    entry.waiters.push(claim);
    this.#waiting++;
    this.#onEvent?.({ type: "queued", claim, position });
    this.position(claim, position);
    return true;
  }

  /** Tells a waiter its position, when it went down. */
  position(claim: Claim<X>, position: number): void {
    if (claim.state !== "waiting" || position >= claim.positionTold) return;
    claim.positionTold = position;
    if (claim.positionDue === 0) this.#note(claim, QUEUED, 0);
    claim.positionDue = position;
  }

  /** Taken, and the claim did not ask to wait: it is over. */
  notGranted(claim: Claim<X>): void {
    if (claim.state === "done") return;
    this.#finish(claim);
    this.counters.notGranted++;
    this.#onEvent?.({ type: "not_granted", claim });
    this.#note(claim, NOT_GRANTED, 0);
  }

  /** Refused by a check: it is over. Works from any state but `done`. */
  refuse(claim: Claim<X>, reason: Refusal): void {
    if (claim.state === "done") return;
    this.#finish(claim);
    this.counters.refused++;
    this.#onEvent?.({ type: "refused", claim, reason });
    this.#note(claim, REFUSED, reason);
  }

  /**
   * The store lost the claim (its key vanished, its backing service's lease ran out): a holder
   * is told `expired`, a waiter `timeout`, a pending claim `err,store unavailable`. The store
   * cleans up after it itself (no {@linkcode BookHooks.left}).
   */
  lose(claim: Claim<X>): void {
    const from = claim.state;
    if (from === "pending") return this.refuse(claim, STORE_UNAVAILABLE);
    if (from === "waiting") return this.#timeOut(claim, false);
    if (from === "holding") this.#expire(claim, false);
  }

  /**
   * The owner ends its claim (release, disconnect, shutdown): its handler hears nothing more,
   * and the store frees it. Resolves once the lock is free in the store.
   */
  end(claim: Claim<X>, reason: EndReason): Promise<void> {
    if (claim.closed) return FREED;
    claim.closed = true;
    const from = claim.state;
    if (from === "done") return FREED;
    const now = this.#clock.now();
    this.#finish(claim);
    const heldMs = from === "holding" ? now - claim.grantedAt : 0;
    // An owner's own lease (a session's `ttl`) ran out: counted like the book's own expiries.
    if (reason === "expired" && from === "holding") this.counters.expired++;
    else if (reason === "timeout" && from !== "holding") this.counters.timedOut++;
    this.#onEvent?.({ type: "ended", claim, reason, heldMs });
    return this.#hooks.left(claim, from, reason) ?? FREED;
  }

  /** Renews a holder's lease: its deadline moves to now + ttl. */
  renew(claim: Claim<X>): void {
    if (claim.state !== "holding" || claim.request.ttl === undefined) return;
    // The heap keeps the old, earlier key; the timer files the claim again when it comes up.
    claim.deadline = this.#clock.now() + claim.request.ttl * 1000;
  }

  /** Stops the timer; every later request is refused. The store ends the claims itself. */
  close(): void {
    this.#closed = true;
    this.#clock.clear(this.#timer);
    this.#timer = undefined;
    this.#timerAt = Infinity;
  }

  // --- Internals

  /** Takes a live claim out of its entry's set (and off the heap); returns the entry. */
  #detach(claim: Claim<X>): BookEntry<X> | undefined {
    const entry = claim.entry;
    if (entry === undefined) return undefined; // refused before it was filed
    if (claim.state === "pending") {
      entry.pending.delete(claim);
    } else if (claim.state === "waiting") {
      entry.waiters.splice(entry.waiters.indexOf(claim), 1);
      this.#waiting--;
    } else if (claim.state === "holding") {
      entry.holders.delete(claim);
      this.#held--;
    }
    this.#heap.remove(claim);
    claim.deadline = Infinity;
    return entry;
  }

  /** A live claim is over: out of its entry (the entry goes when empty), state `done`. */
  #finish(claim: Claim<X>): void {
    const entry = this.#detach(claim);
    claim.state = "done";
    if (entry === undefined) return;
    if (entry.idle < 0 && isEmpty(entry)) {
      // Kept idle (see the module doc); swept later, or now when there are too many.
      entry.idle = this.#round;
      if (++this.#idle > MIN_IDLE_KEPT && this.#idle > this.#entries.size - this.#idle) {
        this.#sweep(true);
      }
    }
  }

  /**
   * Deletes idle entries: every one (`all`), or those idle since before the last sweep (a name
   * in use keeps its entry).
   */
  #sweep(all: boolean): void {
    for (const [name, entry] of this.#entries) {
      if (entry.idle >= 0 && (all || entry.idle < this.#round)) {
        this.#entries.delete(name);
        this.#idle--;
      }
    }
    this.#round++;
    this.#sweepAt = this.#clock.now() + SWEEP_MS;
  }

  #timeOut(claim: Claim<X>, tellStore: boolean): void {
    const from = claim.state;
    const now = this.#clock.now();
    this.#finish(claim);
    this.counters.timedOut++;
    this.#onEvent?.({ type: "timeout", claim, waitedMs: now - claim.requestedAt });
    this.#note(claim, TIMED_OUT, 0);
    if (tellStore) this.#tellLeft(claim, from, "timeout");
  }

  #expire(claim: Claim<X>, tellStore: boolean): void {
    const now = this.#clock.now();
    this.#finish(claim);
    this.counters.expired++;
    this.#onEvent?.({ type: "ended", claim, reason: "expired", heldMs: now - claim.grantedAt });
    this.#note(claim, EXPIRED, 0);
    if (tellStore) this.#tellLeft(claim, "holding", "expired");
  }

  #tellLeft(claim: Claim<X>, from: ClaimState, reason: EndReason): void {
    const done = this.#hooks.left(claim, from, reason);
    // The store reports its own failures; nothing waits for this one.
    if (done !== undefined) done.catch(() => {});
  }

  // The deadlines: one timer, armed for the earliest one.

  #setDeadline(claim: Claim<X>, at: number): void {
    claim.deadline = at;
    this.#heap.remove(claim);
    this.#heap.insert(claim, at);
    if (at < this.#timerAt) this.#arm(at);
  }

  #arm(at: number): void {
    if (this.#closed) return;
    this.#clock.clear(this.#timer);
    this.#timerAt = at;
    this.#timer = this.#clock.setTimer(() => this.#fire(), Math.ceil(at - this.#clock.now()));
  }

  #fire(): void {
    this.#timer = undefined;
    this.#timerAt = Infinity;
    const now = this.#clock.now();
    for (;;) {
      const claim = this.#heap.peek();
      if (claim === undefined || claim.heapKey > now) break;
      this.#heap.remove(claim);
      if (claim.deadline > now) {
        // Renewed since it was filed: file it again under its current deadline.
        this.#heap.insert(claim, claim.deadline);
        continue;
      }
      if (claim.state === "holding") this.#expire(claim, true);
      else this.#timeOut(claim, true);
    }
    const next = this.#heap.peek();
    if (next !== undefined) this.#arm(next.heapKey);
  }

  // The outbox: outcomes reach handlers after the store's call has returned.

  #note(claim: Claim<X>, note: Note, arg: unknown): void {
    const box = this.#outbox;
    const n = this.#outboxLength;
    box[n] = claim;
    box[n + 1] = note;
    box[n + 2] = arg;
    this.#outboxLength = n + 3;
    if (!this.#flushing) {
      this.#flushing = true;
      queueMicrotask(this.#flushNow);
    }
  }

  #flush(): void {
    // Handlers may cause more notes (a session that ends its claim): they go to a new batch.
    const box = this.#outbox;
    const length = this.#outboxLength;
    this.#outbox = this.#spare;
    this.#outboxLength = 0;
    this.#flushing = false;
    for (let i = 0; i < length; i += 3) {
      const claim = box[i] as Claim<X>;
      const arg = box[i + 2];
      // Nothing is kept alive by a delivered note.
      box[i] = box[i + 2] = undefined;
      if (claim.closed) continue;
      const h = claim.handler;
      try {
        switch (box[i + 1] as Note) {
          case GRANTED:
            h.granted(arg as number);
            break;
          case QUEUED: {
            const p = claim.positionDue;
            claim.positionDue = 0;
            if (claim.state === "waiting" && p > 0) h.queued(p);
            break;
          }
          case NOT_GRANTED:
            h.notGranted();
            break;
          case REFUSED:
            h.refused(arg as Refusal);
            break;
          case TIMED_OUT:
            h.timedOut();
            break;
          case EXPIRED:
            h.expired();
            break;
        }
      } catch (err) {
        // A handler's failure is its own; the others still hear their outcomes.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
    // Its turn is over: the next delivery's notes go into it (a huge batch's array is let go).
    if (box.length > 3 * 1024) box.length = 0;
    this.#spare = box;
  }
}
