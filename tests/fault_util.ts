/**
 * Fixtures for the fault, flood and fuzz tests and for `soak/soak.ts`: server subprocesses whose
 * memory can be read from /proc, netcat holders that can be SIGKILLed, a `.ping` prober, a
 * checker of hold intervals, and network namespaces with a cuttable veth link.
 *
 * @module
 */

import { type ByteReader, LineReader } from "../lib/lines.ts";
import { RawClient, ROOT } from "./test_util.ts";

export { RawClient, ROOT };

const encoder = new TextEncoder();

// --- Small helpers

/** Resolves after `ms` (only for pacing load, never as synchronisation). */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects with "`what` took longer than `ms` ms" unless `promise` settles first; clears its timer. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The `p`-th percentile (0..100) of `values` (nearest rank); NaN when empty. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

/** The soft limit on open files of this process (from /proc/self/limits), or 1024. */
export function fdLimit(): number {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(Deno.readTextFileSync("/proc/self/limits"));
    if (m) return Number(m[1]);
  } catch {
    // not Linux
  }
  return 1024;
}

/** Open files of this process right now. */
export function openFds(): number {
  try {
    return [...Deno.readDirSync("/proc/self/fd")].length;
  } catch {
    return 0;
  }
}

/** Resident memory of process `pid` in kB (VmRSS from /proc/PID/status). */
export function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+)\s*kB/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** Runs a command to completion; throws with its output when it fails (unless `check` is false). */
export async function run(
  cmd: string[],
  options: { check?: boolean; stdin?: string } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(encoder.encode(options.stdin));
    await w.close();
  }
  const out = await child.output();
  const result = {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
  if (options.check !== false && out.code !== 0) {
    throw new Error(`${cmd.join(" ")} exited with ${out.code}: ${result.stderr}${result.stdout}`);
  }
  return result;
}

