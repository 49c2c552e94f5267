// The broker and the Durable Streams server on Cloudflare Workers. Each
// broker name is one Durable Object: every subscriber and every publish of
// that name reach the same instance, which holds the open streams and keeps
// the history in its SQLite storage. Each Durable Stream is one object too,
// named by its path, keeping its data in its own SQLite storage.
//
//   GET  /<name>/events    the event stream (Last-Event-ID resumes)
//   POST /<name>/publish   publish (the body as in mod.ts's createHandler)
//   GET  /<name>/stats     the broker's counters
//   *    /v1/stream/<name> a Durable Stream (the protocol, as streams.ts serves it)
import { type Authorize, Broker, createHandler, tokenAuth } from "../../mod.ts";
import { createStreamsHandler } from "../../streams.ts";
import { SqliteLog, type SqlStorageLike } from "./sqlite_log.ts";
import { SqliteStreamStore } from "./sqlite_stream_store.ts";
import { type Namespace, remoteSources, serveSource, SOURCE_PATH } from "./stream_sources.ts";

/** The bindings and variables of wrangler.jsonc (or config.capnp). */
export interface Env {
  BROKER: Namespace;
  STREAMS: Namespace;
  /** Milliseconds between heartbeat comments. Defaults to 15000. */
  HEARTBEAT_MS?: string;
  /** Events kept for replay. Defaults to 1000. */
  HISTORY?: string;
  /** When set, publishing and writing streams need `Authorization: Bearer <it>`. */
  PUBLISH_TOKEN?: string;
  /** When set, subscribing and reading streams need it (header, `?token=` or cookie). */
  SUBSCRIBE_TOKEN?: string;
  /** Milliseconds a long-poll read of a stream waits for data. Defaults to 20000. */
  STREAMS_LONG_POLL_MS?: string;
}

/** A broker name: what may stand between the slashes of `/<name>/events`. */
const PATH = /^\/([A-Za-z0-9._~-]{1,128})(\/(?:events|publish|stats))$/;

/** Where the Durable Streams are, as on the demo server. */
const STREAMS_PREFIX = "/v1/stream/";

export default {
  fetch(request: Request, env: Env): Promise<Response> | Response {
    const url = new URL(request.url);
    if (url.pathname.startsWith(STREAMS_PREFIX)) {
      // One object per stream, named by its path: the path a fork names its
      // source by (Stream-Forked-From, resolved as streams.ts resolves it).
      return env.STREAMS.get(env.STREAMS.idFromName(url.pathname)).fetch(request);
    }
    const match = PATH.exec(url.pathname);
    if (!match) {
      return Response.json({
        error: "no such path: use /<name>/events, /publish or /stats, or /v1/stream/<name>",
      }, { status: 404 });
    }
    const broker = env.BROKER.get(env.BROKER.idFromName(match[1]));
    url.pathname = match[2];
    return broker.fetch(new Request(url, request));
  },
};

/** One broker, with its streams in memory and its events in storage. */
export class BrokerObject {
  readonly #handle: (request: Request) => Promise<Response>;

  constructor(ctx: { storage: SqlStorageLike }, env: Env) {
    const broker = new Broker({
      eventLog: new SqliteLog(ctx.storage, { history: setting(env.HISTORY, "HISTORY") }),
      heartbeat: setting(env.HEARTBEAT_MS, "HEARTBEAT_MS"),
    });
    this.#handle = createHandler(broker, { authorize: authorizeOf(env) });
  }

  fetch(request: Request): Promise<Response> {
    return this.#handle(request);
  }
}

/** The part of `ctx.storage` a stream's object uses: SQL, and an alarm. */
export interface StreamStorage extends SqlStorageLike {
  getAlarm(): Promise<number | null>;
  setAlarm(at: number): Promise<void>;
}

/**
 * One Durable Stream, its data in the object's SQLite storage. Live reads
 * wait in the object; an alarm drops the stream once it expires (and
 * releases a fork's source), whether anyone reads it or not. A fork asks
 * its source's object for the data it inherits (stream_sources.ts).
 */
export class StreamObject {
  readonly #storage: StreamStorage;
  readonly #store: SqliteStreamStore;
  readonly #handle: (request: Request) => Promise<Response>;
  /** The alarm set, `null` for none, `undefined` until read. */
  #alarm: number | null | undefined;

  constructor(ctx: { storage: StreamStorage }, env: Env) {
    this.#storage = ctx.storage;
    this.#store = new SqliteStreamStore(ctx.storage, { sources: remoteSources(env.STREAMS) });
    this.#handle = createStreamsHandler({
      prefix: STREAMS_PREFIX,
      store: this.#store,
      authorize: authorizeOf(env),
      longPollTimeout: setting(env.STREAMS_LONG_POLL_MS, "STREAMS_LONG_POLL_MS"),
      logger: (line) => console.error(line),
    });
  }

  async fetch(request: Request): Promise<Response> {
    // The Worker forwards clients' requests under the prefix only: SOURCE_PATH
    // is reached by other streams' objects alone.
    if (new URL(request.url).pathname.startsWith(SOURCE_PATH)) {
      const response = await serveSource(this.#store, request);
      await this.#plan(this.#store.due());
      return response;
    }
    const response = await this.#handle(request);
    await this.#plan(this.#store.due());
    // A body refused before it was read (413 on its Content-Length, 401,
    // 403) is read to its end first: workerd would otherwise close the
    // connection under a client still sending it, which then never reads
    // the answer. Within the time a body may take, as readBody allows.
    if (request.body !== null && !request.bodyUsed) {
      await request.body.pipeTo(new WritableStream(), { signal: AbortSignal.timeout(BODY_MS) })
        .catch(() => {});
    }
    // On Cloudflare a request reaches the Worker only at a hostname routed
    // to it: its origin is the Worker's own, and makes Location absolute.
    const location = response.headers.get("location");
    if (location?.startsWith("/")) {
      response.headers.set("location", new URL(location, request.url).href);
    }
    return response;
  }

  async alarm(): Promise<void> {
    this.#alarm = null; // it fired
    await this.#plan(await this.#store.tidy());
  }

  /** Sets the alarm for `due`, unless one is set sooner (it then finds nothing, and sets the next). */
  async #plan(due: number | undefined): Promise<void> {
    if (due === undefined) return;
    this.#alarm ??= await this.#storage.getAlarm();
    if (this.#alarm !== null && this.#alarm <= due) return;
    this.#alarm = due;
    await this.#storage.setAlarm(due);
  }
}

/** How long a refused body may take to arrive, read and dropped: readBody's default limit. */
const BODY_MS = 10_000;

/** The tokens' check, or `undefined` (all allowed) when neither is set. */
function authorizeOf(env: Env): Authorize | undefined {
  const tokens = { publish: env.PUBLISH_TOKEN, subscribe: env.SUBSCRIBE_TOKEN };
  return tokens.publish || tokens.subscribe ? tokenAuth(tokens) : undefined;
}

/**
 * A whole-number variable, or `undefined` (the default) when unset: workerd
 * gives `null` for a `fromEnvironment` binding whose variable is not set.
 */
function setting(value: string | null | undefined, name: string): number | undefined {
  if (value === undefined || value === null || value === "") return undefined;
  if (!/^\d+$/.test(value)) throw new RangeError(`${name} must be a whole number, got "${value}"`);
  return Number(value);
}
