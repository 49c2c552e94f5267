// Durable Streams served by several server.ts processes sharing one Redis
// (RedisStreamStore): a live reader on one process wakes on an append made
// through another, racing producers append once, and the official client
// follows a stream across a restart of its process. Each group starts its
// own redis-server (Debian's) on a free port. The conformance suite against
// two processes on one port is `bash test/conformance.sh <runtime> --cluster`.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { connect, type Socket } from "node:net";
import {
  type EventReader,
  type ServerProcess,
  startServer,
  subscribe,
  webhookReceiver,
} from "./helpers.ts";
import { RedisServer } from "./redis_server.mjs";
import { stream } from "@durable-streams/client";
import { RedisStreamStore } from "../redis.ts";
import { MemoryStreamStore, type StreamStore } from "../streams.ts";

/** A redis-server stopped if a test fails. */
function startRedis(): Promise<RedisServer> {
  return RedisServer.start({
    appendfsync: "no",
    onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
  });
}

/** A Redis and two server.ts processes on it, each on its own port, with `env` besides. */
function useCluster(env: Record<string, string> = {}) {
  const cluster = {
    redis: undefined as RedisServer | undefined,
    servers: [] as ServerProcess[],
  };
  before(async () => {
    cluster.redis = await startRedis();
    const all = { ...env, REDIS_URL: cluster.redis.url };
    cluster.servers = await Promise.all([startServer(all), startServer(all)]);
  });
  after(async () => {
    try {
      for (const server of cluster.servers) {
        // One a test killed (and did not restart) has nothing to stop.
        if (server.child.exitCode !== null || server.child.signalCode !== null) continue;
        const code = await server.stop();
        assert.equal(code, 0, `server.ts exited ${code}:\n${server.output()}`);
      }
    } finally {
      await cluster.redis?.stop();
    }
  });
  return cluster;
}

const streamUrl = (server: ServerProcess, name: string) => `${server.url}v1/stream/${name}`;

async function create(url: string, contentType: string): Promise<string> {
  const response = await fetch(url, { method: "PUT", headers: { "content-type": contentType } });
  await response.body?.cancel();
  assert.equal(response.status, 201);
  return response.headers.get("stream-next-offset")!;
}

async function append(
  url: string,
  body: string,
  contentType: string,
  headers: Record<string, string> = {},
): Promise<Response> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": contentType, ...headers },
    body,
  });
  await response.body?.cancel();
  return response;
}

/**
 * Redis's MONITOR feed: resolves `seen` once a command whose quoted
 * arguments satisfy `match` runs, so a test knows that a process has
 * reached a point it cannot report over HTTP.
 */
async function monitor(url: string): Promise<{
  seen(match: (line: string) => boolean): Promise<void>;
  close(): void;
}> {
  const { port, hostname } = new URL(url);
  const socket: Socket = connect(Number(port), hostname);
  const untrack = track(() => socket.destroy());
  const watchers = new Set<{ match: (line: string) => boolean; done: () => void }>();
  let pending = "";
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    const lines = (pending + chunk).split("\r\n");
    pending = lines.pop()!;
    for (const line of lines) {
      for (const watcher of watchers) {
        if (watcher.match(line)) {
          watchers.delete(watcher);
          watcher.done();
        }
      }
    }
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("error", reject);
    socket.write("MONITOR\r\n");
    const first = (chunk: string) => {
      if (chunk.includes("+OK")) resolve();
      else reject(new Error(`MONITOR: ${chunk}`));
    };
    socket.once("data", first);
  });
  return {
    seen: (match) => new Promise((done) => watchers.add({ match, done })),
    close() {
      socket.destroy();
      untrack();
    },
  };
}

