/**
 * Real etcd members for tests: one or three on loopback, on free ports, with temporary data
 * directories (on /dev/shm when there is one: etcd fsyncs every write).
 *
 * - {@linkcode startEtcd} runs members as children of the test: `await using etcd = await
 *   startEtcd({ members: 3 })`; disposing kills them and removes their data.
 * - {@linkcode sharedEtcd} starts one member per test process and leaves it running across
 *   tests (detached, so no test owns it as a resource); a watchdog shell kills it and removes its
 *   data once the test process is gone. `TCPNETLOCK_TEST_ETCD_ENDPOINTS` points at an etcd that
 *   is already running instead.
 *
 * The binary is `etcd` from the PATH, or `ETCD_BIN`. Debian and Ubuntu: `apt-get install
 * etcd-server`.
 *
 * @module
 */

/** One etcd member. */
export interface EtcdMember {
  name: string;
  clientUrl: string;
  peerUrl: string;
  dataDir: string;
  /** Its process while it runs. */
  child: Deno.ChildProcess | undefined;
}

/** Running etcd members. */
export interface EtcdCluster extends AsyncDisposable {
  /** The client URLs of every member. */
  endpoints: string[];
  members: EtcdMember[];
  /** Sends `signal` (default SIGKILL) to member `i` and waits for it to exit. */
  kill(i: number, signal?: Deno.Signal): Promise<void>;
  /** Starts member `i` again (same ports, same data) after `kill`; resolves once it is healthy. */
  restart(i: number): Promise<void>;
  /** The index of the current leader (asks the members that run). */
  leader(): Promise<number>;
  /** Resolves when every running member answers /health with true. */
  healthy(timeoutMs?: number): Promise<void>;
}

/** The etcd binary the tests run. */
export function etcdBinary(): string {
  return Deno.env.get("ETCD_BIN") ?? "etcd";
}

/** Is an etcd binary installed? */
export async function hasEtcd(): Promise<boolean> {
  try {
    const out = await new Deno.Command(etcdBinary(), {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    }).output();
    return out.success;
  } catch {
    return false;
  }
}

/** A free TCP port on 127.0.0.1 (listen on port 0, note it, close). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function tempDir(): Promise<string> {
  try {
    return await Deno.makeTempDir({ dir: "/dev/shm", prefix: "tcpnetlock-etcd-" });
  } catch {
    return await Deno.makeTempDir({ prefix: "tcpnetlock-etcd-" });
  }
}

function plan(count: number, root: string): { members: EtcdMember[]; args: string[][] } {
  const token = `tcpnetlock-test-${crypto.randomUUID().slice(0, 8)}`;
  const members: EtcdMember[] = [];
  const used = new Set<number>();
  const port = () => {
    for (;;) {
      const p = freePort();
      if (!used.has(p)) {
        used.add(p);
        return p;
      }
    }
  };
  for (let i = 0; i < count; i++) {
    members.push({
      name: `m${i}`,
      clientUrl: `http://127.0.0.1:${port()}`,
      peerUrl: `http://127.0.0.1:${port()}`,
      dataDir: `${root}/m${i}`,
      child: undefined,
    });
  }
  const initial = members.map((m) => `${m.name}=${m.peerUrl}`).join(",");
  const args = members.map((m) => [
    "--name",
    m.name,
    "--data-dir",
    m.dataDir,
    "--listen-client-urls",
    m.clientUrl,
    "--advertise-client-urls",
    m.clientUrl,
    "--listen-peer-urls",
    m.peerUrl,
    "--initial-advertise-peer-urls",
    m.peerUrl,
    "--initial-cluster",
    initial,
    "--initial-cluster-state",
    "new",
    "--initial-cluster-token",
    token,
    // Quick elections: a leader lost is replaced in about half a second.
    "--heartbeat-interval",
    "50",
    "--election-timeout",
    "500",
  ]);
  return { members, args };
}

/** Resolves when `url`/health says true; throws after `timeoutMs`. */
export async function waitHealthy(url: string, timeoutMs = 15_000): Promise<void> {
  const end = performance.now() + timeoutMs;
  let last = "";
  for (;;) {
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
      const body = await res.text();
      if (res.ok && /"health":\s*"true"/.test(body)) return;
      last = body;
    } catch (err) {
      last = String(err);
    }
    if (performance.now() > end) throw new Error(`etcd at ${url} not healthy: ${last}`);
    // Readiness of a process we started: polling is the only way to see it.
    await new Promise((r) => setTimeout(r, 50));
  }
}

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/**
 * Starts `members` etcd members (1 or 3) as children, each with `flags` added; resolves once all
 * are healthy.
 */
