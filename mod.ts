/**
 * A Server-Sent Events broker built only on web standards: no imports, so it
 * loads by URL and runs unchanged on Deno, Bun and other WinterTC runtimes.
 *
 * The module reads top to bottom: the message type and its encoding, the
 * retained history, the {@linkcode Broker}, and an HTTP handler that mounts
 * the broker on any server.
 *
 * @example Broadcast to every browser that opens /events
 * ```ts ignore
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
 *
 * @example
 * ```ts
 * import type { ServerSentEventMessage } from "./mod.ts";
 *
 * const message: ServerSentEventMessage = { event: "tick", data: "12:00" };
 * ```
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
    if (typeof retry !== "number" || !Number.isSafeInteger(retry) || retry < 0) {
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
// History: the retained events, in publish order
// ---------------------------------------------------------------------------

/** One published event as the broker keeps it: encoded once, shared by all. */
interface StoredEvent {
  readonly seq: number;
  readonly topics: readonly string[];
  readonly bytes: Uint8Array;
}

/**
 * Where a reconnecting client resumes: after `seq`, or, when its id cannot be
 * placed in the history, from the oldest retained event with `gap` set.
 */
interface ResumePoint {
  readonly seq: number;
  readonly gap: boolean;
}

/**
 * The retained events. Ids are `<epoch>-<seq>`: `epoch` is the time the log
 * was created, so ids from an earlier run of the server always compare older
 * than this run's, and a client resuming across a restart is never mistaken
 * for one that is ahead.
 */
class History {
  readonly epoch = Date.now();
  #events: StoredEvent[] = [];
  #start = 0; // index of the oldest retained event in #events
  #bytes = 0;
  #lastSeq = 0;

  constructor(readonly maxEvents: number, readonly maxBytes: number) {}

  get lastSeq(): number {
    return this.#lastSeq;
  }

  idOf(seq: number): string {
    return `${this.epoch}-${seq}`;
  }

