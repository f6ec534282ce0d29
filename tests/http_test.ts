/**
 * The HTTP side door (`--http-listen`): Prometheus metrics after a scripted sequence of lock
 * requests, `promtool check metrics`, the probes, `/locks`, the Bearer rule, and the HTTP server's
 * life tied to the lock server's. Real sockets, real HTTP.
 */

import assert from "node:assert/strict";
import { formatHostPort, parseHostPort, probeLockServer, startHttpServer } from "../lib/http.ts";
import type { HttpServer, HttpServerOptions } from "../lib/http.ts";
import { DURATION_BUCKETS, DurationHistogram, LockMetrics } from "../lib/metrics.ts";
import type { LockServer, ServerOptions } from "../lib/server.ts";
import { UsageError } from "../lib/cli.ts";
import { VERSION } from "../lib/version.ts";
import { parseServerArgs } from "../server.ts";
import {
  exchange,
  makeTlsFixture,
  RawClient,
  ROOT,
  startServerProcess,
  startTestServer,
  until,
} from "./test_util.ts";

/** A lock server on a free port with its metrics and its HTTP server on another free port. */
interface WithHttp extends AsyncDisposable {
  server: LockServer;
  port: number;
  http: HttpServer;
  /** `http://127.0.0.1:PORT` */
  base: string;
}

async function startWithHttp(
  options: ServerOptions = {},
  httpOptions: Partial<HttpServerOptions> = {},
): Promise<WithHttp> {
  const metrics = new LockMetrics();
  const { server, port } = await startTestServer({ ...options, onEvent: metrics.onEvent });
  let http: HttpServer;
  try {
    http = await startHttpServer(server, {
      hostname: "127.0.0.1",
      port: 0,
      metrics,
      authToken: options.authToken,
      ...httpOptions,
    });
  } catch (err) {
    await server.close();
    throw err;
  }
  return {
    server,
    port,
    http,
    base: `http://127.0.0.1:${http.addr.port}`,
    async [Symbol.asyncDispose]() {
      await server.close();
      await http.finished;
    },
  };
}

interface Got {
  status: number;
  headers: Headers;
  body: string;
}

/** One HTTP request; the body is always read (no leaked response bodies). */
async function get(url: string, init: RequestInit = {}): Promise<Got> {
  const res = await fetch(url, init);
  return { status: res.status, headers: res.headers, body: await res.text() };
}

/** The samples of an exposition, keyed by the series as written: `name{label="value"}`. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    const value = line.slice(space + 1);
    out.set(line.slice(0, space), value === "+Inf" ? Infinity : Number(value));
  }
  return out;
}

function sample(all: Map<string, number>, series: string): number {
  const v = all.get(series);
  if (v === undefined) throw new Error(`no sample ${series} in the exposition`);
  return v;
}

/** Checks a histogram: cumulative buckets that never go down, `+Inf` equal to `_count`. */
function histogram(all: Map<string, number>, name: string): { count: number; sum: number } {
  let last = 0;
  for (const le of DURATION_BUCKETS) {
    const c = sample(all, `${name}_bucket{le="${le}"}`);
    assert.ok(c >= last, `${name} bucket le=${le} is below the one before`);
    last = c;
  }
  const inf = sample(all, `${name}_bucket{le="+Inf"}`);
  const count = sample(all, `${name}_count`);
  assert.ok(inf >= last, `${name} +Inf bucket is below the one before`);
  assert.deepEqual(inf, count, `${name}_bucket{le="+Inf"} must equal ${name}_count`);
  return { count, sum: sample(all, `${name}_sum`) };
}

function findExecutable(name: string): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir === "") continue;
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return `${dir}/${name}`;
    } catch {
      // not here
    }
  }
  return undefined;
}

const PROMTOOL = findExecutable("promtool");
if (PROMTOOL === undefined) {
  console.warn(
    "promtool is not installed: the `promtool check metrics` step is skipped " +
      "(apt-get install prometheus, or put promtool on PATH)",
  );
}

