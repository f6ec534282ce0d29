/**
 * A fault-injecting proxy for tests, between tcpnetlock servers and one real etcd member's
 * client URL (etcd's JSON gateway over HTTP/1.1). A test points a server at `proxy.url` instead
 * of etcd and breaks the path between them on purpose, in-process and at chosen moments:
 *
 * | call | what the server sees |
 * |---|---|
 * | (nothing) | etcd, unchanged: every request is forwarded and answered |
 * | {@linkcode EtcdProxy.hangAfterForward} | matching requests reach etcd and are applied, but their answer never comes; the connection stays open until the rule is lifted (then it is closed, or the answer delivered late) or the proxy closes |
 * | {@linkcode EtcdProxy.stallWatch} | open watch streams stop delivering bytes while their connections stay open, silently (a NAT dropping a long-lived flow); new watches too, if asked |
 * | {@linkcode EtcdProxy.fail} | matching requests are answered with an HTTP 503, a gRPC-style error, or a closed connection, without reaching etcd |
 * | {@linkcode EtcdProxy.delay} | matching requests reach etcd `ms` later (so etcd may apply them after later ones) |
 * | {@linkcode EtcdProxy.cut} / {@linkcode EtcdProxy.restore} | the server is cut off from etcd: every request hangs unanswered and watch streams stall (`"hang"`), or every connection is closed at once (`"refuse"`) |
 *
 * Every request that passes is logged ({@linkcode ProxyLogEntry}): its path, the keys it names
 * (decoded: the keys a transaction or a delete-range writes), what became of it and etcd's
 * answer. Every response on a watch stream is logged too ({@linkcode WatchMessage}), with
 * whether it was delivered. A test awaits these as events (`await proxy.waitFor({ put:
 * "/p/db/" })`: "the transaction that wrote a key of lock db was applied by etcd") instead of
 * sleeping.
 *
 * Rules are objects ({@linkcode ProxyRule}): `lift()` ends one (so does `using`), `times` limits
 * how many requests it catches, `hit()` awaits its catches. Disposing the proxy stops everything
 * it started (listener, connections, requests to etcd, timers, pending waits), so tests run with
 * the op and resource sanitizers.
 *
 * It speaks HTTP/1.1 itself over `Deno.listen` and forwards with `fetch` (its own HTTP client):
 * a `Deno.serve` handler can neither close a connection without answering nor keep a stream's
 * headers back while its connection stays open. Whenever the proxy closes a connection without
 * an answer, mind that Deno's fetch may send the request once more on a new connection when the
 * one that ended had been reused.
 *
 * @example
 * ```ts ignore
 * import { startEtcdProxy } from "./_util/etcd_proxy.ts";
 * await using proxy = await startEtcdProxy("http://127.0.0.1:2379");
 * // ... start a server with etcd endpoints [proxy.url] ...
 * using noDeletes = proxy.fail({ path: "/v3/kv/deleterange" }, "http503");
 * // ... a client sends release ...
 * await noDeletes.hit(1); // the server tried to delete and was refused
 * noDeletes.lift();
 * await proxy.waitFor({ delete: "/tcpnetlock/db/" }); // the delete was applied
 * ```
 *
 * @module
 */

import { unb64 } from "./etcd_kv.ts";

// --- Public types

/** A request as the proxy read it, with the keys it names decoded. */
export interface ProxyRequest {
  /** 1, 2, ...: the order in which the proxy received requests. */
  readonly seq: number;
  readonly method: string;
  /** The request target, e.g. `/v3/kv/txn`. */
  readonly path: string;
  /** The parsed JSON body (undefined when there was none or it was not JSON). */
  readonly body: unknown;
  /** Every key the request names (compares, reads, writes, a watch's key), decoded. */
  readonly keys: readonly string[];
  /** The keys it puts (`/v3/kv/put`, `request_put` in either branch of a transaction). */
  readonly puts: readonly string[];
  /** The keys it deletes (`/v3/kv/deleterange`, `request_delete_range`): the first key of each range. */
  readonly deletes: readonly string[];
  /** The lease id of a `/v3/lease/*` request, as sent. */
  readonly lease: string | undefined;
}

/**
 * What became of a request, in order: `received`; then `held` (a cut keeps it from etcd),
 * `failed` (a {@linkcode EtcdProxy.fail} rule answered it), `refused` (a `"refuse"` cut closed
 * its connection) or `forwarded` (etcd answered it: it was applied; a watch: its stream is open);
 * after `forwarded`: `withheld` (the answer is kept from the server), `delivered` (the server got
 * the answer; a watch: its stream ended normally); `dropped`: its connection was closed without an
 * answer (a rule lifted, a restore, the server gave up, the proxy closed); `error`: etcd could
 * not be reached (the connection is closed).
 */
export type ProxyState =
  | "received"
  | "held"
  | "failed"
  | "refused"
  | "forwarded"
  | "withheld"
  | "delivered"
  | "dropped"
  | "error";

