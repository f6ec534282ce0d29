/**
 * Hostile input. Property-based tests (fast-check) of the line framing (`LineReader` over an
 * in-memory byte source, with random chunkings, against a reference split) and of the request
 * parser; then a socket fuzzer that throws random and mutated request lines at a real server for
 * a few seconds: every reply must be one the protocol documents, in an order it allows, the
 * server must keep answering, never more holders than a name's limit (shared holders only beside
 * shared ones), and nothing left behind.
 */

import assert from "node:assert/strict";
import fc from "npm:fast-check@4.11.0";
import { type ByteReader, encodeLine, LineReader, type LineResult } from "../lib/lines.ts";
import { formatRequest, parseRequest } from "../lib/protocol.ts";
import { startTestServer, until } from "./test_util.ts";
import { delay, LineConn, ping, query, within } from "./fault_util.ts";
import type { LockInfo, Stats } from "../lib/protocol.ts";

const encoder = new TextEncoder();
const SEED = Number(Deno.env.get("TCPNETLOCK_FUZZ_SEED") ?? Date.now() % 1_000_000);
console.log(`fuzz seed ${SEED} (set TCPNETLOCK_FUZZ_SEED to repeat a run)`);

// --- The line framing

/** An in-memory byte source that hands out its bytes in the given chunk sizes (cycled). */
class ChunkedSource implements ByteReader {
  consumed = 0;
  largestAsk = 0;
  #i = 0;
  constructor(readonly bytes: Uint8Array, readonly chunks: number[]) {}

  read(p: Uint8Array): Promise<number | null> {
    this.largestAsk = Math.max(this.largestAsk, p.length);
    if (this.consumed >= this.bytes.length) return Promise.resolve(null);
    const size = Math.min(this.chunks[this.#i++ % this.chunks.length], p.length);
    const n = Math.min(size, this.bytes.length - this.consumed);
    p.set(this.bytes.subarray(this.consumed, this.consumed + n));
    this.consumed += n;
    return Promise.resolve(n);
  }
}

const fatal = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** What the framing should return for `bytes`, by splitting at every `\n`. */
function referenceSplit(
  bytes: Uint8Array,
  maxLine: number,
): { results: LineResult[]; at: number[] } {
  const results: LineResult[] = [];
  const at: number[] = []; // where each result's line starts
  let start = 0;
  for (;;) {
    const nl = bytes.indexOf(0x0a, start);
    if (nl < 0) {
      at.push(start);
      results.push(bytes.length - start > maxLine ? { kind: "too-long" } : { kind: "eof" });
      return { results, at };
    }
    at.push(start);
    if (nl - start > maxLine) {
      results.push({ kind: "too-long" });
      return { results, at };
    }
    let stop = nl;
    if (stop > start && bytes[stop - 1] === 0x0d) stop--;
    try {
      results.push({ kind: "line", line: fatal.decode(bytes.subarray(start, stop)) });
    } catch {
      results.push({ kind: "invalid-utf8" });
      return { results, at };
    }
    start = nl + 1;
  }
}

/** Bytes of text that is mostly lines: ASCII, CR, LF, multi-byte UTF-8 and broken UTF-8. */
const atom = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 0x20, max: 0x7e }).map((b) => [b]) },
  { weight: 3, arbitrary: fc.constant([0x0a]) },
  { weight: 1, arbitrary: fc.constant([0x0d]) },
  { weight: 1, arbitrary: fc.constant([0x0d, 0x0a]) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      [...encoder.encode("é")],
      [...encoder.encode("€")],
      [...encoder.encode("😀")],
      [0xef, 0xbb, 0xbf], // a BOM, kept
    ),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom([0xff], [0xc3], [0x80], [0xed, 0xa0, 0x80], [0xf0, 0x9f], [0x00]),
  },
);
const textBytes = fc.array(atom, { maxLength: 300 }).map((atoms) => new Uint8Array(atoms.flat()));

