/**
 * A Durable Streams protocol server as one fetch handler: streams are URLs
 * under a path prefix, created with `PUT`, appended to with `POST`, read
 * with `GET` (catch-up, long-poll or Server-Sent Events), inspected with
 * `HEAD` and removed with `DELETE`. It implements the protocol except its
 * reserved subscription APIs, and uses web standards only (no imports), so
 * it runs on Deno, Bun, Node and workers alike.
 *
 * Storage sits behind {@linkcode StreamStore}; {@linkcode MemoryStreamStore}
 * keeps everything in this process.
 *
 * ```ts
 * import { createStreamsHandler } from "./streams.ts";
 * const handle = createStreamsHandler({ prefix: "/v1/stream/" });
 * // Deno.serve(handle);
 * ```
 *
 * Choices the protocol leaves to servers:
 * - `Stream-Seq` is scoped per stream (not per writer).
 * - Offsets are `<16 digits>_<16 digits>`: a fixed zero part, then the
 *   position, in bytes for binary and text streams and in messages for
 *   `application/json` streams. A fork shares its source's offsets.
 * - A stream may be created again at the URL of a deleted or expired one.
 * - Both `Stream-TTL` and `Stream-Expires-At` on one request: 400.
 * - A full store answers 507 Insufficient Storage; a body over the request
 *   limit answers 413.
 *
 * @module
 */

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/**
 * How a stream counts positions: `bytes` advances by each record's length
 * (binary and text streams), `messages` by one per record (JSON streams,
 * one record per message).
 */
export type Framing = "bytes" | "messages";

/** What a store keeps about a stream besides its data. */
export interface StreamInfo {
  /** The content type as given at creation. */
  contentType: string;
  /** How positions are counted. */
  framing: Framing;
  /** Sliding time-to-live in seconds, if any. */
  ttlSeconds?: number;
  /** Absolute expiry in milliseconds since the epoch, if any. */
  expiresAt?: number;
  /** Whether the stream is closed (no further appends). */
  closed: boolean;
  /** The position after the last record. */
  tail: number;
  /** Changes whenever a stream is created at this path (for ETags). */
  incarnation: string;
  /** The source's path, for a fork. */
  forkedFrom?: string;
  /** The fork's anchor position (`Stream-Fork-Offset`, else the source's tail then). */
  forkAnchor?: number;
  /** The sub-offset the fork was requested with (0 when absent). */
  forkSubOffset?: number;
}

/** A stream to create: its configuration, initial records, and a fork's source. */
export interface CreateRequest {
  /** The content type to store. */
  contentType: string;
  /** How positions are counted. */
  framing: Framing;
  /** Sliding time-to-live in seconds. */
  ttlSeconds?: number;
  /** Absolute expiry, in milliseconds since the epoch. */
  expiresAt?: number;
  /** Create the stream closed. */
  closed: boolean;
  /** Initial records (after a fork's inherited data). */
  records: Uint8Array[];
  /** Fork: source path, anchor position (the source's tail when absent) and sub-offset. */
  fork?: { from: string; anchor?: number; subOffset: number };
  /** Whether the content type was given (a fork inherits its source's otherwise). */
  contentTypeGiven: boolean;
}

/** The outcome of {@linkcode StreamStore.create}. */
export type CreateResult =
  | { status: "created" | "exists"; info: StreamInfo }
  | { status: "conflict"; reason: string }
  | { status: "source-missing" | "source-gone" | "bad-fork"; reason: string }
  | { status: "full"; reason: string };

/** Idempotent producer headers of an append. */
export interface ProducerClaim {
  /** `Producer-Id`. */
  id: string;
  /** `Producer-Epoch`. */
  epoch: number;
  /** `Producer-Seq`. */
  seq: number;
}

/** One append: everything the store checks and applies as one step. */
export interface AppendRequest {
  /** The request's content type (undefined when absent). */
  contentType?: string;
  /** Records to append; empty for a close-only request. */
  records: Uint8Array[];
  /** Close the stream with (after) this append. */
  close: boolean;
  /** `Stream-Seq`, compared byte-wise with the stream's last one. */
  seq?: string;
  /** Idempotent producer headers. */
  producer?: ProducerClaim;
}

/** The outcome of {@linkcode StreamStore.append}. */
export type AppendResult =
  /** Applied; `appended` is false for a close-only request. */
  | { status: "ok"; info: StreamInfo; appended: boolean; producerSeq?: number }
  /** A producer's retry of a request already applied. */
  | { status: "duplicate"; info: StreamInfo; producerSeq: number }
  | { status: "missing" | "gone" }
  | { status: "closed"; info: StreamInfo }
  | { status: "content-type" | "seq-regression"; reason: string }
  | { status: "stale-epoch"; epoch: number }
  | { status: "bad-producer"; reason: string }
  | { status: "seq-gap"; expected: number; received: number }
  | { status: "full"; reason: string };

/** Records read from a position, with the stream's state at that moment. */
export type ReadResult =
  | { status: "missing" }
  | { status: "gone" }
  | {
    status: "ok";
    info: StreamInfo;
    /** For `bytes` streams, byte pieces; for `messages`, one per message. */
    records: Uint8Array[];
    /** The position after the last record returned. */
    next: number;
  };

/** The outcome of {@linkcode StreamStore.delete}. */
export type DeleteResult = "deleted" | "missing" | "gone";

/**
 * Where streams live. Every method is one async call, so a shared store
 * (Redis, a database) can do each atomically: `append` checks closure,
 * content type, `Stream-Seq`, the producer's epoch and sequence and the
 * size limit, then appends, in one step (a script or transaction).
 */
