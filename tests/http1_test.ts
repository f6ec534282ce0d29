// The etcd client's HTTP/1.1 client (lib/etcd/http1.ts) against a scripted HTTP server on
// loopback: every way an answer can come (a length, chunks cut anywhere, the close), connections
// kept and reused, the ways they fail. Against a real etcd it is used by every etcd test.

import assert from "node:assert/strict";
import { Http1Client, Http1Error } from "../lib/etcd/http1.ts";

const encoder = new TextEncoder();
/** In an answer's pieces: close the connection here. */
const CLOSE: unique symbol = Symbol("close");
type Piece = string | typeof CLOSE;
const decoder = new TextDecoder();

/** A request as the scripted server read it. */
interface Seen {
  head: string;
  body: string;
  /** Which connection it came on (0, 1, ...). */
  conn: number;
}

/**
 * A raw TCP server: reads each request (head and `content-length` body) and answers with what
 * `answer` returns, written piece by piece (each piece its own write, with a short wait between:
 * the client must read across them). `null` closes the connection without an answer.
 */
class Scripted implements AsyncDisposable {
  readonly listener: Deno.TcpListener;
  readonly seen: Seen[] = [];
  readonly conns: Deno.Conn[] = [];
  readonly #done: Promise<void>;

  readonly #host: string;

  constructor(
    answer: (req: Seen, index: number) => Piece[] | null | "hang",
    hostname = "127.0.0.1",
  ) {
    const listener = Deno.listen({ hostname, port: 0 });
    this.#host = hostname.includes(":") ? `[${hostname}]` : hostname;
    this.listener = listener;
    this.#done = (async () => {
      const tasks: Promise<void>[] = [];
      for await (const conn of listener) {
        const n = this.conns.push(conn) - 1;
        tasks.push(this.#serve(conn, n, answer).catch(() => {}));
      }
      await Promise.all(tasks);
    })();
  }

  get origin(): string {
    return `http://${this.#host}:${this.listener.addr.port}`;
  }

  async #serve(
    conn: Deno.Conn,
    n: number,
    answer: (req: Seen, index: number) => Piece[] | null | "hang",
  ): Promise<void> {
    let buf = "";
    const chunk = new Uint8Array(65536);
    for (;;) {
      let end: number;
      while ((end = buf.indexOf("\r\n\r\n")) < 0) {
        const r = await conn.read(chunk);
        if (r === null) return;
        buf += decoder.decode(chunk.subarray(0, r));
      }
      const head = buf.slice(0, end);
      const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
      // The length is in bytes.
      while (encoder.encode(buf.slice(end + 4)).length < length) {
        const r = await conn.read(chunk);
        if (r === null) return;
        buf += decoder.decode(chunk.subarray(0, r));
      }
      const rest = encoder.encode(buf.slice(end + 4));
      const req = { head, body: decoder.decode(rest.subarray(0, length)), conn: n };
      buf = decoder.decode(rest.subarray(length));
      const index = this.seen.push(req) - 1;
      const pieces = answer(req, index);
      if (pieces === "hang") continue;
      if (pieces === null) {
        conn.close();
        return;
      }
      for (const piece of pieces) {
        if (piece === CLOSE) {
          conn.close();
          return;
        }
        const bytes = encoder.encode(piece);
        let off = 0;
        while (off < bytes.length) off += await conn.write(bytes.subarray(off));
        await new Promise((r) => setTimeout(r, 2));
      }
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.listener.close();
    for (const c of this.conns) {
      try {
        c.close();
      } catch {
        // closed already
      }
    }
    await this.#done;
  }
}

const OK_HEAD = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n";

function withLength(body: string, extra = ""): string {
  return `${OK_HEAD}${extra}content-length: ${encoder.encode(body).length}\r\n\r\n${body}`;
}

