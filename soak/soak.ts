#!/usr/bin/env -S deno run -A
/**
 * The soak: the fault suite at full size against server subprocesses, for a few minutes, printing
 * the measured figures against the targets. It fails (exit 1) only on a correctness violation
 * (two holders, an undocumented reply, a stuck client, a disturbed bystander), never on a figure
 * that missed its target on a noisy machine.
 *
 * ```sh
 * deno run -A soak/soak.ts            # everything, about 3 minutes
 * deno run -A soak/soak.ts --quick    # smaller sizes, about a minute
 * deno run -A soak/soak.ts --only kill,churn,idle,waiters
 * ```
 *
 * Sections: `kill` (release latency after SIGKILL), `ttl` (a silent holder's lease), `netns` (a
 * cut link, with a ttl and with TCP keepalive; needs root), `churn` (200 clients, 10 s),
 * `maxconn`, `idle`, `waiters`, `endless`, `slow`, `names` (floods, each a few rounds on a fresh
 * server: ping latency from a separate thread, RSS from /proc).
 *
 * @module
 */

import {
  delay,
  fdLimit,
  floodIdle,
  floodMaxConnections,
  floodNoNewline,
  floodSlowReader,
  floodWaiters,
  freePort,
  HeapServer,
  LineConn,
  linkCut,
  netnsUnavailable,
  openFds,
  percentile,
  ProcClient,
  query,
  rssKb,
  RssSampler,
  runChurn,
  type ServerChild,
  spawnServer,
  statsUntil,
  within,
} from "../tests/fault_util.ts";
import type { LockInfo } from "../lib/protocol.ts";

const argv = [...Deno.args];
const quick = argv.includes("--quick");
const onlyArg = argv.find((a) => a.startsWith("--only"));
const only = onlyArg === undefined ? undefined : new Set(
  (onlyArg.includes("=") ? onlyArg.split("=")[1] : argv[argv.indexOf(onlyArg) + 1]).split(","),
);
const seed = Number(
  argv.find((a) => a.startsWith("--seed="))?.split("=")[1] ?? Date.now() % 100_000,
);

const violations: string[] = [];
const summary: string[] = [];
const MB = 1024;

function say(text: string): void {
  console.log(text);
}

/** Records a figure against its target (a miss is reported, not fatal). */
function figure(name: string, value: string, target: string, met: boolean): void {
  const line = `${met ? "met " : "MISS"}  ${name}: ${value} (target ${target})`;
  summary.push(line);
  say(`  ${line}`);
}

function ms(x: number): string {
  return `${x.toFixed(1)} ms`;
}

/** A `.ping` prober in a worker thread. */
class WorkerProbe {
  #worker: Worker;
  constructor(port: number, everyMs = 10, busyOk = false) {
    this.#worker = new Worker(new URL("./ping_worker.ts", import.meta.url).href, {
      type: "module",
    });
    this.#worker.postMessage({ port, everyMs, busyOk });
  }

  stop(): Promise<{ latencies: number[]; failures: string[] }> {
    return new Promise((resolve) => {
      this.#worker.onmessage = (e) => {
        this.#worker.terminate();
        resolve(e.data);
      };
      this.#worker.postMessage("stop");
    });
  }
}

function pingFigures(p: { latencies: number[]; failures: string[] }) {
  return {
    count: p.latencies.length,
    p50: percentile(p.latencies, 50),
    p99: percentile(p.latencies, 99),
    max: Math.max(...p.latencies),
    failures: p.failures.length,
  };
}

/** A server subprocess at the default log level, on a free port (retried if taken meanwhile). */
async function quietServer(args: string[] = []): Promise<ServerChild> {
  for (let attempt = 0;; attempt++) {
    try {
      return await spawnServer(args, { info: false, port: freePort() });
    } catch (err) {
      if (attempt >= 3) throw err;
    }
  }
}

function wanted(section: string): boolean {
  return only === undefined || only.has(section);
}

// --- kill: release latency after SIGKILL of a holder process

