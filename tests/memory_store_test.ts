// The memory store and its claim book, on a fake clock: deterministic and fast.

import assert from "node:assert/strict";
import { MemoryStore } from "../lib/store/memory_store.ts";
import { conflicts, holdingPrefix, modeFitsLimit } from "../lib/store/rules.ts";
import type { ClaimHandler, ClaimRequest, ClaimView, StoreEvent } from "../lib/store/types.ts";
import { TokenSequence } from "../lib/tokens.ts";
import { FakeClock, flush } from "./_util/fake_clock.ts";
import { Recorder } from "./_util/recorder.ts";

function setup(opts: { maxWaiters?: number; maxLocks?: number; maxWait?: number } = {}) {
  const clock = new FakeClock();
  let seq = 0;
  const tokens = {
    next: () => ++seq,
    get last() {
      return seq;
    },
    get issued() {
      return seq;
    },
  };
  const events: StoreEvent[] = [];
  const table = new MemoryStore({ tokens, clock, onEvent: (e) => events.push(e), ...opts });
  const req = (name: string, extra: Partial<ClaimRequest> = {}): ClaimRequest => ({
    name,
    limit: 1,
    wait: 0,
    clientId: "",
    remote: "127.0.0.1:1",
    ...extra,
  });
  return {
    table,
    req,
    clock,
    events,
    /** Asks, and lets the outcome arrive. */
    async acquire(r: ClaimRequest, h: ClaimHandler): Promise<ClaimView> {
      const claim = table.acquire(r, h);
      await flush();
      return claim;
    },
    async end(claim: ClaimView, reason: "released" | "disconnected" = "released") {
      await table.end(claim, reason);
      await flush();
    },
    advance: (ms: number) => clock.advance(ms),
  };
}

Deno.test("memory store: grant, not-granted, release hands over to the head of the queue", async () => {
  const { table, req, acquire, end, advance } = setup();
  const a = new Recorder("a"), b = new Recorder("b"), c = new Recorder("c"), d = new Recorder("d");
  const ca = await acquire(req("x"), a);
  await acquire(req("x"), b);
  const cc = await acquire(req("x", { wait: 10 }), c);
  await acquire(req("x", { wait: 10 }), d);
  assert.deepEqual(a.log, ["granted:1"]);
  assert.deepEqual(b.log, ["not-granted"]);
  assert.deepEqual(c.log, ["queued:1"]);
  assert.deepEqual(d.log, ["queued:2"]);
  await end(ca, "released");
  assert.deepEqual(c.log, ["queued:1", "granted:2"]);
  // Those still waiting learn their new places within 10 ms (one pass for a burst of moves).
  assert.deepEqual(d.log, ["queued:2"]);
  await advance(10);
  assert.deepEqual(d.log, ["queued:2", "queued:1"]);
  await end(cc, "disconnected");
  assert.deepEqual(d.log, ["queued:2", "queued:1", "granted:3"]);
  assert.equal(table.waiting, 0);
  assert.equal(table.holders, 1);
});

Deno.test("memory store: a waiter's wait runs out at its deadline, not before", async () => {
  const { table, req, acquire, advance, clock } = setup();
  await acquire(req("x"), new Recorder("h"));
  const w = new Recorder("w");
  await acquire(req("x", { wait: 2 }), w);
  assert.equal(clock.nextAt, 3000);
  await advance(1999);
  assert.deepEqual(w.log, ["queued:1"]);
  await advance(1);
  assert.deepEqual(w.log, ["queued:1", "timeout"]);
  assert.equal(table.waiting, 0);
  assert.equal(table.counters.timedOut, 1);
});

Deno.test("memory store: a lease expires unless renewed; renewing moves the deadline lazily", async () => {
  const { table, req, acquire, advance } = setup();
  const h = new Recorder("h");
  const claim = await acquire(req("x", { ttl: 1 }), h);
  const w = new Recorder("w");
  await acquire(req("x", { wait: 100 }), w);
  for (let i = 0; i < 5; i++) {
    await advance(900);
    table.renew(claim);
  }
  assert.deepEqual(h.log, ["granted:1"]);
  await advance(999);
  assert.deepEqual(h.log, ["granted:1"]);
  await advance(1);
  assert.deepEqual(h.log, ["granted:1", "expired"]);
  assert.deepEqual(w.log, ["queued:1", "granted:2"]);
  assert.equal(table.counters.expired, 1);
});

