/**
 * The live page (`GET /`, `GET /events`) in a real headless Chromium: locks taken over TCP show
 * up without a reload, releases remove them, a server restart shows "disconnected" and recovers,
 * a token hides everything until it is given. Servers run as subprocesses (`server.ts
 * --http-listen`), clients are raw sockets. Skips (saying so) where Chromium is missing.
 */

import assert from "node:assert/strict";
import { chromiumPath, launchBrowser, type Page, skipNote } from "./_util/browser.ts";
import { hasEtcd, sharedEtcd } from "./etcd_util.ts";
import { RawClient, startServerProcess } from "./test_util.ts";
import type { ServerProcess } from "./test_util.ts";

// What the page's functions see when puppeteer runs them in the browser (no DOM types here).
// deno-lint-ignore no-explicit-any
declare const document: any;
// deno-lint-ignore no-explicit-any
declare const sessionStorage: any;
// deno-lint-ignore no-explicit-any
declare const getComputedStyle: any;
/** An element with `hidden`. */
type HTMLElement = { hidden: boolean };

const ignore = chromiumPath === undefined;
if (ignore) console.warn(`web_page_test: skipped${skipNote}`);

/** A server subprocess with `--http-listen`; `base` is its page's URL. */
interface WebServer extends AsyncDisposable {
  proc: ServerProcess;
  port: number;
  httpPort: number;
  base: string;
}

async function startWebServer(
  args: string[] = [],
  env?: Record<string, string>,
  httpPort = 0,
): Promise<WebServer> {
  const proc = await startServerProcess(["--http-listen", `127.0.0.1:${httpPort}`, ...args], {
    env,
  });
  const line = await proc.waitForLog(/http listening on/);
  const port = Number(/:(\d+)\s*$/.exec(line.trim())?.[1] ?? /:(\d+)/.exec(line)![1]);
  return {
    proc,
    port: proc.port,
    httpPort: port,
    base: `http://127.0.0.1:${port}/`,
    [Symbol.asyncDispose]: async () => {
      await proc.stop("SIGKILL");
    },
  };
}

/** A free TCP port on 127.0.0.1 (for a server that must come back on the same ports). */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Takes `name` over TCP; the reply line is checked. */
async function take(port: number, line: string, expect: RegExp): Promise<RawClient> {
  const c = await RawClient.connect(port);
  const reply = await c.request(line);
  assert.match(reply ?? "(closed)", expect, line);
  return c;
}

/** The text of the card of `name`, or null when the page shows none. */
function cardText(page: Page, name: string): Promise<string | null> {
  return page.evaluate((n: string) => {
    const el = document.querySelector(`li.lock[data-name="${n}"]`);
    return el === null ? null : (el.textContent ?? "");
  }, name);
}

/** Waits until the card of `name` contains every string of `parts` (or is gone, for null). */
async function waitCard(
  page: Page,
  name: string,
  parts: string[] | null,
  timeout: number,
): Promise<void> {
  await page.waitForFunction(
    (n: string, ps: string[] | null) => {
      const el = document.querySelector(`li.lock[data-name="${n}"]`);
      if (ps === null) return el === null;
      return el !== null && ps.every((p) => (el.textContent ?? "").includes(p));
    },
    { timeout, polling: "mutation" },
    name,
    parts,
  );
}

function waitState(page: Page, state: string, timeout = 10_000): Promise<unknown> {
  return page.waitForSelector(`#conn[data-state="${state}"]`, { timeout });
}

