/**
 * The etcd store's mirror: one watch on the whole prefix, and a local copy of every lock key in
 * it, per name, oldest first. Waiting is watching: when a key goes, the store re-reads its
 * names' queues from here. The mirror also answers `.locks` for the whole cluster.
 *
 * A watch can stall without a word (a NAT or a load balancer dropping a long-lived flow, a
 * member that stops sending). The mirror checks that it still delivers:
 * - every write of this server's must show up on the watch within a grace period;
 * - when the lease's renewal says etcd is at a revision the watch has not reached, and the watch
 *   has been silent since the last renewal, the store writes its heartbeat key: that write
 *   must show up too.
 * A watch that fails the check is torn down and opened again from the last revision it
 * delivered, so nothing is missed.
 *
 * @module
 */

import type { Clock, TimerHandle } from "../store/clock.ts";
import { type EtcdApi, EtcdError, type WatchResponse } from "./client.ts";
import { type KeyInfo, nameOf, parseInfo } from "./keys.ts";

/** One lock key as the mirror keeps it. */
export interface MirrorRecord {
  /** The key. */
  readonly key: string;
  /** Its create revision (its place in the queue). */
  readonly rev: number;
  /** Its last write's revision. */
  readonly modRev: number;
  /** What its value says. */
  readonly info: KeyInfo;
}

/**
 * A record whose value is parsed when first read: most keys come and go (a lock taken and
 * released) without anyone reading their details.
 */
class KeptRecord implements MirrorRecord {
  readonly key: string;
  readonly rev: number;
  modRev: number;
  #value: string;
  #info: KeyInfo | undefined;

  constructor(key: string, rev: number, modRev: number, value: string) {
    this.key = key;
    this.rev = rev;
    this.modRev = modRev;
    this.#value = value;
  }

  get info(): KeyInfo {
    return this.#info ??= parseInfo(this.#value);
  }

  /** The key was written again. */
  rewrite(modRev: number, value: string): void {
    this.modRev = modRev;
    this.#value = value;
    this.#info = undefined;
  }
}

/** What the mirror tells the store. */
export interface MirrorEvents {
  /** Keys of these names changed (after a whole watch response was applied). */
  changed(names: ReadonlySet<string>): void;
  /** A lock key was written. */
  put(key: string): void;
  /** A lock key went, at `revision` (or by then). */
  deleted(key: string, revision: number): void;
  /** Write the heartbeat key now; resolves to the write's revision (undefined: not written). */
  heartbeat(): Promise<number | undefined>;
  /** Something to log at warning level. */
  warn(message: string, err?: unknown): void;
}

/** Options of an {@linkcode EtcdMirror}. */
export interface MirrorOptions {
  /** The key prefix, without a trailing `/`. */
  prefix: string;
  /** How long a write of this server's may take to show up on the watch, in ms. */
  graceMs: number;
}

/**
 * The mirror of one prefix.
 *
 * @example
 * ```ts ignore
 * const mirror = new EtcdMirror(client, systemClock, events, { prefix: "/tcpnetlock", graceMs: 2000 });
 * await mirror.start();
 * mirror.records("db"); // the keys of lock "db", oldest first
 * await mirror.close();
 * ```
 */
export class EtcdMirror {
  readonly #etcd: EtcdApi;
  readonly #clock: Clock;
  readonly #events: MirrorEvents;
  readonly #root: string;
  readonly #graceMs: number;
  readonly #byName = new Map<string, KeptRecord[]>();
  readonly #byKey = new Map<string, KeptRecord>();
  /** Every event up to this revision has been applied. */
  #revision = 0;
  /** The newest revision a write of this server's produced. */
  #knownRev = 0;
  #checkTimer: TimerHandle | undefined;
  #checkingRev = 0;
  /** When the watch last delivered a response (monotonic ms). */
  #lastResponseAt = 0;
  #heartbeating = false;
  readonly #settleWaiters: { rev: number; resolve: () => void }[] = [];
  #abort: AbortController | undefined;
  #loop: Promise<void> | undefined;
  #onCreated: (() => void) | undefined;
  #closed = false;
  /** Ends the pause between two watch attempts (on close). */
  #wake: (() => void) | undefined;
  /** Watches opened again after a stall (for tests and logs). */
  reconnects = 0;

  constructor(etcd: EtcdApi, clock: Clock, events: MirrorEvents, options: MirrorOptions) {
    this.#etcd = etcd;
    this.#clock = clock;
    this.#events = events;
    this.#root = options.prefix + "/";
    this.#graceMs = options.graceMs;
  }

