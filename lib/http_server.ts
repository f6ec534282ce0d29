/**
 * A small, bounded HTTP/1.1 server for the server's HTTP port, in place of `Deno.serve`, whose
 * connections had no limit and no timeout (idle connections plus a liveness probe could take
 * the process down when descriptors ran out).
 *
 * - At most `maxConnections` connections; a connection over the limit is closed at once.
 * - A connection must send a whole request (line, headers, body) within `idleTimeout` seconds of
 *   being accepted or of its previous response; else it is closed. A response that is being
 *   written is not cut by it: a streaming body (a `ReadableStream` that has not ended, e.g.
 *   Server-Sent Events) is sent with chunked transfer encoding, each chunk flushed as it comes,
 *   for as long as it runs; the stream is cancelled (and `req.signal` aborted) when the peer
 *   closes. A write that the peer does not take within `idleTimeout` closes the connection.
 * - Request line and headers at most `maxHeaderBytes` (else `431`), a body at most
 *   `maxBodyBytes` (else `413`), no chunked request bodies (`411`).
 * - Keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`), pipelining.
 * - HTTPS with `tls`, the handshake counted in the connection limit and the idle timeout.
 * - Accept errors (out of descriptors) are logged at most once a second and retried.
 *
 * @module
 */

import { acceptLoop, type StreamConn, TlsUpgrader, tuneTcp, type WarnFn } from "./net.ts";

/** What a handler gets besides the request. */
export interface HttpInfo {
  /** The peer's address. */
  remoteAddr: Deno.NetAddr;
}

/** A request handler, the shape of `Deno.serve`'s. */
export type HttpHandler = (req: Request, info: HttpInfo) => Response | Promise<Response>;

/** Options of {@linkcode serveHttp}. */
export interface HttpServeOptions {
  /** Address to listen on. */
  hostname: string;
  /** Port (0 picks a free one). */
  port: number;
  /** Serve HTTPS with this certificate and key (PEM text). */
  tls?: { cert: string; key: string };
  /** Most open connections (default 256). */
  maxConnections?: number;
  /** Seconds a connection may take to send a whole request (default 10). */
  idleTimeout?: number;
  /** Longest request line plus headers, in bytes (default 16 KiB). */
  maxHeaderBytes?: number;
  /** Longest request body, in bytes (default 64 KiB). */
  maxBodyBytes?: number;
  /** Where warnings go (accept failures, connections refused). */
  warn?: WarnFn;
  /** Called with a handler's exception; its response is sent (default: `500`). */
  onError?: (err: unknown) => Response;
}

/** A running {@linkcode serveHttp} server. */
export interface BoundedHttpServer {
  /** The address it listens on. */
  readonly addr: Deno.NetAddr;
  /** Open connections. */
  readonly connections: number;
  /** Resolves once it has stopped. */
  readonly finished: Promise<void>;
  /** Stops listening and closes every connection (streams are cancelled). */
  shutdown(): Promise<void>;
}

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");
const CRLF = encoder.encode("\r\n");
const LAST_CHUNK = encoder.encode("0\r\n\r\n");
/** A body that has not ended after this many bytes is streamed rather than measured. */
const MAX_BUFFERED_BODY = 1 << 20;

const REASONS: Record<number, string> = {
  200: "OK",
  204: "No Content",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  411: "Length Required",
  413: "Content Too Large",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  503: "Service Unavailable",
  505: "HTTP Version Not Supported",
};

/** A request that cannot be served; answered with `status` and the connection closed. */
class HttpError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/**
 * Starts a bounded HTTP/1.1 server. Throws (like `Deno.listen`) when it cannot listen.
 *
 * @example
 * ```ts
 * import { serveHttp } from "./http_server.ts";
 * const server = serveHttp({ hostname: "127.0.0.1", port: 0 }, () => new Response("ok"));
 * const res = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * console.log(await res.text()); // ok
 * await server.shutdown();
 * ```
 */
