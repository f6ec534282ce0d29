// The fault-injecting etcd proxy of the tests (tests/_util/etcd_proxy.ts), against a real etcd
// member: every rule does what it says, the log and its events tell the truth, and closing it
// stops everything. Skipped with a warning when no etcd is installed.

import assert from "node:assert/strict";
import { hasEtcd, sharedEtcd } from "./etcd_util.ts";
import { startEtcdProxy } from "./_util/etcd_proxy.ts";
import { b64, etcdDeletePrefix, etcdRange, prefixRangeEnd } from "./_util/etcd_kv.ts";

const ETCD = await hasEtcd();
if (!ETCD) console.warn("etcd is not installed (apt-get install etcd-server): skipping");

function newPrefix(): string {
  return `/tcpnetlock-proxy-test/${crypto.randomUUID().slice(0, 8)}/`;
}

const decoder = new TextDecoder();

/** One POST through `client`; the status and the body (parsed when JSON). */
async function post(
  client: Deno.HttpClient,
  base: string,
  path: string,
  body: unknown,
): Promise<{ status: number; json: Record<string, unknown> | undefined; text: string }> {
  const res = await fetch(base + path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    client,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let json: Record<string, unknown> | undefined;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, json, text };
}

function put(client: Deno.HttpClient, base: string, key: string, value = "v") {
  return post(client, base, "/v3/kv/put", { key: b64(key), value: b64(value) });
}

/** Settles-tracking: `settled` turns true once the promise settles (for "not yet" checks). */
function track<T>(p: Promise<T>): { promise: Promise<T>; settled: () => boolean } {
  let done = false;
  const promise = p.finally(() => done = true);
  promise.catch(() => {});
  return { promise, settled: () => done };
}

/** A watch through the gateway: reads its JSON lines one by one. */
class Watch implements AsyncDisposable {
  readonly #abort = new AbortController();
  #reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  #text = "";
  readonly opened: Promise<void>;

  constructor(client: Deno.HttpClient, base: string, prefix: string) {
    this.opened = (async () => {
      const res = await fetch(base + "/v3/watch", {
        method: "POST",
        body: JSON.stringify({
          create_request: { key: b64(prefix), range_end: b64(prefixRangeEnd(prefix)) },
        }),
        client,
        signal: this.#abort.signal,
      });
      assert.equal(res.status, 200);
      this.#reader = res.body!.getReader();
    })();
    this.opened.catch(() => {});
  }

  /** The next response's `result`, or null when the stream ended. */
  async next(): Promise<Record<string, unknown> | null> {
    await this.opened;
    for (;;) {
      const nl = this.#text.indexOf("\n");
      if (nl >= 0) {
        const line = this.#text.slice(0, nl).trim();
        this.#text = this.#text.slice(nl + 1);
        if (line !== "") return JSON.parse(line).result;
        continue;
      }
      const { value, done } = await this.#reader!.read();
      if (done) return null;
      this.#text += decoder.decode(value, { stream: true });
    }
  }

  /** The keys of the events of the next response. */
  async nextKeys(): Promise<string[]> {
    const r = await this.next();
    assert.ok(r !== null, "the watch stream ended");
    const events = (r.events as { kv: { key: string } }[] | undefined) ?? [];
    return events.map((e) => atob(e.kv.key));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#abort.abort();
    await this.opened.catch(() => {});
    await this.#reader?.cancel().catch(() => {});
  }
}

