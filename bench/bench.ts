#!/usr/bin/env -S deno run -A
/**
 * The tcpnetlock benchmark: runs every scenario against our server (`server.ts`) and against the
 * floor server (`bench/floor_server.ts`, the same protocol with no bookkeeping) in the same run,
 * each as a subprocess on 127.0.0.1 and port 0, prints a table (scenario, ours, floor, ratio,
 * target, met) and writes the figures as JSON to `bench/results/latest.json`.
 *
 * ```sh
 * deno task bench                  # every scenario once, well under two minutes
 * deno task bench --runs 3         # medians of three runs (what the README reports)
 * deno task bench --quick          # tiny counts: checks that it all works, figures mean little
 * deno task bench --only held      # one scenario (or several: --only cycles,handover)
 * deno task bench --only etcd      # the cycle scenario with --store etcd (needs Debian's etcd)
 * ```
 *
 * Scenarios: `cycles` (lock+release per second and latency at 1, 16 and 64 clients), `handover`
 * (64 clients on 4 names with `wait:30`; then again with 80 % readers, `mode:shared`), `held`
 * (10,000 locks held at once: memory, idle CPU,
 * `.ping` latency, release time), `ready` (process start to the first `pong`) and `do` (what
 * `deno run -A do.ts -- true` takes beyond an empty `deno run`), `sessions` (lock+release over
 * sessions at 1, 16 and 64 lockers against the session floor and against our own
 * connection-per-lock cycles, the hand-over between sessions, one session holding 10,000 locks).
 *
 * Exit status: 0 when every scenario ran without a single error (targets met or not), 1 when any
 * error was counted, 2 on bad flags.
 *
 * @module
 */

import {
  type CyclesResult,
  type HandoverResult,
  type HeldResult,
  type Latency,
  latency,
  LineConn,
  runCycles,
  runHandover,
  runHeld,
  sleep,
  type Target,
} from "./load.ts";
import { type FloodResult, runFlood } from "./flood.ts";
import {
  buildCGen,
  type CGenResult,
  cgenUnavailable,
  mergeCGen,
  runCyclesC,
  runHandoverC,
} from "./cgen.ts";
import {
  type ClientCyclesResult,
  runClientCycles,
  runSessionCycles,
  runSessionHandover,
  runSessionHeld,
  type SessionCyclesResult,
  type SessionHandoverResult,
  type SessionHeldResult,
} from "./session_load.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const FLOOR_SCRIPT = "bench/floor_server.ts";
const NOOP_SCRIPT = "bench/noop.ts";
const DEFAULT_OUT = "bench/results/latest.json";
const LIMIT_FLAGS = [
  "--max-connections",
  "100000",
  "--max-locks",
  "100000",
  "--max-waiters",
  "100000",
];
const SCENARIOS = [
  "cycles",
  "handover",
  "held",
  "ready",
  "do",
  "etcd",
  "flood",
  "sessions",
  "longline",
] as const;
type Scenario = typeof SCENARIOS[number];
const LETTERS: Record<string, Scenario> = {
  a: "cycles",
  b: "handover",
  c: "held",
  d: "ready",
  e: "do",
  f: "etcd",
  g: "flood",
  h: "sessions",
  i: "longline",
};
const REEXEC_ENV = "TCPNETLOCK_BENCH_REEXEC";
/**
 * The V8 flags the server is run with everywhere we start it (deno task start, the Dockerfile,
 * the installed tnl-server): a young generation of at most 8 MB per semi-space. V8's default lets
 * size it from the machine's memory, grows it while thousands of connections are accepted and
 * keeps it: 3-4 kB per held lock at 10,000 held (11.9 kB without the flag, 8.1 kB with it). The floor runs with the same flags, so the comparison stays like for like.
 */
export const SERVER_V8_FLAGS = ["--v8-flags=--max-semi-space-size=8"];
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The sizes of one run; `--quick` shrinks them all. */
interface Sizes {
  cycleLevels: number[];
  cycleMs: number;
  cycleWarmupMs: number;
  /**
   * The C generator's levels (connection-per-lock and session cycles) are measured in this many
   * slices per server, alternating between the servers (see {@linkcode alternate}).
   */
  cycleSlices: number;
  /** Measured time of one slice. */
  sliceMs: number;
  handoverClients: number;
  handoverNames: number;
  handoverMs: number;
  handoverWarmupMs: number;
  held: number;
  heldSettleMs: number;
  heldIdleMs: number;
  heldPings: number;
  heldWarmupPings: number;
  readyReps: number;
  doReps: number;
  floodRounds: number;
  floodIdle: number;
  floodWaiters: number;
  floodLineBytes: number;
  floodSettleMs: number;
  /** Locks one session holds at once (the `sessions` scenario). */
  sessionHeld: number;
  /** Bytes of the over-long line of the longline scenario. */
  longLineBytes: number;
  /** How many such lines, one after another. */
  longLineRepeats: number;
}

const FULL: Sizes = {
  cycleLevels: [1, 16, 64],
  cycleMs: 2000,
  cycleWarmupMs: 300,
  cycleSlices: 4,
  sliceMs: 1500,
  handoverClients: 64,
  handoverNames: 4,
  handoverMs: 3000,
  handoverWarmupMs: 300,
  held: 10000,
  heldSettleMs: 1000,
  heldIdleMs: 3000,
  heldPings: 500,
  heldWarmupPings: 200,
  readyReps: 5,
  doReps: 5,
  floodRounds: 3,
  floodIdle: 3000,
  floodWaiters: 3000,
  floodLineBytes: 100 << 20,
  floodSettleMs: 20000,
  sessionHeld: 10_000,
  longLineBytes: 100 << 20,
  longLineRepeats: 8,
};

const QUICK: Sizes = {
  cycleLevels: [1, 16, 64],
  cycleMs: 250,
  cycleWarmupMs: 50,
  cycleSlices: 2,
  sliceMs: 150,
  handoverClients: 64,
  handoverNames: 4,
  handoverMs: 300,
  handoverWarmupMs: 50,
  held: 300,
  heldSettleMs: 100,
  heldIdleMs: 300,
  heldPings: 20,
  heldWarmupPings: 10,
  readyReps: 1,
  doReps: 1,
  floodRounds: 1,
  floodIdle: 100,
  floodWaiters: 100,
  floodLineBytes: 1 << 20,
  floodSettleMs: 500,
  sessionHeld: 500,
  longLineBytes: 4 << 20,
  longLineRepeats: 1,
};

/** Parsed command line. */
interface Options {
  runs: number;
  quick: boolean;
  only: Scenario[];
  out: string;
  server: string;
  noFloor: boolean;
}

function usage(): string {
  return `Usage: deno run -A bench/bench.ts [options]

Runs the tcpnetlock benchmark against server.ts and the floor server, prints a table and
writes JSON to ${DEFAULT_OUT}.

Options:
  --runs N           run everything N times and report medians (default 1)
  --quick            tiny counts, for tests (figures mean little)
  --only LIST        scenarios to run, comma separated: ${SCENARIOS.join(", ")} (or a-e)
  --out FILE         where to write the JSON (default ${DEFAULT_OUT})
  --server FILE      the server under test (default server.ts)
  --no-floor         do not run the floor server
  -h, --help         this text`;
}

function parseArgs(args: string[]): Options | string {
  const opts: Options = {
    runs: 1,
    quick: false,
    only: [...SCENARIOS],
    out: DEFAULT_OUT,
    server: "server.ts",
    noFloor: false,
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const [flag, inline] = arg.includes("=") ? arg.split(/=(.*)/s, 2) : [arg, undefined];
    const value = () => inline ?? args[++i];
    switch (flag) {
      case "--runs": {
        const v = value();
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1 || n > 20) return `Invalid --runs "${v}"`;
        opts.runs = n;
        break;
      }
      case "--quick":
        opts.quick = true;
        break;
      case "--only": {
        const v = value() ?? "";
        const list: Scenario[] = [];
        for (const part of v.split(",").map((s) => s.trim()).filter(Boolean)) {
          const name = LETTERS[part] ?? part;
          if (!(SCENARIOS as readonly string[]).includes(name)) return `Unknown scenario "${part}"`;
          list.push(name as Scenario);
        }
        if (list.length === 0) return `Invalid --only "${v}"`;
        opts.only = list;
        break;
      }
      case "--out":
        opts.out = value();
        break;
      case "--server":
        opts.server = value();
        break;
      case "--no-floor":
        opts.noFloor = true;
        break;
      default:
        return `Unknown flag "${arg}"`;
    }
  }
  return opts;
}

// ---------------------------------------------------------------------------------------------
// File descriptors

/** The soft and hard limits on open files of this process. */
function fdLimits(): { soft: number; hard: number } | null {
  try {
    const text = Deno.readTextFileSync("/proc/self/limits");
    const m = text.match(/^Max open files\s+(\S+)\s+(\S+)/m);
    if (!m) return null;
    const num = (s: string) => s === "unlimited" ? Infinity : Number(s);
    return { soft: num(m[1]), hard: num(m[2]) };
  } catch {
    return null;
  }
}

/** Re-runs this program under `ulimit -n 65536` (or the hard limit); returns its exit code. */
async function reexecWithMoreFds(): Promise<number> {
  const script = 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"';
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      script,
      "bash",
      Deno.execPath(),
      "run",
      "-A",
      new URL(import.meta.url).pathname,
      ...Deno.args,
    ],
    env: { [REEXEC_ENV]: "1" },
    stdin: "inherit",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  return (await child.status).code;
}

/** CPU ticks of the whole machine, busy and total, from /proc/stat (null elsewhere). */
function cpuTicks(): { busy: number; total: number } | null {
  try {
    const first = Deno.readTextFileSync("/proc/stat").split("\n", 1)[0];
    const v = first.trim().split(/\s+/).slice(1).map(Number);
    const total = v.reduce((a, b) => a + b, 0);
    return { busy: total - v[3] - (v[4] ?? 0), total };
  } catch {
    return null;
  }
}

/** How busy the machine is (0 to 1, all CPUs) over `ms` while this process sleeps. */
async function machineBusy(ms: number): Promise<number | null> {
  const a = cpuTicks();
  await sleep(ms);
  const b = cpuTicks();
  if (a === null || b === null || b.total === a.total) return null;
  return Math.round((b.busy - a.busy) / (b.total - a.total) * 100) / 100;
}

