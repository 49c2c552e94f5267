// How streams.ts holds and reads a stream's data, checked against models
// written here: the pieces an append is cut into, the pages a read returns
// (every position and size, bytes and JSON messages), UTF-8 checked at every
// boundary as TextDecoder checks it, and characters cut between appends
// carried whole into SSE events.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import {
  createStreamsHandler,
  type Framing,
  MemoryStreamStore,
  type Piece,
  PIECE_BYTES,
  PIECE_COST,
  PRODUCER_COST,
  readPieces,
  toPieces,
} from "../streams.ts";
import { concat } from "../mod.ts";
import { seededRandom } from "./helpers.ts";

const encoder = new TextEncoder();
const LF = 0x0a;

/** `count` messages of JSON (each ending with a line feed) of random sizes. */
function messages(random: () => number, count: number, longest: number): Uint8Array {
  const lines: string[] = [];
  for (let i = 0; i < count; i++) lines.push(`"${"m".repeat(Math.floor(random() * longest))}"\n`);
  return encoder.encode(lines.join(""));
}

/** The positions in `data`: a byte each, or a message (up to its line feed) each. */
function units(data: Uint8Array, framing: Framing): number[] {
  if (framing === "bytes") return Array.from({ length: data.length }, (_, i) => i + 1);
  const ends: number[] = [];
  for (let i = 0; i < data.length; i++) if (data[i] === LF) ends.push(i + 1);
  return ends;
}

describe("toPieces: an append cut into pieces", () => {
  test("bytes: PIECE_BYTES each, the rest last; ends count from the tail; empty records add nothing", () => {
    const big = new Uint8Array(2 * PIECE_BYTES + 5).map((_, i) => i % 251);
    const small = encoder.encode("tail");
    const pieces = toPieces([big, new Uint8Array(0), small], "bytes", 100);
    assert.deepEqual(pieces.map((piece) => piece.data.length), [PIECE_BYTES, PIECE_BYTES, 5, 4]);
    const end = 100 + big.length + small.length;
    assert.deepEqual(pieces.map((piece) => piece.end), [
      100 + PIECE_BYTES,
      100 + 2 * PIECE_BYTES,
      100 + big.length,
      end,
    ]);
    assert.ok(pieces.every((piece) => piece.batchEnd === end), "each knows where its append ends");
    assert.deepEqual(concat(pieces.map((piece) => piece.data)), concat([big, small]));
    assert.deepEqual(toPieces([new Uint8Array(0)], "bytes", 7), []);
  });

  test("messages: cut at the last line feed within PIECE_BYTES; a longer message whole; positions count messages", () => {
    const random = seededRandom(7);
    const data = messages(random, 3000, 100);
    const pieces = toPieces([data], "messages", 10);
    assert.deepEqual(concat(pieces.map((piece) => piece.data)), data);
    let end = 10;
    for (const piece of pieces) {
      assert.ok(piece.data.length <= PIECE_BYTES, `${piece.data.length} bytes`);
      assert.equal(piece.data.at(-1), LF, "whole messages");
      end += units(piece.data, "messages").length;
      assert.equal(piece.end, end);
    }
    assert.ok(pieces.length > 1);
    // Each piece as long as the messages allow: the next message would not fit.
    for (let i = 0; i + 1 < pieces.length; i++) {
      const nextMessage = pieces[i + 1].data.indexOf(LF) + 1;
      assert.ok(pieces[i].data.length + nextMessage > PIECE_BYTES, `piece ${i} ends early`);
    }
    // One message longer than a piece: one piece, up to its line feed.
    const long = encoder.encode(`"${"x".repeat(PIECE_BYTES + 10)}"\n"y"\n`);
    const cut = toPieces([long], "messages", 0);
    assert.deepEqual(cut.map((piece) => piece.data.length), [PIECE_BYTES + 13, 4]);
    assert.deepEqual(cut.map((piece) => piece.end), [1, 2]);
  });

  test("a piece owns its bytes, or most of its buffer", () => {
    const record = new Uint8Array(PIECE_BYTES + 1000);
    const [most, rest] = toPieces([record], "bytes", 0);
    assert.equal(most.data.buffer, record.buffer, "most of the buffer: a view of it");
    assert.notEqual(rest.data.buffer, record.buffer, "a small part: a copy");
    assert.equal(rest.data.buffer.byteLength, 1000);
    const half = new Uint8Array(2 * PIECE_BYTES);
    assert.ok(toPieces([half], "bytes", 0).every((piece) => piece.data.buffer === half.buffer));
  });
});

