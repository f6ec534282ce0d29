/**
 * The version of this tcpnetlock, kept equal to `version` in deno.json (a test checks it).
 *
 * @module
 */

/** The tcpnetlock version. */
export const VERSION = "0.2.0";
