/**
 * The deployable broker of `server.ts` as a function of its settings:
 * {@linkcode startApp} reads the environment, listens, and returns the
 * running server; `server.ts` is the process around it (signals, the exit
 * status, the URL printed first). Tests start it in process.
 *
 * It serves a broker (mod.ts) with a ticker that publishes the time, the
 * broker's HTTP routes, `/health`, `/ready`, `/metrics`, the path check
 * `/probe`, the live page at `/`, `/session` with signed tokens, and Durable
 * Streams (streams.ts) under `STREAMS_PATH`. With `REDIS_URL` set, events
 * and streams live in Redis, shared by every process started with the same
 * URL (see redis.ts), and the ticker ticks once per interval for all of them.
 *
 * @module
 */
import {
  access,
  type Authorize,
  bearerToken,
  Broker,
  createHandler,
  HttpError,
  jwtAuth,
  MemoryLog,
  METRICS_CONTENT_TYPE,
  metricsText,
  tokenAuth,
} from "./mod.ts";
import { renderPage } from "./page.ts";
import { CLIENT_MODULE } from "./client_bundle.ts";
import { createStreamsHandler, type StreamsHandler } from "./streams.ts";
import { Subscriptions } from "./subscriptions.ts";
import { probeResponse } from "./probe.ts";
import {
  type Handler,
  integerSetting,
  type Listener,
  ListenError,
  log,
  type Runtime,
  SettingError,
  unknownSettings,
} from "./runtime.ts";

/** Every variable this server reads (docs/configuration.md): the others are checked for slips. */
const SETTINGS = new Set([
  "ALLOW_ANONYMOUS",
  "BODY_TIMEOUT_MS",
  "CORS_ORIGIN",
  "DRAIN_MS",
  "HEARTBEAT_MS",
  "HISTORY",
  "HISTORY_BYTES",
  "HISTORY_TTL_MS",
  "HOSTNAME",
  "IDEMPOTENCY_WINDOW_MS",
  "JWT_AUDIENCE",
  "JWT_CLAIM",
  "JWT_COOKIE",
  "JWT_ISSUER",
  "JWT_PUBLIC_KEY",
  "JWT_SECRET",
  "LOG_FORMAT",
  "MAX_BATCH",
  "MAX_BODY",
  "MAX_CLIENTS",
  "MAX_QUEUE_BYTES",
  "MAX_TOPICS",
  "METRICS_TOKEN",
  "PORT",
  "PUBLIC_URL",
  "PUBLISH_TOKEN",
  "REDIS_TIMEOUT_MS",
  "REDIS_URL",
  "RETRY_MS",
  "REUSE_PORT",
  "SHED_RETRY_MS",
  "STREAMS_ALLOW_PRIVATE_WEBHOOKS",
  "STREAMS_LONG_POLL_MS",
  "STREAMS_MAX_BYTES",
  "STREAMS_PATH",
  "STRICT_ENV",
  "SUBSCRIBE_TOKEN",
  "TICK_MS",
]);

/** The running server. */
export interface App {
  /** Where it listens, such as `http://127.0.0.1:8000/`. */
  readonly url: string;
  /**
   * Stops for `signal`: every stream ends, the ticker stops, connections
   * close (within 2 s: a client that stopped reading is not waited for).
   * `SIGTERM` with `DRAIN_MS` drains the streams first (see
   * `Broker.drain`), and a second signal meanwhile closes at once.
   *
   * @returns `true` once this call closed everything, `false` when another call closes.
   */
  stop(signal: "SIGINT" | "SIGTERM"): Promise<boolean>;
}

/** Stops at start with a one-line reason. */
function fail(reason: string): never {
  throw new SettingError(reason);
}

/**
 * Starts the server that `system`'s environment configures (see
 * docs/configuration.md). Every setting is checked before anything opens.
 *
 * @param system The runtime: its environment, and its way to listen.
 * @returns The running server.
 * @throws {SettingError} For a setting it cannot use, with the reason in one line.
 */