export interface StreamStore {
  /** Creates a stream (or a fork), or compares with the existing one. */
  create(path: string, request: CreateRequest): Promise<CreateResult>;
  /** Checks and applies one append. Resets a sliding TTL. */
  append(path: string, request: AppendRequest): Promise<AppendResult>;
  /**
   * Reads records from `position`, about `maxBytes` at most (at least one
   * record when there is any). `touch` resets a sliding TTL.
   */
  read(path: string, position: number, maxBytes: number, touch: boolean): Promise<ReadResult>;
  /** The stream's metadata, without resetting its TTL. */
  info(path: string): Promise<StreamInfo | "missing" | "gone">;
  /** Deletes a stream (soft-deletes one that forks still read from). */
  delete(path: string): Promise<DeleteResult>;
  /**
   * Resolves once the stream has data past `position`, is closed, or is
   * gone, or when `signal` aborts, whichever is first. Leaves nothing
   * behind once resolved. (Redis: a pub/sub channel per stream.)
   */
  waitForData(path: string, position: number, signal: AbortSignal): Promise<void>;
}

/** Limits of a {@linkcode MemoryStreamStore}. */
export interface MemoryStreamStoreOptions {
  /** Streams held at most, soft-deleted ones included. Defaults to 10000. */
  maxStreams?: number;
  /** Bytes one stream may hold, inherited data included. Defaults to 64 MiB. */
  maxStreamBytes?: number;
}

interface Entry {
  start: number;
  end: number;
  data: Uint8Array;
  /** Where the append this record came with ends: sub-offsets stop there. */
  batchEnd: number;
}

interface MemoryStream {
  info: StreamInfo;
  entries: Entry[];
  bytes: number;
  lastSeq?: string;
  producers: Map<string, { epoch: number; seq: number }>;
  closedBy?: ProducerClaim;
  /** Forks made from this stream and not yet deleted. */
  forks: number;
  /** The stream this one was forked from, while it counts this fork. */
  source?: MemoryStream;
  softDeleted: boolean;
  /** Last read or write, for a sliding TTL. */
  touched: number;
  waiters: Set<() => void>;
}

/**
 * Streams in this process's memory: lost on restart, not shared between
 * processes. Each call checks and applies its change in one synchronous
 * step, so appends (producer checks included) are atomic and serialized per
 * stream. Forks share their source's record buffers. Expired streams are
 * removed when next touched and swept when the store is full. Producer
 * state lives as long as its stream.
 */
export class MemoryStreamStore implements StreamStore {
  #streams = new Map<string, MemoryStream>();
  #maxStreams: number;
  #maxStreamBytes: number;

  /** A store with the given limits. */
  constructor(options: MemoryStreamStoreOptions = {}) {
    this.#maxStreams = options.maxStreams ?? 10_000;
    this.#maxStreamBytes = options.maxStreamBytes ?? 64 * 1024 * 1024;
  }

