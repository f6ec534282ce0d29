/**
 * The client over sessions: one connection for every lock, the fallback to one connection per
 * lock against a server without sessions (an in-process one with sessions off, and a real older
 * version of this server run from git), reconnection with back-off, and a program that ends
 * while its client's session is idle.
 */

import assert from "node:assert/strict";
import {
  ConnectionLostError,
  LockClient,
  ProtocolError,
  ServerUnreachableError,
} from "../client.ts";
import { ROOT, startTestServer } from "./test_util.ts";

/** A port nothing listens on. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

function aborted(signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve(signal.reason);
    signal.addEventListener("abort", () => resolve(signal.reason), { once: true });
  });
}

/** Records the first line of every connection a client makes, in front of a real server. */
class FirstLines implements AsyncDisposable {
  readonly lines: string[] = [];
  readonly #listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  readonly #conns = new Set<Deno.Conn>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;

  constructor(target: number) {
    this.#accepting = (async () => {
      for await (const client of this.#listener) {
        const task = this.#pipePair(client, target);
        this.#tasks.add(task);
        task.finally(() => this.#tasks.delete(task));
      }
    })().catch(() => {});
  }

  get port(): number {
    return this.#listener.addr.port;
  }

  async #pipePair(client: Deno.Conn, target: number): Promise<void> {
    this.#conns.add(client);
    const server = await Deno.connect({ hostname: "127.0.0.1", port: target });
    this.#conns.add(server);
    let first = true;
    const pipe = async (from: Deno.Conn, to: Deno.Conn, record: boolean) => {
      const buf = new Uint8Array(4096);
      try {
        for (;;) {
          const n = await from.read(buf);
          if (n === null) break;
          if (record && first) {
            first = false;
            this.lines.push(new TextDecoder().decode(buf.subarray(0, n)).split("\n")[0]);
          }
          for (let at = 0; at < n;) at += await to.write(buf.subarray(at, n));
        }
      } catch {
        // closed
      } finally {
        for (const c of [from, to]) {
          if (this.#conns.delete(c)) c.close();
        }
      }
    };
    await Promise.all([pipe(client, server, true), pipe(server, client, false)]);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#listener.close();
    await this.#accepting;
    for (const c of [...this.#conns]) {
      this.#conns.delete(c);
      c.close();
    }
    while (this.#tasks.size > 0) await Promise.all([...this.#tasks]);
  }
}

/**
 * A real older version of this server (protocol version 2, no sessions): the tree just before
 * sessions were added, taken from git and run as a subprocess.
 */
async function startOlderServer(): Promise<AsyncDisposable & { port: number }> {
  const git = (...args: string[]) =>
    new Deno.Command("git", { args: ["-C", ROOT, ...args], stdout: "piped", stderr: "piped" })
      .output();
  assert.ok(OLDER, "the commit before sessions");
  const dir = await Deno.makeTempDir({ prefix: "tcpnetlock-v2-" });
  const tar = await git("archive", "--format=tar", OLDER);
  assert.ok(tar.success);
  const untar = new Deno.Command("tar", { args: ["-x", "-C", dir], stdin: "piped" }).spawn();
  const writer = untar.stdin.getWriter();
  await writer.write(tar.stdout);
  await writer.close();
  assert.ok((await untar.status).success);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${dir}/server.ts`, "--listen", "127.0.0.1", "--port", "0", "--info"],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  let port = 0;
  while (port === 0) {
    const { value, done } = await reader.read();
    assert.ok(!done, `the older server exited:\n${text}`);
    text += value;
    const m = /listening on .*:(\d+)/.exec(text);
    if (m) port = Number(m[1]);
  }
  const draining = (async () => {
    while (!(await reader.read()).done) {
      // keep reading its log
    }
  })();
  return {
    port,
    [Symbol.asyncDispose]: async () => {
      child.kill("SIGKILL");
      await child.status;
      await draining;
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/**
 * The commit before the one that added sessions (lib/session_v3.ts), or undefined when git or
 * that history is not here (an archive, a shallow clone): the older-server test then says so
 * and is skipped.
 */
function olderCommit(): string | undefined {
  try {
    const out = new Deno.Command("git", {
      args: ["-C", ROOT, "log", "--diff-filter=A", "--format=%H", "--", "lib/session_v3.ts"],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    const commit = new TextDecoder().decode(out.stdout).trim().split("\n").at(-1);
    if (!out.success || !commit) return undefined;
    const parent = new Deno.Command("git", {
      args: ["-C", ROOT, "cat-file", "-e", `${commit}^`],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    return parent.success ? `${commit}^` : undefined;
  } catch {
    return undefined;
  }
}

const OLDER = olderCommit();
if (OLDER === undefined) {
  console.warn("client_session_test: no git history here: the older-server test is skipped");
}

Deno.test("every lock of a client shares one session: one connection to the server", async () => {
  await using srv = await startTestServer();
  await using client = new LockClient({ host: "127.0.0.1", port: srv.port });
  const locks = await Promise.all(
    Array.from({ length: 20 }, (_, i) => client.lock(`many-${i}`, { wait: 5 })),
  );
  assert.equal(srv.server.connections, 1);
  assert.equal(srv.server.table.holders, 20);
  assert.equal(new Set(locks.map((l) => l.token)).size, 20);
  await Promise.all(locks.map((l) => l.release()));
  assert.equal(srv.server.table.holders, 0);
  assert.equal(srv.server.connections, 1, "the session stays open for the next lock");
});

Deno.test("when the session drops, every lock on it is lost, and the next lock opens a new one", async () => {
  await using srv = await startTestServer();
  await using proxy = new FirstLines(srv.port);
  await using client = new LockClient({ host: "127.0.0.1", port: proxy.port });
  const a = await client.lock("drop-a");
  const b = await client.lock("drop-b", { wait: 1 });
  // Cut the session from the server's side.
  await srv.server.close();
  await using srv2 = await startTestServer();
  assert.ok((await aborted(a.signal)) instanceof ConnectionLostError);
  assert.ok((await aborted(b.signal)) instanceof ConnectionLostError);
  assert.match(String((a.signal.reason as Error).message), /^Lost lock "drop-a" on /);
  await using direct = new LockClient({ host: "127.0.0.1", port: srv2.port });
  const again = await direct.lock("drop-a");
  assert.ok(again.held);
  assert.deepEqual(proxy.lines, ["session"]);
});

Deno.test("after a failed opening the next one waits a back-off; sessions resume when the server is back", async () => {
  const port = freePort();
  await using client = new LockClient({ host: "127.0.0.1", port, transport: "session" });
  await assert.rejects(() => client.lock("bo"), ServerUnreachableError);
  let started = performance.now();
  await assert.rejects(() => client.lock("bo"), ServerUnreachableError);
  assert.ok(performance.now() - started >= 90, "the second opening waited ~100 ms");
  started = performance.now();
  await assert.rejects(() => client.lock("bo"), ServerUnreachableError);
  assert.ok(performance.now() - started >= 180, "the third ~200 ms");
  await using srv = await startTestServer({ port });
  const lock = await client.lock("bo");
  assert.ok(lock.held);
  await lock.release();
  // A success resets the back-off: a connection-per-lock client never waits.
  await using plain = new LockClient({
    host: "127.0.0.1",
    port: freePort(),
    transport: "connection",
  });
  await assert.rejects(() => plain.lock("x"), ServerUnreachableError);
  started = performance.now();
  await assert.rejects(() => plain.lock("x"), ServerUnreachableError);
  assert.ok(performance.now() - started < 90);
  assert.equal(srv.server.connections, 1);
});

Deno.test("auto falls back to one connection per lock against a server with sessions off", async () => {
  await using srv = await startTestServer({ sessions: false });
  await using proxy = new FirstLines(srv.port);
  await using client = new LockClient({ host: "127.0.0.1", port: proxy.port });
  const a = await client.lock("fb-a", { wait: 0 });
  const b = await client.lock("fb-b");
  assert.equal(srv.server.table.holders, 2);
  await a.release();
  await b.release();
  // Asked once; then every lock on its own connection.
  assert.deepEqual(proxy.lines, ["session", "lock,name:fb-a,wait:0", "lock,name:fb-b"]);
});

Deno.test({
  name: "auto falls back by itself against a real older server (the version before sessions)",
  ignore: OLDER === undefined,
  fn: async () => {
    await using old = await startOlderServer();
    await using proxy = new FirstLines(old.port);
    await using client = new LockClient({ host: "127.0.0.1", port: proxy.port });
    const lock = await client.lock("old", { wait: 1, ttl: 10 });
    assert.ok(lock.held && typeof lock.token === "number");
    assert.equal(await client.tryLock("old"), null);
    await lock.release();
    assert.deepEqual(proxy.lines, [
      "session,ttl:10",
      "lock,name:old,wait:1,ttl:10",
      "lock,name:old",
    ]);

    // Forcing sessions against it says what is wrong.
    await using forced = new LockClient({
      host: "127.0.0.1",
      port: old.port,
      transport: "session",
    });
    await assert.rejects(
      () => forced.lock("old"),
      (e: unknown) =>
        e instanceof ProtocolError && /does not know sessions/.test(e.message) &&
        e.lockName === "old",
    );
  },
});

Deno.test("transport: bad values are refused", () => {
  assert.throws(
    // deno-lint-ignore no-explicit-any
    () => new LockClient({ transport: "udp" as any }),
    RangeError,
  );
});

Deno.test("a program whose client still has an idle session ends by itself", async () => {
  await using srv = await startTestServer();
  const script = `
    import { LockClient } from ${JSON.stringify(new URL("../client.ts", import.meta.url).href)};
    const client = new LockClient({ host: "127.0.0.1", port: ${srv.port} });
    const lock = await client.lock("idle", { ttl: 30 });
    await lock.release();
    console.log("done");
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", script],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  const out = await child.output();
  clearTimeout(timer);
  assert.equal(new TextDecoder().decode(out.stdout).trim(), "done");
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
});

