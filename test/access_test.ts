// One access decision everywhere: for random names (encoded slashes, dot
// segments, empty segments, unicode, the characters selectors use) and
// random selectors, server.ts decides alike for a topic on /events and
// /publish and for a stream of that name read, written and forked, and
// /probe lets in exactly whom /events lets in. The expected decision comes
// from a matcher written here, apart from mod.ts.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import * as jose from "jose";
import { type EventReader, seededRandom, subscribe, withServer } from "./helpers.ts";

const SECRET = "a secret of at least thirty-two bytes";
const key = new TextEncoder().encode(SECRET);
const sign = (claims: jose.JWTPayload) =>
  new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" }).sign(key);
const PREFIX = "/v1/stream/";

/** Whether a selector (`*`: any run of characters, anything else itself) matches all of `text`. */
function glob(selector: string, text: string): boolean {
  // matches[j]: the selector read so far matches text.slice(0, j).
  let matches = Array.from({ length: text.length + 1 }, (_, j) => j === 0);
  // By UTF-16 code unit on both sides, as strings index.
  for (const char of selector.split("")) {
    const next = Array(text.length + 1).fill(false);
    for (let j = 0; j <= text.length; j++) {
      if (char === "*") next[j] = matches[j] || (j > 0 && next[j - 1]);
      else next[j] = j > 0 && matches[j - 1] && text[j - 1] === char;
    }
    matches = next;
  }
  return matches[text.length];
}

const granted = (selectors: string[], name: string) => selectors.some((s) => glob(s, name));