  /** The live stream at `path`, after dropping it if it has expired. */
  #get(path: string): MemoryStream | undefined {
    const stream = this.#streams.get(path);
    if (stream && !stream.softDeleted && this.#expired(stream)) {
      this.#remove(path, stream);
      return undefined;
    }
    return stream;
  }

  #expired(stream: MemoryStream): boolean {
    const { ttlSeconds, expiresAt } = stream.info;
    const now = Date.now();
    if (expiresAt !== undefined && now >= expiresAt) return true;
    return ttlSeconds !== undefined && now >= stream.touched + ttlSeconds * 1000;
  }

  /** Removes a stream's data and releases its source (cascading). */
  #remove(path: string, stream: MemoryStream): void {
    if (this.#streams.get(path) === stream) this.#streams.delete(path);
    this.#wake(stream);
    let child = stream;
    let parent = stream.source;
    while (parent !== undefined) {
      parent.forks--;
      child.source = undefined;
      const parentPath = child.info.forkedFrom!;
      // A source that expired meanwhile may have been replaced at its path.
      if (this.#streams.get(parentPath) !== parent) break;
      if (!(parent.softDeleted && parent.forks <= 0)) break;
      this.#streams.delete(parentPath);
      child = parent;
      parent = parent.source;
    }
  }

  #wake(stream: MemoryStream): void {
    for (const wake of stream.waiters) wake();
    stream.waiters.clear();
  }

  #sweep(): void {
    for (const [path, stream] of this.#streams) {
      if (!stream.softDeleted && this.#expired(stream)) this.#remove(path, stream);
    }
  }

  #push(stream: MemoryStream, records: Uint8Array[]): void {
    const { info } = stream;
    let position = info.tail;
    const added: Entry[] = [];
    for (const data of records) {
      const size = info.framing === "bytes" ? data.length : 1;
      if (size === 0) continue;
      added.push({ start: position, end: position + size, data, batchEnd: 0 });
      position += size;
      stream.bytes += data.length;
    }
    for (const entry of added) entry.batchEnd = position;
    stream.entries.push(...added);
    info.tail = position;
  }

  /** {@inheritDoc StreamStore.create} */
  create(path: string, request: CreateRequest): Promise<CreateResult> {
    return Promise.resolve(this.#create(path, request));
  }

  #create(path: string, request: CreateRequest): CreateResult {
    const existing = this.#get(path);
    if (existing?.softDeleted) {
      return {
        status: "conflict",
        reason: "a deleted stream that forks still use holds this path",
      };
    }
    let source: MemoryStream | undefined;
    if (request.fork) {
      source = this.#get(request.fork.from);
      if (!existing) {
        if (!source) {
          return { status: "source-missing", reason: "the source stream does not exist" };
        }
        if (source.softDeleted) {
          return { status: "source-gone", reason: "the source stream was deleted" };
        }
      }
    }
    const contentType = request.contentTypeGiven || !source
      ? request.contentType
      : source.info.contentType;
    const framing = request.contentTypeGiven || !source ? request.framing : source.info.framing;
    let { ttlSeconds, expiresAt } = request;
    if (source && ttlSeconds === undefined && expiresAt === undefined) {
      ttlSeconds = source.info.ttlSeconds;
      expiresAt = source.info.expiresAt;
    }
    if (existing) {
      const info = existing.info;
      const same = mediaType(info.contentType) === mediaType(contentType) &&
        info.ttlSeconds === ttlSeconds && info.expiresAt === expiresAt &&
        info.closed === request.closed && info.forkedFrom === request.fork?.from &&
        (request.fork === undefined ||
          ((request.fork.anchor === undefined || info.forkAnchor === request.fork.anchor) &&
            info.forkSubOffset === request.fork.subOffset));
      return same
        ? { status: "exists", info: { ...info } }
        : { status: "conflict", reason: "a stream with another configuration exists at this path" };
    }
    if (source && mediaType(source.info.contentType) !== mediaType(contentType)) {
      return { status: "conflict", reason: "the content type differs from the source stream's" };
    }
    const entries: Entry[] = [];
    let bytes = 0;
    let tail = 0;
    let anchor: number | undefined;
    if (source && request.fork) {
      anchor = request.fork.anchor ?? source.info.tail;
      const sub = request.fork.subOffset;
      if (anchor > source.info.tail) {
        return { status: "bad-fork", reason: "the fork offset is past the source's tail" };
      }
      if (sub > 0) {
        const at = source.entries.find((entry) => entry.start <= anchor! && anchor! < entry.end);
        if (!at || anchor + sub > at.batchEnd) {
          return {
            status: "bad-fork",
            reason: "the fork sub-offset is past the next data boundary",
          };
        }
      }
      tail = anchor + sub;
      for (const entry of source.entries) {
        if (entry.start >= tail) break;
        const end = Math.min(entry.end, tail);
        const data = end === entry.end ? entry.data : entry.data.subarray(0, end - entry.start);
        entries.push({ start: entry.start, end, data, batchEnd: Math.min(entry.batchEnd, tail) });
        bytes += data.length;
      }
    }
    const size = bytes + request.records.reduce((sum, record) => sum + record.length, 0);
    if (size > this.#maxStreamBytes) {
      return { status: "full", reason: `a stream holds at most ${this.#maxStreamBytes} bytes` };
    }
    if (this.#streams.size >= this.#maxStreams) this.#sweep();
    if (this.#streams.size >= this.#maxStreams) {
      return { status: "full", reason: `the store holds at most ${this.#maxStreams} streams` };
    }
    const stream: MemoryStream = {
      info: {
        contentType,
        framing,
        ttlSeconds,
        expiresAt,
        closed: false,
        tail,
        incarnation: crypto.randomUUID().slice(0, 8),
        forkedFrom: request.fork?.from,
        forkAnchor: request.fork ? anchor : undefined,
        forkSubOffset: request.fork?.subOffset,
      },
      entries,
      bytes,
      producers: new Map(),
      forks: 0,
      softDeleted: false,
      touched: Date.now(),
      waiters: new Set(),
      source,
    };
    this.#push(stream, request.records);
    stream.info.closed = request.closed;
    if (source) source.forks++;
    this.#streams.set(path, stream);
    return { status: "created", info: { ...stream.info } };
  }

  /** {@inheritDoc StreamStore.append} */
  append(path: string, request: AppendRequest): Promise<AppendResult> {
    return Promise.resolve(this.#append(path, request));
  }

  #append(path: string, request: AppendRequest): AppendResult {
    const stream = this.#get(path);
    if (!stream) return { status: "missing" };
    if (stream.softDeleted) return { status: "gone" };
    stream.touched = Date.now();
    const { info } = stream;
    const producer = request.producer;
    const state = producer && stream.producers.get(producer.id);
    const hasData = request.records.length > 0;
    if (producer && state && producer.epoch < state.epoch) {
      return { status: "stale-epoch", epoch: state.epoch };
    }
    if (info.closed) {
      const closer = stream.closedBy;
      if (
        producer && closer && closer.id === producer.id && closer.epoch === producer.epoch &&
        closer.seq === producer.seq
      ) {
        return { status: "duplicate", info: { ...info }, producerSeq: state?.seq ?? producer.seq };
      }
      if (producer && state && producer.epoch === state.epoch && producer.seq <= state.seq) {
        return { status: "duplicate", info: { ...info }, producerSeq: state.seq };
      }
      if (!hasData && request.close && !producer) {
        return { status: "ok", info: { ...info }, appended: false };
      }
      return { status: "closed", info: { ...info } };
    }
    if (hasData && mediaType(request.contentType ?? "") !== mediaType(info.contentType)) {
      return { status: "content-type", reason: "the content type differs from the stream's" };
    }
    if (producer) {
      if (!state || producer.epoch > state.epoch) {
        if (producer.seq !== 0) {
          if (state) {
            return { status: "bad-producer", reason: "a new producer epoch must start at seq 0" };
          }
          return { status: "seq-gap", expected: 0, received: producer.seq };
        }
      } else if (producer.seq <= state.seq) {
        return { status: "duplicate", info: { ...info }, producerSeq: state.seq };
      } else if (producer.seq > state.seq + 1) {
        return { status: "seq-gap", expected: state.seq + 1, received: producer.seq };
      }
    }
    if (
      request.seq !== undefined && stream.lastSeq !== undefined && request.seq <= stream.lastSeq
    ) {
      return { status: "seq-regression", reason: "Stream-Seq must increase" };
    }
    const size = request.records.reduce((sum, record) => sum + record.length, 0);
    if (stream.bytes + size > this.#maxStreamBytes) {
      return { status: "full", reason: `a stream holds at most ${this.#maxStreamBytes} bytes` };
    }
    this.#push(stream, request.records);
    if (request.seq !== undefined) stream.lastSeq = request.seq;
    if (producer) stream.producers.set(producer.id, { epoch: producer.epoch, seq: producer.seq });
    if (request.close) {
      info.closed = true;
      stream.closedBy = producer ? { ...producer } : undefined;
    }
    this.#wake(stream);
    return { status: "ok", info: { ...info }, appended: hasData, producerSeq: producer?.seq };
  }

  /** {@inheritDoc StreamStore.read} */
  read(path: string, position: number, maxBytes: number, touch: boolean): Promise<ReadResult> {
    const stream = this.#get(path);
    if (!stream) return Promise.resolve({ status: "missing" });
    if (stream.softDeleted) return Promise.resolve({ status: "gone" });
    if (touch) stream.touched = Date.now();
    const { entries } = stream;
    // The first entry that ends after the position.
    let low = 0;
    let high = entries.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (entries[middle].end <= position) low = middle + 1;
      else high = middle;
    }
    const records: Uint8Array[] = [];
    let next = position;
    let size = 0;
    for (let i = low; i < entries.length && (records.length === 0 || size < maxBytes); i++) {
      const entry = entries[i];
      let data = entry.data;
      if (entry.start < next) data = data.subarray(next - entry.start);
      if (stream.info.framing === "bytes" && records.length > 0 && size + data.length > maxBytes) {
        data = data.subarray(0, maxBytes - size);
      }
      records.push(data);
      size += data.length;
      next = stream.info.framing === "bytes" ? next + data.length : entry.end;
    }
    return Promise.resolve({ status: "ok", info: { ...stream.info }, records, next });
  }

  /** {@inheritDoc StreamStore.info} */
  info(path: string): Promise<StreamInfo | "missing" | "gone"> {
    const stream = this.#get(path);
    return Promise.resolve(
      !stream ? "missing" : stream.softDeleted ? "gone" : { ...stream.info },
    );
  }

  /** {@inheritDoc StreamStore.delete} */
  delete(path: string): Promise<DeleteResult> {
    const stream = this.#get(path);
    if (!stream) return Promise.resolve("missing");
    if (stream.softDeleted) return Promise.resolve("gone");
    if (stream.forks > 0) {
      stream.softDeleted = true;
      this.#wake(stream);
    } else {
      this.#remove(path, stream);
    }
    return Promise.resolve("deleted");
  }

  /** {@inheritDoc StreamStore.waitForData} */
  waitForData(path: string, position: number, signal: AbortSignal): Promise<void> {
    const stream = this.#get(path);
    if (
      !stream || stream.softDeleted || stream.info.tail > position || stream.info.closed ||
      signal.aborted
    ) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        stream.waiters.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      stream.waiters.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/** Options of {@linkcode createStreamsHandler}. */
export interface StreamsHandlerOptions {
  /** The path every stream URL starts with, such as `/v1/stream/`. Defaults to `/`. */
  prefix?: string;
  /** Where streams live. Defaults to a new {@linkcode MemoryStreamStore}. */
  store?: StreamStore;
  /** Bytes one request body may have (413 beyond). Defaults to 8 MiB. */
  maxBodyBytes?: number;
  /** Bytes one stream may hold, for the default store. Defaults to 64 MiB. */
  maxStreamBytes?: number;
  /** Streams held at most, for the default store. Defaults to 10000. */
  maxStreams?: number;
  /** Bytes of data one read response carries, about. Defaults to 1 MiB. */
  maxReadBytes?: number;
  /** Milliseconds a long-poll read waits for data before 204. Defaults to 20000. */
  longPollTimeout?: number;
  /** Milliseconds an SSE response stays open before the server ends it. Defaults to 60000. */
  sseMaxDuration?: number;
  /** `Cache-Control` of reads that return data. Defaults to `private, max-age=60, stale-while-revalidate=300`. */
  cacheControl?: string;
  /**
   * Origins allowed to read responses: `*`, or a list (the request's
   * `Origin` is echoed when listed). Defaults to `*`.
   */
  allowOrigin?: string | string[];
  /**
   * Runs before every request but a CORS preflight, with what it does to
   * which stream: `read` (`GET`, `HEAD`) or `write` (`PUT`, `POST`,
   * `DELETE`), and the stream's name (its path below `prefix`, as sent).
   * Returns a response to refuse the request with (a 401 or a 403), or
   * `undefined` to serve it. Defaults to serving every request.
   */
  guard?: (
    request: Request,
    action: "read" | "write",
    name: string,
  ) => Response | undefined | Promise<Response | undefined>;
}

/** A fetch handler: a request in, a response out. Never rejects. */
export type StreamsHandler = (request: Request) => Promise<Response>;

const MAX_PATH = 1024;
const CURSOR_EPOCH = Date.UTC(2024, 9, 9);
const CURSOR_INTERVAL = 20_000;
const ZERO = "0000000000000000";
const OFFSET = /^(\d{16})_(\d{16})$/;
const INTEGER = /^(0|[1-9]\d*)$/;
const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;
const EXPOSED = [
  "Stream-Next-Offset",
  "Stream-Cursor",
  "Stream-Up-To-Date",
  "Stream-Closed",
  "Stream-TTL",
  "Stream-Expires-At",
  "Stream-SSE-Data-Encoding",
  "Producer-Epoch",
  "Producer-Seq",
  "Producer-Expected-Seq",
  "Producer-Received-Seq",
  "ETag",
  "Location",
  "Content-Type",
].join(", ");
const ALLOWED_HEADERS = [
  "Content-Type",
  "Authorization",
  "If-None-Match",
  "Stream-TTL",
  "Stream-Expires-At",
  "Stream-Seq",
  "Stream-Closed",
  "Stream-Forked-From",
  "Stream-Fork-Offset",
  "Stream-Fork-Sub-Offset",
  "Producer-Id",
  "Producer-Epoch",
  "Producer-Seq",
].join(", ");
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const EMPTY = new Uint8Array(0);
/** SSE frames kept for sharing between readers: enough for many streams' tails at once. */
const MAX_FRAMES = 256;

/** The media type alone, lower case: `Text/Plain; charset=x` is `text/plain`. */
function mediaType(contentType: string): string {
  return contentType.split(";")[0].trim().toLowerCase();
}

/** Whether SSE carries this type as text (else base64). */
function isTextual(contentType: string): boolean {
  const type = mediaType(contentType);
  return type.startsWith("text/") || type === "application/json";
}

/** An offset token for a position. */
function formatOffset(position: number): string {
  return `${ZERO}_${String(position).padStart(16, "0")}`;
}

/** A position from an offset token, or undefined when malformed. */
function parseOffset(text: string): number | undefined {
  const match = OFFSET.exec(text);
  if (!match || match[1] !== ZERO) return undefined;
  const position = Number(match[2]);
  return Number.isSafeInteger(position) ? position : undefined;
}

/** `Stream-Closed` counts only as exactly `true`, any case. */
function closedHeader(headers: Headers): boolean {
  return headers.get("stream-closed")?.toLowerCase() === "true";
}

/** A one-line reason with a status. */
class HttpError extends Error {
  status: number;
  headers: Record<string, string>;
  constructor(status: number, message: string, headers: Record<string, string> = {}) {
    super(message);
    this.status = status;
    this.headers = headers;
  }
}

/** The request body, at most `limit` bytes (else 413). */
async function readBody(request: Request, limit: number): Promise<Uint8Array> {
  const declared = Number(request.headers.get("content-length") ?? NaN);
  if (declared > limit) throw new HttpError(413, `the body is over ${limit} bytes`);
  if (!request.body) return new Uint8Array(0);
  const reader = request.body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      throw new HttpError(413, `the body is over ${limit} bytes`);
    }
    parts.push(value);
  }
  if (parts.length === 1) return parts[0];
  const body = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    body.set(part, at);
    at += part.length;
  }
  return body;
}

