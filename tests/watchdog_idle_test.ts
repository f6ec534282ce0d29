// The server's watchdog walks its connections only while one of them may have a deadline (a first
// line awaited, a write in progress): thousands of idle holders cost it nothing. Before, it walked
// every connection every second: with 10,000 held locks, 3-4 ms of CPU a second, the benchmark's
// "idle CPU while held" (one clock tick in every window). These tests check the count it decides
// by: it must come back to 0 whatever way a connection ends, or the walk would come back. That
// the walk still closes what it must is tested in hardening_test.ts (--write-timeout, sessions
// that stop reading) and the first-line timeout tests.

import assert from "node:assert/strict";
import { Session } from "../lib/session.ts";
import { startTestServer } from "./test_util.ts";

const enc = new TextEncoder();

/** Reads one line (enough for the short replies here). */
async function reply(conn: Deno.Conn): Promise<string> {
  const buf = new Uint8Array(256);
  const n = await conn.read(buf);
  return new TextDecoder().decode(buf.subarray(0, n ?? 0)).trim();
}

/** Polls `cond` (a count the server changes when a socket event arrives) for up to 5 s. */
async function until(cond: () => boolean, what: string): Promise<void> {
  const end = performance.now() + 5000;
  while (!cond()) {
    if (performance.now() > end) throw new Error(`never: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test("watchdog: held locks, released ones and sessions leave nothing awaited", async () => {
  await using srv = await startTestServer();
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < 100; i++) {
      const c = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
      conns.push(c);
      await c.write(enc.encode(`lock,name:w-${i}\n`));
      assert.match(await reply(c), /^ok/);
    }
    assert.equal(Session.awaiting, 0, "100 holders, all replies written: nothing to watch");
    const s = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
    conns.push(s);
    await s.write(enc.encode("session\nlock,id:a,name:w-s\n"));
    let got = "";
    while (!got.includes("id:a")) got += await reply(s);
    assert.equal(Session.awaiting, 0, "a session holding a lock: nothing to watch");
    await conns[0].write(enc.encode("release\n"));
    assert.equal(await reply(conns[0]), "released");
  } finally {
    for (const c of conns) c.close();
  }
  await until(() => srv.server.stats().connections === 0, "every connection gone");
  assert.equal(Session.awaiting, 0);
});

Deno.test("watchdog: a connection awaited for its first line counts until it sends it, closes or times out", async () => {
  await using srv = await startTestServer({ firstLineTimeout: 0.3 });
  const silent = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
  const quits = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
  const talks = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
  try {
    await until(() => Session.awaiting === 3, "three first lines awaited");
    await talks.write(enc.encode(".ping\n"));
    assert.equal(await reply(talks), "pong");
    quits.close();
    await until(() => Session.awaiting === 1, "the pinger and the quitter no longer awaited");
    // The silent one is closed by the watchdog at its first-line timeout.
    assert.equal(await silent.read(new Uint8Array(16)), null);
    await until(() => Session.awaiting === 0, "the silent one timed out");
  } finally {
    silent.close();
    talks.close();
  }
});
