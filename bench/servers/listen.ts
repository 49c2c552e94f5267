// Starts a benchmark server: PORT (default 0), the URL as the first line,
// exit 0 on SIGINT or SIGTERM. Quiet streams stay open on Bun too.
import { currentRuntime, type Handler, integerSetting } from "../../runtime.ts";

export async function listen(handler: Handler): Promise<void> {
  const runtime = currentRuntime();
  const server = await runtime.serve(
    (request, bun) => {
      bun?.timeout?.(request, 0);
      return handler(request);
    },
    { port: integerSetting(runtime, "PORT", 0), hostname: "127.0.0.1" },
  );
  console.log(`http://127.0.0.1:${server.port}/`);
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    runtime.onSignal(signal, () => runtime.exit(0));
  }
}
