/**
 * The client library against a real in-process server (and, where a restart or a frozen process
 * is the point, a server subprocess), over real sockets.
 */

import assert from "node:assert/strict";
import {
  ConnectionLostError,
  InvalidClientIdError,
  InvalidLockNameError,
  isRetriableError,
  LockClient,
  type LockClientOptions,
  LockExpiredError,
  LockNotGrantedError,
  LockTimeoutError,
  ProtocolError,
  ServerError,
  ServerUnreachableError,
  TcpNetLockError,
} from "../client.ts";
import {
  makeTlsFixture,
  settledLocks,
  startServerProcess,
  startTestServer,
  until,
} from "./test_util.ts";

// ---------------------------------------------------------------------------------------------
// Assertions (node:assert/strict, plus the ones that return what they checked)

// deno-lint-ignore no-explicit-any
type Class<T> = abstract new (...args: any[]) => T;

function instanceOf<T>(value: unknown, type: Class<T>): T {
  assert.ok(value instanceof type, `expected a ${type.name}, got ${String(value)}`);
  return value as T;
}

async function rejects<T>(
  fn: () => Promise<unknown>,
  type: Class<T>,
  includes?: string,
): Promise<T> {
  let error: unknown;
  try {
    await fn();
  } catch (e) {
    error = e;
  }
  assert.ok(error !== undefined, `expected a ${type.name}, but it resolved`);
  const typed = instanceOf(error, type);
  if (includes !== undefined) {
    assert.ok(
      String((error as Error).message).includes(includes),
      `"${(error as Error).message}" lacks "${includes}"`,
    );
  }
  return typed;
}

function throws<T>(fn: () => unknown, type: Class<T>, includes?: string): T {
  try {
    fn();
  } catch (e) {
    const typed = instanceOf(e, type);
    if (includes !== undefined) {
      assert.ok((e as Error).message.includes(includes), (e as Error).message);
    }
    return typed;
  }
  throw new assert.AssertionError({ message: `expected a ${type.name}, but nothing was thrown` });
}

function greater(a: number | undefined, b: number | undefined): void {
  assert.ok(a !== undefined && b !== undefined && a > b, `expected ${a} > ${b}`);
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/**
 * A TCP proxy in front of a real server: records what clients send, and can cut or black-hole
 * the connections (a network failure, a partition).
 */
class TcpProxy implements AsyncDisposable {
  /** Everything clients sent through the proxy, as text. */
  sent = "";
  /** Connections accepted. */
  accepted = 0;
  /**
   * While true, bytes in both directions are dropped, and so is the server's end of the stream
   * (a partition does not carry its FIN either: a client must find out by its own deadline).
   */
  blackhole = false;
  readonly #listener: Deno.TcpListener;
  readonly #conns = new Set<Deno.Conn>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;
  readonly #target: number;

  constructor(target: number) {
    this.#target = target;
    this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.#accepting = this.#accept();
  }

  get port(): number {
    return this.#listener.addr.port;
  }

  async #accept(): Promise<void> {
    try {
      for await (const client of this.#listener) {
        this.accepted++;
        this.#conns.add(client);
        this.#track(this.#connect(client));
      }
    } catch {
      // listener closed
    }
  }

  async #connect(client: Deno.Conn): Promise<void> {
    let server: Deno.Conn;
    try {
      server = await Deno.connect({ hostname: "127.0.0.1", port: this.#target });
    } catch {
      this.#close(client);
      return;
    }
    this.#conns.add(server);
    this.#track(this.#pipe(client, server, true));
    this.#track(this.#pipe(server, client, false));
  }

  #track(task: Promise<void>): void {
    this.#tasks.add(task);
    task.finally(() => this.#tasks.delete(task));
  }

  async #pipe(from: Deno.Conn, to: Deno.Conn, record: boolean): Promise<void> {
    const buf = new Uint8Array(4096);
    try {
      for (;;) {
        const n = await from.read(buf);
        if (n === null) break;
        if (this.blackhole) continue;
        const bytes = buf.subarray(0, n);
        if (record) this.sent += new TextDecoder().decode(bytes);
        for (let at = 0; at < n;) at += await to.write(bytes.subarray(at));
      }
    } catch {
      // closed
    } finally {
      this.#close(from);
      // The client's side stays open past a partition; it is closed when the client closes it
      // (its own pipe ends then) or when the proxy goes.
      if (record || !this.blackhole) this.#close(to);
    }
  }

  #close(conn: Deno.Conn): void {
    if (!this.#conns.delete(conn)) return;
    try {
      conn.close();
    } catch {
      // already closed
    }
  }

  /** Cuts every connection through the proxy. */
  cut(): void {
    for (const conn of [...this.#conns]) this.#close(conn);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#listener.close();
    await this.#accepting;
    this.cut();
    while (this.#tasks.size > 0) await Promise.all([...this.#tasks]);
  }
}

/** A port nothing listens on. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

function hasIPv6(): boolean {
  try {
    Deno.listen({ hostname: "::1", port: 0 }).close();
    return true;
  } catch {
    return false;
  }
}

/** Sets environment variables for the length of `fn`, then restores them. */
async function withEnv(
  vars: Record<string, string | undefined>,
  fn: () => Promise<void>,
): Promise<void> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  const apply = (values: Record<string, string | undefined>) => {
    for (const [k, v] of Object.entries(values)) {
      if (v === undefined) Deno.env.delete(k);
      else Deno.env.set(k, v);
    }
  };
  apply(vars);
  try {
    await fn();
  } finally {
    apply(saved);
  }
}

function aborted(signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve(signal.reason);
    signal.addEventListener("abort", () => resolve(signal.reason), { once: true });
  });
}

