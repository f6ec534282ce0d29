/**
 * The server's edges, probed as an attacker would (issue 12), against the real server process:
 * running out of file descriptors with idle HTTP connections, TLS sockets that never finish the
 * handshake, the HTTP idle timeout, silent unauthenticated sockets, unusable tokens, a holder that
 * never reads its replies, HTTPS on the HTTP port.
 */

import assert from "node:assert/strict";
import { LineConn, openMany, readToEnd, within } from "./fault_util.ts";
import {
  exchange,
  makeTlsFixture,
  RawClient,
  ROOT,
  type ServerProcess,
  startServerProcess,
  until,
} from "./test_util.ts";

/** Open descriptors of process `pid`. */
function fds(pid: number): number {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
}

/** The HTTP port from the server's log. */
async function httpPort(srv: ServerProcess): Promise<number> {
  const line = await srv.waitForLog(/https? listening on /);
  return Number(/https? listening on \S+:(\d+)/.exec(line)![1]);
}

/** Opens up to `n` connections, each given `ms` to connect; returns those that did. */
async function connectSome(port: number, n: number, ms = 2000): Promise<Deno.TcpConn[]> {
  const results = await Promise.allSettled(
    Array.from(
      { length: n },
      () => Deno.connect({ hostname: "127.0.0.1", port, signal: AbortSignal.timeout(ms) }),
    ),
  );
  return results.flatMap((r) => r.status === "fulfilled" ? [r.value] : []);
}

function closeAll(conns: { close(): void }[]): void {
  for (const c of conns) {
    try {
      c.close();
    } catch {
      // already closed by the server
    }
  }
}

/** GET over HTTP/1.1 on a fresh connection; the status, or null when it could not be had. */
async function httpGet(url: string, ms: number, client?: Deno.HttpClient): Promise<number | null> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(ms), client });
    await res.body?.cancel();
    return res.status;
  } catch {
    return null;
  }
}

Deno.test("out of descriptors: 200 idle lock connections, 300 idle HTTP connections and GET /healthz; the server stays up and answers again", async () => {
  await using srv = await startServerProcess([
    "--http-listen",
    "127.0.0.1:0",
    "--first-line-timeout",
    "600",
  ], { fdLimit: 256 });
  const http = await httpPort(srv);
  const idleLock = await openMany(srv.port, 200, 50);
  const idleHttp = await connectSome(http, 300);
  try {
    // The server has hit its limit: the probe may or may not be answered, the process must live.
    await httpGet(`http://127.0.0.1:${http}/healthz`, 2000);
    await srv.waitForLog(/Accept failed|Too many open files|too many connections/i, 10_000);
    const exited = await Promise.race([
      srv.child.status.then((s) => `exited with ${s.code}`),
      new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 500)),
    ]);
    assert.equal(exited, undefined, srv.stderr());
  } finally {
    closeAll(idleLock);
    closeAll(idleHttp);
  }
  // Descriptors free again: the lock port and /healthz answer.
  await until(
    async () => {
      const reply = await exchange(srv.port, ".ping\n").catch(() => []);
      return reply[0] === "pong";
    },
    ".ping to be answered",
    10_000,
    100,
  );
  await until(
    async () => await httpGet(`http://127.0.0.1:${http}/healthz`, 2000) === 200,
    "/healthz to answer 200",
    10_000,
    100,
  );
  assert.doesNotMatch(srv.stderr(), /Uncaught/);
});

