// The etcd store on a fake etcd and a fake clock: deterministic, fast, no etcd needed. The same
// defects are proven against a real etcd (through a fault-injecting proxy) in
// tests/etcd_faults_test.ts.

import assert from "node:assert/strict";
import { EtcdStore } from "../lib/etcd/store.ts";
import type { Txn, TxnOp } from "../lib/etcd/client.ts";
import { LANES, tokenOf } from "../lib/etcd/writer.ts";
import type { ClaimRequest, ClaimView } from "../lib/store/types.ts";
import { FakeClock, flush } from "./_util/fake_clock.ts";
import { Recorder } from "./_util/recorder.ts";
import { FakeEtcd } from "./_util/fake_etcd.ts";

const PREFIX = "/t";

function req(name: string, extra: Partial<ClaimRequest> = {}): ClaimRequest {
  return { name, limit: 1, wait: 0, clientId: "", remote: "127.0.0.1:1", ...extra };
}

/** A fake etcd, a fake clock, and servers (stores) on them. */
class World implements AsyncDisposable {
  readonly clock = new FakeClock();
  readonly etcd = new FakeEtcd(this.clock);
  readonly stores: EtcdStore[] = [];

  async server(leaseTtl = 3): Promise<EtcdStore> {
    const store = new EtcdStore({
      endpoints: [],
      client: this.etcd,
      clock: this.clock,
      prefix: PREFIX,
      leaseTtl,
    });
    await store.start();
    this.stores.push(store);
    return store;
  }

  /** Asks `store` and lets the outcome arrive. */
  async ask(store: EtcdStore, r: ClaimRequest, h: Recorder): Promise<ClaimView> {
    const claim = store.acquire(r, h);
    await flush();
    await flush();
    return claim;
  }

  keys(name: string): string[] {
    return this.etcd.keys(`${PREFIX}/${name}/`).map((kv) => kv.key);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.etcd.heal();
    this.etcd.resumeWatches();
    const closing = Promise.all(this.stores.map((s) => s.close()));
    // close() waits up to 2 s (fake) for writes in flight.
    await this.clock.advance(3000);
    await closing;
  }
}

Deno.test("etcd store (fake): a free lock is granted by the write of its key; the token is that write's revision", async () => {
  await using w = new World();
  const a = await w.server();
  const h = new Recorder();
  await w.ask(a, req("x"), h);
  const [key] = w.etcd.keys(`${PREFIX}/x/`);
  assert.deepEqual(h.log, [`granted:${tokenOf(key.createRevision, 0)}`]);
  const txns = w.etcd.calls.filter((c) => c.kind === "txn");
  assert.equal(txns.length, 1, "one round trip: the grant check is inside the creating txn");
  const n = new Recorder();
  await w.ask(a, req("x"), n);
  assert.deepEqual(n.log, ["not-granted"]);
  assert.equal(w.keys("x").length, 1, "the refused request's key is gone");
});

/** The branch a placement runs when its name has a key already (a nested txn), or none. */
function inUseBranch(call: { txn?: Txn }): TxnOp[] {
  return call.txn?.failure ?? [];
}

Deno.test("etcd store (fake): a placement on a name the mirror sees free sends no branch for a name in use", async () => {
  // etcd's JSON gateway parses every field of a request, the branch that does not run too, and
  // for a free name that branch was most of the text: a quarter of etcd's CPU under load.
  await using w = new World();
  const a = await w.server();
  await w.ask(a, req("x"), new Recorder());
  const [free] = w.etcd.calls.filter((c) => c.kind === "txn");
  assert.deepEqual(inUseBranch(free), [], "a free name: create the key or do nothing");
  // A name the mirror sees in use: the whole placement at once (one round trip, as before).
  const n = new Recorder();
  const sent = w.etcd.calls.length;
  await w.ask(a, req("x"), n);
  assert.deepEqual(n.log, ["not-granted"]);
  const [busy] = w.etcd.calls.slice(sent).filter((c) => c.kind === "txn");
  assert.equal(inUseBranch(busy).length, 1, "the nested create-or-read for a name in use");
});

