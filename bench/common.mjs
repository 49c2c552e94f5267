// What the benchmarks share (bench/run.mjs, bench/cluster.mjs): paths, the
// server and load generator processes, the machine description, formatting.
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import os from "node:os";
import { fileURLToPath } from "node:url";

export const root = fileURLToPath(new URL("..", import.meta.url));
const bin = (name) => `${root}node_modules/.bin/${name}`;
export const out = `${root}bench/results`;
const build = `${root}bench/.build`;
export const REPEAT = Number(process.env.REPEAT ?? 3);
/**
 * Starts one server process (`{ runtime, file, flags? }`, flags for the
 * runtime), pinned to `cpu` unless it is `null`; resolves with the port it
 * printed.
 */
export function startServer(server, { cpu = 0, env = {} } = {}) {
  const flags = server.flags ?? [];
  const command = {
    deno: [bin("deno"), "run", "-A", "--unstable-net", ...flags, server.file],
    bun: [bin("bun"), "run", ...flags, server.file],
    node: [bin("node"), ...flags, server.file], // Node 26 from npm strips the types
  }[server.runtime];
  const pinned = cpu === null ? command : ["taskset", "-c", String(cpu), ...command];
  const child = spawn(pinned[0], pinned.slice(1), {
    cwd: root,
    env: { ...process.env, PORT: "0", TICK_MS: "0", HOSTNAME: "127.0.0.1", ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    let output = "";
    child.stdout.on("data", (chunk) => {
      output += chunk;
      const match = /^http:\/\/[^:]+:(\d+)\//.exec(output);
      if (match) resolve({ child, port: Number(match[1]) });
    });
    child.on("exit", (code) => reject(new Error(`${server.name} exited ${code}: ${output}`)));
  });
}

export async function stopServer({ child }) {
  const exited = new Promise((resolve) => child.on("exit", resolve));
  child.kill("SIGTERM");
  await Promise.race([exited, sleep(3000).then(() => child.kill("SIGKILL"))]);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resident memory of the server process (taskset execs it, so the pid is the server's). */
export function rssKiB(pid) {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
}

/** Runs a load generator built in bench/.build (`program`, loadgen by default). */
export function loadgen(args, { stdin = "ignore", cpu = 1, program = "loadgen" } = {}) {
  const command = [`${build}/${program}`, ...args.map(String)];
  const pinned = cpu === null ? command : ["taskset", "-c", String(cpu), ...command];
  return spawn(pinned[0], pinned.slice(1), { stdio: [stdin, "pipe", "inherit"] });
}

export function runLoadgen(args, options) {
  const child = loadgen(args, options);
  let output = "";
  child.stdout.on("data", (chunk) => output += chunk);
  return new Promise((resolve, reject) =>
    child.on("exit", (code) => {
      try {
        resolve({ ...JSON.parse(output), exitCode: code });
      } catch {
        reject(
          new Error(`${options?.program ?? "loadgen"} ${args.join(" ")} exited ${code}: ${output}`),
        );
      }
    })
  );
}

export const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
};

export function version(command, args) {
  try {
    return execFileSync(command, args, { encoding: "utf8" }).split("\n")[0].trim();
  } catch {
    return "unknown";
  }
}

/** Builds the load generator; returns the machine and versions, for the results. */
export function prepare() {
  mkdirSync(out, { recursive: true });
  mkdirSync(build, { recursive: true });
  execFileSync("gcc", ["-O2", "-Wall", "-o", `${build}/loadgen`, `${root}bench/loadgen.c`]);
  return {
    date: new Date().toISOString(),
    cpu: os.cpus()[0]?.model ?? "unknown",
    cores: os.cpus().length,
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    deno: version(bin("deno"), ["--version"]),
    bun: version(bin("bun"), ["--version"]),
    node: version(bin("node"), ["--version"]),
    hono: JSON.parse(readFileSync(`${root}node_modules/hono/package.json`, "utf8")).version,
    repeat: REPEAT,
  };
}

export function fmt(value) {
  if (value === undefined || value === null || Number.isNaN(value)) return "-";
  return value >= 1000 ? Math.round(value).toLocaleString("en-US") : value.toFixed(2);
}