export function serveHttp(options: HttpServeOptions, handler: HttpHandler): BoundedHttpServer {
  const tls = options.tls === undefined ? undefined : new TlsUpgrader(options.tls);
  const listener = Deno.listen({ hostname: options.hostname, port: options.port });
  const limits: Limits = {
    idleMs: Math.min(2 ** 31 - 1, Math.max(1, (options.idleTimeout ?? 10) * 1000)),
    maxHeaderBytes: options.maxHeaderBytes ?? 16 * 1024,
    maxBodyBytes: options.maxBodyBytes ?? 64 * 1024,
    scheme: tls === undefined ? "http" : "https",
    onError: options.onError ?? (() => new Response("internal error", { status: 500 })),
  };
  const maxConnections = options.maxConnections ?? 256;
  const warn = options.warn ?? (() => {});
  const conns = new Set<HttpConnection>();
  let refusedLogged = -Infinity;
  let refusedSince = 0;
  let closing = false;
  const accepting = acceptLoop(
    listener,
    (tcp) => {
      if (closing) {
        tcp.close();
        return;
      }
      if (conns.size >= maxConnections) {
        tcp.close();
        refusedSince++;
        const now = performance.now();
        if (now - refusedLogged >= 1000) {
          warn("Refused {count} HTTP connection(s): too many connections ({max})", {
            event: "http_refused",
            reason: "too many connections",
            count: refusedSince,
            max: maxConnections,
          });
          refusedLogged = now;
          refusedSince = 0;
        }
        return;
      }
      tuneTcp(tcp);
      const remoteAddr = tcp.remoteAddr as Deno.NetAddr;
      const conn = new HttpConnection(
        tls === undefined ? tcp : tls.upgrade(tcp),
        remoteAddr,
        handler,
        limits,
        () => conns.delete(conn),
      );
      conns.add(conn);
      conn.run();
    },
    warn,
    "HTTP",
  );
  let stopping: Promise<void> | undefined;
  const { promise: finished, resolve: resolveFinished } = Promise.withResolvers<void>();
  return {
    addr: listener.addr as Deno.NetAddr,
    get connections() {
      return conns.size;
    },
    finished,
    shutdown() {
      stopping ??= (async () => {
        closing = true;
        try {
          listener.close();
        } catch {
          // already closed
        }
        await accepting;
        await Promise.all([...conns].map((c) => c.close()));
        resolveFinished();
      })();
      return stopping;
    },
  };
}

interface Limits {
  idleMs: number;
  maxHeaderBytes: number;
  maxBodyBytes: number;
  scheme: string;
  onError: (err: unknown) => Response;
}

/** One HTTP connection: requests one after another, each answered in order. */
class HttpConnection {
  #conn: StreamConn;
  #remoteAddr: Deno.NetAddr;
  #handler: HttpHandler;
  #limits: Limits;
  #onEnd: () => void;
  #buf = new Uint8Array(4096);
  #start = 0;
  #end = 0;
  #eof = false;
  #reading: Promise<boolean> | undefined;
  #closed = false;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Aborted when the connection closes (the request's signal). */
  #abort = new AbortController();
  #running: Promise<void> = Promise.resolve();

  constructor(
    conn: StreamConn,
    remoteAddr: Deno.NetAddr,
    handler: HttpHandler,
    limits: Limits,
    onEnd: () => void,
  ) {
    this.#conn = conn;
    this.#remoteAddr = remoteAddr;
    this.#handler = handler;
    this.#limits = limits;
    this.#onEnd = onEnd;
  }

