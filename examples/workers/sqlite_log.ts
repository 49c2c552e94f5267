// An event log on a Durable Object's own SQLite storage: the history and
// the idempotency keys outlive the object's eviction and restarts. One
// object is one broker, and only that object writes its tables, so the
// order is the order of the appends and listeners are called in-process.
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
} from "../../mod.ts";

/** A value SQLite keeps: text, a number, null, or bytes (read back as an `ArrayBuffer`). */
export type SqlValue = string | number | null | ArrayBuffer | Uint8Array;

/** The part of `ctx.storage` the log (and `SqliteStreamStore`) uses: a SQLite-backed namespace. */
export interface SqlStorageLike {
  sql: {
    exec(query: string, ...bindings: SqlValue[]): {
      toArray(): Record<string, SqlValue>[];
    };
  };
  transactionSync<T>(body: () => T): T;
}

/** Options for a {@linkcode SqliteLog}: those of `MemoryLog`, with the same meaning. */
export interface SqliteLogOptions {
  /** How many of the newest events to keep for replay. Defaults to 1000. */
  history?: number;
  /** Also cap the kept events by their encoded size in bytes. Defaults to no cap. */
  historyBytes?: number;
  /** Also drop events older than this many milliseconds. Defaults to no limit. */
  historyTtl?: number;
  /** How long an idempotency key holds, in milliseconds. Defaults to 300000. */
  idempotencyWindow?: number;
  /** How many idempotency keys are remembered at most, the oldest forgotten first. Defaults to 10000. */
  idempotencyKeys?: number;
}

type Row = Record<string, SqlValue>;

// Ids are `<ms>-<row>`: the append's time (never going back) and its row number.

/** An {@linkcode EventLog} kept in a Durable Object's SQLite storage. */
export class SqliteLog implements EventLog {
  readonly #storage: SqlStorageLike;
  readonly #history: number;
  readonly #maxBytes: number;
  readonly #maxAge: number;
  readonly #window: number;
  readonly #keys: number;
  readonly #listeners = new Set<(events: readonly LogEvent[]) => void>();

