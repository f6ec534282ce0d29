/**
 * A small etcd v3 client over the JSON gateway (`POST /v3/...` on a member's client URL) with its
 * own HTTP/1.1 client (`http1.ts`: kept-alive connections, one write and one read per call, where
 * `fetch()` cost the server as much CPU per lock as the lock's own connection): just what the etcd
 * lock store needs. No gRPC, no third-party code.
 *
 * - Keys and values travel base64-encoded; this client takes and returns strings (UTF-8).
 * - etcd's int64 fields arrive as JSON strings. Revisions are parsed with
 *   {@linkcode parseRevision} (BigInt first, then checked to fit a JavaScript number); lease ids
 *   exceed 2^53 and are kept as the decimal strings etcd sends.
 * - Every call has a deadline (it closes the call's connection); on a network error, a timeout or
 *   an error that another member may not have (unavailable, no leader, leader changed) the call
 *   moves on to the next endpoint, and the endpoint that answered is used first from then on.
 * - With a username and password it gets a token from `/v3/auth/authenticate` and sends it in
 *   the `Authorization` header, fetching a new one when etcd says the token is invalid.
 * - With a CA certificate (and optionally a client certificate and key) it speaks TLS
 *   (`Deno.connectTls`).
 *
 * The lock store depends only on the {@linkcode EtcdApi} interface (typed transactions with
 * decoded strings), so its tests can give it a fake etcd.
 *
 * @module
 */

import { Http1Client, Http1Error, type Http1Response } from "./http1.ts";

const NO_HEADERS: Record<string, string> = Object.freeze({}) as Record<string, string>;

/** Options of an {@linkcode EtcdClient}. */
export interface EtcdClientOptions {
  /** Client URLs of the members, e.g. `http://127.0.0.1:2379`. */
  endpoints: string[];
  /** Deadline of one attempt at one endpoint, in ms (default 2000). */
  timeoutMs?: number;
  /** PEM CA certificate(s) to trust for `https://` endpoints. */
  caCert?: string;
  /** PEM client certificate for mutual TLS (with `key`). */
  cert?: string;
  /** PEM private key of `cert`. */
  key?: string;
  /** etcd user (with `password`): authenticates through `/v3/auth/authenticate`. */
  username?: string;
  /** The password of `username`. */
  password?: string;
}

/** One key as etcd returns it, decoded. */
export interface KeyValue {
  key: string;
  value: string;
  createRevision: number;
  modRevision: number;
  /** The lease id (decimal string), `"0"` when none. */
  lease: string;
}

/** A watch event, decoded. */
export interface WatchEvent {
  type: "PUT" | "DELETE";
  kv: KeyValue;
}

/** One response on a watch stream, decoded. */
export interface WatchResponse {
  /** The store's revision when the response was sent. */
  revision: number;
  created: boolean;
  canceled: boolean;
  /** Set when the start revision was compacted away: the watcher must start over. */
  compactRevision: number;
  events: WatchEvent[];
}

/** An error etcd answered with (or a malformed answer). */
export class EtcdError extends Error {
  /** The gRPC status code etcd gave, when it gave one. */
  readonly code: number | undefined;
  constructor(message: string, code?: number, options?: ErrorOptions) {
    super(message, options);
    this.name = "EtcdError";
    this.code = code;
  }
}

/** No endpoint answered in time: etcd is unreachable (or has no leader) from here. */
export class EtcdUnavailableError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "EtcdUnavailableError";
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Printable ASCII only: UTF-8 bytes equal to the char codes (anything else takes the long way). */
const ASCII = /^[ -~]*$/;
/** A Latin-1 string with a char at or above 0x80. */
const HIGH = /[\x80-\xff]/;

/** Base64 of a string's UTF-8 bytes. */
export function b64(text: string): string {
  if (ASCII.test(text)) return btoa(text);
  const bytes = encoder.encode(text);
  let bin = "";
  for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
  return btoa(bin);
}

/** The string whose UTF-8 bytes the base64 text holds ("" for undefined). */
export function unb64(text: string | undefined): string {
  if (text === undefined || text === "") return "";
  const bin = atob(text);
  if (!HIGH.test(bin)) return bin;
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return decoder.decode(bytes);
}

