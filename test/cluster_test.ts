// Scale-out: several server.ts processes sharing one event log in a real
// redis-server (Debian's), over real sockets. Each group starts its own Redis
// on a free port of 127.0.0.1, with a fresh data directory.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import {
  compareIds,
  type EventReader,
  eventually,
  publish,
  RUNTIME,
  type Runtime,
  type ServerProcess,
  type SseEvent,
  startServer,
  stats,
  subscribe,
} from "./helpers.ts";
import { RedisServer } from "./redis_server.mjs";
import * as jose from "jose";

const OTHER_RUNTIME = RUNTIME === "deno" ? "bun" : "deno";

/** A redis-server that persists every write before acknowledging it, stopped if a test fails. */
function startRedis(): Promise<RedisServer> {
  return RedisServer.start({
    onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
  });
}

/** Publishes and reports the status, with the id when it was accepted. */
async function tryPublish(base: string, data: string): Promise<{ status: number; id?: string }> {
  const response = await fetch(new URL("/publish", base), { method: "POST", body: data });
  const body = await response.json();
  return { status: response.status, id: body.id };
}

/**
 * A Redis and one server.ts process on it per runtime listed, started before
 * the tests of the enclosing describe and stopped after them.
 */
function useCluster(env: Record<string, string>, runtimes: Runtime[]) {
  const cluster = { redis: undefined as unknown as RedisServer, servers: [] as ServerProcess[] };
  before(async () => {
    cluster.redis = await startRedis();
    const shared = { REDIS_URL: cluster.redis.url, ...env };
    cluster.servers = await Promise.all(runtimes.map((runtime) => startServer(shared, runtime)));
  });
  after(async () => {
    for (const server of cluster.servers) assert.equal(await server.stop(), 0);
    await cluster.redis.stop();
  });
  return cluster;
}

const ids = (events: SseEvent[]) => events.map((event) => event.lastEventId);

describe("a cluster on Redis", () => {
  // The third process runs on the other runtime: one log, any mix of processes.
  const cluster = useCluster({}, [RUNTIME, RUNTIME, OTHER_RUNTIME]);

  test("a subscriber on each process gets every event, in the same order", async () => {
    const readers = await Promise.all(
      cluster.servers.map((server) => subscribe(`${server.url}events`)),
    );
    // 60 publishes in flight at once, 20 through each process.
    const published = await Promise.all(
      Array.from({ length: 60 }, (_, n) => publish(cluster.servers[n % 3].url, { data: `e${n}` })),
    );
    const received = await Promise.all(readers.map((reader) => reader.events(60)));
    for (const events of received) {
      assert.deepEqual(ids(events), ids(received[0]), "one order on every process");
      assert.deepEqual(new Set(ids(events)), new Set(published), "each event once");
    }
    const byId = new Map(received[0].map((event) => [event.lastEventId, event.data]));
    published.forEach((id, n) => assert.equal(byId.get(id), `e${n}`));
    await Promise.all(readers.map((reader) => reader.cancel()));
  });

  test("a client cut from one process resumes on another with exactly what it missed", async () => {
    const [a, b, c] = cluster.servers;
    const first = await subscribe(`${a.url}events?topic=resume`);
    for (const n of [1, 2, 3]) await publish(a.url, { data: `${n}`, topic: "resume" });
    const seen = await first.events(3);
    await first.cancel();
    for (const n of [4, 5, 6, 7]) await publish(c.url, { data: `${n}`, topic: "resume" });

    const again = await subscribe(`${b.url}events?topic=resume`, {
      "last-event-id": seen[2].lastEventId,
    });
    assert.deepEqual((await again.events(4)).map((event) => event.data), ["4", "5", "6", "7"]);
    const caughtUp = await again.event();
    assert.deepEqual([caughtUp.event, JSON.parse(caughtUp.data)], ["replayed", { count: 4 }]);
    await publish(a.url, { data: "live", topic: "resume" });
    assert.equal((await again.event()).data, "live", "then live, with no duplicate");
    await again.cancel();
  });

  test("an id that Redis no longer holds is a gap, on any process", async () => {
    const reader = await subscribe(`${cluster.servers[1].url}events`, { "last-event-id": "1-1" });
    const gap = await reader.event();
    assert.equal(gap.event, "gap");
    await reader.cancel();
  });
});

