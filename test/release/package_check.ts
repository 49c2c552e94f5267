// The release as a new user gets it, once per `npm test` (node --test):
// the npm tarball (`npm run pack`) installed into a fresh project and used
// from Node 20, Node 26, Bun and Deno (through `npm:` specifiers), each
// importing every entry point, running a broker, subscribing and
// publishing; publint and arethetypeswrong on the tarball; `npx` of the
// tarball serving, and ending with its launcher; the single executable
// (`npm run compile`) serving with no runtime on PATH. Not named *_test.ts:
// the three runtimes' runs would each repeat it.
import { after, before, describe, test } from "../harness.ts";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import process from "node:process";
import { promisify } from "node:util";
import { publish, ROOT, startProcess, subscribe } from "../helpers.ts";

const run = promisify(execFile);
const BIN = `${ROOT}node_modules/.bin`;
const PACKAGE = "@sse-broker/broker";

/** Runs a command to its end (bounded), failing with its output when it fails. */
async function sh(
  command: string,
  args: string[],
  options: { cwd?: string; env?: Record<string, string | undefined> } = {},
): Promise<string> {
  try {
    const { stdout } = await run(command, args, {
      cwd: options.cwd ?? ROOT,
      env: options.env ?? process.env,
      timeout: 120_000,
      maxBuffer: 16 * 1024 * 1024,
    });
    return stdout;
  } catch (error) {
    const { stdout, stderr } = error as { stdout?: string; stderr?: string };
    throw new Error(`${command} ${args.join(" ")} failed:\n${stdout ?? ""}${stderr ?? ""}`);
  }
}

/** What each runtime runs in the fresh project: every entry point, a broker, a stream. */
function smoke(specifier: (path: string) => string): string {
  return `
import { Broker, createHandler } from "${specifier("")}";
import { createStreamsHandler } from "${specifier("/streams")}";
import { Subscriptions } from "${specifier("/subscriptions")}";
import { connect } from "${specifier("/client")}";
import { RedisLog, RedisStreamStore } from "${specifier("/redis")}";

const broker = new Broker();
const handle = createHandler(broker);
const events = await handle(new Request("http://localhost/events"));
const reader = events.body.getReader();
const published = await handle(
  new Request("http://localhost/publish", { method: "POST", body: "hello" }),
);
const { id } = await published.json();
let received = "";
while (!received.includes("data: hello")) {
  received += new TextDecoder().decode((await reader.read()).value);
}
await reader.cancel();
await broker.close();

const subscriptions = new Subscriptions();
const streams = createStreamsHandler({ subscriptions });
const type = { "content-type": "text/plain" };
await streams(new Request("http://localhost/a", { method: "PUT", headers: type }));
await streams(new Request("http://localhost/a", { method: "POST", headers: type, body: "hi" }));
const read = await (await streams(new Request("http://localhost/a"))).text();
const jwks = await (await streams(new Request("http://localhost/__ds/jwks.json"))).json();
subscriptions.close();

console.log(JSON.stringify({
  id,
  delivered: received.includes("id: " + id + "\\ndata: hello\\n\\n"),
  read,
  redis: typeof RedisLog === "function" && typeof RedisStreamStore === "function",
  signingKeys: jwks.keys.length,
  client: typeof connect === "function",
  server: import.meta.resolve("${specifier("/server")}").endsWith("/server.js"),
}));
`;
}

/** A Node 20: the system's when it is one, else from npm. */
async function node20(): Promise<string[]> {
  for (const candidate of ["/usr/bin/node", "/usr/local/bin/node"]) {
    if (!existsSync(candidate)) continue;
    if ((await sh(candidate, ["--version"])).startsWith("v20.")) return [candidate];
  }
  return ["npx", "-y", "node@20"];
}

/** Pids of the processes whose environment holds `mark`. */
function marked(mark: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const environ = readFileSync(`/proc/${entry}/environ`, "utf8");
      if (environ.split("\0").includes(mark)) pids.push(Number(entry));
    } catch { /* gone meanwhile, or not ours to read */ }
  }
  return pids;
}

