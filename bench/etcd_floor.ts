#!/usr/bin/env -S deno run -A
/**
 * The etcd floor: what a lock+release cycle costs etcd itself, with no lock server in between.
 * Each of N concurrent workers, from this Deno process, over etcd's JSON gateway with the etcd
 * store's own HTTP/1.1 client (lib/etcd/http1.ts, the same way the store talks to etcd), runs
 * cycles of
 *
 * 1. one transaction that creates its key (compare: absent) attached to a lease, and
 * 2. one delete of the key,
 *
 * and the rate of cycles is printed as JSON. `bench/etcd_cycles.ts` runs it against the same etcd
 * in the same run as the etcd store, and prints the ratio.
 *
 * ```sh
 * deno run -A bench/etcd_floor.ts --endpoint http://127.0.0.1:2379 --clients 16 --duration-s 3
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { Http1Client } from "../lib/etcd/http1.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    endpoint: { type: "string", default: "http://127.0.0.1:2379" },
    clients: { type: "string", default: "16" },
    "duration-s": { type: "string", default: "3" },
    "warmup-s": { type: "string", default: "0.5" },
    prefix: { type: "string", default: "/etcd-floor" },
  },
});
const endpoint = values.endpoint.replace(/\/+$/, "");
const clients = Number(values.clients);
const durationMs = Number(values["duration-s"]) * 1000;
const warmupMs = Number(values["warmup-s"]) * 1000;
// The store's own HTTP/1.1 client (kept-alive connections, no fetch): the floor must not pay
// for a slower client than the store's.
const http = new Http1Client();

function b64(text: string): string {
  return btoa(text);
}

async function post(path: string, body: unknown): Promise<Record<string, unknown>> {
  const res = await http.post(endpoint, path, {}, JSON.stringify(body), 5000);
  const json = JSON.parse(res.body);
  if (res.status !== 200 || json.error !== undefined) {
    throw new Error(`${path}: ${JSON.stringify(json)}`);
  }
  return json;
}

const lease = String((await post("/v3/lease/grant", { TTL: "60" })).ID);
const start = performance.now();
const measureFrom = start + warmupMs;
const stopAt = measureFrom + durationMs;
let cycles = 0;
let errors = 0;
const samples: number[] = [];

async function worker(i: number): Promise<void> {
  const key = b64(`${values.prefix}/n${i}/k`);
  const value = b64(JSON.stringify({ owner: `w${i}`, limit: 1 }));
  while (performance.now() < stopAt) {
    const t0 = performance.now();
    try {
      const res = await post("/v3/kv/txn", {
        compare: [{ key, target: "CREATE", create_revision: "0", result: "EQUAL" }],
        success: [{ request_put: { key, value, lease } }],
        failure: [],
      });
      if (res.succeeded !== true) throw new Error("the key was there already");
      await post("/v3/kv/deleterange", { key });
    } catch {
      errors++;
      continue;
    }
    const t1 = performance.now();
    if (t0 >= measureFrom && t1 <= stopAt) {
      cycles++;
      samples.push(t1 - t0);
    }
  }
}

/** This process's CPU time in seconds (user + system), from /proc. */
function cpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

const cpu0 = cpuSeconds();
await Promise.all(Array.from({ length: clients }, (_, i) => worker(i)));
await post("/v3/lease/revoke", { ID: lease }).catch(() => {});
http.close();
samples.sort((a, b) => a - b);
const pct = (p: number) => samples.length === 0 ? 0 : samples[Math.floor((samples.length - 1) * p)];
console.log(JSON.stringify({
  clients,
  cycles,
  rate: Math.round(cycles / (durationMs / 1000)),
  p50: Math.round(pct(0.5) * 100) / 100,
  p99: Math.round(pct(0.99) * 100) / 100,
  errors,
  /** CPU this process used, as a share of one core over the run. */
  cpu: Math.round((cpuSeconds() - cpu0) / ((performance.now() - start) / 1000) * 100) / 100,
}));
