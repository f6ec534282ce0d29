/**
 * tcpnetlock: a network lock service. A small server keeps named locks; a client takes one by
 * opening a TCP connection and holds it for as long as the connection lives. Waiting in a fair
 * queue, fencing tokens, leases and semaphores come on top of the original tcpnetlock protocol.
 *
 * @example Take a lock, do the work, let it go
 * ```ts
 * import { LockClient } from "@x/tcpnetlock";
 * const client = new LockClient({ host: "localhost", port: 7654 });
 * await using lock = await client.lock("django-migrations", { wait: 60 });
 * console.log(`holding with fencing token ${lock.token}`);
 * ```
 *
 * @example Run a server in-process
 * ```ts
 * import { startServer } from "@x/tcpnetlock";
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
  type EtcdServerOptions,
  ListenError,
  type LockServer,
  type ServerOptions,
  startServer,
} from "./lib/server.ts";
export type {
  ClaimHandler,
  ClaimRequest,
  ClaimState,
  ClaimView,
  EndReason,
  LockStore,
  Refusal,
  StoreCounters,
  StoreEvent,
} from "./lib/store/types.ts";
export type { TokenSource } from "./lib/tokens.ts";
export type { EtcdClientOptions } from "./lib/etcd/client.ts";
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