Deno.test("LineReader: any chunking gives the lines of a reference split, and the bound holds", async () => {
  await fc.assert(
    fc.asyncProperty(
      textBytes,
      fc.integer({ min: 1, max: 40 }),
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 8 }),
      async (bytes, maxLine, chunks) => {
        const source = new ChunkedSource(bytes, chunks);
        const reader = new LineReader(source, maxLine);
        const { results, at } = referenceSplit(bytes, maxLine);
        for (const [i, want] of results.entries()) {
          const got = await reader.next();
          assert.deepEqual(got, want, `result ${i}`);
          // Never more than maxLine + 1 bytes held or asked for; an over-long line is not read
          // past the limit.
          assert.ok(reader.buffered <= maxLine + 1);
          assert.ok(source.largestAsk <= maxLine + 1);
          if (got.kind === "too-long") assert.ok(source.consumed <= at[i] + maxLine + 1);
        }
        // Once over, it stays over.
        assert.deepEqual(await reader.next(), { kind: "eof" });
      },
    ),
    { seed: SEED, numRuns: 500 },
  );
});

Deno.test("LineReader: buffers given back by dispose() serve later readers, which read the same lines", async () => {
  // maxLine 300: every reader starts with a pooled 256-byte buffer; many readers in a row reuse
  // the buffers of the ones before (with their old bytes still in them).
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.tuple(textBytes, fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1 })), {
        minLength: 1,
        maxLength: 6,
      }),
      async (streams) => {
        for (const [bytes, chunks] of streams) {
          const reader = new LineReader(new ChunkedSource(bytes, chunks), 300);
          for (const [i, want] of referenceSplit(bytes, 300).results.entries()) {
            assert.deepEqual(await reader.next(), want, `result ${i}`);
          }
          reader.dispose();
          assert.deepEqual(await reader.next(), { kind: "eof" });
          assert.equal(reader.nextBuffered(), undefined);
        }
      },
    ),
    { seed: SEED, numRuns: 300 },
  );
});

Deno.test("encodeLine: the UTF-8 of the text and a newline; bytes handed out are never overwritten", () => {
  const encoder = new TextEncoder();
  const given: [string, Uint8Array][] = [];
  fc.assert(
    fc.property(
      fc.oneof(
        fc.string({ maxLength: 40 }),
        fc.string({ unit: "binary", maxLength: 40 }),
        fc.string({ unit: "grapheme", maxLength: 800 }),
        fc.string({ minLength: 600, maxLength: 3000 }),
      ),
      (text) => {
        const bytes = encodeLine(text);
        assert.deepEqual(bytes, encoder.encode(text + "\n"));
        given.push([text, bytes]);
      },
    ),
    { seed: SEED, numRuns: 3000 },
  );
  // Thousands of lines later (several slabs), every earlier result still holds its text.
  for (const [text, bytes] of given) assert.deepEqual(bytes, encoder.encode(text + "\n"));
});

Deno.test("LineReader: a line of exactly maxLine bytes passes, one byte more is too long", async () => {
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 2000 }), fc.boolean(), async (maxLine, cr) => {
      const ok = "a".repeat(cr ? maxLine - 1 : maxLine) + (cr ? "\r" : "") + "\n";
      const r1 = new LineReader(new ChunkedSource(encoder.encode(ok + ok), [7, 1000]), maxLine);
      assert.equal((await r1.next()).kind, "line");
      assert.equal((await r1.next()).kind, "line");
      const long = "a".repeat(maxLine) + (cr ? "\r" : "b") + "\n";
      const r2 = new LineReader(new ChunkedSource(encoder.encode(long), [3, 5000]), maxLine);
      assert.deepEqual(await r2.next(), { kind: "too-long" });
    }),
    { seed: SEED, numRuns: 200 },
  );
});

// --- The request parser

const blank = fc.constantFrom("", " ", "  ", "\t", " \t ");
/** Text without `,` (and, for keys, without `:`), not blank. */
const word = (forKey: boolean) =>
  fc.string({ minLength: 1, maxLength: 12 })
    .filter((s) => !s.includes(",") && !(forKey && s.includes(":")) && s.trim() !== "");

Deno.test("parseRequest: splits at commas, trims, last duplicate wins, empty action or key is null", () => {
  fc.assert(
    fc.property(
      word(false),
      fc.array(
        fc.tuple(
          fc.constantFrom("name", "wait", "ttl", "limit", "mode", "client-id", "auth").chain((k) =>
            fc.oneof(fc.constant(k), word(true))
          ),
          fc.option(fc.string({ maxLength: 12 }).filter((s) => !s.includes(",")), {
            nil: undefined,
          }),
          blank,
          blank,
        ),
        { maxLength: 6 },
      ),
      blank,
      fc.boolean(),
      (action, params, pad, cr) => {
        let line = pad + action + pad;
        const want = new Map<string, string>();
        for (const [key, value, p1, p2] of params) {
          line += `,${p1}${key}${p2}` + (value === undefined ? "" : `:${value}${p1}`);
          want.set(key.trim(), value === undefined ? "" : value.trim());
        }
        if (cr) line += "\r";
        const req = parseRequest(line);
        assert.ok(req !== null, JSON.stringify(line));
        assert.equal(req.action, action.trim());
        assert.deepEqual(req.params, want);
      },
    ),
    { seed: SEED, numRuns: 1000 },
  );
});

