// The benchmark: `npm run bench`, which raises the open-file limit to the hard limit
// (10,000 clients need 10,000 descriptors in the server and in the load generator) and
// runs this file. Not part of the tests.
//
// Starts each server as a real process pinned to core 0 (taskset), drives it
// with bench/loadgen.c pinned to core 1, and writes bench/results/: the raw
// runs (results.json), a table of medians with ratios to the ceiling on the
// same runtime and to the Hono peer (RESULTS.md), and a chart (chart.svg).
//
// Environment: REPEAT (runs per figure, default 3), ONLY (substrings of the
// server names to run, comma-separated, e.g. "deno" or "sse-broker deno,ceiling deno"),
// SCENARIO (substrings of the scenario names, e.g. "latency"), RESULTS (the
// files' name: RESULTS.md, results.json and chart.svg by default; another
// name N writes N.md, n.json and n.svg). `npm run bench:targets` is the Node
// broker against bare node:http and the Bun broker against its ceiling.
import { writeFileSync } from "node:fs";
import {
  fmt,
  loadgen,
  median,
  out,
  prepare,
  REPEAT,
  rssKiB,
  runLoadgen,
  sleep,
  startServer,
  stopServer,
} from "./common.mjs";

const ONLY = process.env.ONLY ?? "";
const SCENARIO = process.env.SCENARIO ?? "";
const RESULTS = process.env.RESULTS ?? "RESULTS";
const [json, svg] = RESULTS === "RESULTS"
  ? ["results.json", "chart.svg"]
  : [`${RESULTS.toLowerCase()}.json`, `${RESULTS.toLowerCase()}.svg`];

const SERVERS = ["deno", "bun", "node"].flatMap((runtime) => [
  { name: `sse-broker ${runtime}`, runtime, file: "server.ts" },
  { name: `ceiling ${runtime}`, runtime, file: "bench/servers/ceiling.ts" },
  { name: `hono ${runtime}`, runtime, file: "bench/servers/hono.ts" },
  // Node alone has a server API without Request and Response: its bare ceiling.
  ...runtime === "node"
    ? [{ name: "node:http node", runtime, file: "bench/servers/node_http.ts" }]
    : [],
]).filter((server) => ONLY.split(",").some((part) => server.name.includes(part)));

// 64-byte events, 8 publishes in flight.
const SCENARIOS = [
  { name: "fanout-1k", args: ["fanout", 1000, 2000, 8, 64], unit: "deliveries/s" },
  { name: "fanout-10k", args: ["fanout", 10000, 200, 8, 64], unit: "deliveries/s" },
  // Well below saturation, so this measures delivery, not queueing.
  { name: "latency-1k", args: ["latency", 1000, 500, 8, 64, 50], unit: "ms" },
  // The same 50,000 deliveries/s, spread over ten times the clients.
  { name: "latency-10k", args: ["latency", 10000, 100, 8, 64, 5], unit: "ms" },
  { name: "idle-10k", memory: 10000, unit: "KiB/connection" },
  { name: "churn-5k", churn: 5000, unit: "KiB growth" },
].filter((scenario) => SCENARIO.split(",").some((part) => scenario.name.includes(part)));

async function clientsOf(port) {
  const response = await fetch(`http://127.0.0.1:${port}/stats`);
  return (await response.json()).clients;
}

async function measure(server, scenario) {
  const started = await startServer(server);
  const pid = started.child.pid;
  try {
    if (scenario.args) {
      const [mode, ...rest] = scenario.args;
      const result = await runLoadgen([mode, started.port, ...rest]);
      const lost = result.clientsComplete !== result.clients;
      return {
        value: mode === "latency" ? result.p99ms : result.deliveriesPerSecond,
        p50ms: result.p50ms,
        p99ms: result.p99ms,
        lost,
        raw: result,
      };
    }
    if (scenario.memory) {
      await sleep(500);
      const before = rssKiB(pid);
      const child = loadgen(["idle", started.port, scenario.memory], { stdin: "pipe" });
      await new Promise((resolve, reject) => {
        child.stdout.on("data", (chunk) => String(chunk).includes("ready") && resolve());
        child.on("exit", (code) => reject(new Error(`idle loadgen exited ${code}`)));
      });
      await sleep(1000);
      const after = rssKiB(pid);
      const clients = await clientsOf(started.port);
      child.stdin.end();
      return { value: (after - before) / scenario.memory, clients, before, after };
    }
    // Churn: one round of 5,000 cycles to warm up (heaps grow to their working
    // size), then the growth over a second round of 5,000.
    await runLoadgen(["churn", started.port, scenario.churn]);
    await sleep(500);
    const before = rssKiB(pid);
    const result = await runLoadgen(["churn", started.port, scenario.churn]);
    let clients = await clientsOf(started.port);
    for (let i = 0; i < 50 && clients !== 0; i++) {
      await sleep(100);
      clients = await clientsOf(started.port);
    }
    const after = rssKiB(pid);
    return { value: after - before, clients, before, after, seconds: result.seconds };
  } finally {
    await stopServer(started);
  }
}

async function main() {
  const machine = prepare();
  const runs = [];
  for (let round = 0; round < REPEAT; round++) {
    // Interleave servers within each round, so drift on the machine hits all alike.
    for (const scenario of SCENARIOS) {
      for (const server of SERVERS) {
        const result = await measure(server, scenario);
        runs.push({ server: server.name, scenario: scenario.name, round, ...result });
        console.log(
          `${scenario.name.padEnd(11)} ${server.name.padEnd(17)} ${fmt(result.value)}` +
            (result.lost ? "  LOST EVENTS" : "") +
            (result.clients !== undefined ? `  clients=${result.clients}` : ""),
        );
      }
    }
  }
  const table = summarize(runs);
  writeFileSync(`${out}/${json}`, JSON.stringify({ machine, runs, table }, null, 2) + "\n");
  writeFileSync(`${out}/${RESULTS}.md`, markdown(machine, table));
  writeFileSync(`${out}/${svg}`, chart(table));
  console.log(`\nwrote ${out}/${RESULTS}.md, ${json}, ${svg}`);
}