const ENV_VARS = {
  TCPNETLOCK_HOST: undefined,
  TCPNETLOCK_PORT: undefined,
  TCPNETLOCK_CLIENT_ID: undefined,
  TCPNETLOCK_AUTH_TOKEN: undefined,
};

// ---------------------------------------------------------------------------------------------
// The same tests run over a session and over one connection per lock

/** The transport of the test that runs now (set by {@linkcode test}). */
let transport: "session" | "connection" = "connection";
/** Clients made by the test that runs now: closed after it (a session is a connection). */
const opened: LockClient[] = [];

/** A {@linkcode LockClient} with the transport of the test that runs now. */
class TestClient extends LockClient {
  constructor(options: LockClientOptions = {}) {
    super({ transport, ...options });
    opened.push(this);
  }
}

/** Registers `fn` twice: over sessions and over one connection per lock. */
function test(
  name: string,
  fn: () => void | Promise<void>,
  options: { ignore?: boolean } = {},
): void {
  for (const mode of ["session", "connection"] as const) {
    Deno.test({
      name: `${name} [${mode}]`,
      ignore: options.ignore,
      fn: async () => {
        transport = mode;
        try {
          await fn();
        } finally {
          await Promise.all(opened.splice(0).map((c) => c.close()));
        }
      },
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Taking and releasing

test("lock() takes a free lock and release() frees it", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port, clientId: "worker-1" });
  const lock = await client.lock("db");
  assert.deepEqual(lock.name, "db");
  assert.deepEqual(lock.server, `127.0.0.1:${srv.port}`);
  assert.ok(lock.held);
  const [info] = await settledLocks(srv);
  assert.deepEqual(info.name, "db");
  assert.deepEqual(info.holders[0].client_id, "worker-1");
  await lock.release();
  assert.ok(!lock.held);
  assert.deepEqual(await settledLocks(srv), []);
  assert.deepEqual(await lock.closed, undefined);
  assert.ok(!lock.signal.aborted, "a release is not a loss");
  await lock.release(); // idempotent
});

test("lock() rejects with LockNotGrantedError naming lock and server when the lock is held", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _held = await client.lock("db");
  const e = await rejects(() => client.lock("db"), LockNotGrantedError);
  assert.deepEqual(
    e.message,
    `Cannot acquire lock "db" on "127.0.0.1:${srv.port}": not granted, held by another client`,
  );
  assert.deepEqual(e.lockName, "db");
  assert.deepEqual(e.server, `127.0.0.1:${srv.port}`);
  assert.ok(isRetriableError(e));
  assert.equal(await client.tryLock("db"), null);
});

test("lock() without wait, ttl or limit sends the version 1 request and gets no token", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port, clientId: "c.1@x" });
  const lock = await client.lock("db");
  greater((await settledLocks(srv))[0].holders[0].token, 0); // the server did take a token
  await lock.release();
  if (transport === "connection") {
    assert.equal(lock.token, undefined);
    assert.deepEqual(proxy.sent, "lock,name:db,client-id:c.1@x\nrelease\n");
  } else {
    // A session always answers with the token; the client id is the session's.
    greater(lock.token, 0);
    assert.deepEqual(
      proxy.sent,
      "session,client-id:c.1@x\nlock,id:0,name:db\nrelease,id:0\n",
    );
  }
});

