// Durable Streams in a Durable Object's own SQLite storage. Every method is
// synchronous SQL inside the object: its single thread and transactionSync
// make each check-then-change atomic, as MemoryStreamStore's one synchronous
// step is, and the data outlives the object's eviction and restarts.
//
// Layout (one row per stream, per piece, per producer):
// - ds_streams: each stream's metadata, `bytes` (what it counts for against
//   maxStreamBytes), `touched` (for a sliding TTL), the producer that closed
//   it, `soft_deleted`, and for a fork its source and whether that source
//   lives in another object (`source_remote`).
// - ds_pieces: each stream's Pieces (streams.ts), keyed by their end
//   (`stop`); a piece longer than PART_BYTES (a single long JSON message)
//   keeps its data in ds_parts instead, as SQLite on Cloudflare holds at
//   most 2 MB in a row.
// - ds_producers: idempotent producers, `used` ordering them by last use.
// - ds_forks: the forks made from each stream and not yet gone, by path and
//   incarnation: a deleted stream that has some is soft-deleted (410, its
//   path held) until its last one goes.
// - ds_releases: the releases owed to sources in other objects, by forks
//   gone or copies cut short: an outbox, sent until the source answers, so
//   that no source stays soft-deleted for ever.
//
// A fork copies the data it inherits. When its source is in this store the
// copy is part of the create's transaction. When it is elsewhere (`sources`:
// one Durable Object per stream), the source checks the fork and registers
// it in one step (`lend`), then hands its pieces over in runs; the fork's
// copy stays invisible until whole, and a copy cut short (the source
// deleted meanwhile, a failure, a restart) releases the source.
import { concat } from "../../mod.ts";
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
} from "../../streams.ts";
import type { SqlStorageLike, SqlValue } from "./sqlite_log.ts";

/** Limits of a {@linkcode SqliteStreamStore}, as those of `MemoryStreamStore`. */
export interface SqliteStreamStoreOptions {
  /**
   * Bytes one stream may hold, inherited data included, each piece
   * counting `PIECE_COST` more. Defaults to 64 MiB.
   */
  maxStreamBytes?: number;
  /**
   * Idempotent producers remembered per stream; past it, the one unused
   * longest is forgotten (it counts as new if it comes back). Defaults to
   * 1000.
   */
  maxProducers?: number;
  /**
   * Where to find a fork's source that this store does not hold: other
   * Durable Objects, one per stream. Defaults to none: a fork's source must
   * be in this store.
   */
  sources?: ForkSources;
}

/** A create that did not happen, and why. */
export type Refusal = Exclude<CreateResult, { status: "created" | "exists" }>;

/** A stream's info, and whether it was deleted while forks use it. */
export interface Described {
  /** The stream's metadata. */
  info: StreamInfo;
  /** Deleted, kept for its forks: it answers 410 and holds its path. */
  softDeleted: boolean;
}

/** What a fork asks of its source: the checks that need the source, and to be registered. */
export interface LendRequest {
  /** The fork's path. */
  fork: string;
  /** The fork's incarnation, under which it is registered. */
  incarnation: string;
  /** The fork's creation, without its records. */
  request: Omit<CreateRequest, "records">;
  /** Whether the fork is created with records of its own. */
  hasRecords: boolean;
  /** What the fork's own records count for against the size limit. */
  ownCost: number;
  /** The fork's size limit (its store's `maxStreamBytes`). */
  maxBytes: number;
}

/**
 * A source's answer to {@linkcode LendRequest}: the fork is registered, with
 * the configuration it inherits, and its data comes in runs of pieces; the
 * runs end with a refusal if the source went away meanwhile.
 */
export type Lent<Runs> = Refusal | {
  status: "lent";
  contentType: string;
  framing: Framing;
  ttlSeconds?: number;
  expiresAt?: number;
  /** The fork offset, resolved (the source's tail when the request gave none). */
  anchor: number;
  /** Where the inherited data ends: the anchor and the sub-offset. */
  tail: number;
  /** What the inherited pieces count for against the size limit. */
  cost: number;
  runs: Runs;
};

/**
 * Sources of forks held elsewhere: each call reaches the store that holds
 * `path` (its own `describe`, `lend` and `release`), such as another Durable
 * Object's {@linkcode SqliteStreamStore}.
 */
export interface ForkSources {
  /** The source's description, or `undefined` when there is none. */
  describe(path: string): Promise<Described | undefined>;
  /** Checks a fork against its source, registers it there, and gives its inherited data. */
  lend(
    path: string,
    request: LendRequest,
  ): Promise<Lent<AsyncIterator<Piece[], Refusal | undefined>>>;
  /** Forgets a fork of `path`: it is gone. Done twice, the second does nothing. */
  release(path: string, fork: string, incarnation: string): Promise<void>;
}

/** A stream as its row holds it. */
interface Stored {
  info: StreamInfo;
  bytes: number;
  lastSeq?: string;
  closedBy?: ProducerClaim;
  softDeleted: boolean;
  touched: number;
  sourceRemote: boolean;
}

