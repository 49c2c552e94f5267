// Where Deno's CPU goes under fan-out and latency load, per flush design:
// `npm run bench:profile`. Not part of the tests.
//
// Each variant is server.ts with the broker's flush scheduled one way (as
// kept: a timer turn after a flush of several events, else the end of the
// turn; or always one way, in a patched copy of mod.ts in bench/.build/),
// against the ceiling server. Per variant and scenario: the load generator's figure, the
// server's CPU time per delivery (/proc), the server's write
// syscalls per delivery (strace -c, in a second run of its own, as strace
// slows the process), and a V8 CPU profile taken over the inspector protocol,
// summed by where the time went. Writes bench/results/PROFILE.md and
// profile.json; the raw .cpuprofile files stay in bench/.build/ (open them in
// Chrome DevTools).
//
// Environment: VARIANT, SCENARIO (comma-separated substrings, like bench/run.mjs).
import { spawn } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { fmt, out, prepare, root, runLoadgen, sleep, startServer, stopServer } from "./common.mjs";

const build = `${root}bench/.build/profile`;
// How #receive schedules the flush: a timer turn after a burst, else the end of the turn.
const KEPT = `if (this.#lastBatchSize > 1) setTimeout(() => this.#flush(), 0);
    else endOfTurn(() => this.#flush());`;

const VARIANTS = [
  { name: "ceiling", file: "bench/servers/ceiling.ts" },
  { name: "by last batch (kept)", file: "server.ts" },
  { name: "timer turn", replace: "setTimeout(() => this.#flush(), 0);" },
  { name: "setImmediate", replace: "setImmediate(() => this.#flush());" },
  { name: "queueMicrotask", replace: "queueMicrotask(() => this.#flush());" },
].filter((variant) => (process.env.VARIANT ?? "").split(",").some((p) => variant.name.includes(p)));

const SCENARIOS = [
  { name: "fanout-1k", args: ["fanout", 1000, 2000, 8, 64] },
  { name: "latency-1k", args: ["latency", 1000, 500, 8, 64, 50] },
].filter((scenario) =>
  (process.env.SCENARIO ?? "").split(",").some((p) => scenario.name.includes(p))
);

/** server.ts over a copy of mod.ts whose flush is scheduled by `replace`. */
function patched(variant) {
  if (!variant.replace) return variant.file;
  const dir = `${build}/${variant.name.replace(/\W+/g, "-")}`;
  mkdirSync(dir, { recursive: true });
  for (const file of ["server.ts", "app.ts", "runtime.ts", "page.ts", "probe.ts", "streams.ts"]) {
    try {
      copyFileSync(`${root}${file}`, `${dir}/${file}`);
    } catch { /* streams.ts may not exist yet */ }
  }
  const source = readFileSync(`${root}mod.ts`, "utf8");
  if (!source.includes(KEPT)) throw new Error("mod.ts no longer schedules its flush as expected");
  writeFileSync(`${dir}/mod.ts`, source.replace(KEPT, variant.replace));
  return `${dir}/server.ts`;
}

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Utime + stime of a process, in seconds. */
function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** A minimal client of the V8 inspector protocol. */
async function inspector(port) {
  let list;
  for (let i = 0; i < 50 && !list; i++) {
    list = await fetch(`http://127.0.0.1:${port}/json/list`).then((r) => r.json(), () => null);
    if (!list) await sleep(100);
  }
  const socket = new WebSocket(list[0].webSocketDebuggerUrl);
  await new Promise((resolve, reject) => {
    socket.onopen = resolve;
    socket.onerror = reject;
  });
  let next = 0;
  const pending = new Map();
  socket.onmessage = ({ data }) => {
    const message = JSON.parse(data);
    pending.get(message.id)?.(message.result);
    pending.delete(message.id);
  };
  return {
    send(method, params = {}) {
      const id = ++next;
      socket.send(JSON.stringify({ id, method, params }));
      return new Promise((resolve) => pending.set(id, resolve));
    },
    close: () => socket.close(),
  };
}

/** Self time of a .cpuprofile, in ms, by where it went. */
function summarize(profile) {
  const nodes = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map();
  profile.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + profile.timeDeltas[i]));
  const byPlace = {};
  const byFunction = {};
  let total = 0;
  for (const [id, micros] of self) {
    const { functionName, url, lineNumber } = nodes.get(id).callFrame;
    const place = placeOf(functionName, url);
    byPlace[place] = (byPlace[place] ?? 0) + micros / 1000;
    if (place !== "idle") {
      const name = `${functionName || "(anonymous)"} ${url.split("/").pop()}:${lineNumber + 1}`;
      byFunction[name] = (byFunction[name] ?? 0) + micros / 1000;
      total += micros / 1000;
    }
  }
  const top = Object.entries(byFunction).sort((a, b) => b[1] - a[1]).slice(0, 12);
  return { busyMs: total, byPlace, top };
}

function placeOf(name, url) {
  if (name === "(idle)") return "idle";
  if (name === "(garbage collector)") return "garbage collector";
  if (name === "(program)") return "native (outside JS)";
  if (url.endsWith("/mod.ts")) return "broker (mod.ts)";
  if (/\/(server|runtime|ceiling|listen)\.ts$/.test(url)) return "server and runtime layer";
  if (/deno_http|http/.test(url)) return "Deno HTTP (JS side)";
  if (/deno_web|streams/.test(url)) return "web streams";
  return "other JS and ops";
}

