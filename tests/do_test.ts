/**
 * do.ts as people run it: a real subprocess against a real server, running real commands.
 */

import assert from "node:assert/strict";
import { lockNameFromCommand } from "../do.ts";
import {
  makeTlsFixture,
  Program,
  type ProgramOutput,
  RawClient,
  ROOT,
  startServerProcess,
  startTestServer,
  type TestServer,
  until,
} from "./test_util.ts";

const DO = `${ROOT}do.ts`;

/** The environment of a do.ts run: the test server, and no TCPNETLOCK_* from the outside. */
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

/** do.ts running, its output read as it comes. */
class DoProcess extends Program {
  /** Process groups of commands this do.ts runs, SIGKILLed at the end in case a test failed. */
  readonly groups: number[] = [];

  /** `argv` replaces `deno run -A do.ts`; `stdin` pipes do.ts's stdin (which the command inherits). */
  constructor(
    args: string[],
    vars: Record<string, string>,
    options: { stdin?: boolean; argv?: string[] } = {},
  ) {
    const [program, ...rest] = options.argv ?? [Deno.execPath(), "run", "-A", DO];
    super(program, [...rest, ...args], {
      env: vars,
      stdin: options.stdin,
      label: "do.ts",
      timeoutMs: 15_000,
    });
  }

  protected override cleanUp(): Promise<void> {
    const stat = Deno.readTextFileSync("/proc/self/stat");
    const self = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
    for (const pgid of this.groups) {
      // A pid read from a failed command's output may be garbage: never signal 0, -1 or our group.
      if (!Number.isSafeInteger(pgid) || pgid <= 1 || pgid === self) continue;
      try {
        Deno.kill(-pgid, "SIGKILL");
      } catch {
        // gone
      }
    }
    return Promise.resolve();
  }
}

