/**
 * An {@linkcode EventLog} on a Redis stream, so that several server
 * processes (on one machine or many) serve one stream of events: a publish
 * on any process reaches the clients of every process, in one order, and a
 * client resumes its `Last-Event-ID` on whichever process it reconnects to.
 *
 * Redis gives what the broker needs: `XADD` assigns ids in one global order
 * (`<ms>-<seq>`, the form the broker compares), `MAXLEN ~` bounds the
 * history, `XRANGE` reads after an id, and a blocking `XREAD` tells each
 * process of new events. Everything else stays in the process: every event
 * is encoded once per process and coalesced for its clients as before.
 *
 * {@linkcode RedisStreamStore} does the same for Durable Streams
 * (streams.ts): every process that shares the Redis serves every stream,
 * and a live reader on one process wakes when another appends.
 *
 * This module needs the npm package `redis`; `mod.ts` needs nothing.
 *
 * @example
 * ```ts ignore
 * import { Broker, createHandler } from "./mod.ts";
 * import { RedisLog } from "./redis.ts";
 *
 * const eventLog = await RedisLog.connect({ url: "redis://127.0.0.1:6379" });
 * Deno.serve(createHandler(new Broker({ eventLog })));
 * ```
 *
 * @example
 * ```ts ignore
 * import { createStreamsHandler } from "./streams.ts";
 * import { RedisStreamStore } from "./redis.ts";
 *
 * const store = await RedisStreamStore.connect({ url: "redis://127.0.0.1:6379" });
 * Deno.serve(createStreamsHandler({ prefix: "/v1/stream/", store }));
 * ```
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { createClient, RESP_TYPES } from "redis";
import {
  type Appended,
  type AppendOptions,
  type EventLog,
  IdempotencyKeyError,
  type LogEvent,
  type LogRead,
  type NewEvent,
} from "./mod.ts";

import type {
  AppendRequest,
  AppendResult,
  CreateRequest,
  CreateResult,
  DeleteResult,
  Framing,
  ProducerClaim,
  ReadResult,
  StreamInfo,
  StreamStore,
} from "./streams.ts";

export type { Appended, AppendOptions, EventLog, LogEvent, LogRead, NewEvent };
export type {
  AppendRequest,
  AppendResult,
  CreateRequest,
  CreateResult,
  DeleteResult,
  Framing,
  ProducerClaim,
  ReadResult,
  StreamInfo,
  StreamStore,
};

/** Options for {@linkcode RedisLog.connect}. */
export interface RedisLogOptions {
  /** The server, as `redis://[user:password@]host:port[/db]` (`rediss://` for TLS). */
  url: string;
  /** The stream's key; processes that share it share the events. Defaults to `sse:events`. */
  key?: string;
  /** About how many events the stream keeps for replay (`MAXLEN ~`). Defaults to 1000. */
  history?: number;
  /**
   * Events older than this many milliseconds are no longer replayed, and
   * are trimmed (`MINID ~`) at the next append; a client resuming from one
   * gets the gap event. Defaults to no limit.
   */
  historyTtl?: number;
  /**
   * How long, in milliseconds, Redis remembers an idempotency key, for
   * every process that shares the stream. Defaults to 300000 (5 minutes).
   */
  idempotencyWindow?: number;
  /** Told when the connection is lost and when it is back. Defaults to `console.error`. */
  logger?: (line: string) => void;
}

/** The shape of a stream entry in the replies of `XRANGE` and `XREAD`. */
interface Entry {
  id: string;
  message: Record<string, string>;
}

type Connection = ReturnType<typeof connection>;

/** Ids the broker can compare, and small enough for Redis to parse. */
const ID = /^\d{1,15}-\d{1,15}$/;

/**
 * An event log kept in one Redis stream. Events are entries with the
 * fields `t`, the topics one per line, `m`, the encoded message, and `p`
 * (`1`) on a private event.
 *
 * When Redis is lost while running, `append` rejects at once (the broker's
 * handler answers `503`), reads for resuming clients fail (they end, and
 * their `EventSource` retries), open streams stay open, and the client
 * reconnects by itself; the log then reads on from the last event it saw,
 * so every event Redis stored is delivered, once. Events survive a restart
 * of Redis itself only if Redis persists them: run it with
 * `--appendonly yes` (and `--appendfsync always` so that no acknowledged
 * event can be lost). A publish whose connection breaks after Redis took it
 * but before the reply came back is refused and still delivered: a
 * publisher that retries on `503` publishes it twice, unless it sends an
 * idempotency key.
 *
 * An append is one Lua script: the events of a batch are added next to
 * each other in one round trip, and an idempotency key is checked and set
 * in the same atomic step, so two processes racing on one key store the
 * events once.
 */
export class RedisLog implements EventLog {
  readonly #writer: Connection;
  readonly #reader: Connection;
  readonly #key: string;
  readonly #history: number;
  readonly #maxAge: number;
  readonly #idempotencyWindow: number;
  readonly #logger: (line: string) => void;
  readonly #listeners = new Set<(events: readonly LogEvent[]) => void>();
  #lastId: string | null = null;
  #started = false;
  #following = false;
  #closed = false;
  #lost = false;

