/**
 * Mutual exclusion under churn, with sessions: sessions holding many locks at once (pipelined
 * lock / release / cancel by id, some with a session lease), killed mid-hold (closed, or netcat
 * sessions SIGKILLed), frozen until their lease runs out, racing the connection-per-lock clients
 * of the plain churn on the same names. Every hold, as the clients saw it, goes into one
 * checker: never more holders than the limit, fencing tokens in hold order; afterwards nothing
 * is held and nobody waits.
 */

import assert from "node:assert/strict";
import { startTestServer, until } from "./test_util.ts";
import {
  delay,
  haveCommand,
  HoldChecker,
  LineConn,
  ProcClient,
  query,
  rng,
  runChurn,
  within,
} from "./fault_util.ts";
import type { LockInfo, Stats } from "../lib/protocol.ts";

const HAVE_NC = await haveCommand("nc");

const NAMES = [
  { name: "sc-a", limit: 1 },
  { name: "sc-b", limit: 1 },
  { name: "sc-c", limit: 1 },
  { name: "sc-f", limit: 1 },
  { name: "sc-g", limit: 1 },
  { name: "sc-h", limit: 1 },
  { name: "sc-d", limit: 3 },
  { name: "sc-e", limit: 3 },
];

interface Counts {
  [k: string]: number;
}

