/**
 * The errors the tcpnetlock client throws. Every one extends {@linkcode TcpNetLockError}, names
 * the server (`host:port`) and, where there is one, the lock, so a message alone tells a person
 * what failed where.
 *
 * This file is imported by URL through `client.ts`: it may import only relative, `node:` and
 * versioned `npm:` specifiers, and it has no third-party dependency.
 *
 * @module
 */

import { ErrorReason } from "./protocol.ts";

/** The facts every tcpnetlock error may carry. */
export interface TcpNetLockErrorOptions extends ErrorOptions {
  /** The server as `host:port`. */
  server?: string;
  /** The lock concerned, if any. */
  lockName?: string;
}

/**
 * The base class of every error the tcpnetlock client throws.
 *
 * @example Tell tcpnetlock errors from others
 * ```ts
 * import { LockClient, TcpNetLockError } from "@x/tcpnetlock/client";
 * try {
 *   await new LockClient({ port: 1 }).ping();
 * } catch (e) {
 *   if (e instanceof TcpNetLockError) console.error(`${e.server}: ${e.message}`);
 * }
 * ```
 */
export class TcpNetLockError extends Error {
  /** The server as `host:port`, or `undefined` when the error is not about a server. */
  readonly server: string | undefined;
  /** The lock concerned, or `undefined` when the error is not about a lock. */
  readonly lockName: string | undefined;

  /**
   * Makes an error with a message and the facts about it.
   *
   * @param message the full message, sentence case, no trailing period
   * @param options the server, the lock and the cause
   */
  constructor(message: string, options: TcpNetLockErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.server = options.server;
    this.lockName = options.lockName;
  }
}

/**
 * The server could not be reached: the connection was refused, timed out, the host did not
 * resolve, or the TLS handshake failed. Nothing was sent, so it is always safe to retry.
 *
 * @example
 * ```ts
 * import { LockClient, ServerUnreachableError } from "@x/tcpnetlock/client";
 * try {
 *   await new LockClient({ port: 1 }).ping();
 * } catch (e) {
 *   if (e instanceof ServerUnreachableError && e.refused) console.error("is the server running?");
 * }
 * ```
 */
export class ServerUnreachableError extends TcpNetLockError {
  /** True when the server's host actively refused the connection (nothing listens on the port). */
  readonly refused: boolean;

  /**
   * Makes the error for an unreachable server.
   *
   * @param server the server as `host:port`
   * @param what why, e.g. `connection refused`
   * @param options `refused` and the underlying error as `cause`
   */
  constructor(server: string, what: string, options: { refused?: boolean; cause?: unknown } = {}) {
    super(`Cannot connect to tcpnetlock server "${server}": ${what}`, {
      server,
      cause: options.cause,
    });
    this.refused = options.refused ?? false;
  }
}

/**
 * The connection to the server closed or failed while a reply was awaited, or while a lock was
 * held (the server stopped or restarted, the network failed). A held lock is gone: the server
 * frees a lock the moment its connection closes.
 *
 * @example
 * ```ts
 * import { ConnectionLostError, LockClient } from "@x/tcpnetlock/client";
 * const lock = await new LockClient().lock("db");
 * lock.signal.addEventListener("abort", () => {
 *   if (lock.signal.reason instanceof ConnectionLostError) console.error("server went away");
 * });
 * ```
 */
export class ConnectionLostError extends TcpNetLockError {}

/**
 * The server sent something the client did not expect (the line is quoted in the message and
 * kept in {@linkcode ProtocolError.line}). Usually a server of another version, or not a
 * tcpnetlock server at all.
 *
 * @example
 * ```ts
 * import { ProtocolError } from "@x/tcpnetlock/client";
 * const e = new ProtocolError('Unexpected reply "hello" from "localhost:7654"', "hello");
 * console.log(e.line); // hello
 * ```
 */
export class ProtocolError extends TcpNetLockError {
  /** The line the server sent, or `undefined` when the problem was not a line (e.g. too long). */
  readonly line: string | undefined;

  /**
   * Makes the error for an unexpected reply.
   *
   * @param message the full message
   * @param line the offending line
   * @param options the server, the lock and the cause
   */
  constructor(message: string, line?: string, options: TcpNetLockErrorOptions = {}) {
    super(message, options);
    this.line = line;
  }
}

/**
 * The lock is held by another client and the request did not wait (`wait` absent or 0).
 *
 * @example
 * ```ts
 * import { LockClient, LockNotGrantedError } from "@x/tcpnetlock/client";
 * try {
 *   await using lock = await new LockClient().lock("nightly-report");
 *   // ... the work
 * } catch (e) {
 *   if (!(e instanceof LockNotGrantedError)) throw e;
 *   console.log("another instance is running the report");
 * }
 * ```
 */
export class LockNotGrantedError extends TcpNetLockError {}

/**
 * The lock was still taken when the `wait` ran out (or the server's `--max-wait` cap did).
 *
 * @example
 * ```ts
 * import { LockClient, LockTimeoutError } from "@x/tcpnetlock/client";
 * try {
 *   await using lock = await new LockClient().lock("db", { wait: 5 });
 * } catch (e) {
 *   if (e instanceof LockTimeoutError) console.error(e.message);
 * }
 * ```
 */
