// The StreamStore contract (test/contract/stream_store.ts) against
// MemoryStreamStore, in process. RedisStreamStore runs it on a real
// redis-server (test/redis_test.ts); test/streams_cluster_test.ts compares
// the two on 3,000 random operations.
import { describe, test } from "./harness.ts";
import { MemoryStreamStore } from "../streams.ts";
import { type MakeStore, streamStoreContract } from "./contract/stream_store.ts";

describe("StreamStore contract: MemoryStreamStore", () => {
  const make: MakeStore = (options = {}) =>
    Promise.resolve({ store: new MemoryStreamStore(options), close: () => {} });
  for (const { name, run } of streamStoreContract) test(name, () => run(make));
});
