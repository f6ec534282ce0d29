/**
 * Bounded line framing over anything with a `read(buffer)` method (a `Deno.Conn`, a TLS conn).
 *
 * A line is the bytes before a `\n`. It may be at most `maxLine` bytes long (a `\r` before the
 * `\n` counts, and is then dropped); the reader never holds more than `maxLine + 1` bytes, so a
 * peer that sends megabytes without a newline costs one small buffer. A partial line at the end
 * of the stream is dropped. Lines must be valid UTF-8. The buffer starts at 256 bytes and grows
 * only as far as a line needs.
 *
 * Used by the server and by the client; no third-party dependency.
 *
 * @module
 */

/** What {@linkcode LineReader.next} found. */
export type LineResult =
  | { kind: "line"; line: string }
  | { kind: "eof" }
  | { kind: "too-long" }
  | { kind: "invalid-utf8" };

/** The minimal reader the framing needs; `Deno.Conn` and `Deno.TlsConn` fit. */
export interface ByteReader {
  /** Reads into `p`; resolves to the byte count, or `null` at the end of the stream. */
  read(p: Uint8Array): Promise<number | null>;
}

const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
// Deno decodes with a plain decoder on a faster path than with a fatal one (a few tenths of a
// microsecond per line): lines that are all ASCII, valid UTF-8 by definition, take it.
const asciiDecoder = new TextDecoder("utf-8", { ignoreBOM: true });

/** A line's text: ASCII on the fast path, anything else checked (throws on invalid UTF-8). */
function decodeLine(bytes: Uint8Array): string {
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] > 0x7f) return decoder.decode(bytes);
  }
  return asciiDecoder.decode(bytes);
}
const NL = 0x0a;
const CR = 0x0d;

/** The first buffer size; it doubles as needed up to `maxLine + 1`. */
const INITIAL_BUFFER = 256;

/**
 * Buffers of {@linkcode INITIAL_BUFFER} bytes given back by readers that are done: a server makes
 * a reader per connection, and a new `ArrayBuffer` costs Deno 1-3 microseconds (an allocation
 * outside the JavaScript heap, then a sweep by the garbage collector), as much as a whole cycle's
 * parsing. At most {@linkcode POOL_MAX} are kept (256 KiB).
 */
const pool: Uint8Array[] = [];
const POOL_MAX = 1024;
const EMPTY = new Uint8Array(0);

const EOF: LineResult = { kind: "eof" };
const TOO_LONG: LineResult = { kind: "too-long" };
const INVALID: LineResult = { kind: "invalid-utf8" };

/**
 * Reads `\n`-terminated lines with a hard size bound.
 *
 * @example
 * ```ts
 * import { LineReader } from "./lines.ts";
 * const conn = await Deno.connect({ port: 7654 });
 * await conn.write(new TextEncoder().encode(".ping\n"));
 * const reply = await new LineReader(conn, 1024).next(); // { kind: "line", line: "pong" }
 * conn.close();
 * ```
 */
export class LineReader {
  #src: ByteReader;
  #buf: Uint8Array;
  #start = 0;
  #end = 0;
  #scanned = 0;
  #done = false;
  readonly #maxLine: number;

  /**
   * @param src where the bytes come from
   * @param maxLine the longest line accepted, in bytes, without its `\n`
   */
  constructor(src: ByteReader, maxLine: number) {
    this.#src = src;
    this.#maxLine = maxLine;
    // Start small (most lines are short, and a held connection keeps its buffer while it waits
    // for the next line) and grow up to the bound when a longer line comes.
    const size = Math.min(maxLine + 1, INITIAL_BUFFER);
    this.#buf = (size === INITIAL_BUFFER ? pool.pop() : undefined) ?? new Uint8Array(size);
  }

  /**
   * Done reading: the buffer goes back to a pool for the next reader, and every later call
   * returns `eof`. Call it only when no {@linkcode LineReader.next} is pending (its read would
   * fill a buffer that another reader uses).
   */
  dispose(): void {
    const buf = this.#buf;
    this.#buf = EMPTY;
    this.#start = this.#end = this.#scanned = 0;
    this.#done = true;
    if (buf.length === INITIAL_BUFFER && pool.length < POOL_MAX) pool.push(buf);
  }