/** One session's life: lockers multiplexed over it, then an end (graceful, killed or frozen). */
async function sessionLife(
  port: number,
  who: string,
  r: () => number,
  checker: HoldChecker,
  count: (k: string) => void,
  problems: string[],
  end: number,
): Promise<void> {
  const ttl = r() < 0.3 ? 0.5 : undefined;
  const c = await LineConn.connect(port);
  let lastSent = performance.now();
  const send = (line: string) => {
    lastSent = performance.now();
    return c.send(line).catch(() => {});
  };
  await send(ttl === undefined ? "session" : `session,ttl:${ttl}`);
  const opening = await within(c.line(), 5000, `${who} opening`);
  if (!/^session,version:3,/.test(opening ?? "")) {
    problems.push(`${who}: opening got ${JSON.stringify(opening)}`);
    c.close();
    return;
  }
  // Replies by id; `alive` lines are only counted.
  const queues = new Map<string, (string | null)[]>();
  const waiting = new Map<string, (line: string | null) => void>();
  const deliver = (id: string, line: string | null) => {
    const w = waiting.get(id);
    if (w) {
      waiting.delete(id);
      w(line);
    } else {
      let q = queues.get(id);
      if (!q) queues.set(id, q = []);
      q.push(line);
    }
  };
  let ended = false;
  const reading = (async () => {
    for (;;) {
      const l = await c.line();
      if (l === null) break;
      const m = /,id:([a-zA-Z0-9_-]+)$/.exec(l);
      if (m) deliver(m[1], l.slice(0, m.index));
      else if (l !== "alive") problems.push(`${who}: stray line ${JSON.stringify(l)}`);
    }
    ended = true;
    for (const id of [...waiting.keys()]) deliver(id, null);
  })();
  const next = (id: string, ms: number): Promise<string | null> => {
    const q = queues.get(id);
    if (q && q.length > 0) return Promise.resolve(q.shift()!);
    if (ended) return Promise.resolve(null);
    return within(new Promise((resolve) => waiting.set(id, resolve)), ms, `${who}/${id}`);
  };

  /** Holds now: id → hold. */
  const holding = new Map<string, { name: string; start: number; token: number; who: string }>();
  let stop: "killed" | "frozen" | undefined;
  const life = performance.now() + 100 + r() * 600;

  const keepalives = ttl === undefined ? undefined : (async () => {
    while (stop === undefined && !ended) {
      await delay(ttl * 200);
      if (stop === undefined && !ended) await send(".keepalive");
    }
  })();

  const locker = async (n: number) => {
    const id = `k${n}`;
    while (stop === undefined && !ended && performance.now() < life) {
      const { name, limit } = NAMES[Math.floor(r() * NAMES.length)];
      const wait = [0, 0.05, 0.2, 0.5][Math.floor(r() * 4)];
      await send(`lock,id:${id},name:${name},wait:${wait}${limit > 1 ? `,limit:${limit}` : ""}`);
      const cancelAt = wait > 0 && r() < 0.15 ? performance.now() + r() * wait * 1000 : undefined;
      let cancelled = false;
      let reply: string | null;
      for (;;) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        const got = next(id, (wait + (ttl ?? 0) + 5) * 1000);
        if (cancelAt !== undefined && !cancelled) {
          timer = setTimeout(() => {
            if (stop !== undefined) return;
            cancelled = true;
            send(`cancel,id:${id}`);
          }, Math.max(0, cancelAt - performance.now()));
        }
        reply = await got.finally(() => clearTimeout(timer));
        if (reply === null || !reply.startsWith("queued,")) break;
      }
      if (reply === null) return;
      if (reply.startsWith("ok,token:")) {
        const start = performance.now();
        const token = Number(/token:(\d+)/.exec(reply)![1]);
        const hold = { name, start, token, who: `${who}/${id}` };
        count("granted");
        if (cancelled) {
          // The grant crossed the cancel: the cancel ends it (`cancelled`), the hold is empty.
          const after = await next(id, 5000);
          if (after === "cancelled") count("cancel crossed a grant");
          else if (after !== null && after !== "expired") {
            problems.push(`${who}/${id}: after a crossed cancel got ${after}`);
          }
          continue;
        }
        if (stop === "frozen") {
          // Granted while frozen: it ends with the session's lease.
          checker.add({ ...hold, end: lastSent + ttl! * 1000 });
          return;
        }
        if (stop === "killed" || ended) return;
        holding.set(id, hold);
        await delay(r() < 0.1 ? r() * 100 : r() * 15);
        if (stop !== undefined || ended) return; // the session's end records the hold
        const t = performance.now();
        holding.delete(id);
        checker.add({ ...hold, end: t });
        await send(`release,id:${id}`);
        const rel = await next(id, 5000);
        if (rel === "released") count("released");
        else if (rel === null && (stop !== undefined || ended)) return;
        else if (rel !== "expired") problems.push(`${who}/${id}: release got ${rel}`);
      } else if (reply === "cancelled") {
        count("cancelled");
      } else if (reply === "not-granted" || reply === "timeout") {
        count(reply);
        if (cancelled) {
          // The cancel crossed the end of the wait: it is answered as an unknown id.
          const after = await next(id, 5000);
          if (after === null) return;
          if (after !== "err,unknown id") problems.push(`${who}/${id}: after timeout: ${after}`);
          count("cancel crossed a timeout");
        }
      } else if (reply === "expired" && stop === "frozen") {
        return;
      } else {
        problems.push(`${who}/${id}: unexpected ${JSON.stringify(reply)}`);
      }
    }
  };

  const lockers = Array.from({ length: 2 + Math.floor(r() * 8) }, (_, i) => locker(i));
  const ending = r();
  const stopper = (async () => {
    await delay(Math.max(0, life - performance.now()));
    if (ending < 0.35) {
      // Killed mid-hold: every hold ends now.
      stop = "killed";
      const t = performance.now();
      for (const h of holding.values()) checker.add({ ...h, end: t });
      count(holding.size > 0 ? "session killed while holding" : "session killed");
      holding.clear();
      c.close();
    } else if (ending < 0.5 && ttl !== undefined) {
      // Frozen: sends nothing more; the server expires every lock once the lease runs out.
      stop = "frozen";
      const leaseEnd = lastSent + ttl * 1000;
      for (const h of holding.values()) checker.add({ ...h, end: leaseEnd });
      count(holding.size > 0 ? "session expired while holding" : "session expired");
      holding.clear();
    }
  })();
  await stopper;
  await Promise.all(lockers);
  if (stop === undefined) stop = "killed"; // graceful end: close when every locker is done
  for (const h of holding.values()) checker.add({ ...h, end: performance.now() });
  holding.clear();
  if (ttl !== undefined && stop === "frozen") {
    // The server closes the session when its lease runs out.
    await within(reading, (ttl + 5) * 1000, `${who} expiry`);
  }
  c.close();
  await reading;
  await keepalives;
  void end;
}

