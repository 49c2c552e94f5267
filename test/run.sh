#!/usr/bin/env bash
# Every check and every test, on both runtimes. Run it as `npm test`.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=1
if [ "${1:-}" = --repeat ]; then
  repeat=${2:-}
  if ! [[ "$repeat" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --repeat needs a count of 1 or more, got '$repeat'" >&2
    exit 2
  fi
fi
PATH="$PWD/node_modules/.bin:$PATH"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The browser test drives Debian's Chromium (never a downloaded browser); the
# cluster test runs Debian's redis-server, the metrics test Debian's promtool.
# Installed here when missing.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus) # promtool checks /metrics
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} from Debian's packages for the tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: the tests need ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
    exit 1
  fi
fi

deno fmt --check
deno lint
deno check mod.ts client.ts client_bundle.ts redis.ts server.ts app.ts runtime.ts probe.ts bench/servers/ bench/token_check.ts test/ mod_test.ts examples/
deno check --doc mod.ts streams.ts subscriptions.ts client.ts redis.ts   # the JSDoc examples type-check
deno doc --lint mod.ts redis.ts streams.ts subscriptions.ts client.ts
deno publish --dry-run --allow-dirty --quiet   # the JSR package: no slow types, only its files

# Every process the tests start carries this mark in its environment, so
# whatever outlives a runtime's run is found, named, stopped, and fails it.
mark="SSE_TEST_RUN=$$-$RANDOM"
leftovers() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    if grep -qzxF "$mark" "$environ" 2>/dev/null; then echo "$pid"; fi
  done
}
check_leftovers() {
  local pids
  pids=$(leftovers)
  [ -z "$pids" ] && return 0
  echo "error: processes started by the $1 tests outlived them:" >&2
  # shellcheck disable=SC2086
  ps -o pid=,args= -p $pids >&2 || true
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  return 1
}

# The same test files on the three runtimes. A runtime's failure fails the
# run, after all have run, so one red runtime does not hide another. Each test
# has its own time limit (test/harness.ts); each runtime's whole run has one
# too, for a loop that never yields. `--repeat N` runs both N times and
# records each run in bench/results/TEST-RUNS.md, to show the suite is not flaky.
strip() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }
count() { grep -oE "$1" | grep -oE '[0-9]+' | head -1 || echo 0; }
status=0
rows=()

# The packages and the executable, once (test/release/package_check.ts):
# installed fresh and used on every runtime, npx, no runtime on PATH.
env "$mark" timeout -k 10 600 node --test --test-force-exit test/release/package_check.ts 2>&1 |
  tee "$out/release" || status=1
check_leftovers release || status=1
printf 'release: %s passed, %s failed\n' "$(strip "$out/release" | count '^ℹ pass [0-9]+$')" \
  "$(strip "$out/release" | count '^ℹ fail [0-9]+$')"
# The conformance suite against the Workers example in workerd (one Durable
# Object per stream, without the subscription APIs), once: it runs no runtime of ours.
env "$mark" bash test/conformance.sh workers 2>&1 | tee "$out/workers-conformance" || status=1
check_leftovers "workers conformance" || status=1
tests=$(strip "$out/workers-conformance" | grep -E '^ +Tests ' | tail -1 || true)
printf 'workers conformance: %s passed, %s failed, %s skipped\n' "$(count '[0-9]+ passed' <<<"$tests")" \
  "$(count '[0-9]+ failed' <<<"$tests")" "$(count '[0-9]+ skipped' <<<"$tests")"
for run in $(seq "$repeat"); do
  for runtime in deno bun node; do
    started=$SECONDS
    if [ "$runtime" = deno ]; then
      env "$mark" timeout -k 10 900 deno test --allow-all 2>&1 | tee "$out/$runtime" || status=1
    elif [ "$runtime" = bun ]; then
      env "$mark" timeout -k 10 900 bun test 2>&1 | tee "$out/$runtime" || status=1
    else
      # Node 26 from npm (package.json): it strips the types itself. Its runner
      # waits for the event loop to empty; the others end once the tests have.
      env "$mark" timeout -k 10 900 node --test --test-force-exit mod_test.ts test/*_test.ts 2>&1 |
        tee "$out/$runtime" || status=1
    fi
    check_leftovers "$runtime" || status=1
    # The Durable Streams conformance suite (vitest, run by Node) against
    # server.ts on this runtime, then against two processes on one port
    # sharing Redis; its own skips stay skipped, nothing filtered.
    for mode in single --cluster; do
      log="$out/$runtime-conformance$mode"
      env "$mark" bash test/conformance.sh "$runtime" ${mode#single} 2>&1 | tee "$log" || status=1
      check_leftovers "$runtime conformance $mode" || status=1
      tests=$(strip "$log" | grep -E '^ +Tests ' | tail -1 || true)
      printf '%s conformance (%s): %s passed, %s failed, %s skipped\n' "$runtime" "${mode#--}" \
        "$(count '[0-9]+ passed' <<<"$tests")" "$(count '[0-9]+ failed' <<<"$tests")" \
        "$(count '[0-9]+ skipped' <<<"$tests")"
    done
    # Deno counts the tests inside describe() as steps of a top-level test;
    # Bun counts every test. One plain summary line per runtime.
    if [ "$runtime" = deno ]; then
      # No such line when the run was killed or did not start: then 0 passed.
      line=$(strip "$out/deno" | grep -E '^(ok|FAILED) \|' | tail -1 || true)
      passed=$(count '[0-9]+ passed' <<<"$line")
      failed=$(count '[0-9]+ failed' <<<"$line")
      steps=$(count '[0-9]+ steps?' <<<"$line")
      echo "deno ran $passed tests with $steps steps"
    elif [ "$runtime" = bun ]; then
      passed=$(strip "$out/bun" | count '^ *[0-9]+ pass$')
      failed=$(strip "$out/bun" | count '^ *[0-9]+ fail$')
    else
      passed=$(strip "$out/node" | count '^ℹ pass [0-9]+$')
      failed=$(strip "$out/node" | count '^ℹ fail [0-9]+$')
    fi
    printf '%s: %s passed, %s failed\n' "$runtime" "$passed" "$failed"
    if [ "$runtime" = deno ]; then passed="$passed ($steps steps)"; fi
    rows+=("| $run | $runtime | $passed | $failed | $((SECONDS - started)) s |")
  done
done

if [ "$repeat" -gt 1 ]; then
  {
    echo "# The whole suite, $repeat times in a row on each runtime"
    echo
    echo "Written by \`npm run test:repeat\` on $(date -u +%Y-%m-%d), $(nproc) cores,"
    echo "Deno $(deno --version | head -1 | cut -d' ' -f2), Bun $(bun --version), Node $(node --version)."
    echo "Deno counts the tests inside \`describe()\` as steps of a top-level test; Bun counts every test."
    echo "Outcome: $([ $status = 0 ] && echo "no failure, nothing left running" || echo "FAILURES")."
    echo
    echo "| run | runtime | passed | failed | time |"
    echo "|---:|---|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
  } >bench/results/TEST-RUNS.md
  echo "recorded in bench/results/TEST-RUNS.md"
fi
exit $status
