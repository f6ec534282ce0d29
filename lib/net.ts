/**
 * Sockets shared by the lock port and the HTTP port: a byte stream both a plain TCP connection
 * and a TLS one fit ({@linkcode StreamConn}), an accept loop that survives running out of file
 * descriptors ({@linkcode acceptLoop}), and a TLS handshake done by the server itself over an
 * accepted TCP socket ({@linkcode TlsUpgrader}), so that the handshake runs under the caller's
 * timeouts and connection limits and a socket that never finishes it is really closed.
 *
 * (`Deno.listenTls` hands out connections whose handshake is lazy; closing one whose peer never
 * sends a byte left its descriptor open until the peer went away.)
 *
 * @module
 */

import { Duplex } from "node:stream";
import tls from "node:tls";

/** The byte stream a session or an HTTP connection talks over. */
export interface StreamConn {
  /** Reads into `p`; the byte count, or null at the end of the stream. */
  read(p: Uint8Array): Promise<number | null>;
  /** Writes some of `p`; resolves to how much. */
  write(p: Uint8Array): Promise<number>;
  /** Sends the end of the stream (half-close). */
  closeWrite(): Promise<void>;
  /** Closes at once; again is a no-op. */
  close(): void;
  /** The peer's address. */
  readonly remoteAddr: Deno.Addr;
}

/**
 * Whether a connection's writes are moving, as the server's watchdog sees them: no clock is
 * read per write (a `performance.now()` is an op call, and a connection writes twice per lock).
 * A write counts as stalled from the first watchdog tick that finds it in progress, so a stall
 * is reported at most one tick late and never early. {@linkcode WriteStall.inFlight} counts the
 * writes in progress over every connection: with none (and no first line awaited), the watchdog
 * has nothing to look at.
 *
 * @example
 * ```ts
 * import { WriteStall } from "./net.ts";
 * const stall = new WriteStall();
 * stall.begin();
 * stall.stalledFor(1000); // 0: first seen now
 * stall.stalledFor(3500); // 2500
 * stall.end();
 * ```
 */
export class WriteStall {
  static #inFlight = 0;
  #writes = 0;
  #active = false;
  #seen = -1;
  #since = 0;

  /** Writes in progress now, over every connection of the process. */
  static get inFlight(): number {
    return WriteStall.#inFlight;
  }

