// The slot list (lib/slot_list.ts): a set kept in an array, each item knowing its index.

import assert from "node:assert/strict";
import { SlotList } from "../lib/slot_list.ts";

interface Item {
  slot: number;
  name: string;
}

const item = (name: string): Item => ({ slot: -1, name });
const names = (list: SlotList<"slot", Item>) => list.toArray().map((i) => i.name).sort();

Deno.test("slot list: add, has, delete keep every item's slot right", () => {
  const list = new SlotList<"slot", Item>("slot");
  const [a, b, c] = [item("a"), item("b"), item("c")];
  list.add(a);
  list.add(b);
  list.add(c);
  list.add(b); // twice: once
  assert.equal(list.size, 3);
  assert.ok(list.delete(a), "a was in");
  assert.equal(a.slot, -1);
  assert.ok(!list.has(a));
  assert.ok(!list.delete(a), "deleting twice says false");
  assert.deepEqual(names(list), ["b", "c"]);
  // The last item moved into a's place and knows it.
  for (const [i, x] of list.toArray().entries()) assert.equal(x.slot, i);
  assert.ok(list.has(b) && list.has(c));
});

Deno.test("slot list: an item of another list with the same slot number is not in this one", () => {
  const one = new SlotList<"slot", Item>("slot");
  const a = item("a");
  one.add(a);
  const stranger = item("x");
  stranger.slot = 0;
  assert.ok(!one.has(stranger));
  assert.ok(!one.delete(stranger));
  assert.equal(one.size, 1);
});

Deno.test("slot list: forEach may delete the item it is given; drain empties the list", () => {
  const list = new SlotList<"slot", Item>("slot");
  const items = Array.from({ length: 10 }, (_, i) => item(`i${i}`));
  for (const x of items) list.add(x);
  const seen: string[] = [];
  list.forEach((x) => {
    seen.push(x.name);
    if (Number(x.name.slice(1)) % 2 === 0) list.delete(x);
  });
  assert.deepEqual(seen.sort(), items.map((x) => x.name).sort(), "every item seen once");
  assert.deepEqual(names(list), ["i1", "i3", "i5", "i7", "i9"]);
  const drained = list.drain();
  assert.equal(drained.length, 5);
  assert.equal(list.size, 0);
  assert.ok(drained.every((x) => x.slot === -1));
  list.add(drained[0]);
  assert.equal(drained[0].slot, 0, "a drained item can come back");
});
