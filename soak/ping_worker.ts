/**
 * A `.ping` prober in its own thread (a Worker), so that the latencies it measures are the
 * server's, not those of the soak's own busy event loop. Messages in: `{ port, everyMs }` to
 * start, `"stop"` to stop; out: `{ latencies, failures }` once stopped.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { delay, ping } from "../tests/fault_util.ts";

let stopped = false;
let loop: Promise<void> | undefined;
const latencies: number[] = [];
const failures: string[] = [];

self.onmessage = async (e: MessageEvent) => {
  if (e.data === "stop") {
    stopped = true;
    await loop;
    self.postMessage({ latencies, failures });
    self.close();
    return;
  }
  const { port, everyMs, busyOk } = e.data as { port: number; everyMs: number; busyOk?: boolean };
  loop = (async () => {
    while (!stopped) {
      try {
        latencies.push(await ping(port, "127.0.0.1", 5000, busyOk));
      } catch (err) {
        failures.push(err instanceof Error ? err.message : String(err));
      }
      if (!stopped) await delay(everyMs);
    }
  })();
};
