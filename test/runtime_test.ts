// runtime.ts in process, on the runtime running the tests: its server
// (Deno.serve, Bun.serve, or the node:http adapter) serves handlers as a
// client sees them over a real socket of 127.0.0.1, its log lines, and its
// settings.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { connect, createServer } from "node:net";
import process from "node:process";
import {
  currentRuntime,
  type Handler,
  integerSetting,
  type Listener,
  ListenError,
  log,
  type Runtime,
  SettingError,
  unknownSettings,
} from "../runtime.ts";
import { ROOT, RUNTIME } from "./helpers.ts";
import { Broker, type EventLog, MemoryLog } from "../mod.ts";

const runtime = currentRuntime();

/** Serves `handler` on a free port for the length of `body`. */
async function serving(handler: Handler, body: (url: string) => Promise<void>): Promise<void> {
  const server: Listener = await runtime.serve(handler, { port: 0, hostname: "127.0.0.1" });
  try {
    await body(`http://127.0.0.1:${server.port}`);
  } finally {
    await server.stop();
  }
}

/** Sends raw bytes and answers what came back until the server closed or `until` matched. */
function raw(url: string, request: string, until: RegExp): Promise<string> {
  const { port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), "127.0.0.1", () => socket.write(request));
    let received = "";
    socket.on("data", (chunk) => {
      received += chunk;
      if (until.test(received)) socket.destroy();
    });
    socket.on("close", () => resolve(received));
    socket.on("error", reject);
  });
}

/** Lines written to the console while `body` runs. */
async function captured(body: () => unknown): Promise<string[]> {
  const lines: string[] = [];
  const [out, err] = [console.log, console.error];
  console.log = (line: string) => lines.push(`out ${line}`);
  console.error = (line: string) => lines.push(`err ${line}`);
  try {
    await body();
  } finally {
    [console.log, console.error] = [out, err];
  }
  return lines;
}

