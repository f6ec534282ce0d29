// Shared locks (`mode:shared|exclusive`, PROTOCOL.md "Shared locks"): the rules, over real
// sockets. tests/run_with_etcd.ts runs this file again against the etcd store.

import assert from "node:assert/strict";
import { exchange, RawClient, startTestServer } from "./test_util.ts";

function token(reply: string | null): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  assert.ok(m, `expected ok,token:T, got ${reply}`);
  return Number(m[1]);
}

interface Info {
  name: string;
  limit: number;
  waiting: number;
  waiting_shared: number;
  waiting_exclusive: number;
  holders: { client_id: string; token: number; mode: string }[];
}

async function locks(port: number, name: string): Promise<Info | undefined> {
  const [line] = await exchange(port, ".locks\n");
  const all = JSON.parse(line.slice("locks,".length)) as Info[];
  return all.find((i) => i.name === name);
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

async function connectAll(port: number, n: number): Promise<RawClient[]> {
  const out: RawClient[] = [];
  for (let i = 0; i < n; i++) out.push(await RawClient.connect(port));
  return out;
}

Deno.test("several readers hold at once, each with its own token; .locks shows their mode", async () => {
  await using srv = await startTestServer();
  const readers = await connectAll(srv.port, 3);
  try {
    const tokens: number[] = [];
    for (const [i, r] of readers.entries()) {
      tokens.push(token(await r.request(`lock,name:data,mode:shared,client-id:r${i}`)));
    }
    assert.equal(new Set(tokens).size, 3);
    assert.ok(tokens[0] < tokens[1] && tokens[1] < tokens[2], "tokens increase");
    const info = (await locks(srv.port, "data"))!;
    assert.equal(info.limit, 1);
    assert.deepEqual(info.holders.map((h) => [h.client_id, h.token, h.mode]), [
      ["r0", tokens[0], "shared"],
      ["r1", tokens[1], "shared"],
      ["r2", tokens[2], "shared"],
    ]);
    assert.deepEqual([info.waiting, info.waiting_shared, info.waiting_exclusive], [0, 0, 0]);
    // An exclusive request that does not wait is not granted beside readers.
    assert.deepEqual(await exchange(srv.port, "lock,name:data,mode:exclusive,wait:0\n"), [
      "not-granted",
    ]);
    assert.deepEqual(await exchange(srv.port, "lock,name:data\n"), ["not-granted"]);
    for (const r of readers) assert.equal(await r.request("release"), "released");
  } finally {
    for (const r of readers) r.close();
  }
});

Deno.test("a writer waits for every reader; a reader that comes after it waits behind it", async () => {
  await using srv = await startTestServer();
  const readers = await connectAll(srv.port, 3);
  await using writer = await RawClient.connect(srv.port);
  await using late = await RawClient.connect(srv.port);
  try {
    let last = 0;
    for (const r of readers) last = token(await r.request("lock,name:ds,mode:shared"));
    assert.equal(await writer.request("lock,name:ds,mode:exclusive,wait:30"), "queued,position:1");
    // Readers hold, but a writer waits: a new reader queues behind it (positions count both).
    assert.equal(await late.request("lock,name:ds,mode:shared,wait:30"), "queued,position:2");
    assert.deepEqual(await exchange(srv.port, "lock,name:ds,mode:shared\n"), ["not-granted"]);
    let info = (await locks(srv.port, "ds"))!;
    assert.equal(info.holders.length, 3);
    assert.deepEqual([info.waiting, info.waiting_shared, info.waiting_exclusive], [2, 1, 1]);
    // Two of three readers go: the writer still waits.
    assert.equal(await readers[0].request("release"), "released");
    readers[1].close();
    assert.equal(await readers[2].request(".keepalive"), "alive");
    info = (await locks(srv.port, "ds"))!;
    // The closed reader may take a moment to leave; the writer never holds beside a reader.
    assert.ok(info.holders.every((h) => h.mode === "shared"), JSON.stringify(info));
    assert.equal(info.waiting_exclusive, 1);
    assert.equal(await readers[2].request("release"), "released");
    const wt = token((await readUntil(writer, /^ok,/)).at(-1)!);
    assert.ok(wt > last);
    info = (await locks(srv.port, "ds"))!;
    assert.deepEqual(info.holders.map((h) => h.mode), ["exclusive"]);
    assert.deepEqual([info.waiting_shared, info.waiting_exclusive], [1, 0]);
    assert.equal(await writer.request("release"), "released");
    assert.ok(token((await readUntil(late, /^ok,/)).at(-1)!) > wt);
    assert.equal(await late.request("release"), "released");
  } finally {
    for (const r of readers) r.close();
  }
});

Deno.test("a run of readers at the head is granted together when the writer releases", async () => {
  await using srv = await startTestServer();
  await using writer = await RawClient.connect(srv.port);
  const wt = token(await writer.request("lock,name:run,wait:0"));
  const run = await connectAll(srv.port, 3);
  await using writer2 = await RawClient.connect(srv.port);
  await using after = await RawClient.connect(srv.port);
  try {
    for (const [i, r] of run.entries()) {
      assert.equal(
        await r.request("lock,name:run,mode:shared,wait:30"),
        `queued,position:${i + 1}`,
      );
    }
    assert.equal(
      await writer2.request("lock,name:run,mode:exclusive,wait:30"),
      "queued,position:4",
    );
    assert.equal(await after.request("lock,name:run,mode:shared,wait:30"), "queued,position:5");
    assert.equal(await writer.request("release"), "released");
    const tokens: number[] = [];
    for (const r of run) tokens.push(token((await readUntil(r, /^ok,/)).at(-1)!));
    assert.ok(tokens.every((t) => t > wt));
    assert.equal(new Set(tokens).size, 3);
    // The run is granted, the second writer is next, the reader behind it still waits.
    assert.deepEqual((await readUntil(writer2, /^queued,position:1$/)).at(-1), "queued,position:1");
    const info = (await locks(srv.port, "run"))!;
    assert.deepEqual(info.holders.map((h) => h.mode), ["shared", "shared", "shared"]);
    assert.deepEqual([info.waiting, info.waiting_shared, info.waiting_exclusive], [2, 1, 1]);
    for (const r of run) assert.equal(await r.request("release"), "released");
    const w2 = token((await readUntil(writer2, /^ok,/)).at(-1)!);
    assert.equal(await writer2.request("release"), "released");
    assert.ok(token((await readUntil(after, /^ok,/)).at(-1)!) > w2);
  } finally {
    for (const r of run) r.close();
  }
});

Deno.test("a waiting writer that leaves lets the readers behind it join the readers holding", async () => {
  await using srv = await startTestServer();
  await using reader = await RawClient.connect(srv.port);
  token(await reader.request("lock,name:gone,mode:shared"));
  await using writer = await RawClient.connect(srv.port);
  assert.equal(await writer.request("lock,name:gone,wait:30"), "queued,position:1");
  await using behind = await RawClient.connect(srv.port);
  assert.equal(await behind.request("lock,name:gone,mode:shared,wait:30"), "queued,position:2");
  writer.close();
  token((await readUntil(behind, /^ok,/)).at(-1)!);
  const info = (await locks(srv.port, "gone"))!;
  assert.deepEqual(info.holders.map((h) => h.mode), ["shared", "shared"]);
  assert.equal(await behind.request("release"), "released");
  assert.equal(await reader.request("release"), "released");
});

Deno.test("a shared holder's lease runs out like any other", async () => {
  await using srv = await startTestServer();
  await using r = await RawClient.connect(srv.port);
  token(await r.request("lock,name:lease,mode:shared,ttl:0.5"));
  await using w = await RawClient.connect(srv.port);
  assert.equal(await w.request("lock,name:lease,wait:30"), "queued,position:1");
  assert.equal(await r.line(), "expired");
  token((await readUntil(w, /^ok,/)).at(-1)!);
  assert.equal(await w.request("release"), "released");
});

Deno.test("mode: invalid values, shared with a limit, and mixing with limit:N", async () => {
  await using srv = await startTestServer();
  for (
    const [req, reply] of [
      ["lock,name:m,mode:read", "err,invalid mode"],
      ["lock,name:m,mode:", "err,invalid mode"],
      ["lock,name:m,mode:SHARED", "err,invalid mode"],
      ["lock,name:m,mode:shared,limit:2", "err,invalid mode"],
      // Protocol order: the limit is checked before the mode.
      ["lock,name:m,mode:read,limit:x", "err,invalid limit"],
    ]
  ) {
    assert.deepEqual(await exchange(srv.port, req + "\n"), [reply], req);
  }
  // mode alone makes the request extended (it gets a token); limit:1 is the same lock.
  for (
    const ok of ["mode:shared", "mode:exclusive", "mode:shared,limit:1", "mode:exclusive,limit:4"]
  ) {
    const lines = await exchange(srv.port, `lock,name:m-${ok.length},${ok}\nrelease\n`);
    assert.match(lines[0], /^ok,token:\d+$/, ok);
  }
  // A name held with limit:3 refuses mode:shared, and a shared name refuses limit:3.
  await using sem = await RawClient.connect(srv.port);
  token(await sem.request("lock,name:sem,limit:3"));
  assert.deepEqual(await exchange(srv.port, "lock,name:sem,mode:shared,wait:5\n"), [
    "err,limit mismatch",
  ]);
  await using rd = await RawClient.connect(srv.port);
  token(await rd.request("lock,name:rw,mode:shared"));
  assert.deepEqual(await exchange(srv.port, "lock,name:rw,limit:3,wait:5\n"), [
    "err,limit mismatch",
  ]);
  assert.deepEqual(await exchange(srv.port, "lock,name:rw,mode:exclusive,limit:3\n"), [
    "err,limit mismatch",
  ]);
});

Deno.test("forty readers hold at once, each asking without a wait", async () => {
  await using srv = await startTestServer();
  const readers = await connectAll(srv.port, 40);
  try {
    for (const r of readers) token(await r.request("lock,name:many,mode:shared,wait:0"));
    const info = (await locks(srv.port, "many"))!;
    assert.equal(info.holders.length, 40);
    assert.deepEqual(await exchange(srv.port, "lock,name:many,wait:0\n"), ["not-granted"]);
  } finally {
    for (const r of readers) r.close();
  }
});
