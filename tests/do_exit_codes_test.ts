/**
 * One test per exit code of do.ts, each through the real program against a real server, and the
 * command-line forms people bring from flock, etcdctl and consul (`NAME -- cmd`, `-w`, `-n`,
 * `-E`, `-c`, `--wait forever`, `-s`), with the messages that name who holds the lock.
 */

import assert from "node:assert/strict";
import { makeTlsFixture, Program, RawClient, ROOT, startTestServer, until } from "./test_util.ts";

const DO = `${ROOT}do.ts`;

function env(port: number, vars: Record<string, string> = {}): Record<string, string> {
  const clean: Record<string, string> = {};
  for (const name of Object.keys(Deno.env.toObject())) {
    if (name.startsWith("TCPNETLOCK_")) clean[name] = "";
  }
  return {
    ...clean,
    TCPNETLOCK_HOST: "127.0.0.1",
    TCPNETLOCK_PORT: String(port),
    NO_COLOR: "1",
    ...vars,
  };
}

function start(args: string[], vars: Record<string, string>): Program {
  return new Program(Deno.execPath(), ["run", "-A", DO, ...args], {
    env: vars,
    label: "do.ts",
    timeoutMs: 15_000,
  });
}

async function run(args: string[], vars: Record<string, string>) {
  await using p = start(args, vars);
  return await p.output();
}

async function holdRaw(port: number, name: string, clientId = "cron-1"): Promise<RawClient> {
  const raw = await RawClient.connect(port);
  assert.match(await raw.request(`lock,name:${name},client-id:${clientId}`) ?? "", /^ok/);
  return raw;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

Deno.test("do exit 0: NAME -- cmd takes the lock NAME and runs cmd", async () => {
  await using srv = await startTestServer();
  const out = await run(
    ["db-migrate", "--", "sh", "-c", 'echo "$TCPNETLOCK_LOCK_NAME"'],
    env(srv.port),
  );
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, "db-migrate\n");
  // Options may also follow NAME, and -c runs a shell command line, as flock's -c.
  const c = await run(["db", "-w", "1", "-c", "echo a | tr a b"], env(srv.port));
  assert.equal(c.code, 0, c.stderr);
  assert.equal(c.stdout, "b\n");
  // The original form is unchanged.
  const old = await run(["--lock-name", "db", "--", "echo", "hi"], env(srv.port));
  assert.equal(old.stdout, "hi\n");
});

Deno.test("do exit N: the command's own exit code passes through (3)", async () => {
  await using srv = await startTestServer();
  const out = await run(["job", "--", "sh", "-c", "exit 3"], env(srv.port));
  assert.equal(out.code, 3);
  assert.equal(out.stderr, "");
});

Deno.test("do exit 2: bad usage says so with the program's name and runs nothing", async () => {
  for (
    const [args, vars, re] of [
      [["--wait", "soon", "db", "--", "true"], {}, /Invalid value for --wait: "soon"/],
      [["db", "--", "true"], { TCPNETLOCK_WAIT: "soon" }, /Invalid value for TCPNETLOCK_WAIT/],
      [["-n", "-w", "3", "db", "--", "true"], {}, /--no-wait \(-n\) or --wait/],
      [["-s", "-x", "db", "--", "true"], {}, /--shared \(-s\) or --exclusive/],
      [["-E", "300", "db", "--", "true"], {}, /--conflict-exit-code: "300"/],
      [["db", "--"], {}, /Missing the command to run under lock "db"/],
      [["--lock-name", "a", "b", "--", "true"], {}, /Give the lock name once/],
      [["db", "-c", "true", "--", "x"], {}, /either with -c or after the options/],
    ] as const
  ) {
    const out = await run([...args], env(freePort(), vars));
    assert.equal(out.code, 2, `${args.join(" ")}: ${out.stderr}`);
    assert.match(out.stderr, /^tcpnetlock do: /);
    assert.match(out.stderr, re, args.join(" "));
    assert.equal(out.stdout, "");
  }
});

