// Version 1 of the protocol (tcpnetlock 0.1.8), row by row, over real sockets.

import assert from "node:assert/strict";
import { exchange, RawClient, ROOT, startTestServer, until } from "./test_util.ts";

Deno.test("lock is granted with exactly `ok` and held while the connection lives", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.deepEqual(await holder.request("lock,name:django-migrations"), "ok");
  assert.deepEqual(await exchange(srv.port, "lock,name:django-migrations\n"), ["not-granted"]);
  assert.deepEqual(await holder.request("release"), "released");
  assert.deepEqual(await holder.line(), null, "the server closes after released");
  assert.deepEqual(await exchange(srv.port, "lock,name:django-migrations\nrelease\n"), [
    "ok",
    "released",
  ]);
});

Deno.test("lock with a client-id is granted with `ok`; a bad client id gets err,invalid client id", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(await exchange(srv.port, "lock,name:a,client-id:web-1.pod@ns_x\nrelease\n"), [
    "ok",
    "released",
  ]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a,client-id:bad id!\n"), [
    "err,invalid client id",
  ]);
  assert.deepEqual(await exchange(srv.port, "lock,name:a,client-id:\n"), ["err,invalid client id"]);
});

Deno.test("lock with a missing or invalid name gets err,invalid lock name and is closed", async () => {
  await using srv = await startTestServer();
  for (
    const req of [
      "lock",
      "lock,name",
      "lock,name:",
      "lock,name:has space",
      "lock,name:dot.ted",
      "lock,name:ünï",
      `lock,name:${"x".repeat(256)}`,
      "lock,nom:a",
    ]
  ) {
    assert.deepEqual(await exchange(srv.port, req + "\n"), ["err,invalid lock name"], req);
  }
  assert.deepEqual(await exchange(srv.port, `lock,name:${"x".repeat(255)}\nrelease\n`), [
    "ok",
    "released",
  ]);
});

Deno.test("lock,name:N with blanks or a field twice reads as the general parse does", async () => {
  // `lock,name:N` has a quick path; its variants must get the general parse's answer (blanks
  // trimmed, the last of a repeated field counts).
  await using srv = await startTestServer();
  await using a = await RawClient.connect(srv.port);
  assert.equal(await a.request("lock, name: q1 "), "ok");
  await using b = await RawClient.connect(srv.port);
  assert.equal(await b.request("lock,name:q0,name:q2"), "ok");
  assert.deepEqual(await exchange(srv.port, "lock,name:q1\n"), ["not-granted"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:q2\n"), ["not-granted"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:q0\nrelease\n"), ["ok", "released"]);
});

Deno.test(".ping answers pong and closes", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"]);
});

Deno.test(".stats answers stats, with the five original keys", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.deepEqual(await holder.request("lock,name:s1"), "ok");
  assert.deepEqual(await exchange(srv.port, "lock,name:s1\n"), ["not-granted"]);
  const [line, ...rest] = await exchange(srv.port, ".stats\n");
  assert.deepEqual(rest, []);
  assert.match(line, /^stats,\{/);
  const stats = JSON.parse(line.slice("stats,".length));
  for (const k of ["lock_count", "maxrss", "requests_count", "lock_acquired_count"]) {
    assert.deepEqual(typeof stats[k], "number", k);
  }
  assert.deepEqual(stats.lock_count, 1);
  assert.deepEqual(stats.lock_acquired_count, 1);
  assert.deepEqual(stats.lock_not_acquired_count, 1);
  assert.deepEqual(stats.requests_count, 3);
  assert.ok(stats.maxrss > 1000, "maxrss in kilobytes");
});

Deno.test(".server-shutdown from loopback answers shutting-down and stops the server", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.deepEqual(await holder.request("lock,name:x"), "ok");
  assert.deepEqual(await exchange(srv.port, ".server-shutdown\n"), ["shutting-down"]);
  await srv.server.finished;
  assert.deepEqual(await holder.line(), null, "held connections are closed");
  await assertRefused(srv.port);
});