describe(`runtime.ts's server on ${RUNTIME}`, () => {
  test("passes the request on, and the response back: status, headers, cookies, body", async () => {
    let seen: { method: string; url: string; header: string | null; body: string } | undefined;
    await serving(async (request) => {
      seen = {
        method: request.method,
        url: request.url,
        header: request.headers.get("x-test"),
        body: await request.text(),
      };
      const headers = new Headers({ "x-answer": "42", "content-type": "text/plain" });
      headers.append("set-cookie", "a=1");
      headers.append("set-cookie", "b=2");
      return new Response("created", { status: 201, headers });
    }, async (url) => {
      const response = await fetch(`${url}/path?q=1`, {
        method: "POST",
        headers: { "x-test": "yes" },
        body: "hello",
      });
      assert.equal(response.status, 201);
      assert.equal(response.headers.get("x-answer"), "42");
      assert.deepEqual(response.headers.getSetCookie(), ["a=1", "b=2"]);
      assert.equal(
        response.headers.get("content-length"),
        "7",
        "a body ready at once has a length",
      );
      assert.equal(await response.text(), "created");
      assert.deepEqual(seen, {
        method: "POST",
        url: `${url}/path?q=1`,
        header: "yes",
        body: "hello",
      });
      const head = await fetch(`${url}/`, { method: "HEAD" });
      assert.equal(head.status, 201);
      assert.equal(await head.text(), "", "HEAD: no body");
    });
  });

  test("a stream's chunks go as they come; a client that leaves aborts the request", async () => {
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    const aborted = Promise.withResolvers<void>();
    const cancelled = Promise.withResolvers<void>();
    await serving((request) => {
      request.signal.addEventListener("abort", () => aborted.resolve());
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          controller = c;
        },
        cancel: () => cancelled.resolve(),
      });
      return new Response(body, { headers: { "content-type": "text/event-stream" } });
    }, async (url) => {
      const { port } = new URL(url);
      const socket = connect(Number(port), "127.0.0.1");
      let received = "";
      const arrived = (text: string) =>
        new Promise<void>((resolve) => {
          const check = () => received.includes(text) && resolve();
          socket.on("data", (chunk) => {
            received += chunk;
            check();
          });
          check();
        });
      socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
      // Each chunk arrives as it is sent (the head with the first: Bun and
      // Node send none before), without a length.
      for (const chunk of ["one", "two"]) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        controller.enqueue(new TextEncoder().encode(chunk));
        await arrived(chunk);
      }
      assert.match(received, /^HTTP\/1\.1 200 /);
      assert.doesNotMatch(received, /content-length/i);
      socket.destroy();
      await aborted.promise;
      await cancelled.promise; // and the body is no longer read
    });
  });

  test("a stream that ends arrives whole, its last chunk after a wait", async () => {
    await serving(() => {
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new TextEncoder().encode("first "));
          setTimeout(() => {
            controller.enqueue(new TextEncoder().encode("last"));
            controller.close();
          }, 30);
        },
      });
      return new Response(body);
    }, async (url) => {
      const response = await fetch(url);
      assert.equal(response.headers.get("content-length"), null);
      assert.equal(await response.text(), "first last");
    });
  });

  test("a client that stops reading stops the reads of the body; reading again, it gets it all", {
    timeout: 30_000,
  }, async () => {
    const CHUNK = 64 * 1024;
    const CHUNKS = 512; // 32 MiB
    let pulled = 0;
    await serving(() => {
      const body = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (pulled === CHUNKS) return controller.close();
          pulled++;
          controller.enqueue(new Uint8Array(CHUNK).fill(97));
        },
      }, { highWaterMark: 0 });
      return new Response(body);
    }, async (url) => {
      const { port } = new URL(url);
      const socket = connect(Number(port), "127.0.0.1");
      let received = 0;
      const ended = new Promise<void>((resolve) => socket.on("end", resolve));
      const first = new Promise<void>((resolve) =>
        socket.once("data", () => {
          socket.pause();
          resolve();
        })
      );
      socket.on("data", (chunk: Buffer) => received += chunk.length);
      socket.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
      await first;
      // The reads stop once the socket's buffers are full: wait until they have.
      let seen = -1;
      while (seen !== pulled) {
        seen = pulled;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      assert.ok(
        pulled < CHUNKS / 2,
        `${pulled} of ${CHUNKS} chunks read for a client that reads none`,
      );
      socket.resume();
      await ended;
      socket.destroy();
      assert.equal(pulled, CHUNKS);
      assert.ok(received > CHUNK * CHUNKS, `${received} bytes arrived`);
    });
  });

  test("a broker's replay to a client that stops reading waits for it, and goes on when it reads", {
    timeout: 60_000,
  }, async () => {
    const log = new MemoryLog({ history: 8000 });
    // Reads answer a timer turn later, as Redis's do: on Node the stream is
    // then the server's to write (DIRECT_WRITE) while the replay goes on.
    const laterLog: EventLog = {
      get lastId() {
        return log.lastId;
      },
      append: (events, options) => log.append(events, options),
      read: (afterId, limit) =>
        new Promise((resolve) => setTimeout(() => resolve(log.read(afterId, limit)), 0)),
      listen: (listener) => log.listen(listener),
    };
    const broker = new Broker({ eventLog: laterLog, maxQueueBytes: 64 * 1024 });
    const COUNT = 8000; // 8 MB of 1 KiB events: past what loopback's kernel buffers take
    for (let i = 0; i < COUNT; i++) await broker.publish({ data: `${i} ${"x".repeat(1000)}` });
    try {
      await serving((request) => broker.subscribe(request), async (url) => {
        const { port } = new URL(url);
        const socket = connect(Number(port), "127.0.0.1");
        let received = "";
        const first = new Promise<void>((resolve) =>
          socket.once("data", () => {
            socket.pause();
            resolve();
          })
        );
        const replayed = new Promise<void>((resolve) =>
          socket.on("data", (chunk: Buffer) => {
            received += chunk;
            if (received.includes("event: replayed")) resolve();
          })
        );
        // HTTP/1.0: the body comes without chunk framing.
        socket.write("GET / HTTP/1.0\r\nHost: x\r\nLast-Event-ID: earliest\r\n\r\n");
        await first;
        // The replay stops once the socket's buffers and half the queue are full.
        let seen = -1;
        while (seen !== broker.stats().replayed) {
          seen = broker.stats().replayed;
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
        assert.ok(seen < COUNT, `${seen} of ${COUNT} events replayed to a client that reads none`);
        socket.resume();
        await replayed;
        socket.destroy();
        const data = [...received.matchAll(/^data: (\d+) /gm)].map((match) => Number(match[1]));
        assert.deepEqual(
          data,
          Array.from({ length: COUNT }, (_, i) => i),
          "each event once, in order",
        );
        assert.match(received, /event: replayed\ndata: \{"count":8000\}\n\n/);
      });
    } finally {
      broker.close();
    }
  });

  test("an empty body answers at once; HEAD of an endless stream too, and cancels it", async () => {
    const cancelled = Promise.withResolvers<void>();
    await serving(
      (request) =>
        new URL(request.url).pathname === "/empty"
          ? new Response(null, { status: 204 })
          : new Response(new ReadableStream({ cancel: () => cancelled.resolve() }), {
            headers: { "content-type": "text/event-stream" },
          }),
      async (url) => {
        const empty = await fetch(`${url}/empty`);
        assert.equal(empty.status, 204);
        assert.equal(await empty.text(), "");
        const head = await fetch(`${url}/stream`, { method: "HEAD" });
        assert.equal(head.status, 200);
        assert.equal(head.headers.get("content-type"), "text/event-stream");
        assert.equal(await head.text(), "");
        await cancelled.promise;
      },
    );
  });

  test("a response ready after its client left is cancelled, not read", async () => {
    const started = Promise.withResolvers<void>();
    const cancelled = Promise.withResolvers<void>();
    let pulls = 0;
    await serving(async (request) => {
      started.resolve();
      await new Promise((resolve) => request.signal.addEventListener("abort", resolve));
      return new Response(
        new ReadableStream({
          pull: (controller) => {
            pulls++;
            controller.enqueue(new Uint8Array(1024));
          },
          cancel: () => cancelled.resolve(),
        }, { highWaterMark: 0 }),
      );
    }, async (url) => {
      const { port } = new URL(url);
      const socket = connect(Number(port), "127.0.0.1");
      socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
      await started.promise;
      socket.destroy();
      await cancelled.promise;
      // Node's adapter reads none of it; Deno reads ahead before it cancels.
      if (RUNTIME !== "deno") assert.ok(pulls <= 1, `${pulls} reads`);
    });
  });

  test("the handler learns the client's address; on Bun it gets Bun's server, with its timeout", async () => {
    const seen: { address?: string; timeout?: string }[] = [];
    await serving((request, server) => {
      seen.push({
        address: server?.requestIP?.(request)?.address,
        timeout: typeof (server as { timeout?: unknown } | undefined)?.timeout,
      });
      return new Response("ok");
    }, async (url) => {
      assert.equal(await (await fetch(url)).text(), "ok");
    });
    assert.deepEqual(seen, [{
      address: "127.0.0.1",
      timeout: RUNTIME === "bun" ? "function" : "undefined",
    }]);
  });

  test("the headers arrive as sent, nothing added", async () => {
    let names: string[] = [];
    await serving((request) => {
      names = [...request.headers.keys()];
      return new Response("ok");
    }, async (url) => {
      await raw(url, "GET / HTTP/1.1\r\nHost: x\r\nX-One: 1\r\nConnection: close\r\n\r\n", /ok$/);
    });
    assert.deepEqual(names.sort(), ["connection", "host", "x-one"]);
  });

  test("sharing the port: on Deno only with --unstable-net (a ListenError says so)", async () => {
    const address = { port: 0, hostname: "127.0.0.1", reusePort: true };
    if (RUNTIME === "deno" && !("listenDatagram" in Deno)) {
      await assert.rejects(runtime.serve(() => new Response(), address), {
        name: "ListenError",
        message: "cannot listen on 127.0.0.1:0: sharing the port on Deno needs --unstable-net",
      });
      // With the flag it shares the port, as on the others.
      const { spawnSync } = await import("node:child_process");
      const script = 'import { currentRuntime } from "./runtime.ts";' +
        "const server = await currentRuntime().serve(() => new Response(), " +
        '{ port: 0, hostname: "127.0.0.1", reusePort: true });' +
        'console.log("listening"); await server.stop();';
      const flagged = spawnSync(process.execPath, ["eval", "--unstable-net", "--ext=ts", script], {
        cwd: ROOT,
        encoding: "utf8",
        timeout: 10_000,
      });
      assert.deepEqual([flagged.status, flagged.stdout], [0, "listening\n"], flagged.stderr);
    } else {
      const server = await runtime.serve(() => new Response("shared"), address);
      try {
        assert.equal(await (await fetch(`http://127.0.0.1:${server.port}/`)).text(), "shared");
      } finally {
        await server.stop();
      }
    }
  });

  test("a signal reaches its listener", async () => {
    const heard = Promise.withResolvers<void>();
    runtime.onSignal("SIGTERM", () => heard.resolve());
    process.kill(process.pid, "SIGTERM");
    await heard.promise;
  });

  test("a handler that throws answers 500 without its detail, and logs it once", async () => {
    const lines = await captured(() =>
      serving(() => {
        throw new Error("secret detail");
      }, async (url) => {
        const response = await fetch(url);
        assert.equal(response.status, 500);
        assert.deepEqual(await response.json(), { error: "internal error" });
      })
    );
    assert.deepEqual(lines, ["err error: request failed: secret detail"]);
  });

  test("a body that fails mid-stream cuts the connection", async () => {
    await serving(() => {
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new TextEncoder().encode("partial"));
          setTimeout(() => controller.error(new Error("gone")), 50);
        },
      });
      return new Response(body);
    }, async (url) => {
      const response = await fetch(url);
      await assert.rejects(response.text());
    });
  });

  test("on Node, a request without Host is for localhost", async () => {
    let seen = "";
    await serving((request) => {
      seen = request.url;
      return new Response("ok");
    }, async (url) => {
      await raw(url, "GET /path?q HTTP/1.0\r\n\r\n", /ok$/);
    });
    if (RUNTIME === "node") assert.equal(seen, "http://localhost/path?q");
  });

  test("a request no URL can hold answers 400 on Node, and logs nothing", async () => {
    let handled = false;
    const lines = await captured(() =>
      serving(() => {
        handled = true;
        return new Response("ok");
      }, async (url) => {
        const whole = RUNTIME === "node" ? /\}$/ : /\r\n\r\n/;
        const answer = await raw(url, "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", whole);
        // Deno and Bun pass it on (server.ts answers it); on Node the adapter does.
        if (RUNTIME === "node") {
          assert.match(answer, /^HTTP\/1\.1 400 /);
          assert.match(answer, /\r\ncontent-type: application\/json\r\n/i);
          assert.match(answer, /\r\nconnection: close\r\n/i);
          assert.match(answer, /\r\ncontent-length: 51\r\n/i);
          assert.ok(
            answer.endsWith('\r\n\r\n{"error":"malformed Host header or request target"}'),
            JSON.stringify(answer),
          );
          assert.equal(handled, false);
        } else assert.match(answer, /^HTTP\/1\.1 (200|400) /);
      })
    );
    assert.deepEqual(lines, []);
  });

  test("an address in use is a ListenError that says so", async () => {
    const taken = createServer().listen(0, "127.0.0.1");
    await new Promise((resolve) => taken.once("listening", resolve));
    const { port } = taken.address() as { port: number };
    try {
      await assert.rejects(
        runtime.serve(() => new Response(), { port, hostname: "127.0.0.1" }),
        (error: Error) => {
          assert.ok(error instanceof ListenError);
          assert.equal(error.name, "ListenError");
          assert.equal(
            error.message,
            `cannot listen on 127.0.0.1:${port}: the address is already in use`,
          );
          return true;
        },
      );
    } finally {
      taken.close();
    }
  });

  test("stop waits for a response still being sent, then ends its keep-alive connection", async () => {
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    const server = await runtime.serve(() =>
      new Response(
        new ReadableStream<Uint8Array>({
          start(c) {
            controller = c;
            c.enqueue(new TextEncoder().encode("started "));
          },
        }),
      ), { port: 0, hostname: "127.0.0.1" });
    const response = await fetch(`http://127.0.0.1:${server.port}/`);
    let stopped = false;
    const stopping = server.stop().then(() => stopped = true);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(stopped, false, "a response is still open");
    controller.enqueue(new TextEncoder().encode("and done"));
    controller.close();
    assert.equal(await response.text(), "started and done");
    await stopping;
  });

  test("stop ends once open responses are done, and frees the port", async () => {
    const server = await runtime.serve(() => new Response("bye"), {
      port: 0,
      hostname: "127.0.0.1",
    });
    const url = `http://127.0.0.1:${server.port}/`;
    assert.equal(await (await fetch(url)).text(), "bye");
    await server.stop();
    await assert.rejects(fetch(url));
  });

  test("the environment and the memory of the process", () => {
    process.env.SSE_RUNTIME_TEST = "seen";
    assert.equal(runtime.env("SSE_RUNTIME_TEST"), "seen");
    assert.ok(runtime.envNames().includes("SSE_RUNTIME_TEST"));
    assert.equal(runtime.env("SSE_RUNTIME_TEST_UNSET"), undefined);
    assert.equal(runtime.parentPid(), process.ppid);
    const rss = runtime.residentMemory();
    assert.ok(rss > 10 * 1024 * 1024 && rss < 10 * 1024 ** 3, `${rss} bytes`);
  });
});

