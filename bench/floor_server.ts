#!/usr/bin/env -S deno run --allow-net
/**
 * The floor server: the cheapest Deno TCP server that answers the tcpnetlock protocol well enough
 * for the benchmark, with no bookkeeping at all (no lock table, no queue, no timers, no logging).
 * It is what the real server is compared with: whatever the real server costs beyond this is the
 * price of its bookkeeping.
 *
 * - `lock,...` → `ok` (or `ok,token:1` when the request has `wait:`), then `release` → `released`
 *   and close; `.keepalive` → `alive`; any other line → `bad-action`. It never says `not-granted`:
 *   every lock is granted at once, so it is no lock at all.
 * - `.ping` → `pong`, close. Anything else → `bad-action`, close.
 * - The **session floor**: `session` → `session,version:3,max-ids:10000`, then, multiplexed by
 *   id, `lock,id:X,...` → `ok,token:1,id:X`, `release,id:X` → `released,id:X`, `cancel,id:X` →
 *   `cancelled,id:X`, `.keepalive` → `alive`, `.ping` → `pong`, anything else → `bad-action`.
 *   No ids are tracked, every lock is granted; the replies to the lines of one read go out in
 *   one write (the cheapest a session server can be).
 *
 * ```sh
 * deno run -A bench/floor_server.ts --port 0   # prints "listening on 127.0.0.1:PORT" on stderr
 * ```
 *
 * It also accepts (and ignores) `--info` and the `--max-*` limits of `server.ts`, so that it can
 * stand in for the real server: `deno task bench --server bench/floor_server.ts`.
 *
 * @module
 */

import { encodeLine } from "../lib/lines.ts";

const pool: Uint8Array[] = [];
const encoder = new TextEncoder();
const OK = encoder.encode("ok\n");
const OK_TOKEN = encoder.encode("ok,token:1\n");
const RELEASED = encoder.encode("released\n");
const ALIVE = encoder.encode("alive\n");
const PONG = encoder.encode("pong\n");
const BAD_ACTION = encoder.encode("bad-action\n");
const BAD_REQUEST = encoder.encode("bad-request\n");
const MAX_LINE = 1024;
const NL = 0x0a;
const decoder = new TextDecoder();
const TOO_LONG = Symbol("too long");

/** A connection and the bytes read from it but not yet consumed. */
class Session {
  readonly conn: Deno.Conn;
  // From the pool (as the real server's line buffers: a new ArrayBuffer costs Deno microseconds).
  buf: Uint8Array = pool.pop() ?? new Uint8Array(128);
  start = 0;
  end = 0;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  /**
   * The next line without `\n` and `\r`; `null` at the end of the stream, `TOO_LONG` for a line
   * over the limit, which is answered with `bad-request` at once and then read and dropped up to
   * its newline (the same way as the real server: only new bytes are scanned, nothing is kept).
   */
  async line(): Promise<string | null | typeof TOO_LONG> {
    for (;;) {
      const nl = this.buf.subarray(this.start, this.end).indexOf(NL);
      if (nl >= 0) {
        let stop = this.start + nl;
        const next = stop + 1;
        if (stop > this.start && this.buf[stop - 1] === 0x0d) stop--;
        const text = decoder.decode(this.buf.subarray(this.start, stop));
        this.start = next;
        return text;
      }
      if (this.end - this.start > MAX_LINE) {
        // Answered at once, as the real server does, then the rest of the line is dropped.
        await this.write(BAD_REQUEST);
        const drain = new Uint8Array(64 * 1024);
        for (;;) {
          const n = await this.conn.read(drain);
          if (n === null || drain.subarray(0, n).indexOf(NL) >= 0) return TOO_LONG;
        }
      }
      if (this.start > 0) {
        this.buf.copyWithin(0, this.start, this.end);
        this.end -= this.start;
        this.start = 0;
      }
      if (this.end === this.buf.length) {
        const bigger = new Uint8Array(this.buf.length * 2);
        bigger.set(this.buf);
        this.buf = bigger;
      }
      const n = await this.conn.read(this.buf.subarray(this.end));
      if (n === null) return null;
      this.end += n;
    }
  }

