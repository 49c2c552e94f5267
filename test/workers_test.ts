// The Workers example (examples/workers/) in workerd, Cloudflare's own
// runtime from npm: bundled with esbuild as `wrangler deploy` would, served
// from a Durable Object with its SQLite storage on a temporary directory.
import { after, before, describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type EventReader, eventually, ROOT, RUNTIME, subscribe } from "./helpers.ts";
import { eventLogContract } from "./contract/event_log.ts";
import { streamStoreContract } from "./contract/stream_store.ts";

const EXAMPLE = join(ROOT, "examples", "workers");

/** A workerd process serving the example, on a free port of 127.0.0.1. */
interface Workerd {
  url: string;
  /** SIGKILL: on SIGTERM workerd waits for open streams, possibly for ever. */
  kill(): Promise<void>;
}

function startWorkerd(dir: string): Promise<Workerd> {
  const child: ChildProcess = spawn(
    join(ROOT, "node_modules", ".bin", "workerd"),
    ["serve", "config.capnp", "--socket-addr", "http=127.0.0.1:0", "--control-fd", "3"],
    {
      cwd: dir,
      env: { ...process.env, HEARTBEAT_MS: "300", HISTORY: "5", PUBLISH_TOKEN: "" },
      stdio: ["ignore", "pipe", "pipe", "pipe"],
    },
  );
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const untrack = track(() => child.kill("SIGKILL"));
  let output = "";
  child.stdout!.on("data", (chunk) => output += chunk);
  child.stderr!.on("data", (chunk) => output += chunk);
  const kill = async () => {
    child.kill("SIGKILL");
    await exited;
    untrack();
  };
  return new Promise((resolve, reject) => {
    let control = "";
    // workerd reports each socket's port on the control descriptor once it listens.
    (child.stdio[3] as NodeJS.ReadableStream).on("data", (chunk) => {
      control += chunk;
      const listen = control.split("\n").map((line) => line && JSON.parse(line))
        .find((message) => message?.event === "listen" && message.socket === "http");
      if (listen) resolve({ url: `http://127.0.0.1:${listen.port}`, kill });
    });
    child.once("exit", (code) => reject(new Error(`workerd exited with ${code}: ${output}`)));
  });
}

/**
 * A temporary directory with the example bundled by esbuild (as `wrangler
 * deploy` would), its config.capnp, and an empty storage directory.
 */
function buildExample(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const built = spawnSync(
    join(ROOT, "node_modules", ".bin", "esbuild"),
    [
      "--bundle",
      "--format=esm",
      "--log-level=warning",
      join(EXAMPLE, "worker.ts"),
      `--outfile=${join(dir, "worker.js")}`,
    ],
    { encoding: "utf8" },
  );
  assert.equal(built.status, 0, built.stderr);
  copyFileSync(join(EXAMPLE, "config.capnp"), join(dir, "config.capnp"));
  mkdirSync(join(dir, "storage"));
  return dir;
}

