// What a surge of connections grew is given back once it is over (lib/memory.ts): before, an idle
// server kept the flood's garbage (V8 collects when a program allocates, and an idle server does
// not), so its resident memory stayed at the flood's peak.

import assert from "node:assert/strict";
import { SURGE_MIN, SurgeWatch } from "../lib/memory.ts";
import { startServerProcess } from "./test_util.ts";

Deno.test("surge watch: over when the open connections fall to a quarter of a peak of at least SURGE_MIN", () => {
  const w = new SurgeWatch();
  w.opened(SURGE_MIN - 1);
  assert.equal(w.isOver(0), 0, "a smaller peak is no surge");
  w.opened(SURGE_MIN * 2);
  assert.equal(w.isOver(SURGE_MIN), 0, "half the peak still open: not over");
  assert.equal(w.isOver(SURGE_MIN / 2), SURGE_MIN * 2);
  assert.equal(w.isOver(0), 0, "told once; the next surge counts from there");
});

Deno.test("server: after a surge of connections the heap is collected and the log says so", async () => {
  await using server = await startServerProcess();
  const count = SURGE_MIN + 200;
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < count; i++) {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port: server.port }));
    }
    // Every one of them reached the server (accepted in order): a request on the last one.
    const last = conns[conns.length - 1];
    await last.write(new TextEncoder().encode(".ping\n"));
    const buf = new Uint8Array(16);
    assert.equal(new TextDecoder().decode(buf.subarray(0, (await last.read(buf)) ?? 0)), "pong\n");
  } finally {
    for (const c of conns) c.close();
  }
  // The watchdog looks once a second.
  const line = await server.waitForLog(/A surge of \d+ connections is over/, 10_000);
  const m = /heap ([\d.]+) MB collected to ([\d.]+) MB/.exec(line);
  assert.ok(m !== null, line);
  assert.ok(Number(m[2]) < Number(m[1]), `the heap went down: ${line}`);
});
