/**
 * The tcpnetlock wire protocol: constants, request parsing and formatting, reply parsing, and the
 * validation rules shared by the client and the server. See `docs/protocol.md`.
 *
 * This file is imported by URL through `client.ts`: it may import only relative, `node:` and
 * versioned `npm:` specifiers, and it has no third-party dependency.
 *
 * @module
 */

/** The TCP port a server listens on and a client connects to by default. */
export const DEFAULT_PORT = 7654;
/** The host a server listens on and a client connects to by default. */
export const DEFAULT_HOST = "localhost";
/** The default longest request line, in bytes, not counting the `\n`. */
export const DEFAULT_MAX_LINE = 1024;
/** Lock names are at most this many bytes long. */
export const MAX_LOCK_NAME_BYTES = 255;

/** Valid lock names: letters, digits, `_` and `-`. */
export const LOCK_NAME_RE: RegExp = /^[a-zA-Z0-9_-]+$/;
/** Valid client ids: letters, digits, `.`, `@`, `_` and `-`. */
export const CLIENT_ID_RE: RegExp = /^[a-zA-Z0-9.@_-]+$/;

/** Request actions. */
export const Action = {
  LOCK: "lock",
  RELEASE: "release",
  KEEPALIVE: ".keepalive",
  PING: ".ping",
  STATS: ".stats",
  LOCKS: ".locks",
  SHUTDOWN: ".server-shutdown",
  /** Version 3: the first line of a session; `cancel` withdraws one of its waiting requests. */
  SESSION: "session",
  CANCEL: "cancel",
} as const;

/** Reply words (the part of a reply line before the first comma). */
export const Reply = {
  OK: "ok",
  NOT_GRANTED: "not-granted",
  QUEUED: "queued",
  TIMEOUT: "timeout",
  EXPIRED: "expired",
  RELEASED: "released",
  ALIVE: "alive",
  PONG: "pong",
  STATS: "stats",
  LOCKS: "locks",
  SHUTTING_DOWN: "shutting-down",
  BAD_ACTION: "bad-action",
  BAD_REQUEST: "bad-request",
  ERR: "err",
  /** Version 3: the reply to `session`, and to `cancel,id:ID`. */
  SESSION: "session",
  CANCELLED: "cancelled",
} as const;

/** The reasons an `err,REASON` reply can carry. */
export const ErrorReason = {
  INVALID_LOCK_NAME: "invalid lock name",
  INVALID_CLIENT_ID: "invalid client id",
  INVALID_WAIT: "invalid wait",
  INVALID_TTL: "invalid ttl",
  INVALID_LIMIT: "invalid limit",
  INVALID_MODE: "invalid mode",
  LIMIT_MISMATCH: "limit mismatch",
  TOO_MANY_WAITERS: "too many waiters",
  TOO_MANY_LOCKS: "too many locks",
  TOO_MANY_CONNECTIONS: "too many connections",
  UNAUTHORIZED: "unauthorized",
  FORBIDDEN: "forbidden",
  /** Version 3 (sessions): a request id that is missing, malformed, live already, or not live. */
  INVALID_ID: "invalid id",
  DUPLICATE_ID: "duplicate id",
  UNKNOWN_ID: "unknown id",
} as const;

/** The protocol version a `session` reply names. */
export const SESSION_VERSION = 3;
/** Valid request ids of a session: 1 to 32 letters, digits, `_` and `-`. */
export const SESSION_ID_RE: RegExp = /^[a-zA-Z0-9_-]{1,32}$/;

/** One of the {@linkcode ErrorReason} strings. */
export type ErrorReasonText = typeof ErrorReason[keyof typeof ErrorReason];

/** A parsed request line: the action and its parameters (later duplicates win). */
export interface Request {
  /** The action, white space trimmed, e.g. `lock`. */
  action: string;
  /** The parameters, keys and values trimmed; a parameter without `:` has the empty value. */
  params: Map<string, string>;
}

/**
 * Parses one request line (without its `\n`; a trailing `\r` is ignored).
 *
 * Returns `null` for a line the protocol calls a bad request: an empty action or an empty key.
 *
 * @example Parse a lock request
 * ```ts
 * import { parseRequest } from "./protocol.ts";
 * const req = parseRequest("lock, name: db ,client-id:web-1\r");
 * console.log(req?.action, req?.params.get("name")); // lock db
 * ```
 */
export function parseRequest(line: string): Request | null {
  // One pass with indexOf: no array of parts, and trim() only where a blank can be (requests
  // are parsed once per line, the hottest path of the server).
  let end = line.length;
  if (end > 0 && line.charCodeAt(end - 1) === CR) end--;
  let comma = line.indexOf(",");
  if (comma < 0 || comma > end) comma = end;
  const action = trimmed(line, 0, comma);
  if (action === "") return null;
  const params = new Map<string, string>();
  for (let at = comma + 1; at <= end; at = comma + 1) {
    comma = line.indexOf(",", at);
    if (comma < 0 || comma > end) comma = end;
    const colon = line.indexOf(":", at);
    let key: string;
    let value = "";
    if (colon < 0 || colon > comma) {
      key = trimmed(line, at, comma);
    } else {
      key = trimmed(line, at, colon);
      value = trimmed(line, colon + 1, comma);
    }
    if (key === "") return null;
    params.set(key, value);
  }
  return { action, params };
}

const CR = 0x0d;

/** `line.slice(from, to).trim()`, without the trim when the ends are not blank. */
function trimmed(line: string, from: number, to: number): string {
  const part = line.slice(from, to);
  if (part === "") return part;
  return isBlank(part.charCodeAt(0)) || isBlank(part.charCodeAt(part.length - 1))
    ? part.trim()
    : part;
}