describe("readPieces: a page from any position", () => {
  /** Cost as the limits count it: the bytes and PIECE_COST per record. */
  const cost = (records: Uint8Array[]) =>
    records.reduce((sum, record) => sum + record.length + PIECE_COST, 0);

  for (const framing of ["bytes", "messages"] as const) {
    test(`${framing}: every position and size, against the rule the limits count by`, () => {
      const random = seededRandom(framing === "bytes" ? 1 : 2);
      for (let round = 0; round < 40; round++) {
        // A stream of a few appends of random sizes.
        const appends = Array.from(
          { length: 1 + Math.floor(random() * 5) },
          () =>
            framing === "bytes"
              ? new Uint8Array(1 + Math.floor(random() * 300)).map(() => 97 + (random() * 26 | 0))
              : messages(random, 1 + Math.floor(random() * 8), 40),
        );
        const start = Math.floor(random() * 50);
        const pieces: Piece[] = [];
        for (const data of appends) {
          pieces.push(...toPieces([data], framing, pieces.at(-1)?.end ?? start));
        }
        const all = concat(appends);
        const ends = units(all, framing); // byte offsets where each position ends
        const tail = start + ends.length;
        for (let position = start; position <= tail; position += 1 + (random() * 3 | 0)) {
          const maxBytes = 1 + Math.floor(random() * 3 * PIECE_COST + random() * 400);
          const { records, next } = readPieces(pieces, framing, start, position, maxBytes);
          const label = `round ${round}, position ${position}, maxBytes ${maxBytes}`;
          const offset = position === start ? 0 : ends[position - start - 1];
          const read = concat(records);
          // What follows the position, exactly, up to `next`.
          assert.equal(next, position + units(read, framing).length, label);
          assert.deepEqual(read, all.subarray(offset, offset + read.length), label);
          if (position === tail) {
            assert.deepEqual(records, [], label);
            continue;
          }
          assert.ok(records.length > 0 && records.every((record) => record.length > 0), label);
          if (framing === "messages") {
            assert.ok(records.every((record) => record.at(-1) === LF), `${label}: whole messages`);
          }
          // The first record: the rest of the piece that holds the position, whole.
          const holder = pieces.findIndex((piece) => piece.end > position);
          const holderStart = holder === 0 ? start : pieces[holder - 1].end;
          const skip = framing === "bytes"
            ? position - holderStart
            : units(pieces[holder].data, framing)[position - holderStart - 1] ?? 0;
          assert.deepEqual(records[0], pieces[holder].data.subarray(skip), `${label}: first`);
          // The others: from the start of a piece each, within maxBytes.
          for (let i = 1; i < records.length; i++) {
            assert.deepEqual(
              records[i],
              pieces[holder + i].data.subarray(0, records[i].length),
              `${label}: record ${i}`,
            );
          }
          if (records.length > 1) assert.ok(cost(records) <= maxBytes, `${label}: over`);
          // As much as fits: one more position would cost more than maxBytes.
          if (next < tail) {
            const last = records.at(-1)!;
            const lastPiece = pieces[holder + records.length - 1];
            const whole = last === records[0]
              ? last.length === lastPiece.data.length - skip
              : last.length === lastPiece.data.length;
            const following = whole ? pieces[holder + records.length].data : lastPiece.data;
            const from = whole ? 0 : last.length;
            const unit = framing === "bytes" ? 1 : following.indexOf(LF, from) + 1 - from;
            const more = cost(records) + unit + (whole ? PIECE_COST : 0);
            assert.ok(more > maxBytes, `${label}: stopped early (${more} would fit)`);
          }
        }
      }
    });
  }
});

