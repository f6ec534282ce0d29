/**
 * The bounded HTTP/1.1 server (lib/http_server.ts) in this process: keep-alive, streaming bodies
 * (Server-Sent Events) that outlive the idle timeout and end when the peer goes, the size bounds,
 * the connection limit.
 */

import assert from "node:assert/strict";
import { serveHttp } from "../lib/http_server.ts";
import { readToEnd, within } from "./fault_util.ts";
import { until } from "./test_util.ts";

const encoder = new TextEncoder();

async function rawRequest(port: number, text: string | Uint8Array): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const bytes = typeof text === "string" ? encoder.encode(text) : text;
    let done = 0;
    while (done < bytes.length) done += await conn.write(bytes.subarray(done));
    return await within(readToEnd(conn), 5000, "the response");
  } finally {
    conn.close();
  }
}

Deno.test("serveHttp: Content-Length for a plain body, keep-alive and pipelining, HEAD without a body", async () => {
  const server = serveHttp(
    { hostname: "127.0.0.1", port: 0 },
    (req, info) =>
      new Response(`${req.method} ${new URL(req.url).pathname} ${info.remoteAddr.hostname}`),
  );
  try {
    const port = server.addr.port;
    const text = await rawRequest(
      port,
      "GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n" +
        "GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    const responses = text.split(/(?=HTTP\/1\.1 )/);
    assert.equal(responses.length, 3, text);
    assert.match(responses[0], /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(responses[0], /content-length: 16\r\n/);
    assert.ok(responses[0].endsWith("\r\n\r\nGET /a 127.0.0.1"), responses[0]);
    assert.ok(responses[1].endsWith("\r\n\r\n"), "HEAD has no body");
    assert.match(responses[2], /connection: close\r\n/);
    assert.ok(responses[2].endsWith("GET /c 127.0.0.1"));
    const res = await fetch(`http://127.0.0.1:${port}/d?x=1`, { method: "POST", body: "hi" });
    assert.equal(await res.text(), "POST /d 127.0.0.1");
  } finally {
    await server.shutdown();
  }
});

Deno.test("serveHttp: a streaming body is sent chunked as it comes, outlives the idle timeout, and is cancelled when the peer closes", async () => {
  const cancelled = Promise.withResolvers<void>();
  const aborted = Promise.withResolvers<void>();
  let timer: ReturnType<typeof setInterval> | undefined;
  const server = serveHttp({ hostname: "127.0.0.1", port: 0, idleTimeout: 0.3 }, (req) => {
    req.signal.addEventListener("abort", () => aborted.resolve());
    let n = 0;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(encoder.encode(`data: ${n++}\n\n`));
        timer = setInterval(() => controller.enqueue(encoder.encode(`data: ${n++}\n\n`)), 100);
      },
      cancel() {
        clearInterval(timer);
        cancelled.resolve();
      },
    });
    return new Response(body, { headers: { "content-type": "text/event-stream" } });
  });
  try {
    const res = await fetch(`http://127.0.0.1:${server.addr.port}/events`);
    assert.equal(res.headers.get("content-type"), "text/event-stream");
    assert.equal(res.headers.get("transfer-encoding"), "chunked");
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    let got = "";
    const t0 = performance.now();
    // Ten events, 1 s, over three times the idle timeout: the stream is not cut.
    while (!got.includes("data: 9\n\n")) {
      const r = await within(reader.read(), 2000, "the next event");
      assert.equal(r.done, false, `the stream ended early: ${got}`);
      got += r.value;
    }
    assert.ok(performance.now() - t0 >= 800);
    assert.ok(got.startsWith("data: 0\n\ndata: 1\n\n"), got);
    await reader.cancel();
    await within(cancelled.promise, 3000, "the stream to be cancelled after the peer closed");
    await within(aborted.promise, 3000, "the request's signal to be aborted");
  } finally {
    clearInterval(timer);
    await server.shutdown();
  }
});

Deno.test("serveHttp: 431 for oversized headers, 413 for an oversized body, 411 for a chunked body", async () => {
  const server = serveHttp({
    hostname: "127.0.0.1",
    port: 0,
    maxHeaderBytes: 1024,
    maxBodyBytes: 100,
  }, () => new Response("ok"));
  try {
    const port = server.addr.port;
    const big = await rawRequest(port, `GET / HTTP/1.1\r\nX: ${"a".repeat(100_000)}\r\n\r\n`);
    assert.match(big, /^HTTP\/1\.1 431 /);
    const body = await rawRequest(port, "POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n");
    assert.match(body, /^HTTP\/1\.1 413 /);
    const chunked = await rawRequest(
      port,
      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert.match(chunked, /^HTTP\/1\.1 411 /);
    const bad = await rawRequest(port, "hello\r\n\r\n");
    assert.match(bad, /^HTTP\/1\.1 400 /);
    const ok = await rawRequest(port, "GET / HTTP/1.0\r\n\r\n");
    assert.match(ok, /^HTTP\/1\.1 200 OK\r\n[^]*\r\n\r\nok$/);
  } finally {
    await server.shutdown();
  }
});

Deno.test("serveHttp: over --http-max-connections a new connection is closed at once", async () => {
  const server = serveHttp(
    { hostname: "127.0.0.1", port: 0, maxConnections: 2 },
    () => new Response("ok"),
  );
  const open: Deno.Conn[] = [];
  try {
    const port = server.addr.port;
    for (let i = 0; i < 2; i++) open.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    const third = await Deno.connect({ hostname: "127.0.0.1", port });
    assert.equal(await within(readToEnd(third), 2000, "the third to be closed"), "");
    third.close();
    for (const c of open) c.close();
    open.length = 0;
    // Room again once they are gone.
    await until(() => server.connections === 0, "the server to see the closes", 2000);
    assert.equal(await rawRequest(port, "GET / HTTP/1.0\r\n\r\n").then((t) => t.slice(-2)), "ok");
  } finally {
    for (const c of open) c.close();
    await server.shutdown();
  }
});