Deno.test("parseRequest: never throws; its result always has the documented shape", () => {
  fc.assert(
    fc.property(
      fc.oneof(
        fc.string({ maxLength: 80 }),
        fc.string({ unit: "binary", maxLength: 80 }),
        fc.array(fc.constantFrom("lock", ",", ":", "name", " ", "\r", "", "wait", "1", ".", "é"), {
          maxLength: 20,
        }).map((a) => a.join("")),
      ),
      (line) => {
        const req = parseRequest(line);
        const body = line.endsWith("\r") ? line.slice(0, -1) : line;
        const parts = body.split(",");
        const shouldFail = parts[0].trim() === "" ||
          parts.slice(1).some((p) =>
            (p.includes(":") ? p.slice(0, p.indexOf(":")) : p).trim() === ""
          );
        assert.equal(req === null, shouldFail, JSON.stringify(line));
        if (req === null) return;
        assert.ok(
          req.action !== "" && req.action === req.action.trim() && !req.action.includes(","),
        );
        for (const [k, v] of req.params) {
          assert.ok(k !== "" && k === k.trim() && !k.includes(",") && !k.includes(":"));
          assert.ok(v === v.trim() && !v.includes(","));
        }
      },
    ),
    { seed: SEED, numRuns: 2000 },
  );
});

Deno.test("formatRequest and parseRequest round-trip protocol values", () => {
  const value = fc.oneof(
    fc.stringMatching(/^[a-zA-Z0-9_-]{1,20}$/),
    fc.integer({ min: 0, max: 1e9 }),
    fc.double({ min: 0, max: 1e6, noNaN: true }),
  );
  fc.assert(
    fc.property(
      fc.constantFrom("lock", ".ping", ".stats", ".locks", "release", ".keepalive"),
      fc.dictionary(fc.stringMatching(/^[a-z][a-z-]{0,10}$/), value, { maxKeys: 5 }),
      (action, params) => {
        const line = formatRequest(action, params);
        assert.ok(line.endsWith("\n"));
        const req = parseRequest(line.slice(0, -1));
        assert.ok(req);
        assert.equal(req.action, action);
        assert.deepEqual(
          req.params,
          new Map(Object.entries(params).map(([k, v]) => [k, String(v)])),
        );
      },
    ),
    { seed: SEED, numRuns: 500 },
  );
});

// --- The socket fuzzer

const REASONS = [
  "invalid lock name",
  "invalid client id",
  "invalid wait",
  "invalid ttl",
  "invalid limit",
  "invalid mode",
  "limit mismatch",
  "too many waiters",
  "too many locks",
  "too many connections",
  "unauthorized",
  "forbidden",
];
/** Every reply line the protocol documents (`shutting-down` excluded: the fuzzer never asks). */
const REPLY_RE = new RegExp(
  "^(?:ok|ok,token:\\d+|queued,position:[1-9]\\d*|not-granted|timeout|pong|stats,\\{.*\\}|" +
    "locks,\\[.*\\]|bad-request|bad-action|alive|released|expired|err,(?:" + REASONS.join("|") +
    "))$",
);
/** Replies after which the server closes. */
const LAST = /^(?:not-granted|timeout|pong|stats,.*|locks,.*|bad-request|err,.*|released|expired)$/;