// ---------------------------------------------------------------------------------------------
// Server subprocesses

/** Where server logs go; made once, removed at the end. */
let logDir: string | undefined;

/**
 * A server running as a subprocess. Its stdout and stderr go to a file, not to a pipe: with
 * `--info` the server logs every lock event with a synchronous write, and a pipe that this
 * (busy) process had to drain would stall the server whenever the load generator kept it from
 * reading. A file takes the writes at once, like a log collector that keeps up.
 */
class ServerProcess {
  readonly child: Deno.ChildProcess;
  readonly pid: number;
  /** The server's log, or null when its output is dropped. */
  readonly logFile: string | null;
  port = 0;
  #exited = false;

  constructor(args: string[], logFile: string | null) {
    this.logFile = logFile;
    // `exec` keeps the process id: it is the server's, for /proc and for signals.
    this.child = logFile === null
      ? new Deno.Command(Deno.execPath(), {
        args,
        cwd: ROOT,
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn()
      : new Deno.Command("bash", {
        args: [
          "-c",
          'log="$1"; shift; exec "$@" >"$log" 2>&1',
          "bash",
          logFile,
          Deno.execPath(),
          ...args,
        ],
        cwd: ROOT,
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn();
    this.pid = this.child.pid;
    this.child.status.then(() => this.#exited = true);
  }

  /** Starts a server with its log in a new file. */
  static async start(args: string[]): Promise<ServerProcess> {
    logDir ??= await Deno.makeTempDir({ prefix: "tcpnetlock-bench-" });
    return new ServerProcess(args, await Deno.makeTempFile({ dir: logDir, suffix: ".log" }));
  }

  /** The log so far (at most its last 64 KiB). */
  async #log(): Promise<string> {
    if (this.logFile === null) return "";
    try {
      using file = await Deno.open(this.logFile);
      const size = (await file.stat()).size;
      const from = Math.max(0, size - 65536);
      await file.seek(from, Deno.SeekMode.Start);
      const buf = new Uint8Array(size - from);
      let got = 0;
      while (got < buf.length) {
        const n = await file.read(buf.subarray(got));
        if (n === null) break;
        got += n;
      }
      // deno-lint-ignore no-control-regex
      return decoder.decode(buf.subarray(0, got)).replace(/\x1b\[[0-9;]*m/g, "");
    } catch {
      return "";
    }
  }

  /** The last lines the server wrote. */
  async lastLines(n: number): Promise<string[]> {
    return (await this.#log()).split("\n").filter((l) => l.trim() !== "").slice(-n);
  }

  /**
   * Resolves to the port once a line containing "listening on" shows one (the digits after the
   * last `:` of what follows); throws if the process dies or stays silent.
   */
  async waitListening(timeoutMs = 20_000): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      for (const line of (await this.#log()).split("\n")) {
        const at = line.indexOf("listening on");
        if (at < 0) continue;
        const after = line.slice(at);
        const m = after.slice(after.lastIndexOf(":")).match(/^:(\d+)/);
        if (m) {
          this.port = Number(m[1]);
          return this.port;
        }
      }
      if (this.#exited) break;
      await sleep(5);
    }
    const why = this.#exited
      ? `exited with code ${(await this.child.status).code}`
      : `said nothing like "listening on HOST:PORT" within ${timeoutMs} ms`;
    const said = (await this.lastLines(15)).join("\n  ");
    await this.stop();
    throw new Error(`Server ${why}:\n  ${said}`);
  }

  /** True once the process has ended. */
  get exited(): boolean {
    return this.#exited;
  }

  /** SIGTERM, then SIGKILL after a grace period; waits for the process; removes the log. */
  async stop(): Promise<void> {
    if (!this.#exited) {
      try {
        this.child.kill("SIGTERM");
      } catch {
        // Already gone.
      }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const inTime = await Promise.race([
      this.child.status.then(() => true),
      new Promise<false>((resolve) => {
        timer = setTimeout(() => resolve(false), 3000);
      }),
    ]);
    clearTimeout(timer);
    if (!inTime) {
      try {
        this.child.kill("SIGKILL");
      } catch {
        // Gone meanwhile.
      }
      await this.child.status;
    }
    if (this.logFile !== null) await Deno.remove(this.logFile).catch(() => {});
  }
}

/** Which server to start, and how. */
interface ServerKind {
  label: "ours" | "floor";
  /** `deno` arguments for a given port. */
  args(port: number): string[];
}

/** Our server; drops the limit flags if the server does not know them. */
function oursKind(script: string, state: { limits: boolean }): ServerKind {
  return {
    label: "ours",
    args: (port) => [
      "run",
      "-A",
      ...SERVER_V8_FLAGS,
      script,
      "--listen",
      "127.0.0.1",
      "--port",
      String(port),
      // The server's default logging (warnings only; the start-up line is always written):
      // per-event logging is an opt-in (`--info`) and measured apart in the README.
      ...(state.limits ? LIMIT_FLAGS : []),
    ],
  };
}

const FLOOR: ServerKind = {
  label: "floor",
  args: (port) => [
    "run",
    "-A",
    ...SERVER_V8_FLAGS,
    FLOOR_SCRIPT,
    "--listen",
    "127.0.0.1",
    "--port",
    String(port),
  ],
};

let limitState: { limits: boolean } | undefined;

/** Starts a server on port 0 and waits until it listens. */
async function startServer(kind: ServerKind): Promise<ServerProcess> {
  const server = await ServerProcess.start(kind.args(0));
  try {
    await server.waitListening();
    return server;
  } catch (e) {
    if (kind.label === "ours" && limitState?.limits) {
      // The --max-* flags may not exist (yet): try once more without them.
      limitState.limits = false;
      note(`our server did not start with ${LIMIT_FLAGS.join(" ")}; retrying without them`);
      const again = await ServerProcess.start(kind.args(0));
      await again.waitListening();
      return again;
    }
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/** Per-server results of one scenario in one run. */
interface Pair<T> {
  ours: T | null;
  floor: T | null;
}

interface ReadyResult {
  /** Each measured start, process spawn to the first `pong`, in milliseconds. */
  samples: number[];
  /** Median of the samples. */
  ms: number;
  errors: number;
  examples: string[];
}

interface DoResult {
  skipped?: string;
  /** `deno run -A do.ts -- true` wall times, ms. */
  doSamples: number[];
  /** `deno run -A bench/noop.ts` wall times, ms. */
  emptySamples: number[];
  doMs: number;
  emptyMs: number;
  addsMs: number;
  errors: number;
  examples: string[];
}

/**
 * The cycle scenario with the etcd store (bench/etcd_cycles.ts): our server on etcd against the
 * etcd floor (a bare create-with-lease transaction and a delete, same etcd, same run) and against
 * the memory store, at one etcd member or three and 16 or 64 clients.
 */
interface EtcdSetup {
  members: number;
  clients: number;
  /** Cycles per second: memory store, etcd store, bare etcd floor. */
  memory: number | null;
  etcd: number | null;
  floor: number | null;
  etcdP99: number | null;
  errors: number;
  /** CPU in % of one core: our run's load generator and server, and the floor's own client. */
  generatorCpu: number | null;
  serverCpu: number | null;
  floorCpu: number | null;
}

interface EtcdResult {
  skipped?: string;
  setups: EtcdSetup[];
}

/** A level of session cycles, with both sides' CPU when the C generator ran it. */
type SessionLevel = SessionCyclesResult & {
  generatorCpuPercent?: number;
  serverCpuPercent?: number | null;
  /** Each slice's rate, when measured in slices (see {@linkcode alternate}). */
  sliceRates?: number[];
};

/** The `sessions` scenario: per level, over sessions (ours and the session floor), and ours over
 * one connection per lock at the same level, measured in between. */
interface SessionsResult {
  /** `c` for the C generator (bench/cgen/loadgen.c `--session 1`), `deno` for session_load.ts. */
  generator: "c" | "deno";
  /** The generator check on the session floor at 16 lockers (as for `cycles`). */
  check: { lockers: number; procs: number; rate: number; doubled: number; limited: boolean } | null;
  cycles: Pair<SessionLevel[]>;
  connection: CyclesResult[];
  /** 64 lockers sharing one session. */
  shared: Pair<SessionCyclesResult>;
  handover: Pair<SessionHandoverResult>;
  held: SessionHeldResult | null;
  /** 64 lockers through one LockClient (ours only): over a session, over one connection each. */
  client: ClientCyclesResult[];
}

/** `.ping` while another client sends one line far over the limit. */
interface LongLineResult {
  /** Round trips of `.ping` (connect to `pong`) while the line was being sent and dropped. */
  ping: Latency;
  /** From the first byte of the line to the server's close, ms (mean over the lines). */
  lineMs: number;
  /** What the server answered the line with. */
  reply: string;
  errors: number;
  examples: string[];
}

interface RunResult {
  longline?: Pair<LongLineResult>;
  sessions?: SessionsResult;
  etcd?: EtcdResult;
  cycles?: CyclesRun;
  handover?: Pair<HandoverResult> & {
    /** `c` for the C generator (bench/cgen/loadgen.c `--handover 1`), `deno` for bench/load.ts. */
    generator: "c" | "deno";
    /** Ours uncontended at the same concurrency, from the same generator. */
    referenceCyclesPerSecond: number | null;
    /** The same hand-over with 80 % readers (`mode:shared`) and 20 % writers. */
    shared: Pair<HandoverResult>;
  };
  held?: Pair<HeldResult>;
  ready?: Pair<ReadyResult>;
  do?: DoResult;
  flood?: Pair<FloodResult>;
}

interface Context {
  opts: Options;
  sizes: Sizes;
  kinds: ServerKind[];
  heldCount: number;
}

function progress(text: string): void {
  Deno.stderr.writeSync(encoder.encode(`  ${text}\n`));
}

const notes: string[] = [];

function note(text: string): void {
  if (notes.includes(text)) return;
  notes.push(text);
  Deno.stderr.writeSync(encoder.encode(`note: ${text}\n`));
}

/** Runs `fn` against a fresh server of each kind. */
async function perServer<T>(
  ctx: Context,
  fn: (target: Target, server: ServerProcess, kind: ServerKind) => Promise<T>,
): Promise<Pair<T>> {
  const pair: Pair<T> = { ours: null, floor: null };
  for (const kind of ctx.kinds) {
    const server = await startServer(kind);
    try {
      pair[kind.label] = await fn({ hostname: "127.0.0.1", port: server.port }, server, kind);
    } finally {
      await server.stop();
    }
  }
  return pair;
}

/** What the `cycles` scenario measured, and with which generator. */
interface CyclesRun extends Pair<CyclesResult[]> {
  /** `c` for the C generator (bench/cgen/loadgen.c), `deno` for bench/load.ts. */
  generator: "c" | "deno";
  /** Generator processes used for every level. */
  procs: number;
  /**
   * The generator check: the floor's rate at the check level with the generator processes used
   * and with twice as many (twice the generator's CPU). When twice as many raise it by more than
   * 10 %, the generator was limiting; `limited` says it still was at the largest count tried.
   */
  check: {
    clients: number;
    procs: number;
    rate: number;
    doubled: number;
    limited: boolean;
  } | null;
}

/**
 * Rate of one level of cycles, with the C generator when it can be built, else bench/load.ts.
 * `sliced`: one slice of {@linkcode Sizes.sliceMs} (see {@linkcode alternate}), else
 * {@linkcode Sizes.cycleMs}.
 */
async function cyclesLevel(
  target: Target,
  server: ServerProcess,
  clients: number,
  s: Sizes,
  procs: number,
  useC: boolean,
  sliced = false,
): Promise<CyclesResult | CGenResult> {
  const durationMs = sliced ? s.sliceMs : s.cycleMs;
  if (useC) {
    return await runCyclesC(target, {
      clients,
      durationMs,
      warmupMs: s.cycleWarmupMs,
      procs,
      serverPid: server.pid,
    });
  }
  return await runCycles(target, { clients, durationMs, warmupMs: s.cycleWarmupMs });
}

/**
 * Measures one level on each of `n` servers in `slices` turns, the order reversed every other
 * turn (A B, B A, A B, B A), and returns each server's slices. This machine's speed drifts by
 * tens of percent within seconds: two identical servers measured in single 2-second windows one
 * after the other differed by up to 30 % (A/A check, 2026-12-02), so a level measured once per
 * server was a ratio of two draws. Alternating slices put each drift on both servers alike.
 */
async function alternate<R>(
  n: number,
  slices: number,
  measure: (i: number) => Promise<R>,
): Promise<R[][]> {
  const out: R[][] = Array.from({ length: n }, () => []);
  for (let turn = 0; turn < slices; turn++) {
    const order = Array.from({ length: n }, (_, i) => turn % 2 === 0 ? i : n - 1 - i);
    for (const i of order) out[i].push(await measure(i));
  }
  return out;
}

/** Merges the C generator's slices; a Deno generator's one result (not sliced) passes through. */
function merged<R>(slices: R[]): R {
  if (slices.length === 1) return slices[0];
  return mergeCGen(slices as unknown as CGenResult[]) as unknown as R;
}

/** A level's figures for the progress lines. */
function describeLevel(r: CyclesResult | CGenResult | SessionLevel): string {
  const cpu = "generatorCpuPercent" in r && r.generatorCpuPercent !== undefined
    ? `, generator CPU ${r.generatorCpuPercent}%, server CPU ${r.serverCpuPercent}%`
    : "";
  const sliceRates = "sliceRates" in r ? r.sliceRates : undefined;
  const sliced = sliceRates ? ` (slices: ${sliceRates.join(", ")})` : "";
  return `${r.rate}/s p50 ${r.latency.p50} ms p99 ${r.latency.p99} ms, ` +
    `${r.errors.total} errors${cpu}${sliced}`;
}

/** The generator check doubles the generator processes up to this many. */
const MAX_GENERATOR_PROCS = 4;

async function scenarioCycles(ctx: Context): Promise<CyclesRun> {
  const s = ctx.sizes;
  const useC = (await buildCGen()) !== null;
  if (!useC) note(`cycles: ${cgenUnavailable}; using bench/load.ts as the load generator`);
  // Both servers run at once; each level is measured on one, then on the other, so that a
  // disturbance from outside hits both alike. The idle one costs nothing meanwhile.
  const servers: ServerProcess[] = [];
  try {
    for (const kind of ctx.kinds) servers.push(await startServer(kind));
    const run: CyclesRun = {
      ours: null,
      floor: null,
      generator: useC ? "c" : "deno",
      procs: 1,
      check: null,
    };
    const floorAt = ctx.kinds.findIndex((k) => k.label === "floor");
    if (useC && floorAt >= 0) {
      // Is the generator what limits the floor? Give it twice the CPU (twice the processes) and
      // see whether the floor's rate rises; while it does (by over 10 %), use the larger one.
      const clients = s.cycleLevels.includes(16) ? 16 : s.cycleLevels[s.cycleLevels.length - 1];
      const target = { hostname: "127.0.0.1", port: servers[floorAt].port };
      let procs = 1;
      let rate = (await cyclesLevel(target, servers[floorAt], clients, s, procs, true)).rate;
      for (;;) {
        const doubled = (await cyclesLevel(target, servers[floorAt], clients, s, procs * 2, true))
          .rate;
        const limited = doubled > rate * 1.1;
        progress(
          `generator check: floor at ${clients} clients ${rate}/s with ${procs} generator ` +
            `process(es), ${doubled}/s with ${procs * 2}`,
        );
        if (limited && procs * 2 < MAX_GENERATOR_PROCS) {
          procs *= 2;
          rate = doubled;
          continue;
        }
        run.check = { clients, procs, rate, doubled, limited };
        if (limited) {
          note(`the generator limits the floor even with ${procs * 2} processes: figures are low`);
        }
        break;
      }
      run.procs = procs;
    }
    // The floor was warmed up by the generator check; the others get the same load once,
    // unmeasured, so that no server is measured while its JIT still compiles the hot path.
    const warmClients = run.check?.clients ?? 16;
    for (const [i, kind] of ctx.kinds.entries()) {
      if (i === floorAt && run.check !== null) continue;
      const target = { hostname: "127.0.0.1", port: servers[i].port };
      await cyclesLevel(target, servers[i], warmClients, s, run.procs, useC);
      progress(`cycles ${kind.label}: warmed up at ${warmClients} clients (not measured)`);
    }
    // Sliced only with the C generator: its results merge (histograms, CPU).
    const slices = useC ? s.cycleSlices : 1;
    for (const clients of s.cycleLevels) {
      const target = (i: number) => ({ hostname: "127.0.0.1", port: servers[i].port });
      const all = await alternate(
        ctx.kinds.length,
        slices,
        (i) => cyclesLevel(target(i), servers[i], clients, s, run.procs, useC, slices > 1),
      );
      for (const [i, kind] of ctx.kinds.entries()) {
        const r = merged(all[i]);
        progress(`cycles ${kind.label} ${clients} clients: ${describeLevel(r)}`);
        (run[kind.label] ??= []).push(r);
      }
    }
    return run;
  } finally {
    for (const server of servers) await server.stop();
  }
}

async function scenarioHandover(
  ctx: Context,
  run: RunResult,
): Promise<NonNullable<RunResult["handover"]>> {
  const s = ctx.sizes;
  // The C generator where it can be built: bench/load.ts runs in this process at 80-95 % of a
  // core, and its event loop is part of every delay it measures (with it, the hand-over rate was
  // 6,400/s and the delay p99 1.9-2.4 ms; from the C generator 10,500/s and 0.6-1.4 ms, with the
  // server at 100 % of a core: the server is then what limits the rate).
  const useC = (await buildCGen()) !== null;
  if (!useC) note(`handover: ${cgenUnavailable}; using bench/load.ts as the generator`);
  const generator = useC ? "c" : "deno";
  const handover = useC ? runHandoverC : runHandover;
  // The reference is measured with the generator the hand-over uses: a rate from another
  // generator would compare two generators. With the C generator, the cycles scenario's level
  // at the same concurrency (its generator processes checked against the floor) when it ran.
  let reference = run.cycles?.generator === generator
    ? run.cycles?.ours?.find((r) => r.clients === s.handoverClients)?.rate ?? null
    : null;
  const pair = await perServer(ctx, async (target, server, kind) => {
    if (kind.label === "ours" && reference === null) {
      // The target compares with the uncontended cycle rate at the same concurrency.
      const r = await cyclesLevel(
        target,
        server,
        s.handoverClients,
        s,
        run.cycles?.procs ?? 1,
        useC,
      );
      progress(`handover reference: ours ${s.handoverClients} clients uncontended ${r.rate}/s`);
      if (r.errors.total > 0) note(`reference cycles had ${r.errors.total} errors`);
      reference = r.rate;
    }
    const r = await handover(target, {
      clients: s.handoverClients,
      names: s.handoverNames,
      durationMs: s.handoverMs,
      warmupMs: s.handoverWarmupMs,
      wait: 30,
      checkLocking: kind.label === "ours",
      serverPid: server.pid,
    });
    progress(
      `handover ${kind.label} (${generator} generator): ${r.rate}/s, ${r.handovers} hand-overs, ` +
        `${r.queuedPerGrant} queued lines per grant, delay p50 ` +
        `${r.delay.p50} p99 ${r.delay.p99} ms, lock->ok p50 ${r.grantLatency.p50} ms, ` +
        `${r.errors.total} errors, generator CPU ${r.generatorCpuPercent ?? "?"}%, ` +
        `server CPU ${r.serverCpuPercent ?? "?"}%`,
    );
    return r;
  });
  // Readers and writers: 80 % of the clients take the names shared, 20 % exclusive, in one queue.
  const shared = await perServer(ctx, async (target, server, kind) => {
    const r = await handover(target, {
      clients: s.handoverClients,
      names: s.handoverNames,
      durationMs: s.handoverMs,
      warmupMs: s.handoverWarmupMs,
      wait: 30,
      checkLocking: kind.label === "ours",
      readers: SHARED_READERS,
      serverPid: server.pid,
    });
    progress(
      `handover 80 % readers ${kind.label}: ${r.rate}/s (${r.sharedGrants} shared of ${r.grants}), ` +
        `delay p50 ${r.delay.p50} p99 ${r.delay.p99} ms, writer lock->ok p50 ` +
        `${r.writerGrantLatency?.p50} p99 ${r.writerGrantLatency?.p99} ms, ${r.errors.total} errors`,
    );
    return r;
  });
  return { ...pair, generator, referenceCyclesPerSecond: reference, shared };
}

/** The share of readers in the readers–writer hand-over. */
const SHARED_READERS = 0.8;

async function scenarioFlood(ctx: Context): Promise<Pair<FloodResult>> {
  const s = ctx.sizes;
  return await perServer(ctx, async (target, server, kind) => {
    const r = await runFlood(target, {
      pid: server.pid,
      rounds: s.floodRounds,
      idle: s.floodIdle,
      waiters: s.floodWaiters,
      lineBytes: s.floodLineBytes,
      settleMs: s.floodSettleMs,
    });
    progress(
      `flood ${kind.label}: RSS ${r.rssBeforeKiB} kB before, peak ${r.rssPeakKiB} kB, ` +
        `${r.rssAfterKiB} kB settled, ${r.errors.total} errors`,
    );
    return r;
  });
}

/** A `deno eval` script: sends one line of N bytes (newline last), prints the first reply line. */
const LONG_LINE_SENDER = `
const [hostname, port, bytes] = Deno.args;
const conn = await Deno.connect({ hostname, port: Number(port) });
const chunk = new Uint8Array(256 * 1024).fill(0x61);
const reading = (async () => {
  const buf = new Uint8Array(4096);
  let text = "";
  for (;;) {
    const n = await conn.read(buf).catch(() => null);
    if (n === null) return text;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
})();
console.log("sending");
const t0 = performance.now();
try {
  for (let sent = 0; sent < Number(bytes); ) {
    sent += await conn.write(chunk.subarray(0, Math.min(chunk.length, Number(bytes) - sent)));
  }
  await conn.write(new TextEncoder().encode("\\n"));
} catch {
  // the server closed first
}
const reply = (await reading).split("\\n")[0] || "EOF";
console.log(reply, (performance.now() - t0).toFixed(1));
`;

/**
 * One client sends a line of `longLineBytes` without a newline until its very end, while
 * another sends `.ping` on a fresh connection, one after another: how much the dropping of the
 * line delays everybody else, ours against the floor server (which drops it the same way: reads
 * to the newline, answers `bad-request`, closes).
 */
async function scenarioLongLine(ctx: Context): Promise<Pair<LongLineResult>> {
  const bytes = ctx.sizes.longLineBytes;
  // Both servers run at once and take turns, one line each, so that a disturbance from outside
  // (other processes on the machine) hits both alike.
  const servers: ServerProcess[] = [];
  const acc = ctx.kinds.map(() => ({
    samples: [] as number[],
    examples: [] as string[],
    errors: 0,
    lineMs: 0,
    reply: "",
  }));
  try {
    for (const kind of ctx.kinds) servers.push(await startServer(kind));
    for (let rep = 0; rep < ctx.sizes.longLineRepeats; rep++) {
      for (const [i] of ctx.kinds.entries()) {
        await longLineOnce({ hostname: "127.0.0.1", port: servers[i].port }, bytes, acc[i]);
      }
    }
  } finally {
    for (const server of servers) await server.stop();
  }
  const pair: Pair<LongLineResult> = { ours: null, floor: null };
  for (const [i, kind] of ctx.kinds.entries()) {
    const a = acc[i];
    const ping = latency(a.samples);
    const lineMs = a.lineMs / ctx.sizes.longLineRepeats;
    progress(
      `longline ${kind.label}: ${(bytes / 2 ** 20).toFixed(0)} MB dropped in ${
        lineMs.toFixed(0)
      } ms (mean of ${ctx.sizes.longLineRepeats}), ping p99 ${ping.p99} ms (${ping.count}), ${a.errors} errors`,
    );
    pair[kind.label] = {
      ping,
      lineMs: round1(lineMs),
      reply: a.reply,
      errors: a.errors,
      examples: a.examples,
    };
  }
  return pair;
}

/**
 * Sends one line of `bytes` from a process of its own (so that sending it does not slow the
 * pinger) while pinging; only pings that start while the line is on its way count.
 */
async function longLineOnce(
  target: Target,
  bytes: number,
  acc: { samples: number[]; examples: string[]; errors: number; lineMs: number; reply: string },
): Promise<void> {
  const fail = (text: string) => {
    acc.errors++;
    if (acc.examples.length < 10) acc.examples.push(text);
  };
  let flooding = true;
  let inFlight = false;
  const pinger = (async () => {
    const lines = new LineConn();
    while (flooding) {
      const t0 = performance.now();
      const counts = inFlight;
      try {
        lines.reset(await Deno.connect(target));
        await lines.write(encoder.encode(".ping\n"));
        await lines.expect("pong");
        if (counts) acc.samples.push(performance.now() - t0);
      } catch (e) {
        fail(String(e));
      } finally {
        lines.close();
      }
    }
  })();
  try {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", LONG_LINE_SENDER, target.hostname, String(target.port), String(bytes)],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stderr = new Response(child.stderr).text();
    let said = "";
    for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
      said += text;
      if (said.includes("sending\n")) inFlight = true;
    }
    inFlight = false;
    const status = await child.status;
    const m = /^sending\n(\S+) (\d+(?:\.\d+)?)\n/.exec(said);
    if (!status.success || m === null) {
      throw new Error(`the sender said ${JSON.stringify(said)}: ${(await stderr).slice(-300)}`);
    }
    await stderr;
    acc.reply = m[1];
    acc.lineMs += Number(m[2]);
    if (m[1] !== "bad-request") fail(`the line got ${JSON.stringify(m[1])}`);
  } catch (e) {
    fail(String(e));
  } finally {
    inFlight = false;
    flooding = false;
    await pinger;
  }
}

async function scenarioHeld(ctx: Context): Promise<Pair<HeldResult>> {
  const s = ctx.sizes;
  return await perServer(ctx, async (target, server, kind) => {
    const r = await runHeld(target, {
      count: ctx.heldCount,
      pid: server.pid,
      settleMs: s.heldSettleMs,
      idleMs: s.heldIdleMs,
      pings: s.heldPings,
      warmupPings: s.heldWarmupPings,
    });
    progress(
      `held ${kind.label}: ${r.held} held, ${r.kibPerLock} kB each, idle CPU ` +
        `${r.idleCpuPercent}%, ping p99 ${r.ping.p99} ms, release ${r.releaseMs} ms, ` +
        `${r.errors.total} errors`,
    );
    return r;
  });
}

/**
 * One level of session cycles (one session per locker): the C generator's, or session_load's;
 * `sliced` as for {@linkcode cyclesLevel}.
 */
async function sessionRun(
  target: Target,
  server: ServerProcess,
  lockers: number,
  s: Sizes,
  procs: number,
  useC: boolean,
  sliced = false,
): Promise<CGenResult | SessionCyclesResult> {
  const timing = { durationMs: sliced ? s.sliceMs : s.cycleMs, warmupMs: s.cycleWarmupMs };
  if (!useC) return await runSessionCycles(target, { lockers, ...timing });
  return await runCyclesC(target, {
    clients: lockers,
    ...timing,
    procs,
    serverPid: server.pid,
    session: true,
    prefix: `csess${lockers}`,
  });
}

/** A session level's figures from what {@linkcode sessionRun} measured (merged). */
function toSessionLevel(lockers: number, r: CGenResult | SessionCyclesResult): SessionLevel {
  if (!("procs" in r)) return r;
  return {
    lockers,
    sessions: lockers,
    cycles: r.cycles,
    seconds: r.seconds,
    rate: r.rate,
    latency: r.latency,
    errors: r.errors,
    generatorCpuPercent: r.generatorCpuPercent,
    serverCpuPercent: r.serverCpuPercent,
    ...(r.sliceRates === undefined ? {} : { sliceRates: r.sliceRates }),
  };
}

async function scenarioSessions(ctx: Context): Promise<SessionsResult> {
  const s = ctx.sizes;
  // The lean C generator when it can be built: bench/session_load.ts needs a core of its own and
  // held the session floor at about half its rate.
  const useC = (await buildCGen()) !== null;
  if (!useC) note(`sessions: ${cgenUnavailable}; using bench/session_load.ts as the generator`);
  const result: SessionsResult = {
    generator: useC ? "c" : "deno",
    check: null,
    cycles: { ours: null, floor: null },
    connection: [],
    shared: { ours: null, floor: null },
    handover: { ours: null, floor: null },
    held: null,
    client: [],
  };
  const servers: ServerProcess[] = [];
  try {
    for (const kind of ctx.kinds) servers.push(await startServer(kind));
    const target = (i: number) => ({ hostname: "127.0.0.1", port: servers[i].port });
    const timing = { durationMs: s.cycleMs, warmupMs: s.cycleWarmupMs };
    let procs = 1;
    const floorAt = ctx.kinds.findIndex((k) => k.label === "floor");
    if (useC && floorAt >= 0) {
      // Is the generator what limits the session floor? Twice its CPU must not raise the rate.
      const lockers = s.cycleLevels.includes(16) ? 16 : s.cycleLevels[s.cycleLevels.length - 1];
      const at = (p: number) => sessionRun(target(floorAt), servers[floorAt], lockers, s, p, true);
      const rate = (await at(1)).rate;
      const doubled = (await at(2)).rate;
      const limited = doubled > rate * 1.1;
      progress(
        `sessions generator check: session floor at ${lockers} lockers ${rate}/s with 1 ` +
          `generator process, ${doubled}/s with 2`,
      );
      if (limited) procs = 2;
      result.check = { lockers, procs, rate, doubled, limited };
    }
    // In slices, alternating between the servers, with the C generator (see `alternate`).
    const slices = useC ? s.cycleSlices : 1;
    for (const lockers of s.cycleLevels) {
      const all = await alternate(ctx.kinds.length, slices, async (i) => {
        const sliced = slices > 1;
        const session = await sessionRun(target(i), servers[i], lockers, s, procs, useC, sliced);
        // Our own connection-per-lock cycles at the same level, right after, by the same
        // generator: the 2× target.
        const connection = ctx.kinds[i].label === "ours"
          ? await cyclesLevel(target(i), servers[i], lockers, s, procs, useC, sliced)
          : undefined;
        return { session, connection };
      });
      for (const [i, kind] of ctx.kinds.entries()) {
        const r = toSessionLevel(lockers, merged(all[i].map((x) => x.session)));
        progress(`sessions ${kind.label} ${lockers} lockers: ${describeLevel(r)}`);
        (result.cycles[kind.label] ??= []).push(r);
        if (kind.label === "ours") {
          const c = merged(all[i].map((x) => x.connection!));
          progress(`sessions: ours over one connection per lock, ${lockers} clients: ${c.rate}/s`);
          result.connection.push(c);
        }
      }
    }
    for (const [i, kind] of ctx.kinds.entries()) {
      const r = await runSessionCycles(target(i), { lockers: 64, sessions: 1, ...timing });
      progress(`sessions ${kind.label} 64 lockers over one session: ${r.rate}/s`);
      result.shared[kind.label] = r;
      if (kind.label === "ours") {
        for (const transport of ["session", "connection"] as const) {
          const c = await runClientCycles(target(i), { lockers: 64, transport, ...timing });
          progress(`sessions: 64 lockers through one LockClient over ${transport}: ${c.rate}/s`);
          result.client.push(c);
        }
      }
    }
  } finally {
    for (const server of servers) await server.stop();
  }
  const ho = await perServer(ctx, async (target, _server, kind) => {
    const r = await runSessionHandover(target, {
      lockers: s.handoverClients,
      names: s.handoverNames,
      durationMs: s.handoverMs,
      warmupMs: s.handoverWarmupMs,
      checkLocking: kind.label === "ours",
    });
    progress(
      `sessions hand-over ${kind.label}: ${r.rate}/s, ${r.handovers} hand-overs, delay p50 ` +
        `${r.delay.p50} p99 ${r.delay.p99} ms, ${r.errors.total} errors`,
    );
    return r;
  });
  result.handover = ho;
  if (ctx.kinds.some((k) => k.label === "ours") && ctx.opts.server === "server.ts") {
    // Our server in a Worker of this process, so that its live heap can be measured.
    result.held = await runSessionHeld(s.sessionHeld);
    progress(
      `sessions held: ${result.held.held} locks over one session, ${result.held.bytesPerLock} ` +
        `bytes of heap each, ${result.held.heapAfterPercent}% left after releasing, ` +
        `${result.held.errors.total} errors`,
    );
  }
  return result;
}

/** A port that was free a moment ago. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Spawns a server on a fixed port and polls it until it answers `.ping`: ms, or an error. */
async function timeReady(kind: ServerKind): Promise<number | string> {
  const port = freePort();
  const t0 = performance.now();
  // Started directly (no shell in between), its output dropped: only the start is timed.
  const server = new ServerProcess(kind.args(port), null);
  const deadline = t0 + 20_000;
  const lines = new LineConn();
  try {
    while (performance.now() < deadline) {
      if (server.exited) return `server exited with code ${(await server.child.status).code}`;
      let conn: Deno.Conn;
      try {
        conn = await Deno.connect({ hostname: "127.0.0.1", port });
      } catch (e) {
        if (!(e instanceof Deno.errors.ConnectionRefused)) return String(e);
        await sleep(1);
        continue;
      }
      lines.reset(conn);
      try {
        await lines.write(encoder.encode(".ping\n"));
        const reply = await lines.line();
        if (reply === "pong") return performance.now() - t0;
        return `expected "pong", got ${reply === null ? "EOF" : JSON.stringify(reply)}`;
      } catch (e) {
        return String(e);
      } finally {
        lines.close();
      }
    }
    return "no pong within 20 s";
  } finally {
    await server.stop();
  }
}

async function scenarioReady(ctx: Context): Promise<Pair<ReadyResult>> {
  const pair: Pair<ReadyResult> = { ours: null, floor: null };
  for (const kind of ctx.kinds) {
    const samples: number[] = [];
    const examples: string[] = [];
    let errors = 0;
    // One start first, unmeasured: Deno's module cache gets warm.
    await timeReady(kind);
    for (let i = 0; i < ctx.sizes.readyReps; i++) {
      const r = await timeReady(kind);
      if (typeof r === "number") samples.push(r);
      else {
        errors++;
        if (examples.length < 10) examples.push(r);
      }
    }
    const ms = latency(samples).p50;
    progress(`ready ${kind.label}: ${ms} ms (${samples.length} starts), ${errors} errors`);
    pair[kind.label] = { samples: samples.map(round1), ms, errors, examples };
  }
  return pair;
}

/** Runs a `deno` command to completion: wall milliseconds, or an error text. */
async function timeDeno(args: string[], env: Record<string, string>): Promise<number | string> {
  const t0 = performance.now();
  const out = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const ms = performance.now() - t0;
  if (out.success) return ms;
  const text = (decoder.decode(out.stderr) + decoder.decode(out.stdout)).trim().slice(-300);
  return `deno ${args.join(" ")} exited with code ${out.code}: ${text}`;
}

async function scenarioDo(ctx: Context): Promise<DoResult> {
  const empty: DoResult = {
    doSamples: [],
    emptySamples: [],
    doMs: NaN,
    emptyMs: NaN,
    addsMs: NaN,
    errors: 0,
    examples: [],
  };
  try {
    await Deno.stat(`${ROOT}do.ts`);
  } catch {
    return { ...empty, skipped: "do.ts does not exist yet" };
  }
  const ours = ctx.kinds.find((k) => k.label === "ours");
  if (!ours) return { ...empty, skipped: "our server is not available" };
  const server = await startServer(ours);
  try {
    const env = { TCPNETLOCK_PORT: String(server.port), TCPNETLOCK_HOST: "127.0.0.1" };
    const doArgs = ["run", "-A", "do.ts", "--", "true"];
    const emptyArgs = ["run", "-A", NOOP_SCRIPT];
    const result = { ...empty };
    const record = (r: number | string, into: number[]) => {
      if (typeof r === "number") into.push(r);
      else {
        result.errors++;
        if (result.examples.length < 10) result.examples.push(r);
      }
    };
    // One of each first, unmeasured, for a warm module cache; then interleaved.
    const target = { hostname: "127.0.0.1", port: server.port };
    const grantsBefore = await grantCount(target);
    record(await timeDeno(doArgs, env), []);
    record(await timeDeno(emptyArgs, env), []);
    for (let i = 0; i < ctx.sizes.doReps; i++) {
      record(await timeDeno(emptyArgs, env), result.emptySamples);
      record(await timeDeno(doArgs, env), result.doSamples);
    }
    // Each do.ts run must have taken the lock once: the server's grant counter says so.
    const grantsAfter = await grantCount(target);
    const runs = ctx.sizes.doReps + 1;
    if (typeof grantsBefore === "string" || typeof grantsAfter === "string") {
      record(`.stats failed: ${grantsBefore} ${grantsAfter}`, []);
    } else if (grantsAfter - grantsBefore !== runs) {
      record(`${runs} do.ts runs, but the server granted ${grantsAfter - grantsBefore} locks`, []);
    }
    result.doMs = latency(result.doSamples).p50;
    result.emptyMs = latency(result.emptySamples).p50;
    result.addsMs = round1(result.doMs - result.emptyMs);
    result.doSamples = result.doSamples.map(round1);
    result.emptySamples = result.emptySamples.map(round1);
    progress(
      `do: do.ts ${result.doMs} ms, empty deno run ${result.emptyMs} ms, adds ` +
        `${result.addsMs} ms, ${result.errors} errors`,
    );
    return result;
  } finally {
    await server.stop();
  }
}

/**
 * Runs bench/etcd_cycles.ts (its own etcd member or members and servers) when Debian's etcd is
 * installed, for each setup of {@linkcode ETCD_SETUPS} (only the first with `--quick`).
 */
async function scenarioEtcd(ctx: Context): Promise<EtcdResult> {
  const which = await new Deno.Command("sh", { args: ["-c", "command -v etcd"], stdout: "null" })
    .output();
  if (!which.success) return { skipped: "etcd is not installed", setups: [] };
  const setups: EtcdSetup[] = [];
  for (const { members, clients } of ctx.opts.quick ? ETCD_SETUPS.slice(0, 1) : ETCD_SETUPS) {
    const none: EtcdSetup = {
      members,
      clients,
      memory: null,
      etcd: null,
      floor: null,
      etcdP99: null,
      errors: 0,
      generatorCpu: null,
      serverCpu: null,
      floorCpu: null,
    };
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        `${ROOT}bench/etcd_cycles.ts`,
        "--json",
        "--members",
        String(members),
        "--clients",
        String(clients),
        "--duration-s",
        ctx.opts.quick ? "0.5" : "3",
        "--warmup-s",
        ctx.opts.quick ? "0.1" : "0.5",
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!out.success) {
      const text = decoder.decode(out.stderr).trim().slice(-300);
      progress(`etcd: bench/etcd_cycles.ts failed: ${text}`);
      setups.push({ ...none, errors: 1 });
      continue;
    }
    const report = JSON.parse(decoder.decode(out.stdout)) as {
      rows: {
        setup: string;
        rate: number;
        p99: number;
        errors: number;
        generatorCpuPercent: number | null;
        serverCpuPercent: number | null;
      }[];
    };
    const memory = report.rows.find((r) => r.setup === "memory");
    const etcd = report.rows.find((r) => r.setup.startsWith("etcd ("));
    const floor = report.rows.find((r) => r.setup === "etcd floor");
    const setup: EtcdSetup = {
      members,
      clients,
      memory: memory?.rate ?? null,
      etcd: etcd?.rate ?? null,
      floor: floor?.rate ?? null,
      etcdP99: etcd?.p99 ?? null,
      errors: report.rows.reduce((n, r) => n + r.errors, 0),
      generatorCpu: etcd?.generatorCpuPercent ?? null,
      serverCpu: etcd?.serverCpuPercent ?? null,
      floorCpu: floor?.generatorCpuPercent ?? null,
    };
    progress(
      `etcd ${members} member(s), ${clients} clients: ${setup.etcd} cycles/s against the etcd ` +
        `floor's ${setup.floor} and ${setup.memory} in memory, ${setup.errors} errors ` +
        `(generator CPU ${setup.generatorCpu ?? "?"} %, server ${setup.serverCpu ?? "?"} %, ` +
        `the floor's client ${setup.floorCpu ?? "?"} %)`,
    );
    setups.push(setup);
  }
  return { setups };
}

/** The etcd setups measured: one member and three, 16 and 64 clients. */
const ETCD_SETUPS = [
  { members: 1, clients: 16 },
  { members: 1, clients: 64 },
  { members: 3, clients: 16 },
  { members: 3, clients: 64 },
];

/** The server's `lock_acquired_count` from `.stats`, or an error text. */
async function grantCount(target: Target): Promise<number | string> {
  const lines = new LineConn();
  try {
    lines.reset(await Deno.connect(target));
    await lines.write(encoder.encode(".stats\n"));
    const reply = await lines.line();
    if (reply === null || !reply.startsWith("stats,")) return `.stats answered ${reply}`;
    const count = JSON.parse(reply.slice(6)).lock_acquired_count;
    return typeof count === "number" ? count : `no lock_acquired_count in ${reply}`;
  } catch (e) {
    return String(e);
  } finally {
    lines.close();
  }
}

function round1(v: number): number {
  return Math.round(v * 10) / 10;
}

// ---------------------------------------------------------------------------------------------
// The table

/** One figure of the table, as medians over the runs. */
interface Row {
  scenario: Scenario;
  metric: string;
  unit: string;
  ours: number | null;
  floor: number | null;
  ratio: number | null;
  target: string;
  met: boolean | null;
}

function median(values: (number | null | undefined)[]): number | null {
  const v = values.filter((x): x is number => typeof x === "number" && Number.isFinite(x))
    .sort((a, b) => a - b);
  if (v.length === 0) return null;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

function sum(values: (number | null | undefined)[]): number | null {
  const v = values.filter((x): x is number => typeof x === "number");
  return v.length ? v.reduce((a, b) => a + b, 0) : null;
}

type Get = (run: RunResult) => { ours?: number | null; floor?: number | null };

interface RowSpec {
  scenario: Scenario;
  metric: string;
  unit: string;
  get: Get;
  /** Errors are summed over the runs, everything else is a median. */
  errors?: boolean;
  target?: string;
  /** Whether the (median) figures meet the target. */
  check?: (ours: number, floor: number | null, ratio: number | null) => boolean;
}

const lat = (l: Latency | undefined, q: "p50" | "p99") => l?.[q] ?? null;
const level = (r: CyclesResult[] | null | undefined, clients: number) =>
  r?.find((x) => x.clients === clients);

function rowSpecs(sizes: Sizes, heldCount: number, handoverRef: number | null): RowSpec[] {
  const specs: RowSpec[] = [];
  for (const n of sizes.cycleLevels) {
    const clients = `${n} client${n === 1 ? "" : "s"}`;
    const gated = n >= 16;
    specs.push({
      scenario: "cycles",
      metric: `cycles/s, ${clients}`,
      unit: "/s",
      get: (r) => ({
        ours: level(r.cycles?.ours, n)?.rate,
        floor: level(r.cycles?.floor, n)?.rate,
      }),
      ...(gated ? { target: "≥ 0.9 × floor", check: (_o, _f, r) => r !== null && r >= 0.9 } : {}),
    });
    if (gated) {
      const cpu = (r: CyclesResult | undefined, key: "generatorCpuPercent" | "serverCpuPercent") =>
        r && key in r ? (r as CGenResult)[key] : null;
      specs.push({
        scenario: "cycles",
        metric: `generator CPU (% of a core), ${clients}`,
        unit: "%",
        get: (r) => ({
          ours: cpu(level(r.cycles?.ours, n), "generatorCpuPercent"),
          floor: cpu(level(r.cycles?.floor, n), "generatorCpuPercent"),
        }),
      }, {
        scenario: "cycles",
        metric: `server CPU (% of a core), ${clients}`,
        unit: "%",
        get: (r) => ({
          ours: cpu(level(r.cycles?.ours, n), "serverCpuPercent"),
          floor: cpu(level(r.cycles?.floor, n), "serverCpuPercent"),
        }),
      });
    }
    for (const q of ["p50", "p99"] as const) {
      specs.push({
        scenario: "cycles",
        metric: `cycle ${q}, ${clients}`,
        unit: "ms",
        get: (r) => ({
          ours: lat(level(r.cycles?.ours, n)?.latency, q),
          floor: lat(level(r.cycles?.floor, n)?.latency, q),
        }),
      });
    }
  }
  specs.push({
    scenario: "cycles",
    metric: "generator check: floor cycles/s, twice the generator (floor: as measured)",
    unit: "/s",
    get: (r) => ({ ours: r.cycles?.check?.doubled, floor: r.cycles?.check?.rate }),
    target: "≤ 1.1 × (the generator is not the limit)",
    check: (_o, _f, ratio) => ratio !== null && ratio <= 1.1,
  });
  specs.push({
    scenario: "cycles",
    metric: "cycles errors",
    unit: "",
    errors: true,
    get: (r) => ({
      ours: sum(r.cycles?.ours?.map((x) => x.errors.total) ?? [null]),
      floor: sum(r.cycles?.floor?.map((x) => x.errors.total) ?? [null]),
    }),
    target: "0",
    check: (o) => o === 0,
  });

  const hc = `${sizes.handoverClients} clients, ${sizes.handoverNames} names`;
  specs.push(
    {
      scenario: "handover",
      metric: `hand-over grants/s (${hc})`,
      unit: "/s",
      get: (r) => ({ ours: r.handover?.ours?.rate, floor: r.handover?.floor?.rate }),
      target: `≥ 0.7 × ours at ${sizes.handoverClients} clients uncontended` +
        (handoverRef === null ? "" : ` (${fmt(0.7 * handoverRef, "/s")})`),
      check: (o) => handoverRef !== null && o >= 0.7 * handoverRef,
    },
    {
      scenario: "handover",
      metric: "hand-over delay p50 (floor: lock→ok)",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.handover?.ours?.delay, "p50"),
        floor: lat(r.handover?.floor?.grantLatency, "p50"),
      }),
    },
    {
      scenario: "handover",
      metric: "hand-over delay p99 (floor: lock→ok)",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.handover?.ours?.delay, "p99"),
        floor: lat(r.handover?.floor?.grantLatency, "p99"),
      }),
      target: "< 2 ms",
      check: (o) => o < 2,
    },
    {
      // The C generator where there is a C compiler, else bench/load.ts in this process.
      scenario: "handover",
      metric: "hand-over generator CPU (% of a core)",
      unit: "%",
      get: (r) => ({
        ours: r.handover?.ours?.generatorCpuPercent,
        floor: r.handover?.floor?.generatorCpuPercent,
      }),
    },
    {
      scenario: "handover",
      metric: "hand-over server CPU (% of a core)",
      unit: "%",
      get: (r) => ({
        ours: r.handover?.ours?.serverCpuPercent,
        floor: r.handover?.floor?.serverCpuPercent,
      }),
    },
    {
      scenario: "handover",
      metric: `hand-over grants/s, 80 % readers (${hc})`,
      unit: "/s",
      get: (r) => ({
        ours: r.handover?.shared?.ours?.rate,
        floor: r.handover?.shared?.floor?.rate,
      }),
    },
    {
      scenario: "handover",
      metric: "hand-over delay p99, 80 % readers (floor: lock→ok)",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.handover?.shared?.ours?.delay, "p99"),
        floor: lat(r.handover?.shared?.floor?.grantLatency, "p99"),
      }),
    },
    {
      scenario: "handover",
      metric: "writer lock→ok p99, 80 % readers",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.handover?.shared?.ours?.writerGrantLatency, "p99"),
        floor: lat(r.handover?.shared?.floor?.writerGrantLatency, "p99"),
      }),
    },
    {
      scenario: "handover",
      metric: "handover errors (both runs)",
      unit: "",
      errors: true,
      get: (r) => ({
        ours: sum([r.handover?.ours?.errors.total, r.handover?.shared?.ours?.errors.total]),
        floor: sum([r.handover?.floor?.errors.total, r.handover?.shared?.floor?.errors.total]),
      }),
      target: "0",
      check: (o) => o === 0,
    },
  );

  const held = heldCount.toLocaleString("en-US");
  specs.push(
    {
      scenario: "held",
      metric: `memory per held lock (${held} held)`,
      unit: "kB",
      get: (r) => ({ ours: r.held?.ours?.kibPerLock, floor: r.held?.floor?.kibPerLock }),
      target: "< 9 kB",
      check: (o) => o < 9,
    },
    {
      scenario: "held",
      metric: "idle CPU while held",
      unit: "%",
      get: (r) => ({ ours: r.held?.ours?.idleCpuPercent, floor: r.held?.floor?.idleCpuPercent }),
      target: "< 1 %",
      check: (o) => o < 1,
    },
    {
      scenario: "held",
      metric: ".ping p50 while held",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.held?.ours?.ping, "p50"),
        floor: lat(r.held?.floor?.ping, "p50"),
      }),
    },
    {
      scenario: "held",
      metric: ".ping p99 while held",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.held?.ours?.ping, "p99"),
        floor: lat(r.held?.floor?.ping, "p99"),
      }),
      target: "< 5 ms",
      check: (o) => o < 5,
    },
    {
      scenario: "held",
      metric: `acquire all ${held}`,
      unit: "ms",
      get: (r) => ({ ours: r.held?.ours?.acquireMs, floor: r.held?.floor?.acquireMs }),
    },
    {
      scenario: "held",
      metric: `release all ${held}`,
      unit: "ms",
      get: (r) => ({ ours: r.held?.ours?.releaseMs, floor: r.held?.floor?.releaseMs }),
    },
    {
      scenario: "held",
      metric: "held errors",
      unit: "",
      errors: true,
      get: (r) => ({ ours: r.held?.ours?.errors.total, floor: r.held?.floor?.errors.total }),
      target: "0",
      check: (o) => o === 0,
    },
  );

  specs.push(
    {
      scenario: "ready",
      metric: "process start to first pong",
      unit: "ms",
      get: (r) => ({ ours: r.ready?.ours?.ms, floor: r.ready?.floor?.ms }),
      target: "< 300 ms",
      check: (o) => o < 300,
    },
    {
      scenario: "ready",
      metric: "ready errors",
      unit: "",
      errors: true,
      get: (r) => ({ ours: r.ready?.ours?.errors, floor: r.ready?.floor?.errors }),
      target: "0",
      check: (o) => o === 0,
    },
  );

  specs.push(
    {
      scenario: "do",
      metric: "do.ts -- true (floor: empty deno run)",
      unit: "ms",
      get: (r) => ({ ours: r.do?.doMs, floor: r.do?.emptyMs }),
    },
    {
      scenario: "do",
      metric: "do.ts adds",
      unit: "ms",
      get: (r) => ({ ours: r.do?.addsMs }),
      target: "< 100 ms",
      check: (o) => o < 100,
    },
    {
      scenario: "do",
      metric: "do errors",
      unit: "",
      errors: true,
      get: (r) => ({ ours: r.do?.skipped ? null : r.do?.errors }),
      target: "0",
      check: (o) => o === 0,
    },
  );
  const mib = (k: number | null | undefined) =>
    typeof k === "number" ? Math.round(k / 102.4) / 10 : null;
  const rounds = `${sizes.floodRounds} round${sizes.floodRounds > 1 ? "s" : ""}`;
  specs.push(
    {
      scenario: "flood",
      metric: `RSS after ${rounds} of floods, settled ${sizes.floodSettleMs / 1000} s`,
      unit: "MB",
      get: (r) => ({
        ours: mib(r.flood?.ours?.rssAfterKiB),
        floor: mib(r.flood?.floor?.rssAfterKiB),
      }),
      target: "≤ 1.3 × floor",
      check: (_o, _f, ratio) => ratio !== null && ratio <= 1.3,
    },
    {
      scenario: "flood",
      metric: "RSS peak during the floods",
      unit: "MB",
      get: (r) => ({
        ours: mib(r.flood?.ours?.rssPeakKiB),
        floor: mib(r.flood?.floor?.rssPeakKiB),
      }),
    },
    ...sessionRowSpecs(sizes),
    {
      scenario: "flood",
      metric: "flood errors",
      unit: "",
      errors: true,
      get: (r) => ({ ours: r.flood?.ours?.errors.total, floor: r.flood?.floor?.errors.total }),
      target: "0",
      check: (o) => o === 0,
    },
  );
  const etcdSetup = (r: RunResult, m: number, c: number) =>
    r.etcd?.setups.find((x) => x.members === m && x.clients === c);
  for (const { members, clients } of ETCD_SETUPS) {
    const label = `${clients} clients, ${members} etcd member${members > 1 ? "s" : ""}`;
    specs.push(
      {
        scenario: "etcd",
        metric: `cycles/s, ${label}, --store etcd (floor: bare etcd txn + delete)`,
        unit: "/s",
        get: (r) => ({
          ours: etcdSetup(r, members, clients)?.etcd,
          floor: etcdSetup(r, members, clients)?.floor,
        }),
        target: "≥ 0.7 × floor",
        check: (_o, _f, ratio) => ratio !== null && ratio >= 0.7,
      },
      {
        scenario: "etcd",
        metric: `cycles/s, ${label}, --store etcd (floor: memory store)`,
        unit: "/s",
        get: (r) => ({
          ours: etcdSetup(r, members, clients)?.etcd,
          floor: etcdSetup(r, members, clients)?.memory,
        }),
      },
      {
        scenario: "etcd",
        metric: `cycle p99, ${label}, --store etcd`,
        unit: "ms",
        get: (r) => ({ ours: etcdSetup(r, members, clients)?.etcdP99 }),
      },
      {
        scenario: "etcd",
        metric: `generator CPU (% of a core), ${label} (floor: its own client)`,
        unit: "%",
        get: (r) => ({
          ours: etcdSetup(r, members, clients)?.generatorCpu,
          floor: etcdSetup(r, members, clients)?.floorCpu,
        }),
      },
    );
  }
  specs.push(
    {
      scenario: "etcd",
      metric: "etcd errors",
      unit: "",
      errors: true,
      get: (r) => ({
        ours: r.etcd?.skipped ? null : sum(r.etcd?.setups.map((x) => x.errors) ?? [null]),
      }),
      target: "0",
      check: (o) => o === 0,
    },
  );
  return specs;
}

