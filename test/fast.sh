#!/usr/bin/env bash
# `npm run test:fast`: the in-process tests, on Bun, in well under a minute:
# the everyday loop while changing the library. `npm test` runs everything,
# on every runtime, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
exec node_modules/.bin/bun test ./mod_test.ts ./test/event_log_test.ts \
  ./test/stream_store_test.ts ./test/streams_test.ts ./test/streams_protocol_test.ts \
  ./test/streams_data_test.ts ./test/subscriptions_test.ts \
  ./test/probe_test.ts ./test/app_test.ts \
  ./test/runtime_test.ts ./test/mutation_comments_test.ts ./test/security_test.ts \
  -t '^(?!server\.ts)' "$@"
