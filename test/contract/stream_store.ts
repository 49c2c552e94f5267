// What every StreamStore promises (streams.ts's interface), as plain cases:
// node:test runs them against MemoryStreamStore and RedisStreamStore
// (test/stream_store_test.ts), each with the same limits.
import assert from "node:assert/strict";
import {
  type AppendRequest,
  type CreateRequest,
  PIECE_COST,
  type ReadResult,
  type StreamStore,
} from "../../streams.ts";

/** Limits every store takes, with the same meaning in each. */
export interface StoreOptions {
  maxStreamBytes?: number;
  maxProducers?: number;
}

/** A fresh, empty store, and how to let it go. */
export interface StoreSubject {
  store: StreamStore;
  close(): void | Promise<void>;
}

export type MakeStore = (options?: StoreOptions) => Promise<StoreSubject>;

export interface StoreCase {
  name: string;
  run(make: MakeStore): Promise<void>;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const TEXT = "text/plain";
const JSON_TYPE = "application/json";

function creating(extra: Partial<CreateRequest> = {}): CreateRequest {
  const contentType = extra.contentType ?? TEXT;
  return {
    contentType,
    framing: contentType === JSON_TYPE ? "messages" : "bytes",
    closed: false,
    records: [],
    contentTypeGiven: true,
    ...extra,
  };
}

function appending(data: string | undefined, extra: Partial<AppendRequest> = {}): AppendRequest {
  return {
    contentType: TEXT,
    records: data === undefined ? [] : [encoder.encode(data)],
    close: false,
    ...extra,
  };
}

/** Everything a stream holds from `position`, read `maxBytes` at a time, as text. */
async function all(store: StreamStore, path: string, position = 0, maxBytes = 1 << 20) {
  let text = "";
  let reads = 0;
  for (;;) {
    const result = await store.read(path, position, maxBytes, false);
    assert.equal(result.status, "ok", `read ${path} at ${position}`);
    const { records, next } = result as Extract<ReadResult, { status: "ok" }>;
    if (records.length === 0) return { text, reads, next: position };
    text += records.map((record) => decoder.decode(record)).join("");
    assert.ok(next > position, "a read that returns data moves on");
    position = next;
    reads++;
  }
}

async function using(
  make: MakeStore,
  options: StoreOptions,
  body: (store: StreamStore) => Promise<void>,
): Promise<void> {
  const { store, close } = await make(options);
  try {
    await body(store);
  } finally {
    await close();
  }
}

const status = (result: { status: string }) => result.status;

/**
 * A result as plain data, the incarnation replaced by `*` (checked to be
 * there), records by their text, no field set to undefined: whole answers
 * compared.
 */
function plain(result: unknown): unknown {
  if (typeof result !== "object" || result === null) return result;
  // An absent field and one set to undefined are the same answer.
  const copy = Object.fromEntries(
    Object.entries(result).filter(([, value]) => value !== undefined),
  );
  if ("info" in copy) copy.info = plain(copy.info);
  if (typeof copy.incarnation === "string") {
    assert.ok(copy.incarnation.length > 0, "an incarnation");
    copy.incarnation = "*";
  }
  if (Array.isArray(copy.records)) {
    copy.records = copy.records.map((record: Uint8Array) => decoder.decode(record));
  }
  return copy;
}

export const streamStoreContract: StoreCase[] = [
  {
    name: "list: the paths under a prefix, up to a limit, glob characters taken literally",
    run: (make) =>
      using(make, {}, async (store) => {
        for (const path of ["/s/a", "/s/b/c", "/s*/d", "/t/e", "/s[x]/f"]) {
          assert.equal((await store.create(path, creating())).status, "created", path);
        }
        const sorted = async (prefix: string, limit: number) =>
          (await store.list(prefix, limit)).sort();
        assert.deepEqual(await sorted("/s/", 10), ["/s/a", "/s/b/c"]);
        assert.deepEqual(await sorted("/s*", 10), ["/s*/d"], "a * in the prefix is a *");
        assert.deepEqual(await sorted("/s[x]", 10), ["/s[x]/f"]);
        assert.deepEqual(await sorted("/", 10), ["/s*/d", "/s/a", "/s/b/c", "/s[x]/f", "/t/e"]);
        assert.equal((await store.list("/", 2)).length, 2, "at most the limit");
        assert.deepEqual(await store.list("/u/", 10), []);
      }),
  },
  {
    name: "every answer in full: the stream's info, an append's outcome, each refusal's details",
    run: (make) =>
      using(make, {}, async (store) => {
        const info = { contentType: TEXT, framing: "bytes", closed: false, incarnation: "*" };
        const created = await store.create(
          "/x",
          creating({ records: [encoder.encode("ab")], ttlSeconds: 60 }),
        );
        assert.deepEqual(plain(created), {
          status: "created",
          info: { ...info, ttlSeconds: 60, tail: 2 },
        });
        const first = (created as { info: { incarnation: string } }).info.incarnation;
        assert.deepEqual(plain(await store.info("/x")), { ...info, ttlSeconds: 60, tail: 2 });
        const producer = (seq: number, epoch = 0) => ({ producer: { id: "p", epoch, seq } });
        assert.deepEqual(plain(await store.append("/x", appending("cd", producer(0)))), {
          status: "ok",
          appended: true,
          producerSeq: 0,
          info: { ...info, ttlSeconds: 60, tail: 4 },
        });
        assert.deepEqual(plain(await store.append("/x", appending("cd", producer(0)))), {
          status: "duplicate",
          producerSeq: 0,
          info: { ...info, ttlSeconds: 60, tail: 4 },
        });
        assert.deepEqual(plain(await store.append("/x", appending("e", producer(3)))), {
          status: "seq-gap",
          expected: 1,
          received: 3,
        });
        assert.equal(status(await store.append("/x", appending("e", producer(0, 1)))), "ok");
        assert.deepEqual(plain(await store.append("/x", appending("f", producer(1, 0)))), {
          status: "stale-epoch",
          epoch: 1,
        });
        assert.deepEqual(plain(await store.append("/x", appending("g"))), {
          status: "ok",
          appended: true,
          info: { ...info, ttlSeconds: 60, tail: 6 },
        });
        for (
          const refused of [
            await store.append("/x", appending("h", { contentType: JSON_TYPE })),
            await store.create("/x", creating({ contentType: "text/html" })),
          ]
        ) {
          const { reason } = refused as { reason: string };
          assert.ok(typeof reason === "string" && reason.length > 0, "a refusal says why");
        }
        assert.deepEqual(plain(await store.read("/x", 4, 1, false)), {
          status: "ok",
          records: ["e"],
          next: 5,
          info: { ...info, ttlSeconds: 60, tail: 6 },
        });
        const closing = await store.append("/x", appending(undefined, { close: true }));
        assert.deepEqual(plain(closing), {
          status: "ok",
          appended: false,
          info: { ...info, ttlSeconds: 60, closed: true, tail: 6 },
        });
        assert.deepEqual(plain(await store.append("/x", appending("i"))), {
          status: "closed",
          info: { ...info, ttlSeconds: 60, closed: true, tail: 6 },
        });
        const expiresAt = Date.now() + 60_000;
        const json = await store.create(
          "/j",
          creating({ contentType: JSON_TYPE, expiresAt, closed: true }),
        );
        assert.deepEqual(plain(json), {
          status: "created",
          info: {
            ...info,
            contentType: JSON_TYPE,
            framing: "messages",
            expiresAt,
            closed: true,
            tail: 0,
          },
        });
        const fork = await store.create(
          "/f",
          creating({ fork: { from: "/x", anchor: 4, subOffset: 1 }, ttlSeconds: 30 }),
        );
        assert.deepEqual(plain(fork), {
          status: "created",
          info: {
            ...info,
            ttlSeconds: 30,
            tail: 5,
            forkedFrom: "/x",
            forkAnchor: 4,
            forkSubOffset: 1,
          },
        });
        for (const path of ["/none"]) {
          assert.deepEqual(plain(await store.append(path, appending("x"))), { status: "missing" });
          assert.deepEqual(plain(await store.read(path, 0, 10, false)), { status: "missing" });
          assert.equal(await store.info(path), "missing");
        }
        assert.equal(await store.delete("/f"), "deleted");
        assert.equal(await store.delete("/x"), "deleted");
        const again = await store.create("/x", creating());
        assert.notEqual(
          (again as { info: { incarnation: string } }).info.incarnation,
          first,
          "a stream created again is another incarnation",
        );
      }),
  },
  {
    name: "create: a new stream, the same again (exists), another configuration (conflict)",
    run: (make) =>
      using(make, {}, async (store) => {
        const created = await store.create("/s", creating({ records: [encoder.encode("ab")] }));
        assert.equal(created.status, "created");
        const info = (created as { info: { tail: number; closed: boolean; framing: string } }).info;
        assert.deepEqual([info.tail, info.closed, info.framing], [2, false, "bytes"]);
        assert.equal(status(await store.create("/s", creating())), "exists");
        assert.equal(
          status(await store.create("/s", creating({ contentType: "text/html" }))),
          "conflict",
        );
        assert.equal(status(await store.create("/s", creating({ ttlSeconds: 60 }))), "conflict");
        assert.equal(status(await store.create("/s", creating({ closed: true }))), "conflict");
        assert.equal(
          status(await store.create("/s", creating({ expiresAt: Date.now() + 60_000 }))),
          "conflict",
        );
        assert.equal((await all(store, "/s")).text, "ab");
        // A fork is the same again only from the same source, offset and sub-offset.
        await store.create("/t", creating({ records: [encoder.encode("cd")] }));
        const fork = (from: string, anchor?: number, subOffset = 0) =>
          creating({ fork: { from, anchor, subOffset } });
        assert.equal(status(await store.create("/f", fork("/s", 1))), "created");
        assert.equal(status(await store.create("/f", fork("/s", 1))), "exists");
        for (const other of [fork("/t", 1), fork("/s", 2), fork("/s", 1, 1), creating()]) {
          assert.equal(status(await store.create("/f", other)), "conflict", JSON.stringify(other));
        }
        // Initial data of another type than the source's.
        await store.create(
          "/json",
          creating({ contentType: JSON_TYPE, framing: "messages", records: [] }),
        );
        const mismatched = await store.create(
          "/j",
          creating({
            contentTypeGiven: false, // the source's type, then
            records: [encoder.encode("x")],
            fork: { from: "/json", subOffset: 0 },
          }),
        );
        assert.deepEqual(mismatched, {
          status: "conflict",
          reason: "the initial data is not of the source stream's type",
        });
      }),
  },
  {
    name: "append and read: positions in bytes, reads from any position, `next` after the last",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/b", creating());
        for (const piece of ["hello ", "wide ", "world"]) {
          assert.equal(status(await store.append("/b", appending(piece))), "ok");
        }
        assert.equal((await all(store, "/b")).text, "hello wide world");
        assert.equal((await all(store, "/b", 8)).text, "de world");
        const small = await all(store, "/b", 0, 1);
        assert.equal(small.text, "hello wide world");
        assert.ok(small.reads >= 3, "a small allowance takes several reads");
        const info = await store.info("/b");
        assert.equal(typeof info === "object" && info.tail, 16);
      }),
  },
  {
    name: "JSON streams count messages; an append of many is read back whole and from any message",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/j", creating({ contentType: JSON_TYPE }));
        const messages = Array.from({ length: 30_000 }, (_, n) => `{"n":${n}}\n`).join("");
        const result = await store.append("/j", {
          contentType: JSON_TYPE,
          records: [encoder.encode(messages)],
          close: false,
        });
        assert.equal(result.status, "ok");
        assert.equal((result as { info: { tail: number } }).info.tail, 30_000);
        const { text } = await all(store, "/j", 0, 64 * 1024);
        assert.equal(text, messages);
        assert.equal((await all(store, "/j", 29_998)).text, '{"n":29998}\n{"n":29999}\n');
      }),
  },
  {
    name: "closed streams refuse appends; a close alone is idempotent",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/c", creating());
        assert.equal(status(await store.append("/c", appending("x", { close: true }))), "ok");
        assert.equal(status(await store.append("/c", appending("y"))), "closed");
        const again = await store.append("/c", appending(undefined, { close: true }));
        assert.deepEqual([again.status, (again as { appended?: boolean }).appended], ["ok", false]);
        assert.equal((await all(store, "/c")).text, "x");
      }),
  },
  {
    name: "an append of another content type is refused; Stream-Seq must increase",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/t", creating());
        assert.equal(
          status(await store.append("/t", appending("x", { contentType: JSON_TYPE }))),
          "content-type",
        );
        assert.equal(status(await store.append("/t", appending("a", { seq: "b" }))), "ok");
        assert.equal(
          status(await store.append("/t", appending("a", { seq: "a" }))),
          "seq-regression",
        );
        assert.equal(
          status(await store.append("/t", appending("a", { seq: "b" }))),
          "seq-regression",
        );
        assert.equal(status(await store.append("/t", appending("c", { seq: "ba" }))), "ok");
        assert.equal((await all(store, "/t")).text, "ac");
      }),
  },
  {
    name:
      "producers: each sequence once, gaps and old epochs refused, the least recently used forgotten",
    run: (make) =>
      using(make, { maxProducers: 2 }, async (store) => {
        await store.create("/p", creating());
        const as = (id: string, epoch: number, seq: number, data = "x") =>
          store.append("/p", appending(data, { producer: { id, epoch, seq } })).then(status);
        assert.equal(await as("a", 0, 0), "ok");
        assert.equal(await as("a", 0, 0), "duplicate");
        assert.equal(await as("a", 0, 2), "seq-gap");
        assert.equal(await as("a", 1, 0), "ok");
        assert.equal(await as("a", 0, 1), "stale-epoch");
        assert.equal(await as("a", 2, 1), "bad-producer");
        assert.equal(await as("b", 0, 5), "seq-gap");
        assert.equal(await as("b", 0, 0), "ok");
        assert.equal(await as("c", 0, 0), "ok"); // a, unused longest, is forgotten
        assert.equal(await as("a", 1, 1), "seq-gap");
        assert.equal(await as("b", 0, 1), "ok");
        assert.equal((await all(store, "/p")).text, "xxxxx");
      }),
  },
  {
    name: "maxStreamBytes counts data and PIECE_COST per piece; a full stream keeps what it has",
    run: (make) =>
      using(make, { maxStreamBytes: 2 * (10 + PIECE_COST) }, async (store) => {
        await store.create("/f", creating());
        assert.equal(status(await store.append("/f", appending("0123456789"))), "ok");
        assert.equal(status(await store.append("/f", appending("0123456789"))), "ok");
        assert.equal(status(await store.append("/f", appending("x"))), "stream-full");
        const big = await store.create(
          "/g",
          creating({ records: [encoder.encode("y".repeat(300))] }),
        );
        assert.equal(big.status, "stream-full");
        assert.equal(await store.info("/g"), "missing");
        assert.equal((await all(store, "/f")).text, "01234567890123456789");
      }),
  },
  {
    name: "delete: missing, deleted, and a source with forks soft-deleted (gone, path held)",
    run: (make) =>
      using(make, {}, async (store) => {
        assert.equal(await store.delete("/none"), "missing");
        await store.create("/src", creating({ records: [encoder.encode("abc")] }));
        const fork = await store.create(
          "/fork",
          creating({ fork: { from: "/src", subOffset: 0 } }),
        );
        assert.equal(fork.status, "created");
        assert.equal(await store.delete("/src"), "deleted");
        assert.equal(await store.info("/src"), "gone");
        assert.equal(status(await store.read("/src", 0, 100, false)), "gone");
        assert.equal(status(await store.append("/src", appending("x"))), "gone");
        assert.equal(await store.delete("/src"), "gone");
        assert.equal(status(await store.create("/src", creating())), "conflict");
        assert.equal((await all(store, "/fork")).text, "abc", "the fork reads on");
        assert.equal(await store.delete("/fork"), "deleted");
        assert.equal(await store.info("/src"), "missing", "its last fork gone, the source goes");
        assert.equal(status(await store.create("/src", creating())), "created");
        // Two levels: the last fork of a fork takes both deleted sources with it.
        await store.create("/a", creating({ records: [encoder.encode("a")] }));
        await store.create("/b", creating({ fork: { from: "/a", subOffset: 0 } }));
        await store.create("/c", creating({ fork: { from: "/b", subOffset: 0 } }));
        assert.equal(await store.delete("/a"), "deleted");
        assert.equal(await store.delete("/b"), "deleted");
        assert.deepEqual([await store.info("/a"), await store.info("/b")], ["gone", "gone"]);
        assert.equal(await store.delete("/c"), "deleted");
        assert.deepEqual(
          [await store.info("/a"), await store.info("/b"), await store.info("/c")],
          ["missing", "missing", "missing"],
        );
      }),
  },
  {
    name:
      "forks: inherited data up to the offset and sub-offset, then their own; bad offsets refused",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/s", creating({ records: [encoder.encode("abcd")] }));
        await store.append("/s", appending("efgh"));
        const fork = (path: string, anchor: number | undefined, subOffset = 0, from = "/s") =>
          store.create(
            path,
            creating({ fork: { from, anchor, subOffset }, records: [encoder.encode("+")] }),
          );
        assert.equal(status(await fork("/f1", undefined)), "created");
        assert.equal((await all(store, "/f1")).text, "abcdefgh+");
        assert.equal(status(await fork("/f2", 4, 2)), "created");
        assert.equal((await all(store, "/f2")).text, "abcdef+");
        assert.equal(status(await fork("/f3", 9)), "bad-fork");
        assert.equal(status(await fork("/f4", 4, 5)), "bad-fork");
        assert.equal(status(await fork("/f5", 0, 0, "/missing")), "source-missing");
        assert.equal(status(await fork("/f1", undefined)), "exists");
        await store.append("/s", appending("ijk"));
        assert.equal((await all(store, "/f2")).text, "abcdef+", "later appends stay the source's");
        assert.equal(
          status(
            await store.create(
              "/f6",
              creating({ contentType: "text/html", fork: { from: "/s", subOffset: 0 } }),
            ),
          ),
          "conflict",
        );
      }),
  },
  {
    name: "a stream past its expiry is missing; a sliding TTL is renewed by use",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/e", creating({ expiresAt: Date.now() + 300 }));
        await store.create("/ttl", creating({ ttlSeconds: 1 }));
        await new Promise((resolve) => setTimeout(resolve, 600));
        await store.read("/ttl", 0, 10, true); // touched: a second more
        await new Promise((resolve) => setTimeout(resolve, 600));
        assert.equal(await store.info("/e"), "missing");
        assert.equal(typeof (await store.info("/ttl")), "object");
        assert.equal(status(await store.create("/e", creating())), "created");
      }),
  },
  {
    name:
      "waitForData wakes on an append, a close and a delete, and on abort, not before; at once if data is there, the signal aborted or the stream missing",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/w", creating({ records: [encoder.encode("a")] }));
        const controller = new AbortController();
        await store.waitForData("/w", 0, controller.signal); // data past 0: at once
        const appended = store.waitForData("/w", 1, controller.signal);
        await store.append("/w", appending("b"));
        await appended;
        const closed = store.waitForData("/w", 2, controller.signal);
        await store.append("/w", appending(undefined, { close: true }));
        await closed;
        await store.create("/w2", creating());
        const deleted = store.waitForData("/w2", 0, controller.signal);
        await store.delete("/w2");
        await deleted;
        await store.create("/w3", creating());
        // Not woken while there is nothing new: the look at the stream is done
        // (an info after it has answered), and it still waits.
        let woke = false;
        const waiting = store.waitForData("/w3", 0, controller.signal).then(() => woke = true);
        await store.info("/w3");
        await store.create("/other", creating());
        await store.append("/other", appending("elsewhere"));
        await new Promise((resolve) => setTimeout(resolve, 50));
        assert.equal(woke, false, "a stream with nothing new keeps its reader waiting");
        controller.abort();
        await waiting;
        // At once: a signal already aborted, a stream that is not there.
        await store.waitForData("/w3", 0, controller.signal);
        await store.waitForData("/nothing", 0, new AbortController().signal);
      }),
  },
  {
    name:
      "several readers wait on one stream: one giving up leaves the others waiting, an append wakes them all",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/many", creating());
        const quitting = new AbortController();
        const woken: string[] = [];
        const wait = (name: string, signal: AbortSignal) =>
          store.waitForData("/many", 0, signal).then(() => woken.push(name));
        const first = wait("first", new AbortController().signal);
        const gone = wait("quitting", quitting.signal);
        const last = wait("last", new AbortController().signal);
        await store.info("/many"); // every look at the stream has answered: all three wait
        quitting.abort();
        await gone;
        await new Promise((resolve) => setTimeout(resolve, 20));
        assert.deepEqual(woken, ["quitting"]);
        await store.append("/many", appending("x"));
        await Promise.race([
          Promise.all([first, last]),
          new Promise((resolve) => setTimeout(resolve, 3000)),
        ]);
        assert.deepEqual(woken.sort(), ["first", "last", "quitting"]);
      }),
  },
  {
    name:
      "a closed stream: its closer's retry and an earlier one of its producer are duplicates, the rest is closed",
    run: (make) =>
      using(make, {}, async (store) => {
        await store.create("/c", creating());
        const by = (id: string, epoch: number, seq: number) => ({ producer: { id, epoch, seq } });
        assert.equal(status(await store.append("/c", appending("a", by("w", 0, 0)))), "ok");
        const closing = appending("b", { ...by("w", 0, 1), close: true });
        assert.equal(status(await store.append("/c", closing)), "ok");
        const outcome = async (request: AppendRequest) => {
          const result = await store.append("/c", request) as {
            status: string;
            producerSeq?: number;
          };
          return [status(result), result.producerSeq];
        };
        assert.deepEqual(await outcome(closing), ["duplicate", 1], "the close again");
        assert.deepEqual(await outcome(appending("a", by("w", 0, 0))), ["duplicate", 1]);
        for (
          const request of [
            appending("c", by("w", 0, 2)),
            appending("c", by("w", 1, 0)),
            appending("c", by("v", 0, 0)),
            appending(undefined, { ...by("v", 0, 0), close: true }),
            appending("c"),
          ]
        ) {
          assert.deepEqual(await outcome(request), ["closed", undefined], JSON.stringify(request));
        }
        // A close alone, without a producer: done already, so fine.
        const again = await store.append("/c", appending(undefined, { close: true }));
        assert.deepEqual([status(again), (again as { appended?: boolean }).appended], [
          "ok",
          false,
        ]);
        assert.equal((await all(store, "/c")).text, "ab");
      }),
  },
];