async function killSection(): Promise<void> {
  const n = quick ? 20 : 60;
  say(`\n## kill: ${n} holders (nc, every 5th a Deno process) SIGKILLed with a waiter queued`);
  await using srv = await quietServer();
  const latencies: number[] = [];
  for (let i = 0; i < n; i++) {
    await using holder = i % 5 === 4 ? ProcClient.deno(srv.port) : ProcClient.nc(srv.port);
    const ok = await holder.request("lock,name:kill-latency", 15_000);
    if (ok !== "ok") throw new Error(`holder got ${ok}`);
    const waiter = await LineConn.connect(srv.port);
    try {
      await waiter.send("lock,name:kill-latency,wait:30");
      const q = await within(waiter.line(), 5000, "queued");
      if (q !== "queued,position:1") throw new Error(`waiter got ${q}`);
      const t0 = performance.now();
      await holder.kill("SIGKILL");
      const granted = await within(waiter.line(), 5000, "grant after kill");
      const dt = performance.now() - t0;
      if (!/^ok,token:\d+$/.test(granted ?? "")) {
        violations.push(`kill: waiter got ${granted}`);
      }
      latencies.push(dt);
      await waiter.send("release");
      await within(waiter.line(), 5000, "released");
    } finally {
      waiter.close();
    }
  }
  const p50 = percentile(latencies, 50);
  const p99 = percentile(latencies, 99);
  const max = Math.max(...latencies);
  say(`  SIGKILL -> next waiter has ok: p50 ${ms(p50)}, p99 ${ms(p99)}, max ${ms(max)}`);
  figure("release latency after SIGKILL, p99", ms(p99), "100 ms", p99 <= 100);
}

// --- ttl: a silent holder's lease

async function ttlSection(): Promise<void> {
  const n = quick ? 3 : 5;
  say(`\n## ttl: ${n} holders with ttl:1 fall silent; a waiter is queued`);
  await using srv = await quietServer();
  const freed: number[] = [];
  for (let i = 0; i < n; i++) {
    const holder = await LineConn.connect(srv.port);
    const waiter = await LineConn.connect(srv.port);
    try {
      await holder.send("lock,name:lease,ttl:1");
      await within(holder.line(), 5000, "grant");
      const t0 = performance.now();
      await waiter.send("lock,name:lease,wait:30");
      await within(waiter.line(), 5000, "queued");
      const g = await within(waiter.line(), 5000, "grant after the lease");
      freed.push(performance.now() - t0);
      if (!/^ok,token:\d+$/.test(g ?? "")) violations.push(`ttl: waiter got ${g}`);
      if ((await within(holder.line(), 5000, "expired")) !== "expired") {
        violations.push("ttl: the holder was not told expired");
      }
    } finally {
      holder.close();
      waiter.close();
    }
  }
  const max = Math.max(...freed);
  say(`  freed after the grant: ${freed.map((f) => f.toFixed(0)).join(", ")} ms`);
  figure("silent holder with ttl 1 s freed, max", ms(max), "ttl + 1 s = 2000 ms", max <= 2000);
}

// --- netns: a cut link

async function netnsSection(): Promise<void> {
  say("\n## netns: the link under a holder is cut (veth down), server in its own namespace");
  const why = await netnsUnavailable();
  if (why !== undefined) {
    say(`  skipped: network namespaces are not usable here (${why})`);
    return;
  }
  const keepalive = Deno.readTextFileSync("/proc/sys/net/ipv4/tcp_keepalive_time").trim();
  say(`  this machine's tcp_keepalive_time: ${keepalive} s (the server uses the kernel default)`);
  const a = await linkCut("lock,name:cut,ttl:1", {}, 5000);
  figure(
    "cut link, ttl 1 s: lock free after the cut",
    ms(a.afterCutMs),
    "ttl + 1 s = 2000 ms",
    a.afterCutMs <= 2000,
  );
  const b = await linkCut("lock,name:cut", { keepalive: [2, 1, 3] }, 5000);
  say(`  server socket before the cut: ${/timer:\([^)]*\)/.exec(b.ss)?.[0] ?? "(no timer)"}`);
  figure(
    "cut link, no ttl, keepalive 2 s + 3 x 1 s: lock free after the cut",
    ms(b.afterCutMs),
    "5 s + 1 s",
    b.afterCutMs <= 6000,
  );
}

// --- churn

