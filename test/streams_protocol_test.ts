// The Durable Streams protocol as streams.ts serves it, in process and with
// exact wire values: each method's statuses, headers and one-line refusals,
// offsets, ETags, cursors, producers, forks, JSON streams (against
// JSON.parse as the oracle), SSE frames, CORS and grants. The official
// conformance suite (test/conformance.sh) checks the same protocol over
// HTTP; these are the fast tests that `npm run mutation` runs.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { createStreamsHandler, MemoryStreamStore, type StreamsHandler } from "../streams.ts";
import type { Grants } from "../mod.ts";
import { HttpError } from "../mod.ts";
import { seededRandom } from "./helpers.ts";

const BASE = "http://streams.test/s/";
const PREFIX = "/s/";

/** The offset token of a byte (or message) position. */
function at(position: number): string {
  return `0000000000000000_${String(position).padStart(16, "0")}`;
}

interface Call {
  headers?: Record<string, string>;
  body?: BodyInit;
  query?: string;
  signal?: AbortSignal;
}

function call(
  handle: StreamsHandler,
  method: string,
  name: string,
  { headers = {}, body, query = "", signal }: Call = {},
): Promise<Response> {
  return handle(new Request(BASE + name + query, { method, headers, body, signal }));
}

const text = { "content-type": "text/plain" };
const json = { "content-type": "application/json" };

/** Asserts a refusal: its status and its `{"error"}` body. */
async function refused(response: Response, status: number, error: string): Promise<void> {
  assert.equal(response.status, status, `status of "${error}"`);
  assert.deepEqual(await response.json(), { error });
  assert.equal(response.headers.get("cache-control"), "no-store");
}

/** Reads an SSE body until `until` appears (or it ends), then cancels it. */
async function sseUntil(response: Response, until: string): Promise<string> {
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let received = "";
  while (!received.includes(until)) {
    const { done, value } = await reader.read();
    if (done) return received;
    received += decoder.decode(value, { stream: true });
  }
  await reader.cancel();
  return received;
}

/** An SSE body read to its end. */
async function sseAll(response: Response): Promise<string> {
  return await response.text();
}

function handler(options: Parameters<typeof createStreamsHandler>[0] = {}): StreamsHandler {
  return createStreamsHandler({ prefix: PREFIX, ...options });
}

describe("streams.ts create (PUT)", () => {
  test("201 with Location, type and tail; 200 for the same again; 409 for another configuration", async () => {
    const handle = handler();
    const created = await call(handle, "PUT", "a", { headers: text, body: "hello" });
    assert.equal(created.status, 201);
    assert.equal(created.headers.get("location"), "/s/a");
    assert.equal(created.headers.get("content-type"), "text/plain");
    assert.equal(created.headers.get("stream-next-offset"), at(5));
    assert.equal(created.headers.get("stream-closed"), null);
    assert.equal(await created.text(), "");
    const again = await call(handle, "PUT", "a", {
      headers: { "content-type": "Text/Plain; x=1" },
    });
    assert.equal(again.status, 200);
    assert.equal(again.headers.get("location"), null);
    assert.equal(again.headers.get("stream-next-offset"), at(5));
    await refused(
      await call(handle, "PUT", "a", { headers: json }),
      409,
      "a stream with another configuration exists at this path",
    );
    await refused(
      await call(handle, "PUT", "a", { headers: { ...text, "stream-ttl": "5" } }),
      409,
      "a stream with another configuration exists at this path",
    );
  });

  test("Location starts with origin when it is set, its trailing slash dropped", async () => {
    const handle = handler({ origin: "https://streams.example.com/" });
    const created = await call(handle, "PUT", "b/c", { headers: text });
    assert.equal(created.headers.get("location"), "https://streams.example.com/s/b/c");
  });

  test("without Content-Type a stream holds application/octet-stream, sent as base64 over SSE", async () => {
    const handle = handler();
    const created = await call(handle, "PUT", "raw", { headers: { "content-type": "  " } });
    assert.equal(created.headers.get("content-type"), "application/octet-stream");
    const none = await call(handle, "PUT", "raw2");
    assert.equal(none.headers.get("content-type"), "application/octet-stream");
    // A type given as blank counts as none: the same stream again.
    assert.equal(
      (await call(handle, "PUT", "raw2", { headers: { "content-type": " " } })).status,
      200,
    );
  });

  test("Stream-Closed: true (any case) creates it closed; any other value does not", async () => {
    const handle = handler();
    const closed = await call(handle, "PUT", "c", {
      headers: { ...text, "stream-closed": "TRUE" },
      body: "x",
    });
    assert.equal(closed.headers.get("stream-closed"), "true");
    const open = await call(handle, "PUT", "o", { headers: { ...text, "stream-closed": "yes" } });
    assert.equal(open.status, 201);
    assert.equal(open.headers.get("stream-closed"), null);
    await refused(
      await call(handle, "POST", "c", { headers: text, body: "y" }),
      409,
      "the stream is closed",
    );
  });

  test("Stream-TTL and Stream-Expires-At are checked, exclusive, and shown by HEAD", async () => {
    const handle = handler();
    for (const ttl of ["-1", "1.5", "01", "", "9007199254740993"]) {
      await refused(
        await call(handle, "PUT", "t", { headers: { ...text, "stream-ttl": ttl } }),
        400,
        "Stream-TTL must be a non-negative integer of seconds",
      );
    }
    await refused(
      await call(handle, "PUT", "t", {
        headers: { ...text, "stream-ttl": "5", "stream-expires-at": "2100-01-01T00:00:00Z" },
      }),
      400,
      "use Stream-TTL or Stream-Expires-At, not both",
    );
    for (
      const expires of [
        "2100-01-01",
        "2100-13-45T00:00:00Z",
        "x2100-01-01T00:00:00Z",
        "2100-01-01T00:00:00Zx",
        "tomorrow",
      ]
    ) {
      await refused(
        await call(handle, "PUT", "t", { headers: { ...text, "stream-expires-at": expires } }),
        400,
        "Stream-Expires-At must be an RFC 3339 timestamp",
      );
    }
    assert.equal(
      (await call(handle, "PUT", "t", { headers: { ...text, "stream-ttl": "60" } })).status,
      201,
    );
    const head = await call(handle, "HEAD", "t");
    assert.equal(head.headers.get("stream-ttl"), "60");
    assert.equal(head.headers.get("stream-expires-at"), null);
    const expiring = await call(handle, "PUT", "e", {
      headers: { ...text, "stream-expires-at": "2100-01-01t01:02:03.5+01:00" },
    });
    assert.equal(expiring.status, 201);
    const shown = await call(handle, "HEAD", "e");
    assert.equal(shown.headers.get("stream-expires-at"), "2100-01-01T00:02:03.500Z");
    assert.equal(shown.headers.get("stream-ttl"), null);
  });

  test("a stream whose TTL or expiry has passed is gone: 404, and its path is free", async () => {
    const handle = handler();
    await call(handle, "PUT", "past", {
      headers: { ...text, "stream-expires-at": "2000-01-01T00:00:00Z" },
    });
    await refused(await call(handle, "HEAD", "past"), 404, "no stream at this path");
    await call(handle, "PUT", "zero", { headers: { ...text, "stream-ttl": "0" } });
    await refused(await call(handle, "GET", "zero"), 404, "no stream at this path");
    assert.equal((await call(handle, "PUT", "zero", { headers: text })).status, 201);
  });
});