Deno.test("an unknown first action gets bad-action and is closed", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(await exchange(srv.port, "unlock,name:a\n"), ["bad-action"]);
  assert.deepEqual(await exchange(srv.port, "release\n"), ["bad-action"]);
  assert.deepEqual(await exchange(srv.port, ".keepalive\n"), ["bad-action"]);
  assert.deepEqual(await exchange(srv.port, "LOCK,name:a\n"), ["bad-action"]);
});

Deno.test("while holding: .keepalive gets alive, anything else bad-action, and the lock stays", async () => {
  await using srv = await startTestServer();
  await using holder = await RawClient.connect(srv.port);
  assert.deepEqual(await holder.request("lock,name:k"), "ok");
  assert.deepEqual(await holder.request(".keepalive"), "alive");
  assert.deepEqual(await holder.request("lock,name:k"), "bad-action");
  assert.deepEqual(await holder.request(""), "bad-action");
  assert.deepEqual(await holder.request(".ping"), "bad-action");
  assert.deepEqual(await holder.request(" .keepalive , x:y "), "alive");
  assert.deepEqual(await exchange(srv.port, "lock,name:k\n"), ["not-granted"]);
  assert.deepEqual(await holder.request(" release ,why:done"), "released");
  assert.deepEqual(await holder.line(), null);
});

Deno.test("framing: \\r\\n is accepted, white space is ignored, later duplicate keys win", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(await exchange(srv.port, "lock,name:crlf\r\nrelease\r\n"), ["ok", "released"]);
  assert.deepEqual(await exchange(srv.port, "  lock ,  name :  spaced  \nrelease\n"), [
    "ok",
    "released",
  ]);
  assert.deepEqual(await exchange(srv.port, "lock,name:bad name,name:good\nrelease\n"), [
    "ok",
    "released",
  ]);
  assert.deepEqual(await exchange(srv.port, "lock,name:x,unknown:1,flag\nrelease\n"), [
    "ok",
    "released",
  ]);
  assert.deepEqual(await exchange(srv.port, " .ping \r\n"), ["pong"]);
});

Deno.test("framing: several lines in one packet are answered in order", async () => {
  await using srv = await startTestServer();
  assert.deepEqual(
    await exchange(srv.port, "lock,name:p\n.keepalive\nnope\n.keepalive\nrelease\n.ping\n"),
    ["ok", "alive", "bad-action", "alive", "released"],
  );
});

Deno.test("framing: a line split across many packets is read whole", async () => {
  await using srv = await startTestServer();
  await using c = await RawClient.connect(srv.port);
  for (const ch of "lock,name:slow\n") await c.write(ch);
  assert.deepEqual(await c.line(), "ok");
});

Deno.test("framing: a partial line at EOF is ignored and takes no lock", async () => {
  await using srv = await startTestServer();
  {
    await using c = await RawClient.connect(srv.port);
    await c.write("lock,name:partial");
    await c.conn.closeWrite();
    assert.deepEqual(await c.rest(), []);
  }
  assert.deepEqual(await exchange(srv.port, "lock,name:partial\nrelease\n"), ["ok", "released"]);
});

Deno.test("framing: an empty action or an empty key gets bad-request and is closed", async () => {
  await using srv = await startTestServer();
  for (const req of ["", "   ", ",name:a", "lock,:a", "lock,name:a,,", "lock, :x"]) {
    assert.deepEqual(await exchange(srv.port, req + "\n"), ["bad-request"], JSON.stringify(req));
  }
});

Deno.test("framing: a line over the limit gets bad-request; one at the limit is read", async () => {
  await using srv = await startTestServer({ maxLine: 64 });
  const atLimit = "lock,name:" + "a".repeat(64 - "lock,name:".length);
  assert.deepEqual(atLimit.length, 64);
  assert.deepEqual(await exchange(srv.port, atLimit + "\nrelease\n"), ["ok", "released"]);
  assert.deepEqual(await exchange(srv.port, atLimit + "b\n"), ["bad-request"]);
  // Without any newline at all: the server stops reading at the limit and answers.
  await using c = await RawClient.connect(srv.port);
  await c.write("x".repeat(65));
  assert.deepEqual(await c.line(), "bad-request");
});

