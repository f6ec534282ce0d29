// The lock stores' failure paths through a real server: a state file that cannot be written, at
// start-up and mid-run. (The etcd store's are in tests/etcd_faults_test.ts.)

import assert from "node:assert/strict";
import { TokenSequence, type TokenSource } from "../lib/tokens.ts";
import { exchange, RawClient, ROOT, startTestServer } from "./test_util.ts";

Deno.test("a state file that cannot be written stops the server at start-up: exit 2, its name said", async () => {
  // Nobody, root included, can create a file in /proc.
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}server.ts`, "--port", "0", "--state-file", "/proc/tnl-mark"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(20_000),
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 2, stderr);
  assert.match(stderr, /Cannot write the state file "\/proc\/tnl-mark"/);
  assert.doesNotMatch(stderr, /listening on/);
});

/** Tokens that can be made to fail, as a state file on a disk that goes away would. */
class FailingTokens implements TokenSource {
  failing = false;
  #inner = new TokenSequence();
  next(): number {
    if (this.failing) throw new Error(`Cannot write the state file "x": No space left on device`);
    return this.#inner.next();
  }
  get last(): number {
    return this.#inner.last;
  }
  get issued(): number {
    return this.#inner.issued;
  }
}

Deno.test("a token that cannot be taken mid-run is answered err,store unavailable; nothing is left behind", async () => {
  const tokens = new FailingTokens();
  await using srv = await startTestServer({ tokens, maxLocks: 2 });
  await using holder = await RawClient.connect(srv.port);
  assert.match((await holder.request("lock,name:a,ttl:0.3,wait:0"))!, /^ok,token:\d+$/);
  await using waiter = await RawClient.connect(srv.port);
  assert.equal(await waiter.request("lock,name:a,wait:30"), "queued,position:1");
  tokens.failing = true;
  // A request, version 1 or 2, gets an answer (not a silent close).
  assert.deepEqual(await exchange(srv.port, "lock,name:b\n"), ["err,store unavailable"]);
  assert.deepEqual(await exchange(srv.port, "lock,name:c,wait:0\n"), ["err,store unavailable"]);
  // The holder's lease runs out on the store's timer: the hand-over cannot take a token, the
  // waiter is told so, and the server stays up.
  assert.equal(await holder.line(), "expired");
  assert.equal(await waiter.line(), "err,store unavailable");
  assert.deepEqual(await exchange(srv.port, ".locks\n"), ["locks,[]"]);
  tokens.failing = false;
  // Refused names did not count against --max-locks (2).
  await using d = await RawClient.connect(srv.port);
  await using e = await RawClient.connect(srv.port);
  assert.match((await d.request("lock,name:d,wait:0"))!, /^ok,token:/);
  assert.match((await e.request("lock,name:e,wait:0"))!, /^ok,token:/);
  assert.equal(srv.server.table.holders, 2);
});
