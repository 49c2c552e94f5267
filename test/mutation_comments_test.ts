// The comments that exclude mutants from `npm run mutation`: each excludes
// one line and says why. A block directive (`// Stryker disable all` ...
// `// Stryker restore all`) ends only at a restore that precedes a statement:
// one that precedes a closing brace does not, and the exclusion runs on over
// the code after it (it once hid the broker's fan-out core).
import { test } from "./harness.ts";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { ROOT } from "./helpers.ts";

const FILES = [
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

test("every Stryker comment excludes one line, and says why", () => {
  for (const file of FILES) {
    readFileSync(`${ROOT}${file}`, "utf8").split("\n").forEach((line, index) => {
      if (!line.includes("Stryker")) return;
      assert.match(
        line,
        /^\s*\/\/ Stryker disable next-line [A-Za-z,]+: \S/,
        `${file}:${index + 1}: ${line.trim()}`,
      );
    });
  }
});
