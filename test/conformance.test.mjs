// The Durable Streams conformance suite against a running server: run it
// with test/conformance.sh, which starts server.ts (or workerd) and sets the
// URL. CONFORMANCE_SUBSCRIPTIONS=0 leaves the subscription APIs out (the
// Workers example has none); they are in otherwise.
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

runConformanceTests({
  baseUrl: process.env.CONFORMANCE_TEST_URL,
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS !== "0",
});
