// `npm run mutation [file ...]`: StrykerJS mutates each library and server
// file in turn and runs that file's fast tests against each mutant
// (test/mutation-tests.sh <file>), incrementally: a mutant whose code did
// not change since the last run and that a test killed then keeps its result
// (reports/mutation/<file>.incremental.json); the others (new, changed,
// survived: tests may have been added since; timed out) run again, so a run after a
// small change takes minutes. `--force` runs every mutant again. Then it writes bench/results/MUTATION.md, a row per file,
// and fails when a file scores under 90% or has more than 5% of its mutants
// excluded by `// Stryker disable` comments.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";

export const FILES = [
  "mod.ts",
  "streams.ts",
  "subscriptions.ts",
  "client.ts",
  "redis.ts",
  "runtime.ts",
  "probe.ts",
  "app.ts",
  "server.ts",
];
const MIN_SCORE = 90;
const MAX_EXCLUDED = 5;
// Runs at once per file. The tests of these files mostly wait on timers and
// sockets (about a third of a core each), so four keep 2 cores busy.
const CONCURRENCY = {
  "streams.ts": 4,
  "subscriptions.ts": 4,
  "client.ts": 4,
  "redis.ts": 4,
  "app.ts": 4,
};

const force = process.argv.includes("--force");
// `--summary`: no run, MUTATION.md written again from the reports there are.
const summary = process.argv.includes("--summary");
const only = process.argv.slice(2).filter((arg) => !["--force", "--summary"].includes(arg));
const unknown = only.filter((file) => !FILES.includes(file));
if (unknown.length > 0) {
  console.error(`error: not a mutated file: ${unknown.join(", ")} (one of ${FILES.join(", ")})`);
  process.exit(2);
}
mkdirSync("reports/mutation", { recursive: true });
const base = JSON.parse(readFileSync("stryker.config.json", "utf8"));
delete base.$schema;
for (const file of summary ? [] : only.length > 0 ? only : FILES) {
  const name = file.replace(/\.ts$/, "");
  const config = {
    ...base,
    mutate: [file],
    commandRunner: { command: `bash test/mutation-tests.sh ${file}` },
    concurrency: CONCURRENCY[file] ?? base.concurrency,
    incremental: true,
    incrementalFile: `reports/mutation/${name}.incremental.json`,
    jsonReporter: { fileName: `reports/mutation/${name}.json` },
    htmlReporter: { fileName: `reports/mutation/${name}.html` },
  };
  // The command runner reports no test files, so Stryker cannot tell that
  // tests were added: a survivor would be kept as one. It runs again, and so
  // does a timeout (a busy machine times a test out that would pass).
  const full = force || !existsSync(config.incrementalFile);
  if (existsSync(config.incrementalFile)) {
    const previous = JSON.parse(readFileSync(config.incrementalFile, "utf8"));
    for (const entry of Object.values(previous.files)) {
      entry.mutants = entry.mutants.filter((mutant) => mutant.status === "Killed");
    }
    writeFileSync(config.incrementalFile, JSON.stringify(previous));
  }
  const path = `reports/mutation/${name}.config.json`;
  writeFileSync(path, JSON.stringify(config, null, 2));
  const started = Date.now();
  console.log(`mutating ${file}`);
  execFileSync("node_modules/.bin/stryker", ["run", path, ...force ? ["--force"] : []], {
    stdio: "inherit",
  });
  const seconds = Math.round((Date.now() - started) / 1000);
  const times = existsSync("reports/mutation/times.json")
    ? JSON.parse(readFileSync("reports/mutation/times.json", "utf8"))
    : {};
  const today = new Date().toISOString().slice(0, 10);
  times[file] = { seconds, date: today, full: full ? seconds : times[file]?.full };
  if (!full && times[file].full === undefined) delete times[file].full;
  writeFileSync("reports/mutation/times.json", JSON.stringify(times, null, 2));
}

/** A file's last run: its seconds, date and full run (a bare number: seconds, as written before). */
const timeOf = (file) => typeof times[file] === "number" ? { seconds: times[file] } : times[file];

// The rows and undetected mutants MUTATION.md holds now: a file with no
// report here (a fresh clone: reports/ is not committed) keeps them.
const recorded = { rows: new Map(), undetected: new Map() };
if (existsSync("bench/results/MUTATION.md")) {
  for (const line of readFileSync("bench/results/MUTATION.md", "utf8").split("\n")) {
    const file = /^\| ([a-z]+\.ts)(:| )/.exec(line);
    if (!file) continue;
    if (file[2] === " ") recorded.rows.set(file[1], line);
    else recorded.undetected.set(file[1], [...recorded.undetected.get(file[1]) ?? [], line]);
  }
}

