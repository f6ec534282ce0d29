// The etcd store: several tcpnetlock servers on one etcd share one set of locks. Real etcd
// members on loopback (tests/etcd_util.ts); skipped with a warning when no etcd is installed.

import assert from "node:assert/strict";
import {
  b64,
  EtcdClient,
  parseLeaseId,
  parseRevision,
  prefixEnd,
  unb64,
} from "../lib/etcd/client.ts";
import { encodeInfo, parseInfo } from "../lib/etcd/keys.ts";
import { etcdBinary, freePort, hasEtcd, sharedEtcd, startEtcd } from "./etcd_util.ts";
import {
  exchange,
  makeTlsFixture,
  RawClient,
  ROOT,
  startServerProcess,
  startTestServer,
  type TestServer,
} from "./test_util.ts";

const ETCD = await hasEtcd();
if (!ETCD) console.warn("etcd is not installed (apt-get install etcd-server): skipping");

function token(reply: string | null): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  assert.ok(m, `expected ok,token:T, got ${reply}`);
  return Number(m[1]);
}

function newPrefix(): string {
  return `/tcpnetlock-test/${crypto.randomUUID().slice(0, 8)}`;
}

/** An in-process server on the shared etcd, under `prefix`. */
async function etcdServer(prefix: string, leaseTtl = 10): Promise<TestServer> {
  return await startTestServer({ etcd: { endpoints: await sharedEtcd(), prefix, leaseTtl } });
}

/** Resolves with the time the promise settled, for measuring; rejects after `ms` (a bound). */
async function timed<T>(p: Promise<T>, ms = 15_000): Promise<[T, number]> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const v = await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
      }),
    ]);
    return [v, performance.now()];
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("etcd client: numbers are parsed safely, lease ids stay strings, keys go base64", () => {
  assert.equal(parseRevision("12345"), 12345);
  assert.equal(parseRevision(undefined), 0);
  assert.equal(parseRevision(String(Number.MAX_SAFE_INTEGER)), Number.MAX_SAFE_INTEGER);
  assert.throws(() => parseRevision("9007199254740993"), /too large/);
  assert.throws(() => parseRevision("-1"), /Malformed/);
  assert.throws(() => parseRevision("1e3"), /Malformed/);
  // A real lease id from etcd: above 2^53, where Number() would round it.
  assert.equal(parseLeaseId("7587873478298458378"), "7587873478298458378");
  assert.notEqual(String(Number("7587873478298458378")), "7587873478298458378");
  assert.equal(prefixEnd("/tcpnetlock/db/"), "/tcpnetlock/db0");
  assert.equal(unb64(b64("/tcpnetlock/ünï")), "/tcpnetlock/ünï");
  // The quick paths (ASCII, short numbers, the same lease again) agree with the long ones.
  assert.equal(b64("/t/x/s1-~0"), btoa("/t/x/s1-~0"));
  assert.equal(b64("ü"), "w7w=", "UTF-8 bytes, not Latin-1");
  assert.equal(unb64("w7w="), "ü");
  assert.equal(prefixEnd("/a/ü"), "/a/ý", "the last UTF-8 byte + 1");
  assert.equal(parseRevision("999999999999999"), 999999999999999);
  assert.equal(parseRevision("0000000000000007"), 7);
  assert.equal(parseLeaseId("7587873478298458378"), "7587873478298458378");
  assert.equal(parseLeaseId("7587873478298458378"), "7587873478298458378");
  for (const bad of ["", null, "-", "12a"]) assert.throws(() => parseLeaseId(bad), /Malformed/);
});

