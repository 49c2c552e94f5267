// A redis-server process (Debian's) on a free port of 127.0.0.1, with its
// data in a fresh temporary directory, for the cluster tests and the cluster
// benchmark. Plain JavaScript, so Node, Deno and Bun all load it.
import { spawn } from "node:child_process";
import process from "node:process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A port of 127.0.0.1 that nothing listens on now. */
export function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

export class RedisServer {
  /**
   * Starts one on a free port.
   *
   * @param {{ appendfsync?: string, onChild?: (child: import("node:child_process").ChildProcess) => void }} options
   *   `appendfsync`: Redis's setting, `always` (every write on disk before
   *   it is acknowledged) unless told otherwise; `onChild`: told of each
   *   process started, so a test can stop it if it fails.
   * @returns {Promise<RedisServer>}
   */
  static async start(options = {}) {
    const redis = new RedisServer(await freePort(), options);
    await redis.start();
    return redis;
  }

  #child;
  #exited;
  #options;

  constructor(port, options = {}) {
    this.port = port;
    this.dir = mkdtempSync(join(tmpdir(), "sse-redis-"));
    this.#options = options;
  }

  /** @returns {string} */
  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** Starts (or starts again) the server on its port and data, once it accepts connections. */
  async start() {
    const child = spawn("redis-server", [
      ...["--port", String(this.port), "--bind", "127.0.0.1", "--dir", this.dir, "--save", ""],
      ...["--appendonly", "yes", "--appendfsync", this.#options.appendfsync ?? "always"],
    ], { stdio: ["ignore", "pipe", "pipe"] });
    this.#child = child;
    this.#exited = new Promise((resolve) => child.on("exit", resolve));
    this.#options.onChild?.(child);
    let output = "";
    await new Promise((resolve, reject) => {
      child.stdout.on("data", (chunk) => {
        output += chunk;
        if (output.includes("Ready to accept connections")) resolve();
      });
      this.#exited.then((code) => reject(new Error(`redis-server exited ${code}:\n${output}`)));
    });
  }

  /**
   * Sends it a signal: `SIGSTOP` freezes it (it takes connections and
   * commands, and answers nothing), `SIGCONT` lets it go on.
   *
   * @param {NodeJS.Signals} name
   */
  signal(name) {
    // process.kill, not the child's kill: Deno's sends no signal after the first.
    if (this.#child?.pid !== undefined) process.kill(this.#child.pid, name);
  }

  /** Kills it outright, as a crash would. */
  async kill() {
    this.#child?.kill("SIGKILL");
    await this.#exited;
  }

  /** Kills it and removes its data. */
  async stop() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
