/**
 * Prometheus metrics for the lock server, written by hand in the text exposition format 0.0.4.
 *
 * {@linkcode LockMetrics} is fed from the lock table's events (pass its `onEvent` as
 * `ServerOptions.onEvent`); per event it only bumps a counter and, for grants and ends, one slot
 * of a fixed bucket array: nothing is allocated. Gauges (locks held, waiters, connections, the age
 * of the oldest held lock, process figures) are read from the server when `/metrics` is scraped.
 *
 * @example Count events and render the exposition
 * ```ts
 * import { LockMetrics } from "./metrics.ts";
 * import { startServer } from "./server.ts";
 * const metrics = new LockMetrics();
 * await using server = await startServer({ port: 0, onEvent: metrics.onEvent });
 * console.log(metrics.render(server));
 * ```
 *
 * @module
 */

import type { StoreEvent } from "./store/types.ts";
import type { LockServer } from "./server.ts";
import { VERSION } from "./version.ts";

/** The content type of the text exposition format. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** Upper bounds, in seconds, of the hold-time and wait-time histogram buckets (1 ms to 1 h). */
export const DURATION_BUCKETS: readonly number[] = Object.freeze([
  0.001,
  0.005,
  0.01,
  0.05,
  0.1,
  0.5,
  1,
  5,
  10,
  30,
  60,
  300,
  600,
  1800,
  3600,
]);

/** A histogram of durations over fixed buckets; observing allocates nothing. */
export class DurationHistogram {
  /** The buckets' upper bounds in seconds (the `+Inf` bucket is implied). */
  readonly bounds: readonly number[];
  readonly #boundsMs: Float64Array;
  /** Per-bucket counts, not cumulative; the last slot is `+Inf`. */
  readonly #counts: Float64Array;
  #sumMs = 0;
  #count = 0;

  /** @param bounds the buckets' upper bounds in seconds, ascending (default {@linkcode DURATION_BUCKETS}) */
  constructor(bounds: readonly number[] = DURATION_BUCKETS) {
    this.bounds = bounds;
    this.#boundsMs = Float64Array.from(bounds, (b) => b * 1000);
    this.#counts = new Float64Array(bounds.length + 1);
  }

  /** Records one duration given in milliseconds. */
  observeMs(ms: number): void {
    const bounds = this.#boundsMs;
    let i = 0;
    while (i < bounds.length && ms > bounds[i]) i++;
    this.#counts[i]++;
    this.#sumMs += ms;
    this.#count++;
  }

  /** Observations so far. */
  get count(): number {
    return this.#count;
  }

  /** The sum of the observations in seconds. */
  get sumSeconds(): number {
    return this.#sumMs / 1000;
  }

  /** Cumulative counts per bucket, in bound order, the `+Inf` bucket last. */
  cumulative(): number[] {
    const out: number[] = [];
    let total = 0;
    for (const c of this.#counts) out.push(total += c);
    return out;
  }
}

/** What {@linkcode LockMetrics.render} reads from a running server. */
export type MetricsSource = Pick<LockServer, "table" | "connections" | "stats">;

/** The result labels of `tcpnetlock_lock_requests_total`. */
export type RequestResult = "granted" | "not_granted" | "timeout" | "error";

/**
 * The server's metrics: counters and histograms fed by lock table events, gauges read from the
 * server at render time.
 */
export class LockMetrics {
  #granted = 0;
  #grantedShared = 0;
  #notGranted = 0;
  #timeout = 0;
  #error = 0;
  #expired = 0;
  /** How long locks were held, observed when a holder lets go (release, disconnect, expiry). */
  readonly holdTime: DurationHistogram = new DurationHistogram();
  /** How long requests waited before their grant (0 for an immediate grant), one per grant. */
  readonly waitTime: DurationHistogram = new DurationHistogram();

  /** Pass this as `ServerOptions.onEvent` (it is bound to this object). */
  readonly onEvent: (event: StoreEvent) => void = (event) => this.observe(event);