Deno.test("etcd keys: a value leaves out what reads back as its default, and reads back whole", () => {
  const since = "2026-12-02T12:00:00.000Z";
  const plain = { owner: "s1-7", slot: 0, limit: 1, client_id: "", remote: "127.0.0.1:5", since };
  const text = encodeInfo(plain);
  // etcd's gateway parses, stores and sends to every watch each byte of every value.
  assert.equal(text, `{"owner":"s1-7","remote":"127.0.0.1:5","since":"${since}"}`);
  assert.deepEqual(parseInfo(text), { ...plain, granted: undefined });
  const full = {
    owner: 's1-"8"',
    slot: 3,
    limit: 2,
    mode: "shared" as const,
    client_id: "job ü",
    remote: "[::1]:9",
    since,
    granted: true,
  };
  assert.deepEqual(parseInfo(encodeInfo(full)), full);
  assert.deepEqual(JSON.parse(encodeInfo(full)), full, "plain JSON, as older servers read it");
});

Deno.test({
  name: "two servers on one etcd: a lock held through one is refused through the other",
  ignore: !ETCD,
  async fn() {
    const prefix = newPrefix();
    await using a = await etcdServer(prefix);
    await using b = await etcdServer(prefix);
    await using holder = await RawClient.connect(a.port);
    assert.equal(await holder.request("lock,name:shared,client-id:on-a"), "ok");
    assert.deepEqual(await exchange(b.port, "lock,name:shared\n"), ["not-granted"]);
    assert.deepEqual(await exchange(b.port, "lock,name:shared,wait:0\n"), ["not-granted"]);
    assert.deepEqual(await exchange(b.port, "lock,name:shared,limit:2,wait:0\n"), [
      "err,limit mismatch",
    ]);
    // .locks through the other server shows the holder too (the whole cluster).
    const [line] = await exchange(b.port, ".locks\n");
    const locks = JSON.parse(line.slice("locks,".length));
    assert.equal(locks.length, 1);
    assert.equal(locks[0].holders[0].client_id, "on-a");
    assert.equal(await holder.request("release"), "released");
    // Released means released everywhere: the other server grants at once.
    assert.deepEqual(await exchange(b.port, "lock,name:shared\nrelease\n"), ["ok", "released"]);
  },
});

Deno.test({
  name: "two servers on one etcd: waiters on both are granted in arrival order, tokens increase",
  ignore: !ETCD,
  async fn() {
    const prefix = newPrefix();
    await using a = await etcdServer(prefix);
    await using b = await etcdServer(prefix);
    const servers = [a, b];
    const holder = await RawClient.connect(b.port);
    const waiters: RawClient[] = [];
    try {
      let last = token(await holder.request("lock,name:q,wait:0"));
      for (let i = 1; i <= 8; i++) {
        const w = await RawClient.connect(servers[i % 2].port);
        waiters.push(w);
        // Arrival order is fixed by waiting for each one's queued line before the next asks.
        assert.equal(
          await w.request(`lock,name:q,wait:30,client-id:w${i}`),
          `queued,position:${i}`,
        );
      }
      assert.equal(await holder.request("release"), "released");
      for (let i = 0; i < waiters.length; i++) {
        let l = await waiters[i].line();
        const seen = [];
        while (l !== null && l.startsWith("queued,")) {
          seen.push(l);
          l = await waiters[i].line();
        }
        const t = token(l);
        assert.ok(t > last, `waiter ${i + 1}: token ${t} after ${last}`);
        last = t;
        // Positions only go down, below the first one. (Moves within 50 ms fold into one line
        // with the newest position, and a grant within 50 ms of the last line ends the wait
        // before position 1 is due: docs/protocol.md, "Queue positions".)
        let above = i + 1;
        for (const p of seen.map((s) => Number(s.slice("queued,position:".length)))) {
          assert.ok(p < above && p >= 1, `waiter ${i + 1}: positions ${seen}`);
          above = p;
        }
        // Nobody behind holds while this one does, as either server sees it.
        for (const srv of servers) {
          const [info] = JSON.parse((await exchange(srv.port, ".locks\n"))[0].slice(6));
          assert.deepEqual(info.holders.map((h: { token: number }) => h.token), [t]);
        }
        assert.equal(await waiters[i].request("release"), "released");
      }
    } finally {
      holder.close();
      for (const w of waiters) w.close();
    }
  },
});