/** Runs do.ts to its end. */
async function runDo(args: string[], vars: Record<string, string>): Promise<ProgramOutput> {
  await using p = new DoProcess(args, vars);
  return await p.output();
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

/** True while `pid` is a live process (a zombie is dead). */
function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const state = stat.slice(stat.lastIndexOf(")") + 2)[0];
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** SIGKILLs what a failed test may have left running (its own processes, by pid). */
function killAll(pids: number[]): void {
  for (const pid of pids.filter((p) => Number.isSafeInteger(p) && p > 1 && p !== Deno.pid)) {
    if (!alive(pid)) continue;
    try {
      Deno.kill(pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
  }
}

/** Holds `name` on the server through a raw connection, as another client would. */
async function holdRaw(port: number, name: string, extra = ""): Promise<RawClient> {
  const raw = await RawClient.connect(port);
  const reply = await raw.request(`lock,name:${name}${extra}`);
  assert.match(reply ?? "", /^ok/);
  return raw;
}

async function releaseRaw(raw: RawClient): Promise<void> {
  assert.equal(await raw.request("release"), "released");
  raw.close();
}

function heldNames(srv: TestServer): string[] {
  return srv.server.locks().filter((l) => l.holders.length > 0).map((l) => l.name);
}

// ---------------------------------------------------------------------------------------------
// The command's exit code, environment, shell

Deno.test("do: exit codes pass through: 0, 3, and 128+N when a signal ends the command", async () => {
  await using srv = await startTestServer();
  const vars = env(srv.port);
  const ok = await runDo(["--lock-name", "job", "--", "true"], vars);
  assert.equal(ok.code, 0, ok.stderr);
  const three = await runDo(["--lock-name", "job", "--", "sh", "-c", "exit 3"], vars);
  assert.equal(three.code, 3, three.stderr);
  const term = await runDo(["--lock-name", "job", "--", "sh", "-c", "kill -TERM $$"], vars);
  assert.equal(term.code, 143, term.stderr);
  const kill = await runDo(["--lock-name", "job", "--", "sh", "-c", "kill -KILL $$"], vars);
  assert.equal(kill.code, 137, kill.stderr);
  assert.deepEqual(heldNames(srv), []);
  assert.equal(srv.server.stats().lock_acquired_count, 4);
});

Deno.test("do: the command sees TCPNETLOCK_LOCK_NAME and the fencing token of its grant", async () => {
  await using srv = await startTestServer();
  await using p = new DoProcess(
    [
      "--lock-name",
      "report",
      "--",
      "sh",
      "-c",
      'echo "$TCPNETLOCK_LOCK_NAME $TCPNETLOCK_FENCING_TOKEN"; read -r line; echo "got $line"',
    ],
    env(srv.port),
    { stdin: true },
  );
  await p.until((x) => x.stdout.includes("\n"), "the command printed its environment");
  const [name, token] = p.stdout.trim().split(" ");
  assert.equal(name, "report");
  const holders = srv.server.locks().find((l) => l.name === "report")?.holders ?? [];
  assert.equal(holders.length, 1);
  assert.equal(token, String(holders[0].token));
  // stdin reaches the command untouched
  await p.write("hello\n");
  const out = await p.output();
  assert.equal(out.code, 0, out.stderr);
  assert.match(out.stdout, /^got hello$/m);
  assert.deepEqual(heldNames(srv), []);
});

Deno.test("do: the lock name is made from the command as tcpnetlock_do makes it", async () => {
  assert.equal(lockNameFromCommand(["./manage.py", "migrate"]), "manage_py_migrate");
  assert.equal(
    lockNameFromCommand(["/usr/bin/backup", "--full", "/var/db"]),
    "usr_bin_backup_--full__var_db",
  );
  assert.equal(lockNameFromCommand(["echo", "héllo wörld!"]), "echo_hllo_wrld");
  assert.equal(lockNameFromCommand(["..."]), "");
  await using srv = await startTestServer();
  const out = await runDo(
    ["--", "sh", "-c", 'echo "$TCPNETLOCK_LOCK_NAME"', "./x.y"],
    env(srv.port),
  );
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, "sh_-c_echo_TCPNETLOCK_LOCK_NAME___x_y\n");
  // Nothing usable: a usage error
  const empty = await runDo(["--", "..."], env(srv.port));
  assert.equal(empty.code, 2);
  assert.match(empty.stderr, /--lock-name/);
});

Deno.test("do: --shell runs one argument with sh -c, pipes included; more arguments are a usage error", async () => {
  await using srv = await startTestServer();
  const out = await runDo(
    ["--lock-name", "count", "--shell", "--", "printf 'a\\nb\\nc\\n' | grep -v b | wc -l"],
    env(srv.port),
  );
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout.trim(), "2");
  // options end at the first argument that is not one, like tcpnetlock_do
  const plain = await runDo(["--lock-name", "count", "--shell", "exit 5"], env(srv.port));
  assert.equal(plain.code, 5, plain.stderr);
  const two = await runDo(["--shell", "--", "echo", "a"], env(srv.port));
  assert.equal(two.code, 2);
  assert.match(two.stderr, /--shell/);
});

Deno.test("do: arguments after -- reach the command untouched", async () => {
  await using srv = await startTestServer();
  const args = ["--help", "--", "-x", "a b", "*", "$HOME", ""];
  const out = await runDo(
    [
      "--lock-name",
      "args",
      "--",
      "sh",
      "-c",
      'for a in "$@"; do printf "[%s]" "$a"; done',
      "sh",
      ...args,
    ],
    env(srv.port),
  );
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, args.map((a) => `[${a}]`).join(""));
});

// ---------------------------------------------------------------------------------------------
// Taking the lock

Deno.test("do: exits 123 when the lock is held elsewhere, without running the command", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "busy");
  const out = await runDo(["--lock-name", "busy", "--", "echo", "ran"], env(srv.port));
  assert.equal(out.code, 123);
  assert.equal(out.stdout, "");
  assert.match(out.stderr, /busy.*not granted/);
  const quiet = await runDo(["--quiet", "--lock-name", "busy", "--", "echo", "ran"], env(srv.port));
  assert.deepEqual([quiet.code, quiet.stdout, quiet.stderr], [123, "", ""]);
  // --wait that runs out: 123 too
  const waited = await runDo(["--wait", "0.2", "--lock-name", "busy", "--", "true"], env(srv.port));
  assert.equal(waited.code, 123);
  assert.match(waited.stderr, /wait of 0.2 s ran out/);
  await releaseRaw(raw);
});

