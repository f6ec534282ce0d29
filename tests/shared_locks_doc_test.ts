// docs/shared-locks.md: its TypeScript sample runs, as a user would run it (a `deno run` of its
// own, the client found through TCPNETLOCK_HOST and TCPNETLOCK_PORT), and prints what the page
// says, in that order.

import assert from "node:assert/strict";
import { ROOT, startTestServer } from "./test_util.ts";

Deno.test("docs/shared-locks.md: the readers/writer recipe runs and prints what the page shows", async () => {
  const doc = await Deno.readTextFile(`${ROOT}docs/shared-locks.md`);
  const blocks = [...doc.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.equal(blocks.length, 1, "one TypeScript sample");
  const printed = [...doc.matchAll(/It prints:\n\n```text\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.equal(printed.length, 1, "the sample's output is shown");
  const code = blocks[0].replace(
    '"@x/tcpnetlock/client"',
    JSON.stringify(new URL("../client.ts", import.meta.url).href),
  );
  const dir = await Deno.makeTempDir({ prefix: "tcpnetlock-doc-" });
  try {
    const file = `${dir}/recipe.ts`;
    await Deno.writeTextFile(file, code);
    await using srv = await startTestServer();
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--check", "--allow-net", "--allow-env", file],
      env: { TCPNETLOCK_HOST: "127.0.0.1", TCPNETLOCK_PORT: String(srv.port) },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(60_000),
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    assert.ok(
      out.success,
      `the sample failed:\n${stdout}\n${new TextDecoder().decode(out.stderr)}`,
    );
    // The page's output, with every token a number that grows as the page says.
    const want = printed[0].trim().split("\n");
    const got = stdout.trim().split("\n");
    assert.equal(got.length, want.length, stdout);
    const tokens: number[] = [];
    for (const [i, line] of want.entries()) {
      const re = new RegExp(
        "^" + line.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/\d{10,}/g, "(\\d+)") + "$",
      );
      const m = re.exec(got[i]);
      assert.ok(m, `line ${i + 1}: ${JSON.stringify(got[i])} is not like ${JSON.stringify(line)}`);
      tokens.push(...m.slice(1).map(Number));
    }
    assert.equal(tokens.length, 4);
    for (let i = 1; i < tokens.length; i++) assert.ok(tokens[i] > tokens[i - 1], `${tokens}`);
    assert.deepEqual(srv.server.locks(), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