  run(): void {
    this.#running = this.#serve().catch(() => {}).finally(() => {
      this.close();
    });
  }

  /** Closes at once; resolves once the connection's work has stopped. */
  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#disarm();
      this.#abort.abort();
      try {
        this.#conn.close();
      } catch {
        // already closed
      }
      this.#onEnd();
    }
    return this.#running;
  }

  #arm(): void {
    this.#disarm();
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.close();
    }, this.#limits.idleMs);
  }

  #disarm(): void {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
  }

  /** Reads more bytes into the buffer; false at the end of the stream. One read at a time. */
  #fill(): Promise<boolean> {
    this.#reading ??= (async () => {
      try {
        if (this.#eof) return false;
        if (this.#start > 0 && this.#start === this.#end) this.#start = this.#end = 0;
        if (this.#end === this.#buf.length) {
          if (this.#start > 0) {
            this.#buf.copyWithin(0, this.#start, this.#end);
            this.#end -= this.#start;
            this.#start = 0;
          } else {
            const bigger = new Uint8Array(this.#buf.length * 2);
            bigger.set(this.#buf);
            this.#buf = bigger;
          }
        }
        const n = await this.#conn.read(this.#buf.subarray(this.#end));
        if (n === null) {
          this.#eof = true;
          return false;
        }
        this.#end += n;
        return true;
      } finally {
        this.#reading = undefined;
      }
    })();
    return this.#reading;
  }

  async #serve(): Promise<void> {
    while (!this.#closed) {
      this.#arm();
      let req: ParsedRequest | undefined;
      try {
        req = await this.#readRequest();
      } catch (err) {
        if (!(err instanceof HttpError)) throw err;
        this.#disarm();
        await this.#writeAll(simpleResponse(err.status, err.message, false));
        return;
      }
      if (req === undefined) return;
      this.#disarm();
      let res: Response;
      try {
        res = await this.#handler(req.request, { remoteAddr: this.#remoteAddr });
      } catch (err) {
        res = this.#limits.onError(err);
      }
      if (this.#closed) {
        await res.body?.cancel().catch(() => {});
        return;
      }
      await this.#respond(res, req);
      if (!req.keepAlive) return;
    }
  }

  /** The next request, or undefined when the peer closed between requests. */
  async #readRequest(): Promise<ParsedRequest | undefined> {
    const max = this.#limits.maxHeaderBytes;
    let scanned = this.#start;
    let headEnd = -1;
    for (;;) {
      // Only the bytes not yet looked at are scanned (3 back, for a terminator split by a read).
      for (let i = Math.max(this.#start, scanned - 3); i < this.#end; i++) {
        if (this.#buf[i] !== 0x0a) continue;
        if (i - 2 >= this.#start && this.#buf[i - 1] === 0x0d && this.#buf[i - 2] === 0x0a) {
          headEnd = i + 1;
          break;
        }
        if (i > this.#start && this.#buf[i - 1] === 0x0a) {
          headEnd = i + 1;
          break;
        }
      }
      if (headEnd >= 0) break;
      scanned = this.#end;
      if (this.#end - this.#start > max) {
        throw new HttpError(431, "request line and headers too large");
      }
      const scannedFrom = scanned - this.#start;
      if (!(await this.#fill())) {
        if (this.#end === this.#start) return undefined;
        throw new HttpError(400, "incomplete request");
      }
      scanned = this.#start + scannedFrom;
    }
    if (headEnd - this.#start > max) throw new HttpError(431, "request line and headers too large");
    const head = latin1.decode(this.#buf.subarray(this.#start, headEnd));
    this.#start = headEnd;
    const lines = head.split(/\r?\n/);
    const m = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
    if (m === null) {
      if (/^[A-Z]+ \S+ HTTP\/\d/.test(lines[0])) {
        throw new HttpError(505, "HTTP version not supported");
      }
      throw new HttpError(400, "bad request line");
    }
    const [, method, target, minor] = m;
    const headers = new Headers();
    for (const l of lines.slice(1)) {
      if (l === "") continue;
      const colon = l.indexOf(":");
      if (colon <= 0 || /[\s]/.test(l.slice(0, colon))) {
        throw new HttpError(400, "bad header line");
      }
      try {
        headers.append(l.slice(0, colon), l.slice(colon + 1).trim());
      } catch {
        throw new HttpError(400, "bad header line");
      }
    }
    if (headers.has("transfer-encoding")) {
      throw new HttpError(411, "send a Content-Length, not a chunked body");
    }
    const lengthText = headers.get("content-length");
    let length = 0;
    if (lengthText !== null) {
      if (!/^\d+$/.test(lengthText)) throw new HttpError(400, "bad Content-Length");
      length = Number(lengthText);
      if (length > this.#limits.maxBodyBytes) throw new HttpError(413, "request body too large");
    }
    let body: Uint8Array<ArrayBuffer> | undefined;
    if (length > 0) {
      while (this.#end - this.#start < length) {
        if (!(await this.#fill())) throw new HttpError(400, "incomplete body");
      }
      body = this.#buf.slice(this.#start, this.#start + length);
      this.#start += length;
    }
    const connection = (headers.get("connection") ?? "").toLowerCase();
    const keepAlive = minor === "1"
      ? !/\bclose\b/.test(connection)
      : /\bkeep-alive\b/.test(connection);
    let url: string;
    if (target.startsWith("/")) {
      const host = headers.get("host") ?? formatAddr(this.#remoteAddr);
      url = `${this.#limits.scheme}://${
        /^[\w.\-:\[\]]+$/.test(host) ? host : "localhost"
      }${target}`;
    } else if (/^https?:\/\//i.test(target)) {
      url = target;
    } else if (target === "*" && method === "OPTIONS") {
      url = `${this.#limits.scheme}://localhost/`;
    } else {
      throw new HttpError(400, "bad request target");
    }
    let request: Request;
    try {
      request = new Request(url, {
        method,
        headers,
        body: body !== undefined && method !== "GET" && method !== "HEAD" ? body : undefined,
        signal: this.#abort.signal,
      });
    } catch {
      throw new HttpError(400, "bad request");
    }
    return { request, keepAlive, head: method === "HEAD", minor };
  }

  /** Writes all of `bytes`; a write the peer does not take within the idle timeout closes. */
  async #writeAll(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.length) {
      const timer = setTimeout(() => this.close(), this.#limits.idleMs);
      try {
        done += await this.#conn.write(bytes.subarray(done));
      } finally {
        clearTimeout(timer);
      }
    }
  }

  async #respond(res: Response, req: ParsedRequest): Promise<void> {
    const reader = res.body?.getReader();
    const chunks: Uint8Array[] = [];
    let size = 0;
    let ended = reader === undefined;
    let pending: Promise<ReadableStreamReadResult<Uint8Array>> | undefined;
    // A body that ends at once (a string, a buffer) gets a Content-Length; one that keeps going
    // (a stream, Server-Sent Events) is sent chunked as it comes.
    while (reader !== undefined && !ended && size <= MAX_BUFFERED_BODY) {
      const next = reader.read();
      let tickTimer: ReturnType<typeof setTimeout> | undefined;
      const tick = new Promise<"tick">((resolve) =>
        tickTimer = setTimeout(() => resolve("tick"), 0)
      );
      const r = await Promise.race([next, tick]);
      clearTimeout(tickTimer);
      if (r === "tick") {
        pending = next;
        break;
      }
      if (r.done) ended = true;
      else {
        chunks.push(r.value);
        size += r.value.length;
      }
    }
    const streaming = !ended;
    const keepAlive = req.keepAlive && !(streaming && req.minor === "0");
    let head = `HTTP/1.1 ${res.status} ${REASONS[res.status] ?? "Unknown"}\r\n`;
    for (const [name, value] of res.headers) {
      if (/^(content-length|transfer-encoding|connection|keep-alive)$/i.test(name)) continue;
      head += `${name}: ${value}\r\n`;
    }
    head += `date: ${new Date().toUTCString()}\r\n`;
    if (streaming) head += "transfer-encoding: chunked\r\n";
    else if (res.status !== 204 && res.status !== 304) head += `content-length: ${size}\r\n`;
    head += keepAlive ? "" : "connection: close\r\n";
    head += "\r\n";
    if (!streaming || req.head) {
      if (streaming) await reader!.cancel().catch(() => {});
      const out = concat([encoder.encode(head), ...(req.head ? [] : chunks)]);
      await this.#writeAll(out);
      if (!keepAlive) req.keepAlive = false;
      return;
    }
    req.keepAlive = keepAlive;
    // Streaming: watch the peer meanwhile, so that its close cancels the stream.
    const watch = this.#watchPeer(reader!);
    try {
      await this.#writeAll(concat([encoder.encode(head), ...chunks.flatMap(chunk)]));
      for (;;) {
        const r = pending !== undefined ? await pending : await reader!.read();
        pending = undefined;
        if (this.#closed) break;
        if (r.done) {
          await this.#writeAll(LAST_CHUNK);
          break;
        }
        if (r.value.length > 0) await this.#writeAll(concat(chunk(r.value)));
      }
    } catch (err) {
      await reader!.cancel().catch(() => {});
      throw err;
    } finally {
      watch.stop();
    }
    if (this.#closed) {
      await reader!.cancel().catch(() => {});
    }
  }

  /** While a body streams: reads ahead (pipelined requests) and ends the stream on the peer's close. */
  #watchPeer(reader: ReadableStreamDefaultReader<Uint8Array>): { stop(): void } {
    let stopped = false;
    (async () => {
      while (!stopped && !this.#closed) {
        // Bytes of a next request are kept for later, up to the header limit.
        if (this.#end - this.#start > this.#limits.maxHeaderBytes + this.#limits.maxBodyBytes) {
          return;
        }
        let more: boolean;
        try {
          more = await this.#fill();
        } catch {
          more = false;
        }
        if (!more && !stopped) {
          reader.cancel().catch(() => {});
          this.close();
          return;
        }
      }
    })();
    return {
      stop() {
        stopped = true;
      },
    };
  }
}

interface ParsedRequest {
  request: Request;
  keepAlive: boolean;
  head: boolean;
  minor: string;
}

function chunk(bytes: Uint8Array): Uint8Array[] {
  return [encoder.encode(bytes.length.toString(16) + "\r\n"), bytes, CRLF];
}

function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function simpleResponse(status: number, text: string, keepAlive: boolean): Uint8Array {
  const body = encoder.encode(text + "\n");
  return concat([
    encoder.encode(
      `HTTP/1.1 ${status} ${
        REASONS[status] ?? "Error"
      }\r\ncontent-type: text/plain; charset=utf-8\r\n` +
        `content-length: ${body.length}\r\n${keepAlive ? "" : "connection: close\r\n"}\r\n`,
    ),
    body,
  ]);
}

function formatAddr(addr: Deno.NetAddr): string {
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}