Deno.test("etcd store (fake): a lean placement that finds a key its mirror had not seen is sent again in full and waits its turn", async () => {
  await using w = new World();
  const b = await w.server();
  const a = await w.server();
  // b's mirror does not see a's key: b believes the name free.
  w.etcd.stallWatches();
  const holder = new Recorder();
  const held = await w.ask(a, req("x"), holder);
  assert.equal(holder.last?.startsWith("granted:"), true, holder.log.join(" "));
  const sent = w.etcd.calls.length;
  const waiter = new Recorder();
  b.acquire(req("x", { wait: 5 }), waiter);
  await flush();
  await flush();
  const txns = w.etcd.calls.slice(sent).filter((c) => c.kind === "txn");
  assert.deepEqual(txns.map((t) => inUseBranch(t).length), [0, 1], "lean, then in full");
  assert.deepEqual(waiter.log, [], "not granted beside the holder");
  assert.equal(w.keys("x").length, 2, "its key is written, behind the holder's");
  w.etcd.resumeWatches();
  await flush();
  await flush();
  assert.deepEqual(waiter.log, ["queued:1"]);
  await a.end(held, "released");
  await flush();
  await flush();
  assert.equal(waiter.last?.startsWith("granted:"), true, waiter.log.join(" "));
  assert.ok(waiter.token > holder.token);
});

Deno.test("etcd store (fake): a waiter's token is the revision of its grant, newer than every token before it", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const holder = new Recorder();
  const held = await w.ask(a, req("x"), holder);
  const waiter = new Recorder();
  await w.ask(b, req("x", { wait: 30 }), waiter);
  assert.deepEqual(waiter.log, ["queued:1"]);
  // Another name is granted on the other server after the waiter queued.
  const other = new Recorder();
  await w.ask(a, req("y"), other);
  await a.end(held, "released");
  await flush();
  await flush();
  assert.ok(
    waiter.token > other.token,
    `a token handed out later (${waiter.token}) must be larger than one before (${other.token})`,
  );
  assert.ok(other.token > holder.token);
});

Deno.test("etcd store (fake): one server places its requests for a name in arrival order", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const holder = new Recorder();
  await w.ask(b, req("x"), holder);
  // The network holds a's transactions back; were they all sent at once, releasing them
  // newest first would queue them in the reverse order.
  w.etcd.hold("txn");
  const hs = [new Recorder(), new Recorder(), new Recorder()];
  for (const h of hs) a.acquire(req("x", { wait: 30, clientId: String(hs.indexOf(h)) }), h);
  await flush();
  assert.equal(w.etcd.held, 1, "the second request for x waits for the first one's answer");
  for (let i = 0; i < 3; i++) {
    w.etcd.release("lifo");
    await flush();
    await flush();
  }
  assert.equal(w.etcd.held, 0);
  const order = w.etcd.keys(`${PREFIX}/x/`).slice(1).map((kv) => JSON.parse(kv.value).client_id);
  assert.deepEqual(order, ["0", "1", "2"]);
  assert.deepEqual(hs.map((h) => h.log), [["queued:1"], ["queued:2"], ["queued:3"]]);
});

Deno.test("etcd store (fake): never two holders across mixed limits, whatever stale keys lie ahead", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const h1 = new Recorder();
  const c1 = await w.ask(a, req("x"), h1);
  // A limit:3 request whose server died right after writing its key: the key stays until the
  // dead server's lease runs out.
  const dead = w.etcd.grantLease(10);
  w.etcd.put(
    `${PREFIX}/x/dead-1`,
    JSON.stringify({ owner: "dead-1", limit: 3, client_id: "", remote: "", since: "" }),
    dead,
  );
  await flush();
  const waiter = new Recorder();
  await w.ask(b, req("x", { wait: 30 }), waiter);
  assert.deepEqual(waiter.log, ["refused:limit mismatch"], "a limit:3 key is ahead");
  await a.end(c1, "released");
  await flush();
  // The stale limit:3 key is at the head now: a limit:3 request may hold beside it (a phantom,
  // within its limit), a limit:1 request may not.
  const three = new Recorder();
  await w.ask(b, req("x", { limit: 3, wait: 30 }), three);
  const one = new Recorder();
  await w.ask(a, req("x", { wait: 30 }), one);
  assert.equal(three.last?.startsWith("granted:"), true);
  assert.deepEqual(one.log, ["refused:limit mismatch"]);
  // The dead server's lease runs out: its key goes; nothing changes for the others.
  await w.clock.advance(11_000);
  w.etcd.expireLeases();
  await flush();
  assert.equal(three.log.length, 1, "the limit:3 holder still holds");
});

