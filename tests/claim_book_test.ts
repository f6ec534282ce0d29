// The claim book's idle entries, on a fake clock: a name locked and released over and over keeps
// one entry (no map insert and delete per cycle, see lib/store/claim_book.ts), and idle entries
// never count as names in use and never pile up.

import assert from "node:assert/strict";
import { ClaimBook, MIN_IDLE_KEPT } from "../lib/store/claim_book.ts";
import type { ClaimRequest } from "../lib/store/types.ts";
import { FakeClock, flush } from "./_util/fake_clock.ts";
import { Recorder } from "./_util/recorder.ts";

function setup(maxLocks?: number) {
  const clock = new FakeClock();
  const book = new ClaimBook<undefined>({ left: () => {} }, { clock, maxLocks });
  let token = 0;
  const req = (name: string): ClaimRequest => ({
    name,
    limit: 1,
    wait: 0,
    clientId: "",
    remote: "127.0.0.1:1",
  });
  /** Opens a claim on `name` and grants it at once (what the memory store does when free). */
  const hold = (name: string, h = new Recorder()) => {
    const claim = book.open(req(name), h, undefined);
    if (claim.state === "pending") book.grant(claim, ++token);
    return claim;
  };
  return { clock, book, hold };
}

Deno.test("claim book: a name released and locked again reuses its idle entry", async () => {
  const { book, hold } = setup();
  const first = hold("x");
  const entry = book.entry("x");
  assert.ok(entry !== undefined);
  book.end(first, "released");
  assert.equal(book.entry("x"), undefined, "an idle entry is not shown");
  assert.equal(book.size, 0, "an idle entry is not a name in use");
  assert.deepEqual([...book.entries()], []);
  assert.equal(book.idleEntries, 1);
  const h = new Recorder();
  hold("x", h);
  assert.equal(book.entry("x"), entry, "the same entry serves the name again");
  assert.equal(book.idleEntries, 0);
  assert.equal(book.size, 1);
  await flush();
  assert.deepEqual(h.log, ["granted:2"]);
});

Deno.test("claim book: idle entries do not count against --max-locks", async () => {
  const { book, hold } = setup(1);
  book.end(hold("a"), "released");
  const h = new Recorder();
  hold("b", h);
  await flush();
  assert.deepEqual(h.log, ["granted:2"], "the idle entry of a is not a name in use");
  const refused = new Recorder();
  hold("a", refused);
  await flush();
  assert.deepEqual(refused.log, ["refused:too many locks"]);
  assert.equal(book.idleEntries, 1, "a refusal on an idle name leaves the count right");
  assert.equal(book.size, 1);
});

Deno.test("claim book: idle entries are swept after a second idle, and never pile up", async () => {
  const { clock, book, hold } = setup();
  // Many names, each locked once: at most MIN_IDLE_KEPT idle entries stay (more are swept).
  for (let i = 0; i < 3 * MIN_IDLE_KEPT; i++) book.end(hold(`n${i}`), "released");
  assert.ok(book.idleEntries <= MIN_IDLE_KEPT, `${book.idleEntries} idle entries kept`);
  assert.ok(book.idleEntries > 0);
  // A name in use keeps its entry through sweeps; names idle since the sweep before go.
  const busy = hold("busy");
  await clock.advance(1000);
  book.end(hold("tick1"), "released"); // a sweep: it only starts the round
  const afterFirst = book.idleEntries;
  assert.ok(afterFirst > 0, "entries idle for less than a round are kept");
  await clock.advance(1000);
  book.end(hold("tick2"), "released"); // the next sweep: everything idle before it goes
  assert.ok(book.idleEntries <= 2, `${book.idleEntries} idle entries after two sweeps`);
  assert.ok(book.entry("busy") !== undefined);
  book.end(busy, "released");
  assert.equal(book.size, 0);
});

Deno.test("claim book: a grant's wall-clock time reads the same every time (real clock)", async () => {
  const book = new ClaimBook<undefined>({ left: () => {} });
  const claim = book.open(
    { name: "w", limit: 1, wait: 0, clientId: "", remote: "127.0.0.1:1" },
    new Recorder(),
    undefined,
  );
  book.grant(claim, 1);
  const first = claim.grantedWall;
  assert.ok(Math.abs(first - Date.now()) < 1000, "about now");
  // Reads a few ms apart, on both sides of millisecond boundaries: the same value.
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 3));
    assert.equal(claim.grantedWall, first);
  }
  book.end(claim, "released");
  book.close();
});
