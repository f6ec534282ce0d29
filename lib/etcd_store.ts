/**
 * The etcd lock store: the locks live in etcd, so any number of tcpnetlock servers in front of
 * one etcd cluster share one set of locks. It implements {@linkcode LockStore}, like the
 * in-memory {@linkcode LockTable}, and keeps its semantics:
 *
 * - Each server keeps one etcd lease alive (`--etcd-lease-ttl`, renewed every third of it).
 *   Every holder and every waiter is one key `PREFIX/NAME/SERVER-SEQ` attached to that lease; its
 *   value (JSON) names the owner (unique per request), the `limit`, the client id, the peer and
 *   the time of the grant.
 * - Order is the keys' create revision: the first `limit` keys of NAME hold it, the rest wait in
 *   that order. A request writes its key and reads the first `limit` keys of NAME in one
 *   transaction, so it is granted, queued (position = keys ahead - limit + 1) or refused at
 *   once; nobody can ever overtake it later, because new keys always come after it.
 * - The fencing token is the holder key's create revision: unique and increasing across every
 *   server of the cluster.
 * - Waiting is watching: each server has one watch on the whole prefix and keeps a mirror of
 *   every key (which also answers `.locks` for the whole cluster); when a key goes, the local
 *   waiters of that name learn their new position or their grant from the mirror. One stream
 *   per server, however many waiters, and the positions the protocol sends come for free.
 * - A connection that ends has its key deleted at once; a `released` reply is sent only after
 *   the delete is done. A server that dies stops renewing its lease: etcd deletes its keys
 *   within the lease ttl and the next keys in line hold.
 * - A server that cannot renew its lease in time (etcd unreachable) tells its holders `expired`
 *   and its waiters `timeout` before etcd could give their locks to others, answers new requests
 *   with `err,store unavailable`, and gets a new lease when etcd answers again (revoking the
 *   old one).
 * - `ttl:` leases and `wait:` deadlines stay with the server that holds the connection, with
 *   the memory table's semantics; `--max-waiters` and `--max-locks` count this server's
 *   connections.
 *
 * @module
 */

import { getLogger } from "./log.ts";
import {
  b64,
  decodeRange,
  EtcdClient,
  type EtcdClientOptions,
  EtcdError,
  headerRevision,
  prefixEnd,
  rangeRequest,
  type WatchResponse,
} from "./etcd.ts";
import {
  Claim,
  type ClaimHandler,
  type ClaimRequest,
  type EndReason,
  type LockStore,
  type Refusal,
  STORE_UNAVAILABLE,
  type TableCounters,
  type TableEvent,
} from "./lock_table.ts";
import { ErrorReason, type LockInfo } from "./protocol.ts";

/** Options of an {@linkcode EtcdStore}. */
export interface EtcdStoreOptions extends EtcdClientOptions {
  /** The key prefix every lock lives under (default `/tcpnetlock`). */
  prefix?: string;
  /** The ttl of this server's etcd lease in seconds (default 10, at least 1). */
  leaseTtl?: number;
  /** Longest wait in seconds; longer waits are cut to it (default: no cap). */
  maxWait?: number;
  /** Most waiters per name on this server (default: no limit). */
  maxWaiters?: number;
  /** Most distinct names this server's connections hold or wait on (default: no limit). */
  maxLocks?: number;
  /** Told of every grant, queueing, refusal, timeout and end (logs, metrics). */
  onEvent?: (event: TableEvent) => void;
  /** The monotonic clock in milliseconds (default `performance.now`). */
  now?: () => number;
  /** The wall clock in milliseconds (default `Date.now`). */
  wallNow?: () => number;
}

/** What a key's value says. */
interface KeyInfo {
  owner: string;
  limit: number;
  client_id: string;
  remote: string;
  since: string;
}

/** One key in the mirror. */
interface Rec {
  key: string;
  rev: number;
  info: KeyInfo;
}

class EtcdClaim extends Claim {
  /** The claim's key in etcd. */
  readonly key: string;
  /** The lease the key was written with. */
  lease = "";
  /** Its create revision once written (the token once granted). */
  rev = 0;
  /** The transaction has been sent (so there may be a key to delete). */
  written = false;
  /** The lease went away while the claim was pending. */
  lost = false;
  timer: ReturnType<typeof setTimeout> | undefined;

  constructor(request: ClaimRequest, handler: ClaimHandler, now: number, key: string) {
    super(request, handler, now);
    this.key = key;
  }
}

interface LocalName {
  claims: Set<EtcdClaim>;
  holders: number;
  waiters: number;
}

const log = getLogger(["tcpnetlock", "etcd"]);

function parseInfo(value: string): KeyInfo {
  try {
    const v = JSON.parse(value);
    const limit = Number.isSafeInteger(v.limit) && v.limit >= 1 ? v.limit : 1;
    return {
      owner: String(v.owner ?? ""),
      limit,
      client_id: typeof v.client_id === "string" ? v.client_id : "",
      remote: typeof v.remote === "string" ? v.remote : "",
      since: typeof v.since === "string" ? v.since : new Date(0).toISOString(),
    };
  } catch {
    return { owner: "", limit: 1, client_id: "", remote: "", since: new Date(0).toISOString() };
  }
}