Deno.test("memory store: limit:N semaphores and limit mismatch", async () => {
  const { req, acquire, end } = setup();
  const rs = [1, 2, 3, 4].map((i) => new Recorder(`r${i}`));
  const claims: ClaimView[] = [];
  for (const r of rs) claims.push(await acquire(req("s", { limit: 3, wait: 5 }), r));
  assert.deepEqual(rs.map((r) => r.log[0]), ["granted:1", "granted:2", "granted:3", "queued:1"]);
  const m = new Recorder("m");
  await acquire(req("s", { limit: 2 }), m);
  assert.deepEqual(m.log, ["refused:limit mismatch"]);
  await end(claims[1], "released");
  assert.deepEqual(rs[3].log, ["queued:1", "granted:4"]);
});

Deno.test("memory store: max locks counts new names only; max waiters only for requests that queue", async () => {
  const { req, acquire } = setup({ maxLocks: 1, maxWaiters: 1 });
  await acquire(req("a"), new Recorder("1"));
  const other = new Recorder("o");
  await acquire(req("b"), other);
  assert.deepEqual(other.log, ["refused:too many locks"]);
  await acquire(req("a", { wait: 5 }), new Recorder("w1"));
  const w2 = new Recorder("w2");
  await acquire(req("a", { wait: 5 }), w2);
  assert.deepEqual(w2.log, ["refused:too many waiters"]);
  const v1 = new Recorder("v1");
  await acquire(req("a"), v1);
  assert.deepEqual(v1.log, ["not-granted"]);
});

Deno.test("memory store: max wait cuts long waits", async () => {
  const { req, acquire, advance } = setup({ maxWait: 1 });
  await acquire(req("x"), new Recorder("h"));
  const w = new Recorder("w");
  await acquire(req("x", { wait: 3600 }), w);
  await advance(1000);
  assert.deepEqual(w.log, ["queued:1", "timeout"]);
});

