// Runs unchanged under `deno test` and `bun test` (node:test, node:assert).
import { describe, test, track } from "./test/harness.ts";
import assert from "node:assert/strict";
import {
  type Appended,
  type Authorize,
  type BatchEntry,
  Broker,
  createHandler,
  encodeMessage,
  type EventLog,
  EventLogError,
  IdempotencyKeyError,
  jwtAuth,
  jwtVerifier,
  type LogEvent,
  type LogRead,
  MemoryLog,
  MessageError,
  METRICS_CONTENT_TYPE,
  metricsText,
  type NewEvent,
  type RejectionReason,
  selectorsMatch,
  type ServerSentEventMessage,
  ServerSentEventStream,
  type SubscribeOptions,
  tokenAuth,
  TokenError,
} from "./mod.ts";
import * as jose from "jose";
import { spawn } from "node:child_process";
import process from "node:process";
import {
  compareIds,
  EventReader,
  eventually,
  parseAll,
  RUNTIME,
  seededRandom,
  type SseEvent,
} from "./test/helpers.ts";

const text = (message: ServerSentEventMessage) => new TextDecoder().decode(encodeMessage(message));

describe("encodeMessage", () => {
  test("writes each field on its own line and ends with a blank line", () => {
    assert.equal(
      text({ comment: "hi", event: "e", id: "7", retry: 1500, data: "d" }),
      ": hi\nevent: e\nid: 7\nretry: 1500\ndata: d\n\n",
    );
  });

  test("splits data on CRLF, CR and LF into data: lines", () => {
    assert.equal(text({ data: "a\r\nb\rc\nd" }), "data: a\ndata: b\ndata: c\ndata: d\n\n");
  });

  test("writes a comment with line breaks as several : lines", () => {
    assert.equal(text({ comment: "one\ntwo" }), ": one\n: two\n\n");
  });

  test("empty data is still an event; no fields is a bare blank line", () => {
    const { items } = parseAll(encodeMessage({ data: "" }));
    assert.deepEqual(items, [{ type: "event", event: "message", data: "", lastEventId: "" }]);
    assert.equal(text({}), "\n");
  });

  test("a parser reads back exactly what was encoded", () => {
    const tricky = [
      " leading space",
      "  two spaces",
      "trailing\n",
      "\n\nblank lines\n\n",
      "colon: inside",
      ":starts with colon",
      "data: looks like a field",
      "unicode é 漢字 🎉",
      "\r\n\r\r\n",
      "id: 1\nevent: injected",
    ];
    for (const data of tricky) {
      const { items } = parseAll(encodeMessage({ event: "x", id: "i", data }));
      assert.deepEqual(items, [{
        type: "event",
        event: "x",
        data: data.replace(/\r\n|\r/g, "\n"),
        lastEventId: "i",
      }], JSON.stringify(data));
    }
  });

  test("random strings round-trip through the parser", () => {
    const alphabet = ["a", " ", ":", "\r", "\n", "\r\n", "é", "\u2028", "\uFEFF", "\0", "🎉"];
    const random = seededRandom(42);
    for (let i = 0; i < 500; i++) {
      let data = "";
      for (let n = Math.floor(random() * 20); n > 0; n--) {
        data += alphabet[Math.floor(random() * alphabet.length)];
      }
      const { items } = parseAll(encodeMessage({ data }));
      assert.equal(items.length, 1, JSON.stringify(data));
      assert.equal((items[0] as SseEvent).data, data.replace(/\r\n|\r/g, "\n"));
    }
  });

  test("writes UTF-8", () => {
    assert.deepEqual([...encodeMessage({ data: "é" })], [
      ...new TextEncoder().encode("data: é\n\n"),
    ]);
  });

  test("a numeric id is written as an integer", () => {
    assert.equal(text({ id: 42 }), "id: 42\n\n");
  });

  test("a retry of 0 is written: reconnect at once", () => {
    assert.equal(text({ retry: 0 }), "retry: 0\n\n");
  });

  const refused: [unknown, string][] = [
    [null, "message must be an object"],
    ["data", "message must be an object"],
    [{ event: "a\nb" }, "event must not contain a line break"],
    [{ event: "a\rb" }, "event must not contain a line break"],
    [{ event: 5 }, "event must be a string"],
    [{ id: "1\n" }, "id must not contain a line break"],
    [{ id: "1\r2" }, "id must not contain a line break"],
    [{ id: "a\0b" }, "id must not contain NUL"],
    [{ id: 1.5 }, "id must be an integer"],
    [{ id: {} }, "id must be a string"],
    [{ retry: -1 }, "retry must be a non-negative integer"],
    [{ retry: 1.5 }, "retry must be a non-negative integer"],
    [{ retry: NaN }, "retry must be a non-negative integer"],
    [{ retry: "5" }, "retry must be a non-negative integer"],
    [{ data: 5 }, "data must be a string"],
    [{ comment: {} }, "comment must be a string"],
  ];
  for (const [message, reason] of refused) {
    const field = reason.split(" ")[0];
    test(`refuses ${JSON.stringify(message)}: ${reason}`, () => {
      assert.throws(() => encodeMessage(message as ServerSentEventMessage), (error) => {
        assert.ok(error instanceof MessageError);
        assert.equal(error.name, "MessageError");
        assert.equal(error.field, field);
        assert.equal(error.message, reason);
        return true;
      });
    });
  }
});

test("ServerSentEventStream encodes a stream of messages", async () => {
  const body = ReadableStream.from<ServerSentEventMessage>([{ data: "one" }, {
    event: "e",
    data: "two",
  }])
    .pipeThrough(new ServerSentEventStream());
  const events = await new EventReader(body).events(2);
  assert.deepEqual(events.map((e) => [e.event, e.data]), [["message", "one"], ["e", "two"]]);
});

/** Subscribes in process, without a server. */
function open(broker: Broker, query = "", init?: RequestInit) {
  const response = broker.subscribe(new Request(`http://localhost/events${query}`, init));
  assert.equal(response.status, 200);
  return new EventReader(response.body!);
}

describe("Broker", () => {
  test("answers with event stream headers and sends retry: first", async () => {
    const broker = new Broker({ retry: 1234 });
    const response = broker.subscribe(new Request("http://localhost/events"));
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.match(response.headers.get("cache-control")!, /no-store/);
    assert.match(response.headers.get("cache-control")!, /no-transform/);
    assert.equal(response.headers.get("x-accel-buffering"), "no");
    assert.equal(response.headers.get("access-control-allow-origin"), "*");
    assert.equal(response.headers.get("connection"), null);
    assert.equal(response.headers.get("transfer-encoding"), null);
    const reader = response.body!.getReader();
    assert.equal(new TextDecoder().decode((await reader.read()).value), "retry: 1234\n\n");
    broker.close();
    assert.equal((await reader.read()).done, true);
  });

  test("fans out one publish to every client, in order, with increasing ids", async () => {
    const broker = new Broker();
    const readers = Array.from({ length: 50 }, () => open(broker));
    assert.equal(broker.stats().clients, 50);
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(await broker.publish({ data: `m${i}` }));
    for (let i = 1; i < ids.length; i++) assert.ok(compareIds(ids[i], ids[i - 1]) > 0, ids[i]);
    for (const reader of readers) {
      const events = await reader.events(5);
      assert.deepEqual(events.map((e) => e.data), ["m0", "m1", "m2", "m3", "m4"]);
      assert.deepEqual(events.map((e) => e.lastEventId), ids);
    }
    assert.equal(broker.stats().delivered, 250);
    broker.close();
  });

  test("encodes each event once and queues the same bytes for every client", async () => {
    const broker = new Broker();
    const readers = [0, 1, 2].map(() =>
      broker.subscribe(new Request("http://x/")).body!.getReader()
    );
    for (const reader of readers) await reader.read(); // retry:
    await broker.publish({ data: "shared" });
    const chunks = await Promise.all(readers.map(async (reader) => (await reader.read()).value));
    assert.ok(chunks[0] === chunks[1] && chunks[1] === chunks[2]);
    broker.close();
  });

  test("publishes in one turn go out as one chunk per client, in order", async () => {
    const broker = new Broker();
    const reader = broker.subscribe(new Request("http://x/")).body!.getReader();
    await reader.read(); // retry:
    const ids = await Promise.all([1, 2, 3].map((n) => broker.publish({ data: `${n}` })));
    const { items } = parseAll((await reader.read()).value!);
    assert.deepEqual(items.map((item) => (item as SseEvent).data), ["1", "2", "3"]);
    assert.deepEqual(items.map((item) => (item as SseEvent).lastEventId), ids);
    assert.equal(broker.stats().delivered, 3);
    broker.close();
  });

  test("a burst to topics: each client gets its events in order, once, as a shared chunk", async () => {
    const broker = new Broker();
    const reader = (query: string) =>
      broker.subscribe(new Request(`http://x/${query}`)).body!.getReader();
    const readers = {
      a: reader("?topic=a"),
      bc: reader("?topic=b&topic=c"),
      cb: reader("?topic=c&topic=b"),
    };
    for (const r of Object.values(readers)) await r.read(); // retry:
    await broker.publish({ data: "first" }, { topics: ["a"] }); // alone: the burst follows
    await Promise.all([
      broker.publish({ data: "to a" }, { topics: ["a"] }),
      broker.publish({ data: "to b" }, { topics: ["b"] }),
      broker.publish({ data: "to a and c" }, { topics: ["a", "c"] }),
      broker.publish({ data: "to nobody" }),
    ]);
    const data = (chunk: Uint8Array) =>
      parseAll(chunk).items.map((item) => (item as SseEvent).data);
    assert.deepEqual(data((await readers.a.read()).value!), ["first"]);
    assert.deepEqual(data((await readers.a.read()).value!), ["to a", "to a and c"]);
    const bc = (await readers.bc.read()).value!;
    const cb = (await readers.cb.read()).value!;
    assert.deepEqual(data(bc), ["to b", "to a and c"]);
    assert.ok(bc === cb, "clients with the same topics share one chunk");
    await broker.publish({ data: "end" }, { topics: ["a", "b", "c"] });
    for (const r of Object.values(readers)) {
      assert.deepEqual(data((await r.read()).value!), ["end"]);
    }
    broker.close();
  });

  test("a client that resumes while a burst is still pending gets each event once", async () => {
    const broker = new Broker();
    const before = await broker.publish({ data: "seen" });
    const pending = broker.publish({ data: "pending" }); // kept, not yet sent
    const reader = open(broker, "", { headers: { "last-event-id": before } });
    await pending;
    await broker.publish({ data: "later" });
    // Up to date when it subscribed: told so at once; the pending event then arrives live.
    const events = await reader.events(3);
    assert.deepEqual(events.map((e) => e.data), ['{"count":0}', "pending", "later"]);
    broker.close();
  });

  test("a cancelled client is removed once and never receives again", async () => {
    const broker = new Broker();
    const gone = broker.subscribe(new Request("http://localhost/events")).body!;
    const stays = open(broker);
    await gone.cancel();
    assert.equal(broker.stats().clients, 1);
    await gone.cancel(); // a second signal changes nothing
    await broker.publish({ data: "after" });
    assert.equal(broker.stats().delivered, 1);
    assert.equal((await stays.event()).data, "after");
    broker.close();
  });

  test("a client whose request aborts is removed", async () => {
    const broker = new Broker();
    const controller = new AbortController();
    open(broker, "", { signal: controller.signal });
    assert.equal(broker.stats().clients, 1);
    controller.abort();
    assert.equal(broker.stats().clients, 0);
    await broker.publish({ data: "nobody" });
    assert.equal(broker.stats().delivered, 0);
    broker.close();
  });

  test("publishing with no clients keeps the event for replay", async () => {
    const broker = new Broker();
    const id = await broker.publish({ data: "alone" });
    assert.equal(broker.stats().published, 1);
    assert.equal(broker.stats().lastEventId, id);
    broker.close();
  });

  test("refuses a message with an id, without data, or with an invalid field", async () => {
    const log = new MemoryLog();
    const broker = new Broker({ eventLog: log });
    const reader = open(broker);
    await assert.rejects(broker.publish({ id: "1", data: "x" } as ServerSentEventMessage), {
      field: "id",
    });
    await assert.rejects(broker.publish({}), { field: "data" });
    await assert.rejects(broker.publish({ event: "a\nb", data: "x" }), { field: "event" });
    await assert.rejects(broker.publish({ data: "x" }, { topics: [""] }), { field: "topic" });
    const id = await broker.publish({ data: "valid" });
    const event = await reader.event();
    assert.deepEqual([event.data, event.lastEventId], ["valid", id]);
    assert.deepEqual(
      log.read(null, 10).events.map((e) => e.id),
      [id],
      "refused messages take no id",
    );
    broker.close();
  });

  test("a client that stops reading is cut once its queue passes maxQueueBytes", async () => {
    const broker = new Broker({ maxQueueBytes: 64 * 1024 });
    const stalled = broker.subscribe(new Request("http://localhost/")).body!.getReader();
    const reading = broker.subscribe(new Request("http://localhost/")).body!.getReader();
    let chunks = 0;
    const drained = (async () => {
      while (!(await reading.read()).done) chunks++;
    })();
    const payload = "x".repeat(4096);
    for (let i = 0; i < 100; i++) await broker.publish({ data: payload });
    const stats = broker.stats();
    assert.equal(stats.slowDisconnects, 1);
    assert.equal(stats.clients, 1);
    // Cut after about 64 KiB: 16 events of 4 KiB, not 100.
    assert.ok(stats.delivered < 100 + 20, `delivered ${stats.delivered}`);
    await assert.rejects(async () => {
      while (!(await stalled.read()).done);
    }, /too slow/);
    broker.close();
    await drained;
    assert.equal(chunks, 1 + 100, "retry: and every event");
  });

  test("a client exactly maxQueueBytes behind is kept; one more event and it is cut", async () => {
    // retry: null starts the stream with 4 bytes; each event here is 20 bytes.
    const broker = new Broker({ eventLog: new ListLog(), retry: null, maxQueueBytes: 104 });
    broker.subscribe(new Request("http://x/"));
    await publishMany(broker, 5);
    assert.deepEqual([broker.stats().clients, broker.stats().slowDisconnects], [1, 0]);
    await publishMany(broker, 1);
    assert.deepEqual([broker.stats().clients, broker.stats().slowDisconnects], [0, 1]);
    broker.close();
  });

  test("logger gets one line per connect, disconnect and cut; nothing is printed by default", async () => {
    const lines: string[] = [];
    const printed: unknown[] = [];
    const console = globalThis.console;
    const spied = ["log", "info", "warn", "error", "debug"] as const;
    const originals = spied.map((name) => console[name]);
    for (const name of spied) console[name] = (...args: unknown[]) => printed.push(args);
    try {
      for (const log of [(line: string) => lines.push(line), undefined]) {
        const broker = new Broker({ logger: log, maxQueueBytes: 1024 });
        const aborting = new AbortController();
        const request = new Request("http://x/?token=secret", { signal: aborting.signal });
        await broker.subscribe(request).body!.cancel();
        aborting.abort(); // a second report of the same disconnect
        broker.subscribe(new Request("http://x/"));
        await broker.publish({ data: "x".repeat(2048) });
        broker.close();
      }
    } finally {
      spied.forEach((name, i) => console[name] = originals[i]);
    }
    assert.deepEqual(lines, [
      "client connected (1 open)",
      "client disconnected (0 open)",
      "client connected (1 open)",
      "client cut: more than 1024 bytes behind",
      "client disconnected (0 open)",
    ]);
    assert.deepEqual(printed, [], "nothing printed, with or without a logger");
  });

  test("stats count the open streams per topic and those that named none", async () => {
    const broker = new Broker();
    const counts = () => {
      const { clients, clientsWithoutTopic, clientsByTopic } = broker.stats();
      return { clients, clientsWithoutTopic, clientsByTopic };
    };
    assert.deepEqual(counts(), { clients: 0, clientsWithoutTopic: 0, clientsByTopic: {} });
    const all = broker.subscribe(new Request("http://x/")).body!;
    const ab = broker.subscribe(new Request("http://x/?topic=a&topic=b")).body!;
    const b = broker.subscribe(new Request("http://x/?topic=b")).body!;
    assert.deepEqual(counts(), {
      clients: 3,
      clientsWithoutTopic: 1,
      clientsByTopic: { a: 1, b: 2 },
    });
    await ab.cancel();
    assert.deepEqual(counts(), { clients: 2, clientsWithoutTopic: 1, clientsByTopic: { b: 1 } });
    await all.cancel();
    await b.cancel();
    assert.deepEqual(counts(), { clients: 0, clientsWithoutTopic: 0, clientsByTopic: {} });
    broker.close();
  });

  test("close ends every stream cleanly and refuses new work", async () => {
    const broker = new Broker();
    const readers = [open(broker), open(broker)];
    await broker.publish({ data: "last" });
    broker.close();
    broker.close();
    for (const reader of readers) {
      assert.equal((await reader.event()).data, "last");
      assert.equal(await reader.next(), null);
    }
    assert.equal(broker.stats().clients, 0);
    // New clients get a stream that ends at once, so they retry (a 503 would stop an EventSource).
    const late = broker.subscribe(new Request("http://localhost/"));
    assert.equal(late.status, 200);
    assert.equal(await late.text(), "retry: 2000\n\n");
    await assert.rejects(broker.publish({ data: "x" }), /closed/);
  });

  test("an invalid topic gets 400", async () => {
    const broker = new Broker();
    const response = broker.subscribe(new Request("http://localhost/?topic=a%00b"));
    assert.equal(response.status, 400);
    assert.match((await response.json()).error, /topic/);
    broker.close();
  });
});

