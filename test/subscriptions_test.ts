// The subscription APIs (sections 6 and 7 of the Durable Streams protocol)
// as subscriptions.ts serves them through streams.ts, in process: webhooks
// to a real HTTP receiver on 127.0.0.1 (signatures checked with node:crypto
// against the published JWKS), pull-wake claims, acks and releases, fencing,
// leases that run out, a receiver that fails then recovers, patterns,
// grants, limits and webhook URLs refused. The SubscriptionStore contract
// runs here on MemorySubscriptionStore (Redis's is in redis_test.ts); two
// processes sharing a Redis are in streams_cluster_test.ts.
import { describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { createHash, createPublicKey, verify } from "node:crypto";
import { Buffer } from "node:buffer";
import {
  createStreamsHandler,
  MemoryStreamStore,
  type StreamsHandler,
  type StreamStore,
} from "../streams.ts";
import {
  globMatch,
  MemorySubscriptionStore,
  Subscriptions,
  type SubscriptionsOptions,
  webhookUrlProblem,
} from "../subscriptions.ts";
import type { Authorize } from "../mod.ts";
import {
  type MakeSubscriptionStore,
  subscriptionStoreContract,
} from "./contract/subscription_store.ts";
import { type Delivery, webhookReceiver as receiver } from "./helpers.ts";

const ORIGIN = "http://streams.test";
const PREFIX = "/v1/stream/";
const ROOT = ORIGIN + PREFIX;

/** A JSON answer: its fields are checked by the assertions, whole. */
// deno-lint-ignore no-explicit-any -- what a test reads of an answer is what it asserts
type Answer = any;

/** The offset token of a position. */
function at(position: number): string {
  return `0000000000000000_${String(position).padStart(16, "0")}`;
}

/** `store` with `overrides` in place of some of its methods. */
function over(store: StreamStore, overrides: Partial<StreamStore>): StreamStore {
  return {
    create: (path, request) => store.create(path, request),
    append: (path, request) => store.append(path, request),
    read: (path, position, maxBytes, touch) => store.read(path, position, maxBytes, touch),
    info: (path) => store.info(path),
    delete: (path) => store.delete(path),
    list: (prefix, limit) => store.list(prefix, limit),
    waitForData: (path, position, signal) => store.waitForData(path, position, signal),
    ...overrides,
  };
}

/** A streams handler with subscriptions over memory stores; stopped by `close`. */
function setup(options: SubscriptionsOptions & { authorize?: Authorize } = {}) {
  const { authorize, ...rest } = options;
  const store = new MemoryStreamStore();
  const subscriptions = new Subscriptions({ allowLoopbackWebhooks: true, ...rest });
  const untrack = track(() => subscriptions.close());
  const handle = createStreamsHandler({ prefix: PREFIX, store, subscriptions, authorize });
  return {
    handle,
    store,
    subscriptions,
    close() {
      untrack();
      subscriptions.close();
    },
  };
}

function call(
  handle: StreamsHandler,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<Response> {
  return handle(
    new Request(path.startsWith("http") ? path : ROOT + path, {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    }),
  );
}

async function json(response: Response | Promise<Response>): Promise<[number, Answer]> {
  const answered = await response;
  const text = await answered.text();
  return [answered.status, text === "" ? undefined : JSON.parse(text)];
}

/** Creates a text stream, with `data` in it if given. */
async function stream(handle: StreamsHandler, name: string, data?: string): Promise<void> {
  const response = await handle(
    new Request(ROOT + name, {
      method: "PUT",
      headers: { "content-type": "text/plain" },
      body: data,
    }),
  );
  assert.equal(response.status, 201, `create ${name}`);
}

async function append(handle: StreamsHandler, name: string, data: string): Promise<void> {
  const response = await handle(
    new Request(ROOT + name, {
      method: "POST",
      headers: { "content-type": "text/plain" },
      body: data,
    }),
  );
  assert.equal(response.status, 204, `append to ${name}`);
}

/** Waits until the subscription's view satisfies `condition`. */
async function until(
  handle: StreamsHandler,
  id: string,
  condition: (view: Answer) => boolean,
  what: string,
): Promise<Answer> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const [, view] = await json(call(handle, "GET", `__ds/subscriptions/${id}`));
    if (condition(view)) return view;
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}: ${JSON.stringify(view)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function webhook(url: string, extra: Record<string, unknown> = {}) {
  return { type: "webhook", pattern: "events/*", webhook: { url }, lease_ttl_ms: 1000, ...extra };
}

/** Whether `delivery` carries a valid signature by a key of `jwks`, checked by node:crypto. */
function signed(delivery: Delivery, jwks: { keys: Record<string, string>[] }): boolean {
  const match = /^t=(\d+),kid=([^,]+),ed25519=([A-Za-z0-9_-]+)$/.exec(delivery.signature);
  if (!match) return false;
  const [, time, kid, signature] = match;
  const key = jwks.keys.find((candidate) => candidate.kid === kid);
  if (!key || Math.abs(Date.now() / 1000 - Number(time)) > 300) return false;
  return verify(
    null,
    Buffer.from(`${time}.${delivery.raw}`),
    createPublicKey({ key, format: "jwk" }),
    Buffer.from(signature, "base64url"),
  );
}

describe("SubscriptionStore contract: MemorySubscriptionStore", () => {
  const make: MakeSubscriptionStore = (maxSubscriptions) =>
    Promise.resolve({ store: new MemorySubscriptionStore({ maxSubscriptions }), close: () => {} });
  for (const { name, run } of subscriptionStoreContract) test(name, () => run(make));
});

describe("subscriptions: patterns and webhook URLs", () => {
  test("globMatch: * is one segment, ** Answer number, the rest literal", () => {
    const cases: [string, string, boolean][] = [
      ["events/*", "events/a", true],
      ["events/*", "events/a/b", false],
      ["events/*", "events", false],
      ["events/*", "other/a", false],
      ["events/**", "events", true],
      ["events/**", "events/a/b/c", true],
      ["**/x", "x", true],
      ["**/x", "a/b/x", true],
      ["**/x", "a/b/y", false],
      ["a/*/c", "a/b/c", true],
      ["a/*/c", "a/b/d", false],
      ["a/**/c", "a/c", true],
      ["a/**/c", "a/b/b/c", true],
      ["a*", "ab", false],
      ["a*", "a*", true],
      ["exact", "exact", true],
      ["exact", "exactly", false],
    ];
    for (const [pattern, name, expected] of cases) {
      assert.equal(globMatch(pattern, name), expected, `${pattern} ~ ${name}`);
    }
  });

  test("webhook URLs: https to public hosts; loopback only when allowed; private never", () => {
    const refused = (url: string, loopback = false) => webhookUrlProblem(url, loopback);
    assert.equal(refused("https://hooks.example.com/x"), undefined);
    assert.equal(refused("https://93.184.216.34/x"), undefined);
    assert.equal(refused("https://[2606:4700::1]/x"), undefined);
    assert.equal(refused("http://hooks.example.com/x"), "webhook.url must use https");
    assert.equal(refused("not a url"), "webhook.url is not a URL");
    assert.equal(
      refused("https://user:pw@hooks.example.com/"),
      "webhook.url may not hold credentials",
    );
    const place = "webhook.url may not target a loopback, private or link-local address";
    for (
      const url of [
        "https://10.0.0.1/",
        "https://172.16.0.1/",
        "https://172.31.255.255/",
        "https://192.168.1.1/",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/",
        "https://0.0.0.0/",
        "https://224.0.0.1/",
        "https://intranet/",
        "https://[fd00::1]/",
        "https://[fe80::1]/",
        "https://[::]/",
        "https://[::ffff:10.0.0.1]/",
        "https://[ff02::1]/",
      ]
    ) {
      assert.equal(refused(url), place, url);
      assert.equal(refused(url, true), place, `${url}, loopback allowed`);
    }
    for (
      const url of [
        "https://127.0.0.1/",
        "https://2130706433/", // 127.0.0.1 as one number
        "https://0x7f.1/",
        "https://localhost/",
        "https://api.localhost/",
        "https://[::1]/",
        "https://[::ffff:127.0.0.1]/",
      ]
    ) {
      assert.equal(refused(url), place, url);
      assert.equal(refused(url, true), undefined, `${url}, loopback allowed`);
    }
    assert.equal(refused("http://127.0.0.1:9/hook"), "webhook.url must use https");
    assert.equal(refused("http://127.0.0.1:9/hook", true), undefined);
    assert.equal(refused("http://localhost:9/hook", true), undefined);
    assert.equal(refused("http://10.0.0.1/hook", true), "webhook.url must use https");
    assert.equal(refused("ftp://127.0.0.1/", true), "webhook.url must use https");
    assert.equal(refused("https://172.15.0.1/"), undefined, "just outside 172.16/12");
    assert.equal(refused("https://172.32.0.1/"), undefined);
    assert.equal(refused("https://100.128.0.1/"), undefined, "just outside 100.64/10");
    assert.equal(refused("https://169.253.0.1/"), undefined);
    assert.equal(refused("https://192.167.0.1/"), undefined);
  });

  test("a refused webhook URL answers 400 WEBHOOK_URL_REJECTED and creates nothing", async () => {
    const { handle, close } = setup({ allowLoopbackWebhooks: false });
    try {
      const [status, body] = await json(
        call(handle, "PUT", "__ds/subscriptions/s", webhook("http://127.0.0.1:9/hook")),
      );
      assert.deepEqual([status, body], [400, {
        error: { code: "WEBHOOK_URL_REJECTED", message: "webhook.url must use https" },
      }]);
      assert.equal((await call(handle, "GET", "__ds/subscriptions/s")).status, 404);
    } finally {
      close();
    }
  });
});

describe("subscriptions: creation and views", () => {
  test("create 201, the same again 200, another configuration 409; the view in full", async () => {
    const { handle, close } = setup();
    try {
      await stream(handle, "events/old", "abc");
      const config = webhook("https://hooks.example.com/x", {
        streams: ["manual/b", "manual/a", "manual/a"],
        description: "d",
      });
      const [status, created] = await json(call(handle, "PUT", "__ds/subscriptions/s-1", config));
      assert.equal(status, 201);
      const [, jwks] = await json(call(handle, "GET", "__ds/jwks.json"));
      const kid = jwks.keys[0].kid;
      assert.match(kid, /^ds_[A-Za-z0-9_-]{43}$/);
      const view = {
        id: "s-1",
        subscription_id: "s-1",
        type: "webhook",
        pattern: "events/*",
        streams: [
          { path: "events/old", link_type: "glob", acked_offset: at(3) },
          { path: "manual/a", link_type: "explicit", acked_offset: at(0) },
          { path: "manual/b", link_type: "explicit", acked_offset: at(0) },
        ],
        webhook: {
          url: "https://hooks.example.com/x",
          signing: { alg: "ed25519", kid, jwks_url: `${ROOT}__ds/jwks.json` },
        },
        wake_stream: null,
        lease_ttl_ms: 1000,
        created_at: created.created_at,
        status: "active",
        description: "d",
      };
      assert.deepEqual(created, view, "existing streams linked at their tail");
      assert.ok(Math.abs(Date.parse(created.created_at) - Date.now()) < 5000);
      const [again, confirmed] = await json(call(handle, "PUT", "__ds/subscriptions/s-1", {
        ...config,
        streams: ["manual/a", "manual/b"],
      }));
      assert.deepEqual([again, confirmed], [200, view], "the same streams in another order");
      for (
        const change of [
          { description: "e" },
          { lease_ttl_ms: 2000 },
          { pattern: "events/**" },
          { streams: ["manual/a"] },
          { webhook: { url: "https://hooks.example.com/y" } },
        ]
      ) {
        const [conflict, body] = await json(
          call(handle, "PUT", "__ds/subscriptions/s-1", { ...config, ...change }),
        );
        assert.deepEqual(
          [conflict, body.error.code],
          [409, "SUBSCRIPTION_CONFLICT"],
          JSON.stringify(change),
        );
      }
      const [, read] = await json(call(handle, "GET", "__ds/subscriptions/s-1"));
      assert.deepEqual(read, view);
      assert.ok(
        !/token|secret|hash|root|"d":|"x":/.test(JSON.stringify(read)),
        "nothing secret shown",
      );
    } finally {
      close();
    }
  });

  test("the JWKS: public keys only, with its type and caching", async () => {
    const { handle, close } = setup();
    try {
      const response = await call(handle, "GET", "__ds/jwks.json");
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("content-type"), "application/jwk-set+json");
      assert.equal(response.headers.get("cache-control"), "public, max-age=300");
      const { keys } = await response.json();
      assert.equal(keys.length, 1);
      assert.deepEqual(Object.keys(keys[0]).sort(), ["alg", "crv", "kid", "kty", "use", "x"]);
      assert.deepEqual([keys[0].kty, keys[0].crv, keys[0].alg, keys[0].use], [
        "OKP",
        "Ed25519",
        "EdDSA",
        "sig",
      ]);
      const [, again] = await json(call(handle, "GET", "__ds/jwks.json"));
      assert.deepEqual(again.keys, keys, "one key for the engine's life");
      assert.equal((await call(handle, "POST", "__ds/jwks.json", "{}")).status, 405);
    } finally {
      close();
    }
  });

  test("each field checked where it enters, with a reason that names it", async () => {
    const { handle, close } = setup({ maxStreams: 3 });
    try {
      const refusal = async (body: unknown, id = "s") => {
        const [status, answer] = await json(call(handle, "PUT", `__ds/subscriptions/${id}`, body));
        return `${status} ${answer.error.code}: ${answer.error.message}`;
      };
      const base = webhook("https://hooks.example.com/x");
      assert.equal(await refusal("{"), "400 INVALID_REQUEST: the body is not JSON");
      assert.equal(await refusal([]), "400 INVALID_REQUEST: the body is not a JSON object");
      assert.equal(
        await refusal({ ...base, type: "push" }),
        '400 INVALID_REQUEST: type must be "webhook" or "pull-wake"',
      );
      assert.equal(
        await refusal({ ...base, pattern: undefined }),
        "400 INVALID_REQUEST: give pattern, streams or both",
      );
      assert.equal(
        await refusal({ ...base, pattern: "" }),
        "400 INVALID_REQUEST: pattern must be a non-empty glob of at most 1024 characters",
      );
      assert.equal(
        await refusal({ ...base, pattern: "__ds/*" }),
        "400 INVALID_REQUEST: pattern may not cover __ds",
      );
      assert.equal(
        await refusal({ ...base, streams: "a" }),
        "400 INVALID_REQUEST: streams must be an array of stream paths",
      );
      assert.equal(
        await refusal({ ...base, streams: [""] }),
        "400 INVALID_REQUEST: streams must be a stream path",
      );
      for (const path of ["a/../b", "./a", "a/%2E%2e", "a\\..\\b"]) {
        assert.equal(
          await refusal({ ...base, streams: [path] }),
          "400 INVALID_REQUEST: streams may not have . or .. segments",
          path,
        );
      }
      assert.equal(
        await refusal({ ...base, streams: ["__ds/x"] }),
        "400 INVALID_REQUEST: streams must be a stream path outside __ds",
      );
      assert.equal(
        await refusal({ type: "pull-wake", pattern: "a/*", wake_stream: "/__ds/x" }),
        "400 INVALID_REQUEST: wake_stream must be a stream path outside __ds",
      );
      assert.equal(
        await refusal({ ...base, streams: ["a", "b", "c", "d"] }),
        "400 INVALID_REQUEST: streams lists more than 3 streams",
      );
      assert.equal(
        await refusal({ ...base, webhook: undefined }),
        "400 INVALID_REQUEST: a webhook subscription needs webhook.url",
      );
      for (const lease of [999, 600_001, 1.5, "1000"]) {
        assert.equal(
          await refusal({ ...base, lease_ttl_ms: lease }),
          "400 INVALID_REQUEST: lease_ttl_ms must be an integer from 1000 to 600000",
        );
      }
      assert.equal(
        await refusal({ ...base, description: 7 }),
        "400 INVALID_REQUEST: description must be a string of at most 1024 characters",
      );
      assert.equal(
        await refusal({ type: "pull-wake", pattern: "a/*" }),
        "400 INVALID_REQUEST: wake_stream must be a stream path",
      );
      assert.equal(
        await refusal(base, "bad id!"),
        "400 INVALID_REQUEST: a subscription id is 1-128 of A-Z a-z 0-9 . _ ~ -",
      );
      for (const name of ["e1", "e2", "e3", "e4"]) await stream(handle, `many/${name}`);
      assert.equal(
        await refusal({ ...base, pattern: "many/*" }),
        "400 INVALID_REQUEST: the subscription would follow more than 3 streams",
      );
      const big = await call(handle, "PUT", "__ds/subscriptions/s", "x".repeat(70_000));
      assert.deepEqual(
        [big.status, (await big.json()).error.code],
        [413, "PAYLOAD_TOO_LARGE"],
      );
      assert.equal(
        (await call(handle, "GET", "__ds/subscriptions/s")).status,
        404,
        "none was made",
      );
      assert.equal((await call(handle, "GET", "__ds/nothing")).status, 404);
      assert.equal((await call(handle, "GET", "__ds/subscriptions/s/other")).status, 404);
      assert.equal((await call(handle, "PATCH", "__ds/subscriptions/s")).status, 405);
    } finally {
      close();
    }
  });

  test("a store at its limit refuses another subscription with 503", async () => {
    const { handle, close } = setup({
      store: new MemorySubscriptionStore({ maxSubscriptions: 1 }),
    });
    try {
      const config = webhook("https://hooks.example.com/x");
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/a", config)).status, 201);
      const [status, body] = await json(call(handle, "PUT", "__ds/subscriptions/b", config));
      assert.deepEqual([status, body.error.code], [503, "UNAVAILABLE"]);
      assert.equal((await call(handle, "DELETE", "__ds/subscriptions/a")).status, 204);
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/b", config)).status, 201);
    } finally {
      close();
    }
  });

  test("explicit streams: added at their tail, removed alone; a glob link stays", async () => {
    const { handle, close } = setup();
    try {
      await stream(handle, "events/a", "12");
      await stream(handle, "x/y", "1234");
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/s", webhook("https://hooks.example.com/x")))
          .status,
        201,
      );
      const add = await call(handle, "POST", "__ds/subscriptions/s/streams", {
        streams: ["x/y", "events/a", "new/one"],
      });
      assert.equal(add.status, 204);
      const links = async () =>
        (await json(call(handle, "GET", "__ds/subscriptions/s")))[1].streams;
      assert.deepEqual(await links(), [
        { path: "events/a", link_type: "explicit", acked_offset: at(2) },
        { path: "new/one", link_type: "explicit", acked_offset: at(0) },
        { path: "x/y", link_type: "explicit", acked_offset: at(4) },
      ]);
      assert.equal(
        (await call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["x/y"] })).status,
        204,
      );
      for (const path of ["events%2Fa", "x/y", "absent%2Fstream"]) {
        assert.equal(
          (await call(handle, "DELETE", `__ds/subscriptions/s/streams/${path}`)).status,
          204,
          path,
        );
      }
      assert.deepEqual(await links(), [
        { path: "events/a", link_type: "glob", acked_offset: at(2) },
        { path: "new/one", link_type: "explicit", acked_offset: at(0) },
      ]);
      assert.equal(
        (await call(handle, "POST", "__ds/subscriptions/none/streams", { streams: ["a"] })).status,
        404,
      );
      const [bad] = await json(call(handle, "DELETE", "__ds/subscriptions/s/streams/%E0%A4%A"));
      assert.equal(bad, 400);
    } finally {
      close();
    }
  });
});