type Row = Record<string, SqlValue>;

/** Piece data past this many bytes goes to ds_parts, in parts of this size. */
const PART_BYTES = 1024 * 1024;
/** About how many bytes one run of a fork's copy carries. */
const COPY_BYTES = 1024 * 1024;
/** How long a release that failed waits to be sent again. */
const RETRY_MS = 10_000;

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS ds_streams (
    path TEXT PRIMARY KEY, content_type TEXT NOT NULL, framing TEXT NOT NULL,
    ttl INTEGER, expires_at INTEGER, closed INTEGER NOT NULL, tail INTEGER NOT NULL,
    incarnation TEXT NOT NULL, forked_from TEXT, fork_anchor INTEGER, fork_sub INTEGER,
    source_remote INTEGER NOT NULL, bytes INTEGER NOT NULL, last_seq TEXT,
    closer_id TEXT, closer_epoch INTEGER, closer_seq INTEGER,
    soft_deleted INTEGER NOT NULL, touched INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS ds_pieces (
    path TEXT NOT NULL, stop INTEGER NOT NULL, batch_end INTEGER NOT NULL,
    size INTEGER NOT NULL, parts INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (path, stop))`,
  `CREATE TABLE IF NOT EXISTS ds_parts (
    path TEXT NOT NULL, stop INTEGER NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (path, stop, part))`,
  `CREATE TABLE IF NOT EXISTS ds_producers (
    path TEXT NOT NULL, id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    used INTEGER NOT NULL, PRIMARY KEY (path, id))`,
  `CREATE TABLE IF NOT EXISTS ds_forks (
    source TEXT NOT NULL, fork TEXT NOT NULL, incarnation TEXT NOT NULL,
    PRIMARY KEY (source, fork, incarnation))`,
  `CREATE TABLE IF NOT EXISTS ds_releases (
    source TEXT NOT NULL, fork TEXT NOT NULL, incarnation TEXT NOT NULL,
    PRIMARY KEY (source, fork, incarnation))`,
];

/**
 * Durable Streams in a Durable Object's SQLite storage (`ctx.storage`),
 * with the limits and answers of `MemoryStreamStore`: closure, content
 * types, `Stream-Seq`, idempotent producers (at most `maxProducers` per
 * stream), TTL and `Expires-At` (checked on access; {@linkcode tidy} drops
 * what expired unseen), JSON framing, size limits, and forks, a source
 * deleted while forks exist being soft-deleted. Live reads wait in the
 * object: an append wakes its waiters. It holds any number of streams; a
 * fork's source may be in another object (`sources`).
 *
 * @example
 * ```ts
 * import { createStreamsHandler } from "../../streams.ts";
 * import { SqliteStreamStore } from "./sqlite_stream_store.ts";
 * import type { SqlStorageLike } from "./sqlite_log.ts";
 *
 * export class Streams {
 *   readonly fetch: (request: Request) => Promise<Response>;
 *   constructor(ctx: { storage: SqlStorageLike }) {
 *     const store = new SqliteStreamStore(ctx.storage);
 *     this.fetch = createStreamsHandler({ prefix: "/v1/stream/", store });
 *   }
 * }
 * ```
 */
export class SqliteStreamStore implements StreamStore {
  readonly #storage: SqlStorageLike;
  readonly #maxStreamBytes: number;
  readonly #maxProducers: number;
  readonly #sources: ForkSources | undefined;
  /** Whether the tables exist: they are made by the first create, so a miss stores nothing. */
  #ready: boolean;
  /** In-object waiters by stream path: each is called once, then removed. */
  readonly #waiters = new Map<string, Set<() => void>>();
  /** Forks being copied from another object, by path: a create there waits for the copy. */
  readonly #copying = new Map<string, Promise<unknown>>();
  /** The incarnations of those forks: their releases wait for the copy's outcome. */
  readonly #held = new Set<string>();
  /** Whether ds_releases may hold releases to send. */
  #unsent: boolean;
  /** The sending of releases under way, if any. */
  #settling: Promise<void> = Promise.resolve();

  /**
   * A store on `storage`, keeping what it already holds.
   *
   * @param storage The object's `ctx.storage` (SQLite-backed).
   * @param options See {@linkcode SqliteStreamStoreOptions}.
   */
  constructor(storage: SqlStorageLike, options: SqliteStreamStoreOptions = {}) {
    this.#storage = storage;
    this.#maxStreamBytes = count("maxStreamBytes", options.maxStreamBytes ?? 64 * 1024 * 1024);
    this.#maxProducers = count("maxProducers", options.maxProducers ?? 1000);
    this.#sources = options.sources;
    this.#ready = this.#exec(
      "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'ds_streams'",
    ).length > 0;
    this.#unsent = this.#ready && this.#exec("SELECT 1 FROM ds_releases LIMIT 1").length > 0;
  }

  /** {@inheritDoc StreamStore.create} */
  async create(path: string, request: CreateRequest): Promise<CreateResult> {
    let result: CreateResult | undefined;
    while (result === undefined) {
      // A fork being copied to this path decides what is there.
      const copying = this.#copying.get(path);
      if (copying) {
        await copying.catch(() => {});
        continue;
      }
      const from = request.fork?.from;
      result = from === undefined || this.#sources === undefined ||
          this.#transaction(() => this.#get(from)) !== undefined
        ? this.#transaction(() => this.#createHere(path, request))
        : await this.#createFromAfar(path, request, from);
    }
    await this.#settle();
    return result;
  }

  /** A create whose fork source, if any, is in this store: one transaction. */
  #createHere(path: string, request: CreateRequest): CreateResult {
    const existing = this.#get(path);
    if (existing?.softDeleted) return HELD;
    let source: Stored | undefined;
    if (request.fork) {
      source = this.#get(request.fork.from);
      if (!existing) {
        if (!source) return SOURCE_MISSING;
        if (source.softDeleted) return SOURCE_GONE;
      }
    }
    if (existing) return compare(existing.info, request, source?.info);
    this.#schema();
    this.#drop(path); // what a copy cut short by a restart left
    const incarnation = crypto.randomUUID();
    if (!request.fork) {
      const pieces = toPieces(request.records, request.framing, 0);
      const cost = costOf(pieces);
      if (cost > this.#maxStreamBytes) return this.#streamFull();
      this.#put(path, pieces);
      const info: StreamInfo = {
        contentType: request.contentType,
        framing: request.framing,
        ttlSeconds: request.ttlSeconds,
        expiresAt: request.expiresAt,
        closed: request.closed,
        tail: pieces.at(-1)?.end ?? 0,
        incarnation,
      };
      this.#insert(path, info, cost, false);
      return { status: "created", info };
    }
    const lent = this.#lend(request.fork.from, this.#lendRequest(path, incarnation, request));
    if (lent.status !== "lent") return lent;
    // The source is in this transaction: its runs cannot end short.
    for (let step = lent.runs.next(); !step.done; step = lent.runs.next()) {
      this.#put(path, step.value);
    }
    return this.#finishFork(path, request, incarnation, lent, false);
  }

  /**
   * A create whose fork source is in another object, through `sources`;
   * `undefined` when the stream here changed while the source answered
   * (the create starts over).
   */
  async #createFromAfar(
    path: string,
    request: CreateRequest,
    from: string,
  ): Promise<CreateResult | undefined> {
    const existing = this.#transaction(() => this.#get(path));
    if (existing?.softDeleted) return HELD;
    if (!existing) {
      const copy = this.#copyFork(path, request, from);
      this.#copying.set(path, copy);
      try {
        return await copy;
      } finally {
        this.#copying.delete(path);
      }
    }
    const source = await this.#sources!.describe(from);
    const now = this.#transaction(() => this.#get(path));
    if (now?.info.incarnation !== existing.info.incarnation) return undefined;
    return compare(existing.info, request, source?.info);
  }

  async #copyFork(path: string, request: CreateRequest, from: string): Promise<CreateResult> {
    const incarnation = crypto.randomUUID();
    // The release is written before the source is asked: a copy cut short,
    // even by a restart, releases the source; a fork made whole takes it back.
    this.#transaction(() => {
      this.#schema();
      this.#drop(path);
      this.#exec("INSERT OR IGNORE INTO ds_releases VALUES (?, ?, ?)", from, path, incarnation);
    });
    this.#held.add(incarnation);
    let registered = true;
    let whole = false;
    try {
      const lent = await this.#sources!.lend(
        from,
        this.#lendRequest(path, incarnation, request),
      );
      if (lent.status !== "lent") {
        registered = false;
        return lent;
      }
      for (let step = await lent.runs.next();; step = await lent.runs.next()) {
        if (step.done) {
          if (step.value) return step.value;
          break;
        }
        this.#transaction(() => this.#put(path, step.value));
      }
      return this.#transaction(() => {
        this.#exec(
          "DELETE FROM ds_releases WHERE source = ? AND fork = ? AND incarnation = ?",
          from,
          path,
          incarnation,
        );
        const created = this.#finishFork(path, request, incarnation, lent, true);
        whole = true;
        return created;
      });
    } finally {
      this.#held.delete(incarnation);
      if (!whole) {
        this.#transaction(() => {
          this.#drop(path);
          if (!registered) {
            this.#exec(
              "DELETE FROM ds_releases WHERE source = ? AND fork = ? AND incarnation = ?",
              from,
              path,
              incarnation,
            );
          }
        });
        this.#unsent ||= registered;
      }
    }
  }

  #lendRequest(path: string, incarnation: string, request: CreateRequest): LendRequest {
    const { records, ...rest } = request;
    return {
      fork: path,
      incarnation,
      request: rest,
      hasRecords: records.length > 0,
      // Cut for the request's framing: records of another framing than the source's are refused.
      ownCost: costOf(toPieces(records, request.framing, 0)),
      maxBytes: this.#maxStreamBytes,
    };
  }

  /** Makes a fork whose inherited pieces are in place: its row and its own records. */
  #finishFork(
    path: string,
    request: CreateRequest,
    incarnation: string,
    lent: Extract<Lent<unknown>, { status: "lent" }>,
    sourceRemote: boolean,
  ): CreateResult {
    const own = toPieces(request.records, lent.framing, lent.tail);
    this.#put(path, own);
    const info: StreamInfo = {
      contentType: lent.contentType,
      framing: lent.framing,
      ttlSeconds: lent.ttlSeconds,
      expiresAt: lent.expiresAt,
      closed: request.closed,
      tail: own.at(-1)?.end ?? lent.tail,
      incarnation,
      forkedFrom: request.fork!.from,
      forkAnchor: lent.anchor,
      forkSubOffset: request.fork!.subOffset,
    };
    this.#insert(path, info, lent.cost + costOf(own), sourceRemote);
    return { status: "created", info };
  }

  /**
   * The stream at `path` and whether it was soft-deleted, for a fork in
   * another object that compares itself with its source.
   *
   * @param path The stream's path.
   * @returns Its description, or `undefined` when there is none.
   */
  async describe(path: string): Promise<Described | undefined> {
    const stream = this.#transaction(() => this.#get(path));
    await this.#settle();
    return stream && { info: stream.info, softDeleted: stream.softDeleted };
  }

  /**
   * The source's side of a fork: checks the fork against the stream at
   * `path` as `MemoryStreamStore` does (in its order), registers it, and
   * gives the data it inherits in runs of pieces, read as they are taken.
   *
   * @param path The source's path.
   * @param request The fork's request.
   * @returns The configuration the fork inherits and its data, or why not.
   */
  async lend(
    path: string,
    request: LendRequest,
  ): Promise<Lent<Iterator<Piece[], Refusal | undefined>>> {
    const lent = this.#transaction(() => this.#lend(path, request));
    await this.#settle();
    return lent;
  }

  #lend(path: string, lend: LendRequest): Lent<Generator<Piece[], Refusal | undefined>> {
    const source = this.#get(path);
    if (!source) return SOURCE_MISSING;
    if (source.softDeleted) return SOURCE_GONE;
    const { request } = lend;
    const config = inherit(request, source.info);
    if (mediaType(source.info.contentType) !== mediaType(config.contentType)) {
      return { status: "conflict", reason: "the content type differs from the source stream's" };
    }
    if (source.info.framing !== request.framing && lend.hasRecords) {
      // The records were cut for the request's framing, not the source's.
      return { status: "conflict", reason: "the initial data is not of the source stream's type" };
    }
    const anchor = request.fork!.anchor ?? source.info.tail;
    const sub = request.fork!.subOffset;
    if (anchor > source.info.tail) {
      return { status: "bad-fork", reason: "the fork offset is past the source's tail" };
    }
    if (sub > 0) {
      const [at] = this.#exec(
        "SELECT batch_end FROM ds_pieces WHERE path = ? AND stop > ? ORDER BY stop LIMIT 1",
        path,
        anchor,
      );
      if (!at || anchor + sub > (at.batch_end as number)) {
        return { status: "bad-fork", reason: "the fork sub-offset is past the next data boundary" };
      }
    }
    const tail = anchor + sub;
    const [whole] = this.#exec(
      "SELECT COALESCE(SUM(size), 0) AS size, COUNT(*) AS count FROM ds_pieces WHERE path = ? AND stop <= ?",
      path,
      tail,
    );
    const across = this.#across(path, tail, source.info.framing);
    const cost = (whole.size as number) + (whole.count as number) * PIECE_COST +
      (across ? costOf([across]) : 0);
    if (cost + lend.ownCost > lend.maxBytes) {
      return { status: "stream-full", reason: `a stream holds at most ${lend.maxBytes} bytes` };
    }
    this.#exec(
      "INSERT OR IGNORE INTO ds_forks VALUES (?, ?, ?)",
      path,
      lend.fork,
      lend.incarnation,
    );
    return {
      status: "lent",
      ...config,
      anchor,
      tail,
      cost,
      runs: this.#runs(path, source.info.incarnation, tail),
    };
  }

  /**
   * The piece that runs across `tail`, cut there (a fork inherits up to
   * it), or `undefined` when a piece ends at `tail` or none follows.
   */
  #across(path: string, tail: number, framing: Framing): Piece | undefined {
    const [row] = this.#exec(
      "SELECT * FROM ds_pieces WHERE path = ? AND stop > ? ORDER BY stop LIMIT 1",
      path,
      tail,
    );
    if (!row) return undefined;
    const [before] = this.#exec(
      "SELECT stop FROM ds_pieces WHERE path = ? AND stop < ? ORDER BY stop DESC LIMIT 1",
      path,
      row.stop,
    );
    const start = (before?.stop as number | undefined) ?? 0;
    if (start >= tail) return undefined;
    const piece = this.#pieceOf(path, row);
    // readPieces gives what follows `tail` in the piece: the fork keeps what precedes it.
    const rest = readPieces([piece], framing, start, tail, Infinity).records[0];
    return {
      end: tail,
      data: piece.data.slice(0, piece.data.length - (rest?.length ?? 0)),
      batchEnd: Math.min(piece.batchEnd, tail),
    };
  }

  /**
   * A fork's inherited pieces, up to `tail`, in runs of about
   * {@linkcode COPY_BYTES}, each read when taken: a run ends the copy with a
   * refusal if the source was deleted or removed since it was lent.
   */
  *#runs(
    path: string,
    incarnation: string,
    tail: number,
  ): Generator<Piece[], Refusal | undefined> {
    let after = 0;
    for (;;) {
      const run = this.#transaction((): Piece[] | Refusal => {
        const source = this.#get(path);
        if (source?.info.incarnation !== incarnation) return SOURCE_MISSING;
        if (source.softDeleted) return SOURCE_GONE;
        const run: Piece[] = [];
        let bytes = 0;
        while (bytes < COPY_BYTES) {
          const rows = this.#exec(
            "SELECT * FROM ds_pieces WHERE path = ? AND stop > ? AND stop <= ? ORDER BY stop LIMIT 16",
            path,
            after,
            tail,
          );
          for (const row of rows) {
            const piece = this.#pieceOf(path, row);
            run.push(piece);
            bytes += piece.data.length;
            after = piece.end;
          }
          if (rows.length < 16) {
            // The last piece, cut at the tail, if one runs across it.
            const across = after < tail ? this.#across(path, tail, source.info.framing) : undefined;
            if (across) run.push(across);
            after = tail;
            break;
          }
        }
        return run;
      });
      if (!Array.isArray(run)) return run;
      if (run.length > 0) yield run;
      if (after >= tail) return undefined;
    }
  }

  /**
   * Forgets a fork of the stream at `path` (deleted or expired, in this
   * store or another): a soft-deleted stream whose last fork it was goes,
   * and its own source is released in turn.
   *
   * @param path The source's path.
   * @param fork The fork's path.
   * @param incarnation The fork's incarnation.
   */
  async release(path: string, fork: string, incarnation: string): Promise<void> {
    this.#transaction(() => this.#release(path, fork, incarnation));
    await this.#settle();
  }

  #release(path: string, fork: string, incarnation: string): void {
    if (!this.#ready) return;
    this.#exec(
      "DELETE FROM ds_forks WHERE source = ? AND fork = ? AND incarnation = ?",
      path,
      fork,
      incarnation,
    );
    const source = this.#get(path);
    if (source?.softDeleted && this.#forks(path) === 0) this.#remove(path, source);
  }

  /** {@inheritDoc StreamStore.append} */
  async append(path: string, request: AppendRequest): Promise<AppendResult> {
    const result = this.#transaction(() => this.#append(path, request));
    await this.#settle();
    return result;
  }

  #append(path: string, request: AppendRequest): AppendResult {
    const stream = this.#get(path);
    if (!stream) return { status: "missing" };
    if (stream.softDeleted) return { status: "gone" };
    this.#touch(path, stream);
    const { info } = stream;
    const producer = request.producer;
    const [state] = producer
      ? this.#exec(
        "SELECT epoch, seq FROM ds_producers WHERE path = ? AND id = ?",
        path,
        producer.id,
      ) as { epoch: number; seq: number }[]
      : [];
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
        return { status: "duplicate", info, producerSeq: state?.seq ?? producer.seq };
      }
      if (producer && state && producer.epoch === state.epoch && producer.seq <= state.seq) {
        return { status: "duplicate", info, producerSeq: state.seq };
      }
      if (!hasData && request.close && !producer) return { status: "ok", info, appended: false };
      return { status: "closed", info };
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
        return { status: "duplicate", info, producerSeq: state.seq };
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
    this.#put(path, pieces);
    info.tail = pieces.at(-1)?.end ?? info.tail;
    if (request.close) info.closed = true;
    const closer = request.close ? producer : stream.closedBy;
    this.#exec(
      `UPDATE ds_streams SET tail = ?, bytes = ?, last_seq = ?, closed = ?,
        closer_id = ?, closer_epoch = ?, closer_seq = ? WHERE path = ?`,
      info.tail,
      stream.bytes + cost,
      request.seq ?? stream.lastSeq ?? null,
      info.closed ? 1 : 0,
      closer?.id ?? null,
      closer?.epoch ?? null,
      closer?.seq ?? null,
      path,
    );
    if (producer) this.#remember(path, producer);
    this.#wake(path);
    return { status: "ok", info, appended: hasData, producerSeq: producer?.seq };
  }

  /** Keeps a producer's state, the most recently used last, forgetting the oldest past the limit. */
  #remember(path: string, producer: ProducerClaim): void {
    this.#exec(
      `INSERT OR REPLACE INTO ds_producers (path, id, epoch, seq, used) VALUES (?, ?, ?, ?,
        (SELECT COALESCE(MAX(used), 0) + 1 FROM ds_producers WHERE path = ?))`,
      path,
      producer.id,
      producer.epoch,
      producer.seq,
      path,
    );
    this.#exec(
      `DELETE FROM ds_producers WHERE path = ? AND used <= (SELECT used FROM ds_producers
        WHERE path = ? ORDER BY used DESC LIMIT 1 OFFSET ?)`,
      path,
      path,
      this.#maxProducers,
    );
  }

  /** {@inheritDoc StreamStore.read} */
  async read(
    path: string,
    position: number,
    maxBytes: number,
    touch: boolean,
  ): Promise<ReadResult> {
    const result = this.#transaction((): ReadResult => {
      const stream = this.#get(path);
      if (!stream) return { status: "missing" };
      if (stream.softDeleted) return { status: "gone" };
      if (touch) this.#touch(path, stream);
      const [before] = this.#exec(
        "SELECT stop FROM ds_pieces WHERE path = ? AND stop <= ? ORDER BY stop DESC LIMIT 1",
        path,
        position,
      );
      const { records, next } = readPieces(
        this.#piecesAfter(path, position),
        stream.info.framing,
        (before?.stop as number | undefined) ?? 0,
        position,
        maxBytes,
      );
      return { status: "ok", info: stream.info, records, next };
    });
    await this.#settle();
    return result;
  }

  /** The pieces of a stream that end after `position`, fetched a few at a time as they are taken. */
  *#piecesAfter(path: string, position: number): Generator<Piece> {
    let after = position;
    for (let limit = 16;; limit = Math.min(limit * 4, 1024)) {
      const rows = this.#exec(
        "SELECT * FROM ds_pieces WHERE path = ? AND stop > ? ORDER BY stop LIMIT ?",
        path,
        after,
        limit,
      );
      for (const row of rows) yield this.#pieceOf(path, row);
      if (rows.length < limit) return;
      after = rows[rows.length - 1].stop as number;
    }
  }

  /** {@inheritDoc StreamStore.info} */
  async info(path: string): Promise<StreamInfo | "missing" | "gone"> {
    const stream = this.#transaction(() => this.#get(path));
    await this.#settle();
    return !stream ? "missing" : stream.softDeleted ? "gone" : stream.info;
  }

  /** {@inheritDoc StreamStore.delete} */
  async delete(path: string): Promise<DeleteResult> {
    const result = this.#transaction((): DeleteResult => {
      const stream = this.#get(path);
      if (!stream) return "missing";
      if (stream.softDeleted) return "gone";
      if (this.#forks(path) > 0) {
        // Forks have their own copies: the data goes, the row answers 410 and holds the path.
        this.#drop(path);
        this.#exec("UPDATE ds_streams SET soft_deleted = 1, bytes = 0 WHERE path = ?", path);
        this.#wake(path);
      } else {
        this.#remove(path, stream);
      }
      return "deleted";
    });
    await this.#settle();
    return result;
  }

  /** {@inheritDoc StreamStore.list} */
  list(prefix: string, limit: number): Promise<string[]> {
    if (!this.#ready) return Promise.resolve([]);
    const rows = this.#exec(
      "SELECT path FROM ds_streams WHERE substr(path, 1, length(?)) = ? LIMIT ?",
      prefix,
      prefix,
      limit,
    );
    return Promise.resolve(rows.map((row) => row.path as string));
  }

  /** {@inheritDoc StreamStore.waitForData} */
  async waitForData(path: string, position: number, signal: AbortSignal): Promise<void> {
    const stream = this.#transaction(() => this.#get(path));
    if (
      !stream || stream.softDeleted || stream.info.tail > position || stream.info.closed ||
      signal.aborted
    ) {
      return await this.#settle();
    }
    let waiters = this.#waiters.get(path);
    if (!waiters) this.#waiters.set(path, waiters = new Set());
    const all = waiters;
    await new Promise<void>((resolve) => {
      const done = () => {
        all.delete(done);
        if (all.size === 0 && this.#waiters.get(path) === all) this.#waiters.delete(path);
        signal.removeEventListener("abort", done);
        resolve();
      };
      all.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  /**
   * Drops the streams that have expired, whether read or not, and sends the
   * releases of forks gone to sources in other objects.
   *
   * @returns When to tidy next (ms since the epoch): the next deadline of a
   *   stream, or sooner if a release could not be sent; `undefined` when
   *   nothing waits.
   */
  async tidy(): Promise<number | undefined> {
    this.#transaction(() => {
      if (!this.#ready) return;
      const now = Date.now();
      const expired = this.#exec(
        `SELECT path FROM ds_streams WHERE soft_deleted = 0 AND (expires_at <= ? OR touched + ttl * 1000 <= ?)`,
        now,
        now,
      );
      // #get drops each, as a read would.
      for (const row of expired) this.#get(row.path as string);
    });
    await this.#settle();
    return this.due();
  }

  /**
   * When {@linkcode tidy} should next run: the earliest deadline of a
   * stream, or soon when releases wait to be sent.
   *
   * @returns Milliseconds since the epoch, or `undefined` when nothing waits.
   */
  due(): number | undefined {
    if (!this.#ready) return undefined;
    const [row] = this.#exec(
      `SELECT MIN(MIN(COALESCE(expires_at, 9e15), COALESCE(touched + ttl * 1000, 9e15))) AS at
        FROM ds_streams WHERE soft_deleted = 0`,
    );
    let at = typeof row?.at === "number" && row.at < 9e15 ? row.at : undefined;
    if (this.#unsent) at = Math.min(at ?? Infinity, Date.now() + RETRY_MS);
    return at;
  }

  // -------------------------------------------------------------------------

  #exec(query: string, ...bindings: SqlValue[]): Row[] {
    return this.#storage.sql.exec(query, ...bindings).toArray();
  }

  #transaction<T>(body: () => T): T {
    return this.#storage.transactionSync(body);
  }

  /** Makes the tables, the first time a stream is created. */
  #schema(): void {
    if (this.#ready) return;
    for (const statement of SCHEMA) this.#exec(statement);
    this.#ready = true;
  }

  /** The stream at `path`, after dropping it if it has expired (a soft-deleted one never does). */
  #get(path: string): Stored | undefined {
    if (!this.#ready) return undefined;
    const [row] = this.#exec("SELECT * FROM ds_streams WHERE path = ?", path);
    if (!row) return undefined;
    const stream = storedOf(row);
    if (!stream.softDeleted && expired(stream)) {
      this.#remove(path, stream);
      return undefined;
    }
    return stream;
  }

  /** Only a sliding TTL needs the time of the last use. */
  #touch(path: string, stream: Stored): void {
    if (stream.info.ttlSeconds === undefined) return;
    stream.touched = Date.now();
    this.#exec("UPDATE ds_streams SET touched = ? WHERE path = ?", stream.touched, path);
  }

  #insert(path: string, info: StreamInfo, bytes: number, sourceRemote: boolean): void {
    this.#exec(
      `INSERT INTO ds_streams (path, content_type, framing, ttl, expires_at, closed, tail,
        incarnation, forked_from, fork_anchor, fork_sub, source_remote, bytes, soft_deleted, touched)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)`,
      path,
      info.contentType,
      info.framing,
      info.ttlSeconds ?? null,
      info.expiresAt ?? null,
      info.closed ? 1 : 0,
      info.tail,
      info.incarnation,
      info.forkedFrom ?? null,
      info.forkAnchor ?? null,
      info.forkSubOffset ?? null,
      sourceRemote ? 1 : 0,
      bytes,
      Date.now(),
    );
  }

  /** Stores pieces after a stream's last. */
  #put(path: string, pieces: readonly Piece[]): void {
    for (const piece of pieces) {
      const { data } = piece;
      const parts = data.length > PART_BYTES ? Math.ceil(data.length / PART_BYTES) : 0;
      this.#exec(
        "INSERT INTO ds_pieces (path, stop, batch_end, size, parts, data) VALUES (?, ?, ?, ?, ?, ?)",
        path,
        piece.end,
        piece.batchEnd,
        data.length,
        parts,
        parts > 0 ? EMPTY : data,
      );
      for (let part = 0; part < parts; part++) {
        this.#exec(
          "INSERT INTO ds_parts (path, stop, part, data) VALUES (?, ?, ?, ?)",
          path,
          piece.end,
          part,
          data.subarray(part * PART_BYTES, (part + 1) * PART_BYTES),
        );
      }
    }
  }

  #pieceOf(path: string, row: Row): Piece {
    const data = (row.parts as number) > 0
      ? concat(
        this.#exec(
          "SELECT data FROM ds_parts WHERE path = ? AND stop = ? ORDER BY part",
          path,
          row.stop,
        ).map((part) => new Uint8Array(part.data as ArrayBuffer)),
      )
      : new Uint8Array(row.data as ArrayBuffer);
    return { end: row.stop as number, data, batchEnd: row.batch_end as number };
  }

  #forks(path: string): number {
    return this.#exec("SELECT COUNT(*) AS count FROM ds_forks WHERE source = ?", path)[0]
      .count as number;
  }

  /** Drops a stream's data and producers (not its row). */
  #drop(path: string): void {
    for (const table of ["ds_pieces", "ds_parts", "ds_producers"]) {
      this.#exec(`DELETE FROM ${table} WHERE path = ?`, path);
    }
  }

  /**
   * Removes a stream, and releases its source: here at once (a soft-deleted
   * source whose last fork it was goes too, up the chain), or through the
   * outbox for a source in another object.
   */
  #remove(path: string, stream: Stored): void {
    this.#exec("DELETE FROM ds_streams WHERE path = ?", path);
    this.#drop(path);
    // Its forks keep their copies: their releases will find nothing.
    this.#exec("DELETE FROM ds_forks WHERE source = ?", path);
    this.#wake(path);
    const from = stream.info.forkedFrom;
    if (from === undefined) return;
    if (!stream.sourceRemote) return this.#release(from, path, stream.info.incarnation);
    this.#exec(
      "INSERT OR IGNORE INTO ds_releases VALUES (?, ?, ?)",
      from,
      path,
      stream.info.incarnation,
    );
    this.#unsent = true;
  }

  #wake(path: string): void {
    const waiters = this.#waiters.get(path);
    if (!waiters) return;
    for (const wake of [...waiters]) wake();
  }

  /**
   * Sends the releases waiting in the outbox (but those of copies still
   * under way), after any sending already under way: once it resolves,
   * what the caller removed has released its source, or waits for a retry.
   */
  #settle(): Promise<void> {
    this.#settling = this.#settling.then(() => this.#send());
    return this.#settling;
  }

  async #send(): Promise<void> {
    if (!this.#unsent || this.#sources === undefined) return;
    this.#unsent = false;
    for (const row of this.#exec("SELECT * FROM ds_releases")) {
      const [source, fork, incarnation] = [row.source, row.fork, row.incarnation] as string[];
      if (this.#held.has(incarnation)) continue;
      try {
        await this.#sources.release(source, fork, incarnation);
        this.#exec(
          "DELETE FROM ds_releases WHERE source = ? AND fork = ? AND incarnation = ?",
          source,
          fork,
          incarnation,
        );
        // A copy cut short by a restart left pieces at a path with no stream.
        if (!this.#copying.has(fork) && this.#transaction(() => this.#get(fork)) === undefined) {
          this.#drop(fork);
        }
      } catch {
        this.#unsent = true; // sent again by the next call, or by tidy
      }
    }
  }

  #streamFull(): Full {
    return {
      status: "stream-full",
      reason: `a stream holds at most ${this.#maxStreamBytes} bytes`,
    };
  }
}

