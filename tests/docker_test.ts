/**
 * The Dockerfile and the Docker and Kubernetes sections of docs/deploy.md, checked on paper (no Docker
 * engine here): every file, flag and variable they name exists, the image's commands work when run
 * as they are written, and the Kubernetes YAML parses and hangs together.
 */

import assert from "node:assert/strict";
import { parseAllDocuments } from "npm:yaml@2.8.1";
import { ROOT } from "./test_util.ts";

interface Instruction {
  keyword: string;
  args: string;
}

/** The Dockerfile's instructions: comments dropped, continuation lines joined. */
function dockerfile(): Instruction[] {
  const text = Deno.readTextFileSync(`${ROOT}Dockerfile`);
  const lines = text.split("\n").filter((l) => !/^\s*#/.test(l));
  const joined = lines.join("\n").replace(/\\\n/g, " ");
  return joined.split("\n").filter((l) => l.trim() !== "").map((l) => {
    const m = /^\s*(\w+)\s+(.*)$/.exec(l);
    assert.ok(m, `not an instruction: ${l}`);
    return { keyword: m[1].toUpperCase(), args: m[2].trim() };
  });
}

function only(instructions: Instruction[], keyword: string): Instruction {
  const found = instructions.filter((i) => i.keyword === keyword);
  assert.equal(found.length, 1, `one ${keyword} expected`);
  return found[0];
}

/** An exec-form command (`["deno", "run", ...]`), the form that gets signals. */
function execForm(args: string): string[] {
  assert.match(args, /^\[/, `not in exec form: ${args}`);
  const argv = JSON.parse(args);
  assert.ok(Array.isArray(argv) && argv.every((a) => typeof a === "string"), args);
  return argv;
}

/** `deno run [deno flags] SCRIPT [args]`, split. */
function denoRun(argv: string[]): { denoFlags: string[]; script: string; args: string[] } {
  assert.deepEqual(argv.slice(0, 2), ["deno", "run"], argv.join(" "));
  const at = argv.findIndex((a, i) => i >= 2 && !a.startsWith("-"));
  assert.ok(at > 0, `no script in ${argv.join(" ")}`);
  return { denoFlags: argv.slice(2, at), script: argv[at], args: argv.slice(at + 1) };
}

async function run(args: string[]): Promise<{ code: number; out: string }> {
  const o = await new Deno.Command(Deno.execPath(), { args, cwd: ROOT, stdin: "null" }).output();
  const d = new TextDecoder();
  return { code: o.code, out: d.decode(o.stdout) + d.decode(o.stderr) };
}

const helpCache = new Map<string, string>();
async function help(script: string): Promise<string> {
  if (!helpCache.has(script)) {
    const { code, out } = await run(["run", "-A", `${ROOT}${script}`, "--help"]);
    assert.equal(code, 0, out);
    helpCache.set(script, out);
  }
  return helpCache.get(script)!;
}

/** Whether `.dockerignore` lets `path` into the build context (later patterns win, `!` keeps). */
function inContext(path: string): boolean {
  const patterns = Deno.readTextFileSync(`${ROOT}.dockerignore`).split("\n")
    .map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
  let included = true;
  for (const raw of patterns) {
    const keep = raw.startsWith("!");
    const pattern = raw.replace(/^!/, "").replace(/^\/|\/$/g, "");
    const re = new RegExp(
      "^" + pattern.split("*").map((p) => p.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join("[^/]*") +
        "(/.*)?$",
    );
    if (re.test(path)) included = keep;
  }
  return included;
}

Deno.test("docker: pinned base image, non-root user, port 7654, exec-form CMD and HEALTHCHECK", () => {
  const ins = dockerfile();
  const from = only(ins, "FROM").args;
  const ciVersion = /DENO_VERSION=(\S+)/.exec(Deno.readTextFileSync(`${ROOT}.ci/run`))?.[1];
  assert.equal(from, `denoland/deno:${ciVersion}`, "the image's deno is the one CI tests with");
  const user = ins.findLast((i) => i.keyword === "USER")?.args;
  assert.ok(user !== undefined && user !== "root" && user !== "0", `USER ${user}`);
  assert.ok(
    ins.findIndex((i) => i.keyword === "USER") < ins.findIndex((i) => i.keyword === "CMD"),
    "USER before CMD",
  );
  assert.match(only(ins, "EXPOSE").args, /^7654(\/tcp)?$/);
  execForm(only(ins, "CMD").args);
  assert.match(only(ins, "HEALTHCHECK").args, /\bCMD\s+\[/);
});

Deno.test("docker: CMD, HEALTHCHECK, RUN and ENV name files, flags and variables that exist", async () => {
  const ins = dockerfile();
  const denoRunHelp = (await run(["run", "--help"])).out;

  const cmd = denoRun(execForm(only(ins, "CMD").args));
  const health = denoRun(execForm(only(ins, "HEALTHCHECK").args.replace(/^.*?\bCMD\s+/, "")));
  for (const { denoFlags, script, args } of [cmd, health]) {
    assert.ok((await Deno.stat(`${ROOT}${script}`)).isFile, script);
    assert.ok(inContext(script), `.dockerignore keeps out ${script}`);
    for (const flag of denoFlags) {
      assert.ok(denoRunHelp.includes(flag.split("=")[0]), `deno run has no ${flag}`);
    }
    const text = await help(script);
    for (const arg of args) {
      if (arg.startsWith("--")) assert.match(text, new RegExp(`${arg}\\b`), `${script}: ${arg}`);
    }
  }
  assert.equal(cmd.script, "server.ts");
  assert.deepEqual([health.script, health.args], ["client.ts", ["ping"]]);
  assert.match(await help("client.ts"), /^\s+ping\b/m);

  // The variables it sets are the server's (or deno's).
  const serverHelp = await help("server.ts");
  const env = ins.filter((i) => i.keyword === "ENV").flatMap((i) => i.args.split(/\s+/));
  const names = env.map((kv) => kv.split("=")[0]);
  assert.ok(names.includes("TCPNETLOCK_LISTEN"));
  assert.ok(env.includes("TCPNETLOCK_LISTEN=0.0.0.0"), "listens on every address");
  for (const name of names.filter((n) => n.startsWith("TCPNETLOCK_"))) {
    assert.ok(serverHelp.includes(`[${name}]`), `server.ts --help has no ${name}`);
  }

  // deno cache at build time names files that are in the build context.
  const cache = ins.find((i) => i.keyword === "RUN" && /\bdeno cache\b/.test(i.args));
  assert.ok(cache, "dependencies are cached at build time");
  const files = cache.args.split(/\s+/).filter((a) => a.endsWith(".ts"));
  assert.ok(files.includes("server.ts") && files.includes(health.script));
  for (const f of files) {
    assert.ok((await Deno.stat(`${ROOT}${f}`)).isFile, f);
    assert.ok(inContext(f), `.dockerignore keeps out ${f}`);
  }
});

Deno.test("docker: .dockerignore keeps every module the server and client load, and no tests", async () => {
  const { code, out } = await run(["info", "--json", "server.ts"]);
  assert.equal(code, 0, out);
  const graph = JSON.parse(out.slice(out.indexOf("{")));
  const local = (graph.modules as { specifier: string }[])
    .map((m) => m.specifier)
    .filter((s) => s.startsWith(`file://${ROOT}`))
    .map((s) => s.slice(`file://${ROOT}`.length));
  assert.ok(local.includes("lib/server.ts"), local.join(" "));
  for (const f of [...local, "client.ts", "lib/client_cli.ts", "deno.json", "deno.lock"]) {
    assert.ok(inContext(f), `.dockerignore keeps out ${f}`);
  }
  for (const f of ["tests/do_test.ts", "bench/bench.ts", ".git/HEAD", "README.md"]) {
    assert.ok(!inContext(f), `${f} should stay out of the image`);
  }
});

Deno.test("docker: the CMD as written serves, the HEALTHCHECK passes, SIGTERM exits 0", async () => {
  const ins = dockerfile();
  const env: Record<string, string> = {};
  for (const kv of ins.filter((i) => i.keyword === "ENV").flatMap((i) => i.args.split(/\s+/))) {
    const [k, v] = kv.split("=");
    env[k] = v;
  }
  // As in the image, but on a free loopback port.
  env.TCPNETLOCK_LISTEN = "127.0.0.1";
  env.TCPNETLOCK_PORT = "0";
  const cmd = execForm(only(ins, "CMD").args);
  const server = new Deno.Command(Deno.execPath(), {
    args: cmd.slice(1),
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let log = "";
  const reader = server.stderr.pipeThrough(new TextDecoderStream()).getReader();
  try {
    while (!/listening on .*:(\d+)/.test(log)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the server ended:\n${log}`);
      log += value;
    }
    const port = /listening on .*:(\d+)/.exec(log)![1];
    const health = execForm(only(ins, "HEALTHCHECK").args.replace(/^.*?\bCMD\s+/, ""));
    const check = await new Deno.Command(Deno.execPath(), {
      args: health.slice(1),
      cwd: ROOT,
      env: { ...env, TCPNETLOCK_PORT: port },
      stdin: "null",
    }).output();
    assert.equal(check.code, 0, new TextDecoder().decode(check.stderr));
    server.kill("SIGTERM");
    assert.equal((await server.status).code, 0);
  } finally {
    try {
      server.kill("SIGKILL");
    } catch {
      // ended
    }
    await server.status;
    await reader.cancel().catch(() => {});
  }
});

/** The text of a `## Title` section of docs/deploy.md. */
function section(readme: string, title: string): string {
  const start = readme.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `docs/deploy.md has no "## ${title}"`);
  const end = readme.indexOf("\n## ", start + 1);
  const text = readme.slice(start, end < 0 ? undefined : end);
  assert.doesNotMatch(text, /<!--(?! doc-test: )/, `"## ${title}" is still a placeholder`);
  return text;
}

Deno.test("docker: the README shows docker build and docker run", () => {
  const readme = Deno.readTextFileSync(`${ROOT}docs/deploy.md`);
  const docker = section(readme, "Docker");
  assert.match(docker, /^docker build -t (\S+) \.$/m);
  const tag = /^docker build -t (\S+) \.$/m.exec(docker)![1];
  assert.match(docker, new RegExp(`^docker run .*-p 7654:7654 .*${tag}$`, "m"));
});

Deno.test("docker: the README's Kubernetes YAML parses and hangs together", async () => {
  const readme = Deno.readTextFileSync(`${ROOT}docs/deploy.md`);
  const k8s = section(readme, "Kubernetes");
  const blocks = [...k8s.matchAll(/```yaml\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.ok(blocks.length > 0, "no yaml block");
  // deno-lint-ignore no-explicit-any
  const docs: any[] = [];
  for (const block of blocks) {
    for (const doc of parseAllDocuments(block)) {
      assert.deepEqual(doc.errors.map((e) => e.message), []);
      docs.push(doc.toJS());
    }
  }
  const byKind = (kind: string) => {
    const found = docs.filter((d) => d?.kind === kind);
    assert.equal(found.length, 1, `one ${kind}`);
    return found[0];
  };
  for (const d of docs) {
    assert.equal(typeof d.apiVersion, "string");
    assert.equal(typeof d.metadata?.name, "string");
  }
  const deployment = byKind("Deployment");
  const service = byKind("Service");
  const job = byKind("Job");

  // One server, never two at once.
  assert.equal(deployment.spec.replicas, 1);
  assert.equal(deployment.spec.strategy?.type, "Recreate");
  const labels = deployment.spec.template.metadata.labels;
  for (const [k, v] of Object.entries(deployment.spec.selector.matchLabels)) {
    assert.equal(labels[k], v, "the selector matches the pod template");
  }
  for (const [k, v] of Object.entries(service.spec.selector)) {
    assert.equal(labels[k], v, "the Service selects the server's pods");
  }
  const server = deployment.spec.template.spec.containers[0];
  const lockPort = server.ports.find((p: { containerPort: number }) => p.containerPort === 7654);
  assert.ok(lockPort, "the container exposes 7654");
  const target = service.spec.ports[0].targetPort;
  assert.ok(target === 7654 || target === lockPort.name, `targetPort ${target}`);

  // The variables and the probes' port exist.
  const serverHelp = await help("server.ts");
  const doHelp = await help("do.ts");
  const envNames = (c: { env?: { name: string }[] }) => (c.env ?? []).map((e) => e.name);
  for (const name of envNames(server)) {
    assert.ok(
      serverHelp.includes(`[${name}]`) || name === "TCPNETLOCK_AUTH_TOKEN",
      `server.ts knows no ${name}`,
    );
  }
  const http = server.env?.find((e: { name: string }) => e.name === "TCPNETLOCK_HTTP_LISTEN");
  if (server.readinessProbe?.httpGet) {
    assert.ok(http, "HTTP probes need TCPNETLOCK_HTTP_LISTEN");
    const probePort = server.readinessProbe.httpGet.port;
    const portOf = server.ports.find((p: { name?: string }) => p.name === probePort);
    assert.equal(`:${portOf?.containerPort ?? probePort}`, http.value.replace(/^[^:]*/, ""));
  }

  // The Job runs its command through do.ts (or the shell helper), against the Service.
  const migrate = job.spec.template.spec.containers[0];
  const argv: string[] = [...(migrate.command ?? []), ...(migrate.args ?? [])].map(String);
  const text = argv.join(" ");
  assert.ok(/\bjsr:@x\/tcpnetlock\/do\b|\bdo\.ts\b|\brun_with_lock\b/.test(text), text);
  for (const arg of argv.slice(0, argv.indexOf("--"))) {
    if (arg.startsWith("--")) assert.match(doHelp, new RegExp(`${arg}\\b`), `do.ts: ${arg}`);
  }
  for (const name of envNames(migrate)) {
    assert.ok(doHelp.includes(name), `do.ts knows no ${name}`);
  }
  const host = migrate.env.find((e: { name: string }) => e.name === "TCPNETLOCK_HOST")?.value;
  assert.equal(host, service.metadata.name);
});
