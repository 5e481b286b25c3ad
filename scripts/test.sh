#!/usr/bin/env bash
# Installs everything the tests need (Debian packages via apt-get when missing, npm
# dependencies, the native addon and the TypeScript build), then runs every test:
# unit, end-to-end with real NBD clients, the seeded fault-injecting simulator, crash
# tests (kill -9 and power-loss enumeration) and the kernel VM tests.
# In CI (CI=true) a missing tool is a failure, never a skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-test-deps.sh
# Either one builds the addon (install: node-gyp) and the TypeScript (prepare: npm run
# build, which empties dist/ first), so nothing stale is tested and nothing builds twice.
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi

# A JS callback called from native code that throws is an uncaught exception here, in the
# test runner and in every nvmirror process the tests start (Node's default only warns,
# once per process, and goes on: a failed assertion in such a callback would pass silently).
export NODE_OPTIONS="${NODE_OPTIONS:+$NODE_OPTIONS }--force-node-api-uncaught-exceptions-policy=true"

# Each group runs on its own so a hang in one cannot eat the whole budget.
status=0
passed=0; failed=0; skipped=0
out=$(mktemp); failures=$(mktemp); trap 'rm -f "$out" "$failures"' EXIT
run() {
  local name=$1 budget=$2; shift 2
  echo "=== $name ==="
  local rc=0
  timeout --kill-after=30 "$budget" npx mocha "$@" 2>&1 | tee "$out" || rc=$?
  local p f s
  p=$(sed -n 's/^ *\([0-9][0-9]*\) passing.*/\1/p' "$out" | tail -1)
  f=$(sed -n 's/^ *\([0-9][0-9]*\) failing.*/\1/p' "$out" | tail -1)
  s=$(sed -n 's/^ *\([0-9][0-9]*\) pending.*/\1/p' "$out" | tail -1)
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); skipped=$((skipped + ${s:-0}))
  # What failed, again at the very end (CI logs are often read from the tail): mocha's
  # failure section without stack frames, at most 60 lines per group.
  if [ -n "$f" ] && [ "$f" != 0 ]; then
    { echo "--- $name: $f failing"; sed -n '/^ *[0-9][0-9]* failing/,$p' "$out" | sed 1d | grep -v -e '^ *at ' -e '^ *$' | head -60; } >> "$failures"
  fi
  if [ "$rc" != 0 ]; then
    echo "=== $name: FAILED (exit $rc) ===" >&2
    [ -n "$f" ] && [ "$f" != 0 ] || echo "--- $name: exit $rc ($( [ "$rc" = 124 ] && echo "timed out after ${budget}s" || echo "no mocha failure count"))" >> "$failures"
    status=1
    [ -n "$f" ] || failed=$((failed + 1))
  fi
}
run unit 600 'dist/test/unit/**/*.test.js'
run e2e 900 'dist/test/e2e/**/*.test.js'
run sim 300 'dist/test/sim/**/*.test.js'
run mirror 900 'dist/test/mirror/**/*.test.js' --ignore 'dist/test/mirror/faults*.test.js'
# The mirror's fault suite (network, disk, endurance: about 5 minutes) has its own budget.
run mirror-faults 600 'dist/test/mirror/faults*.test.js'
run crash 900 'dist/test/crash/**/*.test.js'
run kernel 600 'dist/test/kernel/**/*.test.js'
echo
if [ -s "$failures" ]; then echo "=== what failed ==="; cat "$failures"; echo; fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit $status