/** The end of the key range that holds every key starting with `prefix` (the last byte + 1). */
export function prefixEnd(prefix: string): string {
  const last = prefix.charCodeAt(prefix.length - 1);
  if (last < 0x7f) return prefix.slice(0, -1) + String.fromCharCode(last + 1);
  const bytes = encoder.encode(prefix);
  for (let i = bytes.length - 1; i >= 0; i--) {
    if (bytes[i] < 0xff) {
      const end = bytes.slice(0, i + 1);
      end[i]++;
      return decoder.decode(end);
    }
  }
  return "\0";
}

/**
 * Parses an int64 etcd sent as a string (a revision, a count, a ttl). Absent means 0. Throws an
 * {@linkcode EtcdError} for anything that is not a whole number from 0 to 2^53 - 1.
 */
export function parseRevision(value: unknown): number {
  if (value === undefined || value === null) return 0;
  const text = typeof value === "number" ? String(value) : value;
  if (typeof text !== "string" || !/^\d{1,20}$/.test(text)) {
    throw new EtcdError(`Malformed number from etcd: ${JSON.stringify(value)}`);
  }
  // Up to 15 digits is below 2^53: exact as a number, no BigInt needed.
  if (text.length <= 15) return Number(text);
  const big = BigInt(text);
  if (big > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new EtcdError(`Number from etcd too large to use safely: ${text}`);
  }
  return Number(big);
}

/** The last lease id parsed (every key of a server carries the same one); none yet at first. */
let lastLease: { text: unknown; id: string } = { text: Symbol("none"), id: "" };

/** A lease id as etcd sent it (decimal string), checked; never converted to a number. */
export function parseLeaseId(value: unknown): string {
  const text = typeof value === "number" ? String(value) : value;
  if (text === lastLease.text) return lastLease.id;
  if (typeof text !== "string" || !/^-?\d{1,20}$/.test(text)) {
    throw new EtcdError(`Malformed lease id from etcd: ${JSON.stringify(value)}`);
  }
  const id = BigInt(text).toString();
  lastLease = { text, id };
  return id;
}

type Json = Record<string, unknown>;

function decodeKv(raw: Json): KeyValue {
  return {
    key: unb64(raw.key as string | undefined),
    value: unb64(raw.value as string | undefined),
    createRevision: parseRevision(raw.create_revision),
    modRevision: parseRevision(raw.mod_revision),
    lease: raw.lease === undefined ? "0" : parseLeaseId(raw.lease),
  };
}

/** Reads `header.revision` of a response. */
export function headerRevision(res: Json): number {
  return parseRevision((res.header as Json | undefined)?.revision);
}

// gRPC codes that another member, or the same one a moment later, may not give.
const RETRY_CODES = new Set([
  1, // canceled
  4, // deadline exceeded
  8, // resource exhausted (too many requests)
  13, // internal (leader changed, ...)
  14, // unavailable (no leader, stopping)
]);
const UNAUTHENTICATED = 16;

/** The parameters of a range request. */
export interface RangeOptions {
  /** The end of the range (exclusive); with `prefix` it is computed. */
  rangeEnd?: string;
  /** Every key starting with the key. */
  prefix?: boolean;
  /** Most keys returned (0: all). */
  limit?: number;
  /** Read at this revision (0: the newest). */
  revision?: number;
  /** Order by create revision, oldest first. */
  byCreate?: boolean;
}

/** A range request as the gateway takes it (inside a transaction too). */
export function rangeRequest(key: string, options: RangeOptions = {}): Json {
  const req: Json = { key: b64(key) };
  const end = options.prefix ? prefixEnd(key) : options.rangeEnd;
  if (end !== undefined) req.range_end = b64(end);
  if (options.limit) req.limit = String(options.limit);
  if (options.revision) req.revision = String(options.revision);
  if (options.byCreate) {
    req.sort_order = "ASCEND";
    req.sort_target = "CREATE";
  }
  return req;
}

/** A decoded range response. */
export interface RangeResult {
  /** The revision the range was read at. */
  revision: number;
  kvs: KeyValue[];
  /** How many keys are in the range (also those past `limit`). */
  count: number;
}

/** Decodes a range response (top-level or inside a transaction). */
export function decodeRange(res: Json, revision = headerRevision(res)): RangeResult {
  const kvs = ((res.kvs as Json[] | undefined) ?? []).map(decodeKv);
  return { revision, kvs, count: parseRevision(res.count) };
}

/**
 * A comparison in a transaction: the key's create revision equals `createRevision` (0: absent).
 * With `prefix`, every key starting with `key` must have it (so `createRevision: 0` means that
 * there is no such key).
 */
