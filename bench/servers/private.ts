// The broker with per-user grants, for bench/private.mjs. Every subscriber
// is granted `shared/*` and a topic of its own, so each has grants of its
// own; every publish goes to `shared/events`, and with PRIVATE=1 every
// second one is private: then clients can no longer share one chunk.
import { Broker, createHandler } from "../../mod.ts";
import { currentRuntime } from "../../runtime.ts";
import { listen } from "./listen.ts";

const half = currentRuntime().env("PRIVATE") === "1";
let users = 0;
const handler = createHandler(new Broker(), {
  authorize: () => ({ subscribe: [`user/${++users}/*`, "shared/*"], publish: ["*"] }),
});
let published = 0;
listen((request) => {
  if (request.method !== "POST") return handler(request);
  const url = new URL(request.url);
  url.searchParams.set("topic", "shared/events");
  if (half && published++ % 2 === 0) url.searchParams.set("private", "1");
  return handler(new Request(url, request));
});