describe("Broker options and limits", () => {
  test("refuses options that are not non-negative integers, naming them", () => {
    const options = ["heartbeat", "maxQueueBytes", "maxClients", "maxTopics"];
    for (const name of options) {
      for (const value of [-1, 1.5, NaN]) {
        assert.throws(() => new Broker({ [name]: value }), {
          name: "RangeError",
          message: `${name} must be a non-negative integer`,
        });
      }
    }
  });

  test("a MemoryLog's history and historyBytes bound what a broker replays", async () => {
    for (const options of [{ history: 2 }, { historyBytes: 60 }]) {
      const broker = new Broker({ eventLog: new MemoryLog(options) });
      const [first] = await publishMany(broker, 4);
      const reader = open(broker, "", { headers: { "last-event-id": first } });
      assert.equal((await reader.event()).event, "gap", JSON.stringify(options));
      broker.close();
    }
  });

  test("headers are added to every stream's, and may replace the CORS default", async () => {
    const broker = new Broker({
      headers: { "x-served-by": "test", "access-control-allow-origin": "https://a.example" },
    });
    const response = broker.subscribe(new Request("http://x/"));
    assert.equal(response.headers.get("x-served-by"), "test");
    assert.equal(response.headers.get("access-control-allow-origin"), "https://a.example");
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    await response.body!.cancel();
    broker.close();
  });

  test("retry: null starts streams with a comment", async () => {
    const broker = new Broker({ retry: null });
    const reader = broker.subscribe(new Request("http://x/")).body!.getReader();
    assert.equal(new TextDecoder().decode((await reader.read()).value), ": \n\n");
    await reader.cancel();
    broker.close();
  });

  test("maxClients: one stream too many is sent away with a 200 that EventSource retries", async () => {
    const broker = new Broker({ maxClients: 2, shedRetry: [2500, 2500] });
    const bodies = [0, 1].map(() => broker.subscribe(new Request("http://x/")).body!);
    const full = broker.subscribe(new Request("http://x/"));
    assert.equal(full.status, 200);
    assert.equal(full.headers.get("content-type"), "text/event-stream");
    assert.equal(full.headers.get("retry-after"), "3", "whole seconds, rounded up");
    assert.equal(await full.text(), ": too many clients\nretry: 2500\n\n");
    assert.equal(broker.stats().clients, 2);
    assert.equal(broker.stats().rejected.limits, 1);
    await bodies[0].cancel();
    const again = broker.subscribe(new Request("http://x/"));
    assert.equal(await again.body!.getReader().read().then((r) => r.value!.length), 13);
    assert.equal(broker.stats().clients, 2, "a place freed is taken");
    broker.close();
  });

  test("shedRetry: the retry of a client sent away is drawn from the whole range", async () => {
    const broker = new Broker({ maxClients: 0, shedRetry: [1000, 1002] });
    const seen = new Set<string>();
    const afters = new Set<string | null>();
    for (let i = 0; i < 200; i++) {
      const response = broker.subscribe(new Request("http://x/"));
      seen.add(/retry: (\d+)/.exec(await response.text())![1]);
      afters.add(response.headers.get("retry-after"));
    }
    assert.deepEqual([...seen].sort(), ["1000", "1001", "1002"]);
    assert.deepEqual([...afters].sort(), ["1", "2"]);
    broker.close();
  });

  test("shedRetry must be two counts, the first not above the second", () => {
    for (const [range, name] of [[[-1, 5], "shedRetry[0]"], [[1, 1.5], "shedRetry[1]"]] as const) {
      assert.throws(() => new Broker({ shedRetry: range as unknown as [number, number] }), {
        name: "RangeError",
        message: `${name} must be a non-negative integer`,
      });
    }
    assert.throws(() => new Broker({ shedRetry: [0, Infinity] }), {
      message: "shedRetry[1] must be a non-negative integer",
    });
    assert.throws(() => new Broker({ shedRetry: [5, 4] }), {
      name: "RangeError",
      message: "shedRetry: the minimum must not exceed the maximum",
    });
    new Broker({ shedRetry: [4, 4] }).close();
  });

  test("maxTopics: a client may name that many topics and no more", async () => {
    const broker = new Broker({ maxTopics: 2 });
    const two = broker.subscribe(new Request("http://x/?topic=a&topic=b"));
    assert.equal(two.status, 200);
    await two.body!.cancel();
    const three = broker.subscribe(new Request("http://x/?topic=a&topic=b&topic=c"));
    assert.equal(three.status, 400);
    assert.deepEqual(await three.json(), { error: "at most 2 topics per client" });
    broker.close();
  });

  test("topics are 1 to 256 printable characters; a refused one is named, cut to 64", async () => {
    const broker = new Broker();
    const long = "t".repeat(256);
    const ok = broker.subscribe(new Request(`http://x/?topic=${long}&topic=news`));
    assert.equal(ok.status, 200);
    await ok.body!.cancel();
    await broker.publish({ data: "x" }, { topics: [long] });
    for (const topic of [long + "t", "a\u0001b", "\u007f", ""]) {
      const response = broker.subscribe(
        new Request(`http://x/?topic=${encodeURIComponent(topic)}`),
      );
      assert.equal(response.status, 400, JSON.stringify(topic));
      const error = `invalid topic ${JSON.stringify(topic.slice(0, 64))}`;
      assert.deepEqual(await response.json(), { error });
      await assert.rejects(broker.publish({ data: "x" }, { topics: ["ok", topic] }), {
        name: "MessageError",
        field: "topic",
        message: "topic must be 1 to 256 printable characters",
      });
    }
    broker.close();
  });

  test("publish refuses what is not a message, naming the field", async () => {
    const broker = new Broker();
    const cases: [unknown, string][] = [
      [null, "message must be an object"],
      ["data", "message must be an object"],
      [{ data: "x", id: "1" }, "id is assigned by the broker"],
      [{ event: "x" }, "data is required"],
      [{ data: "x", retry: -1 }, "retry must be a non-negative integer"],
    ];
    for (const [message, reason] of cases) {
      await assert.rejects(broker.publish(message as ServerSentEventMessage), (error) => {
        assert.ok(error instanceof MessageError, reason);
        assert.equal(error.message, reason);
        return true;
      });
    }
    const notArray = { topics: "news" as unknown as string[] };
    await assert.rejects(broker.publish({ data: "x" }, notArray), {
      name: "MessageError",
      message: "topics must be an array",
    });
    assert.equal(broker.stats().published, 0);
    broker.close();
  });

  test("an event with no topic does not reach clients that named topics", async () => {
    const broker = new Broker();
    const news = open(broker, "?topic=news");
    await broker.publish({ data: "to all" });
    await broker.publish({ data: "news" }, { topics: ["news"] });
    assert.equal((await news.event()).data, "news");
    broker.close();
  });

  test("an event to a topic nobody named is delivered to those who named no topic", async () => {
    const broker = new Broker();
    const news = open(broker, "?topic=news");
    const everything = open(broker);
    await broker.publish({ data: "sport" }, { topics: ["sport"] });
    await broker.publish({ data: "news" }, { topics: ["news"] });
    assert.deepEqual((await everything.events(2)).map((e) => e.data), ["sport", "news"]);
    assert.equal((await news.event()).data, "news");
    broker.close();
  });

  test("clients with topics `ab` and `a`+`b` want different events", async () => {
    const broker = new Broker();
    const ab = open(broker, "?topic=ab");
    const aAndB = open(broker, "?topic=a&topic=b");
    await Promise.all([
      broker.publish({ data: "to a" }, { topics: ["a"] }),
      broker.publish({ data: "to ab" }, { topics: ["ab"] }),
    ]);
    assert.deepEqual((await ab.events(1)).map((e) => e.data), ["to ab"]);
    assert.deepEqual((await aAndB.events(1)).map((e) => e.data), ["to a"]);
    await broker.publish({ data: "end" }, { topics: ["a", "ab"] });
    assert.equal((await ab.event()).data, "end");
    assert.equal((await aAndB.event()).data, "end");
    broker.close();
  });

  test("a client that named topics and left gets nothing more; the others go on", async () => {
    const broker = new Broker();
    const leaving = broker.subscribe(new Request("http://x/?topic=a&topic=b")).body!;
    const staying = open(broker, "?topic=a");
    await leaving.cancel();
    await broker.publish({ data: "after" }, { topics: ["a", "b"] });
    assert.equal((await staying.event()).data, "after");
    assert.equal(broker.stats().delivered, 1);
    broker.close();
  });

  test("a request already aborted when it subscribes is never counted", async () => {
    const broker = new Broker();
    const response = broker.subscribe(new Request("http://x/", { signal: AbortSignal.abort() }));
    assert.equal(broker.stats().clients, 0);
    assert.equal(await response.text(), "retry: 2000\n\n");
    broker.close();
  });

  test("close delivers the events of its own turn, stops listening to the log, then ends", async () => {
    let listening = 0;
    const memory = new MemoryLog();
    const log: EventLog = {
      get lastId() {
        return memory.lastId;
      },
      append: (events, options) => memory.append(events, options),
      read: (afterId, limit) => memory.read(afterId, limit),
      listen: (listener) => {
        listening++;
        const stop = memory.listen(listener);
        return () => (listening--, stop());
      },
    };
    const broker = new Broker({ eventLog: log });
    assert.equal(listening, 1);
    const reader = open(broker);
    const published = broker.publish({ data: "last" });
    broker.close();
    broker.close();
    assert.equal(listening, 0, "stopped once");
    const last = await reader.event();
    assert.equal(last.data, "last");
    assert.equal(await reader.next(), null);
    assert.equal(await published, last.lastEventId);
    const late = broker.subscribe(new Request("http://x/"));
    assert.equal(late.headers.get("content-type"), "text/event-stream");
    await late.body!.cancel();
  });
});