describe("runtime.ts's log and settings", () => {
  test("log writes text (errors to stderr, marked), never more than it is given", async () => {
    const lines = await captured(() => {
      log("info", "listening", { url: "http://x/", pid: 7 });
      log("error", "it broke");
      log("warning", "careful");
    });
    assert.deepEqual(lines, [
      "out listening url=http://x/ pid=7",
      "err error: it broke",
      "err warning: careful",
    ]);
  });

  test("LOG_FORMAT=json: one JSON object a line, with its time, level, message and fields", async () => {
    process.env.LOG_FORMAT = "json";
    let lines: string[];
    try {
      currentRuntime();
      lines = await captured(() => {
        log("info", "listening", { url: "http://x/" });
        log("error", "it broke");
      });
    } finally {
      delete process.env.LOG_FORMAT;
      currentRuntime();
    }
    const entries = lines.map((line) => [line.slice(0, 4), JSON.parse(line.slice(4))]);
    for (const [, entry] of entries) {
      assert.ok(Math.abs(Date.parse(entry.time) - Date.now()) < 60_000, entry.time);
      delete entry.time;
    }
    assert.deepEqual(entries, [
      ["out ", { level: "info", message: "listening", url: "http://x/" }],
      ["err ", { level: "error", message: "it broke" }],
    ]);
    assert.deepEqual(await captured(() => log("info", "text again")), ["out text again"]);
  });

  test("any other LOG_FORMAT stops the program with one line, exit 1", async () => {
    const { spawnSync } = await import("node:child_process");
    const script =
      'import { currentRuntime } from "./runtime.ts"; currentRuntime(); console.log("went on");';
    const args = RUNTIME === "deno"
      ? ["eval", "--ext=ts", script]
      : RUNTIME === "bun"
      ? ["-e", script]
      : ["--input-type=module-typescript", "-e", script];
    const result = spawnSync(process.execPath, args, {
      cwd: ROOT,
      env: { ...process.env, LOG_FORMAT: "xml" },
      encoding: "utf8",
      timeout: 10_000,
    });
    assert.deepEqual([result.status, result.stdout, result.stderr.trim()], [
      1,
      "",
      'error: LOG_FORMAT must be "text" or "json", got "xml"',
    ]);
  });

  test("a ListenError names the address (IPv6 in brackets) and the reason", () => {
    const reasons = [
      ["EADDRINUSE", "the address is already in use"],
      ["EADDRNOTAVAIL", "the address is not available on this machine"],
      ["EACCES", "permission denied"],
      ["EOTHER", "as the runtime said"],
    ];
    for (const [code, reason] of reasons) {
      const error = new ListenError({ port: 80, hostname: "::1" }, {
        code,
        message: "as the runtime said",
      });
      assert.equal(error.message, `cannot listen on [::1]:80: ${reason}`);
    }
  });

  test("integerSetting: a non-negative integer, the fallback when unset or empty, else a SettingError naming it", () => {
    const fake = (value: string | undefined): Runtime => ({
      env: (name) => name === "N" ? value : undefined,
      envNames: () => ["N"],
      serve: () => Promise.reject(new Error("unused")),
      onSignal: () => {},
      exit: (code) => {
        throw new Error(`exit ${code}`);
      },
      residentMemory: () => 0,
      parentPid: () => 1,
    });
    assert.equal(integerSetting(fake("42"), "N", 7), 42);
    assert.equal(integerSetting(fake("0"), "N", 7), 0);
    assert.equal(integerSetting(fake(undefined), "N", 7), 7);
    assert.equal(integerSetting(fake(""), "N", 7), 7);
    for (const bad of ["-1", "1.5", "1e3", " 4", "x", "9007199254740993"]) {
      assert.throws(() => integerSetting(fake(bad), "N", 7), (error: Error) => {
        assert.ok(error instanceof SettingError);
        assert.equal(error.name, "SettingError");
        assert.equal(error.message, `N must be a non-negative integer, got ${JSON.stringify(bad)}`);
        return true;
      });
    }
  });
});

