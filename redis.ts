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
 * @module
 */
import { createClient } from "redis";
import {
  type Appended,
  type AppendOptions,
  type EventLog,
  IdempotencyKeyError,
  type LogEvent,
  type LogRead,
  type NewEvent,
} from "./mod.ts";

export type { Appended, AppendOptions, EventLog, LogEvent, LogRead, NewEvent };

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
      // The client's message may quote the URL: never its password.
      const password = PASSWORD.exec(options.url)?.[1];
      let reason = String((error as Error)?.message ?? error);
      if (password) reason = reason.replaceAll(password, "***");
      throw new Error(`cannot reach Redis at ${redact(options.url)}: ${reason}`);
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

/** The URL without its password, for error messages. */
function redact(url: string): string {
  const password = PASSWORD.exec(url)?.[1];
  return password ? url.replace(`:${password}@`, ":***@") : url;
}

/** The password of a `redis://user:password@host` URL: up to the last `@`, which may be in it. */
const PASSWORD = /^[a-z]+:\/\/[^:@/]*:(.*)@[^@]*$/i;
