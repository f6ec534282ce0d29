/**
 * tcpnetlock: a network lock service. A small server keeps named locks; a client takes one by
 * opening a TCP connection and holds it for as long as the connection lives. Waiting in a fair
 * queue, fencing tokens, leases and semaphores come on top of the original tcpnetlock protocol.
 *
 * This entry point is the client only: it pulls in no server, no logging and no etcd code. The
 * server library is at `@x/tcpnetlock/server` (`startServer`), the command runner at
 * `@x/tcpnetlock/do`.
 *
 * @example Take a lock, do the work, let it go
 * ```ts
 * import { LockClient } from "@x/tcpnetlock";
 * const client = new LockClient({ host: "localhost", port: 7654 });
 * await using lock = await client.lock("django-migrations", { wait: 60 });
 * console.log(`holding with fencing token ${lock.token}`);
 * ```
 *
 * @example Run a server in-process (from the `./server` entry point)
 * ```ts
 * import { startServer } from "@x/tcpnetlock/server";
 * await using server = await startServer({ port: 0 });
 * console.log(server.port);
 * ```
 *
 * @module
 */

export {
  type HeldLock,
  LockClient,
  type LockClientOptions,
  type LockContext,
  type LockOptions,
  type LockTransport,
  type RequestOptions,
} from "./client.ts";
export {
  ConnectionLostError,
  InvalidClientIdError,
  InvalidLockNameError,
  isRetriableError,
  LockExpiredError,
  LockNotGrantedError,
  LockTimeoutError,
  ProtocolError,
  ServerError,
  ServerUnreachableError,
  TcpNetLockError,
} from "./lib/errors.ts";
export {
  DEFAULT_HOST,
  DEFAULT_PORT,
  type HolderInfo,
  isValidClientId,
  isValidLockName,
  type LockInfo,
  type Stats,
} from "./lib/protocol.ts";
export { VERSION } from "./lib/version.ts";
