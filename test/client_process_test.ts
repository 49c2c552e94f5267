// client.ts in process, on the runtime that runs this file: its parser and
// its reconnections against an HTTP server that writes exact bytes, and
// several connections of one process sharing one stream of a real app.ts
// where the runtime has Web Locks and BroadcastChannel (Deno, Node), each
// connecting by itself where it has not (Bun). The browser itself is
// test/client_test.ts's.
import { describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { connect, type ConnectOptions, type ReceivedEvent, type StateChange } from "../client.ts";
import { startApp } from "../app.ts";
import { currentRuntime } from "../runtime.ts";
import { eventually, publish, stats } from "./helpers.ts";

/** Whether connections of this runtime can share a stream: Deno and Node, not Bun. */
const sharing = "locks" in navigator && typeof BroadcastChannel === "function";

/** What one connection to the scripted server does: its status, headers and chunks. */
interface Answer {
  status?: number;
  headers?: Record<string, string>;
  chunks?: string[];
  /** Keep the response open after the chunks. */
  open?: boolean;
}

/**
 * An HTTP server that answers the n-th request with the n-th answer (the
 * last one again after that) and records every request.
 */
async function scripted(answers: Answer[]) {
  const requests: IncomingMessage[] = [];
  const open = new Set<ServerResponse>();
  const server = createServer(async (request, response) => {
    requests.push(request);
    const answer = answers[Math.min(requests.length, answers.length) - 1];
    response.writeHead(answer.status ?? 200, {
      "content-type": "text/event-stream",
      ...answer.headers,
    });
    response.flushHeaders();
    // Held open first, so that write() reaches it as soon as its chunks are read.
    if (answer.open) {
      open.add(response);
      response.on("close", () => open.delete(response));
    }
    for (const chunk of answer.chunks ?? []) {
      response.write(chunk);
      await new Promise((resolve) => setTimeout(resolve, 5)); // separate reads
    }
    if (!answer.open) response.end();
  });
  const untrack = track(() => server.close());
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/events`,
    requests,
    /** Writes to every response held open. */
    write(text: string) {
      for (const response of open) response.write(text);
    },
    async close() {
      for (const response of open) response.destroy();
      await new Promise((resolve) => server.close(resolve));
      untrack();
    },
  };
}

/** Connects with `options` and records every event of `types` and every state change. */
function record(url: string, options: ConnectOptions = {}, types = ["message"]) {
  const events: ReceivedEvent[] = [];
  const changes: StateChange[] = [];
  const stream = connect(url, { ...options, onStateChange: (change) => changes.push(change) });
  const untrack = track(() => stream.close());
  for (const type of types) stream.on(type, (event) => events.push(event));
  return {
    stream,
    events,
    changes,
    close() {
      stream.close();
      untrack();
    },
  };
}

describe("client.ts: the event stream format", () => {
  test("parses lines, fields and events as the HTML standard does, in any chunking", async () => {
    const server = await scripted([{
      headers: { "content-type": "Text/Event-Stream; charset=utf-8" },
      chunks: [
        "\ufeffdata: first\r\n\r\n", // a BOM, CRLF
        "id: 1-0\rdata:no space\r\rdata:  two spaces\n\n", // CR alone; one space is taken
        "event: named\ndata: a\ndata\ndata: c\n\n", // several data lines, a field without colon
        ": a comment\nunknown: field\nid: 2-0\n\n", // no data: nothing dispatched
        "data: x\ntopic: a\ntopic: b\nid: 4-0\n\n",
      ],
      open: true,
    }]);
    const { events, close } = record(server.url, { shared: false }, ["message", "named"]);
    try {
      await eventually(() => events.length === 5, 5000, "five events");
      // A CR at the end of a read, its LF in the next: one line end. The
      // marker event shows the first read is in before the second is sent.
      server.write("data: marker\n\ndata: a\r");
      await eventually(() => events.length === 6, 5000, "the marker");
      server.write("\ndata: b\n\nid: 3-\u00000\ndata: nul\n\n"); // an id with NUL is ignored
      await eventually(() => events.length === 8, 5000, "eight events");
      server.write("data: now\r\r"); // a CR last ends its line at once: the event goes out
      await eventually(() => events.length === 9, 5000, "nine events");
      assert.deepEqual(events.map(({ type, data, id, topics }) => ({ type, data, id, topics })), [
        { type: "message", data: "first", id: "", topics: [] },
        { type: "message", data: "no space", id: "1-0", topics: [] },
        { type: "message", data: " two spaces", id: "", topics: [] },
        { type: "named", data: "a\n\nc", id: "", topics: [] },
        { type: "message", data: "x", id: "4-0", topics: ["a", "b"] },
        { type: "message", data: "marker", id: "", topics: [] },
        { type: "message", data: "a\nb", id: "", topics: [] },
        { type: "message", data: "nul", id: "", topics: [] },
        { type: "message", data: "now", id: "", topics: [] },
      ]);
    } finally {
      close();
      await server.close();
    }
  });

  test("asks for topic: lines with its topics, and resumes with Last-Event-ID", async () => {
    const server = await scripted([
      { chunks: ["retry: 10\nid: 5-0\ndata: one\n\n", "id: 6-0\n\n", "data: no id\n\n"] },
      { chunks: [], open: true },
    ]);
    const { events, close } = record(server.url, { shared: false, topics: ["a", "b/c"] });
    try {
      await eventually(() => server.requests.length === 2, 5000, "a reconnection");
      const [first, second] = server.requests;
      assert.equal(first.url, "/events?topic=a&topic=b%2Fc&withTopics=1");
      assert.equal(first.headers["last-event-id"], undefined);
      assert.equal(first.headers.accept, "text/event-stream");
      assert.equal(first.headers.authorization, undefined);
      assert.equal(second.headers["last-event-id"], "6-0", "the id of an event without data too");
      // Not its topics (it has none), but without an id: for every tab, as gap and replayed are.
      assert.deepEqual(events.map((event) => event.data), ["no id"]);
    } finally {
      close();
      await server.close();
    }
  });
});

describe("client.ts: reconnecting", () => {
  test("an empty id: clears the point to resume from", async () => {
    const server = await scripted([
      { chunks: ["retry: 10\nid: 5-0\ndata: one\n\nid\n\n"] },
      { open: true },
    ]);
    const { events, close } = record(server.url, { shared: false });
    try {
      await eventually(() => server.requests.length === 2, 5000, "a reconnection");
      assert.equal(server.requests[1].headers["last-event-id"], undefined);
      assert.deepEqual(events.map((event) => event.id), ["5-0"]);
    } finally {
      close();
      await server.close();
    }
  });

  test("waits the server's retry:, doubling while nothing comes, up to maxRetry", async () => {
    const server = await scripted([{
      chunks: ["retry: 40\nretry: 1x\nretry: x1\nretry\nignored: 5\n\n"],
    }]);
    const { changes, close } = record(server.url, { shared: false, maxRetry: 200 });
    try {
      await eventually(() => server.requests.length >= 5, 10_000, "five connections");
      const waits = changes.flatMap((change) => change.retryIn ?? []);
      for (const [i, base] of [40, 80, 160, 200].entries()) {
        assert.ok(
          waits[i] >= base && waits[i] <= base * 1.5,
          `wait ${i}: ${waits[i]} from ${base}`,
        );
      }
      assert.deepEqual(changes.slice(0, 2), [
        { state: "open", reason: "" },
        { state: "connecting", reason: "ended", retryIn: waits[0] },
      ]);
    } finally {
      close();
      await server.close();
    }
  });

  test("starts from retry without a retry: field, and again from it after an event", async () => {
    const server = await scripted([
      { chunks: [] },
      { chunks: [] },
      { chunks: ["data: in\n\n"] },
      { chunks: [], open: true },
    ]);
    const { changes, close } = record(server.url, { shared: false, retry: 30 });
    try {
      await eventually(() => server.requests.length === 4, 5000, "four connections");
      const waits = changes.flatMap((change) => change.retryIn ?? []);
      assert.equal(waits.length, 3);
      assert.ok(waits[0] >= 30 && waits[0] <= 45, `first ${waits[0]}`);
      assert.ok(waits[1] >= 60 && waits[1] <= 90, `second ${waits[1]}`);
      assert.ok(waits[2] >= 30 && waits[2] <= 45, `after an event ${waits[2]}`);
    } finally {
      close();
      await server.close();
    }
  });

  test("a retry: longer than timers take waits as long as they take", async () => {
    const server = await scripted([{ chunks: ["retry: 3000000000\n\n"] }]);
    const { changes, close } = record(server.url, { shared: false });
    try {
      await eventually(() => changes.some((change) => change.retryIn), 5000, "a wait");
      assert.equal(changes.find((change) => change.retryIn)!.retryIn, 2 ** 31 - 1);
    } finally {
      close();
      await server.close();
    }
  });

  test("a retry: longer than maxRetry is honoured", async () => {
    const server = await scripted([{ chunks: ["retry: 300\n\n"] }, { open: true }]);
    const { changes, close } = record(server.url, { shared: false, maxRetry: 100 });
    try {
      await eventually(() => changes.some((change) => change.retryIn), 5000, "a wait");
      const wait = changes.find((change) => change.retryIn)!.retryIn!;
      assert.ok(wait >= 300 && wait <= 450, `${wait}`);
    } finally {
      close();
      await server.close();
    }
  });

  for (const status of [500, 503, 408, 429, 200]) {
    test(`${status}${status === 200 ? " that is no event stream" : ""}: tried again`, async () => {
      const headers = { "content-type": "text/plain" };
      const server = await scripted([{ status, headers }, { open: true }]);
      const { changes, close } = record(server.url, { shared: false, retry: 10 });
      try {
        await eventually(() => server.requests.length === 2, 5000, "tried again");
        assert.equal(changes[0].state, "connecting");
        assert.equal(changes[0].reason, status === 200 ? "HTTP 200: text/plain" : `HTTP ${status}`);
      } finally {
        close();
        await server.close();
      }
    });
  }

  for (const status of [204, 400, 401, 403, 404]) {
    test(`${status}: closed for good, with the status as its reason`, async () => {
      const server = await scripted([{ status, headers: { "content-type": "text/plain" } }]);
      // A token function makes a 401 and a 403 worth another try, nothing else.
      const token = status === 401 || status === 403 ? "t" : () => "t";
      const { stream, changes, close } = record(server.url, { shared: false, token });
      try {
        await eventually(() => stream.state === "closed", 5000, "closed");
        assert.deepEqual(changes, [{ state: "closed", reason: `HTTP ${status}` }]);
        assert.equal(server.requests.length, 1);
        assert.equal(server.requests[0].headers.authorization, "Bearer t");
      } finally {
        close();
        await server.close();
      }
    });
  }

  test("close() during a wait to reconnect ends it at once, and hands the stream on", async () => {
    const server = await scripted([{ status: 503, headers: { "retry-after": "60" } }, {
      open: true,
    }]);
    const holder = record(server.url, { retry: 60_000 });
    const next = record(server.url);
    try {
      await eventually(() => holder.changes.some((change) => change.retryIn), 5000, "a wait");
      holder.close();
      if (sharing) await eventually(() => next.stream.state === "open", 5000, "taken over");
      await eventually(() => server.requests.length === 2, 5000, "the next connection");
    } finally {
      holder.close();
      next.close();
      await server.close();
    }
  });

  test("a token function is asked before each connection, and a 401 then tried again", async () => {
    const server = await scripted([{ status: 401 }, { status: 403 }, { open: true }]);
    let asked = 0;
    const { stream, close } = record(server.url, {
      shared: false,
      retry: 10,
      token: () => Promise.resolve(`t${++asked}`),
    });
    try {
      await eventually(() => stream.state === "open", 5000, "open");
      assert.deepEqual(server.requests.map((r) => r.headers.authorization), [
        "Bearer t1",
        "Bearer t2",
        "Bearer t3",
      ]);
    } finally {
      close();
      await server.close();
    }
  });

  test("close() ends the connection and its waits; on and off add and remove handlers", async () => {
    const server = await scripted([{ chunks: ["data: 1\n\n"], open: true }]);
    const got: string[] = [];
    const handler = (event: ReceivedEvent) => got.push(event.data);
    const { stream, events, changes, close } = record(server.url, { shared: false });
    stream.on("message", handler);
    try {
      await eventually(() => got.length === 1, 5000, "the first event");
      stream.off("message", handler);
      stream.off("never listened for", handler);
      server.write("data: 2\n\n");
      await eventually(() => events.length === 2, 5000, "the second event");
      close();
      assert.equal(stream.state, "closed");
      assert.deepEqual(changes.at(-1), { state: "closed", reason: "closed" });
      stream.close(); // again: nothing more
      assert.equal(changes.length, 2);
      assert.deepEqual(got, ["1"], "off: no more events");
    } finally {
      close();
      await server.close();
    }
  });
});

describe("client.ts: connections of one process share one stream", () => {
  const system = currentRuntime();

  test(`${sharing ? "one stream" : "one stream each (no Web Locks)"}, each its topics, handed over when the holder closes`, async () => {
    const env: Record<string, string> = { PORT: "0", HOSTNAME: "127.0.0.1", TICK_MS: "0" };
    const app = await startApp({ ...system, env: (name) => env[name], envNames: () => [] });
    const stopApp = track(() => app.stop("SIGINT"));
    const url = new URL("/events", app.url).href;
    const all = record(url);
    const a = record(url, { topics: ["a"] });
    const b = record(url, { topics: ["b"] });
    const c = record(url, { topics: ["c"] });
    try {
      await eventually(
        () => [all, a, b, c].every(({ stream }) => stream.state === "open"),
        5000,
        "open",
      );
      assert.equal((await stats(app.url)).clients, sharing ? 1 : 4);
      assert.deepEqual([all, a, b].map(({ stream }) => stream.holding), [true, !sharing, !sharing]);
      await publish(app.url, { data: "to a", topic: "a" });
      await publish(app.url, { data: "to b", topic: "b" });
      await publish(app.url, { data: "to none" });
      await eventually(() => all.events.length === 3, 5000, "all three");
      const { connections } = await stats(app.url);
      all.close();
      await publish(app.url, { data: "a again", topic: "a" });
      await publish(app.url, { data: "b again", topic: "b" });
      await eventually(() => b.events.length === 2, 5000, "b again");
      await eventually(() => a.events.length === 2, 5000, "a again");
      assert.deepEqual(all.events.map((event) => event.data), ["to a", "to b", "to none"]);
      assert.deepEqual(a.events.map((event) => event.data), ["to a", "a again"]);
      assert.deepEqual(b.events.map((event) => event.data), ["to b", "b again"]);
      assert.deepEqual(a.events.map((event) => event.topics), [["a"], ["a"]]);
      assert.equal([a, b, c].filter(({ stream }) => stream.holding).length, sharing ? 1 : 3);
      // The next holder asked the others for their topics first: one stream for a, b and c.
      await publish(app.url, { data: "c again", topic: "c" });
      await eventually(() => c.events.length === 1, 5000, "c again");
      assert.equal((await stats(app.url)).connections, connections + (sharing ? 1 : 0));
    } finally {
      for (const { close } of [all, a, b, c]) close();
      stopApp();
      await app.stop("SIGINT");
    }
  });
  test("a connection whose topics the stream lacks makes the holder reconnect from its last id", async () => {
    const server = await scripted([
      { chunks: ["id: 1-0\ntopic: a\ndata: a1\n\n"], open: true },
      { chunks: ["id: 2-0\ntopic: b\ndata: b1\n\nid: 3-0\ntopic: a\ndata: a2\n\n"], open: true },
      { open: true },
      { open: true },
    ]);
    const first = record(server.url, { topics: ["a"] });
    const same = { events: [] as ReceivedEvent[], close() {} };
    try {
      await eventually(() => first.events.length === 1, 5000, "a1");
      const covered = record(server.url, { topics: ["a"] });
      Object.assign(same, covered);
      await eventually(() => covered.stream.state === "open", 5000, "the second open");
      const more = record(server.url, { topics: ["b"] });
      if (sharing) {
        await eventually(() => more.events.length === 1, 5000, "b1");
        await eventually(() => first.events.length === 2, 5000, "a2");
        assert.deepEqual(first.events.map((event) => event.data), ["a1", "a2"]);
        assert.deepEqual(more.events.map((event) => event.data), ["b1"]);
        assert.deepEqual(server.requests.map((request) => request.url), [
          "/events?topic=a&withTopics=1",
          "/events?topic=a&topic=b&withTopics=1",
        ], "a covered topic: no new stream; a new one: one, for both");
        assert.equal(server.requests[1].headers["last-event-id"], "1-0");
        assert.deepEqual(covered.events.map((event) => event.data), ["a2"]);
        assert.ok(
          first.changes.every((change) => change.state === "open"),
          `reconnected at once: ${JSON.stringify(first.changes)}`,
        );
      } else {
        // Each by itself: the second gets the second answer, its a2 only.
        await eventually(() => server.requests.length === 3, 5000, "three streams");
        await eventually(() => covered.events.length === 1, 5000, "a2");
        assert.deepEqual(covered.events.map((event) => event.data), ["a2"]);
      }
      covered.close();
      more.close();
    } finally {
      first.close();
      same.close();
      await server.close();
    }
  });

  test("past maxTopics the stream carries every event; each still gets its own", async () => {
    const server = await scripted([{ open: true }]);
    const a = record(server.url, { topics: ["a"], maxTopics: 2 });
    await eventually(() => a.stream.state === "open", 5000, "open");
    const named = (url: string) => server.requests.some((request) => request.url === url);
    const b = record(server.url, { topics: ["b"] });
    if (sharing) {
      await eventually(() => named("/events?topic=a&topic=b&withTopics=1"), 5000, "two: named");
    }
    const c = record(server.url, { topics: ["c"] });
    const two = record(server.url, { topics: ["x", "y"], maxTopics: 2, shared: false });
    const alone = record(server.url, { topics: ["x", "y", "z"], maxTopics: 2, shared: false });
    try {
      await eventually(
        () => [b, c, two, alone].every(({ stream }) => stream.state === "open"),
        5000,
        "open",
      );
      assert.ok(named("/events?topic=x&topic=y&withTopics=1"), "at maxTopics: named");
      const urls = server.requests.map((request) => request.url);
      assert.ok(urls.includes("/events?withTopics=1"), "every event, past two topics");
      if (sharing) {
        await eventually(
          () =>
            server.requests.filter((request) => request.url === "/events?withTopics=1").length ===
              2,
          5000,
          "every event for both",
        );
      }
      server.write("id: 1-0\ntopic: c\ndata: to c\n\nid: 1-1\ntopic: y\ndata: to y\n\n");
      await eventually(() => c.events.length === 1 && alone.events.length === 1, 5000, "c, y");
      assert.deepEqual([a, b].map(({ events }) => events.length), [0, 0]);
    } finally {
      for (const { close } of [a, b, c, two, alone]) close();
      await server.close();
    }
  });

  test("a holder tells a tab that says hi its position; without one, it takes the tab's", async () => {
    const server = await scripted([{ open: true }]);
    const holder = record(server.url);
    const tab = new BroadcastChannel(`sse-broker/1 ${server.url} `); // the channel of server.url
    const heard: unknown[] = [];
    tab.onmessage = ({ data }) => heard.push(data);
    try {
      await eventually(() => holder.stream.state === "open", 5000, "open");
      if (sharing) await eventually(() => heard.length > 0, 5000, "the holder's state");
      heard.length = 0;
      tab.postMessage({ k: "hi", from: "tab", topics: null, pos: "4-2" });
      if (sharing) {
        await eventually(() => heard.length > 0, 5000, "an answer");
        assert.ok(!heard.some((note) => (note as { k: string }).k === "pos"), "no position yet");
        holder.stream.reconnect();
        await eventually(() => server.requests.length === 2, 5000, "again");
        assert.equal(server.requests[1].headers["last-event-id"], "4-2");
        server.write("id: 5-0\ndata: x\n\n");
        await eventually(() => holder.events.length === 1, 5000, "x");
        heard.length = 0;
        tab.postMessage({ k: "hi", from: "tab", topics: null, pos: "" });
        await eventually(() => heard.length >= 2, 5000, "answers");
        assert.deepEqual(heard[0], { k: "pos", id: "5-0" });
      } else assert.equal(holder.stream.holding, true);
    } finally {
      tab.close();
      holder.close();
      await server.close();
    }
  });

  test("reconnect() opens the shared stream again at once, from the last id", async () => {
    const server = await scripted([{ open: true }]);
    const first = record(server.url);
    const second = record(server.url);
    try {
      await eventually(() => second.stream.state === "open", 5000, "open");
      const before = server.requests.length;
      server.write("id: 1-0\ndata: one\n\n");
      await eventually(() => second.events.length === 1, 5000, "one");
      second.stream.reconnect();
      await eventually(() => server.requests.length === before + 1, 5000, "again");
      assert.equal(server.requests.at(-1)!.headers["last-event-id"], "1-0");
      first.stream.reconnect();
      await eventually(() => server.requests.length === before + 2, 5000, "once more");
      assert.equal(server.requests.at(-1)!.headers["last-event-id"], "1-0");
    } finally {
      first.close();
      second.close();
      await server.close();
    }
  });

  test("a tab that answers late gets its topics from its own last id", async () => {
    const server = await scripted([{ open: true }, { open: true }]);
    const holder = record(server.url, { topics: ["a"] });
    // What a tab frozen while the stream changed hands says once it thaws.
    const late = new BroadcastChannel(`sse-broker/1 ${server.url} `); // the channel of server.url
    try {
      await eventually(() => holder.stream.state === "open", 5000, "open");
      server.write("id: 5-0\ntopic: a\ndata: a5\n\n");
      await eventually(() => holder.events.length === 1, 5000, "a5");
      late.postMessage({ k: "hi", from: "late", topics: ["c"], pos: "3-0" });
      if (sharing) {
        await eventually(() => server.requests.length === 2, 5000, "again, with c");
        assert.equal(server.requests[1].url, "/events?topic=a&topic=c&withTopics=1");
        assert.equal(server.requests[1].headers["last-event-id"], "3-0");
        server.write("id: 4-0\ntopic: c\ndata: c4\n\nid: 5-0\ntopic: a\ndata: a5\n\n");
        server.write("id: 6-0\ntopic: a\ndata: a6\n\n");
        await eventually(() => holder.events.length === 2, 5000, "a6");
        assert.deepEqual(holder.events.map((event) => event.data), ["a5", "a6"]);
      } else assert.equal(holder.stream.holding, true);
    } finally {
      late.close();
      holder.close();
      await server.close();
    }
  });

  test("every connection sees the holder's state; one closing leaves the others be", async () => {
    const server = await scripted([{ status: 503 }, { open: true }, { open: true }]);
    const holder = record(server.url, { retry: 20 });
    await eventually(() => holder.changes.length > 0, 5000, "the holder's first change");
    const follower = record(server.url, { retry: 20 });
    const other = record(server.url, { retry: 20 });
    try {
      assert.equal(follower.stream.state, "connecting");
      await eventually(
        () => [holder, follower, other].every(({ stream }) => stream.state === "open"),
        5000,
        "all open",
      );
      assert.equal(holder.changes[0].reason, "HTTP 503");
      if (sharing) {
        assert.deepEqual(follower.changes.at(-1), { state: "open", reason: "" });
        follower.close();
        assert.deepEqual(follower.changes.at(-1), { state: "closed", reason: "closed" });
        server.write("data: still\n\n");
        await eventually(() => other.events.length === 1, 5000, "the other goes on");
        assert.equal(other.stream.state, "open");
        assert.ok(!other.changes.some((change) => change.state === "closed"), "not closed");
      }
    } finally {
      for (const { close } of [holder, follower, other]) close();
      await server.close();
    }
  });

  test("a refusal for good closes every connection sharing the stream, after one try", async () => {
    const server = await scripted([{ status: 401 }]);
    const one = record(server.url, { token: "wrong" });
    const two = record(server.url, { token: "wrong" });
    try {
      await eventually(
        () => [one, two].every(({ stream }) => stream.state === "closed"),
        5000,
        "both closed",
      );
      for (const { changes } of [one, two]) {
        assert.deepEqual(changes.at(-1), { state: "closed", reason: "HTTP 401" });
      }
      assert.equal(server.requests.length, sharing ? 1 : 2);
      one.close(); // the next one tries again
      if (sharing) await eventually(() => server.requests.length === 2, 5000, "tried again");
    } finally {
      one.close();
      two.close();
      await server.close();
    }
  });

  test("connections share only under one URL and name, and not with shared: false", async () => {
    const server = await scripted([{ open: true }]);
    const elsewhere = await scripted([{ open: true }]);
    const opened = [
      record(server.url),
      record(server.url),
      record(server.url, { name: "another user" }),
      record(server.url, { shared: false }),
      record(elsewhere.url),
      record(elsewhere.url, { name: "another user" }),
    ];
    try {
      await eventually(() => opened.every(({ stream }) => stream.state === "open"), 5000, "open");
      assert.equal(server.requests.length, sharing ? 3 : 4);
      assert.equal(elsewhere.requests.length, 2, "a name shares only under its URL");
      server.write("id: 1-0\ndata: to all\n\n");
      await eventually(
        () => opened.slice(0, 4).every(({ events }) => events.length === 1),
        5000,
        "events",
      );
      assert.deepEqual(opened[4].events, [], "nothing from another URL");
    } finally {
      for (const { close } of opened) close();
      await server.close();
      await elsewhere.close();
    }
  });

  test("without Web Locks, or without BroadcastChannel, each connects by itself", async () => {
    for (const name of ["navigator", "BroadcastChannel"] as const) {
      const server = await scripted([{ open: true }]);
      const own = Object.getOwnPropertyDescriptor(globalThis, name);
      const opened: ReturnType<typeof record>[] = [];
      try {
        if (own) Reflect.deleteProperty(globalThis, name);
        opened.push(record(server.url), record(server.url));
      } finally {
        if (own) Object.defineProperty(globalThis, name, own);
      }
      try {
        await eventually(() => server.requests.length === 2, 5000, `two streams without ${name}`);
        assert.ok(opened.every(({ stream }) => stream.holding));
      } finally {
        for (const { close } of opened) close();
        await server.close();
      }
    }
  });

  test("once one connection wants every event, the stream carries every event", async () => {
    const server = await scripted([{ open: true }]);
    const some = record(server.url, { topics: ["a"] });
    await eventually(() => some.stream.state === "open", 5000, "open");
    // Without onStateChange, and wanting every event.
    const every = connect(server.url);
    const got: string[] = [];
    every.on("message", (event) => got.push(event.data));
    const more = record(server.url, { topics: ["b"] });
    try {
      await eventually(() => server.requests.length === (sharing ? 2 : 3), 5000, "streams");
      if (sharing) {
        assert.equal(server.requests[1].url, "/events?withTopics=1", "every event");
        await eventually(() => more.stream.state === "open", 5000, "open");
        assert.equal(server.requests.length, 2, "b is covered");
      }
      server.write("id: 1-0\ntopic: a\ndata: to a\n\nid: 1-1\ndata: to none\n\n");
      await eventually(() => got.length === 2, 5000, "every event");
      assert.deepEqual(got, ["to a", "to none"]);
      await eventually(() => some.events.length === 1, 5000, "a");
      assert.deepEqual(some.events.map((event) => event.data), ["to a"]);
    } finally {
      some.close();
      every.close();
      more.close();
      await server.close();
    }
  });

  test("a connection that takes over resumes from the last id, told while it waited", async () => {
    const server = await scripted([{ open: true }, { open: true }]);
    const first = record(server.url);
    const second = record(server.url);
    try {
      await eventually(() => second.stream.state === "open", 5000, "open");
      server.write("id: 7-3\ndata: x\n\n");
      await eventually(() => second.events.length === 1, 5000, "x");
      // An id alone, then an event without one: once the second has that, it has the id.
      server.write("id: 7-4\n\ndata: after\n\n");
      await eventually(() => second.events.length === 2, 5000, "after");
      first.close();
      await eventually(() => server.requests.length === 2, 5000, "taken over");
      assert.equal(server.requests[1].headers["last-event-id"], sharing ? "7-4" : undefined);
      assert.equal(second.stream.holding, true);
      if (sharing) {
        assert.deepEqual(second.changes.slice(-2), [
          { state: "connecting", reason: "handing over" },
          { state: "open", reason: "" },
        ]);
      }
      // One that joins now is told the id too, and resumes from it.
      const third = record(server.url);
      await eventually(() => third.stream.state === "open", 5000, "the third open");
      server.write("id: 7-5\n\ndata: later\n\n");
      await eventually(() => third.events.length === 1, 5000, "later");
      second.close();
      await eventually(() => server.requests.length === 3, 5000, "taken over again");
      assert.equal(server.requests[2].headers["last-event-id"], sharing ? "7-5" : undefined);
      third.close();
    } finally {
      first.close();
      second.close();
      await server.close();
    }
  });

  test("events a server sends again are dropped by id, on every connection", async () => {
    // A server that starts every stream with some of its last events, then ends it.
    const server = await scripted([
      { chunks: ["retry: 10\nid: 1-9\ndata: 1\n\nid: 1-10\ndata: 2\n\n"] },
      { chunks: ["id: 1-9\ndata: again\n\nid: 9-0\ndata: 3\n\nid: 10-0\ndata: 4\n\n"] },
      // Older ids are dropped by number, not by text.
      {
        chunks: [
          "id: 11-0\ndata: 5\n\nid: 10-0\ndata: again\n\nid: 9-0\ndata: again\n\n",
          "id: 1-10\ndata: again\n\nid: 11-0\ndata: again\n\n",
        ],
      },
      // Ids the client cannot order: only one just like the last is dropped.
      { chunks: ["id: x11-0\ndata: 6\n\nid: x11-0\ndata: again\n\nid: 11-1\ndata: 7\n\n"] },
      { chunks: ["id: 1-0x\ndata: 8\n\nid: 11-2\ndata: 9\n\n"], open: true },
    ]);
    const one = record(server.url);
    // Alone, it would take answers of its own from this server.
    const two = sharing ? record(server.url) : undefined;
    try {
      await eventually(() => one.events.length === 9, 5000, "nine on one");
      assert.deepEqual(one.events.map((event) => event.data), [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
      ]);
      if (two) {
        await eventually(() => two.events.length === 9, 5000, "nine on two");
        assert.deepEqual(
          two.events.map((event) => event.data),
          one.events.map((event) => event.data),
        );
      }
    } finally {
      one.close();
      two?.close();
      await server.close();
    }
  });

  test("without onStateChange; and a failed connection says its error in one line", async () => {
    const dead = await scripted([]);
    await dead.close(); // nothing listens there now
    const expected = await fetch(dead.url).then(() => "", (error) => String(error.message));
    const quiet = connect(dead.url, { shared: false, retry: 10 });
    const { changes, close } = record(dead.url, { shared: false, retry: 10 });
    try {
      await eventually(() => changes.length > 0, 5000, "a change");
      assert.equal(changes[0].state, "connecting");
      assert.equal(changes[0].reason, expected.split("\n")[0]);
      assert.equal(quiet.state, "connecting");
    } finally {
      quiet.close();
      close();
    }
  });
});