test("lock() with wait, ttl or limit sends an extended request and gets a fencing token", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const first = await client.lock("a", { wait: 0 });
  await first.release();
  const second = await client.lock("b", { wait: 1.5, ttl: 20, limit: 3 });
  await second.release();
  assert.deepEqual(
    proxy.sent,
    transport === "connection"
      ? "lock,name:a,wait:0\nrelease\nlock,name:b,wait:1.5,ttl:20,limit:3\nrelease\n"
      // A lease belongs to a session: locks with a ttl go over a session with that ttl.
      : "session\nlock,id:0,name:a,wait:0\nrelease,id:0\n" +
        "session,ttl:20\nlock,id:0,name:b,wait:1.5,limit:3\nrelease,id:0\n",
  );
  assert.ok(Number.isSafeInteger(first.token));
  greater(second.token, first.token);
});

test("lock(), tryLock() and withLock() take shared locks with mode; mode is sent only when set", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const r1 = await client.lock("ds", { mode: "shared" });
  const r2 = await client.lock("ds", { mode: "shared", wait: 0 });
  greater(r2.token, r1.token);
  assert.deepEqual((await settledLocks(srv))[0].holders.map((h) => h.mode), ["shared", "shared"]);
  // A writer is refused beside readers; a queued one blocks the readers after it.
  assert.equal(await client.tryLock("ds", { mode: "exclusive" }), null);
  const positions: number[] = [];
  const writer = client.lock("ds", {
    mode: "exclusive",
    wait: 30,
    onQueued: (p) => positions.push(p),
  });
  await until(() => positions.length > 0, "the writer queued");
  assert.equal(await client.tryLock("ds", { mode: "shared" }), null);
  const ran = await client.withLock("other", ({ token }) => token, { mode: "shared" });
  assert.ok(Number.isSafeInteger(ran));
  await r1.release();
  await r2.release();
  const w = await writer;
  greater(w.token, r2.token);
  await w.release();
  if (transport === "connection") {
    assert.deepEqual(
      proxy.sent,
      "lock,name:ds,mode:shared\nlock,name:ds,wait:0,mode:shared\nlock,name:ds,mode:exclusive\n" +
        "lock,name:ds,wait:30,mode:exclusive\nlock,name:ds,mode:shared\nlock,name:other,mode:shared\n" +
        "release\nrelease\nrelease\nrelease\n",
    );
  } else {
    // Over a session: the same modes, on lock lines with ids.
    const locks = proxy.sent.split("\n").filter((l) => l.startsWith("lock,"));
    assert.deepEqual(
      locks.map((l) => /,mode:(\w+)/.exec(l)?.[1]),
      ["shared", "shared", "exclusive", "exclusive", "shared", "shared"],
    );
    assert.ok(locks.every((l) => /^lock,id:/.test(l)), proxy.sent);
  }
  assert.deepEqual(positions, [1]);
});

test("lock() with wait queues in FIFO order, reports positions, and hands over on release", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const holder = await client.lock("db", { wait: 0 });

  const positionsB: number[] = [];
  const positionsC: number[] = [];
  const bQueued = Promise.withResolvers<void>();
  const cQueued = Promise.withResolvers<void>();
  const cFirst = Promise.withResolvers<void>();
  const b = client.lock("db", {
    wait: 30,
    clientId: "b",
    onQueued: (p) => {
      positionsB.push(p);
      bQueued.resolve();
    },
  });
  await bQueued.promise;
  const c = client.lock("db", {
    wait: 30,
    clientId: "c",
    onQueued: (p) => {
      positionsC.push(p);
      if (p === 2) cQueued.resolve();
      if (p === 1) cFirst.resolve();
    },
  });
  await cQueued.promise;
  assert.deepEqual((await settledLocks(srv))[0].waiting, 2);

  await holder.release();
  const lockB = await b;
  await cFirst.promise;
  assert.deepEqual((await settledLocks(srv))[0].holders.map((h) => h.client_id), ["b"]);
  await lockB.release();
  const lockC = await c;
  await lockC.release();

  assert.deepEqual(positionsB, [1]);
  assert.deepEqual(positionsC, [2, 1]);
  greater(lockB.token, holder.token);
  greater(lockC.token, lockB.token);
});

test("lock() rejects with LockTimeoutError when the wait runs out", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _held = await client.lock("db");
  const e = await rejects(() => client.lock("db", { wait: 0.1 }), LockTimeoutError);
  assert.deepEqual(
    e.message,
    `Cannot acquire lock "db" on "127.0.0.1:${srv.port}": still held by another client when ` +
      "the wait of 0.1 s ran out",
  );
  assert.equal(await client.tryLock("db", { wait: 0.05 }), null);
});

