// The scale-out benchmark: `npm run bench:cluster`. Not part of the tests.
//
// The demo server on each runtime, three ways, interleaved in each round:
// - "memory ×1": one process, the in-memory log (the baseline);
// - "redis ×1": one process on a Redis stream;
// - "redis ×2": two processes on one port (REUSE_PORT) and one Redis stream.
// Nothing is pinned: the server processes, redis-server and the load
// generator share this machine's cores as the scheduler places them, so the
// two-process figure includes the generator and Redis competing for them.
// redis-server runs with `appendonly yes` and `appendfsync always` (every
// event on disk before it is acknowledged), its data in a fresh temporary
// directory.
//
// Writes bench/results/CLUSTER.md and cluster.json. Environment: REPEAT
// (default 3), ONLY (a substring of the configuration names), FSYNC (Redis's
// appendfsync, default always), SCENARIO (a substring of the scenario names).
import { writeFileSync } from "node:fs";
import { RedisServer } from "../test/redis_server.mjs";
import {
  fmt,
  median,
  out,
  prepare,
  REPEAT,
  runLoadgen,
  sleep,
  startServer,
  stopServer,
  version,
} from "./common.mjs";

const ONLY = process.env.ONLY ?? "";
const FSYNC = process.env.FSYNC ?? "always";
const CONFIGS = ["deno", "bun"].flatMap((runtime) => [
  { name: `memory ×1 ${runtime}`, runtime, processes: 1, redis: false },
  { name: `redis ×1 ${runtime}`, runtime, processes: 1, redis: true },
  { name: `redis ×2 ${runtime}`, runtime, processes: 2, redis: true },
]).filter((config) => config.name.includes(ONLY));

const SCENARIOS = [
  { name: "fanout-1k", args: ["fanout", 1000, 2000, 8, 64], unit: "deliveries/s" },
  { name: "fanout-10k", args: ["fanout", 10000, 200, 8, 64], unit: "deliveries/s" },
  { name: "latency-1k", args: ["latency", 1000, 500, 8, 64, 50], unit: "ms" },
].filter((scenario) => scenario.name.includes(process.env.SCENARIO ?? ""));

const startRedis = () => RedisServer.start({ appendfsync: FSYNC });

async function measure(config, scenario) {
  const redis = config.redis ? await startRedis() : undefined;
  const server = { runtime: config.runtime, file: "server.ts" };
  const env = { ...(redis ? { REDIS_URL: redis.url } : {}), REUSE_PORT: "1" };
  const processes = [await startServer(server, { cpu: null, env })];
  while (processes.length < config.processes) {
    const port = String(processes[0].port);
    processes.push(await startServer(server, { cpu: null, env: { ...env, PORT: port } }));
  }
  try {
    await sleep(300);
    const [mode, ...rest] = scenario.args;
    const result = await runLoadgen([mode, processes[0].port, ...rest], { cpu: null });
    return {
      value: mode === "latency" ? result.p99ms : result.deliveriesPerSecond,
      p50ms: result.p50ms,
      lost: result.clientsComplete !== result.clients,
      raw: result,
    };
  } finally {
    for (const process of processes) await stopServer(process);
    await redis?.stop();
  }
}

async function main() {
  const machine = {
    ...prepare(),
    redis: version("redis-server", ["--version"]).replace(/ sha=.*/, ""),
    fsync: FSYNC,
  };
  const runs = [];
  for (let round = 0; round < REPEAT; round++) {
    for (const scenario of SCENARIOS) {
      for (const config of CONFIGS) {
        const result = await measure(config, scenario);
        runs.push({ config: config.name, scenario: scenario.name, round, ...result });
        console.log(
          `${scenario.name.padEnd(11)} ${config.name.padEnd(16)} ${fmt(result.value)}` +
            (result.lost ? "  LOST EVENTS" : ""),
        );
      }
    }
  }
  const table = {};
  for (const scenario of SCENARIOS) {
    table[scenario.name] = {};
    for (const config of CONFIGS) {
      const mine = runs.filter((r) => r.config === config.name && r.scenario === scenario.name);
      table[scenario.name][config.name] = {
        median: median(mine.map((r) => r.value)),
        p50ms: median(mine.map((r) => r.p50ms ?? 0)),
        lost: mine.some((r) => r.lost),
        runs: mine.map((r) => r.value),
      };
    }
  }
  writeFileSync(`${out}/cluster.json`, JSON.stringify({ machine, runs, table }, null, 2) + "\n");
  writeFileSync(`${out}/CLUSTER.md`, markdown(machine, table));
  console.log(`\nwrote ${out}/CLUSTER.md, cluster.json`);
}

function markdown(machine, table) {
  const lines = [
    "# Scale-out benchmark results",
    "",
    `Taken ${machine.date} on ${machine.cores} cores (${machine.cpu}), Linux ${machine.kernel};`,
    `${machine.deno}; Bun ${machine.bun}; ${machine.redis}. Medians of ${machine.repeat} runs.`,
    "`npm run bench:cluster` makes this file.",
    "",
    `Nothing is pinned: the server processes, redis-server (\`appendfsync ${machine.fsync}\`, data`,
    `on local disk) and the load generator share the ${machine.cores} cores. Scenarios as in`,
    "[RESULTS.md](RESULTS.md): 64-byte events, 8 publishes in flight; latency at 50 events/s.",
    "",
    "| scenario | configuration | median | × memory ×1 (same runtime) |",
    "| --- | --- | ---: | ---: |",
  ];
  for (const [scenario, rows] of Object.entries(table)) {
    for (const [name, row] of Object.entries(rows)) {
      const runtime = name.split(" ").at(-1);
      const base = rows[`memory ×1 ${runtime}`]?.median;
      const value = scenario.startsWith("latency")
        ? `${fmt(row.median)} ms p99 (p50 ${fmt(row.p50ms)})`
        : `${fmt(row.median)} deliveries/s`;
      lines.push(
        `| ${scenario} | ${name}${row.lost ? " (LOST EVENTS)" : ""} | ${value} | ` +
          `${base ? (row.median / base).toFixed(2) : "-"} |`,
      );
    }
  }
  lines.push("", "Raw runs: [cluster.json](cluster.json).", "");
  return lines.join("\n");
}

await main();