Deno.test("TLS: 50 sockets that never start the handshake are closed at the first-line timeout, descriptors back to the baseline", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startServerProcess([
      "--tls-cert",
      tls.certFile,
      "--tls-key",
      tls.keyFile,
      "--first-line-timeout",
      "2",
    ]);
    const pid = srv.child.pid;
    const baseline = fds(pid);
    const t0 = performance.now();
    const silent = await openMany(srv.port, 50, 50);
    try {
      await until(() => fds(pid) >= baseline + 50, "the server to accept the 50 sockets", 2000);
      await until(
        () => fds(pid) <= baseline + 5,
        "the server's descriptors to come back within 5 of the baseline",
        4000 - (performance.now() - t0),
        50,
      );
      // Each silent socket was closed by the server.
      for (const c of silent) assert.equal(await within(readToEnd(c), 2000, "the close"), "");
    } finally {
      closeAll(silent);
    }
    const conn = await Deno.connectTls({
      hostname: "127.0.0.1",
      port: srv.port,
      caCerts: [tls.caCert],
    });
    try {
      await conn.write(new TextEncoder().encode("lock,name:tls-after,wait:0\nrelease\n"));
      const text = await within(readToEnd(conn), 5000, "the TLS client's replies");
      assert.match(text, /^ok,token:\d+\nreleased\n$/);
    } finally {
      conn.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("HTTP: 50 idle connections are closed by --http-idle-timeout", async () => {
  await using srv = await startServerProcess([
    "--http-listen",
    "127.0.0.1:0",
    "--http-idle-timeout",
    "1",
  ]);
  const http = await httpPort(srv);
  const pid = srv.child.pid;
  const baseline = fds(pid);
  const idle = await openMany(http, 50, 50);
  try {
    const t0 = performance.now();
    const ends = await within(
      Promise.all(idle.map((c) => readToEnd(c))),
      5000,
      "the idle HTTP connections to be closed",
    );
    assert.deepEqual(new Set(ends), new Set([""]));
    const took = performance.now() - t0;
    assert.ok(took >= 800, `closed after ${took.toFixed(0)} ms, before the idle timeout`);
    await until(() => fds(pid) <= baseline + 5, "the server's descriptors to come back", 2000);
  } finally {
    closeAll(idle);
  }
  // Over the connection limit, a connection is closed at once.
  assert.equal(await httpGet(`http://127.0.0.1:${http}/healthz`, 2000), 200);
});

Deno.test("with a token and --max-connections 30, 30 silent sockets do not stop a client with the token", async () => {
  const token = "k7-Token_for.tests";
  await using srv = await startServerProcess(["--max-connections", "30"], {
    env: { TCPNETLOCK_AUTH_TOKEN: token },
  });
  await srv.waitForLog(/auth on, TLS off/);
  const silent = await openMany(srv.port, 30, 30);
  try {
    // All but the newest 3 (10 % of 30) are closed to make room, oldest first.
    const replies = await within(
      Promise.all(silent.slice(0, 27).map((c) => readToEnd(c))),
      5000,
      "the oldest silent sockets to be closed",
    );
    assert.ok(
      replies.every((r) => r === "err,too many connections\n" || r === ""),
      JSON.stringify(replies),
    );
    await using client = await RawClient.connect(srv.port);
    assert.equal(await client.request(`lock,name:db,client-id:good,auth:${token}`), "ok");
    // Still held while newer silent sockets come and go.
    const more = await openMany(srv.port, 10, 10);
    closeAll(more);
    assert.equal(await client.request(".keepalive"), "alive");
  } finally {
    closeAll(silent);
  }
});

Deno.test("with a token, a silent socket is closed after --auth-timeout, not the first-line timeout", async () => {
  await using srv = await startServerProcess(["--auth-timeout", "0.5"], {
    env: { TCPNETLOCK_AUTH_TOKEN: "t0ken" },
  });
  await using silent = await RawClient.connect(srv.port);
  const t0 = performance.now();
  assert.equal(await within(silent.line(), 3000, "the close"), null);
  assert.ok(performance.now() - t0 < 2000);
});

async function runServer(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}server.ts`, "--port", "0", ...args],
    env,
    // A server that starts instead of refusing is killed, and the test fails on its exit code.
    signal: AbortSignal.timeout(10_000),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("start-up refuses an empty, blank or unusable token (exit 2) and says whether auth and TLS are on", async () => {
  const blank = await runServer([], { TCPNETLOCK_AUTH_TOKEN: " " });
  assert.equal(blank.code, 2, blank.stderr);
  assert.match(blank.stderr, /TCPNETLOCK_AUTH_TOKEN is set but empty/);
  const empty = await runServer([], { TCPNETLOCK_AUTH_TOKEN: "" });
  assert.equal(empty.code, 2, empty.stderr);
  for (
    const [token, what] of [
      ["a,b", "a comma"],
      ["in ner", "white space"],
      ["new\nline", "white space"],
      ["bell\x07", "a control character"],
    ]
  ) {
    const r = await runServer([], { TCPNETLOCK_AUTH_TOKEN: token });
    assert.equal(r.code, 2, r.stderr);
    assert.ok(r.stderr.includes(`contains ${what}`), r.stderr);
    assert.ok(!r.stderr.includes(token), "the token is never printed");
  }
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/blank`, "  \n");
    const file = await runServer(["--auth-token-file", `${dir}/blank`]);
    assert.equal(file.code, 2, file.stderr);
    assert.match(file.stderr, /is empty/);
    await Deno.writeTextFile(`${dir}/comma`, "x,y\n");
    const comma = await runServer(["--auth-token-file", `${dir}/comma`]);
    assert.equal(comma.code, 2, comma.stderr);
    assert.match(comma.stderr, /contains a comma/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  await using off = await startServerProcess([]);
  assert.match(await off.waitForLog(/listening on/), /\(auth off, TLS off\)/);
  await using on = await startServerProcess([], { env: { TCPNETLOCK_AUTH_TOKEN: " s3cret\n" } });
  const line = await on.waitForLog(/listening on/);
  assert.match(line, /\(auth on, TLS off\)/);
  assert.ok(!on.stderr().includes("s3cret"));
  assert.deepEqual(await exchange(on.port, "lock,name:a,auth:s3cret\nrelease\n"), [
    "ok",
    "released",
  ]);
});

