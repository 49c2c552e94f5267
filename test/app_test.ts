// app.ts in process: the server that server.ts runs, started with an
// environment of its own on a free port of 127.0.0.1 and reached over real
// sockets; its log lines captured. The process around it (signals, exit
// status, the URL printed) is test/server_test.ts's.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { connect } from "node:net";
import type { ChildProcess } from "node:child_process";
import * as jose from "jose";
import { type App, startApp } from "../app.ts";
import { currentRuntime, SettingError } from "../runtime.ts";
import { METRICS_CONTENT_TYPE } from "../mod.ts";
import {
  type EventReader,
  eventually,
  publish,
  RUNTIME,
  stats,
  subscribe,
  webhookReceiver,
} from "./helpers.ts";
import { RedisServer } from "./redis_server.mjs";

const system = currentRuntime();
const SECRET = "a secret of at least thirty-two bytes";

/** What `log` wrote while `body` ran: `info`, `warning: …` and `error: …` lines. */
async function logged<T>(body: (lines: string[]) => Promise<T>): Promise<T> {
  const lines: string[] = [];
  const { log, error } = console;
  console.log = (...parts: unknown[]) => lines.push(parts.join(" "));
  console.error = (...parts: unknown[]) => lines.push(parts.join(" "));
  try {
    return await body(lines);
  } finally {
    Object.assign(console, { log, error });
  }
}

/** Starts the app with `vars` as its whole environment (port 0, no ticker unless set). */
function start(vars: Record<string, string>): Promise<App> {
  const env: Record<string, string> = { PORT: "0", HOSTNAME: "127.0.0.1", TICK_MS: "0", ...vars };
  return startApp({ ...system, env: (name) => env[name], envNames: () => Object.keys(env) });
}

/** Runs `body` with the app started with `vars`, stopping it after (also when `body` fails). */
function withApp(
  vars: Record<string, string>,
  body: (url: string, lines: string[], app: App) => Promise<void>,
): Promise<void> {
  return logged(async (lines) => {
    const app = await start(vars);
    const stopped = track(() => app.stop("SIGINT"));
    try {
      await body(app.url, lines, app);
    } finally {
      stopped();
      await app.stop("SIGINT");
    }
  });
}

/** The reason a start with `vars` is refused. */
async function refusal(vars: Record<string, string>): Promise<string> {
  const error = await logged(() => start(vars)).then(() => undefined, (error) => error);
  assert.ok(error instanceof SettingError, `not refused: ${error}`);
  return error.message;
}

function token(claims: jose.JWTPayload): Promise<string> {
  return new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" }).setExpirationTime("1h")
    .sign(new TextEncoder().encode(SECRET));
}