function randomId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The etcd lock store. `await start()` before use (the server does), `await close()` after.
 *
 * @example
 * ```ts ignore
 * import { EtcdStore } from "./etcd_store.ts";
 * const store = new EtcdStore({ endpoints: ["http://127.0.0.1:2379"], leaseTtl: 10 });
 * await store.start();
 * // ... store.acquire(request, handler) ...
 * await store.close();
 * ```
 */
export class EtcdStore implements LockStore {
  /** The key prefix, without a trailing `/`. */
  readonly prefix: string;
  /** This server's id in its keys. */
  readonly serverId: string = randomId();
  readonly #options: EtcdStoreOptions;
  readonly #ttl: number;
  readonly #now: () => number;
  readonly #wallNow: () => number;
  readonly #maxWait: number;
  readonly #maxWaiters: number;
  readonly #maxLocks: number;
  readonly #onEvent?: (event: TableEvent) => void;
  #client: EtcdClient | undefined;
  #seq = 0;
  #closed = false;
  #closing: Promise<void> | undefined;

  // This server's claims.
  readonly #byKey = new Map<string, EtcdClaim>();
  readonly #local = new Map<string, LocalName>();
  #held = 0;
  #waiting = 0;
  /** Deletes in flight, per name: a new request for the name is written after them. */
  readonly #deleting = new Map<string, Promise<void>>();
  readonly #inflight = new Set<Promise<unknown>>();

  // The mirror of every key under the prefix, by name, oldest first.
  readonly #mirror = new Map<string, Rec[]>();
  #mirrorRev = 0;
  /** The newest revision any of this server's own writes produced. */
  #knownRev = 0;
  #knownRevAt = 0;
  readonly #settleWaiters: { rev: number; resolve: () => void }[] = [];
  #watchAbort: AbortController | undefined;
  #watching: Promise<void> | undefined;
  #watchCreated: (() => void) | undefined;

  // The lease.
  #leaseId: string | undefined;
  #leaseValidUntil = 0;
  #keepAliveTimer: ReturnType<typeof setTimeout> | undefined;
  #guardTimer: ReturnType<typeof setTimeout> | undefined;
  #recoverTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #oldLeases: string[] = [];
  #keepAliveFailing = false;

  /** Counters since the store was made (this server's requests). */
  readonly counters: TableCounters = {
    acquired: 0,
    notGranted: 0,
    timedOut: 0,
    expired: 0,
    refused: 0,
  };
  /** Grants so far (each took a token). */
  readonly tokens: { issued: number } = { issued: 0 };

  constructor(options: EtcdStoreOptions) {
    this.#options = options;
    this.prefix = (options.prefix ?? "/tcpnetlock").replace(/\/+$/, "");
    if (this.prefix === "") throw new Error("The etcd prefix must not be empty");
    this.#ttl = Math.max(1, Math.ceil(options.leaseTtl ?? 10));
    this.#now = options.now ?? (() => performance.now());
    this.#wallNow = options.wallNow ?? Date.now;
    this.#maxWait = options.maxWait ?? Infinity;
    this.#maxWaiters = options.maxWaiters ?? Infinity;
    this.#maxLocks = options.maxLocks ?? Infinity;
    this.#onEvent = options.onEvent;
  }

  /** The lease ttl in seconds. */
  get leaseTtl(): number {
    return this.#ttl;
  }

  /** Names held by this server's connections. */
  get heldNames(): number {
    let n = 0;
    for (const l of this.#local.values()) if (l.holders > 0) n++;
    return n;
  }

  /** This server's holders. */
  get holders(): number {
    return this.#held;
  }

  /** This server's waiters. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Is the store connected with a live lease? */
  get available(): boolean {
    return this.#leaseId !== undefined && !this.#closed;
  }

  get #etcd(): EtcdClient {
    return this.#client!;
  }

  // --- Life cycle

