/**
 * A Durable Streams protocol server as one fetch handler: streams are URLs
 * under a path prefix, created with `PUT`, appended to with `POST`, read
 * with `GET` (catch-up, long-poll or Server-Sent Events), inspected with
 * `HEAD` and removed with `DELETE`. It implements the protocol except its
 * reserved subscription APIs, and uses web standards only (its one import is
 * `mod.ts`, which has none), so it runs on Deno, Bun, Node and workers alike.
 *
 * Storage sits behind {@linkcode StreamStore}; {@linkcode MemoryStreamStore}
 * keeps everything in this process. Access takes the broker's
 * {@linkcode Authorize} hook: the same tokens and grants for topics and
 * streams.
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
 * - A request past a stream's size limit answers 413 (the protocol's
 *   "exceeds server limits"); a full store answers 503 with `Retry-After`,
 *   as a busy server does, since room comes back as streams expire or go.
 * - Idempotent producers: at most `maxProducers` per stream, the least
 *   recently used forgotten first (the protocol lets servers clean up
 *   producer state; a forgotten producer counts as new).
 *
 * @module
 */
import type { Subscriptions } from "./subscriptions.ts";
import {
  access,
  type Authorize,
  concat,
  endOfTurn,
  EVENT_STREAM_HEADERS,
  type Grants,
  HttpError,
  readBody,
  selectorsMatch,
} from "./mod.ts";

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/**
 * How a stream counts positions: `bytes` advances by each byte (binary and
 * text streams), `messages` by one per message (JSON streams).
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
  /**
   * Initial data (after a fork's inherited data), as in
   * {@linkcode AppendRequest.records}, for `framing`: a fork that inherits
   * another framing from its source refuses it (`conflict`).
   */
  records: Uint8Array[];
  /** Fork: source path, anchor position (the source's tail when absent) and sub-offset. */
  fork?: { from: string; anchor?: number; subOffset: number };
  /** Whether the content type was given (a fork inherits its source's otherwise). */
  contentTypeGiven: boolean;
}

/**
 * Why a store refused to take more: `stream-full`, this stream would pass
 * its size limit (`413`); `store-full`, the store has no room (`503`).
 */
export type Full = { status: "stream-full" | "store-full"; reason: string };

/** The outcome of {@linkcode StreamStore.create}. */
export type CreateResult =
  | { status: "created" | "exists"; info: StreamInfo }
  | { status: "conflict"; reason: string }
  | { status: "source-missing" | "source-gone" | "bad-fork"; reason: string }
  | Full;

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
  /**
   * The data to append, empty for a close-only request: bytes, or for a
   * `messages` stream JSON texts each ending with a line feed (`\n`), which
   * JSON text never holds otherwise, several in one record or not.
   */
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
  | Full;