describe("app.ts settings", () => {
  test("each setting it cannot use refuses the start with its reason, before anything listens", async () => {
    const cases: [Record<string, string>, string][] = [
      [{ PORT: "eighty" }, 'PORT must be a non-negative integer, got "eighty"'],
      [{ MAX_CLIENTS: "-1" }, 'MAX_CLIENTS must be a non-negative integer, got "-1"'],
      [{ SHED_RETRY_MS: "9-1" }, 'SHED_RETRY_MS must be "<min>-<max>" in milliseconds, got "9-1"'],
      [{ SHED_RETRY_MS: "1-" }, 'SHED_RETRY_MS must be "<min>-<max>" in milliseconds, got "1-"'],
      [
        { SHED_RETRY_MS: "1-99999999999999999" },
        'SHED_RETRY_MS must be "<min>-<max>" in milliseconds, got "1-99999999999999999"',
      ],
      [
        { STREAMS_PATH: "//x" },
        'STREAMS_PATH must be a path below "/", such as "/v1/stream/", got "//x/"',
      ],
      [
        { STREAMS_PATH: "x" },
        'STREAMS_PATH must be a path below "/", such as "/v1/stream/", got "x/"',
      ],
      [
        { PUBLIC_URL: "https://sse.example.com/x" },
        'PUBLIC_URL must be an origin such as "https://sse.example.com", got "https://sse.example.com/x"',
      ],
      [
        { PUBLIC_URL: "ftp://sse.example.com" },
        'PUBLIC_URL must be an origin such as "https://sse.example.com", got "ftp://sse.example.com"',
      ],
      [
        { JWT_SECRET: SECRET, PUBLISH_TOKEN: "p" },
        "JWT_SECRET and JWT_PUBLIC_KEY replace PUBLISH_TOKEN and SUBSCRIBE_TOKEN: set one kind",
      ],
      [
        { JWT_PUBLIC_KEY: "k", SUBSCRIBE_TOKEN: "s" },
        "JWT_SECRET and JWT_PUBLIC_KEY replace PUBLISH_TOKEN and SUBSCRIBE_TOKEN: set one kind",
      ],
      [{ JWT_SECRET: SECRET, JWT_PUBLIC_KEY: "k" }, "set JWT_SECRET or JWT_PUBLIC_KEY, not both"],
      [{ JWT_SECRET: "short" }, "JWT_SECRET must be at least 32 bytes"],
      [{ REDIS_URL: "redis://127.0.0.1:1" }, "cannot reach Redis at redis://127.0.0.1:1: "],
      [{ STRICT_ENV: "1", PORTT: "1" }, "STRICT_ENV=1 stops on the variables above"],
      [
        { SHED_RETRY_MS: "x1-2" },
        'SHED_RETRY_MS must be "<min>-<max>" in milliseconds, got "x1-2"',
      ],
      [
        { PUBLIC_URL: "see https://sse.example.com" },
        'PUBLIC_URL must be an origin such as "https://sse.example.com", got "see https://sse.example.com"',
      ],
    ];
    for (const [vars, reason] of cases) {
      const message = await refusal(vars);
      assert.ok(message.startsWith(reason), `${JSON.stringify(vars)}: ${message}`);
    }
    // A public key it cannot read, named by its variable.
    assert.match(await refusal({ JWT_PUBLIC_KEY: "not a key" }), /^JWT_PUBLIC_KEY /);
    // Accepted: one number for both ends, a path given without its slash, an
    // http origin, STRICT_ENV=1 with nothing unknown (LOG_FORMAT is a setting).
    const accepted = {
      SHED_RETRY_MS: "500",
      STREAMS_PATH: "/s",
      PUBLIC_URL: "http://sse.example.com",
      STRICT_ENV: "1",
      LOG_FORMAT: "text",
    };
    await withApp(accepted, async (url, lines) => {
      const created = await fetch(`${url}s/x`, { method: "PUT" });
      assert.equal(created.status, 201);
      assert.equal(created.headers.get("location"), "http://sse.example.com/s/x");
      assert.deepEqual(lines, []);
    });
  });

  test("a port it cannot listen on refuses the start, and leaves nothing open", async () => {
    await withApp({}, async (url) => {
      const port = new URL(url).port;
      const message = await refusal({ PORT: port });
      assert.ok(message.startsWith(`cannot listen on 127.0.0.1:${port}: `), message);
    });
  });

  test("a variable a slip away from a setting is named, once, as a warning; STRICT_ENV=1 as an error", async () => {
    await withApp({ JWT_SECERT: "x", HISTROY: "5", UNRELATED: "1" }, (_url, lines) => {
      assert.deepEqual(lines, [
        "warning: HISTROY is not a setting of this server: did you mean HISTORY?",
        "warning: JWT_SECERT is not a setting of this server: did you mean JWT_SECRET?",
      ]);
      return Promise.resolve();
    });
    await logged(async (lines) => {
      await assert.rejects(start({ STRICT_ENV: "1", HISTROY: "5" }), SettingError);
      assert.deepEqual(lines, [
        "error: HISTROY is not a setting of this server: did you mean HISTORY?",
      ]);
    });
  });
});

describe("app.ts defaults", () => {
  test("listens on 127.0.0.1 unless HOSTNAME says otherwise (an IPv6 address in brackets)", async () => {
    await logged(async () => {
      const env: Record<string, string> = { PORT: "0", TICK_MS: "0" };
      const app = await startApp({ ...system, env: (name) => env[name], envNames: () => [] });
      try {
        assert.match(app.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
        // Any origin by default; a stream of the default size limit takes a megabyte.
        const answer = await fetch(`${app.url}stats`, {
          headers: { origin: "https://a.example" },
        });
        assert.equal(answer.headers.get("access-control-allow-origin"), "*");
        await answer.body?.cancel();
        const stream = `${app.url}v1/stream/big`;
        await fetch(stream, { method: "PUT", headers: { "content-type": "text/plain" } });
        const big = await fetch(stream, {
          method: "POST",
          headers: { "content-type": "text/plain" },
          body: "x".repeat(1 << 20),
        });
        assert.equal(big.status, 204);
        assert.equal(
          (await fetch(`${app.url}health`)).headers.get("connection") === "close",
          false,
          "a connection serves many requests while running",
        );
      } finally {
        await app.stop("SIGINT");
      }
    });
    await withApp({ HOSTNAME: "::1" }, async (url) => {
      assert.match(url, /^http:\/\/\[::1\]:\d+\/$/);
      assert.equal((await fetch(`${url}health`)).status, 200);
    });
  });

  test("a Host no URL can hold: 400, and nothing logged", async () => {
    await withApp({}, async (url, lines) => {
      const { hostname, port } = new URL(url);
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = connect(Number(port), hostname, () => {
          socket.write("GET /health HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n");
        });
        let received = "";
        socket.on("data", (chunk) => received += chunk);
        socket.on("close", () => resolve(received));
        socket.on("error", reject);
      });
      assert.match(answer, /^HTTP\/1\.1 400 /);
      if (RUNTIME !== "deno") { // Deno answers it before any handler
        assert.match(answer, /\r\n\r\n\{"error":"malformed Host header or request target"\}$/);
      }
      assert.deepEqual(lines, []);
    });
  });

  test("REUSE_PORT=1 lets two apps listen on one port", async () => {
    await withApp({}, async (url) => {
      const port = new URL(url).port;
      if (RUNTIME === "deno") {
        // Deno shares a port only with --unstable-net, which this run does not have.
        const message = await refusal({ PORT: port, REUSE_PORT: "1" });
        assert.match(message, /needs --unstable-net$/);
        return;
      }
      assert.match(await refusal({ PORT: port }), /^cannot listen on/);
    });
    if (RUNTIME === "deno") return;
    await withApp({ REUSE_PORT: "1" }, async (url) => {
      await withApp({ REUSE_PORT: "1", PORT: new URL(url).port }, async (again) => {
        assert.equal(again, url);
        assert.equal((await fetch(`${again}health`)).status, 200);
      });
    });
  });
});