describe("operations: drain, health, counters, metrics", () => {
  /** Reads a stream to its end and returns its text and when it ended. */
  const readToEnd = async (body: ReadableStream<Uint8Array>) => {
    const text = await new Response(body).text();
    return { text, at: performance.now() };
  };

  test("drain ends the streams spread over the time given, each with a random retry", async () => {
    const broker = new Broker({ retry: 50, shedRetry: [300, 302] });
    const bodies = Array.from(
      { length: 8 },
      () => broker.subscribe(new Request("http://x/")).body!,
    );
    const ends = bodies.map(readToEnd);
    const started = performance.now();
    await broker.drain(400);
    const drained = performance.now() - started;
    const results = await Promise.all(ends);
    const times = results.map(({ at }) => at - started);
    for (const { text } of results) assert.match(text, /^retry: 50\n\nretry: 30[012]\n\n$/);
    assert.deepEqual([...times].sort((a, b) => a - b), times, "in the order they connected");
    assert.ok(times[0] < 200, `the first ends early (${times[0]} ms)`);
    assert.ok(times[7] >= 350, `the last ends near the end (${times[7]} ms)`);
    assert.ok(times[3] >= 100 && times[3] < 350, `the fourth ends midway (${times[3]} ms)`);
    assert.ok(drained >= 350, `resolves once all have ended (${drained} ms)`);
    assert.equal(broker.stats().clients, 0);
    broker.close();
  });

  test("a client that leaves before its turn in a drain is skipped", async () => {
    const broker = new Broker();
    const bodies = Array.from(
      { length: 3 },
      () => broker.subscribe(new Request("http://x/")).body!,
    );
    const draining = broker.drain(200);
    await bodies[2].cancel(); // its turn comes last
    await draining;
    assert.equal(broker.stats().clients, 0);
    await Promise.all(bodies.slice(0, 2).map((body) => new Response(body).text()));
    broker.close();
  });

  test("while draining: not ready, subscribers sent away, publishes still delivered", async () => {
    const broker = new Broker({ shedRetry: [700, 700] });
    const leaves = broker.subscribe(new Request("http://x/"));
    const stays = open(broker); // ends second, halfway through
    const draining = broker.drain(300);
    assert.deepEqual(await broker.health(), { ready: false, eventLogUp: true, reason: "draining" });
    const late = broker.subscribe(new Request("http://x/"));
    assert.equal(late.status, 200);
    assert.equal(late.headers.get("retry-after"), "1");
    assert.equal(await late.text(), ": the server is stopping\nretry: 700\n\n");
    assert.equal(broker.stats().rejected.draining, 1);
    assert.equal(broker.stats().rejected.limits, 0);
    const id = await broker.publish({ data: "still here" });
    const events = [await stays.event()];
    assert.deepEqual(events.map((e) => [e.data, e.lastEventId]), [["still here", id]]);
    await draining;
    assert.equal(await stays.next(), null);
    await leaves.body!.cancel();
    await broker.drain(300); // not open any more: nothing to do
    broker.close();
    await broker.drain(300);
    assert.deepEqual(await broker.health(), { ready: false, eventLogUp: true, reason: "closed" });
    assert.equal(await broker.subscribe(new Request("http://x/")).text(), "retry: 2000\n\n");
  });

  test("drain(0) ends every stream at once; close during a drain ends the rest", async () => {
    const broker = new Broker();
    const first = broker.subscribe(new Request("http://x/")).body!;
    const drained = broker.drain(0);
    assert.equal(broker.stats().clients, 0, "before any timer");
    await drained;
    await first.cancel();
    const other = new Broker();
    const bodies = Array.from({ length: 4 }, () => other.subscribe(new Request("http://x/")).body!);
    const draining = other.drain(60_000);
    other.close();
    await draining; // resolves: close stopped it
    assert.equal(other.stats().clients, 0);
    await Promise.all(bodies.map((body) => new Response(body).text()));
    await assert.rejects(other.drain(-1), { message: "ms must be a non-negative integer" });
    await assert.rejects(other.drain(Infinity), { message: "ms must be a non-negative integer" });
  });

  test("health: ready while open and the log answers its ping; the reason when not", async () => {
    let ping: () => Promise<void> = () => Promise.resolve();
    const inner = new MemoryLog();
    const log: EventLog = {
      get lastId() {
        return inner.lastId;
      },
      append: (...args) => inner.append(...args),
      read: (afterId, limit) => inner.read(afterId, limit),
      listen: (listener) => inner.listen(listener),
      ping: () => ping(),
    };
    const broker = new Broker({ eventLog: log });
    assert.deepEqual(await broker.health(), { ready: true, eventLogUp: true, reason: null });
    ping = () => Promise.reject(new Error("connection refused"));
    assert.deepEqual(await broker.health(), {
      ready: false,
      eventLogUp: false,
      reason: "the event log did not answer: connection refused",
    });
    ping = () => new Promise(() => {});
    const started = performance.now();
    assert.deepEqual(await broker.health(), {
      ready: false,
      eventLogUp: false,
      reason: "the event log did not answer: no answer within 1 s",
    });
    assert.ok(performance.now() - started >= 990);
    ping = () => Promise.reject("down");
    assert.equal((await broker.health()).reason, "the event log did not answer: down");
    ping = () => Promise.reject(undefined);
    assert.equal((await broker.health()).reason, "the event log did not answer: undefined");
    broker.close();
    assert.deepEqual(await broker.health(), { ready: false, eventLogUp: false, reason: "closed" });
  });

  test("stats count connections, rejections by reason, and publish times", async () => {
    const broker = new Broker({ maxClients: 1, maxTopics: 1 });
    const one = broker.subscribe(new Request("http://x/"));
    broker.subscribe(new Request("http://x/")); // sent away: limits
    await one.body!.cancel();
    await broker.subscribe(new Request("http://x/")).body!.cancel();
    broker.subscribe(new Request("http://x/?topic=a&topic=b")); // validation
    broker.subscribe(new Request("http://x/?topic=")); // validation
    await assert.rejects(broker.publish({ data: "x", event: "a\nb" }), MessageError);
    broker.countRejection("auth");
    broker.countRejection("other" as RejectionReason); // from JavaScript: ignored
    await broker.publish({ data: "x" });
    const stats = broker.stats();
    assert.equal(stats.connections, 2);
    assert.deepEqual(stats.rejected, { auth: 1, validation: 3, limits: 1, draining: 0 });
    assert.equal(stats.publishSeconds.count, 1, "only accepted publishes are timed");
    assert.deepEqual(stats.publishSeconds.buckets.at(-1), { le: "+Inf", count: 1 });
    broker.close();
  });

  test("publishSeconds: each publish lands in the bucket of its time, buckets cumulative", async () => {
    const inner = new MemoryLog();
    const slow: EventLog = {
      get lastId() {
        return inner.lastId;
      },
      append: (...args) =>
        new Promise((resolve) => setTimeout(() => resolve(inner.append(...args)), 60)),
      read: (afterId, limit) => inner.read(afterId, limit),
      listen: (listener) => inner.listen(listener),
    };
    const broker = new Broker({ eventLog: slow });
    await broker.publish({ data: "slow" });
    const { buckets, sum, count } = broker.stats().publishSeconds;
    assert.deepEqual(
      buckets.map(({ le }) => le),
      [
        "0.001",
        "0.0025",
        "0.005",
        "0.01",
        "0.025",
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1",
        "2.5",
        "5",
        "+Inf",
      ],
    );
    const counts = buckets.map((bucket) => bucket.count);
    assert.deepEqual(counts.slice(0, 6), [0, 0, 0, 0, 0, 0], "above 50 ms");
    assert.deepEqual(counts.slice(7), [1, 1, 1, 1, 1, 1], "at most 250 ms, and counted on");
    assert.equal(count, 1);
    assert.ok(sum >= 0.059 && sum < 0.25, `sum ${sum}`);
    broker.close();
  });

  test("a publish slower than the last bucket counts under +Inf only", async () => {
    const inner = new MemoryLog();
    const realNow = performance.now;
    let offset = 0;
    const clock = () => realNow.call(performance) + offset;
    const slow: EventLog = {
      get lastId() {
        return inner.lastId;
      },
      append: (events, options) => {
        offset += 6000; // the append "takes" 6 s
        return inner.append(events, options);
      },
      read: (afterId, limit) => inner.read(afterId, limit),
      listen: (listener) => inner.listen(listener),
    };
    performance.now = clock;
    try {
      const broker = new Broker({ eventLog: slow });
      await broker.publish({ data: "slow" });
      const { buckets, count, sum } = broker.stats().publishSeconds;
      assert.deepEqual(buckets.slice(-2), [{ le: "5", count: 0 }, { le: "+Inf", count: 1 }]);
      assert.equal(count, 1);
      assert.ok(sum >= 6, `sum ${sum}`);
      broker.close();
    } finally {
      performance.now = realNow;
    }
  });

  test("a publish waiting for its event returns when the broker closes", async () => {
    const inner = new MemoryLog();
    const silent: EventLog = { // stores, but never tells its listeners
      get lastId() {
        return inner.lastId;
      },
      append: (events, options) => inner.append(events, options),
      read: (afterId, limit) => inner.read(afterId, limit),
      listen: () => () => {},
    };
    const broker = new Broker({ eventLog: silent });
    const publishing = broker.publish({ data: "x" });
    await new Promise((resolve) => setTimeout(resolve, 10));
    broker.close();
    assert.equal(await publishing, inner.lastId);
  });

  test("a publish whose log never reports the event resolves with its id after a second", async () => {
    const inner = new MemoryLog();
    const silent: EventLog = { // stores, but never tells its listeners (a stalled server)
      get lastId() {
        return inner.lastId;
      },
      append: (events, options) => inner.append(events, options),
      read: (afterId, limit) => inner.read(afterId, limit),
      listen: () => () => {},
    };
    const broker = new Broker({ eventLog: silent });
    const started = performance.now();
    const [first, second] = await Promise.all([
      broker.publish({ data: "x" }),
      broker.publish({ data: "y" }),
    ]);
    const waited = performance.now() - started;
    assert.deepEqual([first, second], inner.read(null, 2).events.map((event) => event.id));
    assert.ok(waited >= 990 && waited < 3000, `waited ${waited} ms`);
    // The next publish waits its own second, not the first's.
    const again = performance.now();
    await broker.publish({ data: "z" });
    assert.ok(performance.now() - again >= 990);
    assert.equal(broker.stats().publishSeconds.count, 3);
    broker.close();
  });

  test("metricsText is the Prometheus text format of the broker's counters", async () => {
    const broker = new Broker();
    const reader = open(broker);
    await broker.publish({ data: "x" });
    await reader.event();
    broker.countRejection("validation");
    const text = await metricsText(broker);
    const [histogram, rest] = [
      text.split("\n").filter((line) => line.startsWith("sse_publish_seconds")),
      text.split("\n").filter((line) => !line.startsWith("sse_publish_seconds")).join("\n"),
    ];
    assert.equal(
      rest,
      `# HELP sse_clients Streams open now.
# TYPE sse_clients gauge
sse_clients 1
# HELP sse_reserved Places of the client limit held by other open responses.
# TYPE sse_reserved gauge
sse_reserved 0
# HELP sse_event_log_up Whether the event log answered a ping (1) or not (0).
# TYPE sse_event_log_up gauge
sse_event_log_up 1
# HELP sse_connections_total Streams opened.
# TYPE sse_connections_total counter
sse_connections_total 1
# HELP sse_published_total Events accepted by publish.
# TYPE sse_published_total counter
sse_published_total 1
# HELP sse_delivered_total Events handed to live clients.
# TYPE sse_delivered_total counter
sse_delivered_total 1
# HELP sse_replayed_total Events resent from the event log.
# TYPE sse_replayed_total counter
sse_replayed_total 0
# HELP sse_slow_disconnects_total Clients cut for falling behind.
# TYPE sse_slow_disconnects_total counter
sse_slow_disconnects_total 0
# HELP sse_rejected_total Requests refused, by reason.
# TYPE sse_rejected_total counter
sse_rejected_total{reason="auth"} 0
sse_rejected_total{reason="validation"} 1
sse_rejected_total{reason="limits"} 0
sse_rejected_total{reason="draining"} 0
# HELP sse_publish_seconds Seconds from a publish accepted until queued for every client.
# TYPE sse_publish_seconds histogram
`,
    );
    assert.equal(histogram.length, 15);
    assert.equal(histogram[0].split(" ")[0], 'sse_publish_seconds_bucket{le="0.001"}');
    assert.equal(histogram[12], 'sse_publish_seconds_bucket{le="+Inf"} 1');
    assert.match(histogram[13], /^sse_publish_seconds_sum 0\.\d+(e-\d+)?$/);
    assert.equal(histogram[14], "sse_publish_seconds_count 1");
    assert.ok(text.endsWith("sse_publish_seconds_count 1\n"));
    assert.equal(METRICS_CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    broker.close();
  });

  test("the handler counts what it refuses: auth, validation and limits, each once", async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      maxBodyBytes: 40,
      authorize: (request, action) =>
        action === "subscribe" ? request.headers.get("x-ok") === "1" : { publish: ["a"] },
    });
    const post = (body: string, path = "/publish") =>
      handler(
        new Request(`http://x${path}`, {
          method: "POST",
          body,
          headers: { "content-type": "application/json" },
        }),
      );
    assert.equal((await handler(new Request("http://x/events"))).status, 401);
    assert.equal((await post('{"data":1}')).status, 403); // no topic: no grant
    assert.equal((await post("{")).status, 400);
    assert.equal((await post(JSON.stringify({ data: "x".repeat(40) }))).status, 413);
    assert.equal((await post('{"data":"x","topic":"a","event":""}')).status, 200);
    assert.equal((await post('{"data":1,"topic":"a","retry":-1}')).status, 400);
    assert.equal((await handler(new Request("http://x/nope"))).status, 404);
    assert.deepEqual(broker.stats().rejected, { auth: 2, validation: 2, limits: 1, draining: 0 });
    const withTokens = createHandler(broker, {
      authorize: () => {
        throw new TokenError("the token expired");
      },
    });
    assert.equal((await withTokens(new Request("http://x/events"))).status, 401);
    assert.equal(broker.stats().rejected.auth, 3);
    broker.close();
  });
});

describe("idempotent and batch publishing", () => {
  test("a repeated idempotency key answers the first id and publishes nothing", async () => {
    const broker = new Broker();
    const reader = open(broker);
    const first = await broker.publish({ data: "once" }, { idempotencyKey: "order-17" });
    const again = await broker.publish({ data: "once" }, { idempotencyKey: "order-17" });
    const other = await broker.publish({ data: "once" }, { idempotencyKey: "order-18" });
    assert.equal(again, first);
    assert.notEqual(other, first);
    assert.deepEqual((await reader.events(2)).map((e) => e.lastEventId), [first, other]);
    assert.equal(broker.stats().published, 2, "a repeat is not counted");
    broker.close();
  });

  test("a key reused for another event, topic or privacy is refused; nothing is published", async () => {
    const broker = new Broker();
    await broker.publish({ data: "a" }, { topics: ["t"], idempotencyKey: "k" });
    for (
      const [message, options] of [
        [{ data: "b" }, { topics: ["t"] }],
        [{ data: "a" }, { topics: ["u"] }],
        [{ data: "a" }, { topics: ["t"], private: true }],
        [{ data: "a", event: "e" }, { topics: ["t"] }],
      ] as const
    ) {
      await assert.rejects(broker.publish(message, { ...options, idempotencyKey: "k" }), {
        name: "IdempotencyKeyError",
        message: "the idempotency key was used for other events",
      });
    }
    assert.equal(broker.stats().published, 1);
    assert.equal(broker.stats().rejected.validation, 4);
    broker.close();
  });

  test("the window: after idempotencyWindow ms the key is forgotten", async () => {
    const log = new MemoryLog({ idempotencyWindow: 40 });
    const broker = new Broker({ eventLog: log });
    const first = await broker.publish({ data: "x" }, { idempotencyKey: "k" });
    assert.equal(await broker.publish({ data: "x" }, { idempotencyKey: "k" }), first);
    await new Promise((resolve) => setTimeout(resolve, 60));
    const later = await broker.publish({ data: "x" }, { idempotencyKey: "k" });
    assert.notEqual(later, first, "published again");
    assert.equal(log.read(null, 10).events.length, 2);
    broker.close();
  });

  test("a key holds for exactly idempotencyWindow ms", async () => {
    const log = new MemoryLog({ idempotencyWindow: 100 });
    const realNow = Date.now;
    const start = realNow();
    let now = start;
    Date.now = () => now;
    try {
      const append = () =>
        log.append([{ topics: [], text: "data: x\n\n" }], { idempotencyKey: "k" });
      const { ids } = await append();
      now = start + 99;
      assert.deepEqual(await append(), { ids, repeated: true }, "1 ms before the end");
      now = start + 100;
      assert.equal((await append()).repeated, false, "forgotten at the end of the window");
    } finally {
      Date.now = realNow;
    }
  });

  test("a key past its window is forgotten even when the clock went back meanwhile", async () => {
    const log = new MemoryLog({ idempotencyWindow: 100 });
    const realNow = Date.now;
    let now = realNow();
    Date.now = () => now;
    try {
      const append = (key: string) =>
        log.append([{ topics: [], text: "data: x\n\n" }], { idempotencyKey: key });
      await append("a"); // held until now + 100
      now -= 500; // the clock goes back
      await append("b"); // held until now + 100, yet after "a" in order
      now += 150; // "b" has expired, "a" has not
      assert.equal((await append("b")).repeated, false);
      assert.equal((await append("a")).repeated, true);
    } finally {
      Date.now = realNow;
    }
  });

  test("an idempotency key is 1 to 256 printable characters", async () => {
    const broker = new Broker();
    for (const key of ["", "x".repeat(257), "a\nb"]) {
      await assert.rejects(broker.publish({ data: "x" }, { idempotencyKey: key }), {
        field: "idempotencyKey",
        message: "idempotencyKey must be 1 to 256 printable characters",
      });
    }
    await broker.publish({ data: "x" }, { idempotencyKey: "x".repeat(256) });
    broker.close();
  });

  test("a batch is published in order, as one chunk, with increasing ids", async () => {
    const broker = new Broker();
    const everyone = broker.subscribe(new Request("http://x/")).body!.getReader();
    await everyone.read(); // the retry
    const news = open(broker, "?topic=news");
    const ids = await broker.publishBatch([
      { message: { data: "1" } },
      { message: { data: "2", event: "n" }, topics: ["news"] },
      { message: { data: "3" }, topics: ["news"] },
    ]);
    assert.equal(ids.length, 3);
    assert.ok(compareIds(ids[1], ids[0]) > 0 && compareIds(ids[2], ids[1]) > 0);
    const chunk = new TextDecoder().decode((await everyone.read()).value);
    assert.equal(
      chunk,
      `id: ${ids[0]}\ndata: 1\n\nid: ${ids[1]}\nevent: n\ndata: 2\n\nid: ${ids[2]}\ndata: 3\n\n`,
    );
    assert.deepEqual((await news.events(2)).map((e) => e.data), ["2", "3"]);
    assert.equal(broker.stats().published, 3);
    await everyone.cancel();
    broker.close();
  });

  test("a batch with one bad event publishes none, and the error names its index", async () => {
    const log = new MemoryLog();
    const broker = new Broker({ eventLog: log });
    const cases = [
      [[{ message: { data: "ok" } }, { message: { data: "x", event: "a\nb" } }], "[1].event"],
      [[{ message: {} }], "[0].data"],
      [[{ message: { data: "ok" } }, { message: { data: "x" }, topics: [""] }], "[1].topic"],
      [[{ message: { data: "x" }, private: true }], "[0].private"],
      [[{ message: null }], "[0].message"],
    ] as const;
    for (const [entries, field] of cases) {
      await assert.rejects(broker.publishBatch(entries as unknown as BatchEntry[]), { field });
    }
    await assert.rejects(broker.publishBatch([]), {
      message: "entries must be a non-empty array",
    });
    assert.equal(log.lastId, null, "nothing reached the log");
    assert.equal(broker.stats().rejected.validation, 6);
    broker.close();
  });

  test("a batch under an idempotency key: a repeat answers the same ids", async () => {
    const broker = new Broker();
    const batch = [{ message: { data: "a" } }, { message: { data: "b" } }];
    const ids = await broker.publishBatch(batch, { idempotencyKey: "b1" });
    assert.deepEqual(await broker.publishBatch(batch, { idempotencyKey: "b1" }), ids);
    await assert.rejects(
      broker.publishBatch(batch.slice(0, 1), { idempotencyKey: "b1" }),
      IdempotencyKeyError,
    );
    broker.close();
  });

  test("a batch is replayed in order to a client that missed it", async () => {
    const broker = new Broker();
    const before = await broker.publish({ data: "before" });
    await broker.publishBatch([{ message: { data: "1" } }, { message: { data: "2" } }]);
    const reader = open(broker, "", { headers: { "last-event-id": before } });
    assert.deepEqual((await reader.events(3)).map((e) => e.data), ["1", "2", '{"count":2}']);
    broker.close();
  });

  test("over HTTP: Idempotency-Key, a JSON array as a batch, 422 for a reused key", async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      authorize: (_request, action) => action === "subscribe" || { publish: ["news"] },
    });
    const post = (body: string, headers: Record<string, string> = {}) =>
      handler(
        new Request("http://x/publish", {
          method: "POST",
          body,
          headers: { "content-type": "application/json", ...headers },
        }),
      );
    const one = '{"data":"x","topic":"news"}';
    const first = await (await post(one, { "idempotency-key": "k" })).json();
    assert.deepEqual(await (await post(one, { "idempotency-key": "k" })).json(), first);
    const reused = await post('{"data":"y","topic":"news"}', { "idempotency-key": "k" });
    assert.equal(reused.status, 422);
    assert.deepEqual(await reused.json(), {
      error: "the idempotency key was used for other events",
    });
    const twoEvents = '[{"data":"1","topic":"news"},{"data":"2","topic":"news"}]';
    const batch = await post(twoEvents, { "idempotency-key": "b" });
    assert.equal(batch.status, 200);
    const { ids } = await batch.json();
    assert.equal(ids.length, 2);
    assert.deepEqual(await (await post(twoEvents, { "idempotency-key": "b" })).json(), { ids });
    const text = await handler(
      new Request("http://x/publish?topic=news", { method: "POST", body: "plain" }),
    );
    assert.deepEqual(Object.keys(await text.json()), ["id"], "a text body is one event");
    const refused = await post('[{"data":"1","topic":"news"},{"data":"2","topic":"sport"}]');
    assert.equal(refused.status, 403);
    assert.deepEqual(await refused.json(), { error: 'no publish grant for "sport"' });
    const bad = await post('[{"data":"1","topic":"news"},{"topic":"news"}]');
    assert.deepEqual([bad.status, await bad.json()], [400, { error: "[1].data is required" }]);
    assert.equal(broker.stats().published, 4);
    broker.close();
  });
});

