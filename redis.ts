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
 * ```ts
 * import { Broker, createHandler } from "./mod.ts";
 * import { RedisLog } from "./redis.ts";
 *
 * const eventLog = await RedisLog.connect({ url: "redis://127.0.0.1:6379" });
 * Deno.serve(createHandler(new Broker({ eventLog })));
 * ```
 *
 * @example
 * ```ts
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
  batchFingerprint,
  type EventLog,
  IdempotencyKeyError,
  type LogEvent,
  type LogRead,
  type NewEvent,
  parseEventId,
} from "./mod.ts";

import {
  type AppendRequest,
  type AppendResult,
  costOf,
  type CreateRequest,
  type CreateResult,
  type DeleteResult,
  type Framing,
  type Full,
  mediaType,
  type Piece,
  PIECE_COST,
  type ProducerClaim,
  readPieces,
  type ReadResult,
  type StreamInfo,
  type StreamStore,
  toPieces,
} from "./streams.ts";
import type { SubscriptionStore } from "./subscriptions.ts";

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
  /** How many of the newest events are kept for replay. Defaults to 1000. */
  history?: number;
  /** Also cap the events kept for replay by their encoded size in bytes. Defaults to no cap. */
  historyBytes?: number;
  /**
   * Events older than this many milliseconds are no longer replayed; a
   * client resuming from one gets the gap event. Defaults to no limit.
   */
  historyTtl?: number;
  /**
   * How long, in milliseconds, Redis remembers an idempotency key, for
   * every process that shares the stream. Defaults to 300000 (5 minutes).
   */
  idempotencyWindow?: number;
  /**
   * How many idempotency keys Redis remembers at most for this stream;
   * past it, the key nearest the end of its window is forgotten first.
   * Defaults to 10000.
   */
  idempotencyKeys?: number;
  /**
   * Milliseconds a call to Redis may take; a slower one fails (a publish
   * answers `503`), so a Redis that stopped answering holds no request.
   * Defaults to 2000.
   */
  timeout?: number;
  /** Told when the connection is lost and when it is back. Defaults to `console.error`. */
  logger?: (line: string) => void;
}

/** The shape of a stream entry in the replies of `XRANGE` and `XREAD`. */
interface Entry {
  id: string;
  message: Record<string, string>;
}

type Connection = ReturnType<typeof connection>;

/**
 * An event log kept in one Redis stream. Events are entries with the
 * fields `t`, the topics one per line, `m`, the encoded message, and `p`
 * (`1`) on a private event. It replays exactly what a {@linkcode MemoryLog}
 * with the same options would: the window of events kept for replay (the
 * newest `history`, within `historyBytes` and `historyTtl`) is kept beside
 * the stream in a hash (`<key>:window`: its oldest id, the newest id
 * dropped, its count and bytes), moved by each append; the stream itself
 * keeps 1000 events more (and a minute more), for processes whose reading
 * of the newest events is under way.
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
 * idempotency key. The same holds for a Redis that stops answering (frozen,
 * overloaded): each call fails after `timeout`, and what Redis takes later
 * is stored and delivered; a retry with the same key is stored once.
 *
 * An append is one Lua script: the events of a batch are added next to
 * each other in one round trip, and an idempotency key is checked and set
 * in the same atomic step, so two processes racing on one key store the
 * events once. The keys live in a hash (`<key>:idempotency`, key to the
 * batch's fingerprint and ids) with their deadlines in a sorted set
 * (`<key>:idempotency:until`); each append forgets up to 100 keys past
 * their window, and the oldest past `idempotencyKeys`.
 */
export class RedisLog implements EventLog {
  readonly #writer: Connection;
  readonly #reader: Connection;
  readonly #key: string;
  readonly #history: number;
  readonly #maxBytes: number;
  readonly #maxAge: number;
  readonly #idempotencyWindow: number;
  readonly #idempotencyKeys: number;
  readonly #timeout: number;
  readonly #logger: (line: string) => void;
  readonly #listeners = new Set<(events: readonly LogEvent[]) => void>();
  #lastId: string | null = null;
  #started = false;
  #following = false;
  #closed = false;
  #lost = false;

  private constructor(options: RedisLogOptions) {
    this.#key = options.key ?? "sse:events";
    this.#history = count("history", options.history ?? 1000);
    this.#maxBytes = count("historyBytes", options.historyBytes ?? Infinity);
    this.#maxAge = count("historyTtl", options.historyTtl ?? Infinity);
    this.#idempotencyWindow = count("idempotencyWindow", options.idempotencyWindow ?? 300_000);
    this.#idempotencyKeys = count("idempotencyKeys", options.idempotencyKeys ?? 10_000);
    this.#timeout = count("timeout", options.timeout ?? 2000);
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
      const newest = await within(
        log.#writer.xRevRange(log.#key, "+", "-", { COUNT: 1 }),
        log.#timeout,
      ) as Entry[];
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
    ) => [event.topics.join("\n"), event.text, flag(event.private === true)]);
    const [outcome, ids] = await within(
      this.#writer.eval(APPEND, {
        keys: [
          this.#key,
          `${this.#key}:idempotency`,
          `${this.#key}:idempotency:until`,
          `${this.#key}:window`,
        ],
        arguments: [
          String(this.#history),
          asLimit(this.#maxAge),
          String(this.#idempotencyWindow),
          String(this.#idempotencyKeys),
          key ?? "",
          key === undefined ? "" : batchFingerprint(events),
          asLimit(this.#maxBytes),
          ...fields,
        ],
      }),
      this.#timeout,
    ) as [number, string];
    if (outcome === CONFLICT) throw new IdempotencyKeyError();
    return { ids: ids.split(","), repeated: outcome === REPEATED };
  }

  /**
   * Reads up to `limit` events of the replay window after `afterId`, in one
   * script: an id the window holds, or the newest one it dropped, is placed;
   * any other (dropped earlier, older than `historyTtl`, from a stream that
   * Redis lost, malformed, ahead) is a gap, and the events then start at
   * the window's oldest.
   *
   * @param afterId The id to read after; `null` reads from the oldest.
   * @param limit The most events to return.
   * @returns The events, and whether `afterId` could not be placed.
   */
  async read(afterId: string | null, limit: number): Promise<LogRead> {
    const [gap, ...entries] = await within(
      this.#writer.eval(READ, {
        keys: [this.#key, `${this.#key}:window`],
        arguments: [
          afterId === null ? "" : parseEventId(afterId) ? afterId : "x",
          String(limit),
          asLimit(this.#maxAge),
        ],
      }),
      this.#timeout,
    ) as [number, ...[string, string[]][]];
    return {
      events: entries.map(([id, fields]) => toEvent({ id, message: fieldsOf(fields) })),
      gap: gap === 1,
    };
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
    const reply = await within(
      // Stryker disable next-line StringLiteral: the key's presence is the claim, not its value
      this.#writer.set(`${this.#key}:claim:${name}`, "1", { NX: true, PX: ms }),
      this.#timeout,
    );
    return reply === "OK";
  }

  /**
   * Resolves once Redis answers a `PING`; rejects while either connection
   * is down (for {@linkcode Broker.health}).
   */
  async ping(): Promise<void> {
    if (!this.#reader.isReady) throw new Error("not connected to Redis");
    await within(this.#writer.ping(), this.#timeout);
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
        // Stryker disable next-line all: the pause before reading again is timing, not what is read
        await new Promise((resolve) => setTimeout(resolve, Math.min(50 * 2 ** failures++, 1000)));
        continue;
      }
      const entries = reply?.[0].messages ?? []; // null: nothing within the BLOCK time
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
 * What the scripts of a {@linkcode RedisLog} share: the clock, and the
 * replay window (KEYS[2] of READ, KEYS[4] of APPEND): `start`, its oldest
 * id ("" when empty); `dropped`, the newest id it dropped; `count`; `bytes`,
 * the size of its events on the wire (`id: <id>\n` and the text, as the
 * broker sends them).
 */
const WINDOW = `
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function sizeOf(id, fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'm' then return #('id: ' .. id .. '\\n' .. fields[i + 1]) end
  end
  return 0
end

local function msOf(id) return tonumber(string.match(id, '^%d+')) end
`;

/**
 * The append, atomic in Redis. KEYS: the stream, the idempotency hash (key
 * to "<fingerprint's SHA-1> <ids>"), its deadlines (a sorted set), the
 * replay window. ARGV: the history, the TTL ("": none), the key's window (0:
 * none), the most keys kept, the key ("" for none), the batch's
 * fingerprint, the history's bytes ("": no cap), then three fields per
 * event (topics, text, "1" if private). Answers {outcome, ids joined with
 * ","}. Every step is bounded: at most 100 expired keys are forgotten per
 * append, the window moves past as many events as it takes in, and the
 * batch's size is the broker's `maxBatch`.
 */
// Stryker disable next-line StringLiteral: without the line, Redis refuses an append under OOM at its XADD instead
const APPEND = `#!lua
` + WINDOW + `
local key = ARGV[5]
if key ~= '' then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)
  if #expired > 0 then
    redis.call('HDEL', KEYS[2], unpack(expired))
    redis.call('ZREM', KEYS[3], unpack(expired))
  end
  local seen = redis.call('HGET', KEYS[2], key)
  if seen then
    local space = string.find(seen, ' ', 1, true)
    if string.sub(seen, 1, space - 1) ~= redis.sha1hex(ARGV[6]) then return {${CONFLICT}, ''} end
    return {${REPEATED}, string.sub(seen, space + 1)}
  end
end
local window = redis.call('HMGET', KEYS[4], 'start', 'dropped', 'count', 'bytes')
local start, dropped = window[1] or '', window[2] or ''
local count, bytes = tonumber(window[3] or '0'), tonumber(window[4] or '0')
local ids = {}
for i = 8, #ARGV, 3 do
  local id
  if ARGV[i + 2] == '1' then
    id = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'm', ARGV[i + 1], 'p', '1')
  else
    id = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'm', ARGV[i + 1])
  end
  ids[#ids + 1] = id
  if start == '' then start = id end
  count = count + 1
  bytes = bytes + #('id: ' .. id .. '\\n' .. ARGV[i + 1])
end
-- The window keeps the newest history events within the bytes: the oldest go.
local history, maxBytes = tonumber(ARGV[1]), tonumber(ARGV[7])
while start ~= '' and (count > history or (maxBytes and bytes > maxBytes)) do
  local oldest = redis.call('XRANGE', KEYS[1], start, start)[1]
  if oldest then bytes = bytes - sizeOf(start, oldest[2]) end
  count, dropped = count - 1, start
  local following = redis.call('XRANGE', KEYS[1], '(' .. start, '+', 'COUNT', 1)[1]
  start = following and following[1] or ''
end
if start == '' then count, bytes = 0, 0 end
redis.call('HSET', KEYS[4], 'start', start, 'dropped', dropped, 'count', count, 'bytes', bytes)
-- The stream keeps more than the window, for processes still reading the
-- newest events: 1000 events, and a minute past the TTL.
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', math.max(history, #ids) + 1000)
if ARGV[2] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(now - tonumber(ARGV[2]) - 60000))
end
local joined = table.concat(ids, ',')
local keyWindow, most = tonumber(ARGV[3]), tonumber(ARGV[4])
if key ~= '' and keyWindow > 0 and most > 0 then
  redis.call('HSET', KEYS[2], key, redis.sha1hex(ARGV[6]) .. ' ' .. joined)
  -- Deadlines in the order of the appends, so the oldest is forgotten first.
  local newest = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
  local deadline = now + keyWindow
  if newest and tonumber(newest) >= deadline then deadline = tonumber(newest) + 0.001 end
  redis.call('ZADD', KEYS[3], deadline, key)
  local over = redis.call('ZCARD', KEYS[3]) - most
  if over > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[3], over) -- member, score, member, ...
    for i = 1, #popped, 2 do redis.call('HDEL', KEYS[2], popped[i]) end
  end
  -- Both go when no key was set for a whole window.
  redis.call('PEXPIRE', KEYS[2], keyWindow)
  redis.call('PEXPIRE', KEYS[3], keyWindow)
end
return {${STORED}, joined}
`;

/**
 * A read of the replay window, atomic in Redis. KEYS: the stream, the
 * window. ARGV: the id to read after ("": none; "x": malformed), the most
 * events, the TTL ("": none). Answers {gap (1 or 0), then each entry}.
 * Events older than the TTL leave the window as it is read: its start moves
 * past them and the newest of them is the one dropped.
 */
// Stryker disable next-line StringLiteral: no writes, so Redis runs it under OOM either way
const READ = `#!lua flags=no-writes
` + WINDOW + `
local window = redis.call('HMGET', KEYS[2], 'start', 'dropped')
local start, dropped = window[1] or '', window[2] or ''
if start ~= '' and ARGV[3] ~= '' and msOf(start) < now - tonumber(ARGV[3]) then
  local cutoff = tostring(now - tonumber(ARGV[3])) .. '-0'
  local older = redis.call('XREVRANGE', KEYS[1], '(' .. cutoff, start, 'COUNT', 1)[1]
  if older then dropped = older[1] end
  local first = redis.call('XRANGE', KEYS[1], cutoff, '+', 'COUNT', 1)[1]
  start = first and first[1] or ''
end
local after, gap = ARGV[1], 0
local from = start
if after ~= '' and after ~= dropped then
  -- Placed: an event the stream holds, not before the window's start.
  local known = after ~= 'x' and start ~= '' and redis.call('XRANGE', KEYS[1], after, after)[1]
  if known and redis.call('XRANGE', KEYS[1], start, after, 'COUNT', 1)[1] then
    from = '(' .. after
  else
    gap = 1
  end
end
local out = {gap}
if start == '' then return out end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', tonumber(ARGV[2]))) do
  out[#out + 1] = entry
end
return out
`;

/**
 * A connection that fails at once while Redis is away: a publisher gets its
 * 503 now rather than a request that hangs in an offline queue.
 */
function connection(url: string, reconnect: () => boolean) {
  return createClient({
    url,
    disableOfflineQueue: true,
    // Commands sent to a Redis that does not answer wait here: a bound, so
    // that a frozen Redis cannot fill memory with them.
    commandsQueueMaxLength: 10_000,
    socket: {
      connectTimeout: 5000,
      // Give up at start; once running, reconnect forever, backing off.
      reconnectStrategy: (retries, cause) =>
        // Stryker disable next-line MethodExpression,ArithmeticOperator: the backoff is timing
        reconnect() ? Math.min(50 * 2 ** retries, 1000) : cause,
    },
  });
}

/**
 * Rejects when `call` has not settled within `ms`: a Redis that stopped
 * answering (frozen, overloaded) must not hold a request for ever. The
 * command goes on in Redis and its late reply is dropped; what it did
 * stays done, which idempotency keys and producer sequences make safe to
 * retry.
 */
function within<T>(call: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Redis did not answer within ${ms} ms`)), ms);
  });
  // Stryker disable next-line ArrowFunction: a timer left rejects a race already settled
  return Promise.race([call, late]).finally(() => clearTimeout(timer));
}

/** A count option: a non-negative safe integer (or `Infinity`, no limit), or a RangeError that names it. */
function count(name: string, value: number): number {
  if (!(value >= 0) || (value !== Infinity && !Number.isSafeInteger(value))) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}

/** A limit as a script argument: "" for none. */
function asLimit(value: number): string {
  return value === Infinity ? "" : String(value);
}

/** An entry's fields from the flat list a script answers with. */
function fieldsOf(flat: string[]): Record<string, string> {
  const fields: Record<string, string> = {};
  // Stryker disable next-line EqualityOperator: one step past adds an "undefined" field, never read
  for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
  return fields;
}

function toEvent({ id, message }: Entry): LogEvent {
  const event = { id, topics: message.t ? message.t.split("\n") : [], text: message.m };
  return message.p === "1" ? { ...event, private: true } : event;
}

/** The error of a failed connect: the URL without its password, nor in the client's message. */
function unreachable(url: string, error: unknown): Error {
  const password = PASSWORD.exec(url)?.[1];
  let reason = String((error as Error)?.message ?? error);
  // Stryker disable next-line ConditionalExpression,StringLiteral: no client's message seen so far holds the URL; kept for one that would
  if (password) reason = reason.replaceAll(password, "***");
  return new Error(`cannot reach Redis at ${redact(url)}: ${reason}`);
}

/** The URL without its password, for error messages. */
function redact(url: string): string {
  const password = PASSWORD.exec(url)?.[1];
  return password ? url.replace(`:${password}@`, ":***@") : url;
}

/** The password of a `redis://user:password@host` URL: up to the last `@`, which may be in it. */
const PASSWORD = /[a-z]+:\/\/[^:@/]*:(.*)@/i;

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
  /**
   * Bytes one stream may hold, inherited data included, each piece counting
   * `PIECE_COST` more (413 beyond). Defaults to 64 MiB.
   */
  maxStreamBytes?: number;
  /**
   * Idempotent producers remembered per stream; past it, the one unused
   * longest is forgotten. Defaults to 1000.
   */
  maxProducers?: number;
  /**
   * Milliseconds a call to Redis may take; a slower one fails (the request
   * answers `503`). Defaults to 2000.
   */
  timeout?: number;
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
 * What one script copies at most into a fork (entries, and bytes, at least
 * one entry), and how long a fork being copied is held for its process.
 */
const COPY_ENTRIES = 256;
// Stryker disable next-line ArithmeticOperator: the run's size sets how many scripts a fork takes, not what it copies
const COPY_BYTES = 1024 * 1024;
const COPY_LEASE_MS = 30_000;

/**
 * Durable Streams in Redis, shared by every process that uses the same
 * Redis and prefix: any process answers for any stream, and a live reader
 * on one process wakes when another appends.
 *
 * Layout, for a stream at `path` (`P` is the prefix, `ds:` by default):
 * - `Pm:path`, a hash, its metadata: `ct` (content type), `mt` (media
 *   type), `fr` (framing), `ttl`, `exp` (ms), `touched` (ms, for the
 *   sliding TTL), `closed`, `tail`, `bytes` (what it counts for against
 *   `maxStreamBytes`), `inc` (incarnation), `seq` (the last `Stream-Seq`),
 *   `cbid`/`cbepoch`/`cbseq` (the producer that closed it), `del`
 *   (soft-deleted), for a fork `from`, `anchor`, `sub` and `srcinc` (the
 *   source's incarnation it was made from), and while a fork's inherited
 *   data is being copied `pending` and `cursor`.
 * - `Pd:path`, a Redis stream, its {@linkcode Piece}s: the entry id is
 *   `<end>-0`, the piece's end position, with the fields `d` (the data) and
 *   `b` (where the append it came with ends). A read at a position is one
 *   `XRANGE (<position>-0 + COUNT n`, so a reader at the tail costs what it
 *   reads, not the stream's length; an append of any number of JSON
 *   messages is a few entries of up to 64 KiB.
 * - `Pp:path`, a hash, producer id to `"<epoch> <seq>"`, and `Pq:path`, a
 *   sorted set of the producers by last use, to forget the oldest.
 * - `Pf:path`, a set, the forks made from it, as `"<incarnation> <path>"`.
 * - `Pwake`, one pub/sub channel: each append, close and delete publishes
 *   the stream's path on it.
 *
 * Every method is one short Lua script (`EVALSHA`), so each check-then-
 * change is atomic across processes and none holds Redis for long: an
 * append checks existence, expiry, closure, content type, the producer's
 * epoch and sequence, `Stream-Seq` and the size limit, then adds its pieces
 * and updates the metadata; two processes racing on one producer sequence
 * append once. Time is Redis's (`TIME`), one clock for every process.
 * Expiry is checked in the scripts as the memory store checks it, and the
 * keys also expire in Redis at the stream's deadline (`PEXPIREAT`, renewed
 * with each touch), so abandoned streams do not stay. A fork copies the
 * data it inherits into its own keys, {@linkcode COPY_ENTRIES} entries per
 * script until done, invisible (404) until then; a fork whose process dies
 * while copying is dropped by Redis after a lease. A fork is listed in its
 * source's `f` set, which keeps a deleted source soft-deleted (409 and
 * 410) until its last fork is gone; forks whose keys Redis expired are
 * dropped from that set, a sample at a time, when the source is next used.
 *
 * Differences from {@linkcode MemoryStreamStore}: no limit on the number
 * of streams or on their total size but Redis's own `maxmemory` (a write
 * refused for memory is `store-full`), and the scripts reach the keys of a
 * stream's source and forks, so it needs a single Redis (or one Redis
 * Cluster slot), not a cluster spread over slots.
 */
export class RedisStreamStore implements StreamStore {
  readonly #redis: Connection;
  readonly #subscriber: Connection;
  readonly #bytes: ReturnType<Connection["withTypeMapping"]>;
  readonly #prefix: string;
  readonly #maxStreamBytes: number;
  readonly #maxProducers: number;
  readonly #timeout: number;
  readonly #logger: (line: string) => void;
  /** In-process waiters by stream path: each is called once, then removed. */
  readonly #waiters = new Map<string, Set<() => void>>();
  #started = false;
  #closed = false;
  #lost = false;

  private constructor(options: RedisStreamStoreOptions) {
    this.#prefix = options.prefix ?? "ds:";
    this.#maxStreamBytes = count("maxStreamBytes", options.maxStreamBytes ?? 64 * 1024 * 1024);
    this.#maxProducers = count("maxProducers", options.maxProducers ?? 1000);
    this.#timeout = count("timeout", options.timeout ?? 2000);
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

  /**
   * Runs a script for `path` (by its SHA-1; by its source when Redis has
   * forgotten it), failing after `timeout`.
   */
  async #run(script: Script, path: string, args: (string | Buffer)[]): Promise<Reply[]> {
    const options = {
      // Stryker disable next-line ArrayDeclaration,StringLiteral: declared for Redis Cluster's routing; the scripts build their keys
      keys: [`${this.#prefix}m:${path}`],
      arguments: [this.#prefix, path, ...args],
    };
    try {
      return await within(this.#bytes.evalSha(script.sha ?? "", options), this.#timeout) as Reply[];
    } catch (error) {
      if (!String((error as Error)?.message).startsWith("NOSCRIPT")) throw error;
      return await within(this.#bytes.eval(script.source, options), this.#timeout) as Reply[];
    }
  }

  /** Runs a script that writes: Redis out of memory is a full store, not a failure. */
  async #write(script: Script, path: string, args: (string | Buffer)[]): Promise<Reply[] | Full> {
    try {
      return await this.#run(script, path, args);
    } catch (error) {
      if (!String((error as Error)?.message ?? error).startsWith("OOM")) throw error;
      return { status: "store-full", reason: "Redis is out of memory" };
    }
  }

  /** {@inheritDoc StreamStore.create} */
  async create(path: string, request: CreateRequest): Promise<CreateResult> {
    const pieces = toPieces(request.records, request.framing, 0);
    const limits = [String(this.#maxStreamBytes), String(costOf(pieces))];
    const started = Date.now();
    let attempt = 0;
    let reply: Reply[] | Full;
    for (;;) {
      reply = await this.#write(DS_CREATE, path, [
        request.contentType,
        mediaType(request.contentType),
        request.framing,
        request.ttlSeconds === undefined ? "" : String(request.ttlSeconds),
        request.expiresAt === undefined ? "" : String(request.expiresAt),
        flag(request.closed),
        flag(request.contentTypeGiven),
        request.fork?.from ?? "",
        request.fork?.anchor === undefined ? "" : String(request.fork.anchor),
        String(request.fork?.subOffset ?? 0),
        crypto.randomUUID(),
        ...limits,
        ...pieceArguments(pieces),
      ]);
      // Another process is copying a fork to this path: its outcome decides.
      if (!Array.isArray(reply) || text(reply[0]) !== "busy") break;
      if (Date.now() - started > this.#timeout) throw new Error("a fork is being copied here");
      // Stryker disable next-line all: the pause before trying again is timing
      await new Promise((resolve) => setTimeout(resolve, 25 * 2 ** Math.min(attempt++, 5)));
    }
    // A fork's inherited data, copied a bounded run of entries per script.
    const inc = Array.isArray(reply) && text(reply[0]) === "copying" ? text(reply[1]) : undefined;
    try {
      while (Array.isArray(reply) && text(reply[0]) === "copying") {
        reply = await this.#write(DS_COPY, path, [inc!, ...limits]);
        if (Array.isArray(reply) && text(reply[0]) === "copied") {
          reply = await this.#write(DS_FINISH, path, [inc!, ...limits, ...pieceArguments(pieces)]);
        }
      }
    } catch (error) {
      // Free the path at once rather than after the lease, if Redis lets us.
      await this.#run(DS_ABORT, path, [inc!]).catch(() => {});
      throw error;
    }
    if (!Array.isArray(reply)) return reply;
    const status = text(reply[0]);
    if (status === "created" || status === "exists") {
      return { status, info: infoOf(reply[1] as Reply[]) };
    }
    if (status === "interrupted") {
      throw new Error("the fork's copy was dropped (its lease ran out)");
    }
    return { status, reason: text(reply[1]) } as CreateResult;
  }

  /** {@inheritDoc StreamStore.append} */
  async append(path: string, request: AppendRequest): Promise<AppendResult> {
    const producer = request.producer;
    // A stream's framing follows from its media type, which the script
    // checks the request's against before it adds anything.
    const framing = mediaType(request.contentType ?? "") === "application/json"
      ? "messages"
      : "bytes";
    const pieces = toPieces(request.records, framing, 0);
    const reply = await this.#write(DS_APPEND, path, [
      mediaType(request.contentType ?? ""),
      flag(request.close),
      flag(request.seq !== undefined),
      request.seq ?? "",
      flag(producer !== undefined),
      producer?.id ?? "",
      String(producer?.epoch ?? 0),
      String(producer?.seq ?? 0),
      String(this.#maxStreamBytes),
      String(this.#maxProducers),
      String(costOf(pieces)),
      ...pieceArguments(pieces),
    ]);
    if (!Array.isArray(reply)) return reply;
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
      flag(touch),
    ]);
    const status = text(reply[0]);
    if (status !== "ok") return { status: status as "missing" | "gone" };
    const info = infoOf(reply[1] as Reply[]);
    const pieces: Piece[] = [];
    for (let i = 3; i < reply.length; i += 2) {
      // Copied: the reply's buffers may be views of the connection's.
      pieces.push({
        end: reply[i] as number,
        data: new Uint8Array(reply[i + 1] as Buffer),
        batchEnd: 0,
      });
    }
    const start = reply[2] as number;
    return { status, info, ...readPieces(pieces, info.framing, start, position, maxBytes) };
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

  /** {@inheritDoc StreamStore.list} */
  async list(prefix: string, limit: number): Promise<string[]> {
    const start = `${this.#prefix}m:`;
    const pattern = start + prefix.replace(/[\\*?[\]]/g, "\\$&") + "*";
    const paths = new Set<string>();
    let cursor = "0";
    do {
      const reply = await within(
        this.#redis.scan(cursor, { MATCH: pattern, COUNT: 1000 }),
        this.#timeout,
      );
      cursor = String(reply.cursor);
      for (const key of reply.keys) {
        if (paths.size < limit) paths.add(String(key).slice(start.length));
      }
    } while (cursor !== "0" && paths.size < limit);
    return [...paths];
  }

  /**
   * A {@linkcode SubscriptionStore} on this store's connection and prefix,
   * for `Subscriptions`: every process that shares the Redis shares the
   * subscriptions, their leases and their signing key.
   *
   * Layout (`P` the prefix): `Ps:rec`, a hash of id to record; `Ps:match`,
   * a hash of id to what appends are matched against, and `Ps:version`,
   * bumped when one changes; `Ps:due`, a sorted set of ids by when they
   * next need a look; `Ps:key`, the webhook signing key. Each call is one
   * command or one short script. Times are the processes' clocks: a lease
   * holds as long as their clocks agree.
   *
   * @param options The limit on subscriptions.
   * @returns The store.
   */
  subscriptionStore(options: { maxSubscriptions?: number } = {}): SubscriptionStore {
    const max = String(count("maxSubscriptions", options.maxSubscriptions ?? 1000));
    const run = (script: Script, id: string, args: string[]) => this.#run(script, id, args);
    return {
      get: async (id) => {
        const reply = await within(this.#redis.hGet(`${this.#prefix}s:rec`, id), this.#timeout);
        return reply ?? undefined;
      },
      swap: async (id, expected, next, match, due) => {
        const reply = await run(SUB_SWAP, id, [
          flag(expected !== undefined),
          expected ?? "",
          flag(next !== undefined),
          next ?? "",
          match,
          String(due),
          max,
        ]) as unknown as number;
        return reply === 2 ? "full" : reply === 1;
      },
      matches: async (known) => {
        const reply = await run(SUB_MATCHES, "", [String(known ?? -1)]);
        const version = Number(text(reply[0]));
        if (reply.length === 1) return { version };
        const flat = (reply[1] as Reply[]).map(text);
        const entries: [string, string][] = [];
        for (let i = 0; i < flat.length; i += 2) entries.push([flat[i], flat[i + 1]]);
        return { version, entries };
      },
      due: async (now, limit) => {
        const ids = await within(
          this.#redis.zRangeByScore(`${this.#prefix}s:due`, 1, now, {
            LIMIT: { offset: 0, count: limit },
          }),
          this.#timeout,
        );
        return ids.map(String);
      },
      signingKey: async (candidate) => text((await run(SUB_KEY, "", [candidate]))[0]),
    };
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
      `redis: streams connection lost (${error.message}); streams answer 503 until back`,
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

/** A yes/no script argument: the scripts test for "1". */
function flag(on: boolean): string {
  // Stryker disable next-line StringLiteral: any other string is "no" to the scripts
  return on ? "1" : "0";
}

/** Pieces as script arguments: each one's end (relative to the tail) and its data. */
function pieceArguments(pieces: readonly Piece[]): (string | Buffer)[] {
  return pieces.flatMap((piece) => [String(piece.end), toBuffer(piece.data)]);
}

/** Bytes as a Buffer over the same memory, as the client sends them. */
function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A stream's info from its metadata hash, as a flat list of fields and values. */
function infoOf(flat: Reply[]): StreamInfo {
  const meta: Record<string, string> = {};
  // Stryker disable next-line EqualityOperator: one step past adds an "undefined" field, never read
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
 * The first line of a script that adds data: refused whole, before it
 * starts, when Redis is out of memory (a full store), never stopped half way.
 */
// Stryker disable next-line StringLiteral: without it Redis refuses a script under OOM at its first write, not before it starts
const WRITES = "#!lua\n";
/** The first line of a script that reads or frees: it runs when Redis is out of memory too. */
const FREES = "#!lua flags=allow-oom\n";

/**
 * What every script starts with. ARGV[1] is the prefix, ARGV[2] the
 * stream's path; KEYS[1] its metadata (declared; the scripts also reach
 * its other keys and those of its source and forks). `get` is the memory
 * store's lookup: it drops an expired stream, releasing its source. Every
 * loop is bounded, so that no script holds Redis for long.
 */
const PRELUDE = `
local P = ARGV[1]
local PATH = ARGV[2]
local PIECE_COST = ${PIECE_COST}
local KINDS = {'m', 'd', 'p', 'q', 'f'}
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

-- The first n positions of a piece's data.
local function head(data, n, framing)
  if framing == 'bytes' then return string.sub(data, 1, n) end
  local at = 0
  for _ = 1, n do at = string.find(data, '\\n', at + 1, true) end
  return string.sub(data, 1, at)
end

local function expired(m)
  if m.del == '1' then return false end
  if m.exp and NOW >= tonumber(m.exp) then return true end
  return m.ttl ~= nil and NOW >= tonumber(m.touched) + tonumber(m.ttl) * 1000
end

local function wake(path) redis.call('PUBLISH', P .. 'wake', path) end

local function drop(path)
  redis.call('UNLINK', key('m', path), key('d', path), key('p', path), key('q', path),
    key('f', path))
end

-- Removes a stream, and releases the source it was forked from, removing
-- that one too if it was soft-deleted and this was its last fork; 16
-- levels at most per call (what is left goes when next used).
local function remove(path, m)
  drop(path)
  wake(path)
  local child, cm = path, m
  for _ = 1, 16 do
    if not cm.from then return end
    local parent = cm.from
    local pm = load(parent)
    if not pm or pm.inc ~= cm.srcinc then return end
    redis.call('SREM', key('f', parent), cm.inc .. ' ' .. child)
    if pm.del ~= '1' or redis.call('SCARD', key('f', parent)) > 0 then return end
    drop(parent)
    child, cm = parent, pm
  end
end

-- Forgets forks of a stream that are gone (their keys expired in Redis)
-- and removes those that have expired: a sample of 64 per call.
local function prune(path)
  for _, member in ipairs(redis.call('SRANDMEMBER', key('f', path), 64)) do
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

-- The stream at a path, or nil: missing, expired (then removed), or a fork
-- still being copied.
local function get(path)
  local m = load(path)
  if not m or m.pending then return nil end
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
  for _, kind in ipairs(KINDS) do redis.call('PEXPIREAT', key(kind, path), at) end
end

-- Only a sliding TTL needs the time of the last use.
local function touch(path, m)
  if not m.ttl then return end
  m.touched = num(NOW)
  redis.call('HSET', key('m', path), 'touched', m.touched)
  keep(path, m)
end

-- Adds the pieces in ARGV[first..] (pairs: end relative to the tail, data)
-- after tail; returns the new tail.
local function push(path, tail, first)
  if #ARGV < first then return tail end
  local batchEnd = num(tail + tonumber(ARGV[#ARGV - 1]))
  for i = first, #ARGV, 2 do
    redis.call('XADD', key('d', path), num(tail + tonumber(ARGV[i])) .. '-0',
      'd', ARGV[i + 1], 'b', batchEnd)
  end
  return tail + tonumber(ARGV[#ARGV - 1])
end

-- Copies the next run of a pending fork's inherited entries from its
-- source. Answers nil when more remain, {'copied'} when done, or why not.
local function copy(m, maxBytes, cost)
  local source = get(m.from)
  if not source then return {'source-missing', 'the source stream does not exist'} end
  if source.inc ~= m.srcinc then return {'source-missing', 'the source stream does not exist'} end
  if source.del == '1' then return {'source-gone', 'the source stream was deleted'} end
  local tail, bytes = tonumber(m.tail), tonumber(m.bytes)
  -- Each entry starts where the one before ends: the cursor's, or 0.
  local start = tonumber(string.match(m.cursor, '%d+') or '0')
  local copied, entries = 0, 0
  while m.cursor ~= '+' and copied < ${COPY_BYTES} and entries < ${COPY_ENTRIES} do
    local chunk = redis.call('XRANGE', key('d', m.from), m.cursor, '+', 'COUNT', 16)
    if #chunk == 0 then m.cursor = '+' end
    for _, entry in ipairs(chunk) do
      if start >= tail then
        m.cursor = '+'
        break
      end
      local stop = tonumber(string.match(entry[1], '^%d+'))
      local data = field(entry, 'd')
      local cut = math.min(stop, tail)
      if cut ~= stop then data = head(data, cut - start, m.fr) end
      bytes = bytes + #data + PIECE_COST
      if bytes + cost > maxBytes then
        return {'stream-full', 'a stream holds at most ' .. num(maxBytes) .. ' bytes'}
      end
      redis.call('XADD', key('d', PATH), num(cut) .. '-0', 'd', data, 'b',
        num(math.min(tonumber(field(entry, 'b')), tail)))
      copied, entries = copied + #data, entries + 1
      m.cursor, start = '(' .. entry[1], stop
      if cut == tail then m.cursor = '+' end
      if m.cursor == '+' or copied >= ${COPY_BYTES} or entries >= ${COPY_ENTRIES} then break end
    end
  end
  m.bytes = num(bytes)
  if m.cursor == '+' then return {'copied'} end
end

-- Keeps a pending fork's state, and its keys for a lease: a fork whose
-- process dies while copying goes by itself.
local function hold(m)
  redis.call('HSET', key('m', PATH), unpack(flat(m)))
  for _, kind in ipairs({'m', 'd'}) do redis.call('PEXPIRE', key(kind, PATH), ${COPY_LEASE_MS}) end
end

-- Makes a created stream whole: its own pieces from ARGV[first..], its
-- metadata without the copy's state, its place among its source's forks.
local function finish(m, first, cost)
  local source = m.from and load(m.from)
  if m.pending then
    m.pending, m.cursor = nil, nil
    redis.call('HDEL', key('m', PATH), 'pending', 'cursor')
    for _, kind in ipairs({'m', 'd'}) do redis.call('PERSIST', key(kind, PATH)) end
  end
  m.tail = num(push(PATH, tonumber(m.tail), first))
  m.bytes = num(tonumber(m.bytes) + cost)
  redis.call('HSET', key('m', PATH), unpack(flat(m)))
  -- A source deleted since the copy ended has no fork to keep.
  if source and source.inc == m.srcinc then
    redis.call('SADD', key('f', m.from), m.inc .. ' ' .. PATH)
    -- A soft-deleted source keeps no deadline: it stays until its last fork goes.
    if source.del ~= '1' then keep(m.from, source) end
  end
  keep(PATH, m)
  return {'created', flat(m)}
end
`;

/** The arguments shared by the create scripts after the prefix and path. */
const LIMITS = `
local maxBytes, cost = tonumber(ARGV[LIMIT]), tonumber(ARGV[LIMIT + 1])
`;

/**
 * ARGV[3..]: content type, media type, framing, TTL, expires-at, closed,
 * content type given, fork source, fork anchor, fork sub-offset, the
 * incarnation, the size limit, the pieces' cost, then the pieces. Answers
 * {status, meta or reason}; {'copying', incarnation} for a fork whose
 * inherited data takes more scripts (`DS_COPY`, then `DS_FINISH`); {'busy'}
 * while another process copies a fork to this path.
 */
const DS_CREATE: Script = {
  source: WRITES + PRELUDE + "local LIMIT = 14" + LIMITS + `
local ct, mt, framing, ttl, exp = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local closed, given, from, anchorArg = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local sub, inc = tonumber(ARGV[12]), ARGV[13]
local FIRST = 16
local present = load(PATH)
if present and present.pending then return {'busy'} end
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
if source and source.fr ~= ARGV[5] and #ARGV >= FIRST then
  return {'conflict', "the initial data is not of the source stream's type"}
end
local full = {'stream-full', 'a stream holds at most ' .. num(maxBytes) .. ' bytes'}
local m = {
  ct = ct, mt = mt, fr = framing, closed = closed, tail = '0', inc = inc, bytes = '0',
  touched = num(NOW),
}
if ttl ~= '' then m.ttl = ttl end
if exp ~= '' then m.exp = exp end
if not source then
  if cost > maxBytes then return full end
  drop(PATH)
  return finish(m, FIRST, cost)
end
local sourceTail = tonumber(source.tail)
local anchor = sourceTail
if anchorArg ~= '' then anchor = tonumber(anchorArg) end
if anchor > sourceTail then return {'bad-fork', "the fork offset is past the source's tail"} end
if sub > 0 then
  local at = redis.call('XRANGE', key('d', from), '(' .. num(anchor) .. '-0', '+', 'COUNT', 1)[1]
  if not at or anchor + sub > tonumber(field(at, 'b')) then
    return {'bad-fork', 'the fork sub-offset is past the next data boundary'}
  end
end
if cost > maxBytes then return full end
drop(PATH)
m.from, m.anchor, m.sub, m.srcinc = from, num(anchor), ARGV[12], source.inc
m.tail, m.pending, m.cursor = num(anchor + sub), '1', '-'
local copied = copy(m, maxBytes, cost)
if copied and copied[1] == 'copied' then return finish(m, FIRST, cost) end
if copied then
  drop(PATH)
  return copied
end
hold(m)
return {'copying', inc}
`,
};

/**
 * ARGV[3..]: the fork's incarnation, the size limit, the pieces' cost.
 * Copies the next run of a pending fork's inherited data: answers
 * {'copying', incarnation} while more remain, {'copied'} when done, or why
 * it stopped (the fork is dropped then); {'interrupted'} if the fork is no
 * longer pending (its lease ran out).
 */
const DS_COPY: Script = {
  source: WRITES + PRELUDE + "local LIMIT = 4" + LIMITS + `
local m = load(PATH)
if not m or not m.pending or m.inc ~= ARGV[3] then return {'interrupted'} end
local copied = copy(m, maxBytes, cost)
if copied and copied[1] ~= 'copied' then
  drop(PATH)
  return copied
end
hold(m)
return copied or {'copying', ARGV[3]}
`,
};

/**
 * ARGV[3..]: the fork's incarnation, the size limit, the pieces' cost, then
 * the pieces. Makes a fork whose inherited data is copied whole: answers
 * {'created', meta}, or {'interrupted'}.
 */
const DS_FINISH: Script = {
  source: WRITES + PRELUDE + "local LIMIT = 4" + LIMITS + `
local m = load(PATH)
if not m or not m.pending or m.inc ~= ARGV[3] or m.cursor ~= '+' then return {'interrupted'} end
return finish(m, 6, cost)
`,
};

/**
 * ARGV[3..]: the request's media type, close, has Stream-Seq, Stream-Seq,
 * has producer, producer id, epoch, seq, the size limit, the most
 * producers, the pieces' cost, then the pieces (cut for the framing of the
 * request's media type, which must be the stream's to be added). Answers {status, ...} as the memory store decides, in its order.
 */
const DS_APPEND: Script = {
  source: WRITES + PRELUDE + `
local mt, close = ARGV[3], ARGV[4] == '1'
local hasSeq, seq = ARGV[5] == '1', ARGV[6]
local producer, id, epoch, pseq = ARGV[7] == '1', ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local maxBytes, maxProducers, cost = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local FIRST = 14
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
local hasData = #ARGV >= FIRST
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
if tonumber(m.bytes) + cost > maxBytes then
  return {'stream-full', 'a stream holds at most ' .. ARGV[11] .. ' bytes'}
end
m.tail, m.bytes = num(push(PATH, tonumber(m.tail), FIRST)), num(tonumber(m.bytes) + cost)
local changes = {'tail', m.tail, 'bytes', m.bytes}
if hasSeq then
  m.seq = seq
  table.insert(changes, 'seq')
  table.insert(changes, seq)
end
if producer then
  redis.call('HSET', key('p', PATH), id, ARGV[9] .. ' ' .. ARGV[10])
  redis.call('ZADD', key('q', PATH), NOW, id)
  local over = redis.call('ZCARD', key('q', PATH)) - maxProducers
  if over > 0 then
    local popped = redis.call('ZPOPMIN', key('q', PATH), over) -- member, score, member, ...
    for i = 1, #popped, 2 do redis.call('HDEL', key('p', PATH), popped[i]) end
  end
end
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
 * where the first piece starts, then end and data of each piece}: from the first piece that ends after
 * the position, until the pieces after the first count for `maxBytes`
 * (their bytes and PIECE_COST each), so the caller can cut them with
 * `readPieces` as the memory store does.
 */
const DS_READ: Script = {
  source: FREES + PRELUDE + `
local maxBytes = tonumber(ARGV[4])
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
if ARGV[5] == '1' then touch(PATH, m) end
-- Where the first piece returned starts: the end of the one before it.
local before = redis.call('XREVRANGE', key('d', PATH), ARGV[3] .. '-0', '-', 'COUNT', 1)[1]
local out = {'ok', flat(m), before and tonumber(string.match(before[1], '^%d+')) or 0}
local cursor, count, size, first = '(' .. ARGV[3] .. '-0', 16, 0, nil
while true do
  local chunk = redis.call('XRANGE', key('d', PATH), cursor, '+', 'COUNT', count)
  if #chunk == 0 then break end
  for _, entry in ipairs(chunk) do
    if first and size >= maxBytes + first then return out end
    local data = field(entry, 'd')
    out[#out + 1] = tonumber(string.match(entry[1], '^%d+'))
    out[#out + 1] = data
    size = size + #data + PIECE_COST
    first = first or size
    cursor = '(' .. entry[1]
  end
  count = math.min(count * 4, 1024)
end
return out
`,
};

/** Answers {status, meta}. */
const DS_INFO: Script = {
  source: FREES + PRELUDE + `
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
return {'ok', flat(m)}
`,
};

/**
 * Deletes, or soft-deletes while forks exist: the metadata stays (without
 * expiry) to answer 410 and hold the path; the data goes, forks have their own.
 */
const DS_DELETE: Script = {
  source: FREES + PRELUDE + `
local m = get(PATH)
if not m then return {'missing'} end
if m.del == '1' then return {'gone'} end
prune(PATH)
if redis.call('SCARD', key('f', PATH)) > 0 then
  redis.call('HSET', key('m', PATH), 'del', '1')
  redis.call('PERSIST', key('m', PATH))
  redis.call('PERSIST', key('f', PATH))
  redis.call('UNLINK', key('d', PATH), key('p', PATH), key('q', PATH))
  wake(PATH)
else
  remove(PATH, m)
end
return {'deleted'}
`,
};

/** ARGV[3]: a fork's incarnation. Drops the fork if it is still being copied. */
const DS_ABORT: Script = {
  source: FREES + PRELUDE + `
local m = load(PATH)
if m and m.pending and m.inc == ARGV[3] then drop(PATH) end
return {'ok'}
`,
};

/**
 * A subscription record's compare-and-swap (`SubscriptionStore.swap`):
 * 1 done, 0 the record is not the one expected, 2 no room for another.
 */
const SUB_SWAP: Script = {
  source: `
local P, id = ARGV[1], ARGV[2]
local hasExpected, expected, hasNext, nextRecord = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local match, due, max = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local rec, matches = P .. 's:rec', P .. 's:match'
local current = redis.call('HGET', rec, id)
if hasExpected == '1' then
  if current ~= expected then return 0 end
elseif current then
  return 0
end
if hasNext == '0' then
  if current then
    redis.call('HDEL', rec, id)
    redis.call('HDEL', matches, id)
    redis.call('ZREM', P .. 's:due', id)
    redis.call('INCR', P .. 's:version')
  end
  return 1
end
if not current and redis.call('HLEN', rec) >= max then return 2 end
redis.call('HSET', rec, id, nextRecord)
if redis.call('HGET', matches, id) ~= match then
  redis.call('HSET', matches, id, match)
  redis.call('INCR', P .. 's:version')
end
if due > 0 then
  redis.call('ZADD', P .. 's:due', due, id)
else
  redis.call('ZREM', P .. 's:due', id)
end
return 1
`,
};

/** Every subscription's match and the version, or the version alone when the caller knows it. */
const SUB_MATCHES: Script = {
  source: `
local P = ARGV[1]
local version = redis.call('GET', P .. 's:version') or '0'
if version == ARGV[3] then return {version} end
return {version, redis.call('HGETALL', P .. 's:match')}
`,
};

/** The signing key: the stored one, or the candidate stored. */
const SUB_KEY: Script = {
  source: `
redis.call('SET', ARGV[1] .. 's:key', ARGV[3], 'NX')
return {redis.call('GET', ARGV[1] .. 's:key')}
`,
};

const SCRIPTS = [
  DS_CREATE,
  DS_COPY,
  DS_FINISH,
  DS_ABORT,
  DS_APPEND,
  DS_READ,
  DS_INFO,
  DS_DELETE,
  SUB_SWAP,
  SUB_MATCHES,
  SUB_KEY,
];