describe("app.ts routes", () => {
  test("/, /health and /ready answer GET and HEAD; other methods 405 with Allow", async () => {
    await withApp({ RETRY_MS: "1234", HEARTBEAT_MS: "4321" }, async (url) => {
      const page = await fetch(url);
      assert.equal(page.headers.get("content-type"), "text/html; charset=utf-8");
      const html = await page.text();
      assert.match(html, /import { connect } from "\/client.js";/);
      assert.match(html, /1234/, "the page knows RETRY_MS");
      assert.match(html, /4321/, "the page knows HEARTBEAT_MS");
      assert.deepEqual(await (await fetch(`${url}health`)).json(), { status: "alive" });
      const ready = await fetch(`${url}ready`);
      assert.equal(ready.status, 200);
      assert.deepEqual(await ready.json(), { ready: true, eventLogUp: true, reason: null });
      const head = await fetch(`${url}health`, { method: "HEAD" });
      assert.equal(head.status, 200);
      for (const path of ["", "health", "ready", "metrics", "probe"]) {
        const refused = await fetch(`${url}${path}`, { method: "POST" });
        assert.equal(refused.status, 405, path);
        assert.equal(refused.headers.get("allow"), "GET");
        assert.deepEqual(await refused.json(), { error: "use GET" });
      }
    });
  });

  test("/metrics: the broker's metrics and the process's memory; METRICS_TOKEN guards it", async () => {
    await withApp({}, async (url) => {
      const open = await fetch(`${url}metrics`);
      assert.equal(open.status, 200);
      assert.equal(open.headers.get("content-type"), METRICS_CONTENT_TYPE);
      const text = await open.text();
      assert.match(text, /^sse_clients 0$/m);
      assert.match(
        text,
        /# HELP process_resident_memory_bytes Resident memory size in bytes\.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes [1-9]\d*\n$/,
      );
    });
    await withApp({ METRICS_TOKEN: "m-secret" }, async (url) => {
      for (const headers of [{}, { authorization: "Bearer wrong" }] as Record<string, string>[]) {
        const refused = await fetch(`${url}metrics`, { headers });
        assert.equal(refused.status, 401);
        assert.equal(refused.headers.get("www-authenticate"), 'Bearer realm="metrics"');
        assert.deepEqual(await refused.json(), { error: "a valid token is required" });
      }
      const granted = await fetch(`${url}metrics`, {
        headers: { authorization: "Bearer m-secret" },
      });
      assert.equal(granted.status, 200);
      await granted.body?.cancel();
    });
  });

  test("/probe: what subscribing needs, one per address, a place in MAX_CLIENTS", async () => {
    const vars = { SUBSCRIBE_TOKEN: "s", MAX_CLIENTS: "2", HEARTBEAT_MS: "5000" };
    await withApp(vars, async (url) => {
      const refused = await fetch(`${url}probe`);
      assert.equal(refused.status, 401);
      await refused.body?.cancel();
      assert.equal((await stats(url)).rejected.auth, 1, "counted as an auth rejection");
      const held = await fetch(`${url}probe?token=s`);
      assert.equal(held.status, 200);
      const reader = held.body!.pipeThrough(new TextDecoderStream()).getReader();
      assert.match((await reader.read()).value!, /event: probe/);
      const second = await fetch(`${url}probe?token=s`);
      assert.equal(second.status, 429);
      assert.equal(second.headers.get("retry-after"), "5");
      assert.deepEqual(await second.json(), {
        error: "a path check is under way: try again shortly",
      });
      const events = await subscribe(`${url}events?token=s`); // the second place
      assert.equal((await stats(url)).reserved, 1);
      // The address is free again, the places are not: one probe, one stream.
      await reader.cancel();
      await eventually(async () => (await stats(url)).reserved === 0, 3000, "released");
      const other = await fetch(`${url}probe?token=s`);
      assert.equal(other.status, 200);
      const full = await fetch(`${url}probe?token=s`);
      assert.equal(full.status, 429, "one per address still");
      await full.body?.cancel();
      await other.body?.cancel();
      await events.cancel();
    });
    // Silent for twice HEARTBEAT_MS after the probes, the longest a stream may be.
    await withApp({ HEARTBEAT_MS: "30" }, async (url) => {
      const text = await (await fetch(`${url}probe`)).text();
      assert.match(text, /event: done\ndata: \{"idleMs":60\}\n\n$/);
    });
    await withApp({ MAX_CLIENTS: "1" }, async (url) => {
      const events = await subscribe(`${url}events`);
      const full = await fetch(`${url}probe`);
      assert.equal(full.status, 503);
      assert.equal(full.headers.get("retry-after"), "5");
      assert.deepEqual(await full.json(), { error: "too many open streams: try again" });
      await events.cancel();
    });
  });

  test("/session with signed tokens: a checked token becomes an HttpOnly cookie; DELETE clears it", async () => {
    const vars = { JWT_SECRET: SECRET, JWT_COOKIE: "own" };
    await withApp(vars, async (url) => {
      const session = (headers: Record<string, string>, method = "POST") =>
        fetch(`${url}session`, { method, headers });
      const valid = await token({ sse: { subscribe: ["*"] } });
      const set = await session({ authorization: `Bearer ${valid}` });
      assert.equal(set.status, 204);
      assert.equal(
        set.headers.get("set-cookie"),
        `own=${valid}; Path=/; HttpOnly; SameSite=Strict`,
      );
      const cleared = await session({}, "DELETE");
      assert.equal(cleared.status, 204);
      assert.equal(
        cleared.headers.get("set-cookie"),
        "own=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
      );
      const wrong = await session({}, "PUT");
      assert.equal(wrong.status, 405);
      assert.equal(wrong.headers.get("allow"), "POST, DELETE");
      assert.deepEqual(await wrong.json(), { error: "use POST or DELETE" });
      const bad = await session({ authorization: "Bearer not.a.token" });
      assert.equal(bad.status, 401);
      assert.equal(bad.headers.get("set-cookie"), null);
      await bad.body?.cancel();
      // A cookie of this origin checks out, but only a token in the header is set as one.
      const cookieOnly = await session({ cookie: `own=${valid}`, origin: new URL(url).origin });
      assert.equal(cookieOnly.status, 401);
      assert.equal(cookieOnly.headers.get("www-authenticate"), 'Bearer realm="sse"');
      assert.deepEqual(await cookieOnly.json(), {
        error: "send the token as Authorization: Bearer <token>",
      });
      assert.equal((await stats(url)).rejected.auth, 2);
    });
    // Secure behind a public https origin.
    await withApp({ ...vars, PUBLIC_URL: "https://sse.example.com" }, async (url) => {
      const valid = await token({ sse: { subscribe: ["*"] } });
      const set = await fetch(`${url}session`, {
        method: "POST",
        headers: { authorization: `Bearer ${valid}` },
      });
      assert.equal(
        set.headers.get("set-cookie"),
        `own=${valid}; Path=/; HttpOnly; SameSite=Strict; Secure`,
      );
    });
    // The cookie's name by default.
    await withApp({ JWT_SECRET: SECRET }, async (url) => {
      const valid = await token({ sse: { subscribe: ["*"] } });
      const set = await fetch(`${url}session`, {
        method: "POST",
        headers: { authorization: `Bearer ${valid}` },
      });
      assert.match(set.headers.get("set-cookie")!, /^sse_token=/);
    });
    // Without signed tokens there is no cookie, and no such route.
    await withApp({}, async (url) => {
      const response = await fetch(`${url}session`, { method: "POST" });
      assert.equal(response.status, 404);
      await response.body?.cancel();
    });
  });

  test("Durable Streams under STREAMS_PATH: Location from PUBLIC_URL, refusals counted as auth", async () => {
    const vars = {
      STREAMS_PATH: "/ds/",
      PUBLIC_URL: "https://sse.example.com/",
      PUBLISH_TOKEN: "p",
    };
    await withApp(vars, async (url) => {
      const created = await fetch(`${url}ds/a`, {
        method: "PUT",
        headers: { authorization: "Bearer p" },
      });
      assert.equal(created.status, 201);
      assert.equal(created.headers.get("location"), "https://sse.example.com/ds/a");
      const refused = await fetch(`${url}ds/b`, { method: "PUT" });
      assert.equal(refused.status, 401);
      await refused.body?.cancel();
      assert.equal((await stats(url)).rejected.auth, 1);
      // The default path is the broker's here: not a stream.
      const elsewhere = await fetch(`${url}v1/stream/a`, { method: "PUT" });
      assert.equal(elsewhere.status, 404);
      await elsewhere.body?.cancel();
    });
    await withApp({}, async (url) => {
      const created = await fetch(`${url}v1/stream/a`, { method: "PUT" });
      assert.equal(created.headers.get("location"), `${url}v1/stream/a`);
    });
  });

  test("STREAMS_MAX_BYTES bounds the streams, STREAMS_LONG_POLL_MS a long-poll", async () => {
    await withApp({ STREAMS_MAX_BYTES: "1000", STREAMS_LONG_POLL_MS: "50" }, async (url) => {
      const stream = `${url}v1/stream/small`;
      const text = { "content-type": "text/plain" };
      await fetch(stream, { method: "PUT", headers: text });
      const post = (body: string) => fetch(stream, { method: "POST", headers: text, body });
      assert.equal((await post("0123")).status, 204);
      const full = await post("x".repeat(1000));
      assert.equal(full.status, 503);
      await full.body?.cancel();
      const started = Date.now();
      const poll = await fetch(`${stream}?offset=now&live=long-poll`);
      assert.equal(poll.status, 204);
      assert.ok(Date.now() - started < 2000, "answered at its timeout");
    });
  });

  test("subscriptions are served; STREAMS_ALLOW_PRIVATE_WEBHOOKS=1 lets webhooks reach this machine", async () => {
    const hooks = await webhookReceiver(() => [200, { done: true }]);
    const subscription = (url: string) =>
      fetch(`${url}v1/stream/__ds/subscriptions/s`, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ type: "webhook", pattern: "hooked/*", webhook: { url: hooks.url } }),
      });
    try {
      await withApp({}, async (url) => {
        const refused = await subscription(url);
        assert.equal(refused.status, 400);
        assert.equal((await refused.json()).error.code, "WEBHOOK_URL_REJECTED");
      });
      await withApp({ STREAMS_ALLOW_PRIVATE_WEBHOOKS: "1" }, async (url) => {
        const created = await subscription(url);
        assert.equal(created.status, 201);
        assert.equal(
          (await created.json()).webhook.signing.jwks_url,
          `${url}v1/stream/__ds/jwks.json`,
        );
        await fetch(`${url}v1/stream/hooked/a`, {
          method: "PUT",
          headers: { "content-type": "text/plain" },
          body: "x",
        });
        assert.equal((await hooks.nth(1)).body.subscription_id, "s");
      });
    } finally {
      hooks.close();
    }
  });
});

