/**
 * The etcd store's writes, batched: every write the store makes (placing a request's key,
 * granting a waiter, deleting a key) goes into one transaction with the others that are ready,
 * each as a nested transaction of its own. One batch is in flight at a time; what comes
 * meanwhile goes in the next one. Under load that is one round trip to etcd for many locks,
 * where a transaction per write spends most of etcd's (and this server's) time on requests.
 *
 * Order: names are spread over a few lanes (by a hash of the name); a lane has one batch in flight
 * at a time, and a batch holds at most one write per key and at most one placement per name, so
 * one server's writes for a name reach etcd in the order they were asked for. (Two placements of
 * one name in one batch would get the same create revision, and etcd does not promise how it
 * orders a tie.) Lanes keep a slow batch from holding up the writes of every other name.
 *
 * Tokens: the writes of a batch share its revision; each has a slot (its place in the batch,
 * below {@linkcode TOKEN_SLOTS}), and a grant's fencing token is `revision × TOKEN_SLOTS + slot`:
 * larger than every token of an earlier revision, unique within one.
 *
 * @module
 */

import type { EtcdApi, KeyValue, OpResult, TxnOp } from "./client.ts";

/** Tokens are `revision × TOKEN_SLOTS + slot`. */
export const TOKEN_SLOTS = 128;

/** Most writes in one batch (etcd's default `--max-txn-ops` is 128). */
export const MAX_BATCH = 64;

/** Batches in flight at once, each for its own share of the names. */
export const LANES = 2;

/** What a write's reader returns when the write must be sent again. */
const AGAIN = Symbol("again");

/** The fencing token of a write at `revision` in `slot`. */
export function tokenOf(revision: number, slot: number): number {
  return revision * TOKEN_SLOTS + slot;
}

/** What placing a key found. */
export interface Placed {
  /** This write created the key (false: it was there already, from an earlier try). */
  created: boolean;
  /** The key's create revision (0: the key is not there). */
  rev: number;
  /** The batch's revision. */
  revision: number;
  /** The write's slot in the batch. */
  slot: number;
  /** The head of the name's queue after the write: up to the asked number of keys, oldest first. */
  head: KeyValue[];
  /** The key as it was found (when it was not created). */
  found: KeyValue | undefined;
}

/** What a grant write did. */
export interface Granted {
  /** The key was still there and was rewritten. */
  done: boolean;
  /** The batch's revision. */
  revision: number;
  /** The write's slot in the batch. */
  slot: number;
}

interface Pending {
  key: string;
  /** The lock name the key belongs to (its lane). */
  name: string;
  /** A placement (one per name per batch). */
  placement: boolean;
  op(slot: number): TxnOp;
  /** Takes the result; true when the write must be sent again (a lean placement that missed). */
  settle(result: OpResult | undefined, revision: number, slot: number): boolean;
  fail(err: unknown): void;
}

/**
 * Batches the store's writes (see the module doc).
 *
 * @example
 * ```ts ignore
 * const writer = new EtcdWriter(client);
 * const placed = await writer.place(key, name, 1, (slot) => value(slot), lease);
 * await writer.delete(key, name);
 * ```
 */
interface Lane {
  queue: Pending[];
  busy: boolean;
}

export class EtcdWriter {
  readonly #etcd: EtcdApi;
  readonly #lanes: Lane[] = Array.from({ length: LANES }, () => ({ queue: [], busy: false }));
  /** Batches sent, and writes in them (for the benchmark and tests). */
  readonly stats = { batches: 0, writes: 0 };

  constructor(etcd: EtcdApi) {
    this.#etcd = etcd;
  }

