/**
 * Fencing tokens: integers that only move forward, for any lock name and across restarts.
 *
 * Without a state file the sequence starts at the wall clock in microseconds, so a restarted
 * server starts above everything its predecessor handed out as long as that one handed out, on
 * average, less than one token per microsecond and the clock did not step back. With a state file
 * the server also keeps a high-water mark on disk: before it hands out a token at or above the
 * mark it writes a new mark one block ahead (atomically: temporary file, fsync, rename), so a
 * restart, even after SIGKILL, starts above every token ever handed out. It starts at the larger
 * of the mark and the clock.
 *
 * @module
 */

/** Where tokens come from. */
export interface TokenSource {
  /** The next token: larger than every token returned before. */
  next(): number;
  /** The last token returned (0 before the first). */
  readonly last: number;
  /** How many tokens this source has returned. */
  readonly issued: number;
  /** Gets ready to hand out tokens (reserves the first block); throws when it cannot. */
  prepare?(): void;
}

/** How many tokens a state-file write reserves ahead. */
export const DEFAULT_TOKEN_BLOCK = 100_000;

/** A token sequence seeded from the clock, optionally backed by a high-water mark file. */
export class TokenSequence implements TokenSource {
  #last: number;
  #issued = 0;
  #reservedUpTo = Number.MAX_SAFE_INTEGER;
  readonly #stateFile: string | undefined;
  readonly #block: number;

  /**
   * @param options.stateFile where to keep the high-water mark (none: clock seed only)
   * @param options.block how many tokens one write reserves
   * @param options.nowMicros the clock, in microseconds since the epoch
   */
  constructor(
    options: { stateFile?: string; block?: number; nowMicros?: () => number } = {},
  ) {
    const nowMicros = options.nowMicros ?? (() => Math.floor(Date.now() * 1000));
    this.#stateFile = options.stateFile;
    this.#block = options.block ?? DEFAULT_TOKEN_BLOCK;
    let start = nowMicros();
    if (this.#stateFile !== undefined) {
      const mark = readMark(this.#stateFile);
      if (mark !== undefined && mark > start) start = mark;
      this.#reservedUpTo = start; // nothing reserved yet: the first next() writes
    }
    this.#last = start;
  }

  /** The last token returned, or the starting point. */
  get last(): number {
    return this.#last;
  }

  /** Tokens returned so far. */
  get issued(): number {
    return this.#issued;
  }

  /**
   * Reserves the first block now, so that a state file that cannot be written is found at
   * start-up rather than at the first grant. Throws an error that names the file.
   */
  prepare(): void {
    if (this.#stateFile === undefined || this.#reservedUpTo > this.#last) return;
    this.#reserve(this.#last + 1);
  }

  /** The next token. Writes the state file when the reserved block runs out (and throws, taking no token, when it cannot). */
  next(): number {
    const token = this.#last + 1;
    if (token > this.#reservedUpTo) this.#reserve(token);
    this.#last = token;
    this.#issued++;
    return token;
  }

  #reserve(from: number): void {
    const mark = from + this.#block;
    try {
      writeMark(this.#stateFile!, mark);
    } catch (err) {
      const why = err instanceof Error ? err.message.split("\n")[0] : String(err);
      throw new Error(`Cannot write the state file "${this.#stateFile}": ${why}`, { cause: err });
    }
    this.#reservedUpTo = mark;
  }
}

/** Reads the mark: `undefined` when the file does not exist; throws when it is unreadable. */
function readMark(path: string): number | undefined {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  const value = Number(text.trim());
  if (!/^\d+\s*$/.test(text.trim()) || !Number.isSafeInteger(value)) {
    throw new Error(`State file "${path}" does not hold a token high-water mark: "${text.trim()}"`);
  }
  return value;
}

/** Writes the mark atomically and durably: temporary file, fsync, rename, fsync of the folder. */
function writeMark(path: string, mark: number): void {
  const tmp = `${path}.tmp`;
  const file = Deno.openSync(tmp, { write: true, create: true, truncate: true });
  try {
    const bytes = new TextEncoder().encode(`${mark}\n`);
    let done = 0;
    while (done < bytes.length) done += file.writeSync(bytes.subarray(done));
    file.syncSync();
  } finally {
    file.close();
  }
  Deno.renameSync(tmp, path);
  const slash = path.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
  try {
    const d = Deno.openSync(dir, { read: true });
    try {
      d.syncSync();
    } finally {
      d.close();
    }
  } catch {
    // Some file systems cannot fsync a directory; the rename is still atomic.
  }
}
