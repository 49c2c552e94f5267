// The Durable Streams reference server (@durable-streams/server), in memory with
// its default options, on a free port of 127.0.0.1: the peer bench/streams.mjs
// compares streams.ts with. Prints its URL as the first line, like server.ts.
import { DurableStreamTestServer } from "@durable-streams/server";

const server = new DurableStreamTestServer({ port: 0, host: "127.0.0.1" });
const url = await server.start();
console.log(`${url}/`);

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.stop().finally(() => process.exit(0));
  });
}