/** A JSON body as records, one per message; arrays flatten one level. */
function jsonRecords(body: Uint8Array, allowEmpty: boolean): Uint8Array[] {
  let value: unknown;
  try {
    value = JSON.parse(decoder.decode(body));
  } catch {
    throw new HttpError(400, "the body is not valid JSON");
  }
  const messages = Array.isArray(value) ? value : [value];
  if (messages.length === 0 && !allowEmpty) {
    throw new HttpError(400, "an empty JSON array appends nothing");
  }
  return messages.map((message) => encoder.encode(JSON.stringify(message)));
}

/**
 * Where the last whole UTF-8 character of `bytes` ends: a character cut at
 * the end (an append may end mid-character) waits for the next read.
 */
function wholeCharacters(bytes: Uint8Array): number {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const byte = bytes[bytes.length - back];
    if ((byte & 0xc0) === 0x80) continue; // a continuation byte
    const size = byte >= 0xf0 ? 4 : byte >= 0xe0 ? 3 : byte >= 0xc0 ? 2 : 1;
    return size > back ? bytes.length - back : bytes.length;
  }
  return bytes.length;
}

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function concat(records: Uint8Array[]): Uint8Array {
  if (records.length === 1) return records[0];
  const size = records.reduce((sum, record) => sum + record.length, 0);
  const out = new Uint8Array(size);
  let at = 0;
  for (const record of records) {
    out.set(record, at);
    at += record.length;
  }
  return out;
}

