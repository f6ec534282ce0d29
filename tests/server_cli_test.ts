// server.ts as a real process: flags, environment, exit codes, signals, logs, restarts, TLS.

import assert from "node:assert/strict";
import { exchange, makeTlsFixture, RawClient, ROOT, startServerProcess } from "./test_util.ts";

async function runServer(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}server.ts`, ...args],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const d = new TextDecoder();
  return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) };
}

function token(reply: string | null): number {
  const m = /^ok,token:(\d+)$/.exec(reply ?? "");
  assert.ok(m, `expected ok,token:T, got ${reply}`);
  return Number(m[1]);
}

Deno.test("server --help lists every flag with its variable; --version prints the version", async () => {
  const help = await runServer(["--help"]);
  assert.equal(help.code, 0);
  for (
    const flag of [
      "--listen",
      "--port",
      "--info",
      "--debug",
      "--max-line",
      "--first-line-timeout",
      "--max-wait",
      "--max-connections",
      "--max-waiters",
      "--max-locks",
      "--max-session-locks",
      "--state-file",
      "--auth-token-file",
      "--tls-cert",
      "--tls-key",
      "--allow-remote-shutdown",
      "--log-format",
      "--max-unauthenticated",
      "--auth-timeout",
      "--write-timeout",
      "--http-max-connections",
      "--http-idle-timeout",
    ]
  ) {
    assert.ok(help.stdout.includes(flag), flag);
  }
  assert.match(help.stdout, /TCPNETLOCK_PORT/);
  const config = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));
  const version = await runServer(["--version"]);
  assert.equal(version.stdout.trim(), config.version);
});

Deno.test("server: unknown flags and bad values print usage and exit 2", async () => {
  for (
    const args of [
      ["--bogus"],
      ["--port", "http"],
      ["--port", "70000"],
      ["--max-line", "-5"],
      ["--first-line-timeout", "5s"],
      ["--tls-cert", "/nonexistent"],
      ["--auth-token-file", "/nonexistent/token"],
      ["--log-format", "xml"],
      ["stray-positional"],
    ]
  ) {
    const r = await runServer(args);
    assert.equal(r.code, 2, args.join(" "));
    assert.match(r.stderr, /^tcpnetlock server: /, args.join(" "));
    assert.equal(r.stderr.includes("    at "), false, "no stack trace");
  }
  const env = await runServer([], { TCPNETLOCK_PORT: "abc" });
  assert.equal(env.code, 2);
  // A bad value from a variable names the variable, not the flag.
  assert.match(env.stderr, /TCPNETLOCK_PORT: "abc"/);
});

Deno.test("server: a port in use is a one-line error naming it, exit 2", async () => {
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (busy.addr as Deno.NetAddr).port;
    const r = await runServer(["--listen", "127.0.0.1", "--port", String(port)]);
    assert.equal(r.code, 2);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`127\\.0\\.0\\.1:${port}.*in use`));
  } finally {
    busy.close();
  }
});

Deno.test("server: a bad listen address is a one-line error naming it, exit 2", async () => {
  for (const host of ["256.1.1.1", "no-such-host.invalid"]) {
    const r = await runServer(["--listen", host, "--port", "0"]);
    assert.equal(r.code, 2, host);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.ok(r.stderr.includes(host), r.stderr);
  }
});

Deno.test("server: every flag can come from TCPNETLOCK_* and the flag wins", async () => {
  // The variable gives the address and a tiny line limit; the flag overrides the port.
  await using srv = await startServerProcess([], {
    env: { TCPNETLOCK_MAX_LINE: "20", TCPNETLOCK_PORT: "1" },
  });
  assert.notEqual(srv.port, 1);
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:" + "x".repeat(20) + "\n"), [
    "bad-request",
  ]);
});

Deno.test("server: SIGTERM and SIGINT free every lock, close every connection, exit 0", async () => {
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    const srv = await startServerProcess();
    await using holder = await RawClient.connect(srv.port);
    assert.equal(await holder.request("lock,name:sig"), "ok");
    const status = await srv.stop(signal);
    assert.equal(status.code, 0, signal);
    assert.equal(await holder.line(), null, "the holder sees its connection end");
    assert.match(srv.stderr(), /freed: the connection of .* ended|Stopped/);
  }
});

Deno.test("server logs start-up, grants, refusals, releases and disconnect-releases", async () => {
  await using srv = await startServerProcess();
  await srv.waitForLog(/tcpnetlock \d+\.\d+\.\d+ listening on 127\.0\.0\.1:\d+/);
  {
    await using a = await RawClient.connect(srv.port);
    assert.equal(await a.request("lock,name:logged,client-id:job-1"), "ok");
    assert.deepEqual(await exchange(srv.port, "lock,name:logged,client-id:job-2\n"), [
      "not-granted",
    ]);
    assert.equal(await a.request("release"), "released");
  }
  const b = await RawClient.connect(srv.port);
  assert.equal(await b.request("lock,name:dropped,client-id:job-3"), "ok");
  b.close();
  await srv.waitForLog(
    /Lock dropped freed: the connection of job-3 at 127\.0\.0\.1:\d+ ended after [\d.]+ s/,
  );
  const log = srv.stderr();
  assert.match(log, /Lock logged granted to job-1 at 127\.0\.0\.1:\d+, token \d+/);
  assert.match(log, /Lock logged not granted to job-2 at 127\.0\.0\.1:\d+/);
  assert.match(log, /Lock logged released by job-1 at 127\.0\.0\.1:\d+ after [\d.]+ s/);
});

Deno.test("tokens keep increasing across a restart without a state file (clock seed)", async () => {
  const first = await startServerProcess();
  const port = first.port;
  let t1: number;
  {
    await using c = await RawClient.connect(port);
    t1 = token(await c.request("lock,name:a,wait:0"));
  }
  await first.stop("SIGKILL");
  await using second = await startServerProcess(["--port", String(port)]);
  await using c = await RawClient.connect(second.port);
  assert.ok(token(await c.request("lock,name:b,wait:0")) > t1);
});

Deno.test("with --state-file, tokens survive SIGKILL mid-run and the mark never moves back", async () => {
  const dir = await Deno.makeTempDir();
  const stateFile = `${dir}/tokens`;
  // A clock far in the past would not help a restarted server: only the file can.
  try {
    let highest = 0;
    let lastMark = 0;
    let port = 0;
    for (let round = 0; round < 3; round++) {
      const srv = await startServerProcess([
        "--state-file",
        stateFile,
        ...(port ? ["--port", String(port)] : []),
      ]);
      port = srv.port;
      for (let i = 0; i < 20; i++) {
        await using c = await RawClient.connect(port);
        const t = token(await c.request(`lock,name:n${i % 3},wait:0`));
        assert.ok(t > highest, `round ${round}: ${t} after ${highest}`);
        highest = t;
      }
      const mark = Number((await Deno.readTextFile(stateFile)).trim());
      assert.ok(mark >= highest, "the mark covers every token handed out");
      assert.ok(mark >= lastMark, "the mark never moves back");
      lastMark = mark;
      assert.equal(await Deno.stat(`${stateFile}.tmp`).then(() => true, () => false), false);
      await srv.stop("SIGKILL");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the state file's mark wins over a clock that is behind it", async () => {
  const dir = await Deno.makeTempDir();
  const stateFile = `${dir}/tokens`;
  try {
    const future = Date.now() * 1000 + 10_000_000_000;
    await Deno.writeTextFile(stateFile, `${future}\n`);
    await using srv = await startServerProcess(["--state-file", stateFile]);
    await using c = await RawClient.connect(srv.port);
    assert.equal(token(await c.request("lock,name:x,wait:0")), future + 1);
    await Deno.writeTextFile(`${dir}/garbage`, "not a number\n");
    const bad = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${ROOT}server.ts`, "--port", "0", "--state-file", `${dir}/garbage`],
      stderr: "piped",
      stdout: "null",
    }).output();
    assert.equal(bad.code, 2);
    assert.match(new TextDecoder().decode(bad.stderr), /does not hold a token high-water mark/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the auth token never appears in the server's log, with good or bad auth", async () => {
  const secret = "Zq8-super-secret-token-77";
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/token`, secret + "\n");
    await using srv = await startServerProcess(["--debug", "--auth-token-file", `${dir}/token`]);
    assert.deepEqual(await exchange(srv.port, `lock,name:a,auth:${secret}\nrelease\n`), [
      "ok",
      "released",
    ]);
    assert.deepEqual(await exchange(srv.port, `lock,name:a,auth:${secret}x\n`), [
      "err,unauthorized",
    ]);
    assert.deepEqual(await exchange(srv.port, `.stats,auth:wrong-${secret}\n`), [
      "err,unauthorized",
    ]);
    await srv.waitForLog(/unauthorized/);
    await srv.stop();
    assert.equal(srv.stderr().includes(secret), false);
    assert.match(srv.stderr(), /Lock a released/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("TLS: the server speaks TLS with --tls-cert/--tls-key and a client trusting the CA gets a lock", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startServerProcess([
      "--tls-cert",
      tls.certFile,
      "--tls-key",
      tls.keyFile,
    ]);
    const caCert = tls.caCert;
    const conn = await Deno.connectTls({
      hostname: "127.0.0.1",
      port: srv.port,
      caCerts: [caCert],
    });
    try {
      const enc = new TextEncoder();
      await conn.write(enc.encode("lock,name:tls,wait:0\n"));
      const buf = new Uint8Array(100);
      const n = await conn.read(buf);
      assert.match(new TextDecoder().decode(buf.subarray(0, n!)), /^ok,token:\d+\n$/);
      await conn.write(enc.encode("release\n"));
      const m = await conn.read(buf);
      assert.equal(new TextDecoder().decode(buf.subarray(0, m!)), "released\n");
    } finally {
      conn.close();
    }
    // Plain TCP gets no protocol answer from a TLS server.
    await using plain = await RawClient.connect(srv.port);
    await plain.write(".ping\n");
    assert.notEqual(await plain.line().catch(() => null), "pong");
    assert.deepEqual(await exchange(srv.port, ".ping\n").catch(() => []), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a lease or wait longer than setTimeout's range neither spins nor warns", async () => {
  await using srv = await startServerProcess([]);
  await using holder = await RawClient.connect(srv.port);
  token(await holder.request("lock,name:forever,ttl:3000000"));
  await using waiter = await RawClient.connect(srv.port);
  assert.equal(await waiter.request("lock,name:forever,wait:3000000"), "queued,position:1");
  const cpu = async () => {
    const stat = await Deno.readTextFile(`/proc/${srv.child.pid}/stat`);
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(f[11]) + Number(f[12]); // utime + stime, in clock ticks (1/100 s)
  };
  const before = await cpu();
  await new Promise((r) => setTimeout(r, 1000)); // an idle second, measured
  const used = (await cpu()) - before;
  assert.ok(used < 30, `the idle server used ${used / 100} s of CPU in 1 s`);
  assert.equal(/TimeoutOverflow/.test(srv.stderr()), false, srv.stderr());
  assert.equal(await holder.request(".keepalive"), "alive");
});

Deno.test("server: --max-session-locks and TCPNETLOCK_MAX_SESSION_LOCKS set a session's max-ids; bad values exit 2", async () => {
  {
    await using srv = await startServerProcess(["--max-session-locks", "2"]);
    await using c = await RawClient.connect(srv.port);
    assert.equal(await c.request("session"), "session,version:3,max-ids:2");
    await c.write("lock,id:a,name:f1\nlock,id:b,name:f2\nlock,id:c,name:f3\n");
    const replies = [await c.line(), await c.line(), await c.line()];
    // Replies for different ids come in any order.
    assert.ok(replies.includes("err,too many locks,id:c"), JSON.stringify(replies));
  }
  {
    await using srv = await startServerProcess([], {
      env: { TCPNETLOCK_MAX_SESSION_LOCKS: "3" },
    });
    await using c = await RawClient.connect(srv.port);
    assert.equal(await c.request("session"), "session,version:3,max-ids:3");
  }
  for (const bad of ["0", "-1", "many"]) {
    const r = await runServer(["--max-session-locks", bad]);
    assert.equal(r.code, 2, bad);
    assert.match(r.stderr, /--max-session-locks/);
  }
});