Deno.test("framing: a line that is not valid UTF-8 gets bad-request", async () => {
  await using srv = await startTestServer();
  await using c = await RawClient.connect(srv.port);
  await c.write(new Uint8Array([0x6c, 0x6f, 0x63, 0x6b, 0x2c, 0xff, 0xfe, 0x0a]));
  assert.deepEqual(await c.rest(), ["bad-request"]);
  assert.deepEqual(await exchange(srv.port, ".ping\n"), ["pong"], "the server goes on");
});

Deno.test("a line over the limit while holding gets bad-request and frees the lock", async () => {
  await using srv = await startTestServer({ maxLine: 32 });
  await using c = await RawClient.connect(srv.port);
  assert.deepEqual(await c.request("lock,name:big"), "ok");
  await c.write("y".repeat(100) + "\n");
  assert.deepEqual(await c.rest(), ["bad-request"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:big\nrelease\n"), ["ok", "released"]);
});

Deno.test("a connection that sends no line within the first-line timeout is closed", async () => {
  await using srv = await startTestServer({ firstLineTimeout: 0.2 });
  await using quiet = await RawClient.connect(srv.port);
  const started = performance.now();
  assert.deepEqual(await quiet.rest(), []);
  assert.ok(performance.now() - started >= 150, "not closed before the timeout");
  await using partial = await RawClient.connect(srv.port);
  await partial.write("lock,name:never-finished");
  assert.deepEqual(await partial.rest(), []);
  assert.deepEqual(srv.server.connections, 0);
});

Deno.test("the lock is freed the moment its connection ends: FIN", async () => {
  await using srv = await startTestServer();
  const c = await RawClient.connect(srv.port);
  assert.deepEqual(await c.request("lock,name:fin"), "ok");
  c.close();
  await until(() => srv.server.table.holders === 0, "the lock to be freed");
  assert.deepEqual(await exchange(srv.port, "lock,name:fin\nrelease\n"), ["ok", "released"]);
});

Deno.test("the lock is freed the moment its connection ends: half-close", async () => {
  await using srv = await startTestServer();
  await using c = await RawClient.connect(srv.port);
  assert.deepEqual(await c.request("lock,name:half"), "ok");
  await c.conn.closeWrite();
  assert.deepEqual(await c.rest(), [], "the server closes its side too");
  assert.deepEqual(await exchange(srv.port, "lock,name:half\nrelease\n"), ["ok", "released"]);
});

Deno.test("the lock is freed the moment its connection ends: reset", async () => {
  await using srv = await startTestServer();
  const c = await RawClient.connect(srv.port);
  assert.deepEqual(await c.request("lock,name:rst"), "ok");
  // Closing with an unread reply in the receive buffer makes the kernel send RST, not FIN:
  // read one byte of `alive\n` (so it has arrived) and leave the other five unread.
  await c.write(".keepalive\n");
  assert.deepEqual(await c.conn.read(new Uint8Array(1)), 1);
  c.close();
  await until(() => srv.server.table.holders === 0, "the lock to be freed after RST");
  assert.deepEqual(await exchange(srv.port, "lock,name:rst\nrelease\n"), ["ok", "released"]);
});

Deno.test("exactly one of many racing clients gets the lock", async () => {
  await using srv = await startTestServer();
  const clients = await Promise.all(
    Array.from({ length: 60 }, () => RawClient.connect(srv.port)),
  );
  try {
    const replies = await Promise.all(clients.map((c) => c.request("lock,name:race")));
    assert.deepEqual(replies.filter((r) => r === "ok").length, 1);
    assert.deepEqual(replies.filter((r) => r === "not-granted").length, 59);
  } finally {
    for (const c of clients) c.close();
  }
});

Deno.test("bad input never disturbs another client's lock", async () => {
  await using srv = await startTestServer({ maxLine: 128 });
  await using holder = await RawClient.connect(srv.port);
  assert.deepEqual(await holder.request("lock,name:precious"), "ok");
  await exchange(srv.port, "x".repeat(5000));
  await exchange(srv.port, "\xff\n");
  await exchange(srv.port, ",,,\n");
  await exchange(srv.port, "lock,name:precious,wait:nope\n");
  assert.deepEqual(await holder.request(".keepalive"), "alive");
  assert.deepEqual(await exchange(srv.port, "lock,name:precious\n"), ["not-granted"]);
});

Deno.test("telnet recipe: typed lines with \\r\\n, the second terminal is refused", async () => {
  await using srv = await startTestServer({ hostname: "localhost" });
  await using first = await RawClient.connect(srv.port, "localhost");
  await first.write("lock,name:django-migrations\r\n");
  assert.deepEqual(await first.line(), "ok");
  await using second = await RawClient.connect(srv.port, "localhost");
  await second.write("lock,name:django-migrations\r\n");
  assert.deepEqual(await second.line(), "not-granted");
  assert.deepEqual(await second.line(), null, "Connection closed by foreign host");
});

Deno.test("netcat recipe: `echo 'lock,name:LOCK_NAME' | nc localhost PORT` holds the lock", async () => {
  if (!(await hasCommand("nc"))) {
    // netcat is installed by .ci/run; on a developer machine without it, say so
    console.warn("nc not installed: skipping the real-netcat recipe test");
    return;
  }
  await using srv = await startTestServer({ hostname: "localhost" });
  const tmp = await Deno.makeTempDir();
  try {
    // The README's FIFO recipe (tests/docs_test.ts runs it as written), with this test's port.
    const script = `
      fifo=${tmp}/fifo && mkfifo "$fifo"
      echo 'lock,name:LOCK_NAME' | nc -v localhost ${srv.port} > "$fifo" &
      exec 3< "$fifo"
      read -r result <&3
      echo "result=$result"
    `;
    const child = new Deno.Command("bash", {
      args: ["-c", script + "wait"],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let out = "";
    while (!out.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      out += value;
    }
    assert.deepEqual(out.trim(), "result=ok");
    assert.deepEqual(await exchange(srv.port, "lock,name:LOCK_NAME\n", "localhost"), [
      "not-granted",
    ]);
    // Ending netcat ends the connection and frees the lock.
    await new Deno.Command("pkill", { args: ["-f", `nc -v localhost ${srv.port}`] }).output();
    await child.status;
    await reader.cancel();
    await until(() => srv.server.table.holders === 0, "netcat's lock to be freed");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("a server on `localhost` listens on both 127.0.0.1 and ::1 when ::1 exists", async () => {
  await using srv = await startTestServer({ hostname: "localhost" });
  const hosts = srv.server.addrs.map((a) => a.hostname);
  assert.ok(hosts.includes("127.0.0.1"));
  assert.deepEqual(await exchange(srv.port, ".ping\n", "127.0.0.1"), ["pong"]);
  if (hasIpv6Loopback()) {
    assert.ok(hosts.includes("::1"), `listening on ${hosts}`);
    assert.deepEqual(await exchange(srv.port, ".ping\n", "::1"), ["pong"]);
    assert.deepEqual(await exchange(srv.port, ".ping\n", "localhost"), ["pong"]);
  }
});

Deno.test("version in lib/version.ts matches deno.json", async () => {
  const { VERSION } = await import("../lib/version.ts");
  const config = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));
  assert.deepEqual(VERSION, config.version);
});

async function assertRefused(port: number): Promise<void> {
  try {
    const c = await Deno.connect({ hostname: "127.0.0.1", port });
    c.close();
    throw new Error("the server still accepts connections");
  } catch (err) {
    assert.ok(err instanceof Deno.errors.ConnectionRefused, String(err));
  }
}

async function hasCommand(name: string): Promise<boolean> {
  const r = await new Deno.Command("bash", { args: ["-c", `command -v ${name}`], stdout: "null" })
    .output();
  return r.success;
}

function hasIpv6Loopback(): boolean {
  try {
    const l = Deno.listen({ hostname: "::1", port: 0 });
    l.close();
    return true;
  } catch {
    return false;
  }
}
