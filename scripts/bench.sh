#!/usr/bin/env bash
# `npm run bench` (after `npm run build`): fio's nbd engine against nvmirror and nbdkit,
# same run, alternating, Unix sockets. The runner is TypeScript (scripts/bench/*.ts,
# compiled by the build to dist/scripts/bench/). See docs/benchmarks.md for the method
# and the knobs (BENCH_ROUNDS, BENCH_RUNTIME, BENCH_QUICK, BENCH_JSON, ...).
#
# Invariants:
# - exits non-zero, with one line saying why, if a tool or a build output is missing;
# - otherwise its exit status is the runner's (non-zero on any server or fio failure).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for t in fio nbdkit fallocate; do
  command -v "$t" >/dev/null 2>&1 || { echo "bench: $t is not installed (run scripts/install-test-deps.sh)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || { echo "bench: this fio has no nbd ioengine" >&2; exit 1; }
[ -f "$root/dist/scripts/bench/main.js" ] || { echo "bench: $root/dist/scripts/bench/main.js is missing: run npm run build" >&2; exit 1; }
[ -f "$root/build/Release/nvmirror_native.node" ] || { echo "bench: the native addon is not built: run npx node-gyp rebuild" >&2; exit 1; }
exec node "$root/dist/scripts/bench/main.js" "$@"
