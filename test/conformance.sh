#!/usr/bin/env bash
# Runs the Durable Streams conformance suite against server.ts on one runtime:
#   bash test/conformance.sh <deno|bun|node>
# Starts the server on 127.0.0.1 with a free port, runs the suite with vitest,
# and always stops the server. Extra arguments go to vitest.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-}
shift || true
bin="$PWD/node_modules/.bin"
case "$runtime" in
  deno) server=("$bin/deno" run --allow-net --allow-env server.ts) ;;
  bun) server=("$bin/bun" run server.ts) ;;
  node) server=("$bin/node" server.ts) ;;
  *)
    echo "usage: $0 <deno|bun|node> [vitest arguments]" >&2
    exit 2
    ;;
esac

log=$(mktemp)
pid=
stop() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$log"
}
trap stop EXIT INT TERM

# A 2 s long-poll wait (STREAMS_LONG_POLL_MS overrides it). The module's
# default is 20 s, but two tests wait a whole long-poll out within vitest's
# 5 s default ("should support offset=now with long-poll mode (waits for
# data)" and "... with long-poll on empty stream"): with 20 s they time out.
PORT=0 HOSTNAME=127.0.0.1 TICK_MS=0 STREAMS_LONG_POLL_MS="${STREAMS_LONG_POLL_MS:-2000}" \
  "${server[@]}" >"$log" 2>&1 &
pid=$!

# server.ts prints its URL alone on its first line.
url=
for _ in $(seq 300); do
  url=$(head -1 "$log" | grep -E '^http://' || true)
  [ -n "$url" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: server.ts exited before listening:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "error: server.ts printed no URL within 30 s:" >&2
  cat "$log" >&2
  exit 1
fi
echo "server.ts on $runtime at $url"

CONFORMANCE_TEST_URL=${url%/} timeout -k 10 600 \
  "$bin/vitest" run test/conformance.test.mjs --root . "$@"
