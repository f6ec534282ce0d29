/**
 * An etcd in memory for the etcd store's deterministic tests: keys with create and mod
 * revisions, leases that run out on a fake clock, transactions, and watches; plus the faults the
 * tests need (calls that fail or hang, watches that stall without a word).
 *
 * Only the {@linkcode EtcdApi} the store uses; the real gateway client is tested against a real
 * etcd elsewhere.
 *
 * @module
 */

import {
  type EtcdApi,
  EtcdError,
  EtcdUnavailableError,
  type KeyValue,
  type OpResult,
  type RangeOptions,
  type RangeResult,
  type Txn,
  type TxnOp,
  type TxnResult,
  type WatchEvent,
  type WatchResponse,
} from "../../lib/etcd/client.ts";
import type { Clock } from "../../lib/store/clock.ts";

interface Stored {
  value: string;
  createRevision: number;
  modRevision: number;
  lease: string;
}

/** Which branch each (nested) transaction takes, judged before anything applies. */
interface Plan {
  succeeded: boolean;
  nested: Plan[];
}

interface Watcher {
  prefix: string;
  from: number;
  onResponse: (res: WatchResponse) => boolean | void;
  /** Responses held back while the watch is stalled. */
  held: WatchResponse[];
  stalled: boolean;
  finish: () => void;
}

/** Which calls a fault applies to. */
export type CallKind = "txn" | "range" | "delete" | "grant" | "keepalive" | "revoke" | "watch";

/** One call the fake received. */
export interface CallRecord {
  kind: CallKind;
  /** The keys a txn wrote or a delete deleted. */
  keys: string[];
  /** The transaction, for a txn. */
  txn?: Txn;
}

interface Fault {
  kind: CallKind;
  match: (keys: string[]) => boolean;
  mode: "fail" | "hang" | "apply-then-hang" | "apply-then-fail" | "hold" | "twice";
  times: number;
}

/** A fake etcd (see the module doc). */
export class FakeEtcd implements EtcdApi {
  readonly endpoints: readonly string[] = ["http://fake-etcd"];
  readonly timeoutMs = 1000;
  revision = 1;
  readonly #kv = new Map<string, Stored>();
  readonly #leases = new Map<string, { ttl: number; expiresAt: number }>();
  readonly #watchers = new Set<Watcher>();
  readonly #faults: Fault[] = [];
  readonly #hung = new Set<() => void>();
  readonly #heldCalls: (() => void)[] = [];
  #leaseSeq = 7_000_000_000_000_000_000n;
  #clock: Clock;
  #stallNew = false;
  /** Every call, in order. */
  readonly calls: CallRecord[] = [];

  constructor(clock: Clock) {
    this.#clock = clock;
  }

  // --- Faults

  /** Calls of `kind` (whose keys match) fail with "unavailable" `times` times (default: always). */
  fail(kind: CallKind, match: (keys: string[]) => boolean = () => true, times = Infinity): void {
    this.#faults.push({ kind, match, mode: "fail", times });
  }

  /** Calls of `kind` never answer (until {@linkcode heal}). */
  hang(kind: CallKind, match: (keys: string[]) => boolean = () => true, times = Infinity): void {
    this.#faults.push({ kind, match, mode: "hang", times });
  }

  /** Calls of `kind` are applied, but their answer never comes (until {@linkcode heal}). */
  applyThenHang(
    kind: CallKind,
    match: (keys: string[]) => boolean = () => true,
    times = Infinity,
  ): void {
    this.#faults.push({ kind, match, mode: "apply-then-hang", times });
  }

  /** Calls of `kind` are applied, then answered with a failure (the answer was lost). */
  applyThenFail(
    kind: CallKind,
    match: (keys: string[]) => boolean = () => true,
    times = Infinity,
  ): void {
    this.#faults.push({ kind, match, mode: "apply-then-fail", times });
  }

  /**
   * Calls of `kind` wait, not yet applied, until {@linkcode release} applies and answers them
   * (in the order given): a network that delivers requests late, or out of order.
   */
  hold(kind: CallKind, match: (keys: string[]) => boolean = () => true, times = Infinity): void {
    this.#faults.push({ kind, match, mode: "hold", times });
  }