test("lock() with limit lets that many holders in at once", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _a = await client.lock("pool", { limit: 2 });
  await using _b = await client.lock("pool", { limit: 2 });
  await rejects(() => client.lock("pool", { limit: 2 }), LockNotGrantedError);
  const e = await rejects(() => client.lock("pool", { limit: 3 }), ServerError);
  assert.deepEqual(e.reason, "limit mismatch");
  assert.match(
    e.message,
    /^Cannot acquire lock "pool" on ".*": the server answered "limit mismatch"/,
  );
  assert.ok(!isRetriableError(e));
});

test("lock() gives up when its signal aborts, and leaves the queue", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _held = await client.lock("db");
  const controller = new AbortController();
  const queued = Promise.withResolvers<void>();
  const waiting = client.lock("db", {
    wait: 30,
    signal: controller.signal,
    onQueued: () => queued.resolve(),
  });
  await queued.promise;
  const reason = new Error("enough");
  controller.abort(reason);
  assert.equal(await waiting.catch((e) => e), reason);
  await until(() => srv.server.locks()[0].waiting === 0, "the waiter to leave the queue");
  await rejects(
    () => client.lock("db", { signal: AbortSignal.abort(reason) }),
    Error,
    "enough",
  );
});

// ---------------------------------------------------------------------------------------------
// Holding: leases, loss, release

test("a lock with a ttl stays held past several ttls thanks to automatic keepalives", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const lock = await client.lock("lease", { ttl: 0.5 });
  assert.deepEqual(lock.ttl, 0.5);
  // The passing of time is what is tested: more than three ttls.
  await new Promise((resolve) => setTimeout(resolve, 1600));
  assert.ok(lock.held, String(lock.signal.reason));
  assert.deepEqual((await settledLocks(srv)).length, 1);
  assert.deepEqual(srv.server.stats().lock_expired_count, 0);
  await lock.release();
});

test("keepalive() renews a lease by hand, and rejects once the lock is released", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const lock = await client.lock("db", { ttl: 60 });
  await lock.keepalive();
  await lock.keepalive();
  assert.deepEqual(
    proxy.sent,
    transport === "connection"
      ? "lock,name:db,ttl:60\n.keepalive\n.keepalive\n"
      : "session,ttl:60\nlock,id:0,name:db\n.keepalive\n.keepalive\n",
  );
  await lock.release();
  await rejects(() => lock.keepalive(), TcpNetLockError, "it was released");
});

test("the keepAlive option sends keepalives on a version 1 lock", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const lock = await client.lock("db", { keepAlive: 0.05 });
  await until(() => proxy.sent.split(".keepalive\n").length > 3, "three keepalives");
  assert.ok(lock.held);
  await lock.release();
  assert.ok(
    proxy.sent.startsWith(
      transport === "connection" ? "lock,name:db\n.keepalive\n" : "session\nlock,id:0,name:db\n",
    ),
    proxy.sent,
  );
});

test("the lock's signal aborts with ConnectionLostError the moment the server closes", async () => {
  const srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const lock = await client.lock("db", { ttl: 30 });
  await srv.server.close();
  const reason = instanceOf(await aborted(lock.signal), ConnectionLostError);
  assert.deepEqual(
    reason.message,
    `Lost lock "db" on "127.0.0.1:${srv.port}": the server closed the connection`,
  );
  assert.equal(await lock.closed, reason);
  assert.ok(!lock.held);
  await rejects(() => lock.release(), ConnectionLostError);
  await rejects(() => lock.keepalive(), ConnectionLostError);
  await lock[Symbol.asyncDispose](); // quiet
});

test("the lock's signal aborts when the connection is cut", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const lock = await client.lock("db");
  proxy.cut();
  instanceOf(await aborted(lock.signal), ConnectionLostError);
  await until(() => srv.server.locks().length === 0, "the server to free the lock");
});

test("after a server restart the lost lock is retaken with a larger token", async () => {
  const first = await startServerProcess();
  const port = first.port;
  const client = new TestClient({ host: "127.0.0.1", port });
  const lock = await client.lock("db", { wait: 0 });
  await first.stop("SIGKILL");
  instanceOf(await aborted(lock.signal), ConnectionLostError);
  await using second = await startServerProcess(["--port", String(port)]);
  const again = await client.lock("db", { wait: 0 });
  greater(again.token, lock.token);
  await again.release();
  await second.stop();
});

