/**
 * When a connection's socket gets TCP_NODELAY and keepalive (lib/session.ts `tune`): not at
 * accept (a lock taken and released at once never pays for them), at once for a waiter (its
 * `queued` lines and the `ok` after them follow one another with nothing from the peer between),
 * and about a second after the grant for a holder (keepalive finds a vanished peer). Seen from
 * outside with `ss -o`, which shows a keepalive timer on sockets that have SO_KEEPALIVE.
 */

import assert from "node:assert/strict";
import { RawClient, startTestServer, until } from "./test_util.ts";

const hasSs = (() => {
  try {
    return new Deno.Command("ss", { args: ["-V"], stdout: "null", stderr: "null" }).outputSync()
      .success;
  } catch {
    return false;
  }
})();
if (!hasSs) console.warn("tcp_tune_test: skipped, ss (iproute2) is not installed");

/** Whether the server's end of the connection from local port `clientPort` has keepalive on. */
async function keepaliveOn(serverPort: number, clientPort: number): Promise<boolean> {
  const out = await new Deno.Command("ss", {
    args: [
      "-tnoH",
      "state",
      "established",
      `( sport = :${serverPort} and dport = :${clientPort} )`,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.ok(out.success && text.trim() !== "", `ss found no such socket: ${text}`);
  return /timer:\(keepalive/.test(text);
}

const portOf = (c: RawClient) => (c.conn.localAddr as Deno.NetAddr).port;

Deno.test({
  name:
    "socket options: none at accept, at once for a waiter, a second after the grant for a holder",
  ignore: !hasSs,
  fn: async () => {
    await using srv = await startTestServer();
    await using holder = await RawClient.connect(srv.port);
    assert.equal(await holder.request("lock,name:tuned"), "ok");
    // Just granted: nothing set yet.
    assert.equal(await keepaliveOn(srv.port, portOf(holder)), false);

    await using waiter = await RawClient.connect(srv.port);
    assert.equal(await waiter.request("lock,name:tuned,wait:30"), "queued,position:1");
    assert.equal(await keepaliveOn(srv.port, portOf(waiter)), true, "a waiter at once");

    // The holder: about a second after its grant.
    await until(() => keepaliveOn(srv.port, portOf(holder)), "the holder's keepalive", 5000, 50);
  },
});