Deno.test("do: --wait queues three do.ts in FIFO order (TCPNETLOCK_WAIT works as --wait)", async () => {
  await using srv = await startTestServer();
  const dir = await Deno.makeTempDir();
  try {
    const raw = await holdRaw(srv.port, "fifo");
    const order = `${dir}/order`;
    const start = (id: string, wait: string[], vars: Record<string, string> = {}) =>
      new DoProcess(
        [...wait, "--lock-name", "fifo", "--shell", "--", `echo ${id} >> ${order}`],
        env(srv.port, vars),
      );
    await using a = start("A", ["--wait", "30"]);
    await a.until((p) => p.stderr.includes("position 1"), "A queued");
    await using b = start("B", ["--wait", "30"]);
    await b.until((p) => p.stderr.includes("position 2"), "B queued");
    await using c = start("C", [], { TCPNETLOCK_WAIT: "30" });
    await c.until((p) => p.stderr.includes("position 3"), "C queued");
    // off a terminal, the status is plain lines
    assert.ok(!c.stderr.includes("\r") && !c.stderr.includes("\x1b"), JSON.stringify(c.stderr));
    await releaseRaw(raw);
    for (const p of [a, b, c]) {
      const out = await p.output();
      assert.equal(out.code, 0, out.stderr);
    }
    assert.equal(await Deno.readTextFile(order), "A\nB\nC\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("do: --retry polls again after --retry-wait, and gives up with 123", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "poll");
  // Held all along: 1 + 2 tries, then 123.
  const out = await runDo(
    ["--retry", "2", "--retry-wait", "0.05", "--lock-name", "poll", "--", "true"],
    env(srv.port),
  );
  assert.equal(out.code, 123);
  assert.equal(srv.server.stats().lock_not_acquired_count, 3);
  // Freed between two tries: granted on a later one.
  await using p = new DoProcess(
    ["--retry", "50", "--retry-wait", "0.1", "--lock-name", "poll", "--", "echo", "ran"],
    env(srv.port),
  );
  await p.until((x) => x.stderr.includes("trying again"), "a failed try");
  await releaseRaw(raw);
  const later = await p.output();
  assert.equal(later.code, 0, later.stderr);
  assert.equal(later.stdout, "ran\n");
});

Deno.test("do: --limit takes a slot of a semaphore; a different limit is refused with 125", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "pool", ",limit:2");
  const ok = await runDo(["--limit", "2", "--lock-name", "pool", "--", "true"], env(srv.port));
  assert.equal(ok.code, 0, ok.stderr);
  const mismatch = await runDo(["--lock-name", "pool", "--", "true"], env(srv.port));
  assert.equal(mismatch.code, 125);
  assert.match(mismatch.stderr, /limit mismatch/);
  await releaseRaw(raw);
});

Deno.test("do: a signal while waiting for the lock ends do.ts with 128+N, command not run", async () => {
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "queue");
  await using p = new DoProcess(
    ["--wait", "30", "--lock-name", "queue", "--", "echo", "ran"],
    env(srv.port),
  );
  await p.until((x) => x.stderr.includes("position 1"), "queued");
  p.kill("SIGINT");
  const out = await p.output();
  assert.equal(out.code, 130);
  assert.equal(out.stdout, "");
  assert.equal(srv.server.locks().find((l) => l.name === "queue")?.waiting, 0);
  await releaseRaw(raw);
});

/**
 * A stand-in for a tcpnetlock 0.1.8 server: answers "ok" to any lock request (it ignores
 * "wait:0", so gives no token), "alive" to ".keepalive", "released" to "release"; records every
 * line.
 */
function startV1Server(): { port: number; requests: string[] } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: string[] = [];
  const sessions: Promise<void>[] = [];
  const session = async (conn: Deno.Conn) => {
    const decoder = new TextDecoder();
    const buf = new Uint8Array(1024);
    let text = "";
    try {
      for (let n; (n = await conn.read(buf)) !== null;) {
        text += decoder.decode(buf.subarray(0, n));
        for (let nl; (nl = text.indexOf("\n")) >= 0;) {
          const line = text.slice(0, nl);
          text = text.slice(nl + 1);
          requests.push(line);
          const reply = line.startsWith("lock")
            ? "ok"
            : line === ".keepalive"
            ? "alive"
            : line === "release"
            ? "released"
            : "bad-action";
          await conn.write(new TextEncoder().encode(reply + "\n"));
          if (line === "release") return;
        }
      }
    } catch {
      // the client went away
    } finally {
      conn.close();
    }
  };
  const accepting = (async () => {
    try {
      for await (const conn of listener) sessions.push(session(conn));
    } catch {
      // closed
    }
  })();
  return {
    port: listener.addr.port,
    requests,
    [Symbol.asyncDispose]: async () => {
      listener.close();
      await accepting;
      await Promise.all(sessions);
    },
  };
}

Deno.test("do: a version 1 server (no tokens) still works; the token variable is empty", async () => {
  await using v1 = startV1Server();
  const out = await runDo(
    ["--lock-name", "old", "--", "sh", "-c", 'echo "[$TCPNETLOCK_FENCING_TOKEN]"'],
    env(v1.port),
  );
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, "[]\n");
  assert.deepEqual(v1.requests, ["lock,name:old,wait:0", "lock,name:old", "release"]);
});