Deno.test("etcd store (fake): a waiter placed behind a limit:1 holder never holds beside a later limit:3 holder", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const h1 = new Recorder();
  const c1 = await w.ask(a, req("x"), h1);
  const waiter = new Recorder();
  await w.ask(b, req("x", { wait: 30 }), waiter);
  assert.deepEqual(waiter.log, ["queued:1"]);
  const dead = w.etcd.grantLease(10);
  w.etcd.put(
    `${PREFIX}/x/dead-1`,
    JSON.stringify({ owner: "dead-1", limit: 3, client_id: "", remote: "", since: "" }),
    dead,
  );
  await flush();
  await a.end(c1, "released");
  await flush();
  await flush();
  assert.equal(waiter.last?.startsWith("granted:"), true);
  const three = new Recorder();
  await w.ask(a, req("x", { limit: 3, wait: 30 }), three);
  assert.deepEqual(three.log, ["refused:limit mismatch"]);
});

Deno.test("etcd store (fake): released is answered only once the key is gone; a failed delete is tried again", async () => {
  await using w = new World();
  const a = await w.server();
  const h = new Recorder();
  const claim = await w.ask(a, req("x"), h);
  const [key] = w.keys("x");
  const deletesKey = (keys: string[]) => keys.includes(key);
  w.etcd.fail("txn", deletesKey);
  let released = false;
  const done = a.end(claim, "released").then(() => released = true);
  await w.clock.advance(2000);
  assert.equal(released, false, "no answer while the key is still in etcd");
  assert.equal(w.keys("x").length, 1);
  const tries = w.etcd.calls.filter((c) => c.kind === "txn" && deletesKey(c.keys)).length;
  assert.ok(tries >= 3, `the delete is tried again (${tries} tries)`);
  w.etcd.heal();
  await w.clock.advance(1000);
  await done;
  assert.equal(released, true);
  assert.equal(w.keys("x").length, 0);
});

Deno.test("etcd store (fake): a silently stalled watch is found from the lease's revisions and opened again", async () => {
  await using w = new World();
  const a = await w.server(3);
  const b = await w.server(3);
  const holder = new Recorder();
  const held = await w.ask(a, req("x"), holder);
  const waiter = new Recorder();
  await w.ask(b, req("x", { wait: 30 }), waiter);
  assert.deepEqual(waiter.log, ["queued:1"]);
  // Every open watch stops delivering, without a word; watches opened later work.
  w.etcd.stallWatches();
  await a.end(held, "released");
  await flush();
  assert.deepEqual(waiter.log, ["queued:1"], "b's watch does not deliver the release");
  // b has only a waiter: it writes nothing by itself. Its lease renewal (every ttl/3 = 1 s)
  // sees etcd ahead of its watch; the heartbeat it writes does not show up within the grace
  // (ttl/5 = 600 ms): the watch is opened again and delivers what was missed.
  await w.clock.advance(1000 + 600 + 50);
  assert.equal(waiter.last?.startsWith("granted:"), true, waiter.log.join(" "));
  assert.ok(b.watchReconnects >= 1);
});

Deno.test("etcd store (fake): a lost lease expires holders, times out waiters, refuses new requests, then recovers", async () => {
  await using w = new World();
  const a = await w.server(3);
  const holder = new Recorder();
  await w.ask(a, req("x"), holder);
  const waiter = new Recorder();
  await w.ask(a, req("x", { wait: 60 }), waiter);
  // etcd cannot be reached any more.
  for (const kind of ["txn", "delete", "grant", "keepalive", "revoke"] as const) w.etcd.fail(kind);
  // Guard: given up 600 ms (ttl/5) before the 3 s lease could run out in etcd.
  await w.clock.advance(2300);
  assert.deepEqual(holder.log.slice(1), [], "still valid 700 ms before the lease could end");
  await w.clock.advance(200);
  assert.deepEqual(holder.log.slice(1), ["expired"]);
  assert.deepEqual(waiter.log, ["queued:1", "timeout"]);
  const refused = new Recorder();
  await w.ask(a, req("z"), refused);
  assert.deepEqual(refused.log, ["refused:store unavailable"]);
  assert.equal(a.available, false);
  w.etcd.heal();
  await w.clock.advance(1100);
  // The old lease was revoked (its keys are gone) and there is a new one.
  assert.equal(w.keys("x").length, 0);
  assert.equal(a.available, true);
  const again = new Recorder();
  await w.ask(a, req("x"), again);
  assert.equal(again.last?.startsWith("granted:"), true);
});

