// What the hot paths leave for the garbage collector: lock+release cycles, over sessions and with
// one connection per lock, must not promote objects to V8's old generation: each cycle's objects
// die young.
//
// They did not. A long-lived `Map` or `Set` that gains and loses an entry per cycle replaces its
// hash table every few operations, and V8 keeps a replaced table linked to its successor: once
// one of them sat in the old generation, every later table, and every claim or connection it
// pointed to, survived young collections and was promoted. The lock table's map of names (an
// entry added and deleted per cycle) promoted ~200 KB per scavenge over sessions; the server's
// set of open connections and its set of holders due for socket options ~300 KB per scavenge
// with a connection per lock: ~2 and ~5 µs of collection per cycle. The claim book now keeps a
// name's entry while the name is in use (lib/store/claim_book.ts), and the server keeps those
// connections in slot lists (lib/slot_list.ts).
//
// The server runs as in production (`deno task start`: --max-semi-space-size=8, no --info) with
// V8's --trace-gc-nvp on stdout. A first phase warms it up (the chain started in the second
// phase in every run on this machine, never in the first), then the test counts what the
// scavenges of the second phase promoted: bytes, not times, so the machine's speed does not
// matter.

import assert from "node:assert/strict";
import { startServerProcess } from "./test_util.ts";

const CLIENTS = 16;
const enc = new TextEncoder();

/** Reads from `conn` until `want` more newlines came (a counter kept by the caller). */
function lineCounter(conn: Deno.Conn) {
  const buf = new Uint8Array(4096);
  let lines = 0;
  return {
    async waitFor(more: number): Promise<void> {
      const want = lines + more;
      while (lines < want) {
        const n = await conn.read(buf);
        if (n === null) throw new Error("the server closed the connection");
        for (let i = 0; i < n; i++) if (buf[i] === 0x0a) lines++;
      }
    },
  };
}

/** One cycle on `conn`: `lock` → its reply, `release` → its reply. */
async function lockRelease(
  conn: Deno.Conn,
  lines: ReturnType<typeof lineCounter>,
  lock: Uint8Array,
  release: Uint8Array,
): Promise<void> {
  await conn.write(lock);
  await lines.waitFor(1);
  await conn.write(release);
  await lines.waitFor(1);
}

/** One session cycling `lock` → `ok` → `release` → `released` on its own name. */
async function sessionCycles(port: number, name: string, cycles: number): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const lines = lineCounter(conn);
    await conn.write(enc.encode("session\n"));
    await lines.waitFor(1);
    const lock = enc.encode(`lock,id:0,name:${name}\n`);
    const release = enc.encode("release,id:0\n");
    for (let i = 0; i < cycles; i++) await lockRelease(conn, lines, lock, release);
  } finally {
    conn.close();
  }
}

/** Cycles with one connection per lock: connect, `lock` → `ok`, `release` → `released`, close. */
async function connectionCycles(port: number, name: string, cycles: number): Promise<void> {
  const lock = enc.encode(`lock,name:${name}\n`);
  const release = enc.encode("release\n");
  for (let i = 0; i < cycles; i++) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    try {
      await lockRelease(conn, lineCounter(conn), lock, release);
    } finally {
      conn.close();
    }
  }
}

type Cycles = (port: number, name: string, cycles: number) => Promise<void>;

/** Bytes promoted per scavenge in the second of two phases of `cycles` per client. */
async function promotedPerScavenge(run: Cycles, cycles: number) {
  await using server = await startServerProcess([], {
    denoFlags: ["--v8-flags=--max-semi-space-size=8,--trace-gc-nvp"],
    quiet: true,
    keepStdout: true,
  });
  const load = () =>
    Promise.all(Array.from({ length: CLIENTS }, (_, i) => run(server.port, `gc-${i}`, cycles)));
  await load();
  const before = server.stdout().length;
  await load();
  const promoted: number[] = [];
  // Whole lines only: the last one may still be on its way.
  for (const line of server.stdout().slice(before).split("\n").slice(0, -1)) {
    const at = line.indexOf("GC: {");
    if (at < 0) continue;
    const gc = JSON.parse(line.slice(at + 4));
    if (gc.gc === "s") promoted.push(gc.promoted);
  }
  return {
    scavenges: promoted.length,
    average: promoted.reduce((a, b) => a + b, 0) / Math.max(1, promoted.length),
  };
}

function check(what: string, r: { scavenges: number; average: number }): void {
  assert.ok(r.scavenges >= 5, `${what}: the load must make the server collect (${r.scavenges})`);
  assert.ok(
    r.average < 32 * 1024,
    `${what}: ${Math.round(r.average / 1024)} KB promoted per scavenge over ${r.scavenges} ` +
      `scavenges (each cycle's objects must die young)`,
  );
}

Deno.test("lock+release cycles over sessions promote nothing to the old generation", async () => {
  check("sessions", await promotedPerScavenge(sessionCycles, 2_000));
});

Deno.test("lock+release cycles with a connection per lock promote nothing to the old generation", async () => {
  check("a connection per lock", await promotedPerScavenge(connectionCycles, 1_000));
});
