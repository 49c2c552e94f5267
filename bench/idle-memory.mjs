// Where the memory of an idle stream goes: `npm run bench:idle-memory`. Not
// part of the tests. For each runtime, CONNECTIONS idle connections (default
// 10,000) to bench/servers/idle.ts held three ways: a request never answered
// (the connection and the request alone), a plain stream body left open (the
// ceiling's), and a stream of mod.ts's Broker. Reports, per connection, the
// growth of resident memory and of the JavaScript heap, external memory and
// array buffers after a full garbage collection, so what is left of RSS is
// the runtime's native side (its HTTP server, sockets, buffers).
// Writes bench/results/IDLE-MEMORY.md.
import { writeFileSync } from "node:fs";
import { connect } from "node:net";
import { fmt, out, prepare, rssKiB, sleep, startServer, stopServer } from "./common.mjs";

const CONNECTIONS = Number(process.env.CONNECTIONS ?? 10_000);
const GC_FLAGS = { deno: ["--v8-flags=--expose-gc"], node: ["--expose-gc"], bun: [] };

async function memory(port) {
  return await (await fetch(`http://127.0.0.1:${port}/memory`)).json();
}

async function measure(runtime, mode) {
  const server = await startServer(
    { runtime, file: "bench/servers/idle.ts", flags: GC_FLAGS[runtime] },
    { env: { IDLE_MODE: mode } },
  );
  const sockets = [];
  try {
    await sleep(500);
    const before = { ...(await memory(server.port)), rss: rssKiB(server.child.pid) * 1024 };
    for (let i = 0; i < CONNECTIONS; i++) {
      const socket = connect({
        port: server.port,
        host: "127.0.0.1",
        localAddress: `127.0.2.${1 + i % 8}`,
      });
      socket.on("error", () => {});
      socket.write("GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
      sockets.push(socket);
      if (i % 200 === 199) await sleep(20); // under the listen queue
    }
    let after = await memory(server.port);
    for (let i = 0; i < 200 && after.open < CONNECTIONS; i++) {
      await sleep(100);
      after = await memory(server.port);
    }
    await sleep(1000);
    after = { ...(await memory(server.port)), rss: rssKiB(server.child.pid) * 1024 };
    const per = (key) => (after[key] - before[key]) / CONNECTIONS / 1024;
    return {
      runtime,
      mode,
      open: after.open,
      rssKiB: per("rss"),
      heapUsedKiB: per("heapUsed"),
      externalKiB: per("external"),
      arrayBuffersKiB: per("arrayBuffers"),
    };
  } finally {
    for (const socket of sockets) socket.destroy();
    await stopServer(server);
  }
}

const machine = prepare();
const rows = [];
for (const runtime of (process.env.ONLY ?? "deno,bun,node").split(",")) {
  for (const mode of ["pending", "stream", "bytes", "broker"]) {
    const row = await measure(runtime, mode);
    rows.push(row);
    console.log(JSON.stringify(row));
  }
}
const lines = [
  "# Memory of an idle connection",
  "",
  `Taken ${machine.date} on ${machine.cores} cores, Linux ${machine.kernel}; ${machine.deno};`,
  `Bun ${machine.bun}; Node ${machine.node}. \`npm run bench:idle-memory\` makes this file.`,
  `${
    fmt(CONNECTIONS)
  } idle connections to \`bench/servers/idle.ts\`; growth per connection, in KiB,`,
  "after a full garbage collection.",
  "pending: a request never answered; stream: a stream body left open; bytes: the same as a byte",
  'stream (`type: "bytes"`); broker: `Broker.subscribe`.',
  "Heap, external and array buffers are JavaScript's share; the rest of RSS is native.",
  "",
  "| runtime | held as | open | RSS | JS heap | external | array buffers |",
  "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
  ...rows.map((r) =>
    `| ${r.runtime} | ${r.mode} | ${fmt(r.open)} | ${fmt(r.rssKiB)} | ${fmt(r.heapUsedKiB)} | ` +
    `${fmt(r.externalKiB)} | ${fmt(r.arrayBuffersKiB)} |`
  ),
  "",
];
writeFileSync(`${out}/IDLE-MEMORY.md`, lines.join("\n"));
console.log(`wrote ${out}/IDLE-MEMORY.md`);