// The summary of the last run of every file.
const rows = [];
const undetected = [];
const failures = [];
const times = existsSync("reports/mutation/times.json")
  ? JSON.parse(readFileSync("reports/mutation/times.json", "utf8"))
  : {};
for (const file of FILES) {
  const path = `reports/mutation/${file.replace(/\.ts$/, "")}.json`;
  if (!existsSync(path)) {
    const row = recorded.rows.get(file);
    if (row === undefined) {
      failures.push(`${file}: not mutated yet`);
      continue;
    }
    rows.push(row);
    undetected.push(...recorded.undetected.get(file) ?? []);
    const [score, excluded] = [/\*\*([\d.]+)%/, /\(([\d.]+)%\)/].map((re) =>
      Number(re.exec(row)?.[1])
    );
    if (score < MIN_SCORE) {
      failures.push(`${file}: score ${score}% under ${MIN_SCORE}% (as recorded)`);
    }
    if (excluded > MAX_EXCLUDED) failures.push(`${file}: ${excluded}% excluded (as recorded)`);
    continue;
  }
  const report = JSON.parse(readFileSync(path, "utf8"));
  const { source, mutants } = report.files[file];
  const lines = source.split("\n");
  const counts = {};
  for (const mutant of mutants) {
    counts[mutant.status] = (counts[mutant.status] ?? 0) + 1;
    if (mutant.status === "Survived" || mutant.status === "NoCoverage") {
      const { line, column } = mutant.location.start;
      undetected.push(
        `| ${file}:${line}:${column} | ${mutant.mutatorName} | \`${
          lines[line - 1].trim().replaceAll("|", "\\|")
        }\` | \`${(mutant.replacement ?? "").replaceAll("|", "\\|").replaceAll("\n", " ")}\` |`,
      );
    }
  }
  const n = (status) => counts[status] ?? 0;
  const detected = n("Killed") + n("Timeout");
  const total = detected + n("Survived") + n("NoCoverage");
  const score = 100 * detected / total;
  const excluded = 100 * n("Ignored") / (total + n("Ignored"));
  if (score < MIN_SCORE) failures.push(`${file}: score ${score.toFixed(1)}% under ${MIN_SCORE}%`);
  if (excluded > MAX_EXCLUDED) {
    failures.push(
      `${file}: ${excluded.toFixed(1)}% of its mutants excluded, over ${MAX_EXCLUDED}%`,
    );
  }
  rows.push(
    `| ${file} | **${score.toFixed(1)}%** | ${total + n("Ignored")} | ${n("Killed")} | ` +
      `${n("Timeout")} | ${n("Survived")} | ${n("NoCoverage")} | ${n("Ignored")} (${
        excluded.toFixed(1)
      }%) | ${timeOf(file)?.date ?? "-"} | ${timeOf(file)?.seconds ?? "-"} s | ${
        timeOf(file)?.full ?? "-"
      } s |`,
  );
}
const stryker = JSON.parse(
  readFileSync("node_modules/@stryker-mutator/core/package.json", "utf8"),
).version;
writeFileSync(
  "bench/results/MUTATION.md",
  [
    "# Mutation score of every file",
    "",
    `Written by \`npm run mutation\` on ${new Date().toISOString().slice(0, 10)}: StrykerJS ` +
    `${stryker} mutates each file in turn and runs its fast tests against each mutant ` +
    "(`test/mutation-tests.sh <file>`). A score is the share of mutants detected (killed, or timed " +
    "out: a test hung on it); excluded mutants are those marked in the code as equivalent (they " +
    "change memory, timing or unreachable code, not behaviour), each with its reason. A file's " +
    "row is its last run (on 2 cores): incremental, so only mutants that changed, survived or " +
    "timed out ran again; the full run is the last run of all its mutants.",
    "",
    "| file | score | mutants | killed | timed out | survived | no coverage | excluded | run on | last run | full run |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ...rows,
    "",
    "## Not detected",
    "",
    ...(undetected.length === 0 ? ["Every mutant was detected."] : [
      "| where | mutator | line | replaced by |",
      "|---|---|---|---|",
      ...undetected,
    ]),
    "",
  ].join("\n"),
);
console.log("written to bench/results/MUTATION.md");
if (failures.length > 0) {
  for (const failure of failures) console.error(`error: ${failure}`);
  process.exit(1);
}
