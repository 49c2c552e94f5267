// Safe to expose: validated publishing, tokens, CORS, limits, and malformed
// input that never crashes the server or reaches a subscriber.
import { after, before, describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { connect } from "node:net";
import {
  type EventReader,
  eventually,
  publish,
  seededRandom,
  type ServerProcess,
  startServer,
  stats,
  subscribe,
  withServer,
} from "./helpers.ts";

const PUBLISH_TOKEN = "pub-7f3a9c2e51";
const SUBSCRIBE_TOKEN = "sub-1b8d4e6f07";

/** Sends raw bytes and resolves with what came back before the server closed, or after `ms`. */
function raw(url: string, request: string | Uint8Array, ms = 1000): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const socket = connect({ host: hostname, port: Number(port) });
    let received = "";
    const done = () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(received);
    };
    const timer = setTimeout(done, ms); // for requests the server rightly waits on
    socket.on("data", (chunk) => {
      received += chunk.toString("latin1");
      // One complete non-streaming answer is enough.
      if (/\r\n\r\n/.test(received) && !/text\/event-stream/i.test(received)) done();
    });
    socket.on("error", done);
    socket.on("close", done);
    socket.write(request);
  });
}

describe("publishing errors", () => {
  let server: ServerProcess;
  let watcher: EventReader;
  before(async () => {
    server = await startServer({ MAX_BODY: "1024" });
    watcher = await subscribe(`${server.url}events`);
  });
  after(async () => {
    await watcher.cancel();
    assert.equal(await server.stop(), 0);
  });

  const post = (body: BodyInit, type = "application/json", path = "/publish") =>
    fetch(new URL(path, server.url), {
      method: "POST",
      headers: { "content-type": type },
      body,
    });

  const cases: [string, BodyInit, string, number, RegExp][] = [
    ["invalid JSON", "{", "application/json", 400, /not valid JSON/],
    ["an empty batch", "[]", "application/json", 400, /^a batch needs at least one event$/],
    ["a batch of numbers", "[1]", "application/json", 400, /^\[0\] must be a JSON object$/],
    ["no data", '{"event":"x"}', "application/json", 400, /^data is required/],
    ["event as a number", '{"data":"x","event":1}', "application/json", 400, /^event must be/],
    ["event with a line break", '{"data":"x","event":"a\\nb"}', "application/json", 400, /^event/],
    ["event with CR", '{"data":"x","event":"a\\rdata: evil"}', "application/json", 400, /^event/],
    ["an id", '{"data":"x","id":"5"}', "application/json", 400, /^id is assigned/],
    ["negative retry", '{"data":"x","retry":-5}', "application/json", 400, /^retry/],
    ["fractional retry", '{"data":"x","retry":1.5}', "application/json", 400, /^retry/],
    ["a topic with NUL", '{"data":"x","topic":"a\\u0000"}', "application/json", 400, /^topic/],
    ["an empty topic", '{"data":"x","topic":""}', "application/json", 400, /^topic/],
    ["topic as an object", '{"data":"x","topic":{}}', "application/json", 400, /^topic/],
    ["an unknown field", '{"data":"x","topics":["a"]}', "application/json", 400, /unknown field/],
    ["a body over MAX_BODY", "x".repeat(1025), "text/plain", 413, /larger than 1024/],
  ];
  for (const [what, body, type, status, reason] of cases) {
    test(`${what}: ${status}, and nothing reaches a subscriber`, async () => {
      const response = await post(body, type);
      assert.equal(response.status, status);
      assert.match((await response.json()).error, reason);
      // The next event the subscriber sees is the next valid publish.
      const marker = await publish(server.url, { data: `after ${what}` });
      assert.equal((await watcher.event()).lastEventId, marker);
    });
  }

  test("a chunked body over MAX_BODY: 413 without reading it all", async () => {
    const { hostname } = new URL(server.url);
    const chunk = "x".repeat(512);
    const request =
      `POST /publish HTTP/1.1\r\nhost: ${hostname}\r\ntransfer-encoding: chunked\r\n` +
      `content-type: text/plain\r\n\r\n` +
      `200\r\n${chunk}\r\n`.repeat(8); // 4 KiB sent; the request never ends
    assert.match(await raw(server.url, request), /^HTTP\/1\.1 413/);
    const marker = await publish(server.url, { data: "after a chunked body" });
    assert.equal((await watcher.event()).lastEventId, marker, "nothing reached the subscriber");
  });

  test("wrong method: 405 with Allow; unknown path: 404", async () => {
    const wrong = await fetch(new URL("/publish", server.url), { method: "PUT" });
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get("allow"), "POST");
    await wrong.body?.cancel();
    const events = await fetch(new URL("/events", server.url), { method: "POST", body: "x" });
    assert.equal(events.status, 405);
    assert.equal(events.headers.get("allow"), "GET");
    await events.body?.cancel();
    const missing = await fetch(new URL("/nope", server.url));
    assert.equal(missing.status, 404);
    await missing.body?.cancel();
    const marker = await publish(server.url, { data: "after wrong methods" });
    assert.equal((await watcher.event()).lastEventId, marker, "nothing reached the subscriber");
  });
});

