/**
 * The path check: an event stream of timed probes, sent with the same
 * headers as the broker's streams, so that a page can see what the path
 * between server and browser does to a stream (a proxy that buffers it,
 * compresses it, or cuts it while it is idle). The live page reads it from
 * its "Check my connection" panel. Only web standards, like `mod.ts`.
 *
 * The stream: `event: probe` with `data: {"seq", "sentMs"}` every
 * {@linkcode PROBE_INTERVAL_MS} ({@linkcode PROBE_COUNT} of them; `sentMs`
 * is the server's clock), then nothing for `idleMs`, then `event: done`
 * with `data: {"idleMs"}`, and the end.
 *
 * @module
 */

import { EVENT_STREAM_HEADERS } from "./mod.ts";

/** Probes sent before the silence. */
export const PROBE_COUNT = 8;
/** Milliseconds between probes. */
export const PROBE_INTERVAL_MS = 250;

const encoder = new TextEncoder();

/**
 * The probe stream, for `GET /probe`.
 *
 * @param idleMs How long to stay silent after the probes: the longest a
 *   broker stream can be silent (twice its heartbeat interval).
 * @param signal Ends the stream early, when the client goes away.
 * @param onEnd Called once when the stream has ended or the client left.
 * @returns The stream's response.
 */
export function probeResponse(idleMs: number, signal: AbortSignal, onEnd = () => {}): Response {
  const timers = new Set<ReturnType<typeof setTimeout>>();
  let ended = false;
  const end = () => {
    for (const timer of timers) clearTimeout(timer);
    if (!ended) onEnd();
    ended = true;
  };
  const after = (ms: number, run: () => void) => {
    const timer = setTimeout(() => {
      // Stryker disable next-line all: clearing a timer that fired does nothing; this frees memory
      timers.delete(timer);
      run();
    }, ms);
    timers.add(timer);
  };
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      const send = (event: string, data: unknown) => {
        controller.enqueue(encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`));
      };
      for (let seq = 0; seq < PROBE_COUNT; seq++) {
        after(seq * PROBE_INTERVAL_MS, () => send("probe", { seq, sentMs: Date.now() }));
      }
      after((PROBE_COUNT - 1) * PROBE_INTERVAL_MS + idleMs, () => {
        send("done", { idleMs });
        controller.close();
        end();
      });
    },
    cancel: end,
  });
  signal.addEventListener("abort", end); // a signal aborts once; the request holds it
  return new Response(body, { headers: EVENT_STREAM_HEADERS });
}