  /** Counts one lock table event. */
  observe(event: StoreEvent): void {
    switch (event.type) {
      case "granted":
        this.#granted++;
        if (event.claim.request.mode === "shared") this.#grantedShared++;
        this.waitTime.observeMs(event.waitedMs);
        break;
      case "not_granted":
        this.#notGranted++;
        break;
      case "refused":
        this.#error++;
        break;
      case "timeout":
        this.#timeout++;
        break;
      case "ended":
        // A waiter that leaves the queue has no token: it never held the lock.
        if (event.claim.token !== 0) this.holdTime.observeMs(event.heldMs);
        if (event.reason === "expired") this.#expired++;
        break;
    }
  }

  /** Lock requests so far by result. */
  requests(): Record<RequestResult, number> {
    return {
      granted: this.#granted,
      not_granted: this.#notGranted,
      timeout: this.#timeout,
      error: this.#error,
    };
  }

  /** Grants so far by mode (`shared`, `exclusive`: every grant without `mode:shared`). */
  grantsByMode(): { shared: number; exclusive: number } {
    return { shared: this.#grantedShared, exclusive: this.#granted - this.#grantedShared };
  }

  /** Leases that ran out so far. */
  get expired(): number {
    return this.#expired;
  }

  /** The exposition (text format 0.0.4) of every metric, gauges read from `source` now. */
  render(source: MetricsSource): string {
    const out = new Exposition();
    const table = source.table;

    out.family("tcpnetlock_locks_held", "gauge", "Lock names held by at least one connection.");
    out.sample("tcpnetlock_locks_held", table.heldNames);
    out.family(
      "tcpnetlock_lock_holders",
      "gauge",
      "Connections holding a lock (a name with limit:N can have up to N).",
    );
    out.sample("tcpnetlock_lock_holders", table.holders);
    out.family("tcpnetlock_lock_waiters", "gauge", "Connections waiting in a lock's queue.");
    out.sample("tcpnetlock_lock_waiters", table.waiting);
    out.family("tcpnetlock_connections", "gauge", "Open client connections.");
    out.sample("tcpnetlock_connections", source.connections);
    out.family(
      "tcpnetlock_connections_accepted_total",
      "counter",
      "Client connections accepted since the start.",
    );
    out.sample("tcpnetlock_connections_accepted_total", source.stats().requests_count);

    out.family(
      "tcpnetlock_lock_requests_total",
      "counter",
      "Lock requests by result: granted (at once or after waiting), not_granted, timeout (the " +
        "wait ran out), error (refused: limit mismatch, too many waiters, too many locks).",
    );
    const requests = this.requests();
    for (const result of ["granted", "not_granted", "timeout", "error"] as const) {
      out.sample("tcpnetlock_lock_requests_total", requests[result], "result", result);
    }
    out.family(
      "tcpnetlock_lock_grants_total",
      "counter",
      "Grants by mode: shared (mode:shared, readers) or exclusive (every other grant).",
    );
    const byMode = this.grantsByMode();
    for (const mode of ["shared", "exclusive"] as const) {
      out.sample("tcpnetlock_lock_grants_total", byMode[mode], "mode", mode);
    }
    out.family(
      "tcpnetlock_leases_expired_total",
      "counter",
      "Leases (ttl) that ran out: the holder sent nothing in time and lost the lock.",
    );
    out.sample("tcpnetlock_leases_expired_total", this.#expired);
    out.family(
      "tcpnetlock_tokens_issued_total",
      "counter",
      "Fencing tokens handed out (one per grant).",
    );
    out.sample("tcpnetlock_tokens_issued_total", table.tokensIssued);

    out.histogram(
      "tcpnetlock_lock_hold_seconds",
      "How long locks were held, observed when the holder lets go (release, disconnect, expiry).",
      this.holdTime,
    );
    out.histogram(
      "tcpnetlock_lock_wait_seconds",
      "How long granted requests waited in the queue (0 for an immediate grant).",
      this.waitTime,
    );
    const oldest = table.oldestGrant();
    out.family(
      "tcpnetlock_oldest_lock_age_seconds",
      "gauge",
      "How long the longest current holder has held its lock (0 when nothing is held).",
    );
    // The table keeps grant times on its default monotonic clock, performance.now().
    out.sample(
      "tcpnetlock_oldest_lock_age_seconds",
      oldest === undefined ? 0 : Math.max(0, performance.now() - oldest) / 1000,
    );

    out.family(
      "tcpnetlock_process_resident_memory_bytes",
      "gauge",
      "Resident memory size of the server process in bytes.",
    );
    out.sample("tcpnetlock_process_resident_memory_bytes", Deno.memoryUsage().rss);
    const fds = openFds();
    if (fds !== undefined) {
      out.family("tcpnetlock_process_open_fds", "gauge", "Open file descriptors of the process.");
      out.sample("tcpnetlock_process_open_fds", fds);
    }
    const maxFds = maxOpenFds();
    if (maxFds !== undefined) {
      out.family(
        "tcpnetlock_process_max_fds",
        "gauge",
        "The most file descriptors the process may open (its soft limit).",
      );
      out.sample("tcpnetlock_process_max_fds", maxFds);
    }
    out.family(
      "tcpnetlock_process_start_time_seconds",
      "gauge",
      "When the process started, in seconds since the Unix epoch.",
    );
    out.sample("tcpnetlock_process_start_time_seconds", PROCESS_START_S);
    out.family(
      "tcpnetlock_build_info",
      "gauge",
      "Always 1; the labels say which version runs, on which Deno.",
    );
    out.sample("tcpnetlock_build_info", 1, "version", VERSION, "deno", Deno.version.deno);
    return out.text();
  }
}

/** Seconds since the epoch at which this process's runtime started. */
const PROCESS_START_S = Math.round(performance.timeOrigin) / 1000;

/** Counts /proc/self/fd; undefined where there is no such folder or no permission to read it. */
function openFds(): number | undefined {
  try {
    let n = 0;
    for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
    return n - 1; // not counting the descriptor that reads the folder
  } catch {
    return undefined;
  }
}

/** The soft limit of open files from /proc/self/limits; undefined when unknown or unlimited. */
function maxOpenFds(): number | undefined {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(Deno.readTextFileSync("/proc/self/limits"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Formats a sample value the way Prometheus reads it. */
function formatValue(value: number): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return String(value);
}

function escapeHelp(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll("\n", "\\n");
}

function escapeLabel(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/** Collects exposition lines. */
class Exposition {
  #lines: string[] = [];

  family(name: string, type: "counter" | "gauge" | "histogram", help: string): void {
    this.#lines.push(`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} ${type}`);
  }

  /** A sample; `labels` alternate name, value. */
  sample(name: string, value: number, ...labels: string[]): void {
    let text = name;
    if (labels.length > 0) {
      const parts: string[] = [];
      for (let i = 0; i < labels.length; i += 2) {
        parts.push(`${labels[i]}="${escapeLabel(labels[i + 1])}"`);
      }
      text += `{${parts.join(",")}}`;
    }
    this.#lines.push(`${text} ${formatValue(value)}`);
  }

  histogram(name: string, help: string, h: DurationHistogram): void {
    this.family(name, "histogram", help);
    const cumulative = h.cumulative();
    h.bounds.forEach((bound, i) => {
      this.sample(`${name}_bucket`, cumulative[i], "le", formatValue(bound));
    });
    this.sample(`${name}_bucket`, cumulative[cumulative.length - 1], "le", "+Inf");
    this.sample(`${name}_sum`, h.sumSeconds);
    this.sample(`${name}_count`, h.count);
  }

  text(): string {
    return this.#lines.join("\n") + "\n";
  }
}
