/**
 * shell/tcpnetlock.sh, sourced by real bash scripts under `set -euo pipefail`, against a real
 * server; and shellcheck on every shell file of the project.
 */

import assert from "node:assert/strict";
import { Program, RawClient, ROOT, startTestServer, type TestServer, until } from "./test_util.ts";

const HELPER = `${ROOT}shell/tcpnetlock.sh`;

/** The environment of a script: the test server, this deno, no TCPNETLOCK_* from the outside. */
function env(port: number, vars: Record<string, string> = {}): Record<string, string> {
  const clean: Record<string, string> = {};
  for (const name of Object.keys(Deno.env.toObject())) {
    if (name.startsWith("TCPNETLOCK_")) clean[name] = "";
  }
  return {
    ...clean,
    TCPNETLOCK_HOST: "127.0.0.1",
    TCPNETLOCK_PORT: String(port),
    TCPNETLOCK_DENO: Deno.execPath(),
    NO_COLOR: "1",
    ...vars,
  };
}

/** A bash script that sources the helper first, running, its output read as it comes. */
class Script extends Program {
  /**
   * @param body the script, after `set -euo pipefail` and sourcing the helper
   * @param vars its environment
   * @param name the lock it takes: what holds it is SIGKILLed at the end, should a test fail
   * @param helper the helper to source
   */
  constructor(
    body: string,
    vars: Record<string, string>,
    readonly name?: string,
    helper = HELPER,
  ) {
    super("bash", ["-c", `set -euo pipefail\nsource '${helper}'\n${body}\n`, "test-script"], {
      env: vars,
      stdin: true,
      label: "the script",
      timeoutMs: 15_000,
    });
  }

  /** Writes a line to the script's stdin. */
  async line(text = "go"): Promise<void> {
    await this.write(text + "\n");
  }

  protected override async cleanUp(): Promise<void> {
    await this.exited();
    if (this.name !== undefined) killLeftovers(this.name, this.child.pid);
  }
}

/** A lock name no other test uses, so that processes can be found by it. */
function uniqueName(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().slice(0, 8)}`;
}

/**
 * Pids of the live processes that hold or help hold lock `name` for the script `scriptPid`: the
 * do.ts started with `--lock-name NAME`, lock_in_bg's holder (`sh -c ... tcpnetlock-holder
 * SCRIPT_PID`) and whatever runs in the holder's process group (its `cat`).
 */
function holderProcesses(name: string, scriptPid?: number): number[] {
  const procs: { pid: number; pgrp: number; args: string[] }[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const args = Deno.readTextFileSync(`/proc/${entry.name}/cmdline`).split("\0");
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (state !== "Z") procs.push({ pid: Number(entry.name), pgrp: Number(pgrp), args });
    } catch {
      // gone meanwhile
    }
  }
  // sh -c SCRIPT NAME ARG: the holder and the watchdog (not the do.ts whose command line ends so).
  const shArg = (args: string[], name: string) =>
    /(^|\/)sh$/.test(args[0]) && args[1] === "-c" && args[3] === name ? args[4] : undefined;
  const self = ownGroup();
  const groups = new Set(
    procs.filter((p) => shArg(p.args, "tcpnetlock-holder") === String(scriptPid))
      .map((p) => p.pgrp).filter((g) => g > 1 && g !== self),
  );
  return procs.filter((p) =>
    p.pid !== Deno.pid && (
      (p.args.some((a) => a.endsWith("do.ts")) &&
        p.args.some((a, i) => a === "--lock-name" && p.args[i + 1] === name)) ||
      groups.has(p.pgrp) || groups.has(Number(shArg(p.args, "tcpnetlock-watchdog")))
    )
  ).map((p) => p.pid);
}

/** The process group of this test process (never to be signalled). */
function ownGroup(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
}

/** SIGKILLs what a failed test may have left running for lock `name`. */
function killLeftovers(name: string, scriptPid?: number): void {
  for (const pid of holderProcesses(name, scriptPid)) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
  }
}

function holders(srv: TestServer, name: string): number[] {
  return srv.server.locks().find((l) => l.name === name)?.holders.map((h) => h.token) ?? [];
}

async function holdRaw(port: number, name: string): Promise<RawClient> {
  const raw = await RawClient.connect(port);
  assert.equal(await raw.request(`lock,name:${name}`), "ok");
  return raw;
}

// ---------------------------------------------------------------------------------------------

Deno.test("shell: shellcheck finds nothing in any shell file of the project", async () => {
  const probe = await new Deno.Command("sh", { args: ["-c", "command -v shellcheck"] }).output();
  if (probe.code !== 0) {
    console.log("skipped: shellcheck is not installed (CI installs it)");
    return;
  }
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(`${ROOT}${dir}`)) {
      const path = `${dir}${entry.name}`;
      if (entry.isDirectory && ![".git", "node_modules", "bench"].includes(entry.name)) {
        walk(`${path}/`);
      } else if (entry.isFile) {
        const head = Deno.readTextFileSync(`${ROOT}${path}`).slice(0, 100);
        if (path.endsWith(".sh") || /^#!.*\b(ba)?sh\b/.test(head)) files.push(path);
      }
    }
  };
  walk("");
  assert.ok(files.includes("shell/tcpnetlock.sh"), files.join(" "));
  const out = await new Deno.Command("shellcheck", { args: files, cwd: ROOT }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, `shellcheck ${files.join(" ")}:\n${text}`);
});

Deno.test("shell: run_with_lock returns the command's exit code under set -e", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("rwl");
  await using s = new Script(
    `run_with_lock ${name} sh -c 'echo "in $TCPNETLOCK_LOCK_NAME"'
