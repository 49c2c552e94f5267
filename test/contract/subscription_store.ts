// What every SubscriptionStore promises (subscriptions.ts's interface), as
// plain cases: node:test runs them against MemorySubscriptionStore
// (test/subscriptions_test.ts) and Redis's (test/redis_test.ts).
import assert from "node:assert/strict";
import type { SubscriptionStore } from "../../subscriptions.ts";

/** A fresh, empty store holding at most `maxSubscriptions`, and how to let it go. */
export type MakeSubscriptionStore = (
  maxSubscriptions: number,
) => Promise<{ store: SubscriptionStore; close(): void | Promise<void> }>;

export interface SubscriptionStoreCase {
  name: string;
  run(make: MakeSubscriptionStore): Promise<void>;
}

async function using(
  make: MakeSubscriptionStore,
  maxSubscriptions: number,
  body: (store: SubscriptionStore) => Promise<void>,
): Promise<void> {
  const { store, close } = await make(maxSubscriptions);
  try {
    await body(store);
  } finally {
    await close();
  }
}

export const subscriptionStoreContract: SubscriptionStoreCase[] = [
  {
    name: "swap replaces a record only when it is still the one expected",
    run: (make) =>
      using(make, 10, async (store) => {
        assert.equal(await store.get("a"), undefined);
        assert.equal(await store.swap("a", "x", "y", "m", 0), false, "not there: not x");
        assert.equal(await store.swap("a", undefined, "one", "m", 0), true);
        assert.equal(await store.swap("a", undefined, "two", "m", 0), false, "there already");
        assert.equal(await store.get("a"), "one");
        assert.equal(await store.swap("a", "two", "three", "m", 0), false, "not two");
        assert.equal(await store.swap("a", "one", "two", "m", 0), true);
        assert.equal(await store.get("a"), "two");
        assert.equal(await store.swap("a", "one", undefined, "m", 0), false, "a stale delete");
        assert.equal(await store.swap("a", "two", undefined, "m", 0), true);
        assert.equal(await store.get("a"), undefined);
        assert.equal(
          await store.swap("a", undefined, undefined, "m", 0),
          true,
          "absent stays absent",
        );
      }),
  },
  {
    name: "a record more than maxSubscriptions is full; a replacement or a delete is not",
    run: (make) =>
      using(make, 2, async (store) => {
        assert.equal(await store.swap("a", undefined, "1", "m", 0), true);
        assert.equal(await store.swap("b", undefined, "1", "m", 0), true);
        assert.equal(await store.swap("c", undefined, "1", "m", 0), "full");
        assert.equal(await store.get("c"), undefined);
        assert.equal(await store.swap("a", "1", "2", "m", 0), true, "a replacement takes no room");
        assert.equal(await store.swap("a", "2", undefined, "m", 0), true);
        assert.equal(await store.swap("c", undefined, "1", "m", 0), true, "room again");
      }),
  },
  {
    name: "matches: every record's match; the version moves when one changes, not otherwise",
    run: (make) =>
      using(make, 10, async (store) => {
        const empty = await store.matches();
        assert.deepEqual(empty.entries, []);
        assert.deepEqual(await store.matches(empty.version), { version: empty.version });
        assert.equal(await store.swap("z", undefined, undefined, "", 0), true);
        assert.deepEqual(
          await store.matches(empty.version),
          { version: empty.version },
          "nothing removed",
        );
        await store.swap("a", undefined, "1", "ma", 0);
        await store.swap("b", undefined, "1", "mb", 0);
        const two = await store.matches(empty.version);
        assert.ok(two.version > empty.version, "the version only grows");
        assert.deepEqual(two.entries?.sort(), [["a", "ma"], ["b", "mb"]]);
        await store.swap("a", "1", "2", "ma", 5);
        assert.deepEqual(await store.matches(two.version), { version: two.version }, "same match");
        await store.swap("a", "2", "3", "ma2", 0);
        const changed = await store.matches(two.version);
        assert.ok(changed.version > two.version);
        assert.deepEqual(changed.entries?.sort(), [["a", "ma2"], ["b", "mb"]]);
        await store.swap("b", "1", undefined, "", 0);
        const removed = await store.matches(changed.version);
        assert.ok(removed.version > changed.version);
        assert.deepEqual(removed.entries, [["a", "ma2"]]);
      }),
  },
  {
    name: "due: the ids whose time has come, at most the limit; 0 is never",
    run: (make) =>
      using(make, 10, async (store) => {
        await store.swap("a", undefined, "1", "m", 100);
        await store.swap("b", undefined, "1", "m", 200);
        await store.swap("c", undefined, "1", "m", 0);
        await store.swap("d", undefined, "1", "m", 300);
        assert.deepEqual(await store.due(50, 10), []);
        assert.deepEqual(await store.due(100, 10), ["a"]);
        assert.deepEqual((await store.due(250, 10)).sort(), ["a", "b"]);
        assert.equal((await store.due(1000, 2)).length, 2);
        await store.swap("a", "1", "2", "m", 0);
        await store.swap("d", "1", undefined, "", 0);
        assert.deepEqual((await store.due(1000, 10)).sort(), ["b"], "cleared and removed");
      }),
  },
  {
    name: "signingKey: the first candidate stays",
    run: (make) =>
      using(make, 10, async (store) => {
        assert.equal(await store.signingKey("first"), "first");
        assert.equal(await store.signingKey("second"), "first");
      }),
  },
];
