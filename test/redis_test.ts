// redis.ts against a real redis-server (Debian's), started once for this
// file: the EventLog and StreamStore contracts (test/contract/), RedisLog
// against MemoryLog on random operations, and what the security review found:
// no script holds Redis for long whatever the request, a Redis that stops
// answering holds no request and a retry is applied once, producers and
// idempotency keys are bounded, and a Redis out of memory is a full store.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { createClient } from "redis";
import { RedisLog, RedisStreamStore } from "../redis.ts";
import {
  type EventLog,
  IdempotencyKeyError,
  type LogEvent,
  MemoryLog,
  type NewEvent,
} from "../mod.ts";
import { eventLogContract, type MakeLog } from "./contract/event_log.ts";
import { type MakeStore, streamStoreContract } from "./contract/stream_store.ts";
import { liveReadCases, type MakeLiveStore } from "./contract/live_reads.ts";
import {
  type MakeSubscriptionStore,
  subscriptionStoreContract,
} from "./contract/subscription_store.ts";
import { createStreamsHandler, MemoryStreamStore, type StreamStore } from "../streams.ts";
import { type EventReader, seededRandom, subscribe, withServer } from "./helpers.ts";
import { RedisServer } from "./redis_server.mjs";

let redis: RedisServer;
let admin: ReturnType<typeof createClient>;
const closers: (() => void)[] = [];

before(async () => {
  redis = await RedisServer.start({
    appendfsync: "no",
    onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
  });
  admin = createClient({ url: redis.url });
  await admin.connect();
});

after(async () => {
  for (const close of closers) close();
  admin?.destroy();
  await redis?.stop();
});

async function streamStore(options: { prefix: string; maxProducers?: number }) {
  const store = await RedisStreamStore.connect({ url: redis.url, ...options });
  closers.push(() => store.close());
  return store;
}

const json = { "content-type": "application/json" };

describe("no request holds Redis for long", () => {
  test("a JSON append of any size is a few entries of at most 64 KiB, one short script", async () => {
    const store = await streamStore({ prefix: "big:" });
    const handle = createStreamsHandler({ prefix: "/", store, maxMessages: 1_000_000 });
    const url = "http://redis.test/zeros";
    assert.equal((await handle(new Request(url, { method: "PUT", headers: json }))).status, 201);
    for (const count of [200_000, 500_000]) {
      // 400 KB, then 1 MB, of [0,0,...]: before, one XADD per message in one
      // script (about a second for 400 KB), and 500 for 1 MB.
      const body = JSON.stringify(Array(count).fill(0));
      const response = await handle(new Request(url, { method: "POST", headers: json, body }));
      assert.equal(response.status, 204, String(count));
    }
    const entries = await admin.xLen("big:d:/zeros");
    assert.ok(entries <= 2 + Math.ceil(1_400_000 / 65_536), `${entries} entries`);
    const page = await handle(new Request(`${url}?offset=-1`));
    const values = await page.json();
    assert.ok(values.length > 100_000 && values.every((value: number) => value === 0));
    // The default caps a request at 100,000 messages.
    const capped = createStreamsHandler({ prefix: "/", store });
    const over = await capped(
      new Request(url, { method: "POST", headers: json, body: JSON.stringify(Array(100_001)) }),
    );
    assert.equal(over.status, 413);
    await over.body?.cancel();
  });

  test("a fork of a long stream is copied a bounded run of entries per script, as the memory store forks", async () => {
    const redisStore = await streamStore({ prefix: "fork:" });
    const stores: StreamStore[] = [redisStore, new MemoryStreamStore()];
    const encode = (text: string) => new TextEncoder().encode(text);
    const text = { contentType: "text/plain", framing: "bytes" as const, closed: false };
    for (const store of stores) {
      await store.create("/long", { ...text, records: [], contentTypeGiven: true });
      // 1,000 appends: 1,000 entries, four scripts' worth of copying.
      for (let i = 0; i < 1000; i++) {
        await store.append("/long", {
          contentType: "text/plain",
          records: [encode(`${i},`)],
          close: false,
        });
      }
    }
    // At the tail, or 2000 bytes in and one more byte of the append that holds it.
    const fork = (store: StreamStore, path: string, anchor?: number) =>
      store.create(path, {
        ...text,
        records: [encode("+own")],
        contentTypeGiven: true,
        fork: { from: "/long", anchor, subOffset: anchor === undefined ? 0 : 1 },
      });
    const all = async (store: StreamStore, path: string) => {
      const parts: Uint8Array[] = [];
      for (let position = 0;;) {
        const read = await store.read(path, position, 1 << 20, false);
        assert.equal(read.status, "ok");
        if (read.status !== "ok" || read.records.length === 0) break;
        parts.push(...read.records);
        position = read.next;
      }
      return new TextDecoder().decode(new Uint8Array(parts.flatMap((part) => [...part])));
    };
    const expected = Array.from({ length: 1000 }, (_, i) => `${i},`).join("");
    for (const anchor of [undefined, 2000]) {
      const path = `/copy-${anchor}`;
      const [copied, shared] = await Promise.all(stores.map((store) => fork(store, path, anchor)));
      assert.equal(copied.status, "created");
      assert.deepEqual(
        { ...copied, info: { ...(copied as { info: object }).info, incarnation: 0 } },
        { ...shared, info: { ...(shared as { info: object }).info, incarnation: 0 } },
      );
      const inherited = anchor === undefined ? expected : expected.slice(0, anchor + 1);
      assert.equal(await all(redisStore, path), `${inherited}+own`);
      assert.equal(await all(stores[1], path), `${inherited}+own`);
    }
    // Nothing of the copy is left: the fork holds its own entries, no copy state.
    const meta = await admin.hGetAll("fork:m:/copy-undefined");
    assert.equal(meta.pending, undefined);
    assert.equal(meta.cursor, undefined);
    assert.equal(await admin.pTTL("fork:m:/copy-undefined"), -1, "no lease left");
  });
});