/** Checks one connection's replies against the protocol's order; returns what is wrong. */
function checkReplies(lines: string[]): string | undefined {
  let granted = false;
  let queued = false;
  for (const [i, l] of lines.entries()) {
    if (!REPLY_RE.test(l)) return `undocumented reply ${JSON.stringify(l)}`;
    if (l.startsWith("stats,")) JSON.parse(l.slice(6));
    if (l.startsWith("locks,")) JSON.parse(l.slice(6));
    if (LAST.test(l) && i !== lines.length - 1) return `${l} was not the last reply`;
    if (l === "bad-action" && i === 0) {
      if (lines.length > 1) return "bad-action as the first reply was not the last";
    } else if (["alive", "released", "expired", "bad-action"].includes(l) && !granted) {
      return `${l} before a grant`;
    }
    if (l.startsWith("queued,")) {
      if (granted) return "queued after the grant";
      queued = true;
    }
    if (l === "timeout" && !queued) return "timeout without queued";
    if (l === "ok" || l.startsWith("ok,")) {
      if (granted) return "a second grant";
      granted = true;
    }
  }
  return undefined;
}

const NAMES = ["fz-a", "fz-b", "fz-c"];
/** A lock request that is mostly valid: the fuzzer must also reach grants, queues and holds. */
const goodLock = fc.record({
  name: fc.constantFrom(...NAMES),
  wait: fc.option(fc.constantFrom("0", "0.05", "0.2", "1"), { nil: undefined }),
  ttl: fc.option(fc.constantFrom("0.1", "0.3", "2"), { nil: undefined }),
  limit: fc.option(fc.constantFrom("1", "2"), { nil: undefined }),
  mode: fc.option(fc.constantFrom("shared", "shared", "exclusive"), { nil: undefined }),
  id: fc.option(fc.constantFrom("fuzz-1", "a.b@c"), { nil: undefined }),
}).map((r) =>
  formatRequest("lock", {
    name: r.name,
    wait: r.wait,
    ttl: r.ttl,
    limit: r.limit,
    mode: r.mode,
    "client-id": r.id,
  })
    .slice(0, -1)
);
const anyLine = fc.tuple(
  fc.constantFrom(
    "lock",
    "lock",
    ".ping",
    ".stats",
    ".locks",
    "release",
    ".keepalive",
    "LOCK",
    " ",
  ),
  fc.array(
    fc.oneof(
      fc.constantFrom(...NAMES, "", "bad name", "x".repeat(300), "é").map((v) => `name:${v}`),
      fc.constantFrom("0", "0.05", ".1", "0.3", "5", "-1", "nan", "1e3", "", "9".repeat(400))
        .map((v) => `wait:${v}`),
      fc.constantFrom("0.1", "0.5", "1", "0", "-1", "x", "").map((v) => `ttl:${v}`),
      fc.constantFrom("1", "2", "3", "0", "-1", "1.5", "").map((v) => `limit:${v}`),
      fc.constantFrom("shared", "exclusive", "read", "Shared", "").map((v) => `mode:${v}`),
      fc.constantFrom("fuzz-1", "a.b@c", "bad id", "").map((v) => `client-id:${v}`),
      fc.string({ maxLength: 10 }).filter((s) => !s.includes("\n")),
    ),
    { maxLength: 5 },
  ),
).map(([action, params]) => [action, ...params].join(","));
const validLine = fc.oneof(
  { weight: 3, arbitrary: goodLock },
  { weight: 3, arbitrary: anyLine },
  { weight: 1, arbitrary: fc.constantFrom(".keepalive", "release", "release,name:x", ".ping") },
);

/** A payload: one or more lines, mutated, random bytes, a huge line... */
const payload = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.array(validLine, { minLength: 1, maxLength: 4 }).map((l) =>
      encoder.encode(l.join("\n") + "\n")
    ),
  },
  {
    weight: 2,
    arbitrary: fc.tuple(
      fc.array(validLine, { minLength: 1, maxLength: 3 }),
      fc.array(
        fc.tuple(
          fc.nat(),
          fc.integer({ min: 0, max: 255 }),
          fc.constantFrom("set", "insert", "delete"),
        ),
        {
          minLength: 1,
          maxLength: 6,
        },
      ),
    ).map(([lines, edits]) => {
      const bytes = [...encoder.encode(lines.join("\n") + "\n")];
      for (const [at, b, op] of edits) {
        const i = at % (bytes.length + 1);
        if (op === "set" && i < bytes.length) bytes[i] = b;
        else if (op === "insert") bytes.splice(i, 0, b);
        else if (op === "delete") bytes.splice(i, 1);
      }
      return new Uint8Array(bytes);
    }),
  },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 3000 }) },
  {
    weight: 1,
    arbitrary: fc.tuple(fc.integer({ min: 900, max: 5000 }), fc.boolean()).map(([n, nl]) =>
      encoder.encode("lock,name:" + "z".repeat(n) + (nl ? "\n" : ""))
    ),
  },
  { weight: 1, arbitrary: fc.constant(encoder.encode("")) },
);
const fuzzCase = fc.record({
  payload,
  // What the client does after sending: read to the end, stop writing (half-close), or reset.
  then: fc.constantFrom("read", "read", "read", "half-close", "abort", "abort-midway"),
  readMs: fc.integer({ min: 50, max: 600 }),
});

