/**
 * Floods against a server subprocess (so its memory can be read from /proc): more connections
 * than allowed, thousands of idle connections, thousands of waiters, an endless line, a holder
 * that never reads, hundreds of names. Throughout, `.ping` is answered (each within 2 s), a lock
 * taken before the flood stays held, and memory stays bounded. Sizes are scaled for CI;
 * `soak/soak.ts` runs them full size and prints the figures.
 */

import assert from "node:assert/strict";
import {
  fdLimit,
  floodIdle,
  floodMaxConnections,
  floodNoNewline,
  floodSlowReader,
  floodWaiters,
  HeapServer,
  LineConn,
  openFds,
  PingProbe,
  query,
  RssSampler,
  type ServerChild,
  spawnServer,
  ssLines,
  statsUntil,
  within,
} from "./fault_util.ts";
import type { LockInfo } from "../lib/protocol.ts";

const MB = 1024;

/**
 * Runs `flood` against a fresh server started with `args`: a holder takes `flood-held` first,
 * a prober pings all along; afterwards the holder still holds and answers `alive`, nothing else
 * is held, and the server's RSS never grew by more than `maxGrowthMb`.
 */
async function underFlood<T>(
  what: string,
  args: string[],
  maxGrowthMb: number,
  flood: (srv: ServerChild) => Promise<T>,
  options: { busyOk?: boolean } = {},
): Promise<T> {
  await using srv = await spawnServer(args);
  const holder = await LineConn.connect(srv.port);
  try {
    await holder.send("lock,name:flood-held,client-id:bystander");
    assert.equal(await within(holder.line(), 2000, "the bystander's grant"), "ok");
    await statsUntil(srv.port, (s) => s.connections <= 2, "a quiet start", 5000);
    const rss = new RssSampler(srv.pid);
    const probe = new PingProbe(srv.port, { everyMs: 25, timeoutMs: 2000, busyOk: options.busyOk });
    let result: T;
    try {
      result = await flood(srv);
    } finally {
      const pings = await probe.stop();
      const mem = rss.stop();
      console.log(
        `  ${what}: ping p50 ${pings.p50.toFixed(1)} ms, p99 ${pings.p99.toFixed(1)} ms, max ${
          pings.max.toFixed(1)
        } ms (${pings.count}); RSS ${(mem.start / MB).toFixed(0)} -> peak ${
          (mem.peak / MB).toFixed(0)
        } -> ${(mem.end / MB).toFixed(0)} MB`,
      );
      assert.deepEqual(probe.failures.slice(0, 3), [], "every .ping answered within 2 s");
      assert.ok(pings.count > 0);
      assert.ok(
        mem.peak - mem.start < maxGrowthMb * MB,
        `RSS grew by ${((mem.peak - mem.start) / MB).toFixed(0)} MB (bound ${maxGrowthMb} MB)`,
      );
    }
    // The bystander still holds, undisturbed.
    await holder.send(".keepalive");
    assert.equal(await within(holder.line(), 2000, "the bystander's keepalive"), "alive");
    const locks = await query<LockInfo[]>(srv.port, ".locks");
    assert.deepEqual(locks.map((l) => [l.name, l.holders.map((h) => h.client_id), l.waiting]), [
      ["flood-held", ["bystander"], 0],
    ]);
    return result;
  } finally {
    holder.close();
  }
}

Deno.test("more connections than --max-connections: each extra one gets err,too many connections", async () => {
  const { refused } = await underFlood(
    "max-connections 100, 1,000 more",
    ["--max-connections", "100"],
    100,
    (srv) => floodMaxConnections(srv.port, 100, 1000),
    { busyOk: true },
  );
  assert.equal(refused, 1000);
});

// Every flood connection costs a descriptor in this process too (two for the in-process server
// of the heap test): the floods are sized to this process's open-file limit (the server
// subprocesses raise theirs), and skipped when it is too low to mean anything.
const FD_BUDGET = fdLimit() - openFds() - 300;
const IDLE = Math.min(5000, FD_BUDGET);
const WAITERS = Math.min(2000, FD_BUDGET);
const NAMES = Math.min(1000, FD_BUDGET);
const HEAP_FLOOD = Math.min(1000, Math.floor(FD_BUDGET / 2));
const TOO_FEW_FDS = FD_BUDGET < 500;
if (IDLE < 5000) {
  console.log(
    `open-file limit ${fdLimit()}: floods of ${IDLE} idle connections, ${WAITERS} waiters${
      TOO_FEW_FDS ? " are too small: skipped (raise it with ulimit -n)" : ""
    }`,
  );
}

Deno.test({
  name: `${IDLE} idle connections that never send a line: the first-line timeout closes them all`,
  ignore: TOO_FEW_FDS,
}, async () => {
  const r = await underFlood(
    `${IDLE} idle connections`,
    ["--first-line-timeout", "2"],
    400,
    (srv) => floodIdle(srv.port, IDLE, 1, 2),
  );
  console.log(
    `  opened in ${r.openedMs.toFixed(0)} ms, all closed by the server after ${
      r.freedMs.toFixed(0)
    } ms`,
  );
});

