/**
 * A binary min-heap of items keyed by a deadline, each item keeping its own index so that it can
 * be removed in O(log n). The claim book keeps every wait and lease deadline in one.
 *
 * @module
 */

/** What the heap keeps in an item. */
export interface HeapItem {
  /** The item's index in the heap, -1 when not in it. */
  heapIndex: number;
  /** The key the heap orders the item by. */
  heapKey: number;
}

/**
 * A min-heap of {@linkcode HeapItem}s.
 *
 * @example
 * ```ts
 * import { DeadlineHeap } from "./deadline_heap.ts";
 * const heap = new DeadlineHeap<{ heapIndex: number; heapKey: number }>();
 * const a = { heapIndex: -1, heapKey: 0 };
 * heap.insert(a, 10);
 * heap.peek() === a; // true
 * heap.remove(a);
 * ```
 */
export class DeadlineHeap<T extends HeapItem> {
  readonly #items: T[] = [];

  /** How many items it holds. */
  get size(): number {
    return this.#items.length;
  }

  /** The item with the smallest key, or undefined. */
  peek(): T | undefined {
    return this.#items[0];
  }

  /** Adds an item (not in the heap) under `key`. */
  insert(item: T, key: number): void {
    item.heapKey = key;
    item.heapIndex = this.#items.length;
    this.#items.push(item);
    this.#siftUp(item.heapIndex);
  }

  /** Removes an item; does nothing when it is not in the heap. */
  remove(item: T): void {
    const i = item.heapIndex;
    if (i < 0) return;
    const last = this.#items.pop()!;
    item.heapIndex = -1;
    if (last !== item) {
      this.#items[i] = last;
      last.heapIndex = i;
      this.#siftUp(i);
      this.#siftDown(last.heapIndex);
    }
  }

  #siftUp(i: number): void {
    const heap = this.#items;
    const item = heap[i];
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (heap[parent].heapKey <= item.heapKey) break;
      heap[i] = heap[parent];
      heap[i].heapIndex = i;
      i = parent;
    }
    heap[i] = item;
    item.heapIndex = i;
  }

  #siftDown(i: number): void {
    const heap = this.#items;
    const n = heap.length;
    const item = heap[i];
    for (;;) {
      let child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && heap[child + 1].heapKey < heap[child].heapKey) child++;
      if (heap[child].heapKey >= item.heapKey) break;
      heap[i] = heap[child];
      heap[i].heapIndex = i;
      i = child;
    }
    heap[i] = item;
    item.heapIndex = i;
  }
}
