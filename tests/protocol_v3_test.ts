// Version 3 of the protocol: sessions (many locks over one connection, multiplexed by id).
// Every rule of "Sessions" in ../shared/PROTOCOL.md / docs/protocol.md has a test here; the suite
// also runs against the etcd store (tests/run_with_etcd.ts).

import assert from "node:assert/strict";
import { exchange, RawClient, settledLocks, startTestServer, until } from "./test_util.ts";

/** A raw session: sends lines, reads replies, keeps the ones read ahead for later. */
class RawSession implements AsyncDisposable {
  readonly raw: RawClient;
  readonly #ahead: string[] = [];

  private constructor(raw: RawClient) {
    this.raw = raw;
  }

  /** Connects and opens a session with `opening` (default `session`); checks the reply. */
  static async open(port: number, opening = "session"): Promise<RawSession> {
    const raw = await RawClient.connect(port);
    const reply = await raw.request(opening);
    assert.match(reply ?? "", /^session,version:3,max-ids:\d+$/);
    return new RawSession(raw);
  }

  send(...lines: string[]): Promise<void> {
    return this.raw.write(lines.map((l) => l + "\n").join(""));
  }

  /** The next line (read ahead ones first); null at end of stream. */
  async line(): Promise<string | null> {
    return this.#ahead.shift() ?? await this.raw.line();
  }

  /** Reads until a line matches `re`, keeping the others for later; returns the match. */
  async until(re: RegExp): Promise<string> {
    const i = this.#ahead.findIndex((l) => re.test(l));
    if (i >= 0) return this.#ahead.splice(i, 1)[0];
    for (;;) {
      const l = await this.raw.line();
      assert.ok(l !== null, `closed before ${re}; kept ${JSON.stringify(this.#ahead)}`);
      if (re.test(l)) return l;
      this.#ahead.push(l);
    }
  }

  /** The next `count` lines, as a sorted list (for replies whose order across ids is free). */
  async lines(count: number): Promise<string[]> {
    const out: string[] = [];
    for (let i = 0; i < count; i++) {
      const l = await this.line();
      assert.ok(l !== null, `closed after ${JSON.stringify(out)}`);
      out.push(l);
    }
    return out.sort();
  }

  /** Every line until the server closes. */
  async rest(): Promise<string[]> {
    return [...this.#ahead.splice(0), ...await this.raw.rest()];
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.raw.close();
    return Promise.resolve();
  }
}

const OK = (id: string) => new RegExp(`^ok,token:\\d+,id:${id}$`);
function tokenOf(line: string): number {
  const m = /^ok,token:(\d+),id:/.exec(line);
  assert.ok(m, `expected ok,token:T,id:ID, got ${line}`);
  return Number(m[1]);
}

Deno.test("session: opening, pong, alive and bad-action (the session stays)", async () => {
  await using srv = await startTestServer({ maxSessionLocks: 7 });
  await using c = await RawClient.connect(srv.port);
  assert.equal(await c.request("session,client-id:web-1,ttl:30"), "session,version:3,max-ids:7");
  assert.equal(await c.request(".ping"), "pong", "pong carries no id");
  assert.equal(await c.request(".keepalive"), "alive");
  assert.equal(await c.request(".stats"), "bad-action", "admin actions are first-line only");
  assert.equal(await c.request("frobnicate,id:a"), "bad-action", "the session stays");
  assert.match((await c.request("lock,id:a,name:first")) ?? "", OK("a"));
  const locks = await settledLocks(srv);
  assert.equal(locks[0]?.holders[0]?.client_id, "web-1", "the session's client id is the holder's");
});

Deno.test("session: a bad opening line is refused and closed", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(await exchange(srv.port, "session,client-id:a b\n"), ["err,invalid client id"]);
  assert.deepEqual(await exchange(srv.port, "session,ttl:0\n"), ["err,invalid ttl"]);
  assert.deepEqual(await exchange(srv.port, "session,ttl:5s\n"), ["err,invalid ttl"]);
});

