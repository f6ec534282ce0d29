/**
 * Who holds a lock, for a person: `"db-migrate" is held by cron-1 (10.0.3.7) for 2m14s; 3
 * waiting`, from a `.locks` entry. Used by do.ts and `client.ts hold` when a lock is not granted
 * and while they wait.
 *
 * This file is imported by URL through `client.ts`'s command line: it imports only types.
 *
 * @module
 */

import type { HolderInfo, LockInfo } from "./protocol.ts";

/**
 * A duration as people say it: `850ms`, `42s`, `2m14s`, `3h05m`, `2d04h`.
 *
 * @param ms milliseconds (negative counts as 0)
 * @returns the short text
 */
export function formatDuration(ms: number): string {
  if (!(ms > 0)) ms = 0;
  if (ms < 1000) return `${Math.floor(ms)}ms`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d${String(h % 24).padStart(2, "0")}h`;
}

/** `cron-1 (10.0.3.7)`, or `10.0.3.7:51234` for a holder without a client id. */
function who(holder: HolderInfo): string {
  const ip = holder.remote.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
  return holder.client_id ? `${holder.client_id} (${ip})` : `${holder.remote} (no client id)`;
}

/**
 * Describes who holds lock `name`, from the `.locks` reply, at time `now`:
 * `"db-migrate" is held by cron-1 (10.0.3.7) for 2m14s; 3 waiting`. Several holders (a
 * semaphore, shared holders) are listed, oldest first, at most three. `undefined` when `.locks`
 * shows nobody holding it (it was freed meanwhile).
 *
 * @example
 * ```ts
 * import { describeHolders } from "./holders.ts";
 * const text = describeHolders("db", [{
 *   name: "db", limit: 1, waiting: 3,
 *   holders: [{ client_id: "cron-1", token: 7, since: "2026-01-01T00:00:00Z", remote: "10.0.3.7:4000" }],
 * }], Date.parse("2026-01-01T00:02:14Z"));
 * console.log(text); // "db" is held by cron-1 (10.0.3.7) for 2m14s; 3 waiting
 * ```
 *
 * @param name the lock
 * @param locks the `.locks` reply
 * @param now the current time, in milliseconds since the epoch
 * @returns the sentence, or `undefined`
 */
export function describeHolders(
  name: string,
  locks: readonly LockInfo[],
  now: number = Date.now(),
): string | undefined {
  const lock = locks.find((l) => l.name === name);
  if (lock === undefined || lock.holders.length === 0) return undefined;
  const parts = lock.holders.slice(0, 3).map((h) => {
    const since = Date.parse(h.since);
    return `${who(h)}${Number.isFinite(since) ? ` for ${formatDuration(now - since)}` : ""}`;
  });
  if (lock.holders.length > 3) parts.push(`${lock.holders.length - 3} more`);
  const holders = lock.holders.length === 1 ? parts[0] : parts.join(", ");
  return `"${name}" is held by ${holders}; ${lock.waiting} waiting`;
}
