/**
 * Shared test fixtures: in-process servers, server subprocesses, raw line-oriented sockets.
 *
 * @module
 */

import { LineReader } from "../lib/lines.ts";
import { type LockServer, type ServerOptions, startServer } from "../lib/server.ts";
import type { LockInfo } from "../lib/protocol.ts";

/** The repository root (where deno.json is). */
export const ROOT: string = new URL("..", import.meta.url).pathname;

/** An in-process server on a free port, disposable. */
export interface TestServer extends AsyncDisposable {
  server: LockServer;
  port: number;
  hostname: string;
}

/** The store `startTestServer` uses: `TCPNETLOCK_TEST_STORE=etcd` runs the tests against etcd. */
export function testStore(): "memory" | "etcd" {
  return Deno.env.get("TCPNETLOCK_TEST_STORE") === "etcd" ? "etcd" : "memory";
}

/**
 * Starts an in-process server on 127.0.0.1 and a free port: `await using srv = await startTestServer()`.
 * With `TCPNETLOCK_TEST_STORE=etcd` it keeps its locks in etcd (one member shared by the test
 * process, see tests/etcd_util.ts), under a prefix of its own.
 */
export async function startTestServer(options: ServerOptions = {}): Promise<TestServer> {
  if (options.etcd === undefined && testStore() === "etcd") {
    const { sharedEtcd } = await import("./etcd_util.ts");
    options = {
      etcd: {
        endpoints: await sharedEtcd(),
        prefix: `/tcpnetlock-test/${crypto.randomUUID().slice(0, 8)}`,
      },
      ...options,
    };
  }
  const server = await startServer({ hostname: "127.0.0.1", port: 0, ...options });
  return {
    server,
    port: server.port,
    hostname: server.hostname,
    [Symbol.asyncDispose]: () => server.close(),
  };
}

/**
 * What `.locks` shows once the store has caught up with its own writes. The etcd store's view
 * comes from its watch, a moment after the reply that granted a lock: read it without waiting and
 * a lock just granted may be missing.
 */
export async function settledLocks(srv: TestServer): Promise<LockInfo[]> {
  await srv.server.table.settled();
  return srv.server.locks();
}

const encoder = new TextEncoder();

/** A raw client socket that writes text and reads lines, as netcat would. */
export class RawClient implements AsyncDisposable {
  readonly conn: Deno.Conn;
  readonly #reader: LineReader;

  private constructor(conn: Deno.Conn) {
    this.conn = conn;
    this.#reader = new LineReader(conn, 1 << 20);
  }

  /** Connects to `port` on `hostname` (default 127.0.0.1). */
  static async connect(port: number, hostname = "127.0.0.1"): Promise<RawClient> {
    return new RawClient(await Deno.connect({ hostname, port }));
  }

  /** Writes `text` as is (add the `\n` yourself). */
  async write(text: string | Uint8Array): Promise<void> {
    const bytes = typeof text === "string" ? encoder.encode(text) : text;
    let done = 0;
    while (done < bytes.length) done += await this.conn.write(bytes.subarray(done));
  }

  /** The next line, or null at end of stream (also null when the peer reset the connection). */
  async line(): Promise<string | null> {
    try {
      const r = await this.#reader.next();
      if (r.kind === "line") return r.line;
      if (r.kind === "eof") return null;
      throw new Error(`unexpected ${r.kind} from the server`);
    } catch (err) {
      if (err instanceof Deno.errors.ConnectionReset) return null;
      throw err;
    }
  }

  /** Reads lines until the server closes; returns them. */
  async rest(): Promise<string[]> {
    const out: string[] = [];
    for (;;) {
      const l = await this.line();
      if (l === null) return out;
      out.push(l);
    }
  }

  /** Sends one request line and reads one reply line. */
  async request(text: string): Promise<string | null> {
    await this.write(text.endsWith("\n") ? text : text + "\n");
    return await this.line();
  }

