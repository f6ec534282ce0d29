/**
 * The lean load generator (bench/cgen/loadgen.c): built with the machine's C compiler on first
 * use (cached by the source's hash in the temp directory), run as one or more processes, their
 * results merged. Its CPU time is reported beside the server's, so a reader can see that the
 * generator is not what limits a figure.
 *
 * ```sh
 * deno run -A bench/cgen.ts --port 7654 --clients 16 --seconds 3 --procs 1
 * deno run -A bench/cgen.ts --port 7654 --clients 16 --seconds 3 --session   # over sessions
 * deno run -A bench/cgen.ts --port 7654 --clients 64 --seconds 3 --handover  # 4 names, wait:30
 * ```
 *
 * @module
 */

import {
  type CyclesResult,
  type HandoverOptions,
  type HandoverResult,
  type Latency,
  readCpuTicks,
  type Target,
} from "./load.ts";

const SOURCE = new URL("./cgen/loadgen.c", import.meta.url);

let built: Promise<string | null> | undefined;

/** Why the C generator cannot be used here, once {@linkcode buildCGen} said `null`. */
export let cgenUnavailable = "";

/**
 * Compiles the generator (once per process; cached across runs by the source's hash). Returns
 * the binary's path, or `null` with {@linkcode cgenUnavailable} set when there is no C compiler.
 */