describe("app.ts broker settings", () => {
  test("RETRY_MS, HEARTBEAT_MS, HISTORY, MAX_TOPICS, MAX_BATCH, MAX_BODY and the tokens reach the broker", async () => {
    const vars = {
      RETRY_MS: "777",
      HEARTBEAT_MS: "50",
      HISTORY: "2",
      MAX_TOPICS: "2",
      MAX_BATCH: "2",
      MAX_BODY: "100",
      PUBLISH_TOKEN: "p",
      SUBSCRIBE_TOKEN: "s",
    };
    await withApp(vars, async (url) => {
      const send = (body: unknown, headers: Record<string, string> = {}) =>
        fetch(`${url}publish`, {
          method: "POST",
          headers: { "content-type": "application/json", authorization: "Bearer p", ...headers },
          body: JSON.stringify(body),
        });
      const ids: string[] = [];
      for (const data of ["1", "2", "3"]) ids.push((await (await send({ data })).json()).id);
      const unauthorized = await send({ data: "x" }, { authorization: "Bearer s" });
      assert.equal(unauthorized.status, 401);
      await unauthorized.body?.cancel();
      const refusals = [
        await send({ data: "x".repeat(200) }),
        await send([{ data: "a" }, { data: "b" }, { data: "c" }]),
        await fetch(`${url}events?token=s&topic=a&topic=b&topic=c`),
      ];
      assert.deepEqual(
        await Promise.all(refusals.map(async (answer) => [answer.status, await answer.json()])),
        [
          [413, { error: "body is larger than 100 bytes" }],
          [400, { error: "entries must be at most 2 events" }],
          [400, { error: "at most 2 topics per client" }],
        ],
      );
      assert.equal((await fetch(`${url}events`)).status, 401);
      // Replay from the first: the history holds the last two.
      const reader: EventReader = await subscribe(`${url}events?token=s`, {
        "last-event-id": ids[0],
      });
      const first = await reader.event();
      assert.deepEqual([first.data, first.lastEventId], ["2", ids[1]]);
      assert.equal(reader.parser.retry, 777);
      while ((await reader.next())?.type !== "comment"); // a heartbeat within 50 ms
      await reader.cancel();
    });
  });

  test("MAX_CLIENTS sends a stream away with a retry within SHED_RETRY_MS; CORS_ORIGIN lists origins", async () => {
    const vars = {
      MAX_CLIENTS: "1",
      SHED_RETRY_MS: "3000-3001",
      CORS_ORIGIN: "https://a.example, https://b.example",
    };
    await withApp(vars, async (url) => {
      const held = await subscribe(`${url}events`);
      const away = await fetch(`${url}events`);
      assert.match(await away.text(), /^: too many clients\nretry: 300[01]\n\n$/);
      await held.cancel();
      for (const [origin, allowed] of [["https://b.example", true], ["https://c.example", false]]) {
        const answer = await fetch(`${url}stats`, { headers: { origin: String(origin) } });
        assert.equal(
          answer.headers.get("access-control-allow-origin"),
          allowed ? origin : null,
          String(origin),
        );
        await answer.body?.cancel();
      }
    });
  });

  test("HISTORY_BYTES, HISTORY_TTL_MS and IDEMPOTENCY_WINDOW_MS bound the in-memory log", async () => {
    await withApp({ HISTORY_BYTES: "60", IDEMPOTENCY_WINDOW_MS: "100" }, async (url) => {
      const key = { "idempotency-key": "k" };
      const send = (data: string, headers: Record<string, string> = {}) =>
        fetch(`${url}publish`, {
          method: "POST",
          headers: { "content-type": "application/json", ...headers },
          body: JSON.stringify({ data }),
        }).then((response) => response.json());
      const first = await send("x".repeat(20), key);
      assert.equal((await send("x".repeat(20), key)).id, first.id, "a repeat within the window");
      await new Promise((resolve) => setTimeout(resolve, 150));
      assert.notEqual((await send("x".repeat(20), key)).id, first.id, "the window has passed");
      const reader = await subscribe(`${url}events`, { "last-event-id": first.id });
      // Two 20-byte events do not fit in 60 bytes with their ids: a gap, then the newest.
      const seen = await reader.until((item) => item.type === "event" && item.event !== "gap");
      assert.equal(seen.filter((item) => item.type === "event" && item.event !== "gap").length, 1);
      await reader.cancel();
    });
    await withApp({ HISTORY_TTL_MS: "50" }, async (url) => {
      const id = await publish(url, { data: "old" });
      await publish(url, { data: "old too" });
      await new Promise((resolve) => setTimeout(resolve, 100));
      const reader = await subscribe(`${url}events`, { "last-event-id": id });
      const live = publish(url, { data: "new" });
      // What followed it expired: a gap (nothing older is left), the end of
      // the replay, then what is new.
      const seen = await reader.until((event) => event.data === "new");
      assert.deepEqual(seen.map((event) => event.event), ["gap", "replayed", "message"]);
      await live;
      await reader.cancel();
    });
  });

  test("TICK_MS publishes the start of each interval on the topic time", async () => {
    await withApp({ TICK_MS: "40" }, async (url) => {
      const reader = await subscribe(`${url}events?topic=time`);
      const tick = await reader.event();
      assert.equal(tick.event, "tick");
      assert.equal(Date.parse(tick.data) % 40, 0);
      await reader.cancel();
    });
  });
});

