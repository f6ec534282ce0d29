/**
 * The etcd lock store: the locks live in etcd, so any number of tcpnetlock servers in front of
 * one etcd cluster share one set of locks. It keeps a claim's life in the same claim book as the
 * memory store and grants by the same rules (`lib/store/rules.ts`); what differs is where the
 * queue lives and when it changes:
 *
 * - Every holder and waiter is one key `PREFIX/NAME/SERVER-...` attached to its server's lease
 *   (`lease.ts`). The queue of NAME is its keys in create-revision order; the holders are the
 *   prefix of it that the rules allow. New keys always come after every key there is, so nobody
 *   overtakes a waiter; a key never holds beside a key of another limit.
 * - A server's first claim on a name uses the name's one reusable key `SERVER-~GEN` (GEN: the
 *   lease generation), the others a key of their own (`SERVER-SEQ`). etcd keeps every deleted key
 *   until it compacts, and a check of a name walks all of them: with a new key per request, a name
 *   locked 1,000 times made each later check of it ~6× dearer (3.1 against 0.5 ms at 20,000
 *   deleted keys). The reusable key is taken again only once its last claim's delete is
 *   confirmed (or nothing was written), so no write of an old claim can follow the new claim's;
 *   a new lease starts a new generation. The value names the request itself (`owner`, unique).
 * - A request writes its key and reads the head of the queue in one transaction: granted there
 *   (its token is that transaction's revision), not granted, or refused at once; otherwise it
 *   learns its place from the mirror (`mirror.ts`). One server sends its requests for a name one
 *   after another, so they are placed in arrival order.
 * - A waiter whose turn comes is granted by a write of its own (a transaction that rewrites its
 *   key while it still exists): its token is that write's revision. So every token is the
 *   revision of the write that granted it: larger than every token handed out before it, by any
 *   server, for any name.
 * - A key is deleted when its claim ends; `released` is answered once the delete is done, and a
 *   failed delete is retried until the key is gone (or its lease was revoked).
 * - A server that dies stops renewing its lease: etcd deletes its keys within the lease ttl. A
 *   server that cannot renew in time tells its holders `expired` and its waiters `timeout`
 *   before etcd could give their locks to others, answers `err,store unavailable` meanwhile,
 *   and gets a new lease when etcd answers again.
 * - `ttl:` leases, `wait:` deadlines, `--max-waiters` and `--max-locks` are the claim book's, per
 *   server.
 *
 * @module
 */

import { getLogger } from "../log.ts";
import { ErrorReason, type LockInfo } from "../protocol.ts";
import { BookStore } from "../store/book_store.ts";
import type { Claim, ClaimBookOptions } from "../store/claim_book.ts";
import { type Clock, systemClock, type TimerHandle } from "../store/clock.ts";
import {
  conflicts,
  countByMode,
  emptyGroup,
  fits,
  isShared,
  join,
  modeOf,
  type Ranked,
} from "../store/rules.ts";
import {
  type ClaimHandler,
  type ClaimRequest,
  type ClaimState,
  type ClaimView,
  type LockDetail,
  STORE_UNAVAILABLE,
} from "../store/types.ts";
import { type EtcdApi, EtcdClient, type EtcdClientOptions, type KeyValue } from "./client.ts";
import { encodeInfo, HEARTBEAT_SEGMENT, type KeyInfo, nameOf, ownerOf, parseInfo } from "./keys.ts";
import { EtcdLease } from "./lease.ts";
import { EtcdMirror, type MirrorRecord } from "./mirror.ts";
import { EtcdWriter, tokenOf } from "./writer.ts";

/** Where etcd is and how a server uses it (the etcd part of the server's options). */
export interface EtcdServerOptions extends EtcdClientOptions {
  /** The key prefix every lock lives under (default `/tcpnetlock`). */
  prefix?: string;
  /** The ttl of this server's etcd lease in seconds (default 10, at least 1). */
  leaseTtl?: number;
}

