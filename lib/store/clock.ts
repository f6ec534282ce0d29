/**
 * The clock a store runs on: monotonic and wall time, and timers. Stores take one so that their
 * tests can run on a fake clock, deterministically and fast.
 *
 * @module
 */

/** A timer handle (opaque: the real clock's and a fake clock's differ). */
export type TimerHandle = unknown;

/** Time and timers. */
export interface Clock {
  /** Monotonic milliseconds. */
  now(): number;
  /** Wall clock milliseconds since the epoch. */
  wallNow(): number;
  /** Calls `fn` once, `ms` milliseconds from now; returns a handle for {@linkcode Clock.clear}. */
  setTimer(fn: () => void, ms: number): TimerHandle;
  /** Cancels a timer (a handle that already fired or was cleared is ignored). */
  clear(handle: TimerHandle | undefined): void;
}

/** setTimeout cannot wait longer than this; a later deadline is set again when it fires. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * The real clock: `performance.now()`, `Date.now()` and `setTimeout`.
 *
 * @example
 * ```ts
 * import { systemClock } from "./clock.ts";
 * const t = systemClock.setTimer(() => console.log("later"), 10);
 * systemClock.clear(t);
 * ```
 */
export const systemClock: Clock = {
  now: () => performance.now(),
  wallNow: () => Date.now(),
  setTimer: (fn, ms) => setTimeout(fn, Math.min(MAX_TIMER_MS, Math.max(0, ms))),
  clear: (handle) => {
    if (handle !== undefined) clearTimeout(handle as ReturnType<typeof setTimeout>);
  },
};