describe("subscriptions: webhook delivery", () => {
  test("a signed wake on the first append; {done: true} acks its snapshot; the next append wakes again", async () => {
    const hooks = await receiver(() => [200, { done: true }]);
    const { handle, close } = setup();
    try {
      // A lease far longer than the test: each wake ends by its done, not by its lease.
      const [, created] = await json(
        call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url, { lease_ttl_ms: 600_000 })),
      );
      const [, jwks] = await json(call(handle, "GET", "__ds/jwks.json"));
      await stream(handle, "events/a", "hello");
      const first = await hooks.nth(1);
      assert.ok(signed(first, jwks), "signed by the published key");
      assert.ok(
        !signed({ ...first, raw: first.raw.replace("events/a", "events/b") }, jwks),
        "a changed body fails",
      );
      assert.deepEqual({ ...first.body, wake_id: "*", callback_token: "*" }, {
        subscription_id: "s",
        wake_id: "*",
        generation: 1,
        streams: [{
          path: "events/a",
          link_type: "glob",
          acked_offset: at(0),
          tail_offset: at(5),
          has_pending: true,
        }],
        callback_url: `${ROOT}__ds/subscriptions/s/callback`,
        callback_token: "*",
      }, "a stream created after the subscription is linked before its first append");
      assert.match(first.body.wake_id, /^w_/);
      assert.match(first.body.callback_token, /^[A-Za-z0-9_-]{43}$/);
      assert.equal(created.webhook.signing.kid, first.signature.split(",")[1].slice(4));
      await until(handle, "s", (view) => view.streams[0].acked_offset === at(5), "the auto-ack");
      await append(handle, "events/a", "!!");
      const second = await hooks.nth(2);
      assert.equal(second.body.generation, 2);
      assert.notEqual(second.body.wake_id, first.body.wake_id);
      assert.notEqual(second.body.callback_token, first.body.callback_token);
      assert.deepEqual(second.body.streams[0], {
        path: "events/a",
        link_type: "glob",
        acked_offset: at(5),
        tail_offset: at(7),
        has_pending: true,
      });
      await until(handle, "s", (view) => view.streams[0].acked_offset === at(7), "the second ack");
      await stream(handle, "other/b", "not followed");
      await append(handle, "events/a", "3");
      await hooks.nth(3);
      assert.equal(hooks.deliveries.length, 3, "no wake for a stream the pattern does not match");
    } finally {
      close();
      hooks.close();
    }
  });

  test("callbacks: ack and heartbeat, done, then fenced; a wrong token, generation or wake id is fenced", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      const callback = (payload: unknown, token = body.callback_token) =>
        json(
          call(handle, "POST", body.callback_url, payload, { authorization: `Bearer ${token}` }),
        );
      const wake = { wake_id: body.wake_id, generation: body.generation };
      const fenced = [409, {
        error: { code: "FENCED", message: "this wake is no longer current" },
      }];
      assert.deepEqual(await callback({ ...wake, generation: 2 }), fenced);
      assert.deepEqual(await callback({ ...wake, wake_id: "w_other" }), fenced);
      assert.deepEqual(await callback(wake, "A".repeat(43)), fenced);
      assert.deepEqual(
        await json(call(handle, "POST", body.callback_url, wake)),
        [401, {
          error: {
            code: "UNAUTHORIZED",
            message: "the wake's token is required as a Bearer token",
          },
        }],
      );
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/a", offset: at(6) }] }),
        [400, {
          error: { code: "INVALID_OFFSET", message: 'an ack of "events/a" is past its tail' },
        }],
      );
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/a", offset: "12" }] }),
        [400, { error: { code: "INVALID_OFFSET", message: "an ack's offset is malformed" } }],
      );
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/zz", offset: at(0) }] }),
        [400, {
          error: {
            code: "INVALID_REQUEST",
            message: 'the subscription does not follow "events/zz"',
          },
        }],
      );
      assert.deepEqual(await callback({ generation: 1 }), [400, {
        error: { code: "INVALID_REQUEST", message: "wake_id and generation are required" },
      }]);
      // A heartbeat with a partial ack: applied, the wake goes on.
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/a", offset: at(2) }] }),
        [200, { ok: true, next_wake: false }],
      );
      const view = await until(handle, "s", () => true, "the view");
      assert.equal(view.streams[0].acked_offset, at(2));
      // An ack never goes back.
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/a", offset: at(1) }] }),
        [200, { ok: true, next_wake: false }],
      );
      assert.equal(
        (await until(handle, "s", () => true, "the view")).streams[0].acked_offset,
        at(2),
      );
      assert.deepEqual(
        await callback({ ...wake, acks: [{ stream: "events/a", offset: at(5) }], done: true }),
        [200, { ok: true, next_wake: false }],
      );
      assert.deepEqual(await callback({ ...wake, done: true }), fenced, "the same callback again");
      assert.equal(hooks.deliveries.length, 1);
    } finally {
      close();
      hooks.close();
    }
  });

  test("done with work left: next_wake true and a new wake with what remains", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      await append(handle, "events/a", "more");
      const [status, answer] = await json(call(handle, "POST", body.callback_url, {
        wake_id: body.wake_id,
        generation: body.generation,
        acks: [{ stream: "events/a", offset: at(5) }],
        done: true,
      }, { authorization: `Bearer ${body.callback_token}` }));
      assert.deepEqual([status, answer], [200, { ok: true, next_wake: true }]);
      const next = await hooks.nth(2);
      assert.equal(next.body.generation, 2);
      assert.deepEqual(
        [next.body.streams[0].acked_offset, next.body.streams[0].tail_offset],
        [at(5), at(9)],
      );
    } finally {
      close();
      hooks.close();
    }
  });

  test("a receiver that fails is tried again after about a second, and its wake is delivered once it is back", async () => {
    const hooks = await receiver((_, index) => index === 0 ? [500, {}] : [200, { done: true }]);
    const lines: string[] = [];
    const { handle, close } = setup({ logger: (line) => lines.push(line), sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const failed = await hooks.nth(1);
      const view = await until(
        handle,
        "s",
        (view) => view.status === "failed",
        "the failed status",
      );
      assert.equal(view.streams[0].acked_offset, at(0), "nothing acked by a failure");
      assert.deepEqual(lines, ["subscription s: the webhook answered 500"]);
      // The failed wake's token is spent.
      const [fenced] = await json(call(handle, "POST", failed.body.callback_url, {
        wake_id: failed.body.wake_id,
        generation: failed.body.generation,
        done: true,
      }, { authorization: `Bearer ${failed.body.callback_token}` }));
      assert.equal(fenced, 409);
      const started = Date.now();
      // An append meanwhile does not hurry the retry.
      await append(handle, "events/a", "!");
      const retried = await hooks.nth(2);
      const waited = Date.now() - started;
      assert.ok(waited >= 600 && waited < 2000, `retried after ${waited} ms`);
      assert.equal(retried.body.generation, 2);
      assert.deepEqual(retried.body.streams[0].tail_offset, at(6));
      const after = await until(
        handle,
        "s",
        (view) => view.streams[0].acked_offset === at(6),
        "the ack",
      );
      assert.equal(after.status, "active");
      assert.equal(hooks.deliveries.length, 2);
    } finally {
      close();
      hooks.close();
    }
  });

  test("a webhook that does not answer in time fails like an error; a redirect is not followed", async () => {
    const hooks = await receiver((_, index) => index === 0 ? "hold" : [302, {}]);
    const lines: string[] = [];
    const { handle, close } = setup({
      logger: (line) => lines.push(line),
      webhookTimeout: 200,
      sweepInterval: 50,
    });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      await until(handle, "s", (view) => view.status === "failed", "the failed status");
      await hooks.nth(2);
      await until(handle, "s", () => lines.length === 2, "the second failure");
      assert.deepEqual(lines, [
        "subscription s: the webhook did not answer in time",
        "subscription s: the webhook answered 302",
      ]);
    } finally {
      close();
      hooks.close();
    }
  });

  test("a lease that runs out ends the wake: the next wake is delivered and the old token is fenced", async () => {
    const hooks = await receiver(); // answers {} and never calls back
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const first = await hooks.nth(1);
      const started = Date.now();
      const second = await hooks.nth(2);
      const waited = Date.now() - started;
      assert.ok(waited >= 900 && waited < 3000, `redelivered after ${waited} ms`);
      assert.equal(second.body.generation, 2);
      const [status] = await json(call(handle, "POST", first.body.callback_url, {
        wake_id: first.body.wake_id,
        generation: first.body.generation,
        done: true,
      }, { authorization: `Bearer ${first.body.callback_token}` }));
      assert.equal(status, 409);
    } finally {
      close();
      hooks.close();
    }
  });

  test("a callback extends the lease: no second wake while the worker reports", async () => {
    const hooks = await receiver();
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      const heartbeat = () =>
        json(call(handle, "POST", body.callback_url, {
          wake_id: body.wake_id,
          generation: body.generation,
        }, { authorization: `Bearer ${body.callback_token}` }));
      // Six heartbeats 400 ms apart: 2.4 s, beyond the 1 s lease.
      for (let i = 0; i < 6; i++) {
        assert.deepEqual(await heartbeat(), [200, { ok: true, next_wake: false }]);
        await new Promise((resolve) => setTimeout(resolve, 400));
      }
      assert.equal(hooks.deliveries.length, 1);
    } finally {
      close();
      hooks.close();
    }
  });

  test("a deleted subscription: its callbacks fail without moving anything; its id starts over", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      assert.equal((await call(handle, "DELETE", "__ds/subscriptions/s")).status, 204);
      assert.equal((await call(handle, "DELETE", "__ds/subscriptions/s")).status, 404);
      const settle = () =>
        json(call(handle, "POST", body.callback_url, {
          wake_id: body.wake_id,
          generation: body.generation,
          done: true,
        }, { authorization: `Bearer ${body.callback_token}` }));
      assert.deepEqual((await settle())[0], 404);
      const [, created] = await json(
        call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url)),
      );
      assert.deepEqual(created.streams, [{
        path: "events/a",
        link_type: "glob",
        acked_offset: at(5),
      }]);
      assert.deepEqual((await settle())[0], 409, "the old token matches nothing");
      await append(handle, "events/a", "!");
      assert.equal((await hooks.nth(2)).body.generation, 1);
    } finally {
      close();
      hooks.close();
    }
  });
});

