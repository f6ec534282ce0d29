/**
 * A small HTTP/1.1 client over `Deno.connect` / `Deno.connectTls`: just what the etcd client
 * needs to talk to etcd's JSON gateway (POST with a JSON body; a response with a length, chunked,
 * or ended by the close; one long chunked response for a watch).
 *
 * Why not `fetch()`: per call it builds a `Request`, a `Headers` object, a body stream and a
 * response stream, and hands the work to another thread and back. Under the etcd benchmark that
 * was most of the server's etcd-side CPU, about as much per lock as the lock's whole client
 * connection. Here a call is one write and (nearly always) one read on a kept-alive connection.
 *
 * - Connections are kept per origin while idle and reused, most recent first; a response marked
 *   `connection: close` (or ended by the close) is not reused, nor is a connection idle for longer
 *   than {@linkcode IDLE_MS} (a firewall or proxy on the way may have forgotten it without a word,
 *   and a request on it would only fail at its deadline).
 * - The deadline closes the connection (an HTTP/1.1 request cannot be withdrawn otherwise); so does
 *   closing the client.
 * - A kept connection that turns out closed before a byte of the answer came is replaced once by a
 *   new one, and the other idle ones are closed too (the peer closed them while idle, or
 *   restarted).
 *
 * @example
 * ```ts ignore
 * const http = new Http1Client();
 * const origin = "http://127.0.0.1:2379";
 * const res = await http.post(origin, "/v3/kv/range", {}, '{"key":"Zm9v"}', 2000);
 * console.log(res.status, res.body);
 * http.close();
 * ```
 *
 * @module
 */

/** How long (ms) a connection may sit idle and still be reused: a middlebox may drop it. */
export const IDLE_MS = 30_000;

/** TLS settings for `https://` origins. */
export interface Http1TlsOptions {
  /** PEM CA certificates to trust. */
  caCerts?: string[];
  /** PEM client certificate (with `key`). */
  cert?: string;
  /** PEM private key of `cert`. */
  key?: string;
}

/** A complete response. */
export interface Http1Response {
  status: number;
  body: string;
}

/** The connection failed, closed early, timed out, or the answer was not HTTP/1.1. */
export class Http1Error extends Error {
  /** The deadline passed. */
  readonly timedOut: boolean;
  constructor(message: string, timedOut = false, options?: ErrorOptions) {
    super(message, options);
    this.name = "Http1Error";
    this.timedOut = timedOut;
  }
}

/** The peer closed the connection before anything of the answer came. */
class ClosedEarly extends Error {}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

interface Origin {
  hostname: string;
  port: number;
  tls: boolean;
  /** `Host:` header value. */
  host: string;
}

/** A connection and its read buffer. */
class Link {
  readonly conn: Deno.Conn;
  buf = new Uint8Array(16 * 1024);
  start = 0;
  end = 0;
  closed = false;
  /** Bytes read on this connection so far. */
  received = 0;
  /** When it was last put back idle (`performance.now()`). */
  idleSince = 0;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }

  /** Reads more bytes into the buffer; false at the end of the stream. */
  async fill(): Promise<boolean> {
    if (this.start === this.end) {
      this.start = this.end = 0;
    } else if (this.end === this.buf.length) {
      if (this.start > 0) {
        this.buf.copyWithin(0, this.start, this.end);
        this.end -= this.start;
        this.start = 0;
      } else {
        const bigger = new Uint8Array(this.buf.length * 2);
        bigger.set(this.buf);
        this.buf = bigger;
      }
    }
    const n = await this.conn.read(this.buf.subarray(this.end));
    if (n === null) return false;
    this.end += n;
    this.received += n;
    return true;
  }

  /** The next line (without its CRLF), as Latin-1. */
  async line(): Promise<string> {
    for (;;) {
      for (let i = this.start; i + 1 < this.end; i++) {
        if (this.buf[i] === 13 && this.buf[i + 1] === 10) {
          const text = latin1(this.buf, this.start, i);
          this.start = i + 2;
          return text;
        }
      }
      if (this.end - this.start > 64 * 1024) throw new Http1Error("HTTP header line too long");
      if (!(await this.fill())) {
        throw new Http1Error("connection closed in the middle of an answer");
      }
    }
  }

  /** Exactly `n` bytes. */
  async bytes(n: number): Promise<Uint8Array> {
    while (this.end - this.start < n) {
      if (!(await this.fill())) throw new Http1Error("connection closed in the middle of a body");
    }
    const out = this.buf.slice(this.start, this.start + n);
    this.start += n;
    return out;
  }

  /** Up to `max` bytes, at least one (reading when the buffer is empty). */
  async some(max: number): Promise<Uint8Array> {
    if (this.start === this.end && !(await this.fill())) {
      throw new Http1Error("connection closed in the middle of a body");
    }
    const n = Math.min(max, this.end - this.start);
    const out = this.buf.slice(this.start, this.start + n);
    this.start += n;
    return out;
  }

  /** Everything until the peer closes. */
  async rest(): Promise<Uint8Array> {
    while (await this.fill()) {
      // keep reading
    }
    const out = this.buf.slice(this.start, this.end);
    this.start = this.end;
    return out;
  }
}

