/**
 * The memory store: the locks live in this process. Its queues are the claim book's own lists
 * (this server sees every claim), its deadlines are the book's, its tokens come from a
 * {@linkcode TokenSource} (the clock, and a high-water mark file with `--state-file`).
 *
 * @module
 */

import { getLogger } from "../log.ts";
import { ErrorReason, type LockInfo } from "../protocol.ts";
import { TokenSequence, type TokenSource } from "../tokens.ts";
import { BookStore } from "./book_store.ts";
import { type Clock, systemClock, type TimerHandle } from "./clock.ts";
import type { BookEntry, Claim, ClaimBookOptions } from "./claim_book.ts";
import { conflicts, countByMode, fits, join, modeOf } from "./rules.ts";
import {
  type ClaimHandler,
  type ClaimRequest,
  type ClaimView,
  type LockDetail,
  STORE_UNAVAILABLE,
} from "./types.ts";

/** Options of a {@linkcode MemoryStore}. */
export interface MemoryStoreOptions extends ClaimBookOptions {
  /** Where fencing tokens come from (default: a clock-seeded {@linkcode TokenSequence}). */
  tokens?: TokenSource;
}

const log = getLogger(["tcpnetlock", "store"]);

/**
 * Waiters that moved up are told their positions at most this often (ms). Departures arrive one
 * read at a time: telling positions after each was a pass over the whole queue and an outbox
 * entry per waiter per departure, quadratic in the queue (3,000 waiters closing at once made some
 * 200 MB of garbage, bench `flood`). A connection sends at most one position line per 50 ms.
 */
const POSITIONS_EVERY_MS = 10;

/**
 * The in-memory lock store.
 *
 * @example
 * ```ts
 * import { MemoryStore } from "./memory_store.ts";
 * const store = new MemoryStore();
 * await store.start();
 * const claim = store.acquire(
 *   { name: "db", limit: 1, wait: 0, clientId: "", remote: "127.0.0.1:1" },
 *   {
 *     granted: (t) => console.log("token", t),
 *     queued() {}, notGranted() {}, refused() {}, timedOut() {}, expired() {},
 *   },
 * );
 * await store.end(claim, "released");
 * await store.close();
 * ```
 */
export class MemoryStore extends BookStore<undefined> {
  readonly #tokens: TokenSource;
  /** Names whose waiters moved up: told their positions once, after the current call. */
  readonly #moved = new Set<string>();
  #moveTimer: TimerHandle | undefined;
  readonly #clock: Clock;

  constructor(options: MemoryStoreOptions = {}) {
    super(options);
    this.#tokens = options.tokens ?? new TokenSequence();
    this.#clock = options.clock ?? systemClock;
  }

  protected left(claim: Claim<undefined>): void {
    this.#handOver(claim.request.name);
  }

  /** Reserves the first block of tokens, so that an unwritable state file shows at start-up. */
  start(): Promise<void> {
    this.#tokens.prepare?.();
    return Promise.resolve();
  }

  close(): Promise<void> {
    for (const claim of this.book.live()) this.book.end(claim, "shutdown");
    this.#clock.clear(this.#moveTimer);
    this.#moveTimer = undefined;
    this.#moved.clear();
    this.book.close();
    return Promise.resolve();
  }

  /**
   * Checks in protocol order: `--max-locks` for a new name (the book), limit mismatch, then
   * grant, or queue (`--max-waiters`), or not-granted.
   */
  acquire(request: ClaimRequest, handler: ClaimHandler): ClaimView {
    const book = this.book;
    const claim = book.open(request, handler, undefined);
    if (claim.state !== "pending") return claim;
    const entry = claim.entry!;
    const other = first(entry);
    if (other !== undefined && conflicts(request, other.request)) {
      book.refuse(claim, ErrorReason.LIMIT_MISMATCH);
    } else if (entry.waiters.length === 0 && fits(book.group(entry), request)) {
      // Granted in the call that opened it: at its request time (no clock read).
      this.#grant(claim, claim.requestedAt);
    } else {
      book.queue(claim, entry.waiters.length + 1);
    }
    return claim;
  }

  settled(): Promise<void> {
    return Promise.resolve();
  }

  /** What `.locks` shows: every name held or waited on. */
  snapshot(): LockInfo[] {
    const out: LockInfo[] = [];
    for (const entry of this.book.entries()) {
      const any = first(entry);
      if (any === undefined) continue;
      out.push({
        name: entry.name,
        limit: any.request.limit,
        waiting: entry.waiters.length,
        ...countByMode(entry.waiters.map((c) => c.request)),
        holders: [...entry.holders].map((c) => ({
          client_id: c.request.clientId,
          token: c.token,
          since: new Date(c.grantedWall).toISOString(),
          remote: c.request.remote,
          mode: modeOf(c.request),
        })),
      });
    }
    return out;
  }

  names(): Iterable<string> {
    return Array.from(this.book.entries(), (e) => e.name);
  }

  detail(name: string, maxQueue: number): LockDetail | undefined {
    const entry = this.book.entry(name);
    const any = entry === undefined ? undefined : first(entry);
    if (entry === undefined || any === undefined) return undefined;
    return {
      name,
      limit: any.request.limit,
      waiting: entry.waiters.length,
      holders: [...entry.holders].map((c) => ({
        client_id: c.request.clientId,
        token: c.token,
        since: new Date(c.grantedWall).toISOString(),
        remote: c.request.remote,
        mode: modeOf(c.request),
        expires: this.wallOf(c.deadline),
      })),
      queue: entry.waiters.slice(0, maxQueue).map((c, i) => ({
        position: i + 1,
        client_id: c.request.clientId,
        remote: c.request.remote,
        mode: modeOf(c.request),
        since: new Date(this.wallOf(c.requestedAt) ?? 0).toISOString(),
        gives_up: this.wallOf(c.deadline),
      })),
    };
  }

  /** Takes the token first: a state file that cannot be written refuses the claim. */
  #grant(claim: Claim<undefined>, at?: number): boolean {
    let token: number;
    try {
      token = this.#tokens.next();
    } catch (err) {
      log.error("Cannot hand out a fencing token for lock {lock}: {error}", {
        event: "token_failed",
        lock: claim.request.name,
        error: err instanceof Error ? err.message : String(err),
      });
      this.book.refuse(claim, STORE_UNAVAILABLE);
      return false;
    }
    this.book.grant(claim, token, at);
    return true;
  }

  /** A claim left `name`: grant the head of the queue while it fits, then tell positions. */
  #handOver(name: string): void {
    const entry = this.book.entry(name);
    if (entry === undefined) return;
    const group = this.book.group(entry);
    while (entry.waiters.length > 0 && fits(group, entry.waiters[0].request)) {
      const next = entry.waiters[0];
      if (this.#grant(next)) join(group, next.request);
    }
    if (entry.waiters.length === 0) return;
    this.#moved.add(name);
    this.#moveTimer ??= this.#clock.setTimer(() => this.#tellPositions(), POSITIONS_EVERY_MS);
  }

  #tellPositions(): void {
    this.#moveTimer = undefined;
    for (const name of this.#moved) {
      const waiters = this.book.entry(name)?.waiters ?? [];
      for (let i = 0; i < waiters.length; i++) this.book.position(waiters[i], i + 1);
    }
    this.#moved.clear();
  }
}

/** Any claim holding or waiting on the entry's name (they all have the same limit here, and a
 * shared one's limit is 1). */
function first(entry: BookEntry<undefined>): Claim<undefined> | undefined {
  return entry.holders.first() ?? entry.waiters[0];
}