  append(topics: readonly string[], encode: (id: string) => Uint8Array): StoredEvent {
    const seq = ++this.#lastSeq;
    const event = { seq, topics, bytes: encode(this.idOf(seq)) };
    this.#events.push(event);
    this.#bytes += event.bytes.byteLength;
    while (this.size > this.maxEvents || (this.size > 0 && this.#bytes > this.maxBytes)) {
      this.#bytes -= this.#events[this.#start].bytes.byteLength;
      this.#start++;
    }
    // Compact now and then, so evicting stays O(1) amortised without a ring.
    if (this.#start > 1024 && this.#start * 2 > this.#events.length) {
      this.#events = this.#events.slice(this.#start);
      this.#start = 0;
    }
    return event;
  }

  get size(): number {
    return this.#events.length - this.#start;
  }

  /** The oldest retained sequence number (lastSeq + 1 when empty). */
  get firstSeq(): number {
    return this.#lastSeq - this.size + 1;
  }

  /** The retained event with this sequence number, if still retained. */
  at(seq: number): StoredEvent | undefined {
    return seq >= this.firstSeq && seq <= this.#lastSeq
      ? this.#events[this.#start + seq - this.firstSeq]
      : undefined;
  }

  /** Places a client's `Last-Event-ID` in this history. */
  resume(lastEventId: string): ResumePoint {
    const match = /^(\d{1,15})-(\d{1,15})$/.exec(lastEventId);
    const seq = match && Number(match[1]) === this.epoch ? Number(match[2]) : -1;
    // An id of this run that is still retained, or the newest one: no gap.
    if (seq >= this.firstSeq - 1 && seq <= this.#lastSeq) return { seq, gap: false };
    // Anything else (older than the history, from an earlier run, malformed,
    // or ahead of us) may have missed events: resend all that is retained.
    return { seq: this.firstSeq - 1, gap: true };
  }
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/**
 * Options for a {@linkcode Broker}.
 *
 * @example
 * ```ts
 * import { Broker, type BrokerOptions } from "./mod.ts";
 *
 * const options: BrokerOptions = { history: 100, heartbeat: 5_000 };
 * const broker = new Broker(options);
 * broker.close();
 * ```
 */
export interface BrokerOptions {
  /** How many published events to keep for `Last-Event-ID` replay. Default 1000. */
  history?: number;
  /** Also cap the history by the size of the encoded events. Default unlimited. */
  historyBytes?: number;
  /**
   * Milliseconds between `:` comments on streams that sent nothing since the
   * last one, so proxies keep them open and dead peers show up as failed
   * writes. Default 15000; 0 turns heartbeats off.
   */
  heartbeat?: number;
  /** The `retry:` sent first on every stream, in milliseconds. Default 2000; `null` sends none. */
  retry?: number | null;
  /**
   * How many bytes may wait for one client before it counts as too slow and
   * is disconnected (it reconnects and replays what it missed). Default 1 MiB.
   */
  maxQueueBytes?: number;
  /** Extra headers on every stream. Default `access-control-allow-origin: *`. */
  headers?: HeadersInit;
  /** Streams open at once; beyond it subscribing gets `503` with `Retry-After`. Default unlimited. */
  maxClients?: number;
  /** Topics one client may name; more get `400`. Default 32. */
  maxTopics?: number;
  /**
   * Called with one line per connect, disconnect and slow-client cut, for
   * your logger. Off by default; the lines hold no request data.
   */
  log?: (line: string) => void;
}

/**
 * How to subscribe one client; by default read from the request.
 *
 * @example
 * ```ts
 * import { Broker, type SubscribeOptions } from "./mod.ts";
 *
 * const broker = new Broker();
 * const options: SubscribeOptions = { topics: ["news"] };
 * const response = broker.subscribe(new Request("http://localhost/"), options);
 * await response.body?.cancel();
 * broker.close();
 * ```
 */
export interface SubscribeOptions {
  /**
   * Receive only events published to one of these topics. Default: the
   * request's `?topic=` parameters; none means every event.
   */
  topics?: readonly string[];
  /**
   * Resume after this event id. Default: the `Last-Event-ID` header, or the
   * `?lastEventId=` parameter for clients that cannot set headers.
   */
  lastEventId?: string | null;
}

/**
 * Options for one {@linkcode Broker.publish}.
 *
 * @example
 * ```ts
 * import { Broker, type PublishOptions } from "./mod.ts";
 *
 * const broker = new Broker();
 * const options: PublishOptions = { topic: ["news", "sport"] };
 * await broker.publish({ data: "goal!" }, options);
 * broker.close();
 * ```
 */
export interface PublishOptions {
  /**
   * The topic or topics of the event. Clients that named topics receive it
   * only if they named one of these; clients that named none receive all.
   */
  topic?: string | readonly string[];
}

/**
 * Counters of a {@linkcode Broker}, as returned by {@linkcode Broker.stats}.
 *
 * @example
 * ```ts
 * import { Broker, type BrokerStats } from "./mod.ts";
 *
 * const broker = new Broker();
 * const stats: BrokerStats = broker.stats();
 * console.log(stats.clients); // 0
 * broker.close();
 * ```
 */
export interface BrokerStats {
  /** Streams open now. */
  clients: number;
  /** Events accepted by `publish`. */
  published: number;
  /** Events handed to clients live (one per client per event). */
  delivered: number;
  /** Events resent from the history to reconnecting clients. */
  replayed: number;
  /** Clients disconnected because they fell more than `maxQueueBytes` behind. */
  slowDisconnects: number;
  /** The id of the newest event, or `null` before the first. */
  lastEventId: string | null;
}

/** What a client's stream and request report back to the broker. */
interface ClientEvents {
  /** The runtime wants more of the stream: go on with a replay. */
  pull(client: Client): void;
  /** The runtime cancelled the stream: the client is gone. */
  cancel(client: Client): void;
  /** The request's signal aborted: the client is gone, or its response done. */
  abort(client: Client): void;
}

/**
 * One open stream. It is its stream's underlying source and its request
 * signal's listener itself, so an idle client costs no closures: memory per
 * idle connection is what bounds how many one process can hold.
 */
class Client implements UnderlyingDefaultSource<Uint8Array>, EventListenerObject {
  /** Set in the stream's `start`, which runs inside the stream's constructor. */
  controller!: ReadableStreamDefaultController<Uint8Array>;
  /**
   * While catching up from the history: the last sequence number sent. The
   * stream's `pull` reads the history from here, so replay never copies
   * events and never outruns the client. `undefined` once live.
   */
  cursor: number | undefined;
  /** Events resent from the history to this client. */
  replayed = 0;
  /** Whether anything was sent since the last heartbeat tick. */
  active = false;

  /**
   * The client's topics as one string (sorted, one per line: topics hold no
   * control characters). Clients with the same key want the same events, so
   * a flush builds their chunk once.
   */
  readonly topicKey: string;

  constructor(
    readonly topics: ReadonlySet<string> | undefined,
    readonly events: ClientEvents,
  ) {
    this.topicKey = topics === undefined ? "" : [...topics].sort().join("\n");
  }

  start(controller: ReadableStreamDefaultController<Uint8Array>): void {
    this.controller = controller;
  }

  pull(): void {
    this.events.pull(this);
  }

  cancel(): void {
    this.events.cancel(this);
  }

  handleEvent(): void {
    this.events.abort(this);
  }

  wants(event: StoredEvent): boolean {
    return this.topics === undefined || event.topics.some((t) => this.topics!.has(t));
  }
}

/**
 * Holds open event streams and broadcasts to them.
 *
 * Each event is encoded once and the same bytes are queued for every client;
 * a publish never waits for any client. A client whose queue passes
 * `maxQueueBytes` is disconnected rather than waited for, and resumes from
 * the history when it reconnects with its `Last-Event-ID`.
 *
 * @example
 * ```ts
 * import { Broker } from "./mod.ts";
 *
 * const broker = new Broker();
 * const response = broker.subscribe(new Request("http://localhost/events"));
 * const id = await broker.publish({ event: "greeting", data: "hello" });
 * console.log(id, broker.stats().clients); // "<epoch>-1" 1
 * broker.close(); // ends every stream
 * await response.text();
 * ```
 */
export class Broker {
  readonly #history: History;
  readonly #heartbeatMs: number;
  readonly #maxQueueBytes: number;
  readonly #maxClients: number;
  readonly #maxTopics: number;
  readonly #retryAfter: string;
  readonly #log: ((line: string) => void) | undefined;
  readonly #headers: Headers;
  readonly #hello: Uint8Array<ArrayBuffer>;
  readonly #clients = new Set<Client>();
  readonly #clientEvents: ClientEvents = {
    pull: (client) => this.#replay(client),
    cancel: (client) => this.#remove(client),
    abort: (client) => this.#end(client),
  };
  /** Clients that named no topic. */
  readonly #everyone = new Set<Client>();
  /** Clients by each topic they named. */
  readonly #byTopic = new Map<string, Set<Client>>();
  /**
   * Events accepted and kept but not yet handed to clients. Publishes that
   * arrive in one turn of the event loop go out together, as one chunk per
   * client: the per-chunk cost of a stream, paid per client, is what bounds
   * fan-out, so a burst of publishes costs about as much as one.
   */
  #batch: StoredEvent[] = [];
  #batchSent: Promise<void> | undefined;
  #heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  #closed = false;
  #published = 0;
  #delivered = 0;
  #replayed = 0;
  #slowDisconnects = 0;

  /**
   * Creates a broker with no clients; it starts no timer until one subscribes.
   *
   * @param options See {@linkcode BrokerOptions}.
   */
  constructor(options: BrokerOptions = {}) {
    const history = checkCount("history", options.history ?? 1000);
    const historyBytes = checkCount("historyBytes", options.historyBytes ?? Infinity);
    this.#history = new History(history, historyBytes);
    this.#heartbeatMs = checkCount("heartbeat", options.heartbeat ?? 15_000);
    this.#maxQueueBytes = checkCount("maxQueueBytes", options.maxQueueBytes ?? 1 << 20);
    this.#maxClients = checkCount("maxClients", options.maxClients ?? Infinity);
    this.#maxTopics = checkCount("maxTopics", options.maxTopics ?? 32);
    this.#log = options.log;
    const retry = options.retry === undefined ? 2000 : options.retry;
    this.#retryAfter = String(Math.max(1, Math.ceil((retry ?? 0) / 1000)));
    // The first bytes must go out at once: Bun sends no headers before the
    // first body chunk, and an EventSource stays "connecting" until then.
    this.#hello = encodeMessage(retry === null ? { comment: "" } : { retry });
    this.#headers = new Headers({ "access-control-allow-origin": "*" });
    new Headers(options.headers).forEach((value, name) => this.#headers.set(name, value));
    // Streams must reach the client unbuffered and untransformed. No
    // `connection` or `transfer-encoding`: HTTP/2 forbids them.
    this.#headers.set("content-type", "text/event-stream");
    this.#headers.set("cache-control", "no-store, no-transform");
    this.#headers.set("x-accel-buffering", "no");
  }

  /**
   * Opens an event stream for one client and returns its `Response`.
   *
   * Topics come from `?topic=` (repeatable) and the resume point from the
   * `Last-Event-ID` header or `?lastEventId=`, unless `options` says
   * otherwise. A resuming client first receives every retained event after
   * its id, then an `event: replayed` with `data: {"count": N}`, then live
   * events, with nothing lost or repeated at the seam. If its id cannot be
   * placed in the history (too old, from an earlier run of the server, or
   * malformed), it is first sent an `event: gap` and then every retained
   * event. Neither of these two events carries an id.
   *
   * Answers `400` for an invalid topic or too many, and `503` when
   * `maxClients` streams are open. Once the broker is closed, the stream
   * holds only the `retry:` and ends, so clients retry later.
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
    if (this.#closed) return new Response(this.#hello, { headers: this.#headers });
    if (this.#clients.size >= this.#maxClients) {
      return errorResponse(503, "too many clients", { "retry-after": this.#retryAfter });
    }
    const url = new URL(request.url);
    const topics = options.topics ?? url.searchParams.getAll("topic");
    if (topics.length > this.#maxTopics) {
      return errorResponse(400, `at most ${this.#maxTopics} topics per client`);
    }
    const invalid = topics.find((topic) => !isTopic(topic));
    if (invalid !== undefined) {
      return errorResponse(400, `invalid topic ${JSON.stringify(invalid.slice(0, 64))}`);
    }
    const lastEventId = options.lastEventId !== undefined
      ? options.lastEventId
      : request.headers.get("last-event-id") ?? url.searchParams.get("lastEventId");

    const client = new Client(topics.length > 0 ? new Set(topics) : undefined, this.#clientEvents);
    const body = new ReadableStream(client, QUEUE_IN_BYTES);
    client.controller.enqueue(this.#hello);
    this.#add(client, lastEventId || null);
    // Some runtimes report a vanished client only through the request's
    // signal, others only by cancelling the body: either one removes it.
    if (request.signal.aborted) this.#end(client);
    else request.signal.addEventListener("abort", client, ONCE);
    return new Response(body, { headers: this.#headers });
  }

  /**
   * Publishes an event to every client subscribed to its topics and keeps it
   * in the history. The broker assigns the id, so ids only ever increase;
   * a message that carries its own `id` is refused.
   *
   * Encodes once and queues the same bytes for every client; it never waits
   * for a client. Publishes made in the same turn of the event loop are
   * queued together, as one chunk per client; the promise resolves once the
   * event is queued for every client. Rejects with {@linkcode MessageError}
   * for a message that cannot be encoded; nothing is sent then.
   *
   * @example
   * ```ts
   * import { Broker } from "./mod.ts";
   *
   * const broker = new Broker();
   * const id = await broker.publish({ event: "price", data: "42" }, { topic: "ACME" });
   * console.log(id); // "<epoch>-1"
   * broker.close();
   * ```
   *
   * @param message The event; `data` is required.
   * @param options The event's topics.
   * @returns The id the event was given.
   */
  async publish(
    message: Omit<ServerSentEventMessage, "id">,
    options: PublishOptions = {},
  ): Promise<string> {
    if (this.#closed) throw new Error("the broker is closed");
    if (typeof message !== "object" || message === null) {
      throw new MessageError("message", "must be an object");
    }
    if ("id" in message && message.id !== undefined) {
      throw new MessageError("id", "is assigned by the broker");
    }
    if (message.data === undefined) throw new MessageError("data", "is required");
    const topic = options.topic ?? [];
    const topics = typeof topic === "string" ? [topic] : [...topic];
    const invalid = topics.find((t) => !isTopic(t));
    if (invalid !== undefined) {
      throw new MessageError("topic", "must be 1 to 256 printable characters");
    }
    // Validate before the event takes a sequence number, so a refused
    // message leaves no hole in the ids.
    const text = formatMessage(message);
    const event = this.#history.append(
      topics,
      (id) => encoder.encode(`id: ${id}\n${text}`),
    );
    this.#published++;
    this.#batch.push(event);
    this.#batchSent ??= new Promise((resolve) =>
      setTimeout(() => {
        this.#flush();
        resolve();
      }, 0)
    );
    await this.#batchSent;
    return this.#history.idOf(event.seq);
  }

  /**
   * Ends every stream cleanly (clients see the end of the response and
   * reconnect, here or elsewhere) and stops the heartbeat. Later
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
    if (this.#closed) return;
    this.#closed = true;
    this.#flush(); // accepted events go out before the streams end
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
    const last = this.#history.lastSeq;
    return {
      clients: this.#clients.size,
      published: this.#published,
      delivered: this.#delivered,
      replayed: this.#replayed,
      slowDisconnects: this.#slowDisconnects,
      lastEventId: last === 0 ? null : this.#history.idOf(last),
    };
  }

  #add(client: Client, lastEventId: string | null): void {
    if (lastEventId !== null) {
      const { seq, gap } = this.#history.resume(lastEventId);
      if (gap) {
        const oldest = this.#history.at(seq + 1);
        const oldestId = oldest ? this.#history.idOf(oldest.seq) : null;
        client.controller.enqueue(
          encodeMessage({ event: "gap", data: JSON.stringify({ oldestId }) }),
        );
      }
      // Publishing may go on before the first pull: those events land in the
      // history and the cursor picks them up, so the seam has no gap.
      if (seq < this.#liveSeq) client.cursor = seq;
      else client.controller.enqueue(replayedMessage(0));
    }
    this.#clients.add(client);
    if (client.topics === undefined) this.#everyone.add(client);
    else {
      for (const topic of client.topics) {
        let set = this.#byTopic.get(topic);
        if (set === undefined) this.#byTopic.set(topic, set = new Set());
        set.add(client);
      }
    }
    this.#log?.(`client connected (${this.#clients.size} open)`);
    if (this.#heartbeatTimer === undefined && this.#heartbeatMs > 0) {
      this.#heartbeatTimer = setInterval(() => this.#heartbeat(), this.#heartbeatMs);
    }
  }

  /** Forgets a client; idempotent, as several signals may report one disconnect. */
  #remove(client: Client): void {
    if (!this.#clients.delete(client)) return;
    this.#log?.(`client disconnected (${this.#clients.size} open)`);
    if (client.topics === undefined) this.#everyone.delete(client);
    else {
      for (const topic of client.topics) {
        const set = this.#byTopic.get(topic)!;
        set.delete(client);
        if (set.size === 0) this.#byTopic.delete(topic);
      }
    }
    if (this.#clients.size === 0 && this.#heartbeatTimer !== undefined) {
      clearInterval(this.#heartbeatTimer);
      this.#heartbeatTimer = undefined;
    }
  }

  /** Removes a client and ends its stream once what is queued has gone out. */
  #end(client: Client): void {
    this.#remove(client);
    try {
      client.controller.close();
    } catch {
      // already closed, cancelled or errored
    }
  }

  /**
   * Cuts a client that fell too far behind. Erroring the stream discards its
   * queue at once (closing would keep it until the client read it all) and
   * aborts the response, so the client reconnects and replays from history.
   */
  #cut(client: Client): void {
    this.#slowDisconnects++;
    this.#log?.(`client cut: more than ${this.#maxQueueBytes} bytes behind`);
    this.#remove(client);
    client.controller.error(new Error("client too slow"));
  }

  /** Hands the batch to live clients: one chunk each, shared by all that want the same events. */
  #flush(): void {
    const batch = this.#batch;
    if (batch.length === 0) return;
    this.#batch = [];
    this.#batchSent = undefined;
    if (this.#everyone.size > 0) {
      const chunk = concat(batch.map((event) => event.bytes));
      for (const client of this.#everyone) this.#send(client, chunk, batch.length);
    }
    if (this.#byTopic.size === 0) return;
    // Each client that named topics gets one chunk of the events it wants, in
    // order and once each, built once for all clients with the same topics.
    const chunks = new Map<string, { chunk: Uint8Array; events: number }>();
    const sent = new Set<Client>();
    for (const event of batch) {
      for (const topic of event.topics) {
        for (const client of this.#byTopic.get(topic) ?? []) {
          if (sent.has(client)) continue;
          sent.add(client);
          let share = chunks.get(client.topicKey);
          if (share === undefined) {
            const wanted = batch.filter((candidate) => client.wants(candidate));
            share = { chunk: concat(wanted.map((e) => e.bytes)), events: wanted.length };
            chunks.set(client.topicKey, share);
          }
          this.#send(client, share.chunk, share.events);
        }
      }
    }
  }

  /**
   * The newest event handed to live clients (the batch holds the ones after
   * it); a catching-up client replays up to here, then goes live.
   */
  get #liveSeq(): number {
    return this.#history.lastSeq - this.#batch.length;
  }

  #send(client: Client, chunk: Uint8Array, events: number): void {
    // A client still catching up gets these events from the history, in order.
    if (client.cursor !== undefined) return;
    client.active = true;
    this.#delivered += events;
    this.#queue(client, chunk);
  }

