/**
 * Small pieces the client (client.ts) and its session (lib/client_session.ts) share: reading a
 * reply line into errors that say what to do, seconds on the wire, error text, quiet closing.
 * Imported by URL with the client: relative imports only.
 *
 * @module
 */

import { ConnectionLostError, ProtocolError } from "./errors.ts";
import type { LineResult } from "./lines.ts";
import { parseReply, type ReplyLine } from "./protocol.ts";

/** What to try when a plain-TCP connection is closed unanswered: the server may speak TLS. */
export const TLS_HINT = "connect with TLS (--tls, TCPNETLOCK_TLS=1, or the tls option)";

/**
 * The reply in `result`, or the error that says what went wrong: the server closed without an
 * answer (over plain TCP: it may speak TLS), a reply too long, or not UTF-8.
 *
 * @example
 * ```ts
 * import { expectLine } from "./client_util.ts";
 * const reply = expectLine({ kind: "line", line: "ok,token:7" }, (w) => w, { server: "x:1" }, false);
 * console.log(reply.word); // ok
 * ```
 */
export function expectLine(
  result: LineResult,
  fail: (what: string) => string,
  facts: { server: string; lockName?: string },
  tls: boolean,
): ReplyLine {
  switch (result.kind) {
    case "line":
      return parseReply(result.line);
    case "eof":
      throw new ConnectionLostError(
        fail(
          "the server closed the connection before answering" +
            (tls ? "" : `; it may speak TLS: ${TLS_HINT}`),
        ),
        facts,
      );
    case "too-long":
      throw new ProtocolError(fail("the server's reply is too long"), undefined, facts);
    default:
      throw new ProtocolError(fail("the server's reply is not valid UTF-8"), undefined, facts);
  }
}

/** Seconds as a protocol decimal: millisecond precision, never exponent notation. */
export function formatSeconds(seconds: number | undefined): string | undefined {
  if (seconds === undefined) return undefined;
  return seconds.toFixed(3).replace(/\.?0+$/, "");
}

/** An error's message as the end of a sentence: lower-case first letter. */
export function describe(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  return message.length > 0 ? message[0].toLowerCase() + message.slice(1) : "unknown error";
}

/** Closes `conn`; a connection already closed is fine. */
export function closeQuietly(conn: Deno.Conn | undefined): void {
  try {
    conn?.close();
  } catch {
    // already closed
  }
}