Deno.test({
  name: "etcd proxy: passes requests through and logs them, with their keys decoded",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    const r1 = await put(client, proxy.url, prefix + "a");
    assert.equal(r1.status, 200);
    const txn = await post(client, proxy.url, "/v3/kv/txn", {
      compare: [{ key: b64(prefix + "b"), target: "CREATE", create_revision: "0" }],
      success: [
        { request_put: { key: b64(prefix + "b"), value: b64("x") } },
        { request_range: { key: b64(prefix), range_end: b64(prefixRangeEnd(prefix)) } },
      ],
      failure: [],
    });
    assert.equal(txn.json?.succeeded, true);
    const del = await post(client, proxy.url, "/v3/kv/deleterange", { key: b64(prefix + "a") });
    assert.equal(del.json?.deleted, "1");
    // What etcd holds is what went through.
    assert.deepEqual((await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key), [prefix + "b"]);
    // The log: paths, keys, states, revisions; waits find past entries at once.
    const entries = proxy.log.map((e) => [e.path, e.puts, e.deletes, e.state]);
    assert.deepEqual(entries, [
      ["/v3/kv/put", [prefix + "a"], [], "delivered"],
      ["/v3/kv/txn", [prefix + "b"], [], "delivered"],
      ["/v3/kv/deleterange", [], [prefix + "a"], "delivered"],
    ]);
    assert.deepEqual(proxy.log[1].keys, [prefix + "b", prefix]);
    const t = await proxy.waitFor({ path: "/v3/kv/txn", put: prefix });
    assert.equal(t.seq, 2);
    assert.equal(t.revision, Number((txn.json!.header as { revision: string }).revision));
    assert.equal(proxy.count({ delete: prefix }), 1);
    assert.equal(proxy.count(), 3);
    await assert.rejects(
      proxy.waitFor({ put: prefix, path: "/v3/kv/put" }, { after: proxy.mark(), timeoutMs: 50 }),
      /timed out after 50 ms waiting for put \/tcpnetlock-proxy-test\/.*, path \/v3\/kv\/put/,
    );
  },
});

Deno.test({
  name: "etcd proxy: a watch stream is relayed as it comes, and logged",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    await using watch = new Watch(client, proxy.url, prefix);
    assert.equal((await watch.next())?.created, true);
    assert.equal(proxy.openWatches, 1);
    for (const k of ["k1", "k2"]) {
      await put(client, etcd, prefix + k);
      assert.deepEqual(await watch.nextKeys(), [prefix + k]);
    }
    const m = await proxy.waitForWatch((m) => m.events.some((e) => e.key === prefix + "k2"));
    assert.equal(m.delivered, true);
    assert.equal(m.stream, proxy.log.find((e) => e.path === "/v3/watch")!.seq);
    assert.ok(m.revision > 0);
  },
});

Deno.test({
  name: "etcd proxy: hangAfterForward: etcd applies the request, the answer never comes",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    const hang = proxy.hangAfterForward({ put: prefix + "hung" }, { times: 1 });
    // (The client's first request, on a new connection: Deno's fetch does not send it again when
    // that connection closes without an answer, as it does on a reused one.)
    const first = track(put(client, proxy.url, prefix + "hung"));
    const e = await proxy.waitFor({ put: prefix + "hung" }, { until: "withheld" });
    await hang.hit(1);
    // Applied in etcd, yet the client has no answer.
    assert.deepEqual((await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key), [prefix + "hung"]);
    assert.equal(first.settled(), false);
    // Other requests (on other connections) pass; `times: 1` caught only the first.
    assert.equal((await put(client, proxy.url, prefix + "hung")).status, 200);
    assert.equal(first.settled(), false);
    // Lifted: the held connection is closed without an answer.
    hang.lift();
    await assert.rejects(first.promise);
    assert.equal(e.state, "dropped");
    assert.equal(e.forwarded, true);

    // With onLift "deliver", the answer comes late.
    const late = proxy.hangAfterForward({ put: prefix + "late" }, { onLift: "deliver" });
    const second = track(put(client, proxy.url, prefix + "late"));
    await late.hit(1);
    await proxy.waitFor({ put: prefix + "late" }, { until: "withheld" });
    assert.equal(second.settled(), false);
    late.lift();
    assert.equal((await second.promise).status, 200);
  },
});

