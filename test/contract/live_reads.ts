// Live SSE reads shared per stream (streams.ts's follower), as plain cases
// run against the handler over each store: MemoryStreamStore in
// test/streams_test.ts, RedisStreamStore in test/redis_test.ts. The store is
// wrapped to count its calls: readers at the tail cost one store read per
// append, not one each.
import assert from "node:assert/strict";
import { createStreamsHandler, type StreamStore } from "../../streams.ts";

export type MakeLiveStore = () => Promise<{ store: StreamStore; close(): void | Promise<void> }>;

export interface LiveReadCase {
  name: string;
  run(make: MakeLiveStore): Promise<void>;
}

const BASE = "http://streams.test/v1/stream/";
const decoder = new TextDecoder();

/** `store` with its reads and waits counted, and the waits under way. */
function counted(store: StreamStore) {
  const calls = { read: 0, wait: 0, waiting: 0 };
  /** Holds the answer of the next read or info until it settles. */
  let gate: Promise<void> | undefined;
  const held = async <T>(answer: Promise<T>): Promise<T> => {
    const until = gate;
    gate = undefined;
    const result = await answer;
    await until;
    return result;
  };
  const wrapped: StreamStore = {
    create: (path, request) => store.create(path, request),
    append: (path, request) => store.append(path, request),
    read: (path, position, maxBytes, touch) => {
      calls.read++;
      return held(store.read(path, position, maxBytes, touch));
    },
    info: (path) => held(store.info(path)),
    delete: (path) => store.delete(path),
    list: (prefix, limit) => store.list(prefix, limit),
    waitForData: (path, position, signal) => {
      calls.wait++;
      calls.waiting++;
      return store.waitForData(path, position, signal).finally(() => calls.waiting--);
    },
  };
  return { store: wrapped, calls, hold: (until: Promise<void>) => void (gate = until) };
}

/** An SSE reader: its data events' texts so far, read on demand. */
async function open(
  handle: (request: Request) => Promise<Response>,
  name: string,
  signal: AbortSignal,
  from = "offset=now",
) {
  const response = await handle(new Request(`${BASE}${name}?${from}&live=sse`, { signal }));
  assert.equal(response.status, 200);
  const reader = response.body!.getReader();
  let text = "";
  const data = () => [...text.matchAll(/^event: data\ndata:(.*)$/gm)].map((match) => match[1]);
  const controls = () => [...text.matchAll(/^event: control$/gm)].length;
  return {
    data,
    /** Reads until `done` holds (or the stream ends: then false). */
    async until(done: () => boolean): Promise<boolean> {
      while (!done()) {
        const { value, done: ended } = await reader.read();
        if (ended) return false;
        text += decoder.decode(value, { stream: true });
      }
      return true;
    },
    controls,
    async ended(): Promise<boolean> {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return true;
        text += decoder.decode(value, { stream: true });
      }
    },
  };
}

async function using(
  make: MakeLiveStore,
  body: (subject: {
    handle: (request: Request) => Promise<Response>;
    calls: { read: number; wait: number; waiting: number };
    signal: AbortSignal;
    /** Holds the answer of the store's next read or info until `until` settles. */
    hold(until: Promise<void>): void;
  }) => Promise<void>,
): Promise<void> {
  const { store, close } = await make();
  const { store: wrapped, calls, hold } = counted(store);
  const handle = createStreamsHandler({ prefix: "/v1/stream/", store: wrapped });
  const controller = new AbortController();
  try {
    await body({ handle, calls, signal: controller.signal, hold });
  } finally {
    controller.abort();
    await close();
  }
}

const send = (
  handle: (request: Request) => Promise<Response>,
  method: string,
  name: string,
  body?: string,
) => handle(new Request(BASE + name, { method, headers: { "content-type": "text/plain" }, body }));

/** Waits until `condition` holds, failing after 5 s. */
async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

