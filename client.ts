/**
 * A browser client for the broker's event stream (`/events`) that opens one
 * connection per browser, however many tabs use it. The tabs elect one of
 * them with Web Locks to hold the stream, and it hands every event to the
 * others over a `BroadcastChannel`; when it closes or crashes, another takes
 * over and resumes from the newest event every tab has seen, so no tab
 * misses an event or gets one twice. Each tab names its own topics: the
 * stream carries all of them, and each tab receives only its own.
 *
 * No imports, so it can be served as it is (the demo server serves it at
 * `/client.js`). Where Web Locks or `BroadcastChannel` is missing, each tab
 * connects by itself.
 *
 * @example
 * ```ts
 * import { connect } from "./client.ts";
 *
 * const stream = connect("/events", { topics: ["news"] });
 * stream.on("message", (event) => console.log(event.id, event.data));
 * stream.on("gap", () => console.log("some events may be missing"));
 * ```
 *
 * @module
 */

/** Where a connection is: opening or waiting to open again, open, or ended. */
export type ClientState = "connecting" | "open" | "closed";

/** One event of the stream, as a handler receives it. */
export interface ReceivedEvent {
  /** Its `event:` name; `message` when it had none. */
  readonly type: string;
  /** Its `data:` lines, joined by line feeds. */
  readonly data: string;
  /** Its `id:`; empty for events without one (`gap`, `replayed`). */
  readonly id: string;
  /** The topics it was published to (none for an event published to none). */
  readonly topics: readonly string[];
}

/** A function called with each event of the type it listens for. */
export type EventHandler = (event: ReceivedEvent) => void;

/** What {@linkcode ConnectOptions.onStateChange} is told. */
export interface StateChange {
  /** The new state. */
  readonly state: ClientState;
  /** Why, in one line, when it is not open: `HTTP 503`, `network error`, `closed`. */
  readonly reason: string;
  /** While connecting again: in how many milliseconds. */
  readonly retryIn?: number;
}

/** Options for {@linkcode connect}. */
export interface ConnectOptions {
  /** Receive only events published to one of these topics. Defaults to every event. */
  topics?: readonly string[];
  /**
   * A token sent as `Authorization: Bearer`, or a function that returns one
   * (called before each connection, so it can renew an expired one; a `401`
   * or `403` is then retried). Defaults to none: the cookie, if any.
   */
  token?: string | (() => string | Promise<string>);
  /** Send cookies to a server of another origin. Defaults to false. */
  withCredentials?: boolean;
  /** Share one connection among this browser's tabs. Defaults to true. */
  shared?: boolean;
  /**
   * The name tabs share a connection under: tabs that connect to one URL
   * share it unless their names differ (another user's tabs, say). Defaults
   * to the stream's URL.
   */
  name?: string;
  /**
   * Milliseconds before the first reconnection when the server sent no
   * `retry:`; each failure in a row doubles the wait, plus up to half of it
   * at random. Defaults to 1000.
   */
  retry?: number;
  /** The longest wait between reconnections, unless the server asks for longer. Defaults to 30000. */
  maxRetry?: number;
  /**
   * The most topics the shared stream names (the broker's `MAX_TOPICS`):
   * past it, it carries every event, and each tab still gets only its own.
   * Defaults to 32.
   */
  maxTopics?: number;
  /** Called when the state changes. Defaults to none. */
  onStateChange?: (change: StateChange) => void;
}

/** An open connection: what {@linkcode connect} returns. */
export interface Connection {
  /** Calls `handler` with each event of `type` (`message`, a name, `gap`, `replayed`). */
  on(type: string, handler: EventHandler): void;
  /** Stops calling `handler` for `type`. */
  off(type: string, handler: EventHandler): void;
  /** Ends this tab's use of the stream; another tab takes it over if it held it. */
  close(): void;
  /**
   * Opens the shared stream again at once, from the last id (say, after
   * signing in: the new cookie goes with it).
   */
  reconnect(): void;
  /** The stream's state, as this tab sees it. */
  readonly state: ClientState;
  /** Whether this tab holds the stream for every tab. */
  readonly holding: boolean;
}

/** The part of `navigator.locks` used here. */
interface Locks {
  request(name: string, options: { signal: AbortSignal }, hold: () => Promise<void>): Promise<void>;
  query(): Promise<{ held?: { name?: string }[] }>;
}