Deno.test({
  name:
    "etcd proxy: stallWatch silences open streams (new ones only if asked); lifting loses nothing",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    await using old = new Watch(client, proxy.url, prefix);
    assert.equal((await old.next())?.created, true);
    const stall = proxy.stallWatch();
    assert.equal(stall.hits, 1);
    const pending = track(old.nextKeys());
    await put(client, etcd, prefix + "s1");
    // The proxy has etcd's response in hand and keeps it; the client saw nothing.
    const kept = await proxy.waitForWatch((m) => m.events.some((e) => e.key === prefix + "s1"));
    assert.equal(kept.delivered, false);
    assert.equal(pending.settled(), false);
    // A watch opened now is not stalled (newWatches: false), and sees the next write.
    await using fresh = new Watch(client, proxy.url, prefix);
    assert.equal((await fresh.next())?.created, true);
    await put(client, etcd, prefix + "s2");
    assert.deepEqual(await fresh.nextKeys(), [prefix + "s2"]);
    assert.equal(pending.settled(), false);
    // Lifted: the old stream goes on from where it stopped.
    stall.lift();
    assert.deepEqual(await pending.promise, [prefix + "s1"]);
    assert.deepEqual(await old.nextKeys(), [prefix + "s2"]);
    assert.equal(kept.delivered, true);

    // newWatches: true: a watch opened during the rule gets nothing, not even its headers.
    const all = proxy.stallWatch({ newWatches: true });
    const stalled = new Watch(client, proxy.url, prefix);
    const opened = track(stalled.opened);
    await all.hit(3); // the two open streams and the new one
    const created = await proxy.waitForWatch((m) => m.created && m.stream === proxy.mark());
    assert.equal(created.delivered, false);
    assert.equal(opened.settled(), false);
    all.lift();
    await opened.promise;
    assert.equal((await stalled.next())?.created, true);
    await stalled[Symbol.asyncDispose]();
  },
});

Deno.test({
  name:
    "etcd proxy: fail answers with a 503, a gRPC error or a closed connection, never forwarding",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    {
      using _ = proxy.fail({ path: "/v3/kv/put" }, "http503");
      const r = await put(client, proxy.url, prefix + "a");
      assert.equal(r.status, 503);
      assert.equal(r.json, undefined);
    }
    {
      using _ = proxy.fail({ put: prefix }, { grpcCode: 14, message: "etcdserver: no leader" });
      const r = await put(client, proxy.url, prefix + "b");
      assert.equal(r.status, 503);
      assert.deepEqual(r.json, {
        error: "etcdserver: no leader",
        code: 14,
        message: "etcdserver: no leader",
      });
    }
    {
      // Deno's fetch sends a request once more when its connection ends without an answer:
      // both attempts are caught.
      using reset = proxy.fail({ put: prefix + "c" }, "reset");
      await assert.rejects(put(client, proxy.url, prefix + "c"));
      assert.ok(reset.hits >= 1);
    }
    {
      using once = proxy.fail({ put: prefix }, "http503", { times: 1 });
      assert.equal((await put(client, proxy.url, prefix + "d")).status, 503);
      assert.equal(once.active, false);
      // times: 1: the next one passes.
      assert.equal((await put(client, proxy.url, prefix + "d")).status, 200);
    }
    // None of the failed ones reached etcd.
    assert.deepEqual((await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key), [prefix + "d"]);
    assert.deepEqual(proxy.log.at(-1)!.state, "delivered");
    assert.ok(proxy.log.slice(0, -1).every((e) => e.state === "failed" && !e.forwarded));
    assert.equal(proxy.count({ put: prefix }, "forwarded"), 1);
  },
});

