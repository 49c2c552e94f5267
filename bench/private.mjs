// Fan-out with per-user grants when half the events are private, against the
// same server with every event public, on both runtimes, interleaved in each
// round: `npm run bench:private`. Writes bench/results/PRIVATE.md.
//
// Environment: REPEAT (rounds, default 3).
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import {
  fmt,
  median,
  out,
  prepare,
  REPEAT,
  root,
  runLoadgen,
  startServer,
  stopServer,
} from "./common.mjs";

const SERVERS = ["deno", "bun"].flatMap((runtime) => [
  { name: `public ${runtime}`, runtime, file: "bench/servers/private.ts", env: {} },
  {
    name: `half private ${runtime}`,
    runtime,
    file: "bench/servers/private.ts",
    env: { PRIVATE: "1" },
  },
]);
const ARGS = ["fanout", 1000, 2000, 8, 64];

const machine = prepare();
const runs = {};
for (let round = 0; round < REPEAT; round++) {
  for (const server of SERVERS) {
    const started = await startServer(server, { env: server.env });
    try {
      const [mode, ...rest] = ARGS;
      const result = await runLoadgen([mode, started.port, ...rest]);
      if (result.clientsComplete !== result.clients) throw new Error(`${server.name} lost events`);
      (runs[server.name] ??= []).push(result.deliveriesPerSecond);
      console.log(`${server.name}: ${fmt(result.deliveriesPerSecond)}`);
    } finally {
      await stopServer(started);
    }
  }
}
const lines = [
  "# Fan-out with per-user grants: half the events private",
  "",
  `Written by \`npm run bench:private\` on ${machine.date.slice(0, 10)}, ${machine.cores} cores ` +
  `(${machine.cpu}); ${machine.deno}; Bun ${machine.bun}. 1,000 subscribers, each granted ` +
  "`shared/*` and a topic of its own; 2,000 events of 64 bytes to `shared/events`, 8 in flight; " +
  "every subscriber receives every event. Server on one core, load generator on the other; " +
  `deliveries per second, medians of ${REPEAT} interleaved rounds; no client lost an event.`,
  "",
  "| runtime | all public | half private | half private ÷ all public | runs (public; private) |",
  "|---|---:|---:|---:|---|",
];
for (const runtime of ["deno", "bun"]) {
  const open = runs[`public ${runtime}`];
  const closed = runs[`half private ${runtime}`];
  lines.push(
    `| ${runtime} | ${fmt(median(open))} | ${fmt(median(closed))} | ` +
      `${(median(closed) / median(open)).toFixed(2)} | ${open.map(fmt).join(", ")}; ` +
      `${closed.map(fmt).join(", ")} |`,
  );
}
// The check a subscribe pays for its token, in process (no HTTP).
lines.push("", "Token check per subscribe (`bench/token_check.ts`: `jwtAuth`, 2,000 checks):", "");
for (const runtime of ["deno", "bun"]) {
  const args = runtime === "deno"
    ? ["run", "-A", "bench/token_check.ts"]
    : ["bench/token_check.ts"];
  const output = execFileSync(`${root}node_modules/.bin/${runtime}`, args, { cwd: root });
  const micros = JSON.parse(String(output));
  lines.push(
    `- ${runtime}: ${Object.entries(micros).map(([alg, us]) => `${alg} ${us} µs`).join(", ")}`,
  );
}
writeFileSync(`${out}/PRIVATE.md`, lines.join("\n") + "\n");
console.log(`wrote ${out}/PRIVATE.md`);
