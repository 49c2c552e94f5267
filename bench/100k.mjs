// The 100,000-subscriber benchmark: `npm run bench:100k`. Not part of the tests.
//
// On each runtime: SERVERS server.ts processes share one port (REUSE_PORT)
// and one Redis stream (the event log that makes them one broker); LOADGENS
// processes of bench/subscribers.c each hold their share of CLIENTS streams
// from four source addresses of their own in 127.0.0.0/8 (one process stays
// under the open-file limit, one address well under its ephemeral ports).
// Then:
// 1. connect every stream; hold them HOLD_S seconds (heartbeats flow);
// 2. publish BROADCASTS events one second apart: per event, the time from
//    publish until each subscriber has it (p50, p99, max over subscribers);
// 3. publish SUSTAINED events back to back, 8 in flight: deliveries per
//    second until every subscriber has every one;
// 4. close every stream: the client count must return to 0 in every process.
// Nothing may be lost or duplicated, and every subscriber must see one order. Memory is the servers' total
// resident memory; CPU is the seconds each group of processes used per phase.
// Everything shares the machine's cores, so the figures include the load
// generator's own work.
//
// Writes bench/results/<RESULTS>.md, .json and .svg (RESULTS defaults to 100K:
// 100K.md, 100k.json, 100k.svg). Environment: CLIENTS (default 100000; or a
// count per runtime, "bun:1000000,node:500000"), SERVERS and LOADGENS
// (default one per 18,000 streams, at least 8, and one per 16,667: 8 and 6
// at 100,000), HOLD_S (60), HEARTBEAT_S (15), BROADCASTS (10), SUSTAINED (20), ONLY (runtimes,
// comma-separated; default deno,bun,node), RESULTS. `npm run bench:1m` is the
// million on Bun and the most that Node and Deno hold here. While it runs,
// the machine is sampled each second (memory available, the kernel's TCP
// memory, open files), to name the wall a larger count would meet.
import { execFileSync, spawn } from "node:child_process";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { get } from "node:http";
import { createInterface } from "node:readline";
import { RedisServer } from "../test/redis_server.mjs";
import { fmt, out, prepare, root, sleep, startServer, stopServer } from "./common.mjs";

const setting = (name, fallback) => Number(process.env[name] ?? fallback);
const RESULTS = process.env.RESULTS ?? "100K";
const RUNTIMES = (process.env.ONLY ?? "deno,bun,node").split(",");
/** Streams per runtime: CLIENTS is one count for all, or `runtime:count` pairs. */
const COUNTS = Object.fromEntries(RUNTIMES.map((runtime) => {
  const text = process.env.CLIENTS ?? "100000";
  const pair = text.split(",").find((part) => part.startsWith(`${runtime}:`));
  return [runtime, Number(pair ? pair.split(":")[1] : text)];
}));
// At least 8 server processes, and at most 18,000 streams each (20,000 files a process).
const serversFor = (clients) => setting("SERVERS", Math.max(8, Math.ceil(clients / 18_000)));
const loadgensFor = (clients) => setting("LOADGENS", Math.ceil(clients / 16_667));
const HOLD_S = setting("HOLD_S", 60);
const HEARTBEAT_S = setting("HEARTBEAT_S", 15);
const BROADCASTS = setting("BROADCASTS", 10);
const SUSTAINED = setting("SUSTAINED", 20);
const EVENTS = BROADCASTS + SUSTAINED;
const SETTINGS = { HOLD_S, HEARTBEAT_S, BROADCASTS, SUSTAINED };
const TICKS = 100; // clock ticks per second, for /proc/<pid>/stat

/** CPU seconds a process has used so far. */
function cpuSeconds(pid) {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
    return (Number(fields[11]) + Number(fields[12])) / TICKS;
  } catch {
    return 0;
  }
}
const rssBytes = (pid) =>
  Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) * 1024;
const sum = (values) => values.reduce((a, b) => a + b, 0);
const openFiles = (pid) => readdirSync(`/proc/${pid}/fd`).length;

/**
 * The second byte of the subscribers' source addresses: a new one for each
 * runtime's run, so that none meets the TIME_WAIT sockets of an earlier run.
 */