function latin1(buf: Uint8Array, from: number, to: number): string {
  let s = "";
  for (let i = from; i < to; i++) s += String.fromCharCode(buf[i]);
  return s;
}

/** The head of a response. */
interface Head {
  status: number;
  /** -1: none given. */
  length: number;
  chunked: boolean;
  close: boolean;
}

async function readHead(link: Link): Promise<Head> {
  if (link.start === link.end && !(await link.fill())) throw new ClosedEarly();
  const status = /^HTTP\/1\.([01]) (\d{3})/.exec(await link.line());
  if (status === null) throw new Http1Error("not an HTTP/1.1 answer");
  const head: Head = {
    status: Number(status[2]),
    length: -1,
    chunked: false,
    close: status[1] === "0",
  };
  for (let n = 0;; n++) {
    if (n > 200) throw new Http1Error("too many HTTP headers");
    const line = await link.line();
    if (line === "") break;
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim().toLowerCase();
    if (name === "content-length") {
      if (!/^\d{1,15}$/.test(value)) throw new Http1Error("bad content-length");
      head.length = Number(value);
    } else if (name === "transfer-encoding") {
      head.chunked = value.split(",").map((v) => v.trim()).includes("chunked");
    } else if (name === "connection") {
      head.close = value.split(",").map((v) => v.trim()).includes("close");
    }
  }
  return head;
}

/** Reads the size line of the next chunk (0: the last), and skips the trailers after the last. */
async function chunkSize(link: Link): Promise<number> {
  const line = await link.line();
  const m = /^([0-9a-fA-F]{1,12})(;.*)?$/.exec(line.trim());
  if (m === null) throw new Http1Error("bad chunk size");
  const size = parseInt(m[1], 16);
  if (size === 0) {
    while ((await link.line()) !== "") {
      // trailer fields: not used
    }
  }
  return size;
}

async function crlf(link: Link): Promise<void> {
  if ((await link.line()) !== "") throw new Http1Error("chunk not followed by CRLF");
}

/**
 * The HTTP/1.1 client (see the module doc).
 *
 * @example
 * ```ts ignore
 * const http = new Http1Client();
 * const origin = "http://127.0.0.1:2379";
 * const { status, body } = await http.post(origin, "/v3/kv/range", {}, "{}", 2000);
 * http.close();
 * ```
 */
export class Http1Client {
  readonly #tls: Http1TlsOptions;
  readonly #idleMs: number;
  readonly #origins = new Map<string, Origin>();
  readonly #idle = new Map<string, Link[]>();
  /** Every connection open now (closed on close()). */
  readonly #open = new Set<Link>();
  #closed = false;

  /** @param idleMs how long an idle connection may be reused (default {@linkcode IDLE_MS}) */
  constructor(tls: Http1TlsOptions = {}, idleMs = IDLE_MS) {
    this.#tls = tls;
    this.#idleMs = idleMs;
  }

  /** How many connections are open (idle or in use). */
  get openConnections(): number {
    return this.#open.size;
  }

