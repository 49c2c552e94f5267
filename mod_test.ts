// Runs unchanged under `deno test` and `bun test` (node:test, node:assert).
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import {
  Broker,
  createHandler,
  encodeMessage,
  type EventLog,
  EventLogError,
  type LogEvent,
  MemoryLog,
  MessageError,
  type ServerSentEventMessage,
  ServerSentEventStream,
} from "./mod.ts";
import {
  binary,
  EventReader,
  parseAll,
  publish,
  ROOT,
  RUNTIME,
  type SseEvent,
  startServer,
  stats,
  subscribe,
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
    let seed = 42; // a fixed seed, so a failure reproduces
    const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
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
    assert.throws(() => encodeMessage({ id: 1.5 }), { name: "MessageError" });
  });

  const refused: [ServerSentEventMessage, string][] = [
    [{ event: "a\nb" }, "event"],
    [{ event: "a\rb" }, "event"],
    [{ id: "1\n" }, "id"],
    [{ id: "1\r2" }, "id"],
    [{ id: "a\0b" }, "id"],
    [{ retry: -1 }, "retry"],
    [{ retry: 1.5 }, "retry"],
    [{ retry: NaN }, "retry"],
    [{ retry: "5" as unknown as number }, "retry"],
    [{ data: 5 as unknown as string }, "data"],
    [{ comment: {} as unknown as string }, "comment"],
  ];
  for (const [message, field] of refused) {
    test(`refuses ${JSON.stringify(message)} naming ${field}`, () => {
      assert.throws(() => encodeMessage(message), (error) => {
        assert.ok(error instanceof MessageError);
        assert.equal(error.field, field);
        assert.match(error.message, new RegExp(`^${field} `));
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
    const parsed = ids.map((id) => id.split("-").map(Number));
    for (let i = 1; i < parsed.length; i++) {
      assert.equal(parsed[i][0], parsed[0][0]);
      assert.equal(parsed[i][1], parsed[i - 1][1] + 1);
    }
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
    await broker.publish({ data: "first" }, { topic: "a" }); // alone: the burst follows
    await Promise.all([
      broker.publish({ data: "to a" }, { topic: "a" }),
      broker.publish({ data: "to b" }, { topic: "b" }),
      broker.publish({ data: "to a and c" }, { topic: ["a", "c"] }),
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
    const broker = new Broker();
    const reader = open(broker);
    await assert.rejects(broker.publish({ id: "1", data: "x" } as ServerSentEventMessage), {
      field: "id",
    });
    await assert.rejects(broker.publish({}), { field: "data" });
    await assert.rejects(broker.publish({ event: "a\nb", data: "x" }), { field: "event" });
    await assert.rejects(broker.publish({ data: "x" }, { topic: "" }), { field: "topic" });
    const id = await broker.publish({ data: "valid" });
    const event = await reader.event();
    assert.deepEqual([event.data, event.lastEventId], ["valid", id]);
    assert.match(id, /-1$/, "refused messages take no id");
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

  test("log gets one line per connect, disconnect and cut, and nothing by default", async () => {
    const lines: string[] = [];
    const broker = new Broker({ log: (line) => lines.push(line), maxQueueBytes: 1024 });
    const body = broker.subscribe(new Request("http://x/?token=secret")).body!;
    await body.cancel();
    broker.subscribe(new Request("http://x/"));
    await broker.publish({ data: "x".repeat(2048) });
    assert.deepEqual(lines, [
      "client connected (1 open)",
      "client disconnected (0 open)",
      "client connected (1 open)",
      "client cut: more than 1024 bytes behind",
      "client disconnected (0 open)",
    ]);
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
      append: (topics: readonly string[], text: string) => memory.append(topics, text),
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
    await log.memory.append([], "data: 2\n\n"); // published through another process
    const third = await log.memory.append([], "data: 3\n\n");
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
    broker.close();
  });

  test("with reads that answer later, replay and live events join with no gap", async () => {
    const log = sharedLog();
    const broker = new Broker({ eventLog: log });
    const first = await broker.publish({ data: "1" });
    const publishing = Array.from({ length: 20 }, (_, n) => broker.publish({ data: `${n + 2}` }));
    const reader = open(broker, "", { headers: { "last-event-id": first } });
    await Promise.all(publishing);
    await broker.publish({ data: "end" });
    const events = (await reader.until((e) => e.data === "end")).filter((e) =>
      !e.event.length ||
      e.event === "message"
    );
    assert.deepEqual(
      events.map((e) => e.data),
      [...Array.from({ length: 20 }, (_, n) => `${n + 2}`), "end"],
    );
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
      append: (topics, text) => log.append(topics, text),
      read: () => Promise.reject(new Error("connection lost")),
      listen: (listener) => log.listen(listener),
    };
    const lines: string[] = [];
    const broker = new Broker({ eventLog: broken, log: (line) => lines.push(line) });
    const live = open(broker);
    const id = await broker.publish({ data: "1" });
    const resuming = open(broker, "", { headers: { "last-event-id": id } });
    assert.equal(await resuming.next(), null);
    assert.ok(lines.some((line) => /reading the event log failed: connection lost/.test(line)));
    await broker.publish({ data: "2" });
    assert.deepEqual((await live.events(2)).map((e) => e.data), ["1", "2"]);
    broker.close();
  });

  test("history options bound only the default log", () => {
    assert.throws(() => new Broker({ eventLog: new MemoryLog(), history: 5 }), TypeError);
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
        }),
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
    assert.deepEqual(asked, ["publish", "publish", "subscribe"], "/stats is open");
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

describe(`server.ts as a real process under ${RUNTIME}`, () => {
  test("streams ticks, delivers POST /publish to every client, reports stats", async () => {
    const server = await startServer({ TICK_MS: "50" });
    try {
      const a = await subscribe(`${server.url}events`);
      const b = await subscribe(`${server.url}events`);
      const tick = await a.event();
      assert.equal(tick.event, "tick");
      assert.ok(!Number.isNaN(Date.parse(tick.data)), tick.data);
      assert.equal(a.parser.retry, 2000);
      const id = await publish(server.url, { data: "to everyone", event: "note" });
      for (const reader of [a, b]) {
        const seen = await reader.until((e) => e.event === "note");
        assert.deepEqual(seen.at(-1), {
          type: "event",
          event: "note",
          data: "to everyone",
          lastEventId: id,
        });
      }
      assert.equal((await stats(server.url)).clients, 2);
      const page = await fetch(server.url);
      assert.match(page.headers.get("content-type")!, /text\/html/);
      assert.match(await page.text(), /new EventSource\(/);
      await a.cancel();
      await b.cancel();
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    test(`${signal} ends open streams and exits 0`, async () => {
      const server = await startServer({ TICK_MS: "50" });
      const readers = [
        await subscribe(`${server.url}events`),
        await subscribe(`${server.url}events`),
      ];
      await Promise.all(readers.map((reader) => reader.event()));
      const started = Date.now();
      server.signal(signal);
      for (const reader of readers) {
        while ((await reader.next()) !== null); // the stream ends, not errors
      }
      assert.equal(await server.exited, 0);
      assert.ok(Date.now() - started < 2500, "exits within the shutdown deadline");
    });
  }

  test("refuses an invalid setting with a one-line reason and exit 1", async () => {
    await assert.rejects(startServer({ PORT: "eighty" }), /PORT must be a non-negative integer/);
  });
});

test("mod.ts imports by URL in Deno, with nothing else", async () => {
  // Serve the repository over HTTP, as a user's import would fetch it.
  const files = createServer(async (request, response) => {
    try {
      const body = await readFile(`${ROOT}${new URL(request.url!, "http://x").pathname}`);
      response.writeHead(200, { "content-type": "application/typescript" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve) => files.listen(0, "127.0.0.1", resolve));
  const { port } = files.address() as AddressInfo;
  const program = `
    import { Broker } from "http://127.0.0.1:${port}/mod.ts";
    const broker = new Broker();
    const reader = broker.subscribe(new Request("http://x/")).body.getReader();
    await reader.read();
    await broker.publish({ data: "by url" });
    console.log(new TextDecoder().decode((await reader.read()).value));
    broker.close();`;
  try {
    const child = spawn(
      binary("deno"),
      ["eval", "--no-config", `--allow-import=127.0.0.1:${port}`, program],
      { cwd: "/", stdio: ["ignore", "pipe", "pipe"] },
    );
    let output = "";
    child.stdout.on("data", (chunk) => output += chunk);
    child.stderr.on("data", (chunk) => output += chunk);
    const code = await new Promise((resolve) => child.on("exit", resolve));
    assert.equal(code, 0, output);
    assert.match(output, /^id: \d+-1\ndata: by url\n/m);
  } finally {
    files.close();
  }
});