/** A netcat session that takes a few locks at once and is SIGKILLed while holding them. */
async function ncSession(
  port: number,
  who: string,
  r: () => number,
  checker: HoldChecker,
  count: (k: string) => void,
  problems: string[],
): Promise<void> {
  await using nc = ProcClient.nc(port);
  await nc.send("session");
  const opening = await within(nc.line(), 5000, `${who} opening`);
  if (!/^session,version:3,/.test(opening ?? "")) {
    problems.push(`${who}: opening got ${JSON.stringify(opening)}`);
    return;
  }
  const picks = NAMES.filter(() => r() < 0.6);
  for (const [i, n] of picks.entries()) {
    await nc.send(`lock,id:n${i},name:${n.name},wait:0.2${n.limit > 1 ? `,limit:${n.limit}` : ""}`);
  }
  const holds: { name: string; start: number; token: number; who: string }[] = [];
  let open = picks.length;
  while (open > 0) {
    const l = await within(nc.line(), 5000, `${who} replies`);
    if (l === null) break;
    const m = /^(.*),id:n(\d+)$/.exec(l);
    if (!m) {
      problems.push(`${who}: ${l}`);
      break;
    }
    if (m[1].startsWith("queued,")) continue;
    open--;
    if (m[1].startsWith("ok,token:")) {
      holds.push({
        name: picks[Number(m[2])].name,
        start: performance.now(),
        token: Number(/token:(\d+)/.exec(m[1])![1]),
        who: `${who}/n${m[2]}`,
      });
    }
  }
  await delay(r() * 20);
  const t = performance.now();
  await nc.kill("SIGKILL");
  for (const h of holds) checker.add({ ...h, end: t });
  count(holds.length > 0 ? "nc session killed while holding" : "nc session killed");
}

Deno.test("sessions holding many locks, killed or frozen mid-hold, racing connection-per-lock clients: never two holders", async () => {
  await using srv = await startTestServer();
  const seed = Number(Deno.env.get("TCPNETLOCK_CHURN_SEED") ?? Date.now() % 100_000);
  const checker = new HoldChecker();
  for (const n of NAMES) checker.limit(n.name, n.limit);
  const counts: Counts = {};
  const count = (k: string) => counts[k] = (counts[k] ?? 0) + 1;
  const problems: string[] = [];
  const durationMs = 4000;
  const end = performance.now() + durationMs;

  const sessions = async (s: number) => {
    const r = rng(seed * 1000 + 700 + s);
    let round = 0;
    while (performance.now() < end) {
      try {
        await sessionLife(srv.port, `s${s}.${round++}`, r, checker, count, problems, end);
      } catch (err) {
        problems.push(`s${s}: ${err instanceof Error ? err.message : err}`);
      }
    }
  };
  const ncs = async (k: number) => {
    const r = rng(seed * 1000 + 900 + k);
    let round = 0;
    while (performance.now() < end) {
      try {
        await ncSession(srv.port, `n${k}.${round++}`, r, checker, count, problems);
      } catch (err) {
        problems.push(`n${k}: ${err instanceof Error ? err.message : err}`);
      }
    }
  };
  const [plain] = await Promise.all([
    runChurn({
      port: srv.port,
      clients: 40,
      killers: 0,
      durationMs,
      names: NAMES,
      seed,
      maxWait: 0.5,
      checker,
    }),
    ...Array.from({ length: 24 }, (_, s) => sessions(s)),
    ...Array.from({ length: HAVE_NC ? 3 : 0 }, (_, k) => ncs(k)),
  ]);
  const sessionHolds = checker.holds.filter((h) => /^[sn]\d/.test(h.who)).length;
  console.log(
    `  seed ${seed}: ${checker.holds.length} holds (${sessionHolds} over sessions); ${
      JSON.stringify(counts)
    }; plain ${JSON.stringify(plain.counts)}`,
  );
  const violations = checker.violations();
  const all = [...problems, ...plain.problems];
  assert.deepEqual(
    { violations: violations.slice(0, 5), problems: all.slice(0, 5) },
    { violations: [], problems: [] },
    `seed ${seed}: ${violations.length} violations, ${all.length} problems`,
  );
  assert.ok(sessionHolds > 200, `only ${sessionHolds} holds over sessions`);
  for (const k of ["released", "session killed while holding"]) {
    assert.ok((counts[k] ?? 0) > 0, `no "${k}" (seed ${seed})`);
  }
  if (HAVE_NC) assert.ok((counts["nc session killed while holding"] ?? 0) > 0);
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
