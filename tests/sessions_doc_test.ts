// Every sample in docs/sessions.md runs: the netcat transcripts against a real server (lines
// marked `>` are sent, the lines after them are the replies expected, tokens aside), and the
// TypeScript sample as a program against a real server.

import assert from "node:assert/strict";
import { RawClient, ROOT, startTestServer } from "./test_util.ts";

const doc = await Deno.readTextFile(`${ROOT}docs/sessions.md`);
const blocks = (lang: string) =>
  [...doc.matchAll(new RegExp("```" + lang + "\\n([\\s\\S]*?)```", "g"))].map((m) => m[1]);

/** Token values differ from run to run. */
const normal = (line: string) => line.replace(/token:\d+/, "token:T");

Deno.test("docs/sessions.md: every session transcript gets the replies it shows", async () => {
  const transcripts = blocks("session");
  assert.ok(transcripts.length >= 3, "the transcripts are found");
  for (const text of transcripts) {
    await using srv = await startTestServer();
    const lines = text.trimEnd().split("\n");
    assert.match(lines[0], /^\$ nc localhost 7654$/);
    await using c = await RawClient.connect(srv.port);
    // Each request with the replies shown after it.
    const steps: { send: string; expect: string[] }[] = [];
    for (const l of lines.slice(1)) {
      if (l.startsWith("> ")) steps.push({ send: l.slice(2), expect: [] });
      else steps.at(-1)!.expect.push(l);
    }
    for (const step of steps) {
      await c.write(step.send + "\n");
      const got: string[] = [];
      for (let i = 0; i < step.expect.length; i++) got.push((await c.line()) ?? "(closed)");
      assert.deepEqual(got.map(normal), step.expect.map(normal), `after "${step.send}"`);
    }
  }
});

Deno.test("docs/sessions.md: the client sample runs against a real server", async () => {
  const [sample] = blocks("ts");
  assert.ok(sample?.includes("LockClient"));
  await using srv = await startTestServer();
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/sample.ts`;
    await Deno.writeTextFile(
      file,
      sample.replace('"@x/tcpnetlock/client"', JSON.stringify(`file://${ROOT}client.ts`)),
    );
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", file],
      env: { TCPNETLOCK_HOST: "127.0.0.1", TCPNETLOCK_PORT: String(srv.port) },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.match(stdout, /^db \d+, reports \d+: one connection\n$/);
    assert.equal(srv.server.table.holders, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