async function churnSection(): Promise<void> {
  const durationMs = quick ? 4000 : 10_000;
  say(
    `\n## churn: 200 clients + 10 killed nc holders, ${durationMs / 1000} s, 5 names, seed ${seed}`,
  );
  await using srv = await quietServer();
  const probe = new WorkerProbe(srv.port, 20);
  const r = await runChurn({
    port: srv.port,
    clients: 200,
    killers: 10,
    durationMs,
    names: [
      { name: "churn-a", limit: 1 },
      { name: "churn-b", limit: 1 },
      { name: "churn-c", limit: 1 },
      { name: "churn-d", limit: 3 },
      { name: "churn-e", limit: 3 },
    ],
    seed,
    maxWait: 2,
  });
  const pings = pingFigures(await probe.stop());
  const v = r.checker.violations();
  say(`  ${r.checker.holds.length} holds; ${JSON.stringify(r.counts)}`);
  say(`  most holders .locks showed: ${JSON.stringify(r.maxSeen)}`);
  say(`  ping during churn: p50 ${ms(pings.p50)}, p99 ${ms(pings.p99)}, max ${ms(pings.max)}`);
  for (const x of [...v, ...r.problems].slice(0, 10)) say(`  VIOLATION ${x}`);
  violations.push(...v.map((x) => `churn: ${x}`), ...r.problems.map((x) => `churn: ${x}`));
  const locks = await query<LockInfo[]>(srv.port, ".locks");
  if (locks.length > 0) violations.push(`churn: left behind ${JSON.stringify(locks)}`);
  await statsUntil(srv.port, (s) => s.connections <= 1, "churn connections to close", 10_000)
    .catch((err) => violations.push(`churn: ${err.message}`));
  figure("mutual exclusion violations", String(v.length), "0", v.length === 0);
  figure("ping p99 during churn", ms(pings.p99), "50 ms", pings.p99 < 50);
}

// --- floods

/** One kind of flood: the server flags (and the same as in-process options) and the flood. */
interface Flood {
  section: string;
  title: string;
  args: string[];
  options: Record<string, unknown>;
  busyOk?: boolean;
  /** How many connections it opens (the in-Worker run shares this process's descriptors). */
  size?: number;
  run: (port: number, size: number) => Promise<string>;
}

/** A bystander that holds `flood-held` through a flood. */
async function bystander(port: number): Promise<LineConn> {
  const holder = await LineConn.connect(port);
  await holder.send("lock,name:flood-held,client-id:bystander");
  if ((await within(holder.line(), 5000, "bystander")) !== "ok") {
    holder.close();
    throw new Error("the bystander got no lock");
  }
  return holder;
}

/** The bystander still holds, answers `alive`, and nothing else is held. */
async function checkBystander(section: string, port: number, holder: LineConn): Promise<void> {
  await holder.send(".keepalive");
  const alive = await within(holder.line(), 5000, "bystander keepalive");
  const locks = await query<LockInfo[]>(port, ".locks");
  const clean = alive === "alive" && locks.length === 1 && locks[0].name === "flood-held" &&
    locks[0].holders[0]?.client_id === "bystander" && locks[0].waiting === 0;
  if (!clean) {
    violations.push(`${section}: bystander got ${alive}, .locks ${JSON.stringify(locks)}`);
  }
}

/**
 * Runs a flood `rounds` times against a fresh server subprocess (a worker thread pings, RSS is
 * sampled; after each round the connections must go back to the bystander alone, and RSS is read
 * 2 s later), then twice against a server in a Worker, to compare its live heap after garbage
 * collection before and after the second run (the first warms up).
 */