const EMPTY = new Uint8Array(0);
const HELD: Refusal = {
  status: "conflict",
  reason: "a deleted stream that forks still use holds this path",
};
const SOURCE_MISSING: Refusal = {
  status: "source-missing",
  reason: "the source stream does not exist",
};
const SOURCE_GONE: Refusal = { status: "source-gone", reason: "the source stream was deleted" };

/**
 * What a fork's configuration is, as `MemoryStreamStore` decides it: the
 * source's content type (and framing) unless the request gives one, the
 * source's expiry unless the request gives one.
 */
function inherit(
  request: Omit<CreateRequest, "records">,
  source: StreamInfo | undefined,
): Pick<StreamInfo, "contentType" | "framing" | "ttlSeconds" | "expiresAt"> {
  const own = request.contentTypeGiven || !source;
  let { ttlSeconds, expiresAt } = request;
  if (source && ttlSeconds === undefined && expiresAt === undefined) {
    ttlSeconds = source.ttlSeconds;
    expiresAt = source.expiresAt;
  }
  return {
    contentType: own ? request.contentType : source.contentType,
    framing: own ? request.framing : source.framing,
    ttlSeconds,
    expiresAt,
  };
}

/** A create at the path of an existing stream: the same again, or a conflict. */
function compare(
  info: StreamInfo,
  request: CreateRequest,
  source: StreamInfo | undefined,
): CreateResult {
  const { contentType, ttlSeconds, expiresAt } = inherit(request, source);
  const same = mediaType(info.contentType) === mediaType(contentType) &&
    info.ttlSeconds === ttlSeconds && info.expiresAt === expiresAt &&
    info.closed === request.closed && info.forkedFrom === request.fork?.from &&
    (request.fork === undefined ||
      ((request.fork.anchor === undefined || info.forkAnchor === request.fork.anchor) &&
        info.forkSubOffset === request.fork.subOffset));
  return same
    ? { status: "exists", info }
    : { status: "conflict", reason: "a stream with another configuration exists at this path" };
}