export interface Compare {
  /** The key. */
  key: string;
  /** The create revision it must have; 0 means the key must not exist. */
  createRevision: number;
  /** Compare every key that starts with `key`. */
  prefix?: boolean;
}

/** One operation in a transaction. */
export type TxnOp =
  | { put: { key: string; value: string; lease?: string } }
  | { range: { key: string; prefix?: boolean; limit?: number; byCreate?: boolean } }
  | { delete: { key: string } }
  | { txn: Txn };

/** The result of one operation of a transaction, in the order of the operations. */
export type OpResult =
  | { kind: "put" }
  | { kind: "range"; kvs: KeyValue[]; count: number }
  | { kind: "delete"; deleted: number }
  | { kind: "txn"; succeeded: boolean; results: OpResult[] };

/** A transaction: if every comparison holds, `success` runs, else `failure`. */
export interface Txn {
  compare: Compare[];
  success: TxnOp[];
  failure?: TxnOp[];
}

/** What a transaction did. */
export interface TxnResult {
  /** Did every comparison hold? */
  succeeded: boolean;
  /** The store's revision after the transaction (its own, when it wrote). */
  revision: number;
  /** One result per operation that ran. */
  results: OpResult[];
}

/**
 * What the etcd lock store needs from etcd. {@linkcode EtcdClient} implements it over the JSON
 * gateway; tests implement it in memory.
 */
export interface EtcdApi {
  /** Client URLs of the members. */
  readonly endpoints: readonly string[];
  /** Deadline of one attempt, in ms. */
  readonly timeoutMs: number;
  /** A transaction. */
  txn(txn: Txn): Promise<TxnResult>;
  /** Reads a key, or every key with a prefix. */
  range(key: string, options?: RangeOptions): Promise<RangeResult>;
  /** Deletes one key: the revision after, and how many keys went (0 or 1). */
  delete(key: string): Promise<{ revision: number; deleted: number }>;
  /** Grants a lease of `ttl` seconds. */
  leaseGrant(ttl: number): Promise<{ id: string; ttl: number }>;
  /** Renews a lease once: the ttl it has now (0: gone) and the store's revision. */
  leaseKeepAlive(id: string, timeoutMs?: number): Promise<{ ttl: number; revision: number }>;
  /** Revokes a lease (its keys go); a lease already gone is fine. */
  leaseRevoke(id: string, timeoutMs?: number): Promise<void>;
  /**
   * Watches every key starting with `prefix` from `startRevision`, calling `onResponse` for each
   * response until `signal` aborts or `onResponse` returns false; rejects when the stream could
   * not be opened or broke.
   */
  watch(
    prefix: string,
    startRevision: number,
    signal: AbortSignal,
    onResponse: (res: WatchResponse) => boolean | void,
  ): Promise<void>;
  /** Moves on to the next endpoint (after a watch broke). */
  rotate(): void;
  /** Aborts every call in flight. */
  close(): void;
}

/**
 * A transaction as the gateway takes it. Empty lists and `result: EQUAL` (the default) are left
 * out: the gateway parses every field it is sent, and that parsing is much of etcd's work.
 */
function encodeTxn(txn: Txn): Json {
  const out: Json = {};
  if (txn.compare.length > 0) {
    out.compare = txn.compare.map((c) => {
      const cmp: Json = {
        key: b64(c.key),
        target: "CREATE",
        create_revision: String(c.createRevision),
      };
      if (c.prefix) cmp.range_end = b64(prefixEnd(c.key));
      return cmp;
    });
  }
  if (txn.success.length > 0) out.success = txn.success.map(encodeOp);
  if (txn.failure !== undefined && txn.failure.length > 0) out.failure = txn.failure.map(encodeOp);
  return out;
}

function encodeOp(op: TxnOp): Json {
  if ("put" in op) {
    const req: Json = { key: b64(op.put.key), value: b64(op.put.value) };
    if (op.put.lease !== undefined) req.lease = op.put.lease;
    return { request_put: req };
  }
  if ("range" in op) {
    const r = op.range;
    return { request_range: rangeRequest(r.key, r) };
  }
  if ("txn" in op) return { request_txn: encodeTxn(op.txn) };
  return { request_delete_range: { key: b64(op.delete.key) } };
}