/** Whether a code unit is one that `String.prototype.trim` could remove (a quick over-guess). */
function isBlank(c: number): boolean {
  return c <= 0x20 || c === 0xa0 || c >= 0x1680;
}

/**
 * Formats a request line (with its `\n`). Parameters whose value is `undefined` are left out.
 *
 * @example
 * ```ts
 * import { formatRequest } from "./protocol.ts";
 * formatRequest("lock", { name: "db", wait: 5 }); // "lock,name:db,wait:5\n"
 * ```
 */
export function formatRequest(
  action: string,
  params: Record<string, string | number | undefined> = {},
): string {
  let line = action;
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined) continue;
    line += `,${key}:${value}`;
  }
  return line + "\n";
}

/** A parsed reply line: the first word and what follows the first comma. */
export interface ReplyLine {
  /** The reply word, e.g. `ok`, `queued`, `err`. */
  word: string;
  /** Everything after the first comma (`""` when there is none). */
  rest: string;
  /** `rest` read as `key:value` fields (empty for `err`, `stats` and `locks`, whose rest is not fields). */
  fields: Map<string, string>;
}

/**
 * Parses one reply line from a server (without its `\n`).
 *
 * @example
 * ```ts
 * import { parseReply } from "./protocol.ts";
 * parseReply("ok,token:42").fields.get("token"); // "42"
 * ```
 */
export function parseReply(line: string): ReplyLine {
  if (line.endsWith("\r")) line = line.slice(0, -1);
  const comma = line.indexOf(",");
  const word = comma < 0 ? line : line.slice(0, comma);
  const rest = comma < 0 ? "" : line.slice(comma + 1);
  const fields = new Map<string, string>();
  if (rest !== "" && word !== Reply.ERR && word !== Reply.STATS && word !== Reply.LOCKS) {
    for (const part of rest.split(",")) {
      const colon = part.indexOf(":");
      fields.set(colon < 0 ? part : part.slice(0, colon), colon < 0 ? "" : part.slice(colon + 1));
    }
  }
  return { word, rest, fields };
}

/** True when `name` is a valid lock name: the pattern {@linkcode LOCK_NAME_RE}, at most 255 bytes. */
export function isValidLockName(name: string): boolean {
  // The pattern is ASCII-only, so the string length is the byte length.
  return name.length <= MAX_LOCK_NAME_BYTES && LOCK_NAME_RE.test(name);
}

/** True when `id` is a valid client id: the pattern {@linkcode CLIENT_ID_RE}. */
export function isValidClientId(id: string): boolean {
  return id.length <= MAX_LOCK_NAME_BYTES && CLIENT_ID_RE.test(id);
}

const DECIMAL_RE = /^(?:\d+(?:\.\d*)?|\.\d+)$/;

/**
 * Reads a protocol decimal (`5`, `1.5`, `.5`, `2.`): returns the number, or `undefined` when the
 * text is not a plain non-negative decimal (`5s`, `-1`, `nan`, `1e3`, empty).
 */
export function parseDecimal(text: string): number | undefined {
  if (!DECIMAL_RE.test(text)) return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : undefined;
}

/** Reads a whole number ≥ 1 written in decimal digits; `undefined` otherwise. */
export function parsePositiveInt(text: string): number | undefined {
  if (!/^\d+$/.test(text)) return undefined;
  const value = Number(text);
  return Number.isSafeInteger(value) && value >= 1 ? value : undefined;
}

/**
 * The mode of a lock request (`mode:` on a `lock` line): `exclusive` (the default) holds the
 * name alone, `shared` holds it beside other shared holders (a readers–writer lock).
 */
export type LockMode = "shared" | "exclusive";

/** The values of `mode:` a server accepts. */
export const LOCK_MODES: readonly LockMode[] = ["shared", "exclusive"];

/**
 * One entry of the `.locks` reply: a name that is held or waited on.
 */
export interface LockInfo {
  /** The lock name. */
  name: string;
  /** How many holders the name allows at once (1 unless `limit:N` was given). */
  limit: number;
  /** How many connections wait in the queue for it. */
  waiting: number;
  /** How many of them wait for a shared hold (servers with shared locks). */
  waiting_shared?: number;
  /** How many of them wait for an exclusive hold (servers with shared locks). */
  waiting_exclusive?: number;
  /** Who holds it, in grant order. */
  holders: HolderInfo[];
}

/** One holder in a {@linkcode LockInfo}. */
export interface HolderInfo {
  /** The client id the holder gave, or `""` when it gave none. */
  client_id: string;
  /** The fencing token of this grant. */
  token: number;
  /** When the lock was granted, ISO 8601 in UTC. */
  since: string;
  /** The holder's address as the server sees it, `ip:port` (`[ip6]:port` for IPv6). */
  remote: string;
  /** How it holds the name (servers with shared locks). */
  mode?: "shared" | "exclusive";
}

/**
 * The `.stats` reply. The first five keys are those of tcpnetlock 0.1.8; the rest are version 2.
 */
export interface Stats {
  /** Names currently held. */
  lock_count: number;
  /** The server's peak resident memory in kilobytes (as `getrusage` reports it). */
  maxrss: number;
  /** Connections accepted since the start. */
  requests_count: number;
  /** Grants since the start. */
  lock_acquired_count: number;
  /** `not-granted` and `timeout` answers since the start. */
  lock_not_acquired_count: number;
  /** Open connections. */
  connections?: number;
  /** Connections waiting in a queue. */
  waiting?: number;
  /** Leases that ran out since the start. */
  lock_expired_count?: number;
  /** Seconds since the server started. */
  uptime_s?: number;
  /** The server's version. */
  version?: string;
  /** Other keys a newer server may add. */
  [key: string]: unknown;
}
