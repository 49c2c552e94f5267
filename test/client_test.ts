// client.ts in a real browser: Debian's Chromium driven by playwright-core,
// several pages of one browser sharing one stream of server.ts, run by the
// runtime that runs this file. Each page imports the client from the server's
// /client.js, as an application would.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { gzipSync } from "node:zlib";
import { CLIENT_MODULE } from "../client_bundle.ts";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";
import {
  compareIds,
  eventually,
  publish,
  ROOT,
  RUNTIME,
  type ServerProcess,
  startServer,
  stats,
  subscribe,
} from "./helpers.ts";

const CHROMIUM = "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"];

/** What a page's connection received, as the page recorded it. */
interface Received {
  type: string;
  data: string;
  id: string;
  topics: string[];
}

/** Options a page passes to `connect`, and what the page records. */
interface JoinOptions {
  topics?: string[];
  token?: string;
  shared?: boolean;
}

/** Opens a page of `context` on the server's origin. */
async function openPage(context: BrowserContext, base: string): Promise<Page> {
  const page = await context.newPage();
  await page.goto(new URL("/health", base).href);
  return page;
}

/** Connects a page to /events with the client the server serves; it records every event. */
async function join(page: Page, options: JoinOptions = {}): Promise<void> {
  await page.evaluate(`(async () => {
    const { connect } = await import("/client.js");
    globalThis.received = [];
    globalThis.changes = [];
    const stream = globalThis.stream = connect("/events", {
      ...${JSON.stringify(options)},
      onStateChange: (change) => globalThis.changes.push(change),
    });
    for (const type of ["message", "gap", "replayed"]) {
      stream.on(type, (event) => globalThis.received.push(event));
    }
  })()`);
}

async function received(page: Page, type = "message"): Promise<Received[]> {
  const all = await page.evaluate("globalThis.received") as Received[];
  return all.filter((event) => event.type === type);
}

async function datas(page: Page): Promise<string[]> {
  return (await received(page)).map((event) => event.data);
}

async function holding(page: Page): Promise<boolean> {
  return await page.evaluate("globalThis.stream.holding") as boolean;
}

async function state(page: Page): Promise<string> {
  return await page.evaluate("globalThis.stream.state") as string;
}

/** Waits until every page has received `count` messages. */
async function allReceive(pages: Page[], count: number, ms = 10_000): Promise<void> {
  await eventually(
    async () => (await Promise.all(pages.map(datas))).every((got) => got.length >= count),
    ms,
    `${count} events on every page`,
  );
}

/** Asserts that a page got exactly `expected`, once each, in order of increasing ids. */
async function assertExactly(page: Page, expected: string[], what: string): Promise<void> {
  const got = await received(page);
  assert.deepEqual(got.map((event) => event.data), expected, what);
  for (let i = 1; i < got.length; i++) {
    assert.ok(compareIds(got[i - 1].id, got[i].id) < 0, `${what}: ids increase`);
  }
}

const numbers = (from: number, to: number) =>
  Array.from({ length: to - from }, (_, i) => String(from + i));

