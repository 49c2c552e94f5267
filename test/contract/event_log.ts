// What every EventLog promises (mod.ts's interface), as plain cases any
// runner can run: node:test against MemoryLog and RedisLog
// (test/event_log_test.ts), and a Durable Object in workerd against the
// Workers example's SqliteLog (test/workers_test.ts). Only node:assert, so
// it runs wherever the logs do.
import assert from "node:assert/strict";
import type { EventLog, LogEvent, LogRead, NewEvent } from "../../mod.ts";
import { IdempotencyKeyError } from "../../mod.ts";

/** The options every log takes, with the same meaning in each. */
export interface LogOptions {
  history?: number;
  historyBytes?: number;
  historyTtl?: number;
  idempotencyWindow?: number;
  idempotencyKeys?: number;
}

/** A fresh, empty log, and how to let it go. */
export interface Subject {
  log: EventLog;
  close(): void | Promise<void>;
}

export type MakeLog = (options?: LogOptions) => Promise<Subject>;

export interface Case {
  name: string;
  run(make: MakeLog): Promise<void>;
}

const event = (data: string, extra: Partial<NewEvent> = {}): NewEvent => ({
  topics: [],
  text: `data: ${data}\n\n`,
  ...extra,
});
const data = (events: readonly LogEvent[]) => events.map((item) => item.text.slice(6, -2));
const read = async (log: EventLog, afterId: string | null, limit = 100): Promise<LogRead> =>
  await log.read(afterId, limit);
const order = (id: string) => id.split("-").map(Number) as [number, number];
const ascending = (ids: readonly string[]) =>
  ids.every((id, i) => {
    if (i === 0) return true;
    const [a1, a2] = order(ids[i - 1]);
    const [b1, b2] = order(id);
    return b1 > a1 || (b1 === a1 && b2 > a2);
  });
const wait = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Appends `count` events `1`, `2`, ..., one append each, and returns their ids. */
async function fill(log: EventLog, count: number, from = 1): Promise<string[]> {
  const ids: string[] = [];
  for (let n = from; n < from + count; n++) ids.push(...(await log.append([event(`${n}`)])).ids);
  return ids;
}

/** Resolves with what the next call of a new listener gets. */
function heard(log: EventLog): Promise<readonly LogEvent[]> {
  return new Promise((resolve) => {
    const stop = log.listen((events) => {
      stop();
      resolve(events);
    });
  });
}

/** Runs `body` with a log made with `options`, closing it after. */
async function using(
  make: MakeLog,
  options: LogOptions,
  body: (log: EventLog) => Promise<void>,
): Promise<void> {
  const { log, close } = await make(options);
  try {
    await body(log);
  } finally {
    await close();
  }
}