describe("access decisions, property-based", () => {
  test("a name is decided alike as a topic and as a stream, on every route", {
    timeout: 120_000,
  }, async () => {
    await withServer({ JWT_SECRET: SECRET, HEARTBEAT_MS: "60000" }, async (server) => {
      const random = seededRandom(20261202);
      const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
      const admin = await sign({ sse: { subscribe: ["*"], publish: ["*"] } });
      const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
      // Pieces of names: segments that paths normalize or keep encoded, and
      // characters that topics may hold and selectors use.
      const segments = [
        "user",
        "42",
        "7",
        "feed",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2E",
        "a%2Fb",
        "caf%C3%A9",
        "*",
        "a*b",
        "x.y",
        "[1]",
        "(q)",
        "a+b",
        "$",
        "^",
        "|",
      ];
      const characters = ["a", "/", "*", ".", "é", "日", "\u2028", " ", "\\", "?", "+", "-", "𝄞"];
      const selectorsFor = (name: string) => {
        const cut = Math.floor(random() * (name.length + 1));
        const choices = [
          name,
          `${name.slice(0, cut)}*`,
          `*${name.slice(cut)}`,
          `${name.slice(0, cut)}*${name.slice(cut + 1)}`,
          `${name}x`,
          "user/7/*",
          "*",
        ];
        return Array.from({ length: 1 + Math.floor(random() * 3) }, () => pick(choices))
          // "*" alone, rarely: it grants everything.
          .filter((selector, i) => selector !== "*" || (i === 0 && random() < 0.3));
      };
      let grantedCount = 0;
      let refusedCount = 0;
      for (let i = 0; i < 40; i++) {
        // A stream path, as sent, and the name the server sees (the URL's normalization).
        const raw = Array.from({ length: 2 + Math.floor(random() * 4) }, () => pick(segments))
          .join("/");
        const url = new URL(`${server.url}${PREFIX.slice(1)}${raw}`);
        const inside = url.pathname.startsWith(PREFIX) &&
          url.pathname.length > PREFIX.length && !url.pathname.startsWith(`${PREFIX}__ds`);
        const name = url.pathname.slice(PREFIX.length);
        const selectors = selectorsFor(name);
        const user = await sign({
          sse: { subscribe: selectors, publish: [...selectors, `sink/${i}`] },
        });
        const expected = inside && granted(selectors, name);
        if (expected) grantedCount++;
        else refusedCount++;
        const what = `${raw} as ${name} with ${JSON.stringify(selectors)}`;

        // Forked into a stream the user may write, from a path outside the
        // streams (dot segments climbing out): as missing.
        const fork = () =>
          fetch(`${server.url}${PREFIX.slice(1)}sink/${i}`, {
            method: "PUT",
            headers: { ...bearer(user), "stream-forked-from": `${PREFIX}${raw}` },
          });
        if (!inside) {
          const outside = await fork();
          await outside.body?.cancel();
          assert.equal(outside.status, 404, `fork of ${what}`);
          const put = await fetch(url, { method: "PUT", headers: bearer(user) });
          await put.body?.cancel();
          assert.ok(put.status === 404 || put.status === 405, `PUT ${what}: ${put.status}`);
          continue;
        }
        // Written: created by the user, or refused (and then created by the admin).
        const put = await fetch(url, { method: "PUT", headers: bearer(user) });
        await put.body?.cancel();
        assert.equal(put.status, expected ? 201 : 403, `PUT ${what}`);
        if (!expected) {
          const made = await fetch(url, { method: "PUT", headers: bearer(admin) });
          await made.body?.cancel();
          assert.equal(made.status, 201, what);
        }
        // Read.
        const read = await fetch(`${url}?offset=-1`, { headers: bearer(user) });
        await read.body?.cancel();
        assert.equal(read.status, expected ? 200 : 403, `GET ${what}`);
        // Forked: the source's read decides, and a refusal answers as a missing source.
        const forked = await fork();
        await forked.body?.cancel();
        assert.equal(forked.status, expected ? 201 : 404, `fork of ${what}`);

        // The same name as a topic: publishing to it, and receiving its private events.
        const published = await fetch(`${server.url}publish`, {
          method: "POST",
          headers: { ...bearer(user), "content-type": "application/json" },
          body: JSON.stringify({ data: "mine", topic: name }),
        });
        await published.body?.cancel();
        assert.equal(published.status, expected ? 200 : 403, `publish to ${what}`);
        const events: EventReader = await subscribe(`${server.url}events`, bearer(user));
        for (const [topic, isPrivate] of [[name, true], ["end", false]] as const) {
          const sent = await fetch(`${server.url}publish`, {
            method: "POST",
            headers: { ...bearer(admin), "content-type": "application/json" },
            body: JSON.stringify({ data: topic, topic, private: isPrivate }),
          });
          assert.equal(sent.status, 200);
          await sent.body?.cancel();
        }
        const received = await events.until((event) => event.data === "end");
        await events.cancel();
        assert.equal(received.length === 2, expected, `private event on ${what}`);
      }
      // The names and selectors reached both answers, many times.
      assert.ok(grantedCount >= 8 && refusedCount >= 8, `${grantedCount} / ${refusedCount}`);

      // Topics of any printable characters, on /publish.
      for (let i = 0; i < 150; i++) {
        const topic = Array.from({ length: 1 + Math.floor(random() * 8) }, () => pick(characters))
          .join("");
        const selectors = selectorsFor(topic);
        const user = await sign({ sse: { subscribe: selectors, publish: selectors } });
        const expected = granted(selectors, topic);
        const published = await fetch(`${server.url}publish`, {
          method: "POST",
          headers: { ...bearer(user), "content-type": "application/json" },
          body: JSON.stringify({ data: "x", topic }),
        });
        await published.body?.cancel();
        assert.equal(
          published.status,
          expected ? 200 : 403,
          `publish to ${JSON.stringify(topic)} with ${JSON.stringify(selectors)}`,
        );
      }

      // /probe lets in exactly the tokens /events lets in.
      const expired = await sign({ exp: Math.floor(Date.now() / 1000) - 60 });
      const forged = `${admin.slice(0, -2)}${admin.endsWith("A") ? "BA" : "AA"}`;
      for (const token of [admin, await sign({}), expired, forged, "", "not.a.token"]) {
        const headers = token === "" ? {} : bearer(token);
        const statuses = [];
        for (const route of ["events", "probe"]) {
          const response = await fetch(`${server.url}${route}`, { headers });
          await response.body?.cancel();
          statuses.push(response.status);
        }
        assert.equal(statuses[0], statuses[1], `/events and /probe for ${token.slice(0, 20)}`);
        assert.ok(statuses[0] === 200 || statuses[0] === 401);
      }
    });
  });
});