function summarize(runs) {
  const table = {};
  for (const scenario of SCENARIOS) {
    table[scenario.name] = {};
    for (const server of SERVERS) {
      const mine = runs.filter((r) => r.server === server.name && r.scenario === scenario.name);
      if (mine.length === 0) continue;
      table[scenario.name][server.name] = {
        median: median(mine.map((r) => r.value)),
        p50ms: mine[0].p50ms === undefined ? undefined : median(mine.map((r) => r.p50ms)),
        lost: mine.some((r) => r.lost),
        runs: mine.map((r) => r.value),
      };
    }
  }
  return table;
}

function markdown(machine, table) {
  const lines = [
    "# Benchmark results",
    "",
    `Taken ${machine.date} on ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB,`,
    `Linux ${machine.kernel}; ${machine.deno}; Bun ${machine.bun}; Node ${machine.node}; Hono ${machine.hono}.`,
    `Each server ran alone on core 0, the load generator on core 1. Medians of ${machine.repeat}`,
    "runs; figures move a lot between runs on these machines, so compare the ratios, which come",
    `from the same run. \`npm run ${
      RESULTS === "TARGETS" ? "bench:targets" : "bench"
    }\` makes this file.`,
    "",
    "- fanout: deliveries per second (events × clients), 64-byte events published through",
    "  `POST /publish` with 8 in flight; every client must receive every event.",
    "- latency-1k: publish-to-receive over every delivery, 50 events/s to 1,000 clients; the",
    "  figure is p99 (p50 beside it). latency-10k: the same 50,000 deliveries/s as 5 events/s",
    "  to 10,000 clients.",
    "- idle-10k: resident memory added per idle connection, with 10,000 open.",
    "- churn-5k: resident memory growth over 5,000 connect/disconnect cycles, after 5,000 to",
    "  warm up; the client count must come back to 0.",
    "- ceiling: the simplest correct broker on the runtime's web-standard server (on Node, through",
    "  the `node:http` adapter of `runtime.ts`); node:http: the same broker written against",
    "  `node:http` itself, Node's bare ceiling.",
    "",
    "| scenario | server | median | × ceiling (same runtime) | × hono (same runtime) | × node:http |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ];
  for (const scenario of SCENARIOS) {
    for (const [name, row] of Object.entries(table[scenario.name])) {
      const runtime = name.split(" ")[1];
      const ceiling = table[scenario.name][`ceiling ${runtime}`]?.median;
      const hono = table[scenario.name][`hono ${runtime}`]?.median;
      const bare = runtime === "node" ? table[scenario.name]["node:http node"]?.median : undefined;
      const ratio = (base) => base ? (row.median / base).toFixed(2) : "-";
      const value = scenario.name.startsWith("latency")
        ? `${fmt(row.median)} ms (p50 ${fmt(row.p50ms)})`
        : `${fmt(row.median)} ${scenario.unit}`;
      lines.push(
        `| ${scenario.name} | ${name}${row.lost ? " (LOST EVENTS)" : ""} | ${value} | ` +
          `${ratio(ceiling)} | ${ratio(hono)} | ${ratio(bare)} |`,
      );
    }
  }
  lines.push("", `Raw runs: [${json}](${json}). Chart: [${svg}](${svg}).`, "");
  return lines.join("\n");
}

/** Grouped horizontal bars of fan-out throughput, one group per scenario. */
function chart(table) {
  const groups = ["fanout-1k", "fanout-10k"].filter((name) => table[name]);
  const colors = { ours: "#0550ae", ceiling: "#8c959f", hono: "#bf8700", "node:http": "#57606a" };
  const rows = groups.flatMap((group) =>
    Object.entries(table[group]).map(([name, row]) => ({ group, name, value: row.median }))
  );
  const max = Math.max(...rows.map((row) => row.value));
  const barHeight = 22, gap = 6, left = 190, width = 760, top = 50;
  let y = top;
  const parts = [];
  for (const group of groups) {
    parts.push(`<text x="10" y="${y + 14}" font-weight="600">${group} (deliveries/s)</text>`);
    y += 24;
    for (const row of rows.filter((r) => r.group === group)) {
      const kind = row.name.startsWith("sse-broker") ? "ours" : row.name.split(" ")[0];
      const length = Math.max(1, (row.value / max) * (width - left - 110));
      parts.push(
        `<text x="${left - 8}" y="${y + 15}" text-anchor="end">${row.name}</text>`,
        `<rect x="${left}" y="${y}" width="${length.toFixed(1)}" height="${barHeight}" fill="${
          colors[kind]
        }"/>`,
        `<text x="${left + length + 6}" y="${y + 15}">${fmt(row.value)}</text>`,
      );
      y += barHeight + gap;
    }
    y += 16;
  }
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y + 10}" ` +
    `font-family="system-ui, sans-serif" font-size="13">\n` +
    `<rect width="100%" height="100%" fill="#fff"/>\n` +
    `<text x="10" y="24" font-size="16" font-weight="700">SSE fan-out, server on one core ` +
    `(higher is better)</text>\n${parts.join("\n")}\n</svg>\n`;
}

await main();
