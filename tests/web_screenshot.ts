/**
 * Takes the README's screenshots of the live page: `deno run -A tests/web_screenshot.ts` writes
 * `docs/img/page.png` (1200 px wide, light) and `docs/img/page-narrow-dark.png` (360 px wide,
 * dark). It starts a server with `--http-listen`, takes a few realistic locks over TCP (holders,
 * queues, a lease, a limit) and lets locks change hands for a while so that the sparklines have
 * something to show. Needs Chromium at /usr/bin/chromium.
 */

import { chromiumPath, launchBrowser } from "./_util/browser.ts";
import { RawClient, ROOT, startServerProcess } from "./test_util.ts";

if (chromiumPath === undefined) {
  console.error("err,no Chromium at /usr/bin/chromium (apt-get install chromium)");
  Deno.exit(2);
}

await using proc = await startServerProcess(["--http-listen", "127.0.0.1:0"]);
const line = await proc.waitForLog(/http listening on/);
const base = `http://127.0.0.1:${/:(\d+)\s*$/.exec(line.trim())![1]}/`;
const port = proc.port;
const held: RawClient[] = [];

async function lock(request: string): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.request(request);
  held.push(c);
  return c;
}

await using browser = await launchBrowser();
const { page } = await browser.page();
await page.goto(base);
await page.waitForSelector('#conn[data-state="live"]');

// Locks change hands for a while, faster and slower: the sparklines' history.
const start = performance.now();
let i = 0;
while (performance.now() - start < 40_000) {
  const burst = 2 + Math.round(6 * (1 + Math.sin(i / 4)));
  await Promise.all(Array.from({ length: burst }, async (_, k) => {
    const c = await RawClient.connect(port);
    await c.request(`lock,name:batch-${k % 3},client-id:worker-${k},wait:0.2`);
    await c.request("release");
    c.close();
  }));
  i++;
  await new Promise((r) => setTimeout(r, 250));
}

await lock("lock,name:db-migration,client-id:deploy-4821@ci-runner-3");
for (const who of ["deploy-4822@ci-runner-1", "backfill@ops-laptop", "deploy-4823@ci-runner-3"]) {
  await lock(`lock,name:db-migration,client-id:${who},wait:600`);
}
await lock("lock,name:nightly-rebuild,client-id:cron@build-7,ttl:90");
await lock("lock,name:render-slots,client-id:render-a,limit:3");
await lock("lock,name:render-slots,client-id:render-b,limit:3");
await lock("lock,name:search-reindex,client-id:indexer-2");
await lock("lock,name:search-reindex,client-id:indexer-5,wait:300");
await lock("lock,name:cache-warmup,client-id:web-01");
await lock("lock,name:invoice-run-2026-12,client-id:billing@batch-2");
// A little traffic goes on while the pictures are taken (on names that do not stay held).
let traffic = true;
const background = (async () => {
  for (let k = 0; traffic; k++) {
    const c = await RawClient.connect(port);
    await c.request(`lock,name:report-${k % 2},client-id:worker-${k % 5},wait:0.1`);
    await c.request("release");
    c.close();
    await new Promise((r) => setTimeout(r, 120));
  }
})();
await new Promise((r) => setTimeout(r, 4000));

await Deno.mkdir(`${ROOT}docs/img`, { recursive: true });
await page.setViewport({ width: 1200, height: 720 });
await page.screenshot({ path: `${ROOT}docs/img/page.png` as `${string}.png` });
await page.emulateMediaFeatures([{ name: "prefers-color-scheme", value: "dark" }]);
await page.setViewport({ width: 360, height: 760 });
await new Promise((r) => setTimeout(r, 500));
await page.screenshot({ path: `${ROOT}docs/img/page-narrow-dark.png` as `${string}.png` });
traffic = false;
await background;
for (const c of held) c.close();
console.log("wrote docs/img/page.png and docs/img/page-narrow-dark.png");
