#!/usr/bin/env -S deno run -A
/**
 * Soak: a three-member etcd cluster on loopback, three tcpnetlock servers on it (`--store etcd`,
 * in this process), and clients churning locks on a few names through all three servers, while
 * the etcd leader is SIGKILLed (and later restarted) several times.
 *
 * Every grant is recorded as the client saw it: from the moment `ok,token:T` arrived to the
 * moment the client sent `release` (or received `expired`). At the end, for every name, no two
 * of these intervals may overlap and tokens must increase in grant order. It also reports how
 * long service took to resume after each leader kill (kill to the next grant of any name).
 *
 * ```sh
 * deno run -A soak/etcd_cluster.ts                      # 3 kills, about 40 s
 * deno run -A soak/etcd_cluster.ts --kills 5 --clients 24 --names 4
 * ```
 *
 * Exit status 0 when no interval overlapped and service resumed after every kill within
 * `--resume-s` (default 8), 1 otherwise.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { LineReader } from "../lib/lines.ts";
import { type LockServer, startServer } from "../lib/server.ts";
import { startEtcd } from "../tests/etcd_util.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    clients: { type: "string", default: "12" },
    names: { type: "string", default: "3" },
    kills: { type: "string", default: "3" },
    "warmup-s": { type: "string", default: "3" },
    "between-s": { type: "string", default: "8" },
    "resume-s": { type: "string", default: "8" },
    "lease-ttl": { type: "string", default: "5" },
    quiet: { type: "boolean", default: false },
  },
});
const CLIENTS = Number(args.values.clients);
const NAMES = Number(args.values.names);
const KILLS = Number(args.values.kills);
const WARMUP_MS = Number(args.values["warmup-s"]) * 1000;
const BETWEEN_MS = Number(args.values["between-s"]) * 1000;
const RESUME_MS = Number(args.values["resume-s"]) * 1000;
const LEASE_TTL = Number(args.values["lease-ttl"]);

const t0 = performance.now();
const say = (text: string) => {
  if (!args.values.quiet) {
    console.log(`[${((performance.now() - t0) / 1000).toFixed(2)} s] ${text}`);
  }
};

interface Interval {
  name: string;
  client: number;
  token: number;
  start: number;
  end: number;
  how: "released" | "expired" | "lost";
}

const intervals: Interval[] = [];
/** For each grant: when its request was sent and when the grant arrived. */
const grantTimes: { asked: number; at: number }[] = [];
/** What each client is doing now (for a report if one gets stuck). */
const doing: string[] = [];
const errors = new Map<string, number>();
const countError = (what: string) => errors.set(what, (errors.get(what) ?? 0) + 1);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const encoder = new TextEncoder();

await using etcd = await startEtcd({ members: 3 });
say(`etcd cluster up: ${etcd.endpoints.join(" ")}`);
const prefix = `/soak-${crypto.randomUUID().slice(0, 8)}`;
const servers: LockServer[] = [];
for (let i = 0; i < 3; i++) {
  // Each server prefers a different member first.
  const endpoints = [0, 1, 2].map((k) => etcd.endpoints[(i + k) % 3]);
  servers.push(
    await startServer({
      hostname: "127.0.0.1",
      port: 0,
      etcd: { endpoints, prefix, leaseTtl: LEASE_TTL, timeoutMs: 1000 },
    }),
  );
}
say(`tcpnetlock servers on ports ${servers.map((s) => s.port).join(", ")}`);

let stop = false;

async function client(id: number): Promise<void> {
  let n = 0;
  while (!stop) {
    const name = `soak${(id + n++) % NAMES}`;
    const server = servers[(id + n) % servers.length];
    let conn: Deno.Conn | undefined;
    try {
      doing[id] = `connecting to ${server.port}`;
      conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      const lines = new LineReader(conn, 4096);
      const next = async (): Promise<string | null> => {
        const r = await lines.next();
        return r.kind === "line" ? r.line : null;
      };
      const asked = performance.now();
      doing[id] = `asked ${name} at ${server.port}`;
      await conn.write(encoder.encode(`lock,name:${name},wait:10,client-id:c${id}\n`));
      let line = await next();
      while (line !== null && line.startsWith("queued,")) line = await next();
      doing[id] = `got ${line} for ${name} at ${server.port}`;
      const m = /^ok,token:(\d+)$/.exec(line ?? "");
      if (m === null) {
        countError(line ?? "closed before a grant");
        await sleep(50);
        continue;
      }
      const start = performance.now();
      grantTimes.push({ asked, at: start });
      const token = Number(m[1]);
      // Hold for 2-20 ms, watching for `expired` meanwhile.
      const holdMs = 2 + Math.random() * 18;
      const pending = next();
      const early = await Promise.race([pending, sleep(holdMs).then(() => "held" as const)]);
      if (early !== "held") {
        intervals.push({
          name,
          client: id,
          token,
          start,
          end: performance.now(),
          how: early === "expired" ? "expired" : "lost",
        });
        countError(early ?? "closed while holding");
        continue;
      }
      const end = performance.now();
      intervals.push({ name, client: id, token, start, end, how: "released" });
      doing[id] = `releasing ${name} at ${server.port}`;
      await conn.write(encoder.encode("release\n"));
      const reply = await pending;
      doing[id] = "idle";
      if (reply !== "released") countError(`release answered ${reply}`);
    } catch (err) {
      countError(err instanceof Error ? err.name : String(err));
      await sleep(50);
    } finally {
      try {
        conn?.close();
      } catch {
        // already closed
      }
    }
  }
}

