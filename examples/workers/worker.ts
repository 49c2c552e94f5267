// The broker on Cloudflare Workers. Each broker name is one Durable Object:
// every subscriber and every publish of that name reach the same instance,
// which holds the open streams and keeps the history in its SQLite storage.
//
//   GET  /<name>/events    the event stream (Last-Event-ID resumes)
//   POST /<name>/publish   publish (the body as in mod.ts's createHandler)
//   GET  /<name>/stats     the broker's counters
import { Broker, createHandler, tokenAuth } from "../../mod.ts";
import { SqliteLog, type SqlStorageLike } from "./sqlite_log.ts";

/** The bindings and variables of wrangler.jsonc (or config.capnp). */
export interface Env {
  BROKER: {
    idFromName(name: string): unknown;
    get(id: unknown): { fetch(request: Request): Promise<Response> };
  };
  /** Milliseconds between heartbeat comments. Defaults to 15000. */
  HEARTBEAT_MS?: string;
  /** Events kept for replay. Defaults to 1000. */
  HISTORY?: string;
  /** When set, publishing needs `Authorization: Bearer <it>`. */
  PUBLISH_TOKEN?: string;
  /** When set, subscribing needs it (header, `?token=` or cookie). */
  SUBSCRIBE_TOKEN?: string;
}

/** A broker name: what may stand between the slashes of `/<name>/events`. */
const PATH = /^\/([A-Za-z0-9._~-]{1,128})(\/(?:events|publish|stats))$/;

export default {
  fetch(request: Request, env: Env): Promise<Response> | Response {
    const url = new URL(request.url);
    const match = PATH.exec(url.pathname);
    if (!match) {
      return Response.json({ error: "no such path: use /<name>/events, /publish or /stats" }, {
        status: 404,
      });
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
    const tokens = { publish: env.PUBLISH_TOKEN, subscribe: env.SUBSCRIBE_TOKEN };
    this.#handle = createHandler(broker, {
      authorize: tokens.publish || tokens.subscribe ? tokenAuth(tokens) : undefined,
    });
  }

  fetch(request: Request): Promise<Response> {
    return this.#handle(request);
  }
}

/** A whole-number variable, or `undefined` (the default) when unset. */
function setting(value: string | undefined, name: string): number | undefined {
  if (value === undefined || value === "") return undefined;
  if (!/^\d+$/.test(value)) throw new RangeError(`${name} must be a whole number, got "${value}"`);
  return Number(value);
}
