/**
 * A Server-Sent Events broker built only on web standards: no imports, so it
 * loads by URL and runs unchanged on Deno, Bun and other WinterTC runtimes.
 *
 * The module reads top to bottom: the message type and its encoding, the
 * {@linkcode EventLog} that keeps events (in memory by default; shared by
 * several processes with `redis.ts`), the {@linkcode Broker}, and an HTTP
 * handler that mounts the broker on any server.
 *
 * @example Broadcast to every browser that opens /events
 * ```ts
 * import { Broker, createHandler } from "./mod.ts";
 *
 * const broker = new Broker();
 * setInterval(() => broker.publish({ data: new Date().toISOString() }), 1000);
 * Deno.serve(createHandler(broker));
 * ```
 *
 * @module
 */

// ---------------------------------------------------------------------------
// Messages and their encoding
// ---------------------------------------------------------------------------

/**
 * One message of an event stream, with the fields the WHATWG HTML event
 * stream parser knows. Every field is optional; a message with `data` is
 * dispatched as an event by `EventSource`, one without only updates state.
 */
export interface ServerSentEventMessage {
  /** A comment, ignored by clients; useful to keep a connection alive. */
  comment?: string;
  /** The event name; clients dispatch `message` when it is absent. */
  event?: string;
  /** The data; line breaks become several `data:` lines and come back as `\n`. */
  data?: string;
  /** The event id, which clients send back as `Last-Event-ID` on reconnect. */
  id?: string | number;
  /** The client's reconnection delay in milliseconds. */
  retry?: number;
}

/**
 * Thrown when a message cannot be encoded; `field` names the offending field
 * so an HTTP layer can answer `400` with a precise reason.
 *
 * @example
 * ```ts
 * import { encodeMessage, MessageError } from "./mod.ts";
 *
 * try {
 *   encodeMessage({ event: "a\nb" });
 * } catch (error) {
 *   if (error instanceof MessageError) console.log(error.field); // "event"
 * }
 * ```
 */
export class MessageError extends TypeError {
  /** The message field that was refused. */
  readonly field: string;

  /**
   * Creates the error; its message is the field followed by the reason.
   *
   * @param field The message field that was refused.
   * @param reason Why, as the end of a sentence that starts with the field.
   */
  constructor(field: string, reason: string) {
    super(`${field} ${reason}`);
    this.name = "MessageError";
    this.field = field;
  }
}

const LINE_BREAK = /\r\n|\r|\n/;
const encoder = new TextEncoder();

/**
 * Writes one message in the event stream format, exactly as the WHATWG HTML
 * parser reads it back, as UTF-8 bytes ending with the blank line that
 * dispatches it.
 *
 * `event` and `id` cannot hold a line break (and `id` no NUL): the parser
 * would read the rest as new fields, so a publisher could inject events.
 * They are refused with a {@linkcode MessageError} rather than cleaned.
 *
 * @example
 * ```ts
 * import { encodeMessage } from "./mod.ts";
 *
 * const bytes = encodeMessage({ event: "greeting", data: "hello\nworld" });
 * new TextDecoder().decode(bytes);
 * // "event: greeting\ndata: hello\ndata: world\n\n"
 * ```
 */
export function encodeMessage(message: ServerSentEventMessage): Uint8Array<ArrayBuffer> {
  return encoder.encode(formatMessage(message));
}

function formatMessage(message: ServerSentEventMessage): string {
  if (typeof message !== "object" || message === null) {
    throw new MessageError("message", "must be an object");
  }
  const { comment, event, data, id, retry } = message;
  let text = "";
  if (comment !== undefined) text += lines(": ", checkString("comment", comment));
  if (event !== undefined) {
    text += "event: " + checkSingleLine("event", checkString("event", event)) + "\n";
  }
  if (id !== undefined) {
    const value = typeof id === "number" ? checkNumberId(id) : checkString("id", id);
    if (value.includes("\0")) throw new MessageError("id", "must not contain NUL");
    text += "id: " + checkSingleLine("id", value) + "\n";
  }
  if (retry !== undefined) {
    // The parser only accepts ASCII digits; anything else is silently ignored.
    if (!Number.isSafeInteger(retry) || retry < 0) {
      throw new MessageError("retry", "must be a non-negative integer");
    }
    text += "retry: " + retry + "\n";
  }
  if (data !== undefined) text += lines("data: ", checkString("data", data));
  return text + "\n";
}

/** Prefixes every line of `value`, so a multi-line value survives intact. */
function lines(prefix: string, value: string): string {
  return prefix + value.split(LINE_BREAK).join("\n" + prefix) + "\n";
}

function checkString(field: string, value: unknown): string {
  if (typeof value !== "string") throw new MessageError(field, "must be a string");
  return value;
}

function checkSingleLine(field: string, value: string): string {
  if (/[\r\n]/.test(value)) {
    throw new MessageError(field, "must not contain a line break");
  }
  return value;
}

function checkNumberId(id: number): string {
  if (!Number.isSafeInteger(id)) throw new MessageError("id", "must be an integer");
  return String(id);
}

/**
 * A `TransformStream` that encodes messages into event stream bytes, for
 * piping your own source of messages into a `Response`.
 *
 * @example
 * ```ts
 * import { ServerSentEventStream } from "./mod.ts";
 *
 * const body = ReadableStream.from([{ data: "one" }, { data: "two" }])
 *   .pipeThrough(new ServerSentEventStream());
 * const response = new Response(body, {
 *   headers: { "content-type": "text/event-stream" },
 * });
 * ```
 */
export class ServerSentEventStream extends TransformStream<ServerSentEventMessage, Uint8Array> {
  constructor() {
    super({ transform: (message, controller) => controller.enqueue(encodeMessage(message)) });
  }
}

// ---------------------------------------------------------------------------
// The event log: where events are kept and ordered, and where ids come from
// ---------------------------------------------------------------------------

/**
 * One event as an {@linkcode EventLog} keeps it.
 */
export interface LogEvent {
  /** The id the log gave the event; see {@linkcode EventLog} for its form. */
  readonly id: string;
  /** The topics it was published to; none means it goes to clients that named none. */
  readonly topics: readonly string[];
  /** The message's encoded fields without the `id:` line, ending with the blank line. */
  readonly text: string;
  /**
   * Whether only clients granted one of its topics receive it (see
   * {@linkcode SubscribeOptions.grants}). Absent means public.
   */
  readonly private?: boolean;
}

/**
 * What {@linkcode EventLog.read} returns: retained events in log order.
 */
export interface LogRead {
  /** Up to the number asked for, oldest first. */
  readonly events: readonly LogEvent[];
  /**
   * The id read after is not one the log still holds (trimmed, from another
   * log, malformed): events may be missing, and `events` starts at the oldest
   * retained one.
   */
  readonly gap: boolean;
}

/**
 * Where a {@linkcode Broker} keeps events: it gives each one its id and its
 * place in one order, keeps the newest for `Last-Event-ID` replay, and tells
 * listeners of new ones. The default is a {@linkcode MemoryLog}; a shared
 * log (such as the Redis Streams one in `redis.ts`) lets several processes
 * serve one stream of events, each delivering every event in the log's order.
 *
 * Ids must be two non-negative integers joined by `-` (as Redis stream ids
 * are), ordered by the first and then the second, increasing in log order:
 * the broker compares them to join replay and live delivery without a gap
 * or a duplicate. The first is the time of the append in milliseconds since
 * the epoch, which `?since=` relies on.
 *
 * @example A log that forwards to another, counting appends
 * ```ts
 * import { Broker, type EventLog, MemoryLog } from "./mod.ts";
 *
 * const inner = new MemoryLog();
 * let appended = 0;
 * const counting: EventLog = {
 *   get lastId() {
 *     return inner.lastId;
 *   },
 *   append: (events, options) => (appended += events.length, inner.append(events, options)),
 *   read: (afterId, limit) => inner.read(afterId, limit),
 *   listen: (listener) => inner.listen(listener),
 * };
 * const broker = new Broker({ eventLog: counting });
 * await broker.publish({ data: "hi" });
 * console.log(appended); // 1
 * broker.close();
 * ```
 */
export interface EventLog {
  /** The id of the newest event listeners have been told of, or `null` before any. */
  readonly lastId: string | null;
  /**
   * Stores events, all or none, in order and one after another (no other
   * writer's event between them), and resolves with their ids once they are
   * stored; rejects if they were not. A private event must come back private
   * from `read` and `listen`, also in other processes. With an idempotency
   * key, see {@linkcode AppendOptions}.
   */
  append(events: readonly NewEvent[], options?: AppendOptions): Promise<Appended>;
  /**
   * Reads up to `limit` retained events after the one with id `afterId`
   * (`null`: from the oldest). May answer at once or with a promise.
   */
  read(afterId: string | null, limit: number): LogRead | Promise<LogRead>;
  /**
   * Calls `listener` with every event appended from now on, by any writer,
   * each once and in log order; `lastId` is the newest of them when it runs.
   * Returns a function that stops the calls.
   */
  listen(listener: (events: readonly LogEvent[]) => void): () => void;
  /**
   * Resolves once the log answers and rejects when it cannot be reached, for
   * {@linkcode Broker.health}. Optional: a log without it counts as up.
   */
  ping?(): Promise<void>;
}

/**
 * Options for a {@linkcode MemoryLog}.
 */
export interface MemoryLogOptions {
  /** How many of the newest events to keep for replay. Defaults to 1000. */
  history?: number;
  /** Also cap the kept events by their encoded size in bytes. Defaults to no cap. */
  historyBytes?: number;
  /**
   * Also drop events older than this many milliseconds: they are no longer
   * replayed, and a client resuming from one gets the gap event. Defaults
   * to no limit.
   */
  historyTtl?: number;
  /**
   * How long, in milliseconds, an idempotency key is remembered (see
   * {@linkcode PublishBatchOptions.idempotencyKey}). Defaults to 300000 (5
   * minutes).
   */
  idempotencyWindow?: number;
  /**
   * How many idempotency keys are remembered at most; past it, the key
   * nearest the end of its window is forgotten first. Defaults to 10000.
   */
  idempotencyKeys?: number;
}

/**
 * The default {@linkcode EventLog}: the newest events in this process's
 * memory, and listeners told at once. Ids are `<ms>-<seq>` as in Redis: the
 * time of the append in milliseconds, and a sequence number within that
 * millisecond, so ids from an earlier run of the server compare older than
 * this run's, and a client resuming across a restart is never mistaken for
 * one that is ahead.
 *
 * @example
 * ```ts
 * import { Broker, MemoryLog } from "./mod.ts";
 *
 * const broker = new Broker({ eventLog: new MemoryLog({ history: 10 }) });
 * broker.close();
 * ```
 */
export class MemoryLog implements EventLog {
  readonly #maxEvents: number;
  readonly #maxBytes: number;
  readonly #maxAge: number;
  readonly #idempotencyWindow: number;
  readonly #idempotencyKeys: number;
  readonly #listeners = new Set<(events: readonly LogEvent[]) => void>();
  #events: LogEvent[] = [];
  #start = 0; // index of the oldest retained event in #events
  #bytes = 0;
  #lastId: [number, number] | null = null;
  /** The newest event dropped: reading after it misses nothing that is kept. */
  #droppedId: string | null = null;
  /** Appends by idempotency key, oldest first: what was appended, and until when the key holds. */
  readonly #keys = new Map<string, { fingerprint: string; ids: string[]; until: number }>();

  /**
   * Creates an empty log.
   *
   * @param options See {@linkcode MemoryLogOptions}.
   */
  constructor(options: MemoryLogOptions = {}) {
    this.#maxEvents = checkCount("history", options.history ?? 1000);
    this.#maxBytes = checkCount("historyBytes", options.historyBytes ?? Infinity);
    this.#maxAge = checkCount("historyTtl", options.historyTtl ?? Infinity);
    this.#idempotencyWindow = checkCount("idempotencyWindow", options.idempotencyWindow ?? 300_000);
    this.#idempotencyKeys = checkCount("idempotencyKeys", options.idempotencyKeys ?? 10_000);
  }

  /**
   * The id of the newest event, or `null` before any.
   *
   * @example
   * ```ts
   * import { MemoryLog } from "./mod.ts";
   *
   * console.log(new MemoryLog().lastId); // null
   * ```
   */
  get lastId(): string | null {
    return this.#lastId && `${this.#lastId[0]}-${this.#lastId[1]}`;
  }