describe("the ticker of a cluster", () => {
  const cluster = useCluster({ TICK_MS: "50" }, [RUNTIME, RUNTIME]);

  test("ticks once per interval for all processes, not once per process", async () => {
    const readers = await Promise.all(
      cluster.servers.map((server) => subscribe(`${server.url}events?topic=time`)),
    );
    // Both readers start at the same point of the log: after this event.
    await publish(cluster.servers[0].url, { data: "start", topic: "time" });
    await Promise.all(readers.map((reader) => reader.until((event) => event.data === "start")));
    // Each tick carries the start of its interval: a second process ticking
    // too would repeat one.
    const ticks = await Promise.all(readers.map((reader) => reader.events(20)));
    assert.deepEqual(ids(ticks[1]), ids(ticks[0]));
    const times = ticks[0].map((tick) => Date.parse(tick.data));
    assert.equal(new Set(times).size, 20, `no interval ticked twice: ${times}`);
    for (const time of times) assert.equal(time % 50, 0);
    await Promise.all(readers.map((reader) => reader.cancel()));
  });
});

describe("private events on a cluster", () => {
  const SECRET = "a cluster secret of at least 32 bytes";
  const cluster = useCluster({ JWT_SECRET: SECRET }, [RUNTIME, OTHER_RUNTIME]);
  const key = new TextEncoder().encode(SECRET);
  const token = (grants: object) =>
    new jose.SignJWT({ sse: grants }).setProtectedHeader({ alg: "HS256" }).sign(key);

  test("reach only granted subscribers on every process, live and in replay", async () => {
    const [a, b] = cluster.servers;
    const granted = await token({ subscribe: ["team/*"], publish: ["*"] });
    const other = await token({ subscribe: ["elsewhere"] });
    const listen = (server: ServerProcess, bearer: string, headers = {}) =>
      subscribe(`${server.url}events`, { authorization: `Bearer ${bearer}`, ...headers });
    const [onB, otherOnB] = [await listen(b, granted), await listen(b, other)];
    const post = (body: object) =>
      fetch(new URL("/publish", a.url), {
        method: "POST",
        headers: { authorization: `Bearer ${granted}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      }).then((response) => response.json());
    const secret = (await post({ data: "secret", topic: "team/red", private: true })).id;
    const open = (await post({ data: "public", topic: "team/red" })).id;
    assert.deepEqual(ids(await onB.events(2)), [secret, open]);
    assert.deepEqual(ids(await otherOnB.events(1)), [open]);
    // Resuming on the other process from an id Redis does not hold: all it keeps is replayed.
    const before = "0-0";
    const replay = async (bearer: string) =>
      ids(
        (await (await listen(a, bearer, { "last-event-id": before })).until((e) =>
          e.event === "replayed"
        )).filter((e) => e.event === "message"),
      );
    assert.deepEqual(await replay(granted), [secret, open]);
    assert.deepEqual(await replay(other), [open]);
    await onB.cancel();
    await otherOnB.cancel();
  });
});

describe("Redis lost while running", () => {
  const cluster = useCluster({ HEARTBEAT_MS: "100" }, [RUNTIME, RUNTIME]);

  test("streams stay open, publishing answers 503, and nothing accepted is lost", async () => {
    const [a, b] = cluster.servers;
    const streams = await Promise.all(
      cluster.servers.map(async (server) => collect(await subscribe(`${server.url}events`))),
    );
    const accepted: string[] = [];
    const refused: number[] = [];
    // Publish through both processes, one after another, across the crash
    // and the restart (bounded: at most 5000 publishes).
    let publishing = true;
    const publisher = (async () => {
      for (let n = 0; publishing && n < 5000; n++) {
        const result = await tryPublish(cluster.servers[n % 2].url, `p${n}`);
        if (result.status === 200) accepted.push(result.id!);
        else {
          refused.push(result.status);
          await new Promise((resolve) => setTimeout(resolve, 10)); // pace retries
        }
      }
    })();
    await eventually(() => accepted.length >= 20, 10_000, "publishes before the crash");
    await cluster.redis.kill();
    await eventually(() => refused.length >= 5, 10_000, "publishes refused while Redis is down");
    assert.deepEqual([...new Set(refused)], [503]);

    // Both streams stay open: heartbeats go on arriving.
    const heartbeats = streams.map((stream) => stream.comments);
    await eventually(
      () => streams.every((stream, i) => stream.comments >= heartbeats[i] + 2),
      5_000,
      "heartbeats while Redis is down",
    );
    assert.ok(streams.every((stream) => !stream.ended));
    const resume = await subscribe(`${b.url}events`, { "last-event-id": accepted[0] });
    assert.equal(await resume.next(), null, "a resume that needs Redis ends, to be retried");

    await cluster.redis.start();
    const before = accepted.length;
    await eventually(() => accepted.length >= before + 20, 10_000, "publishes after the restart");
    publishing = false;
    await publisher;
    const last = await publish(a.url, { data: "last" });

    for (const stream of streams) {
      await eventually(() => stream.ids.includes(last), 5_000, "the last event");
      assert.equal(new Set(stream.ids).size, stream.ids.length, "nothing twice");
      const missing = accepted.filter((id) => !stream.ids.includes(id));
      assert.deepEqual(missing, [], "every accepted event arrives");
      assert.deepEqual(stream.ids, stream.ids.toSorted(compareIds), "in the log's order");
      await stream.reader.cancel();
    }
    // Redis kept them through the crash: a late client replays them all.
    const late = await subscribe(`${a.url}events`, { "last-event-id": accepted[0] });
    const replay = await late.until((event) => event.event === "replayed");
    assert.deepEqual(
      ids(replay.slice(0, -1)).filter((id) => accepted.includes(id)),
      accepted.slice(1).toSorted(compareIds),
    );
    await late.cancel();
  });
});

/** Reads a stream in the background, keeping its event ids and counting heartbeats. */
function collect(reader: EventReader) {
  const stream = { reader, ids: [] as string[], comments: 0, ended: false };
  (async () => {
    try {
      for (let item = await reader.next(); item !== null; item = await reader.next()) {
        if (item.type === "comment") stream.comments++;
        else stream.ids.push(item.lastEventId);
      }
    } catch {
      // cancelled by the test
    }
    stream.ended = true;
  })();
  return stream;
}

describe("starting a cluster", () => {
  test("Redis unreachable at start: a clear error and exit 1", async () => {
    const redis = await startRedis();
    await redis.stop(); // a port where nothing listens now
    await assert.rejects(
      startServer({ REDIS_URL: redis.url }),
      /exited \(1\)[\s\S]*error: cannot reach Redis at redis:\/\/127\.0\.0\.1:\d+: .*ECONNREFUSED/,
    );
  });

  test("REUSE_PORT=1 lets several processes serve one port", async () => {
    const redis = await startRedis();
    const first = await startServer({ REDIS_URL: redis.url, REUSE_PORT: "1" }, RUNTIME, [
      "--unstable-net",
    ]);
    const port = new URL(first.url).port;
    const second = await startServer(
      { REDIS_URL: redis.url, REUSE_PORT: "1", PORT: port },
      RUNTIME,
      [
        "--unstable-net",
      ],
    );
    assert.equal(second.url, first.url);
    // The kernel spreads connections over both; every client gets the event.
    const readers = await Promise.all(
      Array.from({ length: 8 }, () => subscribe(`${first.url}events`)),
    );
    const id = await publish(first.url, { data: "to all" });
    for (const reader of readers) assert.equal((await reader.event()).lastEventId, id);
    await Promise.all(readers.map((reader) => reader.cancel()));
    assert.equal(await first.stop(), 0);
    assert.equal(await second.stop(), 0);
    await redis.stop();
  });
});

describe("idempotent and batch publishing, backlog and expiry on Redis", () => {
  const cluster = useCluster({ IDEMPOTENCY_WINDOW_MS: "1500", HISTORY_TTL_MS: "1500" }, [
    RUNTIME,
    RUNTIME,
  ]);

  const publishWith = async (base: string, body: unknown, key?: string) => {
    const response = await fetch(new URL("/publish", base), {
      method: "POST",
      headers: {
        "content-type": "application/json",
        ...(key === undefined ? {} : { "idempotency-key": key }),
      },
      body: JSON.stringify(body),
    });
    return { status: response.status, body: await response.json() };
  };

  test("20 concurrent identical publishes with one key through two processes: one id, one event", async () => {
    const [a, b] = cluster.servers;
    const readers = [await subscribe(`${a.url}events`), await subscribe(`${b.url}events`)];
    const answers = await Promise.all(
      Array.from(
        { length: 20 },
        (_, i) => publishWith((i % 2 ? a : b).url, { data: "charge 42" }, "payment-42"),
      ),
    );
    assert.deepEqual(new Set(answers.map((answer) => answer.status)), new Set([200]));
    const ids = new Set(answers.map((answer) => answer.body.id));
    assert.equal(ids.size, 1, "one id for all");
    const marker = await publish(a.url, { data: "marker" });
    for (const reader of readers) {
      const seen = await reader.until((event) => event.lastEventId === marker);
      assert.deepEqual(seen.map((event) => event.data), ["charge 42", "marker"]);
    }
    const reused = await publishWith(b.url, { data: "charge 43" }, "payment-42");
    assert.deepEqual(reused, {
      status: 422,
      body: { error: "the idempotency key was used for other events" },
    });
    await Promise.all(readers.map((reader) => reader.cancel()));
  });

  test("IDEMPOTENCY_WINDOW_MS: once it has passed, the key publishes again", async () => {
    const [a, b] = cluster.servers;
    const first = await publishWith(a.url, { data: "x" }, "window-key");
    const again = await publishWith(b.url, { data: "x" }, "window-key");
    assert.equal(again.body.id, first.body.id);
    await new Promise((resolve) => setTimeout(resolve, 1600)); // the window is 1.5 s
    const later = await publishWith(b.url, { data: "x" }, "window-key");
    assert.equal(later.status, 200);
    assert.notEqual(later.body.id, first.body.id);
  });

  test("a batch through Redis: ids in order, delivered in order on both processes, replayed", async () => {
    const [a, b] = cluster.servers;
    const reader = await subscribe(`${b.url}events?topic=batch`);
    const before = await publish(a.url, { data: "before", topic: "batch" });
    const batch = await publishWith(a.url, [
      { data: "1", topic: "batch" },
      { data: "2", topic: "batch", event: "two" },
      { data: "3", topic: "batch" },
    ]);
    assert.equal(batch.status, 200);
    const ids: string[] = batch.body.ids;
    assert.deepEqual([...ids].sort(compareIds), ids);
    const live = await reader.until((event) => event.lastEventId === ids[2]);
    assert.deepEqual(live.map((event) => [event.data, event.lastEventId]), [
      ["before", before],
      ["1", ids[0]],
      ["2", ids[1]],
      ["3", ids[2]],
    ]);
    const replay = await subscribe(`${a.url}events?topic=batch`, { "last-event-id": before });
    assert.deepEqual((await replay.events(4)).map((event) => event.data), [
      "1",
      "2",
      "3",
      '{"count":3}',
    ]);
    const bad = await publishWith(a.url, [{ data: "ok" }, { data: "x", retry: -1 }]);
    assert.deepEqual(bad, {
      status: 400,
      body: { error: "[1].retry must be a non-negative integer" },
    });
    await Promise.all([reader.cancel(), replay.cancel()]);
  });

  test("HISTORY_TTL_MS: expired events are not replayed; resuming from one reports the gap", async () => {
    const [a, b] = cluster.servers;
    const older = await publish(a.url, { data: "older", topic: "ttl" });
    const old = await publish(a.url, { data: "old", topic: "ttl" });
    await new Promise((resolve) => setTimeout(resolve, 1600)); // the TTL is 1.5 s
    const recent = await publish(a.url, { data: "recent", topic: "ttl" });
    const resumed = await subscribe(`${b.url}events?topic=ttl`, { "last-event-id": older });
    assert.equal((await resumed.event()).event, "gap");
    assert.deepEqual([(await resumed.event()).lastEventId], [recent]);
    // The newest expired event is no gap: nothing after it was lost.
    const fromNewestExpired = await subscribe(`${b.url}events?topic=ttl`, {
      "last-event-id": old,
    });
    assert.deepEqual(
      (await fromNewestExpired.events(2)).map((event) => [event.event, event.lastEventId]),
      [["message", recent], ["replayed", recent]],
    );
    const earliest = await subscribe(`${b.url}events?topic=ttl&lastEventId=earliest`);
    assert.deepEqual((await earliest.events(2)).map((event) => event.data), [
      "recent",
      '{"count":1}',
    ]);
    const since = new Date(Number(recent.split("-")[0]) - 1).toISOString();
    const fromTime = await subscribe(`${a.url}events?topic=ttl&since=${since}`);
    assert.deepEqual((await fromTime.events(2)).map((event) => event.data), [
      "recent",
      '{"count":1}',
    ]);
    await Promise.all([
      resumed.cancel(),
      fromNewestExpired.cancel(),
      earliest.cancel(),
      fromTime.cancel(),
    ]);
  });

  test("per-topic counts in /stats follow clients as they come and go, per process", async () => {
    const [a, b] = cluster.servers;
    const readers = [
      await subscribe(`${a.url}events?topic=x&topic=y`),
      await subscribe(`${a.url}events?topic=x`),
      await subscribe(`${a.url}events`),
      await subscribe(`${b.url}events?topic=x`),
    ];
    const counted = await stats(a.url);
    assert.deepEqual([counted.clientsByTopic, counted.clientsWithoutTopic], [{ x: 2, y: 1 }, 1]);
    assert.deepEqual((await stats(b.url)).clientsByTopic, { x: 1 }, "per process");
    await readers[0].cancel();
    await eventually(
      async () => JSON.stringify((await stats(a.url)).clientsByTopic) === '{"x":1}',
      5000,
      "y gone from the counts",
    );
    await Promise.all(readers.slice(1).map((reader) => reader.cancel()));
  });
});

test("on Redis: a batch longer than HISTORY reaches live clients whole; a window of 0 keeps no key", async () => {
  const redis = await startRedis();
  try {
    const server = await startServer({
      REDIS_URL: redis.url,
      HISTORY: "5",
      IDEMPOTENCY_WINDOW_MS: "0",
    });
    try {
      const reader = await subscribe(`${server.url}events`);
      const batch = Array.from({ length: 12 }, (_, i) => ({ data: `${i}` }));
      const response = await fetch(new URL("/publish", server.url), {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(batch),
      });
      const { ids } = await response.json();
      assert.equal(ids.length, 12);
      assert.deepEqual((await reader.events(12)).map((event) => event.lastEventId), ids);
      const keyed = () =>
        fetch(new URL("/publish", server.url), {
          method: "POST",
          headers: { "idempotency-key": "k" },
          body: "x",
        }).then(async (answer) => [answer.status, (await answer.json()).id]);
      const [first, second] = [await keyed(), await keyed()];
      assert.equal(first[0], 200);
      assert.equal(second[0], 200);
      assert.notEqual(first[1], second[1], "no window: each publish is new");
      await reader.cancel();
    } finally {
      assert.equal(await server.stop(), 0);
    }
  } finally {
    await redis.stop();
  }
});