describe("Durable Streams on two processes sharing Redis", () => {
  const cluster = useCluster();

  test("an SSE reader on one process wakes on appends made through the other", async () => {
    const [a, b] = cluster.servers;
    const offset = await create(streamUrl(a, "sse-wake"), "text/plain");
    const reader: EventReader = await subscribe(
      `${streamUrl(a, "sse-wake")}?offset=${offset}&live=sse`,
    );
    try {
      // A's first control event: it has read, found nothing, and waits.
      const control = await reader.event();
      assert.equal(control.event, "control");
      assert.equal(JSON.parse(control.data).upToDate, true);
      for (const word of ["one", "two", "three"]) {
        assert.equal((await append(streamUrl(b, "sse-wake"), word, "text/plain")).status, 204);
        const data = await reader.event();
        assert.deepEqual([data.event, data.data], ["data", word]);
        assert.equal((await reader.event()).event, "control");
      }
      // Closed through B: A's reader gets the final control event, then the end.
      const closed = await fetch(streamUrl(b, "sse-wake"), {
        method: "POST",
        headers: { "stream-closed": "true" },
      });
      assert.equal(closed.status, 204);
      const last = await reader.event();
      assert.equal(JSON.parse(last.data).streamClosed, true);
      assert.equal(await reader.next(), null);
    } finally {
      await reader.cancel().catch(() => {});
    }
  });

  test("a long-poll on one process returns an append made through the other", async () => {
    const [a, b] = cluster.servers;
    const url = streamUrl(a, "long-poll-wake");
    const offset = await create(url, "application/json");
    const redis = await monitor(cluster.redis!.url);
    try {
      for (let round = 0; round < 3; round++) {
        const path = new URL(url).pathname;
        // The waiter's look at the stream (the info script: prefix and path
        // only), which comes after it has registered: from then on no wake-up is lost.
        const waiting = redis.seen((line) =>
          line.toLowerCase().includes('"evalsha"') && line.endsWith(`"ds:" "${path}"`)
        );
        const poll = fetch(`${url}?offset=${round === 0 ? offset : "now"}&live=long-poll`);
        await waiting;
        const appended = await append(
          streamUrl(b, "long-poll-wake"),
          `{"round":${round}}`,
          "application/json",
        );
        assert.equal(appended.status, 204);
        const response = await poll;
        assert.equal(response.status, 200);
        assert.deepEqual(await response.json(), [{ round }]);
      }
    } finally {
      redis.close();
    }
  });

  test("racing producers through both processes: each (producer, epoch, seq) appends once", async () => {
    const [a, b] = cluster.servers;
    const url = streamUrl(a, "race");
    await create(url, "text/plain");
    const PRODUCERS = 4;
    const SEQS = 25;
    const COPIES = 6;
    const statuses = new Map<string, number[]>();
    await Promise.all(Array.from({ length: PRODUCERS }, async (_, p) => {
      for (let seq = 0; seq < SEQS; seq++) {
        // The same request, COPIES times at once, half through each process.
        const answers = await Promise.all(
          Array.from(
            { length: COPIES },
            (_, copy) =>
              append(streamUrl(copy % 2 ? b : a, "race"), `p${p}s${seq};`, "text/plain", {
                "producer-id": `producer-${p}`,
                "producer-epoch": "0",
                "producer-seq": String(seq),
              }),
          ),
        );
        statuses.set(`p${p}s${seq}`, answers.map((answer) => answer.status).sort());
      }
    }));
    for (const [request, seen] of statuses) {
      assert.deepEqual(
        seen,
        [200, ...Array(COPIES - 1).fill(204)],
        `${request}: one 200, then duplicates`,
      );
    }
    const body = await (await fetch(`${streamUrl(b, "race")}?offset=-1`)).text();
    const records = body.split(";").filter(Boolean);
    assert.equal(records.length, PRODUCERS * SEQS, "each once");
    assert.equal(new Set(records).size, PRODUCERS * SEQS);
    for (let p = 0; p < PRODUCERS; p++) {
      const mine = records.filter((record) => record.startsWith(`p${p}s`));
      assert.deepEqual(mine, Array.from({ length: SEQS }, (_, seq) => `p${p}s${seq}`), "in order");
    }
  });
});

