/**
 * Faults: holders killed with SIGKILL, holders that fall silent (with a lease, behind a cut link,
 * and what TCP keepalive does without a lease), and a server killed and restarted.
 *
 * Bounds are generous (a reply within 2 s) for a busy 2-core CI machine; `soak/soak.ts` measures
 * the real figures.
 */

import assert from "node:assert/strict";
import { startTestServer, until } from "./test_util.ts";
import {
  haveCommand,
  linkCut,
  netnsUnavailable,
  ProcClient,
  query,
  RawClient,
  run,
  spawnServer,
  ssLines,
  within,
} from "./fault_util.ts";
import type { LockInfo } from "../lib/protocol.ts";

/** A reply within this long, or the test fails. */
const REPLY_MS = 2000;

function token(reply: string | null): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  if (!m) throw new Error(`expected ok,token:T, got ${JSON.stringify(reply)}`);
  return Number(m[1]);
}

const HAVE_NC = await haveCommand("nc");
if (!HAVE_NC) console.log("netcat (nc) is not installed: the tests that use it are skipped");

for (const kind of ["nc", "deno"] as const) {
  Deno.test({
    name:
      `a holder process (${kind}) killed with SIGKILL: the lock passes to the next waiter at once`,
    ignore: kind === "nc" && !HAVE_NC,
  }, async () => {
    await using srv = await startTestServer();
    await using holder = kind === "nc" ? ProcClient.nc(srv.port) : ProcClient.deno(srv.port);
    assert.deepEqual(await holder.request("lock,name:killed,client-id:victim", 15_000), "ok");
    await using waiter = await RawClient.connect(srv.port);
    assert.deepEqual(
      await waiter.request("lock,name:killed,wait:30,client-id:heir"),
      "queued,position:1",
    );

    const t0 = performance.now();
    const status = await holder.kill("SIGKILL");
    assert.deepEqual(status.signal, "SIGKILL");
    const granted = await within(waiter.line(), REPLY_MS, "the grant to the waiter");
    const ms = performance.now() - t0;
    token(granted);
    console.log(`  ${kind} holder SIGKILLed: the waiter had the lock ${ms.toFixed(1)} ms later`);

    const locks = await query<LockInfo[]>(srv.port, ".locks");
    assert.deepEqual(locks.length, 1);
    assert.deepEqual(locks[0].holders.map((h) => h.client_id), ["heir"]);
    assert.deepEqual(await waiter.request("release"), "released");
  });
}

