// Version 2 of the protocol: fair waiting, leases, semaphores, tokens, introspection, limits.

import assert from "node:assert/strict";
import { exchange, RawClient, startTestServer, until } from "./test_util.ts";

function token(reply: string | null): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  assert.ok(m, `expected ok,token:T, got ${reply}`);
  return Number(m[1]);
}

/** Reads lines until one matches `re`; returns every line read. */
async function readUntil(c: RawClient, re: RegExp): Promise<string[]> {
  const seen: string[] = [];
  for (;;) {
    const l = await c.line();
    assert.ok(l !== null, `connection closed before ${re}; saw ${JSON.stringify(seen)}`);
    seen.push(l);
    if (re.test(l)) return seen;
  }
}

Deno.test("ten waiters are granted strictly in arrival order; positions only go down", async () => {
  await using srv = await startTestServer();
  const holder = await RawClient.connect(srv.port);
  let last = token(await holder.request("lock,name:q,wait:0"));
  const waiters: RawClient[] = [];
  try {
    for (let i = 1; i <= 10; i++) {
      const w = await RawClient.connect(srv.port);
      waiters.push(w);
      // Arrival order is fixed by waiting for each one's queued line before the next connects.
      assert.equal(await w.request("lock,name:q,wait:30,client-id:w" + i), `queued,position:${i}`);
    }
    assert.equal(await holder.request("release"), "released");
    for (let i = 0; i < 10; i++) {
      // Waiter i+1 has seen only positions smaller than its first one, strictly decreasing
      // (moves within 50 ms are folded into one line with the newest position), then its grant.
      const lines = await readUntil(waiters[i], /^ok,/);
      const positions = lines.slice(0, -1).map((l) => {
        const m = /^queued,position:(\d+)$/.exec(l);
        assert.ok(m, `waiter ${i + 1}: unexpected line ${l}`);
        return Number(m[1]);
      });
      let above = i + 1;
      for (const p of positions) {
        assert.ok(p < above && p >= 1, `waiter ${i + 1}: positions ${positions}`);
        above = p;
      }
      const t = token(lines.at(-1)!);
      assert.ok(t > last, "tokens increase");
      last = t;
      // Nobody behind has been granted while this one holds.
      assert.equal(srv.server.table.holders, 1);
      assert.equal(await waiters[i].request("release"), "released");
    }
  } finally {
    holder.close();
    for (const w of waiters) w.close();
  }
});

Deno.test("every position update arrives as predecessors leave, at most one per 50 ms", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.equal(await holder.request("lock,name:pos"), "ok");
  const ahead: RawClient[] = [];
  try {
    for (let i = 1; i <= 5; i++) {
      const c = await RawClient.connect(srv.port);
      ahead.push(c);
      assert.equal(await c.request("lock,name:pos,wait:30"), `queued,position:${i}`);
    }
    await using last = await RawClient.connect(srv.port);
    const sent = performance.now();
    assert.equal(await last.request("lock,name:pos,wait:30"), "queued,position:6");
    // Five moves in quick succession: the last waiter hears of them, the newest one included.
    for (const c of ahead) c.close();
    const seen: number[] = [];
    while (seen.at(-1) !== 1) {
      const m = /^queued,position:(\d+)$/.exec((await last.line()) ?? "");
      assert.ok(m);
      seen.push(Number(m[1]));
    }
    assert.ok(seen.length < 5, `moves folded into fewer lines: ${seen}`);
    assert.ok(performance.now() - sent >= 45, "no second line within the interval");
    assert.equal(await holder.request("release"), "released");
    token(await last.line());
  } finally {
    for (const c of ahead) c.close();
  }
});

Deno.test("a waiter that disconnects leaves the queue at once and is skipped", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.equal(await holder.request("lock,name:skip"), "ok");
  await using a = await RawClient.connect(srv.port);
  await using b = await RawClient.connect(srv.port);
  await using c = await RawClient.connect(srv.port);
  assert.equal(await a.request("lock,name:skip,wait:30"), "queued,position:1");
  assert.equal(await b.request("lock,name:skip,wait:30"), "queued,position:2");
  assert.equal(await c.request("lock,name:skip,wait:30"), "queued,position:3");
  b.close();
  assert.equal(await c.line(), "queued,position:2", "c moves up when b leaves");
  assert.equal(srv.server.table.waiting, 2);
  assert.equal(await holder.request("release"), "released");
  token(await a.line());
  assert.equal(await c.line(), "queued,position:1");
  a.close();
  token(await c.line());
});