describe("streams.ts append (POST)", () => {
  test("204 with the new tail; the data reads back in order", async () => {
    const handle = handler();
    await call(handle, "PUT", "a", { headers: text });
    const first = await call(handle, "POST", "a", { headers: text, body: "one," });
    assert.equal(first.status, 204);
    assert.equal(first.headers.get("stream-next-offset"), at(4));
    assert.equal(first.headers.get("stream-closed"), null);
    assert.equal(first.headers.get("producer-epoch"), null);
    const second = await call(handle, "POST", "a", {
      headers: { "content-type": "text/plain; charset=utf-8" },
      body: "two",
    });
    assert.equal(second.headers.get("stream-next-offset"), at(7));
    assert.equal(await (await call(handle, "GET", "a")).text(), "one,two");
  });

  test("refusals: no body, no type, another type, no stream, a deleted one", async () => {
    const handle = handler();
    await call(handle, "PUT", "a", { headers: text });
    await refused(
      await call(handle, "POST", "a", { headers: text }),
      400,
      "an append needs a body (or Stream-Closed: true)",
    );
    await refused(
      await call(handle, "POST", "a", { body: new Uint8Array([1]) }),
      400,
      "an append needs a Content-Type",
    );
    await refused(
      await call(handle, "POST", "a", { headers: json, body: "1" }),
      409,
      "the content type differs from the stream's",
    );
    await refused(
      await call(handle, "POST", "nothing", { headers: text, body: "x" }),
      404,
      "no stream at this path",
    );
    // A deleted stream that a fork still reads holds its path as gone.
    await call(handle, "PUT", "fork", { headers: { "stream-forked-from": "/s/a" } });
    assert.equal((await call(handle, "DELETE", "a")).status, 204);
    await refused(
      await call(handle, "POST", "a", { headers: text, body: "x" }),
      410,
      "the stream was deleted",
    );
  });

  test("Stream-Closed: true closes it, with or without data; later appends are 409 with the tail", async () => {
    const handle = handler();
    await call(handle, "PUT", "a", { headers: text });
    const closing = await call(handle, "POST", "a", {
      headers: { ...text, "stream-closed": "true" },
      body: "end",
    });
    assert.equal(closing.status, 204);
    assert.equal(closing.headers.get("stream-closed"), "true");
    assert.equal(closing.headers.get("stream-next-offset"), at(3));
    // Closing again without data is a no-op that says so.
    const again = await call(handle, "POST", "a", { headers: { "stream-closed": "true" } });
    assert.equal(again.status, 204);
    assert.equal(again.headers.get("stream-closed"), "true");
    const late = await call(handle, "POST", "a", { headers: text, body: "x" });
    assert.equal(late.headers.get("stream-closed"), "true");
    assert.equal(late.headers.get("stream-next-offset"), at(3));
    await refused(late, 409, "the stream is closed");

    await call(handle, "PUT", "b", { headers: text });
    const empty = await call(handle, "POST", "b", { headers: { "stream-closed": "True" } });
    assert.equal(empty.status, 204);
    assert.equal(empty.headers.get("stream-closed"), "true");
    assert.equal(empty.headers.get("stream-next-offset"), at(0));
  });

  test("Stream-Seq must increase, as text", async () => {
    const handle = handler();
    await call(handle, "PUT", "a", { headers: text });
    const seq = (value: string) =>
      call(handle, "POST", "a", { headers: { ...text, "stream-seq": value }, body: value });
    assert.equal((await seq("b")).status, 204);
    await refused(await seq("b"), 409, "Stream-Seq must increase");
    await refused(await seq("a"), 409, "Stream-Seq must increase");
    assert.equal((await seq("c")).status, 204);
    // Appends without it do not reset it.
    assert.equal((await call(handle, "POST", "a", { headers: text, body: "-" })).status, 204);
    await refused(await seq("c"), 409, "Stream-Seq must increase");
    assert.equal(await (await call(handle, "GET", "a")).text(), "bc-");
  });
});

describe("streams.ts idempotent producers", () => {
  const producer = (id: string, epoch: number | string, seq: number | string) => ({
    ...text,
    "producer-id": id,
    "producer-epoch": String(epoch),
    "producer-seq": String(seq),
  });

  test("200 with the epoch and seq for new data, 204 for a duplicate, which appends nothing", async () => {
    const handle = handler();
    await call(handle, "PUT", "p", { headers: text });
    const first = await call(handle, "POST", "p", { headers: producer("w", 0, 0), body: "a" });
    assert.equal(first.status, 200);
    assert.equal(first.headers.get("producer-epoch"), "0");
    assert.equal(first.headers.get("producer-seq"), "0");
    assert.equal(first.headers.get("stream-next-offset"), at(1));
    const next = await call(handle, "POST", "p", { headers: producer("w", 0, 1), body: "b" });
    assert.equal(next.status, 200);
    assert.equal(next.headers.get("producer-seq"), "1");
    const duplicate = await call(handle, "POST", "p", { headers: producer("w", 0, 0), body: "a" });
    assert.equal(duplicate.status, 204);
    assert.equal(duplicate.headers.get("producer-epoch"), "0");
    assert.equal(duplicate.headers.get("producer-seq"), "1");
    assert.equal(duplicate.headers.get("stream-next-offset"), at(2));
    assert.equal(await (await call(handle, "GET", "p")).text(), "ab");
  });

  test("a gap is 409 with the expected and received seq; a stale epoch 403 with the current one", async () => {
    const handle = handler();
    await call(handle, "PUT", "p", { headers: text });
    const gap = await call(handle, "POST", "p", { headers: producer("w", 0, 2), body: "x" });
    assert.equal(gap.headers.get("producer-expected-seq"), "0");
    assert.equal(gap.headers.get("producer-received-seq"), "2");
    await refused(gap, 409, "expected Producer-Seq 0");
    await call(handle, "POST", "p", { headers: producer("w", 3, 0), body: "a" });
    const ahead = await call(handle, "POST", "p", { headers: producer("w", 3, 5), body: "x" });
    assert.equal(ahead.headers.get("producer-expected-seq"), "1");
    await refused(ahead, 409, "expected Producer-Seq 1");
    const stale = await call(handle, "POST", "p", { headers: producer("w", 2, 0), body: "x" });
    assert.equal(stale.headers.get("producer-epoch"), "3");
    await refused(stale, 403, "a newer producer epoch has taken over");
    await refused(
      await call(handle, "POST", "p", { headers: producer("w", 4, 1), body: "x" }),
      400,
      "a new producer epoch must start at seq 0",
    );
    assert.equal(
      (await call(handle, "POST", "p", { headers: producer("w", 4, 0), body: "b" })).status,
      200,
    );
    assert.equal(await (await call(handle, "GET", "p")).text(), "ab");
  });

  test("the three headers go together, the id printable, the numbers non-negative integers", async () => {
    const handle = handler();
    await call(handle, "PUT", "p", { headers: text });
    const partial: Record<string, string>[] = [
      { "producer-id": "w" },
      { "producer-epoch": "0" },
      { "producer-seq": "0" },
      { "producer-id": "w", "producer-epoch": "0" },
      { "producer-epoch": "0", "producer-seq": "0" },
    ];
    for (const headers of partial) {
      await refused(
        await call(handle, "POST", "p", { headers: { ...text, ...headers }, body: "x" }),
        400,
        "Producer-Id, Producer-Epoch and Producer-Seq go together",
      );
    }
    for (const id of ["a\tb", "x".repeat(257), "del\x7f"]) {
      await refused(
        await call(handle, "POST", "p", {
          headers: { ...producer("w", 0, 0), "producer-id": id },
          body: "x",
        }),
        400,
        "Producer-Id must be 1 to 256 printable characters",
      );
    }
    for (const bad of ["-1", "1.0", "01", "9007199254740993", "x"]) {
      await refused(
        await call(handle, "POST", "p", { headers: producer("w", bad, 0), body: "x" }),
        400,
        "Producer-Epoch must be a non-negative integer",
      );
      await refused(
        await call(handle, "POST", "p", { headers: producer("w", 0, bad), body: "x" }),
        400,
        "Producer-Seq must be a non-negative integer",
      );
    }
    const longest = await call(handle, "POST", "p", {
      headers: producer("é".repeat(256), 0, 0),
      body: "x",
    });
    assert.equal(longest.status, 200);
  });

  test("the producer that closed a stream gets 204 when it retries the close", async () => {
    const handle = handler();
    await call(handle, "PUT", "p", { headers: text });
    const close = { ...producer("w", 1, 0), "stream-closed": "true" };
    assert.equal((await call(handle, "POST", "p", { headers: close, body: "z" })).status, 200);
    const retry = await call(handle, "POST", "p", { headers: close, body: "z" });
    assert.equal(retry.status, 204);
    assert.equal(retry.headers.get("stream-closed"), "true");
    assert.equal(retry.headers.get("producer-seq"), "0");
    await refused(
      await call(handle, "POST", "p", { headers: producer("other", 0, 0), body: "x" }),
      409,
      "the stream is closed",
    );
  });
});

