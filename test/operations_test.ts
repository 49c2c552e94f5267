// Running server.ts in production: metrics checked by Prometheus's own
// promtool, readiness through a Redis outage and a drain, load shedding that
// npm `eventsource` clients survive, a drain behind a load balancer, start
// errors, JSON logs, and no secret in any output.
import { describe, test, track } from "./harness.ts";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { createServer, type Server, Socket } from "node:net";
import type { AddressInfo } from "node:net";
import process from "node:process";
import {
  binary,
  eventually,
  ROOT,
  RUNTIME,
  scriptArgs,
  type ServerProcess,
  startServer,
  stats,
  subscribe,
  withServer,
} from "./helpers.ts";
import { freePort, RedisServer } from "./redis_server.mjs";

/** A redis-server stopped if the test fails. */
function startRedis(): Promise<RedisServer> {
  return RedisServer.start({
    onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
  });
}

/** The samples of a Prometheus text page, by name and labels: `sse_rejected_total{reason="auth"}`. */
function samples(text: string): Map<string, number> {
  const values = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const [name, value] = line.split(" ");
    values.set(name, Number(value));
  }
  return values;
}

/** Runs `promtool check metrics` (Debian's prometheus package) on `text`. */
function promtool(text: string): Promise<{ code: number | null; output: string }> {
  const child = spawn("promtool", ["check", "metrics"], { stdio: ["pipe", "pipe", "pipe"] });
  const untrack = track(() => child.kill("SIGKILL"));
  let output = "";
  child.stdout.on("data", (chunk) => output += chunk);
  child.stderr.on("data", (chunk) => output += chunk);
  child.stdin.end(text);
  return new Promise((resolve) =>
    child.on("exit", (code) => {
      untrack();
      resolve({ code, output });
    })
  );
}

/** What one client of `test/eventsource_clients.ts` reported. */
type ClientReport = [
  client: number,
  what: "open" | "message" | "tick" | "closed",
  id: string | null,
  at: number,
];

/**
 * Starts `count` npm `eventsource` clients of `url` in a process of their own
 * (Bun's test runner allows one process 256 requests at once), under the
 * runtime that runs the tests. `reports` fills as they report.
 */
function startClients(url: string, count: number, mode = "") {
  const args = scriptArgs(RUNTIME, "test/eventsource_clients.ts", [
    "--allow-net",
    "--allow-env",
    "--allow-read",
  ]);
  const child = spawn(binary(RUNTIME), [
    ...args,
    url,
    String(count),
    mode,
  ], {
    cwd: ROOT,
    env: { ...process.env, BUN_CONFIG_MAX_HTTP_REQUESTS: "2048" },
    stdio: ["pipe", "pipe", "inherit"],
  });
  const untrack = track(() => child.kill("SIGKILL"));
  const exited = new Promise((resolve) => child.on("exit", resolve));
  const reports: ClientReport[] = [];
  let pending = "";
  child.stdout!.on("data", (chunk) => {
    const lines = (pending + chunk).split("\n");
    pending = lines.pop()!;
    for (const line of lines) reports.push(JSON.parse(line));
  });
  return {
    reports,
    /** Closes every client and waits for the process to exit. */
    async stop(): Promise<void> {
      child.stdin!.end();
      await exited;
      untrack();
    },
  };
}

const post = (base: string, body: string, headers: Record<string, string> = {}) =>
  fetch(new URL("/publish", base), { method: "POST", body, headers });

