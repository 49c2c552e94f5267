/**
 * The subscription APIs of the Durable Streams protocol (its sections 6 and
 * 7), for {@linkcode createStreamsHandler}: durable cursors over one or more
 * streams that wake a worker when they have new data, by a signed webhook
 * or by an event on a wake stream (pull-wake), with claims, acks, leases and
 * generation fencing.
 *
 * ```ts
 * import { createStreamsHandler, MemoryStreamStore } from "./streams.ts";
 * import { Subscriptions } from "./subscriptions.ts";
 *
 * const subscriptions = new Subscriptions();
 * const handle = createStreamsHandler({ prefix: "/v1/stream/", subscriptions });
 * // Deno.serve(handle); later: subscriptions.close();
 * ```
 *
 * State lives behind {@linkcode SubscriptionStore}, a record per
 * subscription replaced only when it is still what the change was computed
 * from (compare-and-swap), so that every process sharing a store (Redis:
 * `RedisSubscriptionStore`) sees one state: a lease taken on one process
 * holds on every other, and a wake is issued once. Every rule of the
 * protocol is written once, here, over that record.
 *
 * Choices the protocol leaves to servers:
 * - Callback and claim tokens are 256 random bits, kept as their SHA-256
 *   and valid for one wake; a token that is not the current wake's answers
 *   `409 FENCED`, a missing one `401`.
 * - A subscription's record is removed on `DELETE` (a re-created one starts
 *   over at generation 1, and the old tokens match nothing).
 * - A webhook that fails (not 2xx, a redirect, no answer within
 *   `webhookTimeout`) ends its wake; the next is tried after 1 s, 2 s, 4 s
 *   ... up to 60 s, each ±20%. A 2xx without `{"done": true}` keeps the
 *   lease for the callback.
 * - A subscription never links its own wake stream (a wake event would
 *   wake it again).
 * - Access, with the streams' {@linkcode Authorize} hook: changing a
 *   subscription (`PUT`, `DELETE`, its streams) needs a `publish` grant for
 *   `__ds/subscriptions/<id>`, reading it or claiming needs `subscribe` for
 *   it; a subscription needs `subscribe` for its pattern (the pattern read
 *   as a name, so that a grant's `*` covers every stream it matches) and
 *   each explicit stream, and a pull-wake one `publish` for its wake stream.
 *   Callbacks, acks and releases need the wake's token only.
 *
 * @module
 */
import { access, type Authorize, type Grants, HttpError, readBody, selectorsMatch } from "./mod.ts";
import { formatOffset, parseOffset, type StreamInfo, type StreamStore } from "./streams.ts";

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/**
 * Where subscription records live: each is a JSON text replaced only by a
 * compare-and-swap, so any number of processes can share a store.
 */
export interface SubscriptionStore {
  /** The record of subscription `id`, or `undefined`. */
  get(id: string): Promise<string | undefined>;
  /**
   * Replaces the record of `id` by `next` (`undefined` removes it) if it is
   * still `expected` (`undefined`: absent). `match` is what appends are
   * matched against (it changes rarely; see `matches`), `due` when the
   * record next needs a look (0: never). Answers `false` when the record
   * changed meanwhile, `"full"` when creating one more would pass the
   * store's limit.
   */
  swap(
    id: string,
    expected: string | undefined,
    next: string | undefined,
    match: string,
    due: number,
  ): Promise<boolean | "full">;
  /**
   * The `match` of every record and a version that grows whenever one of
   * them changes (or a record comes or goes), so that a process can keep them until the version moves.
   * With `known` equal to the current version, `entries` is `undefined`.
   */
  matches(known?: number): Promise<{ version: number; entries?: [string, string][] }>;
  /** Ids whose `due` is at most `now` (at most `limit` of them). */
  due(now: number, limit: number): Promise<string[]>;
  /**
   * The webhook signing key (a private JWK as JSON): the stored one, or
   * `candidate`, stored, if there is none yet.
   */
  signingKey(candidate: string): Promise<string>;
}

/** Options of {@linkcode MemorySubscriptionStore}. */
export interface MemorySubscriptionStoreOptions {
  /** Subscriptions held at most. Defaults to 1000. */
  maxSubscriptions?: number;
}

/** A {@linkcode SubscriptionStore} in this process's memory. */
export class MemorySubscriptionStore implements SubscriptionStore {
  readonly #records = new Map<string, { text: string; match: string; due: number }>();
  readonly #maxSubscriptions: number;
  #version = 0;
  #key: string | undefined;

  /**
   * Creates an empty store.
   *
   * @param options See {@linkcode MemorySubscriptionStoreOptions}.
   */
  constructor(options: MemorySubscriptionStoreOptions = {}) {
    this.#maxSubscriptions = count("maxSubscriptions", options.maxSubscriptions ?? 1000);
  }