Deno.test("a lock request never jumps the queue, even a version 1 one", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.equal(
    await holder.request("lock,name:fair,limit:2,wait:0").then((l) => l?.split(",")[0]),
    "ok",
  );
  await using second = await RawClient.connect(srv.port);
  token(await second.request("lock,name:fair,limit:2,wait:0"));
  await using waiter = await RawClient.connect(srv.port);
  assert.equal(await waiter.request("lock,name:fair,limit:2,wait:30"), "queued,position:1");
  assert.equal(await second.request("release"), "released");
  token(await waiter.line());
  // The slot freed went to the waiter: a newcomer is refused.
  assert.deepEqual(await exchange(srv.port, "lock,name:fair,limit:2,wait:0\n"), ["not-granted"]);
});

Deno.test("wait runs out with timeout and the connection is closed", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.equal(await holder.request("lock,name:t"), "ok");
  const started = performance.now();
  assert.deepEqual(await exchange(srv.port, "lock,name:t,wait:0.2\n"), [
    "queued,position:1",
    "timeout",
  ]);
  assert.ok(performance.now() - started >= 180, "not before the wait ran out");
  assert.equal(srv.server.table.waiting, 0);
  assert.deepEqual(await exchange(srv.port, "lock,name:t,wait:0\n"), ["not-granted"]);
});

Deno.test("--max-wait caps a long wait", async () => {
  await using srv = await startTestServer({ maxWait: 0.2 });
  await using holder = await RawClient.connect(srv.port);
  assert.equal(await holder.request("lock,name:capped"), "ok");
  assert.deepEqual(await exchange(srv.port, "lock,name:capped,wait:3600\n"), [
    "queued,position:1",
    "timeout",
  ]);
});

Deno.test("a silent holder with ttl:1 gets expired and the next waiter is granted", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  const t1 = token(await holder.request("lock,name:lease,ttl:1"));
  await using waiter = await RawClient.connect(srv.port);
  assert.equal(await waiter.request("lock,name:lease,wait:10"), "queued,position:1");
  const started = performance.now();
  assert.equal(await holder.line(), "expired");
  assert.equal(await holder.line(), null, "closed after expired");
  const elapsed = performance.now() - started;
  assert.ok(elapsed >= 900, `expired after ${elapsed} ms, before the ttl`);
  assert.ok(token(await waiter.line()) > t1);
  const stats = JSON.parse((await exchange(srv.port, ".stats\n"))[0].slice(6));
  assert.equal(stats.lock_expired_count, 1);
});

Deno.test("a holder that keeps alive keeps its lease past several ttls", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  token(await holder.request("lock,name:kept,ttl:0.3"));
  const end = performance.now() + 1500; // five ttls
  while (performance.now() < end) {
    // Each keepalive is sent a third of the ttl after the last one was answered.
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(await holder.request(".keepalive"), "alive");
  }
  assert.deepEqual(await exchange(srv.port, "lock,name:kept,ttl:0.3,wait:0\n"), ["not-granted"]);
  assert.equal(srv.server.table.counters.expired, 0);
  // Any line renews, not only .keepalive.
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(await holder.request("what"), "bad-action");
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(await holder.request("release"), "released");
});

Deno.test("limit:3 grants three holders, the fourth waits, a mismatch is refused", async () => {
  await using srv = await startTestServer();
  const holders = await Promise.all([1, 2, 3].map(() => RawClient.connect(srv.port)));
  try {
    const tokens = [];
    for (const h of holders) tokens.push(token(await h.request("lock,name:sem,limit:3")));
    assert.equal(new Set(tokens).size, 3);
    await using fourth = await RawClient.connect(srv.port);
    assert.equal(await fourth.request("lock,name:sem,limit:3,wait:10"), "queued,position:1");
    assert.deepEqual(await exchange(srv.port, "lock,name:sem,limit:2,wait:10\n"), [
      "err,limit mismatch",
    ]);
    assert.deepEqual(await exchange(srv.port, "lock,name:sem\n"), ["err,limit mismatch"]);
    assert.deepEqual(await exchange(srv.port, "lock,name:sem,limit:3\n"), ["not-granted"]);
    assert.equal(await holders[1].request("release"), "released");
    token(await fourth.line());
    const [info] = JSON.parse((await exchange(srv.port, ".locks\n"))[0].slice(6));
    assert.equal(info.limit, 3);
    assert.equal(info.holders.length, 3);
  } finally {
    for (const h of holders) h.close();
  }
});