Deno.test("memory store: the deadline heap fires every lease and wait in time order under random load", async () => {
  const { table, req, acquire, end, advance, clock } = setup();
  const fired: { at: number; due: number }[] = [];
  let t = 1000;
  const claims: ClaimView[] = [];
  let rnd = 12345;
  const random = () => (rnd = (rnd * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let i = 0; i < 500; i++) {
    const ttl = Math.round(random() * 50) / 10 + 0.1;
    const due = t + ttl * 1000;
    const rec = {
      ...new Recorder(`c${i}`),
      granted() {},
      queued() {},
      notGranted() {},
      refused() {},
      timedOut() {},
      expired: () => fired.push({ at: t, due }),
    };
    claims.push(await acquire(req(`n${i}`, { ttl }), rec));
  }
  // End a third of them early: they must never fire.
  for (let i = 0; i < claims.length; i += 3) await end(claims[i], "released");
  for (let step = 0; step < 600; step++) {
    t += 10;
    await advance(10);
  }
  assert.equal(fired.length, 500 - Math.ceil(500 / 3));
  for (const f of fired) assert.ok(f.at >= f.due && f.at < f.due + 10, JSON.stringify(f));
  assert.equal(table.holders, 0);
  assert.equal(table.size, 0);
  assert.equal(clock.pending, 0);
});

Deno.test("rules: the holders are the prefix of the queue that fits; mixed limits never hold together", () => {
  assert.equal(holdingPrefix([]), 0);
  assert.equal(holdingPrefix([{ limit: 1 }, { limit: 1 }]), 1);
  assert.equal(holdingPrefix([{ limit: 3 }, { limit: 3 }, { limit: 3 }, { limit: 3 }]), 3);
  // A stale limit:3 key at the head and a limit:1 waiter behind it: only the head holds.
  assert.equal(holdingPrefix([{ limit: 3 }, { limit: 1 }, { limit: 3 }]), 1);
  assert.equal(holdingPrefix([{ limit: 1 }, { limit: 3 }]), 1);
});

Deno.test("rules: modes: a run of shared claims holds together, an exclusive one alone", () => {
  const S = { limit: 1, mode: "shared" } as const;
  const X = { limit: 1, mode: "exclusive" } as const;
  const plain = { limit: 1 };
  assert.equal(holdingPrefix([S, S, S]), 3);
  assert.equal(holdingPrefix([S, S, X, S]), 2, "readers after a writer wait for it");
  assert.equal(holdingPrefix([X, S, S]), 1);
  assert.equal(holdingPrefix([plain, S]), 1, "no mode is exclusive");
  assert.equal(holdingPrefix([S, plain]), 1);
  // A shared claim and a limit:N one conflict, either way round; limit 1 without a mode does not.
  assert.ok(conflicts(S, { limit: 3 }) && conflicts({ limit: 3 }, S));
  assert.ok(!conflicts(S, plain) && !conflicts(X, S));
  // A bogus key value (shared with a limit) never holds beside anything of limit 1.
  assert.ok(conflicts({ limit: 2, mode: "shared" }, { limit: 2 }));
  assert.ok(modeFitsLimit("shared", 1) && !modeFitsLimit("shared", 2));
  assert.ok(modeFitsLimit("exclusive", 5) && modeFitsLimit(undefined, 5));
});

Deno.test("memory store: outcomes arrive after acquire() returns, and never after the owner ended the claim", async () => {
  const { table, req } = setup();
  const a = new Recorder("a");
  const claim = table.acquire(req("x"), a);
  assert.deepEqual(a.log, [], "no session code runs inside the store's call");
  assert.equal(claim.state, "holding");
  await flush();
  assert.deepEqual(a.log, ["granted:1"]);
  const b = new Recorder("b");
  const waiter = table.acquire(req("x", { wait: 5 }), b);
  const ended = table.end(waiter, "disconnected");
  assert.ok(ended instanceof Promise, "end() always returns a promise");
  await ended;
  await flush();
  assert.deepEqual(b.log, [], "a claim its owner ended hears nothing, not even its queued line");
  const released = table.end(claim, "released");
  assert.ok(released instanceof Promise);
  await released;
  assert.equal(table.size, 0);
  assert.ok((await table.end(claim, "released")) === undefined, "ending twice is harmless");
});

Deno.test("memory store: an unwritable state file refuses the grant with store unavailable and leaves nothing behind", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/mark`;
    const tokens = new TokenSequence({ stateFile: file, block: 1, nowMicros: () => 10 });
    const clock = new FakeClock();
    const table = new MemoryStore({ tokens, clock, maxLocks: 3 });
    await table.start(); // reserves the first block: 11 and 12
    const req = (name: string, wait = 0): ClaimRequest => ({
      name,
      limit: 1,
      wait,
      clientId: "",
      remote: "127.0.0.1:1",
    });
    const h1 = new Recorder("1");
    const c1 = table.acquire(req("a"), h1);
    const w = new Recorder("w");
    table.acquire(req("a", 5), w);
    await flush();
    assert.deepEqual(h1.log, ["granted:11"]);
    // The disk goes away under the server: the next block cannot be reserved.
    await Deno.remove(dir, { recursive: true });
    const h2 = new Recorder("2");
    table.acquire(req("b"), h2); // token 12 is still reserved
    await flush();
    assert.deepEqual(h2.log, ["granted:12"]);
    const h3 = new Recorder("3");
    table.acquire(req("c"), h3);
    await flush();
    assert.deepEqual(h3.log, ["refused:store unavailable"]);
    // A hand-over that cannot take a token refuses the waiter instead of granting silently.
    await table.end(c1, "released");
    await flush();
    assert.deepEqual(w.log, ["queued:1", "refused:store unavailable"]);
    const names = table.snapshot().map((l) => l.name);
    assert.deepEqual(names, ["b"], "no empty entries are left in .locks");
    assert.equal(table.size, 1, "refused names do not count against --max-locks");
    assert.equal(table.holders, 1);
    assert.equal(table.waiting, 0);
    assert.equal(tokens.last, 12, "no token was taken by a refused grant");
    await table.close();
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("tokens: an unwritable state file is found at start-up, with its name in the message", () => {
  // Nobody, root included, can create a file in /proc: the reservation fails as it would on a
  // read-only or full disk.
  const tokens = new TokenSequence({ stateFile: "/proc/tcpnetlock-test-mark" });
  assert.throws(
    () => tokens.prepare(),
    /Cannot write the state file "\/proc\/tcpnetlock-test-mark": /,
  );
  assert.equal(tokens.issued, 0);
});

Deno.test("tokens: a state file makes a restarted sequence start above every token handed out", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/mark`;
    const clockBehind = () => 5;
    const one = new TokenSequence({ stateFile: file, block: 10, nowMicros: clockBehind });
    let last = 0;
    for (let i = 0; i < 25; i++) last = one.next();
    assert.equal(last, 30);
    const mark = Number(await Deno.readTextFile(file));
    assert.ok(mark >= last);
    const two = new TokenSequence({ stateFile: file, block: 10, nowMicros: clockBehind });
    assert.ok(two.next() > last);
    const three = new TokenSequence({ nowMicros: () => 1e15 });
    assert.equal(three.next(), 1e15 + 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("memory store: a burst of departures tells those behind their places once, not once per departure", async () => {
  const { req, acquire, end, advance } = setup();
  await acquire(req("q"), new Recorder("holder"));
  const front: Awaited<ReturnType<typeof acquire>>[] = [];
  for (let i = 0; i < 50; i++) {
    front.push(await acquire(req("q", { wait: 10 }), new Recorder(`f${i}`)));
  }
  const last = new Recorder("last");
  await acquire(req("q", { wait: 10 }), last);
  assert.deepEqual(last.log, ["queued:51"]);
  for (const c of front) await end(c, "disconnected");
  await advance(10);
  assert.deepEqual(last.log, ["queued:51", "queued:1"]);
});
