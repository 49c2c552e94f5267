#!/usr/bin/env bash
# The fast tests that `npm run mutation` runs against each mutant of one file
# (test/mutation.mjs): in process where the file allows it, with a short
# limit per test. Exits non-zero when a test fails.
#   bash test/mutation-tests.sh <file>
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_TIMEOUT_MS=${TEST_TIMEOUT_MS:-4000}
bin=node_modules/.bin
# The in-process describes of security_test.ts: its "server.ts" ones start processes.
in_process='^(?!server\.ts)'
case "${1:-}" in
  mod.ts)
    exec "$bin/bun" test --bail ./mod_test.ts ./test/event_log_test.ts ./test/security_test.ts \
      -t "$in_process" ;;
  streams.ts)
    exec "$bin/bun" test --bail ./test/streams_test.ts ./test/streams_protocol_test.ts \
      ./test/stream_store_test.ts ./test/streams_data_test.ts \
      ./test/security_test.ts -t "$in_process" ;;
  subscriptions.ts)
    exec "$bin/bun" test --bail ./test/subscriptions_test.ts ;;
  client.ts)
    # Node: it has the Web Locks that sharing needs (Bun has none).
    exec "$bin/node" --test --test-force-exit ./test/client_process_test.ts >/dev/null ;;
  redis.ts)
    exec "$bin/bun" test --bail ./test/redis_test.ts ;;
  probe.ts)
    exec "$bin/bun" test --bail ./test/probe_test.ts ;;
  runtime.ts)
    # Each runtime takes its own branch of runtime.ts.
    "$bin/node" --test --test-force-exit test/runtime_test.ts >/dev/null
    "$bin/bun" test --bail ./test/runtime_test.ts >/dev/null 2>&1
    # Deno passes a test file that throws while it loads after a test is
    # registered: its last test must be there and pass.
    "$bin/deno" test --allow-all test/runtime_test.ts 2>&1 | sed 's/\x1b\[[0-9;]*m//g' |
      grep '^unknownSettings names a variable .* ok' >/dev/null ;;
  app.ts)
    exec "$bin/bun" test --bail ./test/app_test.ts ;;
  server.ts)
    # The process around app.ts: signals, exit status, the URL printed, the
    # launcher watched (seconds of processes, hence the longer limit).
    TEST_TIMEOUT_MS=10000 exec "$bin/bun" test --bail ./test/server_test.ts ;;
  *)
    echo "usage: $0 <mod.ts|streams.ts|subscriptions.ts|client.ts|redis.ts|runtime.ts|probe.ts|app.ts|server.ts>" >&2
    exit 2 ;;
esac
