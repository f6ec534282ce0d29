/**
 * The etcd store's lease: one per server, every key of the server attached to it.
 *
 * - Renewed every third of its ttl. Each renewal reports the revision etcd is at, which the
 *   store uses to see whether its watch still delivers.
 * - A guard gives the lease up just before etcd could let it run out (a margin of a fifth of
 *   the ttl, at most 1 s, counted from when the last successful renewal was *sent*): the store
 *   then tells its holders `expired` before etcd can give their locks to others.
 * - After a loss it revokes the old lease (its keys go at once) and grants a new one, retrying
 *   until etcd answers.
 *
 * @module
 */

import type { Clock, TimerHandle } from "../store/clock.ts";
import type { EtcdApi } from "./client.ts";

/** What the lease tells the store. */
export interface LeaseEvents {
  /** A renewal was answered; etcd is at `revision`. */
  renewed(revision: number): void;
  /** The lease is gone, or may be: every key on it must be given up. */
  lost(why: string): void;
  /** After a loss: a new lease, `id`. */
  recovered(id: string): void;
  /** A renewal failed (logged once per failing spell by the store). */
  failing(err: unknown): void;
}

/**
 * One server's etcd lease.
 *
 * @example
 * ```ts ignore
 * const lease = new EtcdLease(client, 10, systemClock, events);
 * await lease.start();
 * console.log(lease.id);
 * await lease.close();
 * ```
 */
export class EtcdLease {
  readonly ttl: number;
  readonly #etcd: EtcdApi;
  readonly #clock: Clock;
  readonly #events: LeaseEvents;
  #id: string | undefined;
  #validUntil = 0;
  #renewTimer: TimerHandle | undefined;
  #guardTimer: TimerHandle | undefined;
  #recoverTimer: TimerHandle | undefined;
  readonly #old: string[] = [];
  readonly #revoked = new Set<string>();
  #failing = false;
  #closed = false;
  readonly #inflight = new Set<Promise<void>>();

  /**
   * @param etcd where the lease lives
   * @param ttl seconds (at least 1)
   * @param clock time and timers
   * @param events what the store is told
   */
  constructor(etcd: EtcdApi, ttl: number, clock: Clock, events: LeaseEvents) {
    this.#etcd = etcd;
    this.ttl = Math.max(1, Math.ceil(ttl));
    this.#clock = clock;
    this.#events = events;
  }

  /** The live lease's id, or undefined while there is none (lost, not yet recovered). */
  get id(): string | undefined {
    return this.#closed ? undefined : this.#id;
  }

  /** Was this lease revoked by this server (so every key on it is gone)? */
  revoked(id: string): boolean {
    return this.#revoked.has(id);
  }

  /** How long before etcd could let the lease run out the server gives it up. */
  get #margin(): number {
    return Math.min(1000, this.ttl * 1000 / 5);
  }

  /** Grants the first lease. */
  async start(): Promise<void> {
    await this.#grant();
  }

  /** Stops renewing and revokes every lease this server had (its keys go); bounded in time. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const t of [this.#renewTimer, this.#guardTimer, this.#recoverTimer]) this.#clock.clear(t);
    this.#renewTimer = this.#guardTimer = this.#recoverTimer = undefined;
    await Promise.allSettled([...this.#inflight]);
    const ids = [...this.#old];
    if (this.#id !== undefined) ids.push(this.#id);
    this.#id = undefined;
    for (const id of ids) {
      await this.#etcd.leaseRevoke(id, Math.min(this.#etcd.timeoutMs, 1000)).then(
        () => this.#revoked.add(id),
        () => {},
      );
    }
  }

  async #grant(): Promise<void> {
    const sent = this.#clock.now();
    const lease = await this.#etcd.leaseGrant(this.ttl);
    if (this.#closed) {
      await this.#etcd.leaseRevoke(lease.id).catch(() => {});
      return;
    }
    this.#id = lease.id;
    this.#validUntil = sent + lease.ttl * 1000;
    this.#failing = false;
    this.#armGuard();
    this.#scheduleRenew(this.ttl * 1000 / 3);
  }

  #track(p: Promise<void>): void {
    this.#inflight.add(p);
    p.finally(() => this.#inflight.delete(p));
  }

  #scheduleRenew(ms: number): void {
    if (this.#closed) return;
    this.#clock.clear(this.#renewTimer);
    this.#renewTimer = this.#clock.setTimer(() => {
      this.#renewTimer = undefined;
      this.#track(this.#renew());
    }, ms);
  }

  async #renew(): Promise<void> {
    const id = this.#id;
    if (id === undefined || this.#closed) return;
    const sent = this.#clock.now();
    let answer: { ttl: number; revision: number };
    try {
      answer = await this.#etcd.leaseKeepAlive(
        id,
        Math.min(this.#etcd.timeoutMs, this.ttl * 1000 / 3),
      );
    } catch (err) {
      if (id !== this.#id || this.#closed) return;
      if (!this.#failing) this.#events.failing(err);
      this.#failing = true;
      this.#scheduleRenew(Math.min(500, this.ttl * 1000 / 6));
      return;
    }
    if (id !== this.#id || this.#closed) return;
    if (answer.ttl <= 0) {
      this.#lose("etcd says the lease is gone");
      return;
    }
    this.#failing = false;
    this.#validUntil = sent + answer.ttl * 1000;
    this.#armGuard();
    this.#scheduleRenew(this.ttl * 1000 / 3);
    this.#events.renewed(answer.revision);
  }

  #armGuard(): void {
    this.#clock.clear(this.#guardTimer);
    const ms = Math.max(0, Math.ceil(this.#validUntil - this.#margin - this.#clock.now()));
    this.#guardTimer = this.#clock.setTimer(() => {
      this.#guardTimer = undefined;
      if (this.#id === undefined || this.#closed) return;
      // A timer may fire a fraction of a millisecond early: then it is set again.
      if (this.#clock.now() < this.#validUntil - this.#margin) this.#armGuard();
      else this.#lose(`no renewal of the lease answered for ${this.ttl} s`);
    }, ms);
  }

  #lose(why: string): void {
    const old = this.#id;
    if (old === undefined) return;
    this.#id = undefined;
    this.#old.push(old);
    this.#clock.clear(this.#renewTimer);
    this.#clock.clear(this.#guardTimer);
    this.#renewTimer = this.#guardTimer = undefined;
    this.#events.lost(why);
    this.#scheduleRecover(0);
  }

  #scheduleRecover(ms: number): void {
    if (this.#closed) return;
    this.#recoverTimer = this.#clock.setTimer(() => {
      this.#recoverTimer = undefined;
      this.#track(this.#recover());
    }, ms);
  }

  /** Revokes the lost leases (their keys go at once) and grants a new one. */
  async #recover(): Promise<void> {
    if (this.#closed) return;
    try {
      while (this.#old.length > 0) {
        await this.#etcd.leaseRevoke(this.#old[0]);
        this.#revoked.add(this.#old.shift()!);
      }
      await this.#grant();
      if (this.#id !== undefined) this.#events.recovered(this.#id);
    } catch {
      this.#scheduleRecover(1000);
    }
  }
}