/** strace's count of write syscalls (all threads) while the load runs. */
async function writeSyscalls(variant, scenario) {
  const started = await startServer({
    name: variant.name,
    runtime: "deno",
    file: patched(variant),
  });
  const strace = spawn("strace", [
    "-f",
    "-c",
    "-e",
    "trace=write,writev,sendto,sendmsg",
    "-p",
    String(started.child.pid),
  ], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let report = "";
  strace.stderr.on("data", (chunk) => report += chunk);
  try {
    await sleep(500);
    const result = await runLoadgen([scenario.args[0], started.port, ...scenario.args.slice(1)]);
    const exited = new Promise((resolve) => strace.on("exit", resolve));
    strace.kill("SIGINT");
    await exited;
    const calls = [...report.matchAll(/^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$/gm)]
      .filter(([, , name]) => name !== "total")
      .reduce((sum, [, count]) => sum + Number(count), 0);
    return calls / result.deliveries;
  } finally {
    strace.kill("SIGKILL");
    await stopServer(started);
  }
}

async function profiled(variant, scenario) {
  const port = await freePort();
  const started = await startServer({
    name: variant.name,
    runtime: "deno",
    file: patched(variant),
    flags: [`--inspect=127.0.0.1:${port}`],
  });
  const pid = started.child.pid;
  try {
    const session = await inspector(port);
    await session.send("Profiler.enable");
    await session.send("Profiler.setSamplingInterval", { interval: 250 });
    await session.send("Profiler.start");
    const cpuBefore = cpuSeconds(pid);
    const result = await runLoadgen([scenario.args[0], started.port, ...scenario.args.slice(1)]);
    const cpu = cpuSeconds(pid) - cpuBefore;
    const { profile } = await session.send("Profiler.stop");
    session.close();
    const file = `${build}/${variant.name.replace(/\W+/g, "-")}-${scenario.name}.cpuprofile`;
    writeFileSync(file, JSON.stringify(profile));
    return {
      value: scenario.args[0] === "latency" ? result.p99ms : result.deliveriesPerSecond,
      p50ms: result.p50ms,
      cpuMicros: (cpu * 1e6) / result.deliveries,
      ...summarize(profile),
    };
  } finally {
    await stopServer(started);
  }
}

const machine = prepare();
mkdirSync(build, { recursive: true });
const results = [];
for (const scenario of SCENARIOS) {
  for (const variant of VARIANTS) {
    const result = await profiled(variant, scenario);
    result.writesPerDelivery = await writeSyscalls(variant, scenario);
    results.push({ variant: variant.name, scenario: scenario.name, ...result });
    console.error(
      `${scenario.name} ${variant.name}: ${fmt(result.value)}, ${
        result.cpuMicros.toFixed(2)
      } CPU-µs per delivery, ${result.writesPerDelivery.toFixed(3)} writes per delivery`,
    );
  }
}
writeFileSync(`${out}/profile.json`, JSON.stringify({ machine, results }, null, 2) + "\n");

const places = [...new Set(results.flatMap((r) => Object.keys(r.byPlace)))].filter((p) =>
  p !== "idle"
);
const lines = [
  "# Where Deno's CPU goes, by flush design",
  "",
  `Generated by \`npm run bench:profile\` (bench/profile.mjs) on ${
    machine.date.slice(0, 10)
  }: ${machine.cpu}, ${machine.cores} cores, ${machine.deno.replace("\n", " ")}.`,
  "One run per row, under a V8 CPU profiler (250 µs samples), which slows every server alike; write syscalls counted by `strace -c` in a second run.",
  "fanout-1k: 1,000 clients, 2,000 events of 64 bytes, 8 publishes in flight (deliveries/s). latency-1k: 1,000 clients, 50 events/s (p99 ms).",
  "",
];
for (const scenario of SCENARIOS) {
  const rows = results.filter((r) => r.scenario === scenario.name);
  lines.push(`## ${scenario.name}`, "");
  lines.push(
    `| variant | ${
      scenario.name.startsWith("latency") ? "p50 / p99 ms" : "deliveries/s"
    } | CPU µs per delivery | writes per delivery | busy ms | ${places.join(" | ")} |`,
  );
  lines.push(`|---|---:|---:|---:|---:|${places.map(() => "---:").join("|")}|`);
  for (const r of rows) {
    const value = scenario.name.startsWith("latency")
      ? `${fmt(r.p50ms)} / ${fmt(r.value)}`
      : fmt(r.value);
    const shares = places.map((p) => `${Math.round((100 * (r.byPlace[p] ?? 0)) / r.busyMs)}%`);
    lines.push(
      `| ${r.variant} | ${value} | ${r.cpuMicros.toFixed(2)} | ${
        r.writesPerDelivery.toFixed(3)
      } | ${Math.round(r.busyMs)} | ${shares.join(" | ")} |`,
    );
  }
  lines.push("", "Top functions by self time (ms):", "");
  for (const r of rows) {
    lines.push(
      `- ${r.variant}: ${
        r.top.slice(0, 6).map(([name, ms]) => `\`${name}\` ${Math.round(ms)}`).join(", ")
      }`,
    );
  }
  lines.push("");
}
writeFileSync(`${out}/PROFILE.md`, lines.join("\n"));
console.error(`wrote ${out}/PROFILE.md`);