describe("streams.ts HEAD and DELETE", () => {
  test("HEAD: 200, no body, no-store, the type and tail; 404 missing; 410 deleted with forks", async () => {
    const handle = handler();
    await call(handle, "PUT", "h", { headers: text, body: "abc" });
    const head = await call(handle, "HEAD", "h");
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-type"), "text/plain");
    assert.equal(head.headers.get("stream-next-offset"), at(3));
    assert.equal(head.headers.get("cache-control"), "no-store");
    assert.equal(await head.text(), "");
    await refused(await call(handle, "HEAD", "none"), 404, "no stream at this path");
    await call(handle, "PUT", "f", { headers: { "stream-forked-from": "/s/h" } });
    assert.equal((await call(handle, "DELETE", "h")).status, 204);
    await refused(await call(handle, "HEAD", "h"), 410, "the stream was deleted");
    await refused(await call(handle, "GET", "h"), 410, "the stream was deleted");
    await refused(await call(handle, "DELETE", "h"), 410, "the stream was deleted");
    await refused(
      await call(handle, "PUT", "h", { headers: text }),
      409,
      "a deleted stream that forks still use holds this path",
    );
    // The fork still reads what it inherited.
    assert.equal(await (await call(handle, "GET", "f")).text(), "abc");
  });

  test("DELETE: 204 with no body, then 404; the path can be created again", async () => {
    const handle = handler();
    await call(handle, "PUT", "d", { headers: text, body: "old" });
    const deleted = await call(handle, "DELETE", "d");
    assert.equal(deleted.status, 204);
    assert.equal(await deleted.text(), "");
    await refused(await call(handle, "DELETE", "d"), 404, "no stream at this path");
    await call(handle, "PUT", "d", { headers: text, body: "new" });
    assert.equal(await (await call(handle, "GET", "d")).text(), "new");
  });
});

describe("streams.ts forks", () => {
  test("a fork inherits the source's data up to its offset, type and TTL, then goes its own way", async () => {
    const handle = handler();
    await call(handle, "PUT", "src", { headers: { ...text, "stream-ttl": "600" }, body: "abc" });
    await call(handle, "POST", "src", { headers: text, body: "def" });
    const fork = await call(handle, "PUT", "f", {
      headers: { "stream-forked-from": "/s/src", "stream-fork-offset": at(3) },
    });
    assert.equal(fork.status, 201);
    assert.equal(fork.headers.get("content-type"), "text/plain");
    assert.equal(fork.headers.get("stream-next-offset"), at(3));
    assert.equal((await call(handle, "HEAD", "f")).headers.get("stream-ttl"), "600");
    await call(handle, "POST", "f", { headers: text, body: "XYZ" });
    assert.equal(await (await call(handle, "GET", "f")).text(), "abcXYZ");
    assert.equal(await (await call(handle, "GET", "src")).text(), "abcdef");
    // Without an offset, at the source's tail; -1 is its start; a relative source.
    const whole = await call(handle, "PUT", "whole", { headers: { "stream-forked-from": "src" } });
    assert.equal(whole.headers.get("stream-next-offset"), at(6));
    const start = await call(handle, "PUT", "start", {
      headers: { "stream-forked-from": "/s/src", "stream-fork-offset": "-1" },
    });
    assert.equal(start.headers.get("stream-next-offset"), at(0));
    // The same fork again is 200; at another offset it is another configuration.
    const same = await call(handle, "PUT", "f", {
      headers: { "stream-forked-from": "/s/src", "stream-fork-offset": at(3) },
    });
    assert.equal(same.status, 200);
    await refused(
      await call(handle, "PUT", "f", {
        headers: { "stream-forked-from": "/s/src", "stream-fork-offset": at(2) },
      }),
      409,
      "a stream with another configuration exists at this path",
    );
  });

  test("a sub-offset forks inside an append, up to its end", async () => {
    const handle = handler();
    await call(handle, "PUT", "src", { headers: text, body: "abc" });
    await call(handle, "POST", "src", { headers: text, body: "defg" });
    const inside = await call(handle, "PUT", "in", {
      headers: {
        "stream-forked-from": "/s/src",
        "stream-fork-offset": at(3),
        "stream-fork-sub-offset": "2",
      },
    });
    assert.equal(inside.headers.get("stream-next-offset"), at(5));
    assert.equal(await (await call(handle, "GET", "in")).text(), "abcde");
    await refused(
      await call(handle, "PUT", "past", {
        headers: {
          "stream-forked-from": "/s/src",
          "stream-fork-offset": at(3),
          "stream-fork-sub-offset": "5",
        },
      }),
      400,
      "the fork sub-offset is past the next data boundary",
    );
    await refused(
      await call(handle, "PUT", "beyond", {
        headers: { "stream-forked-from": "/s/src", "stream-fork-offset": at(8) },
      }),
      400,
      "the fork offset is past the source's tail",
    );
  });

  test("malformed fork headers are 400; a missing or unreadable source 404, the same", async () => {
    const handle = handler({
      authorize: () => ({ subscribe: ["open/*"], publish: ["*", "*/*"] }),
    });
    await call(handle, "PUT", "open/src", { headers: text, body: "x" });
    await call(handle, "PUT", "secret", { headers: text, body: "x" });
    const fork = (headers: Record<string, string>) =>
      call(handle, "PUT", "f", { headers: { ...text, ...headers } });
    await refused(
      await fork({ "stream-fork-offset": at(0) }),
      400,
      "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
    );
    await refused(
      await fork({ "stream-fork-sub-offset": "0" }),
      400,
      "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
    );
    await refused(
      await fork({ "stream-forked-from": "/s/open/src", "stream-fork-offset": "3" }),
      400,
      "Stream-Fork-Offset is malformed",
    );
    for (const sub of ["-1", "x", "1.5", "01"]) {
      await refused(
        await fork({ "stream-forked-from": "/s/open/src", "stream-fork-sub-offset": sub }),
        400,
        "Stream-Fork-Sub-Offset must be a non-negative integer",
      );
    }
    await refused(
      await fork({ "stream-forked-from": "http://[" }),
      400,
      "Stream-Forked-From is not a path",
    );
    for (const from of ["/s/secret", "/s/open/none", "/elsewhere/x", "/s/", "/s/open/../secret"]) {
      await refused(
        await fork({ "stream-forked-from": from }),
        404,
        "the source stream does not exist",
      );
    }
    await refused(
      await call(handle, "PUT", "f", {
        headers: { "stream-forked-from": "/s/open/src" },
        body: new TextEncoder().encode("data"), // a string would bring text/plain
      }),
      400,
      "a fork created with a body needs a Content-Type",
    );
    await refused(
      await fork({ "stream-forked-from": "/s/open/src", "content-type": "text/html" }),
      409,
      "the content type differs from the source stream's",
    );
    assert.equal((await fork({ "stream-forked-from": "/s/open/src" })).status, 201);
  });

  test("forking a deleted source is 409; a source whose authorize refuses is hidden too", async () => {
    let token = "ok";
    const handle = handler({
      authorize: (request) => {
        if (request.headers.get("x-token") !== token) throw new HttpError(401, "who are you");
        return true;
      },
    });
    const headers = { "x-token": "ok" };
    await call(handle, "PUT", "src", { headers: { ...headers, ...text }, body: "x" });
    await call(handle, "PUT", "keep", { headers: { ...headers, "stream-forked-from": "/s/src" } });
    await call(handle, "DELETE", "src", { headers });
    await refused(
      await call(handle, "PUT", "f", { headers: { ...headers, "stream-forked-from": "/s/src" } }),
      409,
      "the source stream was deleted",
    );
    await refused(
      await call(handle, "PUT", "g", { headers: { "x-token": "no" } }),
      401,
      "who are you",
    );
    // Allowed to write, then refused when it comes to reading the source.
    let calls = 0;
    const second = handler({
      authorize: (_request, action) => {
        calls++;
        if (action === "subscribe") throw new HttpError(401, "who are you");
        return true;
      },
    });
    await call(second, "PUT", "src", { headers: text, body: "x" });
    await refused(
      await call(second, "PUT", "f", { headers: { "stream-forked-from": "/s/src" } }),
      404,
      "the source stream does not exist",
    );
    assert.equal(calls, 3);
    token = "";
  });
});