/** Records read from a position, with the stream's state at that moment. */
export type ReadResult =
  | { status: "missing" }
  | { status: "gone" }
  | {
    status: "ok";
    info: StreamInfo;
    /**
     * The data from the position on, as in {@linkcode AppendRequest.records}:
     * bytes, or JSON texts each ending with a line feed.
     */
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
 * size limits, then appends, in one step (a script or transaction).
 */
export interface StreamStore {
  /** Creates a stream (or a fork), or compares with the existing one. */
  create(path: string, request: CreateRequest): Promise<CreateResult>;
  /** Checks and applies one append. Resets a sliding TTL. */
  append(path: string, request: AppendRequest): Promise<AppendResult>;
  /**
   * Reads records from `position`, about `maxBytes` at most (at least one
   * message, or byte, when there is any). `touch` resets a sliding TTL.
   */
  read(path: string, position: number, maxBytes: number, touch: boolean): Promise<ReadResult>;
  /** The stream's metadata, without resetting its TTL. */
  info(path: string): Promise<StreamInfo | "missing" | "gone">;
  /** Deletes a stream (soft-deletes one that forks still read from). */
  delete(path: string): Promise<DeleteResult>;
  /**
   * Paths of streams that start with `prefix`, at most `limit` of them, in
   * no particular order; deleted and expired ones may be among them (their
   * `info` says so). Subscriptions list the streams a pattern matches.
   */
  list(prefix: string, limit: number): Promise<string[]>;
  /**
   * Resolves once the stream has data past `position`, is closed, or is
   * gone, or when `signal` aborts, whichever is first. Leaves nothing
   * behind once resolved. (Redis: a pub/sub channel per stream.)
   */
  waitForData(path: string, position: number, signal: AbortSignal): Promise<void>;
}

/**
 * One stored piece of a stream: part or all of one append's data, at most
 * {@linkcode PIECE_BYTES} long (a longer single message stays whole), so
 * that a store keeps an append of any number of messages as a few pieces
 * and a read from any position touches little more than it returns. The
 * stores share this layout and {@linkcode toPieces} and
 * {@linkcode readPieces}, so they cut and count alike.
 */
export interface Piece {
  /** The position after the piece. */
  end: number;
  /** Bytes, or JSON messages each ending with a line feed. */
  data: Uint8Array;
  /** Where the append the piece came with ends: a fork's sub-offset stops there. */
  batchEnd: number;
}

/** The most bytes of one {@linkcode Piece}, but for a single longer message. */
export const PIECE_BYTES = 64 * 1024;

/**
 * What a stored piece counts for against the size limits besides its data:
 * the bookkeeping every piece costs a store, so that a flood of one-byte
 * appends is not free.
 */
export const PIECE_COST = 128;

/** What a producer's state counts for against a store's size limit, besides its id. */
export const PRODUCER_COST = 64;

const LINE_FEED = 0x0a;

/** How many messages (line feeds) `data` holds. */
function messageCount(data: Uint8Array): number {
  let count = 0;
  for (let at = data.indexOf(LINE_FEED); at !== -1; at = data.indexOf(LINE_FEED, at + 1)) count++;
  return count;
}

/** How many positions a piece's data spans. */
function span(data: Uint8Array, framing: Framing): number {
  return framing === "bytes" ? data.length : messageCount(data);
}

/** Where the first `count` positions of `data` end, in bytes. */
function offsetOf(data: Uint8Array, count: number, framing: Framing): number {
  if (framing === "bytes") return count;
  let at = 0;
  for (let i = 0; i < count; i++) at = data.indexOf(LINE_FEED, at) + 1;
  return at;
}

/**
 * What pieces count for against the size limits: their data, and
 * {@linkcode PIECE_COST} each.
 *
 * @param pieces The pieces.
 * @returns Their cost in bytes.
 */
export function costOf(pieces: readonly Piece[]): number {
  let cost = 0;
  for (const piece of pieces) cost += piece.data.length + PIECE_COST;
  return cost;
}

/**
 * Cuts one append's records into {@linkcode Piece}s that follow `tail`:
 * bytes at {@linkcode PIECE_BYTES}, messages at the last line feed within
 * it. Empty records add nothing.
 *
 * @param records The append's data, as in {@linkcode AppendRequest.records}.
 * @param framing How the stream counts positions.
 * @param tail The stream's tail before the append.
 * @returns The pieces, in order, each with the append's end as `batchEnd`.
 */
export function toPieces(records: readonly Uint8Array[], framing: Framing, tail: number): Piece[] {
  const pieces: Piece[] = [];
  let end = tail;
  for (const record of records) {
    let from = 0;
    while (from < record.length) {
      let to = Math.min(from + PIECE_BYTES, record.length);
      if (framing === "messages" && to < record.length) {
        const last = record.lastIndexOf(LINE_FEED, to - 1);
        to = last >= from ? last + 1 : record.indexOf(LINE_FEED, to) + 1 || record.length;
      }
      // A piece owns its bytes, or most of its buffer: a small view would
      // keep all of a larger buffer alive.
      const data = (to - from) * 2 >= record.buffer.byteLength
        ? record.subarray(from, to)
        : record.slice(from, to);
      end += span(data, framing);
      pieces.push({ end, data, batchEnd: 0 });
      from = to;
    }
  }
  for (const piece of pieces) piece.batchEnd = end;
  return pieces;
}

/**
 * Reads from `position` in a run of pieces: the data from there on, cut at
 * message boundaries, until it counts for about `maxBytes` as the size
 * limits count (its bytes, and {@linkcode PIECE_COST} per piece, so a read
 * of many small pieces stops early), but at least one message (or byte)
 * when there is any.
 *
 * @param pieces The stream's pieces in order, from the one that holds
 *   `position` on (earlier ones are skipped).
 * @param framing How the stream counts positions.
 * @param start Where the first of `pieces` starts: the end of the piece
 *   before it, or 0.
 * @param position Where to read from.
 * @param maxBytes About how much to read.
 * @returns The records, and the position after them.
 */
export function readPieces(
  pieces: Iterable<Piece>,
  framing: Framing,
  start: number,
  position: number,
  maxBytes: number,
): { records: Uint8Array[]; next: number } {
  const records: Uint8Array[] = [];
  let next = position;
  let size = 0;
  // Pieces follow each other: each starts where the one before ends.
  let at = start;
  for (const piece of pieces) {
    const from = at;
    at = piece.end;
    if (piece.end <= next) continue;
    let data = from < next
      ? piece.data.subarray(offsetOf(piece.data, next - from, framing))
      : piece.data;
    const room = maxBytes - size - PIECE_COST;
    let cut = false;
    if (records.length > 0 && data.length > room) {
      // What the allowance has room for: bytes up to it, whole messages within it.
      if (room <= 0) break;
      data = framing === "bytes"
        ? data.subarray(0, room)
        : data.subarray(0, data.lastIndexOf(LINE_FEED, room - 1) + 1);
      if (data.length === 0) break;
      cut = true;
    }
    records.push(data);
    size += data.length + PIECE_COST;
    next = cut ? next + span(data, framing) : piece.end;
  }
  return { records, next };
}

/** Limits of a {@linkcode MemoryStreamStore}. */
export interface MemoryStreamStoreOptions {
  /** Streams held at most, soft-deleted ones included. Defaults to 10000. */
  maxStreams?: number;
  /**
   * Bytes one stream may hold, inherited data included, each piece
   * counting {@linkcode PIECE_COST} more. Defaults to 64 MiB.
   */
  maxStreamBytes?: number;
  /**
   * Bytes the whole store may hold: every stream's, as counted for
   * `maxStreamBytes`, and each producer's state ({@linkcode PRODUCER_COST}
   * and its id). Defaults to 256 MiB.
   */
  maxBytes?: number;
  /**
   * Idempotent producers remembered per stream; past it, the one unused
   * longest is forgotten (it counts as new if it comes back). Defaults to
   * 1000.
   */
  maxProducers?: number;
}

interface MemoryStream {
  info: StreamInfo;
  /** The data, inherited pieces first (shared with the source). */
  pieces: Piece[];
  /** What the stream counts for against the limits: its pieces. */
  bytes: number;
  lastSeq?: string;
  /** Producers by id, the least recently used first. */
  producers: Map<string, { epoch: number; seq: number }>;
  /** What the producers count for against the store's limit. */
  producerBytes: number;
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

/** The index of the first piece that ends after `position` (`pieces.length` if none). */
function pieceAfter(pieces: readonly Piece[], position: number): number {
  let low = 0;
  let high = pieces.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (pieces[middle].end <= position) low = middle + 1;
    else high = middle;
  }
  return low;
}

/**
 * Streams in this process's memory: lost on restart, not shared between
 * processes. Each call checks and applies its change in one synchronous
 * step, so appends (producer checks included) are atomic and serialized per
 * stream. Forks share their source's data. Expired streams are removed when
 * next touched and swept when the store is full.
 */
export class MemoryStreamStore implements StreamStore {
  #streams = new Map<string, MemoryStream>();
  #maxStreams: number;
  #maxStreamBytes: number;
  #maxBytes: number;
  #maxProducers: number;
  /** What every stream and producer here counts for. */
  #bytes = 0;

  /**
   * A store with the given limits.
   *
   * @param options See {@linkcode MemoryStreamStoreOptions}.
   */
  constructor(options: MemoryStreamStoreOptions = {}) {
    this.#maxStreams = count("maxStreams", options.maxStreams ?? 10_000);
    this.#maxStreamBytes = count("maxStreamBytes", options.maxStreamBytes ?? 64 * 1024 * 1024);
    this.#maxBytes = count("maxBytes", options.maxBytes ?? 256 * 1024 * 1024);
    this.#maxProducers = count("maxProducers", options.maxProducers ?? 1000);
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
    this.#release(stream);
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

  /**
   * Lets go of a stream's data and producers, and stops counting them: a
   * removed or soft-deleted stream serves no read, and its forks hold the
   * pieces they inherited themselves.
   */
  #release(stream: MemoryStream): void {
    this.#bytes -= stream.bytes + stream.producerBytes;
    stream.bytes = stream.producerBytes = 0;
    stream.pieces = [];
    stream.producers.clear();
  }

  #wake(stream: MemoryStream): void {
    for (const wake of stream.waiters) wake();
    stream.waiters.clear();
  }

  /** Removes expired streams, but those the operation under way holds: they go when next touched. */
  #sweep(held: readonly (MemoryStream | undefined)[]): void {
    for (const [path, stream] of this.#streams) {
      if (!stream.softDeleted && !held.includes(stream) && this.#expired(stream)) {
        this.#remove(path, stream);
      }
    }
  }

  /** Whether `more` bytes fit in the store, after sweeping expired streams if they would not. */
  #room(more: number, held: readonly (MemoryStream | undefined)[]): boolean {
    if (this.#bytes + more > this.#maxBytes) this.#sweep(held);
    return this.#bytes + more <= this.#maxBytes;
  }

  #storeFull(): Full {
    return { status: "store-full", reason: `the store holds at most ${this.#maxBytes} bytes` };
  }

  #streamFull(): Full {
    return {
      status: "stream-full",
      reason: `a stream holds at most ${this.#maxStreamBytes} bytes`,
    };
  }

  /** Adds pieces (that follow its tail) to a stream and counts them. */
  #push(stream: MemoryStream, pieces: readonly Piece[], cost: number): void {
    for (const piece of pieces) stream.pieces.push(piece);
    stream.info.tail = pieces.at(-1)?.end ?? stream.info.tail;
    stream.bytes += cost;
    this.#bytes += cost;
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
    if (source && source.info.framing !== request.framing && request.records.length > 0) {
      // The records were cut for the request's framing, not the source's.
      return { status: "conflict", reason: "the initial data is not of the source stream's type" };
    }
    const pieces: Piece[] = [];
    let tail = 0;
    let anchor: number | undefined;
    if (source && request.fork) {
      anchor = request.fork.anchor ?? source.info.tail;
      const sub = request.fork.subOffset;
      if (anchor > source.info.tail) {
        return { status: "bad-fork", reason: "the fork offset is past the source's tail" };
      }
      if (sub > 0) {
        const at = source.pieces[pieceAfter(source.pieces, anchor)];
        if (!at || anchor + sub > at.batchEnd) {
          return {
            status: "bad-fork",
            reason: "the fork sub-offset is past the next data boundary",
          };
        }
      }
      tail = anchor + sub;
      // The source's pieces up to the fork's tail, the one across it cut
      // there (a copy: it would keep the whole piece alive otherwise).
      const cut = pieceAfter(source.pieces, tail);
      pieces.push(...source.pieces.slice(0, cut));
      const across = source.pieces[cut];
      const start = source.pieces[cut - 1]?.end ?? 0;
      if (across !== undefined && start < tail) {
        const bytes = offsetOf(across.data, tail - start, source.info.framing);
        pieces.push({
          end: tail,
          data: across.data.slice(0, bytes),
          batchEnd: Math.min(across.batchEnd, tail),
        });
      }
    }
    const inherited = costOf(pieces);
    const added = toPieces(request.records, framing, tail);
    const cost = inherited + costOf(added);
    if (cost > this.#maxStreamBytes) return this.#streamFull();
    if (this.#streams.size >= this.#maxStreams) this.#sweep([source]);
    if (this.#streams.size >= this.#maxStreams) {
      return {
        status: "store-full",
        reason: `the store holds at most ${this.#maxStreams} streams`,
      };
    }
    if (!this.#room(cost, [source])) return this.#storeFull();
    const stream: MemoryStream = {
      info: {
        contentType,
        framing,
        ttlSeconds,
        expiresAt,
        closed: false,
        tail,
        incarnation: crypto.randomUUID(),
        forkedFrom: request.fork?.from,
        forkAnchor: request.fork ? anchor : undefined,
        forkSubOffset: request.fork?.subOffset,
      },
      pieces: [],
      bytes: 0,
      producers: new Map(),
      producerBytes: 0,
      forks: 0,
      softDeleted: false,
      touched: Date.now(),
      waiters: new Set(),
      source,
    };
    this.#push(stream, [...pieces, ...added], cost);
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
    const hasData = request.records.some((record) => record.length > 0);
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
    const pieces = toPieces(request.records, info.framing, info.tail);
    const cost = costOf(pieces);
    if (stream.bytes + cost > this.#maxStreamBytes) return this.#streamFull();
    const producerCost = producer && !state ? PRODUCER_COST + producer.id.length : 0;
    if (!this.#room(cost + producerCost, [stream])) return this.#storeFull();
    this.#push(stream, pieces, cost);
    if (request.seq !== undefined) stream.lastSeq = request.seq;
    if (producer) this.#remember(stream, producer, producerCost);
    if (request.close) {
      info.closed = true;
      stream.closedBy = producer ? { ...producer } : undefined;
    }
    this.#wake(stream);
    return { status: "ok", info: { ...info }, appended: hasData, producerSeq: producer?.seq };
  }

  /** Keeps a producer's state, the most recently used last, forgetting the oldest past the limit. */
  #remember(stream: MemoryStream, producer: ProducerClaim, cost: number): void {
    const { producers } = stream;
    producers.delete(producer.id);
    producers.set(producer.id, { epoch: producer.epoch, seq: producer.seq });
    stream.producerBytes += cost;
    this.#bytes += cost;
    for (const id of producers.keys()) {
      if (producers.size <= this.#maxProducers) break;
      producers.delete(id);
      stream.producerBytes -= PRODUCER_COST + id.length;
      this.#bytes -= PRODUCER_COST + id.length;
    }
  }

  /** {@inheritDoc StreamStore.read} */
  read(path: string, position: number, maxBytes: number, touch: boolean): Promise<ReadResult> {
    const stream = this.#get(path);
    if (!stream) return Promise.resolve({ status: "missing" });
    if (stream.softDeleted) return Promise.resolve({ status: "gone" });
    if (touch) stream.touched = Date.now();
    const { pieces, info } = stream;
    const from = pieceAfter(pieces, position);
    const { records, next } = readPieces(
      pieces.slice(from, from + 1 + Math.ceil(maxBytes / PIECE_COST)),
      info.framing,
      pieces[from - 1]?.end ?? 0,
      position,
      maxBytes,
    );
    return Promise.resolve({ status: "ok", info: { ...info }, records, next });
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
      this.#release(stream);
      this.#wake(stream);
    } else {
      this.#remove(path, stream);
    }
    return Promise.resolve("deleted");
  }

  /** {@inheritDoc StreamStore.list} */
  list(prefix: string, limit: number): Promise<string[]> {
    const paths: string[] = [];
    for (const path of this.#streams.keys()) {
      if (paths.length >= limit) break;
      if (path.startsWith(prefix)) paths.push(path);
    }
    return Promise.resolve(paths);
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

/** A count option: a non-negative safe integer. */
function count(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
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
  /**
   * Who may do what, as for the broker: the {@linkcode Authorize} hook of
   * `mod.ts`. Reading a stream (`GET`, `HEAD`) asks for `subscribe` and
   * needs a `subscribe` grant that matches the stream's name (its path
   * below `prefix`, as sent); writing (`PUT`, `POST`, `DELETE`) asks for
   * `publish` and needs a `publish` grant for it; `true` allows all. A fork
   * also reads its source: without the source's read grant it answers as
   * for a missing source. Live reads end when the grants expire. Defaults
   * to allowing everything.
   */
  authorize?: Authorize;
  /**
   * Called before each live read (long-poll or SSE) is held open; returns
   * the function to call once it has ended, or `undefined` to refuse it
   * with `503` and `Retry-After`, so that one budget can bound every
   * response held open (`Broker.reserve` is one). Defaults to admitting
   * every live read.
   */
  admit?: () => (() => void) | undefined;
  /**
   * The origin clients reach this server at, such as
   * `https://streams.example.com`: a created stream's `Location` is that
   * origin and the stream's path. Defaults to none: `Location` is the
   * path alone (a request's own `Host` is never echoed).
   */
  origin?: string;
  /** Bytes one request body may have (413 beyond). Defaults to 8 MiB. */
  maxBodyBytes?: number;
  /** Milliseconds one request body may take to arrive in full (408 beyond). Defaults to 10000. */
  bodyTimeout?: number;
  /** JSON messages one request may carry (413 beyond). Defaults to 100000. */
  maxMessages?: number;
  /** Bytes one stream may hold, for the default store (`MemoryStreamStoreOptions`). Defaults to 64 MiB. */
  maxStreamBytes?: number;
  /** Streams held at most, for the default store. Defaults to 10000. */
  maxStreams?: number;
  /** Bytes the whole default store may hold. Defaults to 256 MiB. */
  maxBytes?: number;
  /** Idempotent producers remembered per stream, for the default store. Defaults to 1000. */
  maxProducers?: number;
  /** Bytes one read response carries, about (see `readPieces`). Defaults to 1 MiB. */
  maxReadBytes?: number;
  /** Milliseconds a long-poll read waits for data before 204. Defaults to 20000. */
  longPollTimeout?: number;
  /** Milliseconds an SSE response stays open before the server ends it. Defaults to 60000. */
  sseMaxDuration?: number;
  /** `Cache-Control` of reads that return data. Defaults to `private, max-age=60, stale-while-revalidate=300`. */
  cacheControl?: string;
  /**
   * Origins allowed to read responses: `*`, or a list (the request's
   * `Origin` is echoed when it is exactly one of them). Defaults to `*`.
   */
  allowOrigin?: "*" | readonly string[];
  /**
   * Told, in one line, when the store fails (its requests answer `503`)
   * and when it answers again; the line holds no request data. Defaults
   * to none.
   */
  logger?: (line: string) => void;
  /**
   * The subscription APIs (`<prefix>__ds/`, sections 6 and 7 of the
   * protocol), served by this engine, which then follows this handler's
   * appends. Defaults to none: `__ds` answers `501`.
   */
  subscriptions?: Subscriptions;
}

/** A fetch handler: a request in, a response out. Never rejects. */
export type StreamsHandler = (request: Request) => Promise<Response>;

const MAX_PATH = 1024;
const CURSOR_EPOCH = Date.UTC(2024, 9, 9);
const CURSOR_INTERVAL = 20_000;
const ZERO = "0000000000000000";
const OFFSET = /^(\d{16})_(\d{16})$/;
const INTEGER = /^(0|[1-9]\d*)$/;
// deno-lint-ignore no-control-regex -- control characters are what it refuses
const PRODUCER_ID = /^[^\x00-\x1f\x7f]{1,256}$/;
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
  "Retry-After",
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
/** SSE data frames kept for sharing between readers, at most: how many, and their bytes. */
const MAX_FRAMES = 256;
const MAX_FRAME_BYTES = 8 * 1024 * 1024;
/** Seconds a client waits before it retries a full store, or a live read refused for the budget. */
const RETRY_FULL = "10";
const RETRY_BUSY = "5";

/** The media type alone, lower case: `Text/Plain; charset=x` is `text/plain`. */
export function mediaType(contentType: string): string {
  return contentType.split(";")[0].trim().toLowerCase();
}

/** Whether SSE carries this type as text (else base64). */
function isTextual(contentType: string): boolean {
  const type = mediaType(contentType);
  return type.startsWith("text/") || type === "application/json";
}

/**
 * The offset token of a position: `<16 digits>_<16 digits>`, a fixed zero
 * part, then the position.
 *
 * @param position A position in a stream.
 * @returns Its offset token.
 */
export function formatOffset(position: number): string {
  return `${ZERO}_${String(position).padStart(16, "0")}`;
}

/**
 * The position of an offset token that {@linkcode formatOffset} writes.
 *
 * @param text An offset token.
 * @returns Its position, or `undefined` when malformed.
 */
export function parseOffset(text: string): number | undefined {
  const match = OFFSET.exec(text);
  if (!match || match[1] !== ZERO) return undefined;
  const position = Number(match[2]);
  return Number.isSafeInteger(position) ? position : undefined;
}

/** Whether two byte arrays hold the same bytes. */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/** `Stream-Closed` counts only as exactly `true`, any case. */
function closedHeader(headers: Headers): boolean {
  return headers.get("stream-closed")?.toLowerCase() === "true";
}

/**
 * Checks a stream's name (its path below the prefix), for the stream a
 * request names and for a fork's source alike.
 */
function checkName(name: string, path: string): void {
  if (name === "") throw new HttpError(404, "no stream at this path");
  if (name.split("/")[0] === "__ds") {
    throw new HttpError(501, "the subscription APIs (__ds) are not enabled here");
  }
  if (path.length > MAX_PATH) {
    throw new HttpError(414, `a stream path has at most ${MAX_PATH} characters`);
  }
  if (name.split("/").some((segment) => segment === "." || segment === "..")) {
    throw new HttpError(400, "a stream path has no . or .. segments");
  }
}

/** Whether what `authorize` allowed covers `action` on the stream `name`. */
function permits(allowed: true | Grants, action: "subscribe" | "publish", name: string): boolean {
  return allowed === true || selectorsMatch(allowed[action] ?? [], name);
}

/** Nesting deeper than this is refused: readers' parsers would stop short of it. */
const MAX_DEPTH = 1000;

const [QUOTE, BACKSLASH, COMMA, COLON] = [0x22, 0x5c, 0x2c, 0x3a];
const [OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT] = [0x5b, 0x5d, 0x7b, 0x7d];

/**
 * A JSON body as messages, without building its values: checked against
 * the JSON grammar byte by byte, then each message (each element of an array
 * body, else the body itself) copied without the whitespace between its
 * tokens and ended with a line feed, which JSON text never holds otherwise.
 * Memory is the body's size, whatever the body holds.
 */
function jsonMessages(body: Uint8Array, maxMessages: number): { data: Uint8Array; count: number } {
  const invalid = () => new HttpError(400, "the body is not valid JSON");
  const out = new Uint8Array(body.length + 1);
  let o = 0;
  let i = 0;
  const fail = (): never => {
    throw invalid();
  };
  const space = () => {
    while (i < body.length) {
      const c = body[i];
      if (c !== 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) break;
      i++;
    }
  };
  const copy = () => {
    out[o++] = body[i++];
  };
  const expect = (byte: number) => {
    if (body[i] !== byte) fail();
    copy();
  };
  /**
   * One character of two to four UTF-8 bytes (text outside strings is
   * ASCII): no overlong form, no surrogate, nothing past U+10FFFF.
   */
  const character = () => {
    const c = body[i];
    const size = c >= 0xc2 && c <= 0xdf
      ? 2
      : c >= 0xe0 && c <= 0xef
      ? 3
      : c >= 0xf0 && c <= 0xf4
      ? 4
      : 0;
    if (size === 0) fail();
    // The second byte's range depends on the first (RFC 3629, section 4).
    const [low, high] = c === 0xe0
      ? [0xa0, 0xbf]
      : c === 0xed
      ? [0x80, 0x9f]
      : c === 0xf0
      ? [0x90, 0xbf]
      : c === 0xf4
      ? [0x80, 0x8f]
      : [0x80, 0xbf];
    copy();
    for (let k = 1; k < size; k++) {
      const next = body[i];
      if (!(k === 1 ? next >= low && next <= high : next >= 0x80 && next <= 0xbf)) fail();
      copy();
    }
  };
  const string = () => {
    expect(QUOTE);
    for (;;) {
      if (i >= body.length) fail();
      const c = body[i];
      if (c === QUOTE) return copy();
      if (c < 0x20) fail();
      if (c >= 0x80) character();
      else if (c === BACKSLASH) {
        copy();
        const escaped = body[i];
        if (escaped === 0x75) { // \uXXXX
          copy();
          for (let k = 0; k < 4; k++) {
            if (!isHex(body[i])) fail();
            copy();
          }
        } else if ('"\\/bfnrt'.includes(String.fromCharCode(escaped))) copy();
        else fail();
      } else copy();
    }
  };
  const digits = () => {
    if (!isDigit(body[i])) fail();
    while (isDigit(body[i])) copy();
  };
  const number = () => {
    if (body[i] === 0x2d) copy(); // -
    if (body[i] === 0x30) copy(); // a leading 0 stands alone
    else digits();
    if (body[i] === 0x2e) { // .
      copy();
      digits();
    }
    if (body[i] === 0x65 || body[i] === 0x45) { // e, E
      copy();
      if (body[i] === 0x2b || body[i] === 0x2d) copy();
      digits();
    }
  };
  const literal = (word: string) => {
    for (let k = 0; k < word.length; k++) {
      if (body[i] !== word.charCodeAt(k)) fail();
      copy();
    }
  };
  /** One value, of any depth, without recursion: containers open are on `stack`. */
  const value = () => {
    const stack: number[] = [];
    for (;;) {
      space();
      const c = body[i];
      let opened = false;
      if (c === OPEN_ARRAY || c === OPEN_OBJECT) {
        if (stack.length >= MAX_DEPTH) {
          throw new HttpError(400, `JSON nests at most ${MAX_DEPTH} levels deep`);
        }
        copy();
        space();
        const close = c === OPEN_ARRAY ? CLOSE_ARRAY : CLOSE_OBJECT;
        if (body[i] === close) copy();
        else {
          stack.push(close);
          if (c === OPEN_OBJECT) {
            string();
            space();
            expect(COLON);
          }
          opened = true;
        }
      } else if (c === QUOTE) string();
      else if (c === 0x2d || isDigit(c)) number();
      else if (c === 0x74) literal("true");
      else if (c === 0x66) literal("false");
      else if (c === 0x6e) literal("null");
      else fail();
      if (opened) continue;
      // After a value: the next one in its container, or the container's end.
      for (;;) {
        if (stack.length === 0) return;
        space();
        const close = stack[stack.length - 1];
        if (body[i] === close) {
          copy();
          stack.pop();
          continue;
        }
        expect(COMMA);
        if (close === CLOSE_OBJECT) {
          space();
          string();
          space();
          expect(COLON);
        }
        break;
      }
    }
  };
  let count = 0;
  space();
  if (body[i] === OPEN_ARRAY) {
    i++;
    space();
    if (body[i] === CLOSE_ARRAY) i++;
    else {
      for (;;) {
        if (++count > maxMessages) {
          throw new HttpError(413, `a request carries at most ${maxMessages} JSON messages`);
        }
        value();
        out[o++] = LINE_FEED;
        space();
        if (body[i] === COMMA) i++;
        else if (body[i] === CLOSE_ARRAY) {
          i++;
          break;
        } else fail();
      }
    }
  } else {
    value();
    out[o++] = LINE_FEED;
    count = 1;
  }
  space();
  if (i !== body.length) fail();
  return { data: out.subarray(0, o), count };
}

function isDigit(c: number): boolean {
  return c >= 0x30 && c <= 0x39;
}

function isHex(c: number): boolean {
  return isDigit(c) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
}

/** A JSON body's records: its messages, each ending with a line feed. */
function jsonRecords(body: Uint8Array, allowEmpty: boolean, maxMessages: number): Uint8Array[] {
  const { data, count } = jsonMessages(body, maxMessages);
  if (count === 0 && !allowEmpty) throw new HttpError(400, "an empty JSON array appends nothing");
  return count === 0 ? [] : [data];
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

/**
 * A read's body: bytes as they are, JSON messages as one array (each line
 * feed that ends a message becomes the comma, or the bracket, after it).
 */
function bodyOf(info: StreamInfo, records: readonly Uint8Array[]): Uint8Array {
  if (info.framing === "bytes") return concat(records);
  const size = records.reduce((sum, record) => sum + record.length, 0);
  if (size === 0) return encoder.encode("[]");
  const out = new Uint8Array(size + 1);
  out[0] = 0x5b; // [
  let at = 1;
  for (const record of records) {
    out.set(record, at);
    at += record.length;
  }
  for (let i = out.indexOf(0x0a, 1); i !== -1; i = out.indexOf(0x0a, i + 1)) out[i] = 0x2c; // ,
  out[size] = 0x5d; // ]
  return out;
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
  const timer = setTimeout(abort, Math.max(0, ms));
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

/** Producer headers: all three or none; the id printable, the numbers non-negative safe integers. */
function producerOf(headers: Headers): ProducerClaim | undefined {
  const id = headers.get("producer-id");
  const epoch = headers.get("producer-epoch");
  const seq = headers.get("producer-seq");
  if (id === null && epoch === null && seq === null) return undefined;
  if (id === null || epoch === null || seq === null) {
    throw new HttpError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together");
  }
  if (!PRODUCER_ID.test(id)) {
    throw new HttpError(400, "Producer-Id must be 1 to 256 printable characters");
  }
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
 * paths). It answers errors with a status and `{"error": reason}`, and
 * never throws: a failing store answers 503 with `Retry-After`.
 *
 * @example
 * ```ts
 * import { createStreamsHandler } from "./streams.ts";
 *
 * const handle = createStreamsHandler({ prefix: "/v1/stream/" });
 * const url = "http://localhost/v1/stream/greetings";
 * await handle(new Request(url, { method: "PUT", headers: { "content-type": "text/plain" } }));
 * await handle(new Request(url, { method: "POST", headers: { "content-type": "text/plain" }, body: "hi" }));
 * console.log(await (await handle(new Request(url + "?offset=-1"))).text()); // "hi"
 * ```
 *
 * @param options See {@linkcode StreamsHandlerOptions}.
 * @returns The handler.
 */
export function createStreamsHandler(options: StreamsHandlerOptions = {}): StreamsHandler {
  const prefix = options.prefix ?? "/";
  const store = options.store ??
    new MemoryStreamStore({
      maxStreams: options.maxStreams,
      maxStreamBytes: options.maxStreamBytes,
      maxBytes: options.maxBytes,
      maxProducers: options.maxProducers,
    });
  const limits = {
    maxBytes: count("maxBodyBytes", options.maxBodyBytes ?? 8 * 1024 * 1024),
    timeout: count("bodyTimeout", options.bodyTimeout ?? 10_000),
  };
  const maxMessages = count("maxMessages", options.maxMessages ?? 100_000);
  const maxReadBytes = count("maxReadBytes", options.maxReadBytes ?? 1024 * 1024);
  const longPollTimeout = count("longPollTimeout", options.longPollTimeout ?? 20_000);
  const sseMaxDuration = count("sseMaxDuration", options.sseMaxDuration ?? 60_000);
  const cacheControl = options.cacheControl ?? "private, max-age=60, stale-while-revalidate=300";
  const allowOrigin = options.allowOrigin ?? "*";
  // A lone origin given as a string (against the type) is one origin, not its characters.
  const listed = allowOrigin === "*"
    ? undefined
    : new Set(typeof allowOrigin === "string" ? [allowOrigin] : allowOrigin);
  const authorize: Authorize = options.authorize ?? (() => true);
  const admit = options.admit;
  const origin = options.origin?.replace(/\/$/, "");
  const logger = options.logger;
  const subscriptions = options.subscriptions;
  subscriptions?.attach({ prefix, store, authorize, origin });
  /**
   * The SSE data frames built last, shared by the readers at the same
   * position (see `sse`): keyed by what the data is, never by what a client
   * sent, and bounded in count and bytes.
   */
  const frames = new Map<string, { bytes: Uint8Array; carry: Uint8Array }>();
  let frameBytes = 0;
  let storeFailing = false;

  /**
   * A store call whose failure answers 503 with `Retry-After` and no
   * detail; the logger hears of the first failure and of the recovery.
   */
  function stored<T>(call: Promise<T>): Promise<T> {
    return call.then((value) => {
      if (storeFailing) logger?.("stream store: answering again");
      storeFailing = false;
      return value;
    }, (error) => {
      if (!storeFailing) {
        logger?.(`stream store failed: ${(error as Error)?.message ?? error}`);
      }
      storeFailing = true;
      throw new HttpError(503, "the stream store is unavailable: try again", {
        "retry-after": "1",
      });
    });
  }

  function respond(
    status: number,
    body: BodyInit | Uint8Array | null,
    headers: Record<string, string | undefined> = {},
  ): Response {
    const all = new Headers(SECURITY_HEADERS);
    for (const [name, value] of Object.entries(headers)) {
      if (value !== undefined) all.set(name, value);
    }
    return new Response(body as BodyInit | null, { status, headers: all });
  }

  function fail(error: HttpError): Response {
    const response = error.response();
    for (const [name, value] of Object.entries(SECURITY_HEADERS)) response.headers.set(name, value);
    response.headers.set("cache-control", "no-store");
    return response;
  }

  function streamHeaders(info: StreamInfo): Record<string, string | undefined> {
    return {
      "content-type": info.contentType,
      "stream-next-offset": formatOffset(info.tail),
      "stream-closed": info.closed ? "true" : undefined,
    };
  }

  function full(result: Full): never {
    if (result.status === "stream-full") throw new HttpError(413, result.reason);
    throw new HttpError(503, result.reason, { "retry-after": RETRY_FULL });
  }

  /**
   * Tells the subscriptions of data added to the stream at `path`, now at
   * `info.tail`, before the request is answered: once an append is
   * answered, the subscriptions that follow its stream have linked it and
   * woken (a webhook may still be on its way).
   */
  async function added(path: string, info: StreamInfo, records: readonly Uint8Array[]) {
    if (!subscriptions) return;
    const size = records.reduce((sum, record) => sum + span(record, info.framing), 0);
    await subscriptions.appended(path.slice(prefix.length), info.tail - size);
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
      let from: string;
      try {
        from = new URL(forkedFrom, request.url).pathname;
      } catch {
        throw new HttpError(400, "Stream-Forked-From is not a path");
      }
      await checkSource(request, from);
      fork = { from, anchor, subOffset: Number(forkSub ?? 0) };
    }
    const given = headers.get("content-type");
    const contentType = given?.trim() || "application/octet-stream";
    const framing: Framing = mediaType(contentType) === "application/json" ? "messages" : "bytes";
    const closed = closedHeader(headers);
    const body = await readBody(request, limits);
    if (fork && body.length > 0 && !given?.trim()) {
      // How to read the body depends on the type, which a fork would inherit.
      throw new HttpError(400, "a fork created with a body needs a Content-Type");
    }
    const records = body.length === 0
      ? []
      : framing === "messages"
      ? jsonRecords(body, true, maxMessages)
      : [body];
    const result = await stored(store.create(path, {
      contentType,
      framing,
      ttlSeconds,
      expiresAt,
      closed,
      records,
      fork,
      contentTypeGiven: given !== null && given.trim() !== "",
    }));
    if (result.status === "created" && records.length > 0) await added(path, result.info, records);
    switch (result.status) {
      case "created":
      case "exists":
        return respond(result.status === "created" ? 201 : 200, null, {
          ...streamHeaders(result.info),
          location: result.status === "created" ? (origin ?? "") + path : undefined,
        });
      case "conflict":
      case "source-gone":
        throw new HttpError(409, result.reason);
      case "source-missing":
        throw new HttpError(404, result.reason);
      case "bad-fork":
        throw new HttpError(400, result.reason);
      default:
        return full(result);
    }
  }

  /**
   * A fork reads its source: the source must be a stream under the prefix
   * that the request may read. A source it may not read answers exactly as
   * a missing one, so that forking reveals nothing of streams it cannot see.
   */
  async function checkSource(request: Request, from: string): Promise<void> {
    const hidden = new HttpError(404, "the source stream does not exist");
    if (!from.startsWith(prefix)) throw hidden;
    const name = from.slice(prefix.length);
    try {
      checkName(name, from);
    } catch {
      throw hidden;
    }
    const allowed = await access(authorize, request, "subscribe").catch((error) => {
      if (error instanceof HttpError) return undefined;
      throw error;
    });
    if (allowed === undefined || !permits(allowed, "subscribe", name)) throw hidden;
  }

  async function append(request: Request, path: string): Promise<Response> {
    const headers = request.headers;
    const producer = producerOf(headers);
    const close = closedHeader(headers);
    const seq = headers.get("stream-seq") ?? undefined;
    const contentType = headers.get("content-type") ?? undefined;
    const body = await readBody(request, limits);
    if (body.length === 0 && !close) {
      throw new HttpError(400, "an append needs a body (or Stream-Closed: true)");
    }
    let records: Uint8Array[] = [];
    if (body.length > 0) {
      if (contentType === undefined) throw new HttpError(400, "an append needs a Content-Type");
      // A JSON body goes to a JSON stream only: the store checks the type.
      records = mediaType(contentType) === "application/json"
        ? jsonRecords(body, false, maxMessages)
        : [body];
    }
    const result = await stored(store.append(path, { contentType, records, close, seq, producer }));
    const producerHeaders = (producerSeq: number) =>
      producer
        ? { "producer-epoch": String(producer.epoch), "producer-seq": String(producerSeq) }
        : {};
    if (result.status === "ok" && result.appended) await added(path, result.info, records);
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
      default:
        return full(result);
    }
  }

  async function head(path: string): Promise<Response> {
    const info = await stored(store.info(path));
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
    const result = await stored(store.delete(path));
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

  /**
   * A place for a live read in the budget (`admit`), or 503; and how long
   * it may stay open: `ms`, or less when its grants expire sooner.
   */
  function holdOpen(allowed: true | Grants, ms: number): { release(): void; ms: number } {
    const release = admit === undefined ? () => {} : admit();
    if (release === undefined) {
      throw new HttpError(503, "too many open streams: try again", { "retry-after": RETRY_BUSY });
    }
    const expires = allowed === true ? undefined : allowed.expires;
    return { release, ms: expires === undefined ? ms : Math.min(ms, expires - Date.now()) };
  }

  async function read(request: Request, path: string, allowed: true | Grants): Promise<Response> {
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
      await stored(store.read(path, position ?? Number.MAX_SAFE_INTEGER, maxReadBytes, true)),
    );
    const tail = first.info.tail;
    position ??= tail;
    if (position > tail) throw new HttpError(400, "the offset is past the stream's tail");
    const cursor = live === null ? undefined : cursorFor(url.searchParams.get("cursor"));
    if (live === "sse") {
      const { release, ms } = holdOpen(allowed, sseMaxDuration);
      return sse(request, path, position, first.info, url.searchParams.get("cursor"), ms, release);
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
      const { release, ms } = holdOpen(allowed, longPollTimeout);
      const { signal, dispose } = deadline(request.signal, ms);
      try {
        while (!signal.aborted) {
          const handed = await handedOn(path, position, result.info.incarnation, signal);
          if (request.signal.aborted) break;
          if (typeof handed === "object") result = handed;
          else {
            if (handed === "alone") await stored(store.waitForData(path, position, signal));
            else if (signal.aborted) break;
            if (request.signal.aborted) break;
            result = found(await stored(store.read(path, position, maxReadBytes, false)));
          }
          if (result.records.length > 0 || result.info.closed) break;
        }
      } finally {
        dispose();
        release();
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

  /**
   * Keeps a frame for other readers, dropping the oldest past the bounds,
   * which are memory only: a frame not kept is built again, the same.
   */
  function keepFrame(key: string, bytes: Uint8Array, carry: Uint8Array): void {
    // Stryker disable next-line all: memory, as said above
    if (bytes.length > MAX_FRAME_BYTES) return;
    frames.set(key, { bytes, carry });
    // Stryker disable next-line all: memory, as said above
    frameBytes += bytes.length;
    // Stryker disable next-line all: memory, as said above
    for (const [old, frame] of frames) {
      // Stryker disable next-line all: memory, as said above
      if (frames.size <= MAX_FRAMES && frameBytes <= MAX_FRAME_BYTES) break;
      // Stryker disable next-line all: memory, as said above
      frames.delete(old);
      // Stryker disable next-line all: memory, as said above
      frameBytes -= frame.bytes.length;
    }
  }

  /**
   * One reader of the stream at `path` per process: it waits for and reads
   * each append once, builds its data event and its control event once,
   * and hands them to every SSE reader that has caught up to the tail, so
   * that readers at the tail cost no store read and no encoding of their
   * own. A reader that falls behind (its queue grows) lets go and reads for
   * itself until it catches up again.
   */
  interface Follower {
    position: number;
    /** The bytes of a character cut at `position` (see `sse`). */
    carry: Uint8Array;
    readonly readers: Set<TailReader>;
    readonly stop: AbortController;
    /** The stream's (a stream created again at the path is another). */
    readonly incarnation: string;
  }

  /** An SSE reader attached to a follower. */
  interface TailReader {
    /**
     * Where it has read to, the character it carries there (`undefined`:
     * it takes records, not SSE frames), and of which stream.
     */
    readonly position: number;
    readonly carry: Uint8Array | undefined;
    readonly incarnation: string;
    /**
     * Takes an append: what was read from `from`, and its SSE data event
     * with what that carries after. False: it let go (too far behind, or
     * done).
     */
    take(
      from: number,
      read: Extract<ReadResult, { status: "ok" }>,
      data: Uint8Array,
      rest: Uint8Array,
    ): boolean;
    /** The stream ended: closed (`info` says so), gone, or the store failed. */
    end(info?: StreamInfo): void;
  }

  const followers = new Map<string, Follower>();

  /**
   * Attaches `reader` to the follower of `path` if it is at the follower's
   * position with the same carried bytes (or starts one there); false when
   * it is not, and the reader reads for itself.
   */
  function follow(path: string, reader: TailReader): boolean {
    let follower = followers.get(path);
    if (!follower) {
      follower = {
        position: reader.position,
        carry: reader.carry ?? EMPTY,
        readers: new Set(),
        stop: new AbortController(),
        incarnation: reader.incarnation,
      };
      followers.set(path, follower);
      void lead(path, follower);
    }
    if (
      follower.position !== reader.position || follower.incarnation !== reader.incarnation ||
      (reader.carry !== undefined && !sameBytes(follower.carry, reader.carry))
    ) {
      return false;
    }
    follower.readers.add(reader);
    return true;
  }

  /**
   * What the follower of `path` reads next from `position`, for a
   * long-poll: the read; `"ended"` when the follower ended or `signal`
   * aborted first (the caller looks for itself); `"alone"` when no follower
   * is at `position` (the caller waits and reads for itself).
   */
  function handedOn(
    path: string,
    position: number,
    incarnation: string,
    signal: AbortSignal,
  ): Promise<Extract<ReadResult, { status: "ok" }> | "ended" | "alone"> {
    return new Promise((resolve) => {
      const settle = (value: Extract<ReadResult, { status: "ok" }> | "ended" | "alone") => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      };
      const reader: TailReader = {
        position,
        carry: undefined,
        incarnation,
        take(_from, read) {
          settle(read);
          return false; // one read is all a long-poll takes
        },
        end: () => settle("ended"),
      };
      const onAbort = () => {
        unfollow(path, reader);
        settle("ended");
      };
      if (signal.aborted) return settle("ended");
      if (!follow(path, reader)) return settle("alone");
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Detaches `reader`; the follower stops once it has no reader left. */
  function unfollow(path: string, reader: TailReader): void {
    const follower = followers.get(path);
    if (!follower?.readers.delete(reader) || follower.readers.size > 0) return;
    followers.delete(path);
    follower.stop.abort();
  }

  async function lead(path: string, follower: Follower): Promise<void> {
    const { readers, stop } = follower;
    const endAll = (info?: StreamInfo) => {
      if (followers.get(path) === follower) followers.delete(path);
      stop.abort();
      for (const reader of [...readers]) reader.end(info);
      readers.clear();
    };
    /** Whether the last read found several appends: then the next waits a timer turn too. */
    let several = false;
    try {
      while (!stop.signal.aborted) {
        await stored(store.waitForData(path, follower.position, stop.signal));
        // The appends that arrive in this turn of the event loop are read
        // (and handed to every reader) together, as the broker hands out the
        // publishes of a turn: one write per reader for all of them.
        // Stryker disable next-line all: when, not what, is read (as in the broker)
        await new Promise<void>((resolve) => several ? setTimeout(resolve, 0) : endOfTurn(resolve));
        if (stop.signal.aborted) return;
        const result = await stored(store.read(path, follower.position, maxReadBytes, false));
        if (stop.signal.aborted) return;
        if (result.status !== "ok") return endAll();
        const { info, records, next } = result;
        // A stream created again at this path is another stream.
        if (info.incarnation !== follower.incarnation) return endAll();
        if (records.length === 0) {
          if (info.closed) return endAll(info);
          continue;
        }
        // Stryker disable next-line all: when, not what, is read (above)
        several = records.length > 1;
        const from = follower.position;
        const [data, rest] = frameOf(path, info, records, from, next, follower.carry);
        follower.position = next;
        follower.carry = rest;
        for (const reader of [...readers]) {
          if (!reader.take(from, result, data, rest)) readers.delete(reader);
        }
        if (info.closed && next >= info.tail) return endAll();
        if (readers.size === 0) {
          if (followers.get(path) === follower) followers.delete(path);
          return;
        }
      }
    } catch {
      endAll(); // the store failed: each reader resumes from its last offset
    }
  }

  /**
   * The data event of `records`, read at `from` up to `next` by a reader
   * carrying `carry`, and what it carries after. Readers at the same
   * position with nothing carried share it, built once.
   */
  function frameOf(
    path: string,
    info: StreamInfo,
    records: Uint8Array[],
    from: number,
    next: number,
    carry: Uint8Array,
  ): [Uint8Array, Uint8Array] {
    const key = carry.length === 0 ? `${info.incarnation} ${from} ${next} ${path}` : undefined;
    const shared = key === undefined ? undefined : frames.get(key);
    if (shared !== undefined) return [shared.bytes, shared.carry];
    const text = isTextual(info.contentType);
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
      `event: data\n${lines.map((line) => `data:${line}`).join("\n")}\n\n`,
    );
    if (key !== undefined) keepFrame(key, bytes, rest);
    return [bytes, rest];
  }

  /** The last control events built, by what they say: shared by the readers that say the same. */
  const controls = new Map<string, Uint8Array>();
  /** The last one asked for: the readers of one append ask with the same `info`, one after another. */
  let lastControl:
    | { info: StreamInfo; next: number; cursor: string; bytes: Uint8Array }
    | undefined;

  function controlOf(info: StreamInfo, next: number, cursor: string): Uint8Array {
    const last = lastControl;
    if (last?.info === info && last.next === next && last.cursor === cursor) return last.bytes;
    const atTail = next >= info.tail;
    const closing = info.closed && atTail;
    const key = `${next} ${atTail} ${closing} ${closing ? "" : cursor}`;
    let bytes = controls.get(key);
    if (bytes === undefined) {
      const control: Record<string, unknown> = { streamNextOffset: formatOffset(next) };
      if (closing) control.streamClosed = true;
      else control.streamCursor = cursor;
      if (atTail) control.upToDate = true;
      bytes = encoder.encode(`event: control\ndata:${JSON.stringify(control)}\n\n`);
      // A few: the readers of a moment share one or two.
      if (controls.size >= MAX_FRAMES) controls.delete(controls.keys().next().value!);
      controls.set(key, bytes);
    }
    lastControl = { info, next, cursor, bytes };
    return bytes;
  }

  /**
   * Data events joined with the control events that follow them, by the
   * data event (gone with it) and then the control event: the readers of
   * an append that send the same cursor share one chunk.
   */
  const joined = new WeakMap<Uint8Array, Map<Uint8Array, Uint8Array>>();

  function eventsOf(data: Uint8Array, control: Uint8Array): Uint8Array {
    let byControl = joined.get(data);
    if (byControl === undefined) joined.set(data, byControl = new Map());
    let bytes = byControl.get(control);
    if (bytes === undefined) {
      bytes = concat([data, control]);
      // Stryker disable next-line all: memory only; a chunk not kept is joined again, the same
      if (byControl.size >= 16) byControl.clear();
      byControl.set(control, bytes);
    }
    return bytes;
  }

  function sse(
    request: Request,
    path: string,
    start: number,
    info: StreamInfo,
    givenCursor: string | null,
    ms: number,
    release: () => void,
  ): Response {
    /** The bytes of a character cut at the end of the last read, kept for the next one. */
    let carry: Uint8Array = EMPTY;
    const { signal, dispose } = deadline(request.signal, ms);
    let position = start;
    let announced = false;
    let finished = false;
    let attached = false;
    let output: ReadableStreamDefaultController<Uint8Array> | undefined;
    const finish = () => {
      if (finished) return;
      finished = true;
      if (attached) unfollow(path, reader);
      attached = false;
      dispose();
      release();
      try {
        output?.close();
      } catch { /* cancelled or already closed */ }
    };
    /**
     * Appends the follower handed on while the client was still taking the
     * last chunk: sent as one chunk at its next pull, so that a client that
     * is slower than the appends gets fewer, larger writes.
     */
    let pending: Uint8Array[] = [];
    /** Whether the client waits for the next chunk (a pull the follower answers). */
    let waiting = false;
    const flush = () => {
      if (pending.length === 0) return;
      // Taken first: enqueue may call pull at once, which flushes too.
      const chunks = pending;
      pending = [];
      output!.enqueue(chunks.length === 1 ? chunks[0] : concat(chunks));
    };
    /** An append's data event and its control event, as one chunk (the readers of an append share it). */
    const chunkOf = (info: StreamInfo, data: Uint8Array, next: number): Uint8Array => {
      position = next;
      announced = true;
      return eventsOf(data, controlOf(info, next, cursorFor(givenCursor)));
    };
    const reader: TailReader = {
      get position() {
        return position;
      },
      get carry() {
        return carry;
      },
      incarnation: info.incarnation,
      take(from, { info, next }, data, rest) {
        // Stryker disable next-line ConditionalExpression: a follower hands out only what follows its readers' position
        if (finished || from !== position) return false;
        carry = rest;
        pending.push(chunkOf(info, data, next));
        const closing = info.closed && next >= info.tail;
        if (waiting || closing) {
          waiting = false;
          flush();
        }
        if (closing) {
          finish();
          return false;
        }
        // 64 appends behind, the reader is slow: it lets go, and reads for itself after these.
        if (pending.length >= 64) {
          attached = false;
          return false;
        }
        return true;
      },
      end(info) {
        attached = false;
        if (!finished) {
          flush();
          if (info?.closed) output!.enqueue(controlOf(info, position, cursorFor(givenCursor)));
        }
        finish();
      },
    };
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        output = controller;
      },
      async pull() {
        if (pending.length > 0) return flush();
        if (attached) {
          waiting = true;
          return;
        }
        try {
          while (!finished) {
            if (signal.aborted) return finish();
            const result = await stored(store.read(path, position, maxReadBytes, false));
            // Gone, or created again: another stream.
            if (result.status !== "ok" || result.info.incarnation !== reader.incarnation) {
              return finish();
            }
            const { info, records, next } = result;
            if (records.length > 0) {
              const [data, rest] = frameOf(path, info, records, position, next, carry);
              carry = rest;
              output!.enqueue(chunkOf(info, data, next));
              if (info.closed && next >= info.tail) finish();
              return;
            }
            if (!announced || info.closed) {
              announced = true;
              output!.enqueue(controlOf(info, position, cursorFor(givenCursor)));
              if (info.closed) finish();
              return;
            }
            // At the tail: the follower hands on what comes next.
            if (follow(path, reader)) {
              attached = true;
              waiting = true;
              return;
            }
            await stored(store.waitForData(path, position, signal));
          }
        } catch {
          finish(); // the store failed: the client resumes from its last offset
        }
      },
      cancel() {
        finish();
      },
    });
    signal.addEventListener("abort", () => finish(), { once: true });
    return respond(200, body, {
      ...EVENT_STREAM_HEADERS,
      "stream-sse-data-encoding": isTextual(info.contentType) ? undefined : "base64",
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
    const requestOrigin = request.headers.get("origin");
    if (listed === undefined) response.headers.set("access-control-allow-origin", "*");
    else {
      response.headers.append("vary", "origin");
      if (requestOrigin !== null && listed.has(requestOrigin)) {
        response.headers.set("access-control-allow-origin", requestOrigin);
      }
    }
    return response;
  }

  return async (request: Request): Promise<Response> => withOrigin(request, await handle(request));

  async function handle(request: Request): Promise<Response> {
    try {
      const path = new URL(request.url).pathname;
      if (!path.startsWith(prefix)) throw new HttpError(404, "no stream at this path");
      const name = path.slice(prefix.length);
      if (subscriptions && name.split("/")[0] === "__ds") {
        if (request.method === "OPTIONS") return preflight();
        const response = await subscriptions.handle(request, name.slice("__ds/".length));
        for (const [header, value] of Object.entries(SECURITY_HEADERS)) {
          response.headers.set(header, value);
        }
        return response;
      }
      checkName(name, path);
      if (request.method === "OPTIONS") return preflight();
      const action = request.method === "GET" || request.method === "HEAD"
        ? "subscribe"
        : "publish";
      const allowed = await access(authorize, request, action);
      if (!permits(allowed, action, name)) {
        throw new HttpError(403, `no ${action} grant for ${JSON.stringify(name)}`);
      }
      switch (request.method) {
        case "PUT":
          return await create(request, path);
        case "POST":
          return await append(request, path);
        case "GET":
          return await read(request, path, allowed);
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
      logger?.(`stream request failed: ${(error as Error)?.message ?? error}`);
      return fail(new HttpError(500, "internal error"));
    }
  }
}

/**
 * Headers on every response: browser safety (content is never sniffed,
 * never run as a page of this origin even when a stream's type is HTML or
 * SVG, never framed) and CORS exposure. The origin is added per request.
 */
const SECURITY_HEADERS: Readonly<Record<string, string>> = {
  "x-content-type-options": "nosniff",
  "content-security-policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
  "cross-origin-resource-policy": "cross-origin",
  "access-control-expose-headers": EXPOSED,
};