  /** A write starts (each partial write counts as a new one: the bytes moved). */
  begin(): void {
    this.#writes++;
    if (this.#active) return;
    this.#active = true;
    WriteStall.#inFlight++;
  }

  /** No write in progress (also when the connection closes with one in progress). */
  end(): void {
    if (!this.#active) return;
    this.#active = false;
    WriteStall.#inFlight--;
  }

  /** How long (ms) the write in progress has waited at least, by the ticks seen; 0: none. */
  stalledFor(now: number): number {
    if (!this.#active) return 0;
    if (this.#seen !== this.#writes) {
      this.#seen = this.#writes;
      this.#since = now;
      return 0;
    }
    return now - this.#since;
  }
}

/** What {@linkcode acceptLoop} logs through. */
export type WarnFn = (message: string, props: Record<string, unknown>) => void;

const FIRST_BACKOFF_MS = 10;
const MAX_BACKOFF_MS = 1000;
const LOG_EVERY_MS = 1000;

/**
 * Accepts connections from `listener` and hands each to `onConn` until the listener is closed.
 * An accept error (out of file descriptors, ...) never ends it: it is logged at most once a
 * second (with how many were not logged) and accepting resumes after a back-off that starts at
 * 10 ms and doubles up to 1 s, back to 10 ms after the next success.
 *
 * `stopped` says when the caller is closing: the loop then ends on the next error.
 *
 * @example
 * ```ts
 * import { acceptLoop } from "./net.ts";
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const done = acceptLoop(listener, (conn) => conn.close(), console.warn, "example");
 * listener.close();
 * await done;
 * ```
 */
export async function acceptLoop(
  listener: Deno.Listener,
  onConn: (conn: Deno.Conn) => void,
  warn: WarnFn,
  what: string,
  stopped: () => boolean = () => false,
): Promise<void> {
  let backoff = FIRST_BACKOFF_MS;
  let lastLog = -Infinity;
  let unlogged = 0;
  for (;;) {
    let conn: Deno.Conn;
    try {
      conn = await listener.accept();
    } catch (err) {
      if (
        stopped() || err instanceof Deno.errors.BadResource ||
        err instanceof Deno.errors.Interrupted
      ) return;
      const now = performance.now();
      if (now - lastLog >= LOG_EVERY_MS) {
        warn("Accept failed on the {port} port: {error} (retrying in {backoff_ms} ms)", {
          event: "accept_failed",
          port: what,
          error: (err instanceof Error ? err.message : String(err)).split("\n")[0],
          backoff_ms: backoff,
          not_logged: unlogged,
        });
        lastLog = now;
        unlogged = 0;
      } else {
        unlogged++;
      }
      await new Promise((resolve) => setTimeout(resolve, backoff));
      if (stopped()) return;
      backoff = Math.min(MAX_BACKOFF_MS, backoff * 2);
      continue;
    }
    backoff = FIRST_BACKOFF_MS;
    try {
      onConn(conn);
    } catch {
      try {
        conn.close();
      } catch {
        // already closed
      }
    }
  }
}

/** A node stream over a Deno connection, for `node:tls` to run its handshake on. */
function duplexOf(conn: Deno.Conn): Duplex {
  const buf = new Uint8Array(16 * 1024);
  let reading = false;
  const d: Duplex = new Duplex({
    read() {
      if (reading) return;
      reading = true;
      conn.read(buf).then((n) => {
        reading = false;
        if (n === null) d.push(null);
        else if (d.push(buf.slice(0, n))) d.read(0);
      }, (err) => d.destroy(err));
    },
    write(chunk: Uint8Array, _enc, cb) {
      (async () => {
        let done = 0;
        while (done < chunk.length) done += await conn.write(chunk.subarray(done));
      })().then(() => cb(), (err) => cb(err));
    },
    final(cb) {
      conn.closeWrite().then(() => cb(), (err) => cb(err));
    },
    destroy(err, cb) {
      try {
        conn.close();
      } catch {
        // already closed
      }
      cb(err);
    },
  });
  return d;
}

/** Bytes a TLS connection buffers from its peer before it stops reading (backpressure). */
const TLS_READ_AHEAD = 64 * 1024;

/** A {@linkcode StreamConn} over a server-side `node:tls` socket. */
class TlsStreamConn implements StreamConn {
  readonly remoteAddr: Deno.Addr;
  #socket: tls.TLSSocket;
  #chunks: Uint8Array[] = [];
  #queued = 0;
  #ended = false;
  #error: Error | undefined;
  #closed = false;
  #secure = false;
  #wake: (() => void) | undefined;

  constructor(socket: tls.TLSSocket, remoteAddr: Deno.Addr) {
    this.#socket = socket;
    this.remoteAddr = remoteAddr;
    socket.on("secure", () => this.#secure = true);
    socket.on("data", (chunk: Uint8Array) => {
      this.#chunks.push(chunk);
      this.#queued += chunk.length;
      if (this.#queued > TLS_READ_AHEAD) socket.pause();
      this.#notify();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("error", (err: Error) => {
      this.#error ??= err;
      this.#notify();
    });
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  async read(p: Uint8Array): Promise<number | null> {
    for (;;) {
      if (this.#closed) throw new Deno.errors.BadResource("the connection is closed");
      const chunk = this.#chunks[0];
      if (chunk !== undefined) {
        const n = Math.min(p.length, chunk.length);
        p.set(chunk.subarray(0, n));
        if (n === chunk.length) this.#chunks.shift();
        else this.#chunks[0] = chunk.subarray(n);
        this.#queued -= n;
        if (this.#queued <= TLS_READ_AHEAD / 2 && this.#socket.isPaused()) this.#socket.resume();
        return n;
      }
      if (this.#error !== undefined) throw new Deno.errors.ConnectionReset(this.#error.message);
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
  }

  write(p: Uint8Array): Promise<number> {
    if (this.#closed || this.#socket.destroyed) {
      return Promise.reject(new Deno.errors.BrokenPipe("the connection is closed"));
    }
    return new Promise((resolve, reject) => {
      this.#socket.write(p.slice(), (err?: Error | null) => {
        if (err) reject(new Deno.errors.BrokenPipe(err.message));
        else resolve(p.length);
      });
    });
  }

  closeWrite(): Promise<void> {
    // Not waiting for the end to be flushed: a peer that does not read would hold it up.
    this.#socket.end();
    return Promise.resolve();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#notify();
    const socket = this.#socket;
    if (!this.#secure || socket.destroyed) {
      // No handshake yet (or a dead socket): nothing to say goodbye to, the descriptor goes now.
      socket.destroy();
      return;
    }
    // After a handshake the peer gets a close_notify (rustls clients insist), then the socket
    // goes; at most a second later if the peer does not take it.
    const timer = setTimeout(() => socket.destroy(), 1000);
    socket.once("close", () => clearTimeout(timer));
    socket.end(() => socket.destroy());
  }
}

/**
 * Runs the server side of TLS over accepted TCP sockets with one certificate.
 *
 * @example
 * ```ts ignore
 * import { TlsUpgrader } from "./net.ts";
 * const tls = new TlsUpgrader({ cert: "-----BEGIN CERTIFICATE-----...", key: "..." });
 * const listener = Deno.listen({ port: 7654 });
 * const conn = tls.upgrade(await listener.accept()); // the handshake runs as it is read
 * ```
 */
export class TlsUpgrader {
  #context: tls.SecureContext;

  /** Throws when the certificate or the key cannot be used. */
  constructor(options: { cert: string; key: string }) {
    this.#context = tls.createSecureContext({ cert: options.cert, key: options.key });
  }

  /**
   * Wraps `conn` in TLS. The handshake runs as the result is read; closing it closes `conn`,
   * handshake finished or not.
   */
  upgrade(conn: Deno.Conn): StreamConn {
    const socket = new tls.TLSSocket(duplexOf(conn) as unknown as import("node:net").Socket, {
      isServer: true,
      secureContext: this.#context,
    });
    return new TlsStreamConn(socket, conn.remoteAddr);
  }
}

/** Sets TCP_NODELAY and keepalive where the socket has them (a TLS stream has neither). */
export function tuneTcp(conn: Deno.Conn | StreamConn): void {
  try {
    const tcp = conn as Deno.TcpConn;
    if (typeof tcp.setNoDelay === "function") {
      tcp.setNoDelay(true);
      // Lets the kernel find peers that vanished without a FIN or RST.
      tcp.setKeepAlive(true);
    }
  } catch {
    // not a TCP socket option this platform has
  }
}