Deno.test({
  name: `${WAITERS} waiters on one name: they time out front first, then as many leave front first`,
  ignore: TOO_FEW_FDS,
}, async () => {
  await underFlood(`${WAITERS} waiters twice`, [], 400, async (srv) => {
    const t = await floodWaiters(srv.port, "flood-held", WAITERS, { waitS: 2 });
    console.log(
      `  timed out: queued in ${t.queuedMs.toFixed(0)} ms, empty ${
        t.drainedMs.toFixed(0)
      } ms later, ${t.linesPerWaiter.toFixed(1)} lines per waiter`,
    );
    const c = await floodWaiters(srv.port, "flood-held", WAITERS, {
      waitS: 600,
      closeFront: true,
    });
    console.log(`  closed front first: empty ${c.drainedMs.toFixed(0)} ms after the closes`);
  });
});

Deno.test("100 MB without a newline, first line or while holding: bad-request and a close, nothing buffered", async () => {
  await underFlood("100 MB without a newline, twice", [], 30, async (srv) => {
    const first = await floodNoNewline(srv.port, 100 << 20);
    assert.ok(["bad-request\n", ""].includes(first.reply), JSON.stringify(first.reply));
    console.log(
      `  first line: got ${JSON.stringify(first.reply)} after writing ${
        (first.written / 2 ** 20).toFixed(1)
      } MB`,
    );
    const held = await floodNoNewline(srv.port, 100 << 20, "endless");
    assert.ok(["ok\nbad-request\n", "ok\n"].includes(held.reply), JSON.stringify(held.reply));
    // The lock was freed with the connection.
    await statsUntil(
      srv.port,
      (s) => s.lock_count === 1,
      "the endless line's lock to be freed",
      2000,
    );
  });
});

Deno.test("a holder that never reads its replies stalls (bounded memory) and others are answered", async () => {
  await underFlood("a holder sending .keepalive without reading", [], 60, async (srv) => {
    const slow = await floodSlowReader(srv.port, "slow");
    try {
      assert.ok(slow.stalled, `the writes never stalled (${slow.written} bytes)`);
      console.log(`  stalled after ${(slow.written / 2 ** 20).toFixed(1)} MB of .keepalive lines`);
      // Stalled, not dead: it still holds, and the server's send queue to it is full.
      const locks = await query<LockInfo[]>(srv.port, ".locks");
      assert.ok(locks.some((l) => l.name === "slow" && l.holders.length === 1));
      const ss = await ssLines(srv.port).catch(() => []);
      if (ss.length > 0) {
        console.log(`  ${ss.map((l) => l.split(/\s+/).slice(0, 3).join(" ")).join("; ")}`);
      }
    } finally {
      slow.conn.close();
      await slow.writing;
    }
    await statsUntil(
      srv.port,
      (s) => s.lock_count === 1,
      "the slow reader's lock to be freed",
      3000,
    );
  });
});

Deno.test({
  name: `${NAMES} held names: .locks answers in full (a reply over 64 KiB)`,
  ignore: TOO_FEW_FDS,
}, async () => {
  await underFlood(`${NAMES} held names`, [], 200, async (srv) => {
    const holders: LineConn[] = [];
    try {
      for (let i = 0; i < NAMES; i += 100) {
        holders.push(
          ...await Promise.all(Array.from({ length: Math.min(100, NAMES - i) }, async (_, j) => {
            const c = await LineConn.connect(srv.port);
            await c.send(`lock,name:many-${i + j},client-id:holder-${i + j}`);
            assert.equal(await within(c.line(), 2000, "a grant"), "ok");
            return c;
          })),
        );
      }
      const locks = await query<LockInfo[]>(srv.port, ".locks");
      assert.equal(locks.length, NAMES + 1);
      assert.equal(locks.filter((l) => l.name.startsWith("many-")).length, NAMES);
    } finally {
      for (const c of holders) c.close();
    }
    await statsUntil(srv.port, (s) => s.lock_count === 1, "the names to be freed", 5000);
  });
});

Deno.test({
  name: "after floods the server's live heap is back where it started (no leak)",
  ignore: TOO_FEW_FDS,
}, async () => {
  await using srv = await HeapServer.start({ firstLineTimeout: 1 });
  const holder = await LineConn.connect(srv.port);
  try {
    await holder.send("lock,name:flood-held");
    assert.equal(await within(holder.line(), 2000, "grant"), "ok");
    // A first round warms up every code path (compiled code, caches) before the baseline.
    const floods = async () => {
      await floodIdle(srv.port, HEAP_FLOOD, 1, 1);
      await floodWaiters(srv.port, "flood-held", HEAP_FLOOD, { waitS: 1 });
      await floodWaiters(srv.port, "flood-held", HEAP_FLOOD, { waitS: 600, closeFront: true });
      await floodNoNewline(srv.port, 10 << 20);
      const slow = await floodSlowReader(srv.port, "slow", 4 << 20);
      slow.conn.close();
      await slow.writing;
      await statsUntil(srv.port, (s) => s.connections <= 2, "the floods to end", 10_000);
    };
    await floods();
    const before = await srv.heap();
    await floods();
    const after = await srv.heap();
    const kb = (n: number) => (n / 1024).toFixed(0);
    console.log(
      `  live heap ${kb(before.heapUsed)} -> ${kb(after.heapUsed)} KiB, external ${
        kb(before.external)
      } -> ${kb(after.external)} KiB`,
    );
    assert.equal(after.connections, 1);
    assert.ok(
      after.heapUsed <= before.heapUsed * 1.1 + 256 * 1024,
      `the live heap grew from ${kb(before.heapUsed)} to ${kb(after.heapUsed)} KiB`,
    );
  } finally {
    holder.close();
  }
});