describe("bounded state on Redis", () => {
  test("at most maxProducers producers per stream, the least recently used forgotten, as in memory", async () => {
    const stores: StreamStore[] = [
      await streamStore({ prefix: "prod:", maxProducers: 2 }),
      new MemoryStreamStore({ maxProducers: 2 }),
    ];
    const answers = [];
    for (const store of stores) {
      await store.create("/p", {
        contentType: "text/plain",
        framing: "bytes",
        closed: false,
        records: [],
        contentTypeGiven: true,
      });
      const append = (id: string, seq: number) =>
        store.append("/p", {
          contentType: "text/plain",
          records: [new Uint8Array([120])],
          close: false,
          producer: { id, epoch: 0, seq },
        }).then((result) => result.status);
      answers.push([
        await append("a", 0),
        await append("b", 0),
        await append("c", 0),
        await append("b", 1),
        await append("a", 1), // forgotten: a new producer starts at 0
        await append("c", 1),
      ]);
    }
    assert.deepEqual(answers[0], ["ok", "ok", "ok", "ok", "seq-gap", "ok"]);
    assert.deepEqual(answers[1], answers[0]);
    assert.equal(await admin.hLen("prod:p:/p"), 2);
  });

  test("RedisLog remembers at most idempotencyKeys keys, forgetting the oldest", async () => {
    const log = await RedisLog.connect({ url: redis.url, key: "keys", idempotencyKeys: 2 });
    closers.push(() => log.close());
    const append = (key: string) =>
      log.append([{ topics: [], text: `data: ${key}\n\n` }], { idempotencyKey: key });
    const first = await append("k1");
    await append("k2");
    assert.deepEqual(await append("k1"), { ids: first.ids, repeated: true });
    await append("k3");
    assert.equal((await append("k1")).repeated, false);
    assert.equal((await append("k3")).repeated, true);
    assert.equal((await append("k2")).repeated, false);
    assert.equal(await admin.hLen("keys:idempotency"), 2);
  });

  test("Redis out of memory is a full store: 503 with Retry-After, and nothing is lost", async () => {
    const store = await streamStore({ prefix: "oom:" });
    const handle = createStreamsHandler({ prefix: "/", store });
    const url = "http://redis.test/filling";
    // A sliding TTL: each read writes the time it was used.
    const created = await handle(
      new Request(url, { method: "PUT", headers: { "stream-ttl": "3600" } }),
    );
    assert.equal(created.status, 201);
    // A fork keeps its source: the source's delete then only marks it (a write).
    const fork = await handle(
      new Request(`${url}-fork`, { method: "PUT", headers: { "stream-forked-from": "/filling" } }),
    );
    assert.equal(fork.status, 201);
    const used = Number(/used_memory:(\d+)/.exec(await admin.info("memory"))![1]);
    await admin.configSet({
      maxmemory: String(used + 2_000_000),
      "maxmemory-policy": "noeviction",
    });
    try {
      const chunk = "x".repeat(100_000);
      let appended = 0;
      let response: Response;
      for (;;) {
        response = await handle(
          new Request(url, {
            method: "POST",
            headers: { "content-type": "application/octet-stream" },
            body: chunk,
          }),
        );
        if (response.status !== 204) break;
        appended++;
        assert.ok(appended < 100, "Redis never refused");
      }
      assert.equal(response.status, 503);
      assert.equal(response.headers.get("retry-after"), "10");
      assert.deepEqual(await response.json(), { error: "Redis is out of memory" });
      const head = await handle(new Request(url, { method: "HEAD" }));
      assert.equal(
        Number(head.headers.get("stream-next-offset")!.split("_")[1]),
        appended * chunk.length,
      );
      // A full Redis refuses writes; reads go on.
      const read = await handle(new Request(`${url}?offset=-1`));
      assert.equal(read.status, 200);
      assert.ok((await read.arrayBuffer()).byteLength >= chunk.length);
      // A delete frees memory, so a full Redis takes it, also the one of a
      // source its fork holds (marked deleted) and then of that fork (both
      // go); then writes fit again.
      assert.equal((await handle(new Request(url, { method: "DELETE" }))).status, 204);
      assert.equal((await handle(new Request(url, { method: "HEAD" }))).status, 410);
      assert.equal((await handle(new Request(`${url}-fork`, { method: "DELETE" }))).status, 204);
      assert.equal(await admin.exists("oom:m:/filling"), 0, "the source went with its fork");
      assert.equal((await handle(new Request(url, { method: "PUT" }))).status, 201);
    } finally {
      await admin.configSet({ maxmemory: "0" });
    }
  });
});

