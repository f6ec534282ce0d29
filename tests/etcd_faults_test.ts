/**
 * The etcd store under faults between a server and a real etcd (issue 11): one test per defect
 * of the store, each through the fault-injecting proxy of tests/_util/etcd_proxy.ts, asserting
 * what the store must do; then a churn on two server processes sharing one etcd, cut off from it
 * and SIGKILLed mid-run. Skipped with a warning when no etcd is installed.
 *
 * Every wait here is an event (a reply line, a request seen by the proxy) or a bounded poll of
 * what only polling can see (etcd's keys); the one observation window (defect 4) is bounded.
 *
 * @module
 */

import assert from "node:assert/strict";
import { hasEtcd, sharedEtcd } from "./etcd_util.ts";
import { type EtcdProxy, startEtcdProxy } from "./_util/etcd_proxy.ts";
import { etcdRange } from "./_util/etcd_kv.ts";
import { RawClient, startTestServer, type TestServer, until } from "./test_util.ts";
import {
  delay,
  LineConn,
  query,
  rng,
  type ServerChild,
  spawnServer,
  within,
} from "./fault_util.ts";
import type { LockInfo } from "../lib/protocol.ts";

const ETCD = await hasEtcd();
if (!ETCD) console.warn("etcd is not installed (apt-get install etcd-server): skipping");

function newPrefix(): string {
  return `/tcpnetlock-faults/${crypto.randomUUID().slice(0, 8)}`;
}

function token(reply: string | null, who = "the request"): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  assert.ok(m, `expected ok,token:T for ${who}, got ${JSON.stringify(reply)}`);
  return Number(m[1]);
}

/** The next reply of `c` that is not a `queued` line (null: closed), within `ms`. */
async function finalReply(c: RawClient, ms: number, what: string): Promise<string | null> {
  const reading = (async () => {
    for (;;) {
      const l = await c.line();
      if (l === null || !l.startsWith("queued,")) return l;
    }
  })();
  reading.catch(() => {});
  return await within(reading, ms, what);
}

/** An in-process server whose etcd is reached through `proxy` (or directly, given a URL). */
async function serverVia(
  via: EtcdProxy | string,
  prefix: string,
  options: { leaseTtl?: number; timeoutMs?: number } = {},
): Promise<TestServer> {
  const endpoint = typeof via === "string" ? via : via.url;
  return await startTestServer({
    etcd: { endpoints: [endpoint], prefix, leaseTtl: options.leaseTtl ?? 10, ...options },
  });
}

/** The keys etcd holds under `prefix` (read directly, not through a server or the proxy). */
async function keysIn(etcd: string, prefix: string): Promise<string[]> {
  return (await etcdRange(etcd, prefix)).kvs.map((kv) => kv.key);
}

// --- 1. Two holders across mixed limits