Deno.test("socket fuzzer: random and mutated requests get documented replies; the server stays well", async () => {
  await using srv = await startTestServer({ maxWait: 0.3, firstLineTimeout: 1 });
  const port = srv.port;
  const DURATION_MS = 4000;
  const WORKERS = 16;
  const problems: string[] = [];
  let connections = 0;
  let lines = 0;
  const words: Record<string, number> = {};
  const end = performance.now() + DURATION_MS;

  const worker = async (w: number) => {
    const cases = fc.sample(fuzzCase, { seed: SEED + w, numRuns: 400 });
    for (const c of cases) {
      if (performance.now() > end) return;
      // Never ask the server to stop.
      if (new TextDecoder().decode(c.payload).includes("server-shutdown")) continue;
      connections++;
      const conn = await LineConn.connect(port);
      try {
        let bytes = c.payload;
        if (c.then === "abort-midway") bytes = bytes.subarray(0, bytes.length >> 1);
        try {
          let done = 0;
          while (done < bytes.length) done += await conn.conn.write(bytes.subarray(done));
        } catch {
          // the server closed first (a bad line): fine, read what it said
        }
        if (c.then.startsWith("abort")) continue;
        if (c.then === "half-close") await conn.conn.closeWrite().catch(() => {});
        const got: string[] = [];
        const reading = (async () => {
          for (;;) {
            const l = await conn.line();
            if (l === null) return;
            got.push(l);
          }
        })();
        // Read until the server closes, or give up after readMs (a holder stays connected).
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([reading, new Promise((r) => timer = setTimeout(r, c.readMs))]);
        clearTimeout(timer);
        conn.close();
        await reading.catch(() => {});
        lines += got.length;
        for (const l of got) {
          const w = l.split(",")[0];
          words[w] = (words[w] ?? 0) + 1;
        }
        const wrong = checkReplies(got);
        if (wrong !== undefined) {
          problems.push(
            `${wrong}; sent ${JSON.stringify(new TextDecoder().decode(bytes).slice(0, 200))}, got ${
              JSON.stringify(got)
            }`,
          );
        }
      } finally {
        conn.close();
      }
    }
  };

  // Meanwhile: the server answers .ping, and never shows more holders than a name's limit.
  let watching = true;
  const watcher = (async () => {
    while (watching) {
      try {
        await ping(port, "127.0.0.1", 2000);
        for (const l of await query<LockInfo[]>(port, ".locks")) {
          // Shared holders may be many; an exclusive one is alone (or within its limit).
          const shared = l.holders.filter((h) => h.mode === "shared").length;
          const mixed = shared > 0 && shared < l.holders.length;
          if (mixed || (shared === 0 && l.holders.length > l.limit)) {
            problems.push(`.locks shows ${JSON.stringify(l)}`);
          }
          const tokens = new Set(l.holders.map((h) => h.token));
          if (tokens.size !== l.holders.length) {
            problems.push(`duplicate tokens ${JSON.stringify(l)}`);
          }
        }
      } catch (err) {
        problems.push(`watcher: ${err instanceof Error ? err.message : err}`);
      }
      await delay(50);
    }
  })();
  await Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
  watching = false;
  await watcher;
  console.log(
    `  seed ${SEED}: ${connections} connections, ${lines} reply lines in ${DURATION_MS} ms: ${
      JSON.stringify(words)
    }`,
  );
  assert.deepEqual(problems.slice(0, 5), [], `seed ${SEED}: ${problems.length} problems`);
  assert.ok(connections > 100, `only ${connections} connections`);

  // The server still answers and holds nothing; every connection goes away.
  assert.deepEqual(await within(query<LockInfo[]>(port, ".locks"), 2000, ".locks"), []);
  await until(() => srv.server.connections === 0, "every fuzz connection to be closed", 5000);
  const stats = await query<Stats>(port, ".stats");
  assert.equal(stats.waiting, 0);
  assert.equal(stats.lock_count, 0);
});