  /**
   * Keeps events, drops the oldest beyond the limits, and tells listeners.
   * With an idempotency key seen within the window, appends nothing and
   * answers the ids of that earlier append (or rejects with an
   * {@linkcode IdempotencyKeyError} when its events were others).
   *
   * @example
   * ```ts
   * import { MemoryLog } from "./mod.ts";
   *
   * const { ids } = await new MemoryLog().append([{ topics: [], text: "data: hi\n\n" }]);
   * console.log(ids); // ["<ms>-0"]
   * ```
   *
   * @param events The events, in order.
   * @param options An idempotency key.
   * @returns The events' ids, and whether they were appended before.
   */
  append(events: readonly NewEvent[], options: AppendOptions = {}): Promise<Appended> {
    const now = Date.now();
    const key = options.idempotencyKey;
    for (const [old, { until }] of this.#keys) {
      if (until > now) break;
      this.#keys.delete(old);
    }
    // Stryker disable next-line ConditionalExpression: the map never holds the key undefined
    const seen = key === undefined ? undefined : this.#keys.get(key);
    // A key past its window is forgotten, even if the clock went back since.
    if (seen !== undefined && seen.until > now) {
      if (seen.fingerprint !== batchFingerprint(events)) {
        return Promise.reject(new IdempotencyKeyError());
      }
      return Promise.resolve({ ids: seen.ids, repeated: true });
    }
    const appended: LogEvent[] = [];
    for (const { topics, text, private: isPrivate } of events) {
      // Ids as Redis makes them: the clock, or the last id's time if the clock went back.
      const [ms, seq] = this.#lastId ?? [0, 0];
      this.#lastId = now > ms ? [now, 0] : [ms, seq + 1];
      const id = this.lastId!;
      const event: LogEvent = isPrivate
        ? { id, topics, text, private: true }
        : { id, topics, text };
      this.#events.push(event);
      this.#bytes += bytesOf(event).byteLength;
      appended.push(event);
    }
    // Stryker disable next-line all: reads drop too; dropping here bounds memory without reads
    this.#drop(now);
    const ids = appended.map((event) => event.id);
    // Stryker disable next-line ConditionalExpression: a key undefined is never looked up
    if (key !== undefined) {
      this.#keys.delete(key); // to the end of the map, which is in order of expiry
      this.#keys.set(key, {
        fingerprint: batchFingerprint(events),
        ids,
        until: now + this.#idempotencyWindow,
      });
      if (this.#keys.size > this.#idempotencyKeys) {
        this.#keys.delete(this.#keys.keys().next().value!);
      }
    }
    for (const listener of this.#listeners) listener(appended);
    return Promise.resolve({ ids, repeated: false });
  }

  /**
   * Reads retained events after an id, at once.
   *
   * @example
   * ```ts
   * import { MemoryLog } from "./mod.ts";
   *
   * const log = new MemoryLog();
   * const { ids } = await log.append([
   *   { topics: [], text: "data: 1\n\n" },
   *   { topics: [], text: "data: 2\n\n" },
   * ]);
   * console.log(log.read(ids[0], 10).events.length); // 1
   * ```
   *
   * @param afterId The id to read after; `null` reads from the oldest.
   * @param limit The most events to return.
   * @returns The events, and whether `afterId` could not be placed.
   */
  read(afterId: string | null, limit: number): LogRead {
    this.#drop(Date.now());
    let from = this.#start;
    let gap = false;
    // A retained id, or the newest dropped one: no gap. Anything else (older
    // than what is kept, from an earlier run, malformed, or ahead) may have
    // missed events: resend all retained.
    if (afterId !== null && afterId !== this.#droppedId) {
      const found = this.#indexOf(afterId);
      if (found === -1) gap = true;
      else from = found + 1;
    }
    return { events: this.#events.slice(from, from + limit), gap };
  }

  /**
   * Calls `listener` with the events of each append.
   *
   * @example
   * ```ts
   * import { MemoryLog } from "./mod.ts";
   *
   * const log = new MemoryLog();
   * const stop = log.listen((events) => console.log(events[0].text));
   * await log.append([{ topics: [], text: "data: hi\n\n" }]); // logs "data: hi\n\n"
   * stop();
   * ```
   *
   * @param listener Called with the new events.
   * @returns A function that stops the calls.
   */
  listen(listener: (events: readonly LogEvent[]) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Drops the oldest events beyond the limits. */
  #drop(now: number): void {
    const events = this.#events;
    while (
      this.#start < events.length &&
      (events.length - this.#start > this.#maxEvents || this.#bytes > this.#maxBytes ||
        parseEventId(events[this.#start].id)![0] < now - this.#maxAge)
    ) {
      this.#bytes -= bytesOf(events[this.#start]).byteLength;
      this.#droppedId = events[this.#start++].id;
    }
    // Compact now and then, so dropping stays O(1) amortised without a ring.
    // Stryker disable next-line all: when (or whether) it compacts changes memory, no read
    if (this.#start > 1024 && this.#start * 2 > events.length) {
      this.#events = events.slice(this.#start);
      this.#start = 0;
    }
  }

  /** Where event `id` is in `#events` (a binary search: ids increase), or -1. */
  #indexOf(id: string): number {
    if (parseEventId(id) === undefined) return -1;
    let low = this.#start;
    let high = this.#events.length - 1;
    while (low <= high) {
      const middle = (low + high) >>> 1;
      const order = compareIds(this.#events[middle].id, id);
      if (order === 0) return middle;
      // Stryker disable next-line EqualityOperator: order 0 has returned
      if (order < 0) low = middle + 1;
      else high = middle - 1;
    }
    return -1;
  }
}

/** What an {@linkcode EventLog.append} returns. */
export interface Appended {
  /** The ids of the events, in order. */
  ids: string[];
  /** Whether an earlier append with the same idempotency key stored them: nothing new was stored. */
  repeated: boolean;
}

/** Options of one {@linkcode EventLog.append}. */
export interface AppendOptions {
  /**
   * Store the events once per key: a repeat within the log's window
   * answers the first append's ids and stores nothing; a repeat with other
   * events rejects with {@linkcode IdempotencyKeyError}. Defaults to none.
   */
  idempotencyKey?: string;
}

/** An event to store, as {@linkcode Broker.publish} hands it to the log. */
export interface NewEvent {
  /** Its topics. */
  readonly topics: readonly string[];
  /** The message's encoded fields without the `id:` line, ending with the blank line. */
  readonly text: string;
  /** Whether only clients granted one of its topics receive it. Defaults to false. */
  readonly private?: boolean;
}

/**
 * Rejects an append whose idempotency key was used, within the window, for
 * other events. {@linkcode createHandler} answers `422`.
 *
 * @example
 * ```ts
 * import { IdempotencyKeyError, MemoryLog } from "./mod.ts";
 *
 * const log = new MemoryLog();
 * await log.append([{ topics: [], text: "data: a\n\n" }], { idempotencyKey: "k" });
 * await log.append([{ topics: [], text: "data: b\n\n" }], { idempotencyKey: "k" })
 *   .catch((error) => console.log(error instanceof IdempotencyKeyError)); // true
 * ```
 */
export class IdempotencyKeyError extends Error {
  /** Says that the key was used for other events. */
  constructor() {
    super("the idempotency key was used for other events");
    this.name = "IdempotencyKeyError";
  }
}

/**
 * What identifies a batch of events under an idempotency key, for an
 * {@linkcode EventLog} to tell a repeat from another batch: equal for the
 * same topics, texts and privacy, in the same order.
 *
 * @example
 * ```ts
 * import { batchFingerprint } from "./mod.ts";
 *
 * const a = batchFingerprint([{ topics: ["t"], text: "data: 1\n\n" }]);
 * const b = batchFingerprint([{ topics: ["t"], text: "data: 1\n\n", private: true }]);
 * console.log(a === b); // false
 * ```
 *
 * @param events The batch, in order.
 * @returns A string, equal for equal batches.
 */
export function batchFingerprint(events: readonly NewEvent[]): string {
  // Stryker disable next-line EqualityOperator: inverted alike on both sides of the comparison
  return JSON.stringify(events.map(({ topics, text, private: p }) => [topics, text, p === true]));
}

/**
 * Thrown by {@linkcode Broker.publish} when the event log did not store the
 * event (a shared log's server is unreachable, say): nothing was published,
 * and the publisher may retry. {@linkcode createHandler} answers `503`.
 *
 * @example
 * ```ts
 * import { Broker, EventLogError } from "./mod.ts";
 *
 * try {
 *   await new Broker().publish({ data: "x" });
 * } catch (error) {
 *   if (error instanceof EventLogError) console.log("retry later:", error.cause);
 * }
 * ```
 */
export class EventLogError extends Error {
  /**
   * Wraps the log's own error as `cause`.
   *
   * @param cause Why the log refused the event.
   */
  constructor(cause: unknown) {
    super(`the event log did not store the event: ${(cause as Error)?.message ?? cause}`, {
      cause,
    });
    this.name = "EventLogError";
  }
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/**
 * Options for a {@linkcode Broker}.
 */
export interface BrokerOptions {
  /**
   * Where events are kept, ordered and given ids; a shared log lets several
   * processes serve the same events. Defaults to a `new MemoryLog()`, which
   * keeps the newest 1000; pass `new MemoryLog({ history })` to keep another
   * number.
   */
  eventLog?: EventLog;
  /**
   * Milliseconds between `:` comments on streams that sent nothing since the
   * last one, so proxies keep them open and dead peers show up as failed
   * writes; 0 turns heartbeats off. Defaults to 15000.
   */
  heartbeat?: number;
  /** The `retry:` sent first on every stream, in milliseconds; `null` sends none. Defaults to 2000. */
  retry?: number | null;
  /**
   * How many bytes may wait for one client before it counts as too slow and
   * is disconnected (it reconnects and replays what it missed). Defaults to 1 MiB.
   */
  maxQueueBytes?: number;
  /** Extra headers on every stream. Defaults to `access-control-allow-origin: *`. */
  headers?: HeadersInit;
  /**
   * Streams open at once, counting the places taken with
   * {@linkcode Broker.reserve} by other long-lived responses. Beyond it a subscriber is sent away: it gets a
   * `200` stream holding only a `retry:` drawn from `shedRetry` (and a
   * `Retry-After` header for other clients), which then ends, so an
   * `EventSource` comes back later; a `503` would make it give up for good.
   * Defaults to no limit.
   */
  maxClients?: number;
  /**
   * The range, in milliseconds, of the random `retry:` given to clients sent
   * away (past `maxClients`, or by {@linkcode Broker.drain}), so that they
   * come back spread out rather than all at once. Defaults to `[1000, 10000]`.
   */
  shedRetry?: readonly [min: number, max: number];
  /** Topics one client may name; more get `400`. Defaults to 32. */
  maxTopics?: number;
  /**
   * Events one {@linkcode Broker.publishBatch} may carry; a larger batch is
   * refused with a {@linkcode MessageError} (`400` over HTTP), so that no
   * publish holds a shared event log for long. Defaults to 1000.
   */
  maxBatch?: number;
  /**
   * Called with one line per connect, disconnect and slow-client cut; the
   * lines hold no request data. Defaults to none: the broker prints nothing.
   */
  logger?: (line: string) => void;
}

/**
 * How to subscribe one client; by default read from the request.
 */
export interface SubscribeOptions {
  /**
   * Receive only events published to one of these topics; none means every
   * event. Defaults to the request's `?topic=` parameters.
   */
  topics?: readonly string[];
  /**
   * Selectors of the private events this client receives: a topic, or a
   * pattern in which `*` matches any run of characters (`*` alone: every
   * topic; `user/42/*`: every topic under `user/42/`). Defaults to none: it
   * receives public events only.
   */
  grants?: readonly string[];
  /**
   * When to end the stream, in milliseconds since the epoch (a token's
   * expiry, say), so a revoked user does not listen for ever. A stream ends
   * after 24 days at most, and its client reconnects. Defaults to never.
   */
  expires?: number;
  /**
   * Resume after this event id; `"earliest"` replays every retained event;
   * `null` does not resume. Defaults to the `Last-Event-ID` header, or the
   * `?lastEventId=` parameter for clients that cannot set headers.
   */
  lastEventId?: string | null;
  /**
   * When not resuming from an id, first replay the retained events
   * published after this time, in milliseconds since the epoch. Defaults to
   * the `?since=` parameter (an ISO 8601 time), or none.
   */
  since?: number;
  /**
   * Write each event's topics into its frame, one `topic:` line each after
   * its `id:` (a private event's only where the client named or is granted
   * them), for a client that shares one stream among several consumers and
   * hands each its own topics (`client.ts`). `EventSource` ignores the
   * lines. Defaults to the `?withTopics=1` parameter, or false.
   */
  withTopics?: boolean;
}

/**
 * Options for one {@linkcode Broker.publish}.
 */
export interface PublishOptions {
  /**
   * The topics of the event. Clients that named topics receive it only if
   * they named one of these; clients that named none receive every event.
   * Defaults to none.
   */
  topics?: readonly string[];
  /**
   * Deliver the event only to clients granted one of its topics (see
   * {@linkcode SubscribeOptions.grants}); it needs at least one topic.
   * Defaults to false: every client that wants its topics receives it.
   */
  private?: boolean;
  /** See {@linkcode PublishBatchOptions.idempotencyKey}. Defaults to none. */
  idempotencyKey?: string;
}

/**
 * One event of a {@linkcode Broker.publishBatch}: a message and its
 * {@linkcode PublishOptions}.
 */
export interface BatchEntry {
  /** The event; `data` is required. */
  message: Omit<ServerSentEventMessage, "id">;
  /** See {@linkcode PublishOptions.topics}. Defaults to none. */
  topics?: readonly string[];
  /** See {@linkcode PublishOptions.private}. Defaults to false. */
  private?: boolean;
}

/**
 * Options for one {@linkcode Broker.publishBatch}.
 */
export interface PublishBatchOptions {
  /**
   * Publish once per key: a publisher that retries after an ambiguous
   * failure (the reply lost, the events stored) sends the same key, and a
   * repeat within the event log's window gets the first publish's ids and
   * publishes nothing; with a shared log, also when it reaches another
   * process. A repeat with other events rejects with
   * {@linkcode IdempotencyKeyError}. 1 to 256 printable characters.
   * Defaults to none.
   */
  idempotencyKey?: string;
}

/**
 * Why a request was refused, as counted in {@linkcode BrokerStats.rejected}:
 * `auth` (`401`, `403`), `validation` (`400`, `422`), `limits` (`408`, `413`, and
 * subscribers sent away past `maxClients`), `draining` (subscribers sent
 * away during {@linkcode Broker.drain}).
 */
export type RejectionReason = "auth" | "validation" | "limits" | "draining";

/**
 * Counts of a histogram, in the Prometheus layout: for each upper bound
 * (`"0.001"`, ..., `"+Inf"`), the number of observations at or below it.
 */
export interface Histogram {
  /** Upper bounds, lowest first, each with the observations at or below it. */
  buckets: { le: string; count: number }[];
  /** The sum of all observations. */
  sum: number;
  /** The number of observations (the `"+Inf"` bucket). */
  count: number;
}

/**
 * Counters of a {@linkcode Broker}, as returned by {@linkcode Broker.stats}.
 */
export interface BrokerStats {
  /** Streams open now. */
  clients: number;
  /** Places of `maxClients` held now by other long-lived responses ({@linkcode Broker.reserve}). */
  reserved: number;
  /** Streams opened since the broker was created. */
  connections: number;
  /** Of those, the streams that named no topic: they get every event. */
  clientsWithoutTopic: number;
  /**
   * Open streams per topic they named; a stream that named several topics
   * counts once under each. Topics nobody names are absent.
   */
  clientsByTopic: Record<string, number>;
  /** Events accepted by `publish`. */
  published: number;
  /** Events handed to clients live (one per client per event). */
  delivered: number;
  /** Events resent from the event log to reconnecting clients. */
  replayed: number;
  /** Clients disconnected because they fell more than `maxQueueBytes` behind. */
  slowDisconnects: number;
  /** Requests refused, by reason. */
  rejected: Record<RejectionReason, number>;
  /**
   * Seconds from a publish being accepted until its event is queued for
   * every client of this broker (the log's append included).
   */
  publishSeconds: Histogram;
  /** The id of the newest event, or `null` before the first. */
  lastEventId: string | null;
}

/**
 * A connection that a server writes a stream's bytes to itself: see
 * {@linkcode DIRECT_WRITE}.
 */
export interface DirectSink {
  /** Writes bytes to the connection. */
  write(chunk: Uint8Array): void;
  /**
   * The bytes written that wait for the client: the slow-client limit and
   * a replay's pause read it. It may leave out what the connection takes
   * without waiting (Node's socket buffer), as long as a `pull` follows
   * whenever it has said more than 0.
   */
  queued(): number;
  /** Ends the response once the bytes written have gone. */
  end(): void;
  /** Ends the connection at once, discarding what waits: the client sees an error. */
  destroy(): void;
}

/** What a broker stream's body holds under {@linkcode DIRECT_WRITE}. */
export interface DirectWrite {
  /**
   * Sends the stream's bytes to `sink` from now on, and answers `true`; or
   * answers `false` when the body may still hold bytes (read on, write what
   * was read, and try again).
   */
  attach(sink: DirectSink): boolean;
  /** Call when the sink has room again: a paused replay goes on. */
  pull(): void;
}

/**
 * The key of a {@linkcode DirectWrite} on the body of every stream a
 * {@linkcode Broker} returns, for a server that owns the connection: on
 * Node's `node:http`, each web-stream read costs promises, and writing to
 * the socket in the broker's own loop keeps the latency of the bare
 * `node:http` (`runtime.ts` does it). Once the server has written every
 * chunk it read and a read of the body waits,
 * `body[DIRECT_WRITE].attach(sink)` moves the stream to the sink; the body
 * then only ends (or errors) with it. Servers of `Response` need nothing of it.
 */
export const DIRECT_WRITE: unique symbol = Symbol.for("sse-broker.directWrite");

/**
 * Whether a broker should get traffic, as returned by {@linkcode Broker.health}.
 */
export interface Health {
  /** It takes subscribers and its event log answers. */
  ready: boolean;
  /** The event log answered its {@linkcode EventLog.ping} within a second. */
  eventLogUp: boolean;
  /** Why it is not ready (`"draining"`, `"closed"`, or the log's error); `null` when ready. */
  reason: string | null;
}

/** What a client's stream and request report back to the broker. */
interface ClientCallbacks {
  /** The runtime wants more of the stream: go on with a replay. */
  pull(client: Client): void;
  /** The runtime cancelled the stream: the client is gone. */
  cancel(client: Client): void;
  /** The request's signal aborted: the client is gone, or its response done. */
  abort(client: Client): void;
}

/**
 * Where a client is in its life. One that resumes starts `placing` and
 * replays until it reaches the events handed to live clients:
 *
 * - `placing`: the first read of the log after its `Last-Event-ID` is under
 *   way; the answer places the id, or reports a gap.
 * - `replaying`: it is sent what it missed, a page of the log at a time,
 *   while its queue has room; the stream's `pull` goes on.
 * - `reading`: a later read of the log for it is under way.
 * - `waiting`: it resumed from an event this broker has not handed out yet
 *   (another process of a shared log was faster), and waits for it.
 * - `live`: it is sent events as they are published. A client that does not
 *   resume starts here.
 * - `gone`: disconnected, cut or ended; nothing is sent to it any more.
 */
type ClientState = "placing" | "replaying" | "reading" | "waiting" | "live" | "gone";

/**
 * One open stream. It is its stream's underlying source and its request
 * signal's listener itself, so an idle client costs no closures: memory per
 * idle connection is what bounds how many one process can hold.
 */
class Client implements UnderlyingDefaultSource<Uint8Array>, EventListenerObject {
  /** Set in the stream's `start`, which runs inside the stream's constructor. */
  controller!: ReadableStreamDefaultController<Uint8Array>;
  /** Where the client is in its life; see {@linkcode ClientState}. */
  state: ClientState = "live";
  /**
   * The id of the last event replayed to the client, or its `Last-Event-ID`
   * before the first; `null` is before the oldest event the log retains.
   * Replay reads the log after it.
   */
  cursor: string | null = null;
  /** Events resent from the log to this client. */
  replayed = 0;
  /** Replay skips events published at or before this time (`?since=`). */
  since = -Infinity;
  /** Whether anything was sent since the last heartbeat tick. */
  active = false;
  /** Ends the stream when its permission expires. */
  expiry: ReturnType<typeof setTimeout> | undefined;
  /** The connection its bytes go to once its server writes them itself ({@linkcode DIRECT_WRITE}). */
  #direct: DirectSink | undefined;
  /** The stream's reader waits for bytes: `pull` came, and nothing was queued since. */
  #readWaiting = false;
  /**
   * At least the bytes waiting in its queue: the queue as last read plus
   * what was queued since (the runtime only ever takes bytes out). Reading
   * the queue (`desiredSize`) per flush per client was 8% of Bun's samples;
   * with this bound it is read only when it could be over a limit.
   */
  #queueBound = 0;

  /**
   * The client's topics as one string (sorted, one per line: topics hold no
   * control characters), after a NUL when it asked for `topic:` lines.
   * Clients with the same key (and the same grants of a flush's private
   * events, see {@linkcode grantedOf}) want the same bytes, so a flush
   * builds their chunk once.
   */
  readonly shareKey: string | undefined;
  /** Whether its frames carry `topic:` lines ({@linkcode SubscribeOptions.withTopics}). */
  readonly withTopics: boolean;
  /** The topics it named; `undefined` when it named none and wants every event. */
  readonly topics: ReadonlySet<string> | undefined;
  /** Matches the topics of the private events it may receive. */
  readonly grants: RegExp;
  readonly callbacks: ClientCallbacks;

  constructor(
    topics: ReadonlySet<string> | undefined,
    grants: RegExp,
    callbacks: ClientCallbacks,
    withTopics: boolean,
  ) {
    this.topics = topics;
    this.grants = grants;
    this.callbacks = callbacks;
    this.withTopics = withTopics;
    const topicKey = topics && [...topics].sort().join("\n");
    this.shareKey = withTopics ? `\0${topicKey ?? ""}` : topicKey;
  }

  /** The event's bytes as this client is sent them. */
  bytesOf(event: LogEvent): Uint8Array {
    if (!this.withTopics || event.topics.length === 0) return bytesOf(event);
    if (event.private !== true) return taggedBytesOf(event);
    const topics = event.topics.filter((t) => this.topics?.has(t) || this.grants.test(t));
    return encoder.encode(`id: ${event.id}\n${topicLines(topics)}${event.text}`);
  }

  start(controller: ReadableStreamDefaultController<Uint8Array>): void {
    this.controller = controller;
  }

  pull(): void {
    this.#readWaiting = true;
    this.callbacks.pull(this);
  }

  /** Queues bytes for the client. */
  enqueue(chunk: Uint8Array): void {
    this.#readWaiting = false;
    this.#queueBound += chunk.byteLength;
    if (this.#direct === undefined) this.controller.enqueue(chunk);
    else this.#direct.write(chunk);
  }

  /**
   * Whether more than `limit` bytes wait for the client: exact for its
   * stream; through a {@linkcode DirectSink}, as the sink counts them.
   */
  queuedOver(limit: number): boolean {
    if (this.#queueBound <= limit) return false;
    this.#queueBound = this.#direct?.queued() ?? -(this.controller.desiredSize ?? 0);
    return this.#queueBound > limit;
  }

  /** Ends the stream once what is queued has gone out. */
  close(): void {
    this.#direct?.end();
    try {
      this.controller.close();
    } catch {
      // already closed, cancelled or errored
    }
  }

  /** Ends the stream at once, discarding what is queued: the client sees an error. */
  fail(error: Error): void {
    this.#direct?.destroy();
    this.controller.error(error);
  }

  /**
   * Sends the client's bytes to `sink` from now on, if the stream's reader
   * has taken every byte queued so far (else nothing changes).
   */
  attach(sink: DirectSink): boolean {
    if (!this.#readWaiting || this.state === "gone") return false;
    this.#direct = sink;
    this.#queueBound = sink.queued();
    return true;
  }

  cancel(): void {
    this.callbacks.cancel(this);
  }

  handleEvent(): void {
    this.callbacks.abort(this);
  }

  /** Whether the client receives `event`: one of its topics, and granted if private. */
  wants(event: LogEvent): boolean {
    return (this.topics === undefined || event.topics.some((t) => this.topics!.has(t))) &&
      (event.private !== true || event.topics.some((t) => this.grants.test(t)));
  }
}

/**
 * Holds open event streams and broadcasts to them.
 *
 * Each event is encoded once and the same bytes are queued for every client;
 * a publish never waits for any client. A client whose queue passes
 * `maxQueueBytes` is disconnected rather than waited for, and resumes from
 * the event log when it reconnects with its `Last-Event-ID`.
 *
 * @example
 * ```ts
 * import { Broker } from "./mod.ts";
 *
 * const broker = new Broker();
 * const response = broker.subscribe(new Request("http://localhost/events"));
 * const id = await broker.publish({ event: "greeting", data: "hello" });
 * console.log(id, broker.stats().clients); // "<ms>-0" 1
 * broker.close(); // ends every stream
 * await response.text();
 * ```
 */
export class Broker {
  readonly #eventLog: EventLog;
  readonly #stopListening: () => void;
  readonly #heartbeatMs: number;
  readonly #maxQueueBytes: number;
  readonly #maxClients: number;
  readonly #maxTopics: number;
  readonly #maxBatch: number;
  readonly #shedRetry: readonly [number, number];
  readonly #logger: ((line: string) => void) | undefined;
  readonly #headers: Headers;
  /** The first bytes of every stream: its `retry:`, or an empty comment. */
  readonly #streamStart: Uint8Array<ArrayBuffer>;
  readonly #clients = new Set<Client>();
  readonly #clientCallbacks: ClientCallbacks = {
    pull: (client) => this.#catchUp.pull(client),
    cancel: (client) => this.#remove(client),
    abort: (client) => this.#end(client),
  };
  /** Clients that named no topic. */
  readonly #everyone = new Set<Client>();
  /** Clients by each topic they named. */
  readonly #byTopic = new Map<string, Set<Client>>();
  /**
   * Events the log reported but not yet handed to clients. Events that
   * arrive in one turn of the event loop go out together, as one chunk per
   * client: the per-chunk cost of a stream, paid per client, is what bounds
   * fan-out, so a burst of publishes costs about as much as one.
   */
  #batch: LogEvent[] = [];
  #flushScheduled = false;
  /**
   * How many events the last flush carried. More than one means publishes
   * arrive faster than flushes: the next flush waits a timer turn, so that
   * the publishes in flight join its batch. One means they come one by one:
   * the next goes at the end of this turn, without the timer's delay.
   */
  #lastBatchSize = 0;
  /** The newest event handed to live clients; a catching-up client replays up to here. */
  #liveId: string | null;
  /**
   * Settles at the next flush, for publishes waiting for their event to go
   * out; or, `late`, after {@linkcode DELIVERY_WAIT_MS} without one.
   */
  #flushed: Flushed | undefined;
  /** Resuming clients, until they are live. */
  readonly #catchUp: CatchUp;
  #heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  /**
   * `open` takes subscribers; `draining` sends new ones away while
   * {@linkcode Broker.drain} ends the open streams; `closed` has ended them
   * all and refuses publishes.
   */
  #state: "open" | "draining" | "closed" = "open";
  /** Places of `maxClients` taken by {@linkcode Broker.reserve} and not yet given back. */
  #reserved = 0;
  #connections = 0;
  #published = 0;
  #delivered = 0;
  #slowDisconnects = 0;
  readonly #rejected: Record<RejectionReason, number> = {
    auth: 0,
    validation: 0,
    limits: 0,
    draining: 0,
  };
  /** Publishes per bucket of {@linkcode PUBLISH_BUCKETS}, and past the last. */
  readonly #publishCounts: number[] = PUBLISH_BUCKETS.map(() => 0).concat(0);
  #publishSeconds = 0;

  /**
   * Creates a broker with no clients; it starts no timer until one subscribes.
   *
   * @param options See {@linkcode BrokerOptions}.
   */
  constructor(options: BrokerOptions = {}) {
    this.#eventLog = options.eventLog ?? new MemoryLog();
    this.#liveId = this.#eventLog.lastId;
    this.#stopListening = this.#eventLog.listen((events) => this.#receive(events));
    this.#heartbeatMs = checkCount("heartbeat", options.heartbeat ?? 15_000);
    this.#maxQueueBytes = checkCount("maxQueueBytes", options.maxQueueBytes ?? 1 << 20);
    this.#catchUp = new CatchUp(this.#eventLog, this.#maxQueueBytes, {
      liveId: () => this.#liveId,
      cut: (client) => this.#cut(client),
      fail: (client, error) => {
        // It reconnects after `retry` and resumes from its last event.
        this.#logger?.(`client ended: reading the event log failed: ${error?.message ?? error}`);
        this.#end(client);
      },
    });
    this.#maxClients = checkCount("maxClients", options.maxClients ?? Infinity);
    this.#maxTopics = checkCount("maxTopics", options.maxTopics ?? 32);
    this.#maxBatch = checkCount("maxBatch", options.maxBatch ?? 1000);
    const [min, max] = options.shedRetry ?? [1000, 10_000];
    this.#shedRetry = [
      checkCount("shedRetry[0]", min, false),
      checkCount("shedRetry[1]", max, false),
    ];
    if (!(min <= max)) throw new RangeError("shedRetry: the minimum must not exceed the maximum");
    this.#logger = options.logger;
    const retry = options.retry === undefined ? 2000 : options.retry;
    // The first bytes must go out at once: Bun sends no headers before the
    // first body chunk, and an EventSource stays "connecting" until then.
    this.#streamStart = encodeMessage(retry === null ? { comment: "" } : { retry });
    this.#headers = new Headers({ "access-control-allow-origin": "*" });
    new Headers(options.headers).forEach((value, name) => this.#headers.set(name, value));
    for (const [name, value] of Object.entries(EVENT_STREAM_HEADERS)) {
      this.#headers.set(name, value);
    }
  }

  /**
   * Opens an event stream for one client and returns its `Response`.
   *
   * A client that does not resume is first sent the id of the newest event
   * (an `id:` line alone, which dispatches no event), so that it resumes
   * from where it joined if it reconnects before its first event.
   *
   * Topics come from `?topic=` (repeatable) and the resume point from the
   * `Last-Event-ID` header or `?lastEventId=`, unless `options` says
   * otherwise. A resuming client first receives every retained event after
   * its id, then an `event: replayed` with `data: {"count": N}`, then live
   * events, with nothing lost or repeated at the seam. If its id cannot be
   * placed in the event log (too old, from an earlier run of the server, or
   * malformed), it is first sent an `event: gap` and then every retained
   * event. Neither of these two events carries an id.
   *
   * Answers `400` for an invalid topic or too many. Past `maxClients`, and
   * while draining, the client is sent away: its stream holds only a
   * random `retry:` from `shedRetry` and ends, with a `Retry-After` header.
   * Once the broker is closed, the stream holds only its first bytes (the
   * `retry:`) and ends, so clients retry later.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * const handler = (request: Request) => broker.subscribe(request);
   * const response = handler(new Request("http://localhost/?topic=news"));
   * console.log(response.headers.get("content-type")); // "text/event-stream"
   * broker.close();
   * await response.body?.cancel();
   * ```
   *
   * @param request The client's request; its signal ends the stream.
   * @param options Topics and resume point, overriding the request's.
   * @returns The event stream, or an error response.
   */
  subscribe(request: Request, options: SubscribeOptions = {}): Response {
    // A closed broker ends new streams at once, as it ended the open ones:
    // an EventSource then retries (and finds the restarted server), where a
    // 503 would make it give up for good.
    if (this.#state === "closed") {
      return new Response(this.#streamStart, { headers: this.#headers });
    }
    if (this.#state === "draining") return this.#sendAway("draining");
    if (this.#clients.size + this.#reserved >= this.#maxClients) return this.#sendAway("limits");
    const url = new URL(request.url);
    const topics = options.topics ?? url.searchParams.getAll("topic");
    if (topics.length > this.#maxTopics) {
      this.#rejected.validation++;
      return new HttpError(400, `at most ${this.#maxTopics} topics per client`).response();
    }
    const invalid = topics.find((topic) => !isTopic(topic));
    if (invalid !== undefined) {
      this.#rejected.validation++;
      return new HttpError(400, `invalid topic ${JSON.stringify(invalid.slice(0, 64))}`).response();
    }
    const lastEventId = options.lastEventId !== undefined
      ? options.lastEventId
      : request.headers.get("last-event-id") ?? url.searchParams.get("lastEventId");
    const sinceText = url.searchParams.get("since");
    // -Infinity: every retained event is newer.
    const since = options.since ?? (sinceText === null ? -Infinity : parseTime(sinceText));
    if (Number.isNaN(since)) {
      this.#rejected.validation++;
      return new HttpError(400, "since must be an ISO 8601 time, such as 2026-01-31T12:00:00Z")
        .response();
    }

    const client = new Client(
      topics.length > 0 ? new Set(topics) : undefined,
      options.grants === undefined ? NO_GRANTS : selectorPattern(options.grants),
      this.#clientCallbacks,
      options.withTopics ?? url.searchParams.get("withTopics") === "1",
    );
    const body = new ReadableStream(client, BYTE_QUEUING);
    Object.defineProperty(body, DIRECT_WRITE, { value: client satisfies DirectWrite });
    // From an id; from the oldest retained event (`earliest`, or `since`,
    // which skips the older ones); or not at all.
    const resumes = Boolean(lastEventId) || since !== -Infinity;
    // A client that does not resume is told where it joined (an `id:` with
    // no data sets its last event id and dispatches nothing), so that even
    // before its first event a reconnect resumes with nothing lost.
    client.enqueue(
      !resumes && this.#liveId !== null
        ? concat([this.#streamStart, encodeMessage({ id: this.#liveId })])
        : this.#streamStart,
    );
    if (!lastEventId) client.since = since;
    this.#add(client, resumes, lastEventId === "earliest" || !lastEventId ? null : lastEventId);
    if (options.expires !== undefined) {
      const ms = Math.min(Math.max(options.expires - Date.now(), 0), MAX_TIMER_MS);
      client.expiry = setTimeout(() => this.#end(client), ms);
    }
    // Some runtimes report a vanished client only through the request's
    // signal, others only by cancelling the body: either one removes it.
    if (request.signal.aborted) this.#end(client);
    else request.signal.addEventListener("abort", client, ONCE);
    return new Response(body, { headers: this.#headers });
  }

  /**
   * Publishes an event to every client subscribed to its topics: appends it
   * to the event log, which gives it its id (so ids only ever increase; a
   * message that carries its own `id` is refused), and every broker that
   * listens to the log delivers it.
   *
   * Encodes once and queues the same bytes for every client; it never waits
   * for a client. Events that arrive in the same turn of the event loop are
   * queued together, as one chunk per client; the promise resolves once the
   * event is in the log and queued for this broker's clients. Rejects with
   * {@linkcode MessageError} for a message that cannot be encoded, with
   * {@linkcode EventLogError} when the log did not store it, and with
   * {@linkcode IdempotencyKeyError} for a key used for another event;
   * nothing is sent then.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * const id = await broker.publish({ event: "price", data: "42" }, { topics: ["ACME"] });
   * console.log(id); // "<ms>-0"
   * broker.close();
   * ```
   *
   * @param message The event; `data` is required.
   * @param options The event's topics, whether it is private, an idempotency key.
   * @returns The id the event was given.
   */
  async publish(
    message: Omit<ServerSentEventMessage, "id">,
    options: PublishOptions = {},
  ): Promise<string> {
    const { topics, private: isPrivate, idempotencyKey } = options;
    const [id] = await this.#publish([{ message, topics, private: isPrivate }], idempotencyKey);
    return id;
  }

  /**
   * Publishes several events in order, all or none: each is checked as
   * {@linkcode Broker.publish} checks one (a refusal names the index, as
   * `[2].event`), then all reach the event log in one append, next to each
   * other, and clients receive them in that order.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * const ids = await broker.publishBatch([
   *   { message: { data: "first" } },
   *   { message: { data: "second" }, topics: ["news"] },
   * ]);
   * console.log(ids.length); // 2
   * broker.close();
   * ```
   *
   * @param entries The events and their options.
   * @param options An idempotency key for the whole batch.
   * @returns The ids the events were given, in order.
   */
  publishBatch(
    entries: readonly BatchEntry[],
    options: PublishBatchOptions = {},
  ): Promise<string[]> {
    return this.#publish(entries, options.idempotencyKey, true);
  }

  async #publish(
    entries: readonly BatchEntry[],
    idempotencyKey: string | undefined,
    isBatch = false,
  ): Promise<string[]> {
    this.#refuseIfClosed();
    let events: NewEvent[];
    try {
      if (!Array.isArray(entries) || entries.length === 0) {
        throw new MessageError("entries", "must be a non-empty array");
      }
      if (entries.length > this.#maxBatch) {
        throw new MessageError("entries", `must be at most ${this.#maxBatch} events`);
      }
      if (idempotencyKey !== undefined && !isTopic(idempotencyKey)) {
        throw new MessageError("idempotencyKey", "must be 1 to 256 printable characters");
      }
      // Validate every event before any reaches the log, so a refused
      // batch publishes nothing and leaves no hole in the ids.
      events = entries.map((entry, index) => {
        try {
          return newEvent(entry);
        } catch (error) {
          if (!isBatch || !(error instanceof MessageError)) throw error;
          throw new MessageError(
            `[${index}].${error.field}`,
            error.message.slice(error.field.length + 1),
          );
        }
      });
    } catch (error) {
      this.#rejected.validation++; // only MessageErrors are thrown above
      throw error;
    }
    const accepted = performance.now();
    let appended: Appended;
    try {
      appended = await this.#eventLog.append(events, { idempotencyKey });
    } catch (error) {
      if (error instanceof IdempotencyKeyError) {
        this.#rejected.validation++;
        throw error;
      }
      throw new EventLogError(error);
    }
    const { ids, repeated } = appended;
    if (!repeated) this.#published += ids.length;
    // The events come back through the log's listener, in the log's order;
    // a log slow to tell (a shared log's server stalled) holds the publish
    // no longer than DELIVERY_WAIT_MS: the events are stored, and go out
    // once the listener has them.
    while (this.#state !== "closed" && isNewer(ids[ids.length - 1], this.#liveId)) {
      const flushed = this.#flushed ??= this.#nextFlush();
      await flushed.promise;
      if (flushed.late) break;
    }
    const seconds = (performance.now() - accepted) / 1000;
    // Stryker disable next-line EqualityOperator: a float on a bound exactly
    const bucket = PUBLISH_BUCKETS.findIndex((bound) => seconds <= bound);
    this.#publishCounts[bucket === -1 ? PUBLISH_BUCKETS.length : bucket]++;
    this.#publishSeconds += seconds;
    return ids;
  }

  /** What publishes wait on until the next flush, late after DELIVERY_WAIT_MS. */
  #nextFlush(): Flushed {
    // Not Promise.withResolvers: Node 20 has none.
    let resolve!: () => void;
    const promise = new Promise<void>((settle) => resolve = settle);
    const flushed: Flushed = { promise, resolve, late: false, timer: undefined };
    flushed.timer = setTimeout(() => {
      flushed.late = true;
      if (this.#flushed === flushed) this.#flushed = undefined;
      flushed.resolve();
    }, DELIVERY_WAIT_MS);
    return flushed;
  }

  /**
   * Sends every client away gradually, for a server about to stop: from now
   * on subscribers are sent away as past `maxClients`, and
   * {@linkcode Broker.health} reports `draining`; the open streams end one
   * after another, spread evenly over `ms`, each with a random `retry:` from
   * `shedRetry`, so that their clients reconnect to other servers a few at
   * a time. Publishing goes on meanwhile. Resolves once every stream has
   * ended; then call {@linkcode Broker.close}. Does nothing unless the
   * broker is open.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * const response = broker.subscribe(new Request("http://localhost/events"));
   * await broker.drain(100);
   * console.log(broker.stats().clients); // 0
   * broker.close();
   * await response.text();
   * ```
   *
   * @param ms Over how many milliseconds to spread the ends of the streams.
   */
  async drain(ms: number): Promise<void> {
    checkCount("ms", ms, false);
    if (this.#state !== "open") return;
    this.#state = "draining";
    const clients = [...this.#clients];
    const started = performance.now();
    let ended = 0;
    while (this.#state === "draining") {
      // Client i ends once i / n of the time has passed; with no time, all at once.
      // Stryker disable next-line ConditionalExpression: 0 / 0 needs no time to pass, then a tick
      const share = ms === 0 ? 1 : (performance.now() - started) / ms;
      const due = Math.min(clients.length, Math.ceil(share * clients.length));
      for (; ended < due; ended++) {
        const client = clients[ended];
        if (client.state === "gone") continue;
        client.enqueue(encodeMessage({ retry: this.#randomRetry() }));
        this.#end(client);
      }
      if (ended === clients.length) return;
      await new Promise((resolve) => setTimeout(resolve, DRAIN_TICK_MS));
    }
  }

  /**
   * Whether this broker should get traffic: open, and its event log
   * answers {@linkcode EventLog.ping} within a second. For a readiness
   * route: answer `503` when `ready` is false.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * console.log(await broker.health()); // { ready: true, eventLogUp: true, reason: null }
   * broker.close();
   * ```
   */
  async health(): Promise<Health> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("no answer within 1 s")), PING_TIMEOUT_MS);
    });
    let logError: string | null = null;
    try {
      await Promise.race([this.#eventLog.ping?.(), timeout]);
    } catch (error) {
      logError = `the event log did not answer: ${(error as Error)?.message ?? error}`;
    }
    // Stryker disable next-line all: a timer left behind only fires into a settled race
    clearTimeout(timer);
    const reason = this.#state === "open" ? logError : this.#state;
    return { ready: reason === null, eventLogUp: logError === null, reason };
  }

  /**
   * Takes one of the `maxClients` places for a long-lived response that this
   * broker does not serve itself (a Durable Streams live read, a path
   * check), so that one budget bounds every response held open. Refused,
   * and counted as refused (`limits`, or `draining`), when every place is
   * taken or the broker is not open.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker({ maxClients: 1 });
   * const release = broker.reserve();
   * console.log(release !== undefined, broker.reserve()); // true undefined
   * release?.(); // once the response has ended
   * broker.close();
   * ```
   *
   * @returns The function that gives the place back once the response has
   *   ended (calling it again does nothing), or `undefined` when refused.
   */
  reserve(): (() => void) | undefined {
    if (this.#state !== "open" || this.#clients.size + this.#reserved >= this.#maxClients) {
      this.#rejected[this.#state === "draining" ? "draining" : "limits"]++;
      return undefined;
    }
    this.#reserved++;
    let held = true;
    return () => {
      if (held) this.#reserved--;
      held = false;
    };
  }

  /**
   * Counts a request refused before it reached the broker, in
   * {@linkcode BrokerStats.rejected}: for a handler of your own that checks
   * access or input (the one of {@linkcode createHandler} counts its own).
   *
   * @param reason Why it was refused.
   */
  countRejection(reason: RejectionReason): void {
    if (Object.hasOwn(this.#rejected, reason)) this.#rejected[reason]++;
  }

  #refuseIfClosed(): void {
    if (this.#state === "closed") throw new Error("the broker is closed");
  }

  /** A stream that holds only a random `retry:` and ends: the client comes back later. */
  #sendAway(reason: RejectionReason): Response {
    this.#rejected[reason]++;
    const retry = this.#randomRetry();
    const headers = new Headers(this.#headers);
    headers.set("retry-after", String(Math.ceil(retry / 1000)));
    const comment = reason === "draining" ? "the server is stopping" : "too many clients";
    return new Response(encodeMessage({ comment, retry }), { headers });
  }

  #randomRetry(): number {
    const [min, max] = this.#shedRetry;
    return min + Math.floor(Math.random() * (max - min + 1));
  }

  /**
   * Ends every stream cleanly (clients see the end of the response and
   * reconnect, here or elsewhere), stops the heartbeat and stops listening
   * to the event log (closing a log you passed in is yours to do). Later
   * subscriptions get a stream that ends at once, so clients retry, and
   * publishes are refused. Safe to call twice.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * broker.close();
   * const response = broker.subscribe(new Request("http://localhost/"));
   * console.log(await response.text()); // "retry: 2000\n\n", then the end
   * ```
   */
  close(): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#stopListening();
    this.#flush(); // accepted events go out before the streams end
    clearTimeout(this.#flushed?.timer);
    this.#flushed?.resolve();
    for (const client of [...this.#clients]) this.#end(client);
  }

  /**
   * Counters since the broker was created, and the number of open streams.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * await broker.publish({ data: "x" });
   * console.log(broker.stats().published); // 1
   * broker.close();
   * ```
   */
  stats(): BrokerStats {
    let count = 0;
    const buckets = this.#publishCounts.map((n, i) => ({
      le: String(PUBLISH_BUCKETS[i] ?? "+Inf"),
      count: count += n,
    }));
    return {
      clients: this.#clients.size,
      reserved: this.#reserved,
      connections: this.#connections,
      clientsWithoutTopic: this.#everyone.size,
      clientsByTopic: Object.fromEntries(
        [...this.#byTopic].map(([topic, clients]) => [topic, clients.size]),
      ),
      published: this.#published,
      delivered: this.#delivered,
      replayed: this.#catchUp.replayed,
      slowDisconnects: this.#slowDisconnects,
      rejected: { ...this.#rejected },
      publishSeconds: { buckets, sum: this.#publishSeconds, count },
      lastEventId: this.#liveId,
    };
  }

  /** Counts a client in, and starts its replay when it resumes, after `cursor`. */
  #add(client: Client, resumes: boolean, cursor: string | null): void {
    this.#clients.add(client);
    this.#connections++;
    if (client.topics === undefined) this.#everyone.add(client);
    else {
      for (const topic of client.topics) {
        let set = this.#byTopic.get(topic);
        if (set === undefined) this.#byTopic.set(topic, set = new Set());
        set.add(client);
      }
    }
    this.#logger?.(`client connected (${this.#clients.size} open)`);
    if (resumes) this.#catchUp.start(client, cursor);
    if (this.#heartbeatTimer === undefined && this.#heartbeatMs > 0) {
      this.#heartbeatTimer = setInterval(() => this.#heartbeat(), this.#heartbeatMs);
    }
  }

  /** Forgets a client; idempotent, as several signals may report one disconnect. */
  #remove(client: Client): void {
    if (client.state === "gone") return;
    clearTimeout(client.expiry);
    this.#catchUp.forget(client);
    client.state = "gone";
    this.#clients.delete(client);
    this.#logger?.(`client disconnected (${this.#clients.size} open)`);
    if (client.topics === undefined) this.#everyone.delete(client);
    else {
      for (const topic of client.topics) {
        const set = this.#byTopic.get(topic)!;
        set.delete(client);
        if (set.size === 0) this.#byTopic.delete(topic);
      }
    }
    if (this.#clients.size === 0) {
      clearInterval(this.#heartbeatTimer);
      this.#heartbeatTimer = undefined;
    }
  }

  /** Removes a client and ends its stream once what is queued has gone out. */
  #end(client: Client): void {
    this.#remove(client);
    client.close();
  }

  /**
   * Cuts a client that fell too far behind. Erroring the stream discards its
   * queue at once (closing would keep it until the client read it all) and
   * aborts the response, so the client reconnects and replays from the event log.
   */
  #cut(client: Client): void {
    this.#slowDisconnects++;
    this.#logger?.(`client cut: more than ${this.#maxQueueBytes} bytes behind`);
    this.#remove(client);
    client.fail(new Error("client too slow"));
  }

  /** Takes new events from the log, to hand out together once this turn's publishes are in. */
  #receive(events: readonly LogEvent[]): void {
    for (const event of events) this.#batch.push(event);
    // Which turn the flush runs in changes when, not what, it sends: a flush
    // scheduled twice finds its batch sent, and either turn sends the same
    // events. Which turn is sooner is measured (bench/profile.mjs), not asserted.
    // Stryker disable next-line all: when, not what (above)
    if (this.#flushScheduled) return;
    // Stryker disable next-line all: when, not what (above)
    this.#flushScheduled = true;
    // Stryker disable next-line all: when, not what (above)
    const schedule = this.#lastBatchSize > 1 ? afterTimer : endOfTurn;
    schedule(() => this.#flush());
  }

  /** Hands the batch to live clients: one chunk each, shared by all that want the same events. */
  #flush(): void {
    // A flush scheduled before close() flushed finds an empty batch.
    this.#flushScheduled = false;
    const batch = this.#batch;
    if (batch.length === 0) return;
    this.#batch = [];
    // Stryker disable next-line all: it only picks the turn of the next flush (see #receive)
    this.#lastBatchSize = batch.length;
    this.#liveId = batch[batch.length - 1].id;
    // Clients that want the same events share one chunk, built once. They
    // want the same when they named the same topics and, if some events are
    // private, are granted the same of those: clients with other grants but
    // the same events still share.
    const privateEvents = batch.filter((event) => event.private === true);
    const shares = new Map<string | undefined, Map<string, Share>>();
    const shareOf = (client: Client): Share => {
      let byGrants = shares.get(client.shareKey);
      if (byGrants === undefined) shares.set(client.shareKey, byGrants = new Map());
      const granted = grantedOf(client, privateEvents);
      let share = byGrants.get(granted);
      if (share === undefined) {
        const wanted = batch.filter((event) => client.wants(event));
        byGrants.set(
          granted,
          share = {
            chunk: concat(wanted.map((event) => client.bytesOf(event))),
            events: wanted.length,
          },
        );
      }
      return share;
    };
    // Without private events, every client that named no topic (and wants
    // no `topic:` lines) wants the whole batch: one chunk for all, looked up
    // once per flush, not per client.
    let all: Share | undefined;
    for (const client of this.#everyone) {
      const same = privateEvents.length === 0 && !client.withTopics;
      this.#send(client, same ? all ??= shareOf(client) : shareOf(client));
    }
    this.#flushTopics(batch, shareOf);
    this.#catchUp.flushed();
    const flushed = this.#flushed;
    this.#flushed = undefined;
    clearTimeout(flushed?.timer);
    flushed?.resolve();
  }

  /**
   * Each client that named topics gets one chunk of the events it wants, in
   * order and once each, built once for all clients with the same topics.
   */
  #flushTopics(batch: readonly LogEvent[], shareOf: (client: Client) => Share): void {
    const sent = new Set<Client>();
    for (const event of batch) {
      for (const topic of event.topics) {
        for (const client of this.#byTopic.get(topic) ?? []) {
          if (sent.has(client)) continue;
          sent.add(client);
          this.#send(client, shareOf(client));
        }
      }
    }
  }

  #send(client: Client, { chunk, events }: Share): void {
    // A client still catching up gets these events from the log, in order;
    // one granted none of a batch's private events may want none of it.
    if (client.state !== "live" || events === 0) return;
    client.active = true;
    this.#delivered += events;
    this.#queue(client, chunk);
  }

  /** Queues live bytes for a client, and cuts it if that puts it too far behind. */
  #queue(client: Client, chunk: Uint8Array): void {
    client.enqueue(chunk);
    if (client.queuedOver(this.#maxQueueBytes)) this.#cut(client);
  }

  #heartbeat(): void {
    for (const client of this.#clients) {
      // Not while replaying: the replayed events are on their way.
      const idle = !client.active && (client.state === "live" || client.state === "waiting");
      if (idle) this.#queue(client, HEARTBEAT);
      client.active = false;
    }
  }
}

// ---------------------------------------------------------------------------
// Catching up: from a Last-Event-ID to the live events
// ---------------------------------------------------------------------------

/** What a {@linkcode CatchUp} needs of its broker. */
interface CatchUpHost {
  /** The newest event handed to live clients, or `null` before any. */
  liveId(): string | null;
  /** Cuts a client that fell behind what the log keeps: it resumes with a gap. */
  cut(client: Client): void;
  /** Ends a client whose read of the log failed: it reconnects and resumes. */
  fail(client: Client, error: Error | undefined): void;
}

/**
 * Brings resuming clients up to the live events, one broker's worth: reads
 * the event log after each one's cursor a page at a time while its queue
 * has room, places its `Last-Event-ID` (or reports a gap), and joins it to
 * live delivery at the seam with nothing lost or repeated; a client that
 * resumed from an event this broker has not handed out yet (another process
 * of a shared log was faster) waits for it. It drives each client's state
 * from `placing` through `replaying` and `reading` to `waiting` or `live`
 * (see {@linkcode ClientState}).
 */
class CatchUp {
  readonly #eventLog: EventLog;
  /** A client with more bytes than this queued has half its queue full (at least maxQueueBytes / 2). */
  readonly #halfFull: number;
  readonly #host: CatchUpHost;
  /** The clients in state `waiting`, so a flush finds them without a scan. */
  readonly #waiting = new Set<Client>();
  /** Events resent from the log, to every client. */
  replayed = 0;

  constructor(eventLog: EventLog, maxQueueBytes: number, host: CatchUpHost) {
    this.#eventLog = eventLog;
    this.#halfFull = Math.ceil(maxQueueBytes / 2) - 1;
    this.#host = host;
  }

  /** Starts a client's catching up after `cursor` (`null`: from the oldest retained event). */
  start(client: Client, cursor: string | null): void {
    // The log places the id as the replay's first read, which starts now.
    // Events published meanwhile are in the log after it: the seam has no gap.
    client.state = "placing";
    client.cursor = cursor;
    this.#read(client);
    this.pull(client);
  }

  /**
   * Feeds a replaying client from the log while its queue has room, up to
   * the newest event handed to live clients, then makes it live. Replay
   * stops once it has filled half the queue, leaving the rest for live
   * events once it catches up; the stream's next `pull` goes on.
   */
  pull(client: Client): void {
    while (client.state === "replaying" && !client.queuedOver(this.#halfFull)) {
      this.#read(client);
    }
  }

  /** After a flush: a waiting client reads the log again, and finds its event or is still ahead. */
  flushed(): void {
    for (const client of this.#waiting) {
      this.#waiting.delete(client);
      client.state = "replaying";
      this.pull(client);
    }
  }

  /** Forgets a client that is gone. */
  forget(client: Client): void {
    this.#waiting.delete(client);
  }

  /** Reads the next page of the log after the client's cursor, and sends what it finds. */
  #read(client: Client): void {
    const liveAtRead = this.#host.liveId();
    const read = this.#eventLog.read(client.cursor, REPLAY_PAGE);
    if (!("then" in read)) return this.#sendRead(client, read, liveAtRead);
    if (client.state === "replaying") client.state = "reading";
    read.then((result) => {
      if (client.state !== "placing" && client.state !== "reading") return; // gone meanwhile
      this.#sendRead(client, result, liveAtRead);
      this.pull(client);
    }, (error) => {
      if (client.state !== "gone") this.#host.fail(client, error);
    });
  }

  /** Sends a replaying client what a read of the log found, and moves it on. */
  #sendRead(client: Client, read: LogRead, liveAtRead: string | null): void {
    const { events, gap } = read;
    if (gap) {
      if (client.state !== "placing") {
        // The log dropped events that this client, reading slower than
        // others publish, had not read yet.
        return this.#host.cut(client);
      }
      const oldestId = events[0]?.id ?? null;
      client.enqueue(
        encodeMessage({ event: "gap", data: JSON.stringify({ oldestId }) }),
      );
      client.cursor = null;
    }
    client.state = "replaying";
    const liveId = this.#host.liveId();
    for (const event of events) {
      // Events past the live ones reach this client live, as it is now current.
      if (isNewer(event.id, liveId)) return this.#goLive(client);
      if (client.queuedOver(this.#halfFull)) return;
      client.cursor = event.id;
      if (client.wants(event) && parseEventId(event.id)![0] > client.since) {
        client.enqueue(client.bytesOf(event));
        client.replayed++;
        this.replayed++;
      }
    }
    // The log holds nothing more up to the live events (it keeps none, say),
    // unless some arrived while it was read.
    if (events.length < REPLAY_PAGE && liveAtRead === liveId) this.#goLive(client);
  }

  /**
   * Ends a client's replay. A client that resumed from an event this broker
   * has not handed out yet (another process of a shared log was faster)
   * waits for it, so it gets nothing twice.
   */
  #goLive(client: Client): void {
    if (client.cursor !== null && isNewer(client.cursor, this.#host.liveId())) {
      client.state = "waiting";
      this.#waiting.add(client);
      return;
    }
    client.state = "live";
    client.enqueue(replayedMessage(client.replayed));
  }
}

/** Events per read of the log during a replay. */
const REPLAY_PAGE = 512;

/** Tells a resuming client that it has caught up, and how many events it missed. */
function replayedMessage(count: number): Uint8Array {
  return encodeMessage({ event: "replayed", data: JSON.stringify({ count }) });
}

/** Whether event `id` is newer than `liveId`, the newest event handed to live clients. */
function isNewer(id: string, liveId: string | null): boolean {
  return liveId === null || compareIds(id, liveId) > 0;
}

/**
 * The headers of every event stream this project sends (the broker's, a
 * Durable Stream's SSE reads, the path check): its type, and what makes
 * proxies pass it on at once and unchanged: no caching (`no-cache` as the
 * Durable Streams protocol asks, `no-store`), no transformation, and no
 * buffering (`X-Accel-Buffering`, which nginx honours). No `connection` or
 * `transfer-encoding`: HTTP/2 forbids them.
 *
 * @example
 * ```ts
 * import { EVENT_STREAM_HEADERS } from "./mod.ts";
 *
 * const body = new ReadableStream();
 * const response = new Response(body, { headers: EVENT_STREAM_HEADERS });
 * console.log(response.headers.get("cache-control")); // "no-cache, no-store, no-transform"
 * ```
 */
export const EVENT_STREAM_HEADERS: Readonly<Record<string, string>> = Object.freeze({
  "content-type": "text/event-stream",
  "cache-control": "no-cache, no-store, no-transform",
  "x-accel-buffering": "no",
});

const HEARTBEAT = encodeMessage({ comment: "" });
/** What publishes wait on for their events to go out: the next flush, or its deadline. */
interface Flushed {
  promise: Promise<void>;
  resolve: () => void;
  /** Whether it settled at the deadline, with no flush. */
  late: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
}
/**
 * How long a publish waits for the event log to report its events before it
 * resolves anyway: they are stored, and go out once the log reports them.
 */
const DELIVERY_WAIT_MS = 1000;
/**
 * Which of `events` (private ones) `client` is granted, as a key; with
 * `topic:` lines, its grants themselves, which decide a private event's
 * lines (so public events alone are still shared by every such client).
 */
function grantedOf(client: Client, events: readonly LogEvent[]): string {
  const key = events.map((event) => event.topics.some((topic) => client.grants.test(topic)))
    .join();
  return client.withTopics && events.length > 0 ? `${key}\0${client.grants.source}` : key;
}

/** One chunk of a flush, shared by the clients that want the same events. */
interface Share {
  chunk: Uint8Array;
  events: number;
}

/** Matches no topic: the grants of a client given none, shared by all such clients. */
const NO_GRANTS = /(?!)/;
/** The longest delay timers take (about 24.8 days); longer ones would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/**
 * Runs a callback at the end of this turn of the event loop, after the I/O
 * callbacks already due: `setImmediate` where the runtime has it (Deno, Bun,
 * Node), else a timer turn. The broker hands out the publishes of a turn
 * together this way; `streams.ts` reads the appends of a turn together.
 *
 * @example
 * ```ts
 * import { endOfTurn } from "./mod.ts";
 *
 * endOfTurn(() => console.log("after this turn's I/O"));
 * ```
 */
export const endOfTurn: (callback: () => void) => void =
  // Stryker disable next-line all: the fallback is for runtimes without setImmediate, and every test runtime has it
  (globalThis as { setImmediate?: (callback: () => void) => void }).setImmediate ??
    // Stryker disable next-line all: as above
    ((callback) => setTimeout(callback, 0));
/** Runs a callback after a timer turn, when the publishes in flight have joined the batch. */
// Stryker disable next-line all: when, not what (see Broker's #receive)
const afterTimer = (callback: () => void) => setTimeout(callback, 0);
/** Upper bounds, in seconds, of the buckets of {@linkcode BrokerStats.publishSeconds}. */
const PUBLISH_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
/** How often a drain ends the streams that are due. */
const DRAIN_TICK_MS = 25;
/** How long {@linkcode Broker.health} waits for the event log. */
const PING_TIMEOUT_MS = 1000;
// Stryker disable next-line ObjectLiteral,BooleanLiteral: a signal fires abort once anyway
const ONCE = { once: true };

/**
 * Every stream's queuing strategy: sizes in bytes, and a high-water mark of
 * 0, so `pull` runs only when the runtime asks for more and `desiredSize`
 * is minus the bytes waiting. A large mark would cost memory for nothing:
 * Bun holds about 7 KiB more per idle stream with a 1 MiB one.
 */
const BYTE_QUEUING: QueuingStrategy<Uint8Array> = {
  highWaterMark: 0,
  size: (chunk) => chunk.byteLength,
};

// ---------------------------------------------------------------------------
// Signed tokens (JWT)
// ---------------------------------------------------------------------------

/**
 * Options for {@linkcode jwtVerifier}: one key, and the claims to require.
 *
 * @example
 * ```ts
 * import type { JwtOptions } from "./mod.ts";
 *
 * const options: JwtOptions = { secret: "a shared secret of at least 32 bytes!", audience: "sse" };
 * ```
 */
export interface JwtOptions {
  /** The shared secret of HS256 tokens, at least 32 bytes. Give this or `publicKey`. */
  secret?: string;
  /**
   * A public key in PEM (`-----BEGIN PUBLIC KEY-----`, SPKI): RSA for RS256,
   * P-256 for ES256, or Ed25519 for EdDSA. The key decides the one algorithm
   * accepted. Give this or `secret`.
   */
  publicKey?: string;
  /** The audience a token must name in `aud`. Defaults to none checked. */
  audience?: string;
  /** The issuer a token must name in `iss`. Defaults to none checked. */
  issuer?: string;
  /** Seconds of clock difference allowed when checking `exp` and `nbf`. Defaults to 5. */
  leeway?: number;
}

/**
 * Thrown when a token is refused. The message is the reason, short and safe
 * to send back (`expired`, `bad signature`, ...): it never holds the token.
 *
 * @example
 * ```ts
 * import { jwtVerifier, TokenError } from "./mod.ts";
 *
 * const verify = await jwtVerifier({ secret: "a shared secret of at least 32 bytes!" });
 * try {
 *   await verify("not.a.token");
 * } catch (error) {
 *   if (error instanceof TokenError) console.log(error.message); // "malformed token"
 * }
 * ```
 */
export class TokenError extends Error {
  /**
   * Creates the error.
   *
   * @param reason Why the token was refused.
   */
  constructor(reason: string) {
    super(reason);
    this.name = "TokenError";
  }
}

/** The WebCrypto algorithm of each JWS algorithm the verifier knows. */
const JWS_ALGORITHMS = {
  HS256: { name: "HMAC", hash: "SHA-256" },
  RS256: { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" },
  ES256: { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" },
  EdDSA: { name: "Ed25519" },
} as const;
type JwsAlgorithm = keyof typeof JWS_ALGORITHMS;

/**
 * Makes a function that verifies a JSON Web Token (RFC 7519) with web
 * standards only (`crypto.subtle`) and resolves with its claims. It follows
 * RFC 8725: the key, not the token, decides the algorithm, so `alg: none`
 * and an HS256 token signed with a public key's text are refused; so are a
 * `crit` header, a malformed token, a bad signature, an expired or not yet
 * valid token, and a wrong `aud` or `iss` when those are configured. Each
 * refusal rejects with a {@linkcode TokenError} naming the reason.
 *
 * The key is imported once, here: a key that cannot be imported is a
 * `TypeError` at start, not a refusal of every token.
 *
 * @example
 * ```ts
 * import { jwtVerifier } from "./mod.ts";
 *
 * const verify = await jwtVerifier({ secret: "a shared secret of at least 32 bytes!" });
 * const handler = async (request: Request) => {
 *   const token = request.headers.get("authorization")?.replace(/^Bearer /, "") ?? "";
 *   const claims = await verify(token).catch(() => undefined);
 *   return new Response(claims ? `hello ${claims.sub}` : "who are you?");
 * };
 * ```
 *
 * @param options The key, and the claims to require.
 * @returns The check: resolves with the token's claims, or rejects with a {@linkcode TokenError}.
 */
export async function jwtVerifier(
  options: JwtOptions,
): Promise<(token: string) => Promise<Record<string, unknown>>> {
  const { secret, publicKey, audience, issuer } = options;
  const leeway = checkCount("leeway", options.leeway ?? 5);
  if ((secret === undefined) === (publicKey === undefined)) {
    throw new TypeError("give either secret or publicKey");
  }
  let alg: JwsAlgorithm;
  let key: CryptoKey;
  if (secret !== undefined) {
    const bytes = encoder.encode(secret);
    if (bytes.byteLength < 32) throw new RangeError("secret must be at least 32 bytes");
    alg = "HS256";
    // Stryker disable next-line BooleanLiteral: extractable matters only for exporting the key
    key = await crypto.subtle.importKey("raw", bytes, JWS_ALGORITHMS.HS256, false, ["verify"]);
  } else [alg, key] = await importPublicKey(publicKey!);

  return async (token) => {
    const parts = token.split(".");
    if (parts.length !== 3) throw new TokenError("malformed token");
    const header = decodeJson(parts[0]);
    const payload = decodeJson(parts[1]);
    const signature = decodeBase64Url(parts[2]);
    if (header === undefined || payload === undefined || signature === undefined) {
      throw new TokenError("malformed token");
    }
    if (header.crit !== undefined) throw new TokenError("unsupported critical header");
    // "Ed25519" is the newer name of the same EdDSA algorithm (RFC 9864).
    const named = header.alg === "Ed25519" ? "EdDSA" : header.alg;
    if (named !== alg) throw new TokenError("unsupported algorithm");
    const signed = encoder.encode(`${parts[0]}.${parts[1]}`);
    if (!(await crypto.subtle.verify(JWS_ALGORITHMS[alg], key, signature, signed))) {
      throw new TokenError("bad signature");
    }
    const now = Date.now() / 1000;
    const { exp, nbf, aud, iss } = payload;
    // Stryker disable next-line EqualityOperator: `now` has fractions of a millisecond: no test hits the edge
    if (exp !== undefined && !(typeof exp === "number" && now <= exp + leeway)) {
      throw new TokenError("expired");
    }
    // Stryker disable next-line EqualityOperator: `now` has fractions of a millisecond: no test hits the edge
    if (nbf !== undefined && !(typeof nbf === "number" && now >= nbf - leeway)) {
      throw new TokenError("not yet valid");
    }
    if (
      audience !== undefined && !(aud === audience || Array.isArray(aud) && aud.includes(audience))
    ) {
      throw new TokenError("wrong audience");
    }
    if (issuer !== undefined && iss !== issuer) throw new TokenError("wrong issuer");
    return payload;
  };
}

/**
 * Options for {@linkcode jwtAuth}: those of {@linkcode jwtVerifier}, and
 * where the grants and the token are.
 */
export interface JwtAuthOptions extends JwtOptions {
  /**
   * The claim that holds the grants, `{"subscribe": [selectors], "publish":
   * [selectors]}` (see {@linkcode Grants}). Defaults to `sse`.
   */
  claim?: string;
  /**
   * The cookie that may carry the token: a browser's `EventSource` sends it
   * on the same origin, and cross-origin with `withCredentials` to an origin
   * that `allowOrigin` lists. Defaults to `sse_token`.
   */
  cookie?: string;
  /**
   * Origins besides the server's own whose pages may make unsafe requests
   * (`POST`, `PUT`, `DELETE`: publishing, writing a stream) with the cookie.
   * A request that carries its token in the cookie and changes something
   * must come from a page of the server's origin or of one of these: the
   * browser sends the cookie along with any site's form or `fetch`, so
   * another site could otherwise write as its visitor (cross-site request
   * forgery). A token in the `Authorization` header needs no such check.
   * Defaults to none.
   */
  cookieOrigins?: readonly string[];
  /**
   * Let subscribers without a token in; they receive public events only.
   * Defaults to false.
   */
  allowAnonymous?: boolean;
}

/**
 * An {@linkcode Authorize} hook for signed tokens: it verifies the request's
 * JWT with {@linkcode jwtVerifier} and grants what its claim says. The token
 * comes from an `Authorization: Bearer` header, else the cookie, else (for
 * subscribers only, as a last resort: URLs end up in logs) `?token=`. A
 * refused token gets `401` with `WWW-Authenticate: Bearer
 * error="invalid_token"` and the reason; no token gets `401`, unless
 * anonymous subscribers are allowed. A stream ends when its token expires.
 *
 * @example
 * ```ts
 * import { Broker, createHandler, jwtAuth } from "./mod.ts";
 *
 * const authorize = await jwtAuth({ publicKey: Deno.env.get("JWT_PUBLIC_KEY"), audience: "sse" });
 * Deno.serve(createHandler(new Broker(), { authorize }));
 * // A token with {"sse": {"subscribe": ["user/42/*"]}} receives user 42's private events.
 * ```
 *
 * @param options The key, the claims to require, and where grants and token are.
 * @returns The hook, for {@linkcode HandlerOptions.authorize}.
 */
export async function jwtAuth(options: JwtAuthOptions): Promise<Authorize> {
  const verify = await jwtVerifier(options);
  const claim = options.claim ?? "sse";
  const cookie = options.cookie ?? "sse_token";
  const leeway = options.leeway ?? 5;
  const cookieOrigins = new Set(options.cookieOrigins);
  return async (request, action) => {
    let token = bearerToken(request);
    if (token === null) {
      token = cookieValue(request, cookie);
      if (
        token !== null && !SAFE_METHODS.has(request.method) &&
        !fromOwnOrigin(request, cookieOrigins)
      ) {
        throw new TokenError("the token cookie counts only on requests from this origin");
      }
    }
    token ??= action === "subscribe" ? new URL(request.url).searchParams.get("token") : null;
    if (token === null) return action === "subscribe" && options.allowAnonymous === true && {};
    const claims = await verify(token);
    const grants = claims[claim] === undefined ? {} : claims[claim];
    const valid = (selectors: unknown) =>
      selectors === undefined ||
      Array.isArray(selectors) && selectors.every((selector) => typeof selector === "string");
    if (
      typeof grants !== "object" || grants === null ||
      !valid((grants as Grants).subscribe) || !valid((grants as Grants).publish)
    ) throw new TokenError(`malformed ${claim} claim`);
    const { subscribe, publish } = grants as Grants;
    const expires = typeof claims.exp === "number" ? (claims.exp + leeway) * 1000 : undefined;
    return { subscribe, publish, expires };
  };
}

/** Methods that change nothing, which a cookie may authenticate from anywhere. */
const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

/**
 * Whether a request comes from a page of the server's own origin (the
 * `Origin` header names the host the request was sent to) or of a listed
 * one. A request without `Origin` (browsers send it on every unsafe request)
 * or with `Origin: null` (a sandbox, a file) comes from neither.
 */
function fromOwnOrigin(request: Request, listed: ReadonlySet<string>): boolean {
  const origin = request.headers.get("origin");
  if (origin === null) return false;
  if (listed.has(origin)) return true;
  try {
    return new URL(origin).host === new URL(request.url).host;
  } catch {
    return false; // "null", or no URL at all
  }
}

/**
 * The token of a request's `Authorization: Bearer` header, as every hook
 * here reads it: `null` without the header, a {@linkcode TokenError} for a
 * header that is not one bearer token.
 *
 * @example
 * ```ts
 * import { bearerToken } from "./mod.ts";
 *
 * const request = new Request("http://localhost/", { headers: { authorization: "Bearer abc" } });
 * console.log(bearerToken(request)); // "abc"
 * ```
 *
 * @param request The request.
 * @returns The token, or `null`.
 */
export function bearerToken(request: Request): string | null {
  const header = request.headers.get("authorization");
  if (header === null) return null;
  const match = /^Bearer +(\S+) *$/i.exec(header);
  if (match === null) throw new TokenError("malformed authorization header");
  return match[1];
}

/**
 * One cookie's value; `null` when the request does not carry it. A cookie
 * sent twice is refused: another host of the same site can set one with the
 * same name that the browser sends first, to sign its visitor in as itself.
 */
function cookieValue(request: Request, name: string): string | null {
  let value: string | null = null;
  for (const pair of String(request.headers.get("cookie")).split(";")) { // none reads as "null"
    const at = pair.indexOf("=");
    if (at === -1 || pair.slice(0, at).trim() !== name) continue;
    if (value !== null) throw new TokenError("the token cookie is set twice");
    value = pair.slice(at + 1).trim();
  }
  return value;
}

/** Imports a PEM public key as the first algorithm it fits. */
async function importPublicKey(pem: string): Promise<[JwsAlgorithm, CryptoKey]> {
  const match = /-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----/.exec(pem);
  let der: Uint8Array<ArrayBuffer> | undefined;
  try {
    // PEM is standard base64 with padding, wrapped over lines.
    if (match) der = Uint8Array.from(atob(match[1].replace(/\s/g, "")), (c) => c.charCodeAt(0));
  } catch {
    // not base64: no key fits below
  }
  for (const alg of ["RS256", "ES256", "EdDSA"] as const) {
    try {
      return [
        alg,
        // Stryker disable next-line BooleanLiteral: extractable matters only for exporting the key
        await crypto.subtle.importKey("spki", der!, JWS_ALGORITHMS[alg], false, ["verify"]),
      ];
    } catch {
      // not this kind of key
    }
  }
  throw new TypeError("publicKey is not a PEM public key of RSA, P-256 or Ed25519");
}

const BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/**
 * Decodes base64url exactly as RFC 7515 writes it: its alphabet only, no
 * padding, and the unused bits of the last character zero, so every token
 * has one spelling. `undefined` for anything else.
 */
function decodeBase64Url(text: string): Uint8Array<ArrayBuffer> | undefined {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) return undefined;
  // A last character that stands for 2 (or 4) bits more than the bytes
  // need must have them zero: "A" and "B" there would decode alike.
  const unused = [0, undefined, 0x0f, 0x03][text.length % 4];
  const last = BASE64URL.indexOf(text.at(-1) ?? "A");
  if (unused === undefined || (last & unused) !== 0) return undefined;
  const binary = atob(text.replaceAll("-", "+").replaceAll("_", "/"));
  return Uint8Array.from(binary, (char) => char.charCodeAt(0));
}

/** Decodes one JSON object part of a token; `undefined` if it is not one. */
function decodeJson(part: string): Record<string, unknown> | undefined {
  try {
    // Not base64 decodes as nothing, which is no JSON either.
    const text = new TextDecoder("utf-8", { fatal: true }).decode(decodeBase64Url(part));
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : undefined;
  } catch {
    // not UTF-8, or not JSON
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// The HTTP handler
// ---------------------------------------------------------------------------

/**
 * Options for {@linkcode createHandler}.
 */
export interface HandlerOptions {
  /** The largest `POST /publish` body, in bytes; larger ones get `413`. Defaults to 64 KiB. */
  maxBodyBytes?: number;
  /**
   * Milliseconds a `POST /publish` body may take to arrive in full; a slower
   * one gets `408`, so a client that sends a byte now and then holds no
   * request open for long. Defaults to 10000.
   */
  bodyTimeout?: number;
  /**
   * Decides whether a request may subscribe or publish; `false` answers
   * `401`. {@linkcode tokenAuth} checks bearer tokens; pass your own
   * function to verify a JWT or a session instead. Defaults to everyone may.
   */
  authorize?: Authorize;
  /**
   * The origins that browsers may call from: `"*"` or a list, answered with
   * the caller's origin when it is on it. Defaults to `"*"`.
   */
  allowOrigin?: "*" | readonly string[];
}

/**
 * What one request may do, as an {@linkcode Authorize} hook grants it. A
 * selector is a topic, or a pattern in which `*` matches any run of
 * characters (`*` alone: every topic; `user/42/*`: every topic under
 * `user/42/`).
 */
export interface Grants {
  /** Selectors of the private events a subscriber receives. Defaults to none. */
  subscribe?: readonly string[];
  /**
   * Selectors of the topics a publisher may publish to: every topic of an
   * event must match one, and an event with no topic needs `*`. Defaults to
   * none.
   */
  publish?: readonly string[];
  /**
   * When the permission ends, in milliseconds since the epoch: a stream
   * opened with it ends then. Defaults to never.
   */
  expires?: number;
}

/**
 * Whether one of `selectors` (of {@linkcode Grants}: a topic, or a pattern
 * in which `*` matches any run of characters) matches `topic`, for an app
 * that checks grants against names of its own, such as stream paths.
 *
 * @example
 * ```ts
 * import { selectorsMatch } from "./mod.ts";
 *
 * console.log(selectorsMatch(["user/42/*"], "user/42/feed")); // true
 * console.log(selectorsMatch(["user/42/*"], "user/7/feed")); // false
 * ```
 */
export function selectorsMatch(selectors: readonly string[], topic: string): boolean {
  return selectorPattern(selectors).test(topic);
}

/**
 * One pattern for topic selectors: a topic, or `*` for any run of
 * characters. No selectors match no topic (only the empty string, which no
 * topic is).
 */
function selectorPattern(selectors: readonly string[]): RegExp {
  const alternatives = selectors.map((selector) =>
    selector.split("*").map((part) => part.replace(/[\\^$.|?*+()[\]{}]/g, "\\$&")).join(".*")
  );
  // "s": `*` runs over any character, line separators (U+2028, U+2029) too.
  return new RegExp(`^(?:${alternatives.join("|")})$`, "s");
}

/**
 * Decides whether `request` may perform `action`, for
 * {@linkcode HandlerOptions.authorize}: `false` refuses it (`401`), `true`
 * allows it (public events only, publishing anywhere), and {@linkcode Grants}
 * allow it within their selectors. Throwing a {@linkcode TokenError} refuses
 * it with that reason.
 *
 * @example
 * ```ts
 * import type { Authorize } from "./mod.ts";
 *
 * // Anyone may subscribe; publishing needs a header set by your gateway.
 * const authorize: Authorize = (request, action) =>
 *   action === "subscribe" || request.headers.get("x-role") === "publisher";
 *
 * // Each signed-in user reads its own private events (`user` comes from your session).
 * const user = (request: Request) => request.headers.get("x-user");
 * const perUser: Authorize = (request) => ({ subscribe: [`user/${user(request)}/*`] });
 * ```
 */
export type Authorize = (
  request: Request,
  action: "subscribe" | "publish",
) => boolean | Grants | Promise<boolean | Grants>;

/**
 * An {@linkcode Authorize} that requires bearer tokens: `publish` in an
 * `Authorization: Bearer` header, `subscribe` in that header or in
 * `?token=` (a browser's `EventSource` cannot set headers). An action with
 * no token (`undefined` or empty) is open. Tokens are compared in constant
 * time, so response times do not reveal how much of a guess was right.
 *
 * @example
 * ```ts
 * import { Broker, createHandler, tokenAuth } from "./mod.ts";
 *
 * const handler = createHandler(new Broker(), {
 *   authorize: tokenAuth({ publish: "s3cret" }),
 * });
 * const response = await handler(new Request("http://localhost/publish", {
 *   method: "POST",
 *   body: "hi",
 * }));
 * console.log(response.status); // 401
 * ```
 *
 * @param tokens The token each action needs.
 * @returns The check, for {@linkcode HandlerOptions.authorize}.
 */
export function tokenAuth(tokens: { publish?: string; subscribe?: string }): Authorize {
  const expected = {
    publish: tokens.publish ? encoder.encode(tokens.publish) : undefined,
    subscribe: tokens.subscribe ? encoder.encode(tokens.subscribe) : undefined,
  };
  return (request, action) => {
    const secret = expected[action];
    if (secret === undefined) return true;
    const given = bearerToken(request) ??
      (action === "subscribe" ? new URL(request.url).searchParams.get("token") : null);
    return given !== null && timingSafeEqual(encoder.encode(given), secret);
  };
}

/**
 * Compares in a time that depends only on the secret's length: every byte
 * of `secret` is visited whatever `given` holds.
 */
function timingSafeEqual(given: Uint8Array, secret: Uint8Array): boolean {
  let difference = given.length ^ secret.length;
  // A missing byte (256) differs from every byte.
  for (let i = 0; i < secret.length; i++) difference |= (given[i] ?? 256) ^ secret[i];
  return difference === 0;
}

/**
 * What {@linkcode createHandler} uses of the second argument of a fetch
 * handler. Bun passes its server there, and the handler calls
 * `timeout(request, 0)` on each stream: Bun otherwise closes a connection
 * that is quiet for 10 seconds.
 */
export interface FetchServer {
  /** Sets the idle timeout of one request's connection; 0 disables it. */
  timeout?(request: Request, seconds: number): void;
}

/**
 * Mounts a broker on HTTP, for `Deno.serve`, `Bun.serve` or any router that
 * takes `(request: Request) => Response | Promise<Response>`:
 *
 * - `GET /events`: the event stream (see {@linkcode Broker.subscribe});
 * - `POST /publish`: a JSON body `{"data", "event"?, "topic"?, "retry"?,
 *   "comment"?, "private"?}` (non-string `data` is sent as its JSON text),
 *   a JSON array of those (a batch, see {@linkcode Broker.publishBatch}),
 *   or any other body as the data, with `?event=` and `?topic=` in the
 *   URL; an `Idempotency-Key` header publishes once per key. Answers
 *   `{"id"}` (`{"ids"}` for a batch), `400` with `{"error"}` naming the
 *   field, `422` for a key used for other events, or `503` with
 *   `Retry-After` when the event log did not store it;
 * - `GET /stats`: the broker's {@linkcode BrokerStats} as JSON.
 *
 * Other paths get `404` and other methods `405` with an `Allow` header.
 * `OPTIONS` answers CORS preflights (allowing `authorization`,
 * `content-type` and `last-event-id`). A request that `authorize` refuses
 * gets `401` with `WWW-Authenticate`; `/stats` is open to all.
 *
 * @example
 * ```ts
 * import { Broker, createHandler } from "./mod.ts";
 *
 * Deno.serve(createHandler(new Broker()));
 * // curl -N localhost:8000/events
 * // curl -d 'hello' localhost:8000/publish
 * ```
 *
 * @param broker The broker to serve.
 * @param options See {@linkcode HandlerOptions}.
 * @returns A fetch handler. Its second argument is what the server passes
 *   beside the request (Bun's server, Deno's connection info, or nothing);
 *   it uses Bun's `timeout`.
 */
export function createHandler(
  broker: Broker,
  options: HandlerOptions = {},
): (request: Request, server?: unknown) => Promise<Response> {
  const limits: BodyLimits = {
    maxBytes: checkCount("maxBodyBytes", options.maxBodyBytes ?? 64 * 1024),
    timeout: checkCount("bodyTimeout", options.bodyTimeout ?? 10_000),
  };
  const authorize = options.authorize ?? (() => true);
  const allowOrigin = options.allowOrigin ?? "*";
  /** The listed origins; `undefined` when any origin may call. */
  const allowed = allowOrigin === "*" ? undefined : new Set(allowOrigin);
  const routes: Record<string, Route> = {
    "/events": {
      action: "subscribe",
      methods: {
        GET: (request, _url, server, grants) => {
          // Bun's server: any other second argument (Deno's info) has no timeout.
          (server as FetchServer | undefined)?.timeout?.(request, 0);
          return broker.subscribe(request, { grants: grants?.subscribe, expires: grants?.expires });
        },
      },
    },
    "/publish": {
      action: "publish",
      methods: {
        POST: async (request, url, _server, grants) => {
          const { entries, isBatch } = await readPublication(request, url, limits);
          if (grants !== undefined) {
            const granted = grants.publish === undefined
              ? NO_GRANTS
              : selectorPattern(grants.publish);
            for (const { topics } of entries) {
              const refused = topics!.length === 0
                ? grants.publish?.includes("*") ? undefined : "an event with no topic"
                : topics!.find((topic) => !granted.test(topic));
              if (refused !== undefined) {
                throw new HttpError(403, `no publish grant for ${JSON.stringify(refused)}`);
              }
            }
          }
          const idempotencyKey = request.headers.get("idempotency-key") ?? undefined;
          if (!isBatch) {
            const [{ message, topics, private: isPrivate }] = entries;
            const id = await broker.publish(message, {
              topics,
              private: isPrivate,
              idempotencyKey,
            });
            return Response.json({ id });
          }
          return Response.json({ ids: await broker.publishBatch(entries, { idempotencyKey }) });
        },
      },
    },
    "/stats": {
      methods: {
        GET: async (request) => {
          // Who listens to what is for those who may publish to it: the
          // counts of the topics the request may publish to, and none for
          // a request without a publish permission.
          const stats = broker.stats();
          const publish = await access(authorize, request, "publish").catch((error) => {
            if (error instanceof HttpError) return { publish: [] };
            throw error;
          });
          if (publish !== true) {
            const granted = selectorPattern(publish.publish ?? []);
            stats.clientsByTopic = Object.fromEntries(
              Object.entries(stats.clientsByTopic).filter(([topic]) => granted.test(topic)),
            );
          }
          return Response.json(stats);
        },
      },
    },
  };

  /** Sets the CORS headers of a response to this request. */
  const withCors = (request: Request, response: Response): Response => {
    const headers = response.headers;
    if (allowed === undefined) headers.set("access-control-allow-origin", "*");
    else {
      const origin = request.headers.get("origin");
      if (allowed.has(origin!)) { // a missing origin (null) is in no list
        headers.set("access-control-allow-origin", origin!);
        // Listed origins may send cookies (EventSource's withCredentials).
        headers.set("access-control-allow-credentials", "true");
      } else headers.delete("access-control-allow-origin");
      headers.append("vary", "origin");
    }
    return response;
  };

  const respond = async (request: Request, server?: unknown): Promise<Response> => {
    const url = new URL(request.url);
    const route = routes[url.pathname];
    if (route === undefined) return new HttpError(404, "not found").response();
    const methods = Object.keys(route.methods);
    if (request.method === "OPTIONS") {
      return new Response(null, {
        status: 204,
        headers: {
          // Stryker disable next-line StringLiteral: every route has one method
          "access-control-allow-methods": methods.join(", "),
          "access-control-allow-headers":
            "authorization, content-type, idempotency-key, last-event-id",
          "access-control-max-age": "86400",
        },
      });
    }
    const handle = Object.hasOwn(route.methods, request.method)
      ? route.methods[request.method]
      : undefined;
    if (handle === undefined) {
      // Stryker disable next-line StringLiteral: every route has one method
      const allow = methods.join(", ");
      return new HttpError(405, `use ${allow}`, { allow }).response();
    }
    try {
      const allowed = route.action === undefined
        ? true
        : await access(authorize, request, route.action);
      return await handle(request, url, server, allowed === true ? undefined : allowed);
    } catch (error) {
      if (error instanceof MessageError) return new HttpError(400, error.message).response();
      if (error instanceof IdempotencyKeyError) {
        return new HttpError(422, error.message).response();
      }
      if (error instanceof HttpError) {
        broker.countRejection(REJECTION_OF_STATUS[error.status]);
        return error.response();
      }
      if (error instanceof EventLogError) {
        return new HttpError(503, "the event log is unavailable: try again", {
          "retry-after": "1",
        }).response();
      }
      throw error;
    }
  };
  return async (request, server) => withCors(request, await respond(request, server));
}

/**
 * A request refused with an HTTP status and a one-line reason: the one error
 * type of this project's HTTP handlers ({@linkcode createHandler}, and the
 * Durable Streams handler of `streams.ts`), each of which answers it as JSON
 * `{"error": reason}` with its status and headers. The reason names what was
 * wrong and reveals nothing else.
 *
 * @example
 * ```ts
 * import { HttpError } from "./mod.ts";
 *
 * const response = new HttpError(413, "body is larger than 10 bytes").response();
 * console.log(response.status, await response.json()); // 413 { error: "body is larger ..." }
 * ```
 */
export class HttpError extends Error {
  /** The status to answer with. */
  readonly status: number;
  /** Headers to answer with, such as `retry-after` or `www-authenticate`. */
  readonly headers: Readonly<Record<string, string>>;

  /**
   * Creates the error.
   *
   * @param status The status to answer with.
   * @param reason Why, in one line.
   * @param headers Headers to answer with.
   */
  constructor(status: number, reason: string, headers: Record<string, string> = {}) {
    super(reason);
    this.name = "HttpError";
    this.status = status;
    this.headers = headers;
  }

  /**
   * The refusal as a response.
   *
   * @returns `{"error": reason}` as JSON, with the status and headers.
   */
  response(): Response {
    return Response.json({ error: this.message }, { status: this.status, headers: this.headers });
  }
}

/** Limits of {@linkcode readBody}. */
export interface BodyLimits {
  /** The largest body, in bytes; a larger one is refused with `413` as soon as it passes. */
  maxBytes: number;
  /** Milliseconds the whole body may take to arrive; a slower one is refused with `408`. */
  timeout: number;
}

/**
 * Reads a request body whole, within limits: a body over `maxBytes` is
 * refused with an {@linkcode HttpError} `413` as soon as it passes the limit
 * (a declared `Content-Length` over it before anything is read), and one
 * that has not arrived in full within `timeout` milliseconds with a `408`
 * that closes the connection.
 *
 * @example
 * ```ts
 * import { readBody } from "./mod.ts";
 *
 * const request = new Request("http://localhost/", { method: "POST", body: "hello" });
 * const body = await readBody(request, { maxBytes: 1024, timeout: 10_000 });
 * console.log(body.byteLength); // 5
 * ```
 *
 * @param request The request whose body to read.
 * @param limits Its size and time limits.
 * @returns The body's bytes (empty when it has none).
 */
export async function readBody(request: Request, limits: BodyLimits): Promise<Uint8Array> {
  const { maxBytes, timeout } = limits;
  const tooLarge = () => new HttpError(413, `body is larger than ${maxBytes} bytes`);
  if (Number(request.headers.get("content-length")) > maxBytes) throw tooLarge();
  if (request.body === null) return new Uint8Array(0);
  const reader = request.body.getReader();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const reason = `the body did not arrive within ${timeout} ms`;
      reject(new HttpError(408, reason, { connection: "close" }));
    }, timeout);
  });
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for (;;) {
      const read = await Promise.race([reader.read(), late]);
      if (read.done) break;
      size += read.value.byteLength;
      if (size > maxBytes) throw tooLarge();
      chunks.push(read.value);
    }
  } catch (error) {
    reader.cancel().catch(() => {});
    throw error;
  } finally {
    clearTimeout(timer);
  }
  return concat(chunks);
}

/**
 * Asks an {@linkcode Authorize} hook whether `request` may perform `action`,
 * and reads its answer as every handler of this project does: `true` allows
 * everything, {@linkcode Grants} allow within their selectors, and anything
 * else refuses with an {@linkcode HttpError} `401` carrying a Bearer
 * challenge (with the reason of a {@linkcode TokenError}). Only `true` or
 * grants allow: a hook that forgets to return refuses. Other errors of the
 * hook propagate.
 *
 * @example
 * ```ts
 * import { access, selectorsMatch, tokenAuth } from "./mod.ts";
 *
 * const authorize = tokenAuth({ publish: "s3cret" });
 * const request = new Request("http://localhost/", { headers: { authorization: "Bearer s3cret" } });
 * const allowed = await access(authorize, request, "publish");
 * console.log(allowed === true || selectorsMatch(allowed.publish ?? [], "news")); // true
 * ```
 *
 * @param authorize The hook.
 * @param request The request.
 * @param action What it wants to do.
 * @returns `true`, or the grants within which it may.
 */
export async function access(
  authorize: Authorize,
  request: Request,
  action: "subscribe" | "publish",
): Promise<true | Grants> {
  let allowed: boolean | Grants;
  try {
    allowed = await authorize(request, action);
  } catch (error) {
    if (!(error instanceof TokenError)) throw error;
    const description = error.message.replace(/["\\]/g, "");
    throw new HttpError(401, error.message, {
      "www-authenticate": `Bearer error="invalid_token", error_description="${description}"`,
    });
  }
  if (allowed === true || (typeof allowed === "object" && allowed !== null)) return allowed;
  throw new HttpError(401, "a valid token is required", {
    "www-authenticate": 'Bearer realm="sse"',
  });
}

/** An ISO 8601 time in milliseconds since the epoch, or `NaN`. */
function parseTime(text: string): number {
  return /^\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d))?$/.test(text)
    ? Date.parse(text)
    : NaN;
}

/** Checks one entry of a publish and encodes it for the log; throws a {@linkcode MessageError}. */
function newEvent({ message, topics = [], private: isPrivate = false }: BatchEntry): NewEvent {
  if (typeof message !== "object" || message === null) {
    throw new MessageError("message", "must be an object");
  }
  if ("id" in message && message.id !== undefined) {
    throw new MessageError("id", "is assigned by the broker");
  }
  if (message.data === undefined) throw new MessageError("data", "is required");
  if (!Array.isArray(topics)) throw new MessageError("topics", "must be an array");
  if (!topics.every(isTopic)) {
    throw new MessageError("topic", "must be 1 to 256 printable characters");
  }
  if (typeof isPrivate !== "boolean") throw new MessageError("private", "must be true or false");
  if (isPrivate && topics.length === 0) {
    throw new MessageError("private", "events need at least one topic");
  }
  const text = formatMessage(message);
  return isPrivate ? { topics, text, private: true } : { topics, text };
}

/** What each status the handler refuses with counts as. */
const REJECTION_OF_STATUS: Record<number, RejectionReason> = {
  400: "validation",
  401: "auth",
  403: "auth",
  408: "limits",
  413: "limits",
};

/** One path: a function per method, and the action `authorize` is asked about. */
interface Route {
  action?: "subscribe" | "publish";
  methods: Record<string, RouteHandler>;
}

/** Handles one request; `grants` is what `authorize` granted, when it gave grants. */
type RouteHandler = (
  request: Request,
  url: URL,
  server: unknown,
  grants: Grants | undefined,
) => Response | Promise<Response>;

/**
 * Reads a publish request: one event, or with a JSON array body a batch.
 * Only translates: the broker validates every field and names the one it
 * refuses (a missing `data` stays undefined, an `id` is refused there).
 */
async function readPublication(
  request: Request,
  url: URL,
  limits: BodyLimits,
): Promise<{ entries: BatchEntry[]; isBatch: boolean }> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await readBody(request, limits));
  } catch (error) {
    if (error instanceof HttpError) throw error;
    throw new HttpError(400, "body is not valid UTF-8");
  }
  // No content type reads as "null": not JSON.
  const type = String(request.headers.get("content-type"));
  if (!/^application\/(.+\+)?json\b/i.test(type)) {
    const topics = url.searchParams.getAll("topic");
    const event = url.searchParams.get("event") ?? undefined;
    const isPrivate = url.searchParams.get("private") === "1";
    return {
      entries: [{ message: { data: text, event }, topics, private: isPrivate }],
      isBatch: false,
    };
  }
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new HttpError(400, "body is not valid JSON");
  }
  if (Array.isArray(body)) {
    if (body.length === 0) throw new HttpError(400, "a batch needs at least one event");
    return { entries: body.map((item, index) => entryOf(item, `[${index}]`)), isBatch: true };
  }
  return { entries: [entryOf(body, "body")], isBatch: false };
}

const PUBLISH_FIELDS = new Set(["data", "event", "topic", "retry", "comment", "id", "private"]);

/** One JSON event of a publish; `where` names it in errors (`body`, `[2]`). */
function entryOf(value: unknown, where: string): BatchEntry {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new HttpError(400, `${where} must be a JSON object`);
  }
  const fields = value as Record<string, unknown>;
  const unknown = Object.keys(fields).find((key) => !PUBLISH_FIELDS.has(key));
  if (unknown !== undefined) {
    const name = JSON.stringify(unknown.slice(0, 64));
    throw new HttpError(
      400,
      where === "body" ? `unknown field ${name}` : `${where} has unknown field ${name}`,
    );
  }
  const { data, event, topic, retry, comment, id, private: isPrivate } = fields;
  const message = {
    data: typeof data === "string" || data === undefined ? data : JSON.stringify(data),
    event,
    retry,
    comment,
    id,
  } as Omit<ServerSentEventMessage, "id">;
  const topics = (topic === undefined ? [] : Array.isArray(topic) ? topic : [topic]) as string[];
  return { message, topics, private: isPrivate as boolean };
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/**
 * The broker's counters in the Prometheus text format (version 0.0.4), for
 * a `/metrics` route: serve it with the content type
 * {@linkcode METRICS_CONTENT_TYPE}. Names start with `sse_`; the counters
 * are those of {@linkcode Broker.stats}, `sse_event_log_up` is
 * {@linkcode Health.eventLogUp}, and `sse_publish_seconds` is a histogram
 * of {@linkcode BrokerStats.publishSeconds}. Process metrics such as memory
 * are the runtime's to add.
 *
 * @example
 * ```ts
 * import { Broker, METRICS_CONTENT_TYPE, metricsText } from "./mod.ts";
 *
 * const broker = new Broker();
 * const response = new Response(await metricsText(broker), {
 *   headers: { "content-type": METRICS_CONTENT_TYPE },
 * });
 * console.log((await response.text()).includes("sse_clients 0")); // true
 * broker.close();
 * ```
 *
 * @param broker The broker to describe.
 * @returns The exposition text, one metric family after another.
 */
export async function metricsText(broker: Broker): Promise<string> {
  const stats = broker.stats();
  const { eventLogUp } = await broker.health();
  const histogram = stats.publishSeconds;
  return [
    family("sse_clients", "gauge", "Streams open now.", [["", stats.clients]]),
    family("sse_reserved", "gauge", "Places of the client limit held by other open responses.", [
      ["", stats.reserved],
    ]),
    family("sse_event_log_up", "gauge", "Whether the event log answered a ping (1) or not (0).", [
      ["", eventLogUp ? 1 : 0],
    ]),
    family("sse_connections_total", "counter", "Streams opened.", [["", stats.connections]]),
    family("sse_published_total", "counter", "Events accepted by publish.", [
      ["", stats.published],
    ]),
    family("sse_delivered_total", "counter", "Events handed to live clients.", [
      ["", stats.delivered],
    ]),
    family("sse_replayed_total", "counter", "Events resent from the event log.", [
      ["", stats.replayed],
    ]),
    family("sse_slow_disconnects_total", "counter", "Clients cut for falling behind.", [
      ["", stats.slowDisconnects],
    ]),
    family(
      "sse_rejected_total",
      "counter",
      "Requests refused, by reason.",
      Object.entries(stats.rejected).map(([reason, count]) => [`{reason="${reason}"}`, count]),
    ),
    family(
      "sse_publish_seconds",
      "histogram",
      "Seconds from a publish accepted until queued for every client.",
      [
        ...histogram.buckets.map(({ le, count }): Sample => [`_bucket{le="${le}"}`, count]),
        ["_sum", histogram.sum],
        ["_count", histogram.count],
      ],
    ),
  ].join("");
}

/** The content type of {@linkcode metricsText}. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** One line of a metric family: what follows its name (a suffix, labels), and its value. */
type Sample = [suffix: string, value: number];

/** A metric family: its `# HELP` and `# TYPE` lines, then its samples. */
function family(name: string, type: string, help: string, samples: Sample[]): string {
  let text = `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n`;
  for (const [suffix, value] of samples) text += `${name}${suffix} ${value}\n`;
  return text;
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/**
 * Each event's bytes on the wire, encoded once per process and shared by
 * every client and every replay; an event and its bytes go together.
 */
const encoded = new WeakMap<LogEvent, Uint8Array>();

function bytesOf(event: LogEvent): Uint8Array {
  let bytes = encoded.get(event);
  if (bytes === undefined) {
    encoded.set(event, bytes = encoder.encode(`id: ${event.id}\n${event.text}`));
  }
  return bytes;
}

/** A public event's bytes with its `topic:` lines, encoded once as well. */
const tagged = new WeakMap<LogEvent, Uint8Array>();

function taggedBytesOf(event: LogEvent): Uint8Array {
  let bytes = tagged.get(event);
  if (bytes === undefined) {
    const text = `id: ${event.id}\n${topicLines(event.topics)}${event.text}`;
    tagged.set(event, bytes = encoder.encode(text));
  }
  return bytes;
}

function topicLines(topics: readonly string[]): string {
  return topics.map((topic) => `topic: ${topic}\n`).join("");
}

/**
 * The two integers of an event id as {@linkcode EventLog} requires it
 * (`<ms>-<seq>`, each of at most 15 digits, so that Redis and JavaScript
 * read them alike), for an event log to place an id it is given; `undefined`
 * for anything else.
 *
 * @example
 * ```ts
 * import { parseEventId } from "./mod.ts";
 *
 * console.log(parseEventId("1700000000000-3"), parseEventId("abc")); // [1700000000000, 3] undefined
 * ```
 *
 * @param id What a client sent as an event id.
 * @returns The time and the sequence, or `undefined`.
 */
export function parseEventId(id: string): [ms: number, seq: number] | undefined {
  const match = /^(\d{1,15})-(\d{1,15})$/.exec(id);
  return match ? [Number(match[1]), Number(match[2])] : undefined;
}

/**
 * Orders two event ids from the log (which are `<integer>-<integer>`, as
 * {@linkcode EventLog} requires): negative when `a` is older.
 */
function compareIds(a: string, b: string): number {
  const [a1, a2] = parseEventId(a)!;
  const [b1, b2] = parseEventId(b)!;
  return a1 - b1 || a2 - b2;
}

/**
 * Joins byte chunks into one array: the chunk itself when there is one,
 * else a new array. The broker joins a flush's events with it, once for all
 * the clients that want them.
 *
 * @example
 * ```ts
 * import { concat } from "./mod.ts";
 *
 * const joined = concat([new Uint8Array([1, 2]), new Uint8Array([3])]);
 * console.log(joined); // Uint8Array(3) [ 1, 2, 3 ]
 * ```
 *
 * @param chunks The chunks, in order.
 * @returns Their bytes, one after another.
 */
export function concat(chunks: readonly Uint8Array[]): Uint8Array {
  if (chunks.length === 1) return chunks[0];
  const joined = new Uint8Array(chunks.reduce((size, chunk) => size + chunk.byteLength, 0));
  let offset = 0;
  for (const chunk of chunks) {
    joined.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return joined;
}

function isTopic(topic: unknown): boolean {
  // deno-lint-ignore no-control-regex -- control characters are what it refuses
  return typeof topic === "string" && /^[^\x00-\x1f\x7f]{1,256}$/.test(topic);
}

/** A count option: a non-negative safe integer, or `Infinity` (no limit) when `infinite`. */
function checkCount(name: string, value: number, infinite = true): number {
  if (!(value >= 0) || ((value !== Infinity || !infinite) && !Number.isSafeInteger(value))) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}