function sessionRowSpecs(sizes: Sizes): RowSpec[] {
  const specs: RowSpec[] = [];
  const sLevel = (r: SessionLevel[] | null | undefined, n: number) =>
    r?.find((x) => x.lockers === n);
  for (const n of sizes.cycleLevels) {
    const lockers = `${n} locker${n === 1 ? "" : "s"}`;
    const gated = n >= 16;
    specs.push({
      scenario: "sessions",
      metric: `session cycles/s, ${lockers} (floor: session floor)`,
      unit: "/s",
      get: (r) => ({
        ours: sLevel(r.sessions?.cycles.ours, n)?.rate,
        floor: sLevel(r.sessions?.cycles.floor, n)?.rate,
      }),
      ...(gated ? { target: "≥ 0.85 × floor", check: (_o, _f, r) => r !== null && r >= 0.85 } : {}),
    });
    if (gated) {
      const cpu = (r: SessionLevel | undefined, key: "generatorCpuPercent" | "serverCpuPercent") =>
        r?.[key] ?? null;
      specs.push({
        scenario: "sessions",
        metric: `session generator CPU (% of a core), ${lockers}`,
        unit: "%",
        get: (r) => ({
          ours: cpu(sLevel(r.sessions?.cycles.ours, n), "generatorCpuPercent"),
          floor: cpu(sLevel(r.sessions?.cycles.floor, n), "generatorCpuPercent"),
        }),
      }, {
        scenario: "sessions",
        metric: `session server CPU (% of a core), ${lockers}`,
        unit: "%",
        get: (r) => ({
          ours: cpu(sLevel(r.sessions?.cycles.ours, n), "serverCpuPercent"),
          floor: cpu(sLevel(r.sessions?.cycles.floor, n), "serverCpuPercent"),
        }),
      });
    }
    specs.push({
      scenario: "sessions",
      metric: `session ÷ connection-per-lock cycles, ${lockers}`,
      unit: "×",
      get: (r) => {
        const sr = sLevel(r.sessions?.cycles.ours, n)?.rate;
        const cr = level(r.sessions?.connection, n)?.rate;
        return { ours: sr !== undefined && cr ? Math.round(sr / cr * 100) / 100 : null };
      },
      ...(gated ? { target: "≥ 2", check: (o) => o >= 2 } : {}),
    });
    specs.push({
      scenario: "sessions",
      metric: `session cycle p99, ${lockers}`,
      unit: "ms",
      get: (r) => ({
        ours: lat(sLevel(r.sessions?.cycles.ours, n)?.latency, "p99"),
        floor: lat(sLevel(r.sessions?.cycles.floor, n)?.latency, "p99"),
      }),
    });
  }
  specs.push({
    scenario: "sessions",
    metric:
      "session generator check: session floor cycles/s, twice the generator (floor: as measured)",
    unit: "/s",
    get: (r) => ({ ours: r.sessions?.check?.doubled, floor: r.sessions?.check?.rate }),
    target: "≤ 1.1 × (the generator is not the limit)",
    check: (_o, _f, ratio) => ratio !== null && ratio <= 1.1,
  });
  const hc = `${sizes.handoverClients} sessions, ${sizes.handoverNames} names`;
  const held = sizes.sessionHeld.toLocaleString("en-US");
  specs.push(
    {
      scenario: "sessions",
      metric: "session cycles/s, 64 lockers over one session",
      unit: "/s",
      get: (r) => ({ ours: r.sessions?.shared.ours?.rate, floor: r.sessions?.shared.floor?.rate }),
    },
    {
      scenario: "sessions",
      metric: "LockClient cycles/s, 64 lockers: session (floor: connection per lock)",
      unit: "/s",
      get: (r) => ({
        ours: r.sessions?.client.find((c) => c.transport === "session")?.rate,
        floor: r.sessions?.client.find((c) => c.transport === "connection")?.rate,
      }),
    },
    {
      scenario: "sessions",
      metric: `hand-over between sessions grants/s (${hc})`,
      unit: "/s",
      get: (r) => ({
        ours: r.sessions?.handover.ours?.rate,
        floor: r.sessions?.handover.floor?.rate,
      }),
    },
    {
      scenario: "sessions",
      metric: "hand-over between sessions delay p99 (floor: lock→ok)",
      unit: "ms",
      get: (r) => ({
        ours: lat(r.sessions?.handover.ours?.delay, "p99"),
        floor: lat(r.sessions?.handover.floor?.grantLatency, "p99"),
      }),
    },
    {
      scenario: "sessions",
      metric: `heap per lock, one session holding ${held}`,
      unit: "B",
      get: (r) => ({ ours: r.sessions?.held?.bytesPerLock }),
      target: "< 1024 B",
      check: (o) => o < 1024,
    },
    {
      scenario: "sessions",
      metric: `heap left after releasing all ${held}`,
      unit: "%",
      get: (r) => ({ ours: r.sessions?.held?.heapAfterPercent }),
      target: "≤ 5 %",
      check: (o) => o <= 5,
    },
    {
      scenario: "sessions",
      metric: `take all ${held} over one session (pipelined)`,
      unit: "ms",
      get: (r) => ({ ours: r.sessions?.held?.acquireMs }),
    },
    {
      scenario: "sessions",
      metric: "sessions errors",
      unit: "",
      errors: true,
      get: (r) => {
        const x = r.sessions;
        if (x === undefined) return {};
        const all = [
          ...(x.cycles.ours ?? []),
          ...x.connection,
          x.shared.ours,
          x.handover.ours,
          x.held,
          ...x.client,
        ];
        const fl = [...(x.cycles.floor ?? []), x.shared.floor, x.handover.floor];
        return {
          ours: sum(all.map((v) => v?.errors.total ?? 0)),
          floor: sum(fl.map((v) => v?.errors.total ?? 0)),
        };
      },
      target: "0",
      check: (o) => o === 0,
    },
  );
  const mb = (sizes.longLineBytes / 2 ** 20).toFixed(0);
  specs.push(
    {
      scenario: "longline",
      metric: `.ping p99 during a ${mb} MB line`,
      unit: "ms",
      get: (r) => ({
        ours: lat(r.longline?.ours?.ping, "p99"),
        floor: lat(r.longline?.floor?.ping, "p99"),
      }),
      target: "≤ 2 × floor",
      check: (_o, _f, ratio) => ratio !== null && ratio <= 2,
    },
    {
      scenario: "longline",
      metric: `${mb} MB line read and dropped`,
      unit: "ms",
      get: (r) => ({ ours: r.longline?.ours?.lineMs, floor: r.longline?.floor?.lineMs }),
    },
    {
      scenario: "longline",
      metric: "longline errors",
      unit: "",
      errors: true,
      get: (r) => ({ ours: r.longline?.ours?.errors, floor: r.longline?.floor?.errors }),
      target: "0",
      check: (o) => o === 0,
    },
  );
  return specs;
}