Deno.test({
  name: "three servers, shared locks: readers on two hold at once, a writer on a third waits " +
    "for both and blocks later readers everywhere",
  ignore: !ETCD,
  async fn() {
    const prefix = newPrefix();
    await using a = await etcdServer(prefix);
    await using b = await etcdServer(prefix);
    await using c = await etcdServer(prefix);
    const servers = [a, b, c];
    await using ra = await RawClient.connect(a.port);
    await using rb = await RawClient.connect(b.port);
    const ta = token(await ra.request("lock,name:ds,mode:shared,client-id:ra"));
    const tb = token(await rb.request("lock,name:ds,mode:shared,client-id:rb"));
    assert.ok(tb > ta);
    await using w = await RawClient.connect(c.port);
    assert.equal(await w.request("lock,name:ds,mode:exclusive,wait:30"), "queued,position:1");
    // Every server now queues a reader behind the writer; no reader gets in without a wait.
    const late: RawClient[] = [];
    try {
      for (const [i, srv] of servers.entries()) {
        assert.deepEqual(await exchange(srv.port, "lock,name:ds,mode:shared\n"), [
          "not-granted",
        ]);
        const r = await RawClient.connect(srv.port);
        late.push(r);
        assert.equal(
          await r.request(`lock,name:ds,mode:shared,wait:30,client-id:late${i}`),
          `queued,position:${i + 2}`,
        );
      }
      for (const srv of servers) {
        const [info] = JSON.parse((await exchange(srv.port, ".locks\n"))[0].slice(6));
        assert.deepEqual(
          info.holders.map((h: { client_id: string; mode: string }) => [h.client_id, h.mode]),
          [["ra", "shared"], ["rb", "shared"]],
        );
        assert.deepEqual([info.waiting_shared, info.waiting_exclusive], [3, 1]);
      }
      // One reader goes: the writer still waits for the other.
      assert.equal(await ra.request("release"), "released");
      const [info] = JSON.parse((await exchange(c.port, ".locks\n"))[0].slice(6));
      assert.deepEqual(info.holders.map((h: { client_id: string }) => h.client_id), ["rb"]);
      assert.equal(await rb.request("release"), "released");
      let l = await w.line();
      while (l !== null && l.startsWith("queued,")) l = await w.line();
      const tw = token(l);
      assert.ok(tw > tb);
      for (const srv of servers) {
        const [info] = JSON.parse((await exchange(srv.port, ".locks\n"))[0].slice(6));
        assert.deepEqual(info.holders.map((h: { mode: string }) => h.mode), ["exclusive"]);
        assert.equal(info.waiting_shared, 3);
      }
      assert.equal(await w.request("release"), "released");
      // The three late readers, one per server, are granted together.
      const tokens = [];
      for (const r of late) {
        let l = await r.line();
        while (l !== null && l.startsWith("queued,")) l = await r.line();
        tokens.push(token(l));
      }
      assert.ok(tokens.every((t) => t > tw));
      const [after] = JSON.parse((await exchange(a.port, ".locks\n"))[0].slice(6));
      assert.deepEqual(after.holders.map((h: { mode: string }) => h.mode), [
        "shared",
        "shared",
        "shared",
      ]);
    } finally {
      for (const r of late) r.close();
    }
  },
});

Deno.test({
  name: "a SIGKILLed server's lock passes to a waiter on another server within the lease ttl",
  ignore: !ETCD,
  async fn() {
    const prefix = newPrefix();
    const endpoints = (await sharedEtcd()).join(",");
    await using doomed = await startServerProcess([
      "--store",
      "etcd",
      "--etcd-endpoints",
      endpoints,
      "--etcd-prefix",
      prefix,
      "--etcd-lease-ttl",
      "2",
    ]);
    await using survivor = await etcdServer(prefix, 2);
    await using holder = await RawClient.connect(doomed.port);
    const t1 = token(await holder.request("lock,name:job,wait:0,client-id:doomed"));
    await using waiter = await RawClient.connect(survivor.port);
    assert.equal(await waiter.request("lock,name:job,wait:30"), "queued,position:1");
    const granted = timed(waiter.line());
    const killedAt = performance.now();
    await doomed.stop("SIGKILL");
    const [reply, at] = await granted;
    const t2 = token(reply);
    assert.ok(t2 > t1, "the new holder's token is larger");
    const passedMs = at - killedAt;
    assert.ok(passedMs < 2000 + 2000, `passed on after ${Math.round(passedMs)} ms`);
    assert.equal(await holder.line(), null, "the dead server's connection is gone");
  },
});