/** One request in the proxy's log; its fields change as the request goes on. */
export interface ProxyLogEntry extends ProxyRequest {
  /** When it was received (performance.now()). */
  readonly at: number;
  /** Where it is now. */
  readonly state: ProxyState;
  /** True once etcd has answered it (so it was applied), whatever happened to the answer. */
  readonly forwarded: boolean;
  /** How long delay rules held it before forwarding, in ms. */
  readonly delayedMs: number;
  /** etcd's HTTP status, once it answered. */
  readonly status: number | undefined;
  /** `header.revision` of etcd's answer, once it answered (not for a watch). */
  readonly revision: number | undefined;
  /** etcd's answer, parsed (not for a watch). */
  readonly response: unknown;
}

/** One response on a watch stream, decoded, as it passed (or is kept in) the proxy. */
export interface WatchMessage {
  /** The `seq` of the watch request whose stream carried it. */
  readonly stream: number;
  /** `header.revision` of the response. */
  readonly revision: number;
  readonly created: boolean;
  readonly canceled: boolean;
  readonly events: readonly { type: "PUT" | "DELETE"; key: string; modRevision: number }[];
  /** When the proxy read it from etcd (performance.now()). */
  readonly at: number;
  /** True once the server was sent all of it. */
  readonly delivered: boolean;
}

/**
 * Which requests a rule or a wait is about: every given field must hold. A function decides
 * for itself.
 */
export type Match = MatchSpec | ((request: ProxyRequest) => boolean);

/** The fields of a {@linkcode Match}. */
export interface MatchSpec {
  /** The path, exactly (`"/v3/kv/txn"`), or a pattern. */
  path?: string | RegExp;
  /** Some key the request names starts with this. */
  key?: string;
  /** Some key the request puts starts with this. */
  put?: string;
  /** Some key the request deletes starts with this. */
  delete?: string;
}

/** A fault in force until lifted. `using rule = proxy.fail(...)` lifts it at the end of a scope. */
export interface ProxyRule extends Disposable {
  /** What it does, for messages. */
  readonly description: string;
  /** Requests (for a stall rule: watch streams) it has caught so far. */
  readonly hits: number;
  /** False once lifted (or once it caught `times` requests: it catches no more). */
  readonly active: boolean;
  /** Resolves once the rule has caught `n` requests in all (rejects after `timeoutMs`). */
  hit(n?: number, timeoutMs?: number): Promise<void>;
  /** Ends the rule: what it holds is let go (see each rule); nothing more is caught. */
  lift(): void;
}

/** Options shared by the rules that catch requests. */
export interface RuleOptions {
  /** Catch at most this many requests (default: every matching one). */
  times?: number;
}

/** How {@linkcode EtcdProxy.fail} answers. */
export type FailHow =
  /** HTTP 503 with a plain-text body, as a load balancer in front of etcd would. */
  | "http503"
  /**
   * The connection is closed at once, without a byte of answer. (Deno's fetch sends a request
   * once more, at once, when a connection it reused ends like this: that second attempt is a
   * request of its own in the log, and is caught again if the rule still applies.)
   */
  | "reset"
  /** A gRPC-gateway error, as etcd itself answers one: `{"error","code","message"}`. */
  | { grpcCode: number; message?: string };

/** What waits accept. */
export interface WaitOptions {
  /** Only requests after this `seq` (see {@linkcode EtcdProxy.mark}). */
  after?: number;
  /**
   * Which point to wait for: `"received"` (any state), `"forwarded"` (etcd answered: the
   * default), or one exact state.
   */
  until?: ProxyState;
  /** Reject after this many ms (default 10 000). */
  timeoutMs?: number;
}

/** The proxy, from {@linkcode startEtcdProxy}. */
export interface EtcdProxy extends AsyncDisposable {
  /** The URL servers use as their etcd endpoint, `http://127.0.0.1:PORT`. */
  readonly url: string;
  /** The etcd client URL it forwards to. */
  readonly target: string;
  /** Every request so far, in order of arrival (live objects). */
  readonly log: readonly ProxyLogEntry[];
  /** Every response read on a watch stream so far. */
  readonly watchLog: readonly WatchMessage[];
  /** Is it cut (see {@linkcode cut})? */
  readonly isCut: boolean;
  /** Watch streams open now. */
  readonly openWatches: number;

  /**
   * Matching requests are forwarded and applied by etcd, but the answer is kept from the server;
   * its connection stays open. Lifting the rule closes those connections without an answer
   * (`onLift: "close"`, the default) or delivers the answers late (`"deliver"`).
   */
  hangAfterForward(
    match: Match,
    options?: RuleOptions & { onLift?: "close" | "deliver" },
  ): ProxyRule;
  /**
   * Watch streams open now stop delivering bytes (what etcd sends is kept in the proxy); their
   * connections stay open. With `newWatches: true` watches opened while the rule is in force
   * stall too (not even their response headers go out). Lifting it lets the kept bytes go on,
   * nothing lost. `hits` counts the streams it stalls.
   */
  stallWatch(options?: { newWatches?: boolean }): ProxyRule;
  /** Matching requests are answered with a fault (see {@linkcode FailHow}), never forwarded. */
  fail(match: Match, how: FailHow, options?: RuleOptions): ProxyRule;
  /** Matching requests are forwarded `ms` later (the delays of several matching rules add up). */
  delay(match: Match, ms: number, options?: RuleOptions): ProxyRule;
  /**
   * Cuts the server off from etcd. `"hang"` (the default), a silent network cut: new requests
   * are kept from etcd, answers etcd still gives are kept from the server, watch streams stall;
   * every connection stays open. `"refuse"`, etcd gone: every open connection is closed at once,
   * and new ones as soon as they are accepted.
   */
  cut(mode?: "hang" | "refuse"): void;
  /**
   * Ends a cut. With `drop` (the default) what the cut kept is lost, as connections broken by a
   * long outage: the connections of held requests and withheld answers, and the watch streams,
   * are closed. With `drop: false` held requests go on to etcd, answers are delivered and
   * streams resume.
   */
  restore(options?: { drop?: boolean }): void;
  /** Resolves with the first request matching `match` that reached the point asked for. */
  waitFor(match: Match, options?: WaitOptions): Promise<ProxyLogEntry>;
  /** Resolves with the first watch response (already read or to come) for which `test` holds. */
  waitForWatch(test: (m: WatchMessage) => boolean, timeoutMs?: number): Promise<WatchMessage>;
  /** How many requests match (and reached `until`, default `"received"`). */
  count(match?: Match, until?: ProxyState): number;
  /** The `seq` of the last request so far (for `waitFor(..., { after })`). */
  mark(): number;
  /** Stops everything: the listener, every connection, every request to etcd. */
  close(): Promise<void>;
}