Deno.test("http1: a request is one well-formed POST; an answer with a length, read across writes", async () => {
  await using srv = new Scripted(() => {
    const whole = withLength('{"ok":"ünï"}');
    // Cut inside the status line, a header and the body.
    return [
      whole.slice(0, 5),
      whole.slice(5, 40),
      whole.slice(40, whole.length - 3),
      whole.slice(-3),
    ];
  });
  const http = new Http1Client();
  try {
    const res = await http.post(
      srv.origin,
      "/v3/kv/range",
      { authorization: "tok" },
      '{"k":"é"}',
      2000,
    );
    assert.deepEqual(res, { status: 200, body: '{"ok":"ünï"}' });
    const [seen] = srv.seen;
    assert.match(seen.head, /^POST \/v3\/kv\/range HTTP\/1\.1\r\n/);
    assert.match(seen.head, new RegExp(`\r\nhost: 127\\.0\\.0\\.1:${srv.listener.addr.port}\r\n`));
    assert.match(seen.head, /\r\ncontent-type: application\/json\r\n/);
    assert.match(seen.head, /\r\nauthorization: tok(\r\n|$)/);
    assert.match(seen.head, /\r\ncontent-length: 10(\r\n|$)/, "the body's length in bytes");
    assert.equal(seen.body, '{"k":"é"}');
  } finally {
    http.close();
  }
});

Deno.test("http1: a chunked answer, chunks cut anywhere, with extensions and trailers", async () => {
  const body = '{"kvs":[' + Array.from({ length: 300 }, (_, i) => `"${i}"`).join(",") + "]}";
  await using srv = new Scripted(() => {
    const a = body.slice(0, 700);
    const b = body.slice(700);
    const whole = `${OK_HEAD}transfer-encoding: chunked\r\n\r\n` +
      `${a.length.toString(16)};x=y\r\n${a}\r\n${b.length.toString(16).toUpperCase()}\r\n${b}\r\n` +
      "0\r\ngrpc-status: 0\r\n\r\n";
    const out: string[] = [];
    for (let i = 0; i < whole.length; i += 97) out.push(whole.slice(i, i + 97));
    return out;
  });
  const http = new Http1Client();
  try {
    const first = await http.post(srv.origin, "/a", {}, "{}", 2000);
    assert.equal(first.body, body);
    // The connection was kept: the next call goes on it.
    const second = await http.post(srv.origin, "/a", {}, "{}", 2000);
    assert.equal(second.body, body);
    assert.deepEqual(srv.seen.map((s) => s.conn), [0, 0]);
    assert.equal(http.openConnections, 1);
  } finally {
    http.close();
  }
});

Deno.test("http1: calls at once use connections of their own, kept and reused after", async () => {
  await using srv = new Scripted((req) => [withLength(`{"n":${req.body}}`)]);
  const http = new Http1Client();
  try {
    const first = await Promise.all(
      [1, 2, 3].map((n) => http.post(srv.origin, "/", {}, String(n), 2000)),
    );
    assert.deepEqual(first.map((r) => r.body), ['{"n":1}', '{"n":2}', '{"n":3}']);
    assert.equal(http.openConnections, 3);
    const again = await Promise.all(
      [4, 5, 6].map((n) => http.post(srv.origin, "/", {}, String(n), 2000)),
    );
    assert.deepEqual(again.map((r) => r.body), ['{"n":4}', '{"n":5}', '{"n":6}']);
    assert.equal(srv.conns.length, 3, "no new connection for the second round");
  } finally {
    http.close();
  }
});

Deno.test("http1: connection: close, HTTP/1.0 and an answer ended by the close are not reused", async () => {
  await using srv = new Scripted((_, i) => {
    if (i === 0) return [withLength("{}", "connection: close\r\n")];
    if (i === 1) return [`HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}`];
    return [`${OK_HEAD}\r\n{"till":"close"}`, CLOSE];
  });
  const http = new Http1Client();
  try {
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, "{}");
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, "{}");
    assert.deepEqual(srv.seen.map((s) => s.conn), [0, 1]);
    assert.equal(http.openConnections, 0);
  } finally {
    http.close();
  }
});