describe("subscriptions: streams that come and go", () => {
  test("a deleted stream: its glob link goes, an explicit one starts over for the stream made again", async () => {
    const hooks = await receiver(() => [200, { done: true }]);
    const { handle, close } = setup();
    try {
      await call(
        handle,
        "PUT",
        "__ds/subscriptions/s",
        webhook(hooks.url, { streams: ["kept/one"] }),
      );
      await stream(handle, "events/a", "hello");
      await stream(handle, "kept/one", "abc");
      await hooks.nth(1);
      await until(
        handle,
        "s",
        (view) => view.streams.every((link: Answer) => link.acked_offset !== at(0)),
        "the acks",
      );
      for (const name of ["events/a", "kept/one"]) {
        assert.equal((await handle(new Request(ROOT + name, { method: "DELETE" }))).status, 204);
      }
      const seen = hooks.deliveries.length;
      await stream(handle, "events/b", "x");
      const next = await hooks.nth(seen + 1);
      assert.deepEqual(next.body.streams.map((link) => link.path), ["kept/one", "events/b"]);
      const view = await until(handle, "s", (view) => view.streams.length === 2, "the pruned view");
      assert.deepEqual(view.streams.map((link: Answer) => [link.path, link.link_type]), [
        ["kept/one", "explicit"],
        ["events/b", "glob"],
      ]);
      await until(
        handle,
        "s",
        (view) => view.streams[0].acked_offset === at(0),
        "kept/one from the start",
      );
      await stream(handle, "kept/one", "12");
      const last = await hooks.nth(seen + 2);
      assert.deepEqual(last.body.streams[0], {
        path: "kept/one",
        link_type: "explicit",
        acked_offset: at(0),
        tail_offset: at(2),
        has_pending: true,
      });
    } finally {
      close();
      hooks.close();
    }
  });

  test("a subscription at its stream limit links no more, until deleted streams make room", async () => {
    const lines: string[] = [];
    const { handle, close } = setup({ maxStreams: 2, logger: (line) => lines.push(line) });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook("https://hooks.example.com/x"));
      for (const name of ["events/a", "events/b", "events/c"]) await stream(handle, name, "x");
      const names = async () =>
        (await json(call(handle, "GET", "__ds/subscriptions/s")))[1].streams.map((link: Answer) =>
          link.path
        );
      assert.deepEqual(await names(), ["events/a", "events/b"]);
      assert.deepEqual(lines, ["subscription s follows 2 streams: another is not linked"]);
      assert.equal(
        (await handle(new Request(ROOT + "events/a", { method: "DELETE" }))).status,
        204,
      );
      await append(handle, "events/c", "y");
      assert.deepEqual(await names(), ["events/b", "events/c"]);
      assert.equal(lines.length, 1);
    } finally {
      close();
    }
  });
});

