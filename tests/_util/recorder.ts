/**
 * A claim handler that writes down what a store told it, for the store tests.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { ClaimHandler } from "../../lib/store/types.ts";

/** Records every outcome as a string: `granted:T`, `queued:P`, `not-granted`, `refused:R`, ... */
export class Recorder implements ClaimHandler {
  readonly log: string[] = [];
  constructor(readonly id = "") {}
  granted(t: number): void {
    this.log.push(`granted:${t}`);
  }
  queued(p: number): void {
    this.log.push(`queued:${p}`);
  }
  notGranted(): void {
    this.log.push("not-granted");
  }
  refused(r: string): void {
    this.log.push(`refused:${r}`);
  }
  timedOut(): void {
    this.log.push("timeout");
  }
  expired(): void {
    this.log.push("expired");
  }
  /** The last outcome. */
  get last(): string | undefined {
    return this.log.at(-1);
  }
  /** The token of the grant (fails the test when there was none). */
  get token(): number {
    const g = this.log.find((l) => l.startsWith("granted:"));
    assert.ok(g, `not granted: ${this.log.join(" ")}`);
    return Number(g.slice("granted:".length));
  }
}
