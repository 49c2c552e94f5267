// The EventLog contract (test/contract/event_log.ts) against MemoryLog and,
// on a real redis-server started once for the file, RedisLog. The Workers
// example's SqliteLog runs the same cases in workerd (test/workers_test.ts).
import { after, before, describe, test, track } from "./harness.ts";
import type { ChildProcess } from "node:child_process";
import { MemoryLog } from "../mod.ts";
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
});