describe("backlog on first connect, and expiry", () => {
  test("lastEventId=earliest replays every retained event of its topics, with no gap event", async () => {
    const broker = new Broker({ eventLog: new MemoryLog({ history: 3 }) });
    for (const topic of ["a", "b", "a", "a", "b"]) {
      await broker.publish({ data: topic }, { topics: [topic] });
    }
    const all = open(broker, "?lastEventId=earliest");
    assert.deepEqual((await all.events(4)).map((e) => e.data), ["a", "a", "b", '{"count":3}']);
    const onlyA = open(broker, "", { headers: { "last-event-id": "earliest" }, method: "GET" });
    assert.deepEqual((await onlyA.events(4)).map((e) => e.data), ["a", "a", "b", '{"count":3}']);
    const topicA = open(broker, "?topic=a&lastEventId=earliest");
    assert.deepEqual((await topicA.events(3)).map((e) => e.data), ["a", "a", '{"count":2}']);
    broker.close();
  });

  test("since replays the retained events published after that time; a Last-Event-ID wins", async () => {
    const broker = new Broker();
    const realNow = Date.now;
    let now = Date.parse("2026-01-31T12:00:00Z");
    Date.now = () => now;
    try {
      const ids = [];
      for (const data of ["noon", "one", "two"]) {
        ids.push(await broker.publish({ data }));
        now += 3_600_000;
      }
      const since = open(broker, "?since=2026-01-31T12:00:00Z");
      assert.deepEqual((await since.events(3)).map((e) => e.data), ["one", "two", '{"count":2}']);
      const offset = open(broker, "?since=2026-01-31T13:00:00%2B01:00"); // noon UTC again
      assert.deepEqual((await offset.events(1)).map((e) => e.data), ["one"]);
      const date = open(broker, "?since=2026-01-30");
      assert.deepEqual((await date.events(1)).map((e) => e.data), ["noon"]);
      const option = broker.subscribe(new Request("http://x/"), { since: now });
      const reader = new EventReader(option.body!);
      assert.deepEqual((await reader.events(1)).map((e) => e.data), ['{"count":0}']);
      const resumed = open(broker, "?since=2030-01-01", { headers: { "last-event-id": ids[0] } });
      assert.deepEqual((await resumed.events(3)).map((e) => e.data), ["one", "two", '{"count":2}']);
      const bad = [
        "yesterday",
        "2026-13",
        "1700000000",
        "2026-01-31T12:00",
        "2026-01-31T12:00:00.Z",
      ];
      for (const text of bad) {
        const response = broker.subscribe(new Request(`http://x/?since=${text}`));
        assert.equal(response.status, 400, text);
        assert.deepEqual(await response.json(), {
          error: "since must be an ISO 8601 time, such as 2026-01-31T12:00:00Z",
        });
      }
      assert.equal(broker.stats().rejected.validation, bad.length);
      for (
        const good of ["2026-01-31T12:00Z", "2026-01-31T12:00:00.5Z", "2026-01-31T12:00:00.123Z"]
      ) {
        const response = broker.subscribe(new Request(`http://x/?since=${good}`));
        assert.equal(response.status, 200, good);
        await response.body!.cancel();
      }
    } finally {
      Date.now = realNow;
    }
    broker.close();
  });

  test("historyTtl keeps an event exactly that old, and drops it 1 ms later", async () => {
    const log = new MemoryLog({ historyTtl: 1000 });
    const realNow = Date.now;
    const start = realNow();
    let now = start;
    Date.now = () => now;
    try {
      const id = await appendOne(log, "data: x\n\n");
      now = Number(id.split("-")[0]) + 1000;
      assert.equal(log.read(null, 10).events.length, 1);
      now += 1;
      assert.equal(log.read(null, 10).events.length, 0);
    } finally {
      Date.now = realNow;
    }
  });

  test("historyTtl drops older events: not replayed, and resuming from one gets the gap event", async () => {
    const log = new MemoryLog({ historyTtl: 1000 });
    const broker = new Broker({ eventLog: log });
    const realNow = Date.now;
    let now = realNow();
    Date.now = () => now;
    try {
      const old = await broker.publish({ data: "old" });
      const older = await broker.publish({ data: "also old" });
      now += 600;
      const recent = await broker.publish({ data: "recent" });
      now += 600; // the old ones are 1200 ms old now, "recent" 600
      assert.deepEqual(log.read(null, 10).events.map((e) => e.id), [recent]);
      const fromOld = open(broker, "", { headers: { "last-event-id": old } });
      assert.equal((await fromOld.event()).event, "gap", "it missed one that expired");
      assert.equal((await fromOld.event()).data, "recent");
      const fromNewestDropped = open(broker, "", { headers: { "last-event-id": older } });
      assert.equal((await fromNewestDropped.event()).data, "recent", "it missed nothing expired");
      assert.deepEqual(log.read(recent, 10), { events: [], gap: false });
      now += 1000; // all expired: the newest dropped id still places
      assert.deepEqual(log.read(recent, 10), { events: [], gap: false });
      assert.deepEqual(log.read(old, 10), { events: [], gap: true });
      const at = open(broker, "?lastEventId=earliest");
      assert.deepEqual((await at.events(1)).map((e) => e.data), ['{"count":0}']);
    } finally {
      Date.now = realNow;
    }
    broker.close();
  });
});

describe("heartbeats", () => {
  const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Reads items until the event with data `marker`; returns the comments before it. */
  async function commentsBefore(reader: EventReader, marker: string): Promise<string[]> {
    const comments = [];
    for (;;) {
      const item = await reader.next();
      assert.ok(item !== null, "the stream ended");
      if (item.type === "comment") comments.push(item.text);
      else if (item.data === marker) return comments;
    }
  }

  test("an idle stream gets `: ` once per interval, from the first interval on", async () => {
    const broker = new Broker({ heartbeat: 50 });
    const raw = broker.subscribe(new Request("http://x/")).body!.getReader();
    assert.equal(new TextDecoder().decode((await raw.read()).value), "retry: 2000\n\n");
    assert.equal(new TextDecoder().decode((await raw.read()).value), ": \n\n");
    const reader = open(broker);
    // Timers of different lengths fire in order, so the marker always comes
    // after the ticks due before it, however late both are.
    setTimeout(() => broker.publish({ data: "at 1.5 intervals" }), 75);
    assert.ok((await commentsBefore(reader, "at 1.5 intervals")).length >= 1);
    broker.close();
  });

  test("one interval serves every client, and it goes on while any client is left", async () => {
    const broker = new Broker({ heartbeat: 40 });
    const readers = [open(broker), open(broker)];
    const leaving = broker.subscribe(new Request("http://x/")).body!;
    await leaving.cancel();
    const nextComment = async (reader: EventReader) => {
      while ((await reader.next())?.type !== "comment");
    };
    await Promise.all(readers.map(async (reader) => {
      // Comments come an interval apart (or more, when the timer is late);
      // a second timer would send them in pairs.
      await nextComment(reader);
      const first = performance.now();
      await nextComment(reader);
      const gap = performance.now() - first;
      assert.ok(gap >= 20, `${gap.toFixed(1)} ms between two comments`);
    }));
    broker.close();
  });

  test("a stream that was sent an event since the last tick gets no comment", async () => {
    const broker = new Broker({ heartbeat: 250 });
    const reader = open(broker);
    const until = Date.now() + 600;
    while (Date.now() < until) {
      await broker.publish({ data: "busy" });
      await delay(10);
    }
    await broker.publish({ data: "end" });
    assert.deepEqual(await commentsBefore(reader, "end"), []);
    broker.close();
  });

  test("a stream still replaying gets no comment between replayed events", async () => {
    const broker = new Broker({ heartbeat: 20, maxQueueBytes: 1024 });
    const first = await broker.publish({ data: "first" });
    await publishMany(broker, 40);
    const replaying = open(broker, "", { headers: { "last-event-id": first } });
    const idle = open(broker);
    assert.equal((await idle.next())?.type, "comment"); // a tick went by
    assert.equal((await idle.next())?.type, "comment"); // and another
    const items = [];
    for (let item = await replaying.next(); item?.type !== "event" || item.event !== "replayed";) {
      items.push(item!.type);
      item = await replaying.next();
    }
    assert.deepEqual(items, Array(40).fill("event"));
    broker.close();
  });

  test("heartbeat: 0 sends none", async () => {
    const broker = new Broker({ heartbeat: 0 });
    const reader = open(broker);
    await delay(50);
    await broker.publish({ data: "first" });
    assert.deepEqual(await commentsBefore(reader, "first"), []);
    broker.close();
  });

  test("a broker whose clients have all left lets the process exit", async () => {
    const program = `
      const { Broker } = await import(${JSON.stringify(new URL("./mod.ts", import.meta.url).href)});
      const broker = new Broker({ heartbeat: 10 });
      const body = broker.subscribe(new Request("http://x/")).body;
      const expiring = broker.subscribe(new Request("http://x/"), { expires: Date.now() + 60000 }).body;
      await new Promise((resolve) => setTimeout(resolve, 30));
      await body.cancel();
      await expiring.cancel();
      console.log("left");`;
    const args = RUNTIME === "deno" ? ["eval", "--no-config", program] : ["-e", program];
    const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
    const untrack = track(() => child.kill("SIGKILL"));
    let output = "";
    child.stdout.on("data", (chunk) => output += chunk);
    const code = await new Promise((resolve) => child.on("exit", resolve));
    untrack();
    assert.equal(code, 0);
    assert.equal(output, "left\n");
  });
});

describe("MemoryLog", () => {
  /** Appends `count` events with data `1`, `2`, ... in one append, and returns their ids. */
  async function fill(log: MemoryLog, count: number): Promise<string[]> {
    const events = Array.from(
      { length: count },
      (_, n) => ({ topics: [], text: `data: ${n + 1}\n\n` }),
    );
    return (await log.append(events)).ids;
  }
  const data = (read: { events: readonly LogEvent[] }) =>
    read.events.map((event) => event.text.slice(6, -2));

  test("is empty at first: no last id, nothing to read, no gap", () => {
    const log = new MemoryLog();
    assert.equal(log.lastId, null);
    assert.deepEqual(log.read(null, 10), { events: [], gap: false });
  });

  test("ids are <ms>-<seq> as in Redis: the append's time, then a count within its millisecond", async () => {
    const log = new MemoryLog();
    const before = Date.now();
    const ids = await fill(log, 12);
    const ms = Number(ids[0].split("-")[0]);
    assert.ok(ms >= before && ms <= Date.now(), "the time of the append");
    assert.deepEqual(ids, Array.from({ length: 12 }, (_, n) => `${ms}-${n}`), "one append, one ms");
    assert.equal(log.lastId, ids[11]);
    assert.deepEqual(log.read(null, 3).events.map((event) => event.id), ids.slice(0, 3));
    const realNow = Date.now;
    try {
      Date.now = () => ms + 5;
      assert.deepEqual(
        await fill(log, 2),
        [`${ms + 5}-0`, `${ms + 5}-1`],
        "a later ms starts at 0",
      );
      Date.now = () => ms; // the clock went back: ids still increase
      assert.deepEqual(await fill(log, 1), [`${ms + 5}-2`]);
    } finally {
      Date.now = realNow;
    }
  });

  test("keeps the newest `history` events; reading after the newest evicted one is no gap", async () => {
    const log = new MemoryLog({ history: 3 });
    const ids = await fill(log, 5);
    assert.deepEqual(data(log.read(null, 10)), ["3", "4", "5"]);
    assert.deepEqual(log.read(ids[1], 10), { events: log.read(null, 10).events, gap: false });
    assert.deepEqual(log.read(ids[0], 10).gap, true, "an older id: events were dropped");
    assert.deepEqual(data(log.read(ids[0], 10)), ["3", "4", "5"]);
    assert.deepEqual(log.read(ids[4], 10), { events: [], gap: false }, "the newest: up to date");
    assert.deepEqual(data(log.read(ids[2], 1)), ["4"], "at most `limit`");
  });

  test("historyBytes bounds the retained events by their size on the wire", async () => {
    const probe = new MemoryLog();
    const [id] = await fill(probe, 1);
    const size = new TextEncoder().encode(`id: ${id}\ndata: 1\n\n`).byteLength;
    for (const [historyBytes, kept] of [[3 * size, ["3", "4", "5"]], [3 * size - 1, ["4", "5"]]]) {
      const log = new MemoryLog({ historyBytes: historyBytes as number });
      await fill(log, 5);
      assert.deepEqual(data(log.read(null, 10)), kept, `historyBytes ${historyBytes}`);
    }
    const tiny = new MemoryLog({ historyBytes: 1 });
    const tinyIds = await fill(tiny, 2);
    assert.deepEqual(data(tiny.read(null, 10)), [], "an event larger than the cap is not kept");
    assert.equal(tiny.lastId, tinyIds[1], "yet it has its id");
  });

  test("evicted events never come back, however many were evicted", async () => {
    const log = new MemoryLog({ history: 10 });
    const ids = await fill(log, 3000);
    assert.deepEqual(data(log.read(null, 100)), ids.slice(-10).map((_, n) => `${2991 + n}`));
    assert.equal(log.read(ids[2000], 100).gap, true);
    assert.deepEqual(data(log.read(ids[2995], 100)), ["2997", "2998", "2999", "3000"]);
  });

  test("an id it cannot place is a gap: malformed, from another log, or ahead", async () => {
    const log = new MemoryLog();
    const ids = await fill(log, 12);
    const [ms] = ids[0].split("-");
    for (
      const id of [
        `x${ids[0]}`,
        `${ids[0]}x`,
        `${ms}-`,
        "1-1",
        `${Number(ms) + 1}-0`,
        `${ms}-12`,
        `${Number(ms) - 1}-5`,
      ]
    ) {
      const read = log.read(id, 20);
      assert.equal(read.gap, true, id);
      assert.equal(read.events.length, 12, id);
    }
    assert.deepEqual(data(log.read(`${ms}-9`, 20)), ["11", "12"], "found by its order");
    assert.deepEqual(data(log.read(`${ms}-0`, 20)).length, 11, "the first");
  });

  test("listeners get each appended event until they stop listening", async () => {
    const log = new MemoryLog();
    const heard: string[] = [];
    const stop = log.listen((events) => heard.push(...events.map((event) => event.id)));
    const [first] = await fill(log, 1);
    stop();
    await fill(log, 1);
    assert.deepEqual(heard, [first]);
  });

  test("refuses options that are not non-negative integers, naming them", () => {
    const cases = [
      { history: -1 },
      { history: 1.5 },
      { historyBytes: NaN },
      { historyTtl: -5 },
      { idempotencyWindow: 0.5 },
    ];
    for (const options of cases) {
      const name = Object.keys(options)[0];
      assert.throws(() => new MemoryLog(options), {
        name: "RangeError",
        message: `${name} must be a non-negative integer`,
      });
    }
  });
});

/**
 * An event log whose ids the test chooses (`1-1001`, `1-1002`, ... unless
 * told otherwise), so every event of the same data has the same size on the
 * wire. Keeps the newest `history` events; reads answer later when `late`.
 */
class ListLog implements EventLog {
  readonly events: LogEvent[] = [];
  readonly #listeners = new Set<(events: readonly LogEvent[]) => void>();
  readonly #idOf: (n: number) => string;
  readonly #history: number;
  /** Reads answer after a microtask when `true`, after that many milliseconds when a number. */
  late: boolean | number = false;
  lastId: string | null = null;
  #appended = 0;

  constructor(options: { idOf?: (n: number) => string; history?: number } = {}) {
    this.#idOf = options.idOf ?? ((n) => `1-${1000 + n}`);
    this.#history = options.history ?? Infinity;
  }