async function floodSection(f: Flood, rounds: number): Promise<void> {
  say(`\n## ${f.section}: ${f.title}`);
  {
    await using srv = await quietServer(f.args);
    const holder = await bystander(srv.port);
    try {
      await delay(500);
      const rss0 = rssKb(srv.pid);
      let worstP99 = 0;
      const afters: number[] = [];
      for (let round = 1; round <= rounds; round++) {
        const rss = new RssSampler(srv.pid, 25);
        const probe = new WorkerProbe(srv.port, 10, f.busyOk);
        const t0 = performance.now();
        let note = "";
        try {
          note = await f.run(srv.port, f.size ?? 0);
        } catch (err) {
          violations.push(`${f.section}: ${err instanceof Error ? err.message : err}`);
        }
        const pings = pingFigures(await probe.stop());
        const took = performance.now() - t0;
        await statsUntil(srv.port, (s) => s.connections <= 2, "the flood's end", 30_000)
          .catch((err) => violations.push(`${f.section}: ${err.message}`));
        await delay(2000);
        const mem = rss.stop();
        afters.push(mem.end);
        worstP99 = Math.max(worstP99, pings.p99);
        if (pings.failures > 0) {
          violations.push(`${f.section}: ${pings.failures} pings unanswered within 5 s`);
        }
        say(
          `  round ${round} (${(took / 1000).toFixed(1)} s): ${note}; ping p50 ${
            ms(pings.p50)
          } p99 ${ms(pings.p99)} max ${ms(pings.max)} (${pings.count} pings); RSS peak ${
            mb(mem.peak)
          }, 2 s after ${mb(mem.end)}`,
        );
      }
      await checkBystander(f.section, srv.port, holder);
      figure(
        `${f.section}: ping p99 under flood (worst round)`,
        ms(worstP99),
        "50 ms",
        worstP99 < 50,
      );
      const after = afters[afters.length - 1];
      figure(
        `${f.section}: RSS after vs before`,
        `${mb(rss0)} -> ${afters.map(mb).join(" -> ")} (+${pct(after, rss0)})`,
        "within 10%",
        after <= rss0 * 1.1,
      );
    } finally {
      holder.close();
    }
  }
  {
    // The server shares this process's open-file limit with the flood's clients here.
    const size = Math.min(f.size ?? 0, Math.floor((fdLimit() - openFds() - 500) / 2));
    if (f.size !== undefined) say(`  live heap: ${size} connections, server in a Worker`);
    await using srv = await HeapServer.start(f.options);
    const holder = await bystander(srv.port);
    try {
      await f.run(srv.port, size);
      await statsUntil(srv.port, (s) => s.connections <= 2, "the flood's end", 30_000);
      const before = await srv.heap();
      await f.run(srv.port, size);
      await statsUntil(srv.port, (s) => s.connections <= 2, "the flood's end", 30_000);
      const after = await srv.heap();
      await checkBystander(f.section, srv.port, holder);
      figure(
        `${f.section}: live heap after vs before (in a Worker, after GC)`,
        `${(before.heapUsed / 2 ** 20).toFixed(2)} -> ${
          (after.heapUsed / 2 ** 20).toFixed(2)
        } MB (+${pct(after.heapUsed, before.heapUsed)})`,
        "within 10%",
        after.heapUsed <= before.heapUsed * 1.1,
      );
    } finally {
      holder.close();
    }
  }
}

function mb(kb: number): string {
  return `${(kb / MB).toFixed(1)} MB`;
}

function pct(after: number, before: number): string {
  return `${((after / before - 1) * 100).toFixed(1)}%`;
}

