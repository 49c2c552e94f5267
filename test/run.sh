#!/usr/bin/env bash
# Every check and every test, on both runtimes. Run it as `npm test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/node_modules/.bin:$PATH"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The browser test drives Debian's Chromium (never a downloaded browser); the
# cluster test runs Debian's redis-server. Installed here when missing.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
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
deno check mod.ts redis.ts server.ts runtime.ts bench/servers/ test/
deno check --doc mod.ts   # the JSDoc examples type-check
deno doc --lint mod.ts redis.ts

# The same test files on both runtimes. A runtime's failure fails the run,
# after both have run, so one red runtime does not hide the other.
status=0
deno test --allow-all 2>&1 | tee "$out/deno" || status=1
bun test 2>&1 | tee "$out/bun" || status=1

# One plain summary line per runtime.
strip() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }
deno_line=$(strip "$out/deno" | grep -E '^(ok|FAILED) \|' | tail -1)
# Deno counts top-level tests, with the tests inside describe() as steps; Bun counts them all.
echo "deno ran $(grep -oE '[0-9]+ passed \([0-9]+ steps?\)' <<<"$deno_line" || echo "its tests")"
printf 'deno: %s passed, %s failed\n' \
  "$(grep -oE '[0-9]+ passed' <<<"$deno_line" | grep -oE '[0-9]+' || echo 0)" \
  "$(grep -oE '[0-9]+ failed' <<<"$deno_line" | grep -oE '[0-9]+' || echo 0)"
printf 'bun: %s passed, %s failed\n' \
  "$(strip "$out/bun" | grep -oE '^ *[0-9]+ pass$' | grep -oE '[0-9]+' || echo 0)" \
  "$(strip "$out/bun" | grep -oE '^ *[0-9]+ fail$' | grep -oE '[0-9]+' || echo 0)"
exit $status
