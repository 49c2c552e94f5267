// Fan-out of this checkout's server.ts against another revision's, on each
// runtime, interleaved in each round so drift on the machine hits both
// alike: `npm run bench:compare -- <revision>` (default HEAD). For checking
// that a change kept the speed. Writes bench/results/COMPARE.md.
//
// Environment: REPEAT (rounds, default 3), RUNTIMES (default deno,bun,node).
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
];

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
          (runs[`${scenario.name}|${server.name}`] ??= []).push(result.deliveriesPerSecond);
          console.log(`${scenario.name} ${server.name}: ${fmt(result.deliveriesPerSecond)}`);
        } finally {
          await stopServer(started);
        }
      }
    }
  }
  const lines = [
    `# Fan-out: this checkout (${current}) against ${commit}`,
    "",
    `Written by \`npm run bench:compare -- ${revision}\` on ${machine.date.slice(0, 10)}, ` +
    `${machine.cores} cores (${machine.cpu}); ${machine.deno}; Bun ${machine.bun}; Node ` +
    `${machine.node}. Server on one ` +
    `core, load generator on the other; deliveries per second, medians of ${REPEAT} interleaved ` +
    "rounds; no client lost an event.",
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
