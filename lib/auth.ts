/**
 * The auth token check shared by the lock port and the HTTP endpoints.
 *
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";

/**
 * Returns a constant-time check against `token`: both sides are hashed with SHA-256 first, so
 * neither the content nor the length of the token leaks through timing. `undefined` never matches.
 */
export function tokenMatcher(token: string): (given: string | undefined) => boolean {
  const want = createHash("sha256").update(token).digest();
  return (given) => {
    const got = createHash("sha256").update(given ?? "").digest();
    return timingSafeEqual(want, got) && given !== undefined;
  };
}
