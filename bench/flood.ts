/**
 * The `flood` scenario: does what a flood grew come back? Rounds of three floods against one
 * server process, then its resident memory (VmRSS) once it has settled:
 *
 * 1. `idle` connections that connect and send nothing, then close;
 * 2. `waiters` clients on one name with `wait:30` (one holder, the rest queued), then all close;
 * 3. one line of `lineBytes` bytes with no newline (the server drops it and closes).
 *
 * The same rounds run against our server and against the floor server in the same run; the
 * benchmark prints the ratio of their RSS after the rounds.
 *
 * ```sh
 * deno run -A bench/flood.ts --port 7654 --pid 1234
 * ```
 *
 * @module
 */

import { type ErrorCounts, Errors, readRssKiB, type Target } from "./load.ts";

/** Options of {@linkcode runFlood}. */
export interface FloodOptions {
  /** The server's pid, to read its VmRSS. */
  pid: number;
  /** Rounds of the three floods. */
  rounds: number;
  /** Idle connections per round. */
  idle: number;
  /** Waiters on one name per round. */
  waiters: number;
  /** Bytes of the over-long line per round. */
  lineBytes: number;
  /** How long to let the server settle after the last round, in milliseconds. */
  settleMs: number;
}

/** What {@linkcode runFlood} measured. */
export interface FloodResult {
  /** VmRSS before the first round, KiB. */
  rssBeforeKiB: number | null;
  /** The largest VmRSS seen between floods, KiB. */
  rssPeakKiB: number | null;
  /** VmRSS after the rounds and the settling time, KiB. */
  rssAfterKiB: number | null;
  /** Everything that went wrong (a refused or timed-out connection, a wrong reply). */
  errors: ErrorCounts;
}

const encoder = new TextEncoder();

async function connectAll(target: Target, n: number, errors: Errors): Promise<Deno.Conn[]> {
  const conns: Deno.Conn[] = [];
  // Batches of 200: a burst of thousands of SYNs overflows the listen backlog.
  for (let i = 0; i < n; i += 200) {
    const batch = await Promise.allSettled(
      Array.from({ length: Math.min(200, n - i) }, () => Deno.connect(target)),
    );
    for (const r of batch) {
      if (r.status === "fulfilled") conns.push(r.value);
      else errors.addThrown(r.reason);
    }
  }
  return conns;
}

function closeAll(conns: Deno.Conn[]): void {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed by the server */ }
  }
}

/** Reads the first line of a connection (up to 200 bytes), or null at EOF. */
async function firstLine(conn: Deno.Conn): Promise<string | null> {
  const buf = new Uint8Array(200);
  let len = 0;
  while (len < buf.length) {
    const n = await conn.read(buf.subarray(len));
    if (n === null) return null;
    len += n;
    const nl = buf.subarray(0, len).indexOf(0x0a);
    if (nl >= 0) return new TextDecoder().decode(buf.subarray(0, nl));
  }
  return new TextDecoder().decode(buf);
}

async function floodWaiters(target: Target, n: number, round: number, errors: Errors) {
  const conns = await connectAll(target, n, errors);
  const request = encoder.encode(`lock,name:flood-${round},wait:30\n`);
  await Promise.all(conns.map((c) => c.write(request).catch((e) => errors.addThrown(e))));
  // One is granted, the rest queue (the floor grants all): wait for an answer to one of them.
  const first = await Promise.race([
    firstLine(conns[0]).catch(() => null),
    new Promise<null>((r) => setTimeout(() => r(null), 5000)),
  ]);
  if (first === null || !/^(ok|queued,position:\d+)/.test(first)) {
    errors.add("unexpected-reply", `${first}`);
  }
  closeAll(conns);
}

async function floodLine(target: Target, bytes: number, errors: Errors) {
  let conn: Deno.Conn;
  try {
    conn = await Deno.connect(target);
  } catch (e) {
    errors.addThrown(e);
    return;
  }
  const chunk = new Uint8Array(1 << 20).fill(0x61);
  try {
    for (let sent = 0; sent < bytes; sent += chunk.length) await conn.write(chunk);
  } catch {
    // The server may close once the line is over its limit: that is an answer, not an error.
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

/** Runs the rounds of floods and reads the server's RSS before, during and after. */
export async function runFlood(target: Target, options: FloodOptions): Promise<FloodResult> {
  const errors = new Errors();
  const rssBeforeKiB = readRssKiB(options.pid);
  let peak = rssBeforeKiB ?? 0;
  const sample = () => peak = Math.max(peak, readRssKiB(options.pid) ?? 0);
  for (let round = 0; round < options.rounds; round++) {
    const idle = await connectAll(target, options.idle, errors);
    sample();
    closeAll(idle);
    if (options.waiters > 0) await floodWaiters(target, options.waiters, round, errors);
    sample();
    if (options.lineBytes > 0) await floodLine(target, options.lineBytes, errors);
    sample();
  }
  // V8 gives back what a flood grew only once the process has been idle a while (its memory
  // reducer, 8-15 s here): watch the whole settling window and report where it ends.
  const settleEnd = performance.now() + options.settleMs;
  while (performance.now() < settleEnd) {
    await new Promise((r) => setTimeout(r, Math.min(500, settleEnd - performance.now())));
    sample();
  }
  return {
    rssBeforeKiB,
    rssPeakKiB: peak || null,
    rssAfterKiB: readRssKiB(options.pid),
    errors: errors.toJSON(),
  };
}

if (import.meta.main) {
  const { parseArgs } = await import("node:util");
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      port: { type: "string" },
      pid: { type: "string" },
      idle: { type: "string", default: "3000" },
      waiters: { type: "string", default: "3000" },
      "line-mb": { type: "string", default: "100" },
      settle: { type: "string", default: "20" },
    },
  });
  if (!values.port || !values.pid) {
    console.error("usage: bench/flood.ts --port P --pid PID");
    Deno.exit(2);
  }
  const r = await runFlood({ hostname: "127.0.0.1", port: Number(values.port) }, {
    pid: Number(values.pid),
    rounds: 3,
    idle: Number(values.idle),
    waiters: Number(values.waiters),
    lineBytes: Number(values["line-mb"]) << 20,
    settleMs: Number(values.settle) * 1000,
  });
  console.log(JSON.stringify(r, null, 2));
}
