// `npm run build:client`: client.ts as one minified ES module (esbuild),
// written into client_bundle.ts as a string, so the demo server serves it
// at /client.js with no build step and no file read (it runs by URL too).
// Prints its size, minified and gzipped; test/client_test.ts checks that the
// committed module is this build and within 5 KiB gzipped.
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const root = new URL("..", import.meta.url).pathname;

/** client.ts minified by the esbuild of package.json. */
export function buildClient() {
  return execFileSync(`${root}node_modules/.bin/esbuild`, [
    "client.ts",
    "--minify",
    "--format=esm",
    "--target=es2022",
    "--log-level=error",
  ], { cwd: root, encoding: "utf8" }).trimEnd();
}

/** The text of client_bundle.ts for a build. */
export function bundleModule(code) {
  return `// Generated from client.ts by \`npm run build:client\` (esbuild, minified): do not edit.

/** \`client.ts\` as one minified ES module, which the demo server serves at \`/client.js\`. */
export const CLIENT_MODULE: string = ${JSON.stringify(code)};
`;
}

if (import.meta.main ?? process.argv[1] === new URL(import.meta.url).pathname) {
  const code = buildClient();
  writeFileSync(`${root}client_bundle.ts`, bundleModule(code));
  console.log(
    `client.js: ${code.length} bytes minified, ${gzipSync(code, { level: 9 }).length} gzipped`,
  );
}
