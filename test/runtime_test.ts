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
  unknownSettings,
} from "../runtime.ts";
import { RUNTIME } from "./helpers.ts";

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
    await serving((request) => {
      request.signal.addEventListener("abort", () => aborted.resolve());
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          controller = c;
        },
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
    });
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

  test("a request no URL can hold answers 400 on Node, and logs nothing", async () => {
    let handled = false;
    const lines = await captured(() =>
      serving(() => {
        handled = true;
        return new Response("ok");
      }, async (url) => {
        const answer = await raw(url, "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", /\r\n\r\n/);
        // Deno and Bun pass it on (server.ts answers it); on Node the adapter does.
        if (RUNTIME === "node") {
          assert.match(answer, /^HTTP\/1\.1 400 /);
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
    assert.equal(runtime.env("SSE_RUNTIME_TEST_UNSET"), undefined);
    assert.equal(runtime.parentPid(), process.ppid);
    const rss = runtime.residentMemory();
    assert.ok(rss > 10 * 1024 * 1024 && rss < 10 * 1024 ** 3, `${rss} bytes`);
  });
});

describe("runtime.ts's log and settings", () => {
  test("log writes text (errors to stderr, marked), never more than it is given", async () => {
    const lines = await captured(() => {
      log("info", "listening", { url: "http://x/" });
      log("error", "it broke");
    });
    assert.deepEqual(lines, ["out listening url=http://x/", "err error: it broke"]);
  });

  test("integerSetting: a non-negative integer, the fallback when unset or empty, else one line and exit 1", async () => {
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
      const lines = await captured(() =>
        assert.throws(() => integerSetting(fake(bad), "N", 7), { message: "exit 1" })
      );
      assert.deepEqual(lines, [
        `err error: N must be a non-negative integer, got ${JSON.stringify(bad)}`,
      ]);
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
      env(["JWT_SECERT", "PROT", "PATH", "HOME", "REDIS_URI", "PORT", "JWT_TOKEN", "X"]),
      known,
    ),
    [
      "JWT_SECERT is not a setting of this server: did you mean JWT_SECRET?",
      "JWT_TOKEN is not a setting of this server",
      "PROT is not a setting of this server: did you mean PORT?",
      "REDIS_URI is not a setting of this server: did you mean REDIS_URL?",
    ],
  );
});