function expired(stream: Stored): boolean {
  const { ttlSeconds, expiresAt } = stream.info;
  const now = Date.now();
  if (expiresAt !== undefined && now >= expiresAt) return true;
  return ttlSeconds !== undefined && now >= stream.touched + ttlSeconds * 1000;
}

function storedOf(row: Row): Stored {
  const optional = (value: SqlValue) => value === null ? undefined : value as number;
  const info: StreamInfo = {
    contentType: row.content_type as string,
    framing: row.framing as Framing,
    ttlSeconds: optional(row.ttl),
    expiresAt: optional(row.expires_at),
    closed: row.closed === 1,
    tail: row.tail as number,
    incarnation: row.incarnation as string,
    forkedFrom: (row.forked_from ?? undefined) as string | undefined,
    forkAnchor: optional(row.fork_anchor),
    forkSubOffset: optional(row.fork_sub),
  };
  return {
    info,
    bytes: row.bytes as number,
    lastSeq: (row.last_seq ?? undefined) as string | undefined,
    closedBy: row.closer_id === null ? undefined : {
      id: row.closer_id as string,
      epoch: row.closer_epoch as number,
      seq: row.closer_seq as number,
    },
    softDeleted: row.soft_deleted === 1,
    touched: row.touched as number,
    sourceRemote: row.source_remote === 1,
  };
}

/** A count option: a non-negative safe integer. */
function count(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}
