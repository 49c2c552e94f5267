// What a security review found, each as a regression test (in process here;
// the ones that need a real server, socket or Redis further down and in
// test/redis_test.ts): forks that read what their requester cannot, memory
// that grows with client input, cross-site writes with the cookie, stream
// content run as a page, who listens to what, request bodies and live reads
// that never end, and the smaller ones. See docs/security.md for the model.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { connect } from "node:net";
import * as jose from "jose";
import { type Authorize, Broker, createHandler, jwtAuth, MemoryLog, TokenError } from "../mod.ts";
import { createStreamsHandler, MemoryStreamStore, type StreamsHandler } from "../streams.ts";
import { startServer, withServer } from "./helpers.ts";

const PREFIX = "/v1/stream/";
const BASE = `http://broker.test${PREFIX}`;
const SECRET = "a secret of at least thirty-two bytes";
const token = (claims: jose.JWTPayload) =>
  new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" }).sign(
    new TextEncoder().encode(SECRET),
  );

/** Users named by an `x-user` header: `admin` may do anything, user N reads and writes user/N/*. */
const byUser: Authorize = (request) => {
  const user = request.headers.get("x-user");
  if (user === "admin") return true;
  const extra = request.headers.get("x-also-reads");
  return user === null ? false : {
    subscribe: [`user/${user}/*`, ...extra ? [extra] : []],
    publish: [`user/${user}/*`],
  };
};

function call(
  handle: StreamsHandler,
  name: string,
  method: string,
  headers: Record<string, string> = {},
  body?: BodyInit,
) {
  return handle(
    new Request(BASE + name, {
      method,
      headers: { "content-type": "text/plain", ...headers },
      body,
      duplex: "half", // for a streamed body
    } as RequestInit),
  );
}

/** The status and JSON body of a response. */
async function answer(response: Response | Promise<Response>) {
  const { status, headers } = await response;
  const text = await (await response).text();
  return { status, body: headers.get("content-type")?.includes("json") ? JSON.parse(text) : text };
}

describe("forks read their source", () => {
  test("a fork needs the read grant on its source; an unreadable source answers as a missing one", async () => {
    const handle = createStreamsHandler({ prefix: PREFIX, authorize: byUser });
    const admin = { "x-user": "admin" };
    assert.equal((await call(handle, "user/7/private", "PUT", admin, "secret")).status, 201);
    const fork = (from: string, headers: Record<string, string> = { "x-user": "42" }) =>
      answer(call(handle, "user/42/loot", "PUT", { ...headers, "stream-forked-from": from }));
    const missing = {
      status: 404,
      body: { error: "the source stream does not exist" },
    };
    // The other user's stream, named every way: refused exactly as a missing one.
    for (
      const from of [
        `${PREFIX}user/7/private`,
        `${PREFIX}user/42/../7/private`,
        "../7/private",
        `http://elsewhere.test${PREFIX}user/7/private`,
        `${PREFIX}user/7/missing`,
      ]
    ) assert.deepEqual(await fork(from), missing, from);
    assert.equal((await call(handle, "user/42/loot", "GET", { "x-user": "42" })).status, 404);
    // Granted the read, the same fork is made, and reads the source's data.
    const reader = { "x-user": "42", "x-also-reads": "user/7/*" };
    assert.equal((await fork(`${PREFIX}user/7/private`, reader)).status, 201);
    const read = await call(handle, "user/42/loot?offset=-1", "GET", { "x-user": "42" });
    assert.equal(await read.text(), "secret");
  });
});

