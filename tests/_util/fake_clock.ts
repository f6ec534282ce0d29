/**
 * A fake clock for store tests: time moves only when a test says so, and timers fire in order.
 *
 * @module
 */

import { setImmediate } from "node:timers";
import type { Clock, TimerHandle } from "../../lib/store/clock.ts";

/** Runs every pending microtask (and the promise chains they start) before going on. */
export function flush(): Promise<void> {
  // One turn of the event loop: everything queued as a microtask before it has run by then.
  return new Promise((resolve) => setImmediate(resolve));
}

/** A {@linkcode Clock} that moves only on {@linkcode FakeClock.advance}. */
export class FakeClock implements Clock {
  #now: number;
  #wallOffset: number;
  #seq = 0;
  readonly #timers = new Map<number, { at: number; fn: () => void }>();

  constructor(start = 1000, wallStart = 1_700_000_000_000) {
    this.#now = start;
    this.#wallOffset = wallStart - start;
  }

  now(): number {
    return this.#now;
  }

  wallNow(): number {
    return this.#now + this.#wallOffset;
  }

  setTimer(fn: () => void, ms: number): TimerHandle {
    const id = ++this.#seq;
    this.#timers.set(id, { at: this.#now + Math.max(0, ms), fn });
    return id;
  }

  clear(handle: TimerHandle | undefined): void {
    if (typeof handle === "number") this.#timers.delete(handle);
  }

  /** Timers not yet fired. */
  get pending(): number {
    return this.#timers.size;
  }

  /** The time of the earliest timer, or undefined. */
  get nextAt(): number | undefined {
    let at: number | undefined;
    for (const t of this.#timers.values()) if (at === undefined || t.at < at) at = t.at;
    return at;
  }

  /**
   * Moves time forward by `ms`, firing every timer that comes due on the way, in order, each
   * at its own time and followed by a {@linkcode flush}.
   */
  async advance(ms: number): Promise<void> {
    const target = this.#now + ms;
    await flush();
    for (;;) {
      let nextId: number | undefined;
      let next: { at: number; fn: () => void } | undefined;
      for (const [id, t] of this.#timers) {
        if (t.at <= target && (next === undefined || t.at < next.at)) {
          next = t;
          nextId = id;
        }
      }
      if (next === undefined) break;
      this.#timers.delete(nextId!);
      this.#now = Math.max(this.#now, next.at);
      next.fn();
      await flush();
    }
    this.#now = target;
    await flush();
  }
}
