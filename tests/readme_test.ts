// The README is the front door and docs/ the reference: every flag and variable the programs
// accept is documented there (tests/docs_test.ts runs or parses every sample).

import assert from "node:assert/strict";
import { ROOT } from "./test_util.ts";

async function help(program: string): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}${program}`, "--help"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
}

/** README.md and every docs/*.md, as one text. */
async function allDocs(): Promise<string> {
  let text = await Deno.readTextFile(`${ROOT}README.md`);
  for await (const entry of Deno.readDir(`${ROOT}docs`)) {
    if (entry.name.endsWith(".md")) text += await Deno.readTextFile(`${ROOT}docs/${entry.name}`);
  }
  return text;
}

Deno.test("README and docs/ document every flag and TCPNETLOCK_* variable of server.ts, client.ts and do.ts", async () => {
  const readme = await allDocs();
  for (const program of ["server.ts", "client.ts", "do.ts"]) {
    const text = await help(program);
    const flags = new Set(text.match(/--[a-z][a-z0-9-]+/g) ?? []);
    assert.ok(flags.size > 3, `${program} --help lists its flags`);
    for (const flag of flags) {
      assert.ok(readme.includes(flag), `${program}: ${flag} is not in the README`);
    }
    for (const variable of new Set(text.match(/TCPNETLOCK_[A-Z_]+/g) ?? [])) {
      assert.ok(readme.includes(variable), `${program}: ${variable} is not in the README`);
    }
  }
});

Deno.test("README gives the two set-up commands, also in the zero-install form", async () => {
  const readme = await Deno.readTextFile(`${ROOT}README.md`);
  for (
    const line of [
      "deno task start",
      "deno task test",
      "npx -y deno@2.9.6 task start",
      "npx -y deno@2.9.6 task test",
    ]
  ) {
    assert.ok(readme.includes(line), line);
  }
  const ci = await Deno.readTextFile(`${ROOT}.ci/run`);
  assert.match(ci, /deno task test/, ".ci/run runs the README's test command");
});
