// Every TypeScript and JavaScript block in README.md and docs/ type-checks
// against the library as it is: each is written to a file of its own (the
// package's names mapped to the files, as deno.json's exports say) and given
// to `deno check`. A block that cannot be checked says why in a comment on
// its first line, `// not checked: <reason>`.
import { describe, test } from "./harness.ts";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { promisify } from "node:util";
import { ROOT } from "./helpers.ts";

const run = promisify(execFile);

interface Block {
  /** Where it starts: `README.md:61`. */
  where: string;
  language: string;
  code: string;
}

/** The fenced blocks of one Markdown file. */
export function blocks(file: string): Block[] {
  const lines = readFileSync(ROOT + file, "utf8").split("\n");
  const found: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w+)/.exec(lines[i]);
    if (!open) continue;
    const start = i;
    const body: string[] = [];
    while (++i < lines.length && !lines[i].startsWith("```")) body.push(lines[i]);
    found.push({ where: `${file}:${start + 1}`, language: open[1], code: body.join("\n") });
  }
  return found;
}

const FILES = ["README.md", ...readdirSync(`${ROOT}docs`).map((name) => `docs/${name}`)]
  .filter((file) => file.endsWith(".md"));
const CODE = FILES.flatMap(blocks).filter((block) =>
  /^(ts|js|typescript|javascript)$/.test(block.language)
);

/**
 * `Bun` is not declared for `deno check`: the part of it the examples use,
 * as Bun's own types declare it, so a handler of the wrong shape fails.
 */
const BUN = `declare const Bun: {
  serve(options: {
    fetch: (request: Request, server: { timeout(request: Request, seconds: number): void }) =>
      Response | Promise<Response>;
    port?: number;
  }): unknown;
};\n`;

describe("the code in README.md and docs/", () => {
  test("there is code to check, in the README and in the guides", () => {
    assert.ok(CODE.some((block) => block.where.startsWith("README.md")));
    assert.ok(CODE.some((block) => block.where.startsWith("docs/")));
  });

  test("every block is checked, or says on its first line why not", () => {
    const unexplained = CODE.filter((block) =>
      /^\/\/ *(deno-)?ignore|@ts-nocheck/m.test(block.code)
    );
    assert.deepEqual(unexplained.map((block) => block.where), []);
  });

  test("every block type-checks (deno check)", { timeout: 120_000 }, async () => {
    const exports: Record<string, string> = JSON.parse(
      readFileSync(`${ROOT}deno.json`, "utf8"),
    ).exports;
    const name = JSON.parse(readFileSync(`${ROOT}deno.json`, "utf8")).name;
    const dir = mkdtempSync(`${ROOT}.docs-check-`);
    try {
      const files: string[] = [];
      for (const block of CODE) {
        if (/^\/\/ not checked: \S/.test(block.code)) continue;
        let code = block.code;
        // The package's names and the repository's relative paths, as the file sees them.
        for (const [entry, path] of Object.entries(exports)) {
          code = code.replaceAll(`"${name}${entry.slice(1)}"`, `"../${path.slice(2)}"`);
        }
        code = code.replaceAll(/from "\.\/([\w.]+\.ts)"/g, 'from "../$1"');
        const file = `${dir}/${block.where.replace(/[/:.]/g, "_")}.ts`;
        writeFileSync(file, (code.includes("Bun.") ? BUN : "") + code + "\nexport {};\n");
        files.push(file);
      }
      try {
        await run(`${ROOT}node_modules/.bin/deno`, ["check", "--quiet", ...files], {
          cwd: ROOT,
          timeout: 100_000,
        });
      } catch (error) {
        const { stdout = "", stderr = "" } = error as { stdout?: string; stderr?: string };
        // Name the block, not the temporary file.
        const text = (stdout + stderr).replaceAll(
          /file:\/\/\S*\/\.docs-check-\w+\/(\S+?)\.ts/g,
          "$1",
        );
        assert.fail(`a code block does not type-check:\n${text}`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