  /** Queues live bytes for a client, and cuts it if that puts it too far behind. */
  #queue(client: Client, chunk: Uint8Array): void {
    client.controller.enqueue(chunk);
    if (queuedBytes(client) > this.#maxQueueBytes) this.#cut(client);
  }

  /**
   * Feeds a catching-up client from the history while its queue has room.
   * Replay fills at most half the queue, leaving the rest for live events
   * once it catches up.
   */
  #replay(client: Client): void {
    if (client.cursor === undefined || !this.#clients.has(client)) return;
    const controller = client.controller;
    while (client.cursor < this.#liveSeq) {
      if (queuedBytes(client) >= this.#maxQueueBytes / 2) return;
      const event = this.#history.at(client.cursor + 1);
      if (event === undefined) {
        // The history moved past a client that reads slower than we publish.
        this.#cut(client);
        return;
      }
      client.cursor = event.seq;
      if (client.wants(event)) {
        controller.enqueue(event.bytes);
        client.replayed++;
        this.#replayed++;
      }
    }
    client.cursor = undefined;
    controller.enqueue(replayedMessage(client.replayed));
  }

  #heartbeat(): void {
    for (const client of this.#clients) {
      if (!client.active && client.cursor === undefined) this.#queue(client, HEARTBEAT);
      client.active = false;
    }
  }
}