  append(events: readonly NewEvent[]): Promise<Appended> {
    const appended = events.map(({ topics, text }) => ({
      id: this.#idOf(++this.#appended),
      topics,
      text,
    }));
    for (const event of appended) {
      this.events.push(event);
      if (this.events.length > this.#history) this.events.shift();
      this.lastId = event.id;
    }
    for (const listener of this.#listeners) listener(appended);
    return Promise.resolve({ ids: appended.map((event) => event.id), repeated: false });
  }

  read(afterId: string | null, limit: number): LogRead | Promise<LogRead> {
    const at = afterId === null ? -1 : this.events.findIndex((event) => event.id === afterId);
    const gap = afterId !== null && at === -1;
    const read = { events: this.events.slice(at + 1, at + 1 + limit), gap };
    if (this.late === false) return read;
    const ms = this.late === true ? undefined : this.late;
    return new Promise((resolve) =>
      ms === undefined ? queueMicrotask(() => resolve(read)) : setTimeout(() => resolve(read), ms)
    );
  }

  listen(listener: (events: readonly LogEvent[]) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}

/** Appends one public event with no topic to `log` and returns its id. */
async function appendOne(log: EventLog, text: string): Promise<string> {
  return (await log.append([{ topics: [], text }])).ids[0];
}

/** Publishes `count` events with data `x` in one turn and returns their ids. */
function publishMany(broker: Broker, count: number): Promise<string[]> {
  return Promise.all(Array.from({ length: count }, () => broker.publish({ data: "x" })));
}

describe("replay", () => {
  const resume = (broker: Broker, id: string, query = "") =>
    open(broker, query, { headers: { "last-event-id": id } });

  test("a resuming client gets what it missed, then `replayed` with the count, then live events", async () => {
    const broker = new Broker();
    const [a, b, c] = await Promise.all(["a", "b", "c"].map((data) => broker.publish({ data })));
    const reader = resume(broker, a);
    const d = await broker.publish({ data: "d" });
    assert.deepEqual(await reader.events(4), [
      { type: "event", event: "message", data: "b", lastEventId: b },
      { type: "event", event: "message", data: "c", lastEventId: c },
      { type: "event", event: "replayed", data: '{"count":2}', lastEventId: c },
      { type: "event", event: "message", data: "d", lastEventId: d },
    ]);
    assert.equal(broker.stats().replayed, 2);
    assert.equal(broker.stats().delivered, 1);
    broker.close();
  });

  test("a client that does not resume is told where it joined, and resumes from there", async () => {
    const broker = new Broker({ retry: 100 });
    const first = broker.subscribe(new Request("http://x/")).body!.getReader();
    assert.equal(new TextDecoder().decode((await first.read()).value), "retry: 100\n\n");
    const before = await broker.publish({ data: "before" });
    const joined = broker.subscribe(new Request("http://x/")).body!.getReader();
    const start = new TextDecoder().decode((await joined.read()).value);
    assert.equal(start, `retry: 100\n\nid: ${before}\n\n`, "one chunk: the id, no event");
    await joined.cancel(); // it leaves before its first event, which it misses
    const missed = await broker.publish({ data: "missed" });
    const resumed = open(broker, "", { headers: { "last-event-id": before } });
    assert.deepEqual((await resumed.events(2)).map((e) => [e.event, e.data]), [
      ["message", "missed"],
      ["replayed", '{"count":1}'],
    ]);
    assert.equal(resumed.parser.lastEventId, missed);
    const rejoined = broker.subscribe(
      new Request("http://x/", { headers: { "last-event-id": missed } }),
    ).body!.getReader();
    assert.equal(
      new TextDecoder().decode((await rejoined.read()).value),
      "retry: 100\n\n",
      "a resuming client keeps its own id",
    );
    await Promise.all([first.cancel(), resumed.cancel(), rejoined.cancel()]);
    broker.close();
  });

  test("the resume point comes from ?lastEventId=, or the lastEventId option over the request's", async () => {
    const broker = new Broker();
    const [a, b] = await Promise.all(["a", "b"].map((data) => broker.publish({ data })));
    const byQuery = open(broker, `?lastEventId=${a}`);
    const request = new Request("http://x/", { headers: { "last-event-id": a } });
    const byOption = new EventReader(broker.subscribe(request, { lastEventId: b }).body!);
    const notResuming = new EventReader(broker.subscribe(request, { lastEventId: null }).body!);
    await broker.publish({ data: "c" });
    assert.deepEqual((await byQuery.events(3)).map((e) => e.data), ["b", '{"count":1}', "c"]);
    assert.deepEqual((await byOption.events(2)).map((e) => e.data), ['{"count":0}', "c"]);
    assert.deepEqual((await notResuming.event()).data, "c");
    broker.close();
  });

  test("an id the log cannot place: a gap event naming the oldest retained id, then all retained", async () => {
    const broker = new Broker({ eventLog: new MemoryLog({ history: 2 }) });
    const [first, , third] = await publishMany(broker, 4);
    const reader = resume(broker, first);
    const events = await reader.events(4);
    assert.deepEqual(events.map((e) => [e.event, e.data]), [
      ["gap", JSON.stringify({ oldestId: third })],
      ["message", "x"],
      ["message", "x"],
      ["replayed", '{"count":2}'],
    ]);
    assert.equal(events[1].lastEventId, third);
    const empty = new Broker();
    const fresh = resume(empty, "1-1");
    assert.deepEqual((await fresh.events(2)).map((e) => [e.event, e.data]), [
      ["gap", '{"oldestId":null}'],
      ["replayed", '{"count":0}'],
    ]);
    broker.close();
    empty.close();
  });

  test("a client that named topics replays only events of its topics", async () => {
    const broker = new Broker();
    const start = await broker.publish({ data: "start" });
    await broker.publish({ data: "to a" }, { topics: ["a"] });
    await broker.publish({ data: "to b" }, { topics: ["b"] });
    await broker.publish({ data: "to none" });
    await broker.publish({ data: "to b and a" }, { topics: ["b", "a"] });
    const reader = resume(broker, start, "?topic=a");
    assert.deepEqual((await reader.events(3)).map((e) => e.data), [
      "to a",
      "to b and a",
      '{"count":2}',
    ]);
    broker.close();
  });

  test("is placed at subscribe: events published before the client first reads are no gap", async () => {
    const broker = new Broker({ eventLog: new MemoryLog({ history: 3 }) });
    const first = await broker.publish({ data: "seen" });
    const reader = resume(broker, first);
    const later = await publishMany(broker, 5);
    const events = await reader.events(6);
    assert.deepEqual(events.map((e) => e.event), ["replayed", ...later.map(() => "message")]);
    assert.deepEqual(events.slice(1).map((e) => e.lastEventId), later);
    broker.close();
  });

  test("queues all of a backlog longer than one read of the log at once when the queue has room", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first, ...rest] = await publishMany(broker, 1500);
    const reader = resume(broker, first);
    assert.equal(broker.stats().replayed, 1499);
    const events = await reader.events(1500);
    assert.deepEqual(events.slice(0, -1).map((e) => e.lastEventId), rest);
    assert.equal(events[1499].data, '{"count":1499}');
    broker.close();
  });

  test("fills half of maxQueueBytes, then goes on as the client reads", async () => {
    // With retry: null the stream starts with 4 bytes (": \n\n"); each event
    // here is 20 bytes ("id: 1-1001\n" and "data: x\n\n"): 4 + 10 * 20 is
    // half of 408.
    const broker = new Broker({ eventLog: new ListLog(), retry: null, maxQueueBytes: 408 });
    const [first, ...rest] = await publishMany(broker, 100);
    const reader = resume(broker, first);
    assert.equal(broker.stats().replayed, 10);
    const events = await reader.events(100);
    assert.deepEqual(events.slice(0, -1).map((e) => e.lastEventId), rest);
    assert.equal(events[99].data, '{"count":99}');
    assert.equal(broker.stats().slowDisconnects, 0);
    broker.close();
  });

  test("a replaying client that the log's retention overtakes is cut, to resume with a gap", async () => {
    const log = new ListLog({ history: 20 });
    const broker = new Broker({ eventLog: log, retry: null, maxQueueBytes: 408 });
    const [first] = await publishMany(broker, 20);
    const reader = resume(broker, first);
    assert.equal(broker.stats().replayed, 10);
    await publishMany(broker, 30); // the log now starts after the client's place
    assert.equal((await reader.events(10)).length, 10);
    await assert.rejects(reader.next(), /too slow/);
    assert.equal(broker.stats().slowDisconnects, 1);
    assert.equal(broker.stats().clients, 0);
    broker.close();
  });

  test("orders ids by their first part, then their second (as Redis stream ids)", async () => {
    const ids = ["5-8", "5-9", "6-0", "10-0", "10-1"];
    const broker = new Broker({ eventLog: new ListLog({ idOf: (n) => ids[n - 1] }) });
    const live = open(broker);
    assert.deepEqual(await publishMany(broker, 3), ids.slice(0, 3));
    const reader = resume(broker, "5-9");
    assert.deepEqual(await publishMany(broker, 2), ids.slice(3));
    assert.deepEqual((await reader.events(4)).map((e) => e.lastEventId), [
      "6-0",
      "6-0",
      "10-0",
      "10-1",
    ]);
    assert.deepEqual((await live.events(5)).map((e) => e.lastEventId), ids);
    broker.close();
  });

  test("two clients replaying the same event share its bytes", async () => {
    const broker = new Broker();
    const first = await broker.publish({ data: "one" });
    await broker.publish({ data: "two" });
    const chunks = await Promise.all([0, 1].map(async () => {
      const request = new Request("http://x/", { headers: { "last-event-id": first } });
      const reader = broker.subscribe(request).body!.getReader();
      await reader.read(); // retry:
      return (await reader.read()).value;
    }));
    assert.ok(chunks[0] === chunks[1]);
    broker.close();
  });
});

describe("EventLog", () => {
  /**
   * A shared log as another process sees it: other writers append to the
   * same memory log, reads answer later, and while `held` the news of new
   * events is late, as it is for a process whose read of Redis lags.
   */
  function sharedLog() {
    const memory = new MemoryLog();
    const late: (() => void)[] = [];
    const log = {
      held: false,
      memory,
      release: () => late.splice(0).forEach((tell) => tell()),
      lastId: memory.lastId,
      append: (events: readonly NewEvent[]) => memory.append(events),
      read: async (afterId: string | null, limit: number) => {
        await Promise.resolve();
        return memory.read(afterId, limit);
      },
      listen: (listener: (events: readonly LogEvent[]) => void) =>
        memory.listen((events) => {
          if (log.held) late.push(() => listener(events));
          else listener(events);
        }),
    } satisfies EventLog & Record<string, unknown>;
    return log;
  }

  test("a client resuming from an event this broker has not seen yet gets nothing twice", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log });
    await broker.publish({ data: "1" });
    log.held = true;
    await appendOne(log.memory, "data: 2\n\n"); // published through another process
    const third = await appendOne(log.memory, "data: 3\n\n");
    // The client saw event 3 on the other process, and reconnects here.
    const reader = open(broker, "", { headers: { "last-event-id": third } });
    log.held = false;
    log.release();
    await broker.publish({ data: "4" });
    await broker.publish({ data: "5" });
    // Event 4 may come as replay or live; 2 and 3 must not come again.
    const events = await reader.events(3);
    assert.deepEqual(events.filter((e) => e.event === "message").map((e) => e.data), ["4", "5"]);
    assert.equal(events.filter((e) => e.event === "replayed").length, 1);
    await broker.publish({ data: "6" });
    assert.equal((await reader.event()).data, "6", "live from here on, nothing again");
    broker.close();
  });

  test("a client that leaves while it waits for its event is forgotten", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log });
    await broker.publish({ data: "1" });
    log.held = true;
    const second = await appendOne(log.memory, "data: 2\n\n"); // through another process
    const request = new Request("http://x/", { headers: { "last-event-id": second } });
    const body = broker.subscribe(request).body!;
    await new Promise((resolve) => setTimeout(resolve, 0)); // its read answers: it waits
    await body.cancel();
    log.held = false;
    log.release();
    const live = open(broker);
    await broker.publish({ data: "3" });
    assert.deepEqual((await live.events(2)).map((e) => e.data), ["2", "3"]);
    assert.deepEqual([broker.stats().clients, broker.stats().replayed], [1, 0]);
    broker.close();
  });

  test("with reads that answer later: an id the log cannot place gets the gap event", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first] = await publishMany(broker, 2);
    log.late = true;
    const reader = open(broker, "", { headers: { "last-event-id": "9-9" } });
    assert.deepEqual((await reader.events(4)).map((e) => [e.event, e.data]), [
      ["gap", JSON.stringify({ oldestId: first })],
      ["message", "x"],
      ["message", "x"],
      ["replayed", '{"count":2}'],
    ]);
    broker.close();
  });

  test("with reads slower than publishing, replay and live events join with no gap", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first, ...backlog] = await publishMany(broker, 10);
    log.late = 5; // ms: each read answers after several publishes
    const reader = open(broker, "", { headers: { "last-event-id": first } });
    const during = [];
    for (let n = 0; n < 20; n++) during.push(await broker.publish({ data: "x" }));
    const end = await broker.publish({ data: "end" });
    const events = await reader.until((e) => e.lastEventId === end && e.event === "message");
    const messages = events.filter((e) => e.event === "message").map((e) => e.lastEventId);
    assert.deepEqual(messages, [...backlog, ...during, end]);
    assert.ok(broker.stats().replayed >= backlog.length, "the backlog came as replay");
    broker.close();
  });

  test("a client waiting for its event gets heartbeats meanwhile", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log, heartbeat: 20 });
    await broker.publish({ data: "1" });
    log.held = true;
    const second = await appendOne(log.memory, "data: 2\n\n"); // through another process
    const reader = open(broker, "", { headers: { "last-event-id": second } });
    assert.equal((await reader.next())?.type, "comment");
    log.held = false;
    log.release();
    broker.close();
  });

  test("a log that does not store the event: publish rejects, the handler answers 503", async () => {
    const log = new MemoryLog();
    const failing: EventLog = {
      get lastId() {
        return log.lastId;
      },
      append: () => Promise.reject(new Error("connection lost")),
      read: (afterId, limit) => log.read(afterId, limit),
      listen: (listener) => log.listen(listener),
    };
    const broker = new Broker({ eventLog: failing });
    const reader = open(broker);
    await assert.rejects(broker.publish({ data: "x" }), (error) => {
      assert.ok(error instanceof EventLogError);
      assert.match(error.message, /connection lost/);
      return true;
    });
    const response = await createHandler(broker)(
      new Request("http://localhost/publish", { method: "POST", body: "x" }),
    );
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("retry-after"), "1");
    assert.match((await response.json()).error, /event log is unavailable/);
    assert.equal(broker.stats().published, 0);
    // The stream is untouched: the next item is the end, at close.
    broker.close();
    assert.equal(await reader.next(), null);
  });

  test("a read that fails ends only the resuming client's stream, to be retried", async () => {
    const log = new MemoryLog();
    const broken: EventLog = {
      get lastId() {
        return log.lastId;
      },
      append: (events, options) => log.append(events, options),
      read: () => Promise.reject(new Error("connection lost")),
      listen: (listener) => log.listen(listener),
    };
    const lines: string[] = [];
    const broker = new Broker({ eventLog: broken, logger: (line) => lines.push(line) });
    const live = open(broker);
    const id = await broker.publish({ data: "1" });
    const resuming = open(broker, "", { headers: { "last-event-id": id } });
    assert.equal(await resuming.next(), null);
    assert.ok(lines.some((line) => /reading the event log failed: connection lost/.test(line)));
    await broker.publish({ data: "2" });
    assert.deepEqual((await live.events(2)).map((e) => e.data), ["1", "2"]);
    // A client that left before its read failed is not reported as ended by it.
    const before = lines.length;
    const request = new Request("http://x/", { headers: { "last-event-id": id } });
    await broker.subscribe(request).body!.cancel();
    await new Promise((resolve) => setTimeout(resolve, 0)); // the read fails
    assert.deepEqual(lines.slice(before), [
      "client connected (2 open)",
      "client disconnected (1 open)",
    ]);
    broker.close();
  });

  test("whatever a failed read rejects with, with or without a logger, the stream ends", async () => {
    for (const options of [{}, { logger: () => {} }]) {
      const log = new ListLog();
      log.read = () => Promise.reject(undefined);
      const broker = new Broker({ eventLog: log, ...options });
      const [id] = await publishMany(broker, 1);
      const resuming = open(broker, "", { headers: { "last-event-id": id } });
      assert.equal(await resuming.next(), null);
      assert.equal(broker.stats().clients, 0);
      broker.close();
    }
  });

  test("EventLogError says why, whatever the log rejected with, and keeps it as the cause", async () => {
    for (const reason of ["no route to host", undefined]) {
      const log = new ListLog();
      log.append = () => Promise.reject(reason);
      const broker = new Broker({ eventLog: log });
      await assert.rejects(broker.publish({ data: "x" }), (error) => {
        assert.ok(error instanceof EventLogError);
        assert.equal(error.name, "EventLogError");
        assert.equal(error.message, `the event log did not store the event: ${reason}`);
        assert.equal(error.cause, reason);
        return true;
      });
      broker.close();
    }
  });

  test("publish hands the log the event's topics and its encoded fields without the id", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    await broker.publish({ event: "e", data: "d" }, { topics: ["a", "b"] });
    await broker.publish({ data: "to all" });
    await broker.publish({ data: "one" }, { topics: ["a"] });
    assert.deepEqual(log.events, [
      { id: "1-1001", topics: ["a", "b"], text: "event: e\ndata: d\n\n" },
      { id: "1-1002", topics: [], text: "data: to all\n\n" },
      { id: "1-1003", topics: ["a"], text: "data: one\n\n" },
    ]);
    broker.close();
  });

  test("events another process appends reach this broker's clients, with no publish here", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log });
    const reader = open(broker);
    const id = await appendOne(log.memory, "data: from elsewhere\n\n");
    assert.deepEqual(await reader.event(), {
      type: "event",
      event: "message",
      data: "from elsewhere",
      lastEventId: id,
    });
    assert.equal(broker.stats().lastEventId, id);
    broker.close();
  });

  test("a broker that has seen no event yet places clients that resume from others' events", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log });
    log.held = true;
    const first = await appendOne(log.memory, "data: 1\n\n");
    const second = await appendOne(log.memory, "data: 2\n\n");
    const fromFirst = open(broker, "", { headers: { "last-event-id": first } });
    const fromSecond = open(broker, "", { headers: { "last-event-id": second } });
    await new Promise((resolve) => setTimeout(resolve, 0)); // their reads answer
    log.held = false;
    log.release();
    await broker.publish({ data: "3" });
    // Event 3 may come as replay or live; each event comes once.
    const messages = (events: SseEvent[]) =>
      events.filter((e) => e.event === "message").map((e) => e.data);
    assert.deepEqual(messages(await fromFirst.events(3)), ["2", "3"]);
    assert.deepEqual(messages(await fromSecond.events(2)), ["3"]);
    broker.close();
  });

  test("with reads that answer later: a backlog longer than one read is queued without reading", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first] = await publishMany(broker, 1500);
    log.late = true;
    const reader = open(broker, "", { headers: { "last-event-id": first } });
    await eventually(() => broker.stats().replayed === 1499, 2000, "the whole backlog queued");
    const events = await reader.events(1500);
    assert.equal(events[1499].data, '{"count":1499}');
    broker.close();
  });

  test("with reads that answer later: the client's reading does not start a second read", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const ids = await publishMany(broker, 1000);
    log.late = true;
    const reader = open(broker, "", { headers: { "last-event-id": ids[0] } });
    const events = await reader.events(1000);
    assert.deepEqual(events.map((e) => e.lastEventId), [...ids.slice(1), ids[999]]);
    assert.equal(events[999].data, '{"count":999}');
    broker.close();
  });

  test("with reads slower than publishing: events published during a read are not lost", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first] = await publishMany(broker, 3);
    log.late = 20; // ms: publishes during the read go out before it answers
    const reader = open(broker, "", { headers: { "last-event-id": first } });
    const during = await publishMany(broker, 2);
    const after = await broker.publish({ data: "after" });
    const events = await reader.until((e) => e.lastEventId === after);
    const messages = events.filter((e) => e.event === "message").map((e) => e.lastEventId);
    assert.deepEqual(messages, [...log.events.slice(1, 3).map((e) => e.id), ...during, after]);
    broker.close();
  });

  test("with reads that answer later: a client gone before its read answers is left alone", async () => {
    const log = new ListLog();
    const broker = new Broker({ eventLog: log });
    const [first] = await publishMany(broker, 3);
    log.late = true;
    const request = new Request("http://x/", { headers: { "last-event-id": first } });
    await broker.subscribe(request).body!.cancel();
    const live = open(broker);
    await new Promise((resolve) => setTimeout(resolve, 0)); // the read answers
    await broker.publish({ data: "after" });
    assert.equal((await live.event()).data, "after");
    assert.equal(broker.stats().replayed, 0);
    broker.close();
  });
});

