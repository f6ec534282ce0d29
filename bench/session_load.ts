/**
 * The benchmark's session load (protocol version 3): lock+release cycles over sessions, the
 * hand-over between sessions, and one session holding 10,000 locks (the server's JavaScript heap
 * measured in a Worker after forced collections). Used by `bench.ts` (scenario `sessions`).
 *
 * @module
 */

import {
  type ErrorCounts,
  Errors,
  type Latency,
  latency,
  LineConn,
  sleep,
  type Target,
  within,
} from "./load.ts";

const encoder = new TextEncoder();
const ID_SUFFIX = /,id:([a-zA-Z0-9_-]{1,32})$/;

/** A session of the load generator: lines out batched per turn, replies dispatched by id. */
class Mux {
  readonly lines = new LineConn();
  readonly #waiting = new Map<string, (line: string | null) => void>();
  readonly #early = new Map<string, string[]>();
  readonly #errors: Errors;
  #out = "";
  #flushing = false;
  #closed = false;
  reading: Promise<void> = Promise.resolve();

  constructor(errors: Errors) {
    this.#errors = errors;
  }

  /** Connects and opens the session; false (error counted) when that fails. */
  async open(target: Target): Promise<boolean> {
    try {
      this.lines.reset(await Deno.connect({ ...target, transport: "tcp" }));
      (this.lines.conn as Deno.TcpConn).setNoDelay(true);
      await this.lines.write(encoder.encode("session\n"));
      const reply = await this.lines.line();
      if (!reply?.startsWith("session,version:3")) {
        this.#errors.add("unexpected-reply", `session opening got ${JSON.stringify(reply)}`);
        this.close();
        return false;
      }
    } catch (e) {
      this.#errors.addThrown(e);
      this.close();
      return false;
    }
    this.reading = this.#read();
    return true;
  }