  /** The next complete line already read, or `undefined` (nothing is read from the socket). */
  buffered(): string | undefined {
    const nl = this.buf.subarray(this.start, this.end).indexOf(NL);
    if (nl < 0) return undefined;
    let stop = this.start + nl;
    const next = stop + 1;
    if (stop > this.start && this.buf[stop - 1] === 0x0d) stop--;
    const text = decoder.decode(this.buf.subarray(this.start, stop));
    this.start = next;
    return text;
  }

  async write(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.length) done += await this.conn.write(bytes.subarray(done));
  }
}

async function serve(conn: Deno.Conn): Promise<void> {
  const s = new Session(conn);
  try {
    const first = await s.line();
    if (first === null) return;
    if (first === TOO_LONG) return;
    const action = first.split(",", 1)[0].trim();
    if (action === "lock") {
      await s.write(first.includes("wait:") ? OK_TOKEN : OK);
      for (;;) {
        const line = await s.line();
        if (line === null) return;
        if (line === TOO_LONG) return;
        const what = line.trim();
        if (what === "release") {
          await s.write(RELEASED);
          return;
        }
        await s.write(what === ".keepalive" ? ALIVE : BAD_ACTION);
      }
    } else if (action === "session") {
      await serveSession(s);
    } else if (action === ".ping") {
      await s.write(PONG);
    } else {
      await s.write(action === "" ? BAD_REQUEST : BAD_ACTION);
    }
  } catch {
    // A reset or a broken pipe: the connection is gone, nothing to answer.
  } finally {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
    // Every read was awaited: the buffer can serve the next connection.
    if (s.buf.length === 128 && pool.length < 1024) pool.push(s.buf);
  }
}

/** The reply to one line of a session (without its newline). */
function sessionReply(line: string): string {
  const comma = line.indexOf(",");
  const action = (comma < 0 ? line : line.slice(0, comma)).trim();
  const at = line.indexOf("id:");
  const id = at < 0 ? "" : line.slice(at + 3).split(",", 1)[0].trim();
  switch (action) {
    case "lock":
      return `ok,token:1,id:${id}`;
    case "release":
      return `released,id:${id}`;
    case "cancel":
      return `cancelled,id:${id}`;
    case ".keepalive":
      return "alive";
    case ".ping":
      return "pong";
    default:
      return "bad-action";
  }
}

/** A session: the replies to the lines that arrived together go out in one write. */
async function serveSession(s: Session): Promise<void> {
  await s.write(encoder.encode("session,version:3,max-ids:10000\n"));
  for (;;) {
    const line = await s.line();
    if (line === null || line === TOO_LONG) return;
    let out = sessionReply(line);
    for (let more = s.buffered(); more !== undefined; more = s.buffered()) {
      out += "\n" + sessionReply(more);
    }
    await s.write(encodeLine(out));
  }
}

// Flags of server.ts that the floor accepts and ignores, so it can stand in for it.
const IGNORED_WITH_VALUE = [
  "--max-connections",
  "--max-locks",
  "--max-waiters",
  "--max-session-locks",
];

/** Runs the floor server until the process is killed. */
export async function main(args: string[]): Promise<void> {
  let port = 7654;
  let hostname = "127.0.0.1";
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--port") port = Number(args[++i]);
    else if (arg === "--listen" || arg === "--host") hostname = args[++i];
    else if (IGNORED_WITH_VALUE.includes(arg)) i++;
    else if (arg === "--info") continue;
    else if (arg === "--help" || arg === "-h") {
      console.log("Usage: deno run -A bench/floor_server.ts [--listen HOST] [--port PORT]");
      return;
    } else {
      console.error(`Unknown flag "${arg}"`);
      Deno.exit(2);
    }
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`Invalid port "${port}"`);
    Deno.exit(2);
  }
  // SIGTERM ends the process normally (so that --cpu-prof writes its profile, as ours does).
  Deno.addSignalListener("SIGTERM", () => Deno.exit(0));
  const listener = Deno.listen({ hostname, port });
  const addr = listener.addr as Deno.NetAddr;
  console.error(`listening on ${addr.hostname}:${addr.port}`);
  for await (const conn of listener) serve(conn);
}

if (import.meta.main) await main(Deno.args);