rc=0
run_with_lock ${name} sh -c 'exit 7' || rc=$?
echo "rc=$rc"
run_with_lock ${name} false
echo "not reached"`,
    env(srv.port),
  );
  const out = await s.output();
  assert.equal(out.code, 1, out.stderr); // set -e: the failed run_with_lock ends the script
  assert.equal(out.stdout, `in ${name}\nrc=7\n`);
});

Deno.test("shell: two run_with_lock on one name: the second gets 123, or waits with --wait", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("pair");
  try {
    const holder = `run_with_lock ${name} sh -c 'echo running; read -r _'\necho finished`;
    const other = `rc=0\nrun_with_lock ${name} echo ran || rc=$?\necho "rc=$rc"`;
    {
      await using first = new Script(holder, env(srv.port), name);
      await first.until((s) => s.stdout.includes("running"), "the first holds the lock");
      await using second = new Script(other, env(srv.port), name);
      const out = await second.output();
      assert.equal(out.code, 0, out.stderr);
      assert.equal(out.stdout, "rc=123\n");
      await first.line();
      assert.equal((await first.output()).stdout, "running\nfinished\n");
    }
    // TCPNETLOCK_DO_OPTS passes --wait: the second waits for the first, then runs.
    await using first = new Script(holder, env(srv.port), name);
    await first.until((s) => s.stdout.includes("running"), "the first holds the lock");
    await using second = new Script(
      other,
      env(srv.port, { TCPNETLOCK_DO_OPTS: "--wait 30" }),
      name,
    );
    await second.until((s) => s.stderr.includes("position 1"), "the second waits");
    await first.line();
    assert.equal((await first.output()).code, 0);
    const out = await second.output();
    assert.equal(out.stdout, "ran\nrc=0\n", out.stderr);
  } finally {
    killLeftovers(name);
  }
});

Deno.test("shell: lock_in_bg holds the lock with its token, release_lock gives it back", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("bg");
  try {
    await using s = new Script(
      `trap 'echo own-exit-trap' EXIT