Deno.test({
  name:
    `the page shows a lock taken over TCP within 1 s, its holder and queue, and drops it on release${skipNote}`,
  ignore,
  async fn() {
    await using srv = await startWebServer();
    await using browser = await launchBrowser();
    const { page, errors } = await browser.page();
    await page.goto(srv.base, { waitUntil: "load" });
    await waitState(page, "live");
    assert.equal(await page.$eval("#empty", (e) => (e as unknown as HTMLElement).hidden), false);

    // A holder and a waiter, over plain TCP.
    const t0 = performance.now();
    await using alice = await take(srv.port, "lock,name:migration,client-id:alice", /^ok$/);
    await using bob = await take(
      srv.port,
      "lock,name:migration,client-id:bob,wait:30",
      /^queued,position:1$/,
    );
    await waitCard(page, "migration", ["alice", "bob", "#1", "held for", "waiting for"], 1000);
    const shownAfter = performance.now() - t0;
    assert.ok(shownAfter < 1000, `shown after ${shownAfter} ms`);
    const text = (await cardText(page, "migration"))!;
    assert.match(text, /1 of 1/);
    assert.match(text, /1 waiter/);
    assert.match(text, /127\.0\.0\.1:\d+/);

    // alice releases: bob holds, nobody waits.
    assert.equal(await alice.request("release"), "released");
    await page.waitForFunction(() => {
      const t = document.querySelector('li.lock[data-name="migration"]')?.textContent ?? "";
      return t.includes("bob") && !t.includes("alice") && !t.includes("waiter");
    }, { timeout: 1000, polling: "mutation" });
    assert.match(await bob.line() ?? "", /^ok,token:\d+$/);
    // bob releases: the card goes.
    assert.equal(await bob.request("release"), "released");
    await waitCard(page, "migration", null, 1000);

    // The filter: by name and by client id, "/" focuses it, Escape clears it.
    await using _c1 = await take(srv.port, "lock,name:db-a,client-id:carol", /^ok$/);
    await using _c2 = await take(srv.port, "lock,name:cache-b,client-id:dave", /^ok$/);
    await waitCard(page, "cache-b", ["dave"], 1000);
    await page.keyboard.press("/");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "q");
    await page.keyboard.type("carol");
    const hidden = () =>
      page.$$eval("li.lock", (els) => els.map((e) => `${e.getAttribute("data-name")}:${e.hidden}`));
    assert.deepEqual((await hidden()).sort(), ["cache-b:true", "db-a:false"]);
    assert.match(await page.$eval("#shown", (e) => e.textContent ?? ""), /1 of 2/);
    await page.keyboard.press("Escape");
    assert.deepEqual((await hidden()).sort(), ["cache-b:false", "db-a:false"]);

    // Counters from the stats: 2 connections holding 2 names.
    await page.waitForFunction(
      () =>
        document.getElementById("v-held")?.textContent === "2" &&
        document.getElementById("v-connections")?.textContent === "2",
      { timeout: 3000 },
    );
    // No layout jumps: the list stays where it is while locks and counters change.
    const top = () => page.$eval("#locks", (e) => e.getBoundingClientRect().top);
    const before = await top();
    await using _e = await take(srv.port, "lock,name:a-first,client-id:erin", /^ok$/);
    await waitCard(page, "a-first", ["erin"], 1000);
    await page.waitForFunction(() => document.getElementById("v-held")?.textContent === "3", {
      timeout: 3000,
    });
    assert.equal(await top(), before);

    // 320 px wide: nothing sticks out sideways. Dark mode follows the system setting.
    await page.setViewport({ width: 320, height: 640 });
    assert.ok(
      await page.evaluate(() => document.documentElement.scrollWidth <= 320),
      "no horizontal scrolling at 320 px",
    );
    const background = () =>
      page.evaluate(() => getComputedStyle(document.body).backgroundColor as string);
    assert.equal(await background(), "rgb(255, 255, 255)");
    await page.emulateMediaFeatures([{ name: "prefers-color-scheme", value: "dark" }]);
    assert.equal(await background(), "rgb(18, 20, 22)");
    assert.deepEqual(errors, [], "no console errors");
    await page.close();
  },
});