export async function startApp(system: Runtime): Promise<App> {
  // The runtime, reading only the variables of SETTINGS.
  const runtime = {
    ...system,
    env(name: string): string | undefined {
      // Stryker disable next-line all: a guard for this file's own code, which reads only listed ones
      if (!SETTINGS.has(name)) throw new Error(`${name} is read but not in SETTINGS`);
      return system.env(name);
    },
  };
  // A misspelled variable would be ignored, silently: JWT_SECERT would leave
  // the server open to everyone. Said at start; STRICT_ENV=1 stops it.
  const strict = runtime.env("STRICT_ENV") === "1";
  const unknown = unknownSettings(system, SETTINGS);
  for (const line of unknown) log(strict ? "error" : "warning", line);
  if (strict && unknown.length > 0) fail("STRICT_ENV=1 stops on the variables above");

  const port = integerSetting(runtime, "PORT", 8000);
  const hostname = runtime.env("HOSTNAME") || "127.0.0.1";
  const tickMs = integerSetting(runtime, "TICK_MS", 1000);
  const retryMs = integerSetting(runtime, "RETRY_MS", 2000);
  const publishToken = runtime.env("PUBLISH_TOKEN");
  const subscribeToken = runtime.env("SUBSCRIBE_TOKEN");
  const history = integerSetting(runtime, "HISTORY", 1000);
  const historyBytes = integerSetting(runtime, "HISTORY_BYTES", 0) || Infinity;
  const historyTtl = integerSetting(runtime, "HISTORY_TTL_MS", 0) || undefined;
  const idempotencyWindow = integerSetting(runtime, "IDEMPOTENCY_WINDOW_MS", 300_000);
  const redisUrl = runtime.env("REDIS_URL");
  const heartbeatMs = integerSetting(runtime, "HEARTBEAT_MS", 15_000);
  const drainMs = integerSetting(runtime, "DRAIN_MS", 0);
  const metricsToken = runtime.env("METRICS_TOKEN") || undefined;
  const bodyTimeout = integerSetting(runtime, "BODY_TIMEOUT_MS", 10_000);
  const redisTimeout = integerSetting(runtime, "REDIS_TIMEOUT_MS", 2000);
  const corsOrigin = runtime.env("CORS_ORIGIN") || "*";
  const allowOrigin = corsOrigin === "*"
    ? "*"
    : corsOrigin.split(",").map((origin) => origin.trim());
  const brokerOptions = {
    heartbeat: heartbeatMs,
    retry: retryMs,
    maxQueueBytes: integerSetting(runtime, "MAX_QUEUE_BYTES", 1 << 20),
    maxClients: integerSetting(runtime, "MAX_CLIENTS", 0) || Infinity,
    maxTopics: integerSetting(runtime, "MAX_TOPICS", 32),
    maxBatch: integerSetting(runtime, "MAX_BATCH", 1000),
    shedRetry: shedRetry(runtime.env("SHED_RETRY_MS") || "1000-10000"),
  };
  const maxBodyBytes = integerSetting(runtime, "MAX_BODY", 65536);
  const streamsPath = (runtime.env("STREAMS_PATH") || "/v1/stream/").replace(/\/?$/, "/");
  if (!/^\/[^/]/.test(streamsPath)) {
    fail(`STREAMS_PATH must be a path below "/", such as "/v1/stream/", got "${streamsPath}"`);
  }
  const streamsMaxBytes = integerSetting(runtime, "STREAMS_MAX_BYTES", 256 * 1024 * 1024);
  const streamsLongPoll = integerSetting(runtime, "STREAMS_LONG_POLL_MS", 20_000);
  const publicUrl = runtime.env("PUBLIC_URL") || undefined;
  if (publicUrl !== undefined && !/^https?:\/\/[^/]+\/?$/.test(publicUrl)) {
    fail(`PUBLIC_URL must be an origin such as "https://sse.example.com", got "${publicUrl}"`);
  }
  const jwtSecret = runtime.env("JWT_SECRET") || undefined;
  const jwtPublicKey = runtime.env("JWT_PUBLIC_KEY") || undefined;
  const jwtCookie = (jwtSecret ?? jwtPublicKey)
    ? runtime.env("JWT_COOKIE") || "sse_token"
    : undefined;

  /** Signed tokens when a JWT key is set, else the two shared tokens (each optional). */
  async function authorization(): Promise<Authorize> {
    if (jwtCookie === undefined) {
      return tokenAuth({ publish: publishToken, subscribe: subscribeToken });
    }
    if (publishToken || subscribeToken) {
      fail("JWT_SECRET and JWT_PUBLIC_KEY replace PUBLISH_TOKEN and SUBSCRIBE_TOKEN: set one kind");
    }
    if (jwtSecret && jwtPublicKey) fail("set JWT_SECRET or JWT_PUBLIC_KEY, not both");
    return await jwtAuth({
      secret: jwtSecret,
      publicKey: jwtPublicKey,
      audience: runtime.env("JWT_AUDIENCE") || undefined,
      issuer: runtime.env("JWT_ISSUER") || undefined,
      claim: runtime.env("JWT_CLAIM") || undefined,
      cookie: jwtCookie,
      // Pages of the listed origins may publish with the cookie, as they may read with it.
      cookieOrigins: allowOrigin === "*" ? [] : allowOrigin,
      allowAnonymous: runtime.env("ALLOW_ANONYMOUS") === "1",
    }).catch((error: Error) =>
      fail(error.message.replace(/^secret/, "JWT_SECRET").replace(/^publicKey/, "JWT_PUBLIC_KEY"))
    );
  }
  const authorize = await authorization();

  // Settings checked: from here on, what opens is closed again if the start fails.
  const redis = redisUrl
    ? await (await redisModule()).RedisLog.connect({
      url: redisUrl,
      history,
      logger: (line) => log("error", line),
      historyBytes,
      historyTtl,
      idempotencyWindow,
      timeout: redisTimeout,
    }).catch((error) => fail(error.message))
    : undefined;
  // With REDIS_URL, streams live in Redis too, so every process serves every stream.
  const streamStore = redisUrl
    ? await (await redisModule()).RedisStreamStore.connect({
      url: redisUrl,
      logger: (line) => log("error", line),
      timeout: redisTimeout,
    }).catch((error) => {
      redis?.close();
      return fail(error.message);
    })
    : undefined;
  const broker = new Broker({
    eventLog: redis ?? new MemoryLog({ history, historyBytes, historyTtl, idempotencyWindow }),
    ...brokerOptions,
  });
  const handleBroker = createHandler(broker, { maxBodyBytes, bodyTimeout, authorize, allowOrigin });
  const page = renderPage({
    retryMs,
    heartbeatMs,
    publishToken: Boolean(publishToken),
    jwtCookie,
  });
  // Prometheus sends the token as a bearer token; tokenAuth compares in constant time.
  const metricsAuth = tokenAuth({ publish: metricsToken });
  /** Set once listening, when the origin (the real port) is known. */
  // deno-lint-ignore prefer-const -- assigned once listening, when the port is known
  let handleStreams: StreamsHandler;

  /**
   * `POST /session` with `Authorization: Bearer <token>` sets the token cookie
   * for the page, HttpOnly so that no script of the page can read it; `DELETE`
   * clears it. The token in a header (which another site cannot set without a
   * preflight this route refuses) keeps other sites from signing a visitor in.
   */
  async function session(request: Request, cookie: string): Promise<Response> {
    const secure = new URL(publicUrl ?? request.url).protocol === "https:" ? "; Secure" : "";
    const attributes = `Path=/; HttpOnly; SameSite=Strict${secure}`;
    if (request.method === "DELETE") {
      return new Response(null, {
        status: 204,
        headers: { "set-cookie": `${cookie}=; ${attributes}; Max-Age=0` },
      });
    }
    if (request.method !== "POST") {
      return Response.json({ error: "use POST or DELETE" }, {
        status: 405,
        headers: { allow: "POST, DELETE" },
      });
    }
    let token: string | null;
    try {
      // The same check as every request's; then the token it checked, from the header.
      await access(authorize, request, "subscribe");
      token = bearerToken(request);
      if (token === null) {
        throw new HttpError(401, "send the token as Authorization: Bearer <token>", {
          "www-authenticate": 'Bearer realm="sse"',
        });
      }
    } catch (error) {
      if (!(error instanceof HttpError)) throw error;
      broker.countRejection("auth");
      return error.response();
    }
    return new Response(null, {
      status: 204,
      headers: { "set-cookie": `${cookie}=${token}; ${attributes}` },
    });
  }

  /** The client addresses with a path check under way, and how many may run at once. */
  const probing = new Set<string>();
  const MAX_PROBES = 8;

  /** The demo's own routes, by path: each answers GET (and HEAD, which runtimes strip). */
  const routes: Record<string, Handler> = {
    "/": () => new Response(page, { headers: { "content-type": "text/html; charset=utf-8" } }),
    // The browser client (client.ts) the page imports, for other pages too.
    "/client.js": () =>
      new Response(CLIENT_MODULE, {
        headers: {
          "content-type": "text/javascript; charset=utf-8",
          "access-control-allow-origin": "*",
          "cache-control": "public, max-age=300",
        },
      }),
    "/health": () => Response.json({ status: "alive" }),
    "/ready": async () => {
      const { ready, eventLogUp, reason } = await broker.health();
      // The log's own error may name hosts or users: said in the log, not here.
      const said = eventLogUp ? reason : "the event log did not answer";
      return Response.json({ ready, eventLogUp, reason: said }, { status: ready ? 200 : 503 });
    },
    "/metrics": async (request) => {
      if (!(await metricsAuth(request, "publish"))) {
        return Response.json({ error: "a valid token is required" }, {
          status: 401,
          headers: { "www-authenticate": 'Bearer realm="metrics"' },
        });
      }
      const memory = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n" +
        "# TYPE process_resident_memory_bytes gauge\n" +
        `process_resident_memory_bytes ${runtime.residentMemory()}\n`;
      return new Response(await metricsText(broker) + memory, {
        headers: { "content-type": METRICS_CONTENT_TYPE },
      });
    },
    "/probe": async (request, server) => {
      // As open as subscribing, and a place in MAX_CLIENTS as a stream: it holds a connection.
      try {
        await access(authorize, request, "subscribe");
      } catch (error) {
        if (!(error instanceof HttpError)) throw error;
        broker.countRejection("auth");
        return error.response();
      }
      // A few at a time, one per client address, each a place in MAX_CLIENTS.
      const address = server?.requestIP?.(request)?.address ?? "";
      if (probing.size >= MAX_PROBES || probing.has(address)) {
        return new HttpError(429, "a path check is under way: try again shortly", {
          "retry-after": "5",
        }).response();
      }
      const release = broker.reserve();
      if (release === undefined) {
        return new HttpError(503, "too many open streams: try again", { "retry-after": "5" })
          .response();
      }
      probing.add(address);
      server?.timeout?.(request, 0); // silent on purpose: Bun would close it after 10 s
      return probeResponse(2 * heartbeatMs, request.signal, () => {
        probing.delete(address);
        release();
      });
    },
  };

  /** `draining` until the drain is over (SIGTERM with DRAIN_MS), then `closing`. */
  let stopping: "draining" | "closing" | undefined;

  const handler: Handler = async (request, server) => {
    let path: string;
    try {
      path = new URL(request.url).pathname;
    } catch {
      // A Host no URL can hold (Bun passes it on): said to the client only, as
      // a log line per such request would let anyone flood the log.
      return Response.json({ error: "malformed Host header or request target" }, { status: 400 });
    }
    const route = routes[path];
    let response: Response;
    if (path.startsWith(streamsPath)) {
      response = await handleStreams(request);
      if (response.status === 401 || response.status === 403) broker.countRejection("auth");
    } else if (path === "/session" && jwtCookie !== undefined) {
      response = await session(request, jwtCookie);
    } else {
      response = route === undefined
        ? await handleBroker(request, server)
        : request.method !== "GET" && request.method !== "HEAD"
        ? Response.json({ error: "use GET" }, { status: 405, headers: { allow: "GET" } })
        : await route(request, server);
    }
    // While stopping, a connection serves one request: the client's next one
    // (a drained stream's reconnect) opens a new connection, which a load
    // balancer sends to another process, rather than reusing this one.
    if (stopping !== undefined) response.headers.set("connection", "close");
    return response;
  };

  let server: Listener;
  try {
    server = await runtime.serve(handler, {
      port,
      hostname,
      reusePort: runtime.env("REUSE_PORT") === "1",
    });
  } catch (error) {
    broker.close();
    redis?.close();
    streamStore?.close();
    if (!(error instanceof ListenError)) throw error;
    fail(error.message);
  }
  const host = hostname.includes(":") ? `[${hostname}]` : hostname;
  const url = `http://${host}:${server.port}/`;
  // Subscriptions (section 6 of the protocol) share the streams' store: on
  // Redis, a lease taken on one process holds on every other.
  const subscriptions = new Subscriptions({
    store: streamStore?.subscriptionStore(),
    allowLoopbackWebhooks: runtime.env("STREAMS_ALLOW_PRIVATE_WEBHOOKS") === "1",
    logger: (line) => log("error", line),
  });
  handleStreams = createStreamsHandler({
    subscriptions,
    prefix: streamsPath,
    store: streamStore,
    maxBytes: streamsMaxBytes,
    bodyTimeout,
    longPollTimeout: streamsLongPoll,
    allowOrigin,
    authorize,
    // Live reads take places in MAX_CLIENTS, as streams of the broker do.
    admit: () => broker.reserve(),
    origin: new URL(publicUrl ?? url).origin,
    logger: (line) => log("error", line),
  });

  // Each tick publishes the start of its interval. With Redis every process
  // tries, and the one that claims the interval first publishes it.
  let tickFailing = false;
  async function tick(): Promise<void> {
    const slot = Math.floor(Date.now() / tickMs);
    try {
      if (redis && !(await redis.claim(`tick:${slot}`, 2 * tickMs))) return;
      await broker.publish({ event: "tick", data: new Date(slot * tickMs).toISOString() }, {
        topics: ["time"],
      });
      tickFailing = false;
    } catch (error) {
      // Once per outage, not once per tick.
      if (!tickFailing) log("error", `tick not published: ${(error as Error).message}`);
      tickFailing = true;
    }
  }
  const ticker = tickMs > 0 ? setInterval(tick, tickMs) : undefined;

  async function stop(signal: "SIGINT" | "SIGTERM"): Promise<boolean> {
    if (signal === "SIGTERM" && drainMs > 0 && stopping === undefined) {
      stopping = "draining";
      log("info", `${signal}: draining ${broker.stats().clients} streams over ${drainMs} ms`);
      await broker.drain(drainMs);
      if (stopping !== "draining") return false; // a second signal closed meanwhile
    } else if (stopping === "closing") return false;
    stopping = "closing";
    log("info", `${signal}: closing ${broker.stats().clients} streams`);
    clearInterval(ticker);
    // Streams first: every runtime's graceful stop waits for open responses.
    broker.close();
    // A client that stopped reading never lets its stream finish: don't wait forever.
    let timer: ReturnType<typeof setTimeout> | undefined;
    // Stryker disable next-line ArrowFunction: the deadline is timing
    const deadline = new Promise((resolve) => timer = setTimeout(resolve, 2000));
    await Promise.race([server.stop(), deadline]);
    // Stryker disable next-line CallExpression: a timer left only holds the event loop 2 s longer
    clearTimeout(timer);
    subscriptions.close();
    redis?.close();
    streamStore?.close();
    return true;
  }
  return { url, stop };
}

/** `SHED_RETRY_MS` as `min-max` (or one number), for the broker's `shedRetry`. */
function shedRetry(text: string): [number, number] {
  const match = /^(\d+)(?:-(\d+))?$/.exec(text);
  const [min, max] = [Number(match?.[1]), Number(match?.[2] ?? match?.[1])];
  if (!match || !Number.isSafeInteger(max) || min > max) {
    fail(`SHED_RETRY_MS must be "<min>-<max>" in milliseconds, got ${JSON.stringify(text)}`);
  }
  return [min, max];
}

/** redis.ts, loaded only when asked for, so the in-memory demo needs no npm package. */
async function redisModule(): Promise<typeof import("./redis.ts")> {
  try {
    return await import("./redis.ts");
  } catch (error) {
    // Stryker disable next-line all: run without the package by test/release/package_check.ts
    if (!/redis/.test(String((error as Error)?.message))) throw error;
    // Stryker disable next-line StringLiteral: the same
    return fail("REDIS_URL needs the npm package redis: run npm install redis");
  }
}