export const eventLogContract: Case[] = [
  {
    name: "is empty at first: no last id, nothing to read, no gap",
    run: (make) =>
      using(make, {}, async (log) => {
        assert.equal(log.lastId, null);
        assert.deepEqual(await read(log, null), { events: [], gap: false });
      }),
  },
  {
    name: "ids are <ms>-<seq>, increasing, the first part the time of the append",
    run: (make) =>
      using(make, {}, async (log) => {
        const before = Date.now();
        const { ids, repeated } = await log.append([event("a"), event("b"), event("c")]);
        assert.equal(repeated, false);
        const later = await fill(log, 3);
        const all = [...ids, ...later];
        assert.ok(all.every((id) => /^\d{1,15}-\d{1,15}$/.test(id)), String(all));
        assert.ok(ascending(all), String(all));
        const [ms] = order(ids[0]);
        assert.ok(ms >= before - 1000 && ms <= Date.now() + 1000, "about the time of the append");
      }),
  },
  {
    name: "reads after an id, in order, at most `limit`, with each event's topics and privacy",
    run: (make) =>
      using(make, {}, async (log) => {
        const { ids } = await log.append([
          event("1", { topics: ["a", "b"] }),
          event("2", { topics: ["a"], private: true }),
          event("3"),
        ]);
        const all = await read(log, null);
        assert.deepEqual(all.events.map((item) => item.id), ids);
        assert.deepEqual(all.events.map((item) => [item.topics, item.private === true]), [
          [["a", "b"], false],
          [["a"], true],
          [[], false],
        ]);
        assert.equal("private" in all.events[0], false, "a public event has no private field");
        assert.deepEqual(data((await read(log, ids[0])).events), ["2", "3"]);
        assert.deepEqual(data((await read(log, ids[0], 1)).events), ["2"]);
        assert.deepEqual(await read(log, ids[2]), { events: [], gap: false }, "up to date");
        assert.deepEqual(data((await read(log, null, 2)).events), ["1", "2"]);
      }),
  },
  {
    name: "an id it cannot place is a gap, and the read starts at the oldest",
    run: (make) =>
      using(make, {}, async (log) => {
        const ids = await fill(log, 3);
        const [ms, seq] = order(ids[2]);
        for (
          const id of [
            `x${ids[0]}`,
            `${ids[0]}x`,
            `${ms}-`,
            "1-1",
            `${ms + 1000}-0`,
            `${ms}-${seq + 7}`,
          ]
        ) {
          const result = await read(log, id);
          assert.equal(result.gap, true, id);
          assert.deepEqual(data(result.events), ["1", "2", "3"], id);
        }
      }),
  },
  {
    name: "listeners get each append's events once, in order, with lastId already theirs",
    run: (make) =>
      using(make, {}, async (log) => {
        const calls: string[][] = [];
        let lastIds: (string | null)[] = [];
        const done = new Promise<void>((resolve) => {
          const stop = log.listen((events) => {
            calls.push(data(events));
            lastIds.push(log.lastId);
            if (calls.flat().length === 4) {
              stop();
              resolve();
            }
          });
        });
        const { ids } = await log.append([event("1"), event("2")]);
        const [third] = (await log.append([event("3")])).ids;
        const [fourth] = (await log.append([event("4")])).ids;
        await done;
        assert.deepEqual(calls.flat(), ["1", "2", "3", "4"]);
        // The listener may be told of several appends at once, never of one in parts.
        for (const call of calls) assert.ok(call.length > 0);
        assert.ok(!calls.some((call) => call.includes("1") !== call.includes("2")));
        assert.equal(lastIds.at(-1), fourth);
        assert.ok([ids[1], third, fourth].includes(lastIds[0]!));
        lastIds = [];
        // After stopping, nothing more: a new listener hears the next append.
        const next = heard(log);
        await log.append([event("5")]);
        assert.deepEqual(data(await next), ["5"]);
        assert.deepEqual(lastIds, []);
      }),
  },
  {
    name: "several listeners at once: each gets each event once",
    run: (make) =>
      using(make, {}, async (log) => {
        const got: string[][] = [[], [], []];
        const both = (count: number) =>
          Promise.all(got.map((list, i) =>
            new Promise<void>((resolve) => {
              const stop = log.listen((events) => {
                list.push(...data(events));
                if (list.length >= count) {
                  stop();
                  resolve();
                }
              });
              if (i === 2) stop(); // one stops before any event: it hears none
            })
          ));
        const heardAll = both(2);
        await log.append([event("a")]);
        await log.append([event("b")]);
        await Promise.race([heardAll, new Promise((resolve) => setTimeout(resolve, 3000))]);
        assert.deepEqual(got, [["a", "b"], ["a", "b"], []]);
      }),
  },
  {
    name: "keeps the newest `history` events; reading after the newest dropped one is no gap",
    run: (make) =>
      using(make, { history: 3 }, async (log) => {
        const ids = await fill(log, 5);
        assert.deepEqual(data((await read(log, null)).events), ["3", "4", "5"]);
        assert.deepEqual(await read(log, ids[1]), { ...(await read(log, null)), gap: false });
        assert.equal((await read(log, ids[0])).gap, true, "an older id: events were dropped");
        assert.deepEqual(data((await read(log, ids[0])).events), ["3", "4", "5"]);
        assert.deepEqual(await read(log, ids[4]), { events: [], gap: false });
      }),
  },
  {
    name: "historyBytes bounds the replay window by the events' size on the wire",
    run: async (make) => {
      // Each event is about 1,030 bytes on the wire (`id: <id>\n` and its text).
      const big = (n: number) => event(`${n}${"x".repeat(1000)}`);
      await using(make, { historyBytes: 2500 }, async (log) => {
        const ids: string[] = [];
        for (let n = 1; n <= 4; n++) ids.push(...(await log.append([big(n)])).ids);
        const kept = (await read(log, null)).events;
        assert.deepEqual(kept.map((item) => item.id), ids.slice(2));
        assert.equal((await read(log, ids[1])).gap, false, "the newest dropped");
        assert.equal((await read(log, ids[0])).gap, true);
      });
      await using(make, { historyBytes: 1 }, async (log) => {
        const { ids } = await log.append([big(1)]);
        assert.deepEqual(await read(log, null), { events: [], gap: false });
        assert.deepEqual(await read(log, ids[0]), { events: [], gap: false });
      });
    },
  },
  {
    name: "history 0 keeps nothing for replay, yet every event gets its id and its listeners",
    run: (make) =>
      using(make, { history: 0 }, async (log) => {
        const next = heard(log);
        const ids = await fill(log, 2);
        assert.deepEqual(data(await next), ["1"]);
        assert.ok(ids.includes(log.lastId!), "the listener has been told: lastId is one of them");
        assert.deepEqual(await read(log, null), { events: [], gap: false });
        assert.deepEqual(await read(log, ids[1]), { events: [], gap: false });
        assert.equal((await read(log, ids[0])).gap, true);
      }),
  },
  {
    name: "historyTtl drops events older than it; 0 keeps none",
    run: async (make) => {
      await using(make, { historyTtl: 300 }, async (log) => {
        const [old] = await fill(log, 1);
        await wait(400);
        const [fresh] = await fill(log, 1, 2);
        assert.deepEqual(data((await read(log, null)).events), ["2"]);
        assert.equal((await read(log, old)).gap, false, "the newest dropped: nothing missed");
        assert.deepEqual(data((await read(log, old)).events), ["2"]);
        assert.deepEqual(await read(log, fresh), { events: [], gap: false });
      });
      await using(make, { historyTtl: 0 }, async (log) => {
        await fill(log, 2);
        await wait(5);
        assert.deepEqual((await read(log, null)).events, []);
      });
    },
  },
  {
    name: "an idempotency key stores once within its window: a repeat answers the first ids",
    run: (make) =>
      using(make, { idempotencyWindow: 300 }, async (log) => {
        const batch = [event("a", { topics: ["t"] }), event("b", { private: true, topics: ["t"] })];
        const first = await log.append(batch, { idempotencyKey: "k" });
        assert.equal(first.repeated, false);
        assert.deepEqual(await log.append(batch, { idempotencyKey: "k" }), {
          ids: first.ids,
          repeated: true,
        });
        assert.equal((await read(log, null)).events.length, 2, "stored once");
        // Other events under the key: refused, nothing stored.
        for (
          const other of [
            [event("a", { topics: ["t"] })],
            [event("a", { topics: ["u"] }), batch[1]],
            [batch[0], event("b", { topics: ["t"] })],
          ]
        ) {
          await assert.rejects(log.append(other, { idempotencyKey: "k" }), IdempotencyKeyError);
        }
        assert.equal((await read(log, null)).events.length, 2);
        await wait(400);
        const again = await log.append(batch, { idempotencyKey: "k" });
        assert.equal(again.repeated, false, "past its window the key is forgotten");
      }),
  },
  {
    name:
      "idempotencyKeys bounds the keys remembered, the oldest forgotten first; a window of 0 keeps none",
    run: async (make) => {
      await using(make, { idempotencyKeys: 2 }, async (log) => {
        const append = (key: string) => log.append([event(key)], { idempotencyKey: key });
        const first = await append("k1");
        await append("k2");
        assert.deepEqual(await append("k1"), { ids: first.ids, repeated: true });
        await append("k3");
        assert.equal((await append("k1")).repeated, false);
        assert.equal((await append("k3")).repeated, true);
        assert.equal((await append("k2")).repeated, false);
      });
      await using(make, { idempotencyWindow: 0 }, async (log) => {
        await log.append([event("x")], { idempotencyKey: "k" });
        assert.equal((await log.append([event("x")], { idempotencyKey: "k" })).repeated, false);
      });
    },
  },
  {
    name: "a batch is stored all together, next to each other, in order",
    run: (make) =>
      using(make, {}, async (log) => {
        const batch = Array.from({ length: 50 }, (_, n) => event(`${n}`));
        const [{ ids }] = await Promise.all([log.append(batch), fill(log, 5, 100)]);
        const all = (await read(log, null)).events;
        const at = all.findIndex((item) => item.id === ids[0]);
        assert.deepEqual(all.slice(at, at + 50).map((item) => item.id), ids);
        assert.deepEqual(data(all.slice(at, at + 50)), batch.map((_, n) => `${n}`));
      }),
  },
];
