/**
 * Mutual exclusion under churn: 200 clients (and a few netcat processes SIGKILLed while they
 * hold) race on 5 names for a few seconds with random waits, ttls, limits and ways of letting
 * go. Every hold, as the clients saw it, is checked: never more holders than the limit, fencing
 * tokens in hold order; afterwards nothing is held and nobody waits. `soak/soak.ts` runs the same
 * for longer against a server subprocess.
 *
 * Shared locks: the same churn with random modes on readers–writer names, and a stream of
 * readers that never lets the name go free beside writers that must each be granted within
 * their wait; both against the memory store and (when etcd is installed) the etcd store.
 */

import assert from "node:assert/strict";
import { startTestServer, type TestServer, until } from "./test_util.ts";
import {
  delay,
  haveCommand,
  HoldChecker,
  LineConn,
  query,
  rng,
  runChurn,
  within,
} from "./fault_util.ts";
import { hasEtcd, sharedEtcd } from "./etcd_util.ts";
import type { LockInfo, Stats } from "../lib/protocol.ts";

/** The holders SIGKILLed are netcat processes. */
const HAVE_NC = await haveCommand("nc");
if (!HAVE_NC) console.log("netcat (nc) is not installed: no holder is SIGKILLed in the churn");

const NAMES = [
  { name: "churn-a", limit: 1 },
  { name: "churn-b", limit: 1 },
  { name: "churn-c", limit: 1 },
  { name: "churn-d", limit: 3 },
  { name: "churn-e", limit: 3 },
];

Deno.test("200 clients racing on 5 names: never two holders (never more than the limit), nothing stuck", async () => {
  await using srv = await startTestServer();
  const seed = Number(Deno.env.get("TCPNETLOCK_CHURN_SEED") ?? Date.now() % 100_000);
  const t0 = performance.now();
  const result = await runChurn({
    port: srv.port,
    clients: 200,
    killers: HAVE_NC ? 4 : 0,
    durationMs: 4000,
    names: NAMES,
    seed,
    maxWait: 1,
  });
  const ms = performance.now() - t0;
  const holds = result.checker.holds.length;
  console.log(
    `  seed ${seed}: ${holds} holds in ${(ms / 1000).toFixed(1)} s; ${
      JSON.stringify(result.counts)
    }`,
  );
  console.log(`  most holders seen by .locks: ${JSON.stringify(result.maxSeen)}`);
  const violations = result.checker.violations();
  assert.deepEqual(
    { violations: violations.slice(0, 5), problems: result.problems.slice(0, 5) },
    { violations: [], problems: [] },
    `seed ${seed}: ${violations.length} violations, ${result.problems.length} problems`,
  );
  // Enough happened for the check to mean something.
  assert.ok(holds > 200, `only ${holds} holds`);
  for (const k of ["released", "closed while holding", "timeout"]) {
    assert.ok((result.counts[k] ?? 0) > 0, `no "${k}" (seed ${seed})`);
  }
  if (HAVE_NC) assert.ok((result.counts["killed while holding"] ?? 0) > 0, "no holder was killed");
  // Nothing is held and nobody waits; every connection goes away.
  assert.deepEqual(await query<LockInfo[]>(srv.port, ".locks"), []);
  await until(
    async () => (await query<Stats>(srv.port, ".stats")).connections === 1,
    "every churn connection to be closed",
    5000,
    50,
  );
  const stats = await query<Stats>(srv.port, ".stats");
  assert.equal(stats.waiting, 0);
  assert.equal(stats.lock_count, 0);
});

const ETCD = await hasEtcd();

/** A server on the memory store, or on the shared etcd under a prefix of its own. */
async function serverOn(store: "memory" | "etcd"): Promise<TestServer> {
  if (store === "memory") return await startTestServer();
  return await startTestServer({
    etcd: {
      endpoints: await sharedEtcd(),
      prefix: `/tcpnetlock-test/${crypto.randomUUID().slice(0, 8)}`,
    },
  });
}