describe("streams.ts reads (GET)", () => {
  test("catch-up: the data from an offset, its next offset, up to date, an ETag and caching", async () => {
    const handle = handler();
    await call(handle, "PUT", "r", { headers: text, body: "hello" });
    await call(handle, "POST", "r", { headers: text, body: " world" });
    const all = await call(handle, "GET", "r");
    assert.equal(all.status, 200);
    assert.equal(await all.text(), "hello world");
    assert.equal(all.headers.get("content-type"), "text/plain");
    assert.equal(all.headers.get("stream-next-offset"), at(11));
    assert.equal(all.headers.get("stream-up-to-date"), "true");
    assert.equal(all.headers.get("stream-cursor"), null);
    assert.equal(all.headers.get("stream-closed"), null);
    assert.equal(
      all.headers.get("cache-control"),
      "private, max-age=60, stale-while-revalidate=300",
    );
    const etag = all.headers.get("etag")!;
    assert.match(etag, new RegExp(`^"[0-9a-f-]{36}:${at(0)}:${at(11)}"$`));
    const from = await call(handle, "GET", "r", { query: `?offset=${at(5)}` });
    assert.equal(await from.text(), " world");
    assert.equal(from.headers.get("etag"), etag.replace(at(0), at(5)));
    const same = await call(handle, "GET", "r", { query: "?offset=-1" });
    assert.equal(same.headers.get("etag"), etag);
    // At the tail: nothing, and nothing to cache.
    const tail = await call(handle, "GET", "r", { query: `?offset=${at(11)}` });
    assert.equal(await tail.text(), "");
    assert.equal(tail.headers.get("cache-control"), "no-store");
    assert.equal(tail.headers.get("stream-up-to-date"), "true");
  });

  test("If-None-Match with the ETag (in a list too) is 304 without a type; another tag 200", async () => {
    const handle = handler({ cacheControl: "public, max-age=5" });
    await call(handle, "PUT", "r", { headers: text, body: "abc" });
    const first = await call(handle, "GET", "r");
    assert.equal(first.headers.get("cache-control"), "public, max-age=5");
    const etag = first.headers.get("etag")!;
    const cached = await call(handle, "GET", "r", { headers: { "if-none-match": `"x", ${etag}` } });
    assert.equal(cached.status, 304);
    assert.equal(cached.headers.get("etag"), etag);
    assert.equal(cached.headers.get("content-type"), null);
    assert.equal(cached.headers.get("stream-next-offset"), at(3));
    const other = await call(handle, "GET", "r", { headers: { "if-none-match": `"x"` } });
    assert.equal(other.status, 200);
    // A closed stream read to its end has another tag, marked :c.
    await call(handle, "POST", "r", { headers: { "stream-closed": "true" } });
    const closed = await call(handle, "GET", "r", { headers: { "if-none-match": etag } });
    assert.equal(closed.status, 200);
    assert.equal(closed.headers.get("etag"), etag.replace(/"$/, ':c"'));
    assert.equal(closed.headers.get("stream-closed"), "true");
  });

  test("a read stops near maxReadBytes, at a whole append, and says it is not up to date", async () => {
    const handle = handler({ maxReadBytes: 4 });
    await call(handle, "PUT", "r", { headers: text, body: "abc" });
    await call(handle, "POST", "r", { headers: text, body: "def" });
    await call(handle, "POST", "r", { headers: text, body: "ghi" });
    const first = await call(handle, "GET", "r");
    const body = await first.text();
    assert.ok(body.length >= 3 && body.length < 9, body);
    assert.equal(first.headers.get("stream-up-to-date"), null);
    const next = first.headers.get("stream-next-offset")!;
    assert.equal(next, at(body.length));
    let rest = "";
    let offset = next;
    for (let i = 0; i < 5 && offset !== at(9); i++) {
      const more = await call(handle, "GET", "r", { query: `?offset=${offset}` });
      rest += await more.text();
      offset = more.headers.get("stream-next-offset")!;
    }
    assert.equal(body + rest, "abcdefghi");
  });

  test("bad queries: two offsets, an unknown live mode, live without offset, malformed or past the tail", async () => {
    const handle = handler();
    await call(handle, "PUT", "r", { headers: text, body: "abc" });
    const cases: [string, string][] = [
      [`?offset=-1&offset=${at(0)}`, "give one offset"],
      ["?offset=-1&live=poll", "live must be long-poll or sse"],
      ["?live=sse", "live=sse needs an offset"],
      ["?live=long-poll", "live=long-poll needs an offset"],
      ["?offset=3", "the offset is malformed"],
      [`?offset=${at(1)}x`, "the offset is malformed"],
      [`?offset=0000000000000001_${"0".repeat(16)}`, "the offset is malformed"],
      [`?offset=x${at(1)}`, "the offset is malformed"],
      ["?offset=0000000000000000_9999999999999999", "the offset is malformed"],
      [`?offset=${at(4)}`, "the offset is past the stream's tail"],
    ];
    for (const [query, error] of cases) {
      await refused(await call(handle, "GET", "r", { query }), 400, error);
    }
    await refused(await call(handle, "GET", "none"), 404, "no stream at this path");
  });

  test("offset=now: nothing, at the tail, up to date, never cached; [] for JSON", async () => {
    const handle = handler();
    await call(handle, "PUT", "r", { headers: text, body: "abc" });
    const now = await call(handle, "GET", "r", { query: "?offset=now" });
    assert.equal(now.status, 200);
    assert.equal(await now.text(), "");
    assert.equal(now.headers.get("content-type"), "text/plain");
    assert.equal(now.headers.get("stream-next-offset"), at(3));
    assert.equal(now.headers.get("stream-up-to-date"), "true");
    assert.equal(now.headers.get("cache-control"), "no-store");
    assert.equal(now.headers.get("stream-cursor"), null);
    assert.equal(now.headers.get("stream-closed"), null);
    await call(handle, "PUT", "j", { headers: json, body: "[1]" });
    assert.equal(await (await call(handle, "GET", "j", { query: "?offset=now" })).text(), "[]");
    // A closed stream: now with long-poll answers at once, closed.
    await call(handle, "POST", "r", { headers: { "stream-closed": "true" } });
    const closed = await call(handle, "GET", "r", { query: "?offset=now&live=long-poll" });
    assert.equal(closed.status, 204);
    assert.equal(closed.headers.get("stream-closed"), "true");
    assert.equal(closed.headers.get("stream-cursor"), null);
    assert.equal(closed.headers.get("content-type"), null);
    assert.equal(closed.headers.get("stream-next-offset"), at(3));
    const plain = await call(handle, "GET", "r", { query: "?offset=now" });
    assert.equal(plain.headers.get("stream-closed"), "true");
  });
});

describe("streams.ts long-poll", () => {
  test("waits for the next append and answers with it, a cursor and the new tail", async () => {
    const handle = handler();
    await call(handle, "PUT", "l", { headers: text, body: "old" });
    const waiting = call(handle, "GET", "l", { query: `?offset=${at(3)}&live=long-poll` });
    await call(handle, "POST", "l", { headers: text, body: "new" });
    const response = await waiting;
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "new");
    assert.equal(response.headers.get("stream-next-offset"), at(6));
    assert.equal(response.headers.get("stream-up-to-date"), "true");
    assert.match(response.headers.get("stream-cursor")!, /^[1-9]\d*$/);
  });

  test("offset=now with long-poll waits too, and a close ends the wait with 204 closed", async () => {
    const handle = handler();
    await call(handle, "PUT", "l", { headers: text, body: "old" });
    const now = call(handle, "GET", "l", { query: "?offset=now&live=long-poll" });
    await call(handle, "POST", "l", { headers: text, body: "!" });
    assert.equal(await (await now).text(), "!");
    const waiting = call(handle, "GET", "l", { query: `?offset=${at(4)}&live=long-poll` });
    await call(handle, "POST", "l", { headers: { "stream-closed": "true" } });
    const closed = await waiting;
    assert.equal(closed.status, 204);
    assert.equal(closed.headers.get("stream-closed"), "true");
    assert.equal(closed.headers.get("stream-cursor"), null);
    assert.equal(closed.headers.get("stream-next-offset"), at(4));
    // With data left to read, a long-poll answers at once.
    const behind = await call(handle, "GET", "l", { query: `?offset=${at(0)}&live=long-poll` });
    assert.equal(await behind.text(), "old!");
    assert.equal(behind.headers.get("stream-closed"), "true");
  });

  test("the cursor moves past the one the client sent, and is an interval count otherwise", async () => {
    const handle = handler({ longPollTimeout: 0 });
    await call(handle, "PUT", "l", { headers: text });
    const cursorOf = async (query: string) =>
      Number((await call(handle, "GET", "l", { query: `?offset=${at(0)}&live=long-poll${query}` }))
        .headers.get("stream-cursor"));
    const interval = Math.floor((Date.now() - Date.UTC(2024, 9, 9)) / 20_000);
    const plain = await cursorOf("");
    assert.ok(plain === interval || plain === interval + 1, `${plain} vs ${interval}`);
    assert.equal(await cursorOf("&cursor=5"), plain);
    assert.equal(await cursorOf("&cursor=x"), plain);
    const ahead = plain + 10;
    const moved = await cursorOf(`&cursor=${ahead}`);
    // One to 3600 seconds of jitter, in 20-second intervals.
    assert.ok(moved >= ahead + 1 && moved <= ahead + 180, `${moved} after ${ahead}`);
  });

  test("a long-poll on a stream deleted meanwhile answers 404", async () => {
    const handle = handler();
    await call(handle, "PUT", "l", { headers: text });
    const waiting = call(handle, "GET", "l", { query: `?offset=${at(0)}&live=long-poll` });
    await call(handle, "DELETE", "l");
    await refused(await waiting, 404, "no stream at this path");
  });
});

describe("streams.ts SSE", () => {
  test("data then control events, exact; the headers of an event stream", async () => {
    const handle = handler();
    await call(handle, "PUT", "e", { headers: text, body: "line 1\nline 2\r\nline 3" });
    const response = await call(handle, "GET", "e", { query: "?offset=-1&live=sse" });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.equal(response.headers.get("cache-control"), "no-cache, no-store, no-transform");
    assert.equal(response.headers.get("x-accel-buffering"), "no");
    assert.equal(response.headers.get("stream-sse-data-encoding"), null);
    const received = await sseUntil(response, '"upToDate":true');
    const cursor = /"streamCursor":"(\d+)"/.exec(received)![1];
    assert.equal(
      received,
      "event: data\ndata:line 1\ndata:line 2\ndata:line 3\n\n" +
        `event: control\ndata:{"streamNextOffset":"${
          at(21)
        }","streamCursor":"${cursor}","upToDate":true}\n\n`,
    );
  });

  test("at the tail, one control event first; then each append as it comes", async () => {
    const handle = handler();
    await call(handle, "PUT", "e", { headers: text, body: "old" });
    const response = await call(handle, "GET", "e", { query: "?offset=now&live=sse" });
    const reader = response.body!.getReader();
    const decoder = new TextDecoder();
    const next = async () => decoder.decode((await reader.read()).value);
    assert.match(
      await next(),
      new RegExp(`^event: control\ndata:\\{"streamNextOffset":"${at(3)}"`),
    );
    await call(handle, "POST", "e", { headers: text, body: "new" });
    let received = "";
    while (!received.includes("control")) received += await next();
    assert.match(received, /^event: data\ndata:new\n\nevent: control\n/);
    assert.match(received, new RegExp(`"streamNextOffset":"${at(6)}"`));
    await reader.cancel();
  });

  test("a closed stream ends the body after its last control event, which says closed", async () => {
    const handle = handler();
    await call(handle, "PUT", "e", { headers: { ...text, "stream-closed": "true" }, body: "bye" });
    const all = await sseAll(await call(handle, "GET", "e", { query: "?offset=-1&live=sse" }));
    assert.equal(
      all,
      "event: data\ndata:bye\n\n" +
        `event: control\ndata:{"streamNextOffset":"${
          at(3)
        }","streamClosed":true,"upToDate":true}\n\n`,
    );
    const atEnd = await sseAll(
      await call(handle, "GET", "e", { query: `?offset=${at(3)}&live=sse` }),
    );
    assert.equal(
      atEnd,
      `event: control\ndata:{"streamNextOffset":"${
        at(3)
      }","streamClosed":true,"upToDate":true}\n\n`,
    );
    // Closed while a reader waits: it hears the close and its body ends.
    await call(handle, "PUT", "w", { headers: text });
    const waiting = call(handle, "GET", "w", { query: `?offset=${at(0)}&live=sse` });
    const reader = (await waiting).body!.getReader();
    await reader.read(); // the first control event
    await call(handle, "POST", "w", { headers: { ...text, "stream-closed": "true" }, body: "!" });
    let rest = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      rest += new TextDecoder().decode(value);
    }
    assert.match(rest, /^event: data\ndata:!\n\nevent: control\ndata:\{[^}]*"streamClosed":true/);
  });

  test("binary types are base64 in lines of 76, with Stream-SSE-Data-Encoding", async () => {
    const handle = handler();
    const bytes = new Uint8Array(100).map((_, i) => i * 7);
    await call(handle, "PUT", "b", {
      headers: { "content-type": "application/octet-stream" },
      body: bytes,
    });
    const response = await call(handle, "GET", "b", { query: "?offset=-1&live=sse" });
    assert.equal(response.headers.get("stream-sse-data-encoding"), "base64");
    const received = await sseUntil(response, "event: control");
    const lines = received.split("\n\n")[0].split("\n");
    assert.equal(lines[0], "event: data");
    assert.equal(lines[1].length, 5 + 76);
    const decoded = atob(lines.slice(1).map((line) => line.slice(5)).join(""));
    assert.deepEqual(Uint8Array.from(decoded, (c) => c.charCodeAt(0)), bytes);
  });

  test("JSON messages arrive as one array per read; text/* and application/json are text", async () => {
    const handle = handler();
    await call(handle, "PUT", "j", { headers: json, body: '[{"a": 1}, 2]' });
    await call(handle, "POST", "j", { headers: json, body: '"three"' });
    const response = await call(handle, "GET", "j", { query: "?offset=-1&live=sse" });
    assert.equal(response.headers.get("stream-sse-data-encoding"), null);
    const received = await sseUntil(response, "event: control");
    assert.match(received, /^event: data\ndata:\[\{"a":1\},2,"three"\]\n\n/);
    await call(handle, "PUT", "h", { headers: { "content-type": "Text/HTML" }, body: "<p>" });
    const html = await call(handle, "GET", "h", { query: "?offset=-1&live=sse" });
    assert.equal(html.headers.get("stream-sse-data-encoding"), null);
    assert.match(await sseUntil(html, "event: control"), /^event: data\ndata:<p>\n\n/);
  });

  test("a reader of a stream deleted meanwhile is ended", async () => {
    const handle = handler();
    await call(handle, "PUT", "d", { headers: text });
    const response = await call(handle, "GET", "d", { query: `?offset=${at(0)}&live=sse` });
    const reader = response.body!.getReader();
    await reader.read();
    await call(handle, "DELETE", "d");
    assert.equal((await reader.read()).done, true);
  });

  test("a store failing under an SSE reader ends its body; the client resumes from its offset", async () => {
    const store = new MemoryStreamStore();
    const handle = handler({ store });
    await call(handle, "PUT", "f", { headers: text, body: "a" });
    const response = await call(handle, "GET", "f", { query: "?offset=-1&live=sse" });
    const reader = response.body!.getReader();
    await reader.read();
    store.read = () => Promise.reject(new Error("down"));
    // At the tail, the follower reads the next append for it, and fails.
    assert.equal((await call(handle, "POST", "f", { headers: text, body: "b" })).status, 204);
    for (;;) if ((await reader.read()).done) break;
  });
});