  /**
   * Calls of `kind` are applied twice and answered with the second result: what a client that
   * retried after losing the first answer sees.
   */
  twice(kind: CallKind, match: (keys: string[]) => boolean = () => true, times = Infinity): void {
    this.#faults.push({ kind, match, mode: "twice", times });
  }

  /** Held calls. */
  get held(): number {
    return this.#heldCalls.length;
  }

  /** Applies and answers the held calls, oldest first (or newest first with `lifo`). */
  release(order: "fifo" | "lifo" = "fifo"): void {
    const calls = this.#heldCalls.splice(0);
    if (order === "lifo") calls.reverse();
    for (const go of calls) go();
  }

  /** Ends every fault; hung calls fail now, held ones are applied. */
  heal(): void {
    this.#faults.length = 0;
    this.release();
    for (const release of [...this.#hung]) release();
    this.#hung.clear();
  }

  /** Watches stop delivering, silently (and, with `newOnes`, so do watches opened later). */
  stallWatches(newOnes = false): void {
    for (const w of this.#watchers) w.stalled = true;
    this.#stallNew = newOnes;
  }

  /** Stalled watches deliver what they held back, and go on delivering. */
  resumeWatches(): void {
    this.#stallNew = false;
    for (const w of this.#watchers) {
      w.stalled = false;
      for (const res of w.held.splice(0)) this.#deliver(w, res);
    }
  }

  /** Open watches. */
  get watches(): number {
    return this.#watchers.size;
  }

  // --- Direct access for tests

  /** Writes a key as another server would (no fault applies). */
  put(key: string, value: string, lease = "0"): number {
    this.#expire();
    return this.#apply([{ put: { key, value, lease } }]).revision;
  }

  /** Grants a lease as another server would. */
  grantLease(ttl: number): string {
    const id = String(this.#leaseSeq++);
    this.#leases.set(id, { ttl, expiresAt: this.#clock.now() + ttl * 1000 });
    return id;
  }

  /** The keys under `prefix`, oldest first. */
  keys(prefix: string): KeyValue[] {
    this.#expire();
    return this.#range({ key: prefix, prefix: true, byCreate: true }).kvs;
  }

  /** Lets leases whose time has come run out (also done before every call). */
  expireLeases(): void {
    this.#expire();
  }

  // --- EtcdApi

  txn(txn: Txn): Promise<TxnResult> {
    const keys: string[] = [];
    const collect = (ops: TxnOp[]) => {
      for (const op of ops) {
        if ("put" in op) keys.push(op.put.key);
        else if ("delete" in op) keys.push(op.delete.key);
        else if ("txn" in op) collect(op.txn.success);
      }
    };
    collect(txn.success);
    return this.#call("txn", keys, () => {
      // As in etcd, every comparison (nested ones too) is judged on the state before the
      // transaction; then the chosen operations apply in order.
      const plan = this.#plan(txn);
      const written = new Set<string>();
      const check = (t: Txn, p: Plan) => {
        for (const op of p.succeeded ? t.success : t.failure ?? []) {
          if ("put" in op || "delete" in op) {
            const key = "put" in op ? op.put.key : op.delete.key;
            if (written.has(key)) {
              throw new EtcdError("etcdserver: duplicate key given in txn request", 3);
            }
            written.add(key);
          }
          if (
            "put" in op && op.put.lease && op.put.lease !== "0" && !this.#leases.has(op.put.lease)
          ) {
            throw new EtcdUnavailableError("etcdserver: requested lease not found");
          }
        }
        const ops = p.succeeded ? t.success : t.failure ?? [];
        let i = 0;
        for (const op of ops) if ("txn" in op) check(op.txn, p.nested[i++]);
      };
      check(txn, plan);
      const { revision, results } = this.#apply(
        plan.succeeded ? txn.success : txn.failure ?? [],
        plan.nested,
      );
      return { succeeded: plan.succeeded, revision, results };
    }, txn);
  }

  #plan(t: Txn): Plan {
    const succeeded = t.compare.every((c) => {
      if (!c.prefix) return (this.#kv.get(c.key)?.createRevision ?? 0) === c.createRevision;
      // As in etcd: every key of the range must match; an empty range compares as one absent key.
      const keys = [...this.#kv].filter(([k]) => k.startsWith(c.key));
      if (keys.length === 0) return c.createRevision === 0;
      return keys.every(([, v]) => v.createRevision === c.createRevision);
    });
    const ops = succeeded ? t.success : t.failure ?? [];
    return { succeeded, nested: ops.flatMap((op) => "txn" in op ? [this.#plan(op.txn)] : []) };
  }

  range(key: string, options: RangeOptions = {}): Promise<RangeResult> {
    return this.#call("range", [key], () => this.#range({ key, ...options }));
  }

  delete(key: string): Promise<{ revision: number; deleted: number }> {
    return this.#call("delete", [key], () => {
      const { revision, results } = this.#apply([{ delete: { key } }]);
      const r = results[0];
      return { revision, deleted: r.kind === "delete" ? r.deleted : 0 };
    });
  }

  leaseGrant(ttl: number): Promise<{ id: string; ttl: number }> {
    return this.#call("grant", [], () => {
      const id = this.grantLease(ttl);
      return { id, ttl };
    });
  }

  leaseKeepAlive(id: string): Promise<{ ttl: number; revision: number }> {
    return this.#call("keepalive", [], () => {
      const lease = this.#leases.get(id);
      if (lease === undefined) return { ttl: 0, revision: this.revision };
      lease.expiresAt = this.#clock.now() + lease.ttl * 1000;
      return { ttl: lease.ttl, revision: this.revision };
    });
  }

  leaseRevoke(id: string): Promise<void> {
    return this.#call("revoke", [], () => this.#revoke(id));
  }

  watch(
    prefix: string,
    startRevision: number,
    signal: AbortSignal,
    onResponse: (res: WatchResponse) => boolean | void,
  ): Promise<void> {
    return this.#call("watch", [prefix], () =>
      new Promise<void>((resolve) => {
        const w: Watcher = {
          prefix,
          from: startRevision,
          onResponse,
          held: [],
          stalled: this.#stallNew,
          finish: () => {
            this.#watchers.delete(w);
            signal.removeEventListener("abort", w.finish);
            resolve();
          },
        };
        if (signal.aborted) return resolve();
        signal.addEventListener("abort", w.finish);
        this.#watchers.add(w);
        // The created response, then every event since the start revision (none are compacted).
        this.#deliver(w, { ...empty(this.revision), created: true });
        const replay = this.#history.filter((ev) => ev.rev >= startRevision);
        for (const ev of replay) {
          if (ev.event.kv.key.startsWith(prefix)) {
            this.#deliver(w, { ...empty(ev.rev), events: [ev.event] });
          }
        }
      }));
  }

  rotate(): void {}

  close(): void {
    for (const w of [...this.#watchers]) w.finish();
    this.heal();
  }

  // --- Internals

  readonly #history: { rev: number; event: WatchEvent }[] = [];

  #call<T>(kind: CallKind, keys: string[], run: () => T | Promise<T>, txn?: Txn): Promise<T> {
    this.calls.push(txn === undefined ? { kind, keys } : { kind, keys, txn });
    this.#expire();
    const fault = this.#faults.find((f) => f.kind === kind && f.times > 0 && f.match(keys));
    if (fault !== undefined) fault.times--;
    const mode = fault?.mode;
    if (mode === "fail") {
      return Promise.reject(new EtcdUnavailableError(`fake etcd: ${kind} failed`));
    }
    if (mode === "hold") {
      return new Promise<T>((resolve, reject) => {
        this.#heldCalls.push(() => {
          try {
            this.#expire();
            resolve(run());
          } catch (err) {
            reject(err);
          }
        });
      });
    }
    if (mode === "twice") {
      try {
        run();
        return Promise.resolve(run());
      } catch (err) {
        return Promise.reject(err);
      }
    }
    if (mode === "hang" || mode === "apply-then-hang") {
      if (mode === "apply-then-hang") {
        try {
          run();
        } catch {
          // applied or not, the answer never comes
        }
      }
      return new Promise<T>((_, reject) => {
        const release = () => reject(new EtcdUnavailableError(`fake etcd: ${kind} timed out`));
        this.#hung.add(release);
      });
    }
    try {
      const result = run();
      if (mode === "apply-then-fail") {
        return Promise.reject(new EtcdUnavailableError(`fake etcd: ${kind} answer lost`));
      }
      // Answers come back asynchronously, as over a network.
      return Promise.resolve(result);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  #range(r: RangeOptions & { key: string }): RangeResult {
    let kvs: KeyValue[] = [];
    for (const [key, s] of this.#kv) {
      if (r.prefix ? key.startsWith(r.key) : key === r.key) kvs.push(toKv(key, s));
    }
    kvs.sort((a, b) => r.byCreate ? a.createRevision - b.createRevision : a.key < b.key ? -1 : 1);
    const count = kvs.length;
    if (r.limit) kvs = kvs.slice(0, r.limit);
    return { revision: this.revision, kvs, count };
  }

  #apply(ops: TxnOp[], plans: Plan[] = []): { revision: number; results: OpResult[] } {
    const events: WatchEvent[] = [];
    const next = this.revision + 1;
    const results = this.#exec(ops, plans, next, events);
    if (events.length > 0) {
      this.revision = next;
      this.#publish(next, events);
    }
    return { revision: this.revision, results };
  }

  /** Applies `ops` at revision `next` (a range sees the writes before it, as in etcd). */
  #exec(ops: TxnOp[], plans: Plan[], next: number, events: WatchEvent[]): OpResult[] {
    const results: OpResult[] = [];
    let nested = 0;
    for (const op of ops) {
      if ("put" in op) {
        const cur = this.#kv.get(op.put.key);
        const s: Stored = {
          value: op.put.value,
          createRevision: cur?.createRevision ?? next,
          modRevision: next,
          lease: op.put.lease ?? "0",
        };
        this.#kv.set(op.put.key, s);
        events.push({ type: "PUT", kv: toKv(op.put.key, s) });
        results.push({ kind: "put" });
      } else if ("range" in op) {
        results.push({ kind: "range", ...this.#range(op.range) });
      } else if ("txn" in op) {
        const plan = plans[nested++];
        const chosen = plan.succeeded ? op.txn.success : op.txn.failure ?? [];
        results.push({
          kind: "txn",
          succeeded: plan.succeeded,
          results: this.#exec(chosen, plan.nested, next, events),
        });
      } else {
        const cur = this.#kv.get(op.delete.key);
        if (cur !== undefined) {
          this.#kv.delete(op.delete.key);
          events.push({ type: "DELETE", kv: { ...toKv(op.delete.key, cur), modRevision: next } });
        }
        results.push({ kind: "delete", deleted: cur === undefined ? 0 : 1 });
      }
    }
    return results;
  }

  #revoke(id: string): void {
    if (!this.#leases.delete(id)) return;
    const gone = [...this.#kv].filter(([, s]) => s.lease === id).map(([k]) => k);
    if (gone.length === 0) return;
    this.#apply(gone.map((key) => ({ delete: { key } })));
  }

  #expire(): void {
    const now = this.#clock.now();
    for (const [id, lease] of [...this.#leases]) if (lease.expiresAt <= now) this.#revoke(id);
  }

  #publish(rev: number, events: WatchEvent[]): void {
    for (const event of events) this.#history.push({ rev, event });
    for (const w of this.#watchers) {
      const mine = events.filter((e) => e.kv.key.startsWith(w.prefix));
      if (mine.length > 0) this.#deliver(w, { ...empty(rev), events: mine });
    }
  }

  #deliver(w: Watcher, res: WatchResponse): void {
    if (w.stalled) {
      w.held.push(res);
      return;
    }
    queueMicrotask(() => {
      if (!this.#watchers.has(w)) return;
      if (w.onResponse(res) === false) w.finish();
    });
  }
}

function empty(revision: number): WatchResponse {
  return { revision, created: false, canceled: false, compactRevision: 0, events: [] };
}

function toKv(key: string, s: Stored): KeyValue {
  return {
    key,
    value: s.value,
    createRevision: s.createRevision,
    modRevision: s.modRevision,
    lease: s.lease,
  };
}