  /** Every event up to this revision has been applied. */
  get revision(): number {
    return this.#revision;
  }

  /** The keys of `name`, oldest first (empty when none). */
  records(name: string): readonly MirrorRecord[] {
    return this.#byName.get(name) ?? [];
  }

  /** The record of `key`, or undefined. */
  get(key: string): MirrorRecord | undefined {
    return this.#byKey.get(key);
  }

  /** Every name with keys, and its keys. */
  names(): IterableIterator<[string, MirrorRecord[]]> {
    return this.#byName.entries();
  }

  /** Reads every key and opens the watch; resolves once the watch is created (bounded). */
  async start(): Promise<void> {
    await this.#load();
    const created = new Promise<void>((resolve) => this.#onCreated = resolve);
    this.#loop = this.#watchLoop();
    const timeoutMs = this.#etcd.timeoutMs * this.#etcd.endpoints.length + 1000;
    let timer: TimerHandle | undefined;
    const ok = await Promise.race([
      created.then(() => true),
      new Promise<boolean>((resolve) =>
        timer = this.#clock.setTimer(() => resolve(false), timeoutMs)
      ),
    ]);
    this.#clock.clear(timer);
    if (!ok) throw new Error("the watch on the prefix was not created in time");
  }

  /** Stops the watch; resolves once its loop has ended. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#clock.clear(this.#checkTimer);
    this.#checkTimer = undefined;
    this.#abort?.abort();
    this.#wake?.();
    await this.#loop;
    for (const w of this.#settleWaiters.splice(0)) w.resolve();
  }

  /**
   * A write of this server's produced `revision`: it must show up on the watch within the grace
   * period, else the watch is opened again.
   */
  noteOwnWrite(revision: number): void {
    if (revision <= this.#knownRev) return;
    this.#knownRev = revision;
    if (this.#checkTimer === undefined && revision > this.#revision) this.#scheduleCheck(revision);
  }

  /**
   * The lease's renewal says etcd is at `revision`. If the watch has not reached it and has
   * delivered nothing for the grace period, the heartbeat key is written: its write must show
   * up. (etcd's revision also moves with writes outside the prefix, which the watch rightly
   * does not deliver: the heartbeat tells the two apart.)
   */
  renewalSaw(revision: number): void {
    const silent = this.#clock.now() - this.#lastResponseAt >= this.#graceMs;
    if (this.#closed || !silent || revision <= this.#revision || this.#heartbeating) return;
    this.#heartbeating = true;
    this.#events.heartbeat().then(
      (rev) => {
        if (rev !== undefined) this.noteOwnWrite(rev);
      },
      (err) => this.#events.warn("Cannot write the heartbeat key: {error}", err),
    ).finally(() => this.#heartbeating = false);
  }

  /**
   * Resolves once the mirror has caught up with this server's own writes and with `revision`
   * (at most 2 s).
   */
  settled(revision = 0): Promise<void> {
    const rev = Math.max(this.#knownRev, revision);
    if (this.#revision >= rev || this.#closed) return Promise.resolve();
    return new Promise((resolve) => {
      const entry = { rev, resolve: () => {} };
      const timer = this.#clock.setTimer(() => entry.resolve(), 2000);
      entry.resolve = () => {
        this.#clock.clear(timer);
        const i = this.#settleWaiters.indexOf(entry);
        if (i >= 0) this.#settleWaiters.splice(i, 1);
        resolve();
      };
      this.#settleWaiters.push(entry);
    });
  }

  // --- The freshness check

  #scheduleCheck(revision: number): void {
    this.#checkingRev = revision;
    this.#checkTimer = this.#clock.setTimer(() => {
      this.#checkTimer = undefined;
      if (this.#closed) return;
      if (this.#revision < this.#checkingRev) {
        this.reconnects++;
        this.#events.warn(
          `The etcd watch has not delivered revision ${this.#checkingRev} within ` +
            `${this.#graceMs} ms (it is at ${this.#revision}): opening it again`,
        );
        this.#etcd.rotate();
        this.#abort?.abort();
        // Check again once the new watch had its chance.
        this.#scheduleCheck(this.#checkingRev);
      } else if (this.#knownRev > this.#revision) {
        this.#scheduleCheck(this.#knownRev);
      }
    }, this.#graceMs);
  }

  // --- The watch

  async #load(): Promise<void> {
    const all = await this.#etcd.range(this.#root, { prefix: true, byCreate: true });
    const before = new Set(this.#byKey.keys());
    this.#byName.clear();
    this.#byKey.clear();
    const names = new Set<string>();
    for (const kv of all.kvs) {
      const name = this.#put(kv.key, kv.createRevision, kv.modRevision, kv.value);
      if (name !== undefined) names.add(name);
    }
    this.#revision = all.revision;
    for (const key of before) {
      if (!this.#byKey.has(key)) {
        const name = nameOf(this.#root, key);
        if (name !== undefined) names.add(name);
        this.#events.deleted(key, all.revision);
      }
    }
    if (names.size > 0) this.#events.changed(names);
    this.#settle();
  }

  async #watchLoop(): Promise<void> {
    let failures = 0;
    while (!this.#closed) {
      const abort = new AbortController();
      this.#abort = abort;
      let resync = false;
      try {
        await this.#etcd.watch(this.#root, this.#revision + 1, abort.signal, (r) => {
          if (r.created) {
            failures = 0;
            this.#onCreated?.();
            this.#onCreated = undefined;
          }
          if (r.compactRevision > 0 || r.canceled) {
            resync = true;
            return false;
          }
          this.#lastResponseAt = this.#clock.now();
          this.#apply(r);
        });
      } catch (err) {
        if (this.#closed) break;
        if (failures === 0) {
          this.#events.warn("The watch on etcd broke, reconnecting: {error}", err);
        }
        if (err instanceof EtcdError && /compacted/.test(err.message)) resync = true;
      }
      if (this.#closed) break;
      if (resync) {
        try {
          await this.#load();
        } catch (err) {
          this.#events.warn("Cannot read the locks from etcd: {error}", err);
        }
      }
      if (!abort.signal.aborted) {
        // The stream broke by itself: try the next member, after a pause that grows.
        this.#etcd.rotate();
        failures++;
        await this.#pause(Math.min(1000, 25 * 2 ** Math.min(failures, 6)));
      }
    }
  }

  #pause(ms: number): Promise<void> {
    if (this.#closed) return Promise.resolve();
    return new Promise((resolve) => {
      const t = this.#clock.setTimer(() => {
        this.#wake = undefined;
        resolve();
      }, ms);
      this.#wake = () => {
        this.#clock.clear(t);
        this.#wake = undefined;
        resolve();
      };
    });
  }

  #apply(res: WatchResponse): void {
    const touched = new Set<string>();
    for (const ev of res.events) {
      const kv = ev.kv;
      if (kv.modRevision > this.#revision) this.#revision = kv.modRevision;
      if (ev.type === "PUT") {
        const name = this.#put(kv.key, kv.createRevision, kv.modRevision, kv.value);
        if (name === undefined) continue;
        touched.add(name);
        this.#events.put(kv.key);
      } else {
        const name = this.#delete(kv.key);
        if (name === undefined) continue;
        touched.add(name);
        this.#events.deleted(kv.key, kv.modRevision);
      }
    }
    // Only events move the revision: a response's header may be ahead of the events it carries
    // (the created response, a catching-up batch).
    if (touched.size > 0) this.#events.changed(touched);
    this.#settle();
  }

  #put(key: string, rev: number, modRev: number, value: string): string | undefined {
    const name = nameOf(this.#root, key);
    if (name === undefined) return undefined;
    const existing = this.#byKey.get(key);
    if (existing !== undefined) {
      if (existing.rev === rev) {
        existing.rewrite(modRev, value);
        return name;
      }
      // The key was deleted and written again (a reused key) without the delete in between.
      this.#delete(key);
    }
    let recs = this.#byName.get(name);
    if (recs === undefined) {
      recs = [];
      this.#byName.set(name, recs);
    }
    const rec = new KeptRecord(key, rev, modRev, value);
    let i = recs.length;
    while (i > 0 && recs[i - 1].rev > rev) i--;
    recs.splice(i, 0, rec);
    this.#byKey.set(key, rec);
    return name;
  }

  #delete(key: string): string | undefined {
    const name = nameOf(this.#root, key);
    if (name === undefined) return undefined;
    const rec = this.#byKey.get(key);
    if (rec === undefined) return name;
    this.#byKey.delete(key);
    const recs = this.#byName.get(name)!;
    recs.splice(recs.indexOf(rec), 1);
    if (recs.length === 0) this.#byName.delete(name);
    return name;
  }

  #settle(): void {
    for (const w of [...this.#settleWaiters]) if (this.#revision >= w.rev) w.resolve();
  }
}
