/**
 * An empty program: the benchmark times `deno run -A bench/noop.ts` as the cost of starting Deno
 * at all, and reports what `do.ts` adds beyond it.
 *
 * @module
 */
export {};
