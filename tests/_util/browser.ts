/**
 * A real headless browser for the live page's tests: Debian's Chromium (`/usr/bin/chromium`, or
 * `TCPNETLOCK_CHROMIUM`) driven by puppeteer-core from npm. Nothing is downloaded: without the
 * executable, {@linkcode chromiumPath} is undefined and the tests skip with a message.
 */

import puppeteer from "npm:puppeteer-core@24.43.1";
import type { Browser, ConsoleMessage, Page } from "npm:puppeteer-core@24.43.1";

export type { Browser, Page };

/** The Chromium executable, or undefined when this machine has none. */
export const chromiumPath: string | undefined = (() => {
  const path = Deno.env.get("TCPNETLOCK_CHROMIUM") ?? "/usr/bin/chromium";
  try {
    return Deno.statSync(path).isFile ? path : undefined;
  } catch {
    return undefined;
  }
})();

/** Why browser tests skip, for the test's name (empty when they run). */
export const skipNote: string = chromiumPath === undefined
  ? " (SKIPPED: no Chromium at /usr/bin/chromium; apt-get install chromium)"
  : "";

/** A browser with its own fresh profile, gone (with the profile) on dispose. */
export interface TestBrowser extends AsyncDisposable {
  browser: Browser;
  /** A new tab that records console errors and uncaught exceptions in `errors`. */
  page(): Promise<{ page: Page; errors: string[] }>;
}

/** Launches Chromium headless with a fresh profile directory. */
export async function launchBrowser(): Promise<TestBrowser> {
  if (chromiumPath === undefined) throw new Error("no Chromium on this machine");
  const profile = await Deno.makeTempDir({ prefix: "tnl-chromium-" });
  let browser: Browser;
  try {
    browser = await puppeteer.launch({
      executablePath: chromiumPath,
      headless: true,
      pipe: true,
      args: [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        `--user-data-dir=${profile}`,
      ],
      defaultViewport: { width: 1200, height: 800 },
      timeout: 30_000,
    });
  } catch (err) {
    await Deno.remove(profile, { recursive: true }).catch(() => {});
    throw err;
  }
  const pages: Page[] = [];
  return {
    browser,
    async page() {
      const page = await browser.newPage();
      pages.push(page);
      const errors: string[] = [];
      page.on("console", (msg: ConsoleMessage) => {
        if (msg.type() === "error") errors.push(`console: ${msg.text()}`);
      });
      page.on("pageerror", (err: unknown) => errors.push(`pageerror: ${String(err)}`));
      return { page, errors };
    },
    async [Symbol.asyncDispose]() {
      for (const page of pages) await closeAndLetGo(page);
      await browser.close().catch(() => {});
      await Deno.remove(profile, { recursive: true }).catch(() => {});
    },
  };
}

/**
 * Closes a tab (if the test has not) and waits until puppeteer has let go of its main frame. When a
 * tab closes while the browser is still there, puppeteer waits up to 100 ms, on a timer, for the
 * frame to be swapped for another; a browser closed meanwhile left that timer running past the end
 * of the test, and Deno's sanitizer failed the next test (seen in CI on a loaded machine). The frame's
 * detach, which ends that wait, is what is awaited (bounded, with a timer that is cleared).
 */
async function closeAndLetGo(page: Page): Promise<void> {
  const main = page.mainFrame();
  if (main.detached) return;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let onDetached: ((frame: unknown) => void) | undefined;
  const gone = new Promise<void>((resolve) => {
    onDetached = (frame) => {
      if (frame === main) resolve();
    };
    page.on("framedetached", onDetached);
    timer = setTimeout(resolve, 5000);
  });
  try {
    if (!page.isClosed()) await page.close().catch(() => {});
    if (!main.detached) await gone;
  } finally {
    clearTimeout(timer);
    page.off("framedetached", onDetached!);
  }
}
