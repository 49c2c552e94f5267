// Per-user access on the demo server: signed tokens (minted by npm jose, an
// independent implementation), topic grants, private events, cookies.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import * as jose from "jose";
import { type EventReader, startServer, subscribe, withServer } from "./helpers.ts";

const SECRET = "a demo secret of at least 32 bytes";
const key = new TextEncoder().encode(SECRET);
const token = (claims: jose.JWTPayload) =>
  new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" }).sign(key);
const user = (id: number) =>
  token({ sub: `user-${id}`, sse: { subscribe: [`user/${id}/*`], publish: [`user/${id}/*`] } });

/** Publishes with a bearer token; answers the status and the JSON body. */
async function post(base: string, body: object, bearer?: string) {
  const response = await fetch(new URL("/publish", base), {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(bearer ? { authorization: `Bearer ${bearer}` } : {}),
    },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

describe("signed tokens on the demo server", () => {
  test("start errors: a short secret, both keys, a bad key, or JWT with shared tokens", async () => {
    const cases: [Record<string, string>, RegExp][] = [
      [{ JWT_SECRET: "short" }, /^error: JWT_SECRET must be at least 32 bytes$/m],
      [{ JWT_SECRET: SECRET, JWT_PUBLIC_KEY: "x" }, /^error: set JWT_SECRET or JWT_PUBLIC_KEY/m],
      [{ JWT_PUBLIC_KEY: "not a key" }, /^error: JWT_PUBLIC_KEY is not a PEM public key/m],
      [
        { JWT_SECRET: SECRET, PUBLISH_TOKEN: "p" },
        /^error: JWT_SECRET and JWT_PUBLIC_KEY replace/m,
      ],
      [
        { JWT_SECRET: SECRET, SUBSCRIBE_TOKEN: "s" },
        /^error: JWT_SECRET and JWT_PUBLIC_KEY replace/m,
      ],
    ];
    for (const [env, message] of cases) {
      await assert.rejects(startServer(env), (error: Error) => {
        assert.match(error.message, /exited \(1\)/);
        assert.match(error.message, message);
        assert.equal(error.message.includes(SECRET), false, "the secret is not printed");
        return true;
      });
    }
  });

  test("private events reach only subscribers granted their topic; publishing needs a grant", async () => {
    await withServer({ JWT_SECRET: SECRET }, async (server) => {
      const [ann, bob] = [await user(1), await user(2)];
      // A browser sends the cookie; a server-side client may send the header.
      const annStream = await subscribe(`${server.url}events`, { cookie: `sse_token=${ann}` });
      const bobStream = await subscribe(`${server.url}events?topic=user/1/inbox`, {
        authorization: `Bearer ${bob}`,
      });
      const toAnn = await post(server.url, {
        data: "for ann",
        topic: "user/1/inbox",
        private: true,
      }, ann);
      assert.equal(toAnn.status, 200);
      const shared = await post(server.url, { data: "public", topic: "user/1/inbox" }, ann);
      assert.deepEqual(
        (await annStream.events(2)).map((e) => [e.data, e.lastEventId]),
        [["for ann", toAnn.body.id], ["public", shared.body.id]],
      );
      assert.equal((await bobStream.event()).lastEventId, shared.body.id, "bob skips ann's event");
      // Replay follows the same rule.
      const replayed = async (stream: EventReader) =>
        (await stream.until((e) => e.event === "replayed")).map((e) => e.data);
      const resume = (bearer: string) =>
        subscribe(`${server.url}events`, {
          authorization: `Bearer ${bearer}`,
          "last-event-id": "earliest",
        });
      assert.deepEqual(await replayed(await resume(ann)), ["for ann", "public", '{"count":2}']);
      assert.deepEqual(await replayed(await resume(bob)), ["public", '{"count":1}']);

      const outside = await post(server.url, { data: "x", topic: "user/1/inbox" }, bob);
      assert.deepEqual(outside, {
        status: 403,
        body: { error: 'no publish grant for "user/1/inbox"' },
      });
      const anonymous = await post(server.url, { data: "x", topic: "user/1/inbox" });
      assert.equal(anonymous.status, 401);
      const refused = await fetch(`${server.url}events`);
      assert.equal(refused.status, 401, "no anonymous subscribers by default");
      await refused.body?.cancel();
      await annStream.cancel();
      await bobStream.cancel();
      const output = server.output();
      for (const secret of [SECRET, ann, bob]) assert.equal(output.includes(secret), false);
    });
  });

  test("a refused token gets 401 with the reason in WWW-Authenticate and the body", async () => {
    await withServer({ JWT_SECRET: SECRET, JWT_AUDIENCE: "sse" }, async (server) => {
      const wrongAudience = await token({ aud: "other" });
      const response = await fetch(`${server.url}events?token=${wrongAudience}`);
      assert.equal(response.status, 401);
      assert.equal(
        response.headers.get("www-authenticate"),
        'Bearer error="invalid_token", error_description="wrong audience"',
      );
      assert.deepEqual(await response.json(), { error: "wrong audience" });
      assert.equal(server.output().includes(wrongAudience), false);
    });
  });

  test("ALLOW_ANONYMOUS=1: subscribers without a token get public events only", async () => {
    await withServer({ JWT_SECRET: SECRET, ALLOW_ANONYMOUS: "1" }, async (server) => {
      const stream = await subscribe(`${server.url}events`);
      const ann = await user(1);
      await post(server.url, { data: "private", topic: "user/1/a", private: true }, ann);
      const id = (await post(server.url, { data: "public", topic: "user/1/a" }, ann)).body.id;
      assert.equal((await stream.event()).lastEventId, id);
      await stream.cancel();
    });
  });

  test("JWT_PUBLIC_KEY: an ES256 token, and its claim under JWT_CLAIM", async () => {
    const { publicKey, privateKey } = await jose.generateKeyPair("ES256", { extractable: true });
    const env = { JWT_PUBLIC_KEY: await jose.exportSPKI(publicKey), JWT_CLAIM: "mercure" };
    await withServer(env, async (server) => {
      const signed = await new jose.SignJWT({ mercure: { publish: ["*"] } })
        .setProtectedHeader({ alg: "ES256" }).sign(privateKey);
      assert.equal((await post(server.url, { data: "x" }, signed)).status, 200);
      assert.equal((await post(server.url, { data: "x" }, await user(1))).status, 401);
    });
  });

  test("Durable Streams take the same grants: a stream's name against subscribe and publish", async () => {
    await withServer({ JWT_SECRET: SECRET }, async (server) => {
      const [ann, bob] = [await user(1), await user(2)];
      const url = (name: string) => `${server.url}v1/stream/${name}`;
      const call = async (name: string, method: string, bearer?: string, body?: string) => {
        const response = await fetch(url(name), {
          method,
          headers: {
            "content-type": "text/plain",
            ...(bearer ? { authorization: `Bearer ${bearer}` } : {}),
          },
          body,
        });
        return { status: response.status, text: await response.text() };
      };
      assert.equal((await call("user/1/feed", "PUT", ann)).status, 201);
      assert.equal((await call("user/1/feed", "POST", ann, "hello")).status, 204);
      assert.deepEqual(await call("user/1/feed?offset=-1", "GET", ann), {
        status: 200,
        text: "hello",
      });
      // Another user's grants cover neither reading nor writing ann's stream.
      assert.deepEqual(await call("user/1/feed?offset=-1", "GET", bob), {
        status: 403,
        text: '{"error":"no subscribe grant for \\"user/1/feed\\""}',
      });
      assert.deepEqual(await call("user/1/feed", "POST", bob, "spoof"), {
        status: 403,
        text: '{"error":"no publish grant for \\"user/1/feed\\""}',
      });
      assert.equal((await call("user/1/feed", "DELETE", bob)).status, 403);
      assert.equal((await call("user/2/feed", "PUT", ann)).status, 403);
      // No token: 401, with the challenge; a preflight needs none.
      const anonymous = await fetch(url("user/1/feed?offset=-1"));
      assert.equal(anonymous.status, 401);
      assert.equal(anonymous.headers.get("www-authenticate"), 'Bearer realm="sse"');
      assert.deepEqual(await anonymous.json(), { error: "a valid token is required" });
      assert.equal((await call("user/1/feed", "OPTIONS")).status, 204);
      // What bob was refused changed nothing.
      assert.equal((await call("user/1/feed?offset=-1", "GET", ann)).text, "hello");
    });
    await withServer({ PUBLISH_TOKEN: "p-token", SUBSCRIBE_TOKEN: "s-token" }, async (server) => {
      const stream = `${server.url}v1/stream/any/name`;
      const status = async (response: Promise<Response>) => {
        const { status, body } = await response;
        await body?.cancel();
        return status;
      };
      const put = (bearer: string) =>
        status(fetch(stream, { method: "PUT", headers: { authorization: `Bearer ${bearer}` } }));
      assert.equal(await put("s-token"), 401);
      assert.equal(await put("p-token"), 201);
      assert.equal(await status(fetch(`${stream}?offset=-1`)), 401);
      assert.equal(await status(fetch(`${stream}?offset=-1&token=s-token`)), 200);
    });
  });

  test("the stream ends when its token expires", async () => {
    await withServer({ JWT_SECRET: SECRET }, async (server) => {
      const soon = await token({ exp: Math.floor(Date.now() / 1000) + 1 });
      const stream = await subscribe(`${server.url}events`, { cookie: `sse_token=${soon}` });
      // Leeway of 5 s: it ends about 6 s after it was signed, by itself.
      while ((await stream.next()) !== null);
    });
  });
});
