/**
 * The store layer's contract: what a connection asks a lock store for, how the store answers,
 * and the read-only view of a claim that sessions, logs and metrics see. Both stores (memory and
 * etcd) implement {@linkcode LockStore}; a session never knows which one it talks to.
 *
 * @module
 */

import type { HolderInfo, LockInfo } from "../protocol.ts";

/**
 * The refusal of a store that cannot do its part right now: the etcd store while etcd is
 * unreachable or its lease is lost, the memory store when its state file cannot be written.
 * Answered as `err,store unavailable`.
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

/**
 * Where a claim is: `pending` while the store decides (the etcd store's transaction is out),
 * `waiting` in the queue, `holding` the lock, `done` once it is over.
 */
export type ClaimState = "pending" | "waiting" | "holding" | "done";

/**
 * What a store tells the owner of a claim. Calls come asynchronously (never inside a store
 * call), in order, and stop once the owner has ended the claim. Every method is called at most
 * once per claim, except `queued`.
 */
export interface ClaimHandler {
  /** The claim holds the lock now, with this fencing token. */
  granted(token: number): void;
  /** The claim waits; `position` 1 is next in line. Called again whenever it gets smaller. */
  queued(position: number): void;
  /** Taken and no wait was asked for: the claim is over. */
  notGranted(): void;
  /** Refused by a check (limit mismatch, a store limit, the store unavailable): it is over. */
  refused(reason: Refusal): void;
  /** The wait ran out: the claim left the queue and is over. */
  timedOut(): void;
  /** The lease ran out (or the store lost the lock): the lock was taken away; it is over. */
  expired(): void;
}

/** What a connection asks for. */
export interface ClaimRequest {
  /** The lock name (already validated). */
  readonly name: string;
  /** How many may hold the name at once. */
  readonly limit: number;
  /** `shared` holds beside other shared holders; undefined means exclusive. */
  readonly mode?: "shared" | "exclusive";
  /** Seconds to wait in the queue; 0 means try once. */
  readonly wait: number;
  /** Lease in seconds; undefined means none. */
  readonly ttl?: number;
  /** The client id, `""` when none was given. */
  readonly clientId: string;
  /** The peer as `ip:port`. */
  readonly remote: string;
}

/** A read-only view of one request's life in a store. */
export interface ClaimView {
  /** What was asked for. */
  readonly request: ClaimRequest;
  /** Where the claim is. */
  readonly state: ClaimState;
  /** The fencing token, once granted (0 before). */
  readonly token: number;
  /** Monotonic ms when the request arrived. */
  readonly requestedAt: number;
  /** Monotonic ms of the grant (0 before). */
  readonly grantedAt: number;
  /** Wall clock ms of the grant (0 before). */
  readonly grantedWall: number;
}

/** A notice for logs and metrics. */
export type StoreEvent =
  | { type: "granted"; claim: ClaimView; waitedMs: number }
  | { type: "queued"; claim: ClaimView; position: number }
  | { type: "not_granted"; claim: ClaimView }
  | { type: "refused"; claim: ClaimView; reason: Refusal }
  | { type: "timeout"; claim: ClaimView; waitedMs: number }
  | { type: "ended"; claim: ClaimView; reason: EndReason; heldMs: number };

/** Counters since a store was made (this server's requests). */
export interface StoreCounters {
  /** Grants. */
  acquired: number;
  /** `not-granted` answers. */
  notGranted: number;
  /** Waits that ran out. */
  timedOut: number;
  /** Leases that ran out (and locks the store lost). */
  expired: number;
  /** Refusals (limit mismatch, store limits, store unavailable). */
  refused: number;
}

/** One holder of a name, as the live page shows it. */
export interface HolderDetail extends HolderInfo {
  /** Wall-clock ms at which its lease (`ttl`) runs out, when this server knows it. */
  expires?: number;
}

