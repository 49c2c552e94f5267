// Many npm `eventsource` clients in a process of their own (Bun's test runner
// allows one process at most 256 requests at once), reporting what they see
// as JSON lines on stdout: [client, "open" | "message" | "tick" | "closed",
// lastEventId, Date.now()]. "closed" means the client gave up.
//
//     <runtime> test/eventsource_clients.ts <url> <count> [leave-on-tick]
//
// With `leave-on-tick`, each client closes after its first `tick` event (it
// got a place); otherwise all stay until stdin ends.
import { EventSource } from "eventsource";
import process from "node:process";

const [url, count, mode] = process.argv.slice(2);
const report = (...fields: unknown[]) => process.stdout.write(JSON.stringify(fields) + "\n");
const sources: EventSource[] = [];
for (let i = 0; i < Number(count); i++) {
  const source = new EventSource(url);
  sources.push(source);
  source.addEventListener("open", () => report(i, "open", null, Date.now()));
  source.addEventListener(
    "message",
    (event) => report(i, "message", event.lastEventId, Date.now()),
  );
  source.addEventListener("tick", () => {
    report(i, "tick", null, Date.now());
    if (mode === "leave-on-tick") source.close();
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) report(i, "closed", null, Date.now());
  });
}
// The test ends the clients by closing stdin, or by stopping the process.
process.stdin.resume();
process.stdin.on("end", () => {
  for (const source of sources) source.close();
  process.exit(0);
});