/** A read's body: bytes as they are, JSON messages as one array. */
function bodyOf(info: StreamInfo, records: Uint8Array[]): Uint8Array {
  if (info.framing === "bytes") return concat(records);
  return encoder.encode(`[${records.map((record) => decoder.decode(record)).join(",")}]`);
}

/** The cursor for a live response: the current interval, past the client's. */
function cursorFor(given: string | null): string {
  const interval = Math.floor((Date.now() - CURSOR_EPOCH) / CURSOR_INTERVAL);
  const client = given !== null && INTEGER.test(given) ? Number(given) : -1;
  if (client < interval) return String(interval);
  const jitterSeconds = 1 + Math.floor(Math.random() * 3600);
  return String(client + Math.max(1, Math.ceil(jitterSeconds * 1000 / CURSOR_INTERVAL)));
}

/**
 * A signal that aborts with `parent` or after `ms`, whichever is first;
 * `dispose` clears its timer and its listener on `parent`, and aborts it.
 */
function deadline(parent: AbortSignal, ms: number): { signal: AbortSignal; dispose(): void } {
  const controller = new AbortController();
  const abort = () => controller.abort();
  const timer = setTimeout(abort, ms);
  parent.addEventListener("abort", abort, { once: true });
  if (parent.aborted) abort();
  return {
    signal: controller.signal,
    dispose() {
      clearTimeout(timer);
      parent.removeEventListener("abort", abort);
      controller.abort(); // releases any waiter still holding the signal
    },
  };
}

/** Producer headers: all three or none, non-negative safe integers. */
function producerOf(headers: Headers): ProducerClaim | undefined {
  const id = headers.get("producer-id");
  const epoch = headers.get("producer-epoch");
  const seq = headers.get("producer-seq");
  if (id === null && epoch === null && seq === null) return undefined;
  if (id === null || epoch === null || seq === null) {
    throw new HttpError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together");
  }
  if (id === "") throw new HttpError(400, "Producer-Id must not be empty");
  const number = (text: string, name: string) => {
    const value = Number(text);
    if (!INTEGER.test(text) || !Number.isSafeInteger(value)) {
      throw new HttpError(400, `${name} must be a non-negative integer`);
    }
    return value;
  };
  return { id, epoch: number(epoch, "Producer-Epoch"), seq: number(seq, "Producer-Seq") };
}

/**
 * A fetch handler serving every stream under `options.prefix` (404 for other
 * paths). It answers errors with a status and a one-line text reason, and
 * never throws: a failing store answers 500.
 */
