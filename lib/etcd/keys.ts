/**
 * How the etcd store lays out its keys and what their values say.
 *
 * - `PREFIX/NAME/SERVER-...`: one key per request (holder or waiter) of lock NAME, written by
 *   server SERVER, attached to that server's lease. Its value is a JSON {@linkcode KeyInfo}. The
 *   server's first request on a name writes the name's reusable key `SERVER-~GEN` (written again
 *   by a later request once deleted), the requests beside it keys of their own `SERVER-SEQ`
 *   (SEQ in base 36, which has no `~`).
 * - `PREFIX/!hb/SERVER`: a server's heartbeat key, written to check that its watch still
 *   delivers (`!` is never in a lock name, so it is never taken for one).
 *
 * @module
 */

import type { LockMode } from "../protocol.ts";

/** What a lock key's value says. */
export interface KeyInfo {
  /** The writer's unique id for the request (`SERVER-SEQ`: the key may be a reused one). */
  owner: string;
  /** The write's slot in its batch (its token is `revision × 128 + slot`). */
  slot: number;
  /** The request's limit. */
  limit: number;
  /** `shared` for a shared request (left out for an exclusive one): every server applies it. */
  mode?: LockMode;
  /** The client id (`""` when none). */
  client_id: string;
  /** The client's address as its server saw it. */
  remote: string;
  /** When the request was written, or (once granted after a wait) when it was granted. */
  since: string;
  /** Set by the grant write of a request that waited: its token is that write's revision. */
  granted?: boolean;
}

/** The segment that marks heartbeat keys. */
export const HEARTBEAT_SEGMENT = "!hb";

/**
 * Encodes a key's value. Fields at the value {@linkcode parseInfo} reads when they are absent
 * (`slot` 0, `limit` 1, `client_id` "") are left out: every byte is parsed by etcd's gateway,
 * stored, and sent to every server's watch.
 */
export function encodeInfo(info: KeyInfo): string {
  let text = `{"owner":${JSON.stringify(info.owner)}`;
  if (info.slot !== 0) text += `,"slot":${info.slot}`;
  if (info.limit !== 1) text += `,"limit":${info.limit}`;
  if (info.mode !== undefined) text += `,"mode":${JSON.stringify(info.mode)}`;
  if (info.client_id !== "") text += `,"client_id":${JSON.stringify(info.client_id)}`;
  text += `,"remote":${JSON.stringify(info.remote)},"since":${JSON.stringify(info.since)}`;
  if (info.granted === true) text += `,"granted":true`;
  return text + "}";
}

/** Decodes a key's value; a value that is not ours reads as a limit-1 holder with no details. */
export function parseInfo(value: string): KeyInfo {
  try {
    const v = JSON.parse(value);
    const limit = Number.isSafeInteger(v.limit) && v.limit >= 1 ? v.limit : 1;
    const slot = Number.isSafeInteger(v.slot) && v.slot >= 0 && v.slot < 128 ? v.slot : 0;
    const info: KeyInfo = {
      owner: String(v.owner ?? ""),
      slot,
      limit,
      client_id: typeof v.client_id === "string" ? v.client_id : "",
      remote: typeof v.remote === "string" ? v.remote : "",
      since: typeof v.since === "string" ? v.since : new Date(0).toISOString(),
      granted: v.granted === true ? true : undefined,
    };
    if (v.mode === "shared") info.mode = "shared";
    return info;
  } catch {
    return {
      owner: "",
      slot: 0,
      limit: 1,
      client_id: "",
      remote: "",
      since: new Date(0).toISOString(),
    };
  }
}

/**
 * The lock name of a key under `root` (`PREFIX/`), or undefined for a key that is not a lock
 * key (a heartbeat, or something else under the prefix).
 */
export function nameOf(root: string, key: string): string | undefined {
  if (!key.startsWith(root)) return undefined;
  const slash = key.indexOf("/", root.length);
  if (slash < 0) return undefined;
  const name = key.slice(root.length, slash);
  return name === HEARTBEAT_SEGMENT ? undefined : name;
}

/** The last segment of a key (`SERVER-SEQ` or `SERVER-~GEN` for a lock key). */
export function ownerOf(key: string): string {
  return key.slice(key.lastIndexOf("/") + 1);
}