test("a lock whose keepalives go unanswered is given up when its ttl runs out", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const lock = await client.lock("db", { ttl: 0.3 });
  proxy.blackhole = true; // a partition: nothing gets through any more
  const start = performance.now();
  const reason = instanceOf(await aborted(lock.signal), LockExpiredError);
  assert.match(reason.message, /^Lost lock "db" on ".*": no keepalive was confirmed within/);
  greater(performance.now() - start, 150);
  assert.ok(isRetriableError(reason));
});

test("a frozen holder loses its lock with LockExpiredError", async () => {
  await using srv = await startServerProcess();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const lock = await client.lock("db", { ttl: 0.2 });
  const until = performance.now() + 600;
  while (performance.now() < until) {
    // frozen: no keepalive can be sent
  }
  instanceOf(await aborted(lock.signal), LockExpiredError);
  await rejects(() => lock.release(), LockExpiredError);
  await using again = await client.lock("db", { wait: 5 });
  assert.ok(again.held);
});

test("release() gives up waiting for an unconfirmed release and closes the connection", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port, connectTimeout: 200 });
  const lock = await client.lock("db");
  proxy.blackhole = true;
  const e = await rejects(() => lock.release(), ConnectionLostError);
  assert.match(e.message, /^Cannot release lock "db" on ".*": no confirmation within 200 ms/);
  instanceOf(await lock.closed, ConnectionLostError);
  await until(() => srv.server.locks().length === 0, "the server to free the lock");
});

test("withLock() runs the function under the lock and releases it", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const result = await client.withLock("db", async ({ token, signal, lock }) => {
    assert.deepEqual((await settledLocks(srv))[0].holders[0].token, token);
    assert.ok(!signal.aborted);
    assert.deepEqual(lock.name, "db");
    return 42;
  }, { wait: 0 });
  assert.deepEqual(result, 42);
  assert.deepEqual(await settledLocks(srv), []);
});

test("withLock() releases the lock when the function throws", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await rejects(
    () =>
      client.withLock("db", async () => {
        assert.deepEqual((await settledLocks(srv)).length, 1);
        throw new Error("boom");
      }),
    Error,
    "boom",
  );
  assert.deepEqual(await settledLocks(srv), []);
});

test("withLock() rejects when the lock was lost while the function ran", async () => {
  await using srv = await startTestServer();
  await using proxy = new TcpProxy(srv.port);
  const client = new TestClient({ host: "127.0.0.1", port: proxy.port });
  await rejects(
    () =>
      client.withLock("db", async ({ signal }) => {
        proxy.cut();
        await aborted(signal);
        return "done anyway";
      }),
    ConnectionLostError,
  );
});

test("await using releases the lock at the end of the block", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  {
    await using lock = await client.lock("db");
    assert.ok(lock.held);
    assert.deepEqual((await settledLocks(srv)).length, 1);
  }
  assert.deepEqual(await settledLocks(srv), []);
});

test("closing the client releases its locks and abandons its waits", async () => {
  await using srv = await startTestServer();
  const other = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _held = await other.lock("busy");
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const lock = await client.lock("mine");
  const queued = Promise.withResolvers<void>();
  const waiting = client.lock("busy", { wait: 30, onQueued: () => queued.resolve() });
  await queued.promise;
  const waited = waiting.catch((e) => e);
  await client.close();
  await rejects(() => waited.then((e) => Promise.reject(e)), TcpNetLockError, "is closed");
  assert.deepEqual(await lock.closed, undefined);
  assert.deepEqual((await settledLocks(srv)).map((l) => l.name), ["busy"]);
  await rejects(() => client.ping(), TcpNetLockError, "is closed");
});

// ---------------------------------------------------------------------------------------------
// Admin calls

test("ping() answers with the round trip time", async () => {
  await using srv = await startTestServer();
  const ms = await new TestClient({ host: "127.0.0.1", port: srv.port }).ping();
  assert.ok(ms >= 0 && ms < 10_000);
});

test("stats() parses the server's counters", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await using _lock = await client.lock("db");
  const stats = await client.stats();
  assert.deepEqual(stats.lock_count, 1);
  assert.deepEqual(stats.lock_acquired_count, 1);
  assert.deepEqual(typeof stats.maxrss, "number");
  assert.deepEqual(typeof stats.version, "string");
});

