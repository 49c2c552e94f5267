// The live page in a real browser: Debian's Chromium driven by playwright-core,
// against server.ts running under the runtime that runs this file.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";
import { publish, ROOT, RUNTIME, type ServerProcess, startServer } from "./helpers.ts";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import * as jose from "jose";

const CHROMIUM = "/usr/bin/chromium";
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * A TCP proxy between the browser and the server, so a test can sever the
 * browser's connection (and refuse new ones) without touching the server.
 * With `holdMs`, it holds what the server sends and passes it on only every
 * `holdMs`, as a buffering proxy does.
 */
class Proxy {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #target: number;
  #up = true;

  constructor(target: number, holdMs = 0) {
    this.#target = target;
    this.#server = createServer((client) => {
      if (!this.#up) return client.destroy();
      const upstream = new (client.constructor as typeof Socket)();
      upstream.connect(this.#target, "127.0.0.1");
      for (const socket of [client, upstream]) {
        this.#sockets.add(socket);
        socket.on("close", () => this.#sockets.delete(socket));
        socket.on("error", () => {});
      }
      client.pipe(upstream);
      if (holdMs === 0) upstream.pipe(client);
      else {
        let held: Buffer[] = [];
        const release = setInterval(() => {
          for (const chunk of held) client.write(chunk);
          held = [];
        }, holdMs);
        upstream.on("data", (chunk: Buffer) => held.push(chunk));
        client.on("close", () => clearInterval(release));
      }
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
  }

  listen(): Promise<number> {
    return new Promise((resolve) =>
      this.#server.listen(0, "127.0.0.1", () => {
        resolve((this.#server.address() as AddressInfo).port);
      })
    );
  }

  /** Severs every connection and refuses new ones until `restore`. */
  cut(): void {
    this.#up = false;
    for (const socket of this.#sockets) socket.destroy();
  }

  restore(): void {
    this.#up = true;
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

/** Ids of the rows the page shows for `data`, in the order shown. */
function idsShown(page: Page, data: string): Promise<string[]> {
  return page.$$eval(
    "#log tr",
    (rows, wanted) =>
      rows.filter((row) => row.querySelector("td.data")?.textContent === wanted)
        .map((row) => row.getAttribute("data-id")!),
    data,
  );
}

describe(`the live page in Chromium, server under ${RUNTIME}`, () => {
  let browser: Browser;
  let untrackBrowser: (() => void) | undefined;
  let server: ServerProcess;
  let proxy: Proxy;
  let proxied: string; // the page's URL through the proxy
  const errors: string[] = [];

  const open = async (url: string): Promise<Page> => {
    const page = await browser.newPage();
    page.on("console", (message) => {
      if (message.type() === "error") errors.push(`console: ${message.text()}`);
    });
    page.on("pageerror", (error) => errors.push(`page: ${error.message}`));
    await page.goto(url);
    await page.locator('#state[data-state="open"]').waitFor();
    return page;
  };

  before(async () => {
    server = await startServer({ TICK_MS: "200", RETRY_MS: "300" });
    proxy = new Proxy(Number(new URL(server.url).port));
    proxied = `http://127.0.0.1:${await proxy.listen()}/`;
    browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
    untrackBrowser = track(() => browser.close());
  });

  after(async () => {
    await browser?.close();
    untrackBrowser?.();
    await proxy?.close();
    assert.equal(await server.stop(), 0);
  });

  test("ticks appear, and a message published from the form reaches a second page", async () => {
    const first = await open(proxied);
    const second = await open(server.url);
    // The count shows once the stream opens, not at the next refresh 2 s later.
    await second.locator("#clients", { hasText: /^[1-9]/ }).waitFor({ timeout: 1000 });
    await first.locator("#clock", { hasText: /\d/ }).waitFor();

    // With the keyboard only: the fields are reachable by their labels.
    await first.getByLabel("Data").focus();
    await first.keyboard.type("hello from the first page");
    await first.keyboard.press("Enter");
    for (const page of [first, second]) {
      await page.locator("#log td.data", { hasText: "hello from the first page" }).waitFor();
    }
    assert.equal(await first.getByLabel("Data").inputValue(), "", "the form is cleared");
    assert.equal(await first.getByLabel("Token").isVisible(), false, "no token is needed");

    mkdirSync(`${ROOT}test-output`, { recursive: true });
    await first.screenshot({ path: `${ROOT}test-output/page-${RUNTIME}.png`, fullPage: true });
    await second.close();
    await first.close();
  });

  test("after the connection is cut, the page resumes and shows every missed event once", async () => {
    const page = await open(proxied);
    // Re-subscribe to one topic through the selector, so the ticker stays out of the count.
    await page.getByLabel("Topics").fill("chat");
    await page.getByRole("button", { name: "Subscribe" }).click();
    await page.locator('#state[data-state="open"]').waitFor();
    await publish(server.url, { data: "before the cut", topic: "chat" });
    await page.locator("#log td.data", { hasText: "before the cut" }).waitFor();

    proxy.cut();
    await page.locator('#state[data-state="reconnecting"]').waitFor();
    const missed = [];
    for (let n = 1; n <= 5; n++) {
      missed.push(await publish(server.url, { data: `missed ${n}`, topic: "chat" }));
    }
    proxy.restore();

    await page.locator('#notice[data-replayed="5"]').waitFor();
    await page.locator('#state[data-state="open"]').waitFor();
    for (let n = 1; n <= 5; n++) {
      assert.deepEqual(await idsShown(page, `missed ${n}`), [missed[n - 1]], `missed ${n} once`);
    }
    assert.equal((await idsShown(page, "before the cut")).length, 1);
    const live = await publish(server.url, { data: "live again", topic: "chat" });
    await page.locator("#log td.data", { hasText: "live again" }).waitFor();
    assert.deepEqual(await idsShown(page, "live again"), [live]);
    await page.close();
  });

  test("after the server restarts, the page reconnects and goes on", async () => {
    const page = await open(proxied);
    await page.locator("#last-id", { hasText: /\d/ }).waitFor(); // it has an event to resume from
    const port = new URL(server.url).port;
    assert.equal(await server.stop(), 0);
    await page.locator('#state[data-state="reconnecting"]').waitFor();

    server = await startServer({ PORT: port, TICK_MS: "200", RETRY_MS: "300" });
    await page.locator('#state[data-state="open"]').waitFor();
    // The new server cannot know what the old one sent after the page's last event: it says so.
    await page.locator("#notice", { hasText: "some may be missing" }).waitFor();
    await publish(server.url, { data: "after the restart" });
    await page.locator("#log td.data", { hasText: "after the restart" }).waitFor();
    await page.close();
  });

  test("named events published elsewhere show, with their whole id, when the page listens for them", async () => {
    const page = await open(server.url);
    // README's example: a quote event, published with curl, not from the page.
    const quote = await publish(server.url, { data: "42", event: "quote", topic: "ACME" });
    await page.locator("#log td.data", { hasText: /^42$/ }).waitFor();
    assert.deepEqual(await idsShown(page, "42"), [quote]);
    const cells = await page.locator(`#log tr[data-id="${quote}"] td`).allInnerTexts();
    assert.deepEqual(cells.slice(0, 2), [quote, "quote"]);
    // Another name, once listed in the subscription.
    await page.getByLabel("Event names").fill("quote, trade");
    await page.getByRole("button", { name: "Subscribe" }).click();
    await page.locator('#state[data-state="open"]').waitFor();
    const trade = await publish(server.url, { data: "a trade", event: "trade" });
    await page.locator("#log td.data", { hasText: "a trade" }).waitFor();
    assert.deepEqual(await idsShown(page, "a trade"), [trade]);
    await page.close();
  });

  test("with PUBLISH_TOKEN set, the page asks for the token and publishes with it", async () => {
    const secured = await startServer({ PUBLISH_TOKEN: "page-token-42" });
    try {
      const page = await open(secured.url);
      assert.equal(await page.getByLabel("Token").isVisible(), true);
      await page.getByLabel("Data").fill("signed message");
      await page.getByLabel("Token").fill("page-token-42");
      await page.getByRole("button", { name: "Publish" }).click();
      await page.locator("#log td.data", { hasText: "signed message" }).waitFor();
      await page.close();
    } finally {
      assert.equal(await secured.stop(), 0);
    }
  });

  test("the path check finds nothing wrong directly, and names a proxy's buffering", {
    timeout: 40_000,
  }, async () => {
    // A short heartbeat keeps the check short: it waits two intervals of silence.
    const checked = await startServer({ HEARTBEAT_MS: "500", TICK_MS: "0" });
    const holding = new Proxy(Number(new URL(checked.url).port), 2000);
    try {
      const check = async (url: string): Promise<string> => {
        const page = await open(url);
        await page.getByRole("button", { name: "Check my connection" }).click();
        const result = page.locator("#check-result", { hasText: /No problem found|Found/ });
        await result.waitFor({ timeout: 12_000 });
        const text = await result.innerText();
        await page.close();
        return text;
      };
      const direct = await check(checked.url);
      assert.match(direct, /^No problem found/);
      assert.match(direct, /HTTP\/1\.1: a browser opens at most six connections/);
      const buffered = await check(`http://127.0.0.1:${await holding.listen()}/`);
      assert.match(buffered, /^Found 1 problem:/);
      assert.match(buffered, /A proxy buffers the stream: .* up to \d+ ms late/);
      assert.match(buffered, /proxy_buffering off/);
    } finally {
      await holding.close();
      assert.equal(await checked.stop(), 0);
    }
  });

  test("no console errors", () => {
    // Chromium itself logs each connection the tests break on purpose (the
    // proxy's cut, attempts refused while the server restarts) as a network
    // failure. Anything else counts: script errors, console.error, HTTP errors.
    const own = errors.filter((error) =>
      !/^console: Failed to load resource: net::ERR_/.test(error)
    );
    assert.deepEqual(own, []);
  });
});

describe(`signed tokens from Chromium's own EventSource, server under ${RUNTIME}`, () => {
  const SECRET = "a browser secret of at least 32 bytes";
  const key = new TextEncoder().encode(SECRET);
  const token = (id: number) =>
    new jose.SignJWT({ sse: { subscribe: [`user/${id}/*`], publish: [`user/${id}/*`] } })
      .setProtectedHeader({ alg: "HS256" }).sign(key);
  let browser: Browser;
  let untrackBrowser: (() => void) | undefined;
  let server: ServerProcess;
  let pages: HttpServer; // another origin (another port), for cross-origin pages
  let pagesOrigin: string;

  before(async () => {
    // A page that opens the broker's stream from its own origin, with or
    // without credentials, and lists what it receives.
    pages = createHttpServer((request, response) => {
      const credentials = request.url!.includes("credentials=1");
      if (request.url!.includes("client=1")) {
        // The same with the broker's client, imported from the broker's origin.
        response.writeHead(200, { "content-type": "text/html" }).end(`<!doctype html>
          <ul id="events" data-state="connecting"></ul>
          <script type="module">
            const broker = new URLSearchParams(location.search).get("broker");
            const { connect } = await import(broker + "client.js");
            const list = document.getElementById("events");
            const stream = connect(broker + "events", {
              withCredentials: ${credentials},
              name: "${credentials ? "with" : "without"} the cookie",
              onStateChange: ({ state }) => list.dataset.state = state,
            });
            stream.on("message", (event) => {
              const item = document.createElement("li");
              item.textContent = event.data;
              list.append(item);
            });
          </script>`);
        return;
      }
      response.writeHead(200, { "content-type": "text/html" }).end(`<!doctype html>
        <ul id="events" data-state="connecting"></ul>
        <script>
          const broker = new URLSearchParams(location.search).get("broker");
          const source = new EventSource(broker + "events", { withCredentials: ${credentials} });
          source.onopen = () => document.getElementById("events").dataset.state = "open";
          source.onmessage = (event) => {
            const item = document.createElement("li");
            item.textContent = event.data;
            document.getElementById("events").append(item);
          };
        </script>`);
    });
    await new Promise<void>((resolve) => pages.listen(0, "127.0.0.1", resolve));
    pagesOrigin = `http://127.0.0.1:${(pages.address() as AddressInfo).port}`;
    server = await startServer({
      JWT_SECRET: SECRET,
      ALLOW_ANONYMOUS: "1",
      CORS_ORIGIN: pagesOrigin,
    });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
    untrackBrowser = track(() => browser.close());
  });

  after(async () => {
    await browser?.close();
    untrackBrowser?.();
    pages?.close();
    assert.equal(await server.stop(), 0);
  });

  const publishAs = async (bearer: string, body: object) => {
    const response = await fetch(new URL("/publish", server.url), {
      method: "POST",
      headers: { authorization: `Bearer ${bearer}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    assert.equal(response.status, 200);
    await response.body?.cancel();
  };

  test("same origin: the page's token sets the cookie, and private events arrive", async () => {
    const context = await browser.newContext();
    const anonymous = await browser.newContext();
    try {
      const page = await context.newPage();
      await page.goto(server.url);
      // A token the server refuses is said so, and sets nothing.
      await page.getByLabel("JWT").fill("not.a.token");
      await page.getByRole("button", { name: "Use token" }).click();
      await page.locator("#sign-in-error", { hasText: "malformed token" }).waitFor();
      await page.getByLabel("JWT").fill(await token(1));
      await page.getByRole("button", { name: "Use token" }).click();
      // Said once the new stream, with the cookie, is on its way: then wait for it.
      await page.locator("#sign-in-status", { hasText: "Signed in" }).waitFor();
      await page.locator('#state[data-state="open"]').waitFor();
      // The server set the cookie HttpOnly: no script of the page can read it.
      const [cookie] = await context.cookies(server.url);
      assert.deepEqual([cookie.name, cookie.httpOnly, cookie.sameSite], [
        "sse_token",
        true,
        "Strict",
      ]);
      assert.equal(await page.evaluate("document.cookie"), "");
      const other = await anonymous.newPage();
      await other.goto(server.url);
      await other.locator('#state[data-state="open"]').waitFor();
      const ann = await token(1);
      await publishAs(ann, { data: "only for user 1", topic: "user/1/inbox", private: true });
      await publishAs(ann, { data: "for everyone", topic: "user/1/inbox" });
      await page.locator("#log td.data", { hasText: "only for user 1" }).waitFor();
      await other.locator("#log td.data", { hasText: "for everyone" }).waitFor();
      assert.equal(await other.locator("#log td.data", { hasText: "only for user 1" }).count(), 0);
      // Published privately from the page's form: marked in its log.
      await page.getByLabel("Data").fill("from the form");
      await page.getByLabel("Topic", { exact: true }).fill("user/1/notes");
      await page.getByLabel("Private").check();
      await page.getByRole("button", { name: "Publish" }).click();
      await page.locator("#log tr.private td.data", { hasText: "from the form" }).waitFor();
      await page.screenshot({ path: `${ROOT}test-output/page-jwt-${RUNTIME}.png`, fullPage: true });
    } finally {
      await context.close();
      await anonymous.close();
    }
  });

  test("a stream of HTML opened as a page runs none of its script, and cannot read the cookie", async () => {
    const admin = await token(1);
    const stream = new URL("/v1/stream/user/1/page", server.url).href;
    const html = "<title>inert</title><script>document.title = 'ran ' + document.cookie</script>";
    const created = await fetch(stream, {
      method: "PUT",
      headers: { authorization: `Bearer ${admin}`, "content-type": "text/html" },
      body: html,
    });
    assert.equal(created.status, 201);
    const context = await browser.newContext();
    try {
      await context.addCookies([{ name: "sse_token", value: admin, url: server.url }]);
      const page = await context.newPage();
      const response = await page.goto(`${stream}?offset=-1`);
      assert.equal(response?.status(), 200);
      assert.equal(await response?.headerValue("content-type"), "text/html");
      assert.equal(await page.title(), "inert", "the script did not run");
    } finally {
      await context.close();
    }
  });

  for (const client of ["EventSource", "client.ts"]) {
    test(`cross origin: withCredentials sends the cookie to a listed origin (${client})`, async () => {
      const context = await browser.newContext();
      try {
        await crossOrigin(context, client === "client.ts" ? "&client=1" : "");
      } finally {
        await context.close();
      }
    });
  }

  /** Two pages of another origin, with and without the cookie, with `query`'s client. */
  const crossOrigin = async (context: BrowserContext, query: string) => {
    await context.addCookies([{ name: "sse_token", value: await token(2), url: server.url }]);
    const withCookie = await context.newPage();
    await withCookie.goto(
      `${pagesOrigin}/?credentials=1&broker=${encodeURIComponent(server.url)}${query}`,
    );
    const without = await context.newPage();
    await without.goto(`${pagesOrigin}/?broker=${encodeURIComponent(server.url)}${query}`);
    // A stream that does not resume starts at the newest event: publish
    // only once both are open.
    for (const page of [withCookie, without]) {
      await page.locator('#events[data-state="open"]').waitFor({ state: "attached" });
    }
    await publishAs(await token(2), { data: "hello", topic: "user/2/a" });
    for (const page of [withCookie, without]) {
      await page.locator("#events li", { hasText: "hello" }).waitFor();
    }
    await publishAs(await token(2), { data: "private to 2", topic: "user/2/a", private: true });
    await publishAs(await token(2), { data: "after", topic: "user/2/a" });
    await withCookie.locator("#events li", { hasText: "private to 2" }).waitFor();
    await without.locator("#events li", { hasText: "after" }).waitFor();
    assert.equal(await without.locator("#events li", { hasText: "private to 2" }).count(), 0);
  };
});