describe("streams.ts live budget and grants", () => {
  test("admit refuses live reads with 503 and Retry-After 5, releases each place once", async () => {
    let open = 0;
    let released = 0;
    const handle = handler({
      longPollTimeout: 50,
      admit: () => {
        if (open >= 1) return undefined;
        open++;
        return () => {
          open--;
          released++;
        };
      },
    });
    await call(handle, "PUT", "a", { headers: text, body: "x" });
    // A catch-up read and one with data do not hold a place.
    assert.equal((await call(handle, "GET", "a")).status, 200);
    assert.equal(
      (await call(handle, "GET", "a", { query: "?offset=-1&live=long-poll" })).status,
      200,
    );
    assert.equal(released, 0);
    const sse = await call(handle, "GET", "a", { query: "?offset=-1&live=sse" });
    const busy = await call(handle, "GET", "a", { query: `?offset=${at(1)}&live=long-poll` });
    assert.equal(busy.headers.get("retry-after"), "5");
    await refused(busy, 503, "too many open streams: try again");
    await refused(
      await call(handle, "GET", "a", { query: "?offset=-1&live=sse" }),
      503,
      "too many open streams: try again",
    );
    await sse.body!.cancel();
    assert.equal(released, 1);
    const polled = await call(handle, "GET", "a", { query: `?offset=${at(1)}&live=long-poll` });
    assert.equal(polled.status, 204);
    assert.equal(released, 2);
    assert.equal(open, 0);
  });

  test("live reads end when the grants expire", async () => {
    const handle = handler({
      longPollTimeout: 60_000,
      sseMaxDuration: 60_000,
      authorize: () => ({ subscribe: ["*"], publish: ["*"], expires: Date.now() + 150 }),
    });
    await call(handle, "PUT", "g", { headers: text });
    const started = Date.now();
    const polled = await call(handle, "GET", "g", { query: `?offset=${at(0)}&live=long-poll` });
    assert.equal(polled.status, 204);
    const sse = await call(handle, "GET", "g", { query: `?offset=${at(0)}&live=sse` });
    await sseAll(sse);
    assert.ok(Date.now() - started < 5000);
  });

  test("each method asks for its action and a grant matching the stream's name", async () => {
    const asked: string[] = [];
    const handle = handler({
      authorize: (_request, action) => {
        asked.push(action);
        return { subscribe: ["public/*"], publish: ["mine/*"] };
      },
    });
    assert.equal((await call(handle, "PUT", "mine/a", { headers: text, body: "x" })).status, 201);
    await refused(
      await call(handle, "PUT", "public/a", { headers: text }),
      403,
      'no publish grant for "public/a"',
    );
    await refused(await call(handle, "GET", "mine/a"), 403, 'no subscribe grant for "mine/a"');
    await refused(await call(handle, "HEAD", "mine/a"), 403, 'no subscribe grant for "mine/a"');
    await refused(
      await call(handle, "POST", "public/b", { headers: text, body: "x" }),
      403,
      'no publish grant for "public/b"',
    );
    await refused(await call(handle, "DELETE", "other"), 403, 'no publish grant for "other"');
    assert.deepEqual(asked, ["publish", "publish", "subscribe", "subscribe", "publish", "publish"]);
    const denied = handler({ authorize: () => false });
    const response = await call(denied, "GET", "x");
    assert.equal(response.headers.get("www-authenticate"), 'Bearer realm="sse"');
    await refused(response, 401, "a valid token is required");
    const noGrants = handler({ authorize: () => ({}) as Grants });
    await refused(await call(noGrants, "GET", "x"), 403, 'no subscribe grant for "x"');
  });

  test("an authorize that throws something else is a 500 that says nothing; the logger has it", async () => {
    const lines: string[] = [];
    const handle = handler({
      authorize: () => {
        throw new Error("secret detail");
      },
      logger: (line) => lines.push(line),
    });
    const response = await call(handle, "GET", "x");
    await refused(response, 500, "internal error");
    assert.deepEqual(lines, ["stream request failed: secret detail"]);
  });
});