describe(`client.ts in Chromium, server under ${RUNTIME}`, () => {
  let browser: Browser;
  let untrackBrowser: (() => void) | undefined;
  let server: ServerProcess;

  before(async () => {
    server = await startServer({ RETRY_MS: "200" });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
    untrackBrowser = track(() => browser.close());
  });

  after(async () => {
    await browser?.close();
    untrackBrowser?.();
    assert.equal(await server.stop(), 0);
  });

  /** Three pages of a new browser context (one browser profile), each connected. */
  const threePages = async (options: JoinOptions = {}) => {
    const context = await browser.newContext();
    const pages: Page[] = [];
    for (let i = 0; i < 3; i++) {
      const page = await openPage(context, server.url);
      await join(page, options);
      pages.push(page);
    }
    await eventually(async () => (await state(pages[2])) === "open", 5000, "the third page open");
    return { context, pages };
  };

  test("is one ES module of at most 5 KiB gzipped, and /client.js serves this build of client.ts", async () => {
    const built = execFileSync(
      `${ROOT}node_modules/.bin/esbuild`,
      ["client.ts", "--minify", "--format=esm", "--target=es2022", "--log-level=error"],
      { cwd: ROOT, encoding: "utf8" },
    ).trimEnd();
    const bundle = readFileSync(`${ROOT}client_bundle.ts`, "utf8");
    assert.ok(
      bundle.includes(JSON.stringify(built)),
      "client_bundle.ts is out of date: run npm run build:client",
    );
    assert.ok(gzipSync(built, { level: 9 }).length <= 5 * 1024, "at most 5 KiB gzipped");
    const response = await fetch(new URL("/client.js", server.url));
    assert.equal(response.headers.get("content-type"), "text/javascript; charset=utf-8");
    assert.equal(response.headers.get("access-control-allow-origin"), "*");
    assert.equal(await response.text(), built);
  });

  test("three pages of one browser: one stream at the server, every event on every page", async () => {
    const { context, pages } = await threePages();
    try {
      await publish(server.url, { data: "one" });
      await allReceive(pages, 1);
      assert.equal((await stats(server.url)).clients, 1, "one stream for three pages");
      const holders = await Promise.all(pages.map(holding));
      assert.equal(holders.filter(Boolean).length, 1, "one page holds it");
      for (const page of pages) await assertExactly(page, ["one"], "each page");
    } finally {
      await context.close();
    }
    await eventually(async () => (await stats(server.url)).clients === 0, 5000, "no stream left");
  });

  for (const how of ["closed", "crashed"] as const) {
    test(`the holding page ${how} at the 100th of 200 events: the others get all 200 once, in order`, async () => {
      const { context, pages } = await threePages();
      try {
        let holder: Page | undefined;
        for (const page of pages) if (await holding(page)) holder = page;
        assert.ok(holder, "a page holds the stream");
        const others = pages.filter((page) => page !== holder);
        for (let n = 0; n < 200; n++) {
          await publish(server.url, { data: String(n) });
          if (n !== 99) continue;
          if (how === "closed") await holder.close();
          else {
            const crashed = holder.waitForEvent("crash");
            const cdp = await context.newCDPSession(holder);
            cdp.send("Page.crash").catch(() => {}); // it never answers: the renderer is gone
            await crashed;
          }
        }
        await allReceive(others, 200);
        for (const page of others) await assertExactly(page, numbers(0, 200), "a remaining page");
        assert.equal((await Promise.all(others.map(holding))).filter(Boolean).length, 1);
        await eventually(async () => (await stats(server.url)).clients === 1, 5000, "one stream");
      } finally {
        await context.close();
      }
    });
  }

  test("each page gets only its topics; a page that joins gets its topics from then on", async () => {
    const context = await browser.newContext();
    try {
      const a = await openPage(context, server.url);
      await join(a, { topics: ["a"] });
      const b = await openPage(context, server.url);
      await join(b, { topics: ["b"] });
      await eventually(async () => (await state(b)) === "open", 5000, "b open");
      await publish(server.url, { data: "c0", topic: "c" }); // before anyone wants c
      await publish(server.url, { data: "a1", topic: "a" });
      await publish(server.url, { data: "b1", topic: "b" });
      await eventually(async () => (await datas(b)).length === 1, 5000, "b1");

      const c = await openPage(context, server.url);
      await join(c, { topics: ["a", "c"] });
      await eventually(async () => (await state(c)) === "open", 5000, "c open");
      await publish(server.url, { data: "a2", topic: "a" });
      await publish(server.url, { data: "c1", topic: "c" });
      await publish(server.url, { data: "none1" }); // no topic: for pages that named none
      await publish(server.url, { data: "bc", topic: "b" });
      await eventually(async () => (await datas(b)).length === 2, 5000, "bc");

      const all = await openPage(context, server.url);
      await join(all);
      await eventually(async () => (await state(all)) === "open", 5000, "all open");
      await publish(server.url, { data: "none2" });
      await publish(server.url, { data: "a3", topic: "a" });
      await eventually(async () => (await datas(all)).length === 2, 5000, "all: 2");
      await eventually(async () => (await datas(a)).length === 3, 5000, "a: 3");

      await assertExactly(a, ["a1", "a2", "a3"], "page a");
      await assertExactly(b, ["b1", "bc"], "page b");
      await assertExactly(c, ["a2", "c1", "a3"], "page a,c");
      await assertExactly(all, ["none2", "a3"], "page with no topics");
      assert.deepEqual((await received(c))[0].topics, ["a"], "an event's topics reach the page");
      assert.equal((await stats(server.url)).clients, 1, "still one stream");

      // The page holding the stream goes: the next one learns the others' topics.
      const [holder] = await Promise.all([a, b, c, all].map(holding));
      assert.ok(holder, "the first page holds the stream");
      const { connections } = await stats(server.url);
      await a.close();
      await publish(server.url, { data: "c2", topic: "c" });
      await publish(server.url, { data: "b2", topic: "b" });
      await eventually(async () => (await datas(b)).length === 3, 5000, "b2");
      await assertExactly(b, ["b1", "bc", "b2"], "page b after the handover");
      await assertExactly(c, ["a2", "c1", "a3", "c2"], "page a,c after the handover");
      await assertExactly(all, ["none2", "a3", "c2", "b2"], "page with no topics after it");
      assert.equal(
        (await stats(server.url)).connections,
        connections + 1,
        "the next page asks the others first, then opens one stream for all",
      );
    } finally {
      await context.close();
    }
  });

  test("without BroadcastChannel each page connects by itself and gets every event", async () => {
    const context = await browser.newContext();
    await context.addInitScript("delete globalThis.BroadcastChannel");
    try {
      const pages: Page[] = [];
      for (let i = 0; i < 3; i++) {
        const page = await openPage(context, server.url);
        await join(page);
        pages.push(page);
      }
      await eventually(async () => (await stats(server.url)).clients === 3, 5000, "3 streams");
      for (const data of ["x", "y", "z"]) await publish(server.url, { data });
      await allReceive(pages, 3);
      for (const page of pages) {
        await assertExactly(page, ["x", "y", "z"], "each page");
        assert.equal(await holding(page), true, "each holds its own");
      }
    } finally {
      await context.close();
    }
  });

  test("a stream sent away is followed, backing off, until there is room", async () => {
    const full = await startServer({ MAX_CLIENTS: "1", SHED_RETRY_MS: "100-100" });
    const context = await browser.newContext();
    try {
      const blocker = await subscribe(new URL("/events", full.url).href);
      const page = await openPage(context, full.url);
      await join(page);
      const waits = async () =>
        (await page.evaluate("globalThis.changes") as { retryIn?: number }[])
          .map((change) => change.retryIn).filter((ms) => ms !== undefined);
      await eventually(async () => (await waits()).length >= 3, 5000, "sent away three times");
      const [first, second, third] = await waits();
      assert.ok(first! >= 100 && first! <= 150, `the server's retry: first (${first})`);
      assert.ok(second! > first! && third! > second!, `then longer (${second}, ${third})`);
      await blocker.cancel();
      await eventually(async () => (await state(page)) === "open", 10_000, "in at last");
      await publish(full.url, { data: "in" });
      await allReceive([page], 1);
    } finally {
      await context.close();
      await full.stop();
    }
  });

  test("with a token: sent as a bearer token; refused for good with a wrong one", async () => {
    const guarded = await startServer({ SUBSCRIBE_TOKEN: "let-me-in" });
    const context = await browser.newContext();
    const other = await browser.newContext();
    try {
      const page = await openPage(context, guarded.url);
      await join(page, { token: "let-me-in" });
      const refused = await openPage(other, guarded.url);
      await join(refused, { token: "wrong" });
      await eventually(async () => (await state(page)) === "open", 5000, "open");
      await publish(guarded.url, { data: "for the token" });
      await allReceive([page], 1);
      await eventually(async () => (await state(refused)) === "closed", 5000, "refused");
      const changes = await refused.evaluate("globalThis.changes") as { reason: string }[];
      assert.equal(changes.at(-1)!.reason, "HTTP 401");
      assert.deepEqual(await datas(refused), []);
    } finally {
      await context.close();
      await other.close();
      await guarded.stop();
    }
  });

  test("a server that sends its recent events again on every connection: each shown once", async () => {
    // Many simple SSE servers ignore Last-Event-ID and start each stream
    // with their last few events; this one then ends the stream.
    const history: string[] = [];
    const streams = new Set<ServerResponse>();
    const repeating = createServer((request, response) => {
      if (request.url === "/client.js") {
        response.writeHead(200, { "content-type": "text/javascript" }).end(CLIENT_MODULE);
      } else if (request.url!.startsWith("/events")) {
        response.writeHead(200, { "content-type": "text/event-stream" });
        response.write("retry: 50\n\n" + history.slice(-3).join(""));
        streams.add(response);
        response.on("close", () => streams.delete(response));
      } else response.writeHead(200, { "content-type": "text/html" }).end("<p>page</p>");
    });
    const stopRepeating = track(() => repeating.close());
    await new Promise<void>((resolve) => repeating.listen(0, "127.0.0.1", resolve));
    const base = `http://127.0.0.1:${(repeating.address() as AddressInfo).port}/`;
    const context = await browser.newContext();
    try {
      const pages = [await openPage(context, base), await openPage(context, base)];
      for (const page of pages) await join(page);
      await eventually(() => streams.size === 1, 5000, "one stream");
      for (let n = 1; n <= 6; n++) {
        history.push(`id: ${n}-0\ndata: ${n}\n\n`);
        for (const stream of streams) {
          stream.write(history.at(-1)!);
          if (n % 2 === 0) stream.end(); // every second event: again from the history
        }
        await allReceive(pages, n);
        await eventually(() => streams.size === 1, 5000, "connected again");
      }
      for (const page of pages) await assertExactly(page, numbers(1, 7), "each page");
    } finally {
      await context.close();
      for (const stream of streams) stream.destroy();
      await new Promise((resolve) => repeating.close(resolve));
      stopRepeating();
    }
  });

  test("the server restarted: every page resumes with nothing lost, told of the gap", async () => {
    let restarted = await startServer({ RETRY_MS: "100" });
    const port = new URL(restarted.url).port;
    const context = await browser.newContext();
    try {
      const pages: Page[] = [];
      for (let i = 0; i < 2; i++) {
        const page = await openPage(context, restarted.url);
        await join(page);
        pages.push(page);
      }
      await eventually(async () => (await state(pages[1])) === "open", 5000, "open");
      for (const data of numbers(0, 3)) await publish(restarted.url, { data });
      await allReceive(pages, 3);
      assert.equal(await restarted.stop(), 0);
      restarted = await startServer({ PORT: port, RETRY_MS: "100" });
      for (const data of numbers(3, 6)) await publish(restarted.url, { data });
      await allReceive(pages, 6);
      for (const page of pages) {
        await assertExactly(page, numbers(0, 6), "a page across the restart");
        assert.equal((await received(page, "gap")).length, 1, "the new server says what it lacks");
      }
    } finally {
      await context.close();
      await restarted.stop();
    }
  });
});