/** Options of an {@linkcode EtcdStore}: the server's, the claim book's, and a fake for tests. */
export interface EtcdStoreOptions extends EtcdServerOptions, ClaimBookOptions {
  /** The etcd to use (default: an {@linkcode EtcdClient} on `endpoints`); tests give a fake. */
  client?: EtcdApi;
}

/** What the store keeps with each claim. */
interface EtcdExt {
  /** The claim's key. */
  readonly key: string;
  /** The request's own id (`SERVER-SEQ`), written in the value: the key may be reused. */
  readonly owner: string;
  /** It has the name's reusable key (in `#reusing` until the key is known gone). */
  reusable: boolean;
  /** The lease the key was written with. */
  lease: string;
  /** Its create revision, once the placing transaction answered (0 before). */
  rev: number;
  /** The placing transaction was sent (so there may be a key to delete). */
  written: boolean;
  /** Placed, and waiting for the mirror to say where it stands. */
  placed: boolean;
  /** Its grant write is out. */
  granting: boolean;
}

type EtcdClaim = Claim<EtcdExt>;

const log = getLogger(["tcpnetlock", "etcd"]);
/**
 * How many keys a shared request's placing transaction reads from the head of its queue: it is
 * granted there when every key ahead is a shared holder among them; past them, the mirror says.
 */
const SHARED_HEAD = 32;
const RESOLVED = Promise.resolve();

function randomId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A record as the rules see it. */
function ranked(r: MirrorRecord | KeyValue): Ranked {
  return "info" in r ? r.info : parseInfo(r.value);
}

/**
 * The etcd lock store. `await start()` before use (the server does), `await close()` after.
 *
 * @example
 * ```ts ignore
 * import { EtcdStore } from "./store.ts";
 * const store = new EtcdStore({ endpoints: ["http://127.0.0.1:2379"], leaseTtl: 10 });
 * await store.start();
 * // ... store.acquire(request, handler) ...
 * await store.close();
 * ```
 */
export class EtcdStore extends BookStore<EtcdExt> {
  /** The key prefix, without a trailing `/`. */
  readonly prefix: string;
  /** This server's id in its keys. */
  readonly serverId: string = randomId();
  readonly #etcd: EtcdApi;
  readonly #clock: Clock;
  readonly #lease: EtcdLease;
  readonly #mirror: EtcdMirror;
  readonly #endpoints: string;
  /** This server's live claims, by key. */
  readonly #byKey = new Map<string, EtcdClaim>();
  /** Every write goes through it, batched, in order. */
  readonly #writer: EtcdWriter;
  readonly #inflight = new Set<Promise<unknown>>();
  /** Pauses between retries, ended early on close. */
  readonly #wakers = new Set<() => void>();
  #seq = 0;
  /**
   * The reusable keys in use: from the request until the key is known gone from etcd (deleted,
   * never written, or gone with its claim). A key here is not given to a new request.
   */
  readonly #reusing = new Set<string>();
  /** The reusable keys' generation (`SERVER-~GEN`): a new one after the lease is lost. */
  #reuseGen = 0;
  #closed = false;
  #closing: Promise<void> | undefined;
  #failing = false;

