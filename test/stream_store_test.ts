// The StreamStore contract (test/contract/stream_store.ts) against
// MemoryStreamStore and, on a real redis-server started once for the file,
// RedisStreamStore. test/streams_cluster_test.ts also compares the two on
// 3,000 random operations.
import { after, before, describe, test, track } from "./harness.ts";
import type { ChildProcess } from "node:child_process";
import { RedisStreamStore } from "../redis.ts";
import { MemoryStreamStore } from "../streams.ts";
import { type MakeStore, streamStoreContract } from "./contract/stream_store.ts";
import { RedisServer } from "./redis_server.mjs";

describe("StreamStore contract: MemoryStreamStore", () => {
  const make: MakeStore = (options = {}) =>
    Promise.resolve({ store: new MemoryStreamStore(options), close: () => {} });
  for (const { name, run } of streamStoreContract) test(name, () => run(make));
});

describe("StreamStore contract: RedisStreamStore", () => {
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
  // Each store under a prefix of its own: a fresh, empty store.
  const make: MakeStore = async (options = {}) => {
    const store = await RedisStreamStore.connect({
      url: redis.url,
      prefix: `c${made++}:`,
      ...options,
    });
    return { store, close: () => store.close() };
  };
  for (const { name, run } of streamStoreContract) test(name, () => run(make));
});