Deno.test("session: auth is required on the session line, not on later lines", async () => {
  await using srv = await startTestServer({ authToken: "s3cret" });
  assert.deepEqual(await exchange(srv.port, "session\n"), ["err,unauthorized"]);
  await using s = await RawSession.open(srv.port, "session,auth:s3cret");
  await s.send("lock,id:a,name:authed");
  assert.match((await s.line())!, OK("a"));
});

Deno.test("session: ids must match [a-zA-Z0-9_-]{1,32}; a bad one is answered and the session stays", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send(
    "lock,name:x",
    "lock,id:,name:x",
    "lock,id:a.b,name:x",
    `lock,id:${"x".repeat(33)},name:x`,
    "release",
    "cancel,id:a b",
  );
  assert.deepEqual(await s.lines(6), Array(6).fill("err,invalid id"));
  await s.send(`lock,id:${"x".repeat(32)},name:x`);
  assert.match((await s.line())!, OK("x".repeat(32)));
});

Deno.test("session: a lock line is checked like a version 2 one; a ttl inside a session is refused", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send(
    "lock,id:a,name:bad name",
    "lock,id:b,name:x,client-id:a b",
    "lock,id:c,name:x,wait:5s",
    "lock,id:d,name:x,ttl:5",
    "lock,id:e,name:x,limit:0",
  );
  assert.deepEqual(await s.lines(5), [
    "err,invalid client id,id:b",
    "err,invalid limit,id:e",
    "err,invalid lock name,id:a",
    "err,invalid ttl,id:d",
    "err,invalid wait,id:c",
  ]);
  // Refused ids are not live: they can be used again at once.
  await s.send("lock,id:a,name:x");
  assert.match((await s.line())!, OK("a"));
});

Deno.test("session: lock and release lines in any field order, with blanks or a field twice, read as in version 2", async () => {
  // `lock,id:X,name:N` and `release,id:X` have a quick path; every variant must get the answer
  // the general parse gives (blanks trimmed, the last of a repeated field counts).
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send(
    "lock,name:q1,id:a",
    "lock, id:b ,name:q2",
    "lock,id:c,id:d,name:q3",
    "lock,id:e,name:q4,name:q5",
  );
  // The replies' order across ids is free (the etcd store's tokens do not follow the lines).
  const granted = await s.lines(4);
  assert.deepEqual(granted.map((l) => /,id:(.*)$/.exec(l)?.[1]).sort(), ["a", "b", "d", "e"]);
  for (const l of granted) assert.match(l, /^ok,token:\d+,id:[abde]$/);
  // q5 is held by e, q4 by no one.
  await using other = await RawSession.open(srv.port);
  await other.send("lock,id:x,name:q5,wait:0", "lock,id:y,name:q4");
  const [refused, free] = await other.lines(2);
  assert.equal(refused, "not-granted,id:x");
  assert.match(free, OK("y"));
  await s.send("release, id:a", "release,id:b", "release,id:c", "release,id:d ", "release,id:e");
  assert.deepEqual(await s.lines(5), [
    "err,unknown id,id:c",
    "released,id:a",
    "released,id:b",
    "released,id:d",
    "released,id:e",
  ]);
});

Deno.test("session: pipelined requests are multiplexed by id; replies for one id keep their order", async () => {
  await using srv = await startTestServer();
  await using other = await RawSession.open(srv.port);
  await other.send("lock,id:h,name:busy");
  assert.match((await other.line())!, OK("h"));

  await using s = await RawSession.open(srv.port);
  // One write, many requests: a wait, two grants, a refusal.
  await s.send(
    "lock,id:w,name:busy,wait:30",
    "lock,id:a,name:p1",
    "lock,id:b,name:p2,wait:0",
    "lock,id:n,name:busy",
  );
  const first = await s.lines(4);
  assert.equal(first.filter((l) => OK("a").test(l) || OK("b").test(l)).length, 2, `${first}`);
  assert.ok(first.includes("queued,position:1,id:w"), `${first}`);
  assert.ok(first.includes("not-granted,id:n"), `${first}`);
  assert.equal(srv.server.table.holders, 3);
  // The waiter is granted when the other session releases, while a and b are still held.
  await other.send("release,id:h");
  assert.equal(await other.line(), "released,id:h");
  const granted = await s.until(OK("w"));
  const tokens = first.filter((l) => l.startsWith("ok,")).map(tokenOf);
  assert.ok(tokens.every((t) => tokenOf(granted) > t), "tokens increase across ids");
  await s.send("release,id:a", "release,id:w", "release,id:b");
  assert.deepEqual(await s.lines(3), ["released,id:a", "released,id:b", "released,id:w"]);
  assert.equal(srv.server.table.holders, 0);
});