Deno.test({
  name: "etcd proxy: cut hangs every request (or refuses it) until restore",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    await using watch = new Watch(client, proxy.url, prefix);
    assert.equal((await watch.next())?.created, true);

    // "hang": kept from etcd; restore({ drop: false }) lets it go on.
    proxy.cut();
    assert.equal(proxy.isCut, true);
    const held = track(put(client, proxy.url, prefix + "held"));
    const e = await proxy.waitFor({ put: prefix + "held" }, { until: "held" });
    assert.equal((await etcdRange(etcd, prefix)).kvs.length, 0);
    assert.equal(held.settled(), false);
    proxy.restore({ drop: false });
    assert.equal((await held.promise).status, 200);
    assert.equal(e.state, "delivered");
    assert.deepEqual(await watch.nextKeys(), [prefix + "held"]);

    // "hang", then restore(): what was kept is dropped (its connection closed, never applied
    // on its way through the cut), open streams are closed.
    proxy.cut("hang");
    const lost = track(put(client, proxy.url, prefix + "lost"));
    const dropped = await proxy.waitFor({ put: prefix + "lost" }, { until: "held" });
    proxy.restore();
    // (Deno's fetch may send it once more, after the restore: then it passes.)
    await lost.promise.catch(() => {});
    assert.equal(dropped.state, "dropped");
    assert.equal(dropped.forwarded, false);
    assert.equal(await watch.next().catch(() => null), null);
    await etcdDeletePrefix(etcd, prefix + "lost");

    // "refuse": connections are closed at once; after restore, requests pass again.
    proxy.cut("refuse");
    await assert.rejects(put(client, proxy.url, prefix + "refused"));
    assert.equal(proxy.count({ put: prefix + "refused" }, "forwarded"), 0);
    proxy.restore();
    assert.equal((await put(client, proxy.url, prefix + "after")).status, 200);
    assert.deepEqual((await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key), [
      prefix + "held",
      prefix + "after",
    ]);
  },
});

Deno.test({
  name: "etcd proxy: delay makes etcd apply a request after one sent later",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    using slow = proxy.delay({ put: prefix }, 200, { times: 1 });
    const first = put(client, proxy.url, prefix + "first");
    await proxy.waitFor({ put: prefix + "first" }, { until: "received" });
    await slow.hit(1);
    const second = await put(client, proxy.url, prefix + "second");
    const r1 = await first;
    const rev = (r: typeof r1) => Number((r.json!.header as { revision: string }).revision);
    assert.ok(rev(second) < rev(r1), `second ${rev(second)}, first ${rev(r1)}`);
    assert.equal(proxy.log[0].delayedMs, 200);
    assert.deepEqual((await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key), [
      prefix + "second",
      prefix + "first",
    ]);
  },
});

Deno.test({
  name: "etcd proxy: closing it ends held requests and open streams, and stops listening",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const proxy = await startEtcdProxy(etcd);
    using client = Deno.createHttpClient({});
    const watch = new Watch(client, proxy.url, prefix);
    assert.equal((await watch.next())?.created, true);
    proxy.stallWatch();
    proxy.hangAfterForward({ put: prefix });
    const hung = track(put(client, proxy.url, prefix + "x"));
    await proxy.waitFor({ put: prefix }, { until: "withheld" });
    proxy.delay({ put: prefix + "slow" }, 60_000);
    const slow = track(put(client, proxy.url, prefix + "slow"));
    await proxy.waitFor({ put: prefix + "slow" }, { until: "received" });
    // Waits still pending end at once when it closes (no timer left behind).
    const never = assert.rejects(
      proxy.waitFor({ put: prefix + "never" }, { timeoutMs: 60_000 }),
      /etcd proxy: closed/,
    );
    const neverHit = assert.rejects(
      proxy.fail({ put: prefix + "never" }, "reset").hit(1, 60_000),
      /etcd proxy: closed/,
    );
    await proxy.close();
    await never;
    await neverHit;
    await assert.rejects(hung.promise);
    await assert.rejects(slow.promise);
    assert.equal(await watch.next().catch(() => null), null);
    await watch[Symbol.asyncDispose]();
    await assert.rejects(put(client, proxy.url, prefix + "y"));
    assert.deepEqual(
      proxy.log.map((e) => e.state),
      ["dropped", "dropped", "dropped"],
    );
  },
});