test("locks() lists holders and waiters", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port, clientId: "lister" });
  await using lock = await client.lock("db", { wait: 0 });
  const queued = Promise.withResolvers<void>();
  const controller = new AbortController();
  const waiter = client.lock("db", {
    wait: 30,
    signal: controller.signal,
    onQueued: () => queued.resolve(),
  });
  await queued.promise;
  const locks = await client.locks();
  assert.deepEqual(locks.length, 1);
  assert.deepEqual(locks[0].name, "db");
  assert.deepEqual(locks[0].limit, 1);
  assert.deepEqual(locks[0].waiting, 1);
  assert.deepEqual(locks[0].holders[0].client_id, "lister");
  assert.deepEqual(locks[0].holders[0].token, lock.token);
  assert.match(locks[0].holders[0].remote, /^127\.0\.0\.1:\d+$/);
  controller.abort();
  await waiter.catch(() => {});
});

test("locks() reads a reply longer than the server's request line limit", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const held = [];
  for (let i = 0; i < 40; i++) held.push(await client.lock(`lock-${"x".repeat(200)}-${i}`));
  const locks = await client.locks();
  assert.deepEqual(locks.length, 40);
  await Promise.all(held.map((l) => l.release()));
});

test("shutdown() stops the server", async () => {
  const srv = await startTestServer();
  await new TestClient({ host: "127.0.0.1", port: srv.port }).shutdown();
  await srv.server.finished;
  await srv.server.close();
});

// ---------------------------------------------------------------------------------------------
// Checks before sending, connection failures

test("invalid lock names and client ids are rejected before anything is sent", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  for (const name of ["", "a b", "a,b", "a:b", "ü", "x".repeat(256)]) {
    const e = await rejects(() => client.lock(name), InvalidLockNameError);
    assert.deepEqual(e.lockName, name);
  }
  const e = await rejects(() => client.lock("a b"), InvalidLockNameError);
  assert.deepEqual(e.message, 'Invalid lock name "a b": use 1 to 255 letters, digits, "_" and "-"');
  await rejects(() => client.lock("db", { clientId: "a,b" }), InvalidClientIdError);
  await rejects(() => client.withLock("a b", () => {}), InvalidLockNameError);
  throws(
    () => new TestClient({ port: srv.port, clientId: "web 1" }),
    InvalidClientIdError,
    'Invalid client id "web 1"',
  );
  assert.deepEqual(srv.server.stats().requests_count, 0, "the server saw no connection");
});

test("bad option values are rejected before anything is sent", async () => {
  await using srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  await rejects(() => client.lock("db", { wait: -1 }), RangeError);
  await rejects(() => client.lock("db", { ttl: 0 }), RangeError);
  await rejects(() => client.lock("db", { limit: 1.5 }), RangeError);
  await rejects(() => client.lock("db", { ttl: 1, keepAlive: 2 }), RangeError);
  // deno-lint-ignore no-explicit-any
  await rejects(() => client.lock("db", { mode: "read" as any }), RangeError);
  await rejects(() => client.lock("db", { mode: "shared", limit: 2 }), RangeError);
  throws(() => new TestClient({ port: 70000 }), RangeError);
  throws(() => new TestClient({ authToken: "a,b" }), RangeError);
  assert.deepEqual(srv.server.stats().requests_count, 0);
});

test("a closed port gives ServerUnreachableError: connection refused", async () => {
  const port = freePort();
  const client = new TestClient({ host: "127.0.0.1", port });
  const e = await rejects(() => client.lock("db"), ServerUnreachableError);
  assert.deepEqual(
    e.message,
    `Cannot connect to tcpnetlock server "127.0.0.1:${port}": connection refused`,
  );
  assert.ok(e.refused);
  assert.ok(isRetriableError(e));
  await rejects(() => client.ping(), ServerUnreachableError, "connection refused");
  const local = new TestClient({ port }); // localhost: tries 127.0.0.1 and ::1
  await rejects(
    () => local.stats(),
    ServerUnreachableError,
    `Cannot connect to tcpnetlock server "localhost:${port}": connection refused`,
  );
});

test("a server that does not answer the TLS handshake gives a connect timeout", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepted: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) accepted.push(conn);
  })().catch(() => {});
  const client = new TestClient({
    host: "127.0.0.1",
    port: listener.addr.port,
    tls: true,
    connectTimeout: 200,
  });
  const e = await rejects(() => client.ping(), ServerUnreachableError);
  assert.match(e.message, /: no connection within 200 ms$/);
  assert.ok(!e.refused);
  listener.close();
  await accepting;
  for (const conn of accepted) conn.close();
});