describe("what a stream counts for", () => {
  test("JSON messages count their bytes and each piece its bookkeeping, against every limit", async () => {
    // 400 messages "0\n" and the piece's 128 bytes: exactly 928.
    const handle = createStreamsHandler({ prefix: PREFIX, maxStreamBytes: 928, maxMessages: 400 });
    const json = { "content-type": "application/json" };
    assert.equal((await call(handle, "zeros", "PUT", json)).status, 201);
    const zeros = (count: number) => JSON.stringify(Array(count).fill(0));
    assert.equal((await call(handle, "zeros", "POST", json, zeros(400))).status, 204);
    assert.deepEqual(await answer(call(handle, "zeros", "POST", json, zeros(1))), {
      status: 413,
      body: { error: "a stream holds at most 928 bytes" },
    });
    assert.deepEqual(await answer(call(handle, "other", "PUT", json, zeros(401))), {
      status: 413,
      body: { error: "a request carries at most 400 JSON messages" },
    });
    const read = await call(handle, "zeros?offset=-1", "GET");
    assert.deepEqual(await read.json(), Array(400).fill(0));
  });

  test("JSON is checked as it is read, without building it: depth, UTF-8 and grammar", async () => {
    const handle = createStreamsHandler({ prefix: PREFIX });
    const json = { "content-type": "application/json" };
    await call(handle, "j", "PUT", json);
    const post = (body: BodyInit) => answer(call(handle, "j", "POST", json, body));
    // The outer array holds the messages: one message nested `depth` deep.
    const deep = (depth: number) => "[".repeat(depth + 1) + "]".repeat(depth + 1);
    assert.equal((await post(deep(1000))).status, 204);
    for (const depth of [1001, 100_000]) {
      assert.deepEqual(await post(deep(depth)), {
        status: 400,
        body: { error: "JSON nests at most 1000 levels deep" },
      });
    }
    const invalid = { status: 400, body: { error: "the body is not valid JSON" } };
    for (
      const body of [
        new Uint8Array([0x22, 0xff, 0x22]), // a string of a byte that is no UTF-8
        "[1,]",
        "01",
        '{"a" 1}',
        '"tab\there"'.replace("\\t", "\t"),
        "[1] [2]",
      ]
    ) assert.deepEqual(await post(body), invalid, String(body));
    // Whitespace between tokens goes; what the messages say stays.
    assert.equal((await post(' [ {"a" :\n [1, 2.50e3 ]} , "x\\ny" ] ')).status, 204);
    const read = await call(handle, "j?offset=0000000000000000_0000000000000001", "GET");
    assert.equal(await read.text(), '[{"a":[1,2.50e3]},"x\\ny"]');
  });

  test("a store holds at most maxBytes in all: 503 with Retry-After, room again after a delete", async () => {
    // Two streams of 400 bytes (528 counted each) do not fit in 1000.
    const handle = createStreamsHandler({ prefix: PREFIX, maxBytes: 1000 });
    const body = "x".repeat(400);
    assert.equal((await call(handle, "a", "PUT", {}, body)).status, 201);
    const full = await call(handle, "b", "PUT", {}, body);
    assert.equal(full.status, 503);
    assert.equal(full.headers.get("retry-after"), "10");
    assert.deepEqual(await full.json(), { error: "the store holds at most 1000 bytes" });
    assert.equal((await call(handle, "a", "POST", {}, body)).status, 503);
    assert.equal((await call(handle, "a", "DELETE")).status, 204);
    assert.equal((await call(handle, "b", "PUT", {}, body)).status, 201);
  });

  test("a large JSON append reads back whole, page by page, at message boundaries", async () => {
    const handle = createStreamsHandler({
      prefix: PREFIX,
      maxMessages: 200_000,
      maxReadBytes: 64 * 1024,
    });
    const json = { "content-type": "application/json" };
    await call(handle, "big", "PUT", json);
    const values = Array.from({ length: 200_000 }, (_, i) => i % 1000);
    assert.equal((await call(handle, "big", "POST", json, JSON.stringify(values))).status, 204);
    const back: number[] = [];
    let offset = "-1";
    let pages = 0;
    while (back.length < values.length) {
      const page = await call(handle, `big?offset=${offset}`, "GET");
      back.push(...await page.json());
      offset = page.headers.get("stream-next-offset")!;
      pages++;
    }
    assert.deepEqual(back, values);
    assert.ok(pages > 5, `read in ${pages} pages`);
  });

  test("producers: ids of 1 to 256 printable characters, the least recently used forgotten past maxProducers", async () => {
    const handle = createStreamsHandler({ prefix: PREFIX, maxProducers: 2 });
    await call(handle, "p", "PUT");
    const append = (id: string, seq: number) =>
      answer(call(handle, "p", "POST", {
        "producer-id": id,
        "producer-epoch": "0",
        "producer-seq": String(seq),
      }, "x"));
    for (const id of ["a", "b", "c"]) assert.equal((await append(id, 0)).status, 200);
    assert.equal((await append("b", 1)).status, 200); // b used last, then c
    // a was unused longest: forgotten, it counts as new and must start at 0.
    assert.deepEqual(await append("a", 1), {
      status: 409,
      body: { error: "expected Producer-Seq 0" },
    });
    assert.equal((await append("c", 1)).status, 200);
    for (const id of ["x".repeat(257), "tab\there"]) {
      assert.deepEqual(await append(id, 0), {
        status: 400,
        body: { error: "Producer-Id must be 1 to 256 printable characters" },
      });
    }
    assert.equal((await append("x".repeat(256), 0)).status, 200);
  });
});