for (const store of ["memory", "etcd"] as const) {
  Deno.test({
    name: `${store} store, random modes, waits, ttls, disconnects and kills: never an exclusive ` +
      "holder beside another holder, never a writer overtaken by a later reader",
    ignore: store === "etcd" && !ETCD,
    async fn() {
      await using srv = await serverOn(store);
      const seed = Number(Deno.env.get("TCPNETLOCK_CHURN_SEED") ?? Date.now() % 100_000);
      const result = await runChurn({
        port: srv.port,
        clients: store === "memory" ? 80 : 50,
        killers: HAVE_NC ? 2 : 0,
        durationMs: 3000,
        names: [
          { name: "rw-a", limit: 1, modes: true },
          { name: "rw-b", limit: 1, modes: true },
          { name: "rw-c", limit: 1, modes: true },
          { name: "rw-d", limit: 1, modes: true },
          { name: "rw-e", limit: 1, modes: true },
          { name: "plain", limit: 1 },
        ],
        seed,
        maxWait: 1,
      });
      const holds = result.checker.holds;
      const shared = holds.filter((h) => h.shared).length;
      console.log(
        `  seed ${seed}: ${holds.length} holds (${shared} shared); ${
          JSON.stringify(result.counts)
        }; most holders seen: ${JSON.stringify(result.maxSeen)}`,
      );
      const violations = result.checker.violations();
      assert.deepEqual(
        { violations: violations.slice(0, 5), problems: result.problems.slice(0, 5) },
        { violations: [], problems: [] },
        `seed ${seed}: ${violations.length} violations, ${result.problems.length} problems`,
      );
      // Enough of each for the checks to mean something, also on a busy machine.
      assert.ok(shared > 20 && holds.length - shared > 10, `only ${shared} of ${holds.length}`);
      // Readers did hold together (the check of overlaps means something).
      assert.ok(Object.values(result.maxSeen).some((n) => n > 1));
      assert.deepEqual(await query<LockInfo[]>(srv.port, ".locks"), []);
    },
  });

  Deno.test({
    name: `${store} store: while readers keep arriving, every writer is granted within its wait`,
    ignore: store === "etcd" && !ETCD,
    async fn() {
      await using srv = await serverOn(store);
      const checker = new HoldChecker();
      checker.limit("rw", 1, true);
      const problems: string[] = [];
      const writerWaits: number[] = [];
      const end = performance.now() + 3000;
      const WRITER_WAIT = 2;
      let readerHolds = 0;
      // One lock round: returns false when it was not granted.
      const round = async (who: string, shared: boolean, hold: number): Promise<boolean> => {
        const c = await LineConn.connect(srv.port);
        try {
          const sentAt = performance.now();
          const wait = shared ? 10 : WRITER_WAIT;
          await c.send(`lock,name:rw,mode:${shared ? "shared" : "exclusive"},wait:${wait}`);
          let reply: string | null;
          let queuedAt: number | undefined;
          for (;;) {
            reply = await within(c.line(), (wait + 3) * 1000, `${who} reply`);
            if (reply === null || !reply.startsWith("queued,")) break;
            queuedAt ??= performance.now();
          }
          if (!/^ok,token:\d+$/.test(reply ?? "")) {
            problems.push(`${who}: got ${JSON.stringify(reply)}`);
            return false;
          }
          const start = performance.now();
          if (!shared) writerWaits.push(start - sentAt);
          else readerHolds++;
          const token = Number(reply!.slice("ok,token:".length));
          await delay(hold);
          const t = performance.now();
          await c.send("release");
          const rel = await within(c.line(), 5000, `${who} release`);
          if (rel !== "released") problems.push(`${who}: release got ${JSON.stringify(rel)}`);
          checker.add({ name: "rw", start, end: t, token, who, shared, sentAt, queuedAt });
          return true;
        } finally {
          c.close();
        }
      };
      const reader = async (id: number) => {
        const r = rng(id + 1);
        for (let i = 0; performance.now() < end; i++) {
          await round(`r${id}.${i}`, true, 5 + r() * 35);
        }
      };
      const writer = async (id: number) => {
        for (let i = 0; performance.now() < end; i++) {
          if (!await round(`w${id}.${i}`, false, 5)) break;
          await delay(50);
        }
      };
      await Promise.all([
        ...Array.from({ length: 20 }, (_, i) => reader(i)),
        ...Array.from({ length: 3 }, (_, i) => writer(i)),
      ]);
      const violations = checker.violations();
      assert.deepEqual(
        { violations: violations.slice(0, 5), problems: problems.slice(0, 5) },
        { violations: [], problems: [] },
      );
      const longest = Math.max(...writerWaits);
      console.log(
        `  ${writerWaits.length} writer grants (longest wait ${longest.toFixed(0)} ms) among ` +
          `${readerHolds} reader holds`,
      );
      assert.ok(writerWaits.length >= 6, `only ${writerWaits.length} writer grants`);
      assert.ok(readerHolds > writerWaits.length * 5, `only ${readerHolds} reader holds`);
      assert.ok(longest < WRITER_WAIT * 1000);
      assert.deepEqual(await query<LockInfo[]>(srv.port, ".locks"), []);
    },
  });
}
