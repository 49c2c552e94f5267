// The EventLog contract (test/contract/event_log.ts) against MemoryLog and,
// on a real redis-server started once for the file, RedisLog. The Workers
// example's SqliteLog runs the same cases in workerd (test/workers_test.ts).
import { after, before, describe, test, track } from "./harness.ts";
import type { ChildProcess } from "node:child_process";
import {
  type EventLog,
  IdempotencyKeyError,
  type LogEvent,
  MemoryLog,
  type NewEvent,
} from "../mod.ts";
import assert from "node:assert/strict";
import { seededRandom } from "./helpers.ts";
import { RedisLog } from "../redis.ts";
import { eventLogContract, type MakeLog } from "./contract/event_log.ts";
import { RedisServer } from "./redis_server.mjs";

describe("EventLog contract: MemoryLog", () => {
  const make: MakeLog = (options = {}) =>
    Promise.resolve({ log: new MemoryLog(options), close: () => {} });
  for (const { name, run } of eventLogContract) test(name, () => run(make));
});

describe("EventLog contract: RedisLog", () => {
  let redis: RedisServer;
  let made = 0;
  before(async () => {
    redis = await RedisServer.start({
      appendfsync: "no",
      onChild: (child: ChildProcess) => child.on("exit", track(() => child.kill("SIGKILL"))),
    });
  });
  after(async () => {
    await redis?.stop();
  });
  // Each log on a key of its own: a fresh, empty stream.
  const make: MakeLog = async (options = {}) => {
    const log = await RedisLog.connect({ url: redis.url, key: `contract:${made++}`, ...options });
    return { log, close: () => log.close() };
  };
  for (const { name, run } of eventLogContract) test(name, () => run(make));

  test("answers 2000 random operations as MemoryLog does", { timeout: 60_000 }, async () => {
    const options = { history: 7, historyBytes: 800, idempotencyKeys: 3 };
    const memory = new MemoryLog(options);
    const { log: redisLog, close } = await make(options);
    const logs: EventLog[] = [memory, redisLog];
    try {
      const random = seededRandom(20261202);
      const pick = (n: number) => Math.floor(random() * n);
      // Each log's ids in the order they were given: an id is compared by its place.
      const ids: string[][] = [[], []];
      const placeOf = (log: number, id: string) => {
        const at = ids[log].indexOf(id);
        return at === -1 ? `unknown ${id}` : at;
      };
      const plain = (log: number, events: readonly LogEvent[]) =>
        events.map((event) => [placeOf(log, event.id), event.topics, event.text, event.private]);
      const seen = new Set<string>();
      const batches = new Map<string, NewEvent[]>();
      for (let i = 0; i < 2000; i++) {
        if (pick(2) === 0) {
          let events: NewEvent[] = Array.from({ length: 1 + pick(3) }, () => {
            const topics = ["a", "b", "c"].slice(0, pick(3));
            return {
              topics,
              text: `data: ${"x".repeat(10 + pick(150))}\n\n`,
              ...(topics.length > 0 && pick(4) === 0 ? { private: true } : {}),
            };
          });
          const key = pick(3) === 0 ? `k${pick(5)}` : undefined;
          // A key again, half the time with the events it was first used for: a retry.
          if (key !== undefined && batches.has(key) && pick(2) === 0) events = batches.get(key)!;
          if (key !== undefined && !batches.has(key)) batches.set(key, events);
          const answers = await Promise.all(
            logs.map((log, n) =>
              log.append(events, { idempotencyKey: key }).then(({ ids: given, repeated }) => {
                if (!repeated) ids[n].push(...given);
                return { places: given.map((id) => placeOf(n, id)), repeated };
              }, (error) => error instanceof IdempotencyKeyError ? "conflict" : String(error))
            ),
          );
          assert.deepEqual(answers[1], answers[0], `append ${i}`);
          seen.add(
            typeof answers[0] === "string" ? answers[0] : answers[0].repeated ? "repeated" : "new",
          );
        } else {
          const kind = pick(10);
          const place = pick(ids[0].length + 1);
          const afterOf = (n: number) =>
            kind === 0
              ? null
              : kind === 1
              ? "x-1"
              : kind === 2
              ? "99999999999999-0"
              : ids[n][place] ?? null;
          const limit = 1 + pick(6);
          const answers = await Promise.all(
            logs.map(async (log, n) => {
              const { events, gap } = await log.read(afterOf(n), limit);
              return { gap, events: plain(n, events) };
            }),
          );
          assert.deepEqual(answers[1], answers[0], `read ${i} after ${afterOf(0)}`);
          seen.add(answers[0].gap ? "gap" : answers[0].events.length > 0 ? "events" : "none");
        }
      }
      for (const answer of ["new", "repeated", "conflict", "gap", "events", "none"]) {
        assert.ok(seen.has(answer), `no operation answered ${answer}: ${[...seen]}`);
      }
    } finally {
      await close();
    }
  });
});
