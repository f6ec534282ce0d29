#!/usr/bin/env -S deno run -A
/**
 * The tcpnetlock load generator: many concurrent clients over real TCP, in one process, timed
 * with one monotonic clock (`performance.now()`).
 *
 * Scenarios (each bounded in count and time; it stops by itself):
 * - `cycles`: lock+release cycles, one TCP connection per lock (connect, `lock,name:X`, `ok`,
 *   `release`, `released`, EOF), N concurrent clients on distinct names: rate and latency.
 * - `handover`: N clients on a few names with `wait:30` (`--readers 0.8`: 80 % of them readers,
 *   `mode:shared`, the rest writers): the hand-over rate and the delay from a
 *   holder's sending `release` to the next waiter of that name receiving `ok,...`. Checks mutual
 *   exclusion, the queue positions and the fencing token order while it runs (unless told it is
 *   the floor, which grants everything at once).
 * - `held`: many locks held at once: the server's memory per held lock (VmRSS), its CPU while
 *   idle, `.ping` latency while they are held, and the time to release them all.
 *
 * Every unexpected reply, reset, refused connection or timeout is counted as an error.
 *
 * ```sh
 * deno run -A bench/load.ts --port 7654 --scenario cycles --clients 16 --seconds 2
 * deno run -A bench/load.ts --port 7654 --scenario held --count 15000 --pid 1234
 * ```
 *
 * @module
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const NL = 0x0a;
const RELEASE = encoder.encode("release\n");
const PING = encoder.encode(".ping\n");

/** Where the server under test listens. */
export interface Target {
  /** Host name or address; the benchmark uses `127.0.0.1`. */
  hostname: string;
  /** TCP port. */
  port: number;
}

/** Latency figures in milliseconds. */
export interface Latency {
  /** How many samples. */
  count: number;
  /** Median. */
  p50: number;
  /** 99th percentile. */
  p99: number;
  /** Largest sample. */
  max: number;
  /** Arithmetic mean. */
  mean: number;
}

/** Errors by kind (`unexpected-reply`, `reset`, `timeout`, `refused`, ...) and their total. */
export interface ErrorCounts {
  /** The sum of all kinds. */
  total: number;
  /** Count per kind. */
  kinds: Record<string, number>;
  /** Up to ten examples, for a person to read. */
  examples: string[];
}

/** Collects errors; nothing is ever ignored. */
export class Errors {
  total = 0;
  kinds: Record<string, number> = {};
  examples: string[] = [];

  /** Counts one error of `kind`, keeping a few examples. */
  add(kind: string, detail = ""): void {
    this.total++;
    this.kinds[kind] = (this.kinds[kind] ?? 0) + 1;
    if (this.examples.length < 10) this.examples.push(detail ? `${kind}: ${detail}` : kind);
  }

  /** Counts a thrown error, classified by its class. */
  addThrown(e: unknown): void {
    if (e instanceof Deno.errors.ConnectionReset) this.add("reset", String(e));
    else if (e instanceof Deno.errors.ConnectionRefused) this.add("refused", String(e));
    else if (e instanceof Deno.errors.BrokenPipe) this.add("broken-pipe", String(e));
    else if (e instanceof UnexpectedReply) this.add("unexpected-reply", e.message);
    else this.add("other", String(e));
  }

  /** A plain copy for JSON. */
  toJSON(): ErrorCounts {
    return { total: this.total, kinds: { ...this.kinds }, examples: [...this.examples] };
  }
}

/** A reply that the protocol does not allow at that point. */
export class UnexpectedReply extends Error {
  constructor(expected: string, got: string | null) {
    super(`expected ${expected}, got ${got === null ? "EOF" : JSON.stringify(got)}`);
    this.name = "UnexpectedReply";
  }
}

/** Computes p50/p99/max/mean of samples in milliseconds. */
export function latency(samples: number[]): Latency {
  if (samples.length === 0) return { count: 0, p50: NaN, p99: NaN, max: NaN, mean: NaN };
  const sorted = Float64Array.from(samples).sort();
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    count: sorted.length,
    p50: round3(at(0.5)),
    p99: round3(at(0.99)),
    max: round3(sorted[sorted.length - 1]),
    mean: round3(sum / sorted.length),
  };
}