Deno.test("session: a live id is a duplicate; a released, refused or timed out one may be reused", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send("lock,id:a,name:d1");
  assert.match((await s.line())!, OK("a"));
  await s.send("lock,id:a,name:d2");
  assert.equal(await s.line(), "err,duplicate id,id:a");
  assert.equal((await settledLocks(srv)).length, 1, "the duplicate took nothing");
  // Release and reuse in one write: the reuse's reply comes after `released`.
  await s.send("release,id:a", "lock,id:a,name:d2");
  assert.equal(await s.line(), "released,id:a");
  assert.match((await s.line())!, OK("a"));
  // A waiting id is live too.
  await using other = await RawSession.open(srv.port);
  await other.send("lock,id:w,name:d2,wait:30", "lock,id:w,name:d3");
  assert.deepEqual(await other.lines(2), ["err,duplicate id,id:w", "queued,position:1,id:w"]);
  // Timed out: reusable.
  await other.send("lock,id:t,name:d2,wait:0.05");
  assert.equal(await other.until(/,id:t$/), "queued,position:2,id:t");
  assert.equal(await other.until(/,id:t$/), "timeout,id:t");
  await other.send("lock,id:t,name:d4");
  assert.match(await other.until(/,id:t$/), OK("t"));
});

Deno.test("session: release or cancel of an id that is not live is `err,unknown id`", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send("release,id:nope", "cancel,id:nope");
  assert.deepEqual(await s.lines(2), ["err,unknown id,id:nope", "err,unknown id,id:nope"]);
  await s.send("lock,id:a,name:u");
  assert.match((await s.line())!, OK("a"));
  await s.send("release,id:a", "release,id:a");
  assert.equal(await s.line(), "released,id:a");
  assert.equal(await s.line(), "err,unknown id,id:a", "released twice");
});

Deno.test("session: cancel takes a waiting request out of the queue; the next in line moves up", async () => {
  await using srv = await startTestServer();
  await using holder = await RawSession.open(srv.port);
  await holder.send("lock,id:h,name:c");
  assert.match((await holder.line())!, OK("h"));
  await using s = await RawSession.open(srv.port);
  await s.send("lock,id:w1,name:c,wait:30");
  assert.equal(await s.line(), "queued,position:1,id:w1");
  await using v2 = await RawClient.connect(srv.port);
  assert.equal(await v2.request("lock,name:c,wait:30"), "queued,position:2");
  await s.send("cancel,id:w1");
  assert.equal(await s.line(), "cancelled,id:w1");
  assert.equal(await v2.line(), "queued,position:1", "the version 2 waiter behind moves up");
  assert.equal(srv.server.table.waiting, 1);
  await holder.send("release,id:h");
  assert.match((await v2.line())!, /^ok,token:\d+$/);
});

Deno.test("session: a session's waiters and version 2 waiters share one FIFO queue", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.match((await holder.request("lock,name:f,wait:0"))!, /^ok,/);
  await using s = await RawSession.open(srv.port);
  await using v2 = await RawClient.connect(srv.port);
  await s.send("lock,id:a,name:f,wait:30");
  assert.equal(await s.line(), "queued,position:1,id:a");
  assert.equal(await v2.request("lock,name:f,wait:30"), "queued,position:2");
  await s.send("lock,id:b,name:f,wait:30");
  assert.equal(await s.line(), "queued,position:3,id:b");
  assert.equal(await holder.request("release"), "released");
  assert.match(await s.until(/,id:a$/), OK("a"));
  await s.send("release,id:a");
  assert.match((await v2.line())!, /^ok,token:\d+$/);
  assert.equal(await v2.request("release"), "released");
  assert.match(await s.until(/^ok,.*,id:b$/), OK("b"));
});

