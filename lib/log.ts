/**
 * Logging for the server and the command line tools, with LogTape. Library code calls
 * `getLogger([...])` and emits nothing until a program calls {@linkcode setupLogging}.
 *
 * Records go to stderr, synchronously (so they keep their order with the process's other output),
 * as human text or, with `format: "json"`, as one JSON object per line.
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

function writeStderr(line: string): void {
  const bytes = encoder.encode(line);
  let done = 0;
  try {
    while (done < bytes.length) done += Deno.stderr.writeSync(bytes.subarray(done));
  } catch {
    // stderr is gone (closed pipe): logging must never take the server down.
  }
}

/** Sets up the `tcpnetlock` loggers; call once from a program's `main`. */
export function setupLogging(options: LogOptions = {}): void {
  const format = options.format ?? "text";
  const formatter = format === "json"
    ? getJsonLinesFormatter({ properties: "flatten", message: "rendered" })
    : getTextFormatter({
      timestamp: "date-time-timezone",
      value: (v: unknown) => typeof v === "string" ? v : JSON.stringify(v) ?? String(v),
    });
  const write = options.write ?? writeStderr;
  resetSync();
  configureSync({
    sinks: { stderr: (record: LogRecord) => write(formatter(record)) },
    loggers: [
      { category: ["tcpnetlock"], lowestLevel: options.level ?? "warning", sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "error", sinks: ["stderr"] },
    ],
  });
}

/** Turns the original's `--debug` / `--info` flags into a level. */
export function levelFromFlags(
  flags: { debug?: boolean; info?: boolean },
): "debug" | "info" | "warning" {
  return flags.debug ? "debug" : flags.info ? "info" : "warning";
}