describe("subscriptions: pull-wake", () => {
  async function pullWake(handle: StreamsHandler, lease = 1000) {
    const created = await handle(
      new Request(ROOT + "wake/pool", {
        method: "PUT",
        headers: { "content-type": "application/json" },
      }),
    );
    assert.equal(created.status, 201);
    const [status] = await json(call(handle, "PUT", "__ds/subscriptions/p", {
      type: "pull-wake",
      pattern: "**",
      wake_stream: "wake/pool",
      lease_ttl_ms: lease,
    }));
    assert.equal(status, 201);
  }

  const wakes = async (handle: StreamsHandler) =>
    (await json(handle(new Request(ROOT + "wake/pool"))))[1] as Record<string, unknown>[];

  const claim = (handle: StreamsHandler, worker: string) =>
    json(call(handle, "POST", "__ds/subscriptions/p/claim", { worker }));

  test("a wake event on the wake stream; claim, a busy claim, ack as heartbeat, ack done", async () => {
    const { handle, close } = setup();
    try {
      await pullWake(handle);
      await stream(handle, "jobs/a", "hello");
      const deadline = Date.now() + 5000;
      while ((await wakes(handle)).length === 0 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      const [event] = await wakes(handle);
      assert.deepEqual({ ...event, ts: 0 }, {
        type: "wake",
        subscription_id: "p",
        stream: "jobs/a",
        generation: 1,
        ts: 0,
      });
      assert.ok(Math.abs((event.ts as number) - Date.now()) < 5000);
      const [status, claimed] = await claim(handle, "worker-1");
      assert.equal(status, 200);
      assert.deepEqual({ ...claimed, wake_id: "*", token: "*" }, {
        wake_id: "*",
        generation: 1,
        token: "*",
        streams: [{
          path: "jobs/a",
          link_type: "glob",
          acked_offset: at(0),
          tail_offset: at(5),
          has_pending: true,
        }],
        lease_ttl_ms: 1000,
      }, "the wake stream itself is never linked");
      assert.deepEqual(await claim(handle, "worker-2"), [409, {
        error: {
          code: "ALREADY_CLAIMED",
          message: "another worker holds the lease",
          current_holder: "worker-1",
          generation: 1,
        },
      }]);
      const ack = (body: unknown, token = claimed.token) =>
        json(
          call(handle, "POST", "__ds/subscriptions/p/ack", body, {
            authorization: `Bearer ${token}`,
          }),
        );
      const wake = { wake_id: claimed.wake_id, generation: 1 };
      assert.deepEqual(
        await ack({ ...wake, acks: [{ stream: "jobs/a", offset: at(3) }] }),
        [200, { ok: true, next_wake: false }],
      );
      assert.deepEqual(
        await ack({ ...wake, acks: [{ stream: "jobs/a", offset: at(5) }], done: true }),
        [200, { ok: true, next_wake: false }],
      );
      assert.equal((await ack({ ...wake, done: true }))[0], 409, "fenced once done");
      assert.deepEqual(await claim(handle, "worker-2"), [409, {
        error: { code: "NO_PENDING_WORK", message: "the subscription has no pending work" },
      }]);
      assert.equal((await wakes(handle)).length, 1, "one wake event");
      // Bad claims.
      assert.equal((await claim(handle, ""))[0], 400);
      assert.equal((await claim(handle, "a\nb"))[0], 400);
      assert.equal(
        (await json(call(handle, "POST", "__ds/subscriptions/none/claim", { worker: "w" })))[0],
        404,
      );
    } finally {
      close();
    }
  });

  test("release with work left writes another wake; a lapsed lease lets another worker claim", async () => {
    // No sweep within the test: the claim itself sees that the lease has lapsed.
    const { handle, close } = setup({ sweepInterval: 60_000 });
    try {
      await pullWake(handle);
      await stream(handle, "jobs/a", "hello");
      const [, first] = await claim(handle, "worker-1");
      const release = (claimed: { wake_id: string; generation: number; token: string }) =>
        call(handle, "POST", "__ds/subscriptions/p/release", {
          wake_id: claimed.wake_id,
          generation: claimed.generation,
        }, { authorization: `Bearer ${claimed.token}` });
      const released = await release(first);
      assert.equal(released.status, 204);
      assert.equal((await release(first)).status, 409, "fenced once released");
      const events = await wakes(handle);
      assert.deepEqual(
        events.map((event) => event.generation),
        [1, 2],
        "a new wake for the work left",
      );
      const [, second] = await claim(handle, "worker-2");
      assert.equal(second.generation, 2);
      // worker-2 goes silent: its lease lapses and worker-3 claims.
      const started = Date.now();
      let [status, third] = await claim(handle, "worker-3");
      while (status === 409 && Date.now() - started < 5000) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        [status, third] = await claim(handle, "worker-3");
      }
      const waited = Date.now() - started;
      assert.equal(status, 200);
      assert.ok(waited >= 800, `claimed after ${waited} ms`);
      assert.equal(third.generation, 3, "a new generation fences the lapsed worker");
      const [stale] = await json(call(handle, "POST", "__ds/subscriptions/p/ack", {
        wake_id: second.wake_id,
        generation: second.generation,
        done: true,
      }, { authorization: `Bearer ${second.token}` }));
      assert.equal(stale, 409);
      // Callbacks are for webhooks; acks for pull-wake.
      const [wrong, body] = await json(call(handle, "POST", "__ds/subscriptions/p/callback", {
        wake_id: third.wake_id,
        generation: third.generation,
      }, { authorization: `Bearer ${third.token}` }));
      assert.deepEqual([wrong, body.error.message], [
        400,
        "callback does not apply to a pull-wake subscription",
      ]);
    } finally {
      close();
    }
  });
});

describe("subscriptions: grants", () => {
  /** Grants from the `x-grants` header, as JSON; none without it. */
  const authorize: Authorize = (request) => {
    const grants = request.headers.get("x-grants");
    return grants === null ? false : JSON.parse(grants);
  };

  test("changing needs publish on the subscription, reading subscribe; its streams must be readable", async () => {
    const hooks = await receiver(() => [200, { done: true }]);
    const { handle, close } = setup({ authorize });
    try {
      const as = (grants: unknown) => ({ "x-grants": JSON.stringify(grants) });
      const put = (grants: unknown, body: unknown) =>
        json(call(handle, "PUT", "__ds/subscriptions/u-42", body, as(grants)));
      const config = webhook(hooks.url, { pattern: "user/42/*" });
      const owner = {
        publish: ["__ds/subscriptions/u-42-*", "__ds/subscriptions/u-42"],
        subscribe: ["user/42/*", "__ds/subscriptions/u-42"],
      };
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/u-42", config)).status, 401);
      assert.deepEqual(await put({ subscribe: ["user/42/*"] }, config), [403, {
        error: { code: "FORBIDDEN", message: "no publish grant for this subscription" },
      }]);
      assert.deepEqual(
        await put({ ...owner, subscribe: ["user/42/a"] }, config),
        [403, { error: { code: "FORBIDDEN", message: "no subscribe grant for pattern" } }],
        "a pattern wider than the grant",
      );
      assert.deepEqual(
        (await put(owner, { ...config, pattern: "user/*/x" }))[0],
        403,
        "another user's streams by a wildcard",
      );
      assert.deepEqual(
        await put(owner, { ...config, streams: ["user/7/private"] }),
        [403, { error: { code: "FORBIDDEN", message: 'no subscribe grant for "user/7/private"' } }],
      );
      assert.deepEqual(
        (await put(owner, {
          type: "pull-wake",
          pattern: "user/42/*",
          wake_stream: "user/42/wake",
        }))[1],
        { error: { code: "FORBIDDEN", message: "no publish grant for wake_stream" } },
      );
      assert.equal((await put(owner, config))[0], 201);
      assert.equal(
        (await call(
          handle,
          "GET",
          "__ds/subscriptions/u-42",
          undefined,
          as({ subscribe: ["user/42/*"] }),
        )).status,
        403,
      );
      assert.equal(
        (await call(handle, "GET", "__ds/subscriptions/u-42", undefined, as(owner))).status,
        200,
      );
      assert.equal(
        (await call(
          handle,
          "POST",
          "__ds/subscriptions/u-42/streams",
          { streams: ["user/7/x"] },
          as(owner),
        )).status,
        403,
      );
      assert.equal(
        (await call(
          handle,
          "DELETE",
          "__ds/subscriptions/u-42",
          undefined,
          as({ subscribe: ["*"] }),
        )).status,
        403,
      );
      // The webhook is delivered, and its callback needs the wake's token only.
      await handle(
        new Request(ROOT + "user/42/a", {
          method: "PUT",
          headers: { "content-type": "text/plain", ...as({ publish: ["user/42/*"] }) },
          body: "x",
        }),
      );
      assert.equal((await hooks.nth(1)).body.subscription_id, "u-42");
      assert.equal(
        (await call(handle, "GET", "__ds/jwks.json")).status,
        200,
        "the public keys are public",
      );
      const unlink = (grants: unknown) =>
        call(
          handle,
          "DELETE",
          "__ds/subscriptions/u-42/streams/user%2F42%2Fa",
          undefined,
          as(grants),
        );
      assert.equal((await unlink({ subscribe: ["*"] })).status, 403);
      assert.equal((await unlink(owner)).status, 204);
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/u-42", undefined, as(owner))).status,
        204,
      );
      // Streams only: no pattern to read; a pull-wake worker claims with a subscribe grant.
      await handle(
        new Request(ROOT + "user/42/wake", {
          method: "PUT",
          headers: { "content-type": "application/json", ...as({ publish: ["user/42/*"] }) },
        }),
      );
      const pull = {
        type: "pull-wake",
        streams: ["user/42/jobs"],
        wake_stream: "user/42/wake",
      };
      const mine = { ...owner, publish: [...owner.publish, "user/42/*"] };
      const [created, view] = await put(mine, pull);
      assert.equal(created, 201);
      assert.deepEqual([view.webhook, view.wake_stream, view.pattern], [
        null,
        "user/42/wake",
        null,
      ]);
      await handle(
        new Request(ROOT + "user/42/jobs", {
          method: "PUT",
          headers: { "content-type": "text/plain", ...as({ publish: ["user/42/*"] }) },
          body: "job",
        }),
      );
      const claim = (grants: unknown) =>
        json(call(handle, "POST", "__ds/subscriptions/u-42/claim", { worker: "w" }, as(grants)));
      assert.equal((await claim({ publish: ["*"] }))[0], 403);
      assert.equal((await claim({ subscribe: ["__ds/subscriptions/u-42"] }))[0], 200);
    } finally {
      close();
      hooks.close();
    }
  });
});