describe("streams.ts paths, methods and CORS", () => {
  test(". and .. segments are 400; OPTIONS answers the preflight; other methods 405", async () => {
    // URLs resolve dot segments before a handler sees them; a prefix
    // without its slash still leaves one to refuse.
    const bare = createStreamsHandler({ prefix: "/s" });
    for (const path of ["/s..", "/s../x", "/s./x"]) {
      await refused(
        await bare(new Request("http://streams.test" + path)),
        400,
        "a stream path has no . or .. segments",
      );
    }
    const handle = handler();
    const preflight = await call(handle, "OPTIONS", "a");
    assert.equal(preflight.status, 204);
    assert.equal(
      preflight.headers.get("access-control-allow-methods"),
      "GET, HEAD, PUT, POST, DELETE, OPTIONS",
    );
    assert.equal(
      preflight.headers.get("access-control-allow-headers"),
      "Content-Type, Authorization, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Seq, " +
        "Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, " +
        "Producer-Id, Producer-Epoch, Producer-Seq",
    );
    assert.equal(preflight.headers.get("access-control-max-age"), "86400");
    const patch = await call(handle, "PATCH", "a");
    assert.equal(patch.headers.get("allow"), "GET, HEAD, PUT, POST, DELETE, OPTIONS");
    await refused(patch, 405, "use GET, HEAD, PUT, POST or DELETE");
  });

  test("CORS: * by default; a listed origin echoed exactly, with Vary; others get none", async () => {
    const open = handler();
    const any = await call(open, "GET", "none", { headers: { origin: "https://a.example" } });
    assert.equal(any.headers.get("access-control-allow-origin"), "*");
    assert.equal(any.headers.get("vary"), null);
    assert.equal(
      any.headers.get("access-control-expose-headers"),
      "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, " +
        "Stream-Expires-At, Stream-SSE-Data-Encoding, Producer-Epoch, Producer-Seq, " +
        "Producer-Expected-Seq, Producer-Received-Seq, ETag, Location, Content-Type, Retry-After",
    );
    const listed = handler({ allowOrigin: ["https://a.example"] });
    const allowed = await call(listed, "GET", "none", { headers: { origin: "https://a.example" } });
    assert.equal(allowed.headers.get("access-control-allow-origin"), "https://a.example");
    assert.equal(allowed.headers.get("vary"), "origin");
    for (const origin of ["https://a.example.evil", "https://b.example", "a.example"]) {
      const other = await call(listed, "GET", "none", { headers: { origin } });
      assert.equal(other.headers.get("access-control-allow-origin"), null);
      assert.equal(other.headers.get("vary"), "origin");
    }
    const lone = handler({ allowOrigin: "https://a.example" as unknown as string[] });
    const single = await call(lone, "GET", "none", { headers: { origin: "https://a.example" } });
    assert.equal(single.headers.get("access-control-allow-origin"), "https://a.example");
    const letter = await call(lone, "GET", "none", { headers: { origin: "a" } });
    assert.equal(letter.headers.get("access-control-allow-origin"), null);
  });

  test("options are checked where they enter, by name", () => {
    for (
      const name of [
        "maxBodyBytes",
        "bodyTimeout",
        "maxMessages",
        "maxReadBytes",
        "longPollTimeout",
        "sseMaxDuration",
      ]
    ) {
      assert.throws(() => handler({ [name]: -1 }), {
        name: "RangeError",
        message: new RegExp(`^${name} `),
      });
      assert.throws(() => handler({ [name]: 1.5 }), new RegExp(name));
    }
    for (const name of ["maxStreams", "maxStreamBytes", "maxBytes", "maxProducers"]) {
      assert.throws(
        () => new MemoryStreamStore({ [name]: -1 }),
        new RegExp(`^RangeError: ${name} `),
      );
    }
  });
});

/**
 * Random JSON as tokens, so that the compact form (tokens joined) is known
 * beside the spaced one (tokens with random whitespace between).
 */
function randomJson(random: () => number, depth: number): string[] {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
  const string = () =>
    JSON.stringify(
      Array.from(
        { length: Math.floor(random() * 4) },
        () => pick(["a", "é", "✓", "😀", '"', "\\", "\n", "/", "\u0001", "\u2028"]),
      ).join(""),
    ).replace(/\\n/, random() < 0.5 ? "\\n" : "\\u000a");
  const kind = depth > 3 ? Math.floor(random() * 4) : Math.floor(random() * 6);
  switch (kind) {
    case 0:
      return [pick(["0", "-0", "12", "-3.25", "1e5", "2E-3", "0.5e+2", "123456789012345678901"])];
    case 1:
      return [string()];
    case 2:
      return [pick(["true", "false", "null"])];
    case 3:
      return [string()];
    case 4: {
      const items = Array.from(
        { length: Math.floor(random() * 4) },
        () => randomJson(random, depth + 1),
      );
      return ["[", ...items.flatMap((item, i) => i === 0 ? item : [",", ...item]), "]"];
    }
    default: {
      const members = Array.from(
        { length: Math.floor(random() * 4) },
        () => [string(), ":", ...randomJson(random, depth + 1)],
      );
      return ["{", ...members.flatMap((member, i) => i === 0 ? member : [",", ...member]), "}"];
    }
  }
}

