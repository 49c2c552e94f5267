// The Durable Streams benchmark: `npm run bench:streams`, which raises the
// open-file limit to the hard limit and runs this file. Not part of the tests.
//
// Live SSE readers of one stream, against streams.ts (mounted by server.ts at
// /v1/stream/) on Deno, Bun and Node and against the reference server
// (@durable-streams/server, in memory, on Node) in the same run. Each server
// runs as a real process pinned to core 0 (taskset), freshly started for each
// measurement; the script creates the stream (PUT, text/plain) and
// bench/streams_loadgen.c, pinned to core 1, opens the readers
// (`offset=now&live=sse`), appends and checks that every reader gets every
// append once, in the stream's order. Writes bench/results/STREAMS.md and
// streams.json.
//
// Environment: REPEAT (runs per figure, default 3), ONLY (substrings of the
// server names, comma-separated, e.g. "deno,reference"), SCENARIO (substrings
// of the scenario names), READERS and APPENDS (override every scenario's
// reader and append counts, for a quick smoke run).
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import {
  fmt,
  loadgen,
  median,
  out,
  prepare,
  REPEAT,
  root,
  rssKiB,
  runLoadgen,
  sleep,
  startServer,
  stopServer,
} from "./common.mjs";

const ONLY = process.env.ONLY ?? "";
const SCENARIO = process.env.SCENARIO ?? "";
const READERS = process.env.READERS ? Number(process.env.READERS) : undefined;
const APPENDS = process.env.APPENDS ? Number(process.env.APPENDS) : undefined;
const PATH = "/v1/stream/bench";
const REFERENCE = "reference node";
const binary = `${root}bench/.build/streams_loadgen`;
const count = (n) => n.toLocaleString("en-US");

const SERVERS = [
  ...["deno", "bun", "node"].map((runtime) => ({
    name: `streams.ts ${runtime}`,
    runtime,
    file: "server.ts",
  })),
  { name: REFERENCE, runtime: "node", file: "bench/servers/durable_reference.mjs" },
].filter((server) => ONLY.split(",").some((part) => server.name.includes(part)));

// 64-byte appends. Fixed rate: well below saturation, so it measures delivery,
// not queueing. Closed loop: 8 appends in flight, each sent when one is
// acknowledged, until APPENDS; the figure is deliveries/s until the last
// reader has the last append.
const SCENARIOS = [
  { name: "rate-1k", readers: 1000, appends: 500, inflight: 4, rate: 50 },
  { name: "closed-1k", readers: 1000, appends: 2000, inflight: 8 },
  { name: "closed-10k", readers: 10000, appends: 200, inflight: 8 },
  // The same server's broker (/events) under the same load, the baseline of
  // the 0.5× target: bench/loadgen.c's fanout, as `npm run bench` runs it.
  { name: "broker-10k", readers: 10000, appends: 200, inflight: 8, broker: true },
  { name: "idle-10k", readers: 10000, idle: true },
].map((scenario) => ({
  ...scenario,
  readers: READERS ?? scenario.readers,
  appends: scenario.idle ? undefined : APPENDS ?? scenario.appends,
})).filter((scenario) => SCENARIO.split(",").some((part) => scenario.name.includes(part)));

const PROGRAM = { program: "streams_loadgen" };

async function createStream(port) {
  const response = await fetch(`http://127.0.0.1:${port}${PATH}`, {
    method: "PUT",
    headers: { "content-type": "text/plain" },
  });
  await response.body?.cancel();
  if (response.status !== 201) throw new Error(`PUT ${PATH}: ${response.status}`);
}