  /**
   * POSTs `body` (JSON) to `origin` + `path` and reads the whole answer, within `timeoutMs`.
   * Throws {@linkcode Http1Error} when no complete answer came.
   */
  async post(
    origin: string,
    path: string,
    headers: Record<string, string>,
    body: string,
    timeoutMs: number,
  ): Promise<Http1Response> {
    const o = this.#origin(origin);
    const request = this.#request(o, path, headers, body);
    const deadline = new Deadline(timeoutMs);
    try {
      for (let attempt = 0;; attempt++) {
        const kept = this.#take(origin);
        const link = kept ?? await this.#connect(o, deadline);
        deadline.link = link;
        if (deadline.passed || this.#closed) {
          this.#drop(link);
          throw new Http1Error(this.#closed ? "client closed" : "timed out", deadline.passed);
        }
        const before = link.received;
        try {
          await writeAll(link.conn, request);
          const head = await readHead(link);
          const bytes = head.chunked
            ? await readChunked(link)
            : head.length >= 0
            ? await link.bytes(head.length)
            : await link.rest();
          const reusable = !head.close && (head.chunked || head.length >= 0) &&
            link.start === link.end && !this.#closed;
          if (reusable) this.#keep(origin, link);
          else this.#drop(link);
          return { status: head.status, body: decoder.decode(bytes) };
        } catch (err) {
          this.#drop(link);
          // A kept connection the peer had closed while idle (nothing of an answer came): the
          // peer may have restarted, so every idle one goes, and the call goes once more on a
          // new connection.
          if (
            kept !== undefined && attempt === 0 && link.received === before && !deadline.passed &&
            !this.#closed
          ) {
            for (const old of this.#idle.get(origin)?.splice(0) ?? []) this.#drop(old);
            continue;
          }
          throw this.#wrap(err, deadline.passed);
        }
      }
    } finally {
      deadline.clear();
    }
  }

  /**
   * POSTs `body` and, when the answer is 200, passes each piece of its body to `onData` as it
   * comes (a watch), until the body ends, `signal` aborts or `onData` returns false. The answer
   * must begin within `timeoutMs`. A status other than 200 resolves with that status and the
   * whole body instead. The connection is never reused.
   */
  async stream(
    origin: string,
    path: string,
    headers: Record<string, string>,
    body: string,
    timeoutMs: number,
    signal: AbortSignal,
    onData: (text: string) => boolean | void,
  ): Promise<Http1Response | undefined> {
    const o = this.#origin(origin);
    const request = this.#request(o, path, headers, body);
    const deadline = new Deadline(timeoutMs);
    let link: Link | undefined;
    const stop = () => link?.close();
    signal.addEventListener("abort", stop);
    try {
      link = await this.#connect(o, deadline);
      deadline.link = link;
      if (signal.aborted || deadline.passed || this.#closed) return undefined;
      await writeAll(link.conn, request);
      const head = await readHead(link);
      deadline.clear();
      if (head.status !== 200 || !head.chunked) {
        const bytes = head.chunked
          ? await readChunked(link)
          : head.length >= 0
          ? await link.bytes(head.length)
          : await link.rest();
        return { status: head.status, body: decoder.decode(bytes) };
      }
      const text = new TextDecoder();
      for (;;) {
        const size = await chunkSize(link);
        if (size === 0) return undefined;
        let left = size;
        while (left > 0) {
          const piece = await link.some(left);
          left -= piece.length;
          let more: boolean | void;
          try {
            more = onData(text.decode(piece, { stream: true }));
          } catch (err) {
            // Not the connection's failure: the caller's own, as it threw it.
            throw { caller: err };
          }
          if (more === false || signal.aborted) return undefined;
        }
        await crlf(link);
      }
    } catch (err) {
      if (typeof err === "object" && err !== null && "caller" in err) throw err.caller;
      if (signal.aborted || this.#closed) return undefined;
      throw this.#wrap(err, deadline.passed);
    } finally {
      deadline.clear();
      signal.removeEventListener("abort", stop);
      if (link !== undefined) this.#drop(link);
    }
  }

  /** Closes every connection; calls in flight fail. */
  close(): void {
    this.#closed = true;
    for (const link of this.#open) link.close();
    this.#open.clear();
    this.#idle.clear();
  }

  #origin(origin: string): Origin {
    let o = this.#origins.get(origin);
    if (o === undefined) {
      const url = new URL(origin);
      const tls = url.protocol === "https:";
      o = {
        hostname: url.hostname.replace(/^\[(.*)\]$/, "$1"),
        port: url.port === "" ? (tls ? 443 : 80) : Number(url.port),
        tls,
        host: url.host,
      };
      this.#origins.set(origin, o);
    }
    return o;
  }

  #request(o: Origin, path: string, headers: Record<string, string>, body: string): Uint8Array {
    const payload = encoder.encode(body);
    let head = `POST ${path} HTTP/1.1\r\nhost: ${o.host}\r\ncontent-type: application/json\r\n` +
      `content-length: ${payload.length}\r\n`;
    for (const name in headers) {
      const value = headers[name];
      if (/[\r\n]/.test(name) || /[\r\n]/.test(value)) throw new Http1Error("bad header");
      head += `${name}: ${value}\r\n`;
    }
    head += "\r\n";
    const headBytes = encoder.encode(head);
    const out = new Uint8Array(headBytes.length + payload.length);
    out.set(headBytes);
    out.set(payload, headBytes.length);
    return out;
  }

  /** A new connection, within the deadline (a connect that comes later is closed). */
  async #connect(o: Origin, deadline: Deadline): Promise<Link> {
    if (this.#closed) throw new Http1Error("client closed");
    const connecting = o.tls
      ? Deno.connectTls({
        hostname: o.hostname,
        port: o.port,
        caCerts: this.#tls.caCerts,
        ...(this.#tls.cert !== undefined && this.#tls.key !== undefined
          ? { cert: this.#tls.cert, key: this.#tls.key }
          : {}),
      })
      : Deno.connect({ hostname: o.hostname, port: o.port });
    let conn: Deno.Conn;
    try {
      conn = await Promise.race([connecting, deadline.expired]);
    } catch (err) {
      connecting.then((late) => late.close(), () => {});
      throw this.#wrap(err, deadline.passed);
    }
    if (!o.tls) (conn as Deno.TcpConn).setNoDelay(true);
    const link = new Link(conn);
    this.#open.add(link);
    if (this.#closed) {
      this.#drop(link);
      throw new Http1Error("client closed");
    }
    return link;
  }

  #take(origin: string): Link | undefined {
    const idle = this.#idle.get(origin);
    if (idle === undefined || idle.length === 0) return undefined;
    const link = idle.pop()!;
    const now = performance.now();
    if (now - link.idleSince <= this.#idleMs) return link;
    // The most recent was idle too long: so were all the others.
    this.#drop(link);
    for (const old of idle.splice(0)) this.#drop(old);
    return undefined;
  }

  #keep(origin: string, link: Link): void {
    let idle = this.#idle.get(origin);
    if (idle === undefined) this.#idle.set(origin, idle = []);
    link.idleSince = performance.now();
    idle.push(link);
  }

  #drop(link: Link): void {
    link.close();
    this.#open.delete(link);
  }

  #wrap(err: unknown, timedOut: boolean): Http1Error {
    if (timedOut) return new Http1Error("timed out", true, { cause: err });
    if (err instanceof Http1Error) return err;
    if (err instanceof ClosedEarly) return new Http1Error("connection closed before an answer");
    const message = err instanceof Error ? err.message.split("\n")[0] : String(err);
    return new Http1Error(message, false, { cause: err });
  }
}

/** A call's deadline: when it passes, the call's connection is closed (or its connect given up). */
class Deadline {
  passed = false;
  /** The connection the call is on (closed when the deadline passes). */
  link: Link | undefined;
  #reject: ((err: unknown) => void) | undefined;
  #expired: Promise<never> | undefined;
  #timer: ReturnType<typeof setTimeout>;

  constructor(ms: number) {
    this.#timer = setTimeout(() => {
      this.passed = true;
      this.link?.close();
      this.#reject?.(new Http1Error("timed out", true));
    }, ms);
  }

  /** Rejects when the deadline passes (made only when a call waits for a connect). */
  get expired(): Promise<never> {
    if (this.#expired === undefined) {
      this.#expired = this.passed
        ? Promise.reject(new Http1Error("timed out", true))
        : new Promise<never>((_, reject) => this.#reject = reject);
    }
    return this.#expired;
  }

  clear(): void {
    clearTimeout(this.#timer);
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

async function readChunked(link: Link): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const size = await chunkSize(link);
    if (size === 0) break;
    const part = await link.bytes(size);
    parts.push(part);
    total += size;
    await crlf(link);
  }
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}