describe("a Redis that stops answering", () => {
  test("publishes and appends answer 503 with Retry-After; a retry after it is back applies once", {
    timeout: 30_000,
  }, async () => {
    const env = { REDIS_URL: redis.url, REDIS_TIMEOUT_MS: "300" };
    await withServer(env, async (server) => {
      const stream = `${server.url}v1/stream/frozen`;
      assert.equal((await fetch(stream, { method: "PUT" })).status, 201);
      const publish = () =>
        fetch(`${server.url}publish`, {
          method: "POST",
          headers: { "idempotency-key": "once" },
          body: "exactly once",
        });
      const append = () =>
        fetch(stream, {
          method: "POST",
          headers: {
            "content-type": "application/octet-stream",
            "producer-id": "p",
            "producer-epoch": "0",
            "producer-seq": "0",
          },
          body: "appended once",
        });
      redis.signal("SIGSTOP");
      let resumed = false;
      const resume = track(() => redis.signal("SIGCONT"));
      try {
        const started = Date.now();
        for (const response of [await publish(), await append()]) {
          assert.equal(response.status, 503);
          assert.equal(response.headers.get("retry-after"), "1");
          await response.body?.cancel();
        }
        assert.ok(
          Date.now() - started < 5000,
          "answered at the deadline, not when Redis came back",
        );
      } finally {
        redis.signal("SIGCONT");
        resume();
        resumed = true;
      }
      assert.ok(resumed);
      // The retries: Redis ran the first tries once it was back; each is applied once.
      const retried = await publish();
      assert.equal(retried.status, 200);
      const { id } = await retried.json();
      const again = await append();
      assert.ok(again.status === 200 || again.status === 204, String(again.status));
      await again.body?.cancel();
      const events: EventReader = await subscribe(`${server.url}events?lastEventId=earliest`);
      const replayed = await events.until((event) => event.event === "replayed");
      await events.cancel();
      assert.deepEqual(
        replayed.filter((event) => event.data === "exactly once").map((event) => event.lastEventId),
        [id],
      );
      const read = await fetch(`${stream}?offset=-1`);
      assert.equal(await read.text(), "appended once");
    });
  });
});