async function measure(server, scenario) {
  if (scenario.broker && server.name === REFERENCE) return undefined;
  const started = await startServer(server);
  const pid = started.child.pid;
  try {
    await createStream(started.port);
    if (scenario.idle) {
      await sleep(500);
      const before = rssKiB(pid);
      const child = loadgen(["idle", started.port, PATH, scenario.readers], {
        ...PROGRAM,
        stdin: "pipe",
      });
      await new Promise((resolve, reject) => {
        child.stdout.on("data", (chunk) => String(chunk).includes("ready") && resolve());
        child.on("exit", (code) => reject(new Error(`idle streams_loadgen exited ${code}`)));
      });
      await sleep(1000);
      const after = rssKiB(pid);
      child.stdin.end();
      return { kiBPerReader: (after - before) / scenario.readers, before, after };
    }
    const { readers, appends, inflight, rate = 0 } = scenario;
    if (scenario.broker) {
      const raw = await runLoadgen(["fanout", started.port, readers, appends, inflight, 64]);
      return {
        deliveriesPerSecond: raw.deliveriesPerSecond,
        p50ms: raw.p50ms,
        p99ms: raw.p99ms,
        lost: raw.exitCode !== 0 || raw.clientsComplete !== raw.clients,
        raw,
      };
    }
    const raw = await runLoadgen(
      ["run", started.port, PATH, readers, appends, inflight, 64, rate],
      PROGRAM,
    );
    return {
      deliveriesPerSecond: raw.deliveriesPerSecond,
      p50ms: raw.p50ms,
      p99ms: raw.p99ms,
      lost: raw.exitCode !== 0 || raw.readersComplete !== readers || raw.errors !== 0,
      raw,
    };
  } finally {
    await stopServer(started);
  }
}

const METRICS = ["deliveriesPerSecond", "p50ms", "p99ms", "kiBPerReader"];

function summarize(runs) {
  const table = {};
  for (const scenario of SCENARIOS) {
    table[scenario.name] = {};
    for (const server of SERVERS) {
      const mine = runs.filter((r) => r.server === server.name && r.scenario === scenario.name);
      if (mine.length === 0) continue;
      const row = { lost: mine.some((r) => r.lost), runs: mine.length };
      for (const metric of METRICS) {
        const values = mine.map((r) => r[metric]).filter((v) => typeof v === "number");
        if (values.length > 0) row[metric] = median(values);
      }
      table[scenario.name][server.name] = row;
    }
  }
  return table;
}

function describe(scenario) {
  if (scenario.idle) {
    return `${scenario.name}: resident memory added per idle live SSE reader, with ` +
      `${count(scenario.readers)} open (RSS after they all had their first control event, ` +
      `minus RSS with the stream created and none open).`;
  }
  if (scenario.broker) {
    return `${scenario.name}: the same server's broker, ${count(scenario.readers)} clients of ` +
      `\`/events\`, ${count(scenario.appends)} publishes of 64 bytes closed loop, ` +
      `${scenario.inflight} in flight (bench/loadgen.c fanout): the baseline of the 0.5× target.`;
  }
  const pace = scenario.rate
    ? `at ${scenario.rate} appends/s (${scenario.inflight} connections)`
    : `closed loop, ${scenario.inflight} in flight`;
  return `${scenario.name}: ${count(scenario.readers)} live SSE readers, ` +
    `${count(scenario.appends)} appends of 64 bytes ${pace}.`;
}