describe("the npm package, installed fresh", () => {
  let tarball = "";
  let project = "";

  before(async () => {
    tarball = (await sh(process.execPath, ["tools/pack.mjs"])).trim().split("\n").at(-1)!;
    project = mkdtempSync(`${tmpdir()}/sse-broker-release-`);
    writeFileSync(
      `${project}/package.json`,
      JSON.stringify({ name: "fresh", private: true, type: "module" }),
    );
    const redis = JSON.parse(readFileSync(`${ROOT}package.json`, "utf8")).dependencies.redis;
    await sh("npm", [
      "install",
      "--no-audit",
      "--no-fund",
      "--prefer-offline",
      tarball,
      `redis@${redis}`,
    ], { cwd: project });
    writeFileSync(`${project}/smoke.mjs`, smoke((path) => PACKAGE + path));
    writeFileSync(`${project}/smoke_deno.mjs`, smoke((path) => `npm:${PACKAGE}${path}`));
  }, { timeout: 240_000 });

  after(() => {
    if (project) rmSync(project, { recursive: true, force: true });
  });

  const expectWorks = (stdout: string) => {
    const result = JSON.parse(stdout.trim().split("\n").at(-1)!);
    assert.match(result.id, /^\d+-\d+$/);
    assert.deepEqual(
      { ...result, id: "" },
      {
        id: "",
        delivered: true,
        read: "hi",
        redis: true,
        signingKeys: 1,
        client: true,
        server: true,
      },
    );
  };

  test("the manifest: ES modules with types for each entry point, redis an optional peer, the command", () => {
    const manifest = JSON.parse(
      readFileSync(`${project}/node_modules/${PACKAGE}/package.json`, "utf8"),
    );
    const config = JSON.parse(readFileSync(`${ROOT}deno.json`, "utf8"));
    assert.equal(manifest.version, config.version);
    assert.equal(manifest.license, "MIT");
    assert.equal(manifest.type, "module");
    assert.equal(manifest.description, config.description);
    assert.ok(config.description.length <= 250, "JSR takes a description of 250 characters");
    assert.deepEqual(Object.keys(manifest.exports), [
      ".",
      "./streams",
      "./subscriptions",
      "./client",
      "./redis",
      "./server",
    ]);
    for (const entry of Object.values(manifest.exports) as { types: string; default: string }[]) {
      assert.ok(existsSync(`${project}/node_modules/${PACKAGE}/${entry.types}`), entry.types);
      assert.ok(existsSync(`${project}/node_modules/${PACKAGE}/${entry.default}`), entry.default);
    }
    assert.deepEqual(manifest.bin, { "sse-broker": "./server.js" });
    assert.deepEqual(manifest.peerDependenciesMeta, { redis: { optional: true } });
    assert.equal(manifest.dependencies, undefined, "nothing else is installed with it");
    assert.ok(existsSync(`${project}/node_modules/${PACKAGE}/LICENSE`));
  });

  test("publint and arethetypeswrong (ESM only) find nothing", { timeout: 120_000 }, async () => {
    const lint = await sh(`${BIN}/publint`, ["run", "--strict", tarball]);
    assert.doesNotMatch(lint, /warning|error|suggestion/i, lint);
    // attw exits 1 on a problem; ESM-only ignores the CommonJS resolutions.
    const types = await sh(`${BIN}/attw`, [tarball, "--profile", "esm-only", "--format", "ascii"]);
    const resolutions = types.match(/^(node16 \(from ESM\)|bundler): .*$/gm) ?? [];
    assert.equal(resolutions.length, 12, types); // two for each of the six entry points
    for (const line of resolutions) assert.match(line, /: 🟢/, types);
  });

  test("Node 20 imports every entry point, runs a broker and a stream", async () => {
    const [command, ...args] = await node20();
    expectWorks(await sh(command, [...args, "smoke.mjs"], { cwd: project }));
  });

  test("Node 26 does too", async () => {
    expectWorks(await sh(`${BIN}/node`, ["smoke.mjs"], { cwd: project }));
  });

  test("Bun does too", async () => {
    expectWorks(await sh(`${BIN}/bun`, ["smoke.mjs"], { cwd: project }));
  });

  test("Deno does too, through npm: specifiers", async () => {
    expectWorks(
      await sh(`${BIN}/deno`, ["run", "--allow-all", "smoke_deno.mjs"], { cwd: project }),
    );
  });

  test("npx of the tarball serves the broker, and stops when its launcher is stopped", {
    timeout: 120_000,
  }, async () => {
    const mark = `SSE_RELEASE_CHECK=${process.pid}-${Date.now()}`;
    const [name, value] = mark.split("=");
    const server = await startProcess("npx", [
      "--yes",
      "--prefer-offline",
      `--package=${tarball}`,
      "sse-broker",
    ], {
      ...process.env,
      [name]: value,
      PORT: "0",
      HOSTNAME: "127.0.0.1",
      TICK_MS: "0",
    }, project);
    try {
      const events = await subscribe(`${server.url}events`);
      const id = await publish(server.url, { data: "from npx" });
      const event = await events.event();
      assert.deepEqual([event.lastEventId, event.data], [id, "from npx"]);
      await events.cancel();
      assert.ok(marked(mark).length >= 2, "npx and the server it started");
    } finally {
      // The launcher alone, as a supervisor that knows only its pid would:
      // npm passes the signal to the shell it started, not to the server.
      server.signal("SIGTERM");
    }
    await server.exited;
    const deadline = Date.now() + 10_000;
    while (marked(mark).length > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const left = marked(mark);
    for (const pid of left) process.kill(pid, "SIGKILL");
    assert.deepEqual(left, [], "the server ended with its launcher");
  });
});

describe("the single executable", () => {
  const executable = `${ROOT}dist/sse-broker`;

  before(async () => {
    await sh("npm", ["run", "--silent", "compile"]);
  }, { timeout: 120_000 });

  test("serves /events and /publish with no runtime on PATH, reads the variables, exits 0 on SIGTERM", async () => {
    const server = await startProcess(executable, [], {
      PATH: "/nonexistent",
      PORT: "0",
      HOSTNAME: "127.0.0.1",
      TICK_MS: "0",
      PUBLISH_TOKEN: "release-token",
    }, tmpdir());
    try {
      const events = await subscribe(`${server.url}events`);
      const refused = await fetch(`${server.url}publish`, { method: "POST", body: "x" });
      assert.equal(refused.status, 401);
      await refused.body?.cancel();
      const accepted = await fetch(`${server.url}publish`, {
        method: "POST",
        headers: { authorization: "Bearer release-token" },
        body: "from the executable",
      });
      const { id } = await accepted.json();
      const event = await events.event();
      assert.deepEqual([event.lastEventId, event.data], [id, "from the executable"]);
      await events.cancel();
    } finally {
      server.signal("SIGTERM");
    }
    assert.equal(await server.exited, 0);
  });
});

describe("by URL, on Deno", () => {
  test("mod.ts imports from a host with --allow-import, as TypeScript or as text/plain", async () => {
    const server = createServer((request, response) => {
      const [, kind, file] = /^\/(ts|plain)\/(\w+\.ts)$/.exec(request.url ?? "") ?? [];
      if (!file) return response.writeHead(404).end();
      const type = kind === "ts" ? "application/typescript" : "text/plain";
      response.writeHead(200, { "content-type": type }).end(readFileSync(`${ROOT}${file}`));
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
    const cache = mkdtempSync(`${tmpdir()}/sse-broker-deno-dir-`);
    const script = (kind: string) => {
      const file = `${cache}/${kind}.ts`;
      writeFileSync(
        file,
        `import { Broker } from "http://${host}/${kind}/mod.ts";\n` +
          "const broker = new Broker();\nconsole.log(typeof broker.publish);\nawait broker.close();\n",
      );
      return file;
    };
    const deno = (args: string[]) =>
      sh(`${BIN}/deno`, ["run", ...args], { env: { ...process.env, DENO_DIR: cache } });
    try {
      assert.equal((await deno([`--allow-import=${host}`, script("ts")])).trim(), "function");
      await assert.rejects(deno([script("ts")]), /--allow-import/);
      assert.equal((await deno([`--allow-import=${host}`, script("plain")])).trim(), "function");
    } finally {
      server.close();
      rmSync(cache, { recursive: true, force: true });
    }
  });
});