describe("what a stream holds on to", () => {
  test("each piece owns its bytes, so a fork of part of an append holds only that part", async () => {
    const store = new MemoryStreamStore();
    const text = { contentType: "text/plain", framing: "bytes" as const, closed: false };
    const body = new Uint8Array(200_000).fill(0x61); // four pieces of one append
    await store.create("/s", { ...text, records: [body], contentTypeGiven: true });
    await store.create("/f", {
      ...text,
      records: [],
      contentTypeGiven: true,
      fork: { from: "/s", anchor: 70_000, subOffset: 0 },
    });
    for (const path of ["/s", "/f"]) {
      for (let position = 0;;) {
        const read = await store.read(path, position, 1 << 20, false);
        assert.equal(read.status, "ok");
        if (read.status !== "ok" || read.records.length === 0) break;
        for (const record of read.records) {
          assert.ok(
            record.buffer.byteLength <= 65_536,
            `${path}: a view of ${record.buffer.byteLength}`,
          );
        }
        position = read.next;
      }
    }
  });

  test("an append racing its stream's expiry is kept or refused, never lost, and nothing leaks", async () => {
    const realNow = Date.now;
    const store = new MemoryStreamStore({ maxBytes: 2000 });
    const T = realNow() + 60_000;
    await store.create("/soon", {
      contentType: "text/plain",
      framing: "bytes",
      closed: false,
      records: [new Uint8Array(1000)],
      expiresAt: T,
      contentTypeGiven: true,
    });
    // The stream is alive when the append finds it, expired by the time the
    // store looks for room (a sweep).
    let calls = 0;
    Date.now = () => ++calls <= 2 ? T - 1 : T + 1;
    let result;
    try {
      result = await store.append("/soon", {
        contentType: "text/plain",
        records: [new Uint8Array(900)],
        close: false,
      });
    } finally {
      Date.now = realNow;
    }
    if (result.status === "ok") {
      const read = await store.read("/soon", 0, 1 << 20, false);
      assert.equal(read.status === "ok" && read.next, 1900, "acknowledged, so kept");
    } else assert.ok(["missing", "store-full"].includes(result.status), result.status);
    // Once it has expired, the whole store is free again.
    Date.now = () => T + 10;
    try {
      const big = await store.create("/big", {
        contentType: "text/plain",
        framing: "bytes",
        closed: false,
        records: [new Uint8Array(2000 - 128)],
        contentTypeGiven: true,
      });
      assert.equal(big.status, "created");
    } finally {
      Date.now = realNow;
    }
  });
});

describe("shared SSE frames", () => {
  test("readers at one position share one frame, whatever cursor they send", async () => {
    const handle = createStreamsHandler({ prefix: PREFIX });
    await call(handle, "f", "PUT", {}, "hello");
    const first = async (cursor: string) => {
      const response = await call(handle, `f?offset=-1&live=sse&cursor=${cursor}`, "GET");
      const reader = response.body!.getReader();
      const { value } = await reader.read();
      await reader.cancel();
      return value!;
    };
    // Each reader's first chunk: the data event and its control event.
    const frames = await Promise.all(["1", "99999999", "x", "2"].map(first));
    const text = frames.map((frame) => new TextDecoder().decode(frame));
    for (const each of text) {
      assert.ok(each.startsWith("event: data\ndata:hello\n\nevent: control\n"));
    }
    // A cursor at or past the current interval gets jitter: its control event is its own.
    assert.notEqual(text[1], text[0]);
    for (const i of [2, 3]) assert.equal(frames[i], frames[0], "the same bytes, not a copy");
  });
});

