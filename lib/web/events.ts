/**
 * The live page's feed (`GET /events`): Server-Sent Events with the locks as they change.
 *
 * One {@linkcode LiveFeed} serves every open page of an HTTP server. While at least one page is
 * connected it watches the store (the names whose holders or queue changed) and samples the
 * counters once a second; with no page open it does nothing at all. Changes are coalesced: the
 * names that changed are sent together at most every `intervalMs` (4 times a second by default),
 * each as the name's whole current state, so a page never needs more than the last message per
 * name. Events (every `data:` is one line of JSON):
 *
 * | event | data |
 * |---|---|
 * | `reset` | `{t, server: {version, store}, history: [sample...]}`: forget everything; the locks follow as `update`s |
 * | `update` | `{t, upsert: [LockDetail...], remove: [name...]}`, with `snapshot: true` while a new page gets its first look |
 * | `stats` | a sample: `{t, connections, held, waiting, grants, timeouts}` (rates per second) |
 *
 * `t` is the server's wall clock in ms (the page corrects "held for" with it). A page that reads
 * too slowly (more than `maxBufferedBytes` waiting for it) is dropped; it reconnects and starts
 * again from a `reset`.
 *
 * @module
 */

import type { Stats } from "../protocol.ts";
import type { LockDetail, LockStore } from "../store/types.ts";

/** What the feed reads from the lock server. */
export interface FeedSource {
  /** The lock store. */
  readonly table: LockStore;
  /** Open connections. */
  readonly connections: number;
  /** What `.stats` answers. */
  stats(): Stats;
}

/** Options of a {@linkcode LiveFeed}. */
export interface LiveFeedOptions {
  /** The least time between two `update`s, in ms (default 250). */
  intervalMs?: number;
  /** Waiters sent per name (default 10; `waiting` counts them all). */
  maxQueue?: number;
  /** Names per `update` event; a bigger change goes out in several, a task apart (default 100). */
  batch?: number;
  /** Names per `update` of a new page's first snapshot (default 50: short tasks in the page). */
  snapshotBatch?: number;
  /** Counter samples kept for the sparklines, one a second (default 300: five minutes). */
  historySize?: number;
  /** Bytes that may wait for a slow page before it is dropped (default 8 MiB). */
  maxBufferedBytes?: number;
  /** `memory` or `etcd`, shown on the page. */
  store?: string;
}

/** One counters sample: a point of each sparkline. */
export interface FeedSample {
  /** Wall clock ms. */
  t: number;
  /** Open connections of this server. */
  connections: number;
  /** Names held (with etcd: by any server). */
  held: number;
  /** Waiters (with etcd: of any server). */
  waiting: number;
  /** Grants per second on this server. */
  grants: number;
  /** Waits that ran out per second on this server. */
  timeouts: number;
}

interface Client {
  controller: ReadableStreamDefaultController<Uint8Array>;
  /** Names still to send from its first snapshot. */
  pending: string[] | undefined;
  closed: boolean;
}

const encoder = new TextEncoder();
const SAMPLE_MS = 1000;
/** The stream's queue size the feed aims under (bytes). */
const HIGH_WATER = 64 * 1024;

/**
 * The Server-Sent Events feed of one HTTP server (see the module doc).
 *
 * @example
 * ```ts
 * import { startServer } from "../server.ts";
 * import { LiveFeed } from "./events.ts";
 * await using server = await startServer({ port: 0 });
 * const feed = new LiveFeed(server);
 * const res = feed.respond(new Request("http://localhost/events"));
 * console.log(res.headers.get("content-type")); // text/event-stream
 * await res.body?.cancel();
 * feed.close();
 * ```
 */
export class LiveFeed {
  readonly #source: FeedSource;
  readonly #intervalMs: number;
  readonly #maxQueue: number;
  readonly #batch: number;
  readonly #snapshotBatch: number;
  readonly #historySize: number;
  readonly #maxBuffered: number;
  readonly #store: string;
  readonly #version: string;
  readonly #clients = new Set<Client>();
  /** Names changed since the last update. */
  #dirty = new Set<string>();
  /** Per name: [holders, waiting], as last sent (for the counters). */
  readonly #counts = new Map<string, [number, number]>();
  #held = 0;
  #waiting = 0;
  readonly #history: FeedSample[] = [];
  #unwatch: (() => void) | undefined;
  #flushTimer: ReturnType<typeof setTimeout> | undefined;
  #sampleTimer: ReturnType<typeof setTimeout> | undefined;
  #feedTimer: ReturnType<typeof setTimeout> | undefined;
  #lastFlush = -Infinity;
  #last: { at: number; grants: number; timeouts: number } | undefined;
  #closed = false;

