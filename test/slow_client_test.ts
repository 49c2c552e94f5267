// A client that never reads must be cut without slowing anyone else down,
// and must not make the server's memory grow with what is published.
import { test } from "./harness.ts";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import {
  compareIds,
  eventually,
  publish,
  RUNTIME,
  startServer,
  stats,
  subscribe,
} from "./helpers.ts";

/** Opens a raw TCP connection, asks for the stream, and never reads a byte. */
async function stalledClient(url: string): Promise<Socket> {
  const { hostname, port } = new URL(url);
  const socket = connect({ host: hostname, port: Number(port) });
  await new Promise((resolve) => socket.once("connect", resolve));
  socket.pause(); // stop reading: the kernel buffers fill, then the server's queue
  socket.write(`GET /events HTTP/1.1\r\nhost: ${hostname}\r\n\r\n`);
  return socket;
}

test("a client that never reads is cut; every other client gets every event", async () => {
  const server = await startServer({ MAX_QUEUE_BYTES: String(256 * 1024) });
  const stalled = await stalledClient(server.url);
  try {
    const readers = await Promise.all([1, 2, 3].map(() => subscribe(`${server.url}events`)));
    await eventually(async () => (await stats(server.url)).clients === 4, 5000, "4 clients");
    const rssBefore = server.rssKiB();

    // 2,000 events of 4 KiB: loopback's kernel send buffer alone takes up
    // to 4 MiB (tcp_wmem), so fewer bytes would never reach the broker's queue.
    const payload = "x".repeat(4096);
    const count = 2000;
    // Several publishes in flight, as a busy publisher would have.
    const received = Promise.all(readers.map((reader) => reader.events(count)));
    for (let i = 0; i < count; i += 8) {
      await Promise.all(
        Array.from({ length: 8 }, (_, j) => publish(server.url, { data: `${i + j} ${payload}` })),
      );
    }
    const all = await received;
    for (const events of all) {
      const ids = events.map((event) => event.lastEventId);
      assert.deepEqual([...ids].sort(compareIds), ids, "ids in order");
      assert.equal(new Set(events.map((event) => event.data)).size, count, "every event, once");
      assert.deepEqual(events.map((event) => event.data), all[0].map((event) => event.data));
    }

    const after = await stats(server.url);
    assert.equal(after.slowDisconnects, 1, "the stalled client was cut");
    assert.equal(after.clients, 3);
    assert.equal(after.delivered >= count * 3, true);
    // A coarse guard: 8 MiB went to each client, and handling 2,000 publishes
    // grows Deno and Bun by about 30 MiB here, Node by about 85 MiB with or
    // without the stalled client (V8's heap), so this catches unbounded
    // growth, not a few MiB. The cut above is the exact check (and
    // mod_test.ts checks the queue bound in process).
    const grewKiB = server.rssKiB() - rssBefore;
    const limitMiB = RUNTIME === "node" ? 128 : 64;
    assert.ok(grewKiB < limitMiB * 1024, `server memory grew by ${grewKiB} KiB`);
    await Promise.all(readers.map((reader) => reader.cancel()));
  } finally {
    stalled.destroy();
    assert.equal(await server.stop(), 0);
  }
});
