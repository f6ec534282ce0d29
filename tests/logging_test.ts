// Structured logs of server.ts as a real process: `--log-format json` lines and their fields for
// every lock event, and the auth token never written, in either format, over TCP or HTTP.

import assert from "node:assert/strict";
import { exchange, RawClient, type ServerProcess, startServerProcess } from "./test_util.ts";

/** The lock events and the fields each carries besides event, lock, client_id and peer. */
const LOCK_EVENTS: Record<string, { token: boolean; seconds?: "held_s" | "waited_s" }> = {
  granted: { token: true, seconds: "waited_s" },
  queued: { token: false },
  not_granted: { token: false },
  refused: { token: false },
  timeout: { token: false, seconds: "waited_s" },
  released: { token: true, seconds: "held_s" },
  expired: { token: true, seconds: "held_s" },
  disconnected: { token: false }, // a holder's carries token and held_s, a waiter's waited_s
};

const LEVELS = new Set(["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]);

/** The HTTP port the server logged (`http listening on HOST:PORT`). */
async function httpBase(proc: ServerProcess): Promise<string> {
  const line = await proc.waitForLog(/http listening on /);
  const [, port] = /http listening on \S+:(\d+)/.exec(line)!;
  return `http://127.0.0.1:${port}`;
}

async function httpStatus(url: string, token?: string): Promise<number> {
  const res = await fetch(url, token ? { headers: { authorization: `Bearer ${token}` } } : {});
  await res.body?.cancel();
  return res.status;
}

/**
 * Drives every lock event through a server that wants `auth:TOKEN`, with bad auth on the way (lock
 * port and HTTP), waiting for each asynchronous event's log line before going on.
 */
async function scriptedSequence(proc: ServerProcess, token: string): Promise<void> {
  const port = proc.port;
  const auth = `auth:${token}`;
  // granted, not_granted, refused (limit mismatch)
  await using a = await RawClient.connect(port);
  assert.equal(await a.request(`lock,name:db,client-id:job-a,${auth}`), "ok");
  assert.deepEqual(await exchange(port, `lock,name:db,client-id:job-b,${auth}\n`), [
    "not-granted",
  ]);
  assert.deepEqual(await exchange(port, `lock,name:db,client-id:job-c,limit:2,${auth}\n`), [
    "err,limit mismatch",
  ]);
  // queued, then timeout
  assert.deepEqual(await exchange(port, `lock,name:db,client-id:job-e,wait:0.05,${auth}\n`), [
    "queued,position:1",
    "timeout",
  ]);
  // queued, then the waiter disconnects
  {
    await using w = await RawClient.connect(port);
    assert.equal(
      await w.request(`lock,name:db,client-id:job-w,wait:30,${auth}`),
      "queued,position:1",
    );
  }
  await proc.waitForLog(/waiter job-w at \S+ left the queue/);
  // queued, A releases, D is granted after waiting, then D disconnects while holding
  {
    await using d = await RawClient.connect(port);
    assert.equal(
      await d.request(`lock,name:db,client-id:job-d,wait:30,${auth}`),
      "queued,position:1",
    );
    assert.equal(await a.request("release"), "released");
    assert.match((await d.line())!, /^ok,token:\d+$/);
  }
  await proc.waitForLog(/Lock db freed: the connection of job-d/);
  // granted with a lease, expired
  const f = await exchange(port, `lock,name:lease,client-id:job-f,ttl:0.05,${auth}\n`);
  assert.match(f[0], /^ok,token:\d+$/);
  assert.equal(f[1], "expired");
  // bad auth on the lock port and over HTTP; good auth over HTTP
  assert.deepEqual(await exchange(port, `lock,name:db,client-id:job-x,auth:${token}x\n`), [
    "err,unauthorized",
  ]);
  assert.deepEqual(await exchange(port, `.locks,auth:wrong\n`), ["err,unauthorized"]);
  assert.deepEqual(await exchange(port, `.locks\n`), ["err,unauthorized"]);
  const base = await httpBase(proc);
  assert.equal(await httpStatus(`${base}/metrics`, token), 200);
  assert.equal(await httpStatus(`${base}/locks`, token), 200);
  assert.equal(await httpStatus(`${base}/metrics`, `${token}x`), 401);
  assert.equal(await httpStatus(`${base}/locks`), 401);
  assert.equal(await httpStatus(`${base}/readyz`), 200);
  await proc.waitForLog(/Refused an HTTP request from \S+ for \/locks: unauthorized/);
}

Deno.test("--log-format json: every line parses and each lock event carries its fields", async () => {
  const token = `tok-${crypto.randomUUID()}`;
  await using proc = await startServerProcess(["--log-format", "json"], {
    env: { TCPNETLOCK_AUTH_TOKEN: token, TCPNETLOCK_HTTP_LISTEN: "127.0.0.1:0" },
  });
  await scriptedSequence(proc, token);
  const status = await proc.stop("SIGTERM");
  assert.equal(status.code, 0);
  const stderr = proc.stderr();
  assert.equal(stderr.includes(token), false, "the auth token appears in the log");

  const records = stderr.split("\n").filter((l) => l !== "").map((line) => {
    try {
      return JSON.parse(line) as Record<string, unknown>;
    } catch {
      throw new Error(`not a JSON line: ${line}`);
    }
  });
  const seen = new Set<string>();
  for (const r of records) {
    const where = JSON.stringify(r);
    assert.equal(typeof r["@timestamp"], "string", where);
    assert.ok(!Number.isNaN(Date.parse(r["@timestamp"] as string)), where);
    assert.ok(LEVELS.has(r.level as string), where);
    assert.equal(typeof r.message, "string", where);
    assert.equal(typeof r.event, "string", `every record says its event: ${where}`);
    const spec = LOCK_EVENTS[r.event as string];
    if (spec === undefined || r.lock === undefined) continue;
    seen.add(r.event as string);
    assert.equal(r.level, "INFO", where);
    assert.match(r.lock as string, /^[a-z]+$/, where);
    assert.match(r.client_id as string, /^job-[a-z]$|^-$/, where);
    assert.match(r.peer as string, /^127\.0\.0\.1:\d+$/, where);
    const holder = spec.token || (r.event === "disconnected" && r.held_s !== undefined);
    if (holder) assert.ok(Number.isSafeInteger(r.token) && (r.token as number) > 0, where);
    else assert.equal(r.token, undefined, where);
    const seconds = spec.seconds ??
      (r.event === "disconnected" ? (holder ? "held_s" : "waited_s") : undefined);
    if (seconds !== undefined) {
      assert.equal(typeof r[seconds], "number", `${seconds} in ${where}`);
      assert.ok((r[seconds] as number) >= 0, where);
    }
    if (r.event === "refused") assert.equal(r.reason, "limit mismatch", where);
  }
  assert.deepEqual([...seen].sort(), Object.keys(LOCK_EVENTS).sort(), "every lock event is logged");

  const one = (event: string, clientId: string) => {
    const r = records.find((r) => r.event === event && r.client_id === clientId);
    assert.ok(r, `no ${event} record for ${clientId}`);
    return r;
  };
  // job-d was queued first and granted later (its waited_s may round to 0 on a fast machine).
  assert.ok(records.indexOf(one("queued", "job-d")) < records.indexOf(one("granted", "job-d")));
  assert.ok((one("timeout", "job-e").waited_s as number) >= 0.05);
  assert.ok((one("expired", "job-f").held_s as number) >= 0.05);
  assert.equal(one("disconnected", "job-w").token, undefined);
  assert.equal(typeof one("disconnected", "job-d").held_s, "number");
  assert.equal(one("queued", "job-w").position, 1);
  // Refusals before any lock exists (bad auth) name the peer and the reason.
  const unauthorized = records.filter((r) => r.event === "refused" && r.reason === "unauthorized");
  assert.equal(unauthorized.length, 5, "three on the lock port, two over HTTP");
  for (const r of unauthorized) assert.match(r.peer as string, /^127\.0\.0\.1:\d+$/);
  // The HTTP address is logged for whoever looks for it.
  const http = records.find((r) => r.event === "http_started");
  assert.match(http?.message as string, /^http listening on 127\.0\.0\.1:\d+$/);
});

Deno.test("the auth token never appears in the text log either, even at --debug", async () => {
  const token = `tok-${crypto.randomUUID()}`;
  await using proc = await startServerProcess(["--debug", "--http-listen", "127.0.0.1:0"], {
    env: { TCPNETLOCK_AUTH_TOKEN: token },
  });
  await scriptedSequence(proc, token);
  const status = await proc.stop("SIGTERM");
  assert.equal(status.code, 0);
  const stderr = proc.stderr();
  assert.equal(stderr.includes(token), false, "the auth token appears in the log");
  assert.match(stderr, /\[INF\] tcpnetlock.server: Lock db granted to job-a at 127\.0\.0\.1:\d+/);
  assert.match(stderr, /\[DBG\] tcpnetlock.http: HTTP GET \/metrics 200 for 127\.0\.0\.1:\d+/);
});

Deno.test("levelCheck: cached while a setupLogging configuration stands, asked again after the next", async () => {
  const { getLogger, levelCheck, setupLogging } = await import("../lib/log.ts");
  const { resetSync } = await import("npm:@logtape/logtape@^2.4.2");
  const lines: string[] = [];
  const write = (text: string) => lines.push(text);
  try {
    const logger = getLogger(["tcpnetlock", "levelcheck"]);
    const infoOn = levelCheck(logger, "info");
    setupLogging({ level: "warning", write });
    assert.equal(infoOn(), false, "warning: info is off");
    assert.equal(infoOn(), false, "and stays off");
    setupLogging({ level: "info", write });
    assert.equal(infoOn(), true, "a new configuration is asked again: info is on");
    setupLogging({ level: "error", write });
    assert.equal(infoOn(), false);
  } finally {
    resetSync();
  }
});