export async function startEtcd(
  options: { members?: number; flags?: string[] } = {},
): Promise<EtcdCluster> {
  const count = options.members ?? 1;
  const root = await tempDir();
  const { members, args: planned } = plan(count, root);
  const args = planned.map((a) => [...a, ...(options.flags ?? [])]);
  const statuses = new Map<number, Promise<Deno.CommandStatus>>();
  const spawn = (i: number) => {
    const cmd = [etcdBinary(), ...args[i]].map(shellQuote).join(" ");
    const child = new Deno.Command("sh", {
      args: ["-c", `exec ${cmd} >>${shellQuote(`${root}/m${i}.log`)} 2>&1`],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    members[i].child = child;
    statuses.set(i, child.status);
    // For the watchdog (below): `exec` made the shell's pid etcd's.
    Deno.writeTextFileSync(`${root}/m${i}.pid`, String(child.pid));
  };
  const kill = async (i: number, signal: Deno.Signal = "SIGKILL") => {
    const child = members[i].child;
    if (child === undefined) return;
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
    await statuses.get(i);
    members[i].child = undefined;
    await Deno.remove(`${root}/m${i}.pid`).catch(() => {});
  };
  const healthy = async (timeoutMs = 15_000) => {
    await Promise.all(
      members.filter((m) => m.child !== undefined).map((m) => waitHealthy(m.clientUrl, timeoutMs)),
    );
  };
  const dispose = async () => {
    for (let i = 0; i < members.length; i++) await kill(i);
    await Deno.remove(root, { recursive: true }).catch(() => {});
  };
  // Should this process die without disposing (SIGKILL, Deno.exit), a detached watchdog kills
  // the members it started (by the pids in their files) and removes their data.
  await new Deno.Command("sh", {
    args: [
      "-c",
      `( while kill -0 ${Deno.pid} 2>/dev/null; do sleep 1; done; ` +
      `for f in ${shellQuote(root)}/*.pid; do kill -9 "$(cat "$f")"; done; sleep 0.5; ` +
      `rm -rf ${shellQuote(root)} ) >/dev/null 2>&1 </dev/null &`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).output();
  try {
    for (let i = 0; i < count; i++) spawn(i);
    await healthy();
  } catch (err) {
    const logs = await Deno.readTextFile(`${root}/m0.log`).catch(() => "");
    await dispose();
    throw new Error(`${err instanceof Error ? err.message : err}\n${logs.slice(-2000)}`);
  }
  return {
    endpoints: members.map((m) => m.clientUrl),
    members,
    kill,
    healthy,
    async restart(i: number) {
      if (members[i].child !== undefined) return;
      spawn(i);
      await waitHealthy(members[i].clientUrl);
    },
    async leader() {
      for (let i = 0; i < members.length; i++) {
        if (members[i].child === undefined) continue;
        try {
          const res = await fetch(`${members[i].clientUrl}/v3/maintenance/status`, {
            method: "POST",
            body: "{}",
            signal: AbortSignal.timeout(1000),
          });
          const status = await res.json();
          const leader = String(status.leader);
          if (leader === "0" || leader === "undefined") continue;
          for (let j = 0; j < members.length; j++) {
            if (members[j].child === undefined) continue;
            const r = await fetch(`${members[j].clientUrl}/v3/maintenance/status`, {
              method: "POST",
              body: "{}",
              signal: AbortSignal.timeout(1000),
            });
            const s = await r.json();
            if (String(s.header.member_id) === leader) return j;
          }
        } catch {
          // this member does not answer: ask the next
        }
      }
      throw new Error("no etcd member knows a leader");
    },
    [Symbol.asyncDispose]: dispose,
  };
}

let shared: Promise<string[]> | undefined;

/**
 * The client URLs of one etcd member shared by every test of this process, started on first use
 * and killed (its data removed) by a watchdog once the process is gone.
 */
export function sharedEtcd(): Promise<string[]> {
  shared ??= (async () => {
    const given = Deno.env.get("TCPNETLOCK_TEST_ETCD_ENDPOINTS");
    if (given) return given.split(",").map((s) => s.trim()).filter((s) => s !== "");
    const root = await tempDir();
    const { members, args } = plan(1, root);
    const cmd = [etcdBinary(), ...args[0]].map(shellQuote).join(" ");
    const log = shellQuote(`${root}/m0.log`);
    // etcd in the background with its output in a file; a watchdog that kills it and removes
    // its data once this process is gone; the shell prints etcd's pid and exits.
    const script = `${cmd} >${log} 2>&1 </dev/null &
e=$!
( while kill -0 ${Deno.pid} 2>/dev/null; do sleep 1; done; kill -9 $e; sleep 0.5; rm -rf ${
      shellQuote(root)
    } ) >/dev/null 2>&1 </dev/null &
echo $e`;
    const out = await new Deno.Command("sh", {
      args: ["-c", script],
      stdin: "null",
      stdout: "piped",
      stderr: "null",
    }).output();
    const pid = Number(new TextDecoder().decode(out.stdout).trim());
    const stop = () => {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    };
    globalThis.addEventListener("unload", stop);
    try {
      await waitHealthy(members[0].clientUrl);
    } catch (err) {
      const logs = await Deno.readTextFile(`${root}/m0.log`).catch(() => "");
      throw new Error(`${err instanceof Error ? err.message : err}\n${logs.slice(-2000)}`);
    }
    return [members[0].clientUrl];
  })();
  return shared;
}