describe("tokens", () => {
  let server: ServerProcess;
  before(async () => server = await startServer({ PUBLISH_TOKEN, SUBSCRIBE_TOKEN }));
  after(async () => assert.equal(await server.stop(), 0));

  const publishWith = (headers: Record<string, string>, query = "") =>
    fetch(new URL(`/publish${query}`, server.url), { method: "POST", headers, body: "hi" });
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

  test("publishing needs the publish token in the Authorization header", async () => {
    for (
      const [headers, query] of [
        [{}, ""],
        [bearer("wrong"), ""],
        [bearer(PUBLISH_TOKEN.slice(0, -1)), ""],
        [bearer(PUBLISH_TOKEN + "x"), ""],
        [bearer(SUBSCRIBE_TOKEN), ""],
        [{ authorization: PUBLISH_TOKEN }, ""],
        [{}, `?token=${PUBLISH_TOKEN}`],
      ] as const
    ) {
      const response = await publishWith(headers, query);
      assert.equal(response.status, 401, JSON.stringify([headers, query]));
      assert.match(response.headers.get("www-authenticate")!, /^Bearer/);
      await response.body?.cancel();
    }
    const ok = await publishWith(bearer(PUBLISH_TOKEN));
    assert.equal(ok.status, 200);
    assert.match((await ok.json()).id, /^\d{13}-\d+$/);
  });

  test("subscribing needs the subscribe token, in the header or ?token=", async () => {
    for (
      const [headers, query] of [[{}, ""], [bearer("wrong"), ""], [{}, "?token=wrong"]] as const
    ) {
      const response = await fetch(new URL(`/events${query}`, server.url), { headers });
      assert.equal(response.status, 401);
      assert.match(response.headers.get("www-authenticate")!, /^Bearer/);
      await response.body?.cancel();
    }
    const byHeader = await subscribe(`${server.url}events`, bearer(SUBSCRIBE_TOKEN));
    const byQuery = await subscribe(`${server.url}events?token=${SUBSCRIBE_TOKEN}`);
    const id = await (await publishWith(bearer(PUBLISH_TOKEN))).json();
    for (const reader of [byHeader, byQuery]) {
      assert.equal((await reader.event()).lastEventId, id.id);
      await reader.cancel();
    }
  });

  test("tokens never appear in the server's output", () => {
    assert.ok(!server.output().includes(PUBLISH_TOKEN));
    assert.ok(!server.output().includes(SUBSCRIBE_TOKEN));
  });
});

describe("CORS", () => {
  test("by default any origin may subscribe and publish", async () => {
    await withServer({}, async (server) => {
      const headers = { origin: "https://anywhere.example" };
      const events = await fetch(new URL("/events", server.url), { headers });
      assert.equal(events.headers.get("access-control-allow-origin"), "*");
      await events.body?.cancel();
      const posted = await fetch(new URL("/publish", server.url), {
        method: "POST",
        headers,
        body: "x",
      });
      assert.equal(posted.headers.get("access-control-allow-origin"), "*");
      await posted.body?.cancel();
    });
  });

  test("a list of origins: preflight and responses name only listed ones", async () => {
    await withServer({ CORS_ORIGIN: "https://a.example, https://b.example" }, async (server) => {
      const preflight = (origin: string) =>
        fetch(new URL("/publish", server.url), {
          method: "OPTIONS",
          headers: {
            origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
          },
        });
      const allowed = await preflight("https://b.example");
      assert.equal(allowed.status, 204);
      assert.equal(allowed.headers.get("access-control-allow-origin"), "https://b.example");
      assert.match(allowed.headers.get("access-control-allow-methods")!, /POST/);
      const allowHeaders = allowed.headers.get("access-control-allow-headers")!;
      for (const name of ["authorization", "content-type", "last-event-id"]) {
        assert.ok(allowHeaders.includes(name), name);
      }
      assert.match(allowed.headers.get("vary")!, /origin/i);
      const refused = await preflight("https://evil.example");
      assert.equal(refused.headers.get("access-control-allow-origin"), null);

      const stream = await fetch(new URL("/events", server.url), {
        headers: { origin: "https://a.example" },
      });
      assert.equal(stream.headers.get("access-control-allow-origin"), "https://a.example");
      await stream.body?.cancel();
      const other = await fetch(new URL("/events", server.url), {
        headers: { origin: "https://evil.example" },
      });
      assert.equal(other.headers.get("access-control-allow-origin"), null);
      await other.body?.cancel();
    });
  });
});