describe("EventLog contract: RedisLog", () => {
  let made = 0;
  // Each log on a key of its own: a fresh, empty stream.
  const make: MakeLog = async (options = {}) => {
    const log = await RedisLog.connect({ url: redis.url, key: `contract:${made++}`, ...options });
    return { log, close: () => log.close() };
  };
  for (const { name, run } of eventLogContract) test(name, () => run(make));

  test("answers 2000 random operations as MemoryLog does", { timeout: 60_000 }, async () => {
    const options = { history: 7, historyBytes: 800, idempotencyKeys: 3 };
    const memory = new MemoryLog(options);
    const { log: redisLog, close } = await make(options);
    const logs: EventLog[] = [memory, redisLog];
    try {
      const random = seededRandom(20261202);
      const pick = (n: number) => Math.floor(random() * n);
      // Each log's ids in the order they were given: an id is compared by its place.
      const ids: string[][] = [[], []];
      const placeOf = (log: number, id: string) => {
        const at = ids[log].indexOf(id);
        return at === -1 ? `unknown ${id}` : at;
      };
      const plain = (log: number, events: readonly LogEvent[]) =>
        events.map((event) => [placeOf(log, event.id), event.topics, event.text, event.private]);
      const seen = new Set<string>();
      const batches = new Map<string, NewEvent[]>();
      for (let i = 0; i < 2000; i++) {
        if (pick(2) === 0) {
          let events: NewEvent[] = Array.from({ length: 1 + pick(3) }, () => {
            const topics = ["a", "b", "c"].slice(0, pick(3));
            return {
              topics,
              text: `data: ${"x".repeat(10 + pick(150))}\n\n`,
              ...(topics.length > 0 && pick(4) === 0 ? { private: true } : {}),
            };
          });
          const key = pick(3) === 0 ? `k${pick(5)}` : undefined;
          // A key again, half the time with the events it was first used for: a retry.
          if (key !== undefined && batches.has(key) && pick(2) === 0) events = batches.get(key)!;
          if (key !== undefined && !batches.has(key)) batches.set(key, events);
          const answers = await Promise.all(
            logs.map((log, n) =>
              log.append(events, { idempotencyKey: key }).then(({ ids: given, repeated }) => {
                if (!repeated) ids[n].push(...given);
                return { places: given.map((id) => placeOf(n, id)), repeated };
              }, (error) => error instanceof IdempotencyKeyError ? "conflict" : String(error))
            ),
          );
          assert.deepEqual(answers[1], answers[0], `append ${i}`);
          seen.add(
            typeof answers[0] === "string" ? answers[0] : answers[0].repeated ? "repeated" : "new",
          );
        } else {
          const kind = pick(10);
          const place = pick(ids[0].length + 1);
          const afterOf = (n: number) =>
            kind === 0
              ? null
              : kind === 1
              ? "x-1"
              : kind === 2
              ? "99999999999999-0"
              : ids[n][place] ?? null;
          const limit = 1 + pick(6);
          const answers = await Promise.all(
            logs.map(async (log, n) => {
              const { events, gap } = await log.read(afterOf(n), limit);
              return { gap, events: plain(n, events) };
            }),
          );
          assert.deepEqual(answers[1], answers[0], `read ${i} after ${afterOf(0)}`);
          seen.add(answers[0].gap ? "gap" : answers[0].events.length > 0 ? "events" : "none");
        }
      }
      for (const answer of ["new", "repeated", "conflict", "gap", "events", "none"]) {
        assert.ok(seen.has(answer), `no operation answered ${answer}: ${[...seen]}`);
      }
    } finally {
      await close();
    }
  });
});

