// Writes bench/results/MUTATION.md from the report of the last `npm run
// mutation`: the score, the counts, and every mutant that no test detected.
import { readFileSync, writeFileSync } from "node:fs";

const report = JSON.parse(readFileSync("reports/mutation/mutation.json", "utf8"));
const counts = {};
const undetected = [];
for (const [file, { source, mutants }] of Object.entries(report.files)) {
  const lines = source.split("\n");
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
}
const n = (status) => counts[status] ?? 0;
const detected = n("Killed") + n("Timeout");
const total = detected + n("Survived") + n("NoCoverage");
const score = (100 * detected / total).toFixed(1);
const overAll = (100 * detected / (total + n("Ignored"))).toFixed(1);
const stryker = JSON.parse(
  readFileSync("node_modules/@stryker-mutator/core/package.json", "utf8"),
).version;
const table = undetected.length === 0 ? ["Every mutant was detected."] : [
  "| where | mutator | line | replaced by |",
  "|---|---|---|---|",
  ...undetected,
];
writeFileSync(
  "bench/results/MUTATION.md",
  [
    "# Mutation score of the library",
    "",
    `Written by \`npm run mutation\` on ${new Date().toISOString().slice(0, 10)}: StrykerJS ` +
    `${stryker} mutates ${Object.keys(report.files).join(", ")} and runs the fast tests ` +
    "(`test/mutation-tests.sh`: `bun test --bail ./mod_test.ts`) against each mutant.",
    "",
    `**Score: ${score}%** (${detected} of ${total} mutants detected; ${overAll}% counting the ` +
    "ignored ones as undetected).",
    "",
    "| mutants | killed | timed out | survived | no coverage | ignored (equivalent, marked in the code) |",
    "|---:|---:|---:|---:|---:|---:|",
    `| ${total} | ${n("Killed")} | ${n("Timeout")} | ${n("Survived")} | ${n("NoCoverage")} | ${
      n("Ignored")
    } |`,
    "",
    "A timed-out mutant made a test hang or loop: a per-test limit or Stryker's own ended it.",
    "",
    "## Not detected",
    "",
    ...table,
    "",
  ].join("\n"),
);
console.log(`mutation score ${score}%: written to bench/results/MUTATION.md`);