Deno.test("etcd store (fake): a request withdrawn while its transaction is out leaves no key; the wait runs from arrival", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const holder = new Recorder();
  await w.ask(b, req("x"), holder);
  // The next two writes (the placements of x and q) are held back.
  w.etcd.hold("txn", () => true, 2);
  const gone = new Recorder();
  const withdrawn = a.acquire(req("x", { wait: 30 }), gone);
  await flush();
  await a.end(withdrawn, "disconnected");
  const late = new Recorder();
  a.acquire(req("q", { wait: 1 }), late);
  await w.clock.advance(1000);
  assert.deepEqual(late.log, ["timeout"], "the wait counts while the store decides");
  w.etcd.release();
  await flush();
  await w.clock.advance(100);
  assert.deepEqual(gone.log, [], "the owner ended it: it hears nothing");
  assert.equal(w.keys("x").length, 1, "only the holder's key is left");
  assert.equal(w.keys("q").length, 0);
});

Deno.test("etcd store (fake): a transaction retried after a lost answer is granted by a write of its own", async () => {
  await using w = new World();
  const a = await w.server();
  const before = new Recorder();
  await w.ask(a, req("y"), before);
  w.etcd.twice("txn", (keys) => keys.some((k) => k.startsWith(`${PREFIX}/x/`)), 1);
  const h = new Recorder();
  await w.ask(a, req("x"), h);
  assert.equal(h.last?.startsWith("granted:"), true, h.log.join(" "));
  const [kv] = w.etcd.keys(`${PREFIX}/x/`);
  assert.ok(
    h.token > tokenOf(kv.createRevision, 0),
    "not the create revision's: a grant write's revision",
  );
  assert.ok(h.token > before.token);
});

Deno.test("etcd store (fake): writes that are ready together go in one transaction; tokens stay unique and ordered", async () => {
  await using w = new World();
  const a = await w.server();
  const before = w.etcd.calls.filter((c) => c.kind === "txn").length;
  const hs = Array.from({ length: 40 }, () => new Recorder());
  hs.forEach((h, i) => a.acquire(req(`n${i}`), h));
  // Two requests for one name never share a transaction: a tie of create revisions has no order.
  const same = [new Recorder(), new Recorder()];
  for (const h of same) a.acquire(req("same", { wait: 5 }), h);
  await flush();
  await flush();
  const txns = w.etcd.calls.filter((c) => c.kind === "txn").length - before;
  assert.ok(txns <= LANES + 1, `42 requests in ${txns} transactions (one per lane, and one more)`);
  const tokens = hs.map((h) => h.token);
  assert.equal(new Set(tokens).size, tokens.length, "every token is unique");
  assert.equal(same[0].last?.startsWith("granted:"), true);
  assert.deepEqual(same[1].log, ["queued:1"]);
  const [first, second] = w.etcd.keys(`${PREFIX}/same/`);
  assert.ok(first.createRevision < second.createRevision, "placed in two transactions, in order");
  // A token of a later transaction is larger than every token of an earlier one.
  const later = new Recorder();
  await w.ask(a, req("later"), later);
  assert.ok(later.token > Math.max(...tokens, same[0].token));
});

