// The Durable Streams conformance suite against a running server: run it
// with test/conformance.sh, which starts server.ts and sets the URL.
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

runConformanceTests({ baseUrl: process.env.CONFORMANCE_TEST_URL, subscriptions: true });