Deno.test({
  name: "etcd store: a refused limit:3 request whose key outlives the refusal lets no limit:3 " +
    "request in while a limit:1 waiter waits (never two holders across mixed limits)",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const name = "mixed";
    const keys = `${prefix}/${name}/`;
    await using proxy = await startEtcdProxy(etcd);
    await using a = await serverVia(etcd, prefix);
    // The server of the refused request: cut off from etcd right after its write.
    // (S closes while still cut off: closing a server while it recovers its lease is not what
    // this test is about.)
    await using s = await serverVia(proxy, prefix, { leaseTtl: 2, timeoutMs: 500 });
    await using h = await RawClient.connect(a.port);
    const tH = token(await h.request(`lock,name:${name},wait:0,client-id:h`), "h");

    // R (limit:3) on S: etcd applies its transaction (the key is written, the request is
    // refused: H holds with limit 1), but S never hears back and is cut off before it can
    // delete the key. The key lives on until S's lease runs out in etcd.
    using hang = proxy.hangAfterForward({ path: "/v3/kv/txn", put: keys }, { times: 1 });
    await using r = await RawClient.connect(s.port);
    await r.write(`lock,name:${name},limit:3,wait:0,client-id:r\n`);
    const rAnswer = r.line();
    rAnswer.catch(() => {});
    const first = await Promise.race([
      proxy.waitFor({ put: keys }, { until: "withheld", timeoutMs: 15_000 }).then(() => null),
      rAnswer,
    ]);
    if (first !== null) {
      // A store that refuses R without writing a key leaves nothing to outlive the refusal.
      assert.equal(first, "err,limit mismatch");
      assert.equal((await keysIn(etcd, keys)).length, 1, "only H's key is in etcd");
      return;
    }
    await hang.hit(1);
    proxy.cut();
    assert.equal((await keysIn(etcd, keys)).length, 2, "H's key and R's key are in etcd");

    // W (limit:1) waits on A, then H lets go.
    await using w = await RawClient.connect(a.port);
    const wFirst = await w.request(`lock,name:${name},wait:30,client-id:w`);
    assert.match(wFirst ?? "", /^(queued,position:\d+|err,limit mismatch)$/, "w");
    assert.equal(await h.request("release"), "released");

    // L (limit:3), later, on A: a limit:1 request waits, so L must not be granted.
    await using l = await RawClient.connect(a.port);
    const lReply = await l.request(`lock,name:${name},limit:3,wait:0,client-id:l`);
    const lHolds = /^ok,/.test(lReply ?? "");

    // W is granted once R's key is gone (S's lease ran out); L, if granted, still holds.
    let wReply: string | null = wFirst;
    if (wFirst?.startsWith("queued,")) {
      wReply = await finalReply(w, 20_000, "W's grant after the stale key went");
    }
    const wHolds = /^ok,/.test(wReply ?? "");
    // (A store may refuse W outright, seeing the stale limit:3 key ahead of it, as the memory
    // store refuses a limit:1 request behind a limit:3 one: then no limit:1 request waits
    // and L may be granted.)
    const wWaited = wFirst?.startsWith("queued,") ?? false;
    assert.deepEqual(
      { lGrantedWhileWWaited: lHolds && wWaited, twoHolders: lHolds && wHolds },
      { lGrantedWhileWWaited: false, twoHolders: false },
      `L (limit:3) got ${lReply} while W (limit:1) waited; then W got ${wReply}: ` +
        (lHolds && wHolds ? "two holders of a limit:1 lock" : "a grant across mixed limits"),
    );
    if (wFirst?.startsWith("queued,")) {
      const tW = token(wReply, "w");
      assert.ok(tW > tH, `W's token ${tW} after H's ${tH}`);
      assert.equal(await w.request("release"), "released");
    }
  },
});

// --- 2. A silently stalled watch on a server whose only claims are waiters

Deno.test({
  name: "etcd store: a waiter is granted although its server's watch stalled silently " +
    "(the stall is seen in the revisions of the lease keep-alives, the watch reconnected)",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const keys = `${prefix}/stall/`;
    await using proxy = await startEtcdProxy(etcd);
    await using a = await serverVia(proxy, prefix, { leaseTtl: 2 });
    await using b = await serverVia(etcd, prefix);
    await using h = await RawClient.connect(b.port);
    const tH = token(await h.request("lock,name:stall,wait:0"), "h");
    await using w = await RawClient.connect(a.port);
    assert.equal(await w.request("lock,name:stall,wait:10"), "queued,position:1");
    // A's watch has delivered W's own key: A's view was up to date when the stream went silent.
    const txn = await proxy.waitFor({ path: "/v3/kv/txn", put: keys });
    const wKey = txn.puts.find((k) => k.startsWith(keys))!;
    await proxy.waitForWatch((m) => m.delivered && m.events.some((e) => e.key === wKey));
    using stall = proxy.stallWatch();
    assert.ok(stall.hits >= 1, "A's watch stream is stalled");
    const mark = proxy.mark();
    // The lock is freed on B; A hears nothing of it on its watch.
    assert.equal(await h.request("release"), "released");
    const reply = await finalReply(w, 20_000, "the waiter's answer");
    const tW = token(reply, "the waiter on the server with the stalled watch");
    assert.ok(tW > tH);
    assert.ok(
      proxy.count((e) => e.path === "/v3/watch" && e.seq > mark) >= 1,
      "the server opened a new watch",
    );
    assert.equal(await w.request("release"), "released");
  },
});