Deno.test("do exit 122: the lock is lost while the command runs", async () => {
  const srv = await startTestServer();
  try {
    await using p = start(["job", "--", "sh", "-c", "echo started; sleep 30"], env(srv.port));
    await p.until((x) => x.stdout.includes("started"), "the command to start");
    await srv.server.close();
    const out = await p.output();
    assert.equal(out.code, 122, out.stderr);
  } finally {
    await srv.server.close();
  }
});

Deno.test("do exit 123: not granted; the message names the holder, since when, and the queue", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "db-migrate");
  try {
    const out = await run(["db-migrate", "--", "echo", "ran"], env(srv.port));
    assert.equal(out.code, 123);
    assert.equal(out.stdout, "");
    assert.match(
      out.stderr,
      /"db-migrate" is held by cron-1 \(127\.0\.0\.1\) for \d+(ms|s); 0 waiting/,
    );
    // -n is the default made explicit; it wins over TCPNETLOCK_WAIT.
    const n = await run(
      ["-n", "db-migrate", "--", "true"],
      env(srv.port, { TCPNETLOCK_WAIT: "9" }),
    );
    assert.equal(n.code, 123);
    // -w SECONDS: the wait runs out, also 123.
    const w = await run(["-w", "0.3", "db-migrate", "--", "true"], env(srv.port));
    assert.equal(w.code, 123);
    assert.match(w.stderr, /wait of 0\.3 s ran out/);
  } finally {
    raw.close();
  }
});

Deno.test("do exit -E CODE: --conflict-exit-code replaces 123, like flock -E", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "nightly");
  try {
    assert.equal((await run(["-E", "0", "nightly", "--", "true"], env(srv.port))).code, 0);
    const long = await run(["--conflict-exit-code", "75", "nightly", "--", "true"], env(srv.port));
    assert.equal(long.code, 75);
    const fromEnv = await run(
      ["nightly", "--", "true"],
      env(srv.port, { TCPNETLOCK_CONFLICT_EXIT_CODE: "9" }),
    );
    assert.equal(fromEnv.code, 9);
  } finally {
    raw.close();
  }
});

Deno.test("do --wait forever waits as long as it takes and says who holds the lock meanwhile", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "db", "web-1");
  await using p = start(["--wait", "forever", "db", "--", "echo", "ran"], env(srv.port));
  await p.until(
    (x) => /position 1 in the queue; "db" is held by web-1 \(127\.0\.0\.1\) for \d+/.test(x.stderr),
    "the waiting message naming the holder",
  );
  assert.equal(srv.server.locks().find((l) => l.name === "db")?.waiting, 1);
  assert.equal(await raw.request("release"), "released");
  raw.close();
  const out = await p.output();
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, "ran\n");
  // inf is the same.
  const inf = await run(["-w", "inf", "db", "--", "true"], env(srv.port));
  assert.equal(inf.code, 0, inf.stderr);
});

Deno.test("do exit 124: the command cannot be run (not a directory in its path)", async () => {
  await using srv = await startTestServer();
  const out = await run(["job", "--", "/etc/passwd/x"], env(srv.port));
  assert.equal(out.code, 124, out.stderr);
  assert.match(out.stderr, /cannot run "\/etc\/passwd\/x"/);
  await until(() => srv.server.locks().length === 0, "the lock to be released");
});