  /** Queues a line; the lines of one turn go out in one write. */
  send(line: string): void {
    if (this.#closed) return;
    this.#out += line + "\n";
    if (this.#flushing) return;
    this.#flushing = true;
    queueMicrotask(async () => {
      try {
        while (this.#out !== "" && !this.#closed) {
          const bytes = encoder.encode(this.#out);
          this.#out = "";
          await this.lines.write(bytes);
        }
      } catch (e) {
        if (!this.#closed) this.#errors.addThrown(e);
        this.close();
      } finally {
        this.#flushing = false;
      }
    });
  }

  /** The next reply for `id` (without `,id:ID`); null once the session is over. */
  next(id: string): Promise<string | null> {
    const early = this.#early.get(id);
    if (early !== undefined && early.length > 0) return Promise.resolve(early.shift()!);
    if (this.#closed) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiting.set(id, resolve));
  }

  async #read(): Promise<void> {
    try {
      for (;;) {
        const line = await this.lines.line();
        if (line === null) break;
        const m = ID_SUFFIX.exec(line);
        if (m === null) {
          if (line !== "alive" && line !== "pong") {
            this.#errors.add("unexpected-reply", `stray line ${JSON.stringify(line)}`);
          }
          continue;
        }
        const bare = line.slice(0, m.index);
        const w = this.#waiting.get(m[1]);
        if (w !== undefined) {
          this.#waiting.delete(m[1]);
          w(bare);
        } else {
          let q = this.#early.get(m[1]);
          if (q === undefined) this.#early.set(m[1], q = []);
          q.push(bare);
        }
      }
    } catch (e) {
      if (!this.#closed) this.#errors.addThrown(e);
    } finally {
      this.close();
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.lines.close();
    for (const w of this.#waiting.values()) w(null);
    this.#waiting.clear();
  }
}

/** Options of {@linkcode runSessionCycles}. */
export interface SessionCyclesOptions {
  /** Concurrent lockers. */
  lockers: number;
  /** Sessions they share (locker i uses session i mod sessions); default one per locker. */
  sessions?: number;
  durationMs: number;
  warmupMs?: number;
  /** One operation later than this is a timeout. */
  timeoutMs?: number;
  prefix?: string;
}

/** What {@linkcode runSessionCycles} measured. */
export interface SessionCyclesResult {
  lockers: number;
  sessions: number;
  cycles: number;
  seconds: number;
  rate: number;
  /** One cycle: `lock,id:I,name:N` sent to `released,id:I` received. */
  latency: Latency;
  errors: ErrorCounts;
}

/** Opens `n` sessions; null (errors counted) if one fails. */
async function openAll(target: Target, n: number, errors: Errors): Promise<Mux[] | null> {
  const muxes = Array.from({ length: n }, () => new Mux(errors));
  const ok = await Promise.all(muxes.map((m) => m.open(target)));
  if (ok.every(Boolean)) return muxes;
  for (const m of muxes) m.close();
  return null;
}

/** Closes the sessions of every locker still waiting past its deadline. */
function watchdog(deadlines: number[], muxOf: (i: number) => Mux, errors: Errors): () => void {
  const timer = setInterval(() => {
    const now = performance.now();
    for (const [i, d] of deadlines.entries()) {
      if (d < now) {
        deadlines[i] = Infinity;
        errors.add("timeout", `locker ${i}`);
        muxOf(i).close();
      }
    }
  }, 100);
  return () => clearInterval(timer);
}

/**
 * Lock+release cycles over sessions: every locker loops `lock,id:I,name:N-I` → `ok,token:T,id:I`
 * → `release,id:I` → `released,id:I` on distinct names, over sessions opened once.
 */
export async function runSessionCycles(
  target: Target,
  options: SessionCyclesOptions,
): Promise<SessionCyclesResult> {
  const { lockers, durationMs } = options;
  const sessions = Math.min(options.sessions ?? lockers, lockers);
  const warmupMs = options.warmupMs ?? 0;
  const timeoutMs = options.timeoutMs ?? 5000;
  const prefix = options.prefix ?? `scycle${lockers}x${sessions}`;
  const errors = new Errors();
  const samples: number[] = [];
  const muxes = await openAll(target, sessions, errors);
  const start = performance.now();
  const measureFrom = start + warmupMs;
  const stopAt = measureFrom + durationMs;
  let cycles = 0;
  if (muxes === null) {
    return {
      lockers,
      sessions,
      cycles: 0,
      seconds: 0,
      rate: 0,
      latency: latency([]),
      errors: errors.toJSON(),
    };
  }
  const deadlines = Array.from({ length: lockers }, () => Infinity);
  const stopWatch = watchdog(deadlines, (i) => muxes[i % sessions], errors);

  async function locker(i: number): Promise<void> {
    const mux = muxes![i % sessions];
    const id = String(i);
    const lock = `lock,id:${id},name:${prefix}-${i}`;
    const release = `release,id:${id}`;
    for (;;) {
      const t0 = performance.now();
      if (t0 >= stopAt) break;
      deadlines[i] = t0 + timeoutMs;
      mux.send(lock);
      const ok = await mux.next(id);
      if (ok === null) return;
      if (!ok.startsWith("ok,token:")) {
        errors.add("unexpected-reply", `lock got ${JSON.stringify(ok)}`);
        return;
      }
      mux.send(release);
      const released = await mux.next(id);
      if (released === null) return;
      if (released !== "released") {
        errors.add("unexpected-reply", `release got ${JSON.stringify(released)}`);
        return;
      }
      const t1 = performance.now();
      if (t0 >= measureFrom && t1 <= stopAt) {
        samples.push(t1 - t0);
        cycles++;
      }
    }
    deadlines[i] = Infinity;
  }

  const all = Promise.all(Array.from({ length: lockers }, (_, i) => locker(i)));
  const done = await within(all, warmupMs + durationMs + timeoutMs + 2000);
  stopWatch();
  if (!done) errors.add("timeout", "lockers did not stop");
  for (const m of muxes) m.close();
  await Promise.all(muxes.map((m) => m.reading));
  const seconds = (Math.min(performance.now(), stopAt) - measureFrom) / 1000;
  return {
    lockers,
    sessions,
    cycles,
    seconds: Math.round(seconds * 1000) / 1000,
    rate: Math.round(cycles / seconds),
    latency: latency(samples),
    errors: errors.toJSON(),
  };
}

/** Options of {@linkcode runSessionHandover}. */
export interface SessionHandoverOptions {
  /** Concurrent lockers, each with its own session. */
  lockers: number;
  /** Lock names they share (locker i uses name i mod names). */
  names: number;
  durationMs: number;
  warmupMs?: number;
  /** The `wait:` sent, in seconds. */
  wait?: number;
  timeoutMs?: number;
  /** Check mutual exclusion and the token order (off for the floor, which grants everything). */
  checkLocking?: boolean;
}

/** What {@linkcode runSessionHandover} measured. */
export interface SessionHandoverResult {
  lockers: number;
  names: number;
  grants: number;
  handovers: number;
  seconds: number;
  rate: number;
  /** From a holder's sending `release,id:I` to the next queued waiter's receiving `ok,...`. */
  delay: Latency;
  /** From sending `lock` to receiving `ok` (the time in the queue included). */
  grantLatency: Latency;
  errors: ErrorCounts;
}

/**
 * The hand-over between sessions: lockers, each over its own session, share a few names with
 * `wait:`; each loops lock → (queued)* → ok → release → released.
 */
export async function runSessionHandover(
  target: Target,
  options: SessionHandoverOptions,
): Promise<SessionHandoverResult> {
  const { lockers, names, durationMs } = options;
  const warmupMs = options.warmupMs ?? 0;
  const wait = options.wait ?? 30;
  const timeoutMs = options.timeoutMs ?? 5000;
  const check = options.checkLocking ?? true;
  const errors = new Errors();
  const delays: number[] = [];
  const grantTimes: number[] = [];
  const state = Array.from(
    { length: names },
    () => ({ lastToken: 0, releasedAt: -1, grants: 0, releases: 0 }),
  );
  const muxes = await openAll(target, lockers, errors);
  const start = performance.now();
  const measureFrom = start + warmupMs;
  const stopAt = measureFrom + durationMs;
  let grants = 0;
  let handovers = 0;
  const result = (seconds: number): SessionHandoverResult => ({
    lockers,
    names,
    grants,
    handovers,
    seconds: Math.round(seconds * 1000) / 1000,
    rate: seconds > 0 ? Math.round(grants / seconds) : 0,
    delay: latency(delays),
    grantLatency: latency(grantTimes),
    errors: errors.toJSON(),
  });
  if (muxes === null) return result(0);
  const deadlines = Array.from({ length: lockers }, () => Infinity);
  const stopWatch = watchdog(deadlines, (i) => muxes[i], errors);

  async function locker(i: number): Promise<void> {
    const mux = muxes![i];
    const n = i % names;
    const st = state[n];
    const lock = `lock,id:h,name:shandover-${n},wait:${wait}`;
    for (;;) {
      const t0 = performance.now();
      if (t0 >= stopAt) break;
      deadlines[i] = t0 + timeoutMs;
      mux.send(lock);
      let queued = false;
      let reply: string | null;
      for (;;) {
        reply = await mux.next("h");
        if (reply === null || !reply.startsWith("queued,")) break;
        queued = true;
      }
      if (reply === null) return;
      if (!reply.startsWith("ok,token:")) {
        errors.add("unexpected-reply", `lock got ${JSON.stringify(reply)}`);
        return;
      }
      const now = performance.now();
      const token = Number(reply.slice(9));
      st.grants++;
      if (check) {
        if (st.grants - st.releases > 1) errors.add("exclusion", `shandover-${n} granted twice`);
        if (token <= st.lastToken) {
          errors.add("token-order", `token ${token} after ${st.lastToken} on shandover-${n}`);
        }
        st.lastToken = token;
      }
      if (t0 >= measureFrom && now <= stopAt) {
        if (queued && st.releasedAt >= 0) {
          delays.push(now - st.releasedAt);
          handovers++;
        }
        grantTimes.push(now - t0);
        grants++;
      }
      if (check) { for (let k = 0; k < 16; k++) await undefined; }
      st.releases++;
      st.releasedAt = performance.now();
      mux.send("release,id:h");
      const released = await mux.next("h");
      if (released === null) return;
      if (released !== "released") {
        errors.add("unexpected-reply", `release got ${JSON.stringify(released)}`);
        return;
      }
    }
    deadlines[i] = Infinity;
  }

  const all = Promise.all(Array.from({ length: lockers }, (_, i) => locker(i)));
  const done = await within(all, warmupMs + durationMs + timeoutMs + 2000);
  stopWatch();
  if (!done) errors.add("timeout", "lockers did not stop");
  for (const m of muxes) m.close();
  await Promise.all(muxes.map((m) => m.reading));
  return result((Math.min(performance.now(), stopAt) - measureFrom) / 1000);
}

/** What {@linkcode runSessionHeld} measured (bytes of the server's JavaScript heap). */
export interface SessionHeldResult {
  held: number;
  /** Live heap after forced collections: session open, all held, all released. */
  heapBefore: number;
  heapHeld: number;
  heapAfter: number;
  /** (held - before) / held locks. */
  bytesPerLock: number;
  /** (after - before) / before, in percent: what releasing them all did not give back. */
  heapAfterPercent: number;
  /** Time to take all of them (pipelined), and to release all of them. */
  acquireMs: number;
  releaseMs: number;
  errors: ErrorCounts;
}

/**
 * One session holding `count` locks, against our server hosted in a Worker
 * (`tests/fault_heap_worker.ts`), so that its live heap can be measured after forced
 * collections: per lock while held, and how much of it releasing them all gives back.
 */
export async function runSessionHeld(count: number): Promise<SessionHeldResult> {
  const errors = new Errors();
  const worker = new Worker(new URL("../tests/fault_heap_worker.ts", import.meta.url), {
    type: "module",
  });
  const ask = <T>(msg: unknown): Promise<T> =>
    new Promise((resolve) => {
      worker.onmessage = (e) => resolve(e.data as T);
      worker.postMessage(msg);
    });
  const heap = async () => (await ask<{ heapUsed: number }>({ cmd: "heap" })).heapUsed;
  try {
    const { port } = await ask<{ port: number }>({
      cmd: "start",
      options: { maxSessionLocks: count, maxLocks: count + 10 },
    });
    const mux = new Mux(errors);
    if (!(await mux.open({ hostname: "127.0.0.1", port }))) throw new Error("no session");
    // A first round warms the code paths up, so that the baseline is not the cold start.
    await holdAll(mux, Math.min(count, 1000), errors);
    await releaseAll(mux, Math.min(count, 1000), errors);
    const heapBefore = await heap();
    let t = performance.now();
    await holdAll(mux, count, errors);
    const acquireMs = performance.now() - t;
    const heapHeld = await heap();
    t = performance.now();
    await releaseAll(mux, count, errors);
    const releaseMs = performance.now() - t;
    await sleep(50);
    const heapAfter = await heap();
    mux.close();
    await mux.reading;
    await ask({ cmd: "stop" });
    return {
      held: count,
      heapBefore,
      heapHeld,
      heapAfter,
      bytesPerLock: Math.round((heapHeld - heapBefore) / count),
      heapAfterPercent: Math.round((heapAfter - heapBefore) / heapBefore * 1000) / 10,
      acquireMs: Math.round(acquireMs),
      releaseMs: Math.round(releaseMs),
      errors: errors.toJSON(),
    };
  } finally {
    worker.terminate();
  }
}

async function holdAll(mux: Mux, count: number, errors: Errors): Promise<void> {
  for (let i = 0; i < count; i++) mux.send(`lock,id:${i},name:sheld-${i}`);
  for (let i = 0; i < count; i++) {
    const r = await mux.next(String(i));
    if (!r?.startsWith("ok,token:")) errors.add("unexpected-reply", `held lock got ${r}`);
  }
}

async function releaseAll(mux: Mux, count: number, errors: Errors): Promise<void> {
  for (let i = 0; i < count; i++) mux.send(`release,id:${i}`);
  for (let i = 0; i < count; i++) {
    const r = await mux.next(String(i));
    if (r !== "released") errors.add("unexpected-reply", `held release got ${r}`);
  }
}

/** What {@linkcode runClientCycles} measured. */
export interface ClientCyclesResult {
  transport: "session" | "connection";
  lockers: number;
  cycles: number;
  rate: number;
  errors: ErrorCounts;
}

/**
 * Lock+release cycles through one `LockClient` shared by `lockers` concurrent loops (distinct
 * names), over a session or over one connection per lock: what a program sees.
 */
export async function runClientCycles(
  target: Target,
  options: {
    lockers: number;
    durationMs: number;
    warmupMs?: number;
    transport: "session" | "connection";
  },
): Promise<ClientCyclesResult> {
  const { LockClient } = await import("../client.ts");
  const errors = new Errors();
  const client = new LockClient({
    host: target.hostname,
    port: target.port,
    transport: options.transport,
  });
  const measureFrom = performance.now() + (options.warmupMs ?? 0);
  const stopAt = measureFrom + options.durationMs;
  let cycles = 0;
  const loop = async (i: number) => {
    while (performance.now() < stopAt) {
      const t0 = performance.now();
      try {
        const lock = await client.lock(`ccycle-${options.transport}-${i}`);
        await lock.release();
      } catch (e) {
        errors.add("client", e instanceof Error ? e.message : String(e));
        return;
      }
      if (t0 >= measureFrom && performance.now() <= stopAt) cycles++;
    }
  };
  const done = await within(
    Promise.all(Array.from({ length: options.lockers }, (_, i) => loop(i))),
    (options.warmupMs ?? 0) + options.durationMs + 10_000,
  );
  if (!done) errors.add("timeout", "client lockers did not stop");
  await client.close();
  return {
    transport: options.transport,
    lockers: options.lockers,
    cycles,
    rate: Math.round(cycles / (options.durationMs / 1000)),
    errors: errors.toJSON(),
  };
}