  constructor(storage: SqlStorageLike, options: SqliteLogOptions = {}) {
    this.#storage = storage;
    this.#history = count("history", options.history ?? 1000);
    this.#maxBytes = count("historyBytes", options.historyBytes ?? Infinity);
    this.#maxAge = count("historyTtl", options.historyTtl ?? Infinity);
    this.#window = count("idempotencyWindow", options.idempotencyWindow ?? 300_000);
    this.#keys = count("idempotencyKeys", options.idempotencyKeys ?? 10_000);
    this.#exec(`CREATE TABLE IF NOT EXISTS sse_events (
      row INTEGER PRIMARY KEY, ms INTEGER NOT NULL, topics TEXT NOT NULL,
      text TEXT NOT NULL, private INTEGER NOT NULL)`);
    // Each event's size on the wire, for historyBytes (a column added later: kept tables gain it).
    const columns = this.#exec("SELECT name FROM pragma_table_info('sse_events')");
    if (!columns.some((column) => column.name === "size")) {
      this.#exec("ALTER TABLE sse_events ADD COLUMN size INTEGER NOT NULL DEFAULT 0");
    }
    // "last": the newest id ever appended; "dropped": the newest id trimmed.
    this.#exec("CREATE TABLE IF NOT EXISTS sse_ids (name TEXT PRIMARY KEY, id TEXT NOT NULL)");
    this.#exec(`CREATE TABLE IF NOT EXISTS sse_keys (
      key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, ids TEXT NOT NULL, until INTEGER NOT NULL)`);
  }

  get lastId(): string | null {
    return this.#named("last");
  }

  append(events: readonly NewEvent[], options: AppendOptions = {}): Promise<Appended> {
    try {
      return Promise.resolve(this.#append(events, options.idempotencyKey));
    } catch (error) {
      return Promise.reject(error);
    }
  }

  read(afterId: string | null, limit: number): LogRead {
    this.#storage.transactionSync(() => this.#drop(Date.now()));
    let after = 0;
    let gap = false;
    if (afterId !== null && afterId !== this.#named("dropped")) {
      const [ms, row] = parseEventId(afterId) ?? [];
      const found = row !== undefined &&
        this.#exec("SELECT row FROM sse_events WHERE row = ? AND ms = ?", row, ms!)[0];
      if (found) after = found.row as number;
      else gap = true;
    }
    const rows = this.#exec(
      "SELECT * FROM sse_events WHERE row > ? ORDER BY row LIMIT ?",
      after,
      limit,
    );
    return { events: rows.map(eventOf), gap };
  }

  listen(listener: (events: readonly LogEvent[]) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #append(events: readonly NewEvent[], key: string | undefined): Appended {
    const now = Date.now();
    const fingerprint = batchFingerprint(events);
    const appended = this.#storage.transactionSync(() => {
      this.#exec("DELETE FROM sse_keys WHERE until <= ?", now);
      const seen = key === undefined
        ? undefined
        : this.#exec("SELECT fingerprint, ids FROM sse_keys WHERE key = ?", key)[0];
      if (seen) {
        if (seen.fingerprint !== fingerprint) throw new IdempotencyKeyError();
        return { ids: JSON.parse(seen.ids as string) as string[], repeated: true, events: [] };
      }
      // The clock, or the last append's time if the clock went back.
      const [lastMs, lastRow] = parseEventId(this.lastId ?? "0-0")!;
      const ms = Math.max(now, lastMs);
      const added: LogEvent[] = [];
      // Rows count on from the newest id ever given: SQLite would reuse the
      // numbers of rows dropped, and give an id twice.
      let row = lastRow;
      for (const { topics, text, private: isPrivate } of events) {
        row++;
        const size = encoder.encode(`id: ${ms}-${row}\n${text}`).byteLength;
        this.#exec(
          "INSERT INTO sse_events (row, ms, topics, text, private, size) VALUES (?, ?, ?, ?, ?, ?)",
          row,
          ms,
          JSON.stringify(topics),
          text,
          isPrivate ? 1 : 0,
          size,
        );
        added.push(
          eventOf({ row, ms, topics: JSON.stringify(topics), text, private: isPrivate ? 1 : 0 }),
        );
      }
      const ids = added.map((event) => event.id);
      if (ids.length > 0) this.#setNamed("last", ids[ids.length - 1]);
      this.#drop(now);
      if (key !== undefined) {
        this.#exec(
          "INSERT INTO sse_keys (key, fingerprint, ids, until) VALUES (?, ?, ?, ?)",
          key,
          fingerprint,
          JSON.stringify(ids),
          now + this.#window,
        );
        // The newest keys are the ones inserted last.
        this.#exec(
          "DELETE FROM sse_keys WHERE rowid NOT IN (SELECT rowid FROM sse_keys ORDER BY rowid DESC LIMIT ?)",
          this.#keys,
        );
      }
      return { ids, repeated: false, events: added };
    });
    if (appended.events.length > 0) {
      for (const listener of this.#listeners) listener(appended.events);
    }
    return { ids: appended.ids, repeated: appended.repeated };
  }

  /**
   * Drops the events past the limits, as `MemoryLog` does: beyond the newest
   * `history`, beyond `historyBytes` counted from the newest, and older than
   * `historyTtl`; the newest of them is remembered as dropped.
   */
  #drop(now: number): void {
    const past = [
      this.#exec("SELECT row FROM sse_events ORDER BY row DESC LIMIT 1 OFFSET ?", this.#history),
      this.#maxBytes === Infinity ? [] : this.#exec(
        `SELECT row FROM (SELECT row, SUM(size) OVER (ORDER BY row DESC) AS total FROM sse_events)
         WHERE total > ? ORDER BY row DESC LIMIT 1`,
        this.#maxBytes,
      ),
      this.#maxAge === Infinity ? [] : this.#exec(
        "SELECT row FROM sse_events WHERE ms < ? ORDER BY row DESC LIMIT 1",
        now - this.#maxAge,
      ),
    ].flat();
    if (past.length === 0) return;
    const newest = Math.max(...past.map((found) => found.row as number));
    const [dropped] = this.#exec("SELECT row, ms FROM sse_events WHERE row = ?", newest);
    this.#exec("DELETE FROM sse_events WHERE row <= ?", newest);
    this.#setNamed("dropped", `${dropped.ms}-${dropped.row}`);
  }

  #exec(query: string, ...bindings: SqlValue[]): Row[] {
    return this.#storage.sql.exec(query, ...bindings).toArray();
  }

  #named(name: string): string | null {
    return (this.#exec("SELECT id FROM sse_ids WHERE name = ?", name)[0]?.id as string) ?? null;
  }

  #setNamed(name: string, id: string): void {
    this.#exec("INSERT OR REPLACE INTO sse_ids (name, id) VALUES (?, ?)", name, id);
  }
}

const encoder = new TextEncoder();

/** A count option: a non-negative safe integer, or `Infinity` (no limit). */
function count(name: string, value: number): number {
  if (!(value >= 0) || (value !== Infinity && !Number.isSafeInteger(value))) {
    throw new RangeError(`${name} must be a non-negative integer`);
  }
  return value;
}

function eventOf(row: Row): LogEvent {
  const event = {
    id: `${row.ms}-${row.row}`,
    topics: JSON.parse(row.topics as string) as string[],
    text: row.text as string,
  };
  return row.private ? { ...event, private: true } : event;
}