  /** {@inheritDoc SubscriptionStore.get} */
  get(id: string): Promise<string | undefined> {
    return Promise.resolve(this.#records.get(id)?.text);
  }

  /** {@inheritDoc SubscriptionStore.swap} */
  swap(
    id: string,
    expected: string | undefined,
    next: string | undefined,
    match: string,
    due: number,
  ): Promise<boolean | "full"> {
    const record = this.#records.get(id);
    if (record?.text !== expected) return Promise.resolve(false);
    if (next === undefined) {
      if (record) this.#version++;
      this.#records.delete(id);
      return Promise.resolve(true);
    }
    if (!record && this.#records.size >= this.#maxSubscriptions) return Promise.resolve("full");
    if (record?.match !== match) this.#version++;
    this.#records.set(id, { text: next, match, due });
    return Promise.resolve(true);
  }

  /** {@inheritDoc SubscriptionStore.matches} */
  matches(known?: number): Promise<{ version: number; entries?: [string, string][] }> {
    if (known === this.#version) return Promise.resolve({ version: known });
    const entries = [...this.#records].map(([id, { match }]): [string, string] => [id, match]);
    return Promise.resolve({ version: this.#version, entries });
  }

  /** {@inheritDoc SubscriptionStore.due} */
  due(now: number, limit: number): Promise<string[]> {
    const ids: string[] = [];
    for (const [id, { due }] of this.#records) {
      if (ids.length >= limit) break;
      if (due !== 0 && due <= now) ids.push(id);
    }
    return Promise.resolve(ids);
  }

  /** {@inheritDoc SubscriptionStore.signingKey} */
  signingKey(candidate: string): Promise<string> {
    this.#key ??= candidate;
    return Promise.resolve(this.#key);
  }
}

function count(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}

// ---------------------------------------------------------------------------
// Names, patterns and webhook URLs
// ---------------------------------------------------------------------------

/**
 * Whether `pattern` matches the stream name `name`: `*` is one path
 * segment, `**` any number of them (none too), anything else itself.
 *
 * @param pattern A subscription's `pattern`.
 * @param name A stream's name, below the streams' prefix.
 * @returns Whether it matches.
 */
export function globMatch(pattern: string, name: string): boolean {
  return segmentsMatch(pattern.split("/"), 0, name.split("/"), 0);
}

function segmentsMatch(pattern: string[], p: number, name: string[], n: number): boolean {
  for (; p < pattern.length; p++, n++) {
    if (pattern[p] === "**") {
      for (let rest = n; rest <= name.length; rest++) {
        if (segmentsMatch(pattern, p + 1, name, rest)) return true;
      }
      return false;
    }
    // Past the name's end, name[n] is undefined: a literal fails here, a
    // `*` ends up past the end (no `**` loop runs there) and fails below.
    if (pattern[p] !== "*" && pattern[p] !== name[n]) return false;
  }
  return n === name.length;
}

/** The part of a pattern before its first wildcard segment: where a listing can start. */
function literalPrefix(pattern: string): string {
  const segments = pattern.split("/");
  const wild = segments.findIndex((segment) => segment === "*" || segment === "**");
  return wild === -1 ? pattern : segments.slice(0, wild).map((segment) => `${segment}/`).join("");
}

/**
 * Why a webhook URL is refused (section 12.8 of the protocol), or
 * `undefined` when it is acceptable: `https` to a public host. With
 * `allowLoopback` (for development), `http` and this machine (`localhost`,
 * `127.0.0.0/8`, `::1`) as well. Private, link-local (cloud metadata),
 * multicast and unspecified addresses are always refused. A host name that
 * resolves to a private address cannot be seen from here: deployments also
 * filter what the server may reach (egress).
 *
 * @param text The URL as given.
 * @param allowLoopback Whether this machine may be the target.
 * @returns The reason, in one line, or `undefined`.
 */
export function webhookUrlProblem(text: string, allowLoopback: boolean): string | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return "webhook.url is not a URL";
  }
  if (url.username !== "" || url.password !== "") return "webhook.url may not hold credentials";
  const place = placeOf(url.hostname);
  const local = allowLoopback && place === "loopback";
  if (url.protocol !== "https:" && !(local && url.protocol === "http:")) {
    return "webhook.url must use https";
  }
  if (place !== "public" && !local) {
    return "webhook.url may not target a loopback, private or link-local address";
  }
  return undefined;
}

/** Where a URL's host (as the URL parser writes it) is. */
function placeOf(host: string): "loopback" | "private" | "public" {
  const name = host.toLowerCase().replace(/\.$/, "");
  if (name === "localhost" || name.endsWith(".localhost")) return "loopback";
  // One label, such as "intranet": a name on the local network.
  if (!name.includes(".") && !name.startsWith("[")) return "private";
  const v4 = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(name)?.slice(1).map(Number);
  if (v4) return placeOfV4(v4);
  if (!name.startsWith("[")) return "public";
  const v6 = name.slice(1, -1);
  if (v6 === "::1") return "loopback";
  // The parser writes an IPv4-mapped address as ::ffff: and two hex groups.
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(v6);
  if (mapped) {
    const [high, low] = [parseInt(mapped[1], 16), parseInt(mapped[2], 16)];
    return placeOfV4([high >> 8, high & 0xff, low >> 8, low & 0xff]);
  }
  // Unspecified, other embedded IPv4, unique local (fc00::/7), link-local (fe80::/10), multicast.
  return v6.startsWith("::") || /^f[cd]/.test(v6) || /^fe[89ab]/.test(v6) || v6.startsWith("ff")
    ? "private"
    : "public";
}

function placeOfV4([a, b]: number[]): "loopback" | "private" | "public" {
  if (a === 127) return "loopback";
  return a === 0 || a === 10 || (a === 169 && b === 254) || (a === 172 && b >= 16 && b <= 31) ||
      (a === 192 && b === 168) || (a === 100 && b >= 64 && b <= 127) || a >= 224
    ? "private"
    : "public";
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/** A stream a subscription follows, and how far it has been processed. */
interface Link {
  /** Matched by the pattern. */
  glob?: true;
  /** Listed in `streams`. */
  explicit?: true;
  /** The position processed up to (an ack of offset N is position N). */
  acked: number;
}

/** What a store keeps per subscription: its configuration and its delivery state. */
interface SubscriptionRecord {
  id: string;
  type: "webhook" | "pull-wake";
  pattern: string | null;
  /** Explicit streams, sorted, each once. */
  streams: string[];
  webhook: string | null;
  wake_stream: string | null;
  lease_ttl_ms: number;
  description: string | null;
  created_at: string;
  /** The URL of the streams' root, as the subscription was created at. */
  root: string;
  links: Record<string, Link>;
  generation: number;
  /** The wake in flight, if any. */
  wake_id: string | null;
  /** The SHA-256 of the wake's token (callback or claim). */
  token: string | null;
  /** The pull-wake worker holding the lease. */
  holder: string | null;
  /** When the lease ends, 0 when none runs. */
  lease_until: number;
  /** The tails a webhook wake was sent with: `{"done": true}` acks them. */
  snapshot: Record<string, number>;
  /** Failed webhook attempts in a row. */
  attempt: number;
  /** When a failed webhook is tried again, 0 when none failed. */
  retry_at: number;
}

const MIN_LEASE = 1000;
const MAX_LEASE = 600_000;
const DEFAULT_LEASE = 30_000;
const ID = /^[A-Za-z0-9._~-]{1,128}$/;
// deno-lint-ignore no-control-regex -- control characters are what it refuses
const WORKER = /^[^\x00-\x1f\x7f]{1,256}$/;
const MAX_TEXT = 1024;
const MAX_RETRY = 60_000;
const encoder = new TextEncoder();

function matchOf(record: SubscriptionRecord): string {
  return JSON.stringify([record.pattern, record.streams, record.wake_stream]);
}

function dueOf(record: SubscriptionRecord): number {
  return record.retry_at !== 0 ? record.retry_at : record.lease_until;
}

/**
 * Forgets the streams among `looked` that are gone (no tail): a link only a
 * pattern made goes, so that deleted streams do not fill the subscription;
 * an explicit one stays, from the start, for a stream created there again.
 * Answers whether anything changed.
 */
function prune(record: SubscriptionRecord, looked: string[], tails: Map<string, number>): boolean {
  let changed = false;
  for (const name of looked) {
    const link = record.links[name];
    if (!link || tails.has(name)) continue;
    if (!link.explicit) delete record.links[name];
    else if (link.acked !== 0) link.acked = 0;
    else continue;
    changed = true;
  }
  return changed;
}

/** What a subscription is made with: what a re-confirmation compares. */
type SubscriptionConfig = Pick<
  SubscriptionRecord,
  "type" | "pattern" | "streams" | "webhook" | "wake_stream" | "lease_ttl_ms" | "description"
>;

/**
 * The SHA-256 of a subscription's normalized configuration, which a
 * re-confirmation must match (its explicit streams sorted, each once).
 */
function configHash(config: SubscriptionConfig): Promise<string> {
  const { type, pattern, streams, webhook, wake_stream, lease_ttl_ms, description } = config;
  return sha256(
    JSON.stringify([type, pattern, streams, webhook, wake_stream, lease_ttl_ms, description]),
  );
}

/** Ends the wake in flight (its tokens match nothing after). */
function endWake(record: SubscriptionRecord): void {
  record.wake_id = null;
  record.token = null;
  record.holder = null;
  record.lease_until = 0;
  record.snapshot = {};
}

async function sha256(text: string): Promise<string> {
  return base64url(new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text))));
}

function base64url(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_")
    .replace(/=+$/, "");
}

function randomToken(): string {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

/** Backoff before webhook attempt `attempt + 1`: 1 s doubling to 60 s, ±20%. */
function backoff(attempt: number): number {
  return Math.min(MAX_RETRY, 1000 * 2 ** Math.min(attempt - 1, 6)) * (0.8 + Math.random() * 0.4);
}

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

/** Options of {@linkcode Subscriptions}. */
export interface SubscriptionsOptions {
  /** Where subscription records live. Defaults to a new {@linkcode MemorySubscriptionStore}. */
  store?: SubscriptionStore;
  /**
   * Allow webhook URLs to this machine (`localhost`, `127.0.0.0/8`, `::1`),
   * by `http` too: for development only. Private and link-local addresses
   * stay refused. Defaults to `false`.
   */
  allowLoopbackWebhooks?: boolean;
  /** Streams one subscription follows at most. Defaults to 1000. */
  maxStreams?: number;
  /** Milliseconds a webhook may take to answer. Defaults to 10000. */
  webhookTimeout?: number;
  /** Milliseconds between looks for ended leases and retries due. Defaults to 500. */
  sweepInterval?: number;
  /** Bytes one request body may have (413 beyond). Defaults to 64 KiB. */
  maxBodyBytes?: number;
  /** Told, in one line, when a webhook fails or a wake cannot be written. Defaults to none. */
  logger?: (line: string) => void;
}

/** What the streams handler gives the subscriptions it serves. */
export interface SubscriptionsContext {
  /** The streams' path prefix. */
  prefix: string;
  /** Where streams live. */
  store: StreamStore;
  /** Who may do what. */
  authorize: Authorize;
  /** The origin clients reach the server at, if configured. */
  origin?: string;
}

type Grant = true | Grants;

/** A refusal of the subscription APIs: `{"error": {"code", "message"}}`. */
function problem(
  status: number,
  code: string,
  message: string,
  extra: Record<string, unknown> = {},
): Response {
  return Response.json({ error: { code, message, ...extra } }, {
    status,
    headers: { "cache-control": "no-store" },
  });
}

/** The codes of the refusals that come from mod.ts (tokens, and bodies). */
const CODES: Record<number, string> = {
  401: "UNAUTHORIZED",
  408: "REQUEST_TIMEOUT",
  413: "PAYLOAD_TOO_LARGE",
};

/** A refusal thrown inside the engine, answered as {@linkcode problem}. */
class Refusal extends Error {
  readonly status: number;
  readonly code: string;
  readonly extra: Record<string, unknown>;
  constructor(status: number, code: string, message: string, extra: Record<string, unknown> = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.extra = extra;
  }
}

/** The signing key in use: the private key, and its public JWK with `kid`. */
interface Signer {
  key: CryptoKey;
  kid: string;
  jwk: Record<string, string>;
}

/**
 * The subscription engine: give it to {@linkcode createStreamsHandler} as
 * `subscriptions` (one handler per engine), and call
 * {@linkcode Subscriptions.close} when the server stops.
 */
export class Subscriptions {
  readonly #state: SubscriptionStore;
  readonly #allowLoopback: boolean;
  readonly #maxStreams: number;
  readonly #webhookTimeout: number;
  readonly #sweepInterval: number;
  readonly #bodyLimits: { maxBytes: number; timeout: number };
  readonly #logger?: (line: string) => void;
  #context: SubscriptionsContext | undefined;
  #signer: Promise<Signer> | undefined;
  #matches:
    | { version: number; entries: [string, string[], string | null, string | null][] }
    | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #sweeping = false;
  #closed = false;
  /** Webhook requests under way, aborted on close. */
  readonly #deliveries = new Set<AbortController>();

  /**
   * Creates the engine; it starts once a streams handler serves it.
   *
   * @param options See {@linkcode SubscriptionsOptions}.
   */
  constructor(options: SubscriptionsOptions = {}) {
    this.#state = options.store ?? new MemorySubscriptionStore();
    this.#allowLoopback = options.allowLoopbackWebhooks ?? false;
    this.#maxStreams = count("maxStreams", options.maxStreams ?? 1000);
    this.#webhookTimeout = count("webhookTimeout", options.webhookTimeout ?? 10_000);
    this.#sweepInterval = count("sweepInterval", options.sweepInterval ?? 500);
    this.#bodyLimits = {
      maxBytes: count("maxBodyBytes", options.maxBodyBytes ?? 64 * 1024),
      timeout: 10_000,
    };
    this.#logger = options.logger;
  }

  /**
   * Connects the engine to the streams handler that serves it (the handler
   * calls this once); starts the look for ended leases and retries due.
   *
   * @param context What the handler serves.
   */
  attach(context: SubscriptionsContext): void {
    if (this.#context) throw new TypeError("these subscriptions already serve a streams handler");
    this.#context = context;
    if (this.#closed) return;
    this.#timer = setInterval(() => void this.#sweep(), this.#sweepInterval);
  }

  /** Stops the sweep and aborts webhook requests under way. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#timer);
    for (const delivery of this.#deliveries) delivery.abort();
  }

  get #streams(): SubscriptionsContext {
    if (!this.#context) throw new TypeError("the subscriptions serve no streams handler");
    return this.#context;
  }

  /**
   * Answers a request under `<prefix>__ds/`.
   *
   * @param request The request.
   * @param rest Its path after `__ds/`.
   * @returns The response.
   */
  async handle(request: Request, rest: string): Promise<Response> {
    try {
      return await this.#route(request, rest);
    } catch (error) {
      if (error instanceof Refusal) {
        return problem(error.status, error.code, error.message, error.extra);
      }
      if (error instanceof HttpError) {
        const response = problem(error.status, CODES[error.status] ?? "ERROR", error.message);
        for (const [name, value] of Object.entries(error.headers)) {
          response.headers.set(name, value);
        }
        return response;
      }
      this.#logger?.(`subscription request failed: ${(error as Error)?.message ?? error}`);
      return problem(503, "UNAVAILABLE", "the subscription store is unavailable: try again", {});
    }
  }

  async #route(request: Request, rest: string): Promise<Response> {
    const method = request.method;
    if (rest === "jwks.json") {
      if (method !== "GET" && method !== "HEAD") {
        throw new Refusal(405, "METHOD_NOT_ALLOWED", "use GET");
      }
      const signer = await this.#signing();
      return new Response(method === "HEAD" ? null : JSON.stringify({ keys: [signer.jwk] }), {
        headers: {
          "content-type": "application/jwk-set+json",
          "cache-control": "public, max-age=300",
        },
      });
    }
    const parts = /^subscriptions\/([^/]+)(?:\/(streams|callback|claim|ack|release)(?:\/(.+))?)?$/
      .exec(rest);
    if (!parts || (parts[3] !== undefined && parts[2] !== "streams")) {
      throw new Refusal(404, "NOT_FOUND", "no such subscription API");
    }
    const [, id, action, member] = parts;
    if (!ID.test(id)) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        "a subscription id is 1-128 of A-Z a-z 0-9 . _ ~ -",
      );
    }
    const route = `${method} ${action ?? ""}${member === undefined ? "" : "/"}`;
    switch (route) {
      case "PUT ":
        return await this.#create(request, id, await this.#grant(request, "publish", id));
      case "GET ":
        await this.#grant(request, "subscribe", id);
        return Response.json(await this.#view(await this.#existing(id)), {
          headers: { "cache-control": "no-store" },
        });
      case "DELETE ":
        await this.#grant(request, "publish", id);
        await this.#remove(id);
        return new Response(null, { status: 204 });
      case "POST streams":
        await this.#grant(request, "publish", id);
        return await this.#addStreams(request, id);
      case "DELETE streams/":
        await this.#grant(request, "publish", id);
        return await this.#removeStream(id, member);
      case "POST claim":
        await this.#grant(request, "subscribe", id);
        return await this.#claim(request, id);
      case "POST callback":
      case "POST ack":
      case "POST release":
        return await this.#settle(request, id, action as "callback" | "ack" | "release");
      default:
        throw new Refusal(405, "METHOD_NOT_ALLOWED", "this method does not apply here");
    }
  }

  /** The grant for `action` on the subscription itself. */
  async #grant(request: Request, action: "subscribe" | "publish", id: string): Promise<Grant> {
    const allowed = await access(this.#streams.authorize, request, action);
    if (allowed !== true && !selectorsMatch(allowed[action] ?? [], `__ds/subscriptions/${id}`)) {
      throw new Refusal(403, "FORBIDDEN", `no ${action} grant for this subscription`);
    }
    return allowed;
  }

  /**
   * Refuses the pattern or a stream the request may not read: its grants
   * asked for once, however many streams it names.
   */
  async #mayRead(request: Request, pattern: string | null, names: string[]): Promise<void> {
    const allowed = await access(this.#streams.authorize, request, "subscribe");
    if (allowed === true) return;
    const readable = (name: string) => selectorsMatch(allowed.subscribe ?? [], name);
    if (pattern !== null && !readable(pattern)) {
      throw new Refusal(403, "FORBIDDEN", "no subscribe grant for pattern");
    }
    const refused = names.find((name) => !readable(name));
    if (refused !== undefined) {
      throw new Refusal(403, "FORBIDDEN", `no subscribe grant for ${JSON.stringify(refused)}`);
    }
  }

  async #body(request: Request): Promise<Record<string, unknown>> {
    const bytes = await readBody(request, this.#bodyLimits);
    let body: unknown;
    try {
      body = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      throw new Refusal(400, "INVALID_REQUEST", "the body is not JSON");
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      throw new Refusal(400, "INVALID_REQUEST", "the body is not a JSON object");
    }
    return body as Record<string, unknown>;
  }

  /** A stream name from a body, as the URL parser writes a path, or a refusal naming `field`. */
  #name(value: unknown, field: string): string {
    if (typeof value !== "string" || value === "" || value.length > MAX_TEXT) {
      throw new Refusal(400, "INVALID_REQUEST", `${field} must be a stream path`);
    }
    // Before the URL parser, which would resolve them (%2e is a dot to it).
    const dots = value.split(/[/\\]/).map((segment) => segment.replace(/%2e/gi, "."));
    if (dots.some((segment) => segment === "." || segment === "..")) {
      throw new Refusal(400, "INVALID_REQUEST", `${field} may not have . or .. segments`);
    }
    const { prefix } = this.#streams;
    const path = new URL(prefix + value.replace(/^\/+/, ""), "http://streams").pathname;
    const name = path.slice(prefix.length);
    if (name.split("/")[0] === "__ds") {
      throw new Refusal(400, "INVALID_REQUEST", `${field} must be a stream path outside __ds`);
    }
    return name;
  }