  /** Bytes received but not yet returned as lines. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /**
   * The next line if a whole one is already buffered, else `undefined` (nothing is read): lets a
   * reader handle the lines that arrived together in one go, without a turn of the event loop
   * between them.
   */
  nextBuffered(): LineResult | undefined {
    if (this.#done) return undefined;
    const nl = this.#buf.subarray(this.#scanned, this.#end).indexOf(NL);
    if (nl < 0) {
      this.#scanned = this.#end;
      return undefined;
    }
    const at = this.#scanned + nl;
    let stop = at;
    if (stop > this.#start && this.#buf[stop - 1] === CR) stop--;
    const bytes = this.#buf.subarray(this.#start, stop);
    this.#start = at + 1;
    this.#scanned = this.#start;
    try {
      return { kind: "line", line: decodeLine(bytes) };
    } catch {
      this.#done = true;
      return INVALID;
    }
  }

  /**
   * The next line, or why there is none. After `eof`, `too-long` or `invalid-utf8` every later
   * call returns `eof`. A read error (connection reset, closed resource) is thrown.
   */
  async next(): Promise<LineResult> {
    if (this.#done) return EOF;
    for (;;) {
      // Look for a newline among the bytes not yet scanned.
      const nl = this.#buf.subarray(this.#scanned, this.#end).indexOf(NL);
      if (nl >= 0) {
        const at = this.#scanned + nl;
        let stop = at;
        if (stop > this.#start && this.#buf[stop - 1] === CR) stop--;
        const bytes = this.#buf.subarray(this.#start, stop);
        this.#start = at + 1;
        this.#scanned = this.#start;
        let line: string;
        try {
          line = decodeLine(bytes);
        } catch {
          this.#done = true;
          return INVALID;
        }
        return { kind: "line", line };
      }
      this.#scanned = this.#end;
      if (this.#end - this.#start >= this.#maxLine + 1) {
        // maxLine + 1 bytes and no newline among them: the line is over the limit.
        this.#done = true;
        return TOO_LONG;
      }
      if (this.#start > 0) {
        // Move the partial line to the front to make room.
        this.#buf.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#scanned -= this.#start;
        this.#start = 0;
      }
      if (this.#end === this.#buf.length) {
        const bigger = new Uint8Array(Math.min(this.#maxLine + 1, this.#buf.length * 2));
        bigger.set(this.#buf.subarray(0, this.#end));
        this.#buf = bigger;
      }
      const n = await this.#src.read(this.#buf.subarray(this.#end));
      if (n === null) {
        this.#done = true;
        return EOF;
      }
      this.#end += n;
    }
  }
}

/** Replies are carved from slabs of this size; a longer one gets its own buffer. */
const SLAB_BYTES = 16 * 1024;
const SLAB_MAX_LINE = 2048;
const encoder = new TextEncoder();
let slab = new Uint8Array(SLAB_BYTES);
let slabUsed = 0;

/**
 * The bytes of `text` and a `\n`, for a write. Short lines are carved from a shared slab (a view,
 * not a new `ArrayBuffer`: see the pool above); a region is never handed out twice, and a slab
 * is freed by the garbage collector once no view of it is left.
 *
 * @example
 * ```ts
 * import { encodeLine } from "./lines.ts";
 * encodeLine("released"); // Uint8Array of "released\n"
 * ```
 */
export function encodeLine(text: string): Uint8Array {
  const n = text.length;
  // A UTF-16 code unit takes at most 3 bytes.
  if (n * 3 + 1 > SLAB_MAX_LINE) return encoder.encode(text + "\n");
  if (slabUsed + n * 3 + 1 > SLAB_BYTES) {
    slab = new Uint8Array(SLAB_BYTES);
    slabUsed = 0;
  }
  const at = slabUsed;
  let i = 0;
  // ASCII (every reply but a few names) is copied as is; anything else is encoded by the runtime.
  for (; i < n; i++) {
    const c = text.charCodeAt(i);
    if (c > 0x7f) break;
    slab[at + i] = c;
  }
  let end = at + i;
  if (i < n) end += encoder.encodeInto(text.slice(i), slab.subarray(end)).written;
  slab[end] = NL;
  slabUsed = end + 1;
  return slab.subarray(at, end + 1);
}