/** What tabs tell each other. */
type Note =
  | { k: "hi"; from: string; topics: string[] | null; pos: string }
  | { k: "who" }
  | { k: "re" }
  | { k: "ev"; e: ReceivedEvent }
  | { k: "pos"; id: string }
  | { k: "st"; c: StateChange };

/** How a connection ended: why, in one line, and whether trying again could change it. */
interface Outcome {
  reason: string;
  fatal?: boolean;
}

/** The longest wait timers take (about 24.8 days); a longer one would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** How long a tab that takes the stream over waits for the others' topics. */
const COLLECT_MS = 500;

/**
 * Connects to an event stream, sharing one connection among the tabs of
 * this browser that connect to the same URL. It reconnects after every
 * failure and every end of the stream (backing off, honouring `retry:`),
 * resuming with `Last-Event-ID`; it stops only on `close()`, a `204`, or a
 * refusal that retrying cannot change (a `4xx` other than `408` and `429`,
 * or a `401`/`403` with a fixed token).
 *
 * @example
 * ```ts
 * import { connect } from "./client.ts";
 *
 * const stream = connect("https://broker.example/events", {
 *   token: () => fetch("/token").then((response) => response.text()),
 *   onStateChange: ({ state, reason }) => console.log(state, reason),
 * });
 * stream.on("price", (event) => console.log(event.topics, event.data));
 * ```
 *
 * @param url The stream's URL, relative to the page's.
 * @param options See {@linkcode ConnectOptions}.
 * @returns The connection.
 */