function markdown(machine, table) {
  const ratio = (value, base) => value !== undefined && base ? (value / base).toFixed(2) : "-";
  const lines = [
    "# Durable Streams benchmark",
    "",
    `Taken ${machine.date} on ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB,`,
    `Linux ${machine.kernel}; ${machine.deno}; Bun ${machine.bun}; Node ${machine.node};`,
    `@durable-streams/server ${machine.reference}. Each server ran alone on core 0, freshly`,
    `started for each measurement, the load generator (bench/streams_loadgen.c) on core 1.`,
    `Medians of ${machine.repeat} runs; compare the ratios, which come from the same run.`,
    "`npm run bench:streams` makes this file.",
    "",
    "streams.ts is mounted by server.ts at `/v1/stream/`; the reference is",
    "`@durable-streams/server` in memory with its default options, on Node",
    "(bench/servers/durable_reference.mjs). One text/plain stream, created with `PUT`; readers",
    "`GET ?offset=now&live=sse` and reconnect from the last control event's offset if the server",
    "ends the response; every reader must get every append once, in the stream's order.",
    "Append-to-read latency is over every delivery, from the send time carried in each append.",
    "",
    ...SCENARIOS.map((scenario) => `- ${describe(scenario)}`),
    "",
  ];
  const live = SCENARIOS.filter((scenario) => !scenario.idle && table[scenario.name]);
  if (live.length > 0) {
    lines.push(
      "| scenario | server | deliveries/s | × reference | p50 ms | p99 ms | p99 × reference |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    );
    for (const scenario of live) {
      const reference = table[scenario.name][REFERENCE];
      for (const [name, row] of Object.entries(table[scenario.name])) {
        lines.push(
          `| ${scenario.name} | ${name}${row.lost ? " (INCOMPLETE)" : ""} | ` +
            `${fmt(row.deliveriesPerSecond)} | ` +
            `${ratio(row.deliveriesPerSecond, reference?.deliveriesPerSecond)} | ` +
            `${fmt(row.p50ms)} | ${fmt(row.p99ms)} | ${ratio(row.p99ms, reference?.p99ms)} |`,
        );
      }
    }
    lines.push("");
  }
  for (const scenario of SCENARIOS.filter((s) => s.idle && table[s.name])) {
    const reference = table[scenario.name][REFERENCE];
    lines.push(
      `| ${scenario.name} | KiB per reader | × reference |`,
      "| --- | ---: | ---: |",
      ...Object.entries(table[scenario.name]).map(([name, row]) =>
        `| ${name} | ${fmt(row.kiBPerReader)} | ${
          ratio(row.kiBPerReader, reference?.kiBPerReader)
        } |`
      ),
      "",
    );
  }
  const closed10k = table["closed-10k"];
  if (closed10k) {
    lines.push(
      "Targets: closed-10k at least 5× the reference on Deno and Bun and 2× on Node, and at",
      "least 0.5× the same runtime's broker to 10,000 clients (broker-10k).",
      "",
    );
    const reference = closed10k[REFERENCE]?.deliveriesPerSecond;
    for (const runtime of ["deno", "bun", "node"]) {
      const row = closed10k[`streams.ts ${runtime}`];
      if (!row) continue;
      const goal = runtime === "node" ? 2 : 5;
      if (reference) {
        const times = row.deliveriesPerSecond / reference;
        lines.push(
          `- ${runtime}: ${times.toFixed(2)}× the reference ` +
            (times >= goal && !row.lost ? `(met, goal ${goal}×)` : `(NOT met, goal ${goal}×)`),
        );
      }
      const broker = table["broker-10k"]?.[`streams.ts ${runtime}`]?.deliveriesPerSecond;
      if (broker) {
        const times = row.deliveriesPerSecond / broker;
        lines.push(
          `- ${runtime}: ${times.toFixed(2)}× its broker ` +
            (times >= 0.5 && !row.lost ? "(met, goal 0.5×)" : "(NOT met, goal 0.5×)"),
        );
      }
    }
    lines.push("");
  }
  lines.push("Raw runs: [streams.json](streams.json).", "");
  return lines.join("\n");
}

async function main() {
  const machine = {
    ...prepare(),
    reference: JSON.parse(
      readFileSync(`${root}node_modules/@durable-streams/server/package.json`, "utf8"),
    ).version,
  };
  execFileSync("gcc", ["-O2", "-Wall", "-o", binary, `${root}bench/streams_loadgen.c`]);
  const runs = [];
  for (let round = 0; round < REPEAT; round++) {
    // Interleave servers within each round, so drift on the machine hits all alike.
    for (const scenario of SCENARIOS) {
      for (const server of SERVERS) {
        const result = await measure(server, scenario);
        if (result === undefined) continue;
        runs.push({ server: server.name, scenario: scenario.name, round, ...result });
        const figure = scenario.idle
          ? `${fmt(result.kiBPerReader)} KiB/reader`
          : `${fmt(result.deliveriesPerSecond)} deliveries/s  p50 ${fmt(result.p50ms)} ms` +
            `  p99 ${fmt(result.p99ms)} ms` +
            (result.raw.reconnects ? `  reconnects=${result.raw.reconnects}` : "");
        console.log(
          `${scenario.name.padEnd(10)} ${server.name.padEnd(16)} ${figure}` +
            (result.lost ? "  INCOMPLETE" : ""),
        );
      }
    }
  }
  const table = summarize(runs);
  const scenarios = SCENARIOS;
  writeFileSync(
    `${out}/streams.json`,
    JSON.stringify({ machine, scenarios, runs, table }, null, 2) + "\n",
  );
  writeFileSync(`${out}/STREAMS.md`, markdown(machine, table));
  console.log(`\nwrote ${out}/STREAMS.md, streams.json`);
}

await main();