/** One waiter of a name, as the live page shows it. */
export interface WaiterDetail {
  /** Its place in the queue, 1 = next in line. */
  position: number;
  /** The client id, `""` when none was given. */
  client_id: string;
  /** The waiter's address as its server saw it. */
  remote: string;
  /** What it asks for: `shared` (a reader) or `exclusive`. */
  mode?: "shared" | "exclusive";
  /** When it started to wait, ISO 8601 in UTC. */
  since: string;
  /** Wall-clock ms at which its wait runs out, when this server knows it. */
  gives_up?: number;
}

/** One name's holders and the head of its queue, for the live page (`GET /events`). */
export interface LockDetail {
  /** The lock name. */
  name: string;
  /** How many may hold it at once. */
  limit: number;
  /** How many wait (all of them, also those past `queue`). */
  waiting: number;
  /** Who holds it, in grant order. */
  holders: HolderDetail[];
  /** The first waiters, in queue order. */
  queue: WaiterDetail[];
}

/**
 * The promise {@linkcode LockStore.end} returns when the lock was already free in the store when
 * `end` returned (the memory store, or a claim that was over): a caller may answer at once
 * instead of a promise step later.
 *
 * @example
 * ```ts
 * import { FREED } from "./types.ts";
 * await FREED; // already resolved
 * ```
 */
export const FREED: Promise<void> = Promise.resolve();

/**
 * A lock store: where the locks live (this process's memory, or etcd) and when they change.
 * Both stores keep a claim's life in one shared claim book, so they answer alike.
 *
 * @example Take and release a lock in a memory store
 * ```ts
 * import { MemoryStore } from "./memory_store.ts";
 * import type { LockStore } from "./types.ts";
 * const store: LockStore = new MemoryStore();
 * await store.start();
 * const claim = store.acquire(
 *   { name: "db", limit: 1, wait: 0, clientId: "", remote: "127.0.0.1:1" },
 *   {
 *     granted: (token) => console.log("token", token),
 *     queued() {}, notGranted() {}, refused() {}, timedOut() {}, expired() {},
 *   },
 * );
 * await store.end(claim, "released");
 * await store.close();
 * ```
 */
export interface LockStore {
  /** Asks for a lock; the outcome goes to `handler`, asynchronously. */
  acquire(request: ClaimRequest, handler: ClaimHandler): ClaimView;
  /**
   * Ends a claim that is pending, waiting or holding (release, disconnect, shutdown); nothing
   * more reaches its handler. Resolves once the lock is free in the store (a `released` reply
   * waits for it). Ending a claim that is over does nothing. Returns {@linkcode FREED} when the
   * lock is free already.
   */
  end(claim: ClaimView, reason: EndReason): Promise<void>;
  /** Renews a holder's lease (`ttl`): any line from the holder does. */
  renew(claim: ClaimView): void;
  /** What `.locks` shows. */
  snapshot(): LockInfo[];
  /** Every name held or waited on (with etcd: by any server), for the live page. */
  names(): Iterable<string>;
  /**
   * One name's holders and its first `maxQueue` waiters, for the live page; undefined when
   * nobody holds or waits on it.
   */
  detail(name: string, maxQueue: number): LockDetail | undefined;
  /**
   * Calls `listener` with a name whenever its holders or queue may have changed (with etcd: by
   * any server); returns the function that stops it. Calls can repeat a name.
   */
  watch(listener: (name: string) => void): () => void;
  /** Resolves once `snapshot()` reflects every change this server made (bounded in time). */
  settled(): Promise<void>;
  /** The monotonic ms of this server's longest-held grant, or undefined. */
  oldestGrant(): number | undefined;
  /** Counters since the store was made (this server's requests). */
  readonly counters: Readonly<StoreCounters>;
  /** Names held by this server's connections. */
  readonly heldNames: number;
  /** This server's holders. */
  readonly holders: number;
  /** This server's waiters. */
  readonly waiting: number;
  /** How many tokens this server handed out. */
  readonly tokensIssued: number;
  /** Gets ready (connects to its backing service); the server awaits it before listening. */
  start(): Promise<void>;
  /** Ends every claim and lets go of its backing service; resolves when done. */
  close(): Promise<void>;
}