describe("cross-site writes with the cookie", () => {
  test("a cookie authenticates an unsafe request only from this origin or a listed one", async () => {
    const authorize = await jwtAuth({ secret: SECRET, cookieOrigins: ["https://app.example"] });
    const broker = new Broker();
    const publish = createHandler(broker, { authorize });
    const streams = createStreamsHandler({ prefix: PREFIX, authorize });
    const writer = await token({ sse: { publish: ["*"], subscribe: ["*"] } });
    const post = (headers: Record<string, string>) =>
      answer(publish(
        new Request("http://broker.test/publish", {
          method: "POST",
          headers: { "content-type": "text/plain", ...headers },
          body: "hi",
        }),
      ));
    const cookie = { cookie: `sse_token=${writer}` };
    const refused = {
      status: 401,
      body: { error: "the token cookie counts only on requests from this origin" },
    };
    assert.deepEqual(await post({ ...cookie, origin: "https://evil.example" }), refused);
    assert.deepEqual(await post({ ...cookie, origin: "null" }), refused);
    assert.deepEqual(await post(cookie), refused, "no Origin: not from this origin");
    assert.deepEqual(
      await answer(call(streams, "s", "PUT", { ...cookie, origin: "https://evil.example" })),
      refused,
    );
    assert.equal(broker.stats().published, 0);
    assert.equal((await post({ ...cookie, origin: "http://broker.test" })).status, 200);
    assert.equal((await post({ ...cookie, origin: "https://app.example" })).status, 200);
    // A cookie of that name set twice (another host of the site can add one) is refused.
    const twice = {
      cookie: `sse_token=${writer}; sse_token=${writer}`,
      origin: "http://broker.test",
    };
    assert.deepEqual(await post(twice), {
      status: 401,
      body: { error: "the token cookie is set twice" },
    });
    // A bearer token is no ambient credential: any origin may send it.
    const bearer = { authorization: `Bearer ${writer}`, origin: "https://evil.example" };
    assert.equal((await post(bearer)).status, 200);
    // Reading with the cookie changes nothing: allowed from anywhere.
    const events = await publish(
      new Request("http://broker.test/events", {
        headers: { ...cookie, origin: "https://evil.example" },
      }),
    );
    assert.equal(events.status, 200);
    await events.body!.cancel();
    broker.close();
  });
});

describe("stream content is never a page of this origin", () => {
  test("every streams response forbids running or framing it and sniffing its type", async () => {
    const handle = createStreamsHandler({ prefix: PREFIX });
    const html = "<script>alert(document.cookie)</script>";
    await call(handle, "page", "PUT", { "content-type": "text/html" }, html);
    for (
      const response of [
        await call(handle, "page?offset=-1", "GET"),
        await call(handle, "page?offset=-1&live=sse", "GET"),
        await call(handle, "missing", "GET"),
      ]
    ) {
      assert.equal(
        response.headers.get("content-security-policy"),
        "default-src 'none'; frame-ancestors 'none'; sandbox",
      );
      assert.equal(response.headers.get("x-content-type-options"), "nosniff");
      await response.body?.cancel();
    }
  });
});