let sourceNet = 1 + Math.floor(Math.random() * 200);

/** One subscribers process: its share of the streams, from its own source address. */
function startSubscribers(port, clients, index) {
  const source = `127.${sourceNet}.${index}.1`; // and .2, .3, .4
  const child = spawn(
    `${root}bench/.build/subscribers`,
    [port, clients, source, EVENTS].map(String),
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: child.stdout });
  const waiters = [];
  lines.on("line", (line) => waiters.shift()?.resolve(line));
  const exited = new Promise((resolve) => child.on("exit", resolve));
  // Once its output is read to the end: "exit" can come before the last line (a report of megabytes).
  lines.on("close", async () => {
    const code = await exited;
    for (const waiter of waiters.splice(0)) {
      waiter.reject(new Error(`subscribers ${source} exited ${code}`));
    }
  });
  const next = () => new Promise((resolve, reject) => waiters.push({ resolve, reject }));
  return {
    child,
    exited,
    connected: next(),
    /** Resolves once every stream of this process has event `seq`. */
    has: (seq) => (child.stdin.write(`wait ${seq}\n`), next()),
    report: () => (child.stdin.write("report\n"), next().then(JSON.parse)),
  };
}

/** `promise`, or a rejection after `ms`: every wait of the benchmark ends by itself. */
function within(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Publishes answered 503 (the event log did not answer in time) and sent again. */
let retriedPublishes = 0;

/**
 * Publishes one event whose data is its number and the monotonic clock in
 * ns. A 503 is sent again, as a publisher would, with the same body and
 * idempotency key: stored once whatever the first try did; its latency
 * counts from the first try.
 */
async function publish(port, seq) {
  const body = `${seq} ${process.hrtime.bigint()}`;
  for (let attempt = 1;; attempt++) {
    const response = await fetch(`http://127.0.0.1:${port}/publish`, {
      method: "POST",
      headers: { "content-type": "text/plain", "idempotency-key": `bench-${seq}` },
      body,
    });
    await response.arrayBuffer();
    if (response.status === 200) return;
    if (response.status !== 503 || attempt === 10) {
      throw new Error(`publish ${seq}: ${response.status}`);
    }
    retriedPublishes++;
    await sleep(500);
  }
}

/** The client counts reported by /stats over many fresh connections (so from every process). */
async function clientCounts(port, servers) {
  const once = () =>
    new Promise((resolve, reject) => {
      // agent: false: a new connection each time, which REUSE_PORT may hand to any process.
      get({ host: "127.0.0.1", port, path: "/stats", agent: false }, (response) => {
        let body = "";
        response.on("data", (chunk) => body += chunk);
        response.on("end", () => resolve(JSON.parse(body).clients));
      }).on("error", reject);
    });
  const counts = [];
  // Twelve per process: the chance that REUSE_PORT hands none of them to a
  // given process is (1 - 1/n)^(12n), about e^-12.
  for (let i = 0; i < 12 * servers; i++) counts.push(await once());
  return counts;
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

/** The machine's state, sampled each second: the least memory available, the most TCP memory and files. */
function startSampling() {
  const seen = { minAvailableBytes: Infinity, maxTcpMemoryBytes: 0, maxOpenFilesSystem: 0 };
  const sample = () => {
    const meminfo = readFileSync("/proc/meminfo", "utf8");
    const available = Number(/MemAvailable:\s+(\d+)/.exec(meminfo)[1]) * 1024;
    // Pages of 4 KiB that TCP buffers hold (`tcp_mem` bounds it).
    const tcp = Number(/TCP:.* mem (\d+)/.exec(readFileSync("/proc/net/sockstat", "utf8"))[1]) *
      4096;
    const files = Number(readFileSync("/proc/sys/fs/file-nr", "utf8").split(/\s+/)[0]);
    seen.minAvailableBytes = Math.min(seen.minAvailableBytes, available);
    seen.maxTcpMemoryBytes = Math.max(seen.maxTcpMemoryBytes, tcp);
    seen.maxOpenFilesSystem = Math.max(seen.maxOpenFilesSystem, files);
  };
  sample();
  const timer = setInterval(sample, 1000);
  return { seen, stop: () => (clearInterval(timer), sample(), seen) };
}

async function measure(runtime) {
  retriedPublishes = 0;
  const CLIENTS = COUNTS[runtime];
  const SERVERS = serversFor(CLIENTS);
  const LOADGENS = loadgensFor(CLIENTS);
  const sampling = startSampling();
  const redis = await RedisServer.start({ appendfsync: "everysec" });
  const env = {
    REDIS_URL: redis.url,
    REUSE_PORT: "1",
    MAX_CLIENTS: "0",
    HISTORY: "1000",
    HEARTBEAT_MS: String(HEARTBEAT_S * 1000),
  };
  const server = { name: `server.ts ${runtime}`, runtime, file: "server.ts" };
  const servers = [await startServer(server, { cpu: null, env })];
  const port = servers[0].port;
  while (servers.length < SERVERS) {
    servers.push(await startServer(server, { cpu: null, env: { ...env, PORT: String(port) } }));
  }
  const serverPids = servers.map((s) => s.child.pid);
  const serverCpu = () => sum(serverPids.map(cpuSeconds));
  let crowd = [];
  try {
    await sleep(1000);
    const rssBefore = sum(serverPids.map(rssBytes));
    const filesBefore = serverPids.map(openFiles);
    // 1. Connect and hold.
    const started = performance.now();
    const share = Math.ceil(CLIENTS / LOADGENS);
    crowd = Array.from(
      { length: LOADGENS },
      (_, i) => startSubscribers(port, Math.min(share, CLIENTS - i * share), i),
    );
    let ready = 0;
    for (const c of crowd) c.connected.then(() => ready++, () => {});
    const progress = setInterval(
      () => console.log(`${runtime}: ${ready} of ${LOADGENS} subscriber processes connected`),
      15_000,
    );
    await within(Promise.all(crowd.map((c) => c.connected)), 900_000, "connecting")
      .finally(() => clearInterval(progress));
    const connectSeconds = (performance.now() - started) / 1000;
    const connectedCounts = await clientCounts(port, SERVERS);
    const maxFiles = Math.max(...serverPids.map(openFiles));
    console.log(`${runtime}: ${CLIENTS} connected in ${connectSeconds.toFixed(1)} s`);
    console.log(`${runtime}: counted; holding ${HOLD_S} s`);
    let cpu = serverCpu();
    await sleep(HOLD_S * 1000);
    const rssHeld = sum(serverPids.map(rssBytes));
    const holdCpu = serverCpu() - cpu;
    // 2. Broadcasts one second apart.
    cpu = serverCpu();
    for (let seq = 1; seq <= BROADCASTS; seq++) {
      const second = sleep(1000);
      await publish(port, seq);
      await within(Promise.all(crowd.map((c) => c.has(seq))), 60_000, `broadcast ${seq}`);
      await second;
    }
    const broadcastCpu = serverCpu() - cpu;
    console.log(`${runtime}: ${BROADCASTS} broadcasts out; sustained`);
    // 3. Sustained: 8 publishes in flight until all are out.
    cpu = serverCpu();
    const sustainedStart = performance.now();
    let nextSeq = BROADCASTS + 1;
    await Promise.all(Array.from({ length: 8 }, async () => {
      while (nextSeq <= EVENTS) await publish(port, nextSeq++);
    }));
    // Every one of them: concurrent publishes reach the log in any order.
    const all = async (c) => {
      for (let seq = BROADCASTS + 1; seq <= EVENTS; seq++) await c.has(seq);
    };
    await within(
      Promise.all(crowd.map(all)),
      120_000 * Math.max(1, CLIENTS / 100_000),
      "sustained",
    );
    const sustainedSeconds = (performance.now() - sustainedStart) / 1000;
    const sustainedCpu = serverCpu() - cpu;
    const loadgenCpu = sum(crowd.map((c) => cpuSeconds(c.child.pid)));
    console.log(`${runtime}: sustained out; closing`);
    // 4. Close every stream.
    const reports = await Promise.all(crowd.map((c) => c.report()));
    await Promise.all(crowd.map((c) => c.exited));
    const closing = performance.now();
    let afterClose = await clientCounts(port, SERVERS);
    while (afterClose.some((count) => count !== 0) && performance.now() - closing < 60_000) {
      await sleep(500);
      afterClose = await clientCounts(port, SERVERS);
    }
    const closeSeconds = (performance.now() - closing) / 1000;
    const filesAfter = serverPids.map(openFiles);

    const delivered = Array.from(
      { length: EVENTS },
      (_, i) => sum(reports.map((r) => r.delivered[i])),
    );
    const broadcastLatencies = reports.flatMap((r) => r.latencyUs.slice(0, BROADCASTS).flat())
      .sort((a, b) => a - b);
    const perEvent = Array.from({ length: BROADCASTS }, (_, i) => {
      const all = reports.flatMap((r) => r.latencyUs[i]).sort((a, b) => a - b);
      return {
        p50: percentile(all, 0.5) / 1000,
        p99: percentile(all, 0.99) / 1000,
        max: all.at(-1) / 1000,
      };
    });
    return {
      runtime,
      clients: CLIENTS,
      servers: SERVERS,
      loadgens: LOADGENS,
      connectSeconds,
      connectedSeen: Math.max(...connectedCounts) > 0,
      maxOpenFilesPerServer: maxFiles,
      rssBytes: rssHeld,
      rssPerConnectionBytes: (rssHeld - rssBefore) / CLIENTS,
      holdCpuSeconds: holdCpu,
      minHeartbeats: Math.min(...reports.map((r) => r.minHeartbeats)),
      broadcast: {
        p50ms: percentile(broadcastLatencies, 0.5) / 1000,
        p99ms: percentile(broadcastLatencies, 0.99) / 1000,
        maxms: broadcastLatencies.at(-1) / 1000,
        perEvent,
        cpuSeconds: broadcastCpu,
      },
      sustained: {
        events: SUSTAINED,
        seconds: sustainedSeconds,
        deliveriesPerSecond: (CLIENTS * SUSTAINED) / sustainedSeconds,
        cpuSeconds: sustainedCpu,
      },
      loadgenCpuSeconds: loadgenCpu,
      deliveredPerEvent: delivered,
      lost: CLIENTS * EVENTS - sum(delivered),
      duplicates: sum(reports.map((r) => r.duplicates)),
      orders: new Set(reports.flatMap((r) => r.orders)).size,
      backToZero: afterClose.every((count) => count === 0),
      closeSeconds,
      openFilesBefore: filesBefore,
      openFilesAfter: filesAfter,
      droppedSyns: droppedSyns(),
      retriedPublishes,
      machine: sampling.stop(),
    };
  } finally {
    sampling.stop();
    for (const c of crowd) c.child.kill("SIGKILL");
    await Promise.all(servers.map(stopServer));
    await redis.stop();
  }
}

/** The kernel's count of connection requests dropped at full listen queues, so far. */
function droppedSyns() {
  try {
    const text = execFileSync("nstat", ["-az", "TcpExtListenDrops"], { encoding: "utf8" });
    return Number(/TcpExtListenDrops\s+(\d+)/.exec(text)?.[1] ?? NaN);
  } catch {
    return NaN;
  }
}

/** The JSON's and chart's file name: the report's, in lower case. */
const name = RESULTS.toLowerCase();

async function main() {
  if (process.argv.includes("--report")) {
    // Writes the report and chart again from the JSON, without measuring.
    const { machine, results } = JSON.parse(readFileSync(`${out}/${name}.json`, "utf8"));
    writeFileSync(`${out}/${RESULTS}.md`, markdown(machine, results));
    writeFileSync(`${out}/${name}.svg`, chart(results));
    return;
  }
  const machine = { ...prepare(), settings: SETTINGS };
  execFileSync("gcc", [
    "-O2",
    "-Wall",
    "-o",
    `${root}bench/.build/subscribers`,
    `${root}bench/subscribers.c`,
  ]);
  const results = [];
  for (const runtime of RUNTIMES) {
    const dropsBefore = droppedSyns();
    sourceNet++;
    const result = await measure(runtime);
    result.droppedSyns -= dropsBefore;
    results.push(result);
    console.log(
      JSON.stringify({ ...result, broadcast: { ...result.broadcast, perEvent: undefined } }),
    );
  }
  writeFileSync(`${out}/${name}.json`, JSON.stringify({ machine, results }, null, 2) + "\n");
  writeFileSync(`${out}/${RESULTS}.md`, markdown(machine, results));
  writeFileSync(`${out}/${name}.svg`, chart(results));
  console.log(`wrote ${out}/${RESULTS}.md, ${name}.json, ${name}.svg`);
}

function markdown(machine, results) {
  // The run's own settings (kept in the JSON), so --report writes the same text.
  const { HOLD_S, HEARTBEAT_S, BROADCASTS, SUSTAINED } = machine.settings ?? SETTINGS;
  const mib = (bytes) => `${fmt(bytes / 2 ** 20)} MiB`;
  const count = (n) => Number.isNaN(n) ? "-" : n.toLocaleString("en-US");
  const lines = [
    `# ${title(results)}`,
    "",
    `Taken ${machine.date} on ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB,`,
    `Linux ${machine.kernel}; ${machine.deno}; Bun ${machine.bun}; Node ${machine.node}.`,
    `\`npm run bench:${name}\` makes this file. \`server.ts\` processes on one port`,
    "(`REUSE_PORT=1`) and one Redis stream; `bench/subscribers.c` processes, each",
    "from four source addresses of its own. Servers, Redis and subscribers share the two cores.",
    `Streams held ${HOLD_S} s (heartbeats every ${HEARTBEAT_S} s), then ${BROADCASTS} broadcasts one second`,
    `apart, then ${SUSTAINED} published back to back with 8 in flight.`,
    "",
    "| | " + results.map((r) => r.runtime).join(" | ") + " |",
    "| --- | " + results.map(() => "---:").join(" | ") + " |",
  ];
  const row = (name, value) => lines.push(`| ${name} | ${results.map(value).join(" | ")} |`);
  row("connected", (r) => count(r.clients));
  row("server processes / subscriber processes", (r) => `${r.servers} / ${r.loadgens}`);
  row("time to connect all", (r) => `${fmt(r.connectSeconds)} s`);
  row(
    "SYNs dropped at full listen queues",
    (r) => count(r.droppedSyns),
  );
  row("most open files in one server process", (r) => count(r.maxOpenFilesPerServer));
  row("heartbeats, fewest on any stream", (r) => count(r.minHeartbeats));
  row("broadcast to each subscriber: p50", (r) => `${fmt(r.broadcast.p50ms)} ms`);
  row("broadcast to each subscriber: p99", (r) => `${fmt(r.broadcast.p99ms)} ms`);
  row("broadcast to the last subscriber (max)", (r) => `${fmt(r.broadcast.maxms)} ms`);
  row("sustained deliveries/s", (r) => fmt(r.sustained.deliveriesPerSecond));
  row("server RSS, total", (r) => mib(r.rssBytes));
  row("server RSS per connection", (r) => `${fmt(r.rssPerConnectionBytes / 1024)} KiB`);
  row(`server CPU while holding (${HOLD_S} s)`, (r) => `${fmt(r.holdCpuSeconds)} s`);
  row(`server CPU, ${BROADCASTS} broadcasts`, (r) => `${fmt(r.broadcast.cpuSeconds)} s`);
  row(`server CPU, ${SUSTAINED} sustained`, (r) => `${fmt(r.sustained.cpuSeconds)} s`);
  row(
    "server CPU per delivery, broadcasts / sustained",
    (r) =>
      `${fmt(r.broadcast.cpuSeconds / (r.clients * BROADCASTS) * 1e6)} / ${
        fmt(r.sustained.cpuSeconds / (r.clients * SUSTAINED) * 1e6)
      } µs`,
  );
  row("subscribers' CPU, whole run", (r) => `${fmt(r.loadgenCpuSeconds)} s`);
  row("lost / duplicated", (r) => `${r.lost} / ${r.duplicates}`);
  row("publishes answered 503 and sent again", (r) => count(r.retriedPublishes ?? 0));
  row("machine: least memory available", (r) => r.machine ? mib(r.machine.minAvailableBytes) : "-");
  row("machine: most TCP buffer memory", (r) => r.machine ? mib(r.machine.maxTcpMemoryBytes) : "-");
  row("machine: most open files", (r) => r.machine ? count(r.machine.maxOpenFilesSystem) : "-");
  row("orders the events arrived in (1: all agree)", (r) => count(r.orders));
  row(
    "client count back to 0 in every process",
    (r) => r.backToZero ? `yes, ${fmt(r.closeSeconds)} s` : "NO",
  );
  lines.push(
    "",
    "Per broadcast (ms from publish until each subscriber has it: p50 / p99 / max):",
    "",
    "| broadcast | " + results.map((r) => r.runtime).join(" | ") + " |",
    "| ---: | " + results.map(() => "---").join(" | ") + " |",
  );
  for (let i = 0; i < BROADCASTS; i++) {
    lines.push(`| ${i + 1} | ${
      results.map((r) => {
        const e = r.broadcast.perEvent[i];
        return `${fmt(e.p50)} / ${fmt(e.p99)} / ${fmt(e.max)}`;
      }).join(" | ")
    } |`);
  }
  lines.push(
    "",
    `Raw figures: [${name}.json](${name}.json). Chart: [${name}.svg](${name}.svg).`,
    "",
  );
  return lines.join("\n");
}

/** "100,000 subscribers on one machine", or the largest count when they differ. */
function title(results) {
  const counts = results.map((r) => r.clients);
  const most = Math.max(...counts);
  return counts.every((n) => n === most)
    ? `${fmt(most)} subscribers on one machine`
    : `Up to ${fmt(most)} subscribers on one machine`;
}

/** Bars of broadcast latency (p50, p99, max) per runtime, against the 1 s target. */
function chart(results) {
  const width = 760, left = 110, top = 50, bar = 18, gap = 4;
  const max = Math.max(1000, ...results.map((r) => r.broadcast.maxms));
  const scale = (ms) => Math.max(1, (ms / max) * (width - left - 120));
  const colors = { p50: "#0550ae", p99: "#bf8700", max: "#cf222e" };
  const parts = [];
  let y = top;
  for (const r of results) {
    parts.push(
      `<text x="10" y="${y + 22}" font-weight="600">${r.runtime}</text>`,
      `<text x="10" y="${y + 40}" fill="#57606a" font-size="11">${fmt(r.clients)}</text>`,
    );
    for (const key of ["p50", "p99", "max"]) {
      const ms = r.broadcast[`${key}ms`];
      parts.push(
        `<text x="${left - 8}" y="${y + 13}" text-anchor="end">${key}</text>`,
        `<rect x="${left}" y="${y}" width="${scale(ms).toFixed(1)}" height="${bar}" fill="${
          colors[key]
        }"/>`,
        `<text x="${left + scale(ms) + 6}" y="${y + 13}">${fmt(ms)} ms</text>`,
      );
      y += bar + gap;
    }
    y += 14;
  }
  const target = left + scale(1000);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y + 10}" ` +
    `font-family="system-ui, sans-serif" font-size="13">\n<rect width="100%" height="100%" fill="#fff"/>\n` +
    `<text x="10" y="24" font-size="16" font-weight="700">${
      new Set(results.map((r) => r.clients)).size === 1
        ? `Broadcast to ${fmt(results[0].clients)} subscribers: `
        : "Broadcast: "
    }` +
    `publish until each has it (lower is better)</text>\n${parts.join("\n")}\n` +
    `<line x1="${target}" y1="${
      top - 6
    }" x2="${target}" y2="${y}" stroke="#57606a" stroke-dasharray="4 3"/>\n` +
    `<text x="${target + 4}" y="${top - 8}" fill="#57606a">1 s target</text>\n</svg>\n`;
}

await main();