function floods(room: (n: number) => number): Flood[] {
  const max = quick ? 200 : 1000;
  const extra = quick ? 1000 : 5000;
  const idle = room(quick ? 2000 : 5000);
  const waiters = room(quick ? 2000 : 10_000);
  const names = room(quick ? 1000 : 5000);
  return [
    {
      section: "maxconn",
      title: `--max-connections ${max}, filled, then ${extra} more connections`,
      args: ["--max-connections", String(max)],
      options: { maxConnections: max },
      busyOk: true,
      size: max,
      run: async (port) => {
        const r = await floodMaxConnections(port, max, extra, 250);
        return `${r.refused} refused with err,too many connections`;
      },
    },
    {
      section: "idle",
      title: `${idle} connections that never send a line (first-line timeout 3 s)`,
      args: ["--first-line-timeout", "3"],
      options: { firstLineTimeout: 3 },
      size: idle,
      run: async (port, n) => {
        const r = await floodIdle(port, n, 1, 3);
        return `opened in ${r.openedMs.toFixed(0)} ms, all closed by the server at ${
          r.freedMs.toFixed(0)
        } ms`;
      },
    },
    {
      section: "waiters",
      title:
        `${waiters} waiters on one name: they time out (wait:5), then ${waiters} leave front first`,
      args: [],
      options: {},
      size: waiters,
      run: async (port, n) => {
        const t = await floodWaiters(port, "flood-held", n, { waitS: 5 });
        const c = await floodWaiters(port, "flood-held", n, { waitS: 600, closeFront: true });
        return `queued in ${t.queuedMs.toFixed(0)} ms, timed out ${
          t.drainedMs.toFixed(0)
        } ms later (${t.linesPerWaiter.toFixed(1)} lines each); closed front first: empty in ${
          c.drainedMs.toFixed(0)
        } ms`;
      },
    },
    {
      section: "endless",
      title: "100 MB without a newline, as a first line and while holding",
      args: [],
      options: {},
      run: async (port) => {
        const a = await floodNoNewline(port, 100 << 20);
        const b = await floodNoNewline(port, 100 << 20, "endless");
        if (!["bad-request\n", ""].includes(a.reply)) {
          violations.push(`endless: first line got ${JSON.stringify(a.reply)}`);
        }
        if (!["ok\nbad-request\n", "ok\n"].includes(b.reply)) {
          violations.push(`endless: holder got ${JSON.stringify(b.reply)}`);
        }
        await statsUntil(port, (s) => s.lock_count === 1, "the endless holder's lock to go", 5000);
        return `first line: ${JSON.stringify(a.reply)} after ${
          (a.written / 2 ** 20).toFixed(1)
        } MB written; holding: ${JSON.stringify(b.reply)} after ${
          (b.written / 2 ** 20).toFixed(1)
        } MB`;
      },
    },
    {
      section: "slow",
      title: "a holder sends .keepalive lines and never reads the replies",
      args: [],
      options: {},
      run: async (port) => {
        const s = await floodSlowReader(port, "slow", 512 << 20, 2000);
        try {
          if (!s.stalled) violations.push(`slow: never stalled after ${s.written} bytes`);
          const locks = await query<LockInfo[]>(port, ".locks");
          if (!locks.some((l) => l.name === "slow")) {
            violations.push("slow: lost its lock while stalled");
          }
        } finally {
          s.conn.close();
          await s.writing;
        }
        await statsUntil(port, (x) => x.lock_count === 1, "the slow reader's lock to go", 5000);
        return `stalled after ${(s.written / 2 ** 20).toFixed(1)} MB written, still holding`;
      },
    },
    {
      section: "names",
      title: `${names} connections each holding its own name; .locks in full`,
      args: [],
      options: {},
      size: names,
      run: async (port, n) => {
        const conns: LineConn[] = [];
        try {
          for (let i = 0; i < n; i += 250) {
            conns.push(
              ...await Promise.all(
                Array.from({ length: Math.min(250, n - i) }, async (_, j) => {
                  const c = await LineConn.connect(port);
                  await c.send(`lock,name:many-${i + j}`);
                  const r = await within(c.line(), 5000, "grant");
                  if (r !== "ok") violations.push(`names: got ${r}`);
                  return c;
                }),
              ),
            );
          }
          const t = performance.now();
          const locks = await query<LockInfo[]>(port, ".locks");
          if (locks.length !== n + 1) violations.push(`names: .locks shows ${locks.length}`);
          return `.locks with ${locks.length} names in ${(performance.now() - t).toFixed(0)} ms`;
        } finally {
          for (const c of conns) c.close();
        }
      },
    },
  ];
}

async function main(): Promise<number> {
  const limit = fdLimit();
  say(
    `tcpnetlock soak${
      quick ? " (quick)" : ""
    }: seed ${seed}; ${navigator.hardwareConcurrency} CPUs; open-file limit ${limit}`,
  );
  const rounds = quick ? 2 : 3;
  const room = (n: number) => Math.max(100, Math.min(n, limit - openFds() - 500));
  const t0 = performance.now();
  const sections: [string, () => Promise<void>][] = [
    ["kill", killSection],
    ["ttl", ttlSection],
    ["netns", netnsSection],
    ["churn", churnSection],
    ...floods(room).map((f) =>
      [f.section, () => floodSection(f, rounds)] as [string, () => Promise<void>]
    ),
  ];
  for (const [name, fn] of sections) {
    if (!wanted(name)) continue;
    try {
      await fn();
    } catch (err) {
      violations.push(`${name}: ${err instanceof Error ? err.stack ?? err.message : err}`);
      say(`  FAILED: ${err instanceof Error ? err.message : err}`);
    }
  }
  say(`\n## summary (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  for (const l of summary) say(`  ${l}`);
  if (violations.length > 0) {
    say(`\n${violations.length} correctness violations:`);
    for (const v of violations.slice(0, 30)) say(`  ${v}`);
    return 1;
  }
  say("\nno correctness violations");
  return 0;
}

if (import.meta.main) Deno.exit(await main());