Deno.test("a holder that floods .keepalive and never reads is closed after --write-timeout; its lock goes to the next", async () => {
  await using srv = await startServerProcess(["--write-timeout", "1"]);
  const slow = await LineConn.connect(srv.port);
  await slow.send("lock,name:flooded");
  assert.equal(await within(slow.line(), 2000, "the grant"), "ok");
  const chunk = new TextEncoder().encode(".keepalive\n".repeat(1000));
  const writing = (async () => {
    try {
      for (let i = 0; i < 100_000; i++) {
        let done = 0;
        while (done < chunk.length) done += await slow.conn.write(chunk.subarray(done));
      }
    } catch {
      // the server closed it, as it should
    }
  })();
  try {
    await using next = await RawClient.connect(srv.port);
    const t0 = performance.now();
    assert.equal(await next.request("lock,name:flooded,wait:20"), "queued,position:1");
    assert.match((await within(next.line(), 15_000, "the hand-over"))!, /^ok,token:\d+$/);
    console.log(`  handed over ${(performance.now() - t0).toFixed(0)} ms after queueing`);
    await srv.waitForLog(/has not read its replies/);
  } finally {
    slow.close();
    await writing;
  }
});

Deno.test("with --tls-cert the HTTP port serves HTTPS with the same certificate, and not plain HTTP", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startServerProcess([
      "--tls-cert",
      tls.certFile,
      "--tls-key",
      tls.keyFile,
      "--http-listen",
      ":0",
    ], { env: { TCPNETLOCK_AUTH_TOKEN: "tok" } });
    const line = await srv.waitForLog(/https listening on /);
    assert.match(line, /https listening on 127\.0\.0\.1:\d+/);
    const http = await httpPort(srv);
    using client = Deno.createHttpClient({ caCerts: [tls.caCert] });
    const res = await fetch(`https://localhost:${http}/metrics`, {
      client,
      headers: { authorization: "Bearer tok" },
    });
    assert.equal(res.status, 200);
    assert.match(await res.text(), /tcpnetlock_connections/);
    assert.equal(await httpGet(`https://localhost:${http}/healthz`, 2000, client), 200);
    // Plain HTTP gets no answer: the token never crosses in clear text.
    assert.equal(await httpGet(`http://127.0.0.1:${http}/healthz`, 2000), null);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("docs/security.md documents every hardening flag with its variable, as --help lists them", async () => {
  const doc = await Deno.readTextFile(`${ROOT}docs/security.md`);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}server.ts`, "--help"],
    stdout: "piped",
  }).output();
  const help = new TextDecoder().decode(out.stdout);
  for (
    const flag of [
      "auth-token-file",
      "max-unauthenticated",
      "auth-timeout",
      "first-line-timeout",
      "max-connections",
      "write-timeout",
      "max-line",
      "tls-cert",
      "tls-key",
      "http-listen",
      "http-max-connections",
      "http-idle-timeout",
      "allow-remote-shutdown",
    ]
  ) {
    const m = new RegExp(`--${flag}\\b.*\\[(TCPNETLOCK_[A-Z_]+)\\]`).exec(help);
    assert.ok(m, `--help lists --${flag} with its variable`);
    assert.ok(doc.includes(`\`--${flag}`), `docs/security.md: --${flag}`);
    assert.ok(doc.includes(m[1]), `docs/security.md: ${m[1]}`);
  }
  assert.ok(doc.includes("TCPNETLOCK_AUTH_TOKEN`"));
  // The start-up line as the document shows it.
  await using srv = await startServerProcess([]);
  const line = await srv.waitForLog(/listening on/);
  const shown = /`(tcpnetlock \S+ listening on \S+ \(auth on, TLS on\))`/.exec(doc)![1];
  const pattern = shown.replace(/[.()]/g, "\\$&").replace("0\\.2\\.0", "\\S+")
    .replace("127\\.0\\.0\\.1:7654", "127\\.0\\.0\\.1:\\d+").replace(
      "auth on, TLS on",
      "auth off, TLS off",
    );
  assert.match(line, new RegExp(pattern));
});

Deno.test("a session that stops reading is closed after --write-timeout, every lock of it freed", async () => {
  // A high id limit keeps the owed-bytes cut-off (128 bytes per id) far away: only the write
  // deadline can end this session.
  await using srv = await startServerProcess([
    "--write-timeout",
    "1",
    "--max-session-locks",
    "100000",
  ]);
  const slow = await LineConn.connect(srv.port);
  await slow.send("session");
  assert.match((await within(slow.line(), 2000, "the opening"))!, /^session,version:3/);
  await slow.send("lock,id:a,name:flooded-s");
  assert.match((await within(slow.line(), 2000, "the grant"))!, /^ok,token:\d+,id:a$/);
  // 15 MB of .keepalive: the server reads it all; its 8 MB of `alive` replies fill the socket
  // buffers and the rest waits to be written, below the owed-bytes cut-off. Then silence.
  const chunk = new TextEncoder().encode(".keepalive\n".repeat(10_000));
  for (let i = 0; i < 140; i++) {
    let done = 0;
    while (done < chunk.length) done += await slow.conn.write(chunk.subarray(done));
  }
  try {
    await using next = await RawClient.connect(srv.port);
    assert.equal(await next.request("lock,name:flooded-s,wait:20"), "queued,position:1");
    assert.match((await within(next.line(), 15_000, "the hand-over"))!, /^ok,token:\d+$/);
    await srv.waitForLog(/Closing the session of .* has not read its replies/);
  } finally {
    slow.close();
  }
});