Deno.test({
  name: `the page shows "disconnected" while the server restarts and recovers by itself${skipNote}`,
  ignore,
  async fn() {
    const port = freePort();
    const httpPort = freePort();
    const args = ["--port", String(port)];
    let srv = await startWebServer(args, undefined, httpPort);
    try {
      await using browser = await launchBrowser();
      const { page } = await browser.page();
      await page.goto(srv.base);
      await waitState(page, "live");
      {
        await using held = await take(srv.port, "lock,name:before,client-id:one", /^ok$/);
        await waitCard(page, "before", ["one"], 1000);
        assert.ok(held);
      }
      await srv.proc.stop("SIGTERM");
      await waitState(page, "disconnected", 5000);
      assert.match(await page.$eval("#conn", (e) => e.textContent ?? ""), /Disconnected/);

      srv = await startWebServer(args, undefined, httpPort);
      await waitState(page, "live", 10_000);
      await waitCard(page, "before", null, 1000); // the new server has no such lock
      await using _after = await take(srv.port, "lock,name:after,client-id:two", /^ok$/);
      await waitCard(page, "after", ["two"], 1000);
      await page.close();
    } finally {
      await srv.proc.stop("SIGKILL");
    }
  },
});

Deno.test({
  name:
    `with a token the page shows nothing until the token is given, and keeps it out of URLs${skipNote}`,
  ignore,
  async fn() {
    const token = "s3cret-Token-17";
    await using srv = await startWebServer([], { TCPNETLOCK_AUTH_TOKEN: token });
    await using held = await take(
      srv.port,
      `lock,name:payroll,client-id:erin,auth:${token}`,
      /^ok$/,
    );
    await using browser = await launchBrowser();
    const { page } = await browser.page();
    const urls: string[] = [];
    page.on("request", (r) => {
      urls.push(r.url());
    });
    await page.goto(srv.base);
    await waitState(page, "locked");
    const nothing = async () => {
      assert.equal(await page.$$eval("li.lock", (e) => e.length), 0);
      const body = await page.evaluate(() => document.body.innerText);
      assert.ok(!body.includes("payroll") && !body.includes("erin"), body);
      assert.equal(await page.$eval("#main", (e) => (e as unknown as HTMLElement).hidden), true);
    };
    await nothing();
    assert.ok(!urls.some((u) => u.endsWith("/events")), "no /events before the token");

    // A wrong token: refused, still nothing.
    await page.type("#token", "wrong");
    await page.keyboard.press("Enter");
    await page.waitForFunction(
      () => /refused/.test(document.getElementById("auth-msg")?.textContent ?? ""),
      { timeout: 5000 },
    );
    await nothing();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);

    // The right one, typed and submitted with the keyboard.
    await page.type("#token", token);
    await page.keyboard.press("Enter");
    await waitCard(page, "payroll", ["erin"], 2000);
    assert.equal(
      await page.evaluate(() => sessionStorage.getItem("tcpnetlock.token")),
      token,
    );
    // A reload keeps it (the tab's session storage): no second prompt.
    await page.reload();
    await waitCard(page, "payroll", ["erin"], 3000);
    assert.equal(await page.$eval("#auth", (e) => (e as unknown as HTMLElement).hidden), true);
    assert.ok(!urls.some((u) => u.includes(token)), `token in a URL: ${urls.join(" ")}`);
    assert.ok(held);
    await page.close();
  },
});

Deno.test({
  name: `with the etcd store the page of one server shows the locks taken on another${skipNote}`,
  ignore: ignore || !(await hasEtcd()),
  async fn() {
    const endpoints = (await sharedEtcd()).join(",");
    const prefix = `/tcpnetlock-test/page-${crypto.randomUUID().slice(0, 8)}`;
    const etcdArgs = ["--store", "etcd", "--etcd-endpoints", endpoints, "--etcd-prefix", prefix];
    await using a = await startWebServer(etcdArgs);
    await using b = await startServerProcess(etcdArgs);
    await using browser = await launchBrowser();
    const { page, errors } = await browser.page();
    await page.goto(a.base);
    await waitState(page, "live");
    assert.match(await page.$eval("#server", (e) => e.textContent ?? ""), /etcd store/);
    await using _h = await take(b.port, "lock,name:on-b,client-id:holder-b", /^ok$/);
    await using _w = await take(
      b.port,
      "lock,name:on-b,client-id:waiter-b,wait:30",
      /^queued,position:1$/,
    );
    await waitCard(page, "on-b", ["holder-b", "waiter-b"], 2000);
    assert.deepEqual(errors, []);
    await page.close();
  },
});
