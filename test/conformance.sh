#!/usr/bin/env bash
# Runs the Durable Streams conformance suite against server.ts on one runtime:
#   bash test/conformance.sh <deno|bun|node> [--cluster] [vitest arguments]
# Starts the server on 127.0.0.1 with a free port, runs the suite with vitest,
# and always stops the server. With --cluster: a redis-server (Debian's) on a
# free port and TWO server.ts processes on one port (REUSE_PORT=1) sharing it
# (REDIS_URL, so streams live in RedisStreamStore): the kernel spreads the
# suite's connections over both, so any process answers for any stream.
#   bash test/conformance.sh workers [vitest arguments]
# Bundles the Workers example (examples/workers/worker.ts) with esbuild and
# runs it in workerd on a free port with its storage in a temporary
# directory: one Durable Object per stream. The subscription APIs are left
# out there (CONFORMANCE_SUBSCRIPTIONS=0): they need a listing of every
# stream and one engine for the process, which one object per stream has not.
# Extra arguments go to vitest.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-}
shift || true
cluster=
if [ "${1:-}" = --cluster ]; then
  cluster=1
  shift
fi
bin="$PWD/node_modules/.bin"
case "$runtime" in
  deno) server=("$bin/deno" run --allow-net --allow-env ${cluster:+--unstable-net} server.ts) ;;
  bun) server=("$bin/bun" run server.ts) ;;
  node) server=("$bin/node" server.ts) ;;
  workers) server=() ;;
  *)
    echo "usage: $0 <deno|bun|node> [--cluster] [vitest arguments], or $0 workers [vitest arguments]" >&2
    exit 2
    ;;
esac
if [ "$runtime" = workers ] && [ -n "$cluster" ]; then
  echo "error: --cluster is for server.ts; workers runs one workerd" >&2
  exit 2
fi

logs=()
pids=()
redis_pid=
redis_dir=
workerd_pid=
workerd_dir=
stop() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "$redis_pid" ]; then
    kill -KILL "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  [ -n "$redis_dir" ] && rm -rf "$redis_dir"
  # SIGKILL: on SIGTERM workerd waits for open streams, possibly for ever.
  if [ -n "$workerd_pid" ]; then
    kill -KILL "$workerd_pid" 2>/dev/null || true
    wait "$workerd_pid" 2>/dev/null || true
  fi
  [ -n "$workerd_dir" ] && rm -rf "$workerd_dir"
  [ ${#logs[@]} -gt 0 ] && rm -f "${logs[@]}"
  return 0
}
trap stop EXIT INT TERM

# The suite's webhook receivers listen on 127.0.0.1.
env=(HOSTNAME=127.0.0.1 TICK_MS=0 STREAMS_ALLOW_PRIVATE_WEBHOOKS=1)
if [ -n "$cluster" ]; then
  redis_port=$("$bin/node" -e 'const s = require("node:net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')
  redis_dir=$(mktemp -d)
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$redis_dir" --save "" --appendonly no \
    >"$redis_dir/log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  if [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" != PONG ]; then
    echo "error: redis-server did not start:" >&2
    cat "$redis_dir/log" >&2
    exit 1
  fi
  env+=(REDIS_URL="redis://127.0.0.1:$redis_port" REUSE_PORT=1)
fi

# Starts one server.ts on PORT=$1 and sets $url to the URL it prints.
start() {
  local log pid
  log=$(mktemp)
  logs+=("$log")
  # A 2 s long-poll wait (STREAMS_LONG_POLL_MS overrides it). The module's
  # default is 20 s, but two tests wait a whole long-poll out within vitest's
  # 5 s default ("should support offset=now with long-poll mode (waits for
  # data)" and "... with long-poll on empty stream"): with 20 s they time out.
  env "${env[@]}" PORT="$1" STREAMS_LONG_POLL_MS="${STREAMS_LONG_POLL_MS:-2000}" \
    "${server[@]}" >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
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
}

# Starts workerd on the Workers example and sets $url to where it listens.
start_workerd() {
  workerd_dir=$(mktemp -d)
  "$bin/esbuild" --bundle --format=esm --log-level=warning examples/workers/worker.ts \
    --outfile="$workerd_dir/worker.js"
  cp examples/workers/config.capnp "$workerd_dir/"
  mkdir "$workerd_dir/storage"
  # workerd tells each socket's port on the control descriptor once it listens.
  (
    cd "$workerd_dir"
    exec env -u PUBLISH_TOKEN -u SUBSCRIBE_TOKEN \
      STREAMS_LONG_POLL_MS="${STREAMS_LONG_POLL_MS:-2000}" \
      "$bin/workerd" serve config.capnp --socket-addr http=127.0.0.1:0 --control-fd 3 \
      >"$workerd_dir/log" 2>&1 3>"$workerd_dir/control"
  ) &
  workerd_pid=$!
  url=
  for _ in $(seq 300); do
    port=$(grep -oE '"event":"listen","socket":"http","port":[0-9]+' "$workerd_dir/control" |
      grep -oE '[0-9]+$' || true)
    if [ -n "$port" ]; then
      url="http://127.0.0.1:$port"
      break
    fi
    if ! kill -0 "$workerd_pid" 2>/dev/null; then
      echo "error: workerd exited before listening:" >&2
      cat "$workerd_dir/log" >&2
      exit 1
    fi
    sleep 0.1
  done
  if [ -z "$url" ]; then
    echo "error: workerd did not listen within 30 s:" >&2
    cat "$workerd_dir/log" >&2
    exit 1
  fi
}

subscriptions=1
if [ "$runtime" = workers ]; then
  start_workerd
  subscriptions=0
  echo "workerd (the Workers example, one Durable Object per stream) at $url"
else
  start 0
fi
if [ -n "$cluster" ]; then
  first=$url
  port=${url##*:}
  port=${port%/}
  start "$port"
  if [ "$url" != "$first" ]; then
    echo "error: the second server.ts listens at $url, not $first" >&2
    exit 1
  fi
  echo "two server.ts processes on $runtime at $url, sharing redis-server on port $redis_port"
elif [ "$runtime" != workers ]; then
  echo "server.ts on $runtime at $url"
fi

CONFORMANCE_TEST_URL=${url%/} CONFORMANCE_SUBSCRIPTIONS=$subscriptions timeout -k 10 600 \
  "$bin/vitest" run conformance.test.mjs --root . --dir test "$@"