test("a lock request that the server leaves unanswered ends in ConnectionLostError", async () => {
  const srv = await startTestServer();
  const client = new TestClient({ host: "127.0.0.1", port: srv.port });
  const held = await client.lock("db");
  const queued = Promise.withResolvers<void>();
  const waiting = client.lock("db", { wait: 30, onQueued: () => queued.resolve() });
  // Handled from now on: it may reject while the server is still closing (slower with etcd).
  const outcome = waiting.then(() => undefined, (e) => e);
  await queued.promise;
  await srv.server.close();
  const e = instanceOf(await outcome, ConnectionLostError);
  assert.match(e.message, /^Cannot acquire lock "db" on "127\.0\.0\.1:\d+": /);
  instanceOf(await held.closed, ConnectionLostError);
});

test("something that is not a tcpnetlock server gives ProtocolError quoting its line", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const serving = (async () => {
    for await (const conn of listener) {
      await conn.write(new TextEncoder().encode("SSH-2.0-OpenSSH_9.6\n"));
      conn.close();
    }
  })().catch(() => {});
  const client = new TestClient({ host: "127.0.0.1", port: listener.addr.port });
  const e = await rejects(() => client.lock("db"), ProtocolError);
  assert.deepEqual(e.line, "SSH-2.0-OpenSSH_9.6");
  assert.match(e.message, /unexpected reply "SSH-2\.0-OpenSSH_9\.6" from the server$/);
  await rejects(() => client.stats(), ProtocolError);
  listener.close();
  await serving;
});

// ---------------------------------------------------------------------------------------------
// Auth, TLS, defaults