Deno.test("etcd store (fake): shared holders on two servers, a writer on a third; the mode is in the key", async () => {
  await using w = new World();
  const [a, b, c] = [await w.server(), await w.server(), await w.server()];
  const ra = new Recorder(), rb = new Recorder();
  const ca = await w.ask(a, req("x", { mode: "shared" }), ra);
  const cb = await w.ask(b, req("x", { mode: "shared" }), rb);
  assert.equal(ra.last?.startsWith("granted:"), true);
  assert.equal(rb.last?.startsWith("granted:"), true);
  assert.deepEqual(
    w.etcd.keys(`${PREFIX}/x/`).map((kv) => JSON.parse(kv.value).mode),
    ["shared", "shared"],
  );
  const writer = new Recorder();
  await w.ask(c, req("x", { mode: "exclusive", wait: 30 }), writer);
  assert.deepEqual(writer.log, ["queued:1"]);
  assert.equal(JSON.parse(w.etcd.keys(`${PREFIX}/x/`)[2].value).mode, undefined);
  // A reader after the writer, on a server where a reader holds, waits; without a wait, no.
  const late = new Recorder();
  await w.ask(a, req("x", { mode: "shared", wait: 30 }), late);
  assert.deepEqual(late.log, ["queued:2"]);
  const now = new Recorder();
  await w.ask(b, req("x", { mode: "shared" }), now);
  assert.deepEqual(now.log, ["not-granted"]);
  const [info] = c.snapshot();
  assert.deepEqual(info.holders.map((h) => h.mode), ["shared", "shared"]);
  assert.deepEqual([info.waiting_shared, info.waiting_exclusive], [1, 1]);
  await a.end(ca, "released");
  await flush();
  await flush();
  assert.deepEqual(writer.log, ["queued:1"], "one reader still holds");
  await b.end(cb, "released");
  await flush();
  await flush();
  assert.equal(writer.last?.startsWith("granted:"), true);
  assert.ok(writer.token > rb.token);
  assert.deepEqual(late.log, ["queued:2", "queued:1"]);
});

Deno.test("etcd store (fake): a shared request behind more shared holders than it reads is granted through the mirror", async () => {
  await using w = new World();
  const a = await w.server();
  const b = await w.server();
  const hs: Recorder[] = [];
  for (let i = 0; i < 40; i++) {
    const h = new Recorder();
    hs.push(h);
    await w.ask(i % 2 ? a : b, req("x", { mode: "shared" }), h);
  }
  for (const h of hs) assert.equal(h.last?.startsWith("granted:"), true, h.log.join());
  assert.equal(new Set(hs.map((h) => h.token)).size, 40);
  const x = new Recorder();
  await w.ask(a, req("x", { mode: "exclusive" }), x);
  assert.deepEqual(x.log, ["not-granted"]);
});

Deno.test("etcd store (fake): a name's key is written again by the server's next claim, only once the delete of the one before is done", async () => {
  await using w = new World();
  const a = await w.server();
  const claim = await w.ask(a, req("x"), new Recorder());
  const [key] = w.keys("x");
  w.etcd.fail("txn", (keys) => keys.includes(key));
  let released = false;
  const done = a.end(claim, "released").then(() => released = true);
  await w.clock.advance(200);
  // The first key is still in etcd: the next request takes a key of its own (and finds x taken).
  const other = new Recorder();
  await w.ask(a, req("x"), other);
  assert.deepEqual(other.log, ["not-granted"]);
  w.etcd.heal();
  await w.clock.advance(1000);
  await done;
  assert.equal(released, true);
  assert.deepEqual(w.keys("x"), []);
  const next = new Recorder();
  const again = await w.ask(a, req("x"), next);
  assert.equal(next.last?.startsWith("granted:"), true, next.log.join(" "));
  assert.deepEqual(w.keys("x"), [key], "the name's key, written again");
  await a.end(again, "released");
});

Deno.test("etcd store (fake): the late delete event of a name's last claim does not take the lock from the next claim on the same key", async () => {
  await using w = new World();
  const a = await w.server(3);
  const first = await w.ask(a, req("x"), new Recorder());
  const [key] = w.keys("x");
  // The watch holds back the delete of the first claim's key until the next claim has written it.
  w.etcd.stallWatches();
  await a.end(first, "released");
  const second = new Recorder();
  const held = await w.ask(a, req("x"), second);
  assert.deepEqual(w.keys("x"), [key]);
  assert.equal(second.last?.startsWith("granted:"), true, second.log.join(" "));
  w.etcd.resumeWatches();
  await w.clock.advance(3000);
  assert.equal(second.log.length, 1, `still held: ${second.log.join(" ")}`);
  const [info] = a.snapshot();
  assert.equal(info.holders[0].token, Number(second.last!.slice("granted:".length)));
  assert.equal(w.keys("x").length, 1);
  await a.end(held, "released");
  assert.deepEqual(w.keys("x"), []);
});