/** Pipes an exposition into `promtool check metrics`; returns its exit code and output. */
async function promtoolCheck(text: string): Promise<{ code: number; output: string }> {
  const child = new Deno.Command(PROMTOOL!, {
    args: ["check", "metrics"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(text));
  await writer.close();
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, output: dec.decode(out.stdout) + dec.decode(out.stderr) };
}

Deno.test("/metrics counts a scripted sequence of grants, refusals, waits, an expiry and a timeout", async (t) => {
  await using h = await startWithHttp();
  const port = h.port;

  // A holds "a".
  await using a = await RawClient.connect(port);
  assert.deepEqual(await a.request("lock,name:a,client-id:A"), "ok");
  // B is not granted, C is refused (limit mismatch).
  assert.deepEqual(await exchange(port, "lock,name:a,client-id:B\n"), ["not-granted"]);
  assert.deepEqual(await exchange(port, "lock,name:a,client-id:C,limit:2\n"), [
    "err,limit mismatch",
  ]);
  // D waits; A releases; D is granted after its wait.
  await using d = await RawClient.connect(port);
  assert.deepEqual(await d.request("lock,name:a,client-id:D,wait:30"), "queued,position:1");
  assert.deepEqual(await a.request("release"), "released");
  assert.deepEqual(await a.line(), null);
  a.close();
  assert.match((await d.line())!, /^ok,token:\d+$/);
  // E's wait runs out behind D.
  assert.deepEqual(await exchange(port, "lock,name:a,client-id:E,wait:0.05\n"), [
    "queued,position:1",
    "timeout",
  ]);
  // F's lease runs out.
  const f = await exchange(port, "lock,name:b,client-id:F,ttl:0.05\n");
  assert.deepEqual(f.length, 2);
  assert.match(f[0], /^ok,token:\d+$/);
  assert.deepEqual(f[1], "expired");
  // G waits behind D.
  await using g = await RawClient.connect(port);
  assert.deepEqual(await g.request("lock,name:a,client-id:G,wait:30"), "queued,position:1");
  // Closed connections leave the server's books when it sees their end.
  await until(() => h.server.connections === 2, "only D and G to stay connected");

  const res = await get(`${h.base}/metrics`);
  assert.deepEqual(res.status, 200);
  assert.deepEqual(res.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  const m = samples(res.body);

  assert.deepEqual(sample(m, "tcpnetlock_locks_held"), 1);
  assert.deepEqual(sample(m, "tcpnetlock_lock_holders"), 1);
  assert.deepEqual(sample(m, "tcpnetlock_lock_waiters"), 1);
  assert.deepEqual(sample(m, "tcpnetlock_connections"), 2);
  assert.deepEqual(sample(m, "tcpnetlock_connections_accepted_total"), 7);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="granted"}'), 3);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="not_granted"}'), 1);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="timeout"}'), 1);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="error"}'), 1);
  assert.deepEqual(sample(m, "tcpnetlock_leases_expired_total"), 1);
  assert.deepEqual(sample(m, "tcpnetlock_tokens_issued_total"), 3);

  // Held and let go: A (released) and F (expired, after at least its 50 ms ttl).
  const hold = histogram(m, "tcpnetlock_lock_hold_seconds");
  assert.deepEqual(hold.count, 2);
  assert.ok(hold.sum >= 0.05, `hold sum ${hold.sum}`);
  assert.ok(sample(m, 'tcpnetlock_lock_hold_seconds_bucket{le="0.01"}') <= 1);
  // One wait observation per grant: A and F at once, D after waiting.
  const wait = histogram(m, "tcpnetlock_lock_wait_seconds");
  assert.deepEqual(wait.count, 3);
  assert.ok(wait.sum >= 0, `wait sum ${wait.sum}`);

  const age = sample(m, "tcpnetlock_oldest_lock_age_seconds");
  assert.ok(age > 0 && age <= 60, `oldest lock age ${age}`);
  assert.ok(sample(m, "tcpnetlock_process_resident_memory_bytes") > 1_000_000);
  if (Deno.build.os === "linux") assert.ok(sample(m, "tcpnetlock_process_open_fds") > 3);
  const start = sample(m, "tcpnetlock_process_start_time_seconds");
  assert.ok(start <= Date.now() / 1000 && start > Date.now() / 1000 - 24 * 3600, `start ${start}`);
  assert.deepEqual(
    sample(m, `tcpnetlock_build_info{version="${VERSION}",deno="${Deno.version.deno}"}`),
    1,
  );

  // Every family has HELP and TYPE lines, and every counter ends in _total.
  for (const [, name, type] of res.body.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
    assert.ok(name.startsWith("tcpnetlock_"), name);
    assert.ok(res.body.includes(`# HELP ${name} `), `no HELP for ${name}`);
    if (type === "counter") {
      assert.ok(name.endsWith("_total"), `counter ${name} must end in _total`);
    }
  }

  await t.step({
    name: "promtool check metrics accepts the exposition",
    ignore: PROMTOOL === undefined,
    fn: async () => {
      const { code, output } = await promtoolCheck(res.body);
      assert.deepEqual(code, 0, `promtool check metrics failed:\n${output}`);
      assert.deepEqual(output.trim(), "", `promtool check metrics complained:\n${output}`);
    },
  });
});