describe("app.ts signed tokens", () => {
  test("JWT_AUDIENCE, JWT_ISSUER, JWT_CLAIM, ALLOW_ANONYMOUS and the cookie's origins reach the check", async () => {
    const vars = {
      JWT_SECRET: SECRET,
      JWT_AUDIENCE: "aud",
      JWT_ISSUER: "iss",
      JWT_CLAIM: "grants",
      CORS_ORIGIN: "https://page.example",
    };
    await withApp(vars, async (url) => {
      const grants = { grants: { subscribe: ["*"], publish: ["t"] } };
      const good = await token({ ...grants, aud: "aud", iss: "iss" });
      const streamOf = (bearer: string) =>
        fetch(`${url}events`, { headers: { authorization: `Bearer ${bearer}` } });
      const open = await streamOf(good);
      assert.equal(open.status, 200);
      await open.body?.cancel();
      for (const bad of [{ ...grants, iss: "iss" }, { ...grants, aud: "aud" }]) {
        const refused = await streamOf(await token(bad));
        assert.equal(refused.status, 401, JSON.stringify(bad));
        await refused.body?.cancel();
      }
      // The grants under JWT_CLAIM only: "sse" is not read.
      const other = await fetch(`${url}publish`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${await token({ sse: grants.grants, aud: "aud", iss: "iss" })}`,
          "content-type": "application/json",
        },
        body: JSON.stringify({ data: "x", topic: "t" }),
      });
      assert.equal(other.status, 403);
      await other.body?.cancel();
      assert.equal((await fetch(`${url}events`)).status, 401, "no anonymous subscribers");
      // The cookie publishes from a listed origin, and from no other.
      const publishFrom = (origin: string) =>
        fetch(`${url}publish`, {
          method: "POST",
          headers: { cookie: `sse_token=${good}`, origin, "content-type": "application/json" },
          body: JSON.stringify({ data: "x", topic: "t" }),
        });
      assert.equal((await publishFrom("https://page.example")).status, 200);
      const elsewhere = await publishFrom("https://other.example");
      assert.equal(elsewhere.status, 401);
      await elsewhere.body?.cancel();
      // A stream refused by a grant (403) counts as an auth rejection.
      const before = (await stats(url)).rejected.auth;
      const forbidden = await fetch(`${url}v1/stream/t`, {
        method: "PUT",
        headers: {
          authorization: `Bearer ${await token({
            ...grants,
            aud: "aud",
            iss: "iss",
            grants: { subscribe: ["t"] },
          })}`,
        },
      });
      assert.equal(forbidden.status, 403);
      await forbidden.body?.cancel();
      assert.equal((await stats(url)).rejected.auth, before + 1);
    });
    await withApp({ JWT_SECRET: SECRET, ALLOW_ANONYMOUS: "1" }, async (url) => {
      const anonymous = await fetch(`${url}events`);
      assert.equal(anonymous.status, 200);
      await anonymous.body?.cancel();
    });
  });
});

describe("app.ts stop", () => {
  test("SIGINT ends every stream at once; a second stop is told it is not the one that closed", async () => {
    await logged(async (lines) => {
      const app = await start({ DRAIN_MS: "5000", TICK_MS: "1000" });
      const untrack = track(() => app.stop("SIGINT"));
      const reader = await subscribe(`${app.url}events`);
      const closing = app.stop("SIGINT");
      assert.equal(await reader.next(), null, "the stream ended");
      assert.equal(await closing, true);
      assert.equal(await app.stop("SIGTERM"), false);
      untrack();
      assert.deepEqual(lines, ["SIGINT: closing 1 streams"]);
      await assert.rejects(fetch(app.url), "no longer listening");
    });
  });

  test("SIGTERM with DRAIN_MS drains first, each answer closes its connection; a second signal closes", async () => {
    await logged(async (lines) => {
      const app = await start({ DRAIN_MS: "5000" });
      const untrack = track(() => app.stop("SIGINT"));
      const readers = [await subscribe(`${app.url}events`), await subscribe(`${app.url}events`)];
      const draining = app.stop("SIGTERM");
      const health = await fetch(`${app.url}health`);
      assert.equal(health.headers.get("connection"), "close");
      await health.body?.cancel();
      assert.deepEqual(lines, ["SIGTERM: draining 2 streams over 5000 ms"]);
      const closing = app.stop("SIGINT");
      for (const reader of readers) while ((await reader.next()) !== null);
      assert.equal(await closing, true);
      assert.equal(await draining, false, "the drain was cut short by the second signal");
      untrack();
      assert.match(lines.at(-1)!, /^SIGINT: closing [012] streams$/);
    });
    // Without DRAIN_MS, SIGTERM closes at once.
    await logged(async (lines) => {
      const app = await start({});
      assert.equal(await app.stop("SIGTERM"), true);
      assert.deepEqual(lines, ["SIGTERM: closing 0 streams"]);
    });
  });

  test("a drain that ends by itself closes after it", async () => {
    await logged(async (lines) => {
      const app = await start({ DRAIN_MS: "100" });
      const untrack = track(() => app.stop("SIGINT"));
      const reader = await subscribe(`${app.url}events`);
      const stopped = app.stop("SIGTERM");
      while ((await reader.next()) !== null);
      assert.equal(await stopped, true);
      untrack();
      assert.deepEqual(lines, [
        "SIGTERM: draining 1 streams over 100 ms",
        "SIGTERM: closing 0 streams",
      ]);
    });
  });
});

describe("app.ts on Redis", () => {
  let redis: RedisServer;
  before(async () => {
    redis = await RedisServer.start({
      appendfsync: "no",
      onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
    });
  });
  after(async () => {
    await redis?.stop();
  });

  test("two apps on one Redis share events and streams; one tick per interval for both", async () => {
    const vars = { REDIS_URL: redis.url, TICK_MS: "100", HISTORY_TTL_MS: "60000" };
    await withApp(vars, async (a) => {
      // Alone, it claims each interval and publishes it.
      const alone = await subscribe(`${a}events?topic=time`);
      assert.equal((await alone.event()).event, "tick");
      await alone.cancel();
      await withApp(vars, async (b) => {
        const readers = [await subscribe(`${a}events?topic=time`), await subscribe(`${b}events`)];
        const ticks = await Promise.all(readers.map((reader) => reader.event()));
        const next = await Promise.all(readers.map((reader) => reader.event()));
        // The same tick, by the same id, on both: published once.
        assert.equal(ticks[0].lastEventId, ticks[1].lastEventId);
        assert.equal(next[0].lastEventId, next[1].lastEventId);
        assert.equal(Date.parse(next[0].data) - Date.parse(ticks[0].data), 100);
        for (const reader of readers) await reader.cancel();
        const text = { "content-type": "text/plain" };
        await fetch(`${a}v1/stream/shared`, { method: "PUT", headers: text });
        await fetch(`${a}v1/stream/shared`, { method: "POST", headers: text, body: "from a" });
        assert.equal(await (await fetch(`${b}v1/stream/shared?offset=-1`)).text(), "from a");
        // Subscriptions live in Redis too: made on a, read on b.
        const made = await fetch(`${a}v1/stream/__ds/subscriptions/both`, {
          method: "PUT",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({
            type: "webhook",
            pattern: "x/*",
            webhook: { url: "https://h.example/x" },
          }),
        });
        assert.equal(made.status, 201);
        await made.body?.cancel();
        const seen = await fetch(`${b}v1/stream/__ds/subscriptions/both`);
        assert.equal((await seen.json()).id, "both");
        assert.deepEqual(await (await fetch(`${b}ready`)).json(), {
          ready: true,
          eventLogUp: true,
          reason: null,
        });
      });
    });
  });

  test(
    "Redis away: a tick not published is said once per outage, /ready says 503, streams 503; all back with it",
    {
      timeout: 30_000,
    },
    async () => {
      const own = await RedisServer.start({
        appendfsync: "no",
        onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
      });
      try {
        await withApp(
          { REDIS_URL: own.url, TICK_MS: "50", REDIS_TIMEOUT_MS: "300" },
          async (url, lines) => {
            const notPublished = () =>
              lines.filter((line) => line.startsWith("error: tick not published: "));
            const reader = await subscribe(`${url}events?topic=time`);
            await reader.event();
            await own.kill();
            await eventually(() => Promise.resolve(notPublished().length > 0), 5000, "a line");
            // Ticks go on failing: still one line.
            await new Promise((resolve) => setTimeout(resolve, 300));
            assert.equal(notPublished().length, 1, lines.join("\n"));
            assert.ok(
              lines.some((line) => line.startsWith("error: redis: connection lost")),
              lines.join("\n"),
            );
            const ready = await fetch(`${url}ready`);
            assert.equal(ready.status, 503);
            assert.deepEqual(await ready.json(), {
              ready: false,
              eventLogUp: false,
              reason: "the event log did not answer",
            });
            const stream = await fetch(`${url}v1/stream/s`, { method: "PUT" });
            assert.equal(stream.status, 503);
            await stream.body?.cancel();
            assert.ok(
              lines.some((line) => line.startsWith("error: stream store failed: ")),
              lines.join("\n"),
            );
            await own.start();
            const restarted = Date.now();
            await eventually(
              async () => (await fetch(`${url}ready`)).status === 200,
              10_000,
              "ready",
            );
            await reader.cancel();
            const again = await subscribe(`${url}events?topic=time`);
            // Ticks stored before the outage may arrive first: then two published since.
            await again.until((tick) => Date.parse(tick.data) >= restarted);
            await again.event();
            await again.cancel();
            assert.ok(
              lines.some((line) => line.startsWith("error: redis: streams connection lost")),
            );
            // A new outage (frozen this time): said again.
            own.signal("SIGSTOP");
            try {
              await eventually(
                () => Promise.resolve(notPublished().length === 2),
                5000,
                "a second line",
              );
              // Frozen at the claim, or at the append after it.
              assert.match(
                notPublished()[1],
                /^error: tick not published: (the event log did not store the event: )?Redis did not answer within 300 ms$/,
              );
            } finally {
              own.signal("SIGCONT");
            }
          },
        );
      } finally {
        await own.stop();
      }
    },
  );
});