describe("/stats names topics only to those who may publish to them", () => {
  test("no publish permission: counters without names; grants: their topics; true: all", async () => {
    const broker = new Broker();
    const handle = createHandler(broker, { authorize: await jwtAuth({ secret: SECRET }) });
    const listener = await token({ sse: { subscribe: ["*"] } });
    const open = [];
    for (const topic of ["user/1/inbox", "user/2/inbox"]) {
      open.push(broker.subscribe(new Request(`http://broker.test/events?topic=${topic}`)));
    }
    const stats = async (bearer?: string) => {
      const response = await handle(
        new Request("http://broker.test/stats", {
          headers: bearer ? { authorization: `Bearer ${bearer}` } : {},
        }),
      );
      assert.equal(response.status, 200);
      const body = await response.json();
      assert.equal(body.clients, 2, "the counters are open to all");
      return body.clientsByTopic;
    };
    assert.deepEqual(await stats(), {});
    assert.deepEqual(await stats("not.a.token"), {});
    assert.deepEqual(await stats(listener), {});
    assert.deepEqual(await stats(await token({ sse: { publish: ["user/1/*"] } })), {
      "user/1/inbox": 1,
    });
    assert.deepEqual(await stats(await token({ sse: { publish: ["*"] } })), {
      "user/1/inbox": 1,
      "user/2/inbox": 1,
    });
    const open2 = createHandler(broker); // no authorize: everyone may publish
    assert.deepEqual(
      (await (await open2(new Request("http://broker.test/stats"))).json()).clientsByTopic,
      { "user/1/inbox": 1, "user/2/inbox": 1 },
    );
    broker.close();
    await Promise.all(open.map((response) => response.body!.cancel()));
  });
});

describe("nothing waits for ever", () => {
  /** A body that sends one byte and then nothing, as a slow client would. */
  const trickle = () =>
    new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new Uint8Array([0x7b]));
      },
    });

  test("a body that has not arrived within bodyTimeout is refused with 408", async () => {
    const broker = new Broker();
    const publish = createHandler(broker, { bodyTimeout: 100 });
    const streams = createStreamsHandler({ prefix: PREFIX, bodyTimeout: 100 });
    await call(streams, "slow", "PUT");
    const started = Date.now();
    for (
      const response of await Promise.all([
        publish(
          new Request("http://broker.test/publish", {
            method: "POST",
            body: trickle(),
            duplex: "half",
          } as RequestInit),
        ),
        call(streams, "slow", "POST", {}, trickle()),
      ])
    ) {
      assert.equal(response.status, 408);
      assert.deepEqual(await response.json(), {
        error: "the body did not arrive within 100 ms",
      });
      assert.equal(response.headers.get("connection"), "close");
    }
    assert.ok(Date.now() - started < 5000);
    assert.equal(broker.stats().published, 0);
    assert.equal(broker.stats().rejected.limits, 1);
    broker.close();
  });

  test("a live read ends when its grants expire, long before its own limits", async () => {
    const expiring: Authorize = () => ({
      subscribe: ["*"],
      publish: ["*"],
      expires: Date.now() + 300,
    });
    const handle = createStreamsHandler({
      prefix: PREFIX,
      authorize: expiring,
      sseMaxDuration: 60_000,
      longPollTimeout: 60_000,
    });
    const offset = (await call(handle, "e", "PUT", {}, "x")).headers.get("stream-next-offset");
    const started = Date.now();
    const sse = await call(handle, "e?offset=-1&live=sse", "GET");
    assert.match(await sse.text(), /^event: data\ndata:x\n\nevent: control\n/);
    const poll = await call(handle, `e?offset=${offset}&live=long-poll`, "GET");
    assert.equal(poll.status, 204);
    assert.ok(Date.now() - started < 5000, "ended at the expiry");
  });
});