function buildRows(specs: RowSpec[], runs: RunResult[], only: Scenario[]): Row[] {
  const rows = new Map<string, Row>();
  for (const spec of specs) {
    if (!only.includes(spec.scenario)) continue;
    const values = runs.map(spec.get);
    const agg = spec.errors ? sum : median;
    const ours = agg(values.map((v) => v.ours));
    const floor = agg(values.map((v) => v.floor));
    // The ratio is the median of each run's ratio: ours and the floor of one run saw the same
    // machine, runs apart may not have.
    const ratio = spec.errors
      ? null
      : median(values.map((v) =>
        typeof v.ours === "number" && typeof v.floor === "number" && v.floor !== 0
          ? v.ours / v.floor
          : null
      ));
    rows.set(spec.metric, {
      scenario: spec.scenario,
      metric: spec.metric,
      unit: spec.unit,
      ours,
      floor,
      ratio: ratio === null ? null : Math.round(ratio * 100) / 100,
      target: spec.target ?? "",
      met: null,
    });
  }
  // Zero errors is part of every target of a scenario.
  const errorsOf = (s: Scenario) =>
    [...rows.values()].find((r) => r.unit === "" && r.scenario === s);
  for (const spec of specs) {
    const row = rows.get(spec.metric);
    if (!row || !spec.check) continue;
    if (row.ours === null) continue;
    const errs = errorsOf(spec.scenario)?.ours ?? 0;
    row.met = spec.check(row.ours, row.floor, row.ratio) && errs === 0;
  }
  return [...rows.values()];
}

