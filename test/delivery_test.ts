// No lost events: replay, topics, heartbeats and disconnects against a real
// server.ts process, over real sockets.
import { after, before, describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import {
  compareIds,
  eventually,
  publish,
  type ServerProcess,
  type SseEvent,
  startServer,
  stats,
  subscribe,
  withServer,
} from "./helpers.ts";

const data = (events: SseEvent[]) => events.map((event) => event.data);

describe("replay", () => {
  let server: ServerProcess;
  before(async () => server = await startServer({ HISTORY: "50" }));
  after(async () => assert.equal(await server.stop(), 0));

  for (const via of ["header", "query"]) {
    test(`a client that reconnects with Last-Event-ID (${via}) gets exactly what it missed`, async () => {
      const first = await subscribe(`${server.url}events?topic=r-${via}`);
      const ids = [];
      for (const n of [1, 2, 3]) {
        ids.push(await publish(server.url, { data: `${n}`, topic: `r-${via}` }));
      }
      assert.deepEqual(data(await first.events(3)), ["1", "2", "3"]);
      await first.cancel();
      for (const n of [4, 5, 6, 7]) await publish(server.url, { data: `${n}`, topic: `r-${via}` });

      const url = `${server.url}events?topic=r-${via}`;
      const again = via === "header"
        ? await subscribe(url, { "last-event-id": ids[2] })
        : await subscribe(`${url}&lastEventId=${ids[2]}`);
      assert.deepEqual(data(await again.events(4)), ["4", "5", "6", "7"]);
      const caughtUp = await again.event();
      assert.deepEqual([caughtUp.event, JSON.parse(caughtUp.data)], ["replayed", { count: 4 }]);
      await publish(server.url, { data: "live", topic: `r-${via}` });
      assert.equal((await again.event()).data, "live", "then live, with no duplicate");
      await again.cancel();
    });
  }

  test("publishing during a replay neither loses nor duplicates at the seam", async () => {
    const topic = "seam";
    const ids = [];
    for (let n = 0; n < 40; n++) ids.push(await publish(server.url, { data: `${n}`, topic }));
    // Publish 300 more, 4 in flight, while a client resumes from the 20th.
    const publishing = (async () => {
      for (let n = 40; n < 340; n += 4) {
        ids.push(
          ...await Promise.all(
            [0, 1, 2, 3].map((k) => publish(server.url, { data: `${n + k}`, topic })),
          ),
        );
      }
      ids.push(await publish(server.url, { data: "end", topic }));
    })();
    const reader = await subscribe(`${server.url}events?topic=${topic}`, {
      "last-event-id": ids[19],
    });
    const received = await reader.until((event) => event.data === "end");
    await publishing;
    const markers = received.filter((event) => event.event === "replayed");
    assert.equal(markers.length, 1, "one replayed event, at the seam");
    assert.ok(JSON.parse(markers[0].data).count >= 20);
    const events = received.filter((event) => event.event === "message");
    // Every event after the client's id, once, in id order: no gap, no duplicate.
    const expected = ids.slice(20).sort(compareIds);
    assert.equal(events[0].lastEventId, ids[20], "starts right after the client's id");
    assert.deepEqual(events.map((event) => event.lastEventId), expected);
    assert.equal(events.length, 20 + 300 + 1);
    assert.ok((await stats(server.url)).replayed >= 20);
    await reader.cancel();
  });

  test("an id older than the history gets a gap event, then all that is retained", async () => {
    const topic = "old";
    const ids = [];
    for (let n = 0; n < 60; n++) ids.push(await publish(server.url, { data: `${n}`, topic }));
    const reader = await subscribe(`${server.url}events?topic=${topic}`, {
      "last-event-id": ids[0],
    });
    const gap = await reader.event();
    assert.equal(gap.event, "gap");
    assert.equal(gap.lastEventId, "", "a gap event does not move the client's id");
    // HISTORY=50: ids[10] is the oldest event still retained.
    assert.deepEqual(JSON.parse(gap.data), { oldestId: ids[10] });
    assert.deepEqual(data(await reader.events(50)), ids.slice(10).map((_, i) => `${i + 10}`));
    assert.deepEqual(JSON.parse((await reader.event()).data), { count: 50 });
    await reader.cancel();
  });

  test("malformed ids never crash anything and are treated as unknown", async () => {
    for (const id of ["abc", "-1", "1e400", "1-2-3", "9".repeat(400), "a\u0000b", "1-x"]) {
      const response = await fetch(
        `${server.url}events?topic=none&lastEventId=${encodeURIComponent(id)}`,
      );
      assert.equal(response.status, 200, id);
      await response.body!.cancel();
    }
    const reader = await subscribe(`${server.url}events?topic=old`, { "last-event-id": "abc" });
    assert.equal((await reader.event()).event, "gap");
    await reader.cancel();
    await eventually(async () => (await stats(server.url)).clients === 0, 5000, "0 clients");
  });
});

test("ids keep increasing across a restart, and resuming across it reports a gap", async () => {
  const before = await startServer();
  const oldId = await publish(before.url, { data: "before" });
  assert.equal(await before.stop(), 0);

  await withServer({}, async (server) => {
    const newId = await publish(server.url, { data: "after" });
    const [oldEpoch, newEpoch] = [oldId, newId].map((id) => Number(id.split("-")[0]));
    assert.ok(newEpoch > oldEpoch, `${newId} sorts after ${oldId}`);
    const reader = await subscribe(`${server.url}events`, { "last-event-id": oldId });
    const [gap, event, replayed] = await reader.events(3);
    assert.deepEqual([gap.event, JSON.parse(gap.data)], ["gap", { oldestId: newId }]);
    assert.deepEqual([event.data, event.lastEventId], ["after", newId]);
    assert.deepEqual([replayed.event, replayed.data], ["replayed", '{"count":1}']);
    await reader.cancel();
  });
});

test("topics filter live events and replay", async () => {
  await withServer({}, async (server) => {
    const everything = await subscribe(`${server.url}events`);
    const onlyA = await subscribe(`${server.url}events?topic=a`);
    const bAndC = await subscribe(`${server.url}events?topic=b&topic=c`);
    const start = await publish(server.url, { data: "start" });
    await publish(server.url, { data: "to a", topic: "a" });
    await publish(server.url, { data: "to b", topic: "b" });
    await publish(server.url, { data: "to a and c", topic: ["a", "c"] });
    await publish(server.url, { data: "to b and c", topic: ["b", "c"] });
    await publish(server.url, { data: "end", topic: ["a", "b"] });
    const isEnd = (event: SseEvent) => event.data === "end";
    assert.deepEqual(data(await everything.until(isEnd)), [
      "start",
      "to a",
      "to b",
      "to a and c",
      "to b and c",
      "end",
    ]);
    assert.deepEqual(data(await onlyA.until(isEnd)), ["to a", "to a and c", "end"]);
    assert.deepEqual(data(await bAndC.until(isEnd)), ["to b", "to a and c", "to b and c", "end"]);

    const resumed = await subscribe(`${server.url}events?topic=a`, { "last-event-id": start });
    assert.deepEqual(data(await resumed.until(isEnd)), ["to a", "to a and c", "end"]);
    assert.deepEqual(JSON.parse((await resumed.event()).data), { count: 3 });
    // Up to date already: told so at once.
    const current = await subscribe(`${server.url}events?topic=a`, {
      "last-event-id": (await stats(server.url)).lastEventId as unknown as string,
    });
    const upToDate = await current.event();
    assert.deepEqual([upToDate.event, upToDate.data], ["replayed", '{"count":0}']);
    await current.cancel();
    for (const reader of [everything, onlyA, bAndC, resumed]) await reader.cancel();
  });
});

test("an idle stream gets heartbeat comments", async () => {
  await withServer({ HEARTBEAT_MS: "100" }, async (server) => {
    const reader = await subscribe(`${server.url}events`);
    const item = await reader.next();
    assert.equal(item?.type, "comment");
    await reader.cancel();
  });
});

test("500 clients that vanish abruptly are all removed", async () => {
  const server = await startServer({ HEARTBEAT_MS: "500" });
  const { hostname, port } = new URL(server.url);
  const sockets: Socket[] = [];
  try {
    await Promise.all(Array.from({ length: 500 }, async () => {
      const socket = connect({ host: hostname, port: Number(port) });
      sockets.push(socket);
      await new Promise((resolve) => socket.once("connect", resolve));
      socket.write(`GET /events HTTP/1.1\r\nhost: ${hostname}\r\n\r\n`);
      // Wait for the response to start, so the server holds the stream.
      await new Promise((resolve) => socket.once("data", resolve));
    }));
    assert.equal((await stats(server.url)).clients, 500);
    for (const socket of sockets) socket.destroy();
    await eventually(async () => (await stats(server.url)).clients === 0, 5000, "0 clients");
    // The server still serves.
    const reader = await subscribe(`${server.url}events`);
    await publish(server.url, { data: "still here" });
    assert.equal((await reader.event()).data, "still here");
    await reader.cancel();
  } finally {
    for (const socket of sockets) socket.destroy();
    assert.equal(await server.stop(), 0);
  }
});

test("an idle stream and an idle keep-alive connection survive 30 seconds", {
  timeout: 60_000,
}, async () => {
  await withServer({}, async (server) => {
    const reader = await subscribe(`${server.url}events`);
    // A connection that has answered once and then waits, as a load balancer
    // keeps one for its next request (for up to 60 s on AWS).
    const keptAlive = connect(Number(new URL(server.url).port), "127.0.0.1");
    let answers = "";
    let closedAt: number | undefined;
    keptAlive.on("data", (chunk) => answers += chunk);
    keptAlive.on("close", () => closedAt = Date.now() - opened);
    const ask = () => keptAlive.write("GET /stats HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    const opened = Date.now();
    ask();
    const waited = new Promise((resolve) => setTimeout(resolve, 30_000));
    // Nothing is published for 30 s; only heartbeats (every 15 s) arrive.
    let ended = false;
    const watching = (async () => {
      for (let item = await reader.next(); item !== null; item = await reader.next()) {
        if (item.type === "event") return item;
      }
      ended = true;
    })();
    try {
      await waited;
      assert.equal(ended, false, "the stream is still open");
      assert.equal(closedAt, undefined, `the idle connection closed after ${closedAt} ms`);
      ask();
      await eventually(() => answers.split("HTTP/1.1 200").length === 3, 5000, "the 2nd answer");
      assert.equal((await stats(server.url)).clients, 1);
      await publish(server.url, { data: "after 30 s" });
      const event = await watching;
      assert.equal(event?.data, "after 30 s");
      assert.ok(Date.now() - opened >= 30_000);
    } finally {
      keptAlive.destroy();
    }
    await reader.cancel();
  });
});