function round3(v: number): number {
  return Math.round(v * 1000) / 1000;
}

/** Reads `\n`-terminated lines from a connection; one object can be reused for many. */
export class LineConn {
  conn: Deno.Conn | null = null;
  #buf = new Uint8Array(256);
  #start = 0;
  #end = 0;

  /** Starts over on a new connection. */
  reset(conn: Deno.Conn): void {
    this.conn = conn;
    this.#start = 0;
    this.#end = 0;
  }

  /** The next line without its `\n` (and `\r`), or `null` at the end of the stream. */
  async line(): Promise<string | null> {
    const conn = this.conn!;
    for (;;) {
      const nl = this.#buf.subarray(this.#start, this.#end).indexOf(NL);
      if (nl >= 0) {
        let stop = this.#start + nl;
        const next = stop + 1;
        if (stop > this.#start && this.#buf[stop - 1] === 0x0d) stop--;
        const text = decoder.decode(this.#buf.subarray(this.#start, stop));
        this.#start = next;
        return text;
      }
      if (this.#start > 0) {
        this.#buf.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      if (this.#end === this.#buf.length) {
        if (this.#buf.length >= 1 << 20) throw new UnexpectedReply("a line", "over 1 MiB");
        const bigger = new Uint8Array(this.#buf.length * 2);
        bigger.set(this.#buf);
        this.#buf = bigger;
      }
      const n = await conn.read(this.#buf.subarray(this.#end));
      if (n === null) {
        if (this.#end > this.#start) {
          throw new UnexpectedReply("a whole line", "EOF after a partial line");
        }
        return null;
      }
      this.#end += n;
    }
  }

  /** Reads one line and throws {@linkcode UnexpectedReply} unless it is `expected`. */
  async expect(expected: string): Promise<void> {
    const got = await this.line();
    if (got !== expected) throw new UnexpectedReply(JSON.stringify(expected), got);
  }

  /** Reads and throws unless the server closed the connection with nothing more to say. */
  async expectEof(): Promise<void> {
    const got = await this.line();
    if (got !== null) throw new UnexpectedReply("EOF", got);
  }

  /** Writes all of `bytes`. */
  async write(bytes: Uint8Array): Promise<void> {
    const conn = this.conn!;
    let done = 0;
    while (done < bytes.length) done += await conn.write(bytes.subarray(done));
  }

  /** Closes the connection, if still open. */
  close(): void {
    const conn = this.conn;
    this.conn = null;
    if (conn === null) return;
    try {
      conn.close();
    } catch {
      // Already closed (by the watchdog, say).
    }
  }
}

/** One operation the watchdog keeps an eye on. */
export interface Slot {
  /** When the operation must be done by (`performance.now()` time); `Infinity` when idle. */
  deadline: number;
  /** The connection to close when it is late. */
  lines: LineConn;
  /** Set by the watchdog when it closed the connection for being late. */
  timedOut: boolean;
}

/** Closes the connection of any operation past its deadline; one timer for all of them. */
export class Watchdog {
  #slots = new Set<Slot>();
  #timer: ReturnType<typeof setInterval>;

  constructor(intervalMs = 100) {
    this.#timer = setInterval(() => this.#check(), intervalMs);
  }

  /** A new slot, idle until its deadline is set. */
  slot(): Slot {
    const slot: Slot = { deadline: Infinity, lines: new LineConn(), timedOut: false };
    this.#slots.add(slot);
    return slot;
  }

  /** Stops watching `slot`. */
  drop(slot: Slot): void {
    this.#slots.delete(slot);
  }

  #check(): void {
    const now = performance.now();
    for (const slot of this.#slots) {
      if (!slot.timedOut && slot.deadline < now) {
        slot.timedOut = true;
        slot.lines.close();
      }
    }
  }

  /** Stops the timer. */
  stop(): void {
    clearInterval(this.#timer);
    this.#slots.clear();
  }
}

/** Resolves after `ms` milliseconds; the timer is cleared by `signal` if given. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Waits for `promise` at most `ms` milliseconds: `true` when it settled in time. The timer is
 * always cleared.
 */
export async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([promise.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Opens a connection for `slot` (which must have its deadline set); `false` on failure. */
async function open(target: Target, slot: Slot, errors: Errors): Promise<boolean> {
  let conn: Deno.Conn;
  try {
    conn = await Deno.connect({ hostname: target.hostname, port: target.port });
  } catch (e) {
    errors.addThrown(e);
    return false;
  }
  if (slot.timedOut) {
    conn.close();
    errors.add("timeout", "connect");
    return false;
  }
  slot.lines.reset(conn);
  return true;
}

/** Options of {@linkcode runCycles}. */
export interface CyclesOptions {
  /** Concurrent clients, each on its own lock name. */
  clients: number;
  /** Measured time in milliseconds. */
  durationMs: number;
  /** Unmeasured time before, in milliseconds. */
  warmupMs?: number;
  /** Stop after this many measured cycles. */
  maxCycles?: number;
  /** One operation (connect, or one reply) later than this is a timeout. */
  timeoutMs?: number;
  /** Lock names are `${prefix}-${client}`. */
  prefix?: string;
}

/** What {@linkcode runCycles} measured. */
export interface CyclesResult {
  /** Concurrent clients. */
  clients: number;
  /** Cycles completed in the measured window. */
  cycles: number;
  /** The measured window, in seconds. */
  seconds: number;
  /** Cycles per second. */
  rate: number;
  /** Time of one cycle, from connect to EOF. */
  latency: Latency;
  /** Everything that went wrong, measured window or not. */
  errors: ErrorCounts;
}

/**
 * Lock+release cycles, one connection per lock, `clients` at once on distinct names.
 */
export async function runCycles(target: Target, options: CyclesOptions): Promise<CyclesResult> {
  const { clients, durationMs } = options;
  const warmupMs = options.warmupMs ?? 0;
  const maxCycles = options.maxCycles ?? 2_000_000;
  const timeoutMs = options.timeoutMs ?? 5000;
  const prefix = options.prefix ?? `cycle${clients}`;
  const errors = new Errors();
  const samples: number[] = [];
  const watchdog = new Watchdog();
  const start = performance.now();
  const measureFrom = start + warmupMs;
  const stopAt = measureFrom + durationMs;
  let stop = false;
  let cycles = 0;

  async function worker(i: number): Promise<void> {
    const lockBytes = encoder.encode(`lock,name:${prefix}-${i}\n`);
    const slot = watchdog.slot();
    const lines = slot.lines;
    while (!stop) {
      const t0 = performance.now();
      if (t0 >= stopAt) break;
      slot.timedOut = false;
      slot.deadline = t0 + timeoutMs;
      if (!(await open(target, slot, errors))) {
        await sleep(10);
        continue;
      }
      try {
        await lines.write(lockBytes);
        await lines.expect("ok");
        await lines.write(RELEASE);
        await lines.expect("released");
        await lines.expectEof();
        const t1 = performance.now();
        if (t0 >= measureFrom && t1 <= stopAt) {
          samples.push(t1 - t0);
          if (++cycles >= maxCycles) stop = true;
        }
      } catch (e) {
        if (slot.timedOut) errors.add("timeout", "lock cycle");
        else errors.addThrown(e);
      } finally {
        slot.deadline = Infinity;
        lines.close();
      }
    }
    slot.deadline = Infinity;
  }

  const workers = Promise.all(Array.from({ length: clients }, (_, i) => worker(i)));
  const done = await within(workers, warmupMs + durationMs + timeoutMs + 2000);
  stop = true;
  watchdog.stop();
  if (!done) errors.add("timeout", "workers did not stop");
  const seconds = (Math.min(performance.now(), stopAt) - measureFrom) / 1000;
  return {
    clients,
    cycles,
    seconds: round3(seconds),
    rate: Math.round(cycles / seconds),
    latency: latency(samples),
    errors: errors.toJSON(),
  };
}

/** Options of {@linkcode runHandover}. */
export interface HandoverOptions {
  /** Concurrent clients. */
  clients: number;
  /** How many lock names they share (client i uses name i mod names). */
  names: number;
  /** Measured time in milliseconds. */
  durationMs: number;
  /** Unmeasured time before, in milliseconds. */
  warmupMs?: number;
  /** Stop after this many measured grants. */
  maxGrants?: number;
  /** The `wait:` value sent, in seconds. */
  wait?: number;
  /** One operation later than this is a timeout (the wait for a grant counts as one). */
  timeoutMs?: number;
  /**
   * Check mutual exclusion, the fencing token order and the queue positions (default true). The
   * floor server grants every request at once, so it is run with this off.
   */
  checkLocking?: boolean;
  /** Lock names are `${prefix}-${n}`. */
  prefix?: string;
  /**
   * The share of clients that are readers (`mode:shared`), 0 to 1 (default 0: every client
   * sends a plain exclusive request). The others are writers (`mode:exclusive`); on each name
   * they are spread evenly among the readers.
   */
  readers?: number;
  /** The server's process id: its CPU over the measured window is reported. */
  serverPid?: number;
}

/** What {@linkcode runHandover} measured. */
export interface HandoverResult {
  /** Concurrent clients. */
  clients: number;
  /** Lock names shared. */
  names: number;
  /** Grants in the measured window. */
  grants: number;
  /** Grants that went to a client that had been queued (true hand-overs). */
  handovers: number;
  /** The share of clients that were readers (0: an exclusive-only run). */
  readers: number;
  /** Measured grants to readers (`mode:shared`). */
  sharedGrants: number;
  /** From sending the lock request to receiving `ok,...`, for writers only (with readers). */
  writerGrantLatency?: Latency;
  /** `queued,position:P` lines received per grant (the server sends one per position change). */
  queuedPerGrant: number;
  /** The measured window, in seconds. */
  seconds: number;
  /** Grants per second. */
  rate: number;
  /** From a holder's sending `release` to the next (queued) waiter's receiving `ok,...`. */
  delay: Latency;
  /** From sending the lock request to receiving `ok,...` (includes the time in the queue). */
  grantLatency: Latency;
  /**
   * CPU of this process (the generator: it runs in the benchmark's own process) over the
   * measured window, % of one core; absent where /proc cannot be read.
   */
  generatorCpuPercent?: number;
  /** The server's CPU over the measured window, % of one core (with `serverPid`). */
  serverCpuPercent?: number;
  /** Everything that went wrong. */
  errors: ErrorCounts;
}

interface NameState {
  lastToken: number;
  releasedAt: number;
  /** Grants received and releases sent (or holding connections closed), for the exclusion check. */
  grants: number;
  releases: number;
  /** The same for shared grants (readers) alone. */
  sharedGrants: number;
  sharedReleases: number;
  /** The largest token of an exclusive grant received so far. */
  lastExclusiveToken: number;
}

/** Is client `i` of a hand-over run (on `names` names, `readers` of them readers) a reader? */
export function isReader(i: number, names: number, readers: number): boolean {
  if (readers <= 0) return false;
  // The k-th client of its name is a writer when k crosses a multiple of the writers' share.
  const k = Math.floor(i / names);
  const w = 1 - readers;
  return Math.floor((k + 1) * w + 1e-9) === Math.floor(k * w + 1e-9);
}

/**
 * Many clients on few names with `wait:`: every client loops connect, `lock,name:X,wait:W`,
 * (`queued,position:P`)*, `ok,token:T`, `release`, `released`, EOF.
 */
export async function runHandover(
  target: Target,
  options: HandoverOptions,
): Promise<HandoverResult> {
  const { clients, names, durationMs } = options;
  const warmupMs = options.warmupMs ?? 0;
  const maxGrants = options.maxGrants ?? 2_000_000;
  const wait = options.wait ?? 30;
  const timeoutMs = options.timeoutMs ?? 5000;
  const check = options.checkLocking ?? true;
  const prefix = options.prefix ?? "handover";
  const readers = options.readers ?? 0;
  const errors = new Errors();
  const delays: number[] = [];
  const grantTimes: number[] = [];
  const writerGrantTimes: number[] = [];
  const watchdog = new Watchdog();
  const state: NameState[] = Array.from(
    { length: names },
    () => ({
      lastToken: 0,
      releasedAt: -1,
      grants: 0,
      releases: 0,
      sharedGrants: 0,
      sharedReleases: 0,
      lastExclusiveToken: 0,
    }),
  );
  const start = performance.now();
  const measureFrom = start + warmupMs;
  const stopAt = measureFrom + durationMs;
  let stop = false;
  let grants = 0;
  let sharedGrants = 0;
  let handovers = 0;
  let queuedLines = 0;
  let allGrants = 0;

  async function worker(i: number): Promise<void> {
    const n = i % names;
    const st = state[n];
    const reader = isReader(i, names, readers);
    const mode = readers <= 0 ? "" : reader ? ",mode:shared" : ",mode:exclusive";
    const lockBytes = encoder.encode(`lock,name:${prefix}-${n},wait:${wait}${mode}\n`);
    const slot = watchdog.slot();
    const lines = slot.lines;
    let holding = false;
    while (!stop) {
      const t0 = performance.now();
      if (t0 >= stopAt) break;
      slot.timedOut = false;
      slot.deadline = t0 + timeoutMs;
      if (!(await open(target, slot, errors))) {
        await sleep(10);
        continue;
      }
      try {
        await lines.write(lockBytes);
        const sent = performance.now();
        let queued = false;
        let position = Infinity;
        let reply: string | null;
        for (;;) {
          reply = await lines.line();
          if (reply === null || !reply.startsWith("queued,position:")) break;
          const p = Number(reply.slice(16));
          if (check && !(Number.isInteger(p) && p >= 1 && p < position)) {
            errors.add("queue-position", `${reply} after position ${position}`);
          }
          position = p;
          queued = true;
          queuedLines++;
        }
        if (reply === null || !reply.startsWith("ok,token:")) {
          throw new UnexpectedReply('"ok,token:T"', reply);
        }
        const now = performance.now();
        const token = Number(reply.slice(9));
        if (!Number.isSafeInteger(token) || token < 1) {
          errors.add("unexpected-reply", `bad token in ${JSON.stringify(reply)}`);
        }
        st.grants++;
        if (reader) st.sharedGrants++;
        holding = true;
        if (check) {
          // Every grant but the first needs a release the server has seen, which this process
          // sent earlier: grants received can never run more than one ahead of releases sent.
          // With readers: a writer's grant finds nobody holding, a reader's finds no writer.
          const holders = st.grants - st.releases;
          const writers = holders - (st.sharedGrants - st.sharedReleases);
          if (reader ? writers > 0 : holders > 1) {
            errors.add("exclusion", `${prefix}-${n} granted with ${holders - 1} holder(s) before`);
          }
          // A writer's grant comes after every grant before it was let go, a reader's after
          // every writer's: their tokens are larger. (Readers granted together may be received
          // in any order.)
          const before = reader ? st.lastExclusiveToken : st.lastToken;
          if (token <= before) {
            errors.add("token-order", `token ${token} after ${before} on ${prefix}-${n}`);
          }
          st.lastToken = Math.max(st.lastToken, token);
          if (!reader) st.lastExclusiveToken = token;
        }
        allGrants++;
        const measured = sent >= measureFrom && now <= stopAt;
        if (measured) {
          if (queued && st.releasedAt >= 0) {
            delays.push(now - st.releasedAt);
            handovers++;
          }
          grantTimes.push(now - sent);
          if (reader) sharedGrants++;
          else if (readers > 0) writerGrantTimes.push(now - sent);
          if (++grants >= maxGrants) stop = true;
        }
        // Release at once, the hold time is (nearly) zero: the rate is the hand-over rate. With
        // the checks on, first let the other replies that arrived with this one be read (a second
        // grant the server sent at the same moment, a double grant) before this release counts.
        // A timer would cost a millisecond; a few microtask turns cost nothing.
        if (check) { for (let k = 0; k < 16; k++) await undefined; }
        st.releases++;
        if (reader) st.sharedReleases++;
        holding = false;
        st.releasedAt = performance.now();
        await lines.write(RELEASE);
        await lines.expect("released");
        await lines.expectEof();
      } catch (e) {
        if (slot.timedOut) errors.add("timeout", "hand-over cycle");
        else errors.addThrown(e);
      } finally {
        slot.deadline = Infinity;
        lines.close();
        if (holding) {
          // Closing a holding connection frees the lock too.
          st.releases++;
          if (reader) st.sharedReleases++;
          holding = false;
        }
      }
    }
  }

  // CPU over the measured window, this process's (the generator's) and the server's: read when
  // the warm-up ends and when the window is over.
  let cpuFrom: (number | null)[] = [null, null];
  let cpuTo: (number | null)[] = [null, null];
  const readCpu = () => [
    readCpuTicks(Deno.pid),
    options.serverPid === undefined ? null : readCpuTicks(options.serverPid),
  ];
  const fromTimer = setTimeout(() => cpuFrom = readCpu(), warmupMs);
  const toTimer = setTimeout(() => cpuTo = readCpu(), warmupMs + durationMs);
  const workers = Promise.all(Array.from({ length: clients }, (_, i) => worker(i)));
  const done = await within(workers, warmupMs + durationMs + timeoutMs + 2000);
  stop = true;
  watchdog.stop();
  clearTimeout(fromTimer);
  clearTimeout(toTimer);
  if (!done) errors.add("timeout", "workers did not stop");
  const seconds = (Math.min(performance.now(), stopAt) - measureFrom) / 1000;
  const hz = await clockTicksPerSecond();
  const cpuPercent = (i: number): number | undefined => {
    const a = cpuFrom[i], b = cpuTo[i];
    if (a === null || b === null) return undefined;
    return round3((b - a) / hz / (durationMs / 1000) * 100);
  };
  return {
    generatorCpuPercent: cpuPercent(0),
    serverCpuPercent: cpuPercent(1),
    clients,
    names,
    grants,
    handovers,
    readers,
    sharedGrants,
    ...(readers > 0 ? { writerGrantLatency: latency(writerGrantTimes) } : {}),
    queuedPerGrant: allGrants ? round3(queuedLines / allGrants) : 0,
    seconds: round3(seconds),
    rate: Math.round(grants / seconds),
    delay: latency(delays),
    grantLatency: latency(grantTimes),
    errors: errors.toJSON(),
  };
}

/** Options of {@linkcode runHeld}. */
export interface HeldOptions {
  /** Locks to hold at once, each on its own connection and name. */
  count: number;
  /** The server's process id, to read its memory and CPU time from `/proc`. */
  pid?: number;
  /** Connections being opened at once. */
  concurrency?: number;
  /** Pause after all are held, before measuring memory, in milliseconds. */
  settleMs?: number;
  /** The idle window over which the server's CPU time is measured, in milliseconds. */
  idleMs?: number;
  /** Sequential `.ping`s while the locks are held. */
  pings?: number;
  /** Pings before `rssBefore` is read, to warm the server up. */
  warmupPings?: number;
  /** One operation later than this is a timeout. */
  timeoutMs?: number;
  /** Lock names are `${prefix}-${i}`. */
  prefix?: string;
}

/** What {@linkcode runHeld} measured. */
export interface HeldResult {
  /** Locks asked for. */
  count: number;
  /** Locks actually held at once. */
  held: number;
  /** Time to acquire them all, in milliseconds. */
  acquireMs: number;
  /** The server's VmRSS before, in KiB (`null` without a pid). */
  rssBeforeKiB: number | null;
  /** The server's VmRSS with all held, in KiB. */
  rssAfterKiB: number | null;
  /** (after − before) / held, in KiB. */
  kibPerLock: number | null;
  /** The server's CPU use (user + system) during the idle window, in percent of one core. */
  idleCpuPercent: number | null;
  /** The idle window, in milliseconds. */
  idleMs: number;
  /** `.ping` latency (connect to `pong`) while all are held. */
  ping: Latency;
  /** Time from sending the first `release` to the last connection's EOF, in milliseconds. */
  releaseMs: number;
  /** Everything that went wrong. */
  errors: ErrorCounts;
}

/** The VmRSS of a process in KiB, or `null` when it cannot be read. */
export function readRssKiB(pid: number): number | null {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const m = status.match(/^VmRSS:\s+(\d+)\s+kB/m);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** The user + system CPU time of a process in clock ticks, or `null` when it cannot be read. */
export function readCpuTicks(pid: number): number | null {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // Fields after the command name (which may hold spaces) start at field 3, the state.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(rest[11]) + Number(rest[12]);
  } catch {
    return null;
  }
}

let clockTicks: number | undefined;

/** Clock ticks per second (`getconf CLK_TCK`, 100 when that fails). */
export async function clockTicksPerSecond(): Promise<number> {
  if (clockTicks !== undefined) return clockTicks;
  try {
    const out = await new Deno.Command("getconf", { args: ["CLK_TCK"], stderr: "null" }).output();
    const n = Number(decoder.decode(out.stdout).trim());
    clockTicks = out.success && n > 0 ? n : 100;
  } catch {
    clockTicks = 100;
  }
  return clockTicks;
}

/** One `.ping`: connect, `.ping`, `pong`, EOF. Returns connect-to-`pong` milliseconds or null. */
async function ping(target: Target, slot: Slot, errors: Errors, timeoutMs: number) {
  const t0 = performance.now();
  slot.timedOut = false;
  slot.deadline = t0 + timeoutMs;
  if (!(await open(target, slot, errors))) return null;
  try {
    await slot.lines.write(PING);
    await slot.lines.expect("pong");
    const t1 = performance.now();
    await slot.lines.expectEof();
    return t1 - t0;
  } catch (e) {
    if (slot.timedOut) errors.add("timeout", ".ping");
    else errors.addThrown(e);
    return null;
  } finally {
    slot.deadline = Infinity;
    slot.lines.close();
  }
}

/** Runs `task(i)` for i in [0, n) with at most `limit` running at once. */
async function pool(n: number, limit: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const runner = async () => {
    while (next < n) await task(next++);
  };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, runner));
}

/**
 * Holds `count` locks at once (one connection each), then measures the server while they are
 * held, then releases them all.
 */
export async function runHeld(target: Target, options: HeldOptions): Promise<HeldResult> {
  const { count, pid } = options;
  const concurrency = options.concurrency ?? 128;
  const settleMs = options.settleMs ?? 1000;
  const idleMs = options.idleMs ?? 3000;
  const pings = options.pings ?? 500;
  const warmupPings = options.warmupPings ?? 200;
  const timeoutMs = options.timeoutMs ?? 10_000;
  const prefix = options.prefix ?? "held";
  const errors = new Errors();
  const watchdog = new Watchdog();
  const pingSlot = watchdog.slot();
  try {
    for (let i = 0; i < warmupPings; i++) await ping(target, pingSlot, errors, timeoutMs);
    await sleep(Math.min(settleMs, 200));
    const rssBefore = pid ? readRssKiB(pid) : null;

    // Acquire.
    const slots: Slot[] = new Array(count);
    let held = 0;
    const t0 = performance.now();
    await within(
      pool(count, concurrency, async (i) => {
        const slot = watchdog.slot();
        slots[i] = slot;
        slot.deadline = performance.now() + timeoutMs;
        if (!(await open(target, slot, errors))) return;
        try {
          await slot.lines.write(encoder.encode(`lock,name:${prefix}-${i}\n`));
          await slot.lines.expect("ok");
          held++;
        } catch (e) {
          if (slot.timedOut) errors.add("timeout", "lock");
          else errors.addThrown(e);
          slot.lines.close();
        } finally {
          slot.deadline = Infinity;
        }
      }),
      timeoutMs * 3 + count,
    );
    const acquireMs = performance.now() - t0;
    if (held < count) errors.add("not-held", `${count - held} of ${count} locks not held`);

    // Measure while held.
    await sleep(settleMs);
    const rssAfter = pid ? readRssKiB(pid) : null;
    let idleCpuPercent: number | null = null;
    const cpu0 = pid ? readCpuTicks(pid) : null;
    const w0 = performance.now();
    await sleep(idleMs);
    const cpu1 = pid ? readCpuTicks(pid) : null;
    const window = performance.now() - w0;
    if (cpu0 !== null && cpu1 !== null) {
      const ticks = await clockTicksPerSecond();
      idleCpuPercent = round3(((cpu1 - cpu0) / ticks) / (window / 1000) * 100);
    }
    const pingTimes: number[] = [];
    for (let i = 0; i < pings; i++) {
      const ms = await ping(target, pingSlot, errors, timeoutMs);
      if (ms !== null) pingTimes.push(ms);
    }

    // Release them all at once.
    const r0 = performance.now();
    await within(
      Promise.all(slots.map(async (slot) => {
        if (!slot || slot.lines.conn === null) return;
        slot.deadline = performance.now() + timeoutMs;
        try {
          await slot.lines.write(RELEASE);
          await slot.lines.expect("released");
          await slot.lines.expectEof();
        } catch (e) {
          if (slot.timedOut) errors.add("timeout", "release");
          else errors.addThrown(e);
        } finally {
          slot.deadline = Infinity;
          slot.lines.close();
        }
      })),
      timeoutMs * 2,
    );
    const releaseMs = performance.now() - r0;
    for (const slot of slots) slot?.lines.close();

    return {
      count,
      held,
      acquireMs: round3(acquireMs),
      rssBeforeKiB: rssBefore,
      rssAfterKiB: rssAfter,
      kibPerLock: rssBefore !== null && rssAfter !== null && held > 0
        ? round3((rssAfter - rssBefore) / held)
        : null,
      idleCpuPercent,
      idleMs: Math.round(window),
      ping: latency(pingTimes),
      releaseMs: round3(releaseMs),
      errors: errors.toJSON(),
    };
  } finally {
    watchdog.stop();
  }
}

function usage(): string {
  return `Usage: deno run -A bench/load.ts --port PORT --scenario cycles|handover|held [options]

Options:
  --host HOST        server address (default 127.0.0.1)
  --port PORT        server port (required)
  --scenario NAME    cycles, handover or held
  --clients N        concurrent clients (cycles: 16, handover: 64)
  --names N          handover: lock names shared (default 4)
  --seconds S        cycles/handover: measured seconds (default 2)
  --readers R        handover: the share of clients that take shared locks, 0 to 1 (default 0)
  --count N          held: locks held at once (default 15000)
  --pid PID          held: the server's process id, for memory and CPU figures
  --floor            handover: the server is the floor server (no locking checks)`;
}

async function cli(args: string[]): Promise<number> {
  const opts: Record<string, string> = {};
  let floor = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--help" || a === "-h") {
      console.log(usage());
      return 0;
    }
    if (a === "--floor") floor = true;
    else if (a.startsWith("--") && i + 1 < args.length) opts[a.slice(2)] = args[++i];
    else {
      console.error(`Unknown argument "${a}"\n${usage()}`);
      return 2;
    }
  }
  const known = [
    "host",
    "port",
    "scenario",
    "clients",
    "names",
    "seconds",
    "count",
    "pid",
    "readers",
  ];
  for (const k of Object.keys(opts)) {
    if (!known.includes(k)) {
      console.error(`Unknown flag "--${k}"\n${usage()}`);
      return 2;
    }
  }
  const port = Number(opts.port);
  if (!Number.isInteger(port) || port <= 0) {
    console.error(`--port is required\n${usage()}`);
    return 2;
  }
  const target = { hostname: opts.host ?? "127.0.0.1", port };
  const readers = Number(opts.readers ?? 0);
  if (!(readers >= 0 && readers <= 1)) {
    console.error(`--readers takes a share from 0 to 1, not "${opts.readers}"\n${usage()}`);
    return 2;
  }
  const seconds = Number(opts.seconds ?? 2);
  let result: CyclesResult | HandoverResult | HeldResult;
  let errors: number;
  switch (opts.scenario) {
    case "cycles":
      result = await runCycles(target, {
        clients: Number(opts.clients ?? 16),
        durationMs: seconds * 1000,
        warmupMs: 300,
      });
      errors = result.errors.total;
      break;
    case "handover":
      result = await runHandover(target, {
        clients: Number(opts.clients ?? 64),
        names: Number(opts.names ?? 4),
        durationMs: seconds * 1000,
        warmupMs: 300,
        checkLocking: !floor,
        readers: Number(opts.readers ?? 0),
      });
      errors = result.errors.total;
      break;
    case "held":
      result = await runHeld(target, {
        count: Number(opts.count ?? 15000),
        pid: opts.pid ? Number(opts.pid) : undefined,
      });
      errors = result.errors.total;
      break;
    default:
      console.error(`Unknown scenario "${opts.scenario}"\n${usage()}`);
      return 2;
  }
  console.log(JSON.stringify(result, null, 2));
  return errors === 0 ? 0 : 1;
}

if (import.meta.main) Deno.exit(await cli(Deno.args));