const HEARTBEAT = encodeMessage({ comment: "" });
const ONCE = { once: true };

/**
 * Every stream's queuing strategy: sizes in bytes, and a high-water mark of
 * 0, so `pull` runs only when the runtime asks for more and `desiredSize`
 * is minus the bytes waiting. A large mark would cost memory for nothing:
 * Bun holds about 7 KiB more per idle stream with a 1 MiB one.
 */
const QUEUE_IN_BYTES: QueuingStrategy<Uint8Array> = {
  highWaterMark: 0,
  size: (chunk) => chunk.byteLength,
};

/** Bytes queued for a client that the runtime has not taken yet. */
function queuedBytes(client: Client): number {
  return -(client.controller.desiredSize ?? 0);
}

/** Joins chunks into one; a single chunk is returned as it is, not copied. */
function concat(chunks: readonly Uint8Array[]): Uint8Array {
  if (chunks.length === 1) return chunks[0];
  const joined = new Uint8Array(chunks.reduce((size, chunk) => size + chunk.byteLength, 0));
  let offset = 0;
  for (const chunk of chunks) {
    joined.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return joined;
}

/** Tells a resuming client that it has caught up, and how many events it missed. */
function replayedMessage(count: number): Uint8Array {
  return encodeMessage({ event: "replayed", data: JSON.stringify({ count }) });
}

function isTopic(topic: unknown): boolean {
  // deno-lint-ignore no-control-regex -- control characters are what we refuse
  return typeof topic === "string" && /^[^\x00-\x1f\x7f]{1,256}$/.test(topic);
}

function checkCount(name: string, value: number): number {
  if (!(value >= 0) || (value !== Infinity && !Number.isSafeInteger(value))) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}

// ---------------------------------------------------------------------------
// The HTTP handler
// ---------------------------------------------------------------------------

/**
 * Options for {@linkcode createHandler}.
 *
 * @example
 * ```ts
 * import { Broker, createHandler, type HandlerOptions } from "./mod.ts";
 *
 * const options: HandlerOptions = { maxBodyBytes: 4096 };
 * const handler = createHandler(new Broker(), options);
 * ```
 */
export interface HandlerOptions {
  /** The largest `POST /publish` body, in bytes; larger ones get `413`. Default 64 KiB. */
  maxBodyBytes?: number;
  /**
   * Decides whether a request may subscribe or publish; `false` answers
   * `401`. Default: everyone may. {@linkcode tokenAuth} checks bearer
   * tokens; pass your own function to verify a JWT or a session instead.
   */
  authorize?: Authorize;
  /**
   * The origins that browsers may call from: `"*"` (the default) or a list,
   * answered with the caller's origin when it is on it.
   */
  allowOrigin?: "*" | readonly string[];
}

/**
 * Decides whether `request` may perform `action`, for
 * {@linkcode HandlerOptions.authorize}.
 *
 * @example
 * ```ts
 * import type { Authorize } from "./mod.ts";
 *
 * // Anyone may subscribe; publishing needs a header set by your gateway.
 * const authorize: Authorize = (request, action) =>
 *   action === "subscribe" || request.headers.get("x-role") === "publisher";
 * ```
 */
export type Authorize = (
  request: Request,
  action: "subscribe" | "publish",
) => boolean | Promise<boolean>;

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
    const header = /^Bearer +(\S+) *$/i.exec(request.headers.get("authorization") ?? "");
    const given = header?.[1] ??
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
  for (let i = 0; i < secret.length; i++) difference |= (given[i] ?? 0) ^ secret[i];
  return difference === 0;
}