test("MAX_CLIENTS sends a stream away with a retry from SHED_RETRY_MS; MAX_TOPICS answers 400", async () => {
  const env = { MAX_CLIENTS: "2", MAX_TOPICS: "2", SHED_RETRY_MS: "2500-2600" };
  await withServer(env, async (server) => {
    const first = await subscribe(`${server.url}events`);
    const second = await subscribe(`${server.url}events`);
    const third = await fetch(new URL("/events", server.url));
    assert.equal(third.status, 200, "an EventSource gives up on any other status");
    assert.equal(third.headers.get("retry-after"), "3");
    assert.match(await third.text(), /^: too many clients\nretry: (25\d\d|2600)\n\n$/);
    await first.cancel();
    await second.cancel();
    await eventually(async () => (await stats(server.url)).clients === 0, 5000, "0 clients");

    const tooMany = await fetch(new URL("/events?topic=a&topic=b&topic=c", server.url));
    assert.equal(tooMany.status, 400);
    assert.match((await tooMany.json()).error, /at most 2 topics/);
    const two = await subscribe(`${server.url}events?topic=a&topic=b`);
    await two.cancel();
  });
});

test("fuzz: malformed requests never crash the server or reach a subscriber", async () => {
  const server = await startServer({ MAX_BODY: "4096" });
  const random = seededRandom(7);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
  const bytes = (n: number) => Uint8Array.from({ length: n }, () => Math.floor(random() * 256));
  try {
    const before = await subscribe(`${server.url}events?topic=watch`);
    const { hostname } = new URL(server.url);

    // Over fetch: odd methods, paths, bodies and Last-Event-ID values.
    const methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"];
    const paths = [
      "/events",
      "/publish",
      "/stats",
      "/",
      "/events/../publish",
      "/%00",
      "//publish",
      "/publish?topic=%00",
      "/publish?topic=",
      "/events?topic=" + "t".repeat(300),
      "/events?lastEventId=%00",
      "/" + "a".repeat(4000),
      "/events?topic=a&topic=a&topic=a",
      "/constructor",
      "/__proto__",
    ];
    const ids = ["abc", "-1", "1e400", "0", "1-", "-", "99999999999999999999-1", "1-1-1", " 1-1"];
    const types = ["application/json", "text/plain", "application/x-www-form-urlencoded", ""];
    const bodies = () =>
      pick([
        "",
        "{",
        "null",
        '{"data":',
        '{"data":"\\u0000"}',
        '{"data":"x","event":"\\r\\n"}',
        JSON.stringify({ data: "x", retry: 1e400 }),
        JSON.stringify({ data: "x", topic: ["ok", 5] }),
        "x".repeat(5000),
      ]) as BodyInit;
    const statuses = new Map<number, number>();
    for (let i = 0; i < 300; i++) {
      const method = pick(methods);
      // Bun's fetch treats an unknown method like GET and refuses it a body.
      const withBody = !["GET", "HEAD", "FOO"].includes(method);
      const response = await fetch(server.url.slice(0, -1) + pick(paths), {
        method,
        headers: {
          "content-type": pick(types),
          "last-event-id": pick(ids),
          // Only to a topic nobody watches: valid fuzz publishes are fine.
        },
        body: withBody ? (random() < 0.2 ? bytes(200) : bodies()) : undefined,
      });
      statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
      assert.ok(response.status < 500, `${method} answered ${response.status}`);
      await response.body?.cancel();
    }

    // Over raw TCP: what fetch refuses to send.
    const rawRequests = [
      "GARBAGE\r\n\r\n",
      "GET\r\n\r\n",
      `FOO /publish HTTP/1.1\r\nhost: ${hostname}\r\ncontent-length: 2\r\n\r\nhi`,
      "GET /events HTTP/9.9\r\n\r\n",
      `GET /events HTTP/1.1\r\nhost: ${hostname}\r\nlast-event-id: a\0b\r\n\r\n`,
      `GET /events HTTP/1.1\r\nhost: ${hostname}\r\nx-huge: ${"h".repeat(100_000)}\r\n\r\n`,
      `POST /publish HTTP/1.1\r\nhost: ${hostname}\r\ncontent-length: 100\r\n\r\nshort`,
      `POST /publish HTTP/1.1\r\nhost: ${hostname}\r\ncontent-length: -1\r\n\r\n`,
      `POST /publish HTTP/1.1\r\nhost: ${hostname}\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\n`,
      `POST /publish HTTP/1.1\r\nhost: ${hostname}\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd`,
      `GET /events?topic=%ff%fe HTTP/1.1\r\nhost: ${hostname}\r\n\r\n`,
      `GET /events HTTP/1.1\r\nhost: ${hostname}\r\nlast-event-id: ${"9".repeat(10_000)}\r\n\r\n`,
    ];
    for (let i = 0; i < 8; i++) rawRequests.push(new TextDecoder("latin1").decode(bytes(300)));
    await Promise.all(rawRequests.map((request) => raw(server.url, request, 500)));

    assert.equal(server.child.exitCode, null, "the server is still running");
    const after = await subscribe(`${server.url}events?topic=watch`);
    await publish(server.url, { data: "still fine", topic: "watch" });
    for (const reader of [before, after]) {
      const event = await reader.event();
      assert.equal(event.data, "still fine", "only the valid event reached the watchers");
      await reader.cancel();
    }
    assert.ok(statuses.size > 3, `a spread of answers: ${[...statuses.keys()]}`);
  } finally {
    assert.equal(await server.stop(), 0);
  }
});