// --- 3. FIFO within one server

Deno.test({
  name: "etcd store: waiters arriving one after another on one server are granted in that " +
    "order, even when etcd would apply their writes in the reverse order",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const keys = `${prefix}/fifo/`;
    await using proxy = await startEtcdProxy(etcd);
    await using srv = await serverVia(proxy, prefix);
    await using h = await RawClient.connect(srv.port);
    token(await h.request("lock,name:fifo,wait:0"), "h");
    const waiters = [
      await RawClient.connect(srv.port),
      await RawClient.connect(srv.port),
      await RawClient.connect(srv.port),
    ];
    try {
      // w1's write reaches etcd 300 ms late, w2's 150 ms late, w3's at once: etcd would apply
      // them as w3, w2, w1. Each waiter asks once the server has acted on the one before (its
      // write reached the proxy), a millisecond or two later.
      const delays = [300, 150, 0];
      for (let i = 0; i < waiters.length; i++) {
        const mark = proxy.mark();
        using _ = proxy.delay({ path: "/v3/kv/txn", put: keys }, delays[i], { times: 1 });
        await waiters[i].write(`lock,name:fifo,wait:20,client-id:w${i + 1}\n`);
        if (i < waiters.length - 1) {
          await proxy.waitFor({ path: "/v3/kv/txn", put: keys }, {
            until: "received",
            after: mark,
          });
        }
      }
      const positions: number[] = [];
      for (const [i, w] of waiters.entries()) {
        const l = await within(w.line(), 10_000, `w${i + 1}'s first reply`);
        const m = /^queued,position:(\d+)$/.exec(l ?? "");
        assert.ok(m, `w${i + 1} got ${l}`);
        positions.push(Number(m[1]));
      }
      assert.equal(await h.request("release"), "released");
      const finals = waiters.map((w, i) =>
        finalReply(w, 30_000, `w${i + 1}'s grant`).then((line) => ({ i, line }))
      );
      const order: string[] = [];
      const left = new Set(finals);
      while (left.size > 0) {
        const { i, line } = await within(Promise.race(left), 15_000, "the next grant");
        left.delete(finals[i]);
        token(line, `w${i + 1}`);
        order.push(`w${i + 1}`);
        assert.equal(await waiters[i].request("release"), "released");
      }
      assert.deepEqual(
        { positions, order },
        { positions: [1, 2, 3], order: ["w1", "w2", "w3"] },
        "queue positions and grant order follow arrival order",
      );
    } finally {
      for (const w of waiters) w.close();
    }
  },
});

// --- 4. `released` only once the key is gone

Deno.test({
  name: "etcd store: release is answered released only once the key is gone from etcd " +
    "(deletes failing: no answer yet; deletes working again: released)",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const keys = `${prefix}/rel/`;
    await using proxy = await startEtcdProxy(etcd);
    await using srv = await serverVia(proxy, prefix, { timeoutMs: 500 });
    await using h = await RawClient.connect(srv.port);
    token(await h.request("lock,name:rel,wait:0"), "h");
    assert.equal((await keysIn(etcd, keys)).length, 1);
    const noDeletes = proxy.fail({ delete: keys }, "http503");
    try {
      await h.write("release\n");
      const reply = h.line();
      reply.catch(() => {});
      await noDeletes.hit(1);
      // Watch for a while (bounded): an answer may not come while the key is in etcd.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const early = await Promise.race([
        reply,
        new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), 4000)),
      ]);
      clearTimeout(timer);
      if (early !== undefined) {
        const still = await keysIn(etcd, keys);
        assert.deepEqual(
          still,
          [],
          `the server answered ${JSON.stringify(early)} to release while the lock's key was ` +
            `still in etcd (${noDeletes.hits} deletes failed)`,
        );
      }
      noDeletes.lift();
      const final = early ?? await within(reply, 15_000, "the answer once deletes work");
      assert.equal(final, "released");
      assert.deepEqual(await keysIn(etcd, keys), [], "the key is gone when released comes");
    } finally {
      noDeletes.lift();
    }
  },
});