describe("subscriptions on two processes sharing Redis", () => {
  const cluster = useCluster({ STREAMS_ALLOW_PRIVATE_WEBHOOKS: "1" });
  const send = (
    server: ServerProcess,
    method: string,
    name: string,
    body?: unknown,
    headers = {},
  ) =>
    fetch(streamUrl(server, name), {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  test("made on one, woken by an append on the other, delivered once, signed by the key both publish", async () => {
    const [a, b] = cluster.servers;
    const hooks = await webhookReceiver(() => [200, { done: true }]);
    try {
      const created = await send(a, "PUT", "__ds/subscriptions/once", {
        type: "webhook",
        pattern: "once/*",
        webhook: { url: hooks.url },
      });
      assert.equal(created.status, 201);
      const keys = await Promise.all(
        [a, b].map(async (server) =>
          (await (await send(server, "GET", "__ds/jwks.json")).json()).keys
        ),
      );
      assert.deepEqual(keys[0], keys[1], "one signing key for both processes");
      assert.equal((await send(b, "PUT", "once/x", { n: 1 })).status, 201);
      const delivery = await hooks.nth(1);
      assert.equal(delivery.body.generation, 1);
      assert.equal(delivery.signature.split(",")[1], `kid=${keys[0][0].kid}`);
      // Acked, by whichever process: a second append wakes generation 2, once.
      const acked = async () => {
        const view = await (await send(a, "GET", "__ds/subscriptions/once")).json();
        return view.streams[0]?.acked_offset === delivery.body.streams[0].tail_offset;
      };
      const deadline = Date.now() + 5000;
      while (!(await acked()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.ok(await acked(), "auto-acked");
      assert.equal((await send(a, "POST", "once/x", { n: 2 })).status, 204);
      assert.equal((await hooks.nth(2)).body.generation, 2);
      // A third append through both at once: still one wake in flight at a time.
      await Promise.all([send(a, "POST", "once/x", { n: 3 }), send(b, "POST", "once/x", { n: 4 })]);
      const third = await hooks.nth(3);
      assert.equal(third.body.generation, 3);
      assert.equal(
        new Set(hooks.deliveries.map((d) => d.body.generation)).size,
        hooks.deliveries.length,
      );
    } finally {
      await send(a, "DELETE", "__ds/subscriptions/once");
      hooks.close();
    }
  });

  test("a lease claimed on one holds on the other; its ack on the other releases it", async () => {
    const [a, b] = cluster.servers;
    assert.equal((await send(a, "PUT", "pool/wake", [])).status, 201);
    assert.equal(
      (await send(a, "PUT", "__ds/subscriptions/pool", {
        type: "pull-wake",
        pattern: "jobs/*",
        wake_stream: "pool/wake",
      })).status,
      201,
    );
    assert.equal((await send(b, "PUT", "jobs/1", { job: 1 })).status, 201);
    const claim = (server: ServerProcess, worker: string) =>
      send(server, "POST", "__ds/subscriptions/pool/claim", { worker });
    const claimed = await claim(a, "w-a");
    assert.equal(claimed.status, 200);
    const lease = await claimed.json();
    const busy = await claim(b, "w-b");
    assert.deepEqual([busy.status, (await busy.json()).error], [409, {
      code: "ALREADY_CLAIMED",
      message: "another worker holds the lease",
      current_holder: "w-a",
      generation: lease.generation,
    }]);
    const ack = await send(b, "POST", "__ds/subscriptions/pool/ack", {
      wake_id: lease.wake_id,
      generation: lease.generation,
      acks: [{ stream: "jobs/1", offset: lease.streams[0].tail_offset }],
      done: true,
    }, { authorization: `Bearer ${lease.token}` });
    assert.deepEqual([ack.status, await ack.json()], [200, { ok: true, next_wake: false }]);
    const wakes = await (await send(b, "GET", "pool/wake")).json();
    assert.deepEqual(wakes.map((wake: { subscription_id: string }) => wake.subscription_id), [
      "pool",
    ]);
  });

  test("a process killed while its webhook holds the lease: the lease runs out and the other delivers", async () => {
    const [a, b] = cluster.servers;
    // The first delivery is held (the process dies with it); later ones answer done.
    const hooks = await webhookReceiver((_, index) => index === 0 ? "hold" : [200, { done: true }]);
    try {
      assert.equal(
        (await send(b, "PUT", "__ds/subscriptions/survive", {
          type: "webhook",
          pattern: "survive/*",
          webhook: { url: hooks.url },
          lease_ttl_ms: 1000,
        })).status,
        201,
      );
      // The append goes to a, so a sends the webhook and holds its lease.
      assert.equal((await send(a, "PUT", "survive/x", { n: 1 })).status, 201);
      const first = await hooks.nth(1);
      a.signal("SIGKILL");
      await a.exited;
      const killed = Date.now();
      const second = await hooks.nth(2);
      const waited = Date.now() - killed;
      assert.ok(waited < 5000, `delivered again after ${waited} ms`);
      assert.equal(second.body.generation, first.body.generation + 1);
      assert.deepEqual(second.body.streams[0].tail_offset, first.body.streams[0].tail_offset);
      // The dead process's wake is fenced (b made the subscription: the callback URL is b's).
      const stale = await fetch(first.body.callback_url, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          authorization: `Bearer ${first.body.callback_token}`,
        },
        body: JSON.stringify({
          wake_id: first.body.wake_id,
          generation: first.body.generation,
          done: true,
        }),
      });
      assert.equal(stale.status, 409);
    } finally {
      await send(b, "DELETE", "__ds/subscriptions/survive");
      hooks.close();
    }
  });
});

describe("the official client across a restart", () => {
  const cluster = useCluster();

  test("follows a stream in SSE mode while its process restarts: every append once, in order", {
    timeout: 30_000,
  }, async () => {
    let [a] = cluster.servers;
    const b = cluster.servers[1];
    const port = new URL(a.url).port;
    const url = streamUrl(a, "follow");
    const viaB = streamUrl(b, "follow");
    await create(url, "application/json");
    const put = async (from: number, to: number) => {
      for (let n = from; n < to; n++) {
        assert.equal((await append(viaB, JSON.stringify({ n }), "application/json")).status, 204);
      }
    };
    await put(0, 5);

    const received: number[] = [];
    const waiting: { count: number; done: () => void }[] = [];
    const receivedCount = (count: number) =>
      Promise.race([
        received.length >= count
          ? Promise.resolve()
          : new Promise<void>((done) => waiting.push({ count, done })),
        follow.then(() => {
          throw new Error(`the client stopped after ${received.length} messages`);
        }),
      ]);
    const controller = new AbortController();
    const stopClient = track(() => controller.abort());
    // The client reconnects by itself when its SSE response ends, which is
    // what happens here on all three runtimes (one session). Should a
    // session end with an error instead, the application resumes from the
    // last offset it got, as the client's documentation says; `stream()`
    // retries until the process is back. Either way: each message once.
    let offset = "-1";
    let sessions = 0;
    const follow: Promise<void> = (async () => {
      while (!controller.signal.aborted) {
        const response = await stream<{ n: number }>({
          url,
          offset,
          live: "sse",
          json: true,
          signal: controller.signal,
          backoffOptions: { initialDelay: 20, maxDelay: 200, multiplier: 2 },
          sseResilience: { logWarnings: false },
          onError: () => ({}), // retry with the same parameters
        }).catch((error) => {
          if (controller.signal.aborted) return undefined;
          throw error;
        });
        if (!response) return;
        sessions++;
        response.subscribeJson((batch) => {
          received.push(...batch.items.map((item) => item.n));
          offset = batch.offset;
          for (const waiter of [...waiting]) {
            if (received.length >= waiter.count) {
              waiting.splice(waiting.indexOf(waiter), 1);
              waiter.done();
            }
          }
        });
        await response.closed.catch(() => {});
      }
    })();
    try {
      await receivedCount(5);
      // A crash: the client's connection breaks.
      a.signal("SIGKILL");
      await a.exited;
      await put(5, 10); // while A is down, through B
      a = await startServer({ REDIS_URL: cluster.redis!.url, PORT: port });
      cluster.servers[0] = a;
      await receivedCount(10);
      await put(10, 15); // after the restart
      await receivedCount(15);
      assert.deepEqual(
        received,
        Array.from({ length: 15 }, (_, n) => n),
        `in ${sessions} sessions`,
      );
    } finally {
      controller.abort();
      stopClient();
      await follow.catch(() => {});
    }
  });
});

describe("RedisStreamStore and MemoryStreamStore", () => {
  let redis: RedisServer | undefined;
  const stores: RedisStreamStore[] = [];
  before(async () => {
    redis = await startRedis();
  });
  after(async () => {
    for (const store of stores) store.close();
    await redis?.stop();
  });

  test("give the same answers to 3000 random operations, forks and producers included", async () => {
    // Room for a few appends: each piece counts 128 bytes besides its data.
    const store = await RedisStreamStore.connect({ url: redis!.url, maxStreamBytes: 700 });
    stores.push(store);
    const memory = new MemoryStreamStore({ maxStreamBytes: 700 });
    // A seeded generator (mulberry32), so a failure reproduces.
    let seed = 20261127;
    const random = (n: number) => {
      seed = (seed + 0x6D2B79F5) | 0;
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) % n;
    };
    const encode = (text: string) => new TextEncoder().encode(text);
    // Incarnations are random by design; records compare as byte lists.
    const plain = (value: unknown) =>
      JSON.stringify(value, (key, item) => {
        if (key === "incarnation") return undefined;
        if (item instanceof Uint8Array) return Array.from(item);
        if (item && typeof item === "object" && !Array.isArray(item)) {
          return Object.fromEntries(Object.entries(item).sort(([a], [b]) => a < b ? -1 : 1));
        }
        return item;
      });
    const paths = ["/a", "/b", "/c", "/d"];
    const seen = new Set<string>();
    for (let i = 0; i < 3000; i++) {
      const path = paths[random(4)];
      const kind = random(10);
      const json = random(2) === 0;
      let call: (store: StreamStore) => Promise<unknown>;
      if (kind === 0) {
        const request = {
          contentType: json ? "application/json" : "text/plain",
          framing: json ? "messages" as const : "bytes" as const,
          closed: random(20) === 0,
          records: random(2) ? [encode(json ? `${random(100)}\n` : "x".repeat(random(5) + 1))] : [],
          fork: random(3) === 0
            ? {
              from: paths[random(4)],
              anchor: random(2) ? undefined : random(6),
              subOffset: random(3) === 0 ? random(3) : 0,
            }
            : undefined,
          contentTypeGiven: random(3) !== 0,
        };
        call = (store) => store.create(path, request);
      } else if (kind <= 4) {
        const type = random(2) ? "application/json" : "text/plain";
        const request = {
          contentType: type,
          records: random(5) === 0
            ? []
            : type === "application/json"
            ? [encode("1\n2\n")]
            : [encode("abc".slice(0, random(3) + 1))],
          close: random(40) === 0,
          seq: random(3) ? undefined : String(random(20)),
          producer: random(2)
            ? { id: `p${random(2)}`, epoch: random(2), seq: random(2) }
            : undefined,
        };
        call = (store) => store.append(path, request);
      } else if (kind <= 7) {
        const [position, maxBytes] = [random(12), random(6) + 1];
        call = (store) => store.read(path, position, maxBytes, true);
      } else if (kind === 8) {
        call = (store) => store.delete(path);
      } else {
        call = (store) => store.info(path);
      }
      const expected = plain(await call(memory));
      assert.equal(plain(await call(store)), expected, `operation ${i} on ${path}`);
      const answer = JSON.parse(expected);
      seen.add(typeof answer === "string" ? answer : answer.status ?? "info");
    }
    // The operations reached the interesting answers, not only "missing".
    const interesting = [
      "created",
      "exists",
      "conflict",
      "bad-fork",
      "seq-gap",
      "duplicate",
      "gone",
    ];
    for (const status of [...interesting, "stream-full"]) {
      assert.ok(seen.has(status), `no operation answered ${status}: ${[...seen]}`);
    }
  });

  test("a sliding TTL is shared: reads through one store keep a stream alive for the other", async () => {
    const [first, second] = await Promise.all([
      RedisStreamStore.connect({ url: redis!.url, prefix: "ttl:" }),
      RedisStreamStore.connect({ url: redis!.url, prefix: "ttl:" }),
    ]);
    stores.push(first, second);
    const request = {
      contentType: "text/plain",
      framing: "bytes" as const,
      ttlSeconds: 1,
      closed: false,
      records: [new TextEncoder().encode("x")],
      contentTypeGiven: true,
    };
    assert.equal((await first.create("/ttl", request)).status, "created");
    // 1.6 s of reads through the second store, each within the TTL of the last.
    const started = Date.now();
    let touched = started;
    while (Date.now() - started < 1600) {
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal((await second.read("/ttl", 0, 10, true)).status, "ok");
      touched = Date.now();
    }
    assert.equal(typeof await first.info("/ttl"), "object", "alive past its first TTL");
    // Then no touch: it expires a second after the last, for both.
    while (typeof await first.info("/ttl") === "object") {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(
      Date.now() - touched >= 950,
      `expired ${Date.now() - touched} ms after the last read`,
    );
    assert.equal(await second.info("/ttl"), "missing");
  });

  test("stores with different prefixes share a Redis and nothing else", async () => {
    const [one, two] = await Promise.all([
      RedisStreamStore.connect({ url: redis!.url, prefix: "one:" }),
      RedisStreamStore.connect({ url: redis!.url, prefix: "two:" }),
    ]);
    stores.push(one, two);
    const request = (text: string) => ({
      contentType: "text/plain",
      framing: "bytes" as const,
      closed: false,
      records: [new TextEncoder().encode(text)],
      contentTypeGiven: true,
    });
    assert.equal((await one.create("/same", request("one"))).status, "created");
    assert.equal(await two.info("/same"), "missing");
    assert.equal((await two.create("/same", request("two!"))).status, "created");
    const read = async (store: RedisStreamStore) => {
      const result = await store.read("/same", 0, 100, false);
      assert.equal(result.status, "ok");
      return new TextDecoder().decode((result as { records: Uint8Array[] }).records[0]);
    };
    assert.deepEqual([await read(one), await read(two)], ["one", "two!"]);
    // A waiter on one prefix is not woken by the other's appends: it ends on its signal.
    const controller = new AbortController();
    let woken = false;
    const waiting = one.waitForData("/same", 3, controller.signal).then(() => woken = true);
    await two.append("/same", {
      contentType: "text/plain",
      records: request("more").records,
      close: false,
    });
    await one.info("/same"); // a round trip after the other's publish
    assert.equal(woken, false);
    controller.abort();
    await waiting;
    // And by its own: at once.
    const own = one.waitForData("/same", 3, new AbortController().signal);
    await one.append("/same", {
      contentType: "text/plain",
      records: request("!").records,
      close: false,
    });
    await own;
  });
});