  constructor(options: EtcdStoreOptions) {
    super(options);
    this.prefix = (options.prefix ?? "/tcpnetlock").replace(/\/+$/, "");
    if (this.prefix === "") throw new Error("The etcd prefix must not be empty");
    this.#clock = options.clock ?? systemClock;
    this.#etcd = options.client ?? new EtcdClient(options);
    this.#endpoints = this.#etcd.endpoints.join(",");
    this.#writer = new EtcdWriter(this.#etcd);
    this.#lease = new EtcdLease(this.#etcd, options.leaseTtl ?? 10, this.#clock, {
      renewed: (revision) => {
        if (this.#failing) {
          log.warning("etcd answers again: lease {lease} renewed", {
            event: "etcd_ok",
            lease: this.#lease.id,
          });
        }
        this.#failing = false;
        this.#mirror.renewalSaw(revision);
        this.#sweep();
      },
      lost: (why) => this.#leaseLost(why),
      recovered: (id) => {
        log.warning("etcd answers again: new lease {lease}", {
          event: "etcd_recovered",
          lease: id,
        });
      },
      failing: (err) => {
        this.#failing = true;
        this.#warn("Cannot renew lease {lease} in etcd: {error}", err, { lease: this.#lease.id });
      },
    });
    const ttlMs = this.#lease.ttl * 1000;
    this.#mirror = new EtcdMirror(this.#etcd, this.#clock, {
      changed: (names) => {
        for (const name of names) {
          this.#evaluate(name);
          this.changed(name);
        }
      },
      put: (key) => {
        if (this.#isStray(key)) this.#deleteStray(key);
      },
      deleted: (key, revision) => {
        const claim = this.#byKey.get(key);
        // (A delete before the claim's own write was of an earlier claim on a reused key.)
        if (claim !== undefined && claim.ext.rev > 0 && claim.ext.rev < revision) {
          this.#lost(claim, "its key was deleted in etcd");
        }
      },
      heartbeat: () => this.#heartbeat(),
      warn: (message, err) => this.#warn(message, err, {}),
    }, { prefix: this.prefix, graceMs: Math.max(500, Math.min(2000, ttlMs / 5)) });
  }

  /** The lease ttl in seconds. */
  get leaseTtl(): number {
    return this.#lease.ttl;
  }

  /** Is the store connected with a live lease? */
  get available(): boolean {
    return this.#lease.id !== undefined && !this.#closed;
  }

  /** Watches opened again because the old one stopped delivering. */
  get watchReconnects(): number {
    return this.#mirror.reconnects;
  }

  // --- Life cycle

  /** Connects: grants the lease, reads every key, opens the watch. */
  async start(): Promise<void> {
    try {
      await this.#lease.start();
      await this.#mirror.start();
    } catch (err) {
      await this.close();
      throw new Error(`Cannot use etcd at ${this.#endpoints}: ${errorText(err)}`, { cause: err });
    }
    log.info("Using etcd at {endpoints}, prefix {prefix}, lease {lease} (ttl {ttl} s)", {
      event: "etcd_connected",
      endpoints: this.#endpoints,
      prefix: this.prefix,
      lease: this.#lease.id,
      ttl: this.#lease.ttl,
      server_id: this.serverId,
    });
  }

  /** Ends every claim, revokes the lease (deleting this server's keys) and disconnects. */
  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    this.#closed = true;
    for (const claim of this.book.live()) this.book.end(claim, "shutdown");
    this.book.close();
    for (const wake of [...this.#wakers]) wake();
    // Let the writes in flight finish, for a moment (each has a deadline of its own too).
    let timer: TimerHandle | undefined;
    await Promise.race([
      Promise.allSettled([...this.#inflight]),
      new Promise((resolve) => timer = this.#clock.setTimer(() => resolve(undefined), 2000)),
    ]);
    this.#clock.clear(timer);
    await this.#lease.close();
    this.#etcd.close();
    await this.#mirror.close();
    while (this.#inflight.size > 0) await Promise.allSettled([...this.#inflight]);
  }

  // --- LockStore

  acquire(request: ClaimRequest, handler: ClaimHandler): ClaimView {
    const owner = `${this.serverId}-${(++this.#seq).toString(36)}`;
    const base = `${this.prefix}/${request.name}/`;
    const shared = `${base}${this.serverId}-~${this.#reuseGen.toString(36)}`;
    const reusable = !this.#reusing.has(shared);
    const ext: EtcdExt = {
      key: reusable ? shared : base + owner,
      owner,
      reusable: false,
      lease: "",
      rev: 0,
      written: false,
      placed: false,
      granting: false,
    };
    const claim = this.book.open(request, handler, ext);
    if (claim.state !== "pending") return claim;
    if (!this.available) {
      this.book.refuse(claim, STORE_UNAVAILABLE);
      return claim;
    }
    if (reusable) {
      ext.reusable = true;
      this.#reusing.add(ext.key);
    }
    this.#byKey.set(ext.key, claim);
    this.#track(this.#place(claim));
    return claim;
  }

  /**
   * Resolves once the mirror shows etcd as it is now (every server's writes, not only this
   * one's): `.locks` asks etcd for its revision (one small read) and waits for the watch to
   * reach it (at most 2 s).
   */
  async settled(): Promise<void> {
    let now = 0;
    try {
      now = (await this.#etcd.range(this.prefix + "/", { prefix: true, limit: 1 })).revision;
    } catch {
      // etcd unreachable: show what the mirror has
    }
    await this.#mirror.settled(now);
  }

  /** Every name held or waited on in the whole cluster, as this server's mirror has it. */
  snapshot(): LockInfo[] {
    const out: LockInfo[] = [];
    for (const [name, recs] of this.#mirror.names()) {
      const held = holdingPrefix(recs);
      out.push({
        name,
        limit: recs[0].info.limit,
        waiting: recs.length - held,
        ...countByMode(recs.slice(held).map((r) => r.info)),
        holders: recs.slice(0, held).map((r) => {
          const mine = this.#mine(r);
          const local = mine !== undefined && mine.state === "holding";
          return {
            client_id: r.info.client_id,
            token: local ? mine.token : tokenOf(r.info.granted ? r.modRev : r.rev, r.info.slot),
            since: local ? new Date(mine.grantedWall).toISOString() : r.info.since,
            remote: r.info.remote,
            mode: modeOf(r.info),
          };
        }),
      });
    }
    return out;
  }

  names(): Iterable<string> {
    return Array.from(this.#mirror.names(), ([name]) => name);
  }

  /** One name as the mirror has it (every server's keys); lease and wait ends of this server's. */
  detail(name: string, maxQueue: number): LockDetail | undefined {
    const recs = this.#mirror.records(name);
    if (recs.length === 0) return undefined;
    const held = holdingPrefix(recs);
    return {
      name,
      limit: recs[0].info.limit,
      waiting: recs.length - held,
      holders: recs.slice(0, held).map((r) => {
        const mine = this.#mine(r);
        const local = mine !== undefined && mine.state === "holding";
        return {
          client_id: r.info.client_id,
          token: local ? mine.token : tokenOf(r.info.granted ? r.modRev : r.rev, r.info.slot),
          since: local ? new Date(mine.grantedWall).toISOString() : r.info.since,
          remote: r.info.remote,
          mode: modeOf(r.info),
          expires: local ? this.wallOf(mine.deadline) : undefined,
        };
      }),
      queue: recs.slice(held, held + maxQueue).map((r, i) => {
        const mine = this.#mine(r);
        return {
          position: i + 1,
          client_id: r.info.client_id,
          remote: r.info.remote,
          mode: modeOf(r.info),
          since: r.info.since,
          gives_up: mine !== undefined && mine.state === "waiting"
            ? this.wallOf(mine.deadline)
            : undefined,
        };
      }),
    };
  }

  // --- A request's way in

  /** Writes the claim's key and reads the head of its queue, in one transaction; then decides. */
  async #place(claim: EtcdClaim): Promise<void> {
    if (claim.state !== "pending") {
      // Withdrawn before anything was written.
      this.#keyGone(claim.ext);
      return;
    }
    const lease = this.#lease.id;
    if (lease === undefined || this.#closed) {
      this.#forget(claim);
      this.#keyGone(claim.ext);
      this.book.refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    const { name, limit } = claim.request;
    const ext = claim.ext;
    ext.lease = lease;
    ext.written = true;
    let placed;
    try {
      // Create-if-absent makes the write safe to retry: if a first attempt that timed out was
      // applied after all, the retry reads the key back instead of writing it again.
      placed = await this.#writer.place(
        ext.key,
        name,
        `${this.prefix}/${name}/`,
        isShared(claim.request) ? SHARED_HEAD : limit,
        (slot) => this.#value(claim, false, slot),
        lease,
        // Neither the mirror nor this server knows of another key of the name: most likely the
        // write alone takes it.
        this.#leanFor(name),
      );
    } catch (err) {
      this.#warn("Cannot write the key of lock {lock}: {error}", err, { lock: name });
      // It may have been applied all the same: the key goes (the sweep catches a late write).
      this.#forget(claim);
      this.#deleteUntilGone(ext);
      this.book.refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    const wroteNow = placed.created;
    if (wroteNow) {
      ext.rev = placed.rev;
      this.#mirror.noteOwnWrite(placed.revision);
    } else {
      const kv = placed.found;
      ext.rev = kv !== undefined && parseInfo(kv.value).owner === ext.owner ? kv.createRevision : 0;
    }
    if (claim.state !== "pending" || ext.rev === 0) {
      // Withdrawn while the write was out, or written and gone already (lease lost).
      this.#forget(claim);
      this.#deleteUntilGone(ext);
      this.book.refuse(claim, STORE_UNAVAILABLE);
      return;
    }
    const first = placed.head;
    const at = first.findIndex((kv) => kv.key === ext.key);
    const ahead = at < 0 ? first : first.slice(0, at);
    if (ahead.some((kv) => conflicts(claim.request, ranked(kv)))) {
      this.#refuseAndDelete(claim, ErrorReason.LIMIT_MISMATCH);
      return;
    }
    if (wroteNow && (at === 0 || at > 0 && holdingPrefix(first.slice(0, at + 1)) > at)) {
      // First in the queue (a name with no key before it: the common case, no value to read), or
      // among the holders at the revision of its own write: that write granted it. (A retried
      // transaction that found its key written earlier goes through the mirror instead: its
      // grant needs a write of its own, so that its token is the newest revision.)
      this.book.grant(claim, tokenOf(placed.revision, placed.slot));
      return;
    }
    if (this.book.waitOf(claim.request) === 0 && (at < 0 ? !isShared(claim.request) : wroteNow)) {
      // Taken: its own key is past the head it read (the keys ahead are all of its limit: the
      // rules would make it wait), or in it but not among the holders. A shared request may come
      // after more shared holders than it read: the mirror decides.
      this.#forget(claim);
      this.book.notGranted(claim);
      this.#deleteUntilGone(ext);
      return;
    }
    // It waits: where, the mirror says once it has seen the write.
    ext.placed = true;
    if (this.#mirror.revision >= ext.rev) this.#evaluate(name);
  }

  /** May a placement on `name` be lean (see {@linkcode EtcdWriter.place})? */
  #leanFor(name: string): boolean {
    const entry = this.book.entry(name);
    return this.#mirror.records(name).length === 0 &&
      (entry === undefined ||
        entry.pending.size <= 1 && entry.holders.size === 0 && entry.waiters.length === 0);
  }

  /**
   * Re-reads the queue of `name` from the mirror: this server's placed claims learn where they
   * stand, waiters whose turn came are granted, the others learn their position.
   */
  #evaluate(name: string): void {
    const entry = this.book.entry(name);
    if (entry === undefined) return;
    if (entry.waiters.length === 0 && entry.pending.size === 0) return;
    const recs = this.#mirror.records(name);
    const group = emptyGroup();
    let holding = true;
    let held = 0;
    const settledRev = this.#mirror.revision;
    for (let i = 0; i < recs.length; i++) {
      const rec = recs[i];
      if (holding && fits(group, rec.info)) {
        join(group, rec.info);
        held = i + 1;
      } else {
        holding = false;
      }
      const claim = this.#mine(rec);
      if (claim === undefined) continue;
      const ext = claim.ext;
      if (claim.state === "pending") {
        if (!ext.placed || ext.rev > settledRev) continue;
        ext.placed = false;
        if (recs.slice(0, i).some((r) => conflicts(claim.request, r.info))) {
          this.#refuseAndDelete(claim, ErrorReason.LIMIT_MISMATCH);
        } else if (i < held) {
          this.#grantWaiter(claim);
        } else if (!this.book.queue(claim, i - held + 1)) {
          // Not granted (no wait) or refused (--max-waiters): the key goes.
          this.#forget(claim);
          this.#deleteUntilGone(ext);
        }
      } else if (claim.state === "waiting") {
        if (i < held) this.#grantWaiter(claim);
        else this.book.position(claim, i - held + 1);
      }
    }
    // A placed claim whose key the mirror has passed without seeing it: gone already.
    for (const claim of [...entry.pending]) {
      if (
        claim.ext.placed && claim.ext.rev <= settledRev &&
        this.#mirror.get(claim.ext.key)?.rev !== claim.ext.rev
      ) {
        this.#lost(claim, "its key is gone");
      }
    }
  }

  /** Grants a waiter whose turn came, by a write of its own: the write's revision is the token. */
  #grantWaiter(claim: EtcdClaim): void {
    const ext = claim.ext;
    if (ext.granting) return;
    ext.granting = true;
    const done = this.#writer.grant(
      ext.key,
      claim.request.name,
      ext.rev,
      (slot) => this.#value(claim, true, slot),
      ext.lease,
    ).then((res) => {
      ext.granting = false;
      if (!res.done) {
        this.#lost(claim, "its key is gone");
        return;
      }
      this.#mirror.noteOwnWrite(res.revision);
      if (claim.state === "waiting" || claim.state === "pending") {
        this.book.grant(claim, tokenOf(res.revision, res.slot));
      }
    }, (err) => {
      ext.granting = false;
      this.#warn("Cannot grant lock {lock}: {error}", err, { lock: claim.request.name });
      // Try again shortly while it still waits (its wait deadline bounds it).
      return this.#sleep(200).then(() => {
        if (claim.state === "waiting" || claim.state === "pending") {
          this.#evaluate(claim.request.name);
        }
      });
    });
    this.#track(done);
  }

  #value(claim: EtcdClaim, granted: boolean, slot: number): string {
    const info: KeyInfo = {
      owner: claim.ext.owner,
      slot,
      limit: claim.request.limit,
      client_id: claim.request.clientId,
      remote: claim.request.remote,
      since: new Date(this.#clock.wallNow()).toISOString(),
    };
    if (granted) info.granted = true;
    if (isShared(claim.request)) info.mode = "shared";
    return encodeInfo(info);
  }

  #refuseAndDelete(claim: EtcdClaim, reason: "limit mismatch"): void {
    this.#forget(claim);
    this.book.refuse(claim, reason);
    this.#deleteUntilGone(claim.ext);
  }

  // --- A claim's way out

  /** The book says a claim left: its key goes. A release is answered once it has. */
  protected left(claim: EtcdClaim, from: ClaimState): Promise<void> {
    this.#forget(claim);
    const ext = claim.ext;
    if (from === "pending" && ext.rev === 0) {
      // Its transaction is out (or was never sent): #place deletes the key once it is back.
      return RESOLVED;
    }
    return this.#deleteUntilGone(ext);
  }

  /** A claim whose key is gone from etcd (deleted by someone, or its lease ran out). */
  #lost(claim: EtcdClaim, why: string): void {
    if (claim.state === "done") return;
    this.#forget(claim);
    // Its key is gone; unless its placing write is still out (#place deletes the key after it).
    if (claim.ext.rev > 0 || !claim.ext.written) this.#keyGone(claim.ext);
    if (claim.state !== "pending") {
      log.warning("Lock {lock} lost by {client_id} at {peer}: {why}", {
        event: "lost",
        lock: claim.request.name,
        client_id: claim.request.clientId || "-",
        peer: claim.request.remote,
        why,
      });
    }
    this.book.lose(claim);
  }

  /** This server's live claim a record is of (a record of an earlier claim on a reused key is not). */
  #mine(rec: MirrorRecord): EtcdClaim | undefined {
    const claim = this.#byKey.get(rec.key);
    return claim !== undefined && claim.ext.rev === rec.rev ? claim : undefined;
  }

  #forget(claim: EtcdClaim): void {
    if (this.#byKey.get(claim.ext.key) === claim) this.#byKey.delete(claim.ext.key);
  }

  /** The claim's key is gone from etcd (or was never written): a reusable key may be reused. */
  #keyGone(ext: EtcdExt): void {
    if (!ext.reusable) return;
    ext.reusable = false;
    this.#reusing.delete(ext.key);
  }

  /**
   * Deletes a key and resolves once it is gone: the delete is retried (with a growing pause)
   * until etcd confirms it, or the lease it was written with has been revoked, or the store
   * closes (closing revokes the lease).
   */
  #deleteUntilGone(ext: EtcdExt): Promise<void> {
    if (!ext.written) {
      this.#keyGone(ext);
      return RESOLVED;
    }
    const key = ext.key;
    const name = key.slice(this.prefix.length + 1, key.lastIndexOf("/"));
    let done!: () => void;
    const gone = new Promise<void>((r) => done = r);
    const resolve = () => {
      this.#keyGone(ext);
      done();
    };
    let pause = 50;
    const attempt = async (): Promise<void> => {
      try {
        const r = await this.#writer.delete(key, name);
        if (r.deleted > 0) this.#mirror.noteOwnWrite(r.revision);
        resolve();
        return;
      } catch (err) {
        if (this.#lease.revoked(ext.lease) || this.#closed) {
          resolve();
          return;
        }
        this.#warn("Cannot delete the key of lock {lock} (trying again): {error}", err, {
          lock: name,
        });
      }
      this.#track(this.#sleep(pause).then(attempt));
      pause = Math.min(1000, pause * 2);
    };
    // The writer sends it in order with this server's other writes: a request that comes after
    // a release is written after the released key is gone.
    this.#track(attempt());
    return gone;
  }

  /** A pause that ends early when the store closes. */
  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        this.#clock.clear(t);
        this.#wakers.delete(wake);
        resolve();
      };
      const t = this.#clock.setTimer(wake, ms);
      this.#wakers.add(wake);
    });
  }

  /** Is this one of this server's lock keys that no live claim owns (and none is deleting)? */
  #isStray(key: string): boolean {
    return ownerOf(key).startsWith(this.serverId + "-") && !this.#byKey.has(key) &&
      !this.#reusing.has(key);
  }

  #deleteStray(key: string): void {
    this.#track(
      this.#writer.delete(key, nameOf(this.prefix + "/", key) ?? "").then((r) => {
        if (r.deleted > 0) this.#mirror.noteOwnWrite(r.revision);
      }).catch(() => {}),
    );
  }

  /** After each renewal: deletes this server's keys that no claim owns (writes that landed late). */
  #sweep(): void {
    for (const [, recs] of this.#mirror.names()) {
      for (const r of recs) if (this.#isStray(r.key)) this.#deleteStray(r.key);
    }
  }

  /** Writes this server's heartbeat key (for the watch check); its revision. */
  async #heartbeat(): Promise<number | undefined> {
    const lease = this.#lease.id;
    if (lease === undefined || this.#closed) return undefined;
    const key = `${this.prefix}/${HEARTBEAT_SEGMENT}/${this.serverId}`;
    return await this.#writer.put(key, "", lease);
  }

  /** The lease is gone or may be: holders are told `expired`, waiters `timeout`. */
  #leaseLost(why: string): void {
    log.error(
      "Lost the etcd lease: {why}; holders get expired, waiters timeout, new requests " +
        "err,store unavailable until etcd answers again",
      { event: "etcd_lease_lost", why, holders: this.book.holders, waiting: this.book.waiting },
    );
    // Keys written with the old lease may outlive this moment: the reusable keys start a new
    // generation, so that no new request meets an old key.
    this.#reuseGen++;
    this.#reusing.clear();
    for (const claim of [...this.#byKey.values()]) this.#lost(claim, "the etcd lease was lost");
  }

  #track<T>(p: Promise<T>): void {
    this.#inflight.add(p);
    p.then(() => this.#inflight.delete(p), () => this.#inflight.delete(p));
  }

  #warn(message: string, err: unknown, props: Record<string, unknown>): void {
    if (this.#closed) return;
    log.warning(message, { event: "etcd_error", ...props, error: errorText(err) });
  }
}

/** How many records at the head of a name's queue hold it. */
function holdingPrefix(recs: readonly (MirrorRecord | KeyValue)[]): number {
  const group = emptyGroup();
  let i = 0;
  while (i < recs.length && fits(group, ranked(recs[i]))) join(group, ranked(recs[i++]));
  return i;
}