// --- 5. Token order across names and servers

Deno.test({
  name: "etcd store: a token handed out later, on any name and any server, is larger than " +
    "every token handed out before",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    await using proxy = await startEtcdProxy(etcd);
    await using a = await serverVia(proxy, prefix);
    await using b = await serverVia(etcd, prefix);
    await using h = await RawClient.connect(a.port);
    const t1 = token(await h.request("lock,name:first,wait:0"), "h on first");
    await using w = await RawClient.connect(a.port);
    assert.equal(await w.request("lock,name:first,wait:30"), "queued,position:1");
    // Granted on another name and another server while W waits.
    await using x = await RawClient.connect(b.port);
    const t2 = token(await x.request("lock,name:second,wait:0"), "x on second");
    assert.ok(t2 > t1, `second token ${t2} after ${t1}`);
    assert.equal(await h.request("release"), "released");
    const t3 = token(await finalReply(w, 10_000, "W's grant"), "w on first");
    assert.ok(
      t3 > t2,
      `W was granted after X yet got token ${t3}, smaller than X's ${t2} (W queued before X)`,
    );
    assert.equal(await w.request("release"), "released");
    assert.equal(await x.request("release"), "released");
  },
});

// --- The churn: two server processes on one etcd, cut off and SIGKILLed mid-run

/** One grant as a client saw it; the interval is when the lock was surely held. */
interface Grant {
  name: string;
  limit: number;
  who: string;
  token: number;
  /** When the request was sent (the grant came after). */
  sent: number;
  /** When `ok` arrived (the grant came before). */
  start: number;
  /**
   * The send time of the last line the server answered as a holder would (`alive`,
   * `released`): the server still held it when it read that line. `start` when none was.
   */
  end: number;
}

/**
 * Violations among `grants`: more holders than the limit at once, holders with different
 * limits at once, or a token not larger than one granted before the request was sent.
 */
function grantViolations(grants: Grant[]): string[] {
  const out: string[] = [];
  const byName = new Map<string, Grant[]>();
  for (const g of grants) {
    const list = byName.get(g.name) ?? [];
    list.push(g);
    byName.set(g.name, list);
  }
  const show = (g: Grant) =>
    `${g.who}(limit ${g.limit}, token ${g.token}, ${g.start.toFixed(1)}..${g.end.toFixed(1)})`;
  for (const [name, list] of byName) {
    const events: [number, number, Grant][] = [];
    for (const g of list) if (g.end > g.start) events.push([g.start, 1, g], [g.end, -1, g]);
    events.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
    const open = new Set<Grant>();
    for (const [t, d, g] of events) {
      if (d < 0) {
        open.delete(g);
        continue;
      }
      open.add(g);
      const limits = new Set([...open].map((o) => o.limit));
      if (limits.size > 1 || open.size > g.limit) {
        out.push(`${name}: at ${t.toFixed(1)} held by ${[...open].map(show).join(", ")}`);
      }
    }
    // Tokens: a grant whose request was sent after another grant arrived has a larger token.
    const byStart = [...list].sort((x, y) => x.start - y.start);
    for (const g of list) {
      for (const e of byStart) {
        if (e.start >= g.sent) break;
        if (e !== g && e.token >= g.token) {
          out.push(`${name}: ${show(g)} asked after ${show(e)} was granted, smaller token`);
        }
      }
    }
  }
  return out;
}