export function connect(url: string | URL, options: ConnectOptions = {}): Connection {
  const g = globalThis as { location?: { href: string }; navigator?: { locks?: Locks } };
  const target = new URL(url, g.location?.href);
  const mine = options.topics?.length ? [...options.topics] : null;
  const { retry = 1000, maxRetry = 30000, maxTopics = 32, token } = options;
  const handlers = new Map<string, Set<EventHandler>>();
  // Not randomUUID: pages served over plain HTTP have none.
  const me = crypto.getRandomValues(new Uint32Array(4)).join("-");
  // Prefixed, so that no other lock or channel of the page is taken for it;
  // versioned, so that tabs of another version of this file share nothing.
  const key = `sse-broker/1 ${target.href} ${options.name ?? ""}`;
  const locks = g.navigator?.locks;
  const channel = locks && typeof BroadcastChannel === "function" && options.shared !== false
    ? new BroadcastChannel(key)
    : undefined;
  const stop = new AbortController();
  let change: StateChange = { state: "connecting", reason: "" };
  let holding = false;
  /** The id of the newest event this tab has taken in: older ones are repeats. */
  let pos = "";
  /** While holding: the topics of every tab (null: every event). */
  let wanted: Set<string> | null = null;
  /** While holding: the stream's last event id, which a reconnection resumes after. */
  let cursor = "";
  /** While holding: ends the current connection (or its wait), to open it again at once. */
  let attempt: AbortController | undefined;
  /** While taking over: tabs not heard from yet. */
  let waitingFor: Set<string> | undefined;
  /** While holding: events the current connection brought. */
  let received = 0;
  let heard: (() => void) | undefined;

  const post = (note: Note) => channel?.postMessage(note);
  const setState = (next: StateChange) => {
    if (stop.signal.aborted) return; // closed by close(): for good
    change = next;
    if (holding) post({ k: "st", c: next });
    options.onStateChange?.(next);
  };
  const take = (event: ReceivedEvent) => {
    if (event.id) {
      if (!newer(event.id, pos)) return;
      pos = event.id;
    }
    // Events without an id (gap, replayed) concern every tab.
    if (event.id && mine && !event.topics.some((topic) => mine.includes(topic))) return;
    for (const handler of handlers.get(event.type) ?? []) {
      try {
        handler(event);
      } catch (error) {
        setTimeout(() => { // reported, not let stop the stream
          throw error;
        });
      }
    }
  };
  const advance = (id: string) => {
    if (newer(id, pos)) pos = id;
  };
  /** Adds a tab's topics to the stream's; true when that needs a new connection. */
  const want = (topics: string[] | null): boolean => {
    if (wanted === null) return false;
    if (topics === null) return (wanted = null, true);
    const before = wanted.size;
    for (const topic of topics) wanted.add(topic);
    if (wanted.size > maxTopics) wanted = null; // every event, rather than a refusal
    return wanted === null || wanted.size > before;
  };

  if (channel) {
    channel.onmessage = ({ data: note }: MessageEvent<Note>) => {
      if (note.k === "ev") take(note.e);
      else if (note.k === "pos") advance(note.id);
      else if (note.k === "st") {
        // Not from a holder gone before this tab took over (after close(), none comes).
        if (!holding) {
          change = note.c;
          options.onStateChange?.(note.c);
        }
      } else if (note.k === "who") post({ k: "hi", from: me, topics: mine, pos });
      else if (note.k === "re") {
        if (holding) attempt?.abort();
      } else if (note.k === "hi" && holding) {
        // A tab said hi: it starts from here, and its topics join the stream's.
        if (cursor) post({ k: "pos", id: cursor });
        post({ k: "st", c: change });
        // One that had not heard of the last one yet resumes where the others are.
        if (!cursor) cursor = note.pos;
        waitingFor?.delete(note.from);
        if (waitingFor?.size === 0) heard?.();
        if (want(note.topics)) {
          // Its topics from its newest id: a tab that answers late (a
          // frozen one) misses nothing of them since the stream changed hands.
          if (cursor && note.pos && newer(cursor, note.pos)) cursor = note.pos;
          attempt?.abort();
        }
      }
    };
    // Held while the tab lives, so a tab taking over can count the others.
    locks!.request(`${key}\n${me}`, { signal: stop.signal }, () => aborted(stop.signal))
      .catch(() => {});
    locks!.request(key, { signal: stop.signal }, hold).catch(() => {});
    post({ k: "hi", from: me, topics: mine, pos });
  } else hold();

  async function hold(): Promise<void> {
    try {
      holding = true;
      await resume();
    } finally {
      holding = false; // its lock goes to the next tab
    }
  }

  /**
   * Holds the stream: learns the other tabs' topics, then reads until
   * closed. It resumes from the newest id this tab has taken in, which no
   * other tab is behind: every tab takes in what the last holder handed
   * out, in one order, and this one may not have taken in the last of it
   * yet (then what it reads again is dropped by id).
   */
  async function resume(): Promise<void> {
    // Every tab sees the stream change hands, also from one that crashed.
    if (change.state === "open") setState({ state: "connecting", reason: "handing over" });
    wanted = mine && (mine.length > maxTopics ? null : new Set(mine));
    cursor = pos;
    if (channel) {
      // The topics of every living tab (each holds a lock of its own), so
      // that one stream carries them all from the start.
      waitingFor = await livingTabs();
      const collected = new Promise<void>((resolve) => heard = resolve);
      post({ k: "who" });
      // A tab that has not answered in time joins the stream when it does.
      if (waitingFor.size > 0) await Promise.race([collected, sleep(COLLECT_MS, stop.signal)]);
      waitingFor = undefined;
    }
    let failures = 0;
    let serverRetry: number | undefined;
    while (!stop.signal.aborted) {
      // close() aborts it too: one signal, no AbortSignal.any (older browsers lack it).
      const current = attempt = new AbortController();
      received = 0;
      const outcome: Outcome = await read(current.signal, (ms) => serverRetry = ms).catch(
        (error) => ({ reason: String(error.message).split("\n")[0] }),
      );
      // close() aborts it too, and ends the loop.
      if (current.signal.aborted) continue; // more topics, or reconnect(): at once
      if (outcome.fatal) {
        // Closed for every tab: this one keeps the lock, so no other tries again.
        setState({ state: "closed", reason: outcome.reason });
        return await aborted(stop.signal);
      }
      failures = received > 0 ? 0 : failures + 1;
      // At least 10 ms (a retry: 0 would be a loop), at most what timers take.
      const base = Math.max(serverRetry ?? retry, 10);
      const longest = Math.min(Math.max(maxRetry, base), MAX_TIMER_MS);
      const wait = Math.min(longest, base * 2 ** Math.max(0, failures - 1));
      const retryIn = Math.round(Math.min(wait * (1 + Math.random() / 2), MAX_TIMER_MS));
      setState({ state: "connecting", reason: outcome.reason, retryIn });
      await sleep(retryIn, current.signal);
    }
  }

  /** The ids of the other tabs that live. */
  async function livingTabs(): Promise<Set<string>> {
    const prefix = `${key}\n`;
    const tabs = new Set<string>();
    for (const { name = "" } of (await locks!.query()).held ?? []) {
      // Stryker disable next-line EqualityOperator,ConditionalExpression,LogicalOperator: counting itself only costs COLLECT_MS
      if (name.startsWith(prefix) && name !== prefix + me) tabs.add(name.slice(prefix.length));
    }
    return tabs;
  }

  /** One connection: reads it to its end. */
  async function read(
    signal: AbortSignal,
    setRetry: (ms: number) => void,
  ): Promise<Outcome> {
    const headers: Record<string, string> = { accept: "text/event-stream" };
    const given = typeof token === "function" ? await token() : token;
    if (given) headers.authorization = `Bearer ${given}`;
    if (cursor) headers["last-event-id"] = cursor;
    const where = new URL(target);
    for (const topic of wanted ?? []) where.searchParams.append("topic", topic);
    where.searchParams.set("withTopics", "1");
    const response = await fetch(where, {
      headers,
      signal,
      cache: "no-store",
      credentials: options.withCredentials ? "include" : "same-origin",
    });
    const { status } = response;
    let reason = `HTTP ${status}`;
    if (status === 204) return { reason, fatal: true };
    const mediaType = response.headers.get("content-type") ?? "";
    if (status === 200 && !/^text\/event-stream\b/i.test(mediaType)) reason += `: ${mediaType}`;
    if (reason !== "HTTP 200" || !response.body) {
      response.body?.cancel().catch(() => {});
      const lasting = status >= 400 && status < 500 && status !== 408 && status !== 429 &&
        !(typeof token === "function" && (status === 401 || status === 403));
      return { reason, fatal: lasting };
    }
    setState({ state: "open", reason: "" });
    // The event stream format (WHATWG HTML, 9.2.6), with `topic:` lines.
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    let type = "";
    let data: string[] = [];
    /** This event's `id:`, if it had one (an empty one clears the resume point). */
    let id: string | undefined;
    let topics: string[] = [];
    const line = (text: string) => {
      if (text === "") {
        if (data.length > 0) {
          const event = { type: type || "message", data: data.join("\n"), id: id ?? "", topics };
          received++;
          take(event);
          post({ k: "ev", e: event });
        } else if (id) post({ k: "pos", id });
        if (id !== undefined) cursor = id;
        type = "";
        id = undefined;
        data = [];
        topics = [];
        return;
      }
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && !value.includes("\0")) id = value;
      else if (field === "retry" && /^\d+$/.test(value)) setRetry(Number(value));
      else if (field === "topic") topics.push(value);
    };
    /** Whether the last read ended with a CR: a LF first in the next one ends no line. */
    let afterCR = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { reason: "ended" };
      // The decoder took a byte order mark off the start.
      rest += afterCR && value[0] === "\n" ? value.slice(1) : value;
      afterCR &&= value === "";
      const breaks = /\r\n|\r|\n/g;
      let start = 0;
      for (let match; (match = breaks.exec(rest));) {
        line(rest.slice(start, match.index));
        start = breaks.lastIndex;
        afterCR = match[0] === "\r" && start === rest.length;
      }
      rest = rest.slice(start);
    }
  }

  return {
    on(type, handler) {
      if (!handlers.has(type)) handlers.set(type, new Set());
      handlers.get(type)!.add(handler);
    },
    off(type, handler) {
      handlers.get(type)?.delete(handler);
    },
    close() {
      holding = false;
      setState({ state: "closed", reason: "closed" });
      stop.abort();
      attempt?.abort();
      channel?.close();
    },
    reconnect() {
      if (holding) attempt?.abort();
      else post({ k: "re" });
    },
    get state() {
      return change.state;
    },
    get holding() {
      return holding;
    },
  };
}

/**
 * Whether event id `id` comes after `than` (ids `<ms>-<seq>`; other ids,
 * and any id after none (`""`): whether they differ).
 */
function newer(id: string, than: string): boolean {
  const a = /^(\d+)-(\d+)$/.exec(id);
  const b = /^(\d+)-(\d+)$/.exec(than);
  if (!a || !b) return id !== than;
  const [ms, thanMs] = [Number(a[1]), Number(b[1])];
  return ms > thanMs || (ms === thanMs && Number(a[2]) > Number(b[2]));
}

/** Waits `ms`, or less when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done); // a wait per reconnection: none left behind
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

/** Resolves when `signal` aborts. */
function aborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) =>
    signal.addEventListener("abort", () => resolve(), { once: true })
  );
}