describe(`operations of server.ts under ${RUNTIME}`, () => {
  test("/metrics passes promtool and counts a known workload; METRICS_TOKEN guards it", async () => {
    const env = { PUBLISH_TOKEN: "publish-secret-1", METRICS_TOKEN: "metrics-secret-1" };
    await withServer(env, async (server) => {
      const readers = [
        await subscribe(`${server.url}events`),
        await subscribe(`${server.url}events`),
      ];
      const auth = { authorization: "Bearer publish-secret-1" };
      for (const data of ["a", "b", "c"]) {
        assert.equal((await post(server.url, data, auth)).status, 200);
      }
      assert.equal((await post(server.url, "no token")).status, 401);
      const json = { ...auth, "content-type": "application/json" };
      assert.equal((await post(server.url, "{", json)).status, 400);
      assert.equal((await fetch(`${server.url}events?topic=`)).status, 400);
      for (const reader of readers) await reader.events(3);

      const refused = await fetch(`${server.url}metrics`);
      assert.equal(refused.status, 401);
      await refused.body?.cancel();
      const response = await fetch(`${server.url}metrics`, {
        headers: { authorization: "Bearer metrics-secret-1" },
      });
      assert.equal(response.status, 200);
      assert.equal(
        response.headers.get("content-type"),
        "text/plain; version=0.0.4; charset=utf-8",
      );
      const text = await response.text();
      assert.deepEqual(await promtool(text), { code: 0, output: "" });
      const values = samples(text);
      const expected: Record<string, number> = {
        sse_clients: 2,
        sse_event_log_up: 1,
        sse_connections_total: 2,
        sse_published_total: 3,
        sse_delivered_total: 6,
        sse_replayed_total: 0,
        sse_slow_disconnects_total: 0,
        'sse_rejected_total{reason="auth"}': 1,
        'sse_rejected_total{reason="validation"}': 2,
        'sse_rejected_total{reason="limits"}': 0,
        'sse_rejected_total{reason="draining"}': 0,
        'sse_publish_seconds_bucket{le="+Inf"}': 3,
        sse_publish_seconds_count: 3,
      };
      for (const [name, value] of Object.entries(expected)) {
        assert.equal(values.get(name), value, name);
      }
      assert.ok(values.get("sse_publish_seconds_sum")! > 0);
      const rss = values.get("process_resident_memory_bytes")!;
      assert.ok(rss > 10_000_000 && rss === Math.round(rss), `resident memory ${rss}`);
      await Promise.all(readers.map((reader) => reader.cancel()));
    });
  });

  test(
    "/ready answers 503 with the reason while Redis is down, 200 again after; /health stays 200",
    {
      timeout: 30_000,
    },
    async () => {
      const redis = await startRedis();
      try {
        await withServer({ REDIS_URL: redis.url }, async (server) => {
          const ready = async () => {
            const response = await fetch(`${server.url}ready`);
            return { status: response.status, body: await response.json() };
          };
          assert.deepEqual(await ready(), {
            status: 200,
            body: { ready: true, eventLogUp: true, reason: null },
          });
          await redis.kill();
          let down: { status: number; body: { reason: string } } | undefined;
          await eventually(async () => (down = await ready()).status === 503, 5000, "/ready 503");
          // The log's own error stays in the log: it may name hosts or users.
          assert.equal(down!.body.reason, "the event log did not answer");
          const health = await fetch(`${server.url}health`);
          assert.deepEqual([health.status, await health.json()], [200, { status: "alive" }]);
          const metrics = await (await fetch(`${server.url}metrics`)).text();
          assert.equal(samples(metrics).get("sse_event_log_up"), 0);
          await redis.start();
          await eventually(async () => (await ready()).status === 200, 10_000, "/ready 200 again");
        });
      } finally {
        await redis.stop();
      }
    },
  );

  test(
    "SIGTERM with DRAIN_MS: /ready 503 at once, newcomers sent away, streams end spread out, exit 0",
    {
      timeout: 20_000,
    },
    async () => {
      const server = await startServer({ DRAIN_MS: "1500", SHED_RETRY_MS: "4000-4000" });
      const readers = await Promise.all(
        Array.from({ length: 10 }, () => subscribe(`${server.url}events`)),
      );
      const signalled = performance.now();
      server.signal("SIGTERM");
      const ends = readers.map(async (reader) => {
        while ((await reader.next()) !== null); // ends cleanly
        return { at: performance.now() - signalled, retry: reader.parser.retry };
      });
      for (const end of ends) end.catch(() => {}); // awaited below; not unhandled if this fails first
      // The signal arrives a moment later: not ready from then on.
      let ready = await fetch(`${server.url}ready`);
      while (ready.status === 200 && performance.now() - signalled < 1000) {
        await ready.body?.cancel();
        ready = await fetch(`${server.url}ready`);
      }
      assert.deepEqual([ready.status, await ready.json()], [503, {
        ready: false,
        eventLogUp: true,
        reason: "draining",
      }]);
      assert.equal(ready.headers.get("connection"), "close");
      const late = await fetch(`${server.url}events`);
      assert.equal(late.status, 200);
      assert.equal(late.headers.get("retry-after"), "4");
      assert.equal(await late.text(), ": the server is stopping\nretry: 4000\n\n");
      const results = await Promise.all(ends);
      for (const { retry } of results) assert.equal(retry, 4000);
      const times = results.map(({ at }) => at).sort((a, b) => a - b);
      assert.ok(times[0] < 500, `the first stream ends early (${times[0]} ms)`);
      assert.ok(times[9] > 1200, `the last ends near DRAIN_MS (${times[9]} ms)`);
      assert.equal(await server.exited, 0);
      assert.match(server.output(), /SIGTERM: draining 10 streams over 1500 ms\n/);
    },
  );

  test("/probe needs what subscribing needs; one MAX_CLIENTS budget holds every open response", async () => {
    const env = { SUBSCRIBE_TOKEN: "probe-secret", HEARTBEAT_MS: "3000", MAX_CLIENTS: "3" };
    await withServer(env, async (server) => {
      const token = "token=probe-secret";
      const probe = () => fetch(`${server.url}probe?${token}`);
      const refused = await fetch(`${server.url}probe`);
      assert.deepEqual([refused.status, await refused.json()], [401, {
        error: "a valid token is required",
      }]);
      // A stream of the broker, a stream's SSE read and a path check fill the three places.
      const created = await fetch(`${server.url}v1/stream/budget`, { method: "PUT" });
      assert.equal(created.status, 201);
      const events = await subscribe(`${server.url}events?${token}`);
      const sse = await fetch(`${server.url}v1/stream/budget?offset=-1&live=sse&${token}`);
      assert.equal(sse.status, 200);
      const held = await probe();
      assert.equal(held.status, 200);
      await eventually(async () => (await stats(server.url)).reserved === 2, 5000, "2 reserved");
      // One path check per client address at a time.
      const second = await probe();
      assert.equal(second.status, 429);
      assert.equal(second.headers.get("retry-after"), "5");
      assert.deepEqual(await second.json(), {
        error: "a path check is under way: try again shortly",
      });
      // Past the budget: a long-poll and an SSE read get 503, a subscriber is sent away.
      for (
        const url of [
          `${server.url}v1/stream/budget?offset=now&live=long-poll&${token}`,
          `${server.url}v1/stream/budget?offset=-1&live=sse&${token}`,
        ]
      ) {
        const response = await fetch(url);
        assert.equal(response.status, 503, url);
        assert.equal(response.headers.get("retry-after"), "5");
        assert.deepEqual(await response.json(), { error: "too many open streams: try again" });
      }
      const away = await fetch(`${server.url}events?${token}`);
      assert.equal(away.status, 200);
      assert.match(await away.text(), /^: too many clients\nretry: \d+\n\n$/);
      // A catch-up read holds nothing open, and is served.
      assert.equal((await fetch(`${server.url}v1/stream/budget?offset=-1&${token}`)).status, 200);
      // One leaves: its place is free again, for any kind of response.
      await held.body!.cancel();
      await eventually(
        async () => {
          const again = await probe();
          await again.body?.cancel();
          return again.status === 200;
        },
        5000,
        "a free place",
      );
      await sse.body!.cancel();
      await events.cancel();
      await eventually(async () => (await stats(server.url)).reserved === 0, 5000, "none held");
    });
  });

  test("300 EventSource clients against MAX_CLIENTS=100: none gives up, all get in", {
    timeout: 60_000,
  }, async () => {
    // Each client leaves at its first tick: a tick a second keeps the first
    // arrivals long enough that the 300, however slowly they connect, pass 100.
    const env = { MAX_CLIENTS: "100", SHED_RETRY_MS: "200-1500", TICK_MS: "1000" };
    await withServer(env, async (server) => {
      const clients = startClients(`${server.url}events`, 300, "leave-on-tick");
      try {
        const count = (what: string) =>
          clients.reports.filter((report) => report[1] === what).length;
        await eventually(
          () => count("tick") === 300 || count("closed") > 0,
          50_000,
          "every client admitted",
        );
        assert.equal(count("closed"), 0, "no client gave up");
        assert.equal(
          new Set(clients.reports.filter((r) => r[1] === "tick").map((r) => r[0])).size,
          300,
        );
        const counted = await stats(server.url);
        assert.equal(counted.connections, 300);
        // How often depends on how fast clients arrive and leave: at least once.
        assert.ok(counted.rejected.limits > 0, `sent away ${counted.rejected.limits} times`);
      } finally {
        await clients.stop();
      }
    });
  });
});