  close(): void {
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

/** One exchange on a fresh connection: send `text`, return every line until the server closes. */
export async function exchange(
  port: number,
  text: string,
  hostname = "127.0.0.1",
): Promise<string[]> {
  await using c = await RawClient.connect(port, hostname);
  await c.write(text);
  return await c.rest();
}

/** A server running as a subprocess (`deno run -A server.ts ...`). */
export interface ServerProcess extends AsyncDisposable {
  child: Deno.ChildProcess;
  port: number;
  /** Everything it wrote to stderr so far. */
  stderr(): string;
  /** What it wrote to stdout so far (only with `keepStdout`). */
  stdout(): string;
  /** Resolves when stderr has a line matching `re` (rejects after `timeoutMs`). */
  waitForLog(re: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends a signal and waits for the exit status. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/**
 * Starts `server.ts` as a subprocess with `--info --port 0` plus `args` (override the port with
 * `--port`), reads its stderr continuously and resolves once it is listening.
 */
export async function startServerProcess(
  args: string[] = [],
  options: {
    env?: Record<string, string>;
    listen?: string;
    /** Run it under `ulimit -n` this low (bash execs the server: the pid is the server's). */
    fdLimit?: number;
    /** Flags for `deno run` itself (`--v8-flags=...`). */
    denoFlags?: string[];
    /** Leave out `--info` (every lock event logged): the server as it runs by default. */
    quiet?: boolean;
    /** Keep what the server writes on stdout (V8's traces), for `stdout()`. */
    keepStdout?: boolean;
  } = {},
): Promise<ServerProcess> {
  const hasPort = args.includes("--port");
  const limited = options.fdLimit !== undefined;
  const child = new Deno.Command(limited ? "bash" : Deno.execPath(), {
    args: [
      ...(limited ? ["-c", `ulimit -n ${options.fdLimit} && exec "$0" "$@"`, Deno.execPath()] : []),
      "run",
      "-A",
      ...(options.denoFlags ?? []),
      `${ROOT}server.ts`,
      ...(options.quiet ? [] : ["--info"]),
      "--listen",
      options.listen ?? "127.0.0.1",
      ...(hasPort ? [] : ["--port", "0"]),
      ...args,
    ],
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  let out = "";
  const waiters: { re: RegExp; resolve: (l: string) => void }[] = [];
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>, keep: boolean) => {
    for await (const chunk of stream) {
      if (!keep) {
        if (options.keepStdout) out += decoder.decode(chunk, { stream: true });
        continue;
      }
      text += decoder.decode(chunk, { stream: true });
      for (const w of [...waiters]) {
        const m = text.split("\n").find((l) => w.re.test(l));
        if (m !== undefined) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(m);
        }
      }
    }
  };
  const pumps = Promise.all([pump(child.stderr, true), pump(child.stdout, false)]);
  const waitForLog = (re: RegExp, timeoutMs = 10_000): Promise<string> => {
    const m = text.split("\n").find((l) => re.test(l));
    if (m !== undefined) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.splice(waiters.findIndex((w) => w.re === re), 1);
        reject(new Error(`server log never matched ${re}; stderr so far:\n${text}`));
      }, timeoutMs);
      waiters.push({
        re,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
      });
    });
  };
  let status: Promise<Deno.CommandStatus> | undefined;
  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    try {
      child.kill(signal);
    } catch {
      // already exited
    }
    status ??= child.status;
    const s = await status;
    await pumps;
    return s;
  };
  let port = 0;
  try {
    const l = await Promise.race([
      waitForLog(/listening on/),
      child.status.then((s) => {
        throw new Error(`server exited with ${s.code} before listening:\n${text}`);
      }),
    ]);
    port = Number(/:(\d+)\b[^:]*$/.exec(l)?.[1] ?? /:(\d+)/.exec(l)![1]);
  } catch (err) {
    await stop("SIGKILL");
    throw err;
  }
  return {
    child,
    port,
    stderr: () => text,
    stdout: () => out,
    waitForLog,
    stop,
    [Symbol.asyncDispose]: async () => {
      await stop("SIGKILL");
    },
  };
}

