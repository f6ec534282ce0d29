/**
 * The live page's feed (`GET /events`, `lib/web/events.ts`) without a browser: what it sends,
 * that it coalesces, that it lets go of a page that leaves, the token rule, and (with etcd) that
 * it shows every server's locks. Real servers, real sockets, real HTTP.
 */

import assert from "node:assert/strict";
import { startHttpServer } from "../lib/http.ts";
import { LiveFeed } from "../lib/web/events.ts";
import { hasEtcd, sharedEtcd } from "./etcd_util.ts";
import { RawClient, ROOT, startServerProcess, startTestServer, until } from "./test_util.ts";

/** A reader of Server-Sent Events from a response body. */
class Events {
  readonly #reader: ReadableStreamDefaultReader<string>;
  #buf = "";
  constructor(body: ReadableStream<Uint8Array>) {
    this.#reader = body.pipeThrough(new TextDecoderStream()).getReader();
  }
  /** The next event (name and parsed data); null at the end of the stream. */
  async next(): Promise<{ event: string; data: Record<string, unknown> } | null> {
    for (;;) {
      const i = this.#buf.indexOf("\n\n");
      if (i >= 0) {
        const block = this.#buf.slice(0, i);
        this.#buf = this.#buf.slice(i + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (data === undefined) continue;
        return { event, data: JSON.parse(data) };
      }
      const r = await this.#reader.read();
      if (r.done) return null;
      this.#buf += r.value;
    }
  }
  /** Events until `pred` holds for one (returned), within `ms`. */
  async until(
    pred: (e: { event: string; data: Record<string, unknown> }) => boolean,
    ms: number,
  ): Promise<{ event: string; data: Record<string, unknown> }[]> {
    const seen: { event: string; data: Record<string, unknown> }[] = [];
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no such event within ${ms} ms`)), ms);
    });
    try {
      for (;;) {
        const e = await Promise.race([this.next(), timeout]);
        if (e === null) throw new Error("the stream ended");
        seen.push(e);
        if (pred(e)) return seen;
      }
    } finally {
      clearTimeout(timer);
    }
  }
  cancel(): Promise<void> {
    return this.#reader.cancel().catch(() => {});
  }
}

type Upsert = { name: string; holders: { client_id: string }[]; queue: { client_id: string }[] };

function upserts(e: { data: Record<string, unknown> }): Upsert[] {
  return (e.data.upsert as Upsert[] | undefined) ?? [];
}

Deno.test("/events sends a reset, the locks, then each change as the name's whole state", async () => {
  await using srv = await startTestServer();
  await using _a = await RawClient.connect(srv.port);
  assert.equal(await _a.request("lock,name:db,client-id:alice"), "ok");
  const feed = new LiveFeed(srv.server);
  const res = feed.respond(new Request("http://x/events"));
  assert.equal(res.headers.get("content-type"), "text/event-stream; charset=utf-8");
  const events = new Events(res.body!);
  try {
    const first = await events.until((e) => e.event === "update", 2000);
    assert.equal(first[0].event, "reset");
    const snap = upserts(first[first.length - 1]);
    assert.deepEqual(snap.map((d) => [d.name, d.holders[0].client_id]), [["db", "alice"]]);
    assert.equal(feed.clients, 1);

    await using b = await RawClient.connect(srv.port);
    assert.equal(await b.request("lock,name:db,client-id:bob,wait:10"), "queued,position:1");
    const t0 = performance.now();
    const seen = await events.until(
      (e) => upserts(e).some((d) => d.name === "db" && d.queue[0]?.client_id === "bob"),
      1000,
    );
    assert.ok(performance.now() - t0 < 1000);
    assert.ok(seen.length >= 1);

    _a.close();
    await events.until(
      (e) => upserts(e).some((d) => d.name === "db" && d.holders[0]?.client_id === "bob"),
      1000,
    );
    b.close();
    await events.until((e) => ((e.data.remove as string[]) ?? []).includes("db"), 1000);
  } finally {
    await events.cancel();
  }
  // The page went: the feed lets go of it and of the store (the sanitizers see no timer left).
  assert.equal(feed.clients, 0);
  feed.close();
});

Deno.test("/events coalesces: 200 changes in a burst reach the page in at most a few updates", async () => {
  await using srv = await startTestServer();
  const feed = new LiveFeed(srv.server, { intervalMs: 250 });
  const events = new Events(feed.respond(new Request("http://x/events")).body!);
  const clients: RawClient[] = [];
  try {
    await events.until((e) => e.event === "update", 2000);
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 200 }, async (_, i) => {
      const c = await RawClient.connect(srv.port);
      clients.push(c);
      assert.equal(await c.request(`lock,name:burst-${i},client-id:c${i}`), "ok");
    }));
    const names = new Set<string>();
    const seen = await events.until((e) => {
      for (const d of upserts(e)) names.add(d.name);
      return names.size === 200;
    }, 3000);
    const updates = seen.filter((e) => e.event === "update").length;
    const ms = performance.now() - t0;
    // At most one update per interval (plus the first one): 4 a second.
    assert.ok(updates <= Math.ceil(ms / 250) + 1, `${updates} updates in ${ms.toFixed(0)} ms`);
  } finally {
    for (const c of clients) c.close();
    await events.cancel();
    feed.close();
  }
});

Deno.test("over HTTP: a page that goes away is let go; /events wants the token, / does not", async () => {
  const token = "tok-17";
  await using srv = await startTestServer({ authToken: token });
  await using http = await startHttpServer(srv.server, { port: 0, authToken: token });
  const base = `http://127.0.0.1:${http.addr.port}`;

  const page = await fetch(`${base}/`);
  assert.equal(page.status, 200);
  const html = await page.text();
  assert.match(html, /<body data-auth="required">/);
  assert.match(page.headers.get("content-security-policy") ?? "", /script-src 'sha256-/);

  const refused = await fetch(`${base}/events`);
  assert.equal(refused.status, 401);
  await refused.body?.cancel();
  const wrong = await fetch(`${base}/events`, { headers: { authorization: "Bearer nope" } });
  assert.equal(wrong.status, 401);
  await wrong.body?.cancel();

  // Many pages come and go; the server keeps no stream of theirs (it stops cleanly below).
  for (let i = 0; i < 5; i++) {
    const abort = new AbortController();
    const res = await fetch(`${base}/events`, {
      headers: { authorization: `Bearer ${token}` },
      signal: abort.signal,
    });
    assert.equal(res.status, 200);
    const events = new Events(res.body!);
    assert.equal((await events.next())?.event, "reset");
    abort.abort();
    await events.cancel();
  }
  // A page still open when the server stops: its stream ends, the server does not hang.
  const res = await fetch(`${base}/events`, { headers: { authorization: `Bearer ${token}` } });
  const events = new Events(res.body!);
  assert.equal((await events.next())?.event, "reset");
  await srv.server.close();
  await http.finished;
  await until(async () => (await events.next().catch(() => null)) === null, "stream end", 3000);
});

Deno.test("a page whose connection ends is dropped by the feed within about a second", async () => {
  await using srv = await startTestServer();
  const feed = new LiveFeed(srv.server);
  await using http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (req) => feed.respond(req),
  );
  const abort = new AbortController();
  const res = await fetch(`http://127.0.0.1:${http.addr.port}/events`, { signal: abort.signal });
  const events = new Events(res.body!);
  assert.equal((await events.next())?.event, "reset");
  assert.equal(feed.clients, 1);
  abort.abort();
  await events.cancel();
  // The server sees it when it next writes (a stats event goes out every second).
  await until(() => feed.clients === 0, "the feed to drop the page", 3000, 20);
  feed.close();
});