test("unknownSettings names a variable a slip away from a known one, or with its prefix", () => {
  const env = (names: string[]): Runtime => ({
    env: () => undefined,
    envNames: () => names,
    serve: () => Promise.reject(new Error("unused")),
    onSignal: () => {},
    exit: () => {
      throw new Error("unused");
    },
    residentMemory: () => 0,
    parentPid: () => 1,
  });
  const known = new Set(["JWT_SECRET", "PORT", "REDIS_URL"]);
  assert.deepEqual(
    unknownSettings(
      env([
        "JWT_SECERT",
        "PROT",
        "PATH",
        "HOME",
        "REDIS_URI",
        "PORT",
        "JWT_TOKEN",
        "X",
        "NODE_OPTIONS",
        "JWT",
      ]),
      known,
    ),
    [
      "JWT_SECERT is not a setting of this server: did you mean JWT_SECRET?",
      "JWT_TOKEN is not a setting of this server",
      "PROT is not a setting of this server: did you mean PORT?",
      "REDIS_URI is not a setting of this server: did you mean REDIS_URL?",
    ],
  );
  // As near to two: the first known one is named.
  assert.deepEqual(unknownSettings(env(["HOST_C"]), new Set(["HOST_A", "HOST_B"])), [
    "HOST_C is not a setting of this server: did you mean HOST_A?",
  ]);
});