/** Decodes a transaction's response (top-level or nested), given the transaction. */
function decodeTxn(
  txn: Txn,
  res: Json,
  revision: number,
): { succeeded: boolean; results: OpResult[] } {
  const succeeded = res.succeeded === true;
  const ops = succeeded ? txn.success : txn.failure ?? [];
  const responses = (res.responses as Json[] | undefined) ?? [];
  return { succeeded, results: ops.map((op, i) => decodeOp(op, responses[i], revision)) };
}

function decodeOp(op: TxnOp, res: Json | undefined, revision: number): OpResult {
  if ("put" in op) return { kind: "put" };
  if ("range" in op) {
    const r = decodeRange((res?.response_range ?? {}) as Json, revision);
    return { kind: "range", kvs: r.kvs, count: r.count };
  }
  if ("txn" in op) {
    return { kind: "txn", ...decodeTxn(op.txn, (res?.response_txn ?? {}) as Json, revision) };
  }
  const d = (res?.response_delete_range ?? {}) as Json;
  return { kind: "delete", deleted: parseRevision(d.deleted) };
}

/**
 * The etcd client. Close it when done (`await using`): it owns an HTTP client with pooled
 * connections.
 */
export class EtcdClient implements EtcdApi, AsyncDisposable {
  readonly endpoints: string[];
  readonly timeoutMs: number;
  #current = 0;
  readonly #http: Http1Client;
  #closed = new AbortController();
  #username: string | undefined;
  #password: string | undefined;
  #token: string | undefined;
  #authenticating: Promise<void> | undefined;

