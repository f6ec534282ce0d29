/**
 * The grant rules, in one place for both stores. A name's claims form one queue in arrival
 * order (the memory store's list; the etcd store's keys by revision). The holders are always a
 * prefix of it: a claim is granted only when everything ahead of it holds and it fits beside
 * them. So nobody overtakes a waiter, and a claim never holds beside a claim of another limit.
 *
 * @module
 */

/** What the rules look at in a claim. */
export interface Ranked {
  /** How many may hold the name at once. */
  readonly limit: number;
}

/** The holders at the head of a queue, as the rules see them. */
export interface HolderGroup {
  /** How many hold. */
  count: number;
  /** Their limit (that of the first holder). */
  limit: number;
}

/** An empty group: the first claim of a queue always fits. */
export function emptyGroup(): HolderGroup {
  return { count: 0, limit: 0 };
}

/** Can `next` hold beside `group` (everything ahead of it)? */
export function fits(group: HolderGroup, next: Ranked): boolean {
  if (group.count === 0) return true;
  return next.limit === group.limit && group.count < group.limit;
}

/** Adds `next` to the group (after {@linkcode fits} said yes). */
export function join(group: HolderGroup, next: Ranked): void {
  if (group.count === 0) group.limit = next.limit;
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
 * ```
 */
export function holdingPrefix(queue: readonly Ranked[]): number {
  const group = emptyGroup();
  let i = 0;
  while (i < queue.length && fits(group, queue[i])) join(group, queue[i++]);
  return i;
}

/** Does a request conflict with a claim already on the name (`err,limit mismatch`)? */
export function conflicts(request: Ranked, other: Ranked): boolean {
  return request.limit !== other.limit;
}