describe("subscriptions: the engine's life", () => {
  test("one engine serves one handler; without one, __ds answers 501", async () => {
    const subscriptions = new Subscriptions();
    try {
      const handle = createStreamsHandler({ prefix: PREFIX, subscriptions });
      assert.throws(
        () => createStreamsHandler({ subscriptions }),
        new TypeError("these subscriptions already serve a streams handler"),
      );
      const preflight = await handle(new Request(ROOT + "__ds/jwks.json", { method: "OPTIONS" }));
      assert.equal(preflight.status, 204);
      const response = await handle(new Request(ROOT + "__ds/jwks.json"));
      assert.equal(response.headers.get("x-content-type-options"), "nosniff");
      assert.equal(response.headers.get("access-control-allow-origin"), "*");
    } finally {
      subscriptions.close();
    }
    const plain = createStreamsHandler({ prefix: PREFIX });
    const refused = await plain(new Request(ROOT + "__ds/jwks.json"));
    assert.deepEqual([refused.status, await refused.json()], [501, {
      error: "the subscription APIs (__ds) are not enabled here",
    }]);
  });

  test("close: the webhook under way is aborted, and appends are no longer matched", async () => {
    let aborted!: () => void;
    const gone = new Promise<void>((resolve) => aborted = resolve);
    const hooks = await receiver(() => "hold");
    const calls: string[] = [];
    const memory = new MemorySubscriptionStore();
    const counted = {
      get: (id: string) => (calls.push("get"), memory.get(id)),
      swap: (
        ...args: Parameters<MemorySubscriptionStore["swap"]>
      ) => (calls.push("swap"), memory.swap(...args)),
      matches: (known?: number) => (calls.push("matches"), memory.matches(known)),
      due: (now: number, limit: number) => (calls.push("due"), memory.due(now, limit)),
      signingKey: (candidate: string) => memory.signingKey(candidate),
    };
    const { handle, subscriptions, close } = setup({ store: counted });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      hooks.onAbort(aborted);
      close();
      await gone;
      calls.length = 0;
      await subscriptions.appended("events/a", 0);
      assert.deepEqual(calls, []);
    } finally {
      close();
      hooks.close();
    }
  });
});

describe("subscriptions: every answer's details", () => {
  test("answers are not cached; HEAD of the JWKS has no body; option values are checked", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      const put = await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      assert.equal(put.headers.get("cache-control"), "no-store");
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url))).headers.get(
          "cache-control",
        ),
        "no-store",
      );
      assert.equal(
        (await call(handle, "GET", "__ds/subscriptions/s")).headers.get("cache-control"),
        "no-store",
      );
      const refused = await call(handle, "GET", "__ds/subscriptions/none");
      assert.deepEqual(
        [refused.status, refused.headers.get("cache-control"), await refused.json()],
        [404, "no-store", {
          error: { code: "SUBSCRIPTION_NOT_FOUND", message: "no subscription with this id" },
        }],
      );
      const head = await call(handle, "HEAD", "__ds/jwks.json");
      assert.deepEqual([head.status, await head.text(), head.headers.get("content-type")], [
        200,
        "",
        "application/jwk-set+json",
      ]);
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      const callback = await call(handle, "POST", body.callback_url, {
        wake_id: body.wake_id,
        generation: body.generation,
      }, { authorization: `Bearer ${body.callback_token}` });
      assert.equal(callback.headers.get("cache-control"), "no-store");
      for (
        const [name, options] of [
          ["maxStreams", { maxStreams: -1 }],
          ["webhookTimeout", { webhookTimeout: 1.5 }],
          ["sweepInterval", { sweepInterval: Number.NaN }],
          ["maxBodyBytes", { maxBodyBytes: -2 }],
        ] as const
      ) {
        assert.throws(
          () => new Subscriptions(options),
          new RangeError(`${name} must be a non-negative integer`),
        );
      }
      assert.throws(
        () => new MemorySubscriptionStore({ maxSubscriptions: -1 }),
        new RangeError("maxSubscriptions must be a non-negative integer"),
      );
    } finally {
      close();
      hooks.close();
    }
  });

  test("a subscription store that fails: 503 UNAVAILABLE with no detail, and one line to the logger", async () => {
    const lines: string[] = [];
    const failing = new MemorySubscriptionStore();
    const broken = {
      get: () => Promise.reject(new Error("store down")),
      swap: failing.swap.bind(failing),
      matches: () => Promise.reject(new Error("store down")),
      due: () => Promise.reject(new Error("store down")),
      signingKey: failing.signingKey.bind(failing),
    };
    const { handle, close } = setup({
      store: broken,
      logger: (line) => lines.push(line),
      sweepInterval: 20,
    });
    try {
      const [status, body] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.deepEqual([status, body], [503, {
        error: { code: "UNAVAILABLE", message: "the subscription store is unavailable: try again" },
      }]);
      assert.ok(lines.includes("subscription request failed: store down"), lines.join("\n"));
      // An append is accepted all the same; the failure to match it is told.
      await stream(handle, "events/a", "x");
      assert.ok(
        lines.includes("subscriptions: an append was not matched: store down"),
        lines.join("\n"),
      );
      const deadline = Date.now() + 5000;
      while (
        !lines.includes("subscriptions: the sweep failed: store down") && Date.now() < deadline
      ) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.ok(lines.includes("subscriptions: the sweep failed: store down"));
    } finally {
      close();
    }
  });

  test("an engine used before a handler serves it says so", async () => {
    const subscriptions = new Subscriptions();
    try {
      const [status, body] = await json(
        subscriptions.handle(new Request("http://h/x"), "subscriptions/s"),
      );
      assert.deepEqual([status, body.error.code], [503, "UNAVAILABLE"]);
      await subscriptions.appended("a", 0); // never rejects
    } finally {
      subscriptions.close();
    }
    // Closed before it was attached: no sweep starts.
    const closed = new Subscriptions({ sweepInterval: 1 });
    closed.close();
    createStreamsHandler({ subscriptions: closed });
  });

  test("paths, patterns and tokens: each malformed one refused with its reason", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      assert.equal((await call(handle, "POST", "__ds/subscriptions/s/claim/x", {})).status, 404);
      assert.equal((await call(handle, "GET", "__ds")).status, 404);
      const [, created] = await json(call(handle, "PUT", "__ds/subscriptions/s", {
        ...webhook(hooks.url),
        pattern: "/events/*/",
      }));
      assert.equal(created.pattern, "events/*", "leading and trailing slashes dropped");
      const [long] = await json(
        call(
          handle,
          "PUT",
          "__ds/subscriptions/t",
          webhook(`https://a.example/${"x".repeat(2050)}`),
        ),
      );
      assert.equal(long, 400);
      await stream(handle, "events/a", "hello");
      const { body } = await hooks.nth(1);
      const settle = (
        authorization: string,
        payload: unknown = { wake_id: body.wake_id, generation: body.generation },
      ) => json(call(handle, "POST", body.callback_url, payload, { authorization }));
      const missing = [401, {
        error: { code: "UNAUTHORIZED", message: "the wake's token is required as a Bearer token" },
      }];
      assert.deepEqual(await settle(`Bearer ${"a".repeat(129)}`), missing);
      assert.deepEqual(await settle(`Basic ${body.callback_token}`), missing);
      assert.deepEqual(await settle(`Bearer ${body.callback_token} x`), missing);
      const token = `Bearer ${body.callback_token}`;
      assert.deepEqual(await settle(token, { wake_id: body.wake_id, generation: "1" }), [400, {
        error: { code: "INVALID_REQUEST", message: "wake_id and generation are required" },
      }]);
      assert.deepEqual(
        await settle(token, { wake_id: body.wake_id, generation: body.generation, acks: {} }),
        [400, {
          error: { code: "INVALID_REQUEST", message: "acks must be an array of {stream, offset}" },
        }],
      );
      assert.deepEqual(
        await settle(token, { wake_id: body.wake_id, generation: body.generation, acks: [null] }),
        [400, { error: { code: "INVALID_OFFSET", message: "an ack's offset is malformed" } }],
      );
      assert.deepEqual(
        await settle(token, {
          wake_id: body.wake_id,
          generation: body.generation,
          acks: [{ stream: 7, offset: at(1) }],
        }),
        [400, {
          error: { code: "INVALID_REQUEST", message: "acks[].stream must be a stream path" },
        }],
      );
      // A claim is for pull-wake subscriptions.
      assert.deepEqual(
        await json(call(handle, "POST", "__ds/subscriptions/s/claim", { worker: "w" })),
        [400, {
          error: { code: "INVALID_REQUEST", message: "only a pull-wake subscription is claimed" },
        }],
      );
      assert.deepEqual(
        (await json(
          call(handle, "POST", "__ds/subscriptions/s/ack", {}, { authorization: token }),
        ))[1],
        {
          error: {
            code: "INVALID_REQUEST",
            message: "ack does not apply to a webhook subscription",
          },
        },
      );
      // None of that moved the wake: its own callback still works (done, nothing acked: work remains).
      assert.deepEqual(
        await settle(token, { wake_id: body.wake_id, generation: body.generation, done: true }),
        [200, {
          ok: true,
          next_wake: true,
        }],
      );
    } finally {
      close();
      hooks.close();
    }
  });

  test("webhook answers: non-JSON or oversized is taken, not done; a refused connection is a failure", async () => {
    const hooks = await receiver((_, index) =>
      index === 0 ? [200, "x".repeat(70_000)] : [200, { done: false }]
    );
    const lines: string[] = [];
    const { handle, close } = setup({ logger: (line) => lines.push(line), sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url, { lease_ttl_ms: 1000 }));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      // Not done: the lease runs, then the wake goes out again (a second, also not done).
      const second = await hooks.nth(2);
      assert.equal(second.body.generation, 2);
      assert.equal(lines.length, 0);
      const view = await until(handle, "s", () => true, "the view");
      assert.deepEqual([view.status, view.streams[0].acked_offset], ["active", at(0)]);
    } finally {
      close();
      hooks.close();
    }
    // A receiver that is gone: the connection is refused.
    const gone = await receiver();
    const url = gone.url;
    gone.close();
    const refused = setup({ logger: (line) => lines.push(line) });
    try {
      await call(refused.handle, "PUT", "__ds/subscriptions/s", webhook(url));
      await stream(refused.handle, "events/a", "hello");
      await until(refused.handle, "s", (view) => view.status === "failed", "the failure");
      assert.match(lines.at(-1)!, /^subscription s: the webhook failed: \w+$/);
    } finally {
      refused.close();
    }
  });

  test("a wake event that cannot be written is told; claims still work", async () => {
    const lines: string[] = [];
    const { handle, close } = setup({ logger: (line) => lines.push(line) });
    try {
      const [status] = await json(call(handle, "PUT", "__ds/subscriptions/p", {
        type: "pull-wake",
        pattern: "jobs/*",
        wake_stream: "wake/missing",
      }));
      assert.equal(status, 201);
      await stream(handle, "jobs/a", "x");
      assert.deepEqual(lines, ["subscription p: the wake event was not written (missing)"]);
      const [claimed, body] = await json(
        call(handle, "POST", "__ds/subscriptions/p/claim", { worker: "w" }),
      );
      assert.deepEqual([claimed, body.generation, body.lease_ttl_ms], [200, 1, 30000]);
    } finally {
      close();
    }
  });

  test("the wake event names the first stream with work; several subscriptions wake on one append", async () => {
    const { handle, close } = setup();
    try {
      await handle(
        new Request(ROOT + "wake/a", {
          method: "PUT",
          headers: { "content-type": "application/json" },
        }),
      );
      await handle(
        new Request(ROOT + "wake/b", {
          method: "PUT",
          headers: { "content-type": "application/json" },
        }),
      );
      await stream(handle, "jobs/old", "1");
      for (const [id, wake] of [["p1", "wake/a"], ["p2", "wake/b"]]) {
        assert.equal(
          (await call(handle, "PUT", `__ds/subscriptions/${id}`, {
            type: "pull-wake",
            pattern: "jobs/*",
            streams: ["jobs/old"],
            wake_stream: wake,
          })).status,
          201,
        );
      }
      await stream(handle, "jobs/new", "2");
      for (const wake of ["wake/a", "wake/b"]) {
        const [, events] = await json(handle(new Request(ROOT + wake)));
        assert.deepEqual(events.map((event: Answer) => [event.stream, event.generation]), [[
          "jobs/new",
          1,
        ]], wake);
      }
      // A wake stream is an ordinary stream: another subscription may follow it.
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/p1"));
      assert.deepEqual(view.streams.map((link: Answer) => link.path), ["jobs/old", "jobs/new"]);
    } finally {
      close();
    }
  });
});