export function buildCGen(): Promise<string | null> {
  built ??= (async () => {
    const source = await Deno.readFile(SOURCE);
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", source));
    const hash = Array.from(digest.slice(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
    const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
    const out = `${tmp}/tcpnetlock-loadgen-${hash}`;
    try {
      await Deno.stat(out);
      return out;
    } catch { /* not built yet */ }
    for (const cc of ["cc", "gcc", "clang"]) {
      try {
        const partial = `${out}.${Deno.pid}`;
        const r = await new Deno.Command(cc, {
          args: ["-O2", "-o", partial, SOURCE.pathname],
          stdout: "null",
          stderr: "piped",
        }).output();
        if (!r.success) {
          cgenUnavailable = `${cc} failed: ${new TextDecoder().decode(r.stderr).slice(0, 300)}`;
          continue;
        }
        await Deno.rename(partial, out);
        return out;
      } catch (e) {
        cgenUnavailable = e instanceof Deno.errors.NotFound
          ? "no C compiler (cc, gcc, clang)"
          : String(e);
      }
    }
    return null;
  })();
  return built;
}

/** Options of {@linkcode runCyclesC}. */
export interface CGenOptions {
  /** Concurrent clients in all, spread over the processes. */
  clients: number;
  /** Measured time in milliseconds. */
  durationMs: number;
  /** Unmeasured time before, in milliseconds. */
  warmupMs?: number;
  /** Generator processes (each an epoll loop on one thread). */
  procs?: number;
  /** Lock names are `${prefix}-${process}-${client}`. */
  prefix?: string;
  /** The server's pid, to report its CPU over the same window. */
  serverPid?: number;
  /**
   * Cycles over sessions (protocol version 3): each client opens one session and takes and
   * releases its lock on it, `lock,id:0,...` → `ok` → `release,id:0` → `released` (default:
   * one connection per lock).
   */
  session?: boolean;
}

/** What {@linkcode runCyclesC} measured: a cycles result plus both sides' CPU. */
export interface CGenResult extends CyclesResult {
  /** Generator processes. */
  procs: number;
  /** The generator's CPU over the measured window, in % of one core (all processes). */
  generatorCpuPercent: number;
  /** The server's CPU over (about) the same window, in % of one core; null without a pid. */
  serverCpuPercent: number | null;
  /** When merged from slices ({@linkcode mergeCGen}): each slice's rate, in the order run. */
  sliceRates?: number[];
}

/** What a merge needs beyond a result's figures (kept aside: not written to the JSON). */
interface Parts {
  hist: Map<number, number>;
  sum: number;
  max: number;
  cpu: number;
}
const parts = new WeakMap<CGenResult, Parts>();

interface Raw {
  cycles: number;
  cpuSeconds: number;
  sumLatency: number;
  maxLatency: number;
  histogramUs: [number, number][];
  errors: { total: number; kinds: Record<string, number>; examples: string[] };
}

type Errors = Raw["errors"];

/** Adds `from`'s errors to `into` (at most 10 examples kept). */
function addErrors(into: Errors, from: Errors): void {
  into.total += from.total;
  for (const [k, n] of Object.entries(from.kinds)) into.kinds[k] = (into.kinds[k] ?? 0) + n;
  into.examples.push(...from.examples.slice(0, 10 - into.examples.length));
}

function fromHistogram(hist: Map<number, number>, sum: number, max: number): Latency {
  const keys = [...hist.keys()].sort((a, b) => a - b);
  let count = 0;
  for (const k of keys) count += hist.get(k)!;
  const at = (q: number): number => {
    if (count === 0) return 0;
    const rank = Math.ceil(q * count);
    let seen = 0;
    for (const k of keys) {
      seen += hist.get(k)!;
      if (seen >= rank) return Math.round(k) / 1000;
    }
    return Math.round(keys[keys.length - 1]) / 1000;
  };
  return {
    count,
    p50: at(0.5),
    p99: at(0.99),
    max: Math.round(max * 1e6) / 1000,
    mean: count ? Math.round((sum / count) * 1e6) / 1000 : 0,
  };
}

/**
 * Lock+release cycles from the C generator: `clients` at once on distinct names, one connection
 * per lock (or one session per client, with `session`), spread over `procs` processes. Throws
 * when the generator cannot be built.
 */
export async function runCyclesC(target: Target, options: CGenOptions): Promise<CGenResult> {
  const bin = await buildCGen();
  if (bin === null) throw new Error(`the C load generator is unavailable: ${cgenUnavailable}`);
  const procs = Math.max(1, Math.min(options.procs ?? 1, options.clients));
  const warmupMs = options.warmupMs ?? 0;
  const prefix = options.prefix ?? `ccyc${options.clients}`;
  const children = Array.from({ length: procs }, (_, p) => {
    const share = Math.floor(options.clients / procs) + (p < options.clients % procs ? 1 : 0);
    return new Deno.Command(bin, {
      args: [
        "--host",
        target.hostname,
        "--port",
        String(target.port),
        "--clients",
        String(share),
        "--seconds",
        String(options.durationMs / 1000),
        "--warmup",
        String(warmupMs / 1000),
        "--prefix",
        `${prefix}-${p}`,
        "--session",
        options.session ? "1" : "0",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  });
  // The server's CPU over the measured window: read when the warm-up ends and when it is over.
  const serverCpu = serverCpuWindow(options.serverPid, warmupMs, options.durationMs);
  const outputs = await Promise.all(children.map((c) => c.output()));
  const serverCpuPercent = await serverCpu.percent();
  const hist = new Map<number, number>();
  let cycles = 0, cpu = 0, sum = 0, max = 0;
  const errors: Errors = { total: 0, kinds: {}, examples: [] };
  for (const out of outputs) {
    const text = new TextDecoder().decode(out.stdout);
    if (!out.success) {
      throw new Error(`loadgen failed: ${new TextDecoder().decode(out.stderr)}`);
    }
    const raw = JSON.parse(text) as Raw;
    cycles += raw.cycles;
    cpu += raw.cpuSeconds;
    sum += raw.sumLatency;
    max = Math.max(max, raw.maxLatency);
    for (const [us, n] of raw.histogramUs) hist.set(us, (hist.get(us) ?? 0) + n);
    addErrors(errors, raw.errors);
  }
  const seconds = options.durationMs / 1000;
  const result: CGenResult = {
    clients: options.clients,
    cycles,
    seconds,
    rate: Math.round(cycles / seconds),
    latency: fromHistogram(hist, sum, max),
    errors,
    procs,
    generatorCpuPercent: Math.round((cpu / seconds) * 1000) / 10,
    serverCpuPercent,
  };
  parts.set(result, { hist, sum, max, cpu });
  return result;
}

interface RawHistogram {
  count: number;
  sum: number;
  max: number;
  us: [number, number][];
}

interface RawHandover {
  grants: number;
  handovers: number;
  sharedGrants: number;
  queuedLines: number;
  allGrants: number;
  cpuSeconds: number;
  delay: RawHistogram;
  grantLatency: RawHistogram;
  writerGrantLatency: RawHistogram;
  errors: Errors;
}

function latencyOf(h: RawHistogram): Latency {
  return fromHistogram(new Map(h.us), h.sum, h.max);
}

/** Reads the server's CPU ticks when the warm-up ends and when the window is over. */
function serverCpuWindow(pid: number | undefined, warmupMs: number, durationMs: number) {
  let from: number | null = null;
  let to: number | null = null;
  const timers = pid === undefined ? [] : [
    setTimeout(() => from = readCpuTicks(pid), warmupMs),
    setTimeout(() => to = readCpuTicks(pid), warmupMs + durationMs),
  ];
  return {
    /** The server's CPU over the window in % of one core, or null (no pid, not read). */
    async percent(): Promise<number | null> {
      for (const t of timers) clearTimeout(t);
      if (from === null || to === null) return null;
      const ticks = await clockTicks();
      return ticks > 0 ? Math.round(((to - from) / ticks / (durationMs / 1000)) * 1000) / 10 : null;
    },
  };
}

/**
 * The hand-over scenario from the C generator (bench/cgen/loadgen.c `--handover 1`): the same
 * loop, checks and figures as `runHandover` in bench/load.ts, from one epoll process instead of
 * the benchmark's own event loop, which is part of every delay it measures. One process: every
 * client of a name must be in it for the exclusion and token checks. Throws when the generator
 * cannot be built.
 *
 * @example
 * ```ts
 * import { runHandoverC } from "./cgen.ts";
 * const r = await runHandoverC({ hostname: "127.0.0.1", port: 7654 }, {
 *   clients: 64,
 *   names: 4,
 *   durationMs: 2000,
 * });
 * console.log(r.rate, r.delay.p99, r.generatorCpuPercent);
 * ```
 */
export async function runHandoverC(
  target: Target,
  options: HandoverOptions,
): Promise<HandoverResult & { generator: "c" }> {
  const bin = await buildCGen();
  if (bin === null) throw new Error(`the C load generator is unavailable: ${cgenUnavailable}`);
  const warmupMs = options.warmupMs ?? 0;
  const readers = options.readers ?? 0;
  const cpu = serverCpuWindow(options.serverPid, warmupMs, options.durationMs);
  const out = await new Deno.Command(bin, {
    args: [
      "--host",
      target.hostname,
      "--port",
      String(target.port),
      "--clients",
      String(options.clients),
      "--names",
      String(options.names),
      "--seconds",
      String(options.durationMs / 1000),
      "--warmup",
      String(warmupMs / 1000),
      "--prefix",
      options.prefix ?? "handover",
      "--handover",
      "1",
      "--wait",
      String(options.wait ?? 30),
      "--timeout",
      String((options.timeoutMs ?? 5000) / 1000),
      "--check",
      options.checkLocking === false ? "0" : "1",
      "--readers",
      String(readers),
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const serverCpuPercent = await cpu.percent();
  if (!out.success) throw new Error(`loadgen failed: ${new TextDecoder().decode(out.stderr)}`);
  const raw = JSON.parse(new TextDecoder().decode(out.stdout)) as RawHandover;
  const seconds = options.durationMs / 1000;
  return {
    generator: "c",
    clients: options.clients,
    names: options.names,
    grants: raw.grants,
    handovers: raw.handovers,
    readers,
    sharedGrants: raw.sharedGrants,
    ...(readers > 0 ? { writerGrantLatency: latencyOf(raw.writerGrantLatency) } : {}),
    queuedPerGrant: raw.allGrants ? Math.round((raw.queuedLines / raw.allGrants) * 1000) / 1000 : 0,
    seconds,
    rate: Math.round(raw.grants / seconds),
    delay: latencyOf(raw.delay),
    grantLatency: latencyOf(raw.grantLatency),
    generatorCpuPercent: Math.round((raw.cpuSeconds / seconds) * 1000) / 10,
    ...(serverCpuPercent === null ? {} : { serverCpuPercent }),
    errors: raw.errors,
  };
}

/**
 * One result from slices of the same level measured apart (see `alternate` in bench.ts): cycles
 * and seconds add up, the latency comes from the merged histograms, the CPU figures are averaged
 * over the seconds; `sliceRates` keeps each slice's rate.
 *
 * @example
 * ```ts
 * import { mergeCGen, runCyclesC } from "./cgen.ts";
 * const target = { hostname: "127.0.0.1", port: 7654 };
 * const slices = [];
 * for (let i = 0; i < 4; i++) slices.push(await runCyclesC(target, { clients: 16, durationMs: 1500 }));
 * console.log(mergeCGen(slices).rate);
 * ```
 */
export function mergeCGen(slices: CGenResult[]): CGenResult {
  if (slices.length === 0) throw new Error("mergeCGen: no slices");
  if (slices.length === 1) return slices[0];
  const hist = new Map<number, number>();
  let cycles = 0, seconds = 0, sum = 0, max = 0, cpu = 0, serverCpu = 0, serverSeconds = 0;
  const errors: Errors = { total: 0, kinds: {}, examples: [] };
  for (const r of slices) {
    const p = parts.get(r);
    if (p === undefined) throw new Error("mergeCGen: a result not made by runCyclesC");
    cycles += r.cycles;
    seconds += r.seconds;
    sum += p.sum;
    max = Math.max(max, p.max);
    cpu += p.cpu;
    for (const [us, n] of p.hist) hist.set(us, (hist.get(us) ?? 0) + n);
    if (r.serverCpuPercent !== null) {
      serverCpu += r.serverCpuPercent * r.seconds;
      serverSeconds += r.seconds;
    }
    addErrors(errors, r.errors);
  }
  const merged: CGenResult = {
    clients: slices[0].clients,
    cycles,
    seconds,
    rate: Math.round(cycles / seconds),
    latency: fromHistogram(hist, sum, max),
    errors,
    procs: slices[0].procs,
    generatorCpuPercent: Math.round((cpu / seconds) * 1000) / 10,
    serverCpuPercent: serverSeconds > 0 ? Math.round((serverCpu / serverSeconds) * 10) / 10 : null,
    sliceRates: slices.map((r) => r.rate),
  };
  parts.set(merged, { hist, sum, max, cpu });
  return merged;
}

async function clockTicks(): Promise<number> {
  const { clockTicksPerSecond } = await import("./load.ts");
  return await clockTicksPerSecond();
}

if (import.meta.main) {
  const { parseArgs } = await import("node:util");
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      host: { type: "string", default: "127.0.0.1" },
      port: { type: "string" },
      clients: { type: "string", default: "16" },
      seconds: { type: "string", default: "3" },
      procs: { type: "string", default: "1" },
      pid: { type: "string" },
      session: { type: "boolean", default: false },
      handover: { type: "boolean", default: false },
      names: { type: "string", default: "4" },
    },
  });
  if (!values.port) {
    console.error(
      "usage: bench/cgen.ts --port P [--clients N] [--seconds S] [--procs K] [--pid P] " +
        "[--session | --handover [--names K]]",
    );
    Deno.exit(2);
  }
  const target = { hostname: values.host, port: Number(values.port) };
  if (values.handover) {
    const r = await runHandoverC(target, {
      clients: Number(values.clients),
      names: Number(values.names),
      durationMs: Number(values.seconds) * 1000,
      warmupMs: 500,
      serverPid: values.pid ? Number(values.pid) : undefined,
    });
    console.log(JSON.stringify(r, null, 2));
    Deno.exit(r.errors.total === 0 ? 0 : 1);
  }
  const r = await runCyclesC(target, {
    clients: Number(values.clients),
    durationMs: Number(values.seconds) * 1000,
    warmupMs: 500,
    procs: Number(values.procs),
    serverPid: values.pid ? Number(values.pid) : undefined,
    session: values.session,
  });
  console.log(JSON.stringify({ ...r }, null, 2));
}