/** A `ByteReader` over a byte stream (a child's stdout). */
export class StreamByteReader implements ByteReader {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #rest: Uint8Array = new Uint8Array(0);

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  async read(p: Uint8Array): Promise<number | null> {
    if (this.#rest.length === 0) {
      const { value, done } = await this.#reader.read();
      if (done) return null;
      this.#rest = value;
    }
    const n = Math.min(p.length, this.#rest.length);
    p.set(this.#rest.subarray(0, n));
    this.#rest = this.#rest.subarray(n);
    return n;
  }

  /** Reads and drops the rest of the stream (so the child's pipe never fills). */
  async drain(): Promise<void> {
    try {
      while (!(await this.#reader.read()).done) { /* drop */ }
    } catch {
      // cancelled
    }
  }
}

// --- One `.ping` and a prober that pings all the time

/**
 * One `.ping` on a fresh connection: resolves to the round trip in ms, from connect to the reply.
 * Throws when the reply is not `pong` (or `err,too many connections` when `busyOk`) or takes
 * longer than `timeoutMs`.
 */
export async function ping(
  port: number,
  hostname = "127.0.0.1",
  timeoutMs = 2000,
  busyOk = false,
): Promise<number> {
  const t0 = performance.now();
  let client: LineConn | undefined;
  let gaveUp = false;
  const attempt = (async () => {
    client = await LineConn.connect(port, hostname, 256);
    if (gaveUp) throw new Error("gave up");
    await client.send(".ping");
    return await client.line();
  })();
  try {
    const reply = await within(attempt, timeoutMs, `.ping to port ${port}`);
    if (reply !== "pong" && !(busyOk && reply === "err,too many connections")) {
      throw new Error(`.ping got ${JSON.stringify(reply)}`);
    }
    return performance.now() - t0;
  } finally {
    // On a timeout the attempt may still be under way: closing the socket ends it.
    gaveUp = true;
    client?.close();
    await attempt.catch(() => {});
    client?.close();
  }
}

/** Pings a server one ping after another until stopped; keeps every round trip. */
export class PingProbe {
  readonly latencies: number[] = [];
  readonly failures: string[] = [];
  #stopped = false;
  #loop: Promise<void>;

  /**
   * @param port the server's port
   * @param options.everyMs pause between pings
   * @param options.timeoutMs a ping slower than this counts as a failure
   * @param options.busyOk accept `err,too many connections` as an answer
   */
  constructor(
    port: number,
    options: { everyMs?: number; timeoutMs?: number; busyOk?: boolean; hostname?: string } = {},
  ) {
    const every = options.everyMs ?? 20;
    this.#loop = (async () => {
      while (!this.#stopped) {
        try {
          this.latencies.push(
            await ping(port, options.hostname, options.timeoutMs ?? 2000, options.busyOk),
          );
        } catch (err) {
          this.failures.push(err instanceof Error ? err.message : String(err));
        }
        if (!this.#stopped) await delay(every);
      }
    })();
  }

  /** Stops and waits for the ping under way. */
  async stop(): Promise<{ count: number; p50: number; p99: number; max: number }> {
    this.#stopped = true;
    await this.#loop;
    return {
      count: this.latencies.length,
      p50: percentile(this.latencies, 50),
      p99: percentile(this.latencies, 99),
      max: Math.max(...this.latencies),
    };
  }
}

/** One line-request on a fresh connection (`.stats`, `.locks`); returns the parsed JSON. */
export async function query<T>(
  port: number,
  action: ".stats" | ".locks",
  hostname = "127.0.0.1",
): Promise<T> {
  const c = await LineConn.connect(port, hostname, action === ".stats" ? 1 << 16 : 1 << 24);
  let reply: string | null;
  try {
    await c.send(action);
    reply = await within(c.line(), 5000, action);
  } finally {
    c.close();
  }
  const prefix = action === ".stats" ? "stats," : "locks,";
  if (reply === null || !reply.startsWith(prefix)) {
    throw new Error(`${action} got ${JSON.stringify(reply)}`);
  }
  return JSON.parse(reply.slice(prefix.length)) as T;
}

// --- A server subprocess

/** A server running as a subprocess, with its pid for /proc. */
export interface ServerChild extends AsyncDisposable {
  child: Deno.ChildProcess;
  pid: number;
  port: number;
  stderr(): string;
  /** Sends `signal` (default SIGKILL) and waits for the exit. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/**
 * Starts `server.ts` as a subprocess. The command runs through `bash -c 'ulimit -n N; exec ...'`
 * (so the server may have more descriptors than this process) and after `prefix` (e.g. `ip netns
 * exec NS`); both exec, so the child's pid is the server's. With `info` (the default) the server
 * logs at info level and the port is read from its "listening on" line; without, `port` must be
 * given and readiness is awaited by connecting.
 */
export async function spawnServer(
  args: string[] = [],
  options: {
    prefix?: string[];
    nofile?: number;
    listen?: string;
    port?: number;
    info?: boolean;
    readyHost?: string;
  } = {},
): Promise<ServerChild> {
  const info = options.info ?? true;
  if (!info && options.port === undefined) throw new Error("spawnServer: quiet needs a port");
  const serverArgs = [
    "run",
    "-A",
    `${ROOT}server.ts`,
    ...(info ? ["--info"] : []),
    "--listen",
    options.listen ?? "127.0.0.1",
    "--port",
    String(options.port ?? 0),
    ...args,
  ];
  const nofile = options.nofile ?? 65536;
  const script = `ulimit -n ${nofile} 2>/dev/null || ulimit -n $(ulimit -Hn); exec "$@"`;
  const cmd = [
    ...(options.prefix ?? []),
    "bash",
    "-c",
    script,
    "bash",
    Deno.execPath(),
    ...serverArgs,
  ];
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  let onText: (() => void) | undefined;
  const decoder = new TextDecoder();
  const pumps = Promise.all([
    (async () => {
      for await (const chunk of child.stderr) {
        // Keep the start (the port) and the last 64 KiB (for failure messages).
        text += decoder.decode(chunk, { stream: true });
        if (text.length > 128 * 1024) text = text.slice(0, 4096) + "\n...\n" + text.slice(-65536);
        onText?.();
      }
    })(),
    (async () => {
      for await (const _ of child.stdout) { /* drop */ }
    })(),
  ]);
  let status: Promise<Deno.CommandStatus> | undefined;
  const stop = async (signal: Deno.Signal = "SIGKILL") => {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
    status ??= child.status;
    const s = await status;
    await pumps;
    return s;
  };
  let port = options.port ?? 0;
  try {
    if (info) {
      const listening = new Promise<string>((resolve) => {
        onText = () => {
          const m = /listening on \S*:(\d+)\b/m.exec(text);
          if (m) {
            onText = undefined;
            resolve(m[1]);
          }
        };
      });
      const exited = child.status.then((s) => {
        throw new Error(`server exited with ${s.code} before listening:\n${text}`);
      });
      port = Number(await within(Promise.race([listening, exited]), 15_000, "server start"));
    } else {
      const end = performance.now() + 15_000;
      for (;;) {
        try {
          await ping(port, options.readyHost ?? "127.0.0.1", 1000);
          break;
        } catch (err) {
          if (performance.now() > end) throw err;
          await delay(50);
        }
      }
    }
  } catch (err) {
    await stop("SIGKILL");
    throw err;
  }
  return {
    child,
    pid: child.pid,
    port,
    stderr: () => text,
    stop,
    [Symbol.asyncDispose]: async () => {
      await stop("SIGKILL");
    },
  };
}

/** A free TCP port on 127.0.0.1 (for a server that must be told its port; tiny race). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

// --- A client in its own process (netcat or a Deno script), which can be SIGKILLed

/** A Deno program that does what `nc HOST PORT` does: stdin to the socket, the socket to stdout. */
const DENO_NC = `
const [hostname, port] = Deno.args;
const conn = await Deno.connect({ hostname, port: Number(port) });
await Promise.all([
  Deno.stdin.readable.pipeTo(conn.writable).catch(() => {}),
  conn.readable.pipeTo(Deno.stdout.writable).catch(() => {}),
]);
`;

/**
 * A connection held by a separate process: `nc HOST PORT` (optionally inside a network namespace
 * through `prefix`) or the same in Deno. Lines go in through its stdin and come out of its stdout.
 */
export class ProcClient implements AsyncDisposable {
  readonly child: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #lines: LineReader;
  readonly #stdout: StreamByteReader;
  readonly #stderr: Promise<string>;
  readonly #status: Promise<Deno.CommandStatus>;

  private constructor(cmd: string[]) {
    this.child = new Deno.Command(cmd[0], {
      args: cmd.slice(1),
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#writer = this.child.stdin.getWriter();
    this.#stdout = new StreamByteReader(this.child.stdout);
    this.#lines = new LineReader(this.#stdout, 1 << 16);
    this.#stderr = new Response(this.child.stderr).text();
    this.#status = this.child.status;
  }

  /** `nc hostname port`, after `prefix` (e.g. `ip netns exec NS`). */
  static nc(port: number, hostname = "127.0.0.1", prefix: string[] = []): ProcClient {
    return new ProcClient([...prefix, "nc", hostname, String(port)]);
  }

  /** A `deno eval` program doing what nc does. */
  static deno(port: number, hostname = "127.0.0.1"): ProcClient {
    return new ProcClient([Deno.execPath(), "eval", DENO_NC, hostname, String(port)]);
  }

  /** The process id. */
  get pid(): number {
    return this.child.pid;
  }

  /** Sends a line (the `\n` is added). */
  async send(text: string): Promise<void> {
    await this.#writer.write(encoder.encode(text + "\n"));
  }

  /** The next line the process printed, or null when its output ended. */
  async line(): Promise<string | null> {
    const r = await this.#lines.next();
    return r.kind === "line" ? r.line : null;
  }

  /** Sends `text` and returns the next line, failing after `ms`. */
  async request(text: string, ms = 5000): Promise<string | null> {
    await this.send(text);
    return await within(this.line(), ms, `reply to ${JSON.stringify(text)}`);
  }

  /** Sends a signal (default SIGKILL) and resolves when the process is gone. */
  async kill(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    try {
      this.child.kill(signal);
    } catch {
      // already exited
    }
    return await this.#status;
  }

  /** Kills it if it still runs and releases every pipe. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill("SIGKILL");
    await this.#writer.close().catch(() => {});
    await this.#stdout.drain();
    await this.#stderr.catch(() => "");
  }
}

// --- The hold-interval checker

/** One hold as a client saw it. */
export interface Hold {
  name: string;
  /** When `ok` arrived (ms, performance.now of this process). */
  start: number;
  /** A lower bound of when the server took it away (see {@linkcode HoldChecker}). */
  end: number;
  /** The fencing token (0 for a version 1 grant). */
  token: number;
  /** Who held it (for messages). */
  who: string;
  /** Held shared (`mode:shared`); otherwise exclusive. */
  shared?: boolean;
  /** When the request was sent (ms): for the starvation check. */
  sentAt?: number;
  /** When its first `queued` line arrived (ms), if it waited: for the starvation check. */
  queuedAt?: number;
}

/**
 * Records the holds clients saw and checks mutual exclusion: for a name with limit N, at no
 * moment do more than N holds overlap; for limit 1, tokens increase in the order of the holds.
 *
 * A hold must be recorded soundly: `start` when `ok` was received (after the server granted),
 * `end` no later than the server ended it, i.e. when the client *sent* `release` (if `released`
 * came back), closed its socket or was sent SIGKILL; for a lease that may have run out (no
 * `released` came back), no later than the send time of the last line answered by the holder
 * (or of the request) plus the ttl. Holds that end before they start are empty and ignored.
 *
 * A name declared with modes (shared locks) is checked as a readers–writer lock: any number of
 * shared holds may overlap, an exclusive hold overlaps no other hold; tokens increase between
 * holds one after the other of which one is exclusive; and no shared request sent after an
 * exclusive one was queued gets its `ok` before that exclusive one (a writer is never overtaken
 * by later readers: sound, since such a reader can be granted only after the writer released).
 */
export class HoldChecker {
  readonly holds: Hold[] = [];
  readonly limits = new Map<string, number>();
  readonly #modes = new Set<string>();

  /** Declares a name's limit, and whether its clients use modes (shared locks). */
  limit(name: string, n: number, modes = false): void {
    this.limits.set(name, n);
    if (modes) this.#modes.add(name);
  }

  add(hold: Hold): void {
    this.holds.push(hold);
  }

  /** Every violation found (empty when none). */
  violations(): string[] {
    const out: string[] = [];
    const byName = new Map<string, Hold[]>();
    for (const h of this.holds) {
      if (!(h.end > h.start)) continue;
      let list = byName.get(h.name);
      if (!list) byName.set(h.name, list = []);
      list.push(h);
    }
    for (const [name, holds] of byName) {
      if (this.#modes.has(name)) {
        out.push(...modeViolations(name, holds));
        if (out.length > 20) return out;
        continue;
      }
      const limit = this.limits.get(name) ?? 1;
      // Sweep: ends before starts at the same instant (touching is not overlapping).
      const events: [number, number, Hold][] = [];
      for (const h of holds) events.push([h.start, 1, h], [h.end, -1, h]);
      events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      const open = new Set<Hold>();
      for (const [t, d, h] of events) {
        if (d < 0) {
          open.delete(h);
          continue;
        }
        open.add(h);
        if (open.size > limit) {
          const who = [...open].map((o) =>
            `${o.who}[${o.start.toFixed(1)}..${o.end.toFixed(1)} token ${o.token}]`
          );
          out.push(`${name} (limit ${limit}): ${open.size} holders at ${t.toFixed(1)}: ${who}`);
          if (out.length > 20) return out;
        }
      }
      if (limit === 1) {
        const sorted = holds.filter((h) => h.token > 0).sort((a, b) => a.start - b.start);
        for (let i = 1; i < sorted.length; i++) {
          if (sorted[i].token <= sorted[i - 1].token) {
            out.push(
              `${name}: token ${sorted[i].token} (${sorted[i].who}) after ${sorted[i - 1].token} (${
                sorted[i - 1].who
              })`,
            );
          }
        }
      }
    }
    return out;
  }
}

/** The readers–writer checks of {@linkcode HoldChecker} for one name. */
function modeViolations(name: string, holds: Hold[]): string[] {
  const out: string[] = [];
  const show = (o: Hold) =>
    `${o.who}(${o.shared ? "S" : "X"})[${o.start.toFixed(1)}..${
      o.end.toFixed(1)
    } token ${o.token}]`;
  // Overlaps: ends before starts at the same instant.
  const events: [number, number, Hold][] = [];
  for (const h of holds) events.push([h.start, 1, h], [h.end, -1, h]);
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const open = new Set<Hold>();
  let exclusiveOpen = 0;
  for (const [t, d, h] of events) {
    if (d < 0) {
      open.delete(h);
      if (!h.shared) exclusiveOpen--;
      continue;
    }
    open.add(h);
    if (!h.shared) exclusiveOpen++;
    if (exclusiveOpen > 0 && open.size > 1) {
      out.push(
        `${name}: an exclusive hold beside another at ${t.toFixed(1)}: ${[...open].map(show)}`,
      );
      if (out.length > 20) return out;
    }
  }
  // Tokens: a hold that starts after another ended, one of them exclusive, has the larger token.
  const byStart = holds.filter((h) => h.token > 0).sort((a, b) => a.start - b.start);
  const byEnd = [...byStart].sort((a, b) => a.end - b.end);
  let j = 0;
  let maxAll: Hold | undefined, maxExclusive: Hold | undefined;
  for (const h of byStart) {
    while (j < byEnd.length && byEnd[j].end < h.start) {
      const e = byEnd[j++];
      if (maxAll === undefined || e.token > maxAll.token) maxAll = e;
      if (!e.shared && (maxExclusive === undefined || e.token > maxExclusive.token)) {
        maxExclusive = e;
      }
    }
    const before = h.shared ? maxExclusive : maxAll;
    if (before !== undefined && h.token <= before.token) {
      out.push(`${name}: token of ${show(h)} not above ${show(before)}, which ended before`);
      if (out.length > 20) return out;
    }
  }
  // Starvation: no reader sent after a writer queued gets its ok before that writer.
  const writers = holds.filter((h) => !h.shared && h.queuedAt !== undefined);
  for (const r of holds) {
    if (!r.shared || r.sentAt === undefined) continue;
    for (const w of writers) {
      if (r.sentAt > w.queuedAt! && r.start < w.start) {
        out.push(
          `${name}: reader ${show(r)} sent at ${r.sentAt.toFixed(1)} overtook writer ${
            show(w)
          } queued at ${w.queuedAt!.toFixed(1)}`,
        );
        if (out.length > 20) return out;
      }
    }
  }
  return out;
}

// --- Network namespaces

let netnsSeq = 0;

/** Why network namespaces cannot be used here, or undefined when they can. */
export async function netnsUnavailable(): Promise<string | undefined> {
  if (Deno.build.os !== "linux") return "not Linux";
  const name = `tnlprobe${Deno.pid}`;
  try {
    const r = await run(["ip", "netns", "add", name], { check: false });
    if (r.code !== 0) return `ip netns add failed: ${r.stderr.trim()}`;
    const v = await run(
      ["ip", "link", "add", `tp${Deno.pid % 100000}a`, "type", "veth", "peer", "name", "tpb"],
      { check: false },
    );
    if (v.code !== 0) return `ip link add veth failed: ${v.stderr.trim()}`;
    await run(["ip", "link", "del", `tp${Deno.pid % 100000}a`], { check: false });
    return undefined;
  } catch (err) {
    return `ip is not usable: ${err instanceof Error ? err.message : err}`;
  } finally {
    await run(["ip", "netns", "del", name], { check: false }).catch(() => {});
  }
}

/**
 * A network namespace joined to this one by a veth pair: the host end `hostIp` (here), the far
 * end `nsIp` (in the namespace). `exec` prefixes a command to run it inside.
 */
export class Netns implements AsyncDisposable {
  readonly name: string;
  readonly hostDev: string;
  readonly nsDev: string;
  readonly hostIp: string;
  readonly nsIp: string;

  private constructor(seq: number) {
    const id = `${Deno.pid % 100000}${seq}`;
    this.name = `tnl${id}`;
    this.hostDev = `tnh${id}`;
    this.nsDev = `tnn${id}`;
    // A /30 in 198.18.0.0/15 (set aside for network tests, RFC 2544), one per process and
    // namespace, so that no real network's route is shadowed while the link exists.
    const offset = ((Deno.pid * 16 + seq) % (1 << 15)) * 4;
    const base = `198.${18 + (offset >> 16)}.${(offset >> 8) & 0xff}`;
    this.hostIp = `${base}.${(offset & 0xff) + 1}`;
    this.nsIp = `${base}.${(offset & 0xff) + 2}`;
  }

  /** Makes the namespace and the link, both up, with loopback up inside. */
  static async create(): Promise<Netns> {
    const ns = new Netns(netnsSeq++);
    try {
      await run(["ip", "netns", "add", ns.name]);
      await run(["ip", "link", "add", ns.hostDev, "type", "veth", "peer", "name", ns.nsDev]);
      await run(["ip", "link", "set", ns.nsDev, "netns", ns.name]);
      await run(["ip", "addr", "add", `${ns.hostIp}/30`, "dev", ns.hostDev]);
      await run(["ip", "link", "set", ns.hostDev, "up"]);
      await run(["ip", "-n", ns.name, "addr", "add", `${ns.nsIp}/30`, "dev", ns.nsDev]);
      await run(["ip", "-n", ns.name, "link", "set", ns.nsDev, "up"]);
      await run(["ip", "-n", ns.name, "link", "set", "lo", "up"]);
    } catch (err) {
      await ns[Symbol.asyncDispose]();
      throw err;
    }
    return ns;
  }

  /** The prefix that runs a command inside the namespace. */
  get exec(): string[] {
    return ["ip", "netns", "exec", this.name];
  }

  /** Sets a sysctl under /proc/sys/net inside the namespace (per-namespace values). */
  async sysctl(key: string, value: string | number): Promise<void> {
    const path = `/proc/sys/${key.replaceAll(".", "/")}`;
    await run([...this.exec, "sh", "-c", `echo ${value} > ${path}`]);
    const got = (await run([...this.exec, "cat", path])).stdout.trim();
    if (got !== String(value)) throw new Error(`${key} is ${got}, not ${value}`);
  }

  /** Cuts the link silently: the host end goes down, nothing is sent to either side. */
  async cut(): Promise<void> {
    await run(["ip", "link", "set", this.hostDev, "down"]);
  }

  /** Removes the link and the namespace. */
  async [Symbol.asyncDispose](): Promise<void> {
    await run(["ip", "link", "del", this.hostDev], { check: false }).catch(() => {});
    await run(["ip", "netns", "del", this.name], { check: false }).catch(() => {});
  }
}

/**
 * Cuts a link under a holder. The server runs in its own network namespace (with `keepalive`
 * = [time, intvl, probes] as that namespace's TCP keepalive sysctls); the holder connects from
 * this namespace over a veth link and sends `request`; a waiter inside the namespace (over its
 * loopback) queues for `cut`. Then the link goes down: no FIN, no RST, nothing reaches the
 * server. Resolves when the waiter is granted (within the lease or keepalive time plus
 * `slackMs`), with the time since the cut and the server socket's `ss` line before the cut.
 */
export async function linkCut(
  request: string,
  options: { keepalive?: [number, number, number] },
  slackMs: number,
): Promise<{ afterCutMs: number; ss: string }> {
  await using ns = await Netns.create();
  if (options.keepalive) {
    const [time, intvl, probes] = options.keepalive;
    await ns.sysctl("net.ipv4.tcp_keepalive_time", time);
    await ns.sysctl("net.ipv4.tcp_keepalive_intvl", intvl);
    await ns.sysctl("net.ipv4.tcp_keepalive_probes", probes);
  }
  await using srv = await spawnServer([], { prefix: ns.exec, listen: "0.0.0.0" });
  await using holder = ProcClient.nc(srv.port, ns.nsIp);
  await using waiter = ProcClient.nc(srv.port, "127.0.0.1", ns.exec);
  const held = await holder.request(request);
  if (!held?.startsWith("ok")) throw new Error(`the holder got ${JSON.stringify(held)}`);
  const queued = await waiter.request("lock,name:cut,wait:60");
  if (queued !== "queued,position:1") throw new Error(`the waiter got ${JSON.stringify(queued)}`);
  const holderLine = async () =>
    (await ssLines(srv.port, ns.exec)).find((l) => l.includes(ns.hostIp)) ?? "";
  let ss = await holderLine();
  if (options.keepalive) {
    // A holder's socket gets keepalive about a second after its grant (lib/session.ts `tune`).
    const end = performance.now() + 5000;
    while (!/timer:\(keepalive,/.test(ss) && performance.now() < end) {
      await new Promise((r) => setTimeout(r, 50));
      ss = await holderLine();
    }
  }
  const ttl = Number(/ttl:([\d.]+)/.exec(request)?.[1] ?? NaN);
  const limitMs = options.keepalive
    ? (options.keepalive[0] + options.keepalive[1] * options.keepalive[2]) * 1000 + slackMs
    : (ttl || 0) * 1000 + slackMs;
  const t0 = performance.now();
  await ns.cut();
  const granted = await within(waiter.line(), limitMs, "the grant after the link was cut");
  if (!/^ok,token:\d+$/.test(granted ?? "")) {
    throw new Error(`the waiter got ${JSON.stringify(granted)} after the cut`);
  }
  const afterCutMs = performance.now() - t0;
  await srv.stop("SIGKILL");
  return { afterCutMs, ss };
}

/** Lines of `ss -tnoe` for established TCP sockets whose local port is `port` (in `prefix`'s namespace). */
export async function ssLines(port: number, prefix: string[] = []): Promise<string[]> {
  const r = await run([...prefix, "ss", "-tnoeH", "state", "established", `( sport = :${port} )`]);
  return r.stdout.split("\n").filter((l) => l.trim() !== "");
}

// --- A light line client (a small buffer, unlike RawClient's 1 MiB: floods open thousands)

/** A socket that writes lines and reads reply lines, with a small read buffer. */
export class LineConn {
  readonly conn: Deno.Conn;
  readonly #reader: LineReader;
  #closed = false;

  private constructor(conn: Deno.Conn, maxLine: number) {
    this.conn = conn;
    this.#reader = new LineReader(conn, maxLine);
  }

  /** Connects to `port` on `hostname` (default 127.0.0.1). */
  static async connect(port: number, hostname = "127.0.0.1", maxLine = 4096): Promise<LineConn> {
    return new LineConn(await Deno.connect({ hostname, port }), maxLine);
  }

  /** Writes `text` and a `\n`. */
  async send(text: string): Promise<void> {
    const bytes = encoder.encode(text + "\n");
    let done = 0;
    while (done < bytes.length) done += await this.conn.write(bytes.subarray(done));
  }

  /** The next line; null at the end of the stream or on a reset. */
  async line(): Promise<string | null> {
    try {
      const r = await this.#reader.next();
      if (r.kind === "line") return r.line;
      if (r.kind === "eof") return null;
      throw new Error(`the server sent a ${r.kind} line`);
    } catch (err) {
      if (
        err instanceof Deno.errors.ConnectionReset || err instanceof Deno.errors.BadResource ||
        err instanceof Deno.errors.Interrupted
      ) return null;
      throw err;
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }
}

// --- Churn: many clients racing on a few names

/** A small seeded random generator (mulberry32), so that a failing run can be repeated. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Options of {@linkcode runChurn}. */
export interface ChurnOptions {
  port: number;
  hostname?: string;
  /** In-process clients. */
  clients: number;
  /** Clients that are netcat processes, SIGKILLed while they hold. */
  killers: number;
  durationMs: number;
  /**
   * The names and their limits (every client of a name uses that limit). With `modes`, a name
   * (of limit 1) is taken shared or exclusive at random (`mode:`), as a readers–writer lock.
   */
  names: { name: string; limit: number; modes?: boolean }[];
  seed: number;
  /** The longest `wait` a client asks for, in seconds. */
  maxWait?: number;
  /** Record the holds here (to check them together with other clients'). */
  checker?: HoldChecker;
}

/** What {@linkcode runChurn} saw. */
export interface ChurnResult {
  checker: HoldChecker;
  /** Replies counted by their first word (and by behaviour). */
  counts: Record<string, number>;
  /** Protocol violations, stuck clients and the like (should be empty). */
  problems: string[];
  /** The largest holder count `.locks` showed per name. */
  maxSeen: Record<string, number>;
}

/**
 * Runs `clients` clients (and `killers` nc processes) for `durationMs` against a server, each
 * taking locks in a loop with random waits, ttls, hold times and ways of letting go (release,
 * close, falling silent until the lease runs out, leaving the queue, SIGKILL), and records every
 * hold soundly in a {@linkcode HoldChecker}. A monitor polls `.locks` and records the largest
 * number of holders it saw per name. Stops by itself; every read is bounded in time.
 */
export async function runChurn(o: ChurnOptions): Promise<ChurnResult> {
  const checker = o.checker ?? new HoldChecker();
  for (const n of o.names) checker.limit(n.name, n.limit, n.modes);
  const counts: Record<string, number> = {};
  const count = (k: string) => counts[k] = (counts[k] ?? 0) + 1;
  const problems: string[] = [];
  const maxSeen: Record<string, number> = {};
  const end = performance.now() + o.durationMs;
  const maxWait = o.maxWait ?? 1;
  const hostname = o.hostname ?? "127.0.0.1";

  /** One lock attempt's request line and its parameters. */
  const pick = (r: () => number) => {
    const { name, limit, modes } = o.names[Math.floor(r() * o.names.length)];
    // Readers are most of the requests on a name with modes, as in real use.
    const shared = modes === true && r() < 0.7;
    const v1 = !shared && limit === 1 && r() < 0.15;
    const wait = v1 ? 0 : [0, 0.05, 0.2, maxWait / 2, maxWait][Math.floor(r() * 5)];
    const ttl = v1 || r() < 0.6 ? undefined : [0.3, 0.5, 1][Math.floor(r() * 3)];
    let line = `lock,name:${name}`;
    if (!v1) {
      line += `,wait:${wait}`;
      if (ttl !== undefined) line += `,ttl:${ttl}`;
      if (limit > 1 || r() < 0.3) line += `,limit:${limit}`;
      if (shared) line += ",mode:shared";
      else if (modes && r() < 0.5) line += ",mode:exclusive";
    }
    return { name, limit, v1, wait, ttl, line, shared };
  };
  const bound = (wait: number, ttl: number | undefined) => (Math.max(wait, ttl ?? 0) + 3) * 1000;
  const tokenOf = (reply: string) => Number(/token:(\d+)/.exec(reply)?.[1] ?? 0);
  const expectGrantOrEnd = (reply: string | null, who: string, v1: boolean): boolean => {
    // true: granted; false: not granted (done)
    if (reply === null) {
      problems.push(`${who}: connection ended without a reply`);
      return false;
    }
    if (v1 ? reply === "ok" : /^ok,token:\d+$/.test(reply)) return true;
    if (reply === "not-granted" || (!v1 && reply === "timeout")) {
      count(reply);
      return false;
    }
    problems.push(`${who}: unexpected reply ${JSON.stringify(reply)}`);
    return false;
  };

  const client = async (id: number) => {
    const r = rng(o.seed * 1000 + id);
    let round = 0;
    while (performance.now() < end) {
      const who = `c${id}.${round++}`;
      const p = pick(r);
      const behaviour = r();
      let c: LineConn;
      try {
        c = await LineConn.connect(o.port, hostname);
      } catch (err) {
        problems.push(`${who}: connect failed: ${err}`);
        await delay(50);
        continue;
      }
      try {
        const s0 = performance.now();
        await c.send(p.line);
        // Some waiters give up and leave the queue after a moment.
        let leaveTimer: ReturnType<typeof setTimeout> | undefined;
        const leave = !p.v1 && p.wait > 0 && behaviour < 0.1
          ? new Promise<"leave">((resolve) => {
            leaveTimer = setTimeout(() => resolve("leave"), r() * p.wait * 1000);
          })
          : undefined;
        let reply: string | null;
        let queuedAt: number | undefined;
        try {
          for (;;) {
            const next = c.line();
            const got = await within(
              leave ? Promise.race([next, leave]) : next,
              bound(p.wait, p.ttl),
              `${who} (${p.line})`,
            );
            if (got === "leave") {
              count("left the queue");
              c.close();
              await next;
              reply = "left";
              break;
            }
            reply = got;
            if (reply === null || !reply.startsWith("queued,")) break;
            queuedAt ??= performance.now();
            if (!/^queued,position:[1-9]\d*$/.test(reply)) problems.push(`${who}: bad ${reply}`);
          }
        } finally {
          clearTimeout(leaveTimer);
        }
        if (reply === "left") continue;
        if (!expectGrantOrEnd(reply, who, p.v1)) continue;
        const start = performance.now();
        count("granted");
        const token = tokenOf(reply!);
        const modeOf = { shared: p.shared, sentAt: s0, queuedAt };
        // Hold: a few keepalives (renewing the lease), then let go.
        let lastAnswered = s0;
        let lost = false;
        const steps = Math.floor(r() * 3);
        for (let i = 0; i < steps && !lost; i++) {
          await delay(r() * (p.ttl !== undefined ? p.ttl * 300 : 20));
          const sent = performance.now();
          await c.send(".keepalive");
          const a = await within(c.line(), bound(0, p.ttl), `${who} keepalive`);
          if (a === "alive") lastAnswered = sent;
          else if (a === "expired" && p.ttl !== undefined) lost = true;
          else problems.push(`${who}: keepalive got ${JSON.stringify(a)}`);
        }
        const leaseEnd = p.ttl === undefined ? Infinity : lastAnswered + p.ttl * 1000;
        if (lost) {
          count("expired");
          checker.add({ name: p.name, start, end: leaseEnd, token, who, ...modeOf });
          continue;
        }
        await delay(r() < 0.1 ? r() * 100 : r() * 10);
        if (p.ttl !== undefined && behaviour > 0.9) {
          // Fall silent until the lease runs out.
          const e = await within(c.line(), bound(0, p.ttl), `${who} expiry`);
          if (e !== "expired") problems.push(`${who}: silent holder got ${JSON.stringify(e)}`);
          count("silent until expired");
          checker.add({ name: p.name, start, end: leaseEnd, token, who, ...modeOf });
        } else if (behaviour > 0.75) {
          const t = performance.now();
          c.close();
          count("closed while holding");
          checker.add({ name: p.name, start, end: Math.min(t, leaseEnd), token, who, ...modeOf });
        } else {
          const t = performance.now();
          await c.send("release");
          const rel = await within(c.line(), bound(0, p.ttl), `${who} release`);
          if (rel === "released") {
            count("released");
            checker.add({ name: p.name, start, end: t, token, who, ...modeOf });
          } else if (rel === "expired" && p.ttl !== undefined) {
            count("expired");
            checker.add({ name: p.name, start, end: Math.min(t, leaseEnd), token, who, ...modeOf });
          } else {
            problems.push(`${who}: release got ${JSON.stringify(rel)}`);
          }
        }
      } catch (err) {
        problems.push(`${who}: ${err instanceof Error ? err.message : err}`);
      } finally {
        c.close();
      }
    }
  };

  const killer = async (id: number) => {
    const r = rng(o.seed * 1000 + 500 + id);
    let round = 0;
    while (performance.now() < end) {
      const who = `k${id}.${round++}`;
      let p = pick(r);
      while (p.wait === 0) p = pick(r);
      await using nc = ProcClient.nc(o.port, hostname);
      try {
        const s0 = performance.now();
        await nc.send(p.line);
        let reply: string | null;
        do {
          reply = await within(nc.line(), bound(p.wait, p.ttl) + 5000, `${who} (${p.line})`);
        } while (reply !== null && reply.startsWith("queued,"));
        if (!expectGrantOrEnd(reply, who, p.v1)) continue;
        const start = performance.now();
        count("granted");
        await delay(r() * 20);
        const t = performance.now();
        await nc.kill("SIGKILL");
        count("killed while holding");
        const leaseEnd = p.ttl === undefined ? Infinity : s0 + p.ttl * 1000;
        checker.add({
          name: p.name,
          start,
          end: Math.min(t, leaseEnd),
          token: tokenOf(reply!),
          who,
          shared: p.shared,
        });
      } catch (err) {
        problems.push(`${who}: ${err instanceof Error ? err.message : err}`);
      }
    }
  };

  let monitoring = true;
  const monitor = (async () => {
    const limits = new Map(o.names.map((n) => [n.name, n.limit]));
    const modes = new Set(o.names.filter((n) => n.modes).map((n) => n.name));
    while (monitoring) {
      try {
        const locks = await query<
          { name: string; limit: number; holders: { mode?: string }[] }[]
        >(
          o.port,
          ".locks",
          hostname,
        );
        for (const l of locks) {
          maxSeen[l.name] = Math.max(maxSeen[l.name] ?? 0, l.holders.length);
          const tooMany = modes.has(l.name)
            ? l.holders.length > 1 && l.holders.some((h) => h.mode !== "shared")
            : l.holders.length > (limits.get(l.name) ?? 1);
          if (tooMany || l.limit !== limits.get(l.name)) {
            problems.push(`.locks shows ${JSON.stringify(l)}`);
          }
        }
      } catch (err) {
        problems.push(`.locks: ${err instanceof Error ? err.message : err}`);
      }
      await delay(50);
    }
  })();

  await Promise.all([
    ...Array.from({ length: o.clients }, (_, i) => client(i)),
    ...Array.from({ length: o.killers }, (_, i) => killer(i)),
  ]);
  monitoring = false;
  await monitor;
  return { checker, counts, problems, maxSeen };
}

// --- Floods: each returns what it saw and throws when the server misbehaved

/** Samples a process's RSS every `everyMs` until stopped; keeps the largest. */
export class RssSampler {
  readonly start: number;
  peak: number;
  #timer: ReturnType<typeof setInterval>;

  constructor(readonly pid: number, everyMs = 50) {
    this.start = this.peak = rssKb(pid);
    this.#timer = setInterval(() => {
      try {
        this.peak = Math.max(this.peak, rssKb(pid));
      } catch {
        // the process is gone
      }
    }, everyMs);
  }

  /** Stops sampling; returns start, peak and now, in kB. */
  stop(): { start: number; peak: number; end: number } {
    clearInterval(this.#timer);
    const end = rssKb(this.pid);
    this.peak = Math.max(this.peak, end);
    return { start: this.start, peak: this.peak, end };
  }
}

/** Stats fields the floods look at. */
interface FloodStats {
  connections: number;
  waiting: number;
  lock_count: number;
}

/** Resolves once `.stats` satisfies `ok` (polled), or throws after `timeoutMs`. */
export async function statsUntil(
  port: number,
  ok: (s: FloodStats) => boolean,
  what: string,
  timeoutMs: number,
): Promise<FloodStats> {
  const end = performance.now() + timeoutMs;
  for (;;) {
    const s = await query<FloodStats>(port, ".stats");
    if (ok(s)) return s;
    if (performance.now() > end) {
      throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    }
    await delay(50);
  }
}

/** Opens `n` connections, `batch` at a time. */
export async function openMany(port: number, n: number, batch = 250): Promise<Deno.Conn[]> {
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < n; i += batch) {
      const k = Math.min(batch, n - i);
      conns.push(
        ...await Promise.all(
          Array.from({ length: k }, () => Deno.connect({ hostname: "127.0.0.1", port })),
        ),
      );
    }
  } catch (err) {
    for (const c of conns) c.close();
    throw err;
  }
  return conns;
}

/** Reads from `conn` until the end of the stream (or a reset); returns the bytes read. */
export async function readToEnd(conn: Deno.Conn, limit = 1 << 16): Promise<string> {
  const buf = new Uint8Array(4096);
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      if (total < limit) chunks.push(buf.slice(0, n));
      total += n;
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.ConnectionReset || err instanceof Deno.errors.BadResource)) {
      throw err;
    }
  }
  const all = new Uint8Array(chunks.reduce((a, c) => a + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

/**
 * Fills a server to `--max-connections` (`max`) with lock holders, then opens `extra` more, `batch`
 * at a time: every one must get exactly `err,too many connections` and the end. Then closes the
 * fillers. The holder of `held` (already connected, counted in `max`) is not one of them.
 */
export async function floodMaxConnections(
  port: number,
  max: number,
  extra: number,
  batch = 100,
): Promise<{ refused: number }> {
  const fillers: LineConn[] = [];
  try {
    // max - 1 more sessions (the holder is one); a filler refused because a query's session was
    // still closing tries again.
    for (let i = 0; fillers.length < max - 1; i++) {
      const c = await LineConn.connect(port);
      await c.send(`lock,name:filler-${i}`);
      const r = await within(c.line(), 5000, "a filler's grant");
      if (r === "ok") fillers.push(c);
      else if (r === "err,too many connections") {
        c.close();
        await delay(20);
      } else throw new Error(`a filler got ${JSON.stringify(r)}`);
      if (i > max * 4) throw new Error("could not fill the server");
    }
    let refused = 0;
    for (let i = 0; i < extra; i += batch) {
      const k = Math.min(batch, extra - i);
      const conns = await openMany(port, k, k);
      const replies = await within(
        Promise.all(conns.map((c) => readToEnd(c).finally(() => c.close()))),
        5000,
        "the refusals",
      );
      for (const r of replies) {
        if (r !== "err,too many connections\n") {
          throw new Error(`a connection over the limit got ${JSON.stringify(r)}`);
        }
        refused++;
      }
    }
    return { refused };
  } finally {
    for (const c of fillers) c.close();
  }
}

/**
 * Opens `n` connections that never send a line and waits until the server has closed them all
 * (its first-line timeout), i.e. `.stats` shows `baseline` connections (plus the query's own).
 */
export async function floodIdle(
  port: number,
  n: number,
  baseline: number,
  firstLineTimeoutS: number,
): Promise<{ openedMs: number; freedMs: number }> {
  const t0 = performance.now();
  const conns = await openMany(port, n);
  const openedMs = performance.now() - t0;
  try {
    await statsUntil(
      port,
      (s) => s.connections <= baseline + 1,
      "the idle connections to be closed",
      firstLineTimeoutS * 1000 + 15_000,
    );
    const freedMs = performance.now() - t0;
    // Each one was closed by the server, without a reply.
    const got = await within(Promise.all(conns.map((c) => readToEnd(c))), 10_000, "the ends");
    const bad = got.filter((g) => g !== "");
    if (bad.length > 0) throw new Error(`idle connections were sent ${JSON.stringify(bad[0])}`);
    return { openedMs, freedMs };
  } finally {
    for (const c of conns) c.close();
  }
}

/**
 * Queues `n` waiters on `name` (held by someone else). With `closeFront`, they ask to wait 600 s
 * and are then closed in queue order (a disconnect storm at the head of the queue); otherwise
 * they ask to wait `waitS` and time out, front first. Checks positions 1..n, that each waiter sees
 * strictly decreasing positions then `timeout`, and that the queue empties.
 */
export async function floodWaiters(
  port: number,
  name: string,
  n: number,
  options: { waitS: number; closeFront?: boolean },
): Promise<{ queuedMs: number; drainedMs: number; linesPerWaiter: number }> {
  const wait = options.closeFront ? 600 : options.waitS;
  const t0 = performance.now();
  const waiters: { c: LineConn; position: number }[] = [];
  try {
    for (let i = 0; i < n; i += 250) {
      const k = Math.min(250, n - i);
      waiters.push(
        ...await Promise.all(Array.from({ length: k }, async () => {
          const c = await LineConn.connect(port);
          try {
            await c.send(`lock,name:${name},wait:${wait}`);
            const r = await within(c.line(), 5000, "a waiter's first reply");
            const m = /^queued,position:(\d+)$/.exec(r ?? "");
            if (!m) throw new Error(`a waiter got ${JSON.stringify(r)}`);
            return { c, position: Number(m[1]) };
          } catch (err) {
            c.close();
            throw err;
          }
        })),
      );
    }
    const queuedMs = performance.now() - t0;
    const positions = waiters.map((w) => w.position).sort((a, b) => a - b);
    if (positions.some((p, i) => p !== i + 1)) {
      throw new Error(`positions are not 1..${n}: ${positions.slice(0, 10)}...`);
    }
    waiters.sort((a, b) => a.position - b.position);
    const t1 = performance.now();
    if (options.closeFront) { for (const w of waiters) w.c.close(); }
    await statsUntil(port, (s) => s.waiting === 0, "the queue to empty", wait * 1000 + 20_000);
    const drainedMs = performance.now() - t1;
    let lines = 0;
    if (!options.closeFront) {
      await within(
        Promise.all(waiters.map(async (w) => {
          let last = w.position;
          for (;;) {
            const l = await w.c.line();
            lines++;
            const m = /^queued,position:(\d+)$/.exec(l ?? "");
            if (m && Number(m[1]) < last) {
              last = Number(m[1]);
              continue;
            }
            if (l !== "timeout") throw new Error(`waiter ${w.position} got ${JSON.stringify(l)}`);
            if ((await w.c.line()) !== null) throw new Error("more after timeout");
            return;
          }
        })),
        20_000,
        "the waiters' last lines",
      );
    }
    return { queuedMs, drainedMs, linesPerWaiter: lines / n };
  } finally {
    for (const w of waiters) w.c.close();
  }
}

/**
 * Sends up to `bytes` bytes without a newline (as a first line, or after `lock,name:NAME` when
 * `holding`) while reading: the server must answer `bad-request` (or just close) and stop
 * reading. Returns what was read and how much could be written.
 */
export async function floodNoNewline(
  port: number,
  bytes: number,
  holding?: string,
): Promise<{ reply: string; written: number }> {
  const c = await LineConn.connect(port);
  try {
    let reply = "";
    if (holding !== undefined) {
      await c.send(`lock,name:${holding}`);
      reply = (await within(c.line(), 5000, "the grant")) + "\n";
    }
    const reading = (async () => {
      const lines: string[] = [];
      for (;;) {
        const l = await c.line();
        if (l === null) return lines;
        lines.push(l);
      }
    })();
    const chunk = new Uint8Array(64 * 1024).fill(0x61);
    let written = 0;
    const writing = (async () => {
      try {
        while (written < bytes) {
          written += await c.conn.write(chunk.subarray(0, Math.min(chunk.length, bytes - written)));
        }
      } catch {
        // reset or broken pipe: the server closed, as it should
      }
    })();
    const lines = await within(reading, 20_000, "the server's answer to an endless line");
    // The server has closed; a write still blocked ends when the socket is closed.
    c.close();
    await writing;
    return { reply: reply + lines.map((l) => l + "\n").join(""), written };
  } finally {
    c.close();
  }
}

/**
 * A holder of `name` that sends `.keepalive` lines without ever reading the replies, until its
 * writes stall (no progress for `stallMs`) or `maxBytes` went out. Returns how much was written
 * and the connection (still open, stalled) for the caller to check and close.
 */
export async function floodSlowReader(
  port: number,
  name: string,
  maxBytes = 256 << 20,
  stallMs = 1000,
): Promise<{ conn: LineConn; written: number; stalled: boolean; writing: Promise<void> }> {
  const c = await LineConn.connect(port);
  await c.send(`lock,name:${name}`);
  const granted = await within(c.line(), 5000, "the slow reader's grant");
  if (granted !== "ok") {
    c.close();
    throw new Error(`the slow reader got ${granted}`);
  }
  const chunk = encoder.encode(".keepalive\n".repeat(1000));
  let written = 0;
  let progress = performance.now();
  let failed = false;
  const writing = (async () => {
    try {
      while (written < maxBytes) {
        let done = 0;
        while (done < chunk.length) done += await c.conn.write(chunk.subarray(done));
        written += chunk.length;
        progress = performance.now();
      }
    } catch {
      failed = true;
    }
  })();
  while (!failed && written < maxBytes && performance.now() - progress < stallMs) {
    await delay(50);
  }
  return { conn: c, written, stalled: !failed && written < maxBytes, writing };
}

// --- A server in a Worker, for its live heap

/** A lock server in a Worker thread: `heap()` collects garbage there and reports what is live. */
export class HeapServer implements AsyncDisposable {
  readonly #worker: Worker;
  port = 0;

  private constructor() {
    this.#worker = new Worker(new URL("./fault_heap_worker.ts", import.meta.url).href, {
      type: "module",
    });
  }

  #ask<T>(message: unknown): Promise<T> {
    return new Promise((resolve, reject) => {
      this.#worker.onmessage = (e) => resolve(e.data as T);
      this.#worker.onerror = (e) => {
        e.preventDefault();
        reject(new Error(`heap worker: ${e.message}`));
      };
      this.#worker.postMessage(message);
    });
  }

  /** Starts a server with `options` in a new worker. */
  static async start(options: Record<string, unknown> = {}): Promise<HeapServer> {
    const s = new HeapServer();
    try {
      s.port = (await s.#ask<{ port: number }>({ cmd: "start", options })).port;
    } catch (err) {
      s.#worker.terminate();
      throw err;
    }
    return s;
  }

  /** The server's live heap after garbage collection, in bytes. */
  heap(): Promise<{ heapUsed: number; external: number; connections: number }> {
    return this.#ask({ cmd: "heap" });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.#ask({ cmd: "stop" });
    } finally {
      this.#worker.terminate();
    }
  }
}

/** Whether `command` is on the PATH. */
export async function haveCommand(command: string): Promise<boolean> {
  const r = await run(["sh", "-c", `command -v ${command}`], { check: false }).catch(() => null);
  return r?.code === 0;
}