/**
 * The optional second argument of a fetch handler. Bun passes its server
 * there, and the handler calls `timeout(request, 0)` on each stream: Bun
 * otherwise closes a connection that is quiet for 10 seconds.
 *
 * @example
 * ```ts
 * import type { FetchServer } from "./mod.ts";
 *
 * const server: FetchServer = { timeout: (_request, _seconds) => {} };
 * ```
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
 *   "comment"?}` (non-string `data` is sent as its JSON text) or any other
 *   body as the data, with `?event=` and `?topic=` in the URL; answers
 *   `{"id"}`, or `400` with `{"error"}` naming the field;
 * - `GET /stats`: the broker's {@linkcode BrokerStats} as JSON.
 *
 * Other paths get `404` and other methods `405` with an `Allow` header.
 * `OPTIONS` answers CORS preflights (allowing `authorization`,
 * `content-type` and `last-event-id`). A request that `authorize` refuses
 * gets `401` with `WWW-Authenticate`; `/stats` is open to all.
 *
 * @example
 * ```ts ignore
 * import { Broker, createHandler } from "./mod.ts";
 *
 * Deno.serve(createHandler(new Broker()));
 * // curl -N localhost:8000/events
 * // curl -d 'hello' localhost:8000/publish
 * ```
 *
 * @param broker The broker to serve.
 * @param options See {@linkcode HandlerOptions}.
 * @returns A fetch handler.
 */
