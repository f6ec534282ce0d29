// The lock table alone, on an injected clock: deterministic and fast.

import assert from "node:assert/strict";
import { type Claim, type ClaimRequest, LockTable } from "../lib/lock_table.ts";
import { TokenSequence } from "../lib/tokens.ts";

class Recorder {
  log: string[] = [];
  constructor(readonly id: string) {}
  granted(t: number) {
    this.log.push(`granted:${t}`);
  }
  queued(p: number) {
    this.log.push(`queued:${p}`);
  }
  notGranted() {
    this.log.push("not-granted");
  }
  refused(r: string) {
    this.log.push(`refused:${r}`);
  }
  timedOut() {
    this.log.push("timeout");
  }
  expired() {
    this.log.push("expired");
  }
}

function setup(opts: { maxWaiters?: number; maxLocks?: number; maxWait?: number } = {}) {
  let now = 1000;
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
  const deadlines: number[] = [];
  const table = new LockTable({
    tokens,
    now: () => now,
    wallNow: () => 1_700_000_000_000 + now,
    onDeadline: (at) => deadlines.push(at),
    ...opts,
  });
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
    deadlines,
    advance(ms: number) {
      now += ms;
      table.tick();
    },
  };
}

Deno.test("table: grant, not-granted, release hands over to the head of the queue", () => {
  const { table, req } = setup();
  const a = new Recorder("a"), b = new Recorder("b"), c = new Recorder("c"), d = new Recorder("d");
  const ca = table.acquire(req("x"), a);
  table.acquire(req("x"), b);
  const cc = table.acquire(req("x", { wait: 10 }), c);
  table.acquire(req("x", { wait: 10 }), d);
  assert.deepEqual(a.log, ["granted:1"]);
  assert.deepEqual(b.log, ["not-granted"]);
  assert.deepEqual(c.log, ["queued:1"]);
  assert.deepEqual(d.log, ["queued:2"]);
  table.end(ca, "released");
  assert.deepEqual(c.log, ["queued:1", "granted:2"]);
  assert.deepEqual(d.log, ["queued:2", "queued:1"]);
  table.end(cc, "disconnected");
  assert.deepEqual(d.log, ["queued:2", "queued:1", "granted:3"]);
  assert.equal(table.waiting, 0);
  assert.equal(table.holders, 1);
});

Deno.test("table: a waiter's wait runs out at its deadline, not before", () => {
  const { table, req, advance, deadlines } = setup();
  table.acquire(req("x"), new Recorder("h"));
  const w = new Recorder("w");
  table.acquire(req("x", { wait: 2 }), w);
  assert.deepEqual(deadlines, [3000]);
  advance(1999);
  assert.deepEqual(w.log, ["queued:1"]);
  advance(1);
  assert.deepEqual(w.log, ["queued:1", "timeout"]);
  assert.equal(table.waiting, 0);
  assert.equal(table.counters.timedOut, 1);
});

Deno.test("table: a lease expires unless renewed; renewing moves the deadline lazily", () => {
  const { table, req, advance } = setup();
  const h = new Recorder("h");
  const claim = table.acquire(req("x", { ttl: 1 }), h);
  const w = new Recorder("w");
  table.acquire(req("x", { wait: 100 }), w);
  for (let i = 0; i < 5; i++) {
    advance(900);
    table.renew(claim);
  }
  assert.deepEqual(h.log, ["granted:1"]);
  advance(999);
  assert.deepEqual(h.log, ["granted:1"]);
  advance(1);
  assert.deepEqual(h.log, ["granted:1", "expired"]);
  assert.deepEqual(w.log, ["queued:1", "granted:2"]);
  assert.equal(table.counters.expired, 1);
});

Deno.test("table: limit:N semaphores and limit mismatch", () => {
  const { table, req } = setup();
  const rs = [1, 2, 3, 4].map((i) => new Recorder(`r${i}`));
  const claims = rs.map((r) => table.acquire(req("s", { limit: 3, wait: 5 }), r));
  assert.deepEqual(rs.map((r) => r.log[0]), ["granted:1", "granted:2", "granted:3", "queued:1"]);
  const m = new Recorder("m");
  table.acquire(req("s", { limit: 2 }), m);
  assert.deepEqual(m.log, ["refused:limit mismatch"]);
  table.end(claims[1], "released");
  assert.deepEqual(rs[3].log, ["queued:1", "granted:4"]);
});

Deno.test("table: max locks counts new names only; max waiters only for requests that queue", () => {
  const { table, req } = setup({ maxLocks: 1, maxWaiters: 1 });
  table.acquire(req("a"), new Recorder("1"));
  const other = new Recorder("o");
  table.acquire(req("b"), other);
  assert.deepEqual(other.log, ["refused:too many locks"]);
  table.acquire(req("a", { wait: 5 }), new Recorder("w1"));
  const w2 = new Recorder("w2");
  table.acquire(req("a", { wait: 5 }), w2);
  assert.deepEqual(w2.log, ["refused:too many waiters"]);
  const v1 = new Recorder("v1");
  table.acquire(req("a"), v1);
  assert.deepEqual(v1.log, ["not-granted"]);
});

Deno.test("table: max wait cuts long waits", () => {
  const { table, req, advance } = setup({ maxWait: 1 });
  table.acquire(req("x"), new Recorder("h"));
  const w = new Recorder("w");
  table.acquire(req("x", { wait: 3600 }), w);
  advance(1000);
  assert.deepEqual(w.log, ["queued:1", "timeout"]);
});

Deno.test("table: the deadline heap fires every lease and wait in time order under random load", () => {
  const { table, req, advance } = setup();
  const fired: { at: number; due: number }[] = [];
  let clock = 1000;
  const claims: Claim[] = [];
  let rnd = 12345;
  const random = () => (rnd = (rnd * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let i = 0; i < 500; i++) {
    const ttl = Math.round(random() * 50) / 10 + 0.1;
    const due = clock + ttl * 1000;
    const rec = {
      ...new Recorder(`c${i}`),
      granted() {},
      queued() {},
      notGranted() {},
      refused() {},
      timedOut() {},
      expired: () => fired.push({ at: clock, due }),
    };
    claims.push(table.acquire(req(`n${i}`, { ttl }), rec));
  }
  // End a third of them early: they must never fire.
  for (let i = 0; i < claims.length; i += 3) table.end(claims[i], "released");
  for (let step = 0; step < 600; step++) {
    clock += 10;
    advance(10);
  }
  assert.equal(fired.length, 500 - Math.ceil(500 / 3));
  for (const f of fired) assert.ok(f.at >= f.due && f.at < f.due + 10, JSON.stringify(f));
  assert.equal(table.holders, 0);
  assert.equal(table.size, 0);
  assert.equal(table.nextDeadline(), undefined);
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
