/**
 * Mutual exclusion under churn: 200 clients (and a few netcat processes SIGKILLed while they
 * hold) race on 5 names for a few seconds with random waits, ttls, limits and ways of letting
 * go. Every hold, as the clients saw it, is checked: never more holders than the limit, fencing
 * tokens in hold order; afterwards nothing is held and nobody waits. `soak/soak.ts` runs the same
 * for longer against a server subprocess.
 */

import assert from "node:assert/strict";
import { startTestServer, until } from "./test_util.ts";
import { haveCommand, query, runChurn } from "./fault_util.ts";
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