describe("UTF-8 and JSON at every boundary", () => {
  /** A lead byte, a second byte at each edge of the ranges, and continuation bytes. */
  function sequences(): Uint8Array[] {
    const edges = [0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xff];
    const out: Uint8Array[] = [];
    for (let lead = 0x7e; lead <= 0xff; lead++) {
      for (const second of edges) {
        for (const length of [1, 2, 3, 4]) {
          const bytes = [lead, second, 0x80, 0xbf].slice(0, length);
          out.push(new Uint8Array(bytes));
        }
      }
    }
    return out;
  }

  test("a JSON append is accepted exactly when TextDecoder and JSON.parse accept it", async () => {
    const handle = createStreamsHandler({ prefix: "/" });
    const json = { "content-type": "application/json" };
    await handle(new Request("http://s.test/j", { method: "PUT", headers: json }));
    const fatal = new TextDecoder("utf-8", { fatal: true });
    const bodies: Uint8Array<ArrayBuffer>[] = [];
    for (const sequence of sequences()) {
      bodies.push(new Uint8Array(concat([encoder.encode('["'), sequence, encoder.encode('"]')])));
    }
    // Escapes with each character at the edges of the hex digits, and controls.
    for (const c of "/09:@AFG`afg") bodies.push(encoder.encode(`["\\u00${c}1"]`));
    for (const c of [0x1f, 0x20, 0x7f]) bodies.push(new Uint8Array([0x22, c, 0x22]));
    let accepted = 0;
    for (const body of bodies) {
      let expected: boolean;
      try {
        JSON.parse(fatal.decode(body));
        expected = true;
      } catch {
        expected = false;
      }
      const response = await handle(
        new Request("http://s.test/j", { method: "POST", headers: json, body }),
      );
      await response.body?.cancel();
      assert.equal(response.status, expected ? 204 : 400, `${[...body]}`);
      if (expected) accepted++;
    }
    assert.ok(accepted > 100 && accepted < bodies.length - 100, `${accepted} accepted`);
  });

  test("an SSE read of text carries a character cut between appends whole into the next event", async () => {
    // A read of one piece at a time: an event per append.
    const handle = createStreamsHandler({ prefix: "/", maxReadBytes: 1 });
    const text = "aé€😀z";
    const bytes = encoder.encode(text);
    // Every way to cut the text in two appends, and a byte at a time.
    const splits = [
      ...Array.from({ length: bytes.length - 1 }, (_, i) => [i + 1]),
      Array.from({ length: bytes.length - 1 }, (_, i) => i + 1),
    ];
    for (const [n, cuts] of splits.entries()) {
      const url = `http://s.test/t${n}`;
      const plain = { "content-type": "text/plain" };
      await handle(new Request(url, { method: "PUT", headers: plain }));
      let from = 0;
      for (const to of [...cuts, bytes.length]) {
        const body = bytes.slice(from, to);
        await handle(new Request(url, { method: "POST", headers: plain, body }));
        from = to;
      }
      await handle(new Request(url, { method: "POST", headers: { "stream-closed": "true" } }));
      const response = await handle(new Request(`${url}?offset=-1&live=sse`));
      const wire = await response.text();
      const data = [...wire.matchAll(/event: data\n((?:data:.*\n)+)\n/g)]
        .map((match) => match[1].replace(/^data:/gm, "").replace(/\n$/, "")).join("");
      assert.equal(data, text, `cut at ${cuts}: ${JSON.stringify(wire)}`);
      assert.equal(wire.match(/event: data/g)?.length, cuts.length + 1, "an event per append");
    }
  });
});

describe("MemoryStreamStore: what the store holds in all (maxBytes)", () => {
  const plain = {
    contentType: "text/plain",
    framing: "bytes" as const,
    closed: false,
    contentTypeGiven: true,
    records: [],
  };
  const bytes = (count: number) => [new Uint8Array(count).fill(120)];
  const producer = (id: string, seq = 0) => ({ id, epoch: 0, seq });
  const append = (
    store: MemoryStreamStore,
    path: string,
    count: number,
    claim?: { id: string; epoch: number; seq: number },
  ) =>
    store.append(path, {
      contentType: "text/plain",
      records: bytes(count),
      producer: claim,
      close: false,
    });

  test("data and producers count to the byte, and a delete gives all of it back", async () => {
    const first = 10 + PIECE_COST + PRODUCER_COST + "p1".length;
    const store = new MemoryStreamStore({ maxBytes: first });
    await store.create("/a", plain);
    assert.equal((await append(store, "/a", 10, producer("p1"))).status, "ok");
    // Full to the byte: one more byte (and its piece) does not fit.
    const full = await append(store, "/a", 1, producer("p1", 1));
    assert.deepEqual(full, {
      status: "store-full",
      reason: `the store holds at most ${first} bytes`,
    });
    assert.equal(await store.delete("/a"), "deleted");
    // All of it back: the same again fits exactly.
    await store.create("/b", plain);
    assert.equal((await append(store, "/b", 10, producer("p1"))).status, "ok");
  });

  test("a producer forgotten past maxProducers gives its bytes back; a known one costs nothing more", async () => {
    const p1 = PRODUCER_COST + "p1".length;
    const p2 = PRODUCER_COST + "p22".length;
    const data = 10 + PIECE_COST;
    // At p22's append: the data twice and both producers, and room for one
    // more append once p1's bytes are back.
    const slack = data - p1;
    const store = new MemoryStreamStore({
      maxBytes: 2 * data + p1 + p2 + slack,
      maxProducers: 1,
    });
    await store.create("/a", plain);
    assert.equal((await append(store, "/a", 10, producer("p1"))).status, "ok");
    assert.equal((await append(store, "/a", 10, producer("p22"))).status, "ok");
    // p1 is forgotten: its bytes are free again, exactly; p22 costs nothing more.
    assert.equal((await append(store, "/a", 10, producer("p22", 1))).status, "ok");
    assert.equal((await append(store, "/a", 1)).status, "store-full");
  });

  test("an expired stream is swept when the store is full, and its bytes are free", async () => {
    const data = 10 + PIECE_COST;
    const store = new MemoryStreamStore({ maxBytes: data });
    await store.create("/old", { ...plain, expiresAt: Date.now() + 30 });
    assert.equal((await append(store, "/old", 10)).status, "ok");
    await store.create("/new", plain);
    assert.equal((await append(store, "/new", 10)).status, "store-full");
    await new Promise((resolve) => setTimeout(resolve, 40));
    assert.equal((await append(store, "/new", 10)).status, "ok");
    assert.equal(await store.info("/old"), "missing");
  });
});
