/**
 * Every fenced block of README.md and docs/*.md is run or parsed.
 *
 * The line before a fence may say how: `<!-- doc-test: run -->` runs the block (shell with bash
 * under `set -euo pipefail`, TypeScript with `deno run`) from the checkout, against a test server
 * whose port replaces 7654, with the installed commands going to a temporary DENO_INSTALL_ROOT;
 * `<!-- doc-test: parse -->` (also the default) parses it: bash syntax plus every `--flag` given
 * to one of our programs exists in that program's `--help`; TypeScript type-checks; YAML parses,
 * and each Kubernetes container's command line is resolved the way the `denoland/deno` image's
 * entrypoint does it and must run; JSON parses; protocol transcripts are protocol lines.
 */

import assert from "node:assert/strict";
import { parseAllDocuments } from "npm:yaml@2.8.1";
import { ROOT, startTestServer } from "./test_util.ts";

const decoder = new TextDecoder();

interface Block {
  file: string;
  line: number;
  lang: string;
  mode: "run" | "parse";
  text: string;
}

/** The markdown files whose blocks are checked. */
function docFiles(): string[] {
  const files = ["README.md"];
  for (const entry of Deno.readDirSync(`${ROOT}docs`)) {
    if (entry.isFile && entry.name.endsWith(".md")) files.push(`docs/${entry.name}`);
  }
  return files.sort();
}