test("the auth token is sent on every request, and its absence is reported", async () => {
  await using srv = await startTestServer({ authToken: "s3cret" });
  await using proxy = new TcpProxy(srv.port);
  const anonymous = new TestClient({ host: "127.0.0.1", port: proxy.port });
  const e = await rejects(() => anonymous.lock("db"), ServerError);
  assert.deepEqual(e.reason, "unauthorized");
  assert.match(e.message, /the server answered "unauthorized" \(give the server's auth token/);
  await rejects(() => anonymous.stats(), ServerError, "unauthorized");

  const client = new TestClient({ host: "127.0.0.1", port: proxy.port, authToken: "s3cret" });
  const lock = await client.lock("db");
  await lock.release();
  await client.ping();
  assert.deepEqual((await client.stats()).lock_count, 0);
  assert.ok(
    proxy.sent.endsWith(
      transport === "connection"
        ? "lock,name:db,auth:s3cret\nrelease\n.ping,auth:s3cret\n.stats,auth:s3cret\n"
        // The auth token goes on the session line, not on the lines inside the session.
        : "session,auth:s3cret\nlock,id:0,name:db\nrelease,id:0\n.ping,auth:s3cret\n" +
          ".stats,auth:s3cret\n",
    ),
    proxy.sent,
  );
});

test("the client reads TCPNETLOCK_* environment variables for its defaults", async () => {
  await using srv = await startTestServer({ authToken: "from-env" });
  await withEnv({
    TCPNETLOCK_HOST: "127.0.0.1",
    TCPNETLOCK_PORT: String(srv.port),
    TCPNETLOCK_CLIENT_ID: "env-client",
    TCPNETLOCK_AUTH_TOKEN: "from-env\n",
  }, async () => {
    const client = new TestClient();
    assert.deepEqual(client.server, `127.0.0.1:${srv.port}`);
    await using _lock = await client.lock("db");
    assert.deepEqual((await settledLocks(srv))[0].holders[0].client_id, "env-client");
  });
  await withEnv({ ...ENV_VARS, TCPNETLOCK_PORT: "http" }, () => {
    throws(() => new TestClient(), RangeError, 'Invalid TCPNETLOCK_PORT "http"');
    return Promise.resolve();
  });
});

test("a client on its defaults reaches a server on localhost, over IPv4 and IPv6", async () => {
  await using srv = await startTestServer({ hostname: "localhost" });
  await withEnv({ ...ENV_VARS, TCPNETLOCK_PORT: String(srv.port) }, async () => {
    const client = new TestClient();
    assert.deepEqual(client.server, `localhost:${srv.port}`);
    await using lock = await client.lock("db");
    assert.match((await settledLocks(srv))[0].holders[0].remote, /^127\.0\.0\.1:/);
    await lock.release();
  });
  await new TestClient({ host: "127.0.0.1", port: srv.port }).ping();
  if (srv.server.addrs.some((a) => a.hostname === "::1")) {
    const v6 = new TestClient({ host: "::1", port: srv.port });
    assert.deepEqual(v6.server, `[::1]:${srv.port}`);
    await using _lock = await v6.lock("db6");
    assert.match((await settledLocks(srv))[0].holders[0].remote, /^\[::1\]:/);
  }
});

test("a client on localhost finds a server that listens on ::1 only", async () => {
  await using srv = await startTestServer({ hostname: "::1" });
  const client = new TestClient({ host: "localhost", port: srv.port });
  await using _lock = await client.lock("db");
  assert.match((await settledLocks(srv))[0].holders[0].remote, /^\[::1\]:/);
}, { ignore: !hasIPv6() });

/** A CA and a server certificate for localhost / 127.0.0.1, made with openssl. */
async function makeCertificates(): Promise<{ ca: string; cert: string; key: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const run = async (...args: string[]) => {
      const out = await new Deno.Command("openssl", { args, cwd: dir, stdin: "null" }).output();
      if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
    };
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    await run(
      "req",
      "-x509",
      ...ec,
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
      "-days",
      "2",
      "-subj",
      "/CN=test CA",
    );
    await run("req", ...ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost");
    await Deno.writeTextFile(
      `${dir}/ext.cnf`,
      "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n" +
        "extendedKeyUsage=serverAuth\n",
    );
    await run(
      "x509",
      "-req",
      "-in",
      "server.csr",
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-out",
      "cert.pem",
      "-days",
      "2",
      "-extfile",
      "ext.cnf",
    );
    return {
      ca: await Deno.readTextFile(`${dir}/ca.pem`),
      cert: await Deno.readTextFile(`${dir}/cert.pem`),
      key: await Deno.readTextFile(`${dir}/key.pem`),
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function hasOpenssl(): boolean {
  try {
    return new Deno.Command("openssl", { args: ["version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

test("over TLS the client checks the server's certificate and holds locks", async () => {
  const { ca, cert, key } = await makeCertificates();
  await using srv = await startTestServer({ tls: { cert, key } });
  const client = new TestClient({ host: "localhost", port: srv.port, tls: true, caCerts: [ca] });
  await client.ping();
  const lock = await client.lock("db", { ttl: 10 });
  assert.deepEqual((await settledLocks(srv))[0].name, "db");
  await lock.release();
  await new TestClient({ host: "127.0.0.1", port: srv.port, tls: true, caCerts: [ca] }).ping();

  const untrusting = new TestClient({ host: "localhost", port: srv.port, tls: true });
  const e = await rejects(() => untrusting.ping(), ServerUnreachableError);
  assert.match(e.message, /: TLS handshake failed \(.*certificate/i);
  assert.ok(!e.refused);
}, { ignore: !hasOpenssl() });

// ---------------------------------------------------------------------------------------------
// Errors

Deno.test("isRetriableError() tells passing trouble from mistakes", () => {
  const facts = { server: "h:1", lockName: "db" };
  assert.ok(isRetriableError(new ServerUnreachableError("h:1", "connection refused")));
  assert.ok(isRetriableError(new ConnectionLostError("x", facts)));
  assert.ok(isRetriableError(new LockNotGrantedError("x", facts)));
  assert.ok(isRetriableError(new LockTimeoutError("x", facts)));
  assert.ok(isRetriableError(new LockExpiredError("x", facts)));
  assert.ok(isRetriableError(new ServerError("x", "too many waiters", facts)));
  assert.ok(!isRetriableError(new ServerError("x", "unauthorized", facts)));
  assert.ok(!isRetriableError(new ServerError("x", "limit mismatch", facts)));
  assert.ok(!isRetriableError(new ProtocolError("x", "hello", facts)));
  assert.ok(!isRetriableError(new InvalidLockNameError("a b")));
  assert.ok(!isRetriableError(new Error("other")));
  assert.deepEqual(new LockTimeoutError("x").name, "LockTimeoutError");
  instanceOf(new LockTimeoutError("x"), TcpNetLockError);
});

test("lock() against a TLS server without tls: the error says the server may speak TLS", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = await makeTlsFixture(dir);
    await using srv = await startTestServer({ tls: { cert: tls.cert, key: tls.key } });
    const client = new TestClient({ host: "127.0.0.1", port: srv.port });
    await assert.rejects(
      () => client.lock("db"),
      (e: unknown) => e instanceof ConnectionLostError && /may speak TLS/.test(e.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