Deno.test({
  name: "etcd unreachable past the lease: holders get expired, waiters timeout, then it recovers",
  ignore: !ETCD,
  async fn() {
    await using etcd = await startEtcd();
    await using srv = await startTestServer({
      etcd: { endpoints: etcd.endpoints, prefix: newPrefix(), leaseTtl: 2, timeoutMs: 500 },
    });
    await using holder = await RawClient.connect(srv.port);
    token(await holder.request("lock,name:cut,wait:0"));
    await using waiter = await RawClient.connect(srv.port);
    assert.equal(await waiter.request("lock,name:cut,wait:60"), "queued,position:1");
    const lost = timed(holder.line());
    const killedAt = performance.now();
    await etcd.kill(0);
    const [line, at] = await lost;
    assert.equal(line, "expired");
    // Told before etcd could have let the lease run out (2 s after the last renewal).
    assert.ok(at - killedAt < 2000, `expired after ${Math.round(at - killedAt)} ms`);
    assert.equal((await timed(waiter.line()))[0], "timeout");
    assert.deepEqual(await exchange(srv.port, "lock,name:other,wait:0\n"), [
      "err,store unavailable",
    ]);
    const stats = JSON.parse((await exchange(srv.port, ".stats\n"))[0].slice(6));
    assert.equal(stats.lock_expired_count, 1);
    await etcd.restart(0);
    // Back: the server gets a new lease (revoking the old one, whose keys go with it). Only
    // trying tells when it is back.
    const end = performance.now() + 10_000;
    let reply: string[] = [];
    while (performance.now() < end) {
      reply = await exchange(srv.port, "lock,name:cut,wait:0\nrelease\n");
      if (reply[0] !== "err,store unavailable") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.match(reply[0], /^ok,token:\d+$/, `after etcd came back: ${reply}`);
    assert.equal(reply[1], "released");
  },
});

Deno.test({
  name: "the server's --store etcd flags: bad combinations exit 2 with a clear message",
  async fn() {
    const run = async (args: string[]) => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${ROOT}server.ts`, "--port", "0", ...args],
        stdout: "null",
        stderr: "piped",
        env: { TCPNETLOCK_STORE: "" },
      }).output();
      return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
    };
    let r = await run(["--etcd-endpoints", "http://127.0.0.1:2379"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--etcd-endpoints is for the etcd store: add --store etcd/);
    r = await run(["--store", "redis"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--store: "redis" \(expected memory or etcd\)/);
    r = await run(["--store", "etcd", "--etcd-endpoints", "127.0.0.1:2379"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /expected http:\/\/HOST:PORT/);
    r = await run(["--store", "etcd", "--etcd-username", "root"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--etcd-username needs --etcd-password-file/);
    // Nothing answers there: the server says so and exits instead of pretending.
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const closed = (l.addr as Deno.NetAddr).port;
    l.close();
    r = await run([
      "--store",
      "etcd",
      "--etcd-endpoints",
      `http://127.0.0.1:${closed}`,
      "--etcd-timeout",
      "0.5",
    ]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /Cannot use etcd at http:\/\/127\.0\.0\.1:\d+/);
  },
});