Deno.test("tokens strictly increase across names, v1 grants included", async () => {
  await using srv = await startTestServer();
  let last = 0;
  for (const name of ["a", "b", "a", "c", "b"]) {
    await using c = await RawClient.connect(srv.port);
    const t = token(await c.request(`lock,name:${name},wait:0`));
    assert.ok(t > last);
    last = t;
    assert.equal(await c.request("release"), "released");
    // A version 1 grant takes a token too: the next one is larger still.
    await using v1 = await RawClient.connect(srv.port);
    assert.equal(await v1.request(`lock,name:${name}`), "ok");
    const [info] = JSON.parse((await exchange(srv.port, ".locks\n"))[0].slice(6));
    assert.ok(info.holders[0].token > last);
    last = info.holders[0].token;
  }
});

Deno.test("invalid wait, ttl and limit values are refused in protocol order", async () => {
  await using srv = await startTestServer();
  const cases: [string, string][] = [
    ["lock,name:bad!,wait:x", "err,invalid lock name"],
    ["lock,name:a,client-id:bad!,wait:x", "err,invalid client id"],
    ["lock,name:a,wait:x,ttl:x", "err,invalid wait"],
    ["lock,name:a,wait:-1", "err,invalid wait"],
    ["lock,name:a,wait:", "err,invalid wait"],
    ["lock,name:a,wait:5s", "err,invalid wait"],
    ["lock,name:a,wait:1e3", "err,invalid wait"],
    ["lock,name:a,ttl:x,limit:x", "err,invalid ttl"],
    ["lock,name:a,ttl:0", "err,invalid ttl"],
    ["lock,name:a,ttl:-1", "err,invalid ttl"],
    ["lock,name:a,ttl:nan", "err,invalid ttl"],
    ["lock,name:a,ttl:", "err,invalid ttl"],
    ["lock,name:a,limit:0", "err,invalid limit"],
    ["lock,name:a,limit:1.5", "err,invalid limit"],
    ["lock,name:a,limit:", "err,invalid limit"],
  ];
  for (const [req, reply] of cases) {
    assert.deepEqual(await exchange(srv.port, req + "\n"), [reply], req);
  }
  for (const ok of ["ttl:.5", "ttl:1.5", "ttl:2.", "wait:0", "wait:.25", "limit:7"]) {
    const lines = await exchange(srv.port, `lock,name:a,${ok}\nrelease\n`);
    assert.match(lines[0], /^ok,token:\d+$/, ok);
    assert.equal(lines[1], "released");
  }
});

Deno.test("lines a waiter sends early are answered in order once it is granted", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.equal(await holder.request("lock,name:early"), "ok");
  await using w = await RawClient.connect(srv.port);
  assert.equal(await w.request("lock,name:early,wait:10"), "queued,position:1");
  await w.write(".keepalive\nhuh\n.keepalive\n");
  // Nothing is answered while it waits.
  await holder.request(".keepalive");
  assert.equal(await holder.request("release"), "released");
  assert.match((await w.line())!, /^ok,token:/);
  assert.deepEqual([await w.line(), await w.line(), await w.line()], [
    "alive",
    "bad-action",
    "alive",
  ]);
  assert.equal(await w.request("release"), "released");
});