export class LockTimeoutError extends TcpNetLockError {}

/**
 * The lease (`ttl`) of a held lock ran out: the server sent `expired` and freed the lock, or no
 * keepalive was confirmed within the ttl, so the client gave the lock up itself.
 *
 * @example
 * ```ts
 * import { LockClient, LockExpiredError } from "@x/tcpnetlock/client";
 * const lock = await new LockClient().lock("db", { ttl: 10 });
 * lock.signal.addEventListener("abort", () => {
 *   if (lock.signal.reason instanceof LockExpiredError) console.error("lease ran out");
 * });
 * await lock.release();
 * ```
 */
export class LockExpiredError extends TcpNetLockError {}

/**
 * The server answered `err,REASON` (e.g. `limit mismatch`, `unauthorized`, `too many waiters`).
 *
 * @example
 * ```ts
 * import { LockClient, ServerError } from "@x/tcpnetlock/client";
 * try {
 *   await new LockClient().stats();
 * } catch (e) {
 *   if (e instanceof ServerError && e.reason === "unauthorized") console.error("set an auth token");
 * }
 * ```
 */
export class ServerError extends TcpNetLockError {
  /** The reason as the server wrote it, e.g. `limit mismatch`. */
  readonly reason: string;

  /**
   * Makes the error for an `err,REASON` reply.
   *
   * @param message the full message
   * @param reason the text after `err,`
   * @param options the server and the lock
   */
  constructor(message: string, reason: string, options: TcpNetLockErrorOptions = {}) {
    super(message, options);
    this.reason = reason;
  }
}

/**
 * A lock name the protocol does not allow: it must be 1 to 255 letters, digits, `_` and `-`.
 * Thrown before anything is sent.
 *
 * @example
 * ```ts
 * import { InvalidLockNameError, LockClient } from "@x/tcpnetlock/client";
 * try {
 *   await new LockClient().lock("my lock");
 * } catch (e) {
 *   console.log(e instanceof InvalidLockNameError); // true
 * }
 * ```
 */
export class InvalidLockNameError extends TcpNetLockError {
  /**
   * Makes the error for a bad lock name.
   *
   * @param name the rejected name
   */
  constructor(name: string) {
    super(
      `Invalid lock name "${shorten(name)}": use 1 to 255 letters, digits, "_" and "-"`,
      { lockName: name },
    );
  }
}

/**
 * A client id the protocol does not allow: it must be 1 to 255 letters, digits, `.`, `@`, `_`
 * and `-`. Thrown before anything is sent.
 *
 * @example
 * ```ts
 * import { InvalidClientIdError, LockClient } from "@x/tcpnetlock/client";
 * try {
 *   new LockClient({ clientId: "web 1" });
 * } catch (e) {
 *   console.log(e instanceof InvalidClientIdError); // true
 * }
 * ```
 */
export class InvalidClientIdError extends TcpNetLockError {
  /** The rejected client id. */
  readonly clientId: string;

  /**
   * Makes the error for a bad client id.
   *
   * @param clientId the rejected client id
   */
  constructor(clientId: string) {
    super(
      `Invalid client id "${
        shorten(clientId)
      }": use 1 to 255 letters, digits, ".", "@", "_" and "-"`,
    );
    this.clientId = clientId;
  }
}

/** A value for a message: long ones are cut, the full value stays in the error's fields. */
function shorten(value: string): string {
  return value.length <= 80 ? value : `${value.slice(0, 77)}...`;
}

const RETRIABLE_REASONS: ReadonlySet<string> = new Set([
  ErrorReason.TOO_MANY_CONNECTIONS,
  ErrorReason.TOO_MANY_WAITERS,
  ErrorReason.TOO_MANY_LOCKS,
]);

/**
 * True when trying the same call again later may succeed: the server was unreachable, the
 * connection was lost, the lock was taken, the wait ran out, the lease ran out, or the server was
 * at one of its limits (`too many connections`, `too many waiters`, `too many locks`). False for
 * mistakes that repeat: invalid names, bad auth, limit mismatch, protocol errors, and anything
 * that is not a tcpnetlock error.
 *
 * @example Retry with back-off
 * ```ts
 * import { isRetriableError, LockClient } from "@x/tcpnetlock/client";
 * const client = new LockClient();
 * for (let attempt = 1; ; attempt++) {
 *   try {
 *     await using lock = await client.lock("db", { wait: 10 });
 *     break; // ... the work, then done
 *   } catch (e) {
 *     if (!isRetriableError(e) || attempt === 5) throw e;
 *     await new Promise((r) => setTimeout(r, 1000 * attempt));
 *   }
 * }
 * ```
 */
export function isRetriableError(error: unknown): boolean {
  if (error instanceof ServerError) return RETRIABLE_REASONS.has(error.reason);
  return error instanceof ServerUnreachableError ||
    error instanceof ConnectionLostError ||
    error instanceof LockNotGrantedError ||
    error instanceof LockTimeoutError ||
    error instanceof LockExpiredError;
}
