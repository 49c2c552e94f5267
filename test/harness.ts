// `test`, `describe` and hooks of node:test, bounded in time on every runtime,
// and a registry that stops what a failed test started. `deno test` has no
// per-test timeout and Bun's is 5 s for every test, so a hung test would
// either stall the run for ever or fail with no hint of why: here it fails
// with its name and its limit, and the run goes on.
import * as nodeTest from "node:test";
import process from "node:process";

export { describe } from "node:test";

/**
 * The limit of a test or hook that sets none, in milliseconds. Defaults to
 * 15000; `TEST_TIMEOUT_MS` overrides it (the mutation run uses a short one).
 */
const DEFAULT_TIMEOUT_MS = Number(process.env.TEST_TIMEOUT_MS) || 15_000;

type Body = () => unknown;
interface Options {
  /** Milliseconds before the test fails. Defaults to `DEFAULT_TIMEOUT_MS`. */
  timeout?: number;
}

/** How to stop each thing a test or hook started and has not stopped yet. */
const running = new Set<() => unknown>();

/**
 * Registers how to stop something a test started: a process, a server, a
 * browser. If the test or hook that started it fails or times out, it is
 * stopped then; whatever is still running when the test process exits is
 * stopped too. Returns the function to call once it stopped normally.
 */
export function track(stop: () => unknown): () => void {
  running.add(stop);
  return () => running.delete(stop);
}

// A test that passed yet left something running is a bug too: say so, fail
// the run, and stop it rather than leave it behind.
process.on("exit", () => {
  if (running.size === 0) return;
  console.error(`error: ${running.size} things that tests started were still running at exit`);
  for (const stop of running) stop();
  process.exitCode = 1;
});

/**
 * Errors that escaped every handler: each would crash a server process on
 * Node and Deno, yet Bun's runner lets them pass. The test they happen
 * during (or the next one) fails with them.
 */
const escaped: unknown[] = [];
process.on("uncaughtException", (error) => escaped.push(error));
process.on("unhandledRejection", (reason) => escaped.push(reason));

/** Runs `body` within `ms`; on failure stops what it started and left running. */
function bounded(what: string, ms: number, body: Body): () => Promise<void> {
  return async () => {
    const before = new Set(running);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    });
    try {
      await Promise.race([body(), timedOut]);
      if (escaped.length > 0) {
        throw new Error(`an error escaped during or before ${what}`, {
          cause: escaped.splice(0),
        });
      }
    } catch (error) {
      for (const stop of running) {
        if (before.has(stop)) continue;
        running.delete(stop);
        try {
          await stop();
        } catch {
          // already gone
        }
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
  };
}

/** Splits the `(name, fn)` and `(name, options, fn)` forms. */
function parse(optionsOrBody: Options | Body, maybeBody?: Body): [number, Body] {
  return typeof optionsOrBody === "function"
    ? [DEFAULT_TIMEOUT_MS, optionsOrBody]
    : [optionsOrBody.timeout ?? DEFAULT_TIMEOUT_MS, maybeBody!];
}

/**
 * `node:test`'s `test`, failing after its `timeout` (see `Options`) with its
 * name. The runner's own limit is set a little later, as a backstop.
 */
export function test(name: string, body: Body): void;
export function test(name: string, options: Options, body: Body): void;
export function test(name: string, optionsOrBody: Options | Body, maybeBody?: Body): void {
  const [ms, body] = parse(optionsOrBody, maybeBody);
  nodeTest.test(name, { timeout: ms + 5000 }, bounded(`test "${name}"`, ms, body));
}

/** `node:test`'s `before`, bounded like a test. */
export function before(body: Body, options: Options = {}): void {
  const ms = options.timeout ?? DEFAULT_TIMEOUT_MS;
  nodeTest.before(bounded("a before hook", ms, body), { timeout: ms + 5000 });
}

/** `node:test`'s `after`, bounded like a test. */
export function after(body: Body, options: Options = {}): void {
  const ms = options.timeout ?? DEFAULT_TIMEOUT_MS;
  nodeTest.after(bounded("an after hook", ms, body), { timeout: ms + 5000 });
}