Deno.test("do: --keep-alive-secs sends keepalives while the command runs", async () => {
  await using v1 = startV1Server();
  const out = await runDo(
    ["--keep-alive-secs", "0.1", "--lock-name", "alive", "--", "sleep", "0.55"],
    env(v1.port),
  );
  assert.equal(out.code, 0, out.stderr);
  const keepalives = v1.requests.filter((r) => r === ".keepalive").length;
  assert.ok(keepalives >= 3, v1.requests.join(" "));
  assert.equal(v1.requests.at(-1), "release");
});

Deno.test("do: TLS with --ca-cert, auth with --auth-token-file; a missing token is refused (125)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startTestServer({
      tls: { cert: tls.cert, key: tls.key },
      authToken: "s3cret",
    });
    await Deno.writeTextFile(`${dir}/token`, "s3cret\n");
    const vars = env(srv.port, { TCPNETLOCK_HOST: "localhost" });
    const ok = await runDo(
      [
        "--ca-cert",
        `${dir}/ca.pem`,
        "--auth-token-file",
        `${dir}/token`,
        "--lock-name",
        "secure",
        "--",
        "echo",
        "ran",
      ],
      vars,
    );
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, "ran\n");
    const noToken = await runDo(
      ["--ca-cert", `${dir}/ca.pem`, "--lock-name", "secure", "--", "true"],
      vars,
    );
    assert.equal(noToken.code, 125);
    assert.match(noToken.stderr, /unauthorized/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Failures before the command runs

Deno.test("do: 125 when the server is unreachable", async () => {
  const out = await runDo(["--lock-name", "x", "--", "echo", "ran"], env(freePort()));
  assert.equal(out.code, 125);
  assert.equal(out.stdout, "");
  assert.match(
    out.stderr,
    /Cannot connect to tcpnetlock server "127\.0\.0\.1:\d+": connection refused/,
  );
});

Deno.test("do: 127 for a command not found, 126 for one not executable; the lock is released", async () => {
  await using srv = await startTestServer();
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/script.sh`, "echo ran\n", { mode: 0o644 });
    const notFound = await runDo(["--lock-name", "x", "--", "no-such-command-tnl"], env(srv.port));
    assert.equal(notFound.code, 127);
    assert.match(notFound.stderr, /not found: "no-such-command-tnl"/);
    const notExec = await runDo(["--lock-name", "x", "--", `${dir}/script.sh`], env(srv.port));
    assert.equal(notExec.code, 126);
    assert.match(notExec.stderr, /not executable/);
    assert.equal(srv.server.stats().lock_acquired_count, 2);
    assert.deepEqual(heldNames(srv), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("do: bad usage prints the usage on stderr and exits 2; --help exits 0", async () => {
  const vars = env(freePort());
  for (
    const args of [
      ["--bogus", "--", "true"],
      ["--wait", "soon", "--", "true"],
      ["--ttl", "0", "--", "true"],
      ["--limit", "0", "--", "true"],
      ["--port", "70000", "--", "true"],
      ["--on-lock-loss", "panic", "--", "true"],
      ["--lock-name", "bad name", "--", "true"],
      ["--ttl", "3", "--keep-alive-secs", "5", "--", "true"],
      ["--lock-name", "x"],
      [],
    ]
  ) {
    const out = await runDo(args, vars);
    assert.equal(out.code, 2, `${args.join(" ")}: ${out.stderr}`);
    assert.match(out.stderr, /Usage: deno run -A do\.ts/, args.join(" "));
    assert.equal(out.stdout, "");
  }
  const bad = await runDo(["--", "true"], env(freePort(), { TCPNETLOCK_KILL_AFTER: "soon" }));
  assert.equal(bad.code, 2);
  const help = await runDo(["--help"], vars);
  assert.equal(help.code, 0);
  for (
    const flag of [
      "--lock-name",
      "--host",
      "--port",
      "--client-id",
      "--retry",
      "--retry-wait",
      "--keep-alive",
      "--keep-alive-secs",
      "--shell",
      "--info",
      "--debug",
      "--wait",
      "--ttl",
      "--limit",
      "--on-lock-loss",
      "--kill-after",
      "--tls",
      "--ca-cert",
      "--auth-token-file",
      "--quiet",
    ]
  ) {
    assert.match(help.stdout, new RegExp(`\\s${flag}\\b`), flag);
  }
});

// ---------------------------------------------------------------------------------------------
// Signals and lost locks

Deno.test("do: SIGINT, SIGHUP, SIGQUIT and SIGTERM reach the command; the lock is freed (143)", async () => {
  await using srv = await startTestServer();
  const script = [
    'for s in INT HUP QUIT; do trap "echo got-$s" $s; done',
    'trap "echo got-TERM; exit 143" TERM',
    "echo ready $$",
    "while :; do sleep 0.05; done",
  ].join("\n");
  await using p = new DoProcess(["--lock-name", "sig", "--shell", "--", script], env(srv.port));
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  p.groups.push(Number(p.stdout.split(" ")[1]));
  for (const signal of ["SIGINT", "SIGHUP", "SIGQUIT"] as const) {
    p.kill(signal);
    const name = signal.slice(3);
    await p.until((x) => x.stdout.includes(`got-${name}`), `the command got ${signal}`);
  }
  assert.deepEqual(heldNames(srv), ["sig"]);
  p.kill("SIGTERM");
  const out = await p.output();
  assert.equal(out.code, 143, out.stderr);
  assert.match(out.stdout, /got-TERM/);
  assert.deepEqual(heldNames(srv), []);
});

Deno.test("do: SIGTERM to do.ts reaches a plain command, which dies of it: exit 143, lock freed", async () => {
  await using srv = await startTestServer();
  await using p = new DoProcess(
    ["--lock-name", "plain", "--", "sh", "-c", "echo ready $$; exec sleep 30"],
    env(srv.port),
  );
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  p.groups.push(Number(p.stdout.split(" ")[1]));
  p.kill("SIGTERM");
  const out = await p.output();
  assert.equal(out.code, 143, out.stderr);
  assert.deepEqual(heldNames(srv), []);
});

Deno.test("do: server SIGKILLed: the command and its grandchild get SIGTERM, do.ts exits 122", async () => {
  await using server = await startServerProcess();
  // The grandchild lets go of stdout, so that only do.ts and the command hold the test's pipe.
  const script = "sleep 300 </dev/null >/dev/null 2>&1 & echo $$ $!; wait";
  await using p = new DoProcess(
    ["--lock-name", "lost", "--kill-after", "30", "--shell", "--", script],
    env(server.port),
  );
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  const pids = p.stdout.trim().split(" ").map(Number);
  p.groups.push(pids[0]);
  assert.equal(pids.length, 2);
  assert.ok(pids.every(alive));
  try {
    const start = performance.now();
    await server.stop("SIGKILL");
    const out = await p.output();
    const seconds = (performance.now() - start) / 1000;
    assert.equal(out.code, 122, out.stderr);
    // SIGTERM sufficed: well before --kill-after
    assert.ok(seconds < 10, `took ${seconds} s`);
    assert.match(out.stderr, /Lost lock "lost".*SIGTERM/);
    assert.equal(out.stderr.trim().split("\n").length, 1, out.stderr);
    assert.deepEqual(pids.filter(alive), []);
  } finally {
    killAll(pids);
  }
});

Deno.test("do: server SIGKILLed, the command ignores SIGTERM: SIGKILL after --kill-after, exit 122", async () => {
  await using server = await startServerProcess();
  const script = 'trap "" TERM; sleep 300 </dev/null >/dev/null 2>&1 & echo $$ $!; wait';
  await using p = new DoProcess(
    ["--lock-name", "stubborn", "--kill-after", "1", "--shell", "--", script],
    env(server.port),
  );
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  const pids = p.stdout.trim().split(" ").map(Number);
  p.groups.push(pids[0]);
  try {
    const start = performance.now();
    await server.stop("SIGKILL");
    const out = await p.output();
    const seconds = (performance.now() - start) / 1000;
    assert.equal(out.code, 122, out.stderr);
    assert.ok(seconds >= 0.9 && seconds < 5, `took ${seconds} s`);
    assert.deepEqual(pids.filter(alive), []);
  } finally {
    killAll(pids);
  }
});

Deno.test("do: do.ts SIGKILLed: its watchdog stops the command's group (SIGKILL after --kill-after)", async () => {
  await using srv = await startTestServer();
  const script = 'trap "" TERM; sleep 300 </dev/null >/dev/null 2>&1 & echo $$ $!; wait';
  await using p = new DoProcess(
    ["--debug", "--lock-name", "orphan", "--kill-after", "1", "--shell", "--", script],
    env(srv.port),
  );
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  // Once the watchdog knows the group (a pipe write after the start; until then it cannot act)
  await p.until((x) => x.stderr.includes("Watchdog armed"), "the watchdog is armed");
  const pids = p.stdout.trim().split(" ").map(Number);
  p.groups.push(pids[0]);
  try {
    const start = performance.now();
    p.kill("SIGKILL");
    // The output ends once the command (stdout) and the watchdog (stderr) are gone.
    const out = await p.output();
    const seconds = (performance.now() - start) / 1000;
    assert.equal(out.signal, "SIGKILL");
    assert.match(out.stderr, /do\.ts is gone: stopping the command/);
    assert.ok(seconds >= 0.9 && seconds < 5, `took ${seconds} s`);
    await until(() => pids.every((pid) => !alive(pid)), "the command to be gone");
    assert.deepEqual(heldNames(srv), []);
  } finally {
    killAll(pids);
  }
});

Deno.test("do: --on-lock-loss ignore warns and lets the command finish with its own code", async () => {
  const srv = await startTestServer();
  await using p = new DoProcess(
    [
      "--on-lock-loss",
      "ignore",
      "--lock-name",
      "lenient",
      "--",
      "sh",
      "-c",
      "echo ready; read -r _; exit 5",
    ],
    env(srv.port),
    { stdin: true },
  );
  await p.until((x) => x.stdout.includes("ready"), "the command started");
  await srv.server.close();
  await p.until((x) => x.stderr.includes("warning"), "the warning");
  assert.match(p.stderr, /Lost lock "lenient".*goes on/);
  await p.write("go\n");
  const out = await p.output();
  assert.equal(out.code, 5, out.stderr);
});

Deno.test("do: --ttl keeps the lease alive; a frozen do.ts loses it and the command is stopped", async () => {
  await using srv = await startTestServer();
  // Keepalives every ttl/3 keep a 1 s lease through a 1.6 s command.
  const ok = await runDo(
    ["--ttl", "1", "--lock-name", "lease", "--", "sleep", "1.6"],
    env(srv.port),
  );
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(srv.server.stats().lock_expired_count, 0);
  // Frozen (SIGSTOP) longer than the ttl: the server expires the lease; once thawed, do.ts
  // stops the command and exits 122.
  await using p = new DoProcess(
    ["--ttl", "0.5", "--lock-name", "lease", "--", "sh", "-c", "echo ready $$; exec sleep 30"],
    env(srv.port),
  );
  await p.until((x) => x.stdout.includes("\n"), "the command started");
  p.groups.push(Number(p.stdout.split(" ")[1]));
  p.kill("SIGSTOP");
  const deadline = performance.now() + 5000;
  while (srv.server.stats().lock_expired_count === 0 && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20)); // the server's lease timer: only visible by polling
  }
  p.kill("SIGCONT");
  assert.equal(srv.server.stats().lock_expired_count, 1);
  const out = await p.output();
  assert.equal(out.code, 122, out.stderr);
  assert.match(out.stderr, /lease/);
});

Deno.test("do: on a terminal, the waiting status is one line redrawn in place", async () => {
  if ((await new Deno.Command("sh", { args: ["-c", "command -v script"] }).output()).code !== 0) {
    console.log("skipped: util-linux script(1) is not installed");
    return;
  }
  await using srv = await startTestServer();
  const raw = await holdRaw(srv.port, "tty");
  const command = [
    Deno.execPath(),
    "run",
    "-A",
    DO,
    "--wait",
    "30",
    "--lock-name",
    "tty",
    "--",
    "true",
  ]
    .map((a) => `'${a}'`).join(" ");
  // script(1) gives do.ts a pseudo-terminal as stdin, stdout and stderr.
  await using p = new DoProcess([], env(srv.port), {
    argv: ["script", "-qfec", command, "/dev/null"],
  });
  await p.until((x) => x.stdout.includes("position 1"), "the status line");
  await releaseRaw(raw);
  const out = await p.output();
  assert.equal(out.code, 0, out.stdout + out.stderr);
  const clear = "\r\x1b[2K";
  const status = 'tcpnetlock do: waiting for lock "tty" on "127.0.0.1:';
  assert.ok(out.stdout.includes(clear + status), JSON.stringify(out.stdout));
  // erased once granted, never ended with a newline
  assert.ok(out.stdout.includes("position 1 in the queue" + clear), JSON.stringify(out.stdout));
  assert.ok(!/position 1 in the queue\r?\n/.test(out.stdout), JSON.stringify(out.stdout));
});