describe("createHandler", () => {
  const setup = () => {
    const broker = new Broker();
    const handler = createHandler(broker, { maxBodyBytes: 1024 });
    const reader = open(broker);
    const post = (body: BodyInit, type = "application/json", query = "") =>
      handler(
        new Request(`http://localhost/publish${query}`, {
          method: "POST",
          body,
          headers: { "content-type": type },
          duplex: "half", // Node's Request needs it for a stream body
        } as RequestInit),
      );
    return { broker, handler, reader, post };
  };

  test("publishes JSON and text bodies and answers with the id", async () => {
    const { broker, reader, post } = setup();
    const first = await post(JSON.stringify({ data: "hello", event: "greet" }));
    assert.equal(first.status, 200);
    const { id } = await first.json();
    const second = await post("plain text", "text/plain", "?event=note");
    assert.equal(second.status, 200);
    const third = await post(JSON.stringify({ data: { n: 1 } }));
    const events = await reader.events(3);
    assert.deepEqual(events.map((e) => [e.event, e.data]), [
      ["greet", "hello"],
      ["note", "plain text"],
      ["message", '{"n":1}'],
    ]);
    assert.equal(events[0].lastEventId, id);
    assert.equal(third.status, 200);
    broker.close();
  });

  test("answers 400 naming the problem, and nothing reaches a subscriber", async () => {
    const { broker, reader, post } = setup();
    const cases: [BodyInit, RegExp][] = [
      ["{not json", /JSON/],
      ["[1]", /object/],
      [JSON.stringify({ event: "x" }), /^data/],
      [JSON.stringify({ data: "x", event: "a\r\nid: 9" }), /^event/],
      [JSON.stringify({ data: "x", event: 5 }), /^event/],
      [JSON.stringify({ data: "x", retry: -1 }), /^retry/],
      [JSON.stringify({ data: "x", id: "1" }), /^id/],
      [JSON.stringify({ data: "x", topic: 5 }), /^topic/],
      [JSON.stringify({ data: "x", topics: ["a"] }), /unknown field "topics"/],
      [new Uint8Array([0xff, 0xfe]), /UTF-8/],
    ];
    for (const [body, reason] of cases) {
      const response = await post(body);
      assert.equal(response.status, 400, String(reason));
      assert.match((await response.json()).error, reason);
    }
    await post(JSON.stringify({ data: "only this one" }));
    assert.equal((await reader.event()).data, "only this one");
    assert.equal(broker.stats().published, 1);
    broker.close();
  });

  test("refuses a body over the limit with 413, even without content-length", async () => {
    const { broker, post } = setup();
    assert.equal((await post("x".repeat(1025), "text/plain")).status, 413);
    let pulled = 0;
    const endless = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        controller.enqueue(new Uint8Array(512));
      },
    });
    const response = await post(endless, "text/plain");
    assert.equal(response.status, 413);
    assert.ok(pulled < 10, "stopped reading once over the limit");
    assert.equal(broker.stats().published, 0);
    broker.close();
  });

  test("authorize is a hook: any function decides, per action", async () => {
    const broker = new Broker();
    const asked: string[] = [];
    const handler = createHandler(broker, {
      authorize: (request, action) => {
        asked.push(action);
        return action === "subscribe" || request.headers.get("x-role") === "publisher";
      },
    });
    const post = (headers: HeadersInit) =>
      handler(new Request("http://x/publish", { method: "POST", body: "hi", headers }));
    const refused = await post({});
    assert.equal(refused.status, 401);
    assert.match(refused.headers.get("www-authenticate")!, /^Bearer/);
    assert.equal((await post({ "x-role": "publisher" })).status, 200);
    const stream = await handler(new Request("http://x/events"));
    assert.equal(stream.status, 200);
    await stream.body!.cancel();
    assert.equal((await handler(new Request("http://x/stats"))).status, 200);
    // /stats is open; publishing decides whether it names topics.
    assert.deepEqual(asked, ["publish", "publish", "subscribe", "publish"]);
    broker.close();
  });

  test("answers 404 for unknown paths and 405 with Allow for wrong methods", async () => {
    const { broker, handler } = setup();
    assert.equal((await handler(new Request("http://localhost/nope"))).status, 404);
    const wrong = await handler(new Request("http://localhost/publish"));
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get("allow"), "POST");
    const stats = await (await handler(new Request("http://localhost/stats"))).json();
    assert.equal(stats.clients, 1);
    broker.close();
  });
});

describe("createHandler: publishing", () => {
  const setup = (maxBodyBytes = 1024) => {
    const broker = new Broker();
    const handler = createHandler(broker, { maxBodyBytes });
    const reader = open(broker);
    const post = (body: BodyInit | null, headers: HeadersInit = {}, query = "") =>
      handler(
        new Request(`http://localhost/publish${query}`, {
          method: "POST",
          body,
          headers,
          duplex: "half", // Node's Request needs it for a stream body
        } as RequestInit),
      );
    return { broker, reader, post };
  };
  const json = { "content-type": "application/json" };

  test("reads JSON media types as JSON and any other body as the data", async () => {
    const { broker, reader, post } = setup();
    const types = [
      ["application/json", true],
      ["Application/JSON; charset=utf-8", true],
      ["application/vnd.api+json", true],
      ["text/plain", false],
      ["application/jsonl", false],
      ["text/plain; profile=application/json", false],
    ] as const;
    for (const [type] of types) {
      assert.equal((await post('{"data":"x"}', { "content-type": type })).status, 200, type);
    }
    const events = await reader.events(types.length);
    for (const [i, [type, asJson]] of types.entries()) {
      assert.equal(events[i].data, asJson ? "x" : '{"data":"x"}', type);
    }
    broker.close();
  });

  test("a text body takes its event and topics from the query", async () => {
    const { broker, post } = setup();
    const news = open(broker, "?topic=news");
    await post("plain", {}, "?event=note&topic=sport&topic=news");
    assert.deepEqual(await news.event(), {
      type: "event",
      event: "note",
      data: "plain",
      lastEventId: broker.stats().lastEventId!,
    });
    broker.close();
  });

  test("an empty body publishes an event with empty data", async () => {
    const { broker, reader, post } = setup();
    assert.equal((await post(null)).status, 200);
    assert.equal((await reader.event()).data, "");
    broker.close();
  });

  test("a JSON body may carry a comment, a retry and topics", async () => {
    const { broker, post } = setup();
    const news = broker.subscribe(new Request("http://x/?topic=news")).body!.getReader();
    await news.read(); // retry:
    const body = { data: "d", event: "e", retry: 5, comment: "c", topic: ["news"] };
    const response = await post(JSON.stringify(body), json);
    const { id } = await response.json();
    assert.equal(
      new TextDecoder().decode((await news.read()).value),
      `id: ${id}\n: c\nevent: e\nretry: 5\ndata: d\n\n`,
    );
    broker.close();
  });

  test("answers 400 with the exact reason for what is not a publishable JSON body", async () => {
    const { broker, reader, post } = setup();
    const cases: [string, string][] = [
      ["{not json", "body is not valid JSON"],
      ["null", "body must be a JSON object"],
      ["5", "body must be a JSON object"],
      ["[]", "a batch needs at least one event"],
      ['[{"data":"x"},5]', "[1] must be a JSON object"],
      ['[{"data":"x","nope":1}]', '[0] has unknown field "nope"'],
      [`{"data":"x","${"f".repeat(100)}":1}`, `unknown field "${"f".repeat(64)}"`],
      ['{"data":"x","topic":5}', "topic must be 1 to 256 printable characters"],
    ];
    for (const [body, error] of cases) {
      const response = await post(body, json);
      assert.equal(response.status, 400, body);
      assert.deepEqual(await response.json(), { error });
    }
    await post("valid");
    assert.equal((await reader.event()).data, "valid");
    broker.close();
  });

  test("a body of exactly maxBodyBytes is taken, with or without content-length", async () => {
    const { broker, reader, post } = setup(16);
    const streamed = (text: string) =>
      new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode(text));
          controller.close();
        },
      });
    assert.equal((await post("x".repeat(16))).status, 200);
    assert.equal((await post(streamed("y".repeat(16)))).status, 200);
    for (const body of ["x".repeat(17), streamed("y".repeat(17))]) {
      const response = await post(body);
      assert.equal(response.status, 413);
      assert.deepEqual(await response.json(), { error: "body is larger than 16 bytes" });
    }
    assert.deepEqual((await reader.events(2)).map((e) => e.data.length), [16, 16]);
    assert.throws(() => createHandler(broker, { maxBodyBytes: -1 }), {
      name: "RangeError",
      message: "maxBodyBytes must be a non-negative integer",
    });
    broker.close();
  });

  test("a declared content-length over maxBodyBytes is refused before the body is read", async () => {
    const { broker, post } = setup(16);
    let pulled = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        controller.enqueue(new Uint8Array(4));
        if (pulled === 5) controller.close();
      },
    }, { highWaterMark: 0 });
    const response = await post(body, { "content-length": "20" });
    assert.equal(response.status, 413);
    assert.equal(pulled, 0);
    const exact = await post("x".repeat(16), { "content-length": "16" });
    assert.equal(exact.status, 200);
    broker.close();
  });

  test("publishing to a closed broker fails rather than claim the event was kept", async () => {
    const { broker, post } = setup();
    broker.close();
    await assert.rejects(post("x"), /the broker is closed/);
  });
});

describe("createHandler: routes, CORS and authorization", () => {
  test("answers 404, and 405 naming the allowed methods, with their reasons", async () => {
    const handler = createHandler(new Broker());
    const missing = await handler(new Request("http://x/nope"));
    assert.equal(missing.status, 404);
    assert.deepEqual(await missing.json(), { error: "not found" });
    const wrong = await handler(new Request("http://x/publish", { method: "PUT" }));
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get("allow"), "POST");
    assert.deepEqual(await wrong.json(), { error: "use POST" });
  });

  test("a preflight names the route's methods and the headers clients send", async () => {
    const handler = createHandler(new Broker());
    const preflight = await handler(new Request("http://x/events", { method: "OPTIONS" }));
    assert.equal(preflight.status, 204);
    assert.deepEqual(Object.fromEntries(preflight.headers), {
      "access-control-allow-headers": "authorization, content-type, idempotency-key, last-event-id",
      "access-control-allow-methods": "GET",
      "access-control-allow-origin": "*",
      "access-control-max-age": "86400",
    });
  });

  test("by default every response allows any origin", async () => {
    const broker = new Broker();
    const handler = createHandler(broker);
    const requests = [
      new Request("http://x/stats"),
      new Request("http://x/publish", { method: "POST", body: "x" }),
      new Request("http://x/nope"),
    ];
    for (const request of requests) {
      const response = await handler(request);
      assert.equal(response.headers.get("access-control-allow-origin"), "*", request.url);
      assert.equal(response.headers.get("vary"), null);
    }
    broker.close();
  });

  test("a list of origins: a listed caller is named, any other gets no CORS header", async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      allowOrigin: ["https://a.example", "https://b.example"],
    });
    const get = (origin?: string) =>
      handler(new Request("http://x/stats", { headers: origin ? { origin } : {} }));
    for (
      const [origin, allowed] of [
        ["https://b.example", "https://b.example"],
        ["https://c.example", null],
        [undefined, null],
      ]
    ) {
      const response = await get(origin ?? undefined);
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("access-control-allow-origin"), allowed, String(origin));
      assert.equal(response.headers.get("vary"), "origin");
    }
    const stream = await handler(
      new Request("http://x/events", { headers: { origin: "https://c.example" } }),
    );
    assert.equal(stream.headers.get("access-control-allow-origin"), null);
    await stream.body!.cancel();
    broker.close();
  });

  test("a refused request gets 401 with a Bearer challenge", async () => {
    const handler = createHandler(new Broker(), { authorize: () => false });
    const response = await handler(new Request("http://x/events"));
    assert.equal(response.status, 401);
    assert.equal(response.headers.get("www-authenticate"), 'Bearer realm="sse"');
    assert.deepEqual(await response.json(), { error: "a valid token is required" });
  });

  test("turns off the idle timeout of a stream's connection where the server has one", async () => {
    const broker = new Broker();
    const handler = createHandler(broker);
    const timeouts: number[] = [];
    const bun = { timeout: (_request: Request, seconds: number) => timeouts.push(seconds) };
    await (await handler(new Request("http://x/events"), bun)).body!.cancel();
    assert.deepEqual(timeouts, [0]);
    // Deno passes connection info there, with no timeout method.
    const deno = { remoteAddr: {} } as unknown as Parameters<typeof handler>[1];
    await (await handler(new Request("http://x/events"), deno)).body!.cancel();
    broker.close();
  });
});