Deno.test({
  name: "etcd with auth: the server logs in with --etcd-username and --etcd-password-file",
  ignore: !ETCD,
  async fn() {
    await using etcd = await startEtcd();
    // Set up a root user and turn auth on, through the JSON gateway as etcdctl would.
    const api = async (path: string, body: unknown) => {
      const res = await fetch(`${etcd.endpoints[0]}${path}`, {
        method: "POST",
        body: JSON.stringify(body),
      });
      const text = await res.text();
      assert.ok(res.ok, `${path}: ${text}`);
    };
    await api("/v3/auth/user/add", { name: "root", password: "s3cret-pw" });
    await api("/v3/auth/role/add", { name: "root" });
    await api("/v3/auth/user/grant", { user: "root", role: "root" });
    await api("/v3/auth/enable", {});
    const dir = await Deno.makeTempDir();
    try {
      await Deno.writeTextFile(`${dir}/pw`, "s3cret-pw\n");
      await using srv = await startServerProcess([
        "--store",
        "etcd",
        "--etcd-endpoints",
        etcd.endpoints[0],
        "--etcd-username",
        "root",
        "--etcd-password-file",
        `${dir}/pw`,
      ]);
      assert.deepEqual(await exchange(srv.port, "lock,name:authed\nrelease\n"), ["ok", "released"]);
      await Deno.writeTextFile(`${dir}/bad`, "wrong\n");
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          `${ROOT}server.ts`,
          "--port",
          "0",
          "--store",
          "etcd",
          "--etcd-endpoints",
          etcd.endpoints[0],
          "--etcd-username",
          "root",
          "--etcd-password-file",
          `${dir}/bad`,
        ],
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 2);
      assert.match(new TextDecoder().decode(out.stderr), /Cannot authenticate to etcd as "root"/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "etcd over mutual TLS: the server speaks TLS with --etcd-ca-cert, --etcd-cert and " +
    "--etcd-key; without its client certificate etcd turns it away",
  ignore: !ETCD,
  async fn() {
    const dir = await Deno.makeTempDir();
    const tls = await makeTlsFixture(dir, { clientAuth: true });
    const port = freePort();
    const peer = freePort();
    const endpoint = `https://127.0.0.1:${port}`;
    const etcd = new Deno.Command(etcdBinary(), {
      args: [
        "--name=tls",
        `--data-dir=${dir}/data`,
        `--listen-client-urls=${endpoint}`,
        `--advertise-client-urls=${endpoint}`,
        `--listen-peer-urls=http://127.0.0.1:${peer}`,
        `--initial-advertise-peer-urls=http://127.0.0.1:${peer}`,
        `--initial-cluster=tls=http://127.0.0.1:${peer}`,
        `--cert-file=${tls.certFile}`,
        `--key-file=${tls.keyFile}`,
        `--trusted-ca-file=${dir}/ca.pem`,
        "--client-cert-auth",
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    const client = new EtcdClient({
      endpoints: [endpoint],
      caCert: tls.caCert,
      cert: await Deno.readTextFile(tls.clientCertFile!),
      key: await Deno.readTextFile(tls.clientKeyFile!),
      timeoutMs: 1000,
    });
    try {
      // Readiness of a process we started: polling is the only way to see it.
      for (let i = 0;; i++) {
        try {
          await client.status(endpoint);
          break;
        } catch (err) {
          if (i > 150) throw err;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const flags = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoint,
        "--etcd-prefix",
        "/tls",
        "--etcd-ca-cert",
        `${dir}/ca.pem`,
      ];
      const mine = ["--etcd-cert", tls.clientCertFile!, "--etcd-key", tls.clientKeyFile!];
      {
        await using srv = await startServerProcess([...flags, ...mine]);
        await using holder = await RawClient.connect(srv.port);
        assert.equal(await holder.request("lock,name:over-tls"), "ok");
        const held = await client.range("/tls/over-tls/", { prefix: true });
        assert.equal(held.count, 1, "the lock's key is in etcd");
        assert.deepEqual(await exchange(srv.port, "lock,name:over-tls\n"), ["not-granted"]);
        assert.equal(await holder.request("release"), "released");
        assert.equal((await client.range("/tls/over-tls/", { prefix: true })).count, 0);
      }
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${ROOT}server.ts`, "--port", "0", ...flags, "--etcd-timeout", "1"],
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.notEqual(out.code, 0);
      assert.match(
        new TextDecoder().decode(out.stderr),
        /Cannot use etcd at https:\/\/127\.0\.0\.1/,
      );
    } finally {
      client.close();
      etcd.kill("SIGKILL");
      await etcd.status;
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * Every distinct key etcd ever had under `prefix/sub/` (its history: a watch from revision 1 on
 * `prefix/`, read up to a marker key written last).
 */
async function keysEverWritten(
  endpoint: string,
  prefix: string,
  sub: string,
): Promise<Set<string>> {
  const client = new EtcdClient({ endpoints: [endpoint] });
  try {
    const marker = `${prefix}/~marker`;
    await client.put(marker, "");
    const keys = new Set<string>();
    await client.watch(`${prefix}/`, 1, new AbortController().signal, (r) => {
      for (const ev of r.events) if (ev.kv.key.startsWith(`${prefix}/${sub}/`)) keys.add(ev.kv.key);
      return !r.events.some((ev) => ev.kv.key === marker);
    });
    return keys;
  } finally {
    client.close();
  }
}

Deno.test({
  name: "etcd: a server locking one name again and again writes the same key each time (etcd " +
    "keeps every deleted key until compaction and walks them all on each check of the name)",
  ignore: !ETCD,
  async fn() {
    const prefix = newPrefix();
    await using srv = await etcdServer(prefix);
    for (let i = 0; i < 20; i++) {
      assert.deepEqual(await exchange(srv.port, "lock,name:hot\nrelease\n"), ["ok", "released"]);
    }
    // A holder and a waiter at once need two keys; after them, the one key again.
    await using holder = await RawClient.connect(srv.port);
    token(await holder.request("lock,name:hot,wait:0"));
    await using waiter = await RawClient.connect(srv.port);
    assert.equal(await waiter.request("lock,name:hot,wait:30"), "queued,position:1");
    assert.equal(await holder.request("release"), "released");
    token(await waiter.line());
    assert.equal(await waiter.request("release"), "released");
    assert.deepEqual(await exchange(srv.port, "lock,name:hot\nrelease\n"), ["ok", "released"]);
    const keys = await keysEverWritten((await sharedEtcd())[0], prefix, "hot");
    assert.equal(keys.size, 2, `keys written: ${[...keys].join(" ")}`);
  },
});

Deno.test({
  name: "etcd: a compaction of etcd's history while one server holds and another waits disturbs " +
    "neither (docs/etcd.md asks for a compaction policy)",
  ignore: !ETCD,
  async fn() {
    // An etcd of its own (the other tests read the shared one's history), with the compaction
    // policy docs/etcd.md gives as an example.
    await using etcd = await startEtcd({
      flags: ["--auto-compaction-mode=periodic", "--auto-compaction-retention=1h"],
    });
    const prefix = newPrefix();
    const on = () => startTestServer({ etcd: { endpoints: etcd.endpoints, prefix } });
    await using a = await on();
    await using b = await on();
    await using holder = await RawClient.connect(a.port);
    const t1 = token(await holder.request("lock,name:c,wait:0"));
    await using waiter = await RawClient.connect(b.port);
    assert.equal(await waiter.request("lock,name:c,wait:30"), "queued,position:1");
    const client = new EtcdClient({ endpoints: etcd.endpoints });
    try {
      const { revision } = await client.range(`${prefix}/`, { prefix: true, limit: 1 });
      await client.call("/v3/kv/compaction", { revision: String(revision), physical: true });
    } finally {
      client.close();
    }
    assert.equal(await holder.request("release"), "released");
    const t2 = token(await waiter.line());
    assert.ok(t2 > t1);
    assert.equal(await waiter.request("release"), "released");
    assert.deepEqual(await exchange(a.port, "lock,name:c\nrelease\n"), ["ok", "released"]);
  },
});