Deno.test("session: the lease belongs to the session; every line renews it", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port, "session,ttl:0.3");
  await s.send("lock,id:a,name:l1");
  assert.match((await s.line())!, OK("a"));
  // Lines 100 ms apart for 0.9 s (three ttls): the lock stays.
  for (let i = 0; i < 9; i++) {
    await new Promise((r) => setTimeout(r, 100));
    await s.send(".keepalive");
    assert.equal(await s.line(), "alive");
  }
  assert.equal(srv.server.table.holders, 1);
});

Deno.test("session: when the lease runs out, holders get expired, waiters timeout, and it closes", async () => {
  await using srv = await startTestServer();
  await using other = await RawClient.connect(srv.port);
  assert.match((await other.request("lock,name:l3,wait:0"))!, /^ok,/);
  await using s = await RawSession.open(srv.port, "session,ttl:0.2");
  await s.send("lock,id:a,name:l2", "lock,id:w,name:l3,wait:30");
  assert.deepEqual((await s.lines(2)).map((l) => l.replace(/\d+/, "T")), [
    "ok,token:T,id:a",
    "queued,position:T,id:w",
  ]);
  const started = performance.now();
  assert.deepEqual((await s.rest()).sort(), ["expired,id:a", "timeout,id:w"]);
  assert.ok(performance.now() - started >= 150, "not before the ttl");
  await until(() => srv.server.table.holders === 1 && srv.server.table.waiting === 0, "freed");
  const stats = srv.server.stats();
  assert.equal(stats.lock_expired_count, 1, "the expiry is counted");
  assert.equal(stats.lock_not_acquired_count, 1, "the waiter's timeout is counted");
  await using c = await RawClient.connect(srv.port);
  assert.match((await c.request("lock,name:l2,wait:0"))!, /^ok,/, "the expired lock is free");
});

Deno.test("session: when the connection ends, every lock is freed and every waiter leaves, at once", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.match((await holder.request("lock,name:gone-w,wait:0"))!, /^ok,/);
  const s = await RawSession.open(srv.port);
  const lines = Array.from({ length: 50 }, (_, i) => `lock,id:l${i},name:gone-${i}`);
  await s.send(...lines, "lock,id:w,name:gone-w,wait:30");
  const replies = await s.lines(51);
  assert.equal(replies.filter((l) => l.startsWith("ok,")).length, 50);
  assert.equal(srv.server.table.holders, 51);
  assert.equal(srv.server.table.waiting, 1);
  s.raw.close();
  await until(
    () => srv.server.table.holders === 1 && srv.server.table.waiting === 0,
    "the session's locks freed",
  );
  await using c = await RawSession.open(srv.port);
  await c.send(...lines);
  assert.equal((await c.lines(50)).filter((l) => l.startsWith("ok,")).length, 50);
});

Deno.test("session: a bad request line or an over-long line closes the session and frees it all", async () => {
  await using srv = await startTestServer({ maxLine: 64 });
  for (const bad of [",x", "lock,:v", "x".repeat(100)]) {
    await using s = await RawSession.open(srv.port);
    await s.send("lock,id:a,name:b1");
    assert.match((await s.line())!, OK("a"));
    await s.send(bad);
    assert.deepEqual(await s.rest(), ["bad-request"], JSON.stringify(bad));
    await until(() => srv.server.table.holders === 0, "freed");
  }
});