function fmt(v: number | null, unit: string): string {
  if (v === null) return "n/a";
  if (unit === "/s" || unit === "") return Math.round(v).toLocaleString("en-US");
  const a = Math.abs(v);
  const digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
  return v.toFixed(digits);
}

function table(rows: Row[]): string {
  const header = ["scenario", "metric", "unit", "ours", "floor", "ours/floor", "target", "met"];
  const body = rows.map((r) => [
    r.scenario,
    r.metric,
    r.unit,
    fmt(r.ours, r.unit),
    fmt(r.floor, r.unit),
    r.ratio === null ? "" : r.ratio.toFixed(2),
    r.target,
    r.met === null ? (r.target ? "n/a" : "") : r.met ? "met" : "MISSED",
  ]);
  const all = [header, ...body];
  const width = header.map((_, i) => Math.max(...all.map((row) => row[i].length)));
  const right = new Set([3, 4, 5]);
  const line = (row: string[]) =>
    row.map((c, i) => right.has(i) ? c.padStart(width[i]) : c.padEnd(width[i])).join("  ")
      .trimEnd();
  return [line(header), width.map((w) => "-".repeat(w)).join("  "), ...body.map(line)].join("\n");
}

// ---------------------------------------------------------------------------------------------
// Main

/** Runs the benchmark; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage());
    return 0;
  }
  const parsed = parseArgs(args);
  if (typeof parsed === "string") {
    console.error(`${parsed}\n\n${usage()}`);
    return 2;
  }
  const opts = parsed;
  const sizes = opts.quick ? QUICK : FULL;

  // 10,000 held locks need 10,000 descriptors here and in the server (which inherits ours).
  let heldCount = sizes.held;
  const needed = heldCount + 1000;
  const limits = fdLimits();
  if (opts.only.includes("held") && limits && limits.soft < needed) {
    if (!Deno.env.get(REEXEC_ENV)) {
      note(`open files limit is ${limits.soft}; re-running under "ulimit -n 65536"`);
      return await reexecWithMoreFds();
    }
    heldCount = Math.max(100, limits.soft - 1000);
    note(
      `open files limit is ${limits.soft} (hard ${limits.hard}), too low for ${sizes.held} ` +
        `held locks; holding ${heldCount} instead. Raise it with "ulimit -n 65536" as root`,
    );
  }

  const kinds: ServerKind[] = [];
  const serverPath = opts.server;
  let serverExists = true;
  try {
    await Deno.stat(new URL(serverPath, `file://${ROOT}`));
  } catch {
    serverExists = false;
  }
  if (serverExists) {
    limitState = { limits: true };
    kinds.push(oursKind(serverPath, limitState));
  } else {
    note(`${serverPath} does not exist: measuring the floor server alone`);
  }
  if (!opts.noFloor) kinds.push(FLOOR);
  if (kinds.length === 0) {
    console.error("Nothing to measure: no server and --no-floor");
    return 2;
  }
  const ctx: Context = { opts, sizes, kinds, heldCount };

  // Other work on the machine makes every figure noisy: say so.
  const busyBefore = await machineBusy(500);
  if (busyBefore !== null && busyBefore >= 0.1) {
    note(
      `the machine was ${Math.round(busyBefore * 100)}% busy before the bench started ` +
        "(other processes): the figures are noisy",
    );
  }
  const started = performance.now();
  const runs: RunResult[] = [];
  for (let i = 0; i < opts.runs; i++) {
    progress(`run ${i + 1} of ${opts.runs}${opts.quick ? " (quick)" : ""}`);
    const run: RunResult = {};
    runs.push(run);
    for (const scenario of opts.only) {
      switch (scenario) {
        case "cycles":
          run.cycles = await scenarioCycles(ctx);
          break;
        case "handover":
          run.handover = await scenarioHandover(ctx, run);
          break;
        case "held":
          run.held = await scenarioHeld(ctx);
          break;
        case "flood":
          run.flood = await scenarioFlood(ctx);
          break;
        case "longline":
          run.longline = await scenarioLongLine(ctx);
          break;
        case "ready":
          run.ready = await scenarioReady(ctx);
          break;
        case "do":
          run.do = await scenarioDo(ctx);
          if (run.do.skipped) note(`do: skipped, ${run.do.skipped}`);
          break;
        case "etcd":
          run.etcd = await scenarioEtcd(ctx);
          if (run.etcd.skipped) note(`etcd: skipped, ${run.etcd.skipped}`);
          break;
        case "sessions":
          run.sessions = await scenarioSessions(ctx);
          break;
      }
    }
  }
  const seconds = Math.round((performance.now() - started) / 100) / 10;

  const handoverRef = median(runs.map((r) => r.handover?.referenceCyclesPerSecond));
  const rows = buildRows(rowSpecs(sizes, heldCount, handoverRef), runs, opts.only);
  const errorRows = rows.filter((r) => r.unit === "");
  const errorsOurs = sum(errorRows.map((r) => r.ours)) ?? 0;
  const errorsFloor = sum(errorRows.map((r) => r.floor)) ?? 0;
  const scenarios: Record<string, unknown> = {};
  for (const s of opts.only) {
    const errs = errorRows.find((r) => r.scenario === s);
    scenarios[s] = {
      ...(s === "do" && runs[0].do?.skipped ? { skipped: runs[0].do.skipped } : {}),
      ...(s === "etcd" && runs[0].etcd?.skipped ? { skipped: runs[0].etcd.skipped } : {}),
      errors: { ours: errs?.ours ?? null, floor: errs?.floor ?? null },
      runs: runs.map((r) => r[s]),
    };
  }
  const targets = rows.filter((r) => r.met !== null);
  const report = {
    tool: "tcpnetlock bench",
    date: new Date().toISOString(),
    seconds,
    deno: Deno.version,
    host: { os: Deno.build.os, arch: Deno.build.arch, cpus: navigator.hardwareConcurrency },
    options: { runs: opts.runs, quick: opts.quick, only: opts.only, server: serverPath },
    servers: kinds.map((k) => ({ label: k.label, args: k.args(0) })),
    heldCount,
    machineBusyBefore: busyBefore,
    aggregate: opts.runs > 1
      ? "ours and floor: medians of the runs; ratio: median of the per-run ratios; errors: sums"
      : "single run",
    errors: { ours: errorsOurs, floor: errorsFloor },
    targetsMet: targets.length > 0 && targets.every((r) => r.met),
    notes,
    rows,
    scenarios,
  };

  const out = opts.out.startsWith("/") ? opts.out : `${ROOT}${opts.out}`;
  await Deno.mkdir(out.slice(0, out.lastIndexOf("/")), { recursive: true });
  await Deno.writeTextFile(out, JSON.stringify(report, null, 2) + "\n");

  console.log(
    `\ntcpnetlock bench: ${opts.runs} run${opts.runs > 1 ? "s (medians)" : ""}` +
      `${opts.quick ? ", quick" : ""}, ${seconds} s, deno ${Deno.version.deno}, ` +
      `${navigator.hardwareConcurrency} CPUs\n`,
  );
  console.log(table(rows));
  const missed = targets.filter((r) => !r.met).length;
  console.log(
    `\ntargets: ${targets.length - missed} met, ${missed} missed; errors: ours ${errorsOurs}, ` +
      `floor ${errorsFloor}`,
  );
  for (const n of notes) console.log(`note: ${n}`);
  console.log(`JSON: ${opts.out}`);
  return errorsOurs === 0 && errorsFloor === 0 ? 0 : 1;
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } finally {
    if (logDir !== undefined) await Deno.remove(logDir, { recursive: true }).catch(() => {});
  }
  Deno.exit(code);
}