/**
 * A TCP load balancer in front of several servers: each new connection goes
 * to the next server whose `/ready` answered 200 at the last check (every
 * 100 ms), as a cloud load balancer's health checks do.
 */
class LoadBalancer {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #ready = new Map<number, boolean>();
  readonly #checks: ReturnType<typeof setInterval>;
  #next = 0;

  constructor(ports: number[]) {
    for (const port of ports) this.#ready.set(port, true);
    this.#checks = setInterval(() => {
      for (const port of ports) {
        fetch(`http://127.0.0.1:${port}/ready`).then(
          async (response) => {
            await response.body?.cancel();
            this.#ready.set(port, response.status === 200);
          },
          () => this.#ready.set(port, false),
        );
      }
    }, 100);
    this.#server = createServer((client) => {
      const ready = ports.filter((port) => this.#ready.get(port));
      if (ready.length === 0) return client.destroy();
      const upstream = new Socket();
      upstream.connect(ready[this.#next++ % ready.length], "127.0.0.1");
      for (const socket of [client, upstream]) {
        this.#sockets.add(socket);
        socket.on("close", () => this.#sockets.delete(socket));
        socket.on("error", () => {});
      }
      client.pipe(upstream).pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
  }

  listen(): Promise<string> {
    return new Promise((resolve) =>
      this.#server.listen(0, "127.0.0.1", () => {
        resolve(`http://127.0.0.1:${(this.#server.address() as AddressInfo).port}/`);
      })
    );
  }

  close(): Promise<void> {
    clearInterval(this.#checks);
    for (const socket of this.#sockets) socket.destroy();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

describe(`a drain behind a load balancer, two server.ts processes on Redis under ${RUNTIME}`, () => {
  test(
    "300 clients: every client of the drained process moves, spread over DRAIN_MS, and none misses an event",
    {
      timeout: 60_000,
    },
    async () => {
      const DRAIN_MS = 3000;
      const redis = await startRedis();
      const env = { REDIS_URL: redis.url, DRAIN_MS: String(DRAIN_MS), SHED_RETRY_MS: "200-1000" };
      let draining: ServerProcess | undefined;
      let staying: ServerProcess | undefined;
      let balancer: LoadBalancer | undefined;
      let clients: ReturnType<typeof startClients> | undefined;
      try {
        [draining, staying] = await Promise.all([startServer(env), startServer(env)]);
        const ports = [draining, staying].map((server) => Number(new URL(server.url).port));
        balancer = new LoadBalancer(ports);
        // Clients join after an event, so each has an id to resume from.
        const first = await post(staying.url, "before the clients");
        const published: string[] = [(await first.json()).id];
        clients = startClients(`${await balancer.listen()}events`, 300);
        const connected = async () =>
          (await stats(draining!.url)).clients + (await stats(staying!.url)).clients;
        await eventually(async () => await connected() === 300, 20_000, "300 clients connected");
        const opened = () =>
          new Set(clients!.reports.filter(([, what]) => what === "open").map(([i]) => i));
        await eventually(() => opened().size === 300, 10_000, "300 clients told of their stream");
        const moving = (await stats(draining.url)).clients;
        assert.ok(moving >= 100, `the balancer gave the first process ${moving} clients`);

        // Publish through the staying process while the other drains, and after.
        const signalled = Date.now();
        draining.signal("SIGTERM");
        let exited = false;
        draining.exited.then(() => exited = true);
        while (!exited || (await stats(staying.url)).clients < 300) {
          const response = await post(staying.url, `event ${published.length}`);
          published.push((await response.json()).id);
          assert.ok(published.length < 400, "every client reaches the staying process");
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        assert.equal(await draining.exited, 0);
        published.push((await (await post(staying.url, "the last")).json()).id);
        const received = (client: number) =>
          clients!.reports.filter(([i, what]) => i === client && what === "message").map((
            [, , id],
          ) => id);
        await eventually(
          () =>
            Array.from({ length: 300 }, (_, i) => received(i).at(-1)).every((id) =>
              id === published.at(-1)
            ),
          10_000,
          "every client has the last event",
        );
        // Each client got every event once, in order, wherever it was connected.
        for (let i = 0; i < 300; i++) {
          assert.deepEqual(received(i), published.slice(1), `client ${i}`);
        }
        assert.equal(clients.reports.filter(([, what]) => what === "closed").length, 0);
        // The moved clients reconnected spread over the drain, not all at once.
        const reconnects = clients.reports.filter(([, what, , at]) =>
          what === "open" && at > signalled
        )
          .map(([, , , at]) => at - signalled).sort((a, b) => a - b);
        assert.ok(
          reconnects.length >= moving,
          `${reconnects.length} reconnects for ${moving} moved`,
        );
        const p10 = reconnects[Math.floor(reconnects.length * 0.1)];
        const p90 = reconnects[Math.floor(reconnects.length * 0.9)];
        assert.ok(p90 - p10 >= DRAIN_MS / 2, `reconnects from ${p10} to ${p90} ms`);
        const busiest = Math.max(
          ...reconnects.map((at) => reconnects.filter((t) => t >= at && t < at + 250).length),
        );
        assert.ok(
          busiest <= reconnects.length / 4,
          `${busiest} of ${reconnects.length} reconnects within 250 ms`,
        );
      } finally {
        await clients?.stop();
        await balancer?.close();
        if (draining) await draining.stop();
        if (staying) assert.equal(await staying.stop(), 0);
        await redis.stop();
      }
    },
  );
});

describe(`start errors and logs of server.ts under ${RUNTIME}`, () => {
  /** Runs server.ts until it exits by itself, and returns its exit code and output. */
  function run(env: Record<string, string>, prefix: string[] = []) {
    const args = scriptArgs(RUNTIME, "server.ts", ["--allow-net", "--allow-env"]);
    const command = [...prefix, binary(RUNTIME), ...args];
    const child = spawn(command[0], command.slice(1), {
      cwd: ROOT,
      env: { ...process.env, TICK_MS: "0", HOSTNAME: "127.0.0.1", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const untrack = track(() => child.kill("SIGKILL"));
    let output = "";
    child.stdout!.on("data", (chunk) => output += chunk);
    child.stderr!.on("data", (chunk) => output += chunk);
    return new Promise<{ code: number | null; output: string }>((resolve) =>
      child.on("exit", (code) => {
        untrack();
        resolve({ code, output });
      })
    );
  }

  test("port in use, address not available, permission denied: one line and exit 1", async () => {
    await withServer({}, async (server) => {
      const port = new URL(server.url).port;
      assert.deepEqual(await run({ PORT: port }), {
        code: 1,
        output: `error: cannot listen on 127.0.0.1:${port}: the address is already in use\n`,
      });
    });
    // 192.0.2.1 is reserved for documentation: no machine has it.
    assert.deepEqual(await run({ PORT: "8000", HOSTNAME: "192.0.2.1" }), {
      code: 1,
      output:
        "error: cannot listen on 192.0.2.1:8000: the address is not available on this machine\n",
    });
    // Ports below 1024 need privileges: run as nobody when the tests run as root.
    const asNobody = process.getuid?.() === 0
      ? ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
      : [];
    assert.deepEqual(await run({ PORT: "1", DENO_DIR: "/tmp/deno-nobody" }, asNobody), {
      code: 1,
      output: "error: cannot listen on 127.0.0.1:1: permission denied\n",
    });
  });

  test("LOG_FORMAT=json: every line is one JSON object, and no secret reaches any output", async () => {
    const secrets = {
      PUBLISH_TOKEN: "publish-secret-9f2",
      SUBSCRIBE_TOKEN: "subscribe-secret-7c1",
      METRICS_TOKEN: "metrics-secret-3b8",
    };
    const server = await startServer({ ...secrets, LOG_FORMAT: "json", DRAIN_MS: "200" });
    try {
      const reader = await subscribe(`${server.url}events?token=${secrets.SUBSCRIBE_TOKEN}`);
      const auth = { authorization: `Bearer ${secrets.PUBLISH_TOKEN}` };
      assert.equal((await post(server.url, "hi", auth)).status, 200);
      await reader.event();
      for (const token of ["wrong-token", secrets.SUBSCRIBE_TOKEN]) {
        const response = await post(server.url, "x", { authorization: `Bearer ${token}` });
        assert.equal(response.status, 401);
        await response.body?.cancel();
      }
      const metrics = await fetch(`${server.url}metrics?token=${secrets.METRICS_TOKEN}`);
      assert.equal(metrics.status, 401, "the metrics token goes in a header, not the URL");
      await metrics.body?.cancel();
      server.signal("SIGTERM");
      while ((await reader.next()) !== null);
      assert.equal(await server.exited, 0);
    } finally {
      await server.stop();
    }
    const lines = server.output().trimEnd().split("\n");
    assert.ok(lines.length >= 3, server.output());
    for (const line of lines) {
      const entry = JSON.parse(line);
      assert.deepEqual(Object.keys(entry).slice(0, 3), ["time", "level", "message"], line);
      assert.ok(!Number.isNaN(Date.parse(entry.time)), line);
    }
    assert.deepEqual(JSON.parse(lines[0]).url, server.url);
    assert.match(lines.at(-1)!, /"message":"SIGTERM: closing 0 streams"/);
    for (const secret of Object.values(secrets)) {
      assert.ok(!server.output().includes(secret), secret);
    }

    // A start error in JSON, and a Redis password that never reaches the output.
    const port = await freePort();
    const failed = await run({
      LOG_FORMAT: "json",
      REDIS_URL: `redis://user:redis-secret-5d4@127.0.0.1:${port}`,
    });
    assert.equal(failed.code, 1);
    const entry = JSON.parse(failed.output);
    assert.equal(entry.level, "error");
    assert.match(entry.message, /^cannot reach Redis at redis:\/\/user:\*\*\*@127\.0\.0\.1:\d+: /);
    assert.ok(!failed.output.includes("redis-secret-5d4"));
    const invalid = await run({
      LOG_FORMAT: "json",
      REDIS_URL: "redis://:redis-secret-6e1@host:99999",
    });
    assert.equal(invalid.code, 1);
    assert.match(
      JSON.parse(invalid.output).message,
      /^cannot reach Redis at redis:\/\/:\*\*\*@host:99999: /,
    );
    assert.ok(!invalid.output.includes("redis-secret-6e1"), invalid.output);
    const bad = await run({ LOG_FORMAT: "yaml" });
    assert.deepEqual(bad, {
      code: 1,
      output: 'error: LOG_FORMAT must be "text" or "json", got "yaml"\n',
    });
  });
});