  /** A feed of `source`; it starts watching when the first page connects. */
  constructor(source: FeedSource, options: LiveFeedOptions = {}) {
    this.#source = source;
    this.#intervalMs = options.intervalMs ?? 250;
    this.#maxQueue = options.maxQueue ?? 10;
    this.#batch = Math.max(1, options.batch ?? 100);
    this.#snapshotBatch = Math.max(1, options.snapshotBatch ?? 50);
    this.#historySize = options.historySize ?? 300;
    this.#maxBuffered = options.maxBufferedBytes ?? 8 * 1024 * 1024;
    this.#store = options.store ?? "memory";
    this.#version = String(source.stats().version ?? "");
  }

  /** Pages connected now. */
  get clients(): number {
    return this.#clients.size;
  }

  /** The `text/event-stream` response for one page; it ends when the page goes away. */
  respond(req: Request): Response {
    const headers = {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-store",
      "x-accel-buffering": "no",
    };
    if (req.method === "HEAD") return new Response(null, { headers });
    let client: Client | undefined;
    const body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        client = { controller, pending: undefined, closed: false };
        if (this.#closed) {
          controller.close();
          return;
        }
        this.#add(client);
      },
      cancel: () => {
        if (client !== undefined) this.#drop(client, false);
      },
    }, new ByteLengthQueuingStrategy({ highWaterMark: HIGH_WATER }));
    // A page that goes away cancels the body (the server sees it at the latest when the next
    // write fails: a `stats` event goes out every second).
    return new Response(body, { headers });
  }

  /** Ends every page's stream and stops watching (the HTTP server stops). */
  close(): void {
    this.#closed = true;
    for (const c of [...this.#clients]) this.#drop(c, true);
  }

  // --- Pages coming and going

  #add(client: Client): void {
    if (this.#clients.size === 0) this.#start();
    this.#clients.add(client);
    const t = Date.now();
    this.#send(client, "reset", {
      t,
      server: { version: this.#version, store: this.#store },
      history: this.#history,
    });
    // Its snapshot: every name now, sent a batch a task apart; changes meanwhile go out as usual.
    client.pending = [...this.#source.table.names()];
    if (client.pending.length === 0) {
      client.pending = undefined;
      this.#send(client, "update", { t, upsert: [], remove: [], snapshot: true });
    }
    this.#sendStats(client);
    this.#scheduleFeed();
  }

  #drop(client: Client, close: boolean): void {
    if (client.closed) return;
    client.closed = true;
    this.#clients.delete(client);
    if (close) {
      try {
        client.controller.close();
      } catch {
        // already closed or errored
      }
    }
    if (this.#clients.size === 0) this.#stop();
  }

  /** The first page came: watch the store, fill the counts, sample the counters. */
  #start(): void {
    this.#unwatch = this.#source.table.watch((name) => {
      this.#dirty.add(name);
      this.#scheduleFlush();
    });
    this.#counts.clear();
    this.#held = 0;
    this.#waiting = 0;
    for (const name of this.#source.table.names()) {
      const d = this.#source.table.detail(name, 0);
      if (d !== undefined) this.#count(name, d);
    }
    this.#sample();
    this.#sampleTimer = setInterval(() => this.#tickStats(), SAMPLE_MS);
  }

  /** The last page went: nothing runs any more. */
  #stop(): void {
    this.#unwatch?.();
    this.#unwatch = undefined;
    clearInterval(this.#sampleTimer);
    clearTimeout(this.#flushTimer);
    clearTimeout(this.#feedTimer);
    this.#sampleTimer = this.#flushTimer = this.#feedTimer = undefined;
    this.#dirty.clear();
    this.#counts.clear();
  }

  // --- Changes

  #scheduleFlush(): void {
    if (this.#flushTimer !== undefined || this.#clients.size === 0) return;
    const wait = Math.max(0, this.#lastFlush + this.#intervalMs - performance.now());
    this.#flushTimer = setTimeout(() => this.#flush(), wait);
  }

  /** Sends the names that changed to every page, a batch per task. */
  #flush(): void {
    this.#flushTimer = undefined;
    this.#lastFlush = performance.now();
    const names = [...this.#dirty].slice(0, this.#batch);
    for (const n of names) this.#dirty.delete(n);
    const upsert: LockDetail[] = [];
    const remove: string[] = [];
    for (const name of names) {
      const d = this.#source.table.detail(name, this.#maxQueue);
      if (d === undefined) {
        remove.push(name);
        this.#uncount(name);
      } else {
        upsert.push(d);
        this.#count(name, d);
      }
    }
    if (names.length > 0) this.#broadcast("update", { t: Date.now(), upsert, remove });
    // More than a batch: the rest right after other work had its turn.
    if (this.#dirty.size > 0 && this.#clients.size > 0) {
      this.#flushTimer = setTimeout(() => this.#flush(), 0);
    }
  }

  /** Sends each new page the next batch of its snapshot. */
  #scheduleFeed(): void {
    if (this.#feedTimer !== undefined) return;
    this.#feedTimer = setTimeout(() => {
      this.#feedTimer = undefined;
      let more = false;
      for (const c of this.#clients) {
        if (c.pending === undefined) continue;
        const names = c.pending.splice(0, this.#snapshotBatch);
        const upsert: LockDetail[] = [];
        for (const name of names) {
          const d = this.#source.table.detail(name, this.#maxQueue);
          if (d !== undefined) upsert.push(d);
        }
        if (c.pending.length === 0) c.pending = undefined;
        else more = true;
        this.#send(c, "update", { t: Date.now(), upsert, remove: [], snapshot: true });
      }
      if (more) this.#scheduleFeed();
    }, 0);
  }

  #count(name: string, d: LockDetail): void {
    this.#uncount(name);
    const c: [number, number] = [d.holders.length, d.waiting];
    this.#counts.set(name, c);
    if (c[0] > 0) this.#held++;
    this.#waiting += c[1];
  }

  #uncount(name: string): void {
    const old = this.#counts.get(name);
    if (old === undefined) return;
    this.#counts.delete(name);
    if (old[0] > 0) this.#held--;
    this.#waiting -= old[1];
  }

  // --- Counters

  #tickStats(): void {
    this.#sample();
    const sample = this.#history[this.#history.length - 1];
    this.#broadcast("stats", sample);
  }

  #sample(): void {
    const now = performance.now();
    const c = this.#source.table.counters;
    const last = this.#last;
    const dt = last === undefined ? 0 : (now - last.at) / 1000;
    const rate = (a: number, b: number | undefined) =>
      b === undefined || dt <= 0 ? 0 : Math.round(((a - b) / dt) * 10) / 10;
    this.#history.push({
      t: Date.now(),
      connections: this.#source.connections,
      held: this.#held,
      waiting: this.#waiting,
      grants: rate(c.acquired, last?.grants),
      timeouts: rate(c.timedOut, last?.timeouts),
    });
    if (this.#history.length > this.#historySize) this.#history.shift();
    this.#last = { at: now, grants: c.acquired, timeouts: c.timedOut };
  }

  #sendStats(client: Client): void {
    const sample = this.#history[this.#history.length - 1];
    if (sample !== undefined) this.#send(client, "stats", sample);
  }

  // --- Writing

  #broadcast(event: string, data: unknown): void {
    if (this.#clients.size === 0) return;
    const bytes = frame(event, data);
    for (const c of [...this.#clients]) this.#write(c, bytes);
  }

  #send(client: Client, event: string, data: unknown): void {
    this.#write(client, frame(event, data));
  }

  #write(client: Client, bytes: Uint8Array): void {
    if (client.closed) return;
    try {
      client.controller.enqueue(bytes);
    } catch {
      this.#drop(client, false);
      return;
    }
    // A page that does not read: drop it rather than keep its backlog (it starts over).
    // Its backlog goes too: the stream errors, which ends the response.
    const size = client.controller.desiredSize;
    if (size !== null && HIGH_WATER - size > this.#maxBuffered) {
      this.#drop(client, false);
      try {
        client.controller.error(new Error("the page did not read its events"));
      } catch {
        // already closed
      }
    }
  }
}

function frame(event: string, data: unknown): Uint8Array {
  return encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}