describe("tokenAuth", () => {
  const authorize = tokenAuth({ publish: "pub-s3cret", subscribe: "sub-s3cret" });
  const asks = (action: "publish" | "subscribe", authorization?: string, query = "") =>
    authorize(
      new Request(`http://x/${query}`, {
        headers: authorization === undefined ? {} : { authorization },
      }),
      action,
    );

  test("takes the token in an Authorization: Bearer header, any case, spaces around", () => {
    assert.equal(asks("publish", "Bearer pub-s3cret"), true);
    assert.equal(asks("publish", "bearer   pub-s3cret  "), true);
    assert.equal(asks("subscribe", "Bearer sub-s3cret"), true);
  });

  test("refuses a wrong, partial or longer token, and a malformed header with its reason", () => {
    for (
      const header of [
        "Bearer pub-s3creT",
        "Bearer pub-s3cre",
        "Bearer pub-s3cret2",
        "Bearer sub-s3cret",
      ]
    ) assert.equal(asks("publish", header), false, header);
    // The one bearer parser of mod.ts: a header that is no bearer token is refused as such.
    for (
      const header of [
        "xBearer pub-s3cret",
        "Bearer pub-s3cret junk",
        "Bearerpub-s3cret",
        "Basic pub-s3cret",
        "pub-s3cret",
        "Bearer ",
      ]
    ) {
      assert.throws(() => asks("publish", header), {
        name: "TokenError",
        message: "malformed authorization header",
      }, header);
      assert.throws(() => asks("subscribe", header, "?token=sub-s3cret"), {
        name: "TokenError",
      }, "nor does ?token= stand in for it");
    }
  });

  test("a subscriber may put it in ?token=, a publisher may not", () => {
    assert.equal(asks("subscribe", undefined, "?token=sub-s3cret"), true);
    assert.equal(asks("subscribe", undefined, "?token=pub-s3cret"), false);
    assert.equal(asks("publish", undefined, "?token=pub-s3cret"), false);
    assert.equal(asks("subscribe", "Bearer nope", "?token=sub-s3cret"), false, "the header wins");
  });

  test("no token at all is refused, whatever the token is", () => {
    assert.equal(asks("subscribe"), false);
    assert.equal(asks("publish"), false);
    const literal = tokenAuth({ subscribe: "null" });
    assert.equal(literal(new Request("http://x/"), "subscribe"), false);
  });

  test("an action with no token configured is open", () => {
    const open = tokenAuth({ publish: "p", subscribe: "" });
    assert.equal(open(new Request("http://x/"), "subscribe"), true);
    assert.equal(open(new Request("http://x/"), "publish"), false);
    assert.equal(tokenAuth({})(new Request("http://x/"), "publish"), true);
  });
});

describe("jwtVerifier", () => {
  // Tokens are made by an independent implementation (npm jose).
  const SECRET = "a shared secret that is 32 bytes";
  const hs256 = new TextEncoder().encode(SECRET);
  const now = () => Math.floor(Date.now() / 1000);
  const sign = (claims: jose.JWTPayload, key: CryptoKey | Uint8Array, alg: string) =>
    new jose.SignJWT(claims).setProtectedHeader({ alg }).sign(key);
  /** A token with any header, signed with HS256 by crypto.subtle directly. */
  async function handMade(
    header: object,
    claims: object | Uint8Array,
    secret = hs256,
  ): Promise<string> {
    const part = (value: object) =>
      jose.base64url.encode(value instanceof Uint8Array ? value : JSON.stringify(value));
    const input = `${part(header)}.${part(claims)}`;
    const key = await crypto.subtle.importKey(
      "raw",
      secret,
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign"],
    );
    const mac = await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(input));
    return `${input}.${jose.base64url.encode(new Uint8Array(mac))}`;
  }
  const refuses = (check: Promise<unknown>, reason: string) =>
    assert.rejects(check, (error) => {
      assert.ok(error instanceof TokenError);
      assert.equal(error.name, "TokenError");
      assert.equal(error.message, reason);
      return true;
    });

  test("verifies HS256, RS256, ES256 and EdDSA tokens and resolves with their claims", async () => {
    const claims = { sub: "user-42", sse: { subscribe: ["user/42/*"] } };
    const hs = await jwtVerifier({ secret: SECRET });
    assert.deepEqual(await hs(await sign(claims, hs256, "HS256")), claims);
    for (const alg of ["RS256", "ES256", "EdDSA"]) {
      const { publicKey, privateKey } = await jose.generateKeyPair(alg, { extractable: true });
      const verify = await jwtVerifier({ publicKey: await jose.exportSPKI(publicKey) });
      assert.deepEqual(await verify(await sign(claims, privateKey, alg)), claims, alg);
      if (alg === "EdDSA") {
        // "Ed25519" is the newer name of the same algorithm.
        assert.deepEqual(await verify(await sign(claims, privateKey, "Ed25519")), claims);
      }
    }
  });

  test("the key decides the algorithm: none, another one, or HMAC with the public key are refused", async () => {
    const { publicKey, privateKey } = await jose.generateKeyPair("RS256", { extractable: true });
    const pem = await jose.exportSPKI(publicKey);
    const rs = await jwtVerifier({ publicKey: pem });
    const hs = await jwtVerifier({ secret: SECRET });
    const unsigned = `${jose.base64url.encode('{"alg":"none"}')}.${jose.base64url.encode("{}")}.`;
    await refuses(rs(unsigned), "unsupported algorithm");
    await refuses(hs(unsigned), "unsupported algorithm");
    // Algorithm confusion: an HS256 token whose secret is the public key's text.
    const confused = await handMade({ alg: "HS256" }, {}, new TextEncoder().encode(pem));
    await refuses(rs(confused), "unsupported algorithm");
    await refuses(hs(await sign({}, privateKey, "RS256")), "unsupported algorithm");
    const es = await jose.generateKeyPair("ES256");
    await refuses(rs(await sign({}, es.privateKey, "ES256")), "unsupported algorithm");
  });

  test("refuses a crit header, a malformed token and a bad signature", async () => {
    const verify = await jwtVerifier({ secret: SECRET });
    await refuses(
      verify(await handMade({ alg: "HS256", crit: ["exp"] }, {})),
      "unsupported critical header",
    );
    const good = await sign({ sub: "a" }, hs256, "HS256");
    const [header, payload, signature] = good.split(".");
    for (
      const token of [
        "",
        "abc",
        `${header}.${payload}`,
        `${good}.x`,
        `${header}.${payload}.${signature}!`,
        `${jose.base64url.encode("[1]")}.${payload}.${signature}`,
        `${header}.${jose.base64url.encode("not json")}.${signature}`,
        `${header}.${jose.base64url.encode("null")}.${signature}`,
        `${header}.${payload.slice(1)}.${signature}`,
        `${header}.${payload}. ${signature}`,
        `${header}.${payload}.${signature} `,
        `${jose.base64url.encode("5")}.${payload}.${signature}`,
      ]
    ) await refuses(verify(token), "malformed token");
    // Signed, but not UTF-8: {"sub":"<0xff>"}.
    const notUtf8 = new Uint8Array([...new TextEncoder().encode('{"sub":"'), 0xff, 0x22, 0x7d]);
    await refuses(verify(await handMade({ alg: "HS256" }, notUtf8)), "malformed token");
    const other = new TextEncoder().encode("another secret of at least 32 bytes");
    await refuses(verify(await sign({ sub: "a" }, other, "HS256")), "bad signature");
    const tampered = `${header}.${jose.base64url.encode('{"sub":"b"}')}.${signature}`;
    await refuses(verify(tampered), "bad signature");
  });

  test("accepts each token in one spelling only: base64url without padding or stray bits", async () => {
    const verify = await jwtVerifier({ secret: SECRET });
    /** A token of these parts as they are, signed with HS256 by crypto.subtle directly. */
    const signed = async (header: string, payload: string) => {
      const key = await crypto.subtle.importKey(
        "raw",
        hs256,
        { name: "HMAC", hash: "SHA-256" },
        false,
        ["sign"],
      );
      const input = `${header}.${payload}`;
      const mac = await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(input));
      return `${input}.${jose.base64url.encode(new Uint8Array(mac))}`;
    };
    const good = await sign({ sub: "a" }, hs256, "HS256");
    assert.deepEqual(await verify(good), { sub: "a" });
    const [header, payload, signature] = good.split(".");
    // A 32-byte signature is 43 characters: the last one carries 2 bits no byte needs.
    const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const stray = alphabet[alphabet.indexOf(signature.at(-1)!) ^ 1];
    // Standard base64 of a header whose JSON makes a "/" ("???" is "Pz8/").
    const slashed = btoa('{"alg":"HS256","x":"???"}').replace(/=+$/, "");
    assert.match(slashed, /\//);
    for (
      const token of [
        `${good}=`, // padding
        `${header}.${payload}.${signature.slice(0, -1)}${stray}`, // the same bytes, spelled otherwise
        await signed(`${header}=`, payload),
        await signed(header, `${payload}==`),
        await signed(slashed, payload), // standard base64, not base64url
      ]
    ) await refuses(verify(token), "malformed token");
  });

  test("checks exp and nbf with a small leeway, and aud and iss when configured", async () => {
    const verify = await jwtVerifier({ secret: SECRET, audience: "sse", issuer: "https://id" });
    const valid = { aud: "sse", iss: "https://id" };
    const token = (claims: object) => sign({ ...valid, ...claims }, hs256, "HS256");
    assert.ok(await verify(await token({ exp: now() + 60, nbf: now() - 60 })));
    assert.ok(await verify(await token({ exp: now() - 3, nbf: now() + 3 })), "within 5 s");
    assert.ok(await verify(await token({ aud: ["other", "sse"] })));
    await refuses(verify(await token({ exp: now() - 10 })), "expired");
    await refuses(verify(await token({ exp: "tomorrow" })), "expired");
    await refuses(verify(await token({ exp: "9999999999" })), "expired"); // a string is no time
    await refuses(verify(await token({ nbf: now() + 10 })), "not yet valid");
    await refuses(verify(await token({ nbf: "now" })), "not yet valid");
    await refuses(verify(await token({ nbf: "0" })), "not yet valid");
    await refuses(verify(await token({ aud: "other" })), "wrong audience");
    await refuses(verify(await token({ aud: ["other"] })), "wrong audience");
    await refuses(verify(await sign({ iss: "https://id" }, hs256, "HS256")), "wrong audience");
    await refuses(verify(await token({ iss: "https://evil" })), "wrong issuer");
    const strict = await jwtVerifier({ secret: SECRET, leeway: 0 });
    await refuses(strict(await token({ exp: now() - 2 })), "expired");
    const open = await jwtVerifier({ secret: SECRET });
    assert.ok(await open(await sign({ aud: "any", iss: "any" }, hs256, "HS256")), "not configured");
  });

  test("refuses a key it cannot use when it is made, with a reason", async () => {
    await assert.rejects(jwtVerifier({}), {
      name: "TypeError",
      message: "give either secret or publicKey",
    });
    const both = { secret: SECRET, publicKey: "x" };
    await assert.rejects(jwtVerifier(both), {
      name: "TypeError",
      message: "give either secret or publicKey",
    });
    await assert.rejects(jwtVerifier({ secret: "short" }), {
      name: "RangeError",
      message: "secret must be at least 32 bytes",
    });
    await assert.rejects(jwtVerifier({ secret: SECRET, leeway: -1 }), {
      name: "RangeError",
      message: "leeway must be a non-negative integer",
    });
    const rsa = await jose.generateKeyPair("RS256", { extractable: true });
    const privatePem = await jose.exportPKCS8(rsa.privateKey);
    for (
      const publicKey of [
        "not a key",
        privatePem,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
      ]
    ) {
      await assert.rejects(jwtVerifier({ publicKey }), {
        name: "TypeError",
        message: "publicKey is not a PEM public key of RSA, P-256 or Ed25519",
      });
    }
  });
});

describe("topic: lines (withTopics)", () => {
  /** The text a reader gets next, whole chunks until `count` blank-line ends. */
  const chunks = async (reader: ReadableStreamDefaultReader<Uint8Array>, events: number) => {
    let text = "";
    while (text.split("\n\n").length <= events) {
      text += new TextDecoder().decode((await reader.read()).value);
    }
    return text;
  };
  const reader = (broker: Broker, query: string, options?: SubscribeOptions) =>
    broker.subscribe(new Request(`http://x/events${query}`), options).body!.getReader();

  test("each event names its topics after its id, only for clients that ask", async () => {
    const broker = new Broker({ retry: 100 });
    // Tagged and plain, with and without topics: four chunks for one burst.
    const tagged = reader(broker, "?withTopics=1");
    const plain = reader(broker, "");
    const taggedA = reader(broker, "?topic=a&withTopics=1");
    const plainA = reader(broker, "?topic=a");
    const byOption = reader(broker, "?withTopics=0", { withTopics: true });
    const notOne = reader(broker, "?withTopics=true");
    for (const r of [tagged, plain, taggedA, plainA, byOption, notOne]) await r.read(); // retry:
    const [one, two] = await Promise.all([
      broker.publish({ data: "both" }, { topics: ["a", "b"] }),
      broker.publish({ event: "e", data: "none" }),
    ]);
    const both = `id: ${one}\ntopic: a\ntopic: b\ndata: both\n\n`;
    assert.equal(await chunks(tagged, 2), `${both}id: ${two}\nevent: e\ndata: none\n\n`);
    assert.equal(await chunks(byOption, 2), `${both}id: ${two}\nevent: e\ndata: none\n\n`);
    const plainText = `id: ${one}\ndata: both\n\nid: ${two}\nevent: e\ndata: none\n\n`;
    assert.equal(await chunks(plain, 2), plainText);
    assert.equal(await chunks(notOne, 2), plainText, "only ?withTopics=1 asks");
    assert.equal(await chunks(taggedA, 1), both);
    assert.equal(await chunks(plainA, 1), `id: ${one}\ndata: both\n\n`);
    broker.close();
  });

  test("a private event names only the topics a client named or is granted", async () => {
    const broker = new Broker({ retry: 100 });
    const granted = reader(broker, "?withTopics=1", { grants: ["user/7/*"] });
    const named = reader(broker, "?topic=audit&withTopics=1", { grants: ["user/*"] });
    const other = reader(broker, "?withTopics=1", { grants: ["user/7/inbox", "z"] });
    for (const r of [granted, named, other]) await r.read(); // retry:
    const id = await broker.publish({ data: "s" }, {
      topics: ["user/7/inbox", "audit", "secret", "z"],
      private: true,
    });
    assert.equal(await chunks(granted, 1), `id: ${id}\ntopic: user/7/inbox\ndata: s\n\n`);
    assert.equal(
      await chunks(named, 1),
      `id: ${id}\ntopic: user/7/inbox\ntopic: audit\ndata: s\n\n`,
    );
    // Same topics (none) as the first, other grants: a chunk of its own.
    assert.equal(await chunks(other, 1), `id: ${id}\ntopic: user/7/inbox\ntopic: z\ndata: s\n\n`);
    broker.close();
  });

  test("clients with topic: lines and other grants share one chunk of public events", async () => {
    const broker = new Broker({ retry: 100 });
    const readers = [["user/1/*"], ["user/2/*"], []].map((grants) =>
      reader(broker, "?withTopics=1", { grants })
    );
    for (const r of readers) await r.read(); // retry:
    // Two events in one turn: one chunk joins them, built once for all three.
    await Promise.all(["p", "q"].map((data) => broker.publish({ data }, { topics: ["news"] })));
    const chunks = await Promise.all(readers.map(async (r) => (await r.read()).value));
    assert.ok(chunks[0] === chunks[1] && chunks[1] === chunks[2], "one chunk for all");
    assert.match(
      new TextDecoder().decode(chunks[0]),
      /^id: \S+\ntopic: news\ndata: p\n\nid: \S+\ntopic: news\ndata: q\n\n$/,
    );
    broker.close();
  });

  test("replayed events carry their topic: lines too", async () => {
    const broker = new Broker({ retry: 100 });
    const first = await broker.publish({ data: "1" }, { topics: ["a"] });
    const second = await broker.publish({ data: "2" }, { topics: ["b"] });
    const third = await broker.publish({ data: "3" }, { topics: ["c"], private: true });
    const resumed = broker.subscribe(
      new Request("http://x/events?withTopics=1", { headers: { "last-event-id": first } }),
      { grants: ["c"] },
    ).body!.getReader();
    const text = await chunks(resumed, 4);
    assert.equal(
      text,
      `retry: 100\n\nid: ${second}\ntopic: b\ndata: 2\n\nid: ${third}\ntopic: c\ndata: 3\n\n` +
        'event: replayed\ndata: {"count":2}\n\n',
    );
    broker.close();
  });
});

