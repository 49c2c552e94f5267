// `npm run pack`: the npm package, built from the same sources as the JSR
// one. `deno pack` compiles deno.json's entry points to JavaScript with
// their .d.ts and writes a package.json; this adds what it cannot: a
// description (deno.json's), the `sse-broker` command (server.js), and `redis` as an
// optional peer dependency (only ./redis needs it). Writes
// dist/sse-broker-broker-<version>.tgz and prints its path.
import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";

const root = new URL("..", import.meta.url).pathname;
const work = `${root}dist/.pack`;
const deno = `${root}node_modules/.bin/deno`;
const devPackage = JSON.parse(readFileSync(`${root}package.json`, "utf8"));
const config = JSON.parse(readFileSync(`${root}deno.json`, "utf8"));

rmSync(work, { recursive: true, force: true });
mkdirSync(work, { recursive: true });
execFileSync(deno, [
  "pack",
  "--allow-dirty",
  "--quiet",
  "--no-source-maps",
  "-o",
  `${work}/deno.tgz`,
], {
  cwd: root,
  stdio: ["ignore", "ignore", "inherit"],
});
execFileSync("tar", ["-xzf", `${work}/deno.tgz`, "-C", work]);

const path = `${work}/package/package.json`;
const generated = JSON.parse(readFileSync(path, "utf8"));
const { redis: _redis, ...dependencies } = generated.dependencies ?? {};
const manifest = {
  name: generated.name,
  version: generated.version,
  description: config.description,
  keywords: ["server-sent-events", "sse", "eventsource", "durable-streams", "pubsub", "broker"],
  license: generated.license,
  type: "module",
  exports: generated.exports,
  bin: { "sse-broker": "./server.js" },
  files: undefined,
  engines: { node: ">=20" },
  ...Object.keys(dependencies).length > 0 ? { dependencies } : {},
  peerDependencies: { redis: `^${devPackage.dependencies.redis}` },
  peerDependenciesMeta: { redis: { optional: true } },
};
writeFileSync(path, JSON.stringify(manifest, null, 2) + "\n");
chmodSync(`${work}/package/server.js`, 0o755);
const tarball = execFileSync(
  "npm",
  ["pack", "--silent", "--pack-destination", `${root}dist`, `${work}/package`],
  { cwd: root, encoding: "utf8" },
).trim().split("\n").at(-1);
rmSync(work, { recursive: true, force: true });
console.log(`${root}dist/${tarball}`);
