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

/**
 * Errors that escaped every handler: each would crash a server process on
 * Node and Deno, yet Bun's runner lets them pass. The test running when one
 * escapes fails with it; one that escapes between tests fails the next test,
 * or the run at exit.
 */
const escaped: unknown[] = [];
process.on("uncaughtException", (error) => escaped.push(error));
process.on("unhandledRejection", (reason) => escaped.push(reason));

/** The errors that escaped since the last call, as one error; `undefined` if none. */
function takeEscaped(what: string): Error | undefined {
  if (escaped.length === 0) return undefined;
  return new Error(`an error escaped during or before ${what}`, { cause: escaped.splice(0) });
}

// A test that passed yet left something running, or an error that escaped
// after the last test, is a bug too: say so, fail the run, and stop what is
// left rather than leave it behind.
process.on("exit", () => {
  const error = takeEscaped("the end of the run");
  if (error) console.error("error:", error, error.cause);
  if (running.size > 0) {
    console.error(`error: ${running.size} things that tests started were still running at exit`);
    for (const stop of running) stop();
  }
  if (error || running.size > 0) process.exitCode = 1;
});

/** Resolves after `ms`, without keeping the process alive for it. */
function delay(ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    (timer as { unref?: () => void }).unref?.();
  });
}

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
      const error = takeEscaped(what);
      if (error) throw error;
    } catch (error) {
      // Stop what this test started, each within a second: a stop that hangs
      // must not hang the run.
      for (const stop of running) {
        if (before.has(stop)) continue;
        running.delete(stop);
        await Promise.race([Promise.resolve().then(stop).catch(() => {}), delay(1000)]);
      }
      // An error that escaped is often why the test failed: report it too.
      const cause = takeEscaped(what);
      if (cause) {
        throw new Error(`${(error as Error)?.message ?? error}`, { cause: [error, cause] });
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