Deno.test(".locks shows holders with client id, token, since, remote, and waiting counts", async () => {
  await using srv = await startTestServer();
  await using h = await RawClient.connect(srv.port);
  const t = token(await h.request("lock,name:shown,client-id:job-7,wait:0"));
  await using w = await RawClient.connect(srv.port);
  assert.equal(await w.request("lock,name:shown,wait:10"), "queued,position:1");
  const before = Date.now();
  const [line] = await exchange(srv.port, ".locks\n");
  assert.match(line, /^locks,\[/);
  const locks = JSON.parse(line.slice("locks,".length));
  assert.equal(locks.length, 1);
  const [info] = locks;
  assert.equal(info.name, "shown");
  assert.equal(info.limit, 1);
  assert.equal(info.waiting, 1);
  assert.equal(info.holders.length, 1);
  const holder = info.holders[0];
  assert.equal(holder.client_id, "job-7");
  assert.equal(holder.token, t);
  assert.match(holder.since, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.ok(Date.parse(holder.since) <= before);
  const local = h.conn.localAddr as Deno.NetAddr;
  assert.equal(holder.remote, `127.0.0.1:${local.port}`);
  assert.deepEqual(await exchange(srv.port, ".locks,x:y\n").then((l) => l.length), 1);
});

Deno.test(".stats carries the version 2 keys", async () => {
  await using srv = await startTestServer();
  await using h = await RawClient.connect(srv.port);
  assert.equal(await h.request("lock,name:st"), "ok");
  await using w = await RawClient.connect(srv.port);
  assert.equal(await w.request("lock,name:st,wait:10"), "queued,position:1");
  const stats = JSON.parse((await exchange(srv.port, ".stats\n"))[0].slice(6));
  assert.equal(stats.connections, 3);
  assert.equal(stats.waiting, 1);
  assert.equal(stats.lock_expired_count, 0);
  assert.equal(typeof stats.uptime_s, "number");
  assert.match(stats.version, /^\d+\.\d+\.\d+/);
});

Deno.test("an original-form request still gets exactly `ok` whatever else it carries", async () => {
  await using srv = await startTestServer({ authToken: "s3cret" });
  assert.deepEqual(
    await exchange(srv.port, "lock,name:v1,client-id:c1,auth:s3cret,future:1\nrelease\n"),
    ["ok", "released"],
  );
});

Deno.test("--max-connections answers err,too many connections", async () => {
  await using srv = await startTestServer({ maxConnections: 2 });
  await using a = await RawClient.connect(srv.port);
  await using b = await RawClient.connect(srv.port);
  assert.equal(await a.request("lock,name:a"), "ok");
  assert.equal(await b.request("lock,name:b"), "ok");
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["err,too many connections"]);
  a.close();
  await until(() => srv.server.connections === 1, "a's connection to end");
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"]);
});

Deno.test("--max-waiters answers err,too many waiters only to a request that would queue", async () => {
  await using srv = await startTestServer({ maxWaiters: 1 });
  await using h = await RawClient.connect(srv.port);
  assert.equal(await h.request("lock,name:mw"), "ok");
  await using w = await RawClient.connect(srv.port);
  assert.equal(await w.request("lock,name:mw,wait:10"), "queued,position:1");
  assert.deepEqual(await exchange(srv.port, "lock,name:mw,wait:10\n"), ["err,too many waiters"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:mw\n"), ["not-granted"]);
  assert.deepEqual(
    await exchange(srv.port, "lock,name:other,wait:10\nrelease\n").then((l) => l[1]),
    "released",
  );
});

Deno.test("--max-locks answers err,too many locks for new names only", async () => {
  await using srv = await startTestServer({ maxLocks: 2 });
  await using a = await RawClient.connect(srv.port);
  await using b = await RawClient.connect(srv.port);
  assert.equal(await a.request("lock,name:l1"), "ok");
  assert.equal(await b.request("lock,name:l2"), "ok");
  assert.deepEqual(await exchange(srv.port, "lock,name:l3\n"), ["err,too many locks"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:l1\n"), ["not-granted"]);
  assert.equal(await b.request("release"), "released");
  assert.deepEqual(await exchange(srv.port, "lock,name:l3\nrelease\n"), ["ok", "released"]);
});

Deno.test("auth: requests without the token get err,unauthorized; .ping is exempt", async () => {
  await using srv = await startTestServer({ authToken: "tok-en" });
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"]);
  assert.deepEqual(await exchange(srv.port, ".stats\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a,auth:tok-e\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a,auth:tok-en-\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a,auth:\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, "nonsense\n"), ["err,unauthorized"]);
  assert.deepEqual(await exchange(srv.port, ".server-shutdown\n"), ["err,unauthorized"]);
  // Lines while holding need no auth.
  assert.deepEqual(await exchange(srv.port, "lock,name:a,auth:tok-en\n.keepalive\nrelease\n"), [
    "ok",
    "alive",
    "released",
  ]);
  assert.match((await exchange(srv.port, ".stats,auth:tok-en\n"))[0], /^stats,/);
});

Deno.test(".server-shutdown from a non-loopback peer is forbidden unless allowed", async (t) => {
  const ip = nonLoopbackIpv4();
  if (ip === undefined) {
    console.warn("no non-loopback IPv4 address on this machine: skipping");
    return;
  }
  await t.step("forbidden by default", async () => {
    await using srv = await startTestServer({ hostname: "0.0.0.0" });
    assert.deepEqual(await exchange(srv.port, ".server-shutdown\n", ip), ["err,forbidden"]);
    assert.deepEqual(await exchange(srv.port, ".ping\n", ip), ["pong"], "still running");
  });
  await t.step("obeyed with --allow-remote-shutdown", async () => {
    await using srv = await startTestServer({ hostname: "0.0.0.0", allowRemoteShutdown: true });
    assert.deepEqual(await exchange(srv.port, ".server-shutdown\n", ip), ["shutting-down"]);
    await srv.server.finished;
  });
});

function nonLoopbackIpv4(): string | undefined {
  return Deno.networkInterfaces().find((i) => i.family === "IPv4" && !i.address.startsWith("127."))
    ?.address;
}