export function createHandler(
  broker: Broker,
  options: HandlerOptions = {},
): (request: Request, server?: FetchServer) => Promise<Response> {
  const maxBodyBytes = checkCount("maxBodyBytes", options.maxBodyBytes ?? 64 * 1024);
  const authorize = options.authorize ?? (() => true);
  const allowOrigin = options.allowOrigin ?? "*";
  const allowed = new Set(allowOrigin === "*" ? [] : allowOrigin);
  const routes: Record<string, Route> = {
    "/events": {
      action: "subscribe",
      methods: {
        GET: (request, _url, server) => {
          server?.timeout?.(request, 0);
          return broker.subscribe(request);
        },
      },
    },
    "/publish": {
      action: "publish",
      methods: {
        POST: async (request, url) => {
          const { message, topic } = await readPublication(request, url, maxBodyBytes);
          return Response.json({ id: await broker.publish(message, { topic }) });
        },
      },
    },
    "/stats": { methods: { GET: () => Response.json(broker.stats()) } },
  };

  /** Sets the CORS headers of a response to this request. */
  const withCors = (request: Request, response: Response): Response => {
    const headers = response.headers;
    if (allowOrigin === "*") headers.set("access-control-allow-origin", "*");
    else {
      const origin = request.headers.get("origin");
      if (origin !== null && allowed.has(origin)) {
        headers.set("access-control-allow-origin", origin);
      } else headers.delete("access-control-allow-origin");
      headers.append("vary", "origin");
    }
    return response;
  };

  const respond = async (request: Request, server?: FetchServer): Promise<Response> => {
    const url = new URL(request.url);
    const route = routes[url.pathname];
    if (route === undefined) return errorResponse(404, "not found");
    const methods = Object.keys(route.methods);
    if (request.method === "OPTIONS") {
      return new Response(null, {
        status: 204,
        headers: {
          "access-control-allow-methods": methods.join(", "),
          "access-control-allow-headers": "authorization, content-type, last-event-id",
          "access-control-max-age": "86400",
        },
      });
    }
    const handle = Object.hasOwn(route.methods, request.method)
      ? route.methods[request.method]
      : undefined;
    if (handle === undefined) {
      const allow = methods.join(", ");
      return errorResponse(405, `use ${allow}`, { allow });
    }
    if (route.action !== undefined && !(await authorize(request, route.action))) {
      return errorResponse(401, "a valid token is required", {
        "www-authenticate": 'Bearer realm="sse"',
      });
    }
    try {
      return await handle(request, url, server);
    } catch (error) {
      if (error instanceof MessageError) return errorResponse(400, error.message);
      if (error instanceof HttpError) return errorResponse(error.status, error.message);
      throw error;
    }
  };
  return async (request, server) => withCors(request, await respond(request, server));
}

