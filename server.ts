#!/usr/bin/env node
/**
 * The demo server and deployable broker (app.ts) as a process. The same
 * file runs on every runtime:
 *
 *     deno run --allow-net --allow-env server.ts
 *     bun run server.ts
 *     node server.ts
 *
 * Configured by the environment (docs/configuration.md). The first line
 * printed is the URL it listens on. A setting it cannot use stops it with a
 * one-line reason and exit 1. SIGINT and SIGTERM end every stream, then exit
 * 0; with `DRAIN_MS` set, SIGTERM first drains (see `Broker.drain`).
 * `REUSE_PORT=1` lets several processes listen on one port (Deno needs
 * `--unstable-net` for it).
 *
 * @module
 */
import { startApp } from "./app.ts";
import { currentRuntime, log, SettingError } from "./runtime.ts";

const system = currentRuntime();
const app = await startApp(system).catch((error) => {
  if (!(error instanceof SettingError)) throw error;
  log("error", error.message);
  return system.exit(1);
});
const stop = async (signal: "SIGINT" | "SIGTERM") => {
  if (await app.stop(signal)) system.exit(0);
};
system.onSignal("SIGINT", () => stop("SIGINT"));
system.onSignal("SIGTERM", () => stop("SIGTERM"));
// Started by npm or npx (`npx @sse-broker/broker`): a launcher killed does
// not always pass the signal on, and this server would stay behind. It ends
// when its parent does. Only npm's: `bun run` sets npm's variables too, and
// a server it runs under nohup must outlive its shell.
if (system.env("npm_config_user_agent")?.startsWith("npm/")) {
  const parent = system.parentPid();
  // Once: a second SIGTERM would cut a drain (DRAIN_MS) short.
  const watch = setInterval(() => {
    if (system.parentPid() === parent) return;
    clearInterval(watch);
    stop("SIGTERM");
  }, 500);
}

// Last, once a signal would be handled: in text, the URL alone on the first
// line of stdout, for scripts that wait for it (and may signal at once).
if (system.env("LOG_FORMAT") === "json") log("info", "listening", { url: app.url });
else console.log(app.url);