Deno.test({
  name: "with the etcd store the feed shows the locks of every server",
  ignore: !(await hasEtcd()),
  async fn() {
    const endpoints = await sharedEtcd();
    const prefix = `/tcpnetlock-test/web-${crypto.randomUUID().slice(0, 8)}`;
    await using a = await startTestServer({ etcd: { endpoints, prefix } });
    await using b = await startTestServer({ etcd: { endpoints, prefix } });
    const feed = new LiveFeed(a.server, { store: "etcd" });
    const events = new Events(feed.respond(new Request("http://x/events")).body!);
    try {
      await events.until((e) => e.event === "update", 3000);
      await using h = await RawClient.connect(b.port);
      assert.equal(await h.request("lock,name:shared-x,client-id:on-b"), "ok");
      await using w = await RawClient.connect(b.port);
      assert.equal(
        await w.request("lock,name:shared-x,client-id:waits-on-b,wait:10"),
        "queued,position:1",
      );
      await events.until(
        (e) =>
          upserts(e).some((d) =>
            d.name === "shared-x" && d.holders[0]?.client_id === "on-b" &&
            d.queue[0]?.client_id === "waits-on-b"
          ),
        3000,
      );
    } finally {
      await events.cancel();
      feed.close();
    }
  },
});

Deno.test("docs/web.md: its server command and its curl commands work as written", async () => {
  const doc = await Deno.readTextFile(`${ROOT}docs/web.md`);
  const samples = [...doc.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1].trim());
  const serverLine = samples.find((s) => s.startsWith("deno run -A server.ts"))!;
  const curls = samples.filter((s) => s.startsWith("curl "));
  assert.equal(curls.length, 2);
  // The documented flags, on free ports (startServerProcess adds --port 0).
  const args = serverLine.replace("deno run -A server.ts", "").trim().split(/\s+/)
    .map((a) => a.replace(":7655", ":0"));
  const token = "doc-token";
  for (const [i, curl] of curls.entries()) {
    const env = i === 0 ? undefined : { TCPNETLOCK_AUTH_TOKEN: token };
    await using proc = await startServerProcess(args, { env });
    const port = /:(\d+)\s*$/.exec((await proc.waitForLog(/http listening on/)).trim())![1];
    const out = await new Deno.Command("sh", {
      args: ["-c", `timeout 2 ${curl.replace(":7655", `:${port}`)}; true`],
      env: { TCPNETLOCK_AUTH_TOKEN: token },
      stdout: "piped",
      stderr: "null",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    assert.match(text, /^event: reset\ndata: \{"t":\d+/, curl);
    assert.match(text, /event: stats\ndata: /, curl);
  }
});

Deno.test("a page that does not read is dropped once its backlog passes the limit", async () => {
  await using srv = await startTestServer();
  const feed = new LiveFeed(srv.server, { intervalMs: 0, maxBufferedBytes: 4096 });
  const res = feed.respond(new Request("http://x/events"));
  const clients: RawClient[] = [];
  try {
    // Nobody reads the body; changes pile up until the feed gives up on it.
    for (let i = 0; i < 200 && feed.clients > 0; i++) {
      const c = await RawClient.connect(srv.port);
      clients.push(c);
      assert.equal(await c.request(`lock,name:pile-${i},client-id:c${i}`), "ok");
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.equal(feed.clients, 0);
    await assert.rejects(res.body!.getReader().read());
  } finally {
    for (const c of clients) c.close();
    feed.close();
  }
});

Deno.test("/events shows each holder's and waiter's mode: shared readers, an exclusive writer", async () => {
  await using srv = await startTestServer();
  await using r1 = await RawClient.connect(srv.port);
  await using r2 = await RawClient.connect(srv.port);
  await using w = await RawClient.connect(srv.port);
  assert.match(await r1.request("lock,name:data,client-id:r1,mode:shared") ?? "", /^ok,token:/);
  assert.match(await r2.request("lock,name:data,client-id:r2,mode:shared") ?? "", /^ok,token:/);
  assert.equal(await w.request("lock,name:data,client-id:w,wait:10"), "queued,position:1");
  const feed = new LiveFeed(srv.server);
  const events = new Events(feed.respond(new Request("http://x/events")).body!);
  try {
    type Moded = { name: string; holders: { mode?: string }[]; queue: { mode?: string }[] };
    const seen = await events.until((e) => upserts(e).some((d) => d.name === "data"), 2000);
    const d = (seen[seen.length - 1].data.upsert as Moded[]).find((x) => x.name === "data")!;
    assert.deepEqual(d.holders.map((h) => h.mode), ["shared", "shared"]);
    assert.deepEqual(d.queue.map((q) => q.mode), ["exclusive"]);
  } finally {
    await events.cancel();
  }
  feed.close();
});