lock_in_bg ${name}
echo "held $TCPNETLOCK_LOCK_NAME $TCPNETLOCK_FENCING_TOKEN"
read -r _
release_lock
echo "released \${TCPNETLOCK_LOCK_NAME-unset}"
trap -p EXIT
read -r _`,
      env(srv.port),
      name,
    );
    await s.until((x) => x.stdout.includes("held"), "the lock is held");
    const [, shownName, token] = s.stdout.trim().split(" ");
    assert.equal(shownName, name);
    assert.deepEqual(holders(srv, name), [Number(token)]);
    assert.equal(holderProcesses(name, s.child.pid).length > 0, true);
    await s.line();
    await s.until((x) => x.stdout.includes("released"), "release_lock returned");
    // Released before release_lock returned, and the holder is gone.
    assert.deepEqual(holders(srv, name), []);
    assert.deepEqual(holderProcesses(name, s.child.pid), []);
    await s.line();
    const out = await s.output();
    assert.equal(out.code, 0, out.stderr);
    // The script's own EXIT trap is back, and runs.
    assert.match(out.stdout, /released unset\ntrap -- 'echo own-exit-trap' EXIT\nown-exit-trap\n$/);
  } finally {
    killLeftovers(name);
  }
});

Deno.test("shell: lock_in_bg leaves the script with 123 when the lock is held elsewhere", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("taken");
  const raw = await holdRaw(srv.port, name);
  try {
    await using s = new Script(`lock_in_bg ${name}\necho "not reached"`, env(srv.port), name);
    const out = await s.output();
    assert.equal(out.code, 123, out.stderr);
    assert.equal(out.stdout, "");
    assert.match(out.stderr, /not granted/);
    assert.deepEqual(holderProcesses(name, s.child.pid), []);
  } finally {
    raw.close();
    killLeftovers(name);
  }
});

Deno.test("shell: a script killed by SIGTERM while holding leaves no lock and no process", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("term");
  try {
    await using s = new Script(
      `lock_in_bg ${name}\necho held\nread -r _\necho "not reached"`,
      env(srv.port),
      name,
    );
    await s.until((x) => x.stdout.includes("held"), "the lock is held");
    s.kill("SIGTERM");
    const out = await s.output();
    assert.equal(out.signal, "SIGTERM", out.stderr);
    assert.equal(out.stdout, "held\n");
    // The trap released the lock and waited for the holder before the script died.
    assert.deepEqual(holders(srv, name), []);
    assert.deepEqual(holderProcesses(name, s.child.pid), []);
  } finally {
    killLeftovers(name);
  }
});

Deno.test("shell: a script killed by SIGKILL while holding: the holder notices, frees the lock, exits", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("kill");
  try {
    await using s = new Script(`lock_in_bg ${name}\necho held\nread -r _`, env(srv.port), name);
    await s.until((x) => x.stdout.includes("held"), "the lock is held");
    s.kill("SIGKILL");
    await s.exited();
    // Nothing is left to tell: watch the server and the process table.
    await until(() => holders(srv, name).length === 0, "the lock to be freed", 10_000);
    await until(
      () => holderProcesses(name, s.child.pid).length === 0,
      "the holder to exit",
      10_000,
    );
  } finally {
    killLeftovers(name);
  }
});

Deno.test("shell: a script SIGKILLed while a child of it keeps running: the lock is freed all the same", async () => {
  await using srv = await startTestServer();
  const name = uniqueName("orphan");
  let orphan = 0;
  try {
    // The background sleep inherits the script's end of the pipe to the holder, and outlives it.
    await using s = new Script(
      `lock_in_bg ${name}\nsleep 60 >/dev/null 2>&1 &\necho "held $!"\nread -r _`,
      env(srv.port),
      name,
    );
    await s.until((x) => /held \d+/.test(x.stdout), "the lock is held");
    orphan = Number(/held (\d+)/.exec(s.stdout)![1]);
    s.kill("SIGKILL");
    await s.exited();
    await until(() => holders(srv, name).length === 0, "the lock to be freed", 10_000);
    await until(
      () => holderProcesses(name, s.child.pid).length === 0,
      "the holder and do.ts to exit",
      10_000,
    );
  } finally {
    killLeftovers(name);
    if (orphan > 1) {
      try {
        Deno.kill(orphan, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
});

Deno.test("shell: lock_in_bg without a name takes the script's name, as the original helper", async () => {
  await using srv = await startTestServer();
  const dir = await Deno.makeTempDir();
  try {
    const script = `${dir}/nightly.job.sh`;
    await Deno.writeTextFile(
      script,
      `set -euo pipefail\nsource '${HELPER}'\nlock_in_bg\necho "held $TCPNETLOCK_LOCK_NAME"\nrelease_lock\n`,
    );
    const out = await new Deno.Command("bash", {
      args: [script],
      env: env(srv.port),
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    assert.equal(text, "held nightly-job-sh\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shell: when lock_in_bg's lock is lost, the script leaves with 122", async () => {
  const srv = await startTestServer();
  const name = uniqueName("lost");
  try {
    await using s = new Script(
      `lock_in_bg ${name}\necho held\nwhile :; do sleep 0.05; done`,
      env(srv.port),
      name,
    );
    await s.until((x) => x.stdout.includes("held"), "the lock is held");
    await srv.server.close();
    const out = await s.output();
    assert.equal(out.code, 122, out.stderr);
    assert.match(out.stderr, new RegExp(`lost lock "${name}"`));
    assert.deepEqual(holderProcesses(name, s.child.pid), []);
  } finally {
    await srv.server.close();
    killLeftovers(name);
  }
});

Deno.test("shell: TCPNETLOCK_DENO and TCPNETLOCK_DO_OPTS; outside a checkout TCPNETLOCK_DO or tnl-do, else 127", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // A stand-in for deno that records its arguments, one per line.
    const fake = `${dir}/fake-deno`;
    await Deno.writeTextFile(fake, `#!/bin/sh\nprintf '%s\\n' "$@" > '${dir}/args'\nexit 9\n`, {
      mode: 0o755,
    });
    // Sourced from the checkout: the checkout's do.ts. IFS does not change the splitting, and a
    // glob stays a word.
    await using s = new Script(
      `IFS=$'\\n\\t'\nrc=0\nrun_with_lock job echo "a b" || rc=$?\necho "rc=$rc"`,
      env(1, { TCPNETLOCK_DENO: fake, TCPNETLOCK_DO_OPTS: " --wait  5\t--quiet *  " }),
    );
    const out = await s.output();
    assert.equal(out.stdout, "rc=9\n", out.stderr);
    assert.deepEqual((await Deno.readTextFile(`${dir}/args`)).trimEnd().split("\n"), [
      "run",
      "-A",
      Deno.realPathSync(`${ROOT}do.ts`),
      "--wait",
      "5",
      "--quiet",
      "*",
      "--lock-name",
      "job",
      "--",
      "echo",
      "a b",
    ]);
    // A copy of the helper away from the checkout: TCPNETLOCK_DO names do.ts or a command;
    // without it and without tnl-do on the PATH, a clear message and 127 (no module error).
    await Deno.copyFile(HELPER, `${dir}/tcpnetlock.sh`);
    const away = (vars: Record<string, string>, body = "run_with_lock job true") =>
      new Script(
        `rc=0\n${body} || rc=$?\necho "rc=$rc"`,
        env(1, { TCPNETLOCK_DENO: fake, PATH: "/usr/bin:/bin", ...vars }),
        undefined,
        `${dir}/tcpnetlock.sh`,
      );
    {
      await using copy = away({});
      const out = await copy.output();
      assert.equal(out.stdout, "rc=127\n");
      assert.match(out.stderr, /set TCPNETLOCK_DO/);
    }
    {
      await using copy = away({ TCPNETLOCK_DO: "/opt/tcpnetlock/do.ts" });
      assert.equal((await copy.output()).stdout, "rc=9\n");
      assert.deepEqual((await Deno.readTextFile(`${dir}/args`)).trimEnd().split("\n"), [
        "run",
        "-A",
        "/opt/tcpnetlock/do.ts",
        "--lock-name",
        "job",
        "--",
        "true",
      ]);
    }
    // An installed tnl-do, on the PATH or named; the original forms and --shared pass through.
    await Deno.mkdir(`${dir}/bin`);
    await Deno.copyFile(fake, `${dir}/bin/tnl-do`);
    await Deno.chmod(`${dir}/bin/tnl-do`, 0o755);
    for (
      const [body, args] of [
        ["run_with_lock job true", ["--lock-name", "job", "--", "true"]],
        ["run_with_lock --shared -w 5 job true", [
          "--shared",
          "-w",
          "5",
          "--lock-name",
          "job",
          "--",
          "true",
        ]],
        ["run_with_lock --lock-name job -- true", ["--lock-name", "job", "--", "true"]],
        ["run_with_lock --lock-name=job true", ["--lock-name=job", "--", "true"]],
      ] as const
    ) {
      await using copy = away({ PATH: `${dir}/bin:/usr/bin:/bin` }, body);
      assert.equal((await copy.output()).stdout, "rc=9\n", body);
      assert.deepEqual(
        (await Deno.readTextFile(`${dir}/args`)).trimEnd().split("\n"),
        [...args],
        body,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