/** One path: a function per method, and the action `authorize` is asked about. */
interface Route {
  action?: "subscribe" | "publish";
  methods: Record<string, RouteHandler>;
}

type RouteHandler = (
  request: Request,
  url: URL,
  server?: FetchServer,
) => Response | Promise<Response>;

class HttpError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

const PUBLISH_FIELDS = new Set(["data", "event", "topic", "retry", "comment", "id"]);

async function readPublication(
  request: Request,
  url: URL,
  maxBytes: number,
): Promise<{ message: Omit<ServerSentEventMessage, "id">; topic: string[] }> {
  const text = await readText(request, maxBytes);
  const type = request.headers.get("content-type") ?? "";
  if (!/^application\/(.+\+)?json\b/i.test(type)) {
    const topic = url.searchParams.getAll("topic");
    return { message: { data: text, event: url.searchParams.get("event") ?? undefined }, topic };
  }
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new HttpError(400, "body is not valid JSON");
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "body must be a JSON object");
  }
  const fields = body as Record<string, unknown>;
  const unknown = Object.keys(fields).find((key) => !PUBLISH_FIELDS.has(key));
  if (unknown !== undefined) {
    throw new HttpError(400, `unknown field ${JSON.stringify(unknown.slice(0, 64))}`);
  }
  const { data, event, topic, retry, comment, id } = fields;
  // Only translated here: the broker validates every field and names the one
  // it refuses (a missing `data` stays undefined, an `id` is refused there).
  const message = {
    data: typeof data === "string" || data === undefined ? data : JSON.stringify(data),
    event,
    retry,
    comment,
    id,
  } as Omit<ServerSentEventMessage, "id">;
  const topics = (topic === undefined ? [] : Array.isArray(topic) ? topic : [topic]) as string[];
  return { message, topic: topics };
}

/** Reads a body as UTF-8 text, refusing it as soon as it passes `maxBytes`. */
async function readText(request: Request, maxBytes: number): Promise<string> {
  const tooLarge = () => new HttpError(413, `body is larger than ${maxBytes} bytes`);
  if (Number(request.headers.get("content-length")) > maxBytes) throw tooLarge();
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (request.body !== null) {
    const reader = request.body.getReader();
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      size += read.value.byteLength;
      if (size > maxBytes) {
        await reader.cancel();
        throw tooLarge();
      }
      chunks.push(read.value);
    }
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(concat(chunks));
  } catch {
    throw new HttpError(400, "body is not valid UTF-8");
  }
}

function errorResponse(status: number, error: string, headers?: HeadersInit): Response {
  return Response.json({ error }, { status, headers });
}
