// streams.ts beyond the conformance suite (test/conformance.sh): its limits,
// its paths, live reads that end when the client leaves, and its mount in
// server.ts.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { createStreamsHandler, MemoryStreamStore, type StreamsHandler } from "../streams.ts";
import { withServer } from "./helpers.ts";
import { liveReadCases, type MakeLiveStore } from "./contract/live_reads.ts";

const BASE = "http://streams.test/v1/stream/";

function put(handle: StreamsHandler, name: string, body?: string, type = "text/plain") {
  return handle(
    new Request(BASE + name, { method: "PUT", headers: { "content-type": type }, body }),
  );
}

function post(handle: StreamsHandler, name: string, body: BodyInit, type = "text/plain") {
  return handle(
    new Request(BASE + name, { method: "POST", headers: { "content-type": type }, body }),
  );
}

describe("streams.ts limits", () => {
  test("a body over maxBodyBytes is 413, declared or streamed, and nothing is appended", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", maxBodyBytes: 8 });
    assert.equal((await put(handle, "a")).status, 201);
    assert.equal((await post(handle, "a", "123456789")).status, 413);
    const chunks = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode("12345"));
        controller.enqueue(new TextEncoder().encode("67890"));
        controller.close();
      },
    });
    const streamed = await handle(
      new Request(BASE + "a", {
        method: "POST",
        headers: { "content-type": "text/plain" },
        body: chunks,
        duplex: "half",
      } as RequestInit),
    );
    assert.equal(streamed.status, 413);
    assert.deepEqual(await streamed.json(), { error: "body is larger than 8 bytes" });
    assert.equal((await post(handle, "a", "12345678")).status, 204);
    assert.equal(await (await handle(new Request(BASE + "a"))).text(), "12345678");
  });

  test("a full stream answers 413 and keeps every acknowledged append", async () => {
    // Each append is one piece: its bytes and 128 for its bookkeeping.
    const handle = createStreamsHandler({ prefix: "/v1/stream/", maxStreamBytes: 266 });
    assert.equal((await put(handle, "b", "12345")).status, 201);
    assert.equal((await post(handle, "b", "67890")).status, 204);
    const full = await post(handle, "b", "x");
    assert.equal(full.status, 413);
    assert.deepEqual(await full.json(), { error: "a stream holds at most 266 bytes" });
    assert.equal(await (await handle(new Request(BASE + "b"))).text(), "1234567890");
  });

  test("a store full of streams answers 503 with Retry-After, and has room again after a delete", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", maxStreams: 2 });
    assert.equal((await put(handle, "c1")).status, 201);
    assert.equal((await put(handle, "c2")).status, 201);
    const full = await put(handle, "c3");
    assert.equal(full.status, 503);
    assert.equal(full.headers.get("retry-after"), "10");
    assert.deepEqual(await full.json(), { error: "the store holds at most 2 streams" });
    assert.equal((await put(handle, "c1")).status, 200); // an existing one still answers
    assert.equal((await handle(new Request(BASE + "c1", { method: "DELETE" }))).status, 204);
    assert.equal((await put(handle, "c3")).status, 201);
  });

  test("a failing store answers 503 with Retry-After and no detail; the logger hears once", async () => {
    const store = new MemoryStreamStore();
    const fails = store.append;
    store.append = () => Promise.reject(new Error("disk on fire"));
    const lines: string[] = [];
    const handle = createStreamsHandler({
      prefix: "/v1/stream/",
      store,
      logger: (line) => lines.push(line),
    });
    assert.equal((await put(handle, "d")).status, 201);
    for (let i = 0; i < 3; i++) {
      const response = await post(handle, "d", "x");
      assert.equal(response.status, 503);
      assert.equal(response.headers.get("retry-after"), "1");
      assert.deepEqual(await response.json(), {
        error: "the stream store is unavailable: try again",
      });
    }
    store.append = fails;
    assert.equal((await post(handle, "d", "x")).status, 204);
    assert.deepEqual(lines, ["stream store failed: disk on fire", "stream store: answering again"]);
  });
});

describe("streams.ts paths", () => {
  test("outside the prefix 404, reserved __ds 501, an overlong path 414", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/" });
    assert.equal((await handle(new Request("http://streams.test/other"))).status, 404);
    assert.equal((await handle(new Request("http://streams.test/v1/stream/"))).status, 404);
    assert.equal((await handle(new Request(BASE + "__ds/subscriptions/x"))).status, 501);
    assert.equal((await handle(new Request(BASE + "x".repeat(2000)))).status, 414);
  });
});