describe(`the Workers example in workerd (test run by ${RUNTIME})`, () => {
  let dir: string;
  let workerd: Workerd;

  before(() => {
    dir = buildExample("sse-workers-");
  });

  before(async () => {
    workerd = await startWorkerd(dir);
  });

  after(async () => {
    await workerd?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const publish = async (name: string, body: unknown, headers: HeadersInit = {}) => {
    const response = await fetch(`${workerd.url}/${name}/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body),
    });
    assert.equal(response.status, 200, await response.clone().text());
    return (await response.json()).id as string;
  };
  const clients = async (name: string) =>
    (await (await fetch(`${workerd.url}/${name}/stats`)).json()).clients as number;

  test("every subscriber of a name gets its events, exactly as sent; another name gets none", async () => {
    const readers: EventReader[] = [];
    try {
      for (const name of ["room-1", "room-1", "room-2"]) {
        readers.push(await subscribe(`${workerd.url}/${name}/events`));
      }
      const id = await publish("room-1", { event: "note", data: "line one\nline two" });
      await publish("room-2", { data: "elsewhere" });
      for (const reader of readers.slice(0, 2)) {
        const event = await reader.event();
        assert.deepEqual([event.lastEventId, event.event, event.data], [
          id,
          "note",
          "line one\nline two",
        ]);
      }
      assert.equal((await readers[2].event()).data, "elsewhere");
    } finally {
      for (const reader of readers) await reader.cancel();
    }
  });

  test("Last-Event-ID resumes with exactly the missed events", async () => {
    const first = await publish("replay", { data: "1" });
    const missed = [await publish("replay", { data: "2" }), await publish("replay", { data: "3" })];
    const reader = await subscribe(`${workerd.url}/replay/events`, { "last-event-id": first });
    try {
      const events = await reader.events(2);
      assert.deepEqual(events.map((event) => [event.lastEventId, event.data]), [
        [missed[0], "2"],
        [missed[1], "3"],
      ]);
      const replayed = await reader.event();
      assert.deepEqual([replayed.event, replayed.data], ["replayed", '{"count":2}']);
      const live = await publish("replay", { data: "4" });
      assert.equal((await reader.event()).lastEventId, live);
    } finally {
      await reader.cancel();
    }
  });

  test("an idle stream gets heartbeat comments, and a client that leaves is removed", async () => {
    const reader = await subscribe(`${workerd.url}/idle/events`);
    let comments = 0;
    while (comments < 2) {
      const item = await reader.next();
      assert.ok(item, "the stream ended");
      if (item.type === "comment") comments++;
    }
    assert.equal(await clients("idle"), 1);
    await reader.cancel();
    // Needs enable_request_signal: the abort reaches the object at the next heartbeat.
    await eventually(async () => await clients("idle") === 0, 5000, "the client to be removed");
  });

  test("an Idempotency-Key publishes once: a retry answers the same id, other events 422", async () => {
    const reader = await subscribe(`${workerd.url}/once/events`);
    try {
      const headers = { "idempotency-key": "order-7" };
      const id = await publish("once", { data: "paid" }, headers);
      assert.equal(await publish("once", { data: "paid" }, headers), id);
      const other = await fetch(`${workerd.url}/once/publish`, {
        method: "POST",
        headers,
        body: "refunded",
      });
      assert.equal(other.status, 422);
      assert.match((await other.json()).error, /idempotency key was used for other events/);
      const after = await publish("once", { data: "next" });
      assert.deepEqual((await reader.events(2)).map((event) => event.lastEventId), [id, after]);
    } finally {
      await reader.cancel();
    }
  });

  test("the history is in storage: a resume after workerd restarts misses nothing", async () => {
    const seen = await publish("durable", { data: "before" });
    const missed = await publish("durable", { data: "while away" });
    await workerd.kill();
    workerd = await startWorkerd(dir);
    const reader = await subscribe(`${workerd.url}/durable/events`, { "last-event-id": seen });
    try {
      const event = await reader.event();
      assert.equal(event.event, "message", "not a gap event");
      assert.deepEqual([event.lastEventId, event.data], [missed, "while away"]);
      assert.equal((await reader.event()).event, "replayed");
      const next = await publish("durable", { data: "after" });
      assert.ok(next > missed, `${next} follows ${missed}`);
      assert.equal((await reader.event()).lastEventId, next);
    } finally {
      await reader.cancel();
    }
  });

  test("HISTORY keeps the newest events: an older id gets a gap, the newest dropped one none", async () => {
    const ids: string[] = [];
    for (let i = 1; i <= 8; i++) ids.push(await publish("trim", { data: `${i}` }));
    const resume = async (lastEventId: string, count: number) => {
      const reader = await subscribe(`${workerd.url}/trim/events`, {
        "last-event-id": lastEventId,
      });
      try {
        return (await reader.events(count)).map((event) => `${event.event} ${event.data}`);
      } finally {
        await reader.cancel();
      }
    };
    const retained = ["message 4", "message 5", "message 6", "message 7", "message 8"];
    const gap = await resume(ids[1], 7);
    assert.match(gap[0], /^gap /);
    assert.deepEqual(gap.slice(1), [...retained, 'replayed {"count":5}']);
    assert.deepEqual(await resume(ids[2], 6), [...retained, 'replayed {"count":5}']);
  });

  test("any other path: 404 with the routes", async () => {
    const response = await fetch(`${workerd.url}/room-1/other`);
    assert.equal(response.status, 404);
    assert.match((await response.json()).error, /\/<name>\/events/);
  });
});

describe(`Durable Streams in the Workers example in workerd, one object per stream (test run by ${RUNTIME})`, () => {
  let dir: string;
  let workerd: Workerd;

  before(async () => {
    dir = buildExample("sse-streams-");
    workerd = await startWorkerd(dir);
  });

  after(async () => {
    await workerd?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const url = (name: string) => `${workerd.url}/v1/stream/${name}`;
  const send = async (
    method: string,
    name: string,
    body?: string,
    headers: Record<string, string> = {},
  ) => {
    const response = await fetch(url(name), {
      method,
      headers: { "content-type": "text/plain", ...headers },
      body,
    });
    await response.body?.cancel();
    return response;
  };
  const readAll = async (name: string) => {
    const response = await fetch(`${url(name)}?offset=-1`);
    return [response.status, await response.text()];
  };
  const status = async (name: string) => (await send("HEAD", name)).status;

  test("a stream is in the object's storage: after workerd restarts it has its data and takes appends", async () => {
    assert.equal((await send("PUT", "kept", "before ")).status, 201);
    assert.equal((await send("POST", "kept", "restart")).status, 204);
    await workerd.kill();
    workerd = await startWorkerd(dir);
    assert.deepEqual(await readAll("kept"), [200, "before restart"]);
    assert.equal((await send("POST", "kept", ", after")).status, 204);
    assert.deepEqual(await readAll("kept"), [200, "before restart, after"]);
  });

  test("a live SSE reader gets each append as it is made, with its control event", async () => {
    assert.equal((await send("PUT", "live", "a")).status, 201);
    const reader = await subscribe(`${url("live")}?offset=-1&live=sse`);
    try {
      const first = await reader.events(2);
      assert.deepEqual(first.map((event) => [event.event, event.data]).slice(0, 1), [[
        "data",
        "a",
      ]]);
      assert.equal(first[1].event, "control");
      for (const text of ["b", "c"]) {
        assert.equal((await send("POST", "live", text)).status, 204);
        const [data, control] = await reader.events(2);
        assert.deepEqual([data.event, data.data], ["data", text]);
        assert.equal(control.event, "control");
        assert.equal(JSON.parse(control.data).upToDate, true);
      }
    } finally {
      await reader.cancel();
    }
  });

  test("a fork reads its source's data from the source's object; the source deleted answers 410 while the fork lives, 404 after", async () => {
    assert.equal((await send("PUT", "origin", "shared")).status, 201);
    const fork = { "stream-forked-from": "/v1/stream/origin" };
    assert.equal((await send("PUT", "branch", undefined, fork)).status, 201);
    assert.equal((await send("PUT", "branch", undefined, fork)).status, 200, "the same again");
    assert.equal((await send("POST", "origin", " source only")).status, 204);
    assert.equal((await send("POST", "branch", " fork only")).status, 204);
    assert.deepEqual(await readAll("branch"), [200, "shared fork only"]);
    assert.equal((await send("DELETE", "origin")).status, 204);
    assert.equal(await status("origin"), 410);
    assert.equal((await readAll("origin"))[0], 410);
    assert.equal((await send("PUT", "origin")).status, 409, "its path is held");
    assert.equal((await send("PUT", "twig", undefined, fork)).status, 409, "no fork of it");
    assert.deepEqual(await readAll("branch"), [200, "shared fork only"], "the fork reads on");
    assert.equal((await send("DELETE", "branch")).status, 204);
    assert.equal(await status("origin"), 404, "its last fork gone, the source goes");
    assert.equal((await send("PUT", "origin")).status, 201);
  });

  test("a deleted source goes once its last fork expires, unread: the fork's alarm drops it and releases the source", async () => {
    assert.equal((await send("PUT", "elder", "data")).status, 201);
    const fork = { "stream-forked-from": "/v1/stream/elder", "stream-ttl": "1" };
    assert.equal((await send("PUT", "brief", undefined, fork)).status, 201);
    assert.equal((await send("DELETE", "elder")).status, 204);
    assert.equal(await status("elder"), 410);
    await eventually(async () => await status("elder") === 404, 8000, "the source to go");
  });

  test(
    "a JSON message longer than a SQLite row may hold is kept whole, and copied whole into a fork",
    { timeout: 30_000 },
    async () => {
      const long = "x".repeat(3 * 1024 * 1024);
      const json = { "content-type": "application/json" };
      assert.equal((await send("PUT", "large", undefined, json)).status, 201);
      assert.equal((await send("POST", "large", JSON.stringify(long), json)).status, 204);
      assert.equal((await send("POST", "large", "[1, 2]", json)).status, 204);
      /** Every message, read on from each answer's next offset (a read stops near 1 MiB). */
      const messages = async (name: string) => {
        const all: unknown[] = [];
        for (let offset = "-1";;) {
          const response = await fetch(`${url(name)}?offset=${offset}`);
          assert.equal(response.status, 200);
          all.push(...await response.json());
          if (response.headers.get("stream-up-to-date") === "true") return all;
          offset = response.headers.get("stream-next-offset")!;
        }
      };
      // Compared by sizes and values: a failure does not print 3 MiB.
      const shape = (all: unknown[]) =>
        all.map((message) => message === long ? "the long message" : message);
      assert.deepEqual(shape(await messages("large")), ["the long message", 1, 2]);
      const fork = { ...json, "stream-forked-from": "/v1/stream/large" };
      assert.equal((await send("PUT", "large-fork", undefined, fork)).status, 201);
      assert.deepEqual(shape(await messages("large-fork")), ["the long message", 1, 2]);
    },
  );

  test("the route between objects is not a client's: the Worker answers 404", async () => {
    const response = await fetch(`${workerd.url}/.source/describe`, {
      method: "POST",
      body: JSON.stringify({ path: "/v1/stream/origin" }),
    });
    assert.equal(response.status, 404);
    assert.match((await response.json()).error, /no such path/);
  });
});

describe(`the Workers example in wrangler dev (test run by ${RUNTIME})`, () => {
  let persist: string;
  let url: string;
  let stop: (() => void) | undefined;

  before(async () => {
    persist = mkdtempSync(join(tmpdir(), "sse-wrangler-"));
    // Node 26 from npm: wrangler needs Node 22.12 or later. Its own group,
    // so that the workerd it starts is stopped with it.
    const child = spawn(
      join(ROOT, "node_modules", ".bin", "node"),
      [
        join(ROOT, "node_modules", "wrangler", "bin", "wrangler.js"),
        ...["dev", "--local", "--ip", "127.0.0.1", "--port", "0", "--inspector-port", "0"],
        ...["--persist-to", persist, "--var", "HEARTBEAT_MS:300"],
      ],
      {
        cwd: EXAMPLE,
        detached: true,
        env: {
          ...process.env,
          CI: "1",
          WRANGLER_SEND_METRICS: "false",
          CLOUDFLARE_CF_FETCH_ENABLED: "false",
        },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    const kill = () => {
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        // already gone
      }
    };
    const untrack = track(kill);
    stop = () => (kill(), untrack());
    url = await new Promise<string>((resolve, reject) => {
      let output = "";
      const read = (chunk: Buffer) => {
        output += chunk;
        const ready = /Ready on (http:\/\/127\.0\.0\.1:\d+)/.exec(output);
        if (ready) resolve(ready[1]);
      };
      child.stdout!.on("data", read);
      child.stderr!.on("data", read);
      child.once("exit", (code) => reject(new Error(`wrangler exited with ${code}: ${output}`)));
    });
  }, { timeout: 30_000 });

  after(() => {
    stop?.();
    if (persist) rmSync(persist, { recursive: true, force: true });
  });

  test("wrangler.jsonc serves the same broker: publish, replay, heartbeat", async () => {
    const send = async (data: string) => {
      const response = await fetch(`${url}/news/publish`, { method: "POST", body: data });
      assert.equal(response.status, 200);
      return (await response.json()).id as string;
    };
    const first = await send("one");
    const second = await send("two");
    const reader = await subscribe(`${url}/news/events`, { "last-event-id": first });
    try {
      const replayed = await reader.event();
      assert.deepEqual([replayed.lastEventId, replayed.data], [second, "two"]);
      assert.equal((await reader.event()).event, "replayed");
      const live = await send("three");
      assert.deepEqual(await reader.event(), {
        type: "event",
        event: "message",
        data: "three",
        lastEventId: live,
      });
      let item;
      do item = await reader.next(); while (item?.type !== "comment");
    } finally {
      await reader.cancel();
    }
  });
});

/**
 * Runs a contract in workerd (test/workers/contract_worker.ts): each case is
 * a request that runs it in a Durable Object of its own.
 */
function contractInWorkerd(contract: "log" | "streams", cases: readonly { name: string }[]) {
  let dir: string;
  let workerd: Workerd;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "sse-contract-"));
    const built = spawnSync(
      join(ROOT, "node_modules", ".bin", "esbuild"),
      [
        "--bundle",
        "--format=esm",
        "--log-level=warning",
        "--external:node:*",
        join(ROOT, "test", "workers", "contract_worker.ts"),
        `--outfile=${join(dir, "contract.js")}`,
      ],
      { encoding: "utf8" },
    );
    assert.equal(built.status, 0, built.stderr);
    copyFileSync(join(ROOT, "test", "workers", "config.capnp"), join(dir, "config.capnp"));
    mkdirSync(join(dir, "storage"));
    workerd = await startWorkerd(dir);
  });

  after(async () => {
    await workerd?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  cases.forEach(({ name }, index) => {
    test(name, async () => {
      const answer = await (await fetch(`${workerd.url}/?contract=${contract}&case=${index}`))
        .json();
      assert.ok(answer.ok, answer.message);
    });
  });
}

describe(`the EventLog contract against SqliteLog in workerd (test run by ${RUNTIME})`, () => {
  contractInWorkerd("log", eventLogContract);
});

describe(`the StreamStore contract against SqliteStreamStore in workerd (test run by ${RUNTIME})`, () => {
  contractInWorkerd("streams", streamStoreContract);
});