Deno.test("one caller giving up while the session opens does not fail the others sharing it", async () => {
  await using srv = await startTestServer();
  // A gate in front of the server: connections are passed on once it opens.
  const gate = Promise.withResolvers<void>();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const pipes: Promise<void>[] = [];
  const pipe = async (from: Deno.Conn, to: Deno.Conn) => {
    const buf = new Uint8Array(4096);
    try {
      for (let n = await from.read(buf); n !== null; n = await from.read(buf)) {
        for (let at = 0; at < n;) at += await to.write(buf.subarray(at, n));
      }
    } catch {
      // closed
    }
    for (const c of [from, to]) {
      try {
        c.close();
      } catch {
        // already closed
      }
    }
  };
  const accepting = (async () => {
    for await (const conn of listener) {
      conns.push(conn);
      await gate.promise;
      const up = await Deno.connect({ hostname: "127.0.0.1", port: srv.port });
      conns.push(up);
      pipes.push(pipe(conn, up), pipe(up, conn));
    }
  })().catch(() => {});
  try {
    await using client = new LockClient({ host: "127.0.0.1", port: listener.addr.port });
    const controller = new AbortController();
    const first = client.lock("gate-a", { signal: controller.signal });
    const second = client.lock("gate-b");
    const reason = new Error("gave up");
    controller.abort(reason);
    assert.equal(await first.catch((e) => e), reason);
    gate.resolve();
    const lock = await second;
    assert.ok(lock.held);
    assert.equal(srv.server.connections, 1, "both callers shared one opening");
    await lock.release();
  } finally {
    listener.close();
    await accepting;
    await Promise.all(pipes);
  }
});
