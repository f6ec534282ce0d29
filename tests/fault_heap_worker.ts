/**
 * A lock server hosted in a Worker, whose live JavaScript heap can be measured after a forced
 * garbage collection: the way to tell a leak from memory the process merely keeps (RSS stays
 * near its high-water mark: V8 keeps its grown heap, glibc its freed pages).
 *
 * Messages in: `{ cmd: "start", options }` → `{ port }`; `{ cmd: "heap" }` → `{ heapUsed,
 * external, connections }` after two full collections; `{ cmd: "stop" }` → `{}`.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { type LockServer, type ServerOptions, startServer } from "../lib/server.ts";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;
let server: LockServer | undefined;

self.onmessage = async (e: MessageEvent) => {
  const { cmd, options } = e.data as { cmd: string; options?: ServerOptions };
  if (cmd === "start") {
    server = await startServer({ hostname: "127.0.0.1", port: 0, ...options });
    self.postMessage({ port: server.port });
  } else if (cmd === "heap") {
    // Let closed connections finish their callbacks, then collect twice (weak refs, finalizers).
    await new Promise((r) => setTimeout(r, 50));
    gc();
    await new Promise((r) => setTimeout(r, 0));
    gc();
    const m = Deno.memoryUsage();
    self.postMessage({
      heapUsed: m.heapUsed,
      external: m.external,
      connections: server?.connections ?? 0,
    });
  } else if (cmd === "stop") {
    await server?.close();
    server = undefined;
    self.postMessage({});
  }
};