describe("streams.ts JSON streams", () => {
  test("messages are stored compact, one per array element, and read back as one array", async () => {
    const handle = handler();
    await call(handle, "PUT", "j", { headers: json, body: ' [ {"a" : [1, 2 ] } ,\n"x" ] ' });
    assert.equal(await (await call(handle, "GET", "j")).text(), '[{"a":[1,2]},"x"]');
    const appended = await call(handle, "POST", "j", { headers: json, body: "\t7\r\n" });
    assert.equal(appended.headers.get("stream-next-offset"), at(3));
    assert.equal(await (await call(handle, "GET", "j")).text(), '[{"a":[1,2]},"x",7]');
    assert.equal(
      await (await call(handle, "GET", "j", { query: `?offset=${at(1)}` })).text(),
      '["x",7]',
    );
    // An empty array creates an empty stream, and appends nothing.
    const empty = await call(handle, "PUT", "k", { headers: json, body: "[ ]" });
    assert.equal(empty.headers.get("stream-next-offset"), at(0));
    assert.equal(await (await call(handle, "GET", "k")).text(), "[]");
    await refused(
      await call(handle, "POST", "k", { headers: json, body: "[]" }),
      400,
      "an empty JSON array appends nothing",
    );
    // A JSON body to a text stream is another type.
    await call(handle, "PUT", "t", { headers: text });
    await refused(
      await call(handle, "POST", "t", { headers: json, body: "1" }),
      409,
      "the content type differs from the stream's",
    );
  });

  test("at most maxMessages per request (413), and 1000 levels of nesting (400)", async () => {
    const handle = handler({ maxMessages: 3 });
    await call(handle, "PUT", "j", { headers: json });
    assert.equal((await call(handle, "POST", "j", { headers: json, body: "[1,2,3]" })).status, 204);
    await refused(
      await call(handle, "POST", "j", { headers: json, body: "[1,2,3,4]" }),
      413,
      "a request carries at most 3 JSON messages",
    );
    await refused(
      await call(handle, "PUT", "k", { headers: json, body: "[1,2,3,4]" }),
      413,
      "a request carries at most 3 JSON messages",
    );
    const nested = (depth: number) => "[".repeat(depth) + "]".repeat(depth);
    assert.equal(
      (await call(handle, "POST", "j", { headers: json, body: nested(1001) })).status,
      204,
    );
    await refused(
      await call(handle, "POST", "j", { headers: json, body: nested(1002) }),
      400,
      "JSON nests at most 1000 levels deep",
    );
    const objects = (depth: number) => '{"a":'.repeat(depth) + "1" + "}".repeat(depth);
    assert.equal(
      (await call(handle, "POST", "j", { headers: json, body: objects(1000) })).status,
      204,
    );
    await refused(
      await call(handle, "POST", "j", { headers: json, body: objects(1001) }),
      400,
      "JSON nests at most 1000 levels deep",
    );
  });

  test("accepted exactly when JSON.parse accepts the UTF-8 text, and read back compact (2000 bodies)", async () => {
    const random = seededRandom(2026);
    const handle = handler();
    const fatal = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
    const space = () => ["", " ", "\n", "\t", "\r", "  "][Math.floor(random() * 6)];
    const noise = [
      0x2c,
      0x5d,
      0x7d,
      0x5b,
      0x7b,
      0x22,
      0x5c,
      0x3a,
      0x30,
      0x2d,
      0x2e,
      0x65,
      0x2b,
      0x74,
      0x75,
      0x0b,
      0x0c,
      0x00,
      0x1f,
      0x7f,
      0x80,
      0xbf,
      0xc0,
      0xc1,
      0xc2,
      0xe0,
      0xed,
      0xa0,
      0xf0,
      0xf4,
      0x8f,
      0x90,
      0xf5,
      0xff,
      0xef,
      0xbb,
    ];
    let accepted = 0;
    let refusedCount = 0;
    for (let n = 0; n < 2000; n++) {
      const array = random() < 0.6;
      const values = array
        ? Array.from({ length: Math.floor(random() * 4) }, () => randomJson(random, 1))
        : [randomJson(random, 0)];
      const spaced = (tokens: string[]) =>
        tokens.map((token) => space() + token).join("") + space();
      const source = array
        ? space() + "[" + values.map(spaced).join(",") + "]" + space()
        : spaced(values[0]);
      let bytes = new TextEncoder().encode(source);
      if (random() < 0.5) {
        // One random byte replaced, inserted or removed.
        const edited = [...bytes];
        const where = Math.floor(random() * (edited.length + 1));
        const byte = noise[Math.floor(random() * noise.length)];
        const how = Math.floor(random() * 3);
        if (how === 0) edited.splice(where, 1, byte);
        else if (how === 1) edited.splice(where, 0, byte);
        else edited.splice(where, 1);
        bytes = new Uint8Array(edited);
      }
      let expected: unknown[] | undefined;
      try {
        const parsed = JSON.parse(fatal.decode(bytes));
        expected = Array.isArray(parsed) && bytes.some((b) =>
            b !== 0x20 && b !== 0x0a && b !== 0x09 && b !== 0x0d
          ) &&
            new TextDecoder().decode(bytes).trim().startsWith("[")
          ? parsed
          : [parsed];
      } catch {
        expected = undefined;
      }
      const name = `r${n}`;
      const created = await call(handle, "PUT", name, { headers: json, body: bytes });
      if (expected === undefined) {
        await refused(created, 400, "the body is not valid JSON");
        refusedCount++;
        continue;
      }
      assert.equal(created.status, 201, new TextDecoder().decode(bytes));
      accepted++;
      const read = await (await call(handle, "GET", name)).text();
      assert.deepEqual(JSON.parse(read), expected);
      if (bytes.length === source.length && new TextDecoder().decode(bytes) === source) {
        // A body that is an array is its elements; any other value is one message.
        const compact = array
          ? "[" + values.map((tokens) => tokens.join("")).join(",") + "]"
          : values[0][0] === "["
          ? values[0].join("")
          : "[" + values[0].join("") + "]";
        assert.equal(read, compact);
      }
      await call(handle, "DELETE", name);
    }
    // Both sides are well represented.
    assert.ok(
      accepted > 800 && refusedCount > 300,
      `${accepted} accepted, ${refusedCount} refused`,
    );
  });
});