describe("subscriptions: edges", () => {
  test("webhook URLs: anchors of the address checks, credentials alone, trailing dots", () => {
    const place = "webhook.url may not target a loopback, private or link-local address";
    const cases: [string, boolean, string | undefined][] = [
      ["https://user@hooks.example.com/", false, "webhook.url may not hold credentials"],
      ["https://:pw@hooks.example.com/", false, "webhook.url may not hold credentials"],
      ["https://localhost./", false, place],
      ["https://localhost./", true, undefined],
      ["https://10.0.0.1.example.com/", false, undefined],
      ["https://xfcx.example.com/", false, undefined],
      ["https://fe80.example.com/", false, undefined],
      ["https://[2001:db8::fc00:1]/", false, undefined],
      ["https://[2001:db8::fe80:1]/", false, undefined],
      ["https://[2001:db8::ffff:7f00:1]/", true, undefined],
      ["https://[::1:2]/", true, place],
      ["https://[::ffff:7f00:1:2]/", true, place],
      ["https://[::ffff:7f00:101]/", true, undefined],
      ["https://[::ffff:a00:1]/", true, place],
      ["https://[fc00::1]/", false, place],
      ["https://[feb0::1]/", false, place],
      ["https://[fec0::1]/", false, undefined],
      ["https://100.63.0.1/", false, undefined],
      ["https://100.127.0.1/", false, place],
      ["https://223.0.0.1/", false, undefined],
      ["https://11.0.0.1/", false, undefined],
      ["https://1.0.0.1/", false, undefined],
      ["https://169.254.0.1/", false, place],
      ["https://168.254.0.1/", false, undefined],
      ["https://192.168.0.1/", false, place],
      ["https://193.168.0.1/", false, undefined],
      ["https://172.16.0.1/", false, place],
      ["https://173.16.0.1/", false, undefined],
      ["https://100.64.0.1/", false, place],
      ["https://101.64.0.1/", false, undefined],
    ];
    for (const [url, loopback, expected] of cases) {
      assert.equal(webhookUrlProblem(url, loopback), expected, `${url} (loopback ${loopback})`);
    }
  });

  test("a pattern's literal start is where the streams are listed; zero limits are limits", async () => {
    const listed: string[] = [];
    const memory = new MemoryStreamStore();
    const store = over(memory, {
      list: (prefix, limit) => {
        listed.push(`${prefix} ${limit}`);
        return memory.list(prefix, limit);
      },
    });
    const subscriptions = new Subscriptions({ maxStreams: 5 });
    try {
      const handle = createStreamsHandler({ prefix: PREFIX, store, subscriptions });
      const config = (pattern: string) => ({ ...webhook("https://hooks.example.com/x"), pattern });
      for (const [id, pattern] of [["a", "x/y/*/z"], ["b", "x/**"], ["c", "x/y"], ["d", "*"]]) {
        assert.equal(
          (await call(handle, "PUT", `__ds/subscriptions/${id}`, config(pattern))).status,
          201,
        );
      }
      assert.deepEqual(listed, [
        `${PREFIX}x/y/ 6`,
        `${PREFIX}x/ 6`,
        `${PREFIX}x/y 6`,
        `${PREFIX} 6`,
      ]);
    } finally {
      subscriptions.close();
    }
    new MemorySubscriptionStore({ maxSubscriptions: 0 }).get("a");
    new Subscriptions({ maxStreams: 0, webhookTimeout: 0, sweepInterval: 0, maxBodyBytes: 0 })
      .close();
  });

  test("listing: only streams the pattern matches, never under __ds; a wake stream is not linked", async () => {
    const { handle, close } = setup();
    try {
      await stream(handle, "events/a", "1");
      await stream(handle, "events/a/deeper", "1");
      await stream(handle, "eventsx/b", "1");
      await handle(
        new Request(ROOT + "events/wake", {
          method: "PUT",
          headers: { "content-type": "application/json" },
        }),
      );
      const [, created] = await json(call(handle, "PUT", "__ds/subscriptions/p", {
        type: "pull-wake",
        pattern: "events/*",
        streams: ["events/wake", "other/x"],
        wake_stream: "events/wake",
      }));
      assert.deepEqual(created.streams.map((link: Answer) => link.path), ["events/a", "other/x"]);
      assert.equal(
        (await call(handle, "POST", "__ds/subscriptions/p/streams", { streams: ["events/wake"] }))
          .status,
        204,
      );
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/p"));
      assert.deepEqual(view.streams.map((link: Answer) => link.path), ["events/a", "other/x"]);
      const [, every] = await json(call(handle, "PUT", "__ds/subscriptions/all", {
        ...webhook("https://hooks.example.com/x"),
        pattern: "**",
      }));
      assert.ok(every.streams.every((link: Answer) => !link.path.startsWith("__ds")));
      assert.equal(every.streams.length, 4);
    } finally {
      close();
    }
  });

  test("explicit streams: adding keeps them sorted and once; removing one not listed changes nothing", async () => {
    const { handle, close } = setup({ maxStreams: 3 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", {
        ...webhook("https://hooks.example.com/x"),
        pattern: undefined,
        streams: ["m/b"],
      });
      await call(handle, "POST", "__ds/subscriptions/s/streams", {
        streams: ["m/c", "m/a", "m/b"],
      });
      const [, view] = await json(call(handle, "PUT", "__ds/subscriptions/s", {
        ...webhook("https://hooks.example.com/x"),
        pattern: undefined,
        streams: ["m/b"],
      }));
      assert.equal(
        view.error.code,
        "SUBSCRIPTION_CONFLICT",
        "its streams changed its configuration",
      );
      const [status] = await json(call(handle, "PUT", "__ds/subscriptions/s", {
        ...webhook("https://hooks.example.com/x"),
        pattern: undefined,
        streams: ["m/a", "m/b", "m/c"],
      }));
      assert.equal(status, 200, "its configuration is what it is now");
      const [over, body] = await json(
        call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["m/d"] }),
      );
      assert.deepEqual([over, body.error.message], [
        400,
        "the subscription would follow more than 3 streams",
      ]);
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/s/streams/m%2Fz")).status,
        204,
      );
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/s/streams/m%2Fb")).status,
        204,
      );
      const [, after] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.deepEqual(after.streams.map((link: Answer) => link.path), ["m/a", "m/c"]);
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/none/streams/m%2Fb")).status,
        404,
      );
    } finally {
      close();
    }
  });
});

