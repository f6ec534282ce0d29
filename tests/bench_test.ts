/**
 * The benchmark runs end to end: `bench/bench.ts --quick` against the real server (a subprocess)
 * and the floor server completes, reports every scenario and counts no error. Timings are not
 * asserted: on a shared machine they are noise.
 */

import { ROOT } from "./test_util.ts";

const SCENARIOS = [
  "cycles",
  "handover",
  "held",
  "ready",
  "do",
  "etcd",
  "flood",
  "sessions",
  "longline",
];

interface ScenarioReport {
  skipped?: string;
  errors: { ours: number | null; floor: number | null };
  runs: unknown[];
}

interface Level {
  cycles: number;
  seconds: number;
  rate: number;
  sliceRates?: number[];
}

interface Report {
  errors: { ours: number; floor: number };
  rows: { scenario: string; metric: string; ours: number | null; floor: number | null }[];
  scenarios: Record<string, ScenarioReport>;
}

Deno.test("bench --quick runs every scenario against the server and the floor without errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "tcpnetlock-bench-" });
  const out = `${dir}/bench.json`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 120_000);
  try {
    const result = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "bench/bench.ts", "--quick", "--out", out],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: abort.signal,
    }).output();
    const decoder = new TextDecoder();
    const said = `${decoder.decode(result.stdout)}\n${decoder.decode(result.stderr)}`;
    if (!result.success) {
      throw new Error(`bench/bench.ts --quick exited with code ${result.code}:\n${said}`);
    }
    const report: Report = JSON.parse(await Deno.readTextFile(out));
    for (const name of SCENARIOS) {
      const scenario = report.scenarios[name];
      if (scenario === undefined) throw new Error(`Scenario "${name}" missing:\n${said}`);
      if (scenario.skipped) continue;
      // `null`: not measured for that server (the do scenario has no floor).
      if (scenario.errors.ours !== 0 || (scenario.errors.floor ?? 0) !== 0) {
        throw new Error(
          `Scenario "${name}" counted errors: ${JSON.stringify(scenario.errors)}\n` +
            JSON.stringify(scenario.runs, null, 2).slice(0, 4000),
        );
      }
    }
    if (report.errors.ours !== 0 || report.errors.floor !== 0) {
      throw new Error(`Errors counted: ${JSON.stringify(report.errors)}`);
    }
    // Every measured figure is there, for both servers.
    // The C generator is used where a C compiler is (CI has one): its CPU and the server's are
    // reported, and the generator check ran.
    for (
      const name of [
        "cycles/s, 16 clients",
        "generator CPU (% of a core), 16 clients",
        "server CPU (% of a core), 16 clients",
        "generator check",
        "hand-over generator CPU",
        "hand-over server CPU",
        "memory per held lock",
        "process start",
        "RSS after",
        "session cycles/s, 16 lockers",
        "session generator CPU (% of a core), 16 lockers",
        "session server CPU (% of a core), 16 lockers",
        "session generator check",
        ".ping p99 during",
      ]
    ) {
      const row = report.rows.find((r) => r.metric.startsWith(name));
      if (!row || row.ours === null || row.floor === null) {
        throw new Error(`Row "${name}" has no figures: ${JSON.stringify(row)}`);
      }
    }
    // The C generator's levels are measured in alternating slices (two with --quick), merged: the
    // rate is the slices' cycles over their seconds, and each slice's rate is kept.
    for (const name of ["cycles", "sessions"]) {
      const run = report.scenarios[name].runs[0] as Record<string, unknown>;
      const pair = (name === "cycles" ? run : run.cycles) as Record<string, Level[] | null>;
      for (const label of ["ours", "floor"]) {
        for (const level of pair[label] ?? []) {
          if (level.sliceRates?.length !== 2) {
            throw new Error(`${name} ${label}: not two slices: ${JSON.stringify(level)}`);
          }
          const expected = Math.round(level.cycles / level.seconds);
          if (level.rate !== expected || Math.abs(level.seconds - 0.3) > 1e-9) {
            throw new Error(`${name} ${label}: slices not merged: ${JSON.stringify(level)}`);
          }
        }
      }
    }
    if (!report.scenarios.etcd.skipped) {
      const row = report.rows.find((r) => r.metric.includes("bare etcd txn"));
      if (!row || row.ours === null || row.floor === null) {
        throw new Error(`The etcd floor row has no figures: ${JSON.stringify(row)}`);
      }
    }
  } finally {
    clearTimeout(timer);
    await Deno.remove(dir, { recursive: true });
  }
});