Deno.test("DurationHistogram files a value in the first bucket whose bound is not below it", () => {
  const h = new DurationHistogram();
  for (const ms of [0, 1, 1.5, 3_600_000, 3_600_001]) h.observeMs(ms);
  const c = h.cumulative();
  assert.deepEqual(c.length, DURATION_BUCKETS.length + 1);
  assert.deepEqual(c[0], 2); // 0 and 1 ms: le="0.001"
  assert.deepEqual(c[1], 3); // 1.5 ms: le="0.005"
  assert.deepEqual(c[DURATION_BUCKETS.length - 1], 4); // 1 h: le="3600"
  assert.deepEqual(c[DURATION_BUCKETS.length], 5); // +Inf
  assert.deepEqual(h.count, 5);
  assert.deepEqual(h.sumSeconds, 7200.0035);
});

Deno.test("/healthz and /readyz answer without auth; /metrics and /locks want the Bearer token", async () => {
  const token = "s3cret-Token_42";
  await using h = await startWithHttp({ authToken: token });
  await using holder = await RawClient.connect(h.port);
  assert.deepEqual(await holder.request(`lock,name:db,client-id:web-1,auth:${token}`), "ok");

  const health = await get(`${h.base}/healthz`);
  assert.deepEqual([health.status, health.body], [200, "ok"]);
  const ready = await get(`${h.base}/readyz`);
  assert.deepEqual([ready.status, ready.body], [200, "ok"]);

  for (const path of ["/metrics", "/locks"]) {
    const none = await get(`${h.base}${path}`);
    assert.deepEqual(none.status, 401, path);
    assert.deepEqual(none.headers.get("www-authenticate"), 'Bearer realm="tcpnetlock"');
    const wrong = await get(`${h.base}${path}`, { headers: { authorization: "Bearer nope" } });
    assert.deepEqual(wrong.status, 401, path);
    assert.match(wrong.headers.get("www-authenticate")!, /^Bearer .*error="invalid_token"/);
    const prefix = await get(`${h.base}${path}`, {
      headers: { authorization: `Bearer ${token.slice(0, -1)}` },
    });
    assert.deepEqual(prefix.status, 401, path);
    const basic = await get(`${h.base}${path}`, {
      headers: { authorization: `Basic ${btoa(`x:${token}`)}` },
    });
    assert.deepEqual(basic.status, 401, path);
    const good = await get(`${h.base}${path}`, { headers: { authorization: `bearer ${token}` } });
    assert.deepEqual(good.status, 200, path);
  }

  // /locks is what `.locks` answers.
  const locks = await get(`${h.base}/locks`, { headers: { authorization: `Bearer ${token}` } });
  assert.deepEqual(locks.headers.get("content-type"), "application/json");
  const [reply] = await exchange(h.port, `.locks,auth:${token}\n`);
  assert.ok(reply.startsWith("locks,"), reply);
  assert.deepEqual(JSON.parse(locks.body), JSON.parse(reply.slice("locks,".length)));
  const parsed = JSON.parse(locks.body);
  assert.deepEqual(parsed.length, 1);
  assert.deepEqual(parsed[0].name, "db");
  assert.deepEqual(parsed[0].holders[0].client_id, "web-1");
});