const clients = Array.from({ length: CLIENTS }, (_, i) => client(i));
await sleep(WARMUP_MS);
say(`warm: ${intervals.length} grants so far`);

const resumes: number[] = [];
for (let k = 0; k < KILLS; k++) {
  const leader = await etcd.leader();
  const killedAt = performance.now();
  await etcd.kill(leader, "SIGKILL");
  say(`SIGKILLed the etcd leader m${leader}`);
  // Service resumed: the first grant after the kill (any name, any server).
  const deadline = killedAt + Math.max(RESUME_MS, BETWEEN_MS);
  let resumedAt: number | undefined;
  while (performance.now() < deadline) {
    resumedAt = grantTimes.find((g) => g.asked > killedAt)?.at;
    if (resumedAt !== undefined) break;
    await sleep(20);
  }
  const resume = resumedAt === undefined ? Infinity : resumedAt - killedAt;
  resumes.push(resume);
  say(`service resumed ${Number.isFinite(resume) ? `${Math.round(resume)} ms` : "NEVER"} after`);
  await sleep(Math.max(0, BETWEEN_MS / 2 - (performance.now() - killedAt)));
  await etcd.restart(leader);
  say(`restarted m${leader}`);
  await sleep(BETWEEN_MS / 2);
}

stop = true;
let timer: ReturnType<typeof setTimeout> | undefined;
const stopped = await Promise.race([
  Promise.all(clients).then(() => true),
  new Promise<boolean>((r) => timer = setTimeout(() => r(false), 15_000)),
]);
clearTimeout(timer);
if (!stopped) {
  console.error("clients stuck:", JSON.stringify(doing.map((d, i) => `c${i}: ${d}`), null, 1));
  for (const s of servers) console.error(JSON.stringify(s.locks()), JSON.stringify(s.stats()));
  // Throwing (not Deno.exit) lets `await using` stop the etcd members.
  throw new Error("clients did not stop within 15 s");
}
for (const s of servers) await s.close();

// The check: per name, intervals in grant order never overlap, and tokens increase.
let overlaps = 0;
let tokenOrder = 0;
const byName = new Map<string, Interval[]>();
for (const iv of intervals) {
  const list = byName.get(iv.name) ?? [];
  list.push(iv);
  byName.set(iv.name, list);
}
for (const [name, list] of byName) {
  list.sort((a, b) => a.start - b.start);
  for (let i = 1; i < list.length; i++) {
    const prev = list[i - 1];
    const cur = list[i];
    if (cur.start < prev.end) {
      overlaps++;
      console.error(
        `OVERLAP on ${name}: c${prev.client} token ${prev.token} held to ${prev.end.toFixed(1)}, ` +
          `c${cur.client} token ${cur.token} granted at ${cur.start.toFixed(1)}`,
      );
    }
    if (cur.token <= prev.token) tokenOrder++;
  }
}
const summary = {
  grants: intervals.length,
  released: intervals.filter((i) => i.how === "released").length,
  expired: intervals.filter((i) => i.how === "expired").length,
  overlaps,
  token_order_violations: tokenOrder,
  resume_ms: resumes.map((r) => (Number.isFinite(r) ? Math.round(r) : null)),
  errors: Object.fromEntries(errors),
  seconds: Math.round((performance.now() - t0) / 100) / 10,
};
console.log(JSON.stringify(summary, null, 2));
const ok = overlaps === 0 && tokenOrder === 0 && resumes.every((r) => r <= RESUME_MS);
// Not Deno.exit(): the etcd members are stopped when `etcd` goes out of scope.
Deno.exitCode = ok ? 0 : 1;