describe("subscriptions: more edges", () => {
  test("a late done from a superseded wake acks nothing and leaves the new wake alone", async () => {
    const hooks = await receiver((_, index) => index === 0 ? "hold" : [200, {}]);
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url, { lease_ttl_ms: 1000 }));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      const second = await hooks.nth(2); // the lease ran out: generation 2
      assert.equal(second.body.generation, 2);
      await hooks.answerHeld(200, { done: true });
      // Nothing to wait for when it is right: give the late answer a moment to be read.
      await new Promise((resolve) => setTimeout(resolve, 100));
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.equal(view.streams[0].acked_offset, at(0), "the late done acked nothing");
      const [status] = await json(call(handle, "POST", second.body.callback_url, {
        wake_id: second.body.wake_id,
        generation: 2,
      }, { authorization: `Bearer ${second.body.callback_token}` }));
      assert.equal(status, 200, "the new wake goes on");
    } finally {
      close();
      hooks.close();
    }
  });

  test("an oversized done is no answer: nothing acked, the lease runs", async () => {
    const hooks = await receiver((_, index) =>
      index === 0 ? [200, { done: true, pad: "x".repeat(70_000) }] : [200, { done: true }]
    );
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url, { lease_ttl_ms: 1000 }));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.equal(view.streams[0].acked_offset, at(0));
      assert.equal(
        (await hooks.nth(2)).body.generation,
        2,
        "delivered again once the lease ran out",
      );
    } finally {
      close();
      hooks.close();
    }
  });

  test("a failed subscription with nothing left to do is active again at its retry time", async () => {
    const hooks = await receiver(() => [500, {}]);
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/a", "hello");
      await hooks.nth(1);
      await until(handle, "s", (view) => view.status === "failed", "the failure");
      assert.equal(
        (await handle(new Request(ROOT + "events/a", { method: "DELETE" }))).status,
        204,
      );
      await until(handle, "s", (view) => view.status === "active", "active again");
      assert.equal(hooks.deliveries.length, 1, "nothing to deliver");
    } finally {
      close();
      hooks.close();
    }
  });

  test("a wake lists every stream followed, with has_pending only where there is more", async () => {
    const hooks = await receiver();
    const { handle, close } = setup();
    try {
      await stream(handle, "events/a", "12");
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      await stream(handle, "events/b", "x");
      const { body } = await hooks.nth(1);
      assert.deepEqual(
        body.streams.map((link) => [link.path, link.has_pending, link.tail_offset]),
        [
          ["events/a", false, at(2)],
          ["events/b", true, at(1)],
        ],
      );
    } finally {
      close();
      hooks.close();
    }
  });

  test("streams only: a subscription without a pattern wakes on its streams; one made later is matched", async () => {
    const hooks = await receiver(() => [200, { done: true }]);
    const { handle, close } = setup();
    try {
      await stream(handle, "early/x", "1"); // matched against no subscription yet
      const config = { ...webhook(hooks.url), pattern: undefined, streams: ["only/a"] };
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/first", config)).status, 201);
      await stream(handle, "only/a", "1");
      assert.equal((await hooks.nth(1)).body.subscription_id, "first");
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/second", { ...config, streams: ["only/b"] }))
          .status,
        201,
      );
      await stream(handle, "only/b", "1");
      assert.equal((await hooks.nth(2)).body.subscription_id, "second");
      // Explicit first, then the pattern too: removing the explicit link keeps the pattern's.
      const both = { ...webhook(hooks.url), pattern: "both/*", streams: ["both/n"] };
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/both", both)).status, 201);
      await stream(handle, "both/n", "1");
      await hooks.nth(3);
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/both/streams/both%2Fn")).status,
        204,
      );
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/both"));
      assert.deepEqual(view.streams.map((link: Answer) => [link.path, link.link_type]), [[
        "both/n",
        "glob",
      ]]);
    } finally {
      close();
      hooks.close();
    }
  });

  test("a store whose records keep changing: 503 after a bounded number of tries", async () => {
    const memory = new MemorySubscriptionStore();
    let swaps = 0;
    const busy = {
      get: (id: string) => memory.get(id),
      swap: (...args: Parameters<MemorySubscriptionStore["swap"]>) => {
        swaps++;
        // The first (the creation) goes through; every later one finds the record changed.
        return swaps === 1 ? memory.swap(...args) : Promise.resolve(false);
      },
      matches: (known?: number) => memory.matches(known),
      due: (now: number, limit: number) => memory.due(now, limit),
      signingKey: (candidate: string) => memory.signingKey(candidate),
    };
    const { handle, close } = setup({ store: busy });
    try {
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/s", webhook("https://hooks.example.com/x")))
          .status,
        201,
      );
      const changing = [503, {
        error: {
          code: "UNAVAILABLE",
          message: "the subscription is changing too often: try again",
        },
      }];
      assert.deepEqual(
        await json(call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["a"] })),
        changing,
      );
      assert.equal(swaps, 33);
      assert.deepEqual(await json(call(handle, "DELETE", "__ds/subscriptions/s")), changing);
      assert.equal(swaps, 65);
    } finally {
      close();
    }
  });

  test("bodies, names and fields at their exact limits", async () => {
    const { handle, close } = setup({ maxStreams: 2 });
    try {
      const base = webhook("https://hooks.example.com/x");
      const put = async (id: string, body: unknown) =>
        (await json(call(handle, "PUT", `__ds/subscriptions/${id}`, body)))[0];
      for (const body of ["5", "null", '"x"']) assert.equal(await put("j", body), 400, body);
      assert.equal(await put("p1", { ...base, pattern: "p/" + "x".repeat(1022) }), 201);
      assert.equal(await put("p2", { ...base, pattern: "p/" + "x".repeat(1023) }), 400);
      assert.equal(await put("p3", { ...base, pattern: "//events/*//" }), 201);
      const [, p3] = await json(call(handle, "GET", "__ds/subscriptions/p3"));
      assert.equal(p3.pattern, "events/*");
      const url = "https://hooks.example.com/";
      assert.equal(
        await put("u1", { ...base, webhook: { url: url + "x".repeat(2048 - url.length) } }),
        201,
      );
      assert.equal(
        await put("u2", { ...base, webhook: { url: url + "x".repeat(2049 - url.length) } }),
        400,
      );
      assert.equal(await put("l1", { ...base, lease_ttl_ms: 600_000 }), 201);
      assert.equal(await put("l2", { ...base, lease_ttl_ms: 1000 }), 201);
      assert.equal(await put("d1", { ...base, description: "d".repeat(1024) }), 201);
      assert.equal(await put("d2", { ...base, description: "d".repeat(1025) }), 400);
      assert.equal(await put("n1", { ...base, streams: ["n/" + "x".repeat(1022)] }), 201);
      assert.equal(await put("n2", { ...base, streams: ["n/" + "x".repeat(1023)] }), 400);
      assert.equal(await put("s1", { ...base, streams: ["a", "b"] }), 201, "exactly maxStreams");
      const [, slashes] = await json(
        call(handle, "PUT", "__ds/subscriptions/s2", { ...base, streams: ["//lead/x"] }),
      );
      assert.deepEqual(slashes.streams.map((link: Answer) => link.path), ["lead/x"]);
      await stream(handle, "two/a", "1");
      await stream(handle, "two/b", "1");
      assert.equal(await put("t1", { ...base, pattern: "two/*" }), 201, "exactly maxStreams found");
      // An ack list longer than maxStreams.
      assert.equal((await call(handle, "GET", "__ds/x/subscriptions/s1")).status, 404);
      assert.equal((await call(handle, "POST", "__ds/subscriptions/s1/claimx", {})).status, 404);
    } finally {
      close();
    }
  });

  test("the key id is the RFC 7638 thumbprint of the public key", async () => {
    const { handle, close } = setup();
    try {
      const [, { keys: [key] }] = await json(call(handle, "GET", "__ds/jwks.json"));
      const thumbprint = createHash("sha256").update(
        JSON.stringify({ crv: key.crv, kty: key.kty, x: key.x }),
      ).digest("base64url");
      assert.equal(key.kid, `ds_${thumbprint}`);
    } finally {
      close();
    }
  });
});

