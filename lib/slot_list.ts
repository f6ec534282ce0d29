/**
 * A set of objects kept in an array, each object holding its own index (its slot): adding and
 * deleting allocate nothing and replace nothing.
 *
 * For the server's long-lived registries that gain and lose an entry per connection (every open
 * connection, the holders whose socket options are due). A `Set` there cost the garbage
 * collector dearly: it replaces its hash table every few operations, V8 keeps a replaced table
 * linked to the next one, and once one of those tables sat in the old generation, the later
 * tables and the connections they pointed to survived young collections and were promoted. With
 * one connection per lock that was 300-500 KB promoted per scavenge and ~5 µs of collection per
 * cycle (`--trace-gc-nvp`; tests/gc_promotion_test.ts). The claim book keeps its name entries
 * for the same reason (`store/claim_book.ts`).
 *
 * @example
 * ```ts
 * import { SlotList } from "./slot_list.ts";
 * const open = new SlotList<"slot", { slot: number; name: string }>("slot");
 * const a = { slot: -1, name: "a" };
 * open.add(a);
 * open.delete(a); // a.slot is -1 again
 * ```
 *
 * @module
 */

/** An array of objects that know their index in it (`item[key]`, -1 when not in the list). */
export class SlotList<K extends string, T extends Record<K, number>> {
  readonly #key: K;
  #items: T[] = [];

  /** @param key the field of each item that holds its index here (-1: not in the list) */
  constructor(key: K) {
    this.#key = key;
  }

  /** How many items are in the list. */
  get size(): number {
    return this.#items.length;
  }

  /** Whether `item` is in the list. */
  has(item: T): boolean {
    const i = item[this.#key];
    return i >= 0 && i < this.#items.length && this.#items[i] === item;
  }

  /** Adds `item` (nothing when it is in already). */
  add(item: T): void {
    if (this.has(item)) return;
    (item as Record<K, number>)[this.#key] = this.#items.length;
    this.#items.push(item);
  }

  /** Takes `item` out (the last item moves into its place); false when it was not in. */
  delete(item: T): boolean {
    if (!this.has(item)) return false;
    const i = item[this.#key];
    const last = this.#items.pop()!;
    if (last !== item) {
      this.#items[i] = last;
      (last as Record<K, number>)[this.#key] = i;
    }
    (item as Record<K, number>)[this.#key] = -1;
    return true;
  }

  /** The items, in no particular order (a copy: the list may change meanwhile). */
  toArray(): T[] {
    return this.#items.slice();
  }

  /** Takes every item out and returns them. */
  drain(): T[] {
    const items = this.#items;
    this.#items = [];
    for (const item of items) (item as Record<K, number>)[this.#key] = -1;
    return items;
  }

  /**
   * Calls `fn` for every item. `fn` may delete the item it is given (the items not yet visited
   * stay in place: they are visited from the end).
   */
  forEach(fn: (item: T) => void): void {
    for (let i = this.#items.length - 1; i >= 0; i--) {
      if (i < this.#items.length) fn(this.#items[i]);
    }
  }
}
