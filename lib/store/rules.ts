/**
 * The grant rules, in one place for both stores. A name's claims form one queue in arrival
 * order (the memory store's list; the etcd store's keys by revision). The holders are always a
 * prefix of it: a claim is granted only when everything ahead of it holds and it fits beside
 * them. So nobody overtakes a waiter, and a claim never holds beside a claim of another limit.
 *
 * Modes (`mode:shared|exclusive`, a readers–writer lock): shared claims fit beside shared
 * holders, however many; an exclusive claim of limit 1 fits beside none. Both modes share the
 * one queue: a reader that arrives after a waiting writer queues behind it (the writer is never
 * starved), and a run of shared claims at the head holds together.
 *
 * @module
 */

import { LOCK_MODES, type LockMode } from "../protocol.ts";

/** What the rules look at in a claim. */
export interface Ranked {
  /** How many may hold the name at once. */
  readonly limit: number;
  /** Its mode; undefined means exclusive. */
  readonly mode?: LockMode;
}

/** Does the claim ask for a shared hold? */
export function isShared(r: Ranked): boolean {
  return r.mode === "shared";
}

/** The holders at the head of a queue, as the rules see them. */
export interface HolderGroup {
  /** How many hold. */
  count: number;
  /** Their limit (that of the first holder). */
  limit: number;
  /** They all hold shared. */
  shared: boolean;
}

/** An empty group: the first claim of a queue always fits. */
export function emptyGroup(): HolderGroup {
  return { count: 0, limit: 0, shared: false };
}

/**
 * Can `next` hold beside `group` (everything ahead of it)? Shared fits shared holders (any
 * number); otherwise it takes the same limit and room below it.
 *
 * @example
 * ```ts
 * import { emptyGroup, fits, join } from "./rules.ts";
 * const g = emptyGroup();
 * join(g, { limit: 1, mode: "shared" });
 * fits(g, { limit: 1, mode: "shared" }); // true
 * fits(g, { limit: 1, mode: "exclusive" }); // false
 * ```
 */
export function fits(group: HolderGroup, next: Ranked): boolean {
  if (group.count === 0) return true;
  if (next.limit !== group.limit) return false;
  if (isShared(next) || group.shared) return isShared(next) && group.shared;
  return group.count < group.limit;
}

/** Adds `next` to the group (after {@linkcode fits} said yes). */
export function join(group: HolderGroup, next: Ranked): void {
  if (group.count === 0) {
    group.limit = next.limit;
    group.shared = isShared(next);
  } else if (!isShared(next)) {
    group.shared = false;
  }
  group.count++;
}

/**
 * How many claims at the head of `queue` may hold at once: the holders' prefix. A queue whose
 * head has mixed limits (only the etcd store can see one, for a moment) holds only up to the
 * first claim that does not fit: nobody is granted across mixed limits.
 *
 * @example
 * ```ts
 * import { holdingPrefix } from "./rules.ts";
 * holdingPrefix([{ limit: 2 }, { limit: 2 }, { limit: 2 }]); // 2
 * holdingPrefix([{ limit: 3 }, { limit: 1 }]); // 1
 * holdingPrefix([{ limit: 1, mode: "shared" }, { limit: 1, mode: "shared" }, { limit: 1 }]); // 2
 * ```
 */
export function holdingPrefix(queue: readonly Ranked[]): number {
  const group = emptyGroup();
  let i = 0;
  while (i < queue.length && fits(group, queue[i])) join(group, queue[i++]);
  return i;
}

/**
 * Does a request conflict with a claim already on the name (`err,limit mismatch`)? Another
 * limit does; so does a shared claim beside a claim of limit N > 1, either way round (a valid
 * shared request has limit 1, so that is another limit too).
 */
export function conflicts(request: Ranked, other: Ranked): boolean {
  if (request.limit !== other.limit) return true;
  return (isShared(request) && other.limit > 1) || (isShared(other) && request.limit > 1);
}

/**
 * Is this mode allowed with this limit? `mode:shared` takes no limit above 1
 * (`err,invalid mode`).
 */
export function modeFitsLimit(mode: LockMode | undefined, limit: number): boolean {
  return mode !== "shared" || limit <= 1;
}

/**
 * A request's `mode:` value (undefined when it has none) read with its limit: the mode, or
 * `null` for `err,invalid mode` (not `shared`/`exclusive`, or `shared` with a limit above 1).
 */
export function parseMode(text: string | undefined, limit: number): LockMode | undefined | null {
  if (text === undefined) return undefined;
  if (!(LOCK_MODES as readonly string[]).includes(text)) return null;
  return modeFitsLimit(text as LockMode, limit) ? text as LockMode : null;
}

/** Counts the waiters of a queue by mode (for `.locks`). */
export function countByMode(
  queue: Iterable<Ranked>,
): { waiting_shared: number; waiting_exclusive: number } {
  let shared = 0, exclusive = 0;
  for (const r of queue) {
    if (isShared(r)) shared++;
    else exclusive++;
  }
  return { waiting_shared: shared, waiting_exclusive: exclusive };
}

/** The mode a claim holds with, as `.locks` shows it. */
export function modeOf(r: Ranked): LockMode {
  return isShared(r) ? "shared" : "exclusive";
}