describe("streams.ts details", () => {
  test("Stream-Cursor: the current interval, or past the client's with jitter when it has caught up", async () => {
    const handle = handler({ longPollTimeout: 10 });
    await call(handle, "PUT", "c", { headers: text, body: "x" });
    const cursorOf = async (given?: string) => {
      const query = `?offset=now&live=long-poll${given === undefined ? "" : `&cursor=${given}`}`;
      const response = await call(handle, "GET", "c", { query });
      await response.body?.cancel();
      return Number(response.headers.get("stream-cursor"));
    };
    const now = await cursorOf();
    assert.ok(Number.isSafeInteger(now) && now > 0);
    assert.equal(await cursorOf("abc"), now);
    assert.equal(await cursorOf(String(now - 1)), now);
    for (let i = 0; i < 20; i++) {
      const next = await cursorOf(String(now));
      // 1 s to an hour of jitter, in 20-second intervals: 1 to 180 ahead.
      assert.ok(next > now && next <= now + 180, `${next - now} ahead`);
    }
    const ahead = await cursorOf(String(now + 1000));
    assert.ok(ahead > now + 1000 && ahead <= now + 1180);
  });

  test("a long-poll waits for data appended after it started, and answers it", async () => {
    const handle = handler({ longPollTimeout: 5000 });
    await call(handle, "PUT", "lp", { headers: text, body: "a" });
    const started = Date.now();
    const polling = call(handle, "GET", "lp", { query: `?offset=${at(1)}&live=long-poll` });
    await new Promise((resolve) => setTimeout(resolve, 30));
    await call(handle, "POST", "lp", { headers: text, body: "bc" });
    const answer = await polling;
    assert.equal(answer.status, 200);
    assert.equal(await answer.text(), "bc");
    assert.equal(answer.headers.get("stream-next-offset"), at(3));
    assert.ok(Date.now() - started < 2000, "answered on the append, not at its timeout");
  });

  test("offset=now: the tail and nothing else; a closed stream's long-poll answers at once", async () => {
    const handle = handler({ longPollTimeout: 5000 });
    await call(handle, "PUT", "n", { headers: text, body: "abc" });
    const now = await call(handle, "GET", "n", { query: "?offset=now" });
    assert.equal(now.status, 200);
    assert.equal(await now.text(), "");
    assert.equal(now.headers.get("stream-next-offset"), at(3));
    assert.equal(now.headers.get("stream-up-to-date"), "true");
    await call(handle, "PUT", "nj", { headers: json, body: "[1,2]" });
    const nowJson = await call(handle, "GET", "nj", { query: "?offset=now" });
    assert.equal(await nowJson.text(), "[]");
    await call(handle, "POST", "n", { headers: { "stream-closed": "true" } });
    const started = Date.now();
    const closed = await call(handle, "GET", "n", { query: "?offset=now&live=long-poll" });
    assert.equal(closed.status, 204);
    assert.equal(closed.headers.get("stream-closed"), "true");
    assert.equal(closed.headers.get("cache-control"), "no-store");
    assert.ok(Date.now() - started < 1000);
  });

  test("a Content-Type is trimmed and compared by its media type alone", async () => {
    const handle = handler();
    const created = await call(handle, "PUT", "t", {
      headers: { "content-type": "  Text/Plain; charset=utf-8  " },
    });
    assert.equal(created.status, 201);
    assert.equal(created.headers.get("content-type"), "Text/Plain; charset=utf-8");
    const appended = await call(handle, "POST", "t", {
      headers: { "content-type": "text/plain " },
      body: "x",
    });
    assert.equal(appended.status, 204);
    // Blank: the default type, as if not given.
    const blank = await call(handle, "PUT", "b", { headers: { "content-type": "   " } });
    assert.equal(blank.headers.get("content-type"), "application/octet-stream");
    const again = await call(handle, "PUT", "b", {
      headers: { "content-type": "application/octet-stream" },
    });
    assert.equal(again.status, 200, "the same configuration");
  });

  test("Stream-Expires-At must be a whole RFC 3339 time", async () => {
    const handle = handler();
    const expires = (value: string) =>
      call(handle, "PUT", `e${value.length}${value.at(-1)}`, {
        headers: { "stream-expires-at": value },
      });
    for (const good of ["2030-01-01T00:00:00Z", "2030-01-01 00:00:00.123+01:00"]) {
      assert.equal((await expires(good)).status, 201, good);
    }
    for (
      const bad of [
        "2030-01-01T00:00:00Z junk",
        "x2030-01-01T00:00:00Z",
        "2030-01-01T00:00:00",
        "2030-01-01T00:00:00.Z",
        "2030-01-01T00:00:00Y",
      ]
    ) {
      const response = await expires(bad);
      assert.equal(response.status, 400, bad);
      await response.body?.cancel();
    }
  });

  test("paths: the prefix itself, outside it, too long; the default prefix is /", async () => {
    const handle = handler();
    await refused(
      await handle(new Request("http://streams.test/s/")),
      404,
      "no stream at this path",
    );
    await refused(
      await handle(new Request("http://streams.test/other")),
      404,
      "no stream at this path",
    );
    const longest = "x".repeat(1024 - PREFIX.length);
    assert.equal((await call(handle, "PUT", longest)).status, 201);
    await refused(
      await call(handle, "PUT", `${longest}y`),
      414,
      "a stream path has at most 1024 characters",
    );
    const open = createStreamsHandler();
    const created = await open(new Request("http://streams.test/top", { method: "PUT" }));
    assert.equal(created.status, 201);
    assert.equal(created.headers.get("location"), "/top");
  });

  test("every answer may be read across origins, never framed or sniffed", async () => {
    const response = await call(handler(), "GET", "missing");
    assert.equal(response.headers.get("cross-origin-resource-policy"), "cross-origin");
    await response.body?.cancel();
  });

  test("Producer-Id, Producer-Epoch and Producer-Seq come together", async () => {
    const handle = handler();
    await call(handle, "PUT", "p", { headers: text });
    const all = { "producer-id": "w", "producer-epoch": "0", "producer-seq": "0" };
    for (const missing of Object.keys(all)) {
      const headers: Record<string, string> = { ...text, ...all };
      delete headers[missing];
      const response = await call(handle, "POST", "p", { headers, body: "x" });
      assert.equal(response.status, 400, missing);
      await response.body?.cancel();
    }
    assert.equal(
      (await call(handle, "POST", "p", { headers: { ...text, ...all }, body: "x" })).status,
      200,
    );
  });

  test("a store that fails answers 503 and is said once, without a logger too", async () => {
    let failing = true;
    const memory = new MemoryStreamStore();
    const store = new Proxy(memory, {
      get(target, name) {
        const value = Reflect.get(target, name);
        if (typeof value !== "function") return value;
        return (...args: unknown[]) =>
          failing ? Promise.reject(new Error("disk on fire")) : value.apply(target, args);
      },
    });
    const lines: string[] = [];
    for (const logger of [(line: string) => lines.push(line), undefined]) {
      failing = true;
      const handle = handler({ store, logger });
      for (let i = 0; i < 2; i++) {
        const response = await call(handle, "PUT", "f", { headers: text });
        assert.equal(response.status, 503);
        await response.body?.cancel();
      }
      failing = false;
      assert.equal((await call(handle, "PUT", `f${lines.length}`, { headers: text })).status, 201);
    }
    assert.deepEqual(lines, [
      "stream store failed: disk on fire",
      "stream store: answering again",
    ]);
  });
});

describe("streams.ts fork sources", () => {
  test("a source outside the prefix, or with dot segments, is missing even when the store holds it", async () => {
    const store = new MemoryStreamStore();
    const other = createStreamsHandler({ prefix: "/b/", store });
    await other(new Request("http://x/b/secret", { method: "PUT", headers: text, body: "s" }));
    await store.create("/s/../x", {
      contentType: "text/plain",
      framing: "bytes",
      closed: false,
      records: [new TextEncoder().encode("hidden")],
      contentTypeGiven: true,
    });
    const handle = handler({ store });
    for (const from of ["/b/secret", "/s/../x"]) {
      await refused(
        await call(handle, "PUT", "fork", { headers: { "stream-forked-from": from } }),
        404,
        "the source stream does not exist",
      );
    }
  });

  test("a source the request may not read is missing; an authorize that fails is an error", async () => {
    const handle = handler({
      authorize: (request, action) => {
        const token = request.headers.get("authorization");
        if (token === "Bearer broken" && action === "subscribe") throw new Error("bug");
        // p and broken may publish (create) only, s only read.
        return action === "publish"
          ? token === "Bearer p" || token === "Bearer broken"
          : token === "Bearer s";
      },
    });
    await call(handle, "PUT", "src", { headers: { ...text, authorization: "Bearer p" } });
    await refused(
      await call(handle, "PUT", "fork", {
        headers: { authorization: "Bearer p", "stream-forked-from": "/s/src" },
      }),
      404,
      "the source stream does not exist",
    );
    const failing = await call(handle, "PUT", "fork", {
      headers: { authorization: "Bearer broken", "stream-forked-from": "/s/src" },
    });
    assert.equal(failing.status, 500);
    await failing.body?.cancel();
  });
});

describe("streams.ts SSE events", () => {
  test("each append: one data event and one control event, in that order, and nothing between", async () => {
    const handle = handler();
    await call(handle, "PUT", "ev", { headers: text, body: "a" });
    const response = await call(handle, "GET", "ev", { query: "?offset=-1&live=sse" });
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let received = "";
    const events = () => [...received.matchAll(/^event: (\w+)$/gm)].map((match) => match[1]);
    const until = async (count: number) => {
      while (events().length < count) received += (await reader.read()).value ?? "";
    };
    await until(2);
    await call(handle, "POST", "ev", { headers: text, body: "b" });
    await until(4);
    await call(handle, "POST", "ev", { headers: { "stream-closed": "true" } });
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      received += value;
    }
    assert.deepEqual(events(), ["data", "control", "data", "control", "control"]);
    assert.match(received, /"streamClosed":true/);
  });
});