describe("the smaller ones", () => {
  test("Location is the configured origin and the path, never the request's Host", async () => {
    const created = (handle: StreamsHandler) =>
      handle(
        new Request("http://evil.example/v1/stream/l", { method: "PUT" }),
      ).then((response) => response.headers.get("location"));
    assert.equal(await created(createStreamsHandler({ prefix: PREFIX })), "/v1/stream/l");
    assert.equal(
      await created(createStreamsHandler({ prefix: PREFIX, origin: "https://sse.example.com/" })),
      "https://sse.example.com/v1/stream/l",
    );
  });

  test("an internal error answers 500 without its text; the logger has it", async () => {
    const lines: string[] = [];
    const handle = createStreamsHandler({
      prefix: PREFIX,
      authorize: () => {
        throw new Error("secret detail");
      },
      logger: (line) => lines.push(line),
    });
    assert.deepEqual(await answer(call(handle, "x", "GET")), {
      status: 500,
      body: { error: "internal error" },
    });
    assert.deepEqual(lines, ["stream request failed: secret detail"]);
    // A TokenError is a refusal with its reason, not a failure.
    const refusing = createStreamsHandler({
      prefix: PREFIX,
      authorize: () => {
        throw new TokenError("expired");
      },
    });
    assert.deepEqual(await answer(call(refusing, "x", "GET")), {
      status: 401,
      body: { error: "expired" },
    });
  });

  test("allowOrigin matches an origin exactly, never as part of another", async () => {
    // A list, and a lone string as plain JavaScript may pass it.
    for (const allowOrigin of [["https://app.example.com"], "https://app.example.com"]) {
      const handle = createStreamsHandler({ prefix: PREFIX, allowOrigin: allowOrigin as never });
      const from = async (origin: string) => {
        const response = await handle(new Request(`${BASE}o`, { headers: { origin } }));
        await response.body?.cancel();
        return response.headers.get("access-control-allow-origin");
      };
      assert.equal(await from("https://app.example.com"), "https://app.example.com");
      for (
        const near of ["https://app.example.co", "https://app.example.com.evil", "https://app"]
      ) {
        assert.equal(await from(near), null, near);
      }
    }
  });

  test("MemoryLog remembers at most idempotencyKeys keys, forgetting the oldest", async () => {
    const log = new MemoryLog({ idempotencyKeys: 2 });
    const append = (key: string) =>
      log.append([{ topics: [], text: `data: ${key}\n\n` }], { idempotencyKey: key });
    const first = await append("k1");
    await append("k2");
    assert.deepEqual(await append("k1"), { ids: first.ids, repeated: true });
    await append("k3"); // one too many: k1, the oldest, is forgotten
    assert.equal((await append("k1")).repeated, false); // and now k2
    assert.equal((await append("k3")).repeated, true);
    assert.equal((await append("k2")).repeated, false);
  });
});

