/**
 * What both stores share besides the claim book itself: the parts of {@linkcode LockStore} that
 * only read or forward to the book. A store extends it and adds where its state lives.
 *
 * @module
 */

import type { LockInfo } from "../protocol.ts";
import { type Claim, ClaimBook, type ClaimBookOptions } from "./claim_book.ts";
import type {
  ClaimHandler,
  ClaimRequest,
  ClaimState,
  ClaimView,
  EndReason,
  LockDetail,
  LockStore,
  StoreCounters,
} from "./types.ts";

/**
 * A lock store built on a {@linkcode ClaimBook}.
 *
 * @example
 * ```ts ignore
 * class MyStore extends BookStore<undefined> {
 *   protected left() {}
 *   // acquire, snapshot, settled, start, close ...
 * }
 * ```
 */
export abstract class BookStore<X> implements LockStore {
  /** The book the store keeps its claims in. */
  protected readonly book: ClaimBook<X>;

  /** @param options the book's options (clock, limits, events) */
  constructor(options: ClaimBookOptions) {
    const onEvent = options.onEvent;
    this.book = new ClaimBook<X>({ left: (c, from, why) => this.left(c, from, why) }, {
      ...options,
      onEvent: (event) => {
        onEvent?.(event);
        if (this.#watchers.size > 0) this.changed(event.claim.request.name);
      },
    });
  }

  readonly #watchers = new Set<(name: string) => void>();

  /** Tells the watchers (the live page) that `name` may have changed. */
  protected changed(name: string): void {
    for (const w of this.#watchers) w(name);
  }

  watch(listener: (name: string) => void): () => void {
    // A wrapper per call: the same listener may watch twice.
    const w = (name: string) => listener(name);
    this.#watchers.add(w);
    return () => {
      this.#watchers.delete(w);
    };
  }

  /** Wall-clock ms of a monotonic deadline of the book's clock (undefined: none). */
  protected wallOf(deadline: number): number | undefined {
    if (!Number.isFinite(deadline)) return undefined;
    const clock = this.book.clock;
    return Math.round(clock.wallNow() + (deadline - clock.now()));
  }

  /**
   * A claim left (see {@linkcode BookHooks.left}): the store frees it where it lives; the
   * promise resolves once it is free there.
   */
  protected abstract left(
    claim: Claim<X>,
    from: ClaimState,
    reason: EndReason,
  ): Promise<void> | void;

  abstract acquire(request: ClaimRequest, handler: ClaimHandler): ClaimView;
  abstract snapshot(): LockInfo[];
  abstract names(): Iterable<string>;
  abstract detail(name: string, maxQueue: number): LockDetail | undefined;
  abstract settled(): Promise<void>;
  abstract start(): Promise<void>;
  abstract close(): Promise<void>;

  /** Counters since the store was made. */
  get counters(): Readonly<StoreCounters> {
    return this.book.counters;
  }

  /** Names held by this server's claims. */
  get heldNames(): number {
    return this.book.heldNames;
  }

  /** This server's holders. */
  get holders(): number {
    return this.book.holders;
  }

  /** This server's waiters. */
  get waiting(): number {
    return this.book.waiting;
  }

  /** Tokens handed out: one per grant. */
  get tokensIssued(): number {
    return this.book.counters.acquired;
  }

  /** Names this server's claims hold, wait on or ask for. */
  get size(): number {
    return this.book.size;
  }

  end(claim: ClaimView, reason: EndReason): Promise<void> {
    return this.book.end(claim as Claim<X>, reason);
  }

  renew(claim: ClaimView): void {
    this.book.renew(claim as Claim<X>);
  }

  oldestGrant(): number | undefined {
    return this.book.oldestGrant();
  }
}