  #names(value: unknown, field: string): string[] {
    if (!Array.isArray(value)) {
      throw new Refusal(400, "INVALID_REQUEST", `${field} must be an array of stream paths`);
    }
    if (value.length > this.#maxStreams) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        `${field} lists more than ${this.#maxStreams} streams`,
      );
    }
    return [...new Set(value.map((item) => this.#name(item, field)))].sort();
  }

  async #create(request: Request, id: string, grant: Grant): Promise<Response> {
    const body = await this.#body(request);
    const type = body.type;
    if (type !== "webhook" && type !== "pull-wake") {
      throw new Refusal(400, "INVALID_REQUEST", 'type must be "webhook" or "pull-wake"');
    }
    let pattern: string | null = null;
    if (body.pattern !== undefined) {
      if (
        typeof body.pattern !== "string" || body.pattern === "" || body.pattern.length > MAX_TEXT
      ) {
        throw new Refusal(
          400,
          "INVALID_REQUEST",
          "pattern must be a non-empty glob of at most 1024 characters",
        );
      }
      pattern = body.pattern.replace(/^\/+|\/+$/g, "");
      if (pattern.split("/")[0] === "__ds") {
        throw new Refusal(400, "INVALID_REQUEST", "pattern may not cover __ds");
      }
    }
    const streams = body.streams === undefined ? [] : this.#names(body.streams, "streams");
    if (pattern === null && body.streams === undefined) {
      throw new Refusal(400, "INVALID_REQUEST", "give pattern, streams or both");
    }
    let webhook: string | null = null;
    let wakeStream: string | null = null;
    if (type === "webhook") {
      const url = (body.webhook as { url?: unknown } | undefined)?.url;
      if (typeof url !== "string" || url.length > 2048) {
        throw new Refusal(400, "INVALID_REQUEST", "a webhook subscription needs webhook.url");
      }
      const refused = webhookUrlProblem(url, this.#allowLoopback);
      if (refused) throw new Refusal(400, "WEBHOOK_URL_REJECTED", refused);
      webhook = new URL(url).href;
    } else {
      wakeStream = this.#name(body.wake_stream, "wake_stream");
      if (grant !== true && !selectorsMatch(grant.publish ?? [], wakeStream)) {
        throw new Refusal(403, "FORBIDDEN", "no publish grant for wake_stream");
      }
    }
    const lease = body.lease_ttl_ms ?? DEFAULT_LEASE;
    if (
      typeof lease !== "number" || !Number.isInteger(lease) || lease < MIN_LEASE ||
      lease > MAX_LEASE
    ) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        "lease_ttl_ms must be an integer from 1000 to 600000",
      );
    }
    const description = body.description ?? null;
    if (
      description !== null && (typeof description !== "string" || description.length > MAX_TEXT)
    ) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        "description must be a string of at most 1024 characters",
      );
    }
    await this.#mayRead(request, pattern, streams);

    const config: SubscriptionConfig = {
      type,
      pattern,
      streams,
      webhook,
      wake_stream: wakeStream,
      lease_ttl_ms: lease,
      description,
    };
    const hash = await configHash(config);
    const confirm = async (existing: SubscriptionRecord) => {
      // Its configuration now: explicit streams added or removed since count.
      if (await configHash(existing) !== hash) {
        throw new Refusal(
          409,
          "SUBSCRIPTION_CONFLICT",
          "a subscription with this id has another configuration",
        );
      }
      return Response.json(await this.#view(existing), {
        headers: { "cache-control": "no-store" },
      });
    };
    const existing = await this.#record(id);
    if (existing) return await confirm(existing);
    const { prefix, origin } = this.#streams;
    const record: SubscriptionRecord = {
      id,
      ...config,
      created_at: new Date().toISOString(),
      root: `${origin ?? new URL(request.url).origin}${prefix}`,
      links: {},
      generation: 0,
      wake_id: null,
      token: null,
      holder: null,
      lease_until: 0,
      snapshot: {},
      attempt: 0,
      retry_at: 0,
    };
    // Existing streams are linked at their tail: no history is replayed.
    const found = pattern === null ? [] : await this.#list(pattern);
    const tails = await this.#tailsOf([...found, ...streams]);
    for (const name of found) {
      if (name !== wakeStream && tails.has(name)) {
        record.links[name] = { glob: true, acked: tails.get(name)! };
      }
    }
    for (const name of streams) {
      if (name === wakeStream) continue;
      record.links[name] = { ...record.links[name], explicit: true, acked: tails.get(name) ?? 0 };
    }
    if (Object.keys(record.links).length > this.#maxStreams) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        `the subscription would follow more than ${this.#maxStreams} streams`,
      );
    }
    const text = JSON.stringify(record);
    const swapped = await this.#state.swap(id, undefined, text, matchOf(record), 0);
    if (swapped === "full") {
      throw new Refusal(503, "UNAVAILABLE", "the server holds as many subscriptions as it may");
    }
    if (!swapped) {
      // Created meanwhile by another request: compare with that one.
      return await confirm(await this.#existing(id));
    }
    return Response.json(await this.#view(record), {
      status: 201,
      headers: { "cache-control": "no-store" },
    });
  }

  /** The names of existing streams that `pattern` matches (at most `maxStreams` + 1). */
  async #list(pattern: string): Promise<string[]> {
    const { prefix, store } = this.#streams;
    const paths = await store.list(prefix + literalPrefix(pattern), this.#maxStreams + 1);
    return paths.map((path) => path.slice(prefix.length)).filter((name) =>
      name.split("/")[0] !== "__ds" && globMatch(pattern, name)
    );
  }

  /** The tails of the streams that exist among `names`. */
  async #tailsOf(names: Iterable<string>): Promise<Map<string, number>> {
    const { prefix, store } = this.#streams;
    const unique = [...new Set(names)];
    const infos = await Promise.all(unique.map((name) => store.info(prefix + name)));
    const tails = new Map<string, number>();
    unique.forEach((name, i) => {
      const info = infos[i];
      if (typeof info !== "string") tails.set(name, info.tail);
    });
    return tails;
  }

  async #record(id: string): Promise<SubscriptionRecord | undefined> {
    const text = await this.#state.get(id);
    return text === undefined ? undefined : JSON.parse(text);
  }

  async #existing(id: string): Promise<SubscriptionRecord> {
    const record = await this.#record(id);
    if (!record) throw new Refusal(404, "SUBSCRIPTION_NOT_FOUND", "no subscription with this id");
    return record;
  }

  /**
   * Applies `change` to the record of `id` as one compare-and-swap, again
   * on the new record when another process changed it meanwhile. `change`
   * returns `false` to leave it as it is (or throws a refusal).
   */
  async #update(
    id: string,
    change: (record: SubscriptionRecord) => boolean | void,
  ): Promise<SubscriptionRecord> {
    for (let attempt = 0; attempt < 32; attempt++) {
      const text = await this.#state.get(id);
      if (text === undefined) {
        throw new Refusal(404, "SUBSCRIPTION_NOT_FOUND", "no subscription with this id");
      }
      const record: SubscriptionRecord = JSON.parse(text);
      if (change(record) === false) return record;
      const next = JSON.stringify(record);
      if (await this.#state.swap(id, text, next, matchOf(record), dueOf(record)) === true) {
        return record;
      }
    }
    throw new Refusal(503, "UNAVAILABLE", "the subscription is changing too often: try again");
  }

  async #remove(id: string): Promise<void> {
    for (let attempt = 0; attempt < 32; attempt++) {
      const text = await this.#state.get(id);
      if (text === undefined) {
        throw new Refusal(404, "SUBSCRIPTION_NOT_FOUND", "no subscription with this id");
      }
      if (await this.#state.swap(id, text, undefined, "", 0) === true) return;
    }
    throw new Refusal(503, "UNAVAILABLE", "the subscription is changing too often: try again");
  }

  async #addStreams(request: Request, id: string): Promise<Response> {
    const body = await this.#body(request);
    const names = this.#names(body.streams, "streams");
    await this.#mayRead(request, null, names);
    const tails = await this.#tailsOf(names);
    await this.#update(id, (record) => {
      for (const name of names) {
        if (name === record.wake_stream) continue;
        if (!record.streams.includes(name)) record.streams.push(name);
        record.links[name] = {
          ...record.links[name],
          explicit: true,
          acked: record.links[name]?.acked ?? tails.get(name) ?? 0,
        };
      }
      record.streams.sort();
      if (Object.keys(record.links).length > this.#maxStreams) {
        throw new Refusal(
          400,
          "INVALID_REQUEST",
          `the subscription would follow more than ${this.#maxStreams} streams`,
        );
      }
    });
    return new Response(null, { status: 204 });
  }

  async #removeStream(id: string, member: string): Promise<Response> {
    let name: string;
    try {
      name = this.#name(decodeURIComponent(member), "the stream path");
    } catch (error) {
      if (error instanceof Refusal) throw error;
      throw new Refusal(400, "INVALID_REQUEST", "the stream path is not URL-encoded");
    }
    await this.#update(id, (record) => {
      const link = record.links[name];
      if (!record.streams.includes(name) && !link?.explicit) return false;
      record.streams = record.streams.filter((stream) => stream !== name);
      if (link?.glob) delete link.explicit;
      else delete record.links[name];
    });
    return new Response(null, { status: 204 });
  }

  /** A record as the protocol shows it. */
  async #view(record: SubscriptionRecord): Promise<Record<string, unknown>> {
    const webhook = record.webhook === null ? null : {
      url: record.webhook,
      signing: {
        alg: "ed25519",
        kid: (await this.#signing()).kid,
        jwks_url: `${record.root}__ds/jwks.json`,
      },
    };
    return {
      id: record.id,
      subscription_id: record.id,
      type: record.type,
      pattern: record.pattern,
      streams: Object.entries(record.links).map(([path, link]) => ({
        path,
        link_type: link.explicit ? "explicit" : "glob",
        acked_offset: formatOffset(link.acked),
      })),
      webhook,
      wake_stream: record.wake_stream,
      lease_ttl_ms: record.lease_ttl_ms,
      created_at: record.created_at,
      status: record.retry_at ? "failed" : "active",
      description: record.description,
    };
  }

  /** The linked streams with their tails, as wakes and claims list them. */
  #streamsOf(record: SubscriptionRecord, tails: Map<string, number>): Record<string, unknown>[] {
    return Object.entries(record.links).map(([path, link]) => {
      const tail = Math.max(tails.get(path) ?? link.acked, link.acked);
      return {
        path,
        link_type: link.explicit ? "explicit" : "glob",
        acked_offset: formatOffset(link.acked),
        tail_offset: formatOffset(tail),
        has_pending: tail > link.acked,
      };
    });
  }

  // -------------------------------------------------------------------------
  // Wakes
  // -------------------------------------------------------------------------

  /**
   * Called by the streams handler after data was added to the stream
   * `name`, which was at position `before`: links it where a pattern or a
   * list names it, and wakes every idle subscription that follows it.
   * Never rejects: a failure is told to the logger.
   *
   * @param name The stream's name.
   * @param before Its tail before the data.
   */
  async appended(name: string, before: number): Promise<void> {
    if (this.#closed) return;
    try {
      const matches = await this.#matching();
      await Promise.all(matches.map(async ([id, streams, pattern, wakeStream]) => {
        if (name === wakeStream) return;
        const explicit = streams.includes(name);
        const glob = pattern !== null && globMatch(pattern, name);
        if (!explicit && !glob) return;
        let full = false;
        const link = () =>
          this.#update(id, (record) => {
            const link = record.links[name];
            if (link && (!glob || link.glob)) return false;
            full = !link && Object.keys(record.links).length >= this.#maxStreams;
            if (full) return false;
            record.links[name] = {
              ...link,
              ...(glob ? { glob: true } : {}),
              acked: link?.acked ?? before,
            };
          }).catch((error) => {
            if (error instanceof Refusal && error.status === 404) return undefined;
            throw error;
          });
        let record = await link();
        if (full) {
          // Deleted streams may hold places: let them go, then try again.
          await this.#forgetGone(id);
          record = await link();
          if (full) {
            this.#logger?.(
              `subscription ${id} follows ${this.#maxStreams} streams: another is not linked`,
            );
          }
        }
        if (record && record.wake_id === null) await this.#wake(id);
      }));
    } catch (error) {
      this.#logger?.(
        `subscriptions: an append was not matched: ${(error as Error)?.message ?? error}`,
      );
    }
  }

  /** Forgets the streams of subscription `id` that are gone (see `prune`). */
  async #forgetGone(id: string): Promise<void> {
    const current = await this.#record(id);
    if (!current) return;
    const looked = Object.keys(current.links);
    const tails = await this.#tailsOf(looked);
    await this.#update(id, (record) => prune(record, looked, tails));
  }

  /** Every subscription's `[id, streams, pattern, wake_stream]`, cached until the store's version moves. */
  async #matching(): Promise<[string, string[], string | null, string | null][]> {
    const { version, entries } = await this.#state.matches(this.#matches?.version);
    if (entries || !this.#matches) {
      this.#matches = {
        version,
        entries: (entries ?? []).map(([id, match]) => {
          const [pattern, streams, wakeStream] = JSON.parse(match);
          return [id, streams, pattern, wakeStream];
        }),
      };
    }
    return this.#matches.entries;
  }

  /**
   * Issues a wake if the subscription is idle and has pending work, and
   * sends it (webhook) or writes it (pull-wake). Answers whether it did.
   */
  async #wake(id: string): Promise<boolean> {
    const current = await this.#record(id);
    // An early look, so that an append during a wake reads no tails; the swap below decides.
    // Stryker disable next-line ConditionalExpression,LogicalOperator,EqualityOperator,BooleanLiteral: the swap repeats it
    if (!current || current.wake_id !== null || current.retry_at > Date.now()) return false;
    const looked = Object.keys(current.links);
    const tails = await this.#tailsOf(looked);
    const token = randomToken();
    const tokenHash = await sha256(token);
    let woke = false;
    const record = await this.#update(id, (record) => {
      const now = Date.now();
      woke = false;
      if (record.wake_id !== null || record.retry_at > now) return false;
      const pruned = prune(record, looked, tails);
      const pending = Object.entries(record.links).some(([name, link]) =>
        (tails.get(name) ?? 0) > link.acked
      );
      if (!pending) return pruned;
      record.generation++;
      record.wake_id = `w_${crypto.randomUUID()}`;
      record.retry_at = 0;
      record.snapshot = Object.fromEntries(
        Object.keys(record.links).filter((name) => tails.has(name)).map((
          name,
        ) => [name, tails.get(name)!]),
      );
      if (record.type === "webhook") {
        record.token = tokenHash;
        record.lease_until = now + record.lease_ttl_ms;
      }
      woke = true;
    }).catch(() => undefined);
    if (!record || !woke) return false;
    if (record.type === "webhook") {
      void this.#deliver(record, token, tails);
    } else {
      await this.#writeWake(record);
    }
    return true;
  }

  /** Writes a pull-wake subscription's wake event to its wake stream. */
  async #writeWake(record: SubscriptionRecord): Promise<void> {
    const { prefix, store } = this.#streams;
    const first = Object.keys(record.snapshot).find((name) =>
      record.snapshot[name] > record.links[name].acked
    );
    const event = {
      type: "wake",
      subscription_id: record.id,
      stream: first ?? null,
      generation: record.generation,
      ts: Date.now(),
    };
    const result = await store.append(prefix + record.wake_stream, {
      contentType: "application/json",
      records: [encoder.encode(`${JSON.stringify(event)}\n`)],
      close: false,
    }).catch((error) => ({ status: `failed: ${(error as Error)?.message ?? error}` } as const));
    if (result.status !== "ok") {
      this.#logger?.(
        `subscription ${record.id}: the wake event was not written (${result.status})`,
      );
      return;
    }
    void this.appended(record.wake_stream!, (result as { info: StreamInfo }).info.tail - 1);
  }

  /** Sends a webhook wake and applies its outcome. */
  async #deliver(
    record: SubscriptionRecord,
    token: string,
    tails: Map<string, number>,
  ): Promise<void> {
    const body = JSON.stringify({
      subscription_id: record.id,
      wake_id: record.wake_id,
      generation: record.generation,
      streams: this.#streamsOf(record, tails),
      callback_url: `${record.root}__ds/subscriptions/${record.id}/callback`,
      callback_token: token,
    });
    const controller = new AbortController();
    this.#deliveries.add(controller);
    const timer = setTimeout(() => controller.abort(), this.#webhookTimeout);
    let outcome: "done" | "taken" | string;
    try {
      const signer = await this.#signing();
      const time = String(Math.floor(Date.now() / 1000));
      const signature = new Uint8Array(
        await crypto.subtle.sign("Ed25519", signer.key, encoder.encode(`${time}.${body}`)),
      );
      const response = await fetch(record.webhook!, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          "webhook-signature": `t=${time},kid=${signer.kid},ed25519=${base64url(signature)}`,
        },
        body,
        redirect: "manual",
        signal: controller.signal,
      });
      if (response.status < 200 || response.status > 299) {
        await response.body?.cancel();
        outcome = `answered ${response.status}`;
      } else {
        const reply = await limitedJson(response, 64 * 1024);
        outcome = (reply as { done?: unknown })?.done === true ? "done" : "taken";
      }
    } catch (error) {
      outcome = controller.signal.aborted
        ? "did not answer in time"
        : `failed: ${(error as Error)?.name ?? error}`;
    } finally {
      clearTimeout(timer);
      this.#deliveries.delete(controller);
    }
    if (this.#closed) return;
    const wakeId = record.wake_id;
    if (outcome === "taken") return;
    if (outcome === "done") {
      const ended = await this.#update(record.id, (current) => {
        if (current.wake_id !== wakeId) return false;
        for (const [name, tail] of Object.entries(current.snapshot)) {
          const link = current.links[name];
          if (link) link.acked = Math.max(link.acked, tail);
        }
        current.attempt = 0;
        endWake(current);
      }).catch(() => undefined);
      if (ended && ended.wake_id === null) await this.#wake(record.id);
      return;
    }
    this.#logger?.(`subscription ${record.id}: the webhook ${outcome}`);
    await this.#update(record.id, (current) => {
      if (current.wake_id !== wakeId) return false;
      endWake(current);
      current.attempt++;
      current.retry_at = Date.now() + backoff(current.attempt);
    }).catch(() => undefined);
  }

  /** Ends leases that ran out and retries failed webhooks that are due, on whichever process looks first. */
  async #sweep(): Promise<void> {
    if (this.#sweeping || this.#closed) return;
    this.#sweeping = true;
    try {
      const ids = await this.#state.due(Date.now(), 100);
      for (const id of ids) {
        await this.#update(id, (record) => {
          const now = Date.now();
          let changed = false;
          if (record.lease_until !== 0 && record.lease_until <= now) {
            endWake(record);
            changed = true;
          }
          if (record.retry_at !== 0 && record.retry_at <= now) {
            record.retry_at = 0;
            changed = true;
          }
          return changed;
        }).catch(() => undefined);
        await this.#wake(id);
      }
    } catch (error) {
      this.#logger?.(`subscriptions: the sweep failed: ${(error as Error)?.message ?? error}`);
    } finally {
      this.#sweeping = false;
    }
  }

  // -------------------------------------------------------------------------
  // Claims, acks, callbacks and releases
  // -------------------------------------------------------------------------

  async #claim(request: Request, id: string): Promise<Response> {
    const body = await this.#body(request);
    const worker = body.worker;
    if (typeof worker !== "string" || !WORKER.test(worker)) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        "worker must be 1-256 characters without control characters",
      );
    }
    const current = await this.#existing(id);
    if (current.type !== "pull-wake") {
      throw new Refusal(400, "INVALID_REQUEST", "only a pull-wake subscription is claimed");
    }
    const tails = await this.#tailsOf(Object.keys(current.links));
    const token = randomToken();
    const tokenHash = await sha256(token);
    const record = await this.#update(id, (record) => {
      const now = Date.now();
      if (record.holder !== null && record.lease_until > now) {
        throw new Refusal(409, "ALREADY_CLAIMED", "another worker holds the lease", {
          current_holder: record.holder,
          generation: record.generation,
        });
      }
      if (record.wake_id === null || record.holder !== null) {
        const pending = Object.entries(record.links).some(([name, link]) =>
          (tails.get(name) ?? 0) > link.acked
        );
        if (!pending) {
          throw new Refusal(409, "NO_PENDING_WORK", "the subscription has no pending work");
        }
        record.generation++;
        record.wake_id = `w_${crypto.randomUUID()}`;
      }
      record.holder = worker;
      record.token = tokenHash;
      record.lease_until = now + record.lease_ttl_ms;
      record.snapshot = Object.fromEntries(tails);
    });
    return Response.json({
      wake_id: record.wake_id,
      generation: record.generation,
      token,
      streams: this.#streamsOf(record, tails),
      lease_ttl_ms: record.lease_ttl_ms,
    }, { headers: { "cache-control": "no-store" } });
  }

  /** A callback (webhook), an ack or a release (pull-wake): fenced by the wake's token, generation and id. */
  async #settle(
    request: Request,
    id: string,
    action: "callback" | "ack" | "release",
  ): Promise<Response> {
    const authorization = request.headers.get("authorization") ?? "";
    const token = /^Bearer ([A-Za-z0-9_-]{1,128})$/.exec(authorization)?.[1];
    if (token === undefined) {
      throw new Refusal(401, "UNAUTHORIZED", "the wake's token is required as a Bearer token");
    }
    const body = await this.#body(request);
    const current = await this.#existing(id);
    if ((action === "callback") !== (current.type === "webhook")) {
      throw new Refusal(
        400,
        "INVALID_REQUEST",
        `${action} does not apply to a ${current.type} subscription`,
      );
    }
    const { generation, wake_id: wakeId } = body;
    if (typeof generation !== "number" || typeof wakeId !== "string") {
      throw new Refusal(400, "INVALID_REQUEST", "wake_id and generation are required");
    }
    const done = action === "release" || body.done === true;
    const acks = action === "release" ? [] : this.#acks(body.acks);
    const tails = await this.#tailsOf(acks.map(([name]) => name));
    const tokenHash = await sha256(token);
    const record = await this.#update(id, (record) => {
      if (
        record.token !== tokenHash || record.generation !== generation || record.wake_id !== wakeId
      ) {
        throw new Refusal(409, "FENCED", "this wake is no longer current");
      }
      for (const [name, position] of acks) {
        const link = record.links[name];
        if (!link) {
          throw new Refusal(
            400,
            "INVALID_REQUEST",
            `the subscription does not follow ${JSON.stringify(name)}`,
          );
        }
        if (position > (tails.get(name) ?? link.acked)) {
          throw new Refusal(
            400,
            "INVALID_OFFSET",
            `an ack of ${JSON.stringify(name)} is past its tail`,
          );
        }
        link.acked = Math.max(link.acked, position);
      }
      if (done) {
        record.attempt = 0;
        endWake(record);
      } else {
        record.lease_until = Date.now() + record.lease_ttl_ms;
      }
    });
    const nextWake = done && record.wake_id === null ? await this.#wake(id) : false;
    if (action === "release") return new Response(null, { status: 204 });
    return Response.json({ ok: true, next_wake: nextWake }, {
      headers: { "cache-control": "no-store" },
    });
  }

  /** `acks` of a callback or ack: `[name, position]` pairs. */
  #acks(value: unknown): [string, number][] {
    if (value === undefined) return [];
    if (!Array.isArray(value) || value.length > this.#maxStreams) {
      throw new Refusal(400, "INVALID_REQUEST", "acks must be an array of {stream, offset}");
    }
    return value.map((ack) => {
      const position = typeof ack?.offset === "string" ? parseOffset(ack.offset) : undefined;
      if (position === undefined) {
        throw new Refusal(400, "INVALID_OFFSET", "an ack's offset is malformed");
      }
      return [this.#name(ack.stream, "acks[].stream"), position];
    });
  }

  // -------------------------------------------------------------------------
  // Signing
  // -------------------------------------------------------------------------

  /** The webhook signing key: the store's, made and stored by the first process to need one. */
  #signing(): Promise<Signer> {
    this.#signer ??= (async () => {
      const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, true, [
        "sign",
        "verify",
      ]) as CryptoKeyPair;
      const candidate = JSON.stringify(await crypto.subtle.exportKey("jwk", pair.privateKey));
      const stored = JSON.parse(await this.#state.signingKey(candidate)) as JsonWebKey;
      const key = await crypto.subtle.importKey("jwk", stored, { name: "Ed25519" }, false, [
        "sign",
      ]);
      // The key id is the RFC 7638 thumbprint of the public key.
      const thumbprint = await crypto.subtle.digest(
        "SHA-256",
        encoder.encode(JSON.stringify({ crv: "Ed25519", kty: "OKP", x: stored.x })),
      );
      const kid = `ds_${base64url(new Uint8Array(thumbprint))}`;
      return {
        key,
        kid,
        jwk: { kty: "OKP", crv: "Ed25519", kid, use: "sig", alg: "EdDSA", x: stored.x! },
      };
    })();
    this.#signer.catch(() => this.#signer = undefined);
    return this.#signer;
  }
}

/** A response's JSON body, read up to `limit` bytes (beyond: `undefined`, as for no JSON). */
async function limitedJson(response: Response, limit: number): Promise<unknown> {
  if (!response.body) return undefined;
  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > limit) {
      await reader.cancel();
      return undefined;
    }
    chunks.push(value);
  }
  try {
    return JSON.parse(new TextDecoder().decode(await new Blob(chunks as BlobPart[]).arrayBuffer()));
  } catch {
    return undefined;
  }
}
