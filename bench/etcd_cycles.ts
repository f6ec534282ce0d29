#!/usr/bin/env -S deno run -A
/**
 * Lock+release cycles per second against `--store etcd`, compared with the etcd floor and the
 * memory store: the benchmark's `cycles` scenario (one connection per cycle, each client on its own
 * name, version 1 `lock` then `release`; from the C generator, bench/cgen.ts, when a C compiler is
 * there, else bench/load.ts `runCycles`) at 16 clients by default,
 * our server as a subprocess each time, etcd a real member (or three) on loopback with its data
 * on /dev/shm. The etcd floor (bench/etcd_floor.ts: one transaction that creates a key with a
 * lease, one delete, from Deno over the JSON gateway, as many workers as clients) runs against
 * the same etcd in the same run: `etcd / floor` is what the store costs beyond etcd itself.
 *
 * ```sh
 * deno run -A bench/etcd_cycles.ts                        # memory vs etcd, 16 clients
 * deno run -A bench/etcd_cycles.ts --servers 2            # also two servers sharing one etcd
 * deno run -A bench/etcd_cycles.ts --members 3 --clients 64 --duration-s 5
 * ```
 *
 * Prints one line per setup and the ratio etcd / memory; `--json` prints the figures as JSON.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type CyclesResult, runCycles } from "./load.ts";
import { buildCGen, type CGenResult, runCyclesC } from "./cgen.ts";
import { SERVER_V8_FLAGS } from "./bench.ts";
import { startEtcd } from "../tests/etcd_util.ts";
import { type ServerProcess, startServerProcess } from "../tests/test_util.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    clients: { type: "string", default: "16" },
    "duration-s": { type: "string", default: "3" },
    "warmup-s": { type: "string", default: "0.5" },
    members: { type: "string", default: "1" },
    servers: { type: "string", default: "1" },
    json: { type: "boolean", default: false },
  },
});
const clients = Number(values.clients);
const durationMs = Number(values["duration-s"]) * 1000;
const warmupMs = Number(values["warmup-s"]) * 1000;
const members = Number(values.members);
const serverCount = Number(values.servers);

const LIMITS = ["--max-connections", "100000", "--max-locks", "100000"];
/** The server as the benchmark runs it everywhere: its default logging, the same V8 flags. */
const AS_BENCHED = { quiet: true, denoFlags: SERVER_V8_FLAGS };

interface Row {
  setup: string;
  servers: number;
  clients: number;
  rate: number;
  p50: number;
  p99: number;
  errors: number;
  /**
   * The load generator's CPU in % of one core (for the floor: its own client's), and the
   * server's (null for the floor, or without the C generator).
   */
  generatorCpuPercent: number | null;
  serverCpuPercent: number | null;
}

/** The lean C generator when it can be built: it leaves the CPU to etcd and the server. */
const useC = (await buildCGen()) !== null;

/** Runs the cycles against each server at once, `clients` split between them; sums the rates. */
async function measure(setup: string, servers: ServerProcess[]): Promise<Row> {
  const share = Math.ceil(clients / servers.length);
  const results: (CyclesResult | CGenResult)[] = await Promise.all(
    servers.map((s, i) => {
      const options = {
        clients: Math.min(share, clients - i * share),
        durationMs,
        warmupMs,
        prefix: `${setup.replace(/[^a-zA-Z0-9]+/g, "_")}-s${i}`,
      };
      const target = { hostname: "127.0.0.1", port: s.port };
      return useC
        ? runCyclesC(target, { ...options, serverPid: s.child.pid })
        : runCycles(target, options);
    }),
  );
  const cpu = (key: "generatorCpuPercent" | "serverCpuPercent") =>
    results.every((r) => key in r && typeof (r as CGenResult)[key] === "number")
      ? Math.round(results.reduce((n, r) => n + ((r as CGenResult)[key] ?? 0), 0))
      : null;
  const row: Row = {
    setup,
    servers: servers.length,
    clients,
    rate: results.reduce((n, r) => n + r.rate, 0),
    p50: Math.max(...results.map((r) => r.latency.p50)),
    p99: Math.max(...results.map((r) => r.latency.p99)),
    errors: results.reduce((n, r) => n + r.errors.total, 0),
    generatorCpuPercent: cpu("generatorCpuPercent"),
    serverCpuPercent: cpu("serverCpuPercent"),
  };
  if (!values.json) {
    console.log(
      `${setup.padEnd(22)} servers ${row.servers}  clients ${row.clients}  ` +
        `${String(row.rate).padStart(6)} cycles/s  p50 ${row.p50} ms  p99 ${row.p99} ms  ` +
        `errors ${row.errors}  generator CPU ${row.generatorCpuPercent ?? "?"} %  ` +
        `server CPU ${row.serverCpuPercent ?? "?"} %`,
    );
  }
  return row;
}

const rows: Row[] = [];
{
  await using memory = await startServerProcess(LIMITS, AS_BENCHED);
  rows.push(await measure("memory", [memory]));
}
await using etcd = await startEtcd({ members });
const etcdFlags = ["--store", "etcd", "--etcd-endpoints", etcd.endpoints.join(",")];
{
  await using one = await startServerProcess(
    [...LIMITS, ...etcdFlags, "--etcd-prefix", "/b1"],
    AS_BENCHED,
  );
  rows.push(await measure(`etcd (${members} member${members > 1 ? "s" : ""})`, [one]));
}
if (serverCount > 1) {
  const servers: ServerProcess[] = [];
  try {
    for (let i = 0; i < serverCount; i++) {
      servers.push(
        await startServerProcess([...LIMITS, ...etcdFlags, "--etcd-prefix", "/b2"], AS_BENCHED),
      );
    }
    rows.push(await measure(`etcd, shared`, servers));
  } finally {
    for (const s of servers) await s.stop("SIGKILL");
  }
}
{
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("./etcd_floor.ts", import.meta.url).pathname,
      "--endpoint",
      etcd.endpoints[0],
      "--clients",
      String(clients),
      "--duration-s",
      String(durationMs / 1000),
      "--warmup-s",
      String(warmupMs / 1000),
    ],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const floor = JSON.parse(new TextDecoder().decode(out.stdout));
  const row: Row = {
    setup: "etcd floor",
    servers: 0,
    clients,
    rate: floor.rate,
    p50: floor.p50,
    p99: floor.p99,
    errors: floor.errors,
    generatorCpuPercent: Math.round(floor.cpu * 100),
    serverCpuPercent: null,
  };
  if (!values.json) {
    console.log(
      `${row.setup.padEnd(22)} servers 0  clients ${row.clients}  ` +
        `${String(row.rate).padStart(6)} cycles/s  p50 ${row.p50} ms  p99 ${row.p99} ms  ` +
        `errors ${row.errors}  (generator CPU ${floor.cpu})`,
    );
  }
  rows.push(row);
}
const floorRow = rows.find((r) => r.setup === "etcd floor")!;
const ratio = Math.round((rows[1].rate / rows[0].rate) * 1000) / 1000;
const ratioFloor = Math.round((rows[1].rate / floorRow.rate) * 1000) / 1000;
if (values.json) {
  console.log(
    JSON.stringify({ rows, ratio_etcd_to_memory: ratio, ratio_etcd_to_floor: ratioFloor }, null, 2),
  );
} else {
  console.log(`ratio etcd / memory at ${clients} clients: ${ratio}`);
  console.log(`ratio etcd / etcd floor at ${clients} clients: ${ratioFloor}`);
}