Deno.test("session: --max-session-locks caps the live ids of one session", async () => {
  await using srv = await startTestServer({ maxSessionLocks: 3 });
  await using holder = await RawClient.connect(srv.port);
  assert.match((await holder.request("lock,name:m-w,wait:0"))!, /^ok,/);
  await using s = await RawSession.open(srv.port);
  // A waiting id counts as live.
  await s.send("lock,id:a,name:m1", "lock,id:b,name:m2", "lock,id:c,name:m-w,wait:30");
  await s.lines(3);
  await s.send("lock,id:d,name:m4");
  assert.equal(await s.line(), "err,too many locks,id:d");
  await s.send("cancel,id:c", "lock,id:d,name:m4");
  const [cancelled, granted] = await s.lines(2);
  assert.equal(cancelled, "cancelled,id:c");
  assert.match(granted, OK("d"), "the cancelled id no longer counts");
  // Another session has its own count.
  await using t = await RawSession.open(srv.port);
  await t.send("lock,id:a,name:m5");
  assert.match((await t.line())!, OK("a"));
});

Deno.test("session: the server's other limits apply to each request (--max-locks)", async () => {
  await using srv = await startTestServer({ maxLocks: 2 });
  await using s = await RawSession.open(srv.port);
  await s.send("lock,id:a,name:x1", "lock,id:b,name:x2");
  await s.lines(2);
  await s.send("lock,id:c,name:x3");
  assert.equal(await s.line(), "err,too many locks,id:c");
});

Deno.test("session: a version 1 request on a fresh connection beside a session still works", async () => {
  await using srv = await startTestServer();
  await using s = await RawSession.open(srv.port);
  await s.send("lock,id:a,name:shared-name");
  assert.match((await s.line())!, OK("a"));
  assert.deepEqual(await exchange(srv.port, "lock,name:shared-name\n"), ["not-granted"]);
  await using v1 = await RawClient.connect(srv.port);
  assert.equal(await v1.request("lock,name:other-name"), "ok");
  await s.send("lock,id:b,name:other-name");
  assert.equal(await s.line(), "not-granted,id:b");
  assert.equal(await v1.request("release"), "released");
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"]);
  const [stats] = await exchange(srv.port, ".stats\n");
  assert.match(stats, /^stats,\{.*"lock_count":1/);
});

Deno.test("session: a server with sessions off answers `session` like a version 2 server", async () => {
  await using srv = await startTestServer({ sessions: false });
  assert.deepEqual(await exchange(srv.port, "session\n"), ["bad-action"]);
});

Deno.test("session: server shutdown frees the session's locks and closes it", async () => {
  const srv = await startTestServer();
  const s = await RawSession.open(srv.port);
  await s.send("lock,id:a,name:sd");
  assert.match((await s.line())!, OK("a"));
  await srv.server.close();
  assert.deepEqual(await s.rest(), []);
  assert.equal(srv.server.table.holders, 0);
  s.raw.close();
});

Deno.test("session: mode:shared locks of two sessions hold at once; a writer queues behind them", async () => {
  await using srv = await startTestServer();
  await using a = await RawSession.open(srv.port);
  await using b = await RawSession.open(srv.port);
  await a.send("lock,id:r,name:ds,mode:shared");
  assert.match(await a.until(/,id:r$/), /^ok,token:\d+,id:r$/);
  await b.send("lock,id:r,name:ds,mode:shared", "lock,id:w,name:ds,mode:exclusive,wait:10");
  assert.match(await b.until(/,id:r$/), /^ok,token:\d+,id:r$/);
  assert.equal(await b.until(/,id:w$/), "queued,position:1,id:w");
  // A reader after the waiting writer waits too; a bad mode is refused with its id.
  await a.send("lock,id:r2,name:ds,mode:shared,wait:10", "lock,id:x,name:ds,mode:read");
  assert.equal(await a.until(/,id:x$/), "err,invalid mode,id:x");
  assert.equal(await a.until(/,id:r2$/), "queued,position:2,id:r2");
  await a.send("release,id:r");
  assert.equal(await a.until(/,id:r$/), "released,id:r");
  await b.send("release,id:r");
  assert.equal(await b.until(/,id:r$/), "released,id:r");
  assert.match(await b.until(/^ok,.*,id:w$/), /^ok,token:\d+,id:w$/);
  await b.send("release,id:w");
  assert.match(await a.until(/^ok,.*,id:r2$/), /^ok,token:\d+,id:r2$/);
});