describe("StreamStore contract: RedisStreamStore", () => {
  let made = 0;
  // Each store under a prefix of its own: a fresh, empty store.
  const make: MakeStore = async (options = {}) => {
    const store = await RedisStreamStore.connect({
      url: redis.url,
      prefix: `c${made++}:`,
      ...options,
    });
    return { store, close: () => store.close() };
  };
  for (const { name, run } of streamStoreContract) test(name, () => run(make));
});

describe("shared live reads on RedisStreamStore", () => {
  let made = 0;
  const make: MakeLiveStore = async () => {
    const store = await RedisStreamStore.connect({ url: redis.url, prefix: `l${made++}:` });
    return { store, close: () => store.close() };
  };
  for (const { name, run } of liveReadCases) test(name, () => run(make));
});

describe("SubscriptionStore contract: RedisStreamStore.subscriptionStore", () => {
  let made = 0;
  const make: MakeSubscriptionStore = async (maxSubscriptions) => {
    const streams = await RedisStreamStore.connect({ url: redis.url, prefix: `s${made++}:` });
    return { store: streams.subscriptionStore({ maxSubscriptions }), close: () => streams.close() };
  };
  for (const { name, run } of subscriptionStoreContract) test(name, () => run(make));
});

describe("redis.ts's own promises", () => {
  test("each count option is checked before any connection, its RangeError naming it", async () => {
    const url = "redis://127.0.0.1:1"; // nothing listens: a check that passed would fail to connect
    const logOptions = [
      "history",
      "historyBytes",
      "historyTtl",
      "idempotencyWindow",
      "idempotencyKeys",
      "timeout",
    ];
    for (const name of logOptions) {
      for (const value of [-1, 1.5, NaN]) {
        await assert.rejects(RedisLog.connect({ url, [name]: value }), {
          name: "RangeError",
          message: `${name} must be a non-negative integer`,
        });
      }
    }
    for (const name of ["maxStreamBytes", "maxProducers", "timeout"]) {
      await assert.rejects(RedisStreamStore.connect({ url, [name]: -1 }), {
        name: "RangeError",
        message: `${name} must be a non-negative integer`,
      });
    }
    // Infinity is no limit, 0 a limit: both are options, and the connection is tried.
    await assert.rejects(
      RedisLog.connect({ url, historyBytes: Infinity, history: 0 }),
      /^Error: cannot reach Redis at redis:\/\/127\.0\.0\.1:1: /,
    );
  });

  test("a connect that fails names the URL, never its password", async () => {
    const cases = [
      ["redis://user:s3cret@127.0.0.1:1", "redis://user:***@127.0.0.1:1"],
      ["redis://:p@ss:w@127.0.0.1:1/2", "redis://:***@127.0.0.1:1/2"],
      ["redis://127.0.0.1:1", "redis://127.0.0.1:1"],
      ["redis://u:@127.0.0.1:1", "redis://u:@127.0.0.1:1"], // an empty password: nothing to hide
      ["http://x", "http://x"], // the client refuses it before any connection
    ];
    for (const [url, shown] of cases) {
      for (const connect of [RedisLog.connect, RedisStreamStore.connect]) {
        const error = await connect({ url }).then(() => undefined, (error: Error) => error);
        assert.ok(error instanceof Error);
        assert.ok(error.message.startsWith(`cannot reach Redis at ${shown}: `), error.message);
        assert.ok(!/s3cret|p@ss|ss:w/.test(error.message), error.message);
        // The client's own message, as it is: not its `String` (no "Error:"), nothing starred.
        const reason = error.message.slice(`cannot reach Redis at ${shown}: `.length);
        assert.ok(reason.length > 0 && !/Error:|\*\*\*/.test(reason), error.message);
      }
    }
  });

  test("defaults: the log's key is sse:events, the store's prefix ds:", async () => {
    await admin.del(["sse:events"]);
    const log = await RedisLog.connect({ url: redis.url });
    const store = await RedisStreamStore.connect({ url: redis.url });
    try {
      const { ids } = await log.append([{ topics: ["t"], text: "data: x\n\n" }]);
      const entries = await admin.xRange("sse:events", "-", "+");
      assert.deepEqual((entries ?? []).map((entry) => entry.id), ids);
      await store.create("/defaults", {
        contentType: "text/plain",
        framing: "bytes",
        closed: false,
        records: [],
        contentTypeGiven: true,
      });
      assert.equal(await admin.exists("ds:m:/defaults"), 1);
    } finally {
      log.close();
      store.close();
    }
  });

  test("claim: one caller of all gets a name, for the time given", async () => {
    const key = `claims:${Date.now()}`;
    const [a, b] = await Promise.all([
      RedisLog.connect({ url: redis.url, key }),
      RedisLog.connect({ url: redis.url, key }),
    ]);
    try {
      // Racing through two connections: either may be first, exactly one gets it.
      const got = await Promise.all([a.claim("tick:1", 5000), b.claim("tick:1", 5000)]);
      assert.deepEqual([...got].sort(), [false, true]);
      const ttl = await admin.pTTL(`${key}:claim:tick:1`);
      assert.ok(ttl > 4000 && ttl <= 5000, `${ttl} ms`);
      assert.equal(await b.claim("tick:2", 5000), true, "another name is free");
    } finally {
      a.close();
      b.close();
    }
  });

  test("close ends every connection it opened", async () => {
    // A Redis of its own: no other test's connections come and go meanwhile.
    const own = await RedisServer.start({
      appendfsync: "no",
      onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
    });
    const control = createClient({ url: own.url });
    try {
      await control.connect();
      const connected = async () =>
        (await control.sendCommand(["CLIENT", "LIST"]) as string).trim().split("\n").length;
      const log = await RedisLog.connect({ url: own.url });
      log.listen(() => {}); // its blocking reads hold the second connection
      const store = await RedisStreamStore.connect({ url: own.url });
      assert.equal(await connected(), 1 + 4);
      log.close();
      store.close();
      const deadline = Date.now() + 5000;
      while (await connected() !== 1) {
        assert.ok(Date.now() < deadline, `${await connected()} connections, not 1`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    } finally {
      control.destroy();
      await own.stop();
    }
  });

  test("a fork copied by one caller: another creating it waits for the outcome, or gives up at its timeout", async () => {
    const prefix = `busy${Date.now()}:`;
    const store = await streamStore({ prefix });
    const plain = { contentType: "text/plain", framing: "bytes" as const, closed: false };
    await store.create("/source", { ...plain, records: [], contentTypeGiven: true });
    // 600 entries: three scripts' worth of copying, during which the path is busy.
    await Promise.all(Array.from({ length: 600 }, (_, i) =>
      store.append("/source", {
        contentType: "text/plain",
        records: [new TextEncoder().encode(`${i},`)],
        close: false,
      })));
    const fork = () =>
      store.create("/fork", {
        ...plain,
        records: [],
        contentTypeGiven: true,
        fork: { from: "/source", subOffset: 0 },
      });
    const [first, second] = await Promise.all([fork(), fork()]);
    assert.equal(first.status, "created");
    assert.equal(second.status, "exists");
    assert.deepEqual(
      (second as { info: unknown }).info,
      (first as { info: unknown }).info,
      "the same stream",
    );
    // A copier that died mid-copy holds the path until its lease runs out:
    // a create waits at most its timeout, then says why.
    await admin.hSet(`${prefix}m:/stuck`, { pending: "1", inc: "dead", tail: "0", cursor: "-" });
    const hasty = await RedisStreamStore.connect({ url: redis.url, prefix, timeout: 300 });
    closers.push(() => hasty.close());
    const started = Date.now();
    await assert.rejects(
      hasty.create("/stuck", { ...plain, records: [], contentTypeGiven: true }),
      { message: "a fork is being copied here" },
    );
    assert.ok(Date.now() - started >= 300, "not before the timeout");
  });

  test("ping while connected; close is final, twice is once, and ping then says why", async () => {
    const log = await RedisLog.connect({ url: redis.url, key: `ping:${Date.now()}` });
    await log.ping();
    log.close();
    log.close();
    await assert.rejects(log.ping(), { message: "not connected to Redis" });
  });

  test("scripts that Redis forgot (SCRIPT FLUSH, a restart) are sent again", async () => {
    const store = await streamStore({ prefix: `flushed${Date.now()}:` });
    await admin.scriptFlush();
    const created = await store.create("/s", {
      contentType: "text/plain",
      framing: "bytes",
      closed: false,
      records: [new TextEncoder().encode("still works")],
      contentTypeGiven: true,
    });
    assert.equal(created.status, "created");
  });

  test("a closed store wakes its waiting readers, and waits no more", async () => {
    const store = await RedisStreamStore.connect({
      url: redis.url,
      prefix: `closing${Date.now()}:`,
    });
    await store.create("/w", {
      contentType: "text/plain",
      framing: "bytes",
      closed: false,
      records: [],
      contentTypeGiven: true,
    });
    const signal = new AbortController().signal;
    const waiting = store.waitForData("/w", 0, signal);
    await store.info("/w"); // its look at the stream has answered: it waits
    store.close();
    store.close();
    await waiting;
    await store.waitForData("/w", 0, signal);
  });

  test(
    "connections cut by Redis come back by themselves, said on stderr by default; wake-ups missed meanwhile are made up",
    {
      timeout: 30_000,
    },
    async () => {
      const own = await RedisServer.start({
        appendfsync: "no",
        onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
      });
      const said: string[] = [];
      const stderr = console.error;
      console.error = (...parts: unknown[]) => said.push(parts.join(" "));
      const control = createClient({ url: own.url });
      await control.connect();
      const log = await RedisLog.connect({ url: own.url }); // the default logger
      const store = await RedisStreamStore.connect({ url: own.url });
      const writer = await RedisStreamStore.connect({ url: own.url, logger: () => {} });
      const until = async (what: () => boolean | Promise<boolean>, label: string) => {
        const deadline = Date.now() + 10_000;
        while (!(await what())) {
          if (Date.now() > deadline) throw new Error(`no ${label}: ${JSON.stringify(said)}`);
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      };
      const plain = { contentType: "text/plain", framing: "bytes" as const, closed: false };
      try {
        await store.create("/w", { ...plain, records: [], contentTypeGiven: true });
        let woke = false;
        const waiting = store.waitForData("/w", 0, new AbortController().signal)
          .then(() => woke = true);
        await store.info("/w");
        // The subscriptions cut, and kept out (no room for a new client)
        // while another process appends: its wake-up reaches no one.
        const clients = (...type: string[]) =>
          control.sendCommand(["CLIENT", "LIST", ...type]).then((list) =>
            String(list).trim().split("\n").length
          );
        const left = await clients() - await clients("TYPE", "pubsub");
        await control.configSet({ maxclients: String(left) });
        await control.sendCommand(["CLIENT", "KILL", "TYPE", "pubsub"]);
        await writer.append("/w", {
          contentType: "text/plain",
          records: [new TextEncoder().encode("x")],
          close: false,
        });
        await until(
          () => said.some((line) => line.startsWith("redis: streams connection lost")),
          "lost line",
        );
        assert.equal(woke, false);
        await control.configSet({ maxclients: "10000" });
        await until(() => woke, "wake-up once back");
        await waiting;
        assert.ok(said.includes("redis: streams connection back"), JSON.stringify(said));
        // The other connections too: cut, back, and used again.
        await control.sendCommand(["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
        await until(() => said.includes("redis: connection back"), "log back");
        await until(
          () => store.info("/w").then(() => true, () => false),
          "the store's commands once back",
        );
        const heard = new Promise((resolve) => log.listen(resolve));
        await log.append([{ topics: [], text: "data: again\n\n" }]);
        await heard;
        // Each cut said, and each return: a store's two connections may come
        // back one at a time, and then its loss and return are said twice.
        const count = (start: string) => said.filter((line) => line.startsWith(start)).length;
        const balanced = () =>
          ["redis: connection", "redis: streams connection"].every((kind) =>
            count(`${kind} lost`) === count(`${kind} back`)
          );
        await until(() => said.length >= 6 && balanced(), "every line");
        const lines = said.map((line) => line.replace(/\(.*\)/, "(…)"));
        assert.deepEqual([...new Set(lines)].sort(), [
          "redis: connection back",
          "redis: connection lost (…); publishing answers 503 until it is back",
          "redis: streams connection back",
          "redis: streams connection lost (…); streams answer 503 until back",
        ]);
      } finally {
        console.error = stderr;
        log.close();
        store.close();
        writer.close();
        control.destroy();
        await own.stop();
      }
    },
  );

  test("a Redis that goes away is logged once, and its return once; reads resume", {
    timeout: 30_000,
  }, async () => {
    const own = await RedisServer.start({
      appendfsync: "no",
      onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
    });
    const lines: string[] = [];
    const logger = (line: string) => lines.push(line);
    const log = await RedisLog.connect({ url: own.url, logger, timeout: 500 });
    const store = await RedisStreamStore.connect({ url: own.url, logger, timeout: 500 });
    // The same server, slower to give up: a call while Redis is away fails at once.
    const patient = await RedisLog.connect({ url: own.url, timeout: 10_000, logger: () => {} });
    const received: string[] = [];
    log.listen((events) => received.push(...events.map((event) => event.text)));
    const waitFor = async (what: () => boolean, label: string) => {
      const deadline = Date.now() + 10_000;
      while (!what()) {
        if (Date.now() > deadline) throw new Error(`no ${label}: ${JSON.stringify(lines)}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    };
    try {
      // Frozen: a call ends at the deadline, with a reason.
      own.signal("SIGSTOP");
      try {
        await assert.rejects(log.ping(), { message: "Redis did not answer within 500 ms" });
      } finally {
        own.signal("SIGCONT");
      }
      await own.kill();
      await waitFor(() => lines.length >= 2, "lost lines");
      await assert.rejects(log.ping());
      // A reader cannot wait on what it cannot look at: it is told, not kept waiting.
      await assert.rejects(store.waitForData("/away", 0, new AbortController().signal));
      const started = Date.now();
      await assert.rejects(patient.append([{ topics: [], text: "data: lost\n\n" }]));
      assert.ok(Date.now() - started < 5000, "refused at once, not at the deadline");
      await own.start();
      await waitFor(() => lines.length >= 4, "back lines");
      await log.ping();
      // A blocking read that ends with nothing (after a second) is read again.
      await new Promise((resolve) => setTimeout(resolve, 1200));
      await log.append([{ topics: [], text: "data: after\n\n" }]);
      await waitFor(() => received.length > 0, "event after the return");
      assert.deepEqual(received, ["data: after\n\n"]);
      assert.deepEqual(lines.map((line) => line.replace(/\(.*\)/, "(…)")).sort(), [
        "redis: connection back",
        "redis: connection lost (…); publishing answers 503 until it is back",
        "redis: streams connection back",
        "redis: streams connection lost (…); streams answer 503 until back",
      ]);
    } finally {
      log.close();
      store.close();
      patient.close();
      await own.stop();
    }
  });
});
