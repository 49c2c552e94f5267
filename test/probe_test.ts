// probe.ts in process: the path check's stream, exactly as a page reads it.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { EVENT_STREAM_HEADERS } from "../mod.ts";
import { PROBE_COUNT, PROBE_INTERVAL_MS, probeResponse } from "../probe.ts";
import { EventReader } from "./helpers.ts";

describe("the path check's stream", () => {
  test("probes every PROBE_INTERVAL_MS with the server's clock, then silence, then done", async () => {
    let ended = 0;
    const started = Date.now();
    const response = probeResponse(300, new AbortController().signal, () => ended++);
    // Due when done would be one probe interval late: timers fire in order.
    let late = false;
    const lateTimer = setTimeout(() => late = true, PROBE_COUNT * PROBE_INTERVAL_MS + 300);
    for (const [name, value] of Object.entries(EVENT_STREAM_HEADERS)) {
      assert.equal(response.headers.get(name), value);
    }
    const reader = new EventReader(response.body!);
    const arrivals: number[] = [];
    for (let seq = 0; seq < PROBE_COUNT; seq++) {
      const event = await reader.event();
      arrivals.push(Date.now());
      assert.equal(event.event, "probe");
      const data = JSON.parse(event.data);
      assert.deepEqual(Object.keys(data), ["seq", "sentMs"]);
      assert.equal(data.seq, seq);
      assert.ok(data.sentMs >= started && data.sentMs <= Date.now());
    }
    assert.deepEqual([PROBE_COUNT, PROBE_INTERVAL_MS], [8, 250]);
    // 250 ms apart, give or take a timer's lateness.
    for (let i = 1; i < arrivals.length; i++) {
      assert.ok(
        arrivals[i] - arrivals[i - 1] > 150,
        `probe ${i} came ${arrivals[i] - arrivals[i - 1]} ms after`,
      );
    }
    const last = Date.now();
    const done = await reader.event();
    assert.deepEqual([done.event, JSON.parse(done.data)], ["done", { idleMs: 300 }]);
    assert.equal(late, false, "done comes idleMs after the last probe, not later");
    clearTimeout(lateTimer);
    assert.ok(Date.now() - last >= 250, "silent for idleMs after the last probe");
    assert.equal(await reader.next(), null, "then the stream ends");
    assert.equal(ended, 1);
  });

  test("an abort alone ends it: onEnd once, and no probe after", async () => {
    let ended = 0;
    const aborted = new AbortController();
    const response = probeResponse(60_000, aborted.signal, () => ended++);
    const reader = new EventReader(response.body!);
    assert.equal((await reader.event()).event, "probe");
    aborted.abort();
    assert.equal(ended, 1);
    // Two intervals of silence: the probe timers are gone.
    const next = reader.event().then(() => "a probe");
    const silence = new Promise((resolve) =>
      setTimeout(() => resolve("silence"), 2 * PROBE_INTERVAL_MS)
    );
    assert.equal(await Promise.race([next, silence]), "silence");
    await reader.cancel();
    assert.equal(ended, 1);
  });

  test("a client that leaves ends it at once, once, and stops its timers", async () => {
    let ended = 0;
    // The stream cancelled, with no abort (an abort, then a cancel: the test above).
    const response = probeResponse(60_000, new AbortController().signal, () => ended++);
    await response.body!.cancel();
    assert.equal(ended, 1);
  });
});
