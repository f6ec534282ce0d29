/**
 * Shared locks from every tool, against a real server (the memory store, or etcd with
 * TCPNETLOCK_TEST_STORE=etcd): `client.ts hold --shared` holds a name; while it holds, `do.ts -s`
 * and the shell helper's `run_with_lock --shared` are granted beside it, and an exclusive
 * `do.ts -x` is not. Then a writer waits for the reader and gets the name once it lets go.
 */

import assert from "node:assert/strict";
import { startTestServer } from "./test_util.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const decoder = new TextDecoder();

async function run(args: string[], env: Record<string, string>) {
  const out = await new Deno.Command(args[0], {
    args: args.slice(1),
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Reads the holder's stdout until a line matching `re`, or throws at EOF. */
async function lineMatching(reader: ReadableStreamDefaultReader<Uint8Array>, re: RegExp) {
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the holder ended before ${re}: ${JSON.stringify(text)}`);
    text += decoder.decode(value);
    if (re.test(text)) return text;
  }
}

Deno.test("do.ts -s, client.ts hold --shared and run_with_lock --shared hold one name at once", async () => {
  await using srv = await startTestServer();
  const env = { TCPNETLOCK_PORT: String(srv.port), TCPNETLOCK_HOST: "127.0.0.1", NO_COLOR: "1" };
  const holder = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "client.ts", "hold", "dataset", "--shared", "--client-id", "reader-1"],
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = holder.stdout.getReader();
  let holderEnded = false;
  try {
    await lineMatching(reader, /granted/);

    // A second reader, from do.ts: granted at once beside the first (no waiting allowed).
    const d = await run([
      Deno.execPath(),
      "run",
      "-A",
      "do.ts",
      "-s",
      "dataset",
      "--",
      "echo",
      "read-2",
    ], env);
    assert.equal(d.code, 0, d.stderr);
    assert.match(d.stdout, /read-2/);

    // A third, from the shell helper in real bash.
    const b = await run([
      "bash",
      "-c",
      `TCPNETLOCK_DO=${ROOT}do.ts; source shell/tcpnetlock.sh; run_with_lock --shared dataset echo read-3`,
    ], env);
    assert.equal(b.code, 0, b.stderr);
    assert.match(b.stdout, /read-3/);

    // A writer is not granted while a reader holds it, and says who does.
    const x = await run([
      Deno.execPath(),
      "run",
      "-A",
      "do.ts",
      "-x",
      "dataset",
      "--",
      "echo",
      "write",
    ], env);
    assert.equal(x.code, 123, x.stderr);
    assert.doesNotMatch(x.stdout, /write/);
    assert.match(x.stderr, /"dataset" is held by reader-1/);

    // A writer that waits gets it once the reader lets go.
    const waiting = run(
      [Deno.execPath(), "run", "-A", "do.ts", "-x", "-w", "30", "dataset", "--", "echo", "rebuilt"],
      env,
    );
    // Let the writer queue before the reader leaves (it is seen in .locks as a waiter).
    const client = await import("../client.ts");
    const admin = new client.LockClient({ host: "127.0.0.1", port: srv.port });
    for (let i = 0; i < 500; i++) {
      const locks = await admin.locks();
      if (locks.some((l) => l.name === "dataset" && l.waiting > 0)) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    holder.kill("SIGTERM");
    holderEnded = true;
    const w = await waiting;
    assert.equal(w.code, 0, w.stderr);
    assert.match(w.stdout, /rebuilt/);
  } finally {
    if (!holderEnded) holder.kill("SIGTERM");
    await reader.cancel();
    await holder.stderr.cancel();
    await holder.status;
  }
});
