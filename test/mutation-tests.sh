#!/usr/bin/env bash
# The fast tests that `npm run mutation` runs against each mutant of the
# library: in-process only, on Bun. Exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST_TIMEOUT_MS=2000 exec node_modules/.bin/bun test --bail ./mod_test.ts