/** Resolves when `fn` returns true, checking every `everyMs` (for state only observable by polling). */
export async function until(
  fn: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 5000,
  everyMs = 10,
): Promise<void> {
  const end = performance.now() + timeoutMs;
  while (!(await fn())) {
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** What a {@linkcode Program} printed, and how it ended. */
export interface ProgramOutput {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
}

/** How to run a {@linkcode Program}. */
export interface ProgramOptions {
  /** Added to this process's environment. */
  env?: Record<string, string>;
  cwd?: string;
  /** Pipe stdin, to be fed with `write()` (default: /dev/null). */
  stdin?: boolean;
  /** What error messages call it ("the client ended before ..."); default the command. */
  label?: string;
  /** The default timeout of `until()`; none when not given. */
  timeoutMs?: number;
}

/**
 * A subprocess whose stdout and stderr are read into strings as they come, so that a test can
 * wait for what it printed (`until`), then collect its exit and whole output (`output`).
 * `await using` SIGKILLs it (after `cleanUp()`, a hook for subclasses) and waits for its end.
 */
export class Program implements AsyncDisposable {
  readonly child: Deno.ChildProcess;
  readonly label: string;
  stdout = "";
  stderr = "";
  readonly #waiters: { test: () => boolean; resolve: () => void }[] = [];
  readonly #pumps: Promise<unknown>;
  readonly #status: Promise<Deno.CommandStatus>;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array> | undefined;
  readonly #timeoutMs: number | undefined;
  #stdinClosed = false;

  constructor(command: string, args: string[], options: ProgramOptions = {}) {
    this.label = options.label ?? command;
    this.#timeoutMs = options.timeoutMs;
    this.child = new Deno.Command(command, {
      args,
      env: options.env,
      cwd: options.cwd,
      stdin: options.stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = options.stdin ? this.child.stdin.getWriter() : undefined;
    this.#status = this.child.status;
    this.#pumps = Promise.all([
      this.#pump(this.child.stdout, (t) => this.stdout += t),
      this.#pump(this.child.stderr, (t) => this.stderr += t),
    ]);
  }

  async #pump(stream: ReadableStream<Uint8Array>, add: (text: string) => void): Promise<void> {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      add(text);
      for (const w of [...this.#waiters]) {
        if (w.test()) {
          this.#waiters.splice(this.#waiters.indexOf(w), 1);
          w.resolve();
        }
      }
    }
  }

  /**
   * Resolves once `test` holds on the output; rejects if the program ends first, or after
   * `timeoutMs` (default: the one of the options, else no timeout).
   */
  async until(
    test: (p: this) => boolean,
    what: string,
    timeoutMs: number | undefined = this.#timeoutMs,
  ): Promise<void> {
    if (test(this)) return;
    const seen = Promise.withResolvers<void>();
    const waiter = { test: () => test(this), resolve: seen.resolve };
    this.#waiters.push(waiter);
    const ended = this.#status.then(() => this.#pumps).then(() => {
      if (!test(this)) {
        throw new Error(
          `${this.label} ended before ${what}:\nstdout: ${this.stdout}\nstderr: ${this.stderr}`,
        );
      }
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = timeoutMs === undefined ? [] : [
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          reject(
            new Error(
              `timed out after ${timeoutMs} ms waiting for ${what} from ${this.label}:\n` +
                `stdout: ${this.stdout}\nstderr: ${this.stderr}`,
            ),
          );
        }, timeoutMs);
      }),
    ];
    try {
      await Promise.race([seen.promise, ended, ...late]);
    } finally {
      clearTimeout(timer);
      const i = this.#waiters.indexOf(waiter);
      if (i >= 0) this.#waiters.splice(i, 1);
    }
  }

  /** Writes to the program's stdin (only with `stdin: true`). */
  async write(text: string): Promise<void> {
    if (this.#stdin === undefined) throw new Error(`${this.label} has no piped stdin`);
    await this.#stdin.write(new TextEncoder().encode(text));
  }

  /** Closes the program's stdin, if piped (again is a no-op). */
  async closeStdin(): Promise<void> {
    if (this.#stdin === undefined || this.#stdinClosed) return;
    this.#stdinClosed = true;
    await this.#stdin.close().catch(() => {});
  }

  /** Waits for the exit (not for the processes that may still hold its output). */
  async exited(): Promise<Deno.CommandStatus> {
    return await this.#status;
  }

  /** Waits for the exit, closes stdin, waits for the end of the output. */
  async output(): Promise<ProgramOutput> {
    const status = await this.#status;
    await this.closeStdin();
    await this.#pumps;
    return { code: status.code, signal: status.signal, stdout: this.stdout, stderr: this.stderr };
  }

  kill(signal: Deno.Signal): void {
    this.child.kill(signal);
  }

  /** Run on disposal, once the program was sent SIGKILL: subclasses kill what it left. */
  protected async cleanUp(): Promise<void> {}

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // already ended
    }
    await this.cleanUp();
    await this.output();
  }
}

