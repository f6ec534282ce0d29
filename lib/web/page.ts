/**
 * The live page (`GET /`): one self-contained HTML document, no build step, nothing from
 * elsewhere. It reads `GET /events` (see `events.ts`) with `fetch()` and a streaming reader, so
 * that it can send `Authorization: Bearer TOKEN` (an `EventSource` cannot); the token is asked
 * for once and kept in the tab's `sessionStorage`, never in a URL.
 *
 * @module
 */

import { PAGE_HTML } from "./page_html.ts";

/** Options of {@linkcode pageResponse}. */
export interface PageOptions {
  /** The server wants a token: the page asks for it before it connects. */
  auth: boolean;
}

let scriptHash: Promise<string> | undefined;

/** The `sha256-…` of the page's one inline script, for its Content-Security-Policy. */
function pageScriptHash(): Promise<string> {
  scriptHash ??= (async () => {
    const m = /<script>([\s\S]*?)<\/script>/.exec(PAGE_HTML);
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(m?.[1] ?? ""));
    return `sha256-${btoa(String.fromCharCode(...new Uint8Array(digest)))}`;
  })();
  return scriptHash;
}

/**
 * The page as a response. It holds no data (that comes from `/events`), so it needs no token
 * itself; `auth` only tells it to ask for one.
 *
 * @example
 * ```ts
 * import { pageResponse } from "./page.ts";
 * const res = await pageResponse({ auth: false });
 * console.log(res.headers.get("content-type")); // text/html; charset=utf-8
 * ```
 */
export async function pageResponse(options: PageOptions, head = false): Promise<Response> {
  const html = PAGE_HTML.replace(
    '<body data-auth="none">',
    `<body data-auth="${options.auth ? "required" : "none"}">`,
  );
  const csp = [
    "default-src 'none'",
    `script-src '${await pageScriptHash()}'`,
    "style-src 'unsafe-inline'",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join("; ");
  return new Response(head ? null : html, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "content-security-policy": csp,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
    },
  });
}
