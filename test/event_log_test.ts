// The EventLog contract (test/contract/event_log.ts) against MemoryLog, in
// process. RedisLog runs it on a real redis-server (test/redis_test.ts), and
// the Workers example's SqliteLog in workerd (test/workers_test.ts).
import { describe, test } from "./harness.ts";
import { MemoryLog } from "../mod.ts";
import { eventLogContract, type MakeLog } from "./contract/event_log.ts";

describe("EventLog contract: MemoryLog", () => {
  const make: MakeLog = (options = {}) =>
    Promise.resolve({ log: new MemoryLog(options), close: () => {} });
  for (const { name, run } of eventLogContract) test(name, () => run(make));
});