Deno.test("do exit 125: every err,... refusal, and an unreachable server", async () => {
  {
    const out = await run(["job", "--", "true"], env(freePort()));
    assert.equal(out.code, 125, out.stderr);
  }
  {
    // err,too many connections
    await using srv = await startTestServer({ maxConnections: 1 });
    const raw = await holdRaw(srv.port, "other");
    try {
      const out = await run(["job", "--", "true"], env(srv.port));
      assert.equal(out.code, 125, out.stderr);
      assert.match(out.stderr, /too many connections/);
    } finally {
      raw.close();
    }
  }
  {
    // err,unauthorized: do.ts names its own flag and variable, not the library's option.
    await using srv = await startTestServer({ authToken: "s3cret" });
    const out = await run(["job", "--", "true"], env(srv.port));
    assert.equal(out.code, 125, out.stderr);
    assert.match(out.stderr, /--auth-token-file FILE, or TCPNETLOCK_AUTH_TOKEN/);
    assert.doesNotMatch(out.stderr, /authToken/);
  }
  {
    // err,limit mismatch and err,invalid ...: refusals too.
    await using srv = await startTestServer();
    const raw = await RawClient.connect(srv.port);
    assert.match(await raw.request("lock,name:sem,limit:3") ?? "", /^ok/);
    try {
      const out = await run(["--limit", "2", "sem", "--", "true"], env(srv.port));
      assert.equal(out.code, 125, out.stderr);
      assert.match(out.stderr, /limit mismatch/);
    } finally {
      raw.close();
    }
  }
});

Deno.test("do exit 126 and 127: not executable, not found (with a hint for NAME -- cmd)", async () => {
  await using srv = await startTestServer();
  assert.equal((await run(["job", "--", "/tmp"], env(srv.port))).code, 126);
  const out = await run(["mylock", "echo", "hi"], env(srv.port));
  assert.equal(out.code, 127);
  assert.match(out.stderr, /write: deno run -A do\.ts mylock -- echo hi/);
});

Deno.test("do exit 128+N: a signal ends the command (143 for SIGTERM)", async () => {
  await using srv = await startTestServer();
  const out = await run(["job", "--", "sh", "-c", "kill -TERM $$"], env(srv.port));
  assert.equal(out.code, 143);
});

Deno.test("do -s sends mode:shared on the lock line; without a mode, no mode is sent", async () => {
  // A stand-in server that records the lock lines and grants every lock.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const lines: string[] = [];
  const conns: Promise<void>[] = [];
  const serve = (async () => {
    for await (const conn of listener) {
      conns.push((async () => {
        const decoder = new TextDecoder();
        let buffer = "";
        const buf = new Uint8Array(1024);
        try {
          for (;;) {
            const n = await conn.read(buf);
            if (n === null) break;
            buffer += decoder.decode(buf.subarray(0, n));
            let nl;
            while ((nl = buffer.indexOf("\n")) >= 0) {
              const line = buffer.slice(0, nl).trim();
              buffer = buffer.slice(nl + 1);
              if (line.startsWith("lock,")) lines.push(line);
              const reply = line.startsWith("lock,")
                ? "ok,token:1"
                : line === "release"
                ? "released"
                : "bad-action";
              await conn.write(new TextEncoder().encode(reply + "\n"));
              if (reply !== "ok,token:1") throw new Error("done");
            }
          }
        } catch {
          // closed
        } finally {
          try {
            conn.close();
          } catch {
            // closed already
          }
        }
      })());
    }
  })();
  const port = listener.addr.port;
  try {
    assert.equal((await run(["-s", "db", "--", "true"], env(port))).code, 0);
    assert.equal((await run(["-x", "db", "--", "true"], env(port))).code, 0);
    assert.equal((await run(["db", "--", "true"], env(port))).code, 0);
  } finally {
    listener.close();
    await serve;
    await Promise.all(conns);
  }
  assert.match(lines[0] ?? "", /^lock,name:db,.*mode:shared/);
  assert.match(lines[1] ?? "", /^lock,name:db,.*mode:exclusive/);
  assert.doesNotMatch(lines[2] ?? "", /mode:/);
});

Deno.test("do exit 125 against a TLS server without --tls: the message says it may speak TLS", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startTestServer({ tls: { cert: tls.cert, key: tls.key } });
    const out = await run(["job", "--", "true"], env(srv.port));
    assert.equal(out.code, 125, out.stderr);
    assert.match(out.stderr, /may speak TLS: connect with TLS \(--tls, TCPNETLOCK_TLS=1\)/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