describe("subscriptions: every refusal's words", () => {
  const pick = async (response: Promise<Response>) => {
    const [status, body] = await json(response);
    return `${status} ${body?.error?.code}: ${body?.error?.message}`;
  };

  test("routes, methods, ids, bodies and fields", async () => {
    const { handle, close } = setup({ maxStreams: 1 });
    try {
      const base = webhook("https://hooks.example.com/x");
      assert.equal(
        await pick(call(handle, "POST", "__ds/jwks.json", "{}")),
        "405 METHOD_NOT_ALLOWED: use GET",
      );
      assert.equal(
        await pick(call(handle, "GET", "__ds/subscriptions/s/other")),
        "404 NOT_FOUND: no such subscription API",
      );
      assert.equal(
        await pick(call(handle, "PATCH", "__ds/subscriptions/s")),
        "405 METHOD_NOT_ALLOWED: this method does not apply here",
      );
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/x%20y", base)),
        "400 INVALID_REQUEST: a subscription id is 1-128 of A-Z a-z 0-9 . _ ~ -",
      );
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/s", "5")),
        "400 INVALID_REQUEST: the body is not a JSON object",
      );
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/s", { ...base, pattern: 5 })),
        "400 INVALID_REQUEST: pattern must be a non-empty glob of at most 1024 characters",
      );
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/s", base)).status, 201);
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/s", { ...base, description: "x" })),
        "409 SUBSCRIPTION_CONFLICT: a subscription with this id has another configuration",
      );
      assert.equal(
        await pick(call(handle, "POST", "__ds/subscriptions/s/streams", { streams: "a" })),
        "400 INVALID_REQUEST: streams must be an array of stream paths",
      );
      assert.equal(
        await pick(call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["a", "b"] })),
        "400 INVALID_REQUEST: streams lists more than 1 streams",
      );
      assert.equal(
        (await call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["a"] })).status,
        204,
      );
      assert.equal(
        await pick(call(handle, "POST", "__ds/subscriptions/s/streams", { streams: ["b"] })),
        "400 INVALID_REQUEST: the subscription would follow more than 1 streams",
      );
      assert.equal(
        await pick(call(handle, "DELETE", "__ds/subscriptions/s/streams/a%2F%2E%2E")),
        "400 INVALID_REQUEST: the stream path may not have . or .. segments",
      );
      assert.equal(
        await pick(call(handle, "DELETE", "__ds/subscriptions/s/streams/%E0%A4%A")),
        "400 INVALID_REQUEST: the stream path is not URL-encoded",
      );
      const gone = "404 SUBSCRIPTION_NOT_FOUND: no subscription with this id";
      assert.equal(
        await pick(call(handle, "POST", "__ds/subscriptions/none/streams", { streams: ["a"] })),
        gone,
      );
      assert.equal((await call(handle, "DELETE", "__ds/subscriptions/s")).status, 204);
      assert.equal(await pick(call(handle, "DELETE", "__ds/subscriptions/s")), gone);
    } finally {
      close();
    }
  });

  test("a full store, a missing token, a claim's worker, a token's spelling, too many acks", async () => {
    const authorize: Authorize = (request) =>
      request.headers.get("x-grants") === null
        ? false
        : JSON.parse(request.headers.get("x-grants")!);
    const hooks = await receiver();
    const { handle, close } = setup({
      store: new MemorySubscriptionStore({ maxSubscriptions: 2 }),
      authorize,
      maxStreams: 1,
    });
    try {
      const all = { "x-grants": JSON.stringify({ publish: ["*"], subscribe: ["*"] }) };
      const unauthorized = await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url));
      assert.equal(unauthorized.headers.get("www-authenticate"), 'Bearer realm="sse"');
      assert.deepEqual((await unauthorized.json()).error, {
        code: "UNAUTHORIZED",
        message: "a valid token is required",
      });
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url), all)).status,
        201,
      );
      await handle(
        new Request(ROOT + "wake/w", {
          method: "PUT",
          headers: { "content-type": "application/json", ...all },
        }),
      );
      const pull = { type: "pull-wake", pattern: "jobs/*", wake_stream: "wake/w" };
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/p", pull, all)).status, 201);
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/t", webhook(hooks.url), all)),
        "503 UNAVAILABLE: the server holds as many subscriptions as it may",
      );
      for (const worker of [5, "", "a\nb"]) {
        assert.equal(
          await pick(call(handle, "POST", "__ds/subscriptions/p/claim", { worker }, all)),
          "400 INVALID_REQUEST: worker must be 1-256 characters without control characters",
        );
      }
      await handle(
        new Request(ROOT + "jobs/a", {
          method: "PUT",
          headers: { "content-type": "text/plain", ...all },
          body: "x",
        }),
      );
      const claimed = await call(
        handle,
        "POST",
        "__ds/subscriptions/p/claim",
        { worker: "w" },
        all,
      );
      assert.equal(claimed.headers.get("cache-control"), "no-store");
      const lease = await claimed.json();
      const ack = (authorization: string, acks: unknown) =>
        pick(call(handle, "POST", "__ds/subscriptions/p/ack", {
          wake_id: lease.wake_id,
          generation: lease.generation,
          acks,
        }, { authorization }));
      assert.equal(
        await ack(`xBearer ${lease.token}`, []),
        "401 UNAUTHORIZED: the wake's token is required as a Bearer token",
      );
      const two = [{ stream: "jobs/a", offset: at(1) }, { stream: "jobs/a", offset: at(1) }];
      assert.equal(
        await ack(`Bearer ${lease.token}`, two),
        "400 INVALID_REQUEST: acks must be an array of {stream, offset}",
      );
      assert.equal(await ack(`Bearer ${lease.token}`, two.slice(1)), "200 undefined: undefined");
    } finally {
      close();
      hooks.close();
    }
  });

  test("no option: webhooks to this machine are refused", async () => {
    const subscriptions = new Subscriptions();
    try {
      const handle = createStreamsHandler({ prefix: PREFIX, subscriptions });
      assert.equal(
        await pick(call(handle, "PUT", "__ds/subscriptions/s", webhook("http://127.0.0.1:9/x"))),
        "400 WEBHOOK_URL_REJECTED: webhook.url must use https",
      );
    } finally {
      subscriptions.close();
    }
  });

  test("a store that fails without an error: each failure still told in one line", async () => {
    const lines: string[] = [];
    const memory = new MemorySubscriptionStore();
    const broken = {
      get: () => Promise.reject(undefined),
      swap: memory.swap.bind(memory),
      matches: () => Promise.reject(undefined),
      due: () => Promise.reject(undefined),
      signingKey: memory.signingKey.bind(memory),
    };
    const { handle, close } = setup({
      store: broken,
      logger: (line) => lines.push(line),
      sweepInterval: 10,
    });
    try {
      assert.equal((await call(handle, "GET", "__ds/subscriptions/s")).status, 503);
      await stream(handle, "events/a", "x");
      const deadline = Date.now() + 5000;
      while (
        !lines.includes("subscriptions: the sweep failed: undefined") && Date.now() < deadline
      ) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      for (
        const line of [
          "subscription request failed: undefined",
          "subscriptions: an append was not matched: undefined",
          "subscriptions: the sweep failed: undefined",
        ]
      ) {
        assert.ok(lines.includes(line), `${line}\n${lines.join("\n")}`);
      }
    } finally {
      close();
    }
  });

  test("the engine's own sweep: none before a handler serves it or after close", async () => {
    let looks = 0;
    const memory = new MemorySubscriptionStore();
    const counted = {
      get: (id: string) => memory.get(id),
      swap: memory.swap.bind(memory),
      matches: (known?: number) => memory.matches(known),
      due: (now: number, limit: number) => (looks++, memory.due(now, limit)),
      signingKey: memory.signingKey.bind(memory),
    };
    const lines: string[] = [];
    const early = new Subscriptions({
      store: counted,
      sweepInterval: 5,
      logger: (line) => lines.push(line),
    });
    assert.equal((await early.handle(new Request("http://h/x"), "subscriptions/s")).status, 503);
    assert.deepEqual(lines, [
      "subscription request failed: the subscriptions serve no streams handler",
    ]);
    early.close();
    createStreamsHandler({ subscriptions: early }); // closed before it served: no sweep starts
    const running = new Subscriptions({ store: counted, sweepInterval: 5 });
    createStreamsHandler({ subscriptions: running });
    while (looks === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    running.close();
    const seen = looks;
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(looks, seen, "no look after close, and none by the engine closed early");
  });

  test("streams under __ds in the store are never listed; an unlinked explicit stream stays unlinked", async () => {
    const hooks = await receiver(() => [200, { done: true }]);
    const store = new MemoryStreamStore();
    const subscriptions = new Subscriptions({ allowLoopbackWebhooks: true });
    try {
      const handle = createStreamsHandler({ prefix: PREFIX, store, subscriptions });
      await store.create(`${PREFIX}__ds/hidden`, {
        contentType: "text/plain",
        framing: "bytes",
        closed: false,
        records: [],
        contentTypeGiven: true,
      });
      const [, every] = await json(
        call(handle, "PUT", "__ds/subscriptions/all", { ...webhook(hooks.url), pattern: "**" }),
      );
      assert.deepEqual(every.streams, []);
      const config = { ...webhook(hooks.url), pattern: undefined, streams: ["m/a", "m/b"] };
      assert.equal((await call(handle, "PUT", "__ds/subscriptions/s", config)).status, 201);
      assert.equal(
        (await call(handle, "DELETE", "__ds/subscriptions/s/streams/m%2Fb")).status,
        204,
      );
      assert.equal(
        (await call(handle, "PUT", "__ds/subscriptions/s", { ...config, streams: ["m/a"] })).status,
        200,
        "its configuration lists m/a alone now",
      );
      await stream(handle, "m/b", "1");
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.deepEqual(
        view.streams.map((link: Answer) => link.path),
        ["m/a"],
        "m/b is not followed again",
      );
    } finally {
      subscriptions.close();
      hooks.close();
    }
  });

  test("a failure answered by a superseded wake leaves the new wake alone; an answer of exactly 64 KiB is read", async () => {
    const pad = (size: number) => {
      const text = JSON.stringify({ done: true, pad: "" });
      return { done: true, pad: "x".repeat(size - text.length) };
    };
    const hooks = await receiver((_, index) =>
      index === 0 ? "hold" : index === 1 ? [200, {}] : [200, pad(65_536)]
    );
    const { handle, close } = setup({ sweepInterval: 50 });
    try {
      await call(handle, "PUT", "__ds/subscriptions/s", webhook(hooks.url, { lease_ttl_ms: 1000 }));
      await stream(handle, "events/a", "hello");
      const first = await hooks.nth(1);
      assert.equal(first.contentType, "application/json");
      const second = await hooks.nth(2);
      await hooks.answerHeld(500, {});
      await new Promise((resolve) => setTimeout(resolve, 100));
      const [status] = await json(call(handle, "POST", second.body.callback_url, {
        wake_id: second.body.wake_id,
        generation: 2,
      }, { authorization: `Bearer ${second.body.callback_token}` }));
      assert.equal(status, 200, "the new wake goes on");
      const [, view] = await json(call(handle, "GET", "__ds/subscriptions/s"));
      assert.equal(view.status, "active");
      // The third answers done with exactly 64 KiB: acked.
      await hooks.nth(3);
      await until(handle, "s", (view) => view.streams[0].acked_offset === at(5), "the ack");
    } finally {
      close();
      hooks.close();
    }
  });

  test("wake events: an append that fails is told; a subscription that follows a wake stream is woken from the event", async () => {
    const hooks = await receiver();
    const lines: string[] = [];
    const memory = new MemoryStreamStore();
    const store = over(memory, {
      append: (path, request) =>
        path.endsWith("/broken")
          ? Promise.reject(new Error("disk gone"))
          : memory.append(path, request),
    });
    const subscriptions = new Subscriptions({
      allowLoopbackWebhooks: true,
      logger: (line) => lines.push(line),
    });
    try {
      const handle = createStreamsHandler({ prefix: PREFIX, store, subscriptions });
      for (const wake of ["wake/broken", "wake/ok"]) {
        await handle(
          new Request(ROOT + wake, {
            method: "PUT",
            headers: { "content-type": "application/json" },
          }),
        );
      }
      await call(handle, "PUT", "__ds/subscriptions/b", {
        type: "pull-wake",
        pattern: "jobs/*",
        wake_stream: "wake/broken",
      });
      await call(handle, "PUT", "__ds/subscriptions/o", {
        type: "pull-wake",
        pattern: "jobs/*",
        wake_stream: "wake/ok",
      });
      await call(handle, "PUT", "__ds/subscriptions/w", {
        ...webhook(hooks.url),
        pattern: "wake/ok",
      });
      await stream(handle, "jobs/a", "x");
      assert.deepEqual(lines, [
        "subscription b: the wake event was not written (failed: disk gone)",
      ]);
      const { body } = await hooks.nth(1);
      assert.deepEqual(body.streams, [{
        path: "wake/ok",
        link_type: "glob",
        acked_offset: at(0),
        tail_offset: at(1),
        has_pending: true,
      }]);
    } finally {
      subscriptions.close();
      hooks.close();
    }
  });
});