export const liveReadCases: LiveReadCase[] = [
  {
    name: "a reader whose look at the tail an append overtook reads that append itself",
    run: (make) =>
      using(make, async ({ handle, calls, signal, hold }) => {
        assert.equal((await send(handle, "PUT", "overtaken")).status, 201);
        const first = await open(handle, "overtaken", signal);
        await first.until(() => first.controls() >= 1);
        await until(() => calls.waiting === 1, "the follower waiting");
        let release!: () => void;
        hold(new Promise((resolve) => release = resolve));
        const looked = calls.read;
        const late = open(handle, "overtaken", signal, "offset=-1");
        await until(() => calls.read > looked, "the second reader's look");
        assert.equal((await send(handle, "POST", "overtaken", "x")).status, 204);
        assert.ok(await first.until(() => first.data().length === 1));
        release(); // it found the tail before x: the follower is past it now
        const second = await late;
        assert.ok(await second.until(() => second.data().length === 1));
        assert.deepEqual(second.data(), ["x"]);
        assert.equal((await send(handle, "POST", "overtaken", "y")).status, 204);
        assert.ok(await second.until(() => second.data().length === 2));
        assert.deepEqual(second.data(), ["x", "y"]);
      }),
  },
  {
    name: "the readers of a stream's tail share one wait, which stops when the last one leaves",
    run: (make) =>
      using(make, async ({ handle, calls }) => {
        assert.equal((await send(handle, "PUT", "leave")).status, 201);
        const leaving = [new AbortController(), new AbortController(), new AbortController()];
        const readers: Awaited<ReturnType<typeof open>>[] = [];
        for (const { signal } of leaving) readers.push(await open(handle, "leave", signal));
        for (const reader of readers) await reader.until(() => reader.controls() >= 1);
        await until(() => calls.waiting === 1, "one wait for three readers");
        leaving[0].abort();
        leaving[1].abort();
        assert.equal((await send(handle, "POST", "leave", "x")).status, 204);
        assert.ok(await readers[2].until(() => readers[2].data().length === 1));
        assert.deepEqual(readers[2].data(), ["x"]);
        await until(() => calls.waiting === 1, "one wait for the reader left");
        leaving[2].abort();
        await until(() => calls.waiting === 0, "no wait once every reader left");

        // Long-polls at the tail: one wait too, gone with them.
        const tail = (await send(handle, "HEAD", "leave")).headers.get("stream-next-offset");
        const polling = [new AbortController(), new AbortController()];
        const polls = polling.map(({ signal }) =>
          handle(new Request(`${BASE}leave?offset=${tail}&live=long-poll`, { signal }))
        );
        await until(() => calls.waiting === 1, "one wait for two long-polls");
        for (const controller of polling) controller.abort();
        for (const poll of await Promise.all(polls)) assert.equal(poll.status, 204);
        await until(() => calls.waiting === 0, "no wait once the long-polls left");
        // Long-polls answered by an append: done with the follower, which stops.
        const answered = [0, 1].map(() =>
          handle(new Request(`${BASE}leave?offset=${tail}&live=long-poll`))
        );
        await until(() => calls.waiting === 1, "one wait for two more long-polls");
        assert.equal((await send(handle, "POST", "leave", "z")).status, 204);
        for (const poll of await Promise.all(answered)) assert.equal(await poll.text(), "z");
        await until(() => calls.waiting === 0, "no wait once the long-polls are answered");

        // A new reader starts a new wait, and gets what is appended.
        const again = new AbortController();
        const late = await open(handle, "leave", again.signal);
        await late.until(() => late.controls() >= 1);
        await until(() => calls.waiting === 1, "a wait for the new reader");
        assert.equal((await send(handle, "POST", "leave", "y")).status, 204);
        assert.ok(await late.until(() => late.data().length === 1));
        assert.deepEqual(late.data(), ["y"]);
        again.abort();
        await until(() => calls.waiting === 0, "no wait at the end");
      }),
  },
  {
    name: "readers at the tail share one store read and one wait per append",
    run: (make) =>
      using(make, async ({ handle, calls, signal }) => {
        assert.equal((await send(handle, "PUT", "shared")).status, 201);
        const readers = await Promise.all(
          Array.from({ length: 20 }, () => open(handle, "shared", signal)),
        );
        for (const reader of readers) await reader.until(() => reader.controls() >= 1);
        // Each reader has looked once and found the tail; from here the follower reads.
        await new Promise((resolve) => setTimeout(resolve, 50));
        calls.read = calls.wait = 0;
        for (let i = 0; i < 5; i++) {
          assert.equal((await send(handle, "POST", "shared", `m${i}`)).status, 204);
          for (const reader of readers) {
            assert.ok(await reader.until(() => reader.data().length > i));
          }
        }
        for (const reader of readers) {
          assert.deepEqual(reader.data(), ["m0", "m1", "m2", "m3", "m4"]);
        }
        assert.ok(
          calls.read >= 1 && calls.read <= 5,
          `${calls.read} reads for 5 appends and 20 readers`,
        );
        assert.ok(calls.wait <= 6, `${calls.wait} waits for 5 appends and 20 readers`);
      }),
  },
  {
    name: "long-poll readers at the tail share one read: each answers with the append",
    run: (make) =>
      using(make, async ({ handle, calls, signal }) => {
        const created = await send(handle, "PUT", "polled", "ab");
        const tail = created.headers.get("stream-next-offset");
        const started = calls.read;
        const polls = Array.from({ length: 20 }, () =>
          handle(new Request(`${BASE}polled?offset=${tail}&live=long-poll`, { signal })));
        // Each has looked once and found nothing; then they wait together.
        const deadline = Date.now() + 5000;
        while (calls.read < started + 20 && Date.now() < deadline) {
          await new Promise((resolve) =>
            setTimeout(resolve, 5)
          );
        }
        await new Promise((resolve) => setTimeout(resolve, 20));
        calls.read = calls.wait = 0;
        assert.equal((await send(handle, "POST", "polled", "cd")).status, 204);
        for (const poll of await Promise.all(polls)) {
          assert.equal(poll.status, 200);
          assert.equal(await poll.text(), "cd");
          assert.equal(poll.headers.get("stream-next-offset"), "0000000000000000_0000000000000004");
        }
        assert.ok(calls.read <= 2, `${calls.read} reads for 20 long-polls`);
      }),
  },
  {
    name:
      "a reader that stops reading lets go: the others go on, and it gets every append later, in order",
    run: (make) =>
      using(make, async ({ handle, signal }) => {
        assert.equal((await send(handle, "PUT", "slow")).status, 201);
        const [slow, quick] = [
          await open(handle, "slow", signal),
          await open(handle, "slow", signal),
        ];
        await slow.until(() => slow.controls() >= 1);
        await quick.until(() => quick.controls() >= 1);
        const sent: string[] = [];
        for (let i = 0; i < 200; i++) {
          const line = `${i} ${"x".repeat(1000)}`;
          sent.push(line);
          assert.equal((await send(handle, "POST", "slow", line)).status, 204);
          await quick.until(() => quick.data().length > i);
        }
        assert.deepEqual(quick.data(), sent);
        // What it reads for itself comes as fewer, larger data events: the same bytes.
        const all = sent.join("");
        assert.ok(await slow.until(() => slow.data().join("").length >= all.length));
        assert.equal(slow.data().join(""), all);
        assert.ok(slow.data().length < sent.length, "it let go of the follower");
      }),
  },
  {
    name: "the stream deleted, or created again: readers at the tail end",
    run: (make) =>
      using(make, async ({ handle, signal }) => {
        assert.equal((await send(handle, "PUT", "gone")).status, 201);
        const reader = await open(handle, "gone", signal);
        await reader.until(() => reader.controls() >= 1);
        assert.equal((await send(handle, "DELETE", "gone")).status, 204);
        assert.equal(await reader.ended(), true);
        assert.equal((await send(handle, "PUT", "again")).status, 201);
        const old = await open(handle, "again", signal);
        await old.until(() => old.controls() >= 1);
        assert.equal((await send(handle, "DELETE", "again")).status, 204);
        assert.equal((await send(handle, "PUT", "again", "new")).status, 201);
        assert.equal(await old.ended(), true);
        assert.deepEqual(old.data(), [], "nothing of the new stream reaches a reader of the old");
      }),
  },
];
