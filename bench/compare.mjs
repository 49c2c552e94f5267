// Fan-out and latency of this checkout's server.ts against another
// revision's, on each runtime, interleaved in each round so drift on the
// machine hits both alike: `npm run bench:compare -- <revision>` (default
// HEAD). For checking that a change kept the speed. Writes
// bench/results/COMPARE.md.
//
// Environment: REPEAT (rounds, default 3), RUNTIMES (default deno,bun,node),
// SCENARIO (substrings of the scenario names; default fanout).
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
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

const revision = process.argv[2] ?? "HEAD";
const git = (...args) => execFileSync("git", args, { cwd: root, encoding: "utf8" }).trim();
const commit = git("rev-parse", "--short", revision);
const current = git("rev-parse", "--short", "HEAD") + (git("status", "--porcelain") ? "+" : "");
const other = mkdtempSync(join(tmpdir(), "sse-compare-"));
git("worktree", "add", "--detach", other, commit);

const RUNTIMES = (process.env.RUNTIMES ?? "deno,bun,node").split(",");
const SERVERS = RUNTIMES.flatMap((runtime) => [
  { name: `this ${runtime}`, runtime, file: "server.ts" },
  { name: `${commit} ${runtime}`, runtime, file: join(other, "server.ts") },
]);
const SCENARIOS = [
  { name: "fanout-1k", args: ["fanout", 1000, 2000, 8, 64] },
  { name: "fanout-10k", args: ["fanout", 10000, 200, 8, 64] },
  // As in bench/run.mjs: p99 ms at 50,000 deliveries a second.
  { name: "latency-1k", args: ["latency", 1000, 500, 8, 64, 50] },
  { name: "latency-10k", args: ["latency", 10000, 100, 8, 64, 5] },
].filter((scenario) =>
  (process.env.SCENARIO ?? "fanout").split(",").some((part) => scenario.name.includes(part))
);

try {
  const machine = prepare();
  const runs = {};
  for (let round = 0; round < REPEAT; round++) {
    for (const scenario of SCENARIOS) {
      for (const server of SERVERS) {
        const started = await startServer(server);
        try {
          const [mode, ...rest] = scenario.args;
          const result = await runLoadgen([mode, started.port, ...rest]);
          if (result.clientsComplete !== result.clients) {
            throw new Error(`${server.name} lost events`);
          }
          const value = mode === "latency" ? result.p99ms : result.deliveriesPerSecond;
          (runs[`${scenario.name}|${server.name}`] ??= []).push(value);
          console.log(`${scenario.name} ${server.name}: ${fmt(value)}`);
        } finally {
          await stopServer(started);
        }
      }
    }
  }
  const lines = [
    `# This checkout (${current}) against ${commit}`,
    "",
    `Written by \`npm run bench:compare -- ${revision}\` on ${machine.date.slice(0, 10)}, ` +
    `${machine.cores} cores (${machine.cpu}); ${machine.deno}; Bun ${machine.bun}; Node ` +
    `${machine.node}. Server on one ` +
    "core, load generator on the other; fan-out in deliveries per second (higher is better), " +
    "latency as p99 ms from publish to receipt (lower is better); medians of " +
    `${REPEAT} interleaved rounds; no client lost an event.`,
    "",
    "| scenario | runtime | this | " + commit + " | this ÷ " + commit + " | runs (this; " + commit +
    ") |",
    "|---|---|---:|---:|---:|---|",
  ];
  for (const scenario of SCENARIOS) {
    for (const runtime of RUNTIMES) {
      const mine = runs[`${scenario.name}|this ${runtime}`];
      const theirs = runs[`${scenario.name}|${commit} ${runtime}`];
      lines.push(
        `| ${scenario.name} | ${runtime} | ${fmt(median(mine))} | ${fmt(median(theirs))} | ` +
          `${(median(mine) / median(theirs)).toFixed(2)} | ${mine.map(fmt).join(", ")}; ` +
          `${theirs.map(fmt).join(", ")} |`,
      );
    }
  }
  writeFileSync(`${out}/COMPARE.md`, lines.join("\n") + "\n");
  console.log(`wrote ${out}/COMPARE.md`);
} finally {
  git("worktree", "remove", "--force", other);
  rmSync(other, { recursive: true, force: true });
}
