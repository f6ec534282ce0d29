/**
 * Logging for the server and the command line tools, with LogTape. Library code calls
 * `getLogger([...])` and emits nothing until a program calls {@linkcode setupLogging}.
 *
 * Records go to stderr as human text or, with `format: "json"`, as one JSON object per line. They
 * are buffered for at most one turn of the event loop and written together; {@linkcode flushLogs}
 * writes them at once (it runs by itself when the program exits).
 *
 * @module
 */

import {
  configureSync,
  getJsonLinesFormatter,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogLevel,
  type LogRecord,
  resetSync,
} from "npm:@logtape/logtape@^2.4.2";

export { getLogger, type Logger };

/** The log output formats. */
export type LogFormat = "text" | "json";

/** Logging options. */
export interface LogOptions {
  /** The lowest level written (default `warning`, as the original's default). */
  level?: LogLevel;
  /** `text` (default) or `json`. */
  format?: LogFormat;
  /** Where records go (default: stderr). */
  write?: (line: string) => void;
}

const encoder = new TextEncoder();

function writeStderr(text: string): void {
  const bytes = encoder.encode(text);
  let done = 0;
  try {
    while (done < bytes.length) done += Deno.stderr.writeSync(bytes.subarray(done));
  } catch {
    // stderr is gone (closed pipe): logging must never take the server down.
  }
}

// Records are buffered for one turn of the event loop and written with one system call: a busy
// server logs thousands of events a second, and a write per record cost a tenth of its time.
let buffered: string[] = [];
let flushTimer: { unref?: () => void } | undefined;
const FLUSH_AT = 256;

/** Writes every buffered log record to stderr now. Runs by itself at exit. */
export function flushLogs(): void {
  if (flushTimer !== undefined) {
    clearTimeout(flushTimer as ReturnType<typeof setTimeout>);
    flushTimer = undefined;
  }
  if (buffered.length === 0) return;
  const text = buffered.join("");
  buffered = [];
  writeStderr(text);
}

function bufferStderr(line: string): void {
  buffered.push(line);
  if (buffered.length >= FLUSH_AT) {
    flushLogs();
  } else if (flushTimer === undefined) {
    flushTimer = setTimeout(flushLogs, 0);
    // The timer alone must not keep a program alive; the unload handler flushes at exit.
    flushTimer.unref?.();
  }
}

globalThis.addEventListener?.("unload", flushLogs);

/** A value in a rendered message: strings as they are (no quotes), the rest as JSON. */
function plainValue(v: unknown): string {
  return typeof v === "string" ? v : JSON.stringify(v) ?? String(v);
}

/**
 * JSON lines: `@timestamp`, `level`, `message`, `logger`, then the record's properties at the top
 * level (`event`, `lock`, `client_id`, `peer`, `token`, `held_s`, ...). The message is rendered as
 * the text format renders it, without quotes around string values.
 */
function jsonFormatter(): (record: LogRecord) => string {
  const json = getJsonLinesFormatter({ properties: "flatten", message: "rendered" });
  return (record) => {
    const parts = record.message;
    let message = "";
    for (let i = 0; i < parts.length; i++) {
      message += i % 2 === 0 ? String(parts[i]) : plainValue(parts[i]);
    }
    return json({ ...record, message: [message] });
  };
}

/** Sets up the `tcpnetlock` loggers; call once from a program's `main`. */
export function setupLogging(options: LogOptions = {}): void {
  const format = options.format ?? "text";
  const formatter = format === "json" ? jsonFormatter() : getTextFormatter({
    timestamp: "date-time-timezone",
    value: plainValue,
  });
  const write = options.write ?? bufferStderr;
  resetSync();
  configureSync({
    sinks: { stderr: (record: LogRecord) => write(formatter(record)) },
    loggers: [
      { category: ["tcpnetlock"], lowestLevel: options.level ?? "warning", sinks: ["stderr"] },
      // Where a program listens is always said, whatever the level.
      {
        category: ["tcpnetlock", "startup"],
        lowestLevel: "info",
        sinks: ["stderr"],
        parentSinks: "override",
      },
      { category: ["logtape", "meta"], lowestLevel: "error", sinks: ["stderr"] },
    ],
  });
  configured++;
}

/** How many times {@linkcode setupLogging} has run: a cached level check holds until it changes. */
let configured = 0;

/**
 * A check for `logger.isEnabledFor(level)` that is cached while the configuration made by
 * {@linkcode setupLogging} stands: LogTape's check walks the category's loggers, a noticeable
 * part of a whole lock cycle's JavaScript (bench, CPU profile) for a record that is off by
 * default. A program that configures LogTape itself (no `setupLogging`) is asked each time.
 *
 * @example
 * ```ts
 * import { getLogger, levelCheck } from "./log.ts";
 * const infoOn = levelCheck(getLogger(["tcpnetlock", "server"]), "info");
 * if (infoOn()) console.log("info records are written");
 * ```
 */
export function levelCheck(logger: Logger, level: LogLevel): () => boolean {
  let seen = 0;
  let on = false;
  return () => {
    if (configured === 0) return logger.isEnabledFor(level);
    if (seen !== configured) {
      on = logger.isEnabledFor(level);
      seen = configured;
    }
    return on;
  };
}

/** The logger for start-up lines (where a program listens): written at every level. */
export const startupLog: Logger = getLogger(["tcpnetlock", "startup"]);

/** Turns the original's `--debug` / `--info` flags into a level. */
export function levelFromFlags(
  flags: { debug?: boolean; info?: boolean },
): "debug" | "info" | "warning" {
  return flags.debug ? "debug" : flags.info ? "info" : "warning";
}
