/**
 * The command line of client.ts, run as a subprocess against a real in-process server.
 */

import assert from "node:assert/strict";
import { LockClient } from "../client.ts";
import { Program, ROOT, startTestServer, until } from "./test_util.ts";

const CLIENT = `${ROOT}client.ts`;

/** The environment of a CLI run: no TCPNETLOCK_* from the outside unless given. */
function env(vars: Record<string, string> = {}): Record<string, string> {
  return {
    TCPNETLOCK_HOST: "",
    TCPNETLOCK_PORT: "",
    TCPNETLOCK_CLIENT_ID: "",
    TCPNETLOCK_AUTH_TOKEN: "",
    NO_COLOR: "1",
    ...vars,
  };
}

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI to its end. */
async function cli(args: string[], vars: Record<string, string> = {}): Promise<Output> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLIENT, ...args],
    env: env(vars),
    stdin: "null",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

/** A CLI process that runs on (`hold`), with its output read as it comes. */
class Running extends Program {
  constructor(args: string[], vars: Record<string, string> = {}) {
    super(Deno.execPath(), ["run", "-A", CLIENT, ...args], { env: env(vars), label: "the client" });
  }
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

const granted = (r: Running) => r.stdout.startsWith("granted\n");

// ---------------------------------------------------------------------------------------------
// Admin commands

Deno.test("cli: ping prints pong and exits 0", async () => {
  await using srv = await startTestServer();
  const out = await cli(["--host", "127.0.0.1", "--port", String(srv.port), "ping"]);
  assert.deepEqual(out, { code: 0, stdout: "pong\n", stderr: "" });
});

Deno.test("cli: stats prints the server's counters as JSON", async () => {
  await using srv = await startTestServer();
  await using _lock = await new LockClient({ host: "127.0.0.1", port: srv.port }).lock("db");
  const out = await cli(["--port", String(srv.port), "--host", "127.0.0.1", "stats"]);
  assert.equal(out.code, 0, out.stderr);
  const stats = JSON.parse(out.stdout);
  assert.equal(stats.lock_count, 1);
  assert.equal(typeof stats.version, "string");
});

Deno.test("cli: locks prints JSON with --json or off a terminal, a table with --table", async () => {
  await using srv = await startTestServer();
  const client = new LockClient({ host: "127.0.0.1", port: srv.port, clientId: "web-1" });
  await using lock = await client.lock("db", { wait: 0 });
  const base = ["--host", "127.0.0.1", "--port", String(srv.port), "locks"];
  for (const args of [[...base, "--json"], base]) {
    const out = await cli(args);
    assert.equal(out.code, 0, out.stderr);
    const [info] = JSON.parse(out.stdout);
    assert.equal(info.name, "db");
    assert.equal(info.holders[0].client_id, "web-1");
    assert.equal(info.holders[0].token, lock.token);
  }
  const table = await cli([...base, "--table"]);
  assert.equal(table.code, 0, table.stderr);
  const [header, row] = table.stdout.trimEnd().split("\n");
  assert.match(header, /^NAME\s+LIMIT\s+WAITING\s+CLIENT ID\s+TOKEN\s+SINCE\s+REMOTE$/);
  assert.match(
    row,
    new RegExp(`^db\\s+1\\s+0\\s+web-1\\s+${lock.token}\\s+\\S+Z\\s+127\\.0\\.0\\.1:`),
  );
});

Deno.test("cli: shutdown stops the server", async () => {
  const srv = await startTestServer();
  const out = await cli(["--host", "127.0.0.1", "--port", String(srv.port), "shutdown"]);
  assert.deepEqual(out, { code: 0, stdout: "shutting-down\n", stderr: "" });
  await srv.server.finished;
  await srv.server.close();
});

// ---------------------------------------------------------------------------------------------
// hold

Deno.test("cli: hold prints granted, holds until SIGTERM, then releases and exits 0", async () => {
  await using srv = await startTestServer();
  await using hold = new Running([
    "--host",
    "127.0.0.1",
    "--port",
    String(srv.port),
    "--client-id",
    "cli-1",
    "hold",
    "db",
  ]);
  await hold.until(granted, "granted");
  assert.equal(hold.stdout, "granted\n", "a version 1 request has no token line");
  assert.deepEqual(srv.server.locks().map((l) => [l.name, l.holders[0].client_id]), [
    ["db", "cli-1"],
  ]);
  hold.kill("SIGTERM");
  const out = await hold.output();
  assert.equal(out.code, 0, out.stderr);
  assert.deepEqual(srv.server.locks(), []);
  assert.equal(srv.server.stats().lock_expired_count, 0);
});

Deno.test("cli: hold with --wait and --ttl prints the token and keeps the lease alive", async () => {
  await using srv = await startTestServer();
  await using hold = new Running([
    "--host",
    "127.0.0.1",
    "--port",
    String(srv.port),
    "hold",
    "db",
    "--wait",
    "5",
    "--ttl",
    "0.5",
  ]);
  await hold.until((r) => /^granted\ntoken:\d+\n$/.test(r.stdout), "the token line");
  const token = Number(/token:(\d+)/.exec(hold.stdout)![1]);
  assert.equal(srv.server.locks()[0].holders[0].token, token);
  await new Promise((resolve) => setTimeout(resolve, 1600)); // more than three ttls
  assert.equal(srv.server.locks()[0]?.holders[0].token, token, "still held");
  hold.kill("SIGINT");
  const out = await hold.output();
  assert.equal(out.code, 0, out.stderr);
  assert.deepEqual(srv.server.locks(), []);
  assert.equal(srv.server.stats().lock_expired_count, 0);
});

Deno.test("cli: hold exits 123 when the lock is held elsewhere or the wait runs out", async () => {
  await using srv = await startTestServer();
  await using _lock = await new LockClient({ host: "127.0.0.1", port: srv.port }).lock("db");
  const base = ["--host", "127.0.0.1", "--port", String(srv.port), "hold", "db"];
  const now = await cli(base);
  assert.equal(now.code, 123);
  assert.equal(now.stdout, "");
  assert.match(now.stderr, /Cannot acquire lock "db" on "127\.0\.0\.1:\d+": not granted/);
  const waited = await cli([...base, "--wait", "0.1"]);
  assert.equal(waited.code, 123);
  assert.match(waited.stderr, /position 1 in the queue/);
  assert.match(waited.stderr, /the wait of 0\.1 s ran out/);
});

Deno.test("cli: hold exits 122 when the server stops while the lock is held", async () => {
  const srv = await startTestServer();
  await using hold = new Running(["--host", "127.0.0.1", "--port", String(srv.port), "hold", "db"]);
  await hold.until(granted, "granted");
  await srv.server.close();
  const out = await hold.output();
  assert.equal(out.code, 122);
  assert.match(
    out.stderr,
    /Lost lock "db" on "127\.0\.0\.1:\d+": the server closed the connection/,
  );
});

Deno.test("cli: hold gives up on SIGINT while waiting in the queue, exit 130", async () => {
  await using srv = await startTestServer();
  await using _lock = await new LockClient({ host: "127.0.0.1", port: srv.port }).lock("db");
  await using hold = new Running([
    "--host",
    "127.0.0.1",
    "--port",
    String(srv.port),
    "hold",
    "db",
    "--wait",
    "60",
  ]);
  await hold.until((r) => r.stderr.includes("position 1 in the queue"), "queued");
  hold.kill("SIGINT");
  const out = await hold.output();
  assert.equal(out.code, 130);
  assert.equal(out.stdout, "");
  await until(() => srv.server.locks()[0].waiting === 0, "the waiter to leave the queue");
});

Deno.test("cli: the connection refused exits 2", async () => {
  const port = String(freePort());
  for (const command of [["hold", "db"], ["ping"], ["stats"], ["locks"], ["shutdown"]]) {
    const out = await cli(["--host", "127.0.0.1", "--port", port, ...command]);
    assert.equal(out.code, 2, command.join(" "));
    assert.equal(
      out.stderr,
      `error: Cannot connect to tcpnetlock server "127.0.0.1:${port}": connection refused\n`,
    );
  }
});

Deno.test("cli: bad usage prints the usage on stderr and exits 2", async () => {
  for (
    const args of [
      [],
      ["bogus"],
      ["hold"],
      ["hold", "a", "b"],
      ["ping", "--wait", "1"],
      ["--nope", "ping"],
      ["--port", "http", "ping"],
      ["hold", "db", "--wait", "soon"],
      ["hold", "db", "--ttl", "0"],
      ["hold", "db", "--limit", "0"],
      ["hold", "bad name"],
      ["--client-id", "bad id", "ping"],
      ["--auth-token-file", "/nonexistent/token", "ping"],
    ]
  ) {
    const out = await cli(args);
    assert.equal(out.code, 2, `${args.join(" ")}: ${out.stderr}`);
    assert.equal(out.stdout, "");
    assert.match(out.stderr, /^error: /, args.join(" "));
  }
  const out = await cli(["hold"]);
  assert.match(out.stderr, /Usage: deno run -A client\.ts/);
});

Deno.test("cli: --help prints the usage and exits 0", async () => {
  const out = await cli(["--help"]);
  assert.equal(out.code, 0);
  assert.match(out.stdout, /^Usage: /);
  assert.match(out.stdout, /hold NAME/);
});

// ---------------------------------------------------------------------------------------------
// Environment and auth

Deno.test("cli: TCPNETLOCK_HOST, TCPNETLOCK_PORT and TCPNETLOCK_CLIENT_ID are the defaults", async () => {
  await using srv = await startTestServer();
  await using hold = new Running(["hold", "db"], {
    TCPNETLOCK_HOST: "127.0.0.1",
    TCPNETLOCK_PORT: String(srv.port),
    TCPNETLOCK_CLIENT_ID: "from-env",
  });
  await hold.until(granted, "granted");
  assert.equal(srv.server.locks()[0].holders[0].client_id, "from-env");
  hold.kill("SIGTERM");
  assert.equal((await hold.output()).code, 0);
});

Deno.test("cli: --auth-token-file and TCPNETLOCK_AUTH_TOKEN authenticate; without, exit 4", async () => {
  await using srv = await startTestServer({ authToken: "s3cret" });
  const base = ["--host", "127.0.0.1", "--port", String(srv.port)];
  const denied = await cli([...base, "stats"]);
  assert.equal(denied.code, 4);
  assert.match(denied.stderr, /the server answered "unauthorized"/);

  const file = await Deno.makeTempFile();
  try {
    await Deno.writeTextFile(file, "s3cret\n");
    const out = await cli([...base, "--auth-token-file", file, "stats"]);
    assert.equal(out.code, 0, out.stderr);
  } finally {
    await Deno.remove(file);
  }
  const out = await cli([...base, "stats"], { TCPNETLOCK_AUTH_TOKEN: "s3cret" });
  assert.equal(out.code, 0, out.stderr);
});

Deno.test("cli: hold --shared sends mode:shared; not granted, it names the holder", async () => {
  // A stand-in server: records lock lines, answers not-granted, and a .locks naming a holder.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const lines: string[] = [];
  const serve = (async () => {
    for (let i = 0; i < 2; i++) {
      const conn = await listener.accept();
      const buf = new Uint8Array(1024);
      const line = new TextDecoder().decode(buf.subarray(0, await conn.read(buf) ?? 0)).trim();
      lines.push(line);
      const since = new Date(Date.now() - 134_000).toISOString();
      const reply = line.startsWith(".locks")
        ? `locks,${
          JSON.stringify([{
            name: "db",
            limit: 1,
            waiting: 3,
            holders: [{ client_id: "cron-1", token: 7, since, remote: "10.0.3.7:4000" }],
          }])
        }`
        : "not-granted";
      await conn.write(new TextEncoder().encode(reply + "\n"));
      conn.close();
    }
  })();
  try {
    const out = await cli(["--port", String(listener.addr.port), "hold", "db", "--shared"]);
    assert.equal(out.code, 123, out.stderr);
    assert.match(out.stderr, /"db" is held by cron-1 \(10\.0\.3\.7\) for 2m1\ds; 3 waiting/);
  } finally {
    await serve;
    listener.close();
  }
  assert.match(lines[0], /^lock,name:db,.*mode:shared/);
});