/** The fenced blocks of a markdown text, with the mode their marker (or the default) gives. */
export function blocksOf(file: string, markdown: string): Block[] {
  const lines = markdown.split("\n");
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\S*)\s*$/.exec(lines[i]);
    if (!open) continue;
    let end = i + 1;
    while (end < lines.length && !/^```\s*$/.test(lines[end])) end++;
    assert.ok(end < lines.length, `${file}:${i + 1}: unclosed code block`);
    let prev = i - 1;
    while (prev >= 0 && lines[prev].trim() === "") prev--;
    const marker = /^<!-- doc-test: (run|parse) -->$/.exec(lines[prev] ?? "");
    blocks.push({
      file,
      line: i + 1,
      lang: open[1],
      mode: (marker?.[1] ?? "parse") as "run" | "parse",
      text: lines.slice(i + 1, end).join("\n") + "\n",
    });
    i = end;
  }
  return blocks;
}

function allBlocks(): Block[] {
  return docFiles().flatMap((f) => blocksOf(f, Deno.readTextFileSync(`${ROOT}${f}`)));
}

async function run(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; cwd?: string; stdin?: string } = {},
) {
  const child = new Deno.Command(cmd, {
    args,
    env: options.env,
    cwd: options.cwd ?? ROOT,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(options.stdin));
    await writer.close();
  }
  const out = await child.output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

const helpCache = new Map<string, Promise<string>>();
/** `--help` of one of our programs. */
function help(program: string): Promise<string> {
  let text = helpCache.get(program);
  if (text === undefined) {
    text = run(Deno.execPath(), ["run", "-A", `${ROOT}${program}`, "--help"]).then((o) =>
      o.stdout + o.stderr
    );
    helpCache.set(program, text);
  }
  return text;
}

/** Which of our programs a shell line runs, if any. */
function programOf(line: string): string | undefined {
  if (/\bdo\.ts\b|\btnl-do\b|\brun_with_lock\b/.test(line)) return "do.ts";
  if (/\bserver\.ts\b|\btnl-server\b/.test(line)) return "server.ts";
  if (/\bclient\.ts\b|(^|\s)tnl\s/.test(line)) return "client.ts";
  return undefined;
}

/** The `--flags` a shell line gives our program (before its `--`), and deno's own left out. */
function flagsOf(line: string): string[] {
  const code = line.replace(/\s#.*$/, "");
  const words = code.split(/\s+/);
  const flags: string[] = [];
  let ours = false;
  for (const word of words) {
    if (word === "--") break;
    if (/\.ts$|^tnl(-do|-server)?$|^run_with_lock$/.test(word)) {
      ours = true;
      continue;
    }
    if (ours && /^--[a-z][a-z0-9-]*/.test(word)) flags.push(/^--[a-z][a-z0-9-]*/.exec(word)![0]);
  }
  return flags;
}

async function parseShell(block: Block): Promise<void> {
  const where = `${block.file}:${block.line}`;
  const syntax = await run("bash", ["-n"], { stdin: block.text });
  assert.equal(syntax.code, 0, `${where}: bash -n: ${syntax.stderr}`);
  // Join continued lines, then check the flags given to our programs.
  for (const line of block.text.replace(/\\\n/g, " ").split("\n")) {
    const program = programOf(line);
    if (program === undefined || /^\s*#/.test(line) || /\binstall\b/.test(line)) continue;
    const text = await help(program);
    for (const flag of flagsOf(line)) {
      assert.match(text, new RegExp(`${flag}\\b`), `${where}: ${program} has no ${flag}`);
    }
  }
}

/** A TypeScript sample as a file in the checkout (so that "./client.ts" resolves). */
async function tsFile(block: Block): Promise<string> {
  const path = `${ROOT}.doc_sample_${crypto.randomUUID().slice(0, 8)}.ts`;
  // A sample that imports the client by URL is checked against this checkout's client.
  const text = block.text.replace(
    /https:\/\/raw\.githubusercontent\.com\/[^"]*\/client\.ts/g,
    "./client.ts",
  );
  await Deno.writeTextFile(path, text);
  return path;
}

/** Runs `fn` with the environment of a run block: a test server, installs into a temporary root. */
async function withSandbox(
  fn: (env: Record<string, string>, port: number) => Promise<void>,
): Promise<void> {
  await using srv = await startTestServer({ hostname: "localhost" });
  const root = await Deno.makeTempDir();
  try {
    const clean: Record<string, string> = {};
    for (const name of Object.keys(Deno.env.toObject())) {
      if (name.startsWith("TCPNETLOCK_")) clean[name] = "";
    }
    const denoDir = Deno.execPath().replace(/\/[^/]*$/, "");
    const env = {
      ...clean,
      TCPNETLOCK_PORT: String(srv.port),
      TCPNETLOCK_DENO: Deno.execPath(),
      DENO_INSTALL_ROOT: root,
      PATH: `${root}/bin:${denoDir}:${Deno.env.get("PATH")}`,
      NO_COLOR: "1",
    };
    await fn(env, srv.port);
    // A run block leaves nothing held.
    assert.deepEqual(srv.server.locks().filter((l) => l.holders.length > 0), []);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

async function runBlock(block: Block): Promise<void> {
  const where = `${block.file}:${block.line}`;
  await withSandbox(async (env, port) => {
    if (block.lang === "sh" || block.lang === "bash") {
      const script = `set -euo pipefail\n${block.text.replaceAll("7654", String(port))}`;
      const out = await run("bash", ["-c", script, "doc-block"], { env });
      assert.equal(out.code, 0, `${where}: exit ${out.code}\n${out.stdout}\n${out.stderr}`);
    } else if (block.lang === "ts") {
      const path = await tsFile(block);
      try {
        const out = await run(Deno.execPath(), ["run", "-A", path], { env });
        assert.equal(out.code, 0, `${where}: exit ${out.code}\n${out.stdout}\n${out.stderr}`);
      } finally {
        await Deno.remove(path);
      }
    } else {
      assert.fail(`${where}: cannot run a "${block.lang}" block: mark it doc-test: parse`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: the denoland/deno image's entrypoint, emulated

/** Deno's subcommands: a first argument among them makes the image's entrypoint run deno. */
const DENO_SUBCOMMANDS = new Set([
  "add",
  "bench",
  "bundle",
  "cache",
  "check",
  "compile",
  "completions",
  "coverage",
  "doc",
  "eval",
  "fmt",
  "help",
  "info",
  "init",
  "install",
  "jupyter",
  "lint",
  "lsp",
  "outdated",
  "publish",
  "remove",
  "repl",
  "run",
  "serve",
  "task",
  "test",
  "types",
  "uninstall",
  "upgrade",
  "vendor",
]);

/** The CMD of this project's image, from the Dockerfile. */
function imageCmd(): string[] {
  const dockerfile = Deno.readTextFileSync(`${ROOT}Dockerfile`);
  const cmd = /^CMD (\[.*\])\s*$/m.exec(dockerfile);
  assert.ok(cmd, "the Dockerfile has an exec-form CMD");
  return JSON.parse(cmd[1]);
}

interface Container {
  name: string;
  image: string;
  command?: unknown[];
  args?: unknown[];
  env?: { name: string; value?: string }[];
}

/**
 * The argv a container runs, as Kubernetes and the image's entrypoint make it: `command` replaces
 * the entrypoint; otherwise `args` (else the image's CMD) goes to the entrypoint, which runs deno
 * with them when the first is a deno subcommand, and otherwise runs the first as a program.
 */
export function containerArgv(c: Container): string[] {
  if (c.command !== undefined) return [...c.command, ...(c.args ?? [])].map(String);
  const ours = /(^|\/)tcpnetlock[:@]/.test(c.image);
  const args = c.args?.map(String) ?? (ours ? imageCmd() : undefined);
  assert.ok(args, `container ${c.name}: image ${c.image} has no known CMD: give command:`);
  return DENO_SUBCOMMANDS.has(args[0]) ? ["deno", ...args] : args;
}

/** Checks that a container's command line runs: the program exists, the script and its flags. */
async function checkContainer(where: string, c: Container): Promise<void> {
  const argv = containerArgv(c);
  const program = argv[0];
  assert.ok(
    program === "deno" || program === "sh" || program === "bash" || program.startsWith("/"),
    `${where}: container ${c.name} would exec "${program}": ${program}: not found`,
  );
  if (program !== "deno") return;
  assert.ok(DENO_SUBCOMMANDS.has(argv[1]), `${where}: "deno ${argv[1]}" is no deno subcommand`);
  const scriptAt = argv.findIndex((a, i) => i > 1 && !a.startsWith("-"));
  const script = argv[scriptAt];
  // The image holds this checkout: at /app (WORKDIR of our image) or at /opt/tcpnetlock.
  const local = script.replace(/^\/opt\/tcpnetlock\//, "").replace(/^\/app\//, "");
  assert.ok(
    !/^(jsr|npm|https?):/.test(local),
    `${where}: ${c.name} runs "${script}", which is not published: use a file of the checkout`,
  );
  const path = `${ROOT}${local}`;
  assert.ok(
    (() => {
      try {
        return Deno.statSync(path).isFile;
      } catch {
        return false;
      }
    })(),
    `${where}: ${c.name}: no ${local} in the checkout`,
  );
  const rest = argv.slice(scriptAt + 1);
  if (local === "server.ts") {
    // Every flag must be known: the server checks them all before it answers --help.
    const out = await run(Deno.execPath(), ["run", "-A", path, ...rest, "--help"]);
    assert.equal(out.code, 0, `${where}: ${c.name}: server.ts ${rest.join(" ")}: ${out.stderr}`);
  } else if (local === "do.ts") {
    // Run it for real against a test server, with the command after "--" replaced by true.
    const dash = rest.indexOf("--");
    const args = dash < 0 ? rest : [...rest.slice(0, dash), "--", "true"];
    await using srv = await startTestServer();
    const env: Record<string, string> = {};
    for (const e of c.env ?? []) env[e.name] = e.value ?? "from-a-secret";
    Object.assign(env, { TCPNETLOCK_HOST: "127.0.0.1", TCPNETLOCK_PORT: String(srv.port) });
    const out = await run(Deno.execPath(), ["run", "-A", path, ...args], { env });
    assert.equal(out.code, 0, `${where}: ${c.name}: do.ts ${args.join(" ")}: ${out.stderr}`);
  }
}

async function parseYaml(block: Block): Promise<void> {
  const where = `${block.file}:${block.line}`;
  for (const doc of parseAllDocuments(block.text)) {
    assert.deepEqual(doc.errors.map((e) => e.message), [], where);
    // deno-lint-ignore no-explicit-any
    const value = doc.toJS() as any;
    const containers: Container[] = value?.spec?.template?.spec?.containers ?? [];
    for (const c of containers) await checkContainer(where, c);
  }
}

/** A transcript of a netcat or telnet session: what the client writes are protocol requests. */
function parseText(block: Block): void {
  const where = `${block.file}:${block.line}`;
  assert.ok(block.text.trim() !== "", `${where}: empty block`);
  if (!/(\$ (nc|telnet) |\| nc )/.test(block.text)) return;
  for (const raw of block.text.split("\n")) {
    const line = raw.replace(/\s+<=.*$/, "").trim();
    if (line === "" || line.startsWith("$") || /^(Trying|Connected|Escape|Connection)/.test(line)) {
      continue;
    }
    assert.match(line, /^\.?[a-z][a-z-]*(,|$)/, `${where}: "${line}" is no protocol line`);
    if (line.startsWith("locks,")) JSON.parse(line.slice("locks,".length));
    if (line.startsWith("stats,")) JSON.parse(line.slice("stats,".length));
  }
}

async function parseBlock(block: Block): Promise<void> {
  const where = `${block.file}:${block.line}`;
  switch (block.lang) {
    case "sh":
    case "bash":
    case "shell":
      return await parseShell(block);
    case "ts":
    case "typescript":
    case "js":
    case "javascript": {
      const path = await tsFile(block);
      try {
        const out = await run(Deno.execPath(), ["check", path]);
        assert.equal(out.code, 0, `${where}: deno check: ${out.stderr}`);
      } finally {
        await Deno.remove(path);
      }
      return;
    }
    case "yaml":
    case "yml":
      return await parseYaml(block);
    case "json":
      JSON.parse(block.text);
      return;
    case "session":
      // Netcat transcripts of a session: tests/sessions_doc_test.ts replays each against a real
      // server and compares every reply; here, that the file is the one it reads.
      assert.equal(block.file, "docs/sessions.md", `${where}: session transcripts live there`);
      return;
    case "":
    case "text":
    case "txt":
    case "console":
    case "http":
    case "promql":
    case "dockerfile":
    case "diff":
      return parseText(block);
    default:
      assert.fail(`${where}: no test knows "${block.lang}" blocks`);
  }
}

// ---------------------------------------------------------------------------------------------

Deno.test("docs: README is a front door of at most 250 lines; every docs/ file is linked", () => {
  const readme = Deno.readTextFileSync(`${ROOT}README.md`);
  assert.ok(readme.split("\n").length <= 250, `README has ${readme.split("\n").length} lines`);
  const docs = docFiles().filter((f) => f.startsWith("docs/"));
  // The reference this README points to, and every other docs/ file linked from somewhere.
  for (
    const file of ["client", "do", "shell", "server", "deploy", "etcd", "operating"]
      .concat(["reliability", "performance", "exit-codes", "protocol"]).map((n) => `docs/${n}.md`)
  ) {
    assert.ok(readme.includes(`(${file})`), `README links ${file}`);
  }
  const texts = docs.map((f) => Deno.readTextFileSync(`${ROOT}${f}`));
  for (const file of docs) {
    const name = file.slice("docs/".length);
    assert.ok(
      readme.includes(`(${file})`) || texts.some((t) => t.includes(`(${name})`)),
      `nothing links ${file}`,
    );
  }
  for (const line of ["deno task start", "deno task test", "--allow-import"]) {
    assert.ok(
      readme.includes(line) || Deno.readTextFileSync(`${ROOT}docs/client.md`).includes(line),
      line,
    );
  }
});

Deno.test("docs: every block is run or parsed", async (t) => {
  const blocks = allBlocks();
  assert.ok(blocks.length > 20, `${blocks.length} blocks`);
  for (const block of blocks) {
    await t.step(
      `${block.file}:${block.line} (${block.lang || "text"}, ${block.mode})`,
      async () => {
        if (block.mode === "run") await runBlock(block);
        else await parseBlock(block);
      },
    );
  }
});

Deno.test("docs: the entrypoint rule catches args that the deno image would exec as a program", async () => {
  // The Kubernetes example of the etcd store as it was: args replacing the CMD, starting with a flag.
  const broken: Container = {
    name: "tcpnetlock",
    image: "tcpnetlock:latest",
    args: ["--listen", "0.0.0.0", "--store", "etcd"],
  };
  assert.deepEqual(containerArgv(broken).slice(0, 2), ["--listen", "0.0.0.0"]);
  await assert.rejects(checkContainer("test", broken), /exec "--listen": --listen: not found/);
  // A Job that runs the unpublished JSR module.
  const jsr: Container = {
    name: "migrate",
    image: "app:1",
    command: ["deno", "run", "-A", "jsr:@x/tcpnetlock/do", "db", "--", "true"],
  };
  await assert.rejects(checkContainer("test", jsr), /not published/);
  // The image's own CMD runs deno (not a subcommand, so exec'd as the program deno).
  assert.equal(
    containerArgv({ name: "s", image: "registry.example.com/tcpnetlock:0.2.0" })[0],
    "deno",
  );
  assert.deepEqual(containerArgv({ name: "s", image: "tcpnetlock:1", args: ["run", "x.ts"] }), [
    "deno",
    "run",
    "x.ts",
  ]);
});
