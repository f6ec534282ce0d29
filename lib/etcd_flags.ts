/**
 * The server's flags for the lock store: `--store memory|etcd` and the etcd connection
 * (`--etcd-*`), each also from a `TCPNETLOCK_*` environment variable.
 *
 * @module
 */

import {
  choiceFlag,
  env,
  type FlagSpec,
  type FlagValues,
  intFlag,
  readFlagFile,
  secondsFlag,
  UsageError,
} from "./cli.ts";
import type { EtcdServerOptions } from "./server.ts";

/** The default etcd endpoint (etcd's own default client URL). */
export const DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379";
/** The default key prefix. */
export const DEFAULT_ETCD_PREFIX = "/tcpnetlock";
/** The default lease ttl in seconds. */
export const DEFAULT_ETCD_LEASE_TTL = 10;

/** The store flags, for the server's flag list. */
export const STORE_FLAGS: FlagSpec[] = [
  {
    name: "store",
    type: "string",
    arg: "memory|etcd",
    env: "TCPNETLOCK_STORE",
    default: "memory",
    help: "keep the locks in this process, or in etcd (shared by every server on it)",
  },
  {
    name: "etcd-endpoints",
    type: "string",
    arg: "URL[,URL...]",
    env: "TCPNETLOCK_ETCD_ENDPOINTS",
    default: DEFAULT_ETCD_ENDPOINT,
    help: "client URLs of the etcd members (--store etcd)",
  },
  {
    name: "etcd-prefix",
    type: "string",
    arg: "PREFIX",
    env: "TCPNETLOCK_ETCD_PREFIX",
    default: DEFAULT_ETCD_PREFIX,
    help: "the etcd keys of the locks start with this; servers sharing locks share it",
  },
  {
    name: "etcd-lease-ttl",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_ETCD_LEASE_TTL",
    default: String(DEFAULT_ETCD_LEASE_TTL),
    help: "a dead server's locks pass on within this; unreachable etcd this long ends holds",
  },
  {
    name: "etcd-timeout",
    type: "string",
    arg: "SECONDS",
    env: "TCPNETLOCK_ETCD_TIMEOUT",
    default: "2",
    help: "deadline of one etcd request at one endpoint (then the next endpoint is tried)",
  },
  {
    name: "etcd-ca-cert",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_ETCD_CA_CERT",
    help: "trust this PEM CA for https:// etcd endpoints",
  },
  {
    name: "etcd-cert",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_ETCD_CERT",
    help: "PEM client certificate for etcd (mutual TLS; needs --etcd-key)",
  },
  {
    name: "etcd-key",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_ETCD_KEY",
    help: "the PEM private key of --etcd-cert",
  },
  {
    name: "etcd-username",
    type: "string",
    arg: "NAME",
    env: "TCPNETLOCK_ETCD_USERNAME",
    help: "etcd user (needs --etcd-password-file or TCPNETLOCK_ETCD_PASSWORD)",
  },
  {
    name: "etcd-password-file",
    type: "string",
    arg: "FILE",
    env: "TCPNETLOCK_ETCD_PASSWORD_FILE",
    help: "file holding the password of --etcd-username",
  },
];

const ETCD_ONLY = STORE_FLAGS.map((f) => f.name).filter((n) => n.startsWith("etcd-"));

/**
 * Reads the store flags: undefined for the memory store, else the etcd options. Throws
 * {@linkcode UsageError} for bad values, for `--etcd-*` without `--store etcd`, and for
 * `--state-file` with it.
 */
export function storeFromFlags(values: FlagValues): EtcdServerOptions | undefined {
  const store = choiceFlag(values, "store", ["memory", "etcd"] as const) ?? "memory";
  const password = env("TCPNETLOCK_ETCD_PASSWORD");
  if (store === "memory") {
    const given = ETCD_ONLY.find((n) => values[n] !== undefined);
    if (given !== undefined) {
      throw new UsageError(`--${given} is for the etcd store: add --store etcd`);
    }
    return undefined;
  }
  if (values["state-file"] !== undefined) {
    throw new UsageError(
      "--state-file is for the memory store: with --store etcd the tokens are etcd revisions",
    );
  }
  const endpointsText = String(values["etcd-endpoints"] ?? DEFAULT_ETCD_ENDPOINT);
  const endpoints = endpointsText.split(",").map((s) => s.trim()).filter((s) => s !== "");
  if (endpoints.length === 0) throw new UsageError("--etcd-endpoints is empty");
  for (const e of endpoints) {
    if (!/^https?:\/\/[^/\s]+\/?$/.test(e)) {
      throw new UsageError(
        `Invalid value for --etcd-endpoints: "${e}" (expected http://HOST:PORT or https://HOST:PORT)`,
      );
    }
  }
  const prefix = String(values["etcd-prefix"] ?? DEFAULT_ETCD_PREFIX).trim();
  if (!/^\/?[^\s]*[^\s/]$/.test(prefix)) {
    throw new UsageError(
      `Invalid value for --etcd-prefix: "${prefix}" (expected a key prefix like /tcpnetlock)`,
    );
  }
  const options: EtcdServerOptions = {
    endpoints,
    prefix,
    leaseTtl: intFlag(values, "etcd-lease-ttl", 1, 3600) ?? DEFAULT_ETCD_LEASE_TTL,
  };
  const timeout = secondsFlag(values, "etcd-timeout");
  if (timeout !== undefined) options.timeoutMs = Math.max(1, Math.round(timeout * 1000));
  const ca = values["etcd-ca-cert"] as string | undefined;
  if (ca !== undefined) options.caCert = readFlagFile(ca, "the etcd CA certificate");
  const cert = values["etcd-cert"] as string | undefined;
  const key = values["etcd-key"] as string | undefined;
  if ((cert === undefined) !== (key === undefined)) {
    throw new UsageError("--etcd-cert and --etcd-key go together: give both or neither");
  }
  if (cert !== undefined && key !== undefined) {
    options.cert = readFlagFile(cert, "the etcd client certificate");
    options.key = readFlagFile(key, "the etcd client key");
  }
  const username = values["etcd-username"] as string | undefined;
  const passwordFile = values["etcd-password-file"] as string | undefined;
  if (username !== undefined) {
    if (passwordFile !== undefined) {
      options.password = readFlagFile(passwordFile, "the etcd password file").replace(
        /\r?\n$/,
        "",
      );
    } else if (password !== undefined) {
      options.password = password;
    } else {
      throw new UsageError(
        "--etcd-username needs --etcd-password-file (or TCPNETLOCK_ETCD_PASSWORD)",
      );
    }
    options.username = username;
  } else if (passwordFile !== undefined) {
    throw new UsageError("--etcd-password-file needs --etcd-username");
  }
  if (endpoints.some((e) => e.startsWith("http://")) && options.caCert !== undefined) {
    throw new UsageError("--etcd-ca-cert is for https:// endpoints");
  }
  return options;
}