/** A throwaway CA and a server certificate it signed, for `localhost` and 127.0.0.1. */
export interface TlsFixture {
  /** PEM of the CA certificate (what clients trust). */
  caCert: string;
  /** Paths of the server's PEM certificate and key. */
  certFile: string;
  keyFile: string;
  /** The server certificate and key as PEM text. */
  cert: string;
  key: string;
  /** With `clientAuth`: paths of a client certificate (CN `tcpnetlock`) and its key. */
  clientCertFile?: string;
  clientKeyFile?: string;
}

/**
 * Generates a {@linkcode TlsFixture} in `dir` with openssl (installed by .ci/run). With
 * `clientAuth`, the server certificate may also act as a client (etcd's gateway dials its own
 * gRPC port with it) and a client certificate is made too.
 */
export async function makeTlsFixture(
  dir: string,
  options: { clientAuth?: boolean } = {},
): Promise<TlsFixture> {
  const run = async (args: string[]) => {
    const out = await new Deno.Command("openssl", { args, stdout: "null", stderr: "piped" })
      .output();
    if (!out.success) {
      throw new Error(`openssl ${args[0]} failed: ${new TextDecoder().decode(out.stderr)}`);
    }
  };
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await run([
    "req",
    "-x509",
    ...ec,
    "-days",
    "2",
    "-subj",
    "/CN=tcpnetlock test CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign",
    "-keyout",
    `${dir}/ca.key`,
    "-out",
    `${dir}/ca.pem`,
  ]);
  /** A key and a certificate for `subject` signed by the CA, with these X.509 extensions. */
  const issue = async (name: string, subject: string, extensions: string) => {
    await run([
      "req",
      "-new",
      ...ec,
      "-subj",
      subject,
      "-keyout",
      `${dir}/${name}.key`,
      "-out",
      `${dir}/${name}.csr`,
    ]);
    await Deno.writeTextFile(`${dir}/${name}.cnf`, extensions);
    await run([
      "x509",
      "-req",
      "-in",
      `${dir}/${name}.csr`,
      "-CA",
      `${dir}/ca.pem`,
      "-CAkey",
      `${dir}/ca.key`,
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      `${dir}/${name}.cnf`,
      "-out",
      `${dir}/${name}.pem`,
    ]);
  };
  await issue(
    "server",
    "/CN=localhost",
    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\n" +
      `extendedKeyUsage=serverAuth${options.clientAuth ? ",clientAuth" : ""}\n`,
  );
  let client: Pick<TlsFixture, "clientCertFile" | "clientKeyFile"> = {};
  if (options.clientAuth) {
    await issue(
      "client",
      "/CN=tcpnetlock",
      "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    );
    client = { clientCertFile: `${dir}/client.pem`, clientKeyFile: `${dir}/client.key` };
  }
  return {
    ...client,
    caCert: await Deno.readTextFile(`${dir}/ca.pem`),
    certFile: `${dir}/server.pem`,
    keyFile: `${dir}/server.key`,
    cert: await Deno.readTextFile(`${dir}/server.pem`),
    key: await Deno.readTextFile(`${dir}/server.key`),
  };
}
