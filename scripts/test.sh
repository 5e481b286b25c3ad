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

# Each group runs under its own time budget so a hang in one cannot eat the whole budget.
# Groups that leave a CPU idle run side by side (start ... then finish): unit and crash
# tests are single-threaded mocha processes, and most mirror tests wait on process start-ups
# and on each other's "hosts" (measured: the mirror group alone left 41% of the two CPUs
# idle, unit 54%, crash 33%). Each writes its own log, printed whole when it ends.
status=0
passed=0; failed=0; skipped=0
logs=$(mktemp -d); failures=$(mktemp); trap 'rm -rf "$logs" "$failures"' EXIT
declare -A pids
start() {
  local name=$1 budget=$2; shift 2
  ( rc=0; timeout --kill-after=30 "$budget" npx mocha "$@" > "$logs/$name.log" 2>&1 || rc=$?; echo "$rc" > "$logs/$name.rc" ) &
  pids[$name]=$!
  echo "$budget" > "$logs/$name.budget"
}
finish() {
  local name=$1
  [ -z "${pids[$name]}" ] || wait "${pids[$name]}" || true
  local out="$logs/$name.log" rc budget
  rc=$(cat "$logs/$name.rc" 2>/dev/null || echo 1); budget=$(cat "$logs/$name.budget")
  if [ ! -e "$logs/$name.streamed" ]; then echo "=== $name ==="; cat "$out"; fi
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
# A group run alone streams its output as it goes.
run() {
  local name=$1 budget=$2; shift 2
  echo "=== $name ==="
  echo "$budget" > "$logs/$name.budget"; touch "$logs/$name.streamed"
  local rc=0
  timeout --kill-after=30 "$budget" npx mocha "$@" 2>&1 | tee "$logs/$name.log" || rc=$?
  echo "$rc" > "$logs/$name.rc"
  pids[$name]=""
  finish "$name"
}

start unit 600 'dist/test/unit/**/*.test.js'
start crash 900 'dist/test/crash/**/*.test.js'
start sim 300 'dist/test/sim/**/*.test.js'
finish unit; finish crash; finish sim
run e2e 900 'dist/test/e2e/**/*.test.js'
# The mirror group in two lanes of about the same length; a new file joins the second.
# ext4 through nbdfuse and loop devices runs alone after them: the kernel's loop and FUSE
# teardown under the other lane's load once outlasted its waits (nbdfuse not gone in 15 s).
MIRROR_LANE_A=(dist/test/mirror/failover.test.js dist/test/mirror/raid-mirror.test.js)
MIRROR_ALONE=(dist/test/mirror/mirror-ext4.test.js)
ignore=(); for f in "${MIRROR_LANE_A[@]}" "${MIRROR_ALONE[@]}"; do ignore+=(--ignore "$f"); done
start mirror-failover 900 "${MIRROR_LANE_A[@]}"
start mirror 900 'dist/test/mirror/**/*.test.js' --ignore 'dist/test/mirror/faults*.test.js' "${ignore[@]}"
finish mirror-failover; finish mirror
run mirror-ext4 300 "${MIRROR_ALONE[@]}"
# The mirror's fault suite (network, disk, endurance: about 5 minutes) runs alone: its
# stalls and timeouts are measured against a machine nothing else is loading.
run mirror-faults 600 'dist/test/mirror/faults*.test.js'
run kernel 600 'dist/test/kernel/**/*.test.js'
echo
if [ -s "$failures" ]; then echo "=== what failed ==="; cat "$failures"; echo; fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit $status
