// The demo server as a real process, and mod.ts imported by URL.
import { describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import process from "node:process";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import {
  binary,
  publish,
  ROOT,
  RUNTIME,
  scriptArgs,
  startServer,
  stats,
  subscribe,
  withServer,
} from "./helpers.ts";

describe(`server.ts as a real process under ${RUNTIME}`, () => {
  test("streams ticks, delivers POST /publish to every client, reports stats", async () => {
    await withServer({ TICK_MS: "50" }, async (server) => {
      const a = await subscribe(`${server.url}events`);
      const b = await subscribe(`${server.url}events`);
      const tick = await a.event();
      assert.equal(tick.event, "tick");
      assert.ok(!Number.isNaN(Date.parse(tick.data)), tick.data);
      assert.equal(a.parser.retry, 2000);
      const id = await publish(server.url, { data: "to everyone", event: "note" });
      for (const reader of [a, b]) {
        const seen = await reader.until((e) => e.event === "note");
        assert.deepEqual(seen.at(-1), {
          type: "event",
          event: "note",
          data: "to everyone",
          lastEventId: id,
        });
      }
      assert.equal((await stats(server.url)).clients, 2);
      const page = await fetch(server.url);
      assert.match(page.headers.get("content-type")!, /text\/html/);
      const html = await page.text();
      assert.match(html, /import { connect } from "\/client.js";/);
      // Whole answers carry their length (simple clients and proxies rely on it).
      assert.equal(
        page.headers.get("content-length"),
        String(new TextEncoder().encode(html).length),
      );
      const answer = await fetch(`${server.url}stats`);
      assert.equal(answer.headers.get("content-length"), String((await answer.text()).length));
      await a.cancel();
      await b.cancel();
    });
  });

  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    test(`${signal} ends open streams and exits 0`, async () => {
      const server = await startServer({ TICK_MS: "50" });
      const readers = [
        await subscribe(`${server.url}events`),
        await subscribe(`${server.url}events`),
      ];
      await Promise.all(readers.map((reader) => reader.event()));
      const started = Date.now();
      server.signal(signal);
      for (const reader of readers) {
        while ((await reader.next()) !== null); // the stream ends, not errors
      }
      assert.equal(await server.exited, 0);
      assert.ok(Date.now() - started < 2500, "exits within the shutdown deadline");
      assert.match(server.output(), new RegExp(`^${signal}: closing 2 streams$`, "m"));
    });
  }

  test("refuses an invalid setting with a one-line reason and exit 1", async () => {
    await assert.rejects(startServer({ PORT: "eighty" }), {
      message:
        'server exited (1) before listening:\nerror: PORT must be a non-negative integer, got "eighty"\n',
    });
  });

  test("LOG_FORMAT=json: the first line is a JSON entry with the URL", async () => {
    await withServer({ LOG_FORMAT: "json" }, (server) => {
      const first = JSON.parse(server.output().split("\n")[0]);
      assert.deepEqual([first.level, first.message, first.url], ["info", "listening", server.url]);
      return Promise.resolve();
    });
  });

  /** server.ts started by a shell that is then killed, as npx's may be, with `env`. */
  async function orphaned(env: Record<string, string | undefined>) {
    const script = `"$0" ${
      scriptArgs(RUNTIME, "server.ts", ["--allow-net", "--allow-env"])
        .map((arg) => `'${arg}'`).join(" ")
    } & echo $!; wait`;
    const launcher = spawn("sh", ["-c", script, process.execPath], {
      cwd: ROOT,
      env: Object.fromEntries(
        Object.entries({ ...process.env, PORT: "0", TICK_MS: "0", ...env })
          .filter(([, value]) => value !== undefined),
      ),
      stdio: ["ignore", "pipe", "inherit"],
    });
    const untrack = track(() => launcher.kill("SIGKILL"));
    let output = "";
    launcher.stdout.on("data", (chunk) => output += chunk);
    const [pid, url] = await new Promise<[number, string]>((resolve) => {
      launcher.stdout.on("data", () => {
        const [pid, url] = output.split("\n");
        if (/^\d+\nhttp:\/\/.*\n/.test(output)) resolve([Number(pid), url]);
      });
    });
    const untrackServer = track(() => process.kill(pid, "SIGKILL"));
    // Serving, with its launcher there, past a look at it (every 500 ms).
    await new Promise((resolve) => setTimeout(resolve, 700));
    assert.equal((await fetch(`${url}health`)).status, 200);
    launcher.kill("SIGKILL"); // the launcher goes, without passing any signal on
    untrack();
    const gone = () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    };
    return { pid, url, gone, output: () => output, untrack: untrackServer };
  }

  test("started by npm or npx, it ends when its launcher is killed", async () => {
    const server = await orphaned({
      npm_command: "exec",
      npm_config_user_agent: "npm/11.6.2 node/v20.19.2 linux x64 workspaces/false",
    });
    const deadline = Date.now() + 5000;
    while (!server.gone()) {
      assert.ok(Date.now() < deadline, "the server outlived its launcher");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    server.untrack();
    assert.match(server.output(), /^SIGTERM: closing 0 streams$/m);
  });

  // `bun run` in a project sets npm's variables, with its own user agent.
  for (const agent of ["bun/1.4.5 npm/? node/v26.3.0 linux x64", undefined]) {
    test(`started otherwise (user agent ${agent}), it outlives its launcher, as under nohup`, async () => {
      const server = await orphaned({ npm_command: "run-script", npm_config_user_agent: agent });
      try {
        await new Promise((resolve) => setTimeout(resolve, 1100)); // two looks at least
        assert.equal(server.gone(), false);
        assert.equal((await fetch(`${server.url}health`)).status, 200);
      } finally {
        process.kill(server.pid, "SIGTERM");
        const deadline = Date.now() + 5000;
        while (!server.gone() && Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        server.untrack();
      }
    });
  }

  test("names a variable a slip away from a setting; STRICT_ENV=1 stops on it", async () => {
    const slip = { JWT_SECERT: "a secret of at least thirty-two bytes", REDIS_URI: "x" };
    await withServer(slip, (server) => {
      const warnings = server.output().split("\n").filter((line) => line.startsWith("warning: "));
      assert.deepEqual(warnings, [
        "warning: JWT_SECERT is not a setting of this server: did you mean JWT_SECRET?",
        "warning: REDIS_URI is not a setting of this server: did you mean REDIS_URL?",
      ]);
      assert.equal(server.output().includes("thirty-two"), false, "the value is not printed");
      return Promise.resolve();
    });
    await assert.rejects(
      startServer({ ...slip, STRICT_ENV: "1" }),
      /exited \(1\)[^]*^error: JWT_SECERT is not a setting of this server: did you mean JWT_SECRET\?$/m,
    );
  });

  test("REUSE_PORT=1 on Deno without --unstable-net: one line and exit 1, not Deno's exit 70", async () => {
    // Bun and Node share ports as they are; Deno needs a flag (docs/cluster.md).
    await assert.rejects(
      startServer({ REUSE_PORT: "1" }, "deno"),
      /^error: cannot listen on 127\.0\.0\.1:0: sharing the port on Deno needs --unstable-net$/m,
    );
  });
});

test("mod.ts imports by URL in Deno, with nothing else", async () => {
  // Serve the repository over HTTP, as a user's import would fetch it.
  const files = createServer(async (request, response) => {
    try {
      const body = await readFile(`${ROOT}${new URL(request.url!, "http://x").pathname}`);
      response.writeHead(200, { "content-type": "application/typescript" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve) => files.listen(0, "127.0.0.1", resolve));
  const { port } = files.address() as AddressInfo;
  const program = `
    import { Broker } from "http://127.0.0.1:${port}/mod.ts";
    const broker = new Broker();
    const reader = broker.subscribe(new Request("http://x/")).body.getReader();
    await reader.read();
    await broker.publish({ data: "by url" });
    console.log(new TextDecoder().decode((await reader.read()).value));
    broker.close();`;
  try {
    const child = spawn(
      binary("deno"),
      ["eval", "--no-config", `--allow-import=127.0.0.1:${port}`, program],
      { cwd: "/", stdio: ["ignore", "pipe", "pipe"] },
    );
    let output = "";
    child.stdout.on("data", (chunk) => output += chunk);
    child.stderr.on("data", (chunk) => output += chunk);
    const untrack = track(() => child.kill("SIGKILL"));
    const code = await new Promise((resolve) => child.on("exit", resolve));
    untrack();
    assert.equal(code, 0, output);
    assert.match(output, /^id: \d+-\d+\ndata: by url\n/m);
  } finally {
    files.close();
  }
});
