/**
 * Giving memory back after a surge of connections.
 *
 * A flood of connections (thousands idle, thousands waiting) grows V8's heap by tens of MB, and
 * once they are gone the garbage stays: V8 collects when the program allocates, and an idle
 * server allocates nothing, so its resident memory stayed at the flood's peak (152 MB after the
 * benchmark's floods, 74 MB once collected). The server watches its open connections; when they
 * fall to a quarter of a peak of at least {@linkcode SURGE_MIN} connections, it runs one full
 * collection ({@linkcode collectGarbage}), and V8 returns the emptied pages to the system.
 *
 * @example
 * ```ts
 * import { collectGarbage } from "./memory.ts";
 * await collectGarbage(); // false when the runtime offers no way to collect
 * ```
 *
 * @module
 */

/** The smallest peak of open connections that counts as a surge. */
export const SURGE_MIN = 1000;

let gc: (() => void) | null | undefined;

/**
 * Runs a full garbage collection now: V8 collects twice and compacts (after the benchmark's
 * floods, 50-80 ms for a heap of 60 MB). Uses `gc` when the process was started with
 * `--v8-flags=--expose-gc`, else turns that flag on; false when neither works.
 */
export async function collectGarbage(): Promise<boolean> {
  gc ??= await findGc();
  if (gc === null) return false;
  gc();
  return true;
}

async function findGc(): Promise<(() => void) | null> {
  const exposed = (globalThis as { gc?: unknown }).gc;
  if (typeof exposed === "function") return exposed as () => void;
  try {
    // The flag exposes `gc` to contexts made after it is set: one small context is enough.
    const v8 = await import("node:v8");
    const vm = await import("node:vm");
    v8.setFlagsFromString("--expose-gc");
    const fn = vm.runInNewContext("gc");
    return typeof fn === "function" ? fn : null;
  } catch {
    return null;
  }
}

/**
 * Follows the number of open connections: {@linkcode SurgeWatch.opened} on every new one,
 * {@linkcode SurgeWatch.isOver} on the server's watchdog tick.
 *
 * @example
 * ```ts
 * import { SurgeWatch } from "./memory.ts";
 * const surge = new SurgeWatch();
 * surge.opened(3000);
 * surge.isOver(12); // 3000 (the peak): time to collect; then 0 until the next surge
 * ```
 */
export class SurgeWatch {
  #peak = 0;

  /** A connection was opened: `open` are open now. */
  opened(open: number): void {
    if (open > this.#peak) this.#peak = open;
  }

  /**
   * The peak of the surge that is over now (`open` at most a quarter of it, and the peak at
   * least {@linkcode SURGE_MIN}), or 0; the next surge is measured from `open`.
   */
  isOver(open: number): number {
    const peak = this.#peak;
    if (peak < SURGE_MIN || open * 4 > peak) return 0;
    this.#peak = open;
    return peak;
  }
}
