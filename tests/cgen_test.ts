/**
 * The C load generator's hand-over mode (bench/cgen/loadgen.c `--handover 1`, run through
 * `runHandoverC`): against the real server it measures hand-overs with every check passing, and
 * its checks catch a server that grants a held lock (the floor server grants every request at
 * once, so with the checks on it must be caught).
 */

import assert from "node:assert/strict";
import { buildCGen, runHandoverC } from "../bench/cgen.ts";
import { ROOT, startServerProcess } from "./test_util.ts";

const built = await buildCGen();
const ignore = built === null;

/** The floor server (bench/floor_server.ts) as a subprocess on a free port. */
async function startFloor(): Promise<{ port: number } & AsyncDisposable> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}bench/floor_server.ts`, "--port", "0"],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  let port = 0;
  while (port === 0) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`the floor server ended: ${text}`);
    text += value;
    const m = text.match(/listening on [^\n]*:(\d+)/);
    if (m) port = Number(m[1]);
  }
  lines.releaseLock();
  child.stderr.cancel().catch(() => {});
  return {
    port,
    [Symbol.asyncDispose]: async () => {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

Deno.test({
  name: "C hand-over generator: against the server, hand-overs measured and every check passes",
  ignore,
  fn: async () => {
    await using srv = await startServerProcess([], { quiet: true });
    const r = await runHandoverC({ hostname: "127.0.0.1", port: srv.port }, {
      clients: 16,
      names: 2,
      durationMs: 800,
      warmupMs: 200,
      serverPid: srv.child.pid,
    });
    assert.equal(r.errors.total, 0, JSON.stringify(r.errors));
    assert.ok(r.grants > 100, `grants: ${r.grants}`);
    // 8 clients per name: nearly every grant went to a client that had been queued.
    assert.ok(r.handovers > r.grants * 0.9, `${r.handovers} hand-overs of ${r.grants}`);
    assert.equal(r.delay.count, r.handovers);
    assert.ok(r.delay.p99 > 0 && r.delay.p99 <= r.delay.max);
    assert.ok(r.queuedPerGrant >= 1, `queued lines per grant: ${r.queuedPerGrant}`);
    assert.ok(r.generatorCpuPercent! > 0 && r.serverCpuPercent! > 0);
  },
});

Deno.test({
  name: "C hand-over generator: readers and writers share the names, every check passes",
  ignore,
  fn: async () => {
    await using srv = await startServerProcess([], { quiet: true });
    const r = await runHandoverC({ hostname: "127.0.0.1", port: srv.port }, {
      clients: 20,
      names: 2,
      durationMs: 800,
      warmupMs: 200,
      readers: 0.8,
    });
    assert.equal(r.errors.total, 0, JSON.stringify(r.errors));
    // 16 readers and 4 writers: both kinds were granted.
    assert.ok(r.sharedGrants > 0 && r.sharedGrants < r.grants, `${r.sharedGrants} of ${r.grants}`);
    assert.ok(r.writerGrantLatency !== undefined && r.writerGrantLatency.count > 0);
  },
});

Deno.test({
  name: "C hand-over generator: its checks catch a server that grants a held lock",
  ignore,
  fn: async () => {
    await using floor = await startFloor();
    const r = await runHandoverC({ hostname: "127.0.0.1", port: floor.port }, {
      clients: 16,
      names: 2,
      durationMs: 500,
      warmupMs: 100,
    });
    const kinds = r.errors.kinds as Record<string, number>;
    assert.ok((kinds.exclusion ?? 0) > 0, JSON.stringify(r.errors));
    assert.ok((kinds["token-order"] ?? 0) > 0, JSON.stringify(r.errors));
    // With the checks off (as the benchmark runs the floor), the same run counts no error.
    const unchecked = await runHandoverC({ hostname: "127.0.0.1", port: floor.port }, {
      clients: 16,
      names: 2,
      durationMs: 300,
      checkLocking: false,
    });
    assert.equal(unchecked.errors.total, 0, JSON.stringify(unchecked.errors));
  },
});
