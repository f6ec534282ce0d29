/**
 * A set that keeps its oldest member in a field of its own and only the others in a `Set`: a set
 * that mostly holds one member at a time (the holder of an exclusive lock, the one request being
 * decided) adds and deletes without touching a hash table.
 *
 * Why: a V8 `Set` that becomes empty shrinks its hash table, and grows it again on the next add,
 * each time allocating a new table, and a long-lived set's new tables are allocated in the old
 * generation. The claim book's per-name sets live as long as their name is in use, so each lock
 * and release left two dead tables there: a few MB a second under load, and a full collection
 * about every second (heap sampling of major-GC garbage; tests/small_set_test.ts).
 *
 * Iteration is in insertion order, as a `Set`'s.
 *
 * @example
 * ```ts
 * import { SmallSet } from "./small_set.ts";
 * const s = new SmallSet<string>();
 * s.add("a").add("b");
 * s.delete("a");
 * console.log([...s], s.first()); // ["b"] "b"
 * ```
 *
 * @module
 */

/** A set of (mostly) one member: see the module doc. */
export class SmallSet<T> implements Iterable<T> {
  #one: T | undefined = undefined;
  #hasOne = false;
  /** The members added while `#one` was taken (or while this held any), oldest first. */
  #more: Set<T> | undefined = undefined;

  /** How many members. */
  get size(): number {
    return (this.#hasOne ? 1 : 0) + (this.#more?.size ?? 0);
  }

  /** Whether `x` is a member. */
  has(x: T): boolean {
    return (this.#hasOne && this.#one === x) || (this.#more !== undefined && this.#more.has(x));
  }

  /** Adds `x` (nothing when it is a member already). */
  add(x: T): this {
    if (this.has(x)) return this;
    // The field holds the oldest member: only when the set is empty does a new member go there.
    if (!this.#hasOne && (this.#more === undefined || this.#more.size === 0)) {
      this.#one = x;
      this.#hasOne = true;
    } else {
      (this.#more ??= new Set()).add(x);
    }
    return this;
  }

  /** Takes `x` out; false when it was not a member. */
  delete(x: T): boolean {
    if (this.#hasOne && this.#one === x) {
      this.#one = undefined;
      this.#hasOne = false;
      return true;
    }
    return this.#more !== undefined && this.#more.delete(x);
  }

  /** The oldest member, or undefined when empty. */
  first(): T | undefined {
    if (this.#hasOne) return this.#one;
    if (this.#more !== undefined) { for (const x of this.#more) return x; }
    return undefined;
  }

  /** The members, oldest first. */
  *[Symbol.iterator](): IterableIterator<T> {
    if (this.#hasOne) yield this.#one as T;
    if (this.#more !== undefined) yield* this.#more;
  }
}

/**
 * A map that keeps its oldest entry in fields of its own and only the others in a `Map`, for the
 * same reason as {@linkcode SmallSet}: a session that mostly has one lock at a time.
 *
 * @example
 * ```ts
 * import { SmallMap } from "./small_set.ts";
 * const m = new SmallMap<string, number>();
 * m.set("a", 1).set("b", 2);
 * m.delete("a");
 * console.log(m.get("b"), m.size); // 2 1
 * ```
 */
export class SmallMap<K, V> {
  #key: K | undefined = undefined;
  #value: V | undefined = undefined;
  #hasOne = false;
  /** The entries set while the fields were taken (or while this held any), oldest first. */
  #more: Map<K, V> | undefined = undefined;

  /** How many entries. */
  get size(): number {
    return (this.#hasOne ? 1 : 0) + (this.#more?.size ?? 0);
  }

  /** Whether `key` has an entry. */
  has(key: K): boolean {
    return (this.#hasOne && this.#key === key) || (this.#more !== undefined && this.#more.has(key));
  }

  /** The value of `key`, or undefined. */
  get(key: K): V | undefined {
    if (this.#hasOne && this.#key === key) return this.#value;
    return this.#more?.get(key);
  }

  /** Sets the value of `key` (in place when it has an entry already). */
  set(key: K, value: V): this {
    if (this.#hasOne && this.#key === key) {
      this.#value = value;
    } else if (!this.#hasOne && (this.#more === undefined || this.#more.size === 0)) {
      this.#key = key;
      this.#value = value;
      this.#hasOne = true;
    } else {
      (this.#more ??= new Map()).set(key, value);
    }
    return this;
  }

  /** Takes the entry of `key` out; false when there was none. */
  delete(key: K): boolean {
    if (this.#hasOne && this.#key === key) {
      this.#key = this.#value = undefined;
      this.#hasOne = false;
      return true;
    }
    return this.#more !== undefined && this.#more.delete(key);
  }

  /** Takes every entry out. */
  clear(): void {
    this.#key = this.#value = undefined;
    this.#hasOne = false;
    this.#more = undefined;
  }

  /** The values, oldest first. */
  *values(): IterableIterator<V> {
    if (this.#hasOne) yield this.#value as V;
    if (this.#more !== undefined) yield* this.#more.values();
  }
}