  private constructor(options: RedisLogOptions) {
    this.#key = options.key ?? "sse:events";
    this.#history = options.history ?? 1000;
    if (!Number.isSafeInteger(this.#history) || this.#history < 1) {
      throw new RangeError("history must be a positive integer");
    }
    this.#maxAge = options.historyTtl ?? 0;
    this.#idempotencyWindow = options.idempotencyWindow ?? 300_000; // 0: keys are not kept
    for (
      const [name, value] of [["historyTtl", this.#maxAge], [
        "idempotencyWindow",
        this.#idempotencyWindow,
      ]] as const
    ) {
      if (!Number.isSafeInteger(value) || value < 0) {
        throw new RangeError(`${name} must be a non-negative integer`);
      }
    }
    this.#logger = options.logger ?? ((line) => console.error(line));
    this.#writer = connection(options.url, () => this.#started);
    this.#reader = connection(options.url, () => this.#started); // XREAD blocks its connection
    for (const redis of [this.#writer, this.#reader]) {
      redis.on("error", (error: Error) => this.#onError(error));
      redis.on("ready", () => this.#onReady());
    }
  }

  /**
   * Connects, and rejects with a clear error if Redis cannot be reached:
   * a server should not start without its log.
   *
   * @param options See {@linkcode RedisLogOptions}.
   * @returns The log, following the stream from its newest event.
   */
  static async connect(options: RedisLogOptions): Promise<RedisLog> {
    let log: RedisLog | undefined;
    try {
      log = new RedisLog(options); // the client parses the URL here
      await log.#writer.connect();
      await log.#reader.connect();
      const newest = await log.#writer.xRevRange(log.#key, "+", "-", { COUNT: 1 }) as Entry[];
      log.#lastId = newest[0]?.id ?? null;
    } catch (error) {
      if (error instanceof RangeError) throw error; // an option, named
      log?.close();
      throw unreachable(options.url, error);
    }
    log.#started = true;
    return log;
  }

  /** The id of the newest event this log has told its listeners of. */
  get lastId(): string | null {
    return this.#lastId;
  }

  /**
   * Adds events to the stream, next to each other, trimming it to about
   * `history` events (and those older than `historyTtl`), in one atomic
   * step with the check of an idempotency key.
   *
   * @param events The events, in order.
   * @param options An idempotency key.
   * @returns The ids Redis gave them, and whether an earlier append with the key stored them.
   */
  async append(events: readonly NewEvent[], options: AppendOptions = {}): Promise<Appended> {
    const key = options.idempotencyKey;
    const fields = events.flatMap((
      event,
    ) => [event.topics.join("\n"), event.text, event.private ? "1" : ""]);
    const [outcome, ids] = await this.#writer.eval(APPEND, {
      keys: key === undefined ? [this.#key] : [this.#key, `${this.#key}:idempotency:${key}`],
      arguments: [
        String(this.#history),
        String(this.#maxAge),
        String(this.#idempotencyWindow),
        key === undefined ? "" : fingerprintOf(events),
        ...fields,
      ],
    }) as [number, string];
    if (outcome === CONFLICT) throw new IdempotencyKeyError();
    return { ids: ids.split(","), repeated: outcome === REPEATED };
  }

  /**
   * Reads up to `limit` events after `afterId`. The id is looked up first:
   * one the stream no longer holds (trimmed, older than `historyTtl`, from a
   * stream that Redis lost, malformed) is a gap, and the events then start
   * at the oldest.
   *
   * @param afterId The id to read after; `null` reads from the oldest.
   * @param limit The most events to return.
   * @returns The events, and whether `afterId` could not be placed.
   */
  async read(afterId: string | null, limit: number): Promise<LogRead> {
    // Entries older than the TTL may wait for the next append's trim: skip them.
    const cutoff = this.#maxAge > 0 ? Date.now() - this.#maxAge : 0;
    const oldest = cutoff > 0 ? `${cutoff}-0` : "-";
    if (afterId !== null && ID.test(afterId) && Number(afterId.split("-")[0]) >= cutoff) {
      const [found, after] = await this.#writer.multi()
        .xRange(this.#key, afterId, afterId)
        .xRange(this.#key, "(" + afterId, "+", { COUNT: limit })
        .exec() as unknown as [Entry[], Entry[]];
      if (found.length > 0) return { events: after.map(toEvent), gap: false };
    }
    const entries = await this.#writer.xRange(this.#key, oldest, "+", { COUNT: limit }) as Entry[];
    return { events: entries.map(toEvent), gap: afterId !== null };
  }

  /**
   * Calls `listener` with every event added to the stream from now on, by
   * any process, in the stream's order.
   *
   * @param listener Called with the new events.
   * @returns A function that stops the calls.
   */
  listen(listener: (events: readonly LogEvent[]) => void): () => void {
    this.#listeners.add(listener);
    if (!this.#following) {
      this.#following = true;
      this.#follow();
    }
    return () => this.#listeners.delete(listener);
  }

  /**
   * Claims `name` for `ms` milliseconds: true for exactly one caller of all
   * the processes sharing this Redis (`SET NX PX`). Runs a job once per
   * cluster, such as one tick per second: claim that second.
   *
   * @param name What is claimed, such as `"tick:1700000000"`.
   * @param ms How long the claim holds.
   * @returns Whether this caller got it.
   */
  async claim(name: string, ms: number): Promise<boolean> {
    const reply = await this.#writer.set(`${this.#key}:claim:${name}`, "1", { NX: true, PX: ms });
    return reply === "OK";
  }

  /**
   * Resolves once Redis answers a `PING`; rejects while either connection
   * is down (for {@linkcode Broker.health}).
   */
  async ping(): Promise<void> {
    if (!this.#reader.isReady) throw new Error("not connected to Redis");
    await this.#writer.ping();
  }

  /** Stops following the stream and closes both connections. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#writer.destroy();
    this.#reader.destroy();
  }

  /** Reads new entries with a blocking `XREAD`, one after another, until closed. */
  async #follow(): Promise<void> {
    let failures = 0;
    while (!this.#closed) {
      let reply;
      try {
        reply = await this.#reader.xRead(
          { key: this.#key, id: this.#lastId ?? "0-0" },
          { BLOCK: 1000, COUNT: 1000 },
        ) as { messages: Entry[] }[] | null;
        failures = 0;
      } catch {
        // Redis is away; the client reconnects by itself. Then read on from
        // the last event seen, so nothing Redis stored is missed.
        await new Promise((resolve) => setTimeout(resolve, Math.min(50 * 2 ** failures++, 1000)));
        continue;
      }
      const entries = reply?.[0]?.messages ?? [];
      if (entries.length === 0 || this.#closed) continue;
      const events = entries.map(toEvent);
      this.#lastId = events[events.length - 1].id;
      for (const listener of this.#listeners) listener(events);
    }
  }

  #onError(error: Error): void {
    // Until started, an error is the failure that `connect` reports.
    if (!this.#started || this.#lost || this.#closed) return;
    this.#lost = true;
    this.#logger(
      `redis: connection lost (${error.message}); publishing answers 503 until it is back`,
    );
  }

  #onReady(): void {
    if (!this.#lost || this.#closed) return;
    this.#lost = false;
    this.#logger("redis: connection back");
  }
}

/** What the append script answers first: stored now, stored before under the key, or another batch's key. */
const [STORED, REPEATED, CONFLICT] = [0, 1, 2];

/**
 * The append, atomic in Redis. KEYS: the stream, then the idempotency key's
 * entry if any. ARGV: the history, the TTL (0: none), the key's window (0: none), the
 * batch's fingerprint, then three fields per event (topics, text, "1" if
 * private). Answers {outcome, ids joined with ","}. The key's entry holds
 * the fingerprint's SHA-1 and the ids.
 */
const APPEND = `
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then
    local space = string.find(seen, ' ', 1, true)
    if string.sub(seen, 1, space - 1) ~= redis.sha1hex(ARGV[4]) then return {${CONFLICT}, ''} end
    return {${REPEATED}, string.sub(seen, space + 1)}
  end
end
local ids = {}
for i = 5, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'm', ARGV[i + 1], 'p', '1')
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'm', ARGV[i + 1])
  end
end
-- Trimmed once, after the whole batch: a batch longer than the history
-- must still reach every process's listener.
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', math.max(tonumber(ARGV[1]), #ids))
if ARGV[2] ~= '0' then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(ms - tonumber(ARGV[2])))
end
local joined = table.concat(ids, ',')
if KEYS[2] and ARGV[3] ~= '0' then
  redis.call('SET', KEYS[2], redis.sha1hex(ARGV[4]) .. ' ' .. joined, 'PX', ARGV[3])
end
return {${STORED}, joined}
`;

/** What identifies a batch, to tell a repeat from another batch under one key. */
function fingerprintOf(events: readonly NewEvent[]): string {
  return JSON.stringify(events.map(({ topics, text, private: p }) => [topics, text, p === true]));
}

/**
 * A connection that fails at once while Redis is away: a publisher gets its
 * 503 now rather than a request that hangs in an offline queue.
 */
function connection(url: string, reconnect: () => boolean) {
  return createClient({
    url,
    disableOfflineQueue: true,
    socket: {
      connectTimeout: 5000,
      // Give up at start; once running, reconnect forever, backing off.
      reconnectStrategy: (retries, cause) =>
        reconnect() ? Math.min(50 * 2 ** retries, 1000) : cause,
    },
  });
}

function toEvent({ id, message }: Entry): LogEvent {
  const event = { id, topics: message.t ? message.t.split("\n") : [], text: message.m };
  return message.p === "1" ? { ...event, private: true } : event;
}

/** The error of a failed connect: the URL without its password, nor in the client's message. */
function unreachable(url: string, error: unknown): Error {
  const password = PASSWORD.exec(url)?.[1];
  let reason = String((error as Error)?.message ?? error);
  if (password) reason = reason.replaceAll(password, "***");
  return new Error(`cannot reach Redis at ${redact(url)}: ${reason}`);
}

/** The URL without its password, for error messages. */
function redact(url: string): string {
  const password = PASSWORD.exec(url)?.[1];
  return password ? url.replace(`:${password}@`, ":***@") : url;
}

/** The password of a `redis://user:password@host` URL: up to the last `@`, which may be in it. */
const PASSWORD = /^[a-z]+:\/\/[^:@/]*:(.*)@[^@]*$/i;

// ---------------------------------------------------------------------------
// Durable Streams
// ---------------------------------------------------------------------------

/** Options for {@linkcode RedisStreamStore.connect}. */
export interface RedisStreamStoreOptions {
  /** The server, as `redis://[user:password@]host:port[/db]` (`rediss://` for TLS). */
  url: string;
  /**
   * What every key and the wake-up channel start with; deployments that
   * share one Redis use different prefixes. Defaults to `ds:`.
   */
  prefix?: string;
  /** Bytes one stream may hold, inherited data included (507 beyond). Defaults to 64 MiB. */
  maxStreamBytes?: number;
  /** Told when a connection is lost and when it is back. Defaults to `console.error`. */
  logger?: (line: string) => void;
}

/** A script's source and its SHA-1, run with `EVALSHA` (`EVAL` once Redis forgot it). */
interface Script {
  source: string;
  sha?: string;
}

/** A reply of the scripts, with bulk strings as bytes. */
type Reply = Buffer | number | null | Reply[];

const utf8 = new TextDecoder();
const text = (reply: Reply): string => utf8.decode(reply as Buffer);

/**
 * Durable Streams in Redis, shared by every process that uses the same
 * Redis and prefix: any process answers for any stream, and a live reader
 * on one process wakes when another appends.
 *
 * Layout, for a stream at `path` (`P` is the prefix, `ds:` by default):
 * - `Pm:path`, a hash, its metadata: `ct` (content type), `mt` (media
 *   type), `fr` (framing), `ttl`, `exp` (ms), `touched` (ms, for the
 *   sliding TTL), `closed`, `tail`, `bytes`, `inc` (incarnation), `seq`
 *   (the last `Stream-Seq`), `cbid`/`cbepoch`/`cbseq` (the producer that
 *   closed it), `del` (soft-deleted), and for a fork `from`, `anchor`,
 *   `sub` and `srcinc` (the source's incarnation it was made from).
 * - `Pd:path`, a Redis stream, its records: the entry id is `<end>-0`,
 *   the record's end position, with the fields `d` (the data) and `b` (where
 *   the append it came with ends). Its start is the previous end, so a read
 *   at a position is one `XRANGE (<position>-0 + COUNT n`: a reader at the
 *   tail costs what it reads, not the stream's length.
 * - `Pp:path`, a hash, producer id to `"<epoch> <seq>"`.
 * - `Pf:path`, a set, the forks made from it, as `"<incarnation> <path>"`.
 * - `Pwake`, one pub/sub channel: each append, close and delete publishes
 *   the stream's path on it.
 *
 * Every method is one Lua script (`EVALSHA`), so each check-then-change is
 * atomic across processes: an append checks existence, expiry, closure,
 * content type, the producer's epoch and sequence, `Stream-Seq` and the
 * size limit, then adds its records and updates the metadata; two
 * processes racing on one producer sequence append once. Time is Redis's
 * (`TIME`), one clock for every process. Expiry is checked in the scripts
 * as the memory store checks it, and the keys also expire in Redis at the
 * stream's deadline (`PEXPIREAT`, renewed with each touch), so abandoned
 * streams do not stay. A fork copies the data it inherits (up to its
 * anchor) into its own keys, and is listed in its source's `f` set, which
 * keeps a deleted source soft-deleted (409 and 410) until its last fork
 * is gone; forks whose keys Redis expired are dropped from that set when
 * the source is next used.
 *
 * Differences from {@linkcode MemoryStreamStore}: no limit on the number
 * of streams (Redis's `maxmemory` is the limit; a write refused for memory
 * answers `full`), and the scripts reach the keys of a stream's source and
 * forks, so it needs a single Redis (or one Redis Cluster slot), not a
 * cluster spread over slots.
 */
export class RedisStreamStore implements StreamStore {
  readonly #redis: Connection;
  readonly #subscriber: Connection;
  readonly #bytes: ReturnType<Connection["withTypeMapping"]>;
  readonly #prefix: string;
  readonly #maxStreamBytes: number;
  readonly #logger: (line: string) => void;
  /** In-process waiters by stream path: each is called once, then removed. */
  readonly #waiters = new Map<string, Set<() => void>>();
  #started = false;
  #closed = false;
  #lost = false;

  private constructor(options: RedisStreamStoreOptions) {
    this.#prefix = options.prefix ?? "ds:";
    this.#maxStreamBytes = options.maxStreamBytes ?? 64 * 1024 * 1024;
    if (!Number.isSafeInteger(this.#maxStreamBytes) || this.#maxStreamBytes < 0) {
      throw new RangeError("maxStreamBytes must be a non-negative integer");
    }
    this.#logger = options.logger ?? ((line) => console.error(line));
    this.#redis = connection(options.url, () => this.#started);
    this.#subscriber = connection(options.url, () => this.#started);
    this.#bytes = this.#redis.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });
    for (const redis of [this.#redis, this.#subscriber]) {
      redis.on("error", (error: Error) => this.#onError(error));
      redis.on("ready", () => this.#onReady());
    }
  }

  /**
   * Connects both connections (commands, and the wake-up subscription),
   * and rejects with a clear error if Redis cannot be reached.
   *
   * @param options See {@linkcode RedisStreamStoreOptions}.
   * @returns The store.
   */
  static async connect(options: RedisStreamStoreOptions): Promise<RedisStreamStore> {
    let store: RedisStreamStore | undefined;
    try {
      store = new RedisStreamStore(options);
      await store.#redis.connect();
      await store.#subscriber.connect();
      await store.#subscriber.subscribe(`${store.#prefix}wake`, (path) => store!.#wake(path));
      for (const script of SCRIPTS) script.sha = await store.#redis.scriptLoad(script.source);
    } catch (error) {
      if (error instanceof RangeError) throw error;
      store?.close();
      throw unreachable(options.url, error);
    }
    store.#started = true;
    return store;
  }

  /** Runs a script for `path` (by its SHA-1; by its source when Redis has forgotten it). */
  async #run(script: Script, path: string, args: (string | Buffer)[]): Promise<Reply[]> {
    const options = {
      keys: [`${this.#prefix}m:${path}`],
      arguments: [this.#prefix, path, ...args],
    };
    try {
      return await this.#bytes.evalSha(script.sha ?? "", options) as Reply[];
    } catch (error) {
      if (!String((error as Error)?.message).startsWith("NOSCRIPT")) throw error;
      return await this.#bytes.eval(script.source, options) as Reply[];
    }
  }

  /** Whether a script failed because Redis is out of memory. */
  #full(error: unknown): { status: "full"; reason: string } | undefined {
    const message = String((error as Error)?.message ?? error);
    return message.startsWith("OOM")
      ? { status: "full", reason: "Redis is out of memory" }
      : undefined;
  }

  /** {@inheritDoc StreamStore.create} */
  async create(path: string, request: CreateRequest): Promise<CreateResult> {
    let reply: Reply[];
    try {
      reply = await this.#run(DS_CREATE, path, [
        request.contentType,
        mediaTypeOf(request.contentType),
        request.framing,
        request.ttlSeconds === undefined ? "" : String(request.ttlSeconds),
        request.expiresAt === undefined ? "" : String(request.expiresAt),
        request.closed ? "1" : "0",
        request.contentTypeGiven ? "1" : "0",
        request.fork?.from ?? "",
        request.fork?.anchor === undefined ? "" : String(request.fork.anchor),
        String(request.fork?.subOffset ?? 0),
        String(this.#maxStreamBytes),
        crypto.randomUUID().slice(0, 8),
        ...request.records.map(toBuffer),
      ]);
    } catch (error) {
      const full = this.#full(error);
      if (full) return full;
      throw error;
    }
    const status = text(reply[0]);
    if (status === "created" || status === "exists") {
      return { status, info: infoOf(reply[1] as Reply[]) };
    }
    return { status, reason: text(reply[1]) } as CreateResult;
  }

  /** {@inheritDoc StreamStore.append} */
  async append(path: string, request: AppendRequest): Promise<AppendResult> {
    const producer = request.producer;
    let reply: Reply[];
    try {
      reply = await this.#run(DS_APPEND, path, [
        mediaTypeOf(request.contentType ?? ""),
        request.close ? "1" : "0",
        request.seq === undefined ? "0" : "1",
        request.seq ?? "",
        producer ? "1" : "0",
        producer?.id ?? "",
        String(producer?.epoch ?? 0),
        String(producer?.seq ?? 0),
        String(this.#maxStreamBytes),
        ...request.records.map(toBuffer),
      ]);
    } catch (error) {
      const full = this.#full(error);
      if (full) return full;
      throw error;
    }
    const status = text(reply[0]);
    switch (status) {
      case "ok": {
        const producerSeq = reply[3] as number;
        return {
          status,
          info: infoOf(reply[1] as Reply[]),
          appended: reply[2] === 1,
          ...(producerSeq >= 0 ? { producerSeq } : {}),
        };
      }
      case "duplicate":
        return { status, info: infoOf(reply[1] as Reply[]), producerSeq: reply[2] as number };
      case "missing":
      case "gone":
        return { status };
      case "closed":
        return { status, info: infoOf(reply[1] as Reply[]) };
      case "stale-epoch":
        return { status, epoch: reply[1] as number };
      case "seq-gap":
        return { status, expected: reply[1] as number, received: reply[2] as number };
      default:
        return { status, reason: text(reply[1]) } as AppendResult;
    }
  }

  /** {@inheritDoc StreamStore.read} */
  async read(
    path: string,
    position: number,
    maxBytes: number,
    touch: boolean,
  ): Promise<ReadResult> {
    const reply = await this.#run(DS_READ, path, [
      String(position),
      String(maxBytes),
      touch ? "1" : "0",
    ]);
    const status = text(reply[0]);
    if (status !== "ok") return { status: status as "missing" | "gone" };
    return {
      status,
      info: infoOf(reply[1] as Reply[]),
      next: reply[2] as number,
      // Copied: the reply's buffers may be views of the connection's.
      records: reply.slice(3).map((record) => new Uint8Array(record as Buffer)),
    };
  }

  /** {@inheritDoc StreamStore.info} */
  async info(path: string): Promise<StreamInfo | "missing" | "gone"> {
    const reply = await this.#run(DS_INFO, path, []);
    const status = text(reply[0]);
    return status === "ok" ? infoOf(reply[1] as Reply[]) : status as "missing" | "gone";
  }

  /** {@inheritDoc StreamStore.delete} */
  async delete(path: string): Promise<DeleteResult> {
    const reply = await this.#run(DS_DELETE, path, []);
    return text(reply[0]) as DeleteResult;
  }

  /**
   * Resolves once the stream has data past `position`, is closed, or is
   * gone, or when `signal` aborts, whichever is first; appends by any
   * process count. The waiter is registered before the stream is looked
   * at, so a wake-up between the look and the wait is not lost. Rejects
   * if the look fails (Redis is away).
   */
  waitForData(path: string, position: number, signal: AbortSignal): Promise<void> {
    if (signal.aborted || this.#closed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      let waiters = this.#waiters.get(path);
      if (!waiters) this.#waiters.set(path, waiters = new Set());
      const release = () => {
        waiters.delete(done);
        if (waiters.size === 0 && this.#waiters.get(path) === waiters) this.#waiters.delete(path);
        signal.removeEventListener("abort", done);
      };
      const done = () => {
        release();
        resolve();
      };
      waiters.add(done);
      signal.addEventListener("abort", done, { once: true });
      this.info(path).then((info) => {
        if (typeof info === "string" || info.tail > position || info.closed) done();
      }, (error) => {
        release();
        reject(error);
      });
    });
  }

  /** Wakes this process's waiters on `path` (a message on the channel). */
  #wake(path: string): void {
    const waiters = this.#waiters.get(path);
    if (!waiters) return;
    for (const wake of [...waiters]) wake();
  }

  #wakeAll(): void {
    for (const waiters of [...this.#waiters.values()]) {
      for (const wake of [...waiters]) wake();
    }
  }

  /** Closes both connections; waiting readers are woken (their next read fails). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#redis.destroy();
    this.#subscriber.destroy();
    this.#wakeAll();
  }

  #onError(error: Error): void {
    if (!this.#started || this.#lost || this.#closed) return;
    this.#lost = true;
    this.#logger(
      `redis: streams connection lost (${error.message}); streams answer 500 until back`,
    );
  }

  #onReady(): void {
    if (!this.#lost || this.#closed) return;
    this.#lost = false;
    this.#logger("redis: streams connection back");
    // Wake-ups published while the subscription was down are lost: every
    // waiter looks again.
    this.#wakeAll();
  }
}

/** The media type alone, lower case, as streams.ts compares content types. */
function mediaTypeOf(contentType: string): string {
  return contentType.split(";")[0].trim().toLowerCase();
}

/** Bytes as a Buffer over the same memory, as the client sends them. */
function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A stream's info from its metadata hash, as a flat list of fields and values. */
function infoOf(flat: Reply[]): StreamInfo {
  const meta: Record<string, string> = {};
  for (let i = 0; i < flat.length; i += 2) meta[text(flat[i])] = text(flat[i + 1]);
  const number = (value: string | undefined) => value === undefined ? undefined : Number(value);
  return {
    contentType: meta.ct,
    framing: meta.fr as StreamInfo["framing"],
    ttlSeconds: number(meta.ttl),
    expiresAt: number(meta.exp),
    closed: meta.closed === "1",
    tail: Number(meta.tail),
    incarnation: meta.inc,
    forkedFrom: meta.from,
    forkAnchor: number(meta.anchor),
    forkSubOffset: number(meta.sub),
  };
}

/**
 * What every script starts with. ARGV[1] is the prefix, ARGV[2] the
 * stream's path; KEYS[1] its metadata (declared; the scripts also reach
 * its other keys and those of its source and forks). `get` is the memory
 * store's lookup: it drops an expired stream, releasing its source.
 */
const PRELUDE = `
local P = ARGV[1]
local PATH = ARGV[2]
local function key(kind, path) return P .. kind .. ':' .. path end
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function num(n) return string.format('%.0f', n) end

local function load(path)
  local flat = redis.call('HGETALL', key('m', path))
  if #flat == 0 then return nil end
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

local function flat(m)
  local out = {}
  for k, v in pairs(m) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end

local function field(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
end

local function expired(m)
  if m.del == '1' then return false end
  if m.exp and NOW >= tonumber(m.exp) then return true end
  return m.ttl ~= nil and NOW >= tonumber(m.touched) + tonumber(m.ttl) * 1000
end

local function wake(path) redis.call('PUBLISH', P .. 'wake', path) end

local function drop(path)
  redis.call('DEL', key('m', path), key('d', path), key('p', path), key('f', path))
end

-- Removes a stream, and releases the very source it was forked from,
-- removing that one too if it was soft-deleted and this was its last fork.
local function remove(path, m)
  drop(path)
  wake(path)
  local child, cm = path, m
  while cm.from do
    local parent = cm.from
    local pm = load(parent)
    if not pm or pm.inc ~= cm.srcinc then return end
    redis.call('SREM', key('f', parent), cm.inc .. ' ' .. child)
    if pm.del ~= '1' or redis.call('SCARD', key('f', parent)) > 0 then return end
    drop(parent)
    child, cm = parent, pm
  end
end

-- Forgets the forks of a stream that are gone (their keys expired in Redis)
-- and removes those that have expired.
local function prune(path)
  for _, member in ipairs(redis.call('SMEMBERS', key('f', path))) do
    local space = string.find(member, ' ', 1, true)
    local inc, fork = string.sub(member, 1, space - 1), string.sub(member, space + 1)
    local fm = load(fork)
    if not fm or fm.inc ~= inc or fm.from ~= path then
      redis.call('SREM', key('f', path), member)
    elseif expired(fm) then
      remove(fork, fm)
    end
  end
end

local function get(path)
  local m = load(path)
  if not m then return nil end
  if m.del == '1' then
    prune(path)
    if redis.call('EXISTS', key('m', path)) == 0 then return nil end
    if redis.call('SCARD', key('f', path)) == 0 then
      remove(path, m)
      return nil
    end
    return m
  end
  if expired(m) then
    remove(path, m)
    return nil
  end
  return m
end

-- Lets Redis expire the stream's keys at its deadline.
local function keep(path, m)
  local deadline = m.exp and tonumber(m.exp)
  if m.ttl then
    local sliding = tonumber(m.touched) + tonumber(m.ttl) * 1000
    if not deadline or sliding < deadline then deadline = sliding end
  end
  if not deadline then return end
  local at = num(math.max(deadline, 1))
  for _, kind in ipairs({'m', 'd', 'p', 'f'}) do redis.call('PEXPIREAT', key(kind, path), at) end
end

local function touch(path, m)
  m.touched = num(NOW)
  redis.call('HSET', key('m', path), 'touched', m.touched)
  keep(path, m)
end

-- Adds ARGV[first..] as records after tail; returns the new tail and bytes added.
local function push(path, framing, tail, first)
  local batchEnd = tail
  for i = first, #ARGV do
    if framing == 'bytes' then batchEnd = batchEnd + #ARGV[i] else batchEnd = batchEnd + 1 end
  end
  local added = 0
  for i = first, #ARGV do
    local data = ARGV[i]
    local size = framing == 'bytes' and #data or 1
    if size > 0 then
      tail = tail + size
      added = added + #data
      redis.call('XADD', key('d', path), num(tail) .. '-0', 'd', data, 'b', num(batchEnd))
    end
  end
  return tail, added
end
`;

/**
 * ARGV[3..]: content type, media type, framing, TTL, expires-at, closed,
 * content type given, fork source, fork anchor, fork sub-offset, the size
 * limit, the incarnation, then the records. Answers {status, meta or reason}.
 */
const DS_CREATE: Script = {
  source: PRELUDE + `
local ct, mt, framing, ttl, exp = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local closed, given, from, anchorArg = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local sub, maxBytes, inc = tonumber(ARGV[12]), tonumber(ARGV[13]), ARGV[14]
local existing = get(PATH)
if existing and existing.del == '1' then
  return {'conflict', 'a deleted stream that forks still use holds this path'}
end
local source
if from ~= '' then
  source = get(from)
  if not existing then
    if not source then return {'source-missing', 'the source stream does not exist'} end
    if source.del == '1' then return {'source-gone', 'the source stream was deleted'} end
  end
end
if source and given ~= '1' then ct, mt, framing = source.ct, source.mt, source.fr end
if source and ttl == '' and exp == '' then ttl, exp = source.ttl or '', source.exp or '' end
if existing then
  local same = existing.mt == mt and (existing.ttl or '') == ttl and (existing.exp or '') == exp
    and existing.closed == closed and (existing.from or '') == from
    and (from == '' or ((anchorArg == '' or tonumber(existing.anchor) == tonumber(anchorArg))
      and tonumber(existing.sub) == sub))
  if same then return {'exists', flat(existing)} end
  return {'conflict', 'a stream with another configuration exists at this path'}
end
if source and source.mt ~= mt then
  return {'conflict', "the content type differs from the source stream's"}
end
local data = key('d', PATH)
redis.call('DEL', data, key('p', PATH), key('f', PATH))
local tail, bytes, anchor = 0, 0, nil
local full = {'full', 'a stream holds at most ' .. ARGV[13] .. ' bytes'}
if source then
  local sourceTail = tonumber(source.tail)
  if anchorArg == '' then anchor = sourceTail else anchor = tonumber(anchorArg) end
  if anchor > sourceTail then return {'bad-fork', "the fork offset is past the source's tail"} end
  if sub > 0 then
    local at = redis.call('XRANGE', key('d', from), '(' .. num(anchor) .. '-0', '+', 'COUNT', 1)[1]
    if not at or anchor + sub > tonumber(field(at, 'b')) then
      return {'bad-fork', 'the fork sub-offset is past the next data boundary'}
    end
  end
  tail = anchor + sub
  -- The inherited records, copied; the last one cut at the fork's tail.
  local cursor, count, done = '-', 64, false
  while not done do
    local chunk = redis.call('XRANGE', key('d', from), cursor, '+', 'COUNT', count)
    if #chunk == 0 then break end
    for _, entry in ipairs(chunk) do
      local stop = tonumber(string.match(entry[1], '^%d+'))
      local record = field(entry, 'd')
      local start = framing == 'bytes' and stop - #record or stop - 1
      if start >= tail then
        done = true
        break
      end
      local cut = math.min(stop, tail)
      if cut ~= stop then record = string.sub(record, 1, cut - start) end
      bytes = bytes + #record
      if bytes > maxBytes then
        redis.call('DEL', data)
        return full
      end
      redis.call('XADD', data, num(cut) .. '-0', 'd', record, 'b',
        num(math.min(tonumber(field(entry, 'b')), tail)))
      cursor = '(' .. entry[1]
    end
    count = math.min(count * 2, 1024)
  end
end
local size = 0
for i = 15, #ARGV do size = size + #ARGV[i] end
if bytes + size > maxBytes then
  redis.call('DEL', data)
  return full
end
local added
tail, added = push(PATH, framing, tail, 15)
local m = {
  ct = ct, mt = mt, fr = framing, closed = closed, tail = num(tail), inc = inc,
  bytes = num(bytes + added), touched = num(NOW),
}
if ttl ~= '' then m.ttl = ttl end
if exp ~= '' then m.exp = exp end
if source then
  m.from, m.anchor, m.sub, m.srcinc = from, num(anchor), ARGV[12], source.inc
  redis.call('SADD', key('f', from), inc .. ' ' .. PATH)
  keep(from, source)
end
redis.call('HSET', key('m', PATH), unpack(flat(m)))
keep(PATH, m)
return {'created', flat(m)}
`,
};

/**
 * ARGV[3..]: the request's media type, close, has Stream-Seq, Stream-Seq,
 * has producer, producer id, epoch, seq, the size limit, then the records.
 * Answers {status, ...} as the memory store decides, in its order.
 */
const DS_APPEND: Script = {
  source: PRELUDE + `
local mt, close = ARGV[3], ARGV[4] == '1'
local hasSeq, seq = ARGV[5] == '1', ARGV[6]
local producer, id, epoch, pseq = ARGV[7] == '1', ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local maxBytes = tonumber(ARGV[11])
local FIRST = 12
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
touch(PATH, m)
local state
if producer then
  local saved = redis.call('HGET', key('p', PATH), id)
  if saved then
    local space = string.find(saved, ' ', 1, true)
    state = {
      epoch = tonumber(string.sub(saved, 1, space - 1)),
      seq = tonumber(string.sub(saved, space + 1)),
    }
  end
end
local hasData = #ARGV >= FIRST
if producer and state and epoch < state.epoch then return {'stale-epoch', state.epoch} end
if m.closed == '1' then
  if producer and m.cbid == id and tonumber(m.cbepoch) == epoch and tonumber(m.cbseq) == pseq then
    return {'duplicate', flat(m), state and state.seq or pseq}
  end
  if producer and state and epoch == state.epoch and pseq <= state.seq then
    return {'duplicate', flat(m), state.seq}
  end
  if not hasData and close and not producer then return {'ok', flat(m), 0, -1} end
  return {'closed', flat(m)}
end
if hasData and mt ~= m.mt then
  return {'content-type', "the content type differs from the stream's"}
end
if producer then
  if not state or epoch > state.epoch then
    if pseq ~= 0 then
      if state then return {'bad-producer', 'a new producer epoch must start at seq 0'} end
      return {'seq-gap', 0, pseq}
    end
  elseif pseq <= state.seq then
    return {'duplicate', flat(m), state.seq}
  elseif pseq > state.seq + 1 then
    return {'seq-gap', state.seq + 1, pseq}
  end
end
if hasSeq and m.seq then
  -- Byte-wise: Lua's own comparison follows the server's locale.
  local a, b = seq, m.seq
  local notAfter = #a <= #b
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      notAfter = x < y
      break
    end
  end
  if notAfter then return {'seq-regression', 'Stream-Seq must increase'} end
end
local size = 0
for i = FIRST, #ARGV do size = size + #ARGV[i] end
if tonumber(m.bytes) + size > maxBytes then
  return {'full', 'a stream holds at most ' .. ARGV[11] .. ' bytes'}
end
local tail, added = push(PATH, m.fr, tonumber(m.tail), FIRST)
m.tail, m.bytes = num(tail), num(tonumber(m.bytes) + added)
local changes = {'tail', m.tail, 'bytes', m.bytes}
if hasSeq then
  m.seq = seq
  table.insert(changes, 'seq')
  table.insert(changes, seq)
end
if producer then redis.call('HSET', key('p', PATH), id, ARGV[9] .. ' ' .. ARGV[10]) end
if close then
  m.closed = '1'
  table.insert(changes, 'closed')
  table.insert(changes, '1')
  if producer then
    m.cbid, m.cbepoch, m.cbseq = id, ARGV[9], ARGV[10]
    for _, v in ipairs({'cbid', id, 'cbepoch', ARGV[9], 'cbseq', ARGV[10]}) do
      table.insert(changes, v)
    end
  else
    m.cbid, m.cbepoch, m.cbseq = nil, nil, nil
    redis.call('HDEL', key('m', PATH), 'cbid', 'cbepoch', 'cbseq')
  end
end
redis.call('HSET', key('m', PATH), unpack(changes))
keep(PATH, m)
wake(PATH)
if producer then return {'ok', flat(m), hasData and 1 or 0, pseq} end
return {'ok', flat(m), hasData and 1 or 0, -1}
`,
};

/**
 * ARGV[3..]: position, about how many bytes, touch. Answers {status, meta,
 * next, records...}: from the first record that ends after the position
 * (its start cut off), until about the byte limit (at least one record).
 */
const DS_READ: Script = {
  source: PRELUDE + `
local position, maxBytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
if ARGV[5] == '1' then touch(PATH, m) end
local bytes = m.fr == 'bytes'
local out = {'ok', flat(m), 0}
local nextPosition, size, records = position, 0, 0
local cursor, count, done = '(' .. ARGV[3] .. '-0', 16, false
while not done do
  local chunk = redis.call('XRANGE', key('d', PATH), cursor, '+', 'COUNT', count)
  if #chunk == 0 then break end
  for _, entry in ipairs(chunk) do
    if records > 0 and size >= maxBytes then
      done = true
      break
    end
    local stop = tonumber(string.match(entry[1], '^%d+'))
    local record = field(entry, 'd')
    local start = bytes and stop - #record or stop - 1
    if start < nextPosition then record = string.sub(record, nextPosition - start + 1) end
    if bytes and records > 0 and size + #record > maxBytes then
      record = string.sub(record, 1, maxBytes - size)
    end
    records = records + 1
    out[#out + 1] = record
    size = size + #record
    if bytes then nextPosition = nextPosition + #record else nextPosition = stop end
    cursor = '(' .. entry[1]
  end
  count = math.min(count * 4, 1024)
end
out[3] = nextPosition
return out
`,
};

/** Answers {status, meta}. */
const DS_INFO: Script = {
  source: PRELUDE + `
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
return {'ok', flat(m)}
`,
};

/**
 * Deletes, or soft-deletes while forks exist: the metadata stays (without
 * expiry) to answer 410 and hold the path; the records go, forks have their own.
 */
const DS_DELETE: Script = {
  source: PRELUDE + `
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
prune(PATH)
if redis.call('SCARD', key('f', PATH)) > 0 then
  redis.call('HSET', key('m', PATH), 'del', '1')
  redis.call('PERSIST', key('m', PATH))
  redis.call('PERSIST', key('f', PATH))
  redis.call('DEL', key('d', PATH), key('p', PATH))
  wake(PATH)
else
  remove(PATH, m)
end
return {'deleted'}
`,
};

const SCRIPTS = [DS_CREATE, DS_APPEND, DS_READ, DS_INFO, DS_DELETE];