Deno.test("/locks and /metrics are open when no auth token is configured", async () => {
  await using h = await startWithHttp();
  assert.deepEqual((await get(`${h.base}/locks`)).body, "[]");
  assert.deepEqual((await get(`${h.base}/metrics`)).status, 200);
});

Deno.test("unknown paths get 404, methods other than GET and HEAD get 405", async () => {
  await using h = await startWithHttp({ authToken: "t0ken" });
  for (const path of ["/index.html", "/nope", "/metrics/", "/healthz/x", "/events/"]) {
    assert.deepEqual((await get(`${h.base}${path}`)).status, 404, path);
  }
  // "/" is the live page (docs/web.md).
  const page = await get(`${h.base}/`);
  assert.deepEqual([page.status, page.headers.get("content-type")], [
    200,
    "text/html; charset=utf-8",
  ]);
  for (const method of ["POST", "PUT", "DELETE"]) {
    const res = await get(`${h.base}/metrics`, { method });
    assert.deepEqual(res.status, 405, method);
    assert.deepEqual(res.headers.get("allow"), "GET, HEAD");
  }
  const head = await get(`${h.base}/healthz`, { method: "HEAD" });
  assert.deepEqual([head.status, head.body], [200, ""]);
  // A query string does not change the route.
  assert.deepEqual((await get(`${h.base}/healthz?verbose=1`)).status, 200);
});

Deno.test("/readyz is 503 while the lock port does not answer .ping with pong", async () => {
  await using h = await startWithHttp({ maxConnections: 1 });
  {
    await using holder = await RawClient.connect(h.port);
    assert.deepEqual(await holder.request("lock,name:db"), "ok");
    const res = await get(`${h.base}/readyz`);
    assert.deepEqual(res.status, 503);
    assert.deepEqual(
      res.body,
      'not ready: the lock port answered .ping with "err,too many connections"',
    );
  }
  await until(() => h.server.connections === 0, "the holder's connection to end");
  const res = await get(`${h.base}/readyz`);
  assert.deepEqual([res.status, res.body], [200, "ok"]);
});

Deno.test("/readyz is 503 when nothing listens on the lock port", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closed = listener.addr;
  listener.close();
  await using h = await startWithHttp();
  assert.deepEqual(
    await probeLockServer({ addrs: [closed] }, false, 2000),
    "refused the connection",
  );
  // A stand-in for a lock server whose listener is gone.
  const gone = {
    table: h.server.table,
    connections: 0,
    stats: () => h.server.stats(),
    locks: () => [],
    addrs: [closed],
    finished: h.server.finished,
  };
  await using http = await startHttpServer(gone, { port: 0 });
  const res = await get(`http://127.0.0.1:${http.addr.port}/readyz`);
  assert.deepEqual([res.status, res.body], [
    503,
    "not ready: the lock port refused the connection",
  ]);
});

Deno.test("/readyz with a TLS lock port checks that it accepts a connection", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using h = await startWithHttp({ tls: { cert: tls.cert, key: tls.key } }, { tls: true });
    for (let i = 0; i < 2; i++) {
      const res = await get(`${h.base}/readyz`);
      assert.deepEqual([res.status, res.body], [200, "ok"]);
    }
    await until(() => h.server.connections === 0, "the probes' connections to end");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the HTTP server stops when the lock server stops, also after .server-shutdown", async () => {
  await using h = await startWithHttp();
  assert.deepEqual((await get(`${h.base}/healthz`)).status, 200);
  assert.deepEqual(await exchange(h.port, ".server-shutdown\n"), ["shutting-down"]);
  await h.server.finished;
  await h.http.finished;
  await assert.rejects(() => fetch(`${h.base}/healthz`), TypeError);
});