describe("server.ts", () => {
  /** Sends raw bytes to the server, one piece every `gapMs`; answers what came back. */
  function raw(url: string, pieces: string[], gapMs = 0): Promise<string> {
    const { hostname, port } = new URL(url);
    return new Promise((resolve, reject) => {
      const socket = connect(Number(port), hostname);
      let received = "";
      let sent = 0;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const next = () => {
        if (sent < pieces.length && !socket.destroyed) {
          socket.write(pieces[sent++]);
          timer = setTimeout(next, gapMs);
        }
      };
      socket.on("connect", next);
      socket.on("data", (chunk) => {
        received += chunk.toString();
        // One answer is enough: its head and, when it says so, its body.
        const [head, body = ""] = received.split("\r\n\r\n");
        const length = /content-length: *(\d+)/i.exec(head)?.[1];
        if (received.includes("\r\n\r\n") && (length === undefined || body.length >= +length)) {
          socket.destroy();
        }
      });
      socket.on("close", () => {
        clearTimeout(timer);
        resolve(received);
      });
      socket.on("error", reject);
    });
  }

  test("JSON appends of many small messages hold about what they count for", async () => {
    await withServer({}, async (server) => {
      const url = `${server.url}v1/stream/zeros`;
      const json = { "content-type": "application/json" };
      assert.equal((await fetch(url, { method: "PUT", headers: json })).status, 201);
      const body = JSON.stringify(Array(100_000).fill(0)); // 200 KB, 100,000 messages
      const append = async () => {
        const response = await fetch(url, { method: "POST", headers: json, body });
        assert.equal(response.status, 204);
      };
      // The first appends leave the garbage of parsing them, which later ones reuse.
      for (let i = 0; i < 5; i++) await append();
      const before = server.rssKiB();
      for (let i = 0; i < 10; i++) await append();
      // 2 MB of messages, stored as a few pieces; before, each message was an
      // object of its own, and ten such bodies held about 150 MB.
      const grown = (server.rssKiB() - before) / 1024;
      assert.ok(grown < 60, `the process grew ${grown.toFixed(1)} MiB`);
      const head = await fetch(url, { method: "HEAD" });
      assert.equal(head.headers.get("stream-next-offset"), "0000000000000000_0000000001500000");
    });
  });

  test("JSON bodies that nest many values cost about their size, even many at once", async () => {
    await withServer({}, async (server) => {
      const url = `${server.url}v1/stream/nested`;
      const json = { "content-type": "application/json" };
      assert.equal((await fetch(url, { method: "PUT", headers: json })).status, 201);
      // 2 MB: one message of 700,000 empty objects.
      const body = `{"a":[${Array(700_000).fill("{}").join(",")}]}`;
      const before = server.rssKiB();
      const answers = await Promise.all(
        Array.from({ length: 8 }, () => fetch(url, { method: "POST", headers: json, body })),
      );
      assert.deepEqual(answers.map((response) => response.status), Array(8).fill(204));
      // Built as values, each body took about 100 MB while it was parsed.
      const grown = (server.rssKiB() - before) / 1024;
      assert.ok(grown < 100, `the process grew ${grown.toFixed(1)} MiB`);
    });
  });

  test("a malformed Host answers 400 and writes no log line", async () => {
    await withServer({}, async (server) => {
      const before = server.output();
      for (const host of ["a b", "[::1", "x:99999"]) {
        const answer = await raw(server.url, [`GET /health HTTP/1.1\r\nHost: ${host}\r\n\r\n`]);
        assert.match(answer, /^HTTP\/1\.1 400 /, host);
      }
      assert.equal(server.output(), before, "nothing was logged");
    });
  });

  test("a body sent a byte at a time is cut at BODY_TIMEOUT_MS with 408", async () => {
    await withServer({ BODY_TIMEOUT_MS: "400" }, async (server) => {
      const head = "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n";
      const started = Date.now();
      const answer = await raw(server.url, [head, ..."hello!"], 300);
      assert.match(answer, /^HTTP\/1\.1 408 /);
      assert.match(answer, /"the body did not arrive within 400 ms"/);
      assert.ok(Date.now() - started < 1500, "refused before the body's end");
      const stats = await (await fetch(`${server.url}stats`)).json();
      assert.equal(stats.published, 0);
    });
  });

  test("Location starts with PUBLIC_URL, else the URL it listens on, never the request's Host", async () => {
    const envs: Record<string, string>[] = [{}, { PUBLIC_URL: "https://sse.example.com" }];
    for (const env of envs) {
      await withServer(env, async (server) => {
        const answer = await raw(server.url, [
          "PUT /v1/stream/where HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n",
        ]);
        assert.match(answer, /^HTTP\/1\.1 201 /);
        const origin = "PUBLIC_URL" in env ? env.PUBLIC_URL : server.url.slice(0, -1);
        assert.equal(/\r\nlocation: (.*)\r\n/i.exec(answer)?.[1], `${origin}/v1/stream/where`);
      });
    }
  });

  test("POST /session checks the token and sets it as an HttpOnly, SameSite=Strict cookie", async () => {
    await withServer({ JWT_SECRET: SECRET }, async (server) => {
      const session = (headers: Record<string, string>, method = "POST") =>
        fetch(`${server.url}session`, { method, headers });
      const refused = await session({ authorization: "Bearer not.a.token" });
      assert.equal(refused.status, 401);
      assert.equal(refused.headers.get("set-cookie"), null);
      await refused.body?.cancel();
      const missing = await session({});
      assert.equal(missing.status, 401);
      await missing.body?.cancel();
      const valid = await token({ sse: { subscribe: ["*"] } });
      const set = await session({ authorization: `Bearer ${valid}` });
      assert.equal(set.status, 204);
      assert.equal(
        set.headers.get("set-cookie"),
        `sse_token=${valid}; Path=/; HttpOnly; SameSite=Strict`,
      );
      const cleared = await session({}, "DELETE");
      assert.equal(
        cleared.headers.get("set-cookie"),
        "sse_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
      );
    });
    // Without signed tokens there is no cookie, and no such route.
    await withServer({}, async (server) => {
      const response = await fetch(`${server.url}session`, { method: "POST" });
      assert.equal(response.status, 404);
      await response.body?.cancel();
    });
  });

  test("PUBLIC_URL that is not an origin stops the server with a one-line reason", async () => {
    await assert.rejects(startServer({ PUBLIC_URL: "sse.example.com/x" }), (error: Error) => {
      assert.match(error.message, /^error: PUBLIC_URL must be an origin/m);
      return true;
    });
  });
});