Deno.test("http1: a kept connection the peer closed while idle is replaced once, the other idle ones closed; a fresh one that closes fails", async () => {
  let calls = 0;
  await using srv = new Scripted((req) => {
    calls++;
    return req.conn === 0 && calls > 1 ? null : [withLength(`{"conn":${req.conn}}`)];
  });
  const http = new Http1Client();
  try {
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, '{"conn":0}');
    // Connection 0 is kept; the server closes it on the next request without an answer.
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, '{"conn":1}');
  } finally {
    http.close();
  }
  // A peer that restarted: every kept connection is dead; one failure clears them all.
  let restarted = false;
  await using restarting = new Scripted((req) =>
    restarted && req.conn < 3 ? null : [withLength(`{"conn":${req.conn}}`)]
  );
  const pool = new Http1Client();
  try {
    const first = await Promise.all(
      [1, 2, 3].map(() => pool.post(restarting.origin, "/", {}, "{}", 2000)),
    );
    assert.equal(first.length, 3);
    assert.equal(pool.openConnections, 3);
    restarted = true;
    assert.equal((await pool.post(restarting.origin, "/", {}, "{}", 2000)).body, '{"conn":3}');
    assert.equal(pool.openConnections, 1, "the other idle connections are gone too");
    assert.equal((await pool.post(restarting.origin, "/", {}, "{}", 2000)).body, '{"conn":3}');
  } finally {
    pool.close();
  }
  await using refusing = new Scripted(() => null);
  const fresh = new Http1Client();
  try {
    await assert.rejects(
      fresh.post(refusing.origin, "/", {}, "{}", 2000),
      (e) => e instanceof Http1Error && /closed before an answer/.test(e.message),
    );
    assert.equal(refusing.seen.length, 1, "a new connection is not tried again");
  } finally {
    fresh.close();
  }
});

Deno.test("http1: the deadline closes the connection and says it timed out; close() ends calls in flight", async () => {
  await using srv = new Scripted(() => "hang");
  const http = new Http1Client();
  const t0 = performance.now();
  await assert.rejects(
    http.post(srv.origin, "/", {}, "{}", 150),
    (e) => e instanceof Http1Error && e.timedOut,
  );
  assert.ok(performance.now() - t0 >= 140);
  assert.equal(http.openConnections, 0, "the timed-out connection is closed, not kept");
  const inFlight = http.post(srv.origin, "/", {}, "{}", 10_000);
  while (srv.seen.length < 2) await new Promise((r) => setTimeout(r, 5));
  http.close();
  await assert.rejects(inFlight, Http1Error);
  await assert.rejects(http.post(srv.origin, "/", {}, "{}", 1000), /client closed/);
});

Deno.test("http1: what is not HTTP/1.1, a bad length, a bad chunk or a header with a line break is an Http1Error", async () => {
  const answers: Piece[][] = [
    ["SSH-2.0-OpenSSH\r\n\r\n"],
    [`${OK_HEAD}content-length: -1\r\n\r\n`],
    [`${OK_HEAD}transfer-encoding: chunked\r\n\r\nzz\r\n`],
    [`${OK_HEAD}transfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n`],
    [`${OK_HEAD}content-length: 10\r\n\r\n{}`, CLOSE],
  ];
  await using srv = new Scripted((_, i) => answers[i]);
  const http = new Http1Client();
  try {
    for (
      const want of [/not an HTTP/, /content-length/, /chunk size/, /CRLF/, /middle of a body/]
    ) {
      await assert.rejects(http.post(srv.origin, "/", {}, "{}", 2000), (e) => {
        assert.ok(e instanceof Http1Error, String(e));
        assert.match(e.message, want);
        return true;
      });
    }
    assert.equal(http.openConnections, 0);
    await assert.rejects(
      http.post(srv.origin, "/", { authorization: "a\r\nx-evil: 1" }, "{}", 2000),
      /bad header/,
    );
  } finally {
    http.close();
  }
});

