// A connection closed while its half-close is on its way leaves nothing behind: no linger timer
// (found by the op sanitizer under the parallel suite, where a server stopped at that moment
// left a 1 s timer running after the test). The race is made certain here: the session runs on
// a real loopback socket whose `closeWrite()` waits for the test to let it through.

import assert from "node:assert/strict";
import { LineReader } from "../lib/lines.ts";
import type { StreamConn } from "../lib/net.ts";
import { Session, type SessionHost } from "../lib/session.ts";
import { MultiSession } from "../lib/session_v3.ts";
import { MemoryStore } from "../lib/store/memory_store.ts";

/** A real TCP connection whose half-close reports back only once {@linkcode GatedConn.open} is called. */
class GatedConn implements StreamConn {
  readonly #conn: Deno.TcpConn;
  readonly #gate = Promise.withResolvers<void>();
  readonly halfClosing = Promise.withResolvers<void>();

  constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
  }

  get remoteAddr(): Deno.Addr {
    return this.#conn.remoteAddr;
  }

  read(p: Uint8Array): Promise<number | null> {
    return this.#conn.read(p);
  }

  write(p: Uint8Array): Promise<number> {
    return this.#conn.write(p);
  }

  /** The half-close is sent at once; its promise settles only once the gate opens. */
  async closeWrite(): Promise<void> {
    const sent = this.#conn.closeWrite();
    this.halfClosing.resolve();
    await this.#gate.promise;
    await sent;
  }

  close(): void {
    this.#conn.close();
  }

  open(): void {
    this.#gate.resolve();
  }
}

/**
 * A gated server side and its peer over loopback, a memory store, and the warnings logged. `race`
 * sends `input`, closes the connection (with `close`) once its half-close is on its way, lets the
 * half-close report back, and returns what the peer read to the end of the stream.
 */
async function halfCloseRace(
  input: string,
  start: (conn: GatedConn, table: MemoryStore, warn: (message: string) => void) => {
    run(): Promise<void>;
    close(): void;
  },
): Promise<{ text: string; warnings: string[] }> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const peer = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
  const conn = new GatedConn(await listener.accept());
  listener.close();
  const table = new MemoryStore();
  await table.start();
  const warnings: string[] = [];
  const server = start(conn, table, (message) => warnings.push(message));
  const running = server.run();
  await peer.write(new TextEncoder().encode(input));
  await conn.halfClosing.promise;
  server.close(); // the server stops while the half-close is on its way
  conn.open();
  await running;
  const text = await new Response(peer.readable).text();
  await table.close();
  // Nothing else to await: a timer left running fails the test (the op sanitizer).
  return { text, warnings };
}

Deno.test("a session closed during its half-close sets no linger timer", async () => {
  // A line with an empty action: `bad-request`, then the session closes (half-close first).
  const { text, warnings } = await halfCloseRace(",x\n", (conn, table, warn) => {
    const host = { table, maxSessionLocks: 10, warn };
    return new MultiSession(conn, new LineReader(conn, 1024), host, "peer", "", undefined);
  });
  // The peer got the opening and the refusal, then the end of the stream.
  assert.equal(text, "session,version:3,max-ids:10\nbad-request\n");
  assert.deepEqual(warnings, []);
});

Deno.test("a version 1 connection closed during its half-close sets no linger timer", async () => {
  // Two lines at once: `pong` for the first, and with a line still unread the connection
  // half-closes and drains instead of closing at once.
  const { text, warnings } = await halfCloseRace(".ping\n.ping\n", (conn, table, warn) => {
    const host: SessionHost = {
      table,
      maxLine: 1024,
      firstLineTimeoutMs: 5000,
      checkAuth: undefined,
      allowRemoteShutdown: false,
      maxSessionLocks: 10,
      sessions: true,
      statsJson: () => "{}",
      locksJson: () => "[]",
      requestShutdown: () => {},
      sessionEnded: () => {},
      tuneSoon: () => {},
      authenticated: () => {},
      warn,
    };
    const session = new Session(conn, host);
    return { run: () => session.run(), close: () => session.shutdown() };
  });
  assert.equal(text, "pong\n");
  assert.deepEqual(warnings, []);
});