Deno.test({
  name: "etcd churn: two servers sharing one etcd, limits 1 and 3 mixed, cut off from etcd and " +
    "SIGKILLed mid-run: never more holders than the limit, tokens increasing in grant order",
  ignore: !ETCD,
  async fn() {
    const [etcd] = await sharedEtcd();
    const prefix = newPrefix();
    const seed = Number(Deno.env.get("TCPNETLOCK_CHURN_SEED") ?? Date.now() % 100_000);
    const r = rng(seed);
    const proxies = [await startEtcdProxy(etcd), await startEtcdProxy(etcd)];
    const args = (i: number) => [
      "--store",
      "etcd",
      "--etcd-endpoints",
      proxies[i].url,
      "--etcd-prefix",
      prefix,
      "--etcd-lease-ttl",
      "2",
      "--etcd-timeout",
      "0.5",
    ];
    /** The running incarnation of each server (undefined while it is down). */
    const servers: (ServerChild | undefined)[] = [undefined, undefined];
    const incarnation = [0, 0];
    const start = async (i: number) => {
      servers[i] = await spawnServer(args(i));
      incarnation[i]++;
    };
    /**
     * SIGKILLs server `i` right after etcd applied a write of it whose answer it never got
     * (the proxy holds the answers back for a moment first, at most 2 s): a crash at the worst
     * moment, leaving a key that outlives its request until the server's lease runs out.
     */
    const kill = async (i: number) => {
      using hold = proxies[i].hangAfterForward({ path: "/v3/kv/txn" });
      await hold.hit(1, 2000).catch(() => {});
      const s = servers[i];
      servers[i] = undefined;
      incarnation[i]++;
      const status = await s?.stop("SIGKILL");
      assert.equal(status?.signal, "SIGKILL");
      if (hold.hits > 0) count("killed after an unanswered write");
    };
    const names = [
      { name: "one", limits: [1] },
      { name: "three", limits: [3] },
      { name: "mixed", limits: [1, 3] },
    ];
    const grants: Grant[] = [];
    const problems: string[] = [];
    const counts: Record<string, number> = {};
    const count = (k: string) => counts[k] = (counts[k] ?? 0) + 1;
    const durationMs = 12_000;
    let end = Infinity;

    const client = async (id: number) => {
      const cr = rng(seed * 100 + id);
      for (let round = 0; performance.now() < end; round++) {
        const who = `c${id}.${round}`;
        const up = [0, 1].filter((i) => servers[i] !== undefined);
        if (up.length === 0) {
          await delay(20);
          continue;
        }
        const i = up[Math.floor(cr() * up.length)];
        const srv = servers[i]!;
        const life = incarnation[i];
        const died = () => incarnation[i] !== life;
        const n = names[Math.floor(cr() * names.length)];
        const limit = n.limits[Math.floor(cr() * n.limits.length)];
        const wait = [0, 0.2, 1, 3][Math.floor(cr() * 4)];
        let c: LineConn;
        try {
          c = await LineConn.connect(srv.port);
        } catch {
          if (!died()) problems.push(`${who}: cannot connect to server ${i}`);
          continue;
        }
        try {
          const sent = performance.now();
          await c.send(`lock,name:${n.name},limit:${limit},wait:${wait},client-id:${who}`);
          let reply: string | null;
          do {
            reply = await within(c.line(), (wait + 6) * 1000, `${who}'s answer`);
          } while (reply !== null && reply.startsWith("queued,"));
          if (reply === null) {
            if (died()) count("server killed (waiting)");
            else problems.push(`${who}: closed without an answer by server ${i}`);
            continue;
          }
          if (!reply.startsWith("ok,")) {
            if (
              !["not-granted", "timeout", "err,limit mismatch", "err,store unavailable"]
                .includes(reply)
            ) problems.push(`${who}: unexpected ${reply}`);
            count(reply);
            // A server cut off from etcd answers at once: don't spin on it.
            if (reply === "err,store unavailable") await delay(50);
            continue;
          }
          const g: Grant = {
            name: n.name,
            limit,
            who: `${who}@s${i}`,
            token: Number(/token:(\d+)/.exec(reply)?.[1] ?? 0),
            sent,
            start: performance.now(),
            end: 0,
          };
          g.end = g.start;
          grants.push(g);
          count("granted");
          // Hold (some long enough for a fault to strike), showing now and then that it is
          // still held, then let go (release or close).
          const kind = cr();
          const holdMs = kind < 0.1
            ? 1000 + cr() * 2000
            : kind < 0.25
            ? 200 + cr() * 600
            : cr() * 30;
          const steps = 1 + Math.floor(cr() * 3);
          let lost = false;
          for (let k = 0; k < steps && !lost; k++) {
            await delay(holdMs / steps);
            const t1 = performance.now();
            await c.send(".keepalive");
            const a = await within(c.line(), 5000, `${who}'s keepalive`);
            if (a === "alive") g.end = t1;
            else {
              lost = true;
              if (a === null) count(died() ? "server killed (holding)" : "closed while holding");
              else if (a === "expired") count("expired");
              else problems.push(`${who}: keepalive got ${a}`);
            }
          }
          if (lost) continue;
          if (cr() < 0.3) {
            count("closed");
            continue;
          }
          const t2 = performance.now();
          await c.send("release");
          const rel = await within(c.line(), 10_000, `${who}'s release`);
          if (rel === "released") {
            g.end = t2;
            count("released");
          } else if (rel === "expired" || (rel === null && died())) count(`release: ${rel}`);
          else problems.push(`${who}: release got ${rel} from server ${i}`);
        } catch (err) {
          problems.push(`${who}: ${err instanceof Error ? err.message : err}`);
        } finally {
          c.close();
        }
      }
    };

    try {
      await Promise.all([start(0), start(1)]);
      const t0 = performance.now();
      end = t0 + durationMs;
      const at = (ms: number) => delay(Math.max(0, t0 + ms - performance.now()));
      const jitter = () => Math.floor(r() * 500);
      const faults = Promise.all([
        (async () => {
          // Server 0 cut off from etcd (silently), longer than its lease, then back; later
          // SIGKILLed and started again.
          await at(1500 + jitter());
          proxies[0].cut("hang");
          await at(5000 + jitter());
          proxies[0].restore();
          await at(8000 + jitter());
          await kill(0);
          await at(9000 + jitter());
          await start(0);
        })(),
        (async () => {
          // Server 1 SIGKILLed and started again; later cut off (etcd refuses it), then back.
          await at(3000 + jitter());
          await kill(1);
          await at(4000 + jitter());
          await start(1);
          await at(7000 + jitter());
          proxies[1].cut("refuse");
          await at(9500 + jitter());
          proxies[1].restore();
        })(),
      ]);
      await Promise.all([faults, ...Array.from({ length: 12 }, (_, id) => client(id))]);
      const violations = grantViolations(grants);
      console.log(
        `  seed ${seed}: ${grants.length} grants; ${JSON.stringify(counts)}`,
      );
      assert.deepEqual(
        { violations: violations.slice(0, 5), problems: problems.slice(0, 5) },
        { violations: [], problems: [] },
        `seed ${seed}: ${violations.length} violations, ${problems.length} problems`,
      );
      assert.ok(grants.length > 50, `only ${grants.length} grants (seed ${seed})`);
      assert.ok((counts["err,limit mismatch"] ?? 0) > 0, "the mixed limits met");
      assert.ok((counts["err,store unavailable"] ?? 0) > 0, "clients met a server cut off");
      // Afterwards nothing is held or waited on (the dead servers' keys ran out with their
      // leases): only polling can see it.
      await until(
        async () => (await query<LockInfo[]>(servers[0]!.port, ".locks")).length === 0,
        "every lock to be free after the churn",
        15_000,
        100,
      );
    } finally {
      for (let i = 0; i < 2; i++) await servers[i]?.stop("SIGKILL");
      for (const p of proxies) await p.close();
    }
  },
});