Deno.test("http1: a stream passes each piece as it comes, until the end, false, or the signal", async () => {
  const lines = Array.from({ length: 5 }, (_, i) => `{"i":${i}}\n`);
  await using srv = new Scripted((req) => {
    if (req.body === '"refuse"') return [withLength('{"error":"no"}').replace("200 OK", "401 No")];
    const head = `${OK_HEAD}transfer-encoding: chunked\r\n\r\n`;
    const chunks = lines.map((l) => `${l.length.toString(16)}\r\n${l}\r\n`);
    return req.body === '"all"' ? [head, ...chunks, "0\r\n\r\n"] : [head, ...chunks];
  });
  const http = new Http1Client();
  try {
    let got = "";
    const ended = await http.stream(
      srv.origin,
      "/w",
      {},
      '"all"',
      2000,
      new AbortController().signal,
      (t) => {
        got += t;
      },
    );
    assert.equal(ended, undefined);
    assert.equal(got, lines.join(""));
    // false stops it; the connection is closed, never kept.
    let pieces = 0;
    await http.stream(
      srv.origin,
      "/w",
      {},
      '"open"',
      2000,
      new AbortController().signal,
      () => ++pieces < 2,
    );
    assert.equal(pieces, 2);
    // The signal stops a stream that waits for more.
    const abort = new AbortController();
    let seen = 0;
    const open = http.stream(srv.origin, "/w", {}, '"open"', 2000, abort.signal, () => {
      if (++seen === lines.length) abort.abort();
    });
    assert.equal(await open, undefined);
    assert.equal(seen, lines.length);
    // An error the callback throws comes out as it was thrown.
    await assert.rejects(
      http.stream(srv.origin, "/w", {}, '"open"', 2000, new AbortController().signal, () => {
        throw new RangeError("mine");
      }),
      RangeError,
    );
    // Not 200: the status and the whole body.
    const refused = await http.stream(
      srv.origin,
      "/w",
      {},
      '"refuse"',
      2000,
      new AbortController().signal,
      () => {
        throw new Error("no data expected");
      },
    );
    assert.deepEqual(refused, { status: 401, body: '{"error":"no"}' });
    assert.equal(http.openConnections, 0);
  } finally {
    http.close();
  }
});

Deno.test("http1: a TLS peer that never answers the handshake times out at the deadline", async () => {
  // A plain TCP server that accepts and says nothing: the TLS connect cannot finish.
  await using srv = new Scripted(() => "hang");
  const http = new Http1Client({ caCerts: [] });
  try {
    const t0 = performance.now();
    await assert.rejects(
      http.post(srv.origin.replace("http:", "https:"), "/", {}, "{}", 200),
      (e) => e instanceof Http1Error && e.timedOut,
    );
    assert.ok(performance.now() - t0 < 5000);
    assert.equal(http.openConnections, 0);
  } finally {
    http.close();
  }
});

Deno.test("http1: a connection idle for longer than the idle limit is closed, not reused", async () => {
  await using srv = new Scripted((req) => [withLength(`{"conn":${req.conn}}`)]);
  const http = new Http1Client({}, 60);
  try {
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, '{"conn":0}');
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, '{"conn":0}');
    // Time passing is what is tested here.
    await new Promise((r) => setTimeout(r, 120));
    assert.equal((await http.post(srv.origin, "/", {}, "{}", 2000)).body, '{"conn":1}');
    assert.equal(http.openConnections, 1, "the stale one was closed");
  } finally {
    http.close();
  }
});

Deno.test("http1: an IPv6 origin connects to the address inside the brackets and sends them in Host", async () => {
  await using srv = new Scripted(() => [withLength("{}")], "::1");
  const http = new Http1Client();
  try {
    assert.equal((await http.post(srv.origin, "/v6", {}, "{}", 2000)).body, "{}");
    assert.match(srv.seen[0].head, new RegExp(`\r\nhost: \\[::1\\]:${srv.listener.addr.port}\r\n`));
  } finally {
    http.close();
  }
});