Deno.test("the server SIGKILLed and restarted on its port: clients see the end, tokens move forward", async () => {
  const dir = await Deno.makeTempDir({ prefix: "tcpnetlock-fault-" });
  const stateFile = `${dir}/tokens`;
  try {
    let port: number;
    let last: number;
    {
      await using srv = await spawnServer([]);
      port = srv.port;
      const holder = await RawClient.connect(port);
      const waiter = await RawClient.connect(port);
      const idle = await RawClient.connect(port);
      try {
        last = token(await holder.request("lock,name:restart,wait:0"));
        assert.deepEqual(await waiter.request("lock,name:restart,wait:30"), "queued,position:1");
        const status = await srv.stop("SIGKILL");
        assert.deepEqual(status.signal, "SIGKILL");
        // Every connection ends (FIN or reset), none hangs.
        for (const [who, c] of [["holder", holder], ["waiter", waiter], ["idle", idle]] as const) {
          assert.deepEqual(
            await within(c.rest(), REPLY_MS, `the end of the ${who}'s connection`),
            [],
          );
        }
      } finally {
        holder.close();
        waiter.close();
        idle.close();
      }
    }
    // Restart on the same port: clock-seeded tokens, then twice with a state file.
    // (Not the other way round: a server with a state file hands out tokens up to 100,000 ahead
    // of the clock, so one restarted without the file within 0.1 s could start below them.)
    for (const args of [[], ["--state-file", stateFile], ["--state-file", stateFile]]) {
      await using srv = await spawnServer(args, { port });
      assert.deepEqual(srv.port, port);
      await using c1 = await RawClient.connect(port);
      const t1 = token(await c1.request("lock,name:restart,wait:0"));
      assert.ok(
        t1 > last,
        `token ${t1} after a restart (${args.join(" ") || "no state file"}) not above ${last}`,
      );
      await using c2 = await RawClient.connect(port);
      const t2 = token(await c2.request("lock,name:other,wait:0"));
      assert.ok(t2 > t1, `token ${t2} not above ${t1}`);
      last = t2;
      await srv.stop("SIGKILL");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a holder that falls silent with a ttl: the lease frees the lock within ttl + 1 s", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  token(await holder.request("lock,name:silent,ttl:1"));
  const t0 = performance.now();
  // From here the holder neither reads nor writes.
  await using waiter = await RawClient.connect(srv.port);
  assert.deepEqual(await waiter.request("lock,name:silent,wait:30"), "queued,position:1");
  token(await within(waiter.line(), 1000 + REPLY_MS, "the grant after the lease ran out"));
  const ms = performance.now() - t0;
  console.log(
    `  lease of 1 s ran out: the waiter had the lock ${ms.toFixed(0)} ms after the grant`,
  );
  assert.ok(ms > 500, `the lock moved ${ms} ms after the grant, before the lease ran out`);
  // What the silent holder would read once it woke up.
  assert.deepEqual(await within(holder.rest(), REPLY_MS, "the holder's last lines"), ["expired"]);
});

// --- TCP keepalive: the server's answer to a peer that vanished without a ttl.

const keepaliveTime = (() => {
  try {
    return Deno.readTextFileSync("/proc/sys/net/ipv4/tcp_keepalive_time").trim();
  } catch {
    return undefined;
  }
})();
const ssMissing = await run(["ss", "-V"], { check: false }).then(
  (r) => r.code === 0 ? undefined : "ss exits with an error",
  () => "ss (iproute2) is not installed",
);

Deno.test({
  name: "a holder's socket has TCP keepalive on about a second after its grant (ss shows a timer)",
  ignore: ssMissing !== undefined || keepaliveTime === undefined,
  fn: async () => {
    await using srv = await startTestServer();
    await using holder = await RawClient.connect(srv.port);
    assert.deepEqual(await holder.request("lock,name:ka"), "ok");
    let lines: string[] = [];
    await until(
      async () => {
        lines = await ssLines(srv.port);
        return lines.length === 1 && /timer:\(keepalive,/.test(lines[0]);
      },
      "a keepalive timer on the holder's socket",
      5000,
      50,
    );
    console.log(
      `  kernel tcp_keepalive_time ${keepaliveTime} s; server socket: ${
        /timer:\([^)]*\)/.exec(lines[0])?.[0]
      }`,
    );
  },
});
if (ssMissing !== undefined) console.log(`keepalive timer test skipped: ${ssMissing}`);

// --- A real link cut, in network namespaces.

const noNetns = await netnsUnavailable();
if (noNetns !== undefined) {
  console.log(`link-cut tests skipped: network namespaces are not usable here (${noNetns})`);
}

Deno.test({
  name:
    "a link cut under a holder with a ttl (netns, veth down): the lock is free within ttl + 1 s",
  ignore: noNetns !== undefined || !HAVE_NC,
  fn: async () => {
    const { afterCutMs } = await linkCut("lock,name:cut,ttl:1,client-id:cut-off", {}, REPLY_MS);
    console.log(`  link cut, ttl 1 s: the waiter had the lock ${afterCutMs.toFixed(0)} ms later`);
  },
});

Deno.test({
  name:
    "a link cut under a holder without a ttl: TCP keepalive frees the lock (namespace sysctls 1+1x2 s)",
  ignore: noNetns !== undefined || !HAVE_NC,
  fn: async () => {
    const { afterCutMs, ss } = await linkCut("lock,name:cut,client-id:cut-off", {
      keepalive: [1, 1, 2],
    }, REPLY_MS);
    assert.match(ss, /timer:\(keepalive,/);
    console.log(
      `  link cut, no ttl, keepalive 1 s + 2 probes 1 s apart: the waiter had the lock ${
        afterCutMs.toFixed(0)
      } ms later`,
    );
  },
});