  constructor(options: EtcdClientOptions) {
    if (options.endpoints.length === 0) throw new Error("No etcd endpoint given");
    this.endpoints = options.endpoints.map((e) => e.replace(/\/+$/, ""));
    for (const e of this.endpoints) {
      if (!/^https?:\/\/[^/]+$/.test(e)) {
        throw new Error(`Invalid etcd endpoint "${e}": expected http(s)://HOST:PORT`);
      }
    }
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.#username = options.username;
    this.#password = options.password;
    this.#http = new Http1Client({
      caCerts: options.caCert === undefined ? undefined : [options.caCert],
      cert: options.cert,
      key: options.key,
    });
  }

  /** The endpoint calls go to first (the last one that answered). */
  get endpoint(): string {
    return this.endpoints[this.#current];
  }

  /** A signal that fires when the client is closed. */
  get closedSignal(): AbortSignal {
    return this.#closed.signal;
  }

  /**
   * Posts `body` to `path`, trying each endpoint in turn, round after round (with a short pause
   * between rounds), until one answers or `budgetMs` (default twice the attempt deadline) has
   * passed after a full round: long enough to span a leader election. Throws
   * {@linkcode EtcdError} for an error etcd gave that retrying cannot fix and
   * {@linkcode EtcdUnavailableError} when no endpoint answered in time.
   */
  async call(
    path: string,
    body: Json,
    options: { timeoutMs?: number; budgetMs?: number } = {},
  ): Promise<Json> {
    const n = this.endpoints.length;
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const budgetMs = options.budgetMs ?? 2 * timeoutMs;
    const started = performance.now();
    let last: unknown;
    let reauthed = false;
    for (let attempt = 0;; attempt++) {
      if (this.#closed.signal.aborted) throw new EtcdUnavailableError("The etcd client is closed");
      if (attempt > 0 && attempt % n === 0) {
        if (performance.now() - started >= budgetMs) break;
        await this.#pause(Math.min(400, 50 * 2 ** Math.min(attempt / n, 4)));
      }
      const index = (this.#current + attempt) % n;
      const endpoint = this.endpoints[index];
      try {
        if (this.#username !== undefined && this.#token === undefined) await this.#authenticate();
        const res = await this.#post(endpoint, path, body, timeoutMs);
        this.#current = index;
        return res;
      } catch (err) {
        last = err;
        if (err instanceof EtcdError) {
          if (err.code === UNAUTHENTICATED && this.#username !== undefined && !reauthed) {
            // The token ran out (or the member restarted): get a new one and try again.
            reauthed = true;
            this.#token = undefined;
            attempt--;
            continue;
          }
          if (err.code === undefined || !RETRY_CODES.has(err.code)) throw err;
        }
      }
    }
    const reason = last instanceof Error ? last.message : String(last);
    throw new EtcdUnavailableError(
      `No etcd endpoint answered ${path} (${this.endpoints.join(", ")}): ${reason}`,
      { cause: last },
    );
  }

  async #post(endpoint: string, path: string, body: Json, timeoutMs: number): Promise<Json> {
    if (this.#closed.signal.aborted) {
      throw new EtcdUnavailableError(`${endpoint}: the etcd client is closed`);
    }
    const headers = this.#token === undefined ? NO_HEADERS : { authorization: this.#token };
    let res: Http1Response;
    try {
      res = await this.#http.post(endpoint, path, headers, JSON.stringify(body), timeoutMs);
    } catch (err) {
      throw new EtcdUnavailableError(`${endpoint}: ${errorText(err)}`, { cause: err });
    }
    const text = res.body;
    let json: Json;
    try {
      json = JSON.parse(text);
    } catch {
      if (res.status >= 500) throw new EtcdUnavailableError(`${endpoint}: HTTP ${res.status}`);
      throw new EtcdError(`${endpoint}${path}: HTTP ${res.status}: ${text.slice(0, 200)}`);
    }
    if (res.status < 200 || res.status > 299 || json.error !== undefined) {
      const message = String(json.message ?? json.error ?? `HTTP ${res.status}`);
      const code = typeof json.code === "number" ? json.code : undefined;
      throw new EtcdError(`${endpoint}${path}: ${message}`, code);
    }
    return json;
  }

  #authenticate(): Promise<void> {
    this.#authenticating ??= (async () => {
      try {
        let last: unknown;
        for (let i = 0; i < this.endpoints.length; i++) {
          const index = (this.#current + i) % this.endpoints.length;
          try {
            const res = await this.#post(this.endpoints[index], "/v3/auth/authenticate", {
              name: this.#username,
              password: this.#password ?? "",
            }, this.timeoutMs);
            if (typeof res.token !== "string" || res.token === "") {
              throw new EtcdError("etcd returned no auth token: is auth enabled?");
            }
            this.#token = res.token;
            return;
          } catch (err) {
            last = err;
            if (err instanceof EtcdError && !RETRY_CODES.has(err.code ?? -1)) {
              throw new EtcdError(
                `Cannot authenticate to etcd as "${this.#username}": ${err.message}`,
                err.code,
                { cause: err },
              );
            }
          }
        }
        throw last;
      } finally {
        this.#authenticating = undefined;
      }
    })();
    return this.#authenticating;
  }

  #pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const signal = this.#closed.signal;
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done);
    });
  }

  /** Reads a key or a range. */
  async range(key: string, options: RangeOptions = {}): Promise<RangeResult> {
    return decodeRange(await this.call("/v3/kv/range", rangeRequest(key, options)));
  }

  /** Writes a key, attached to `lease` when given. Returns the revision of the write. */
  async put(key: string, value: string, lease?: string): Promise<number> {
    const req: Json = { key: b64(key), value: b64(value) };
    if (lease !== undefined) req.lease = lease;
    return headerRevision(await this.call("/v3/kv/put", req));
  }

  /** Deletes a key (or every key with a prefix). Returns the revision and how many keys went. */
  async delete(
    key: string,
    options: { prefix?: boolean } = {},
  ): Promise<{ revision: number; deleted: number }> {
    const req: Json = { key: b64(key) };
    if (options.prefix) req.range_end = b64(prefixEnd(key));
    const res = await this.call("/v3/kv/deleterange", req);
    return { revision: headerRevision(res), deleted: parseRevision(res.deleted) };
  }

  /** A transaction (see {@linkcode Txn}). */
  async txn(txn: Txn): Promise<TxnResult> {
    const res = await this.call("/v3/kv/txn", encodeTxn(txn));
    const revision = headerRevision(res);
    return { revision, ...decodeTxn(txn, res, revision) };
  }

  /** Grants a lease of `ttl` seconds; its id stays a string. */
  async leaseGrant(ttl: number): Promise<{ id: string; ttl: number }> {
    const res = await this.call("/v3/lease/grant", { TTL: String(Math.ceil(ttl)) });
    if (res.error) throw new EtcdError(`Cannot grant a lease: ${res.error}`);
    return { id: parseLeaseId(res.ID), ttl: parseRevision(res.TTL) };
  }

  /** Renews a lease once: the ttl etcd gives it now (0 when the lease is gone), and the revision. */
  async leaseKeepAlive(
    id: string,
    timeoutMs?: number,
  ): Promise<{ ttl: number; revision: number }> {
    const res = await this.call("/v3/lease/keepalive", { ID: id }, {
      timeoutMs,
      budgetMs: timeoutMs,
    });
    const result = (res.result ?? res) as Json;
    return { ttl: parseRevision(result.TTL), revision: headerRevision(result) };
  }

  /** Revokes a lease: every key attached to it is deleted. A lease already gone is fine. */
  async leaseRevoke(id: string, timeoutMs?: number): Promise<void> {
    try {
      await this.call("/v3/lease/revoke", { ID: id }, { timeoutMs, budgetMs: timeoutMs });
    } catch (err) {
      if (err instanceof EtcdError && /lease not found/.test(err.message)) return;
      throw err;
    }
  }

  /** The status of one member: its id, the leader's id, its version. */
  async status(endpoint: string): Promise<{ memberId: string; leader: string; version: string }> {
    const res = await this.#post(endpoint, "/v3/maintenance/status", {}, this.timeoutMs);
    return {
      memberId: String((res.header as Json).member_id),
      leader: String(res.leader),
      version: String(res.version),
    };
  }

  /**
   * Opens a watch on every key starting with `prefix` from `startRevision` at the current
   * endpoint and calls `onResponse` for every response until the stream ends, `signal` aborts,
   * or `onResponse` returns false. Resolves when the stream is over; rejects when it could not
   * be opened or broke (the caller reconnects, normally at the next endpoint: see
   * {@linkcode rotate}).
   */
  async watch(
    prefix: string,
    startRevision: number,
    signal: AbortSignal,
    onResponse: (res: WatchResponse) => boolean | void,
  ): Promise<void> {
    if (this.#username !== undefined && this.#token === undefined) await this.#authenticate();
    const endpoint = this.endpoint;
    const headers = this.#token === undefined ? NO_HEADERS : { authorization: this.#token };
    const body = {
      create_request: {
        key: b64(prefix),
        range_end: b64(prefixEnd(prefix)),
        start_revision: String(startRevision),
      },
    };
    let buffered = "";
    const onData = (piece: string): boolean => {
      buffered += piece;
      let nl: number;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const text = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (text === "") continue;
        const json = JSON.parse(text) as Json;
        if (json.error !== undefined) {
          const e = json.error as Json;
          const code = typeof e.grpc_code === "number"
            ? e.grpc_code
            : typeof e.code === "number"
            ? e.code
            : undefined;
          if (code === UNAUTHENTICATED) this.#token = undefined;
          throw new EtcdError(`${endpoint}/v3/watch: ${e.message ?? JSON.stringify(e)}`, code);
        }
        const r = (json.result ?? {}) as Json;
        const response: WatchResponse = {
          revision: headerRevision(r),
          created: r.created === true,
          canceled: r.canceled === true,
          compactRevision: parseRevision(r.compact_revision),
          events: ((r.events as Json[] | undefined) ?? []).map((ev) => ({
            type: ev.type === "DELETE" ? "DELETE" : "PUT",
            kv: decodeKv((ev.kv ?? {}) as Json),
          })),
        };
        if (onResponse(response) === false) return false;
      }
      return true;
    };
    let res: Http1Response | undefined;
    try {
      // The answer must begin within the deadline; then it streams for as long as it lasts.
      res = await this.#http.stream(
        endpoint,
        "/v3/watch",
        headers,
        JSON.stringify(body),
        this.timeoutMs,
        signal,
        onData,
      );
    } catch (err) {
      if (signal.aborted || this.#closed.signal.aborted) return;
      if (err instanceof EtcdError || !(err instanceof Http1Error)) throw err;
      throw new EtcdUnavailableError(`${endpoint}/v3/watch: ${errorText(err)}`, { cause: err });
    }
    if (res !== undefined) {
      if (res.status === 401) this.#token = undefined;
      throw new EtcdError(`${endpoint}/v3/watch: HTTP ${res.status}: ${res.body.slice(0, 200)}`);
    }
  }

  /** Moves on to the next endpoint (after a watch on the current one broke). */
  rotate(): void {
    this.#current = (this.#current + 1) % this.endpoints.length;
  }

  /** Aborts every call in flight and closes the HTTP client. */
  close(): void {
    if (this.#closed.signal.aborted) return;
    this.#closed.abort();
    this.#http.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

function errorText(err: unknown): string {
  if (err instanceof Http1Error && err.timedOut) return "timed out";
  if (err instanceof Error) return err.message.split("\n")[0];
  return String(err);
}