  /** Connects: authenticates, grants the lease, reads every key, starts the watch. */
  async start(): Promise<void> {
    const o = this.#options;
    this.#client = new EtcdClient({
      endpoints: o.endpoints,
      timeoutMs: o.timeoutMs,
      caCert: o.caCert,
      cert: o.cert,
      key: o.key,
      username: o.username,
      password: o.password,
    });
    try {
      await this.#grantLease();
      const root = this.prefix + "/";
      const all = await this.#etcd.range(root, { prefix: true, byCreate: true });
      for (const kv of all.kvs) this.#mirrorPut(kv.key, kv.createRevision, kv.value);
      this.#mirrorRev = all.revision;
      const created = new Promise<void>((resolve) => this.#watchCreated = resolve);
      this.#watching = this.#watchLoop();
      const timeoutMs = this.#etcd.timeoutMs * this.#etcd.endpoints.length + 1000;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const ok = await Promise.race([
        created.then(() => true),
        new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), timeoutMs)),
      ]);
      clearTimeout(timer);
      if (!ok) throw new Error("the watch on the prefix was not created in time");
    } catch (err) {
      await this.close();
      const why = err instanceof Error ? err.message : String(err);
      throw new Error(`Cannot use etcd at ${o.endpoints.join(",")}: ${why}`, { cause: err });
    }
    log.info("Using etcd at {endpoints}, prefix {prefix}, lease {lease} (ttl {ttl} s)", {
      event: "etcd_connected",
      endpoints: o.endpoints.join(","),
      prefix: this.prefix,
      lease: this.#leaseId,
      ttl: this.#ttl,
      server_id: this.serverId,
    });
  }

  /** Withdraws every claim, revokes the lease (deleting this server's keys) and disconnects. */
  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    this.#closed = true;
    for (const t of [this.#keepAliveTimer, this.#guardTimer, this.#recoverTimer]) {
      if (t !== undefined) clearTimeout(t);
    }
    this.#keepAliveTimer = this.#guardTimer = this.#recoverTimer = undefined;
    for (const claim of [...this.#byKey.values()]) {
      if (claim.timer !== undefined) clearTimeout(claim.timer);
      claim.timer = undefined;
      if (claim.state === "holding" || claim.state === "waiting") this.#forget(claim);
      claim.state = "done";
    }
    // Let deletes and transactions in flight finish, for a moment (each has a deadline too).
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      Promise.allSettled([...this.#inflight]),
      new Promise((resolve) => timer = setTimeout(resolve, 2000)),
    ]);
    clearTimeout(timer);
    const client = this.#client;
    if (client !== undefined) {
      const leases = [...this.#oldLeases];
      if (this.#leaseId !== undefined) leases.push(this.#leaseId);
      this.#leaseId = undefined;
      for (const id of leases) {
        await client.leaseRevoke(id, Math.min(client.timeoutMs, 1000)).catch(() => {});
      }
      this.#watchAbort?.abort();
      client.close();
      await this.#watching;
    }
    while (this.#inflight.size > 0) await Promise.allSettled([...this.#inflight]);
    for (const w of this.#settleWaiters.splice(0)) w.resolve();
  }

  // --- LockStore

  acquire(request: ClaimRequest, handler: ClaimHandler): Claim {
    const now = this.#now();
    const key = `${this.prefix}/${request.name}/${this.serverId}-${(++this.#seq).toString(36)}`;
    const claim = new EtcdClaim(request, handler, now, key);
    if (!this.available) {
      this.#refuse(claim, STORE_UNAVAILABLE);
      return claim;
    }
    let local = this.#local.get(request.name);
    if (local === undefined) {
      if (this.#local.size >= this.#maxLocks) {
        this.#refuse(claim, ErrorReason.TOO_MANY_LOCKS);
        return claim;
      }
      local = { claims: new Set(), holders: 0, waiters: 0 };
      this.#local.set(request.name, local);
    }
    local.claims.add(claim);
    this.#byKey.set(key, claim);
    this.#track(this.#place(claim));
    return claim;
  }

  end(claim: Claim, reason: EndReason): void | Promise<void> {
    if (!(claim instanceof EtcdClaim)) return;
    const now = this.#now();
    switch (claim.state) {
      case "new":
        // Pending: withdrawn. #place deletes the key once its transaction is back.
        claim.state = "done";
        this.#forget(claim);
        return;
      case "waiting":
        this.#forget(claim);
        claim.state = "done";
        this.#onEvent?.({ type: "ended", claim, reason, heldMs: 0 });
        return this.#deleteKey(claim);
      case "holding":
        this.#forget(claim);
        claim.state = "done";
        this.#onEvent?.({ type: "ended", claim, reason, heldMs: now - claim.grantedAt });
        return this.#deleteKey(claim);
      default:
        return;
    }
  }

  renew(claim: Claim): void {
    if (claim.state !== "holding" || claim.request.ttl === undefined) return;
    // The claim's timer looks at the deadline when it fires and waits on if it moved.
    claim.deadline = this.#now() + claim.request.ttl * 1000;
  }

  /** This store keeps its own timers: nothing for the server's timer. */
  nextDeadline(): number | undefined {
    return undefined;
  }

  /** This store keeps its own timers: nothing to do. */
  tick(): void {}

  /** Every name held or waited on in the whole cluster, as this server's mirror has it. */
  snapshot(): LockInfo[] {
    const out: LockInfo[] = [];
    for (const [name, recs] of this.#mirror) {
      if (recs.length === 0) continue;
      const limit = recs[0].info.limit;
      const holders = recs.slice(0, limit);
      out.push({
        name,
        limit,
        waiting: recs.length - holders.length,
        holders: holders.map((r) => {
          const mine = this.#byKey.get(r.key);
          const since = mine !== undefined && mine.state === "holding"
            ? new Date(mine.grantedWall).toISOString()
            : r.info.since;
          return { client_id: r.info.client_id, token: r.rev, since, remote: r.info.remote };
        }),
      });
    }
    return out;
  }

  oldestGrant(): number | undefined {
    let oldest: number | undefined;
    for (const c of this.#byKey.values()) {
      if (c.state === "holding" && (oldest === undefined || c.grantedAt < oldest)) {
        oldest = c.grantedAt;
      }
    }
    return oldest;
  }

  /** Resolves once the mirror has caught up with this server's own writes (at most 2 s). */
  settled(): Promise<void> {
    if (this.#mirrorRev >= this.#knownRev || this.#closed) return Promise.resolve();
    return new Promise((resolve) => {
      const entry = { rev: this.#knownRev, resolve: () => {} };
      const timer = setTimeout(() => entry.resolve(), 2000);
      entry.resolve = () => {
        clearTimeout(timer);
        const i = this.#settleWaiters.indexOf(entry);
        if (i >= 0) this.#settleWaiters.splice(i, 1);
        resolve();
      };
      this.#settleWaiters.push(entry);
    });
  }

  // --- A request's way in

  /** Writes the claim's key and reads where it stands, in one transaction; then decides. */
  async #place(claim: EtcdClaim): Promise<void> {
    const { name, limit } = claim.request;
    const before = this.#deleting.get(name);
    if (before !== undefined) await before;
    if (claim.state !== "new") return; // withdrawn before anything was written
    if (!this.available) {
      this.#forget(claim);
      this.#refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    const lease = this.#leaseId!;
    claim.lease = lease;
    const value = JSON.stringify({
      owner: claim.key.slice(claim.key.lastIndexOf("/") + 1),
      limit,
      client_id: claim.request.clientId,
      remote: claim.request.remote,
      since: new Date(this.#wallNow()).toISOString(),
    });
    const namePrefix = `${this.prefix}/${name}/`;
    const keyB64 = b64(claim.key);
    claim.written = true;
    let res: Record<string, unknown>;
    try {
      // Create-if-absent makes the transaction safe to retry: if a first attempt that timed out
      // was applied after all, the retry reads the key back instead of writing it again.
      res = await this.#etcd.txn({
        compare: [{ key: keyB64, target: "CREATE", create_revision: "0", result: "EQUAL" }],
        success: [
          { request_put: { key: keyB64, value: b64(value), lease } },
          { request_range: rangeRequest(namePrefix, { prefix: true, byCreate: true, limit }) },
        ],
        failure: [
          { request_range: rangeRequest(claim.key) },
          { request_range: rangeRequest(namePrefix, { prefix: true, byCreate: true }) },
        ],
      });
    } catch (err) {
      this.#warnEtcd("Cannot write the key of lock {lock}: {error}", err, { lock: name });
      // The write may still have been applied: delete the key (and the sweep deletes it again
      // should the write land even later).
      const wasPending = claim.state === "new";
      claim.state = "done";
      this.#forget(claim);
      this.#deleteKey(claim);
      if (wasPending) this.#refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    const revision = headerRevision(res);
    if (res.succeeded === true) this.#sawWrite(revision);
    const responses = (res.responses as Record<string, Record<string, unknown>>[]) ?? [];
    let rev: number;
    let first: { key: string; value: string; createRevision: number }[];
    let index: number;
    if (res.succeeded === true) {
      rev = revision;
      const range = decodeRange(responses[1].response_range, revision);
      first = range.kvs;
      index = range.count - 1;
    } else {
      const mine = decodeRange(responses[0].response_range, revision).kvs[0];
      const range = decodeRange(responses[1].response_range, revision);
      first = range.kvs;
      if (mine === undefined || parseInfo(mine.value).owner !== JSON.parse(value).owner) {
        // Written and already gone again (the lease ran out meanwhile), or not ours.
        rev = 0;
        index = -1;
      } else {
        rev = mine.createRevision;
        index = first.findIndex((kv) => kv.key === claim.key);
      }
    }
    claim.rev = rev;
    if (claim.state !== "new" || claim.lost || rev === 0 || index < 0) {
      // Withdrawn while the transaction was out (the client left), or the lease was lost.
      const wasPending = claim.state === "new";
      claim.state = "done";
      this.#forget(claim);
      this.#deleteKey(claim);
      if (wasPending) this.#refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    if (first.length > 0 && first[0].key !== claim.key) {
      const theirs = parseInfo(first[0].value).limit;
      if (theirs !== limit) {
        this.#finishEarly(claim);
        this.#refuse(claim, ErrorReason.LIMIT_MISMATCH);
        return;
      }
    }
    if (this.#vanished(claim)) return;
    if (index < limit) {
      this.#grant(claim, false);
      return;
    }
    const wait = Math.min(claim.request.wait, this.#maxWait);
    if (!(wait > 0)) {
      this.#finishEarly(claim);
      this.counters.notGranted++;
      this.#onEvent?.({ type: "not_granted", claim });
      claim.handler.notGranted();
      return;
    }
    const local = this.#local.get(name)!;
    if (local.waiters >= this.#maxWaiters) {
      this.#finishEarly(claim);
      this.#refuse(claim, ErrorReason.TOO_MANY_WAITERS);
      return;
    }
    claim.state = "waiting";
    local.waiters++;
    this.#waiting++;
    this.#arm(claim, claim.requestedAt + wait * 1000);
    const position = index - limit + 1;
    this.#onEvent?.({ type: "queued", claim, position });
    claim.handler.queued(position);
    // The mirror may be ahead of the transaction already: keys ahead may have gone since.
    if (claim.state === "waiting" && this.#mirrorRev >= rev) this.#evaluate(name);
  }

  /** A pending claim that ends before it waited or held: its key goes, the caller answers. */
  #finishEarly(claim: EtcdClaim): void {
    claim.state = "done";
    this.#forget(claim);
    this.#deleteKey(claim);
  }

  /** True (and the claim answered) when the mirror is past the claim's key and it is gone. */
  #vanished(claim: EtcdClaim): boolean {
    if (this.#mirrorRev < claim.rev) return false;
    const recs = this.#mirror.get(claim.request.name);
    if (recs !== undefined && recs.some((r) => r.key === claim.key)) return false;
    this.#forget(claim);
    claim.state = "done";
    this.#refuse(claim, STORE_UNAVAILABLE);
    return true;
  }

  #grant(claim: EtcdClaim, waited: boolean): void {
    const now = this.#now();
    const local = this.#local.get(claim.request.name)!;
    if (claim.state === "waiting") {
      local.waiters--;
      this.#waiting--;
      if (claim.timer !== undefined) clearTimeout(claim.timer);
      claim.timer = undefined;
    }
    claim.state = "holding";
    claim.token = claim.rev;
    claim.grantedAt = now;
    claim.grantedWall = this.#wallNow();
    local.holders++;
    this.#held++;
    this.counters.acquired++;
    this.tokens.issued++;
    if (claim.request.ttl !== undefined) this.#arm(claim, now + claim.request.ttl * 1000);
    else claim.deadline = Infinity;
    this.#onEvent?.({ type: "granted", claim, waitedMs: now - claim.requestedAt });
    claim.handler.granted(claim.token);
    if (waited && claim.state === "holding") this.#recordGrantTime(claim);
  }

  /** After a wait, the key's `since` becomes the grant time (for `.locks` on other servers). */
  #recordGrantTime(claim: EtcdClaim): void {
    const keyB64 = b64(claim.key);
    const value = JSON.stringify({
      owner: claim.key.slice(claim.key.lastIndexOf("/") + 1),
      limit: claim.request.limit,
      client_id: claim.request.clientId,
      remote: claim.request.remote,
      since: new Date(claim.grantedWall).toISOString(),
    });
    // Only while the key is still this claim's: a put must never bring a deleted key back.
    this.#track(
      this.#etcd.txn({
        compare: [{
          key: keyB64,
          target: "CREATE",
          create_revision: String(claim.rev),
          result: "EQUAL",
        }],
        success: [{ request_put: { key: keyB64, value: b64(value), lease: claim.lease } }],
        failure: [],
      }).then((res) => {
        if (res.succeeded === true) this.#sawWrite(headerRevision(res));
      }).catch(() => {}),
    );
  }

  #refuse(claim: Claim, reason: Refusal): void {
    claim.state = "done";
    this.counters.refused++;
    this.#onEvent?.({ type: "refused", claim, reason });
    claim.handler.refused(reason);
  }

  /** Removes a claim from this server's books (not from etcd). */
  #forget(claim: EtcdClaim): void {
    if (claim.timer !== undefined) clearTimeout(claim.timer);
    claim.timer = undefined;
    if (this.#byKey.get(claim.key) === claim) this.#byKey.delete(claim.key);
    const local = this.#local.get(claim.request.name);
    if (local === undefined || !local.claims.has(claim)) return;
    local.claims.delete(claim);
    if (claim.state === "holding") {
      local.holders--;
      this.#held--;
    } else if (claim.state === "waiting") {
      local.waiters--;
      this.#waiting--;
    }
    if (local.claims.size === 0) this.#local.delete(claim.request.name);
  }

  /** Deletes the claim's key; resolves when done (or given up: the sweep tries again). */
  #deleteKey(claim: EtcdClaim): Promise<void> {
    if (!claim.written) return Promise.resolve();
    const name = claim.request.name;
    const done = this.#etcd.delete(claim.key).then(
      (r) => {
        if (r.deleted > 0) this.#sawWrite(r.revision);
      },
      (err) => {
        if (!this.#closed) {
          this.#warnEtcd("Cannot delete the key of lock {lock}: {error}", err, { lock: name });
        }
      },
    );
    this.#track(done);
    const before = this.#deleting.get(name);
    const all = before === undefined ? done : Promise.all([before, done]).then(() => {});
    this.#deleting.set(name, all);
    all.then(() => {
      if (this.#deleting.get(name) === all) this.#deleting.delete(name);
    });
    return done;
  }

  // --- Local deadlines: waits and ttl leases, one timer per claim.

  #arm(claim: EtcdClaim, at: number): void {
    claim.deadline = at;
    if (claim.timer !== undefined) clearTimeout(claim.timer);
    // Capped at setTimeout's range (a longer delay would fire at once): it is set again then.
    const ms = Math.min(2 ** 31 - 1, Math.max(0, Math.ceil(at - this.#now())));
    claim.timer = setTimeout(() => this.#onTimer(claim), ms);
  }

  #onTimer(claim: EtcdClaim): void {
    claim.timer = undefined;
    const now = this.#now();
    if (claim.state === "done" || claim.state === "new") return;
    if (claim.deadline > now) {
      // Renewed since the timer was set.
      this.#arm(claim, claim.deadline);
      return;
    }
    if (claim.state === "holding") {
      this.counters.expired++;
      this.#forget(claim);
      claim.state = "done";
      this.#onEvent?.({ type: "ended", claim, reason: "expired", heldMs: now - claim.grantedAt });
      this.#deleteKey(claim);
      claim.handler.expired();
    } else {
      this.#forget(claim);
      claim.state = "done";
      this.counters.timedOut++;
      this.#onEvent?.({ type: "timeout", claim, waitedMs: now - claim.requestedAt });
      this.#deleteKey(claim);
      claim.handler.timedOut();
    }
  }

  /** A claim whose key etcd no longer has (its lease ran out there, or someone deleted it). */
  #lose(claim: EtcdClaim, why: string): void {
    const now = this.#now();
    if (claim.state === "new") {
      claim.lost = true;
      return;
    }
    const wasHolding = claim.state === "holding";
    if (claim.state !== "waiting" && !wasHolding) return;
    this.#forget(claim);
    claim.state = "done";
    log.warning("Lock {lock} lost by {client_id} at {peer}: {why}", {
      event: "lost",
      lock: claim.request.name,
      client_id: claim.request.clientId || "-",
      peer: claim.request.remote,
      why,
    });
    if (wasHolding) {
      this.counters.expired++;
      this.#onEvent?.({ type: "ended", claim, reason: "expired", heldMs: now - claim.grantedAt });
      claim.handler.expired();
    } else {
      this.counters.timedOut++;
      this.#onEvent?.({ type: "timeout", claim, waitedMs: now - claim.requestedAt });
      claim.handler.timedOut();
    }
  }

  // --- The mirror and the watch

  #nameOf(key: string): string | undefined {
    const root = this.prefix + "/";
    if (!key.startsWith(root)) return undefined;
    const slash = key.indexOf("/", root.length);
    if (slash < 0) return undefined;
    return key.slice(root.length, slash);
  }

  #mirrorPut(key: string, rev: number, value: string): string | undefined {
    const name = this.#nameOf(key);
    if (name === undefined) return undefined;
    let recs = this.#mirror.get(name);
    if (recs === undefined) {
      recs = [];
      this.#mirror.set(name, recs);
    }
    const info = parseInfo(value);
    const existing = recs.find((r) => r.key === key);
    if (existing !== undefined) {
      existing.info = info;
      return name;
    }
    let i = recs.length;
    while (i > 0 && recs[i - 1].rev > rev) i--;
    recs.splice(i, 0, { key, rev, info });
    return name;
  }

  #mirrorDelete(key: string): string | undefined {
    const name = this.#nameOf(key);
    if (name === undefined) return undefined;
    const recs = this.#mirror.get(name);
    if (recs === undefined) return name;
    const i = recs.findIndex((r) => r.key === key);
    if (i >= 0) recs.splice(i, 1);
    if (recs.length === 0) this.#mirror.delete(name);
    return name;
  }

  /** Is this one of this server's keys that no claim owns any more? */
  #isStray(key: string): boolean {
    const id = key.slice(key.lastIndexOf("/") + 1);
    return id.startsWith(this.serverId + "-") && !this.#byKey.has(key);
  }

  #apply(res: WatchResponse): void {
    const touched = new Set<string>();
    for (const ev of res.events) {
      const key = ev.kv.key;
      if (ev.type === "PUT") {
        const name = this.#mirrorPut(key, ev.kv.createRevision, ev.kv.value);
        if (name === undefined) continue;
        touched.add(name);
        // A write that landed after its request gave up (or after the client left): delete.
        if (this.#isStray(key)) this.#deleteStray(key);
      } else {
        const name = this.#mirrorDelete(key);
        if (name === undefined) continue;
        touched.add(name);
        const claim = this.#byKey.get(key);
        if (claim !== undefined) this.#lose(claim, "its key was deleted in etcd");
      }
      if (ev.kv.modRevision > this.#mirrorRev) this.#mirrorRev = ev.kv.modRevision;
    }
    // Only events move the mirror's revision: a response's header may be ahead of the events it
    // carries (the created response, a catching-up batch).
    for (const name of touched) this.#evaluate(name);
    this.#settle();
  }

  /** Grants the local waiters of `name` that are now among its first `limit` keys. */
  #evaluate(name: string): void {
    const local = this.#local.get(name);
    if (local === undefined || local.waiters === 0) return;
    const recs = this.#mirror.get(name) ?? [];
    // Copy: a grant can end other claims synchronously (a session closing).
    const snapshot = recs.slice();
    for (let i = 0; i < snapshot.length; i++) {
      const claim = this.#byKey.get(snapshot[i].key);
      if (claim === undefined || claim.state !== "waiting" || claim.rev > this.#mirrorRev) continue;
      const limit = claim.request.limit;
      if (i < limit) this.#grant(claim, true);
      else claim.handler.queued(i - limit + 1);
    }
  }

  #deleteStray(key: string): void {
    this.#track(
      this.#etcd.delete(key).then((r) => {
        if (r.deleted > 0) this.#sawWrite(r.revision);
      }).catch(() => {}),
    );
  }

  #sawWrite(revision: number): void {
    if (revision > this.#knownRev) {
      this.#knownRev = revision;
      this.#knownRevAt = this.#now();
    }
  }

  #settle(): void {
    for (const w of [...this.#settleWaiters]) if (this.#mirrorRev >= w.rev) w.resolve();
  }

  async #watchLoop(): Promise<void> {
    const root = this.prefix + "/";
    let failures = 0;
    while (!this.#closed) {
      const abort = new AbortController();
      this.#watchAbort = abort;
      let resync = false;
      try {
        await this.#etcd.watch(root, prefixEnd(root), this.#mirrorRev + 1, abort.signal, (r) => {
          if (r.created) {
            failures = 0;
            this.#watchCreated?.();
            this.#watchCreated = undefined;
          }
          if (r.compactRevision > 0 || r.canceled) {
            resync = true;
            return false;
          }
          this.#apply(r);
        });
      } catch (err) {
        if (this.#closed) break;
        if (failures === 0) {
          this.#warnEtcd("The watch on etcd broke, reconnecting: {error}", err, {});
        }
        if (err instanceof EtcdError && /compacted/.test(err.message)) resync = true;
      }
      if (this.#closed) break;
      if (resync) {
        try {
          await this.#resync();
        } catch (err) {
          this.#warnEtcd("Cannot read the locks from etcd: {error}", err, {});
        }
      }
      this.#etcd.rotate();
      failures++;
      await this.#pause(Math.min(1000, 25 * 2 ** Math.min(failures, 6)));
    }
  }

  /** Reads every key again (the watch fell behind a compaction) and rebuilds the mirror. */
  async #resync(): Promise<void> {
    const root = this.prefix + "/";
    const all = await this.#etcd.range(root, { prefix: true, byCreate: true });
    this.#mirror.clear();
    for (const kv of all.kvs) this.#mirrorPut(kv.key, kv.createRevision, kv.value);
    this.#mirrorRev = all.revision;
    for (const claim of [...this.#byKey.values()]) {
      if ((claim.state === "waiting" || claim.state === "holding") && claim.rev <= all.revision) {
        const recs = this.#mirror.get(claim.request.name);
        if (!recs?.some((r) => r.key === claim.key)) this.#lose(claim, "its key is gone");
      }
    }
    for (const name of this.#local.keys()) this.#evaluate(name);
    this.#settle();
  }

  #pause(ms: number): Promise<void> {
    if (this.#closed) return Promise.resolve();
    return new Promise((resolve) => {
      const signal = this.#etcd.closedSignal;
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done);
    });
  }

  // --- The lease

  async #grantLease(): Promise<void> {
    const sent = this.#now();
    const lease = await this.#etcd.leaseGrant(this.#ttl);
    this.#leaseId = lease.id;
    this.#leaseValidUntil = sent + lease.ttl * 1000;
    this.#keepAliveFailing = false;
    this.#armGuard();
    this.#scheduleKeepAlive(this.#ttl * 1000 / 3);
  }

  /** How long before the lease could run out in etcd this server gives up its locks. */
  get #margin(): number {
    return Math.min(1000, this.#ttl * 1000 / 5);
  }

  #scheduleKeepAlive(ms: number): void {
    if (this.#closed) return;
    if (this.#keepAliveTimer !== undefined) clearTimeout(this.#keepAliveTimer);
    this.#keepAliveTimer = setTimeout(() => {
      this.#keepAliveTimer = undefined;
      this.#track(this.#keepAlive());
    }, ms);
  }

  async #keepAlive(): Promise<void> {
    const id = this.#leaseId;
    if (id === undefined || this.#closed) return;
    const sent = this.#now();
    try {
      const ttl = await this.#etcd.leaseKeepAlive(
        id,
        Math.min(this.#etcd.timeoutMs, this.#ttl * 1000 / 3),
      );
      if (id !== this.#leaseId || this.#closed) return;
      if (ttl <= 0) {
        this.#leaseLost("etcd says the lease is gone");
        return;
      }
      if (this.#keepAliveFailing) {
        log.warning("etcd answers again: lease {lease} renewed", { event: "etcd_ok", lease: id });
      }
      this.#keepAliveFailing = false;
      this.#leaseValidUntil = sent + ttl * 1000;
      this.#armGuard();
      this.#sweep();
      this.#scheduleKeepAlive(this.#ttl * 1000 / 3);
    } catch (err) {
      if (id !== this.#leaseId || this.#closed) return;
      if (!this.#keepAliveFailing) {
        this.#warnEtcd("Cannot renew lease {lease} in etcd: {error}", err, { lease: id });
      }
      this.#keepAliveFailing = true;
      this.#scheduleKeepAlive(Math.min(500, this.#ttl * 1000 / 6));
    }
  }

  /** Gives up the locks just before etcd could let the lease run out. */
  #armGuard(): void {
    if (this.#guardTimer !== undefined) clearTimeout(this.#guardTimer);
    const ms = Math.max(0, Math.ceil(this.#leaseValidUntil - this.#margin - this.#now()));
    this.#guardTimer = setTimeout(() => {
      this.#guardTimer = undefined;
      if (this.#leaseId === undefined || this.#closed) return;
      // A timer may fire a fraction of a millisecond early: then it is set again.
      if (this.#now() < this.#leaseValidUntil - this.#margin) this.#armGuard();
      else this.#leaseLost(`no renewal of the lease answered for ${this.#ttl} s`);
    }, ms);
  }

  /** The lease is gone or may be: every holder is told `expired`, every waiter `timeout`. */
  #leaseLost(why: string): void {
    const old = this.#leaseId;
    if (old === undefined) return;
    this.#leaseId = undefined;
    this.#oldLeases.push(old);
    if (this.#keepAliveTimer !== undefined) clearTimeout(this.#keepAliveTimer);
    if (this.#guardTimer !== undefined) clearTimeout(this.#guardTimer);
    this.#keepAliveTimer = this.#guardTimer = undefined;
    log.error(
      "Lost the etcd lease {lease}: {why}; holders get expired, waiters timeout, new requests " +
        "err,store unavailable until etcd answers again",
      { event: "etcd_lease_lost", lease: old, why, holders: this.#held, waiting: this.#waiting },
    );
    for (const claim of [...this.#byKey.values()]) this.#lose(claim, "the etcd lease was lost");
    this.#scheduleRecover(0);
  }

  #scheduleRecover(ms: number): void {
    if (this.#closed) return;
    this.#recoverTimer = setTimeout(() => {
      this.#recoverTimer = undefined;
      this.#track(this.#recover());
    }, ms);
  }

  /** Revokes the lost leases (their keys go at once) and grants a new one. */
  async #recover(): Promise<void> {
    if (this.#closed) return;
    try {
      while (this.#oldLeases.length > 0) {
        await this.#etcd.leaseRevoke(this.#oldLeases[0]);
        this.#oldLeases.shift();
      }
      await this.#grantLease();
      log.warning("etcd answers again: new lease {lease}", {
        event: "etcd_recovered",
        lease: this.#leaseId,
      });
    } catch {
      this.#scheduleRecover(1000);
    }
  }

  /** Deletes this server's keys that no claim owns (writes that landed late); checks the watch. */
  #sweep(): void {
    for (const recs of this.#mirror.values()) {
      for (const r of recs) if (this.#isStray(r.key)) this.#deleteStray(r.key);
    }
    // Our own writes should show in the watch within moments; if not, the stream is stuck.
    if (
      this.#knownRev > this.#mirrorRev &&
      this.#now() - this.#knownRevAt > Math.max(2000, this.#ttl * 500)
    ) {
      log.warning("The etcd watch is behind ({mirror} < {known}): reconnecting", {
        event: "etcd_watch_stale",
        mirror: this.#mirrorRev,
        known: this.#knownRev,
      });
      this.#knownRevAt = this.#now();
      this.#watchAbort?.abort();
    }
  }

  #track<T>(p: Promise<T>): void {
    const q = p.catch((err) => {
      if (!this.#closed) log.error("etcd store: {error}", { error: String(err) });
    });
    this.#inflight.add(q);
    q.finally(() => this.#inflight.delete(q));
  }

  #warnEtcd(message: string, err: unknown, props: Record<string, unknown>): void {
    if (this.#closed) return;
    log.warning(message, {
      event: "etcd_error",
      ...props,
      error: err instanceof Error ? err.message : String(err),
    });
  }
}
