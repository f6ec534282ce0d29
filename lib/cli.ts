/**
 * Command line helpers shared by the programs: flags that also come from `TCPNETLOCK_*`
 * environment variables (the flag wins), value checks with clear messages, and usage errors.
 *
 * @module
 */

import { parseArgs } from "node:util";

/** A flag of a program: its name, its variable, its help. */
export interface FlagSpec {
  /** Long name without `--`. */
  name: string;
  /** `string` takes a value; `boolean` does not. */
  type: "string" | "boolean";
  /** The environment variable that sets it when the flag is absent (`TCPNETLOCK_...`). */
  env?: string;
  /** Shown in `--help` after the flag. */
  arg?: string;
  /** The help text. */
  help: string;
  /** Default shown in help. */
  default?: string;
  /** Single-letter alias. */
  short?: string;
}

/** Thrown for bad usage: the program prints it with its usage and exits 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Reads an environment variable; undefined when unset or not permitted. */
export function env(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
}

/** The parsed flags: values from the command line, else from the environment. */
export type FlagValues = Record<string, string | boolean | undefined>;

/** For each parsed values object, the flags whose value came from a variable, and which one. */
const fromEnv = new WeakMap<FlagValues, Map<string, string>>();

/**
 * Parses `args` against `specs`. Unknown flags and missing values throw {@linkcode UsageError}.
 * Returns the values (flag, else variable) and the positional arguments.
 */
export function parseFlags(
  args: string[],
  specs: FlagSpec[],
  options: { allowPositionals?: boolean } = {},
): { values: FlagValues; positionals: string[] } {
  const parseOptions: Record<string, { type: "string" | "boolean"; short?: string }> = {};
  for (const s of specs) {
    parseOptions[s.name] = s.short ? { type: s.type, short: s.short } : { type: s.type };
  }
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: parseOptions,
      allowPositionals: options.allowPositionals ?? false,
      strict: true,
    });
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const values: FlagValues = {};
  const sources = new Map<string, string>();
  fromEnv.set(values, sources);
  for (const s of specs) {
    const v = (parsed.values as Record<string, string | boolean | undefined>)[s.name];
    if (v !== undefined) {
      values[s.name] = v;
      continue;
    }
    const e = s.env ? env(s.env) : undefined;
    if (e === undefined || e === "") continue;
    if (s.type === "boolean") {
      const t = e.trim().toLowerCase();
      if (["1", "true", "yes", "on"].includes(t)) values[s.name] = true;
      else if (["0", "false", "no", "off"].includes(t)) values[s.name] = false;
      else throw new UsageError(`Invalid value for ${s.env}: "${e}" (expected 1/0, true/false)`);
    } else {
      values[s.name] = e;
    }
    sources.set(s.name, s.env!);
  }
  return { values, positionals: parsed.positionals };
}

/** Formats the flags part of a usage text. */
export function formatFlags(specs: FlagSpec[]): string {
  const rows = specs.map((s) => {
    const left = `  ${s.short ? `-${s.short}, ` : ""}--${s.name}${s.arg ? ` ${s.arg}` : ""}`;
    let right = s.help;
    if (s.default !== undefined) right += ` (default: ${s.default})`;
    if (s.env) right += ` [${s.env}]`;
    return [left, right];
  });
  const width = Math.min(34, Math.max(...rows.map(([l]) => l.length)) + 2);
  return rows.map(([l, r]) =>
    l.length >= width ? `${l}\n${" ".repeat(width)}${r}` : l.padEnd(width) + r
  ).join("\n");
}

/** How a message names a flag: `--wait`, or `TCPNETLOCK_WAIT` when the value came from there. */
function label(values: FlagValues, name: string): string {
  return fromEnv.get(values)?.get(name) ?? `--${name}`;
}

/** A whole number within [min, max], or a UsageError naming the flag. */
export function intFlag(
  values: FlagValues,
  name: string,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  const v = values[name];
  if (v === undefined) return undefined;
  const text = String(v).trim();
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < min || n > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `from ${min} to ${max}`;
    throw new UsageError(
      `Invalid value for ${label(values, name)}: "${v}" (expected a whole number ${range})`,
    );
  }
  return n;
}

/** A decimal number of seconds (`1.5`, `.5`), > 0 unless `allowZero`, or a UsageError. */
export function secondsFlag(
  values: FlagValues,
  name: string,
  allowZero = false,
): number | undefined {
  const v = values[name];
  if (v === undefined) return undefined;
  const text = String(v).trim();
  const n = /^(?:\d+(?:\.\d*)?|\.\d+)$/.test(text) ? Number(text) : NaN;
  if (!Number.isFinite(n) || n < 0 || (!allowZero && n === 0)) {
    throw new UsageError(
      `Invalid value for ${label(values, name)}: "${v}" (expected a number of seconds${
        allowZero ? "" : " above 0"
      })`,
    );
  }
  return n;
}

/** One of `choices`, or a UsageError. */
export function choiceFlag<T extends string>(
  values: FlagValues,
  name: string,
  choices: readonly T[],
): T | undefined {
  const v = values[name];
  if (v === undefined) return undefined;
  if (!choices.includes(String(v) as T)) {
    throw new UsageError(
      `Invalid value for ${label(values, name)}: "${v}" (expected ${choices.join(" or ")})`,
    );
  }
  return v as T;
}

/** Reads a small text file a flag names (a token, a certificate), or a UsageError. */
export function readFlagFile(path: string, what: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch (err) {
    const reason = err instanceof Deno.errors.NotFound
      ? "no such file"
      : err instanceof Error
      ? err.message.split("\n")[0]
      : String(err);
    throw new UsageError(`Cannot read ${what} "${path}": ${reason}`);
  }
}