// --- Helpers

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const DEFAULT_WAIT_MS = 10_000;
const MAX_HEAD = 64 * 1024;
const REASONS: Record<number, string> = {
  200: "OK",
  400: "Bad Request",
  401: "Unauthorized",
  404: "Not Found",
  429: "Too Many Requests",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
};
/** The HTTP status grpc-gateway gives a gRPC code. */
const GRPC_HTTP: Record<number, number> = {
  1: 499,
  3: 400,
  4: 504,
  5: 404,
  6: 409,
  7: 403,
  8: 429,
  9: 400,
  10: 409,
  11: 400,
  12: 501,
  13: 500,
  14: 503,
  16: 401,
};

function concat(a: Bytes, b: Bytes): Bytes {
  if (a.length === 0) return b.slice();
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function indexOfSeq(hay: Uint8Array, needle: number[], from = 0): number {
  outer: for (let i = from; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

const CRLF = [13, 10];
const CRLFCRLF = [13, 10, 13, 10];

type Json = Record<string, unknown>;
type Bytes = Uint8Array<ArrayBuffer>;

function asObject(v: unknown): Json | undefined {
  return typeof v === "object" && v !== null && !Array.isArray(v) ? v as Json : undefined;
}

/** The keys a request names, decoded. */
function keysOf(path: string, body: unknown): {
  keys: string[];
  puts: string[];
  deletes: string[];
  lease: string | undefined;
} {
  const keys = new Set<string>();
  const puts = new Set<string>();
  const deletes = new Set<string>();
  const b = asObject(body);
  const op = (o: Json | undefined) => {
    if (o === undefined) return;
    const put = asObject(o.request_put);
    if (put) {
      const k = unb64(put.key);
      keys.add(k);
      puts.add(k);
    }
    const del = asObject(o.request_delete_range);
    if (del) {
      const k = unb64(del.key);
      keys.add(k);
      deletes.add(k);
    }
    const range = asObject(o.request_range);
    if (range) keys.add(unb64(range.key));
    const txn = asObject(o.request_txn);
    if (txn) walkTxn(txn);
  };
  const walkTxn = (t: Json) => {
    for (const c of (t.compare as Json[] | undefined) ?? []) keys.add(unb64(asObject(c)?.key));
    for (const o of (t.success as Json[] | undefined) ?? []) op(asObject(o));
    for (const o of (t.failure as Json[] | undefined) ?? []) op(asObject(o));
  };
  let lease: string | undefined;
  if (b !== undefined) {
    if (path.startsWith("/v3/kv/txn")) walkTxn(b);
    else if (path.startsWith("/v3/kv/put")) {
      const k = unb64(b.key);
      keys.add(k);
      puts.add(k);
    } else if (path.startsWith("/v3/kv/deleterange")) {
      const k = unb64(b.key);
      keys.add(k);
      deletes.add(k);
    } else if (path.startsWith("/v3/kv/range")) keys.add(unb64(b.key));
    else if (path.startsWith("/v3/watch")) {
      const create = asObject(b.create_request);
      if (create) keys.add(unb64(create.key));
    } else if (path.startsWith("/v3/lease/") && b.ID !== undefined) lease = String(b.ID);
  }
  keys.delete("");
  return { keys: [...keys], puts: [...puts], deletes: [...deletes], lease };
}

function matches(match: Match | undefined, req: ProxyRequest): boolean {
  if (match === undefined) return true;
  if (typeof match === "function") return match(req);
  if (match.path !== undefined) {
    const ok = typeof match.path === "string" ? req.path === match.path : match.path.test(req.path);
    if (!ok) return false;
  }
  if (match.key !== undefined && !req.keys.some((k) => k.startsWith(match.key!))) return false;
  if (match.put !== undefined && !req.puts.some((k) => k.startsWith(match.put!))) return false;
  if (match.delete !== undefined && !req.deletes.some((k) => k.startsWith(match.delete!))) {
    return false;
  }
  return true;
}

function describe(match: Match | undefined): string {
  if (match === undefined) return "any request";
  if (typeof match === "function") return match.name ? `requests (${match.name})` : "requests";
  const parts = Object.entries(match).map(([k, v]) => `${k} ${String(v)}`);
  return parts.length === 0 ? "any request" : parts.join(", ");
}

/**
 * Resolves when `test()` holds, re-checked on every `notify()`; rejects after `timeoutMs`, or
 * at once when cancelled (the proxy closed).
 */
class Waiters {
  readonly #list = new Set<{ check: () => void; fail: (err: Error) => void }>();
  #cancelled: string | undefined;

  notify(): void {
    for (const w of [...this.#list]) w.check();
  }

  wait<T>(test: () => T | undefined, timeoutMs: number, what: () => string): Promise<T> {
    const now = test();
    if (now !== undefined) return Promise.resolve(now);
    if (this.#cancelled !== undefined) {
      return Promise.reject(new Error(`etcd proxy: ${this.#cancelled} (waiting for ${what()})`));
    }
    return new Promise<T>((resolve, reject) => {
      const entry = {
        check: () => {
          const v = test();
          if (v === undefined) return;
          this.#list.delete(entry);
          clearTimeout(timer);
          resolve(v);
        },
        fail: (err: Error) => {
          this.#list.delete(entry);
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(
        () =>
          entry.fail(
            new Error(`etcd proxy: timed out after ${timeoutMs} ms waiting for ${what()}`),
          ),
        timeoutMs,
      );
      this.#list.add(entry);
    });
  }

  /** Rejects every wait now and later with `reason`. */
  cancel(reason: string): void {
    this.#cancelled = reason;
    for (const w of [...this.#list]) w.fail(new Error(`etcd proxy: ${reason}`));
  }
}

/** A decision for something held: go on, or close its connection. */
type Decision = "deliver" | "drop";

/** Something the proxy keeps back (a request or an answer), until a decision. */
interface Hold {
  readonly cause: RuleImpl | "cut";
  readonly decide: (d: Decision) => void;
}

// --- A client connection: continuous reading into a buffer, so the end is seen at any time.

class ClientConn {
  readonly conn: Deno.Conn;
  #buf: Bytes = new Uint8Array(0);
  #eof = false;
  #wake: (() => void) | undefined;
  readonly ended: Promise<void>;
  readonly pump: Promise<void>;
  #closed = false;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
    const ended = Promise.withResolvers<void>();
    this.ended = ended.promise;
    this.pump = (async () => {
      const chunk = new Uint8Array(16 * 1024);
      try {
        for (;;) {
          const n = await conn.read(chunk);
          if (n === null) break;
          this.#buf = concat(this.#buf, chunk.subarray(0, n));
          this.#wake?.();
        }
      } catch {
        // reset, or closed by the proxy
      }
      this.#eof = true;
      this.#wake?.();
      ended.resolve();
    })();
  }

  get isEnded(): boolean {
    return this.#eof;
  }

  #next(): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = () => {
        this.#wake = undefined;
        resolve();
      };
    });
  }

  /** Bytes up to and including `delim`; null at the end of the stream. */
  async readUntil(delim: number[], limit: number): Promise<Bytes | null> {
    for (;;) {
      const i = indexOfSeq(this.#buf, delim);
      if (i >= 0) {
        const out = this.#buf.slice(0, i + delim.length);
        this.#buf = this.#buf.slice(i + delim.length);
        return out;
      }
      if (this.#buf.length > limit) throw new Error("request head too large");
      if (this.#eof) return null;
      await this.#next();
    }
  }

  /** Exactly `n` bytes; null when the stream ends first. */
  async readExactly(n: number): Promise<Bytes | null> {
    while (this.#buf.length < n) {
      if (this.#eof) return null;
      await this.#next();
    }
    const out = this.#buf.slice(0, n);
    this.#buf = this.#buf.slice(n);
    return out;
  }

  async write(bytes: Bytes): Promise<void> {
    let done = 0;
    while (done < bytes.length) done += await this.conn.write(bytes.subarray(done));
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }
}

interface ParsedRequest {
  method: string;
  path: string;
  headers: Map<string, string>;
  body: Bytes;
}

async function readRequest(c: ClientConn): Promise<ParsedRequest | null> {
  const head = await c.readUntil(CRLFCRLF, MAX_HEAD);
  if (head === null) return null;
  const lines = decoder.decode(head).split("\r\n");
  const [method, path] = lines[0].split(" ");
  if (!method || !path) throw new Error(`bad request line ${JSON.stringify(lines[0])}`);
  const headers = new Map<string, string>();
  for (const l of lines.slice(1)) {
    const colon = l.indexOf(":");
    if (colon > 0) headers.set(l.slice(0, colon).trim().toLowerCase(), l.slice(colon + 1).trim());
  }
  let body: Bytes = new Uint8Array(0);
  if (/chunked/i.test(headers.get("transfer-encoding") ?? "")) {
    for (;;) {
      const sizeLine = await c.readUntil(CRLF, 1024);
      if (sizeLine === null) return null;
      const size = parseInt(decoder.decode(sizeLine).trim().split(";")[0], 16);
      if (!Number.isFinite(size)) throw new Error("bad chunk size");
      if (size === 0) {
        // Trailers, if any, end with an empty line.
        for (;;) {
          const t = await c.readUntil(CRLF, MAX_HEAD);
          if (t === null || t.length === 2) break;
        }
        break;
      }
      const data = await c.readExactly(size + 2);
      if (data === null) return null;
      body = concat(body, data.subarray(0, size));
    }
  } else {
    const length = Number(headers.get("content-length") ?? 0);
    if (length > 0) {
      const data = await c.readExactly(length);
      if (data === null) return null;
      body = data;
    }
  }
  return { method, path, headers, body };
}

function responseHead(status: number, headers: Record<string, string>): Bytes {
  let text = `HTTP/1.1 ${status} ${REASONS[status] ?? "Status"}\r\n`;
  for (const [k, v] of Object.entries(headers)) text += `${k}: ${v}\r\n`;
  return encoder.encode(text + "\r\n");
}

function fullResponse(status: number, contentType: string, body: Bytes): Bytes {
  return concat(
    responseHead(status, { "content-type": contentType, "content-length": String(body.length) }),
    body,
  );
}

// --- Rules

type RuleKind = "hang" | "stall" | "fail" | "delay";

class RuleImpl implements ProxyRule {
  readonly kind: RuleKind;
  readonly description: string;
  readonly match: Match | undefined;
  readonly times: number;
  readonly onLift: Decision;
  readonly how: FailHow | undefined;
  readonly ms: number;
  readonly newWatches: boolean;
  /** Stall rules: the streams they stall. */
  readonly streams = new Set<WatchStream>();
  hits = 0;
  lifted = false;
  readonly #proxy: ProxyImpl;
  readonly #waiters = new Waiters();

  constructor(
    proxy: ProxyImpl,
    kind: RuleKind,
    init: {
      match?: Match;
      times?: number;
      onLift?: Decision;
      how?: FailHow;
      ms?: number;
      newWatches?: boolean;
      description: string;
    },
  ) {
    this.#proxy = proxy;
    this.kind = kind;
    this.match = init.match;
    this.times = init.times ?? Infinity;
    this.onLift = init.onLift ?? "drop";
    this.how = init.how;
    this.ms = init.ms ?? 0;
    this.newWatches = init.newWatches ?? false;
    this.description = init.description;
  }

  get active(): boolean {
    return !this.lifted && this.hits < this.times;
  }

  /** Counts a catch if the rule is active and matches; true when it caught `req`. */
  take(req: ProxyRequest): boolean {
    if (!this.active || !matches(this.match, req)) return false;
    this.hits++;
    this.#waiters.notify();
    return true;
  }

  /** A stall rule takes a stream. */
  takeStream(s: WatchStream): void {
    this.streams.add(s);
    this.hits++;
    this.#waiters.notify();
  }

  hit(n = 1, timeoutMs = DEFAULT_WAIT_MS): Promise<void> {
    return this.#waiters.wait(
      () => this.hits >= n ? true : undefined,
      timeoutMs,
      () => `rule "${this.description}" to catch ${n} (caught ${this.hits})`,
    ).then(() => {});
  }

  lift(): void {
    if (this.lifted) return;
    this.lifted = true;
    this.#proxy.ruleLifted(this);
  }

  /** The proxy closed: waits on this rule end. */
  cancel(): void {
    this.#waiters.cancel("closed");
  }

  [Symbol.dispose](): void {
    this.lift();
  }
}

// --- Watch streams

interface StreamItem {
  bytes: Bytes;
  /** Upstream bytes delivered once this item is written. */
  upstreamEnd: number;
  /** The last item: close the connection after it (an upstream error) or end the response. */
  end?: "ok" | "error";
}

interface WatchStream {
  readonly entry: Entry;
  readonly conn: ClientConn;
  readonly upstream: AbortController;
  readonly items: StreamItem[];
  readonly messages: { message: MutableWatchMessage; end: number }[];
  closed: boolean;
  wake: (() => void) | undefined;
}

type Mutable<T> = { -readonly [K in keyof T]: T[K] };
type Entry = Mutable<ProxyLogEntry>;
type MutableWatchMessage = Mutable<WatchMessage>;

// --- The proxy

class ProxyImpl implements EtcdProxy {
  readonly url: string;
  readonly target: string;
  readonly log: Entry[] = [];
  readonly watchLog: MutableWatchMessage[] = [];
  readonly #listener: Deno.Listener;
  readonly #http: Deno.HttpClient = Deno.createHttpClient({});
  readonly #stop = new AbortController();
  readonly #conns = new Set<ClientConn>();
  readonly #tasks = new Set<Promise<unknown>>();
  /** Rules in force. */
  readonly #rules: RuleImpl[] = [];
  /** Every rule made (their waits end when the proxy closes). */
  readonly #made: RuleImpl[] = [];
  readonly #holds = new Set<Hold>();
  readonly #streams = new Set<WatchStream>();
  readonly #waiters = new Waiters();
  readonly #accepting: Promise<void>;
  #cut: "hang" | "refuse" | undefined;
  #closing: Promise<void> | undefined;

  constructor(listener: Deno.Listener, target: string) {
    this.#listener = listener;
    const addr = listener.addr as Deno.NetAddr;
    this.url = `http://${addr.hostname}:${addr.port}`;
    this.target = target.replace(/\/+$/, "");
    this.#accepting = this.#acceptLoop();
  }

  get isCut(): boolean {
    return this.#cut !== undefined;
  }

  get openWatches(): number {
    return this.#streams.size;
  }

  // --- Rules

  #add(rule: RuleImpl): RuleImpl {
    if (this.#closing !== undefined) throw new Error("etcd proxy: closed");
    this.#rules.push(rule);
    this.#made.push(rule);
    return rule;
  }

  hangAfterForward(
    match: Match,
    options: RuleOptions & { onLift?: "close" | "deliver" } = {},
  ): ProxyRule {
    return this.#add(
      new RuleImpl(this, "hang", {
        match,
        times: options.times,
        onLift: options.onLift === "deliver" ? "deliver" : "drop",
        description: `hang after forward: ${describe(match)}`,
      }),
    );
  }

  stallWatch(options: { newWatches?: boolean } = {}): ProxyRule {
    const rule = this.#add(
      new RuleImpl(this, "stall", {
        newWatches: options.newWatches ?? false,
        description: `stall watch streams${options.newWatches ? ", new ones too" : ""}`,
      }),
    );
    for (const s of this.#streams) rule.takeStream(s);
    return rule;
  }

  fail(match: Match, how: FailHow, options: RuleOptions = {}): ProxyRule {
    const what = typeof how === "string" ? how : `gRPC code ${how.grpcCode}`;
    return this.#add(
      new RuleImpl(this, "fail", {
        match,
        times: options.times,
        how,
        description: `fail (${what}): ${describe(match)}`,
      }),
    );
  }

  delay(match: Match, ms: number, options: RuleOptions = {}): ProxyRule {
    return this.#add(
      new RuleImpl(this, "delay", {
        match,
        ms,
        times: options.times,
        description: `delay ${ms} ms: ${describe(match)}`,
      }),
    );
  }

  /** A rule was lifted: let go what it holds. */
  ruleLifted(rule: RuleImpl): void {
    const i = this.#rules.indexOf(rule);
    if (i >= 0) this.#rules.splice(i, 1);
    for (const h of [...this.#holds]) if (h.cause === rule) h.decide(rule.onLift);
    if (rule.kind === "stall") { for (const s of rule.streams) s.wake?.(); }
  }

  cut(mode: "hang" | "refuse" = "hang"): void {
    this.#cut = mode;
    if (mode === "refuse") {
      for (const h of [...this.#holds]) h.decide("drop");
      for (const c of [...this.#conns]) c.close();
    }
  }

  restore(options: { drop?: boolean } = {}): void {
    if (this.#cut === undefined) return;
    const drop = options.drop ?? true;
    this.#cut = undefined;
    for (const h of [...this.#holds]) if (h.cause === "cut") h.decide(drop ? "drop" : "deliver");
    for (const s of [...this.#streams]) {
      if (drop) this.#closeStream(s);
      else s.wake?.();
    }
  }

  // --- Log and waits

  #changed(entry: Entry, state: ProxyState): void {
    entry.state = state;
    if (state === "forwarded") entry.forwarded = true;
    this.#waiters.notify();
  }

  #reached(e: Entry, until: ProxyState): boolean {
    if (until === "received") return true;
    if (until === "forwarded") return e.forwarded;
    return e.state === until;
  }

  waitFor(match: Match, options: WaitOptions = {}): Promise<ProxyLogEntry> {
    const after = options.after ?? 0;
    const until = options.until ?? "forwarded";
    return this.#waiters.wait(
      () => this.log.find((e) => e.seq > after && matches(match, e) && this.#reached(e, until)),
      options.timeoutMs ?? DEFAULT_WAIT_MS,
      () => {
        const recent = this.log.slice(-12).map((e) => `#${e.seq} ${e.path} ${e.state}`);
        return `${describe(match)} to be ${until} (after #${after}); recent: ${recent.join("; ")}`;
      },
    );
  }

  waitForWatch(
    test: (m: WatchMessage) => boolean,
    timeoutMs = DEFAULT_WAIT_MS,
  ): Promise<WatchMessage> {
    return this.#waiters.wait(
      () => this.watchLog.find(test),
      timeoutMs,
      () => `a watch response (${this.watchLog.length} so far)`,
    );
  }

  count(match?: Match, until: ProxyState = "received"): number {
    return this.log.filter((e) => matches(match, e) && this.#reached(e, until)).length;
  }

  mark(): number {
    return this.log.length === 0 ? 0 : this.log[this.log.length - 1].seq;
  }

  // --- Connections

  #track(p: Promise<unknown>): void {
    const q = p.catch(() => {});
    this.#tasks.add(q);
    q.finally(() => this.#tasks.delete(q));
  }

  async #acceptLoop(): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch {
        return; // the listener closed
      }
      if (this.#closing !== undefined || this.#cut === "refuse") {
        try {
          conn.close();
        } catch {
          // gone
        }
        continue;
      }
      const c = new ClientConn(conn);
      this.#conns.add(c);
      this.#track(this.#serve(c));
    }
  }

  async #serve(c: ClientConn): Promise<void> {
    try {
      for (;;) {
        if (this.#closing !== undefined) break;
        let req: ParsedRequest | null;
        try {
          req = await readRequest(c);
        } catch {
          break;
        }
        if (req === null) break;
        const keep = await this.#handle(c, req);
        if (!keep) break;
      }
    } finally {
      c.close();
      this.#conns.delete(c);
      await c.pump;
    }
  }

  /** Keeps something back until a decision (a rule lifted, a restore, the close, the client gone). */
  #hold(cause: RuleImpl | "cut", c: ClientConn): Promise<Decision> {
    if (this.#closing !== undefined || c.isEnded) return Promise.resolve("drop");
    return new Promise((resolve) => {
      const hold: Hold = {
        cause,
        decide: (d) => {
          this.#holds.delete(hold);
          resolve(d);
        },
      };
      this.#holds.add(hold);
      c.ended.then(() => hold.decide("drop"));
    });
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const signal = this.#stop.signal;
      if (signal.aborted) return resolve();
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done);
    });
  }

  /** Handles one request; false when the connection must be closed. */
  async #handle(c: ClientConn, raw: ParsedRequest): Promise<boolean> {
    let body: unknown;
    if (raw.body.length > 0) {
      try {
        body = JSON.parse(decoder.decode(raw.body));
      } catch {
        body = undefined;
      }
    }
    const path = raw.path;
    const entry: Entry = {
      seq: this.log.length + 1,
      method: raw.method,
      path,
      body,
      ...keysOf(path, body),
      at: performance.now(),
      state: "received",
      forwarded: false,
      delayedMs: 0,
      status: undefined,
      revision: undefined,
      response: undefined,
    };
    this.log.push(entry);
    this.#waiters.notify();

    // Cut off: kept from etcd.
    while (this.#cut !== undefined) {
      if (this.#cut === "refuse") {
        this.#changed(entry, "refused");
        return false;
      }
      this.#changed(entry, "held");
      if ((await this.#hold("cut", c)) === "drop") {
        this.#changed(entry, "dropped");
        return false;
      }
    }
    if (this.#closing !== undefined) {
      this.#changed(entry, "dropped");
      return false;
    }

    // Answered with a fault.
    const failing = this.#rules.find((r) => r.kind === "fail" && r.take(entry));
    if (failing !== undefined) {
      this.#changed(entry, "failed");
      const how = failing.how!;
      if (how === "reset") return false;
      try {
        if (how === "http503") {
          await c.write(fullResponse(503, "text/plain", encoder.encode("Service Unavailable\n")));
        } else {
          const message = how.message ?? `etcdserver: injected failure (gRPC code ${how.grpcCode})`;
          const json = JSON.stringify({ error: message, code: how.grpcCode, message });
          await c.write(
            fullResponse(GRPC_HTTP[how.grpcCode] ?? 500, "application/json", encoder.encode(json)),
          );
        }
      } catch {
        return false;
      }
      return true;
    }

    // Delayed.
    for (const r of this.#rules.filter((r) => r.kind === "delay")) {
      if (!r.take(entry)) continue;
      entry.delayedMs += r.ms;
      await this.#sleep(r.ms);
    }
    if (this.#closing !== undefined) {
      this.#changed(entry, "dropped");
      return false;
    }

    const headers: Record<string, string> = {
      "content-type": raw.headers.get("content-type") ?? "application/json",
    };
    const auth = raw.headers.get("authorization");
    if (auth !== undefined) headers.authorization = auth;
    const upstream = new AbortController();
    const signal = AbortSignal.any([this.#stop.signal, upstream.signal]);
    let res: Response;
    try {
      res = await fetch(this.target + path, {
        method: raw.method,
        headers,
        body: raw.method === "GET" || raw.method === "HEAD" ? undefined : raw.body,
        client: this.#http,
        signal,
      });
    } catch {
      this.#changed(entry, "error");
      return false;
    }
    entry.status = res.status;
    if (path.startsWith("/v3/watch") && res.ok && res.body !== null) {
      return await this.#stream(c, entry, res, upstream);
    }
    let answer: Bytes;
    try {
      answer = new Uint8Array(await res.arrayBuffer());
    } catch {
      this.#changed(entry, "error");
      return false;
    }
    try {
      entry.response = JSON.parse(decoder.decode(answer));
      const header = asObject(asObject(entry.response)?.header) ??
        asObject(asObject(asObject(entry.response)?.result)?.header);
      if (header?.revision !== undefined) entry.revision = Number(header.revision);
    } catch {
      entry.response = decoder.decode(answer);
    }
    this.#changed(entry, "forwarded");

    // Kept from the server.
    const hanging = this.#rules.find((r) => r.kind === "hang" && r.take(entry));
    for (;;) {
      let cause: RuleImpl | "cut" | undefined;
      if (hanging !== undefined && !hanging.lifted) cause = hanging;
      else if (this.#cut === "hang") cause = "cut";
      else if (this.#cut === "refuse" || this.#closing !== undefined) {
        this.#changed(entry, "dropped");
        return false;
      }
      if (cause === undefined) break;
      this.#changed(entry, "withheld");
      if ((await this.#hold(cause, c)) === "drop") {
        this.#changed(entry, "dropped");
        return false;
      }
    }
    try {
      await c.write(
        fullResponse(res.status, res.headers.get("content-type") ?? "application/json", answer),
      );
    } catch {
      this.#changed(entry, "dropped");
      return false;
    }
    this.#changed(entry, "delivered");
    return true;
  }

  #stalled(s: WatchStream): boolean {
    if (this.#cut === "hang") return true;
    for (const r of this.#rules) {
      if (r.kind === "stall" && !r.lifted && r.streams.has(s)) return true;
    }
    return false;
  }

  #closeStream(s: WatchStream): void {
    if (s.closed) return;
    s.closed = true;
    s.upstream.abort();
    s.conn.close();
    s.wake?.();
  }

  /** Relays a watch stream: etcd's bytes are read at once, and written unless stalled. */
  async #stream(
    c: ClientConn,
    entry: Entry,
    res: Response,
    upstream: AbortController,
  ): Promise<boolean> {
    const s: WatchStream = {
      entry,
      conn: c,
      upstream,
      items: [],
      messages: [],
      closed: false,
      wake: undefined,
    };
    this.#streams.add(s);
    for (const r of this.#rules) {
      if (r.kind === "stall" && r.newWatches && !r.lifted) r.takeStream(s);
    }
    s.items.push({
      bytes: responseHead(res.status, {
        "content-type": res.headers.get("content-type") ?? "application/json",
        "transfer-encoding": "chunked",
      }),
      upstreamEnd: 0,
    });
    this.#changed(entry, "forwarded");
    const wake = () => s.wake?.();
    const reader = res.body!.getReader();
    const reading = (async () => {
      let total = 0;
      let text = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          total += value.length;
          text += decoder.decode(value, { stream: true });
          let nl: number;
          while ((nl = text.indexOf("\n")) >= 0) {
            const line = text.slice(0, nl).trim();
            text = text.slice(nl + 1);
            if (line !== "") this.#watchMessage(s, line, total - encoder.encode(text).length);
          }
          const frame = concat(
            encoder.encode(value.length.toString(16) + "\r\n"),
            concat(value, encoder.encode("\r\n")),
          );
          s.items.push({ bytes: frame, upstreamEnd: total });
          wake();
        }
        s.items.push({ bytes: encoder.encode("0\r\n\r\n"), upstreamEnd: total, end: "ok" });
      } catch {
        s.items.push({ bytes: new Uint8Array(0), upstreamEnd: total, end: "error" });
      } finally {
        await reader.cancel().catch(() => {});
        wake();
      }
    })();
    c.ended.then(() => this.#closeStream(s));
    let outcome: "ok" | "error" = "error";
    try {
      for (;;) {
        if (s.closed) break;
        if (s.items.length > 0 && !this.#stalled(s)) {
          const item = s.items.shift()!;
          if (item.bytes.length > 0) await c.write(item.bytes);
          for (const m of s.messages) {
            if (!m.message.delivered && m.end <= item.upstreamEnd) m.message.delivered = true;
          }
          this.#waiters.notify();
          if (item.end !== undefined) {
            outcome = item.end;
            break;
          }
          continue;
        }
        await new Promise<void>((resolve) => s.wake = resolve);
        s.wake = undefined;
      }
    } catch {
      outcome = "error";
    } finally {
      this.#streams.delete(s);
      upstream.abort();
      await reading;
    }
    this.#changed(entry, outcome === "ok" && !s.closed ? "delivered" : "dropped");
    return false; // a watch connection is not reused
  }

  #watchMessage(s: WatchStream, line: string, end: number): void {
    let r: Json | undefined;
    try {
      r = asObject(asObject(JSON.parse(line))?.result);
    } catch {
      return;
    }
    if (r === undefined) return;
    const header = asObject(r.header);
    const message: MutableWatchMessage = {
      stream: s.entry.seq,
      revision: Number(header?.revision ?? 0),
      created: r.created === true,
      canceled: r.canceled === true,
      events: ((r.events as Json[] | undefined) ?? []).map((ev) => {
        const kv = asObject(ev.kv) ?? {};
        return {
          type: ev.type === "DELETE" ? "DELETE" as const : "PUT" as const,
          key: unb64(kv.key),
          modRevision: Number(kv.mod_revision ?? 0),
        };
      }),
      at: performance.now(),
      delivered: false,
    };
    this.watchLog.push(message);
    s.messages.push({ message, end });
    this.#waiters.notify();
  }

  // --- The end

  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // already closed
    }
    this.#stop.abort();
    this.#waiters.cancel("closed");
    for (const r of this.#made) r.cancel();
    for (const h of [...this.#holds]) h.decide("drop");
    for (const s of [...this.#streams]) this.#closeStream(s);
    for (const c of [...this.#conns]) c.close();
    await this.#accepting;
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
    this.#http.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Starts a proxy on 127.0.0.1 and a free port in front of `target` (an etcd client URL).
 *
 * @example
 * ```ts ignore
 * await using proxy = await startEtcdProxy((await sharedEtcd())[0]);
 * await using srv = await startTestServer({ etcd: { endpoints: [proxy.url], prefix } });
 * ```
 */
export function startEtcdProxy(target: string): Promise<EtcdProxy> {
  if (!/^https?:\/\/[^/]+\/?$/.test(target)) {
    throw new Error(`etcd proxy: "${target}" is not an etcd client URL (http://HOST:PORT)`);
  }
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return Promise.resolve(new ProxyImpl(listener, target));
}