Deno.test("--http-listen takes HOST:PORT, [IPV6]:PORT or :PORT and is off by default", () => {
  const http = (args: string[]) => {
    const parsed = parseServerArgs(args);
    if (typeof parsed === "string") throw new Error(parsed);
    return parsed.http;
  };
  assert.deepEqual(http(["--http-listen", "127.0.0.1:9464"]), {
    hostname: "127.0.0.1",
    port: 9464,
  });
  assert.deepEqual(http(["--http-listen", ":9464"]), { hostname: "127.0.0.1", port: 9464 });
  assert.deepEqual(http(["--http-listen", "[::1]:0"]), { hostname: "::1", port: 0 });
  assert.deepEqual(http(["--http-listen", "metrics.local:80"]), {
    hostname: "metrics.local",
    port: 80,
  });
  for (const bad of ["9464", "127.0.0.1", "127.0.0.1:", "host:99999", "::1:80", "h:8x"]) {
    assert.throws(() => http(["--http-listen", bad]), UsageError, bad);
  }
  assert.deepEqual(parseHostPort(" 0.0.0.0:1 "), { hostname: "0.0.0.0", port: 1 });
  assert.deepEqual(formatHostPort({ hostname: "::1", port: 5 }), "[::1]:5");
});

Deno.test("server.ts --http-listen logs its address, serves, and exits 0 on .server-shutdown", async () => {
  await using proc = await startServerProcess(["--http-listen", "127.0.0.1:0"]);
  const line = await proc.waitForLog(/http listening on /);
  const [, host, httpPort] = /http listening on (\S+):(\d+)/.exec(line)!;
  assert.deepEqual(host, "127.0.0.1");
  const base = `http://127.0.0.1:${httpPort}`;
  assert.deepEqual((await get(`${base}/healthz`)).body, "ok");
  assert.deepEqual((await get(`${base}/readyz`)).body, "ok");
  assert.deepEqual(await exchange(proc.port, "lock,name:x\nrelease\n"), ["ok", "released"]);
  const m = samples((await get(`${base}/metrics`)).body);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="granted"}'), 1);
  assert.deepEqual(await exchange(proc.port, ".server-shutdown\n"), ["shutting-down"]);
  const status = await proc.child.status;
  assert.deepEqual(status.code, 0, proc.stderr());
  await proc.waitForLog(/HTTP stopped/);
});

Deno.test("server.ts exits 2 when it cannot listen for HTTP", async () => {
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      `${ROOT}server.ts`,
      "--listen",
      "127.0.0.1",
      "--port",
      "0",
      "--http-listen",
      `127.0.0.1:${taken.addr.port}`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.deepEqual(out.code, 2, stderr);
  assert.ok(
    stderr.includes(
      `Cannot listen for HTTP on "127.0.0.1:${taken.addr.port}": address already in use`,
    ),
    stderr,
  );
});

Deno.test("/metrics counts grants by mode, and promtool accepts the exposition", async () => {
  await using h = await startWithHttp();
  const port = h.port;
  await using r1 = await RawClient.connect(port);
  await using r2 = await RawClient.connect(port);
  assert.match((await r1.request("lock,name:ds,mode:shared"))!, /^ok,token:\d+$/);
  assert.match((await r2.request("lock,name:ds,mode:shared"))!, /^ok,token:\d+$/);
  assert.deepEqual(await exchange(port, "lock,name:ds,mode:exclusive\n"), ["not-granted"]);
  await using w = await RawClient.connect(port);
  assert.match((await w.request("lock,name:other,mode:exclusive"))!, /^ok,token:\d+$/);
  await using v1 = await RawClient.connect(port);
  assert.deepEqual(await v1.request("lock,name:v1"), "ok");
  const res = await get(`${h.base}/metrics`);
  const m = samples(res.body);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_grants_total{mode="shared"}'), 2);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_grants_total{mode="exclusive"}'), 2);
  assert.deepEqual(sample(m, 'tcpnetlock_lock_requests_total{result="granted"}'), 4);
  if (PROMTOOL !== undefined) {
    const { code, output } = await promtoolCheck(res.body);
    assert.deepEqual(code, 0, `promtool check metrics failed:\n${output}`);
    assert.deepEqual(output.trim(), "", `promtool check metrics complained:\n${output}`);
  }
});
