/**
 * `deno install` of each program from a checkout, and `--help` naming the installed command; and
 * the client's module graph: importing the package root pulls no server, logging or etcd code.
 */

import assert from "node:assert/strict";
import { ROOT } from "./test_util.ts";

const decoder = new TextDecoder();

async function run(cmd: string, args: string[], vars: Record<string, string> = {}) {
  const out = await new Deno.Command(cmd, { args, env: vars, stdout: "piped", stderr: "piped" })
    .output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** The three installed commands, as the README installs them. */
const PROGRAMS = [
  { name: "tnl-do", file: "do.ts", usage: /^Usage: tnl-do \[options\] NAME -- command/m },
  { name: "tnl", file: "client.ts", usage: /^Usage: tnl \[OPTIONS\] COMMAND/m },
  { name: "tnl-server", file: "server.ts", usage: /^Usage: tnl-server \[options\]/m },
];

Deno.test("install: deno install -g of tnl-do, tnl and tnl-server works; --help names the command", async () => {
  const root = await Deno.makeTempDir();
  try {
    const vars = { DENO_INSTALL_ROOT: root, PATH: `${root}/bin:${Deno.env.get("PATH")}` };
    for (const p of PROGRAMS) {
      // The README's line: deno install -g -A -n NAME FILE -- --prog-name NAME
      const install = await run(
        Deno.execPath(),
        ["install", "-g", "-A", "-n", p.name, `${ROOT}${p.file}`, "--", "--prog-name", p.name],
        vars,
      );
      assert.equal(install.code, 0, install.stderr);
      const help = await run(`${root}/bin/${p.name}`, ["--help"], vars);
      assert.equal(help.code, 0, help.stderr);
      assert.match(help.stdout, p.usage, p.name);
      assert.doesNotMatch(help.stdout, /deno run -A/, `${p.name} --help names itself`);
    }
    // Usage errors name the installed command too.
    const bad = await run(`${root}/bin/tnl-do`, ["--bogus"], vars);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /^tnl-do: /);
    assert.match(bad.stderr, /Run "tnl-do --help"/);
    const typo = await run(`${root}/bin/tnl`, ["lcoks"], vars);
    assert.equal(typo.code, 2);
    assert.match(typo.stderr, /unknown command "lcoks", did you mean "locks"\?/);
    assert.match(typo.stderr, /Run "tnl --help"/);
    assert.ok(typo.stderr.split("\n").length <= 3, "a short message, not the whole help");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("client module graph: mod.ts and client.ts load no server, logging or etcd code", async () => {
  for (const entry of ["mod.ts", "client.ts"]) {
    const out = await run(Deno.execPath(), ["info", "--json", `${ROOT}${entry}`]);
    assert.equal(out.code, 0, out.stderr);
    const graph = JSON.parse(out.stdout) as { modules: { specifier: string; size?: number }[] };
    const specifiers = graph.modules.map((m) => m.specifier);
    for (const s of specifiers) {
      assert.doesNotMatch(
        s,
        /logtape|^npm:|\/lib\/log\.ts$|\/lib\/etcd|\/lib\/server\.ts$|\/lib\/store\//,
        `${entry} pulls ${s}`,
      );
      assert.ok(s.startsWith("file:") || s.startsWith("node:"), `${entry}: ${s}`);
    }
    const size = graph.modules.reduce((sum, m) => sum + (m.size ?? 0), 0);
    assert.ok(size < 150_000, `${entry}: ${size} bytes of modules`);
  }
});
