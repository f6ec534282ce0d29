/**
 * client.ts is meant to be imported by URL: its whole import graph must load from a plain web
 * server, with no import map, no JSR, no npm. These tests serve the checkout over http:// and use
 * client.ts from a separate `deno` process with an empty DENO_DIR, allowed to import from that
 * server only.
 */

import assert from "node:assert/strict";
import { ROOT, startTestServer } from "./test_util.ts";

/** The files client.ts may pull in (the command line's module only when run as a program). */
const LIBRARY = [
  "/client.ts",
  "/lib/protocol.ts",
  "/lib/lines.ts",
  "/lib/errors.ts",
  "/lib/client_session.ts",
  "/lib/client_util.ts",
];
const CLI = "/lib/client_cli.ts";
/** What the command line imports besides the library (lazily, only when run as a program). */
const CLI_PARTS = [CLI, "/lib/holders.ts"];

/** The checkout served over http on a free port; records the paths asked for. */
class Checkout implements AsyncDisposable {
  readonly requested: string[] = [];
  readonly #http: Deno.HttpServer<Deno.NetAddr>;

  constructor() {
    this.#http = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      async (request) => {
        const path = decodeURIComponent(new URL(request.url).pathname);
        this.requested.push(path);
        if (path.includes("..") || !path.endsWith(".ts")) {
          return new Response(null, { status: 404 });
        }
        try {
          const body = await Deno.readFile(`${ROOT}${path.slice(1)}`);
          return new Response(body, {
            headers: { "content-type": "application/typescript; charset=utf-8" },
          });
        } catch {
          return new Response(null, { status: 404 });
        }
      },
    );
  }

  get base(): string {
    return `http://127.0.0.1:${this.#http.addr.port}`;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#http.shutdown();
  }
}

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `deno run` in an empty temporary directory with a fresh DENO_DIR, no config, no npm, and
 * imports allowed from `base` only. `script`, if given, is written there as `main.ts` and run.
 * There is no --allow-env and no --allow-read: the client must do without them.
 */
async function runFresh(base: string, args: string[], script?: string): Promise<Output> {
  const dir = await Deno.makeTempDir();
  try {
    if (script !== undefined) await Deno.writeTextFile(`${dir}/main.ts`, script);
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--no-config",
        "--no-lock",
        "--no-npm",
        `--allow-import=${new URL(base).host}`,
        "--allow-net=127.0.0.1",
        ...(script === undefined ? args : ["--check=all", `${dir}/main.ts`, ...args]),
      ],
      env: { DENO_DIR: `${dir}/deno_dir`, NO_COLOR: "1" },
      stdin: "null",
      cwd: dir,
    }).output();
    const text = new TextDecoder();
    return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("client.ts imported by URL type-checks, takes and releases a lock, and loads only its own files", async () => {
  await using srv = await startTestServer();
  await using checkout = new Checkout();
  const script = `
    import { LockClient, LockNotGrantedError } from "${checkout.base}/client.ts";
    const client = new LockClient({ host: "127.0.0.1", port: Number(Deno.args[0]) });
    const lock = await client.lock("by-url", { wait: 0 });
    console.log("token:" + lock.token);
    try {
      await client.lock("by-url");
    } catch (e) {
      console.log(e instanceof LockNotGrantedError ? "not-granted" : String(e));
    }
    await lock.release();
    console.log("released");
  `;
  const out = await runFresh(checkout.base, [String(srv.port)], script);
  assert.equal(out.code, 0, out.stderr);
  const [token, notGranted, released] = out.stdout.trimEnd().split("\n");
  assert.match(token, /^token:\d+$/);
  assert.equal(notGranted, "not-granted");
  assert.equal(released, "released");
  assert.deepEqual(srv.server.locks(), []);
  for (const path of LIBRARY) assert.ok(checkout.requested.includes(path), `${path} not loaded`);
  for (const path of checkout.requested) {
    assert.ok(LIBRARY.includes(path) || CLI_PARTS.includes(path), `unexpected request for ${path}`);
  }
});

Deno.test("client.ts run by URL is the command line", async () => {
  await using srv = await startTestServer();
  await using checkout = new Checkout();
  const out = await runFresh(checkout.base, [
    `${checkout.base}/client.ts`,
    "--host",
    "127.0.0.1",
    "--port",
    String(srv.port),
    "ping",
  ]);
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout, "pong\n");
  assert.ok(checkout.requested.includes(CLI));
});