describe("private events and grants", () => {
  const grantsOf = (grants: string[], query = "") => (broker: Broker) =>
    new EventReader(broker.subscribe(new Request(`http://x/${query}`), { grants }).body!);

  test("a private event reaches only clients granted one of its topics, live", async () => {
    const broker = new Broker();
    const user42 = grantsOf(["user/42/*"])(broker);
    const everything = grantsOf(["*"])(broker);
    const exact = grantsOf(["user/42/inbox"], "?topic=user/42/inbox")(broker);
    const none = open(broker);
    const other = grantsOf(["user/4/*", "user/42", "user.42/*"])(broker);
    const second = grantsOf(["nothing", "user/42/*"])(broker);
    const dotted = grantsOf(["user/42/in.box"], "?topic=user/42/in.box")(broker);
    await broker.publish({ data: "secret" }, { topics: ["user/42/inbox"], private: true });
    await broker.publish({ data: "public" }, { topics: ["user/42/inbox"] });
    const data = async (reader: EventReader, count: number) =>
      (await reader.events(count)).map((e) => e.data);
    assert.deepEqual(await data(user42, 2), ["secret", "public"]);
    assert.deepEqual(await data(everything, 2), ["secret", "public"]);
    assert.deepEqual(await data(exact, 2), ["secret", "public"]);
    assert.deepEqual(await data(none, 1), ["public"]);
    assert.deepEqual(await data(other, 1), ["public"], "`.` is no wildcard");
    assert.deepEqual(await data(second, 2), ["secret", "public"]);
    assert.equal(broker.stats().delivered, 4 + 6);
    // Characters special to patterns are plain ones in a selector.
    await broker.publish({ data: "dotted" }, { topics: ["user/42/in.box"], private: true });
    assert.equal((await dotted.event()).data, "dotted");
    broker.close();
  });

  test("selectorsMatch: a topic, or * for any run of characters, and nothing else", () => {
    assert.equal(selectorsMatch(["user/42/*"], "user/42/feed"), true);
    assert.equal(selectorsMatch(["user/42/*"], "user/7/feed"), false);
    assert.equal(selectorsMatch(["a", "b/*"], "b/c/d"), true);
    assert.equal(selectorsMatch(["user.42"], "user/42"), false, "`.` is no wildcard");
    assert.equal(selectorsMatch(["news"], "news/x"), false, "a selector matches whole topics");
    assert.equal(selectorsMatch([], "news"), false);
    // Found by test/access_test.ts: `*` runs over line separators too.
    assert.equal(selectorsMatch(["*"], "a\u2028b\u2029c"), true);
    assert.equal(selectorsMatch(["user/*"], "user/\u2028"), true);
  });

  test("in one burst, clients with other grants get their own chunks", async () => {
    const broker = new Broker();
    const reader = (grants: string[]) =>
      broker.subscribe(new Request("http://x/?topic=news&topic=a&topic=b"), { grants }).body!
        .getReader();
    // a2's grants differ, and cover a public topic too: it still gets what a1 gets.
    const [a1, a2, b, none] = [
      reader(["a"]),
      reader(["news", "a", "z/*"]),
      reader(["b"]),
      reader([]),
    ];
    for (const r of [a1, a2, b, none]) await r.read(); // retry:
    await Promise.all([
      broker.publish({ data: "news" }, { topics: ["news"] }),
      broker.publish({ data: "for a" }, { topics: ["a", "z/1"], private: true }),
      broker.publish({ data: "for b" }, { topics: ["b"], private: true }),
    ]);
    const data = (chunk: Uint8Array) =>
      parseAll(chunk).items.map((item) => (item as SseEvent).data);
    const chunks = await Promise.all([a1, a2, b, none].map(async (r) => (await r.read()).value!));
    assert.deepEqual(chunks.map(data), [["news", "for a"], ["news", "for a"], ["news", "for b"], [
      "news",
    ]]);
    assert.ok(chunks[0] === chunks[1], "other grants, the same events: one shared chunk");
    assert.ok(chunks[0] !== chunks[2]);
    broker.close();
  });

  test("a client granted none of a burst's events gets nothing from it, not an empty chunk", async () => {
    const broker = new Broker({ heartbeat: 20 });
    const reader = broker.subscribe(new Request("http://x/")).body!.getReader();
    await reader.read(); // retry:
    await broker.publish({ data: "hidden" }, { topics: ["a"], private: true });
    // The next bytes are the heartbeat: nothing was queued, not even nothing.
    assert.equal(new TextDecoder().decode((await reader.read()).value), ": \n\n");
    assert.equal(broker.stats().delivered, 0);
    broker.close();
  });

  test("private events are replayed only to granted clients", async () => {
    const broker = new Broker();
    const start = await broker.publish({ data: "start" });
    await broker.publish({ data: "secret" }, { topics: ["a"], private: true });
    await broker.publish({ data: "public" }, { topics: ["a"] });
    const resume = (grants: string[]) =>
      new EventReader(
        broker.subscribe(new Request("http://x/", { headers: { "last-event-id": start } }), {
          grants,
        }).body!,
      );
    const granted = resume(["a"]);
    const refused = resume(["b"]);
    assert.deepEqual((await granted.events(3)).map((e) => e.data), [
      "secret",
      "public",
      '{"count":2}',
    ]);
    assert.deepEqual((await refused.events(2)).map((e) => e.data), ["public", '{"count":1}']);
    broker.close();
  });

  test("publish refuses a private event without a topic, or a private that is not a boolean", async () => {
    const broker = new Broker();
    await assert.rejects(broker.publish({ data: "x" }, { private: true }), {
      name: "MessageError",
      message: "private events need at least one topic",
    });
    const notBoolean = { topics: ["a"], private: "yes" as unknown as boolean };
    await assert.rejects(broker.publish({ data: "x" }, notBoolean), {
      name: "MessageError",
      message: "private must be true or false",
    });
    assert.equal(broker.stats().published, 0);
    broker.close();
  });

  test("a stream ends when its permission expires", async () => {
    const broker = new Broker();
    const reader = new EventReader(
      broker.subscribe(new Request("http://x/"), { expires: Date.now() + 50 }).body!,
    );
    const past = new EventReader(
      broker.subscribe(new Request("http://x/"), { expires: Date.now() - 1000 }).body!,
    );
    assert.equal(await past.next(), null);
    assert.equal(await reader.next(), null);
    assert.equal(broker.stats().clients, 0);
    const lasting = new EventReader(
      // Beyond the longest timer (24.8 days): it must not fire at once.
      broker.subscribe(new Request("http://x/"), { expires: Date.now() + 30 * 86_400_000 }).body!,
    );
    const far = broker.subscribe(new Request("http://x/"), { expires: Date.now() + 60_000 });
    await far.body!.cancel(); // its timer is cleared with it
    await broker.publish({ data: "still here" });
    assert.equal((await lasting.event()).data, "still here");
    broker.close();
  });
});

describe("createHandler with grants", () => {
  const post = (handler: ReturnType<typeof createHandler>, body: object, headers = {}) =>
    handler(
      new Request("http://x/publish", {
        method: "POST",
        body: JSON.stringify(body),
        headers: { "content-type": "application/json", ...headers },
      }),
    );

  test("publishing needs a publish grant for every topic; no topic needs `*`", async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      authorize: () => ({ publish: ["user/42/*", "news"] }),
    });
    assert.equal((await post(handler, { data: "x", topic: ["news", "user/42/a"] })).status, 200);
    for (
      const [topic, refused] of [
        [["news", "sport"], '"sport"'],
        ["user/4", '"user/4"'],
        [undefined, '"an event with no topic"'],
      ] as const
    ) {
      const response = await post(handler, { data: "x", topic });
      assert.equal(response.status, 403, String(topic));
      assert.deepEqual(await response.json(), { error: `no publish grant for ${refused}` });
    }
    const anywhere = createHandler(broker, { authorize: () => ({ publish: ["*"] }) });
    assert.equal((await post(anywhere, { data: "x" })).status, 200);
    const nothing = createHandler(broker, { authorize: () => ({}) });
    assert.equal((await post(nothing, { data: "x", topic: "a" })).status, 403);
    assert.equal((await post(nothing, { data: "x" })).status, 403);
    assert.equal(broker.stats().published, 2);
    broker.close();
  });

  test("private: true in JSON or ?private=1 publishes privately; the subscriber's grants decide", async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      authorize: (request) => ({
        subscribe: [new URL(request.url).searchParams.get("user")!],
        publish: ["*"],
      }),
    });
    const stream = (user: string) =>
      handler(new Request(`http://x/events?user=${user}`)).then((r) => new EventReader(r.body!));
    const [ann, bob] = [await stream("ann"), await stream("bob")];
    assert.equal(
      (await post(handler, { data: "to ann", topic: "ann", private: true })).status,
      200,
    );
    const text = await handler(
      new Request("http://x/publish?topic=bob&private=1", { method: "POST", body: "to bob" }),
    );
    assert.equal(text.status, 200);
    await post(handler, { data: "to all", topic: "bob" });
    assert.deepEqual((await ann.events(2)).map((e) => e.data), ["to ann", "to all"]);
    assert.deepEqual((await bob.events(2)).map((e) => e.data), ["to bob", "to all"]);
    const bad = await post(handler, { data: "x", topic: "a", private: "yes" });
    assert.equal(bad.status, 400);
    assert.deepEqual(await bad.json(), { error: "private must be true or false" });
    broker.close();
  });

  test("a hook that returns neither true nor grants refuses", async () => {
    for (const result of [undefined, null, 0, "yes"]) {
      const handler = createHandler(new Broker(), {
        authorize: () => result as unknown as boolean,
      });
      assert.equal((await handler(new Request("http://x/events"))).status, 401, String(result));
    }
  });

  test("a TokenError from authorize is a 401 that names the reason", async () => {
    const handler = createHandler(new Broker(), {
      authorize: () => {
        throw new TokenError('expired "soon"');
      },
    });
    const response = await handler(new Request("http://x/events"));
    assert.equal(response.status, 401);
    assert.equal(
      response.headers.get("www-authenticate"),
      'Bearer error="invalid_token", error_description="expired soon"',
    );
    assert.deepEqual(await response.json(), { error: 'expired "soon"' });
    const failing = createHandler(new Broker(), {
      authorize: () => {
        throw new Error("database down");
      },
    });
    await assert.rejects(failing(new Request("http://x/events")), /database down/);
  });

  test("listed origins may send cookies; any origin may not", async () => {
    const listed = createHandler(new Broker(), { allowOrigin: ["https://a.example"] });
    const request = () =>
      new Request("http://x/stats", { headers: { origin: "https://a.example" } });
    const response = await listed(request());
    assert.equal(response.headers.get("access-control-allow-origin"), "https://a.example");
    assert.equal(response.headers.get("access-control-allow-credentials"), "true");
    const other = await listed(
      new Request("http://x/stats", { headers: { origin: "https://b.example" } }),
    );
    assert.equal(other.headers.get("access-control-allow-credentials"), null);
    const any = await createHandler(new Broker())(request());
    assert.equal(any.headers.get("access-control-allow-credentials"), null);
  });
});

describe("jwtAuth", () => {
  const SECRET = "a shared secret that is 32 bytes";
  const key = new TextEncoder().encode(SECRET);
  const token = (claims: jose.JWTPayload) =>
    new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" }).sign(key);
  const ask = async (
    authorize: Authorize,
    action: "subscribe" | "publish",
    init: RequestInit,
    query = "",
  ) => await authorize(new Request(`http://x/${query}`, init), action);
  const grants = { subscribe: ["user/42/*"], publish: ["user/42/*"] };

  test("takes the token from the Authorization header, else the cookie, else ?token= for subscribers", async () => {
    const authorize = await jwtAuth({ secret: SECRET });
    const exp = Math.floor(Date.now() / 1000) + 600;
    const signed = await token({ sse: grants, exp });
    // The stream may last as long as the token, with the same 5 s of leeway.
    const expected = {
      subscribe: grants.subscribe,
      publish: grants.publish,
      expires: (exp + 5) * 1000,
    };
    assert.deepEqual(
      await ask(authorize, "publish", { headers: { authorization: `Bearer ${signed}` } }),
      expected,
    );
    const cookie = { headers: { cookie: `theme=dark; sse_token=${signed}; x=1` } };
    assert.deepEqual(await ask(authorize, "subscribe", cookie), expected);
    assert.deepEqual(await ask(authorize, "subscribe", {}, `?token=${signed}`), expected);
    assert.equal(
      await ask(authorize, "publish", {}, `?token=${signed}`),
      false,
      "not for publishing",
    );
    const spaced = { headers: { cookie: `sse_token=${signed} ; x=1` } };
    assert.deepEqual(await ask(authorize, "subscribe", spaced), expected);
    assert.equal(
      await ask(authorize, "subscribe", { headers: { cookie: "sse_tokenX; a=1" } }),
      false,
    );
    const header = (value: string) => ({ headers: { authorization: value } });
    assert.deepEqual(await ask(authorize, "publish", header(`Bearer  ${signed}`)), expected);
    for (const value of [`xBearer ${signed}`, `Bearer ${signed} junk`]) {
      await assert.rejects(ask(authorize, "publish", header(value)), {
        name: "TokenError",
        message: "malformed authorization header",
      });
    }
    const named = await jwtAuth({ secret: SECRET, cookie: "auth" });
    assert.deepEqual(
      await ask(named, "subscribe", { headers: { cookie: `auth=${signed}` } }),
      expected,
    );
    assert.equal(await ask(named, "subscribe", cookie), false);
  });

  test("grants come from the configured claim; a token without it grants nothing", async () => {
    const authorize = await jwtAuth({ secret: SECRET, claim: "mercure" });
    const bearer = async (claims: jose.JWTPayload) => ({
      headers: { authorization: `Bearer ${await token(claims)}` },
    });
    assert.deepEqual(
      await ask(authorize, "subscribe", await bearer({ mercure: { subscribe: ["a"] } })),
      {
        subscribe: ["a"],
        publish: undefined,
        expires: undefined,
      },
    );
    assert.deepEqual(await ask(authorize, "subscribe", await bearer({ sse: grants })), {
      subscribe: undefined,
      publish: undefined,
      expires: undefined,
    });
    for (const claim of [5, null, { subscribe: "a" }, { publish: [1] }, { subscribe: ["a", 1] }]) {
      await assert.rejects(ask(authorize, "subscribe", await bearer({ mercure: claim })), {
        name: "TokenError",
        message: "malformed mercure claim",
      });
    }
  });

  test("no token: 401, or public events only when anonymous subscribers are allowed", async () => {
    const closed = await jwtAuth({ secret: SECRET });
    assert.equal(await ask(closed, "subscribe", {}), false);
    const open = await jwtAuth({ secret: SECRET, allowAnonymous: true });
    assert.deepEqual(await ask(open, "subscribe", {}), {});
    assert.equal(await ask(open, "publish", {}), false);
    await assert.rejects(ask(open, "subscribe", { headers: { authorization: "Basic abc" } }), {
      name: "TokenError",
      message: "malformed authorization header",
    });
    await assert.rejects(ask(open, "subscribe", {}, "?token=nonsense"), {
      message: "malformed token",
    });
  });

  // Waits for a token's expiry, whole seconds away: longer than the mutation run's 2 s limit.
  test("through the handler: a refused token is a 401 with the reason; the stream ends at exp", {
    timeout: 5000,
  }, async () => {
    const broker = new Broker();
    const handler = createHandler(broker, {
      authorize: await jwtAuth({ secret: SECRET, leeway: 0 }),
    });
    const expired = await token({ exp: Math.floor(Date.now() / 1000) - 10 });
    const refused = await handler(new Request(`http://x/events?token=${expired}`));
    assert.equal(refused.status, 401);
    assert.equal(
      refused.headers.get("www-authenticate"),
      'Bearer error="invalid_token", error_description="expired"',
    );
    assert.equal((await refused.text()).includes(expired), false, "the token is never echoed");
    const soon = await token({ exp: Math.floor(Date.now() / 1000) + 2, sse: grants }); // 1 to 2 s
    const response = await handler(
      new Request("http://x/events", { headers: { cookie: `sse_token=${soon}` } }),
    );
    assert.equal(response.status, 200);
    const reader = new EventReader(response.body!);
    await broker.publish({ data: "for 42" }, { topics: ["user/42/inbox"], private: true });
    assert.equal((await reader.event()).data, "for 42");
    assert.equal(await reader.next(), null, "ended when the token expired");
    broker.close();
  });
});