describe("streams.ts live reads", () => {
  test("a long-poll ends when its request is aborted, well before its timeout", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", longPollTimeout: 60_000 });
    const created = await put(handle, "e");
    const offset = created.headers.get("stream-next-offset");
    const aborted = new AbortController();
    const started = Date.now();
    const pending = handle(
      new Request(`${BASE}e?offset=${offset}&live=long-poll`, { signal: aborted.signal }),
    );
    setTimeout(() => aborted.abort(), 50);
    const response = await pending;
    assert.equal(response.status, 204);
    assert.ok(Date.now() - started < 5000);
  });

  test("a long-poll answers 204 with the tail after longPollTimeout", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", longPollTimeout: 100 });
    const offset = (await put(handle, "f", "x")).headers.get("stream-next-offset")!;
    const response = await handle(new Request(`${BASE}f?offset=${offset}&live=long-poll`));
    assert.equal(response.status, 204);
    assert.equal(response.headers.get("stream-next-offset"), offset);
    assert.equal(response.headers.get("stream-up-to-date"), "true");
    assert.match(response.headers.get("stream-cursor")!, /^\d+$/);
  });

  test("an SSE body ends when its request is aborted, and after sseMaxDuration", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", sseMaxDuration: 200 });
    await put(handle, "g", "hello");
    const aborted = new AbortController();
    const response = await handle(
      new Request(`${BASE}g?offset=-1&live=sse`, { signal: aborted.signal }),
    );
    const reader = response.body!.getReader();
    let first = "";
    while (!first.includes("event: control")) {
      first += new TextDecoder().decode((await reader.read()).value);
    }
    assert.match(first, /^event: data\ndata:hello\n\nevent: control\n/);
    const next = reader.read();
    aborted.abort();
    assert.equal((await next).done, true);
    // Left alone, the server ends it after sseMaxDuration.
    const quiet = await handle(new Request(`${BASE}g?offset=now&live=sse`));
    assert.match(await quiet.text(), /"upToDate":true/);
  });
});

describe("streams.ts shared live reads: MemoryStreamStore", () => {
  const make: MakeLiveStore = () =>
    Promise.resolve({ store: new MemoryStreamStore(), close: () => {} });
  for (const { name, run } of liveReadCases) test(name, () => run(make));
});

describe("streams.ts SSE text", () => {
  test("a character split between two reads arrives whole", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", maxReadBytes: 4 });
    // A read takes whole appends, cutting only the one that passes its 4 bytes.
    await put(handle, "h", "ab");
    await post(handle, "h", "cé");
    await post(handle, "h", "xy✓✓");
    const text = "abcéxy✓✓";
    const response = await handle(new Request(`${BASE}h?offset=-1&live=sse`));
    const reader = response.body!.getReader();
    let received = "";
    while (!received.includes('"upToDate":true')) {
      received += new TextDecoder().decode((await reader.read()).value);
    }
    await reader.cancel();
    const data = received.split("\n\n").filter((event) => event.startsWith("event: data"))
      .map((event) => event.split("\n").slice(1).map((line) => line.slice(5)).join("\n"));
    assert.ok(data.length >= 3);
    assert.equal(data.join(""), text);
  });

  test("SSE readers share frames, yet each gets its own stream from its own offset", async () => {
    const handle = createStreamsHandler({ prefix: "/v1/stream/", maxReadBytes: 4 });
    // Two streams with the same offsets and lengths; a character cut at a read's end.
    await put(handle, "one", "ab");
    await put(handle, "two", "AB");
    await post(handle, "one", "cé");
    await post(handle, "two", "CD");
    const read = async (name: string, offset: string) => {
      const response = await handle(new Request(`${BASE}${name}?offset=${offset}&live=sse`));
      const reader = response.body!.getReader();
      let received = "";
      while (!received.includes('"upToDate":true')) {
        received += new TextDecoder().decode((await reader.read()).value);
      }
      await reader.cancel();
      return received.split("\n\n").filter((event) => event.startsWith("event: data"))
        .map((event) => event.split("\n").slice(1).map((line) => line.slice(5)).join("\n"))
        .join("");
    };
    const start = "0000000000000000_0000000000000000";
    const second = "0000000000000000_0000000000000002";
    // The same readers twice: the second of each pair is served what the first built.
    for (let round = 0; round < 2; round++) {
      assert.equal(await read("one", start), "abcé");
      assert.equal(await read("two", start), "ABCD");
      assert.equal(await read("one", second), "cé");
      assert.equal(await read("two", second), "CD");
    }
  });
});

describe("streams.ts in server.ts", () => {
  test("served under STREAMS_PATH beside the broker's routes", async () => {
    await withServer({ STREAMS_PATH: "/ds" }, async ({ url }) => {
      const created = await fetch(`${url}ds/s1`, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: '[{"a":1}]',
      });
      assert.equal(created.status, 201);
      assert.equal(created.headers.get("location"), `${url}ds/s1`);
      const read = await fetch(`${url}ds/s1?offset=-1`);
      assert.deepEqual(await read.json(), [{ a: 1 }]);
      assert.equal((await fetch(`${url}v1/stream/s1`)).status, 404);
      assert.equal((await fetch(`${url}health`)).status, 200);
    });
  });
});
