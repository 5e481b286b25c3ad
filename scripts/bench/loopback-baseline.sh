#!/bin/bash
# A mirror baseline over loopback, timed by the source: fills a 16 GiB volume with FILL
# (default 2G) of 1 MiB sequential writes unmirrored, then starts `receive` and
# `serve --mirror-mode sync` on 127.0.0.1 and prints the source's "mirror baseline done"
# line and both processes' CPU time (ticks of 10 ms). For quick A/B runs of one change
# (the bench's mirror suite does the same over the veth, with a disk and link reference):
#   ROOT=/path/to/other/tree scripts/bench/loopback-baseline.sh 2G   # the build under ROOT
#   PROF=1 ...                                                       # --cpu-prof into $W/prof
#   RESYNC=1 ...   # then: the receiver stopped, a quarter of FILL rewritten with 1 MiB random
#                  # writes, the receiver started again: prints "mirror resync done" too
# Needs fio; uses /var/tmp/nvm-loopback-baseline and port 17999.
set -euo pipefail
FILL=${1:-2G}
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
W=${W:-/var/tmp/nvm-loopback-baseline}
MAIN="$ROOT/dist/src/cli/main.js"
FLAGS="--max-semi-space-size=8"   # src/cli/node-flags.ts
rm -rf "$W"; mkdir -p "$W"
# Waits until the source ($SP) logs $1, then prints that line (fails if the source exits first).
wait_logged() {
  until grep -q "$1" "$W/src.log" 2>/dev/null; do
    kill -0 "$SP" 2>/dev/null || { echo "the source exited: $(tail -3 "$W/src.log")" >&2; exit 1; }
    sleep 0.05
  done
  grep "$1" "$W/src.log" | head -1
}
node $FLAGS "$MAIN" create "$W/vol" --size 16G --nvram-size 32M >/dev/null
node $FLAGS "$MAIN" serve "$W/vol" --socket "$W/s" --cp-interval 1000 > "$W/fill.log" 2>&1 &
SP=$!
while ! [ -S "$W/s" ]; do sleep 0.1; done
fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$W/s" --rw=write --bs=1M --iodepth=8 --size="$FILL" --output=/dev/null
kill "$SP"; wait "$SP" || true
PO=()
if [ -n "${PROF:-}" ]; then mkdir -p "$W/prof"; PO=(--cpu-prof --cpu-prof-dir="$W/prof"); fi
node $FLAGS "${PO[@]}" "$MAIN" receive "$W/rx" --listen 127.0.0.1:17999 --export-socket "$W/e" --mirror-insecure > "$W/rx.log" 2>&1 &
RP=$!
while ! [ -S "$W/e" ]; do sleep 0.1; done
node $FLAGS "${PO[@]}" "$MAIN" serve "$W/vol" --socket "$W/s" --cp-interval 1000 --mirror-to 127.0.0.1:17999 --mirror-mode sync --mirror-insecure > "$W/src.log" 2>&1 &
SP=$!
wait_logged "mirror baseline done"
echo "source CPU ticks $(awk '{print $14+$15}' /proc/$SP/stat), receiver CPU ticks $(awk '{print $14+$15}' /proc/$RP/stat)"
if [ -n "${RESYNC:-}" ]; then
  kill -INT "$RP"; wait "$RP" || true
  BYTES=$(numfmt --from=iec "$FILL")
  fio --name=rewrite --ioengine=nbd --uri="nbd+unix:///?socket=$W/s" --rw=randwrite --bs=1M --iodepth=8 --size="$FILL" \
    --io_size=$((BYTES / 4)) --norandommap=1 --output=/dev/null
  S0=$(awk '{print $14+$15}' /proc/$SP/stat)
  node $FLAGS "${PO[@]}" "$MAIN" receive "$W/rx" --listen 127.0.0.1:17999 --export-socket "$W/e" --mirror-insecure >> "$W/rx.log" 2>&1 &
  RP=$!
  wait_logged "mirror resync done"
  echo "resync: source CPU ticks $(( $(awk '{print $14+$15}' /proc/$SP/stat) - S0 )), receiver CPU ticks $(awk '{print $14+$15}' /proc/$RP/stat)"
fi
kill -INT "$SP"; wait "$SP" || true
kill -INT "$RP"; wait "$RP" || true
