/**
 * Runs the protocol and client test suites again with the locks in etcd
 * (`TCPNETLOCK_TEST_STORE=etcd`), when Debian's etcd is installed (.ci/run installs it); without
 * it, says so and succeeds, so that `deno task test` also works on a machine that has only Deno.
 *
 * ```sh
 * deno run -A tests/run_with_etcd.ts
 * ```
 *
 * @module
 */

const which = await new Deno.Command("sh", { args: ["-c", "command -v etcd"], stdout: "null" })
  .output();
if (!which.success) {
  console.warn(
    "etcd is not installed (apt-get install etcd-server): the protocol suite against the etcd " +
      "store is skipped",
  );
  Deno.exit(0);
}
const root = new URL("..", import.meta.url).pathname;
const status = await new Deno.Command(Deno.execPath(), {
  args: [
    "test",
    "-A",
    "--sanitize-ops",
    "--sanitize-resources",
    "--parallel",
    `${root}tests/protocol_v1_test.ts`,
    `${root}tests/protocol_v2_test.ts`,
    `${root}tests/protocol_shared_test.ts`,
    `${root}tests/shared_tools_test.ts`,
    `${root}tests/protocol_v3_test.ts`,
    `${root}tests/client_test.ts`,
    `${root}tests/client_session_test.ts`,
  ],
  env: { TCPNETLOCK_TEST_STORE: "etcd" },
  stdin: "null",
}).spawn().status;
Deno.exit(status.code);