  /**
   * Writes `key` if it is not there (attached to `lease`) and reads the first `headLimit` keys of
   * its name, oldest first. `value` gets the write's slot.
   *
   * With `lean` (the caller saw no key of the name), the transaction only writes the key if the
   * name has no key at all, with nothing to run otherwise; when the name has a key after all, the
   * whole placement is sent again at once, ahead of the lane's other writes. etcd's JSON gateway
   * parses every field of a request, the branch that does not run too: the branch for a name in
   * use is most of the placement's text, and parsing it was a quarter of etcd's CPU under load.
   */
  place(
    key: string,
    name: string,
    namePrefix: string,
    headLimit: number,
    value: (slot: number) => string,
    lease: string,
    lean = false,
  ): Promise<Placed> {
    const head: TxnOp = {
      range: { key: namePrefix, prefix: true, byCreate: true, limit: headLimit },
    };
    let leanTry = lean;
    return this.#add<Placed>(key, name, true, (slot) => {
      const put: TxnOp = { put: { key, value: value(slot), lease } };
      return {
        // A name with no key at all: the write alone grants it (no read on this path).
        // Otherwise: create the key if it is not there (a retry finds it), and read the head.
        txn: {
          compare: [{ key: namePrefix, prefix: true, createRevision: 0 }],
          success: [put],
          failure: leanTry ? [] : [{
            txn: {
              compare: [{ key, createRevision: 0 }],
              success: [put, head],
              failure: [{ range: { key } }, head],
            },
          }],
        },
      };
    }, (r, revision, slot) => {
      const outer = r as Extract<OpResult, { kind: "txn" }>;
      if (!outer.succeeded && leanTry) {
        leanTry = false;
        return AGAIN;
      }
      if (outer.succeeded) {
        const kv = { key, value: "", createRevision: revision, modRevision: revision, lease };
        return { created: true, rev: revision, revision, slot, head: [kv], found: undefined };
      }
      const t = outer.results[0] as Extract<OpResult, { kind: "txn" }>;
      const rangeOf = (x: OpResult | undefined) => x?.kind === "range" ? x.kvs : [];
      if (t.succeeded) {
        return {
          created: true,
          rev: revision,
          revision,
          slot,
          head: rangeOf(t.results[1]),
          found: undefined,
        };
      }
      const found = rangeOf(t.results[0])[0];
      return {
        created: false,
        rev: found?.createRevision ?? 0,
        revision,
        slot,
        head: rangeOf(t.results[1]),
        found,
      };
    });
  }

  /** Rewrites `key` (created at `rev`) with `value` if it is still there: the grant of a waiter. */
  grant(
    key: string,
    name: string,
    rev: number,
    value: (slot: number) => string,
    lease: string,
  ): Promise<Granted> {
    return this.#add<Granted>(key, name, false, (slot) => ({
      txn: {
        compare: [{ key, createRevision: rev }],
        success: [{ put: { key, value: value(slot), lease } }],
        failure: [],
      },
    }), (r, revision, slot) => ({
      done: r?.kind === "txn" && r.succeeded,
      revision,
      slot,
    }));
  }

  /** Writes `key` unconditionally (the heartbeat). Resolves to the revision. */
  put(key: string, value: string, lease: string): Promise<number> {
    return this.#add<number>(
      key,
      "",
      false,
      () => ({ put: { key, value, lease } }),
      (_, rev) => rev,
    );
  }

  /** Deletes `key` (of lock `name`): how many keys went (0 or 1), and the revision. */
  delete(key: string, name: string): Promise<{ deleted: number; revision: number }> {
    return this.#add(key, name, false, () => ({ delete: { key } }), (r, revision) => ({
      deleted: r?.kind === "delete" ? r.deleted : 0,
      revision,
    }));
  }

  #add<T>(
    key: string,
    name: string,
    placement: boolean,
    op: (slot: number) => TxnOp,
    read: (result: OpResult | undefined, revision: number, slot: number) => T | typeof AGAIN,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const lane = this.#lanes[laneOf(name)];
      lane.queue.push({
        key,
        name,
        placement,
        op,
        settle: (r, revision, slot) => {
          try {
            const result = read(r, revision, slot);
            if (result === AGAIN) return true;
            resolve(result);
          } catch (err) {
            reject(err);
          }
          return false;
        },
        fail: reject,
      });
      if (!lane.busy) {
        lane.busy = true;
        // Everything asked for in this turn of the event loop goes in the first batch.
        queueMicrotask(() => this.#send(lane));
      }
    });
  }

  /** Sends a lane's batches, one at a time, until nothing is left. */
  async #send(lane: Lane): Promise<void> {
    while (lane.queue.length > 0) await this.#sendOne(lane);
    lane.busy = false;
  }

  async #sendOne(lane: Lane): Promise<void> {
    const batch: Pending[] = [];
    const later: Pending[] = [];
    const keys = new Set<string>();
    const names = new Set<string>();
    for (const p of lane.queue) {
      // A key or name already in the batch, or held back for it, waits for the next batch,
      // together with everything after it on that key or name: their order stays.
      const wait = batch.length >= MAX_BATCH || keys.has(p.key) ||
        (p.placement && names.has(p.name));
      keys.add(p.key);
      if (p.placement) names.add(p.name);
      (wait ? later : batch).push(p);
    }
    lane.queue = later;
    this.stats.batches++;
    this.stats.writes += batch.length;
    try {
      const ops = batch.map((p, i) => p.op(i));
      const again: Pending[] = [];
      if (ops.length === 1 && "txn" in ops[0]) {
        // One write: its own transaction, not nested in another.
        const res = await this.#etcd.txn(ops[0].txn);
        if (batch[0].settle({ kind: "txn", ...res }, res.revision, 0)) again.push(batch[0]);
      } else {
        const res = await this.#etcd.txn({ compare: [], success: ops });
        for (let i = 0; i < batch.length; i++) {
          if (batch[i].settle(res.results[i], res.revision, i)) again.push(batch[i]);
        }
      }
      // Sent again first: nothing queued after them on their name overtakes them.
      if (again.length > 0) lane.queue.unshift(...again);
    } catch (err) {
      for (const p of batch) p.fail(err);
    }
  }
}

/** The lane of a name: a small string hash. */
function laneOf(name: string): number {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) | 0;
  return (h >>> 0) % LANES;
}