export function createStreamsHandler(options: StreamsHandlerOptions = {}): StreamsHandler {
  const prefix = options.prefix ?? "/";
  const store = options.store ??
    new MemoryStreamStore({
      maxStreams: options.maxStreams,
      maxStreamBytes: options.maxStreamBytes,
    });
  const maxBodyBytes = options.maxBodyBytes ?? 8 * 1024 * 1024;
  const maxReadBytes = options.maxReadBytes ?? 1024 * 1024;
  const longPollTimeout = options.longPollTimeout ?? 20_000;
  const sseMaxDuration = options.sseMaxDuration ?? 60_000;
  const cacheControl = options.cacheControl ?? "private, max-age=60, stale-while-revalidate=300";
  const allowOrigin = options.allowOrigin ?? "*";
  const guard = options.guard;
  /** The SSE frames built last, shared by the readers at the same position (see `sse`). */
  const frames = new Map<string, { bytes: Uint8Array; carry: Uint8Array }>();

  function respond(
    status: number,
    body: BodyInit | Uint8Array | null,
    headers: Record<string, string | undefined> = {},
  ): Response {
    // Browser safety and CORS on every response (the origin is added by the caller).
    const all = new Headers({
      "x-content-type-options": "nosniff",
      "cross-origin-resource-policy": "cross-origin",
      "access-control-expose-headers": EXPOSED,
    });
    for (const [name, value] of Object.entries(headers)) {
      if (value !== undefined) all.set(name, value);
    }
    return new Response(body as BodyInit | null, { status, headers: all });
  }

  function fail(error: HttpError): Response {
    return respond(error.status, `${error.message}\n`, {
      "content-type": "text/plain; charset=utf-8",
      "cache-control": "no-store",
      ...error.headers,
    });
  }

  function streamHeaders(info: StreamInfo): Record<string, string | undefined> {
    return {
      "content-type": info.contentType,
      "stream-next-offset": formatOffset(info.tail),
      "stream-closed": info.closed ? "true" : undefined,
    };
  }

  async function create(request: Request, path: string): Promise<Response> {
    const headers = request.headers;
    const ttl = headers.get("stream-ttl");
    const expires = headers.get("stream-expires-at");
    if (ttl !== null && expires !== null) {
      throw new HttpError(400, "use Stream-TTL or Stream-Expires-At, not both");
    }
    let ttlSeconds: number | undefined;
    if (ttl !== null) {
      if (!INTEGER.test(ttl) || !Number.isSafeInteger(Number(ttl))) {
        throw new HttpError(400, "Stream-TTL must be a non-negative integer of seconds");
      }
      ttlSeconds = Number(ttl);
    }
    let expiresAt: number | undefined;
    if (expires !== null) {
      expiresAt = Date.parse(expires);
      if (!RFC3339.test(expires) || Number.isNaN(expiresAt)) {
        throw new HttpError(400, "Stream-Expires-At must be an RFC 3339 timestamp");
      }
    }
    const forkedFrom = headers.get("stream-forked-from");
    const forkOffset = headers.get("stream-fork-offset");
    const forkSub = headers.get("stream-fork-sub-offset");
    if (forkedFrom === null && (forkOffset !== null || forkSub !== null)) {
      throw new HttpError(
        400,
        "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
      );
    }
    let fork: CreateRequest["fork"];
    if (forkedFrom !== null) {
      let anchor: number | undefined;
      if (forkOffset !== null) {
        anchor = forkOffset === "-1" ? 0 : parseOffset(forkOffset);
        if (anchor === undefined) throw new HttpError(400, "Stream-Fork-Offset is malformed");
      }
      if (forkSub !== null && (!INTEGER.test(forkSub) || !Number.isSafeInteger(Number(forkSub)))) {
        throw new HttpError(400, "Stream-Fork-Sub-Offset must be a non-negative integer");
      }
      let from = forkedFrom;
      try {
        from = new URL(forkedFrom, request.url).pathname;
      } catch {
        throw new HttpError(400, "Stream-Forked-From is not a path");
      }
      if (!from.startsWith(prefix)) throw new HttpError(404, "the source stream does not exist");
      fork = { from, anchor, subOffset: Number(forkSub ?? 0) };
    }
    const given = headers.get("content-type");
    const contentType = given?.trim() || "application/octet-stream";
    const framing: Framing = mediaType(contentType) === "application/json" ? "messages" : "bytes";
    const closed = closedHeader(headers);
    const body = await readBody(request, maxBodyBytes);
    const records = body.length === 0
      ? []
      : framing === "messages"
      ? jsonRecords(body, true)
      : [body];
    const result = await store.create(path, {
      contentType,
      framing,
      ttlSeconds,
      expiresAt,
      closed,
      records,
      fork,
      contentTypeGiven: given !== null && given.trim() !== "",
    });
    switch (result.status) {
      case "created":
      case "exists":
        return respond(result.status === "created" ? 201 : 200, null, {
          ...streamHeaders(result.info),
          location: result.status === "created" ? new URL(request.url).origin + path : undefined,
        });
      case "conflict":
      case "source-gone":
        throw new HttpError(409, result.reason);
      case "source-missing":
        throw new HttpError(404, result.reason);
      case "bad-fork":
        throw new HttpError(400, result.reason);
      case "full":
        throw new HttpError(507, result.reason);
    }
  }

  async function append(request: Request, path: string): Promise<Response> {
    const headers = request.headers;
    const producer = producerOf(headers);
    const close = closedHeader(headers);
    const seq = headers.get("stream-seq") ?? undefined;
    const contentType = headers.get("content-type") ?? undefined;
    const body = await readBody(request, maxBodyBytes);
    if (body.length === 0 && !close) {
      throw new HttpError(400, "an append needs a body (or Stream-Closed: true)");
    }
    let records: Uint8Array[] = [];
    if (body.length > 0) {
      if (contentType === undefined) throw new HttpError(400, "an append needs a Content-Type");
      // A JSON body goes to a JSON stream only: the store checks the type.
      records = mediaType(contentType) === "application/json" ? jsonRecords(body, false) : [body];
    }
    const result = await store.append(path, { contentType, records, close, seq, producer });
    const producerHeaders = (producerSeq: number) =>
      producer
        ? { "producer-epoch": String(producer.epoch), "producer-seq": String(producerSeq) }
        : {};
    switch (result.status) {
      case "ok":
        return respond(producer && result.appended ? 200 : 204, null, {
          "stream-next-offset": formatOffset(result.info.tail),
          "stream-closed": result.info.closed ? "true" : undefined,
          ...producerHeaders(result.producerSeq ?? 0),
        });
      case "duplicate":
        return respond(204, null, {
          "stream-next-offset": formatOffset(result.info.tail),
          "stream-closed": result.info.closed ? "true" : undefined,
          ...producerHeaders(result.producerSeq),
        });
      case "missing":
        throw new HttpError(404, "no stream at this path");
      case "gone":
        throw new HttpError(410, "the stream was deleted");
      case "closed":
        throw new HttpError(409, "the stream is closed", {
          "stream-closed": "true",
          "stream-next-offset": formatOffset(result.info.tail),
        });
      case "content-type":
      case "seq-regression":
        throw new HttpError(409, result.reason);
      case "stale-epoch":
        throw new HttpError(403, "a newer producer epoch has taken over", {
          "producer-epoch": String(result.epoch),
        });
      case "bad-producer":
        throw new HttpError(400, result.reason);
      case "seq-gap":
        throw new HttpError(409, `expected Producer-Seq ${result.expected}`, {
          "producer-expected-seq": String(result.expected),
          "producer-received-seq": String(result.received),
        });
      case "full":
        throw new HttpError(507, result.reason);
    }
  }

  async function head(path: string): Promise<Response> {
    const info = await store.info(path);
    if (info === "missing") throw new HttpError(404, "no stream at this path");
    if (info === "gone") throw new HttpError(410, "the stream was deleted");
    return respond(200, null, {
      ...streamHeaders(info),
      "stream-ttl": info.ttlSeconds === undefined ? undefined : String(info.ttlSeconds),
      "stream-expires-at": info.expiresAt === undefined
        ? undefined
        : new Date(info.expiresAt).toISOString(),
      "cache-control": "no-store",
    });
  }

  async function remove(path: string): Promise<Response> {
    const result = await store.delete(path);
    if (result === "missing") throw new HttpError(404, "no stream at this path");
    if (result === "gone") throw new HttpError(410, "the stream was deleted");
    return respond(204, null);
  }

  /** A read's result when the stream is there, else 404 or 410. */
  function found(result: ReadResult): Extract<ReadResult, { status: "ok" }> {
    if (result.status === "missing") throw new HttpError(404, "no stream at this path");
    if (result.status === "gone") throw new HttpError(410, "the stream was deleted");
    return result;
  }

  /** The data response of a catch-up or long-poll read. */
  function dataResponse(
    request: Request,
    result: Extract<ReadResult, { status: "ok" }>,
    start: number,
    cursor: string | undefined,
  ): Response {
    const { info, next } = result;
    const atTail = next >= info.tail;
    const closed = info.closed && atTail;
    const etag = `"${info.incarnation}:${formatOffset(start)}:${formatOffset(next)}${
      closed ? ":c" : ""
    }"`;
    const headers = {
      "content-type": info.contentType,
      "stream-next-offset": formatOffset(next),
      "stream-up-to-date": atTail ? "true" : undefined,
      "stream-closed": closed ? "true" : undefined,
      "stream-cursor": closed ? undefined : cursor,
      etag,
      "cache-control": next > start ? cacheControl : "no-store",
    };
    const match = request.headers.get("if-none-match");
    if (match !== null && match.split(",").some((tag) => tag.trim() === etag)) {
      return respond(304, null, { ...headers, "content-type": undefined });
    }
    return respond(200, bodyOf(info, result.records), headers);
  }

  async function read(request: Request, path: string): Promise<Response> {
    const url = new URL(request.url);
    const offsets = url.searchParams.getAll("offset");
    const live = url.searchParams.get("live");
    if (offsets.length > 1) throw new HttpError(400, "give one offset");
    if (live !== null && live !== "long-poll" && live !== "sse") {
      throw new HttpError(400, "live must be long-poll or sse");
    }
    if (live !== null && offsets.length === 0) {
      throw new HttpError(400, `live=${live} needs an offset`);
    }
    const offset = offsets[0] ?? "-1";
    let position: number | undefined;
    if (offset === "-1") position = 0;
    else if (offset !== "now") {
      position = parseOffset(offset);
      if (position === undefined) throw new HttpError(400, "the offset is malformed");
    }
    const first = found(
      await store.read(path, position ?? Number.MAX_SAFE_INTEGER, maxReadBytes, true),
    );
    const tail = first.info.tail;
    position ??= tail;
    if (position > tail) throw new HttpError(400, "the offset is past the stream's tail");
    const cursor = live === null ? undefined : cursorFor(url.searchParams.get("cursor"));
    if (live === "sse") {
      return sse(request, path, position, first.info, url.searchParams.get("cursor"));
    }
    if (offset === "now" && (live === null || first.info.closed)) {
      const info = first.info;
      return respond(live === null ? 200 : 204, live === null ? bodyOf(info, []) : null, {
        "content-type": live === null ? info.contentType : undefined,
        "stream-next-offset": formatOffset(tail),
        "stream-up-to-date": "true",
        "stream-closed": info.closed ? "true" : undefined,
        "stream-cursor": info.closed ? undefined : cursor,
        "cache-control": "no-store",
      });
    }
    let result: Extract<ReadResult, { status: "ok" }> = offset === "now"
      ? { ...first, records: [], next: tail }
      : first;
    if (live === "long-poll" && result.records.length === 0 && !result.info.closed) {
      const { signal, dispose } = deadline(request.signal, longPollTimeout);
      try {
        while (!signal.aborted) {
          await store.waitForData(path, position, signal);
          if (request.signal.aborted) break;
          result = found(await store.read(path, position, maxReadBytes, false));
          if (result.records.length > 0 || result.info.closed) break;
        }
      } finally {
        dispose();
      }
    }
    if (live === "long-poll" && result.records.length === 0) {
      const info = result.info;
      return respond(204, null, {
        "stream-next-offset": formatOffset(position),
        "stream-up-to-date": "true",
        "stream-closed": info.closed ? "true" : undefined,
        "stream-cursor": info.closed ? undefined : cursor,
        "cache-control": "no-store",
      });
    }
    return dataResponse(request, result, position, cursor);
  }

  function sse(
    request: Request,
    path: string,
    start: number,
    info: StreamInfo,
    givenCursor: string | null,
  ): Response {
    const text = isTextual(info.contentType);
    /** The bytes of a character cut at the end of the last read, kept for the next one. */
    let carry: Uint8Array = EMPTY;
    const { signal, dispose } = deadline(request.signal, sseMaxDuration);
    let position = start;
    let announced = false;
    let finished = false;
    let output: ReadableStreamDefaultController<Uint8Array> | undefined;
    const finish = () => {
      if (finished) return;
      finished = true;
      dispose();
      try {
        output?.close();
      } catch { /* cancelled or already closed */ }
    };
    /**
     * A data event and its control event, as bytes. Readers at the same
     * position of a stream, with nothing carried, share them: built once
     * per append for every reader, not once per reader.
     */
    const frame = (info: StreamInfo, records: Uint8Array[], next: number): Uint8Array => {
      const control = controlEvent(info, next);
      const key = carry.length === 0
        ? `${info.incarnation} ${position} ${next} ${path}\n${control}`
        : undefined;
      const shared = key === undefined ? undefined : frames.get(key);
      if (shared !== undefined) {
        carry = shared.carry;
        return shared.bytes;
      }
      let payload: string;
      let rest: Uint8Array = EMPTY;
      if (!text) payload = base64(concat(records));
      else if (info.framing === "messages") payload = decoder.decode(bodyOf(info, records));
      else {
        const bytes = concat(carry.length === 0 ? records : [carry, ...records]);
        const end = wholeCharacters(bytes);
        payload = decoder.decode(bytes.subarray(0, end));
        rest = bytes.slice(end);
      }
      const lines = text ? payload.split(/\r\n|\r|\n/) : payload.match(/.{1,76}/g) ?? [""];
      const bytes = encoder.encode(
        `event: data\n${lines.map((line) => `data:${line}`).join("\n")}\n\n${control}`,
      );
      if (key !== undefined) {
        frames.set(key, { bytes, carry: rest });
        // Stryker disable next-line all: only bounds the memory of the frames kept
        if (frames.size > MAX_FRAMES) frames.delete(frames.keys().next().value!);
      }
      carry = rest;
      return bytes;
    };
    const controlEvent = (info: StreamInfo, next: number): string => {
      const atTail = next >= info.tail;
      const control: Record<string, unknown> = { streamNextOffset: formatOffset(next) };
      if (info.closed && atTail) control.streamClosed = true;
      else control.streamCursor = cursorFor(givenCursor);
      if (atTail) control.upToDate = true;
      return `event: control\ndata:${JSON.stringify(control)}\n\n`;
    };
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        output = controller;
      },
      async pull(controller) {
        try {
          while (!finished) {
            if (signal.aborted) return finish();
            const result = await store.read(path, position, maxReadBytes, false);
            if (result.status !== "ok") return finish();
            const { info, records, next } = result;
            if (records.length > 0) {
              controller.enqueue(frame(info, records, next)); // from `position`
              position = next;
              announced = true;
              if (info.closed && next >= info.tail) finish();
              return;
            }
            if (!announced || info.closed) {
              announced = true;
              controller.enqueue(encoder.encode(controlEvent(info, position)));
              if (info.closed) finish();
              return;
            }
            await store.waitForData(path, position, signal);
          }
        } catch {
          finish();
        }
      },
      cancel() {
        finish();
      },
    });
    signal.addEventListener("abort", () => finish(), { once: true });
    return respond(200, body, {
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      "stream-sse-data-encoding": text ? undefined : "base64",
    });
  }

  function preflight(): Response {
    return respond(204, null, {
      "access-control-allow-methods": "GET, HEAD, PUT, POST, DELETE, OPTIONS",
      "access-control-allow-headers": ALLOWED_HEADERS,
      "access-control-max-age": "86400",
    });
  }

  /** The CORS origin header, for every response. */
  function withOrigin(request: Request, response: Response): Response {
    const origin = request.headers.get("origin");
    if (allowOrigin === "*") response.headers.set("access-control-allow-origin", "*");
    else {
      response.headers.append("vary", "origin");
      if (origin !== null && allowOrigin.includes(origin)) {
        response.headers.set("access-control-allow-origin", origin);
      }
    }
    return response;
  }

  return async (request: Request): Promise<Response> => withOrigin(request, await handle(request));

  async function handle(request: Request): Promise<Response> {
    try {
      const path = new URL(request.url).pathname;
      if (!path.startsWith(prefix) || path.length === prefix.length) {
        throw new HttpError(404, "no stream at this path");
      }
      const name = path.slice(prefix.length);
      if (name.split("/")[0] === "__ds") {
        throw new HttpError(501, "the subscription APIs (__ds) are not implemented");
      }
      if (path.length > MAX_PATH) {
        throw new HttpError(414, `a stream path has at most ${MAX_PATH} characters`);
      }
      if (name.split("/").some((segment) => segment === "." || segment === "..")) {
        throw new HttpError(400, "a stream path has no . or .. segments");
      }
      if (request.method === "OPTIONS") return preflight();
      const action = request.method === "GET" || request.method === "HEAD" ? "read" : "write";
      const refusal = await guard?.(request, action, name);
      if (refusal !== undefined) return refusal;
      switch (request.method) {
        case "PUT":
          return await create(request, path);
        case "POST":
          return await append(request, path);
        case "GET":
          return await read(request, path);
        case "HEAD":
          return await head(path);
        case "DELETE":
          return await remove(path);
        default:
          throw new HttpError(405, "use GET, HEAD, PUT, POST or DELETE", {
            allow: "GET, HEAD, PUT, POST, DELETE, OPTIONS",
          });
      }
    } catch (error) {
      if (error instanceof HttpError) return fail(error);
      return fail(new HttpError(500, `internal error: ${(error as Error)?.message ?? error}`));
    }
  }
}
