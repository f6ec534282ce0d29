/**
 * Direct reads and writes on an etcd member through its JSON gateway, for tests that check what
 * etcd really holds (never through a tcpnetlock server or a proxy). Self-contained on purpose:
 * it does not import the server's etcd client, so that a check does not share the code it checks.
 *
 * @example
 * ```ts ignore
 * import { etcdRange } from "./_util/etcd_kv.ts";
 * const { kvs } = await etcdRange("http://127.0.0.1:2379", "/tcpnetlock/db/");
 * console.log(kvs.map((kv) => kv.key));
 * ```
 *
 * @module
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Base64 of a string's UTF-8 bytes, as the gateway takes keys and values. */
export function b64(text: string): string {
  const bytes = encoder.encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

/** The string whose UTF-8 bytes the base64 text holds ("" for undefined or malformed input). */
export function unb64(text: unknown): string {
  if (typeof text !== "string" || text === "") return "";
  try {
    const bin = atob(text);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return decoder.decode(bytes);
  } catch {
    return "";
  }
}

/** The end of the range of every key that starts with `prefix` (its last byte + 1). */
export function prefixRangeEnd(prefix: string): string {
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

/** One key as etcd holds it. */
export interface StoredKey {
  key: string;
  value: string;
  createRevision: number;
  modRevision: number;
  /** The lease id (decimal string), "0" when none. */
  lease: string;
}

/** POSTs `body` to `path` on `endpoint`; returns the JSON answer, throws on an HTTP error. */
export async function etcdCall(
  endpoint: string,
  path: string,
  body: unknown,
  timeoutMs = 5000,
): Promise<Record<string, unknown>> {
  const res = await fetch(endpoint.replace(/\/+$/, "") + path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`etcd ${path}: HTTP ${res.status}: ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

function revisionOf(res: Record<string, unknown>): number {
  return Number((res.header as Record<string, unknown> | undefined)?.revision ?? 0);
}

/** Every key starting with `prefix`, oldest first, and the revision they were read at. */
export async function etcdRange(
  endpoint: string,
  prefix: string,
): Promise<{ revision: number; kvs: StoredKey[] }> {
  const res = await etcdCall(endpoint, "/v3/kv/range", {
    key: b64(prefix),
    range_end: b64(prefixRangeEnd(prefix)),
    sort_order: "ASCEND",
    sort_target: "CREATE",
  });
  const kvs = ((res.kvs as Record<string, unknown>[] | undefined) ?? []).map((kv) => ({
    key: unb64(kv.key),
    value: unb64(kv.value),
    createRevision: Number(kv.create_revision ?? 0),
    modRevision: Number(kv.mod_revision ?? 0),
    lease: String(kv.lease ?? "0"),
  }));
  return { revision: revisionOf(res), kvs };
}

/** Deletes every key starting with `prefix`; returns how many went. */
export async function etcdDeletePrefix(endpoint: string, prefix: string): Promise<number> {
  const res = await etcdCall(endpoint, "/v3/kv/deleterange", {
    key: b64(prefix),
    range_end: b64(prefixRangeEnd(prefix)),
  });
  return Number(res.deleted ?? 0);
}
