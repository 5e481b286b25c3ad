#!/usr/bin/env bash
# Runs inside the kernel-vm guest (root, real nbd driver), from the repository root.
# One boot runs every kernel check; each check prints exactly one line
#   PASS <name>            or   FAIL <name>: <reason>
# plus "TIME <name> <ms>" lines; test/kernel/attach.test.ts asserts on them.
# Usage: guest-suite.sh [--app DIR] [--serve HOST:PORT:EXPORT] [--engine] [--raid] [--netem]
#   --app: a copy of the build to run (package.json, dist/, build/Release/, node_modules),
#          so that a rebuild in the checkout during the run cannot change files under us;
#          default: the checkout itself.
#   --serve: an `nvmirror serve` on the host to check with nbd-client.
#   --engine: also attach an engine volume directory (nvmirror create DIR).
#   --raid: also a RAID-5 volume over 4 member files, with a member deleted while
#           attached (XFS, xfs_repair -n clean), attached again degraded.
#   --netem: also the mirror between two network namespaces joined by a veth pair, with
#           netem on the link (reordering; loss and duplication; 100 ms delay) while a
#           client writes; it converges once the fault ends.
# Every step that talks to a device is bounded with `timeout`, so a hung kernel request
# shows up as a FAIL line, never as a stuck guest.
set -u
APP=$(pwd)
serve=""; engine=0; raid=0; netem=0
while [ $# -gt 0 ]; do case "$1" in --app) APP=$2; shift 2;; --serve) serve=$2; shift 2;; --engine) engine=1; shift;; --raid) raid=1; shift;; --netem) netem=1; shift;; *) echo "FAIL args: unknown $1"; exit 2;; esac; done
NV=(node "$APP/dist/src/cli/main.js")

export NVMIRROR_LOG_LEVEL=info
# Mount propagation shared, as systemd sets it: `ip netns exec` (the netem check, lane A)
# gives each process it starts a copy of the mount table, made a slave of this one. With
# the guest's default (private), a filesystem lane B mounts while such a process runs stays
# mounted in that process's copy after lane B's umount: XFS then never writes its unmount
# record, and xfs_repair -n finds a dirty log (raid5-xfs-degraded failed so, intermittently).
# Shared, the umount reaches every copy.
mount --make-rshared / || { echo "FAIL setup: mount --make-rshared / failed"; exit 1; }
W=/tmp/kt; mkdir -p "$W/src" "$W/mnt"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; }
T0=$(now_ms)
timed() { echo "TIME $1 $(( $(now_ms) - $2 ))"; }

# Source files of several sizes (random contents), written to every filesystem.
SIZES="0 1 511 4096 65537 1048583 6291456"
for s in $SIZES; do head -c "$s" /dev/urandom > "$W/src/f$s"; done
(cd "$W/src" && sha256sum f* > "$W/sums")

# attach_bg NAME DEV ARGS...: starts `nvmirror attach ARGS DEV` in the background and waits
# until the kernel shows DEV configured. Sets APID. Logs in $W/NAME.out / .err.
attach_bg() {
  local name=$1 dev=$2; shift 2
  "${NV[@]}" attach "$@" "$dev" > "$W/$name.out" 2> "$W/$name.err" &
  APID=$!
  local n=${dev#/dev/nbd} i
  for i in $(seq 600); do
    [ -e "/sys/block/nbd$n/pid" ] && grep -q attached "$W/$name.out" && return 0
    kill -0 "$APID" 2>/dev/null || { fail "$name" "attach exited early: $(tail -c 300 "$W/$name.err" | tr '\n' ' ')"; return 1; }
    sleep 0.1
  done
  fail "$name" "attach did not come up in 60 s"; kill -9 "$APID"; return 1
}

# stop_attach NAME SIGNAL: signals the attach process and expects exit 0 and DEV free.
stop_attach() {
  local name=$1 sig=$2 dev=$3 rc
  kill "-$sig" "$APID"
  timeout 30 tail --pid="$APID" -f /dev/null; wait "$APID"; rc=$?
  if [ "$rc" != 0 ]; then fail "$name" "attach exited $rc after SIG$sig: $(tail -c 300 "$W/$name.err" | tr '\n' ' ')"; return 1; fi
  # The kernel tears the device down after the disconnect; give it a moment (at most 5 s).
  local i
  for i in $(seq 50); do [ -e "/sys/block/${dev#/dev/}/pid" ] || break; sleep 0.1; done
  if [ -e "/sys/block/${dev#/dev/}/pid" ]; then fail "$name" "$dev still attached 5 s after SIG$sig"; return 1; fi
  return 0
}

# fs_cycle NAME DEV FSTYPE: mkfs, mount, write the files (each fsynced), umount, fsck
# clean, mount again, checksums match, umount.
fs_cycle() {
  local name=$1 dev=$2 fs=$3 mnt="$W/mnt/$1" t
  t=$(now_ms)
  mkdir -p "$mnt"
  case $fs in
    ext4) timeout 120 mkfs.ext4 -q -F "$dev" > "$W/$name.mkfs" 2>&1 ;;
    xfs) timeout 120 mkfs.xfs -q -f "$dev" > "$W/$name.mkfs" 2>&1 ;;
  esac || { fail "$name" "mkfs.$fs failed: $(tail -c 200 "$W/$name.mkfs" | tr '\n' ' ')"; return 1; }
  timeout 60 mount -t "$fs" "$dev" "$mnt" || { fail "$name" "mount failed"; return 1; }
  local s
  for s in $SIZES; do
    timeout 60 cp "$W/src/f$s" "$mnt/f$s" && timeout 60 sync "$mnt/f$s" || { fail "$name" "write/fsync of f$s failed"; umount -l "$mnt"; return 1; }
  done
  timeout 60 umount "$mnt" || { fail "$name" "umount failed"; return 1; }
  case $fs in
    ext4) timeout 120 e2fsck -fn "$dev" > "$W/$name.fsck" 2>&1 ;;
    xfs) timeout 120 xfs_repair -n "$dev" > "$W/$name.fsck" 2>&1 ;;
  esac || { fail "$name" "fsck not clean: $(tail -c 300 "$W/$name.fsck" | tr '\n' ' ')"; return 1; }
  # Drop caches so the second mount reads everything back through nbd.
  echo 3 > /proc/sys/vm/drop_caches
  timeout 60 mount -t "$fs" "$dev" "$mnt" || { fail "$name" "second mount failed"; return 1; }
  (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums") > "$W/$name.sums" 2>&1 || { fail "$name" "checksums differ: $(head -c 200 "$W/$name.sums" | tr '\n' ' ')"; umount -l "$mnt"; return 1; }
  timeout 60 umount "$mnt" || { fail "$name" "final umount failed"; return 1; }
  timed "$name" "$t"
  return 0
}

# Two lanes run side by side (the guest has two vCPUs); each uses its own devices and
# never stalls a device the other touches. Lane A: nbd0, nbd3, nbd4. Lane B: nbd2, nbd6,
# nbd7, nbd8, nbd9. Lane A ends with the mirror check (--netem, no nbd device), lane B
# with the RAID-5 one (--raid): the guest is CPU-bound, so a third lane would only slow
# the others. The no-driver check runs after both.

# expect_out NAME WANT_RC PATTERN CMD...: runs CMD, passes if it exits WANT_RC and its
# output contains PATTERN (a fixed string).
expect_out() {
  local name=$1 want=$2 pat=$3 out rc; shift 3
  out=$(timeout 60 "$@" 2>&1); rc=$?
  if [ "$rc" = "$want" ] && grep -qF -- "$pat" <<<"$out"; then pass "$name"; else fail "$name" "rc=$rc: $(tr '\n' ' ' <<<"$out" | tail -c 300)"; fi
}

lane_a() {
  local t out rc arc mnt
  # --- file volume, ext4, 512-byte blocks, netlink; detached by `nvmirror detach` ------
  truncate -s 256M "$W/ext4.img"
  t=$(now_ms)
  if attach_bg attach-ext4 /dev/nbd0 --file "$W/ext4.img" --interface netlink; then
    timed attach-up-first "$t"
    if ! grep -q 'via netlink' "$W/attach-ext4.out"; then fail attach-ext4 "not attached via netlink: $(cat "$W/attach-ext4.out")"
    elif fs_cycle attach-ext4 /dev/nbd0 ext4; then pass attach-ext4; fi
    # Refusals with clear messages, run side by side: busy device, not root, bad name.
    local p1 p2 p3
    expect_out error-busy 1 'is busy (attached by pid' "${NV[@]}" attach --memory 16M /dev/nbd0 & p1=$!
    expect_out error-not-root 1 'needs root (CAP_SYS_ADMIN)' setpriv --reuid=65534 --regid=65534 --clear-groups "${NV[@]}" attach --memory 16M /dev/nbd5 & p2=$!
    expect_out error-bad-device 1 'expected /dev/nbdN' "${NV[@]}" attach --memory 16M /dev/sda & p3=$!
    wait $p1 $p2 $p3
    # Detach from another process: the attach process notices and exits 0.
    out=$(timeout 30 "${NV[@]}" detach /dev/nbd0 2>&1); rc=$?
    timeout 30 tail --pid="$APID" -f /dev/null; wait "$APID"; arc=$?
    if [ $rc = 0 ] && [ $arc = 0 ] && [ ! -e /sys/block/nbd0/pid ] && grep -q 'was detached' "$W/attach-ext4.out"; then pass detach-external
    else fail detach-external "detach rc=$rc ($out), attach exit $arc, $(tail -c 200 "$W/attach-ext4.err" | tr '\n' ' ')"; fi
    expect_out error-not-attached 1 '/dev/nbd0 is not attached' "${NV[@]}" detach /dev/nbd0
  fi

  # --- the same image again, through the ioctl interface: the data persisted -----------
  if attach_bg reattach-ioctl /dev/nbd0 --file "$W/ext4.img" --interface ioctl; then
    mnt="$W/mnt/reattach"; mkdir -p "$mnt"
    if ! grep -q 'via ioctl' "$W/reattach-ioctl.out"; then fail reattach-ioctl "not attached via ioctl"
    elif timeout 60 mount -t ext4 /dev/nbd0 "$mnt"; then
      if (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums") > "$W/reattach.sums" 2>&1; then pass reattach-ioctl
      else fail reattach-ioctl "checksums differ after re-attach"; fi
      timeout 60 umount "$mnt" || umount -l "$mnt"
    else fail reattach-ioctl "mount failed"; fi
    stop_attach reattach-ioctl TERM /dev/nbd0 && pass sigterm-exit0
  fi

  # --- a stalled nvmirror: requests fail after --timeout, no hang ----------------------
  if attach_bg stall /dev/nbd3 --memory 64M --timeout 4; then
    mnt="$W/mnt/stall"; mkdir -p "$mnt"
    if timeout 60 mkfs.ext4 -q -F /dev/nbd3 && timeout 60 mount /dev/nbd3 "$mnt"; then
      kill -STOP "$APID"
      t=$(now_ms)
      timeout 60 dd if=/dev/urandom of="$mnt/x" bs=64k count=16 conv=fsync status=none 2>/dev/null; rc=$?
      el=$(( $(now_ms) - t ))
      echo "TIME stall-error $el"
      if [ $rc != 0 ] && [ $rc != 124 ] && [ $el -lt 30000 ]; then pass stall-io-error; else fail stall-io-error "dd rc=$rc after ${el} ms (expected an I/O error within ~4 s + margin)"; fi
      timeout 30 umount "$mnt" 2>/dev/null || umount -l "$mnt"
      kill -CONT "$APID"
      # The kernel dropped the connection: nvmirror detaches the device and exits 1.
      timeout 30 tail --pid="$APID" -f /dev/null; wait "$APID"; arc=$?
      if [ $arc = 1 ] && [ ! -e /sys/block/nbd3/pid ] && grep -q 'lost the connections' "$W/stall.err"; then pass stall-cleanup
      else fail stall-cleanup "attach exit $arc, attached=$([ -e /sys/block/nbd3/pid ] && echo yes || echo no), $(tail -c 200 "$W/stall.err" | tr '\n' ' ')"; fi
    else fail stall-io-error "mkfs/mount failed"; kill -9 "$APID"; fi
  fi

  # --- nvmirror killed while mounted: I/O errors, no hang; detach cleans up ------------
  if attach_bg kill /dev/nbd4 --memory 64M --timeout 4; then
    mnt="$W/mnt/kill"; mkdir -p "$mnt"
    if timeout 60 mkfs.ext4 -q -F /dev/nbd4 && timeout 60 mount /dev/nbd4 "$mnt" && cp "$W/src/f65537" "$mnt/" && timeout 60 sync -f "$mnt"; then
      # An fsynced write in flight when nvmirror dies.
      (dd if=/dev/urandom of="$mnt/y" bs=64k count=64 conv=fsync status=none 2>/dev/null; echo $? > "$W/kill.dd1") &
      local ddpid=$!
      sleep 0.3
      kill -9 "$APID"; wait "$APID" 2>/dev/null
      t=$(now_ms)
      timeout 60 tail --pid=$ddpid -f /dev/null
      timeout 60 dd if=/dev/urandom of="$mnt/z" bs=64k count=16 conv=fsync status=none 2>/dev/null; rc2=$?
      timeout 60 dd if=/dev/nbd4 of=/dev/null bs=4096 count=1 skip=5000 iflag=direct status=none 2>/dev/null; rc3=$?
      el=$(( $(now_ms) - t ))
      echo "TIME kill-error $el"
      if [ $rc2 != 0 ] && [ $rc2 != 124 ] && [ $rc3 != 0 ] && [ $rc3 != 124 ] && [ $el -lt 30000 ]; then pass kill-io-error
      else fail kill-io-error "dd rc=$rc2/$rc3 (in flight: $(cat "$W/kill.dd1" 2>/dev/null)) after ${el} ms"; fi
      timeout 30 umount "$mnt" 2>/dev/null || umount -l "$mnt"
      out=$(timeout 30 "${NV[@]}" detach /dev/nbd4 2>&1); rc=$?
      if [ $rc = 0 ] && [ ! -e /sys/block/nbd4/pid ]; then pass kill-detach; else fail kill-detach "detach rc=$rc: $out"; fi
    else fail kill-io-error "mkfs/mount/write failed"; kill -9 "$APID"; fi
  fi
  if [ $netem = 1 ]; then mirror_netem_check; fi
}

lane_b() {
  local out rc mnt sect lbs shost sport sname
  # --- XFS, 4096-byte blocks (4 KiB sectors), two connections; SIGINT -------------------
  truncate -s 320M "$W/xfs4k.img"
  if attach_bg attach-xfs-4k /dev/nbd2 --file "$W/xfs4k.img" --block-size 4096 --connections 2; then
    lbs=$(cat /sys/block/nbd2/queue/logical_block_size)
    if [ "$lbs" != 4096 ]; then fail attach-xfs-4k "logical block size $lbs, expected 4096"
    elif fs_cycle attach-xfs-4k /dev/nbd2 xfs; then
      sect=$(timeout 30 xfs_db -r -c 'sb 0' -c 'p sectsize' /dev/nbd2 2>&1)
      if [ "$sect" = "sectsize = 4096" ]; then pass attach-xfs-4k; else fail attach-xfs-4k "xfs sector size: $sect"; fi
    fi
    stop_attach attach-xfs-4k INT /dev/nbd2 && pass sigint-exit0
  fi

  # --- nbd-client against `nvmirror serve` on the host ----------------------------------
  if [ -n "$serve" ]; then
    IFS=: read -r shost sport sname <<<"$serve"
    out=$(timeout 60 nbd-client "$shost" "$sport" /dev/nbd6 -N "$sname" -t 20 2>&1); rc=$?
    if [ $rc != 0 ]; then fail nbd-client-ext4 "nbd-client rc=$rc: $out"
    else
      fs_cycle nbd-client-ext4 /dev/nbd6 ext4 && pass nbd-client-ext4
      timeout 30 nbd-client -d /dev/nbd6 > /dev/null 2>&1
    fi
    # Again with the ioctl interface (-L) and 4 KiB blocks: the files are still on the server.
    out=$(timeout 60 nbd-client "$shost" "$sport" /dev/nbd7 -N "$sname" -L -b 4096 2>&1); rc=$?
    if [ $rc != 0 ]; then fail nbd-client-ioctl "nbd-client -L rc=$rc: $out"
    else
      mnt="$W/mnt/ncl"; mkdir -p "$mnt"
      if timeout 60 mount -t ext4 /dev/nbd7 "$mnt" && (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums") > /dev/null 2>&1; then pass nbd-client-ioctl
      else fail nbd-client-ioctl "mount or checksums failed"; fi
      timeout 30 umount "$mnt" 2>/dev/null || umount -l "$mnt"
      timeout 30 nbd-client -d /dev/nbd7 > /dev/null 2>&1
    fi
  fi

  # --- an engine volume directory -------------------------------------------------------
  if [ $engine = 1 ]; then
    if timeout 120 "${NV[@]}" create "$W/engine" --size 320M --nvram-size 16M > "$W/engine-create.out" 2>&1; then
      if attach_bg attach-engine /dev/nbd8 "$W/engine" --block-size 4096; then
        fs_cycle attach-engine /dev/nbd8 ext4 && pass attach-engine
        stop_attach attach-engine TERM /dev/nbd8 || true
        # The data outlives the process: attach the directory again and compare.
        if attach_bg attach-engine-again /dev/nbd8 "$W/engine" --block-size 4096; then
          mnt="$W/mnt/engine2"; mkdir -p "$mnt"
          if timeout 60 mount -t ext4 /dev/nbd8 "$mnt" && (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums") > /dev/null 2>&1; then pass attach-engine-again
          else fail attach-engine-again "mount or checksums failed"; fi
          timeout 30 umount "$mnt" 2>/dev/null || umount -l "$mnt"
          stop_attach attach-engine-again TERM /dev/nbd8 || true
        fi
      fi
    else fail attach-engine "nvmirror create failed: $(tail -c 200 "$W/engine-create.out" | tr '\n' ' ')"; fi
  fi
  if [ $raid = 1 ]; then need_tools raid5-xfs-degraded jq mkfs.xfs xfs_repair && raid5_check; fi
}

# --- a RAID-5 volume over 4 member files, a member deleted while attached ---------------
# XFS on the volume; member 1's file is deleted while mounted, the engine takes it out of
# service (status: FAULTED, "was deleted"), more files are written and everything is read
# back (m1's units rebuilt from parity), xfs_repair -n is clean. Then the volume is
# attached again without that member (degraded from the open): status says so, both file
# sets' checksums match and xfs_repair -n is clean.
RAID_MEMBERS=4
# Longest wait for status to show the deleted member out of service (its next CP's sync).
RAID_NOTICE_S=60
# The files written after the member is gone (fewer than SIZES: the guest is slow).
RAID_SIZES_AFTER="1 4096 65537 1048583 2097169"
raid_status() { # DIR: "<state> <member 1's state>: <its reason>" from status --json
  timeout 60 "${NV[@]}" status "$1" --json 2>/dev/null | jq -r '"\(.raid.state) \(.raid.memberStatus[1].state): \(.raid.memberStatus[1].reason // "")"'
}
# fsck_problems FILE: what xfs_repair -n complained about (its progress lines left out), one line.
fsck_problems() {
  grep -v -e '^Phase [0-9]' -e '^ *- ' -e '^No modify flag set' -e '^ *agno = ' "$1" | head -c 600 | tr '\n' ' '
}
# raid5_diag NAME DIR DEV: after a failure, what the kernel and nvmirror said (DIAG lines).
raid5_diag() {
  { echo "--- kernel log (last 25 lines)"; dmesg | tail -25
    echo "--- $1: nvmirror warnings and errors"; grep -v '"level":30' "$W/$1.err" | tail -15 | cut -c1-300
    echo "--- status"; timeout 30 "${NV[@]}" status "$2" 2>&1 | head -30
    echo "--- xfs in the kernel log"; dmesg | grep -i 'xfs' | tail -6
    echo "--- mount namespaces still holding $3"; grep -l "^[^ ]* [^ ]* [^ ]* [^ ]* [^ ]* [^ ]* .* $3 " /proc/[0-9]*/mountinfo 2>/dev/null | head -5 | while read -r f; do p=${f#/proc/}; p=${p%%/*}; echo "pid $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-120)"; done
    echo "--- space"; df -h /tmp 2>&1 | tail -1; free -m | head -2
  } | sed "s/^/DIAG $1: /"
}
raid5_check() {
  local name=raid5-xfs-degraded dir="$W/raid5" dev=/dev/nbd9 mnt="$W/mnt/raid5" t s st i members=()
  t=$(now_ms)
  mkdir -p "$mnt" "$W/src2"
  for s in $RAID_SIZES_AFTER; do head -c "$s" /dev/urandom > "$W/src2/g$s"; done
  (cd "$W/src2" && sha256sum g* > "$W/sums2")
  for i in $(seq 0 $((RAID_MEMBERS - 1))); do members+=(--member "m$i.img"); done
  timeout 120 "${NV[@]}" create "$dir" --size 320M --nvram-size 16M --raid 5 --stripe-unit 64K "${members[@]}" > "$W/raid5-create.out" 2>&1 \
    || { fail $name "nvmirror create --raid 5 failed: $(tail -c 200 "$W/raid5-create.out" | tr '\n' ' ')"; return 1; }
  attach_bg $name $dev "$dir" --block-size 4096 --cp-interval 500ms || return 1
  timeout 120 mkfs.xfs -q -f $dev > "$W/$name.mkfs" 2>&1 || { fail $name "mkfs.xfs failed: $(tail -c 200 "$W/$name.mkfs" | tr '\n' ' ')"; kill -9 "$APID"; return 1; }
  timeout 60 mount -t xfs $dev "$mnt" || { fail $name "mount failed"; kill -9 "$APID"; return 1; }
  for s in $SIZES; do timeout 60 cp "$W/src/f$s" "$mnt/f$s" && timeout 60 sync "$mnt/f$s" || { fail $name "write/fsync of f$s failed"; umount -l "$mnt"; kill -9 "$APID"; return 1; }; done
  # Member 1 goes away under the mounted filesystem; the next CP's sync notices.
  rm "$dir/m1.img"
  for s in $RAID_SIZES_AFTER; do timeout 60 cp "$W/src2/g$s" "$mnt/g$s" && timeout 60 sync "$mnt/g$s" || { fail $name "write/fsync of g$s after the member was deleted failed"; umount -l "$mnt"; kill -9 "$APID"; return 1; }; done
  local until=$(( $(now_ms) + RAID_NOTICE_S * 1000 ))
  while st=$(raid_status "$dir"); [[ $st != "degraded faulted: member file m1.img was deleted" ]] && [ "$(now_ms)" -lt $until ]; do sleep 1; done
  if [[ $st != "degraded faulted: member file m1.img was deleted" ]]; then fail $name "status after deleting m1.img: $st"; umount -l "$mnt"; kill -9 "$APID"; return 1; fi
  # Everything read back through nbd, with member 1 out of service.
  echo 3 > /proc/sys/vm/drop_caches
  (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums" && timeout 60 sha256sum -c --quiet "$W/sums2") > "$W/$name.sums" 2>&1 \
    || { fail $name "checksums differ with a member removed: $(head -c 200 "$W/$name.sums" | tr '\n' ' ')"; umount -l "$mnt"; kill -9 "$APID"; return 1; }
  timeout 60 umount "$mnt" || { fail $name "umount failed"; kill -9 "$APID"; return 1; }
  timeout 120 xfs_repair -n $dev > "$W/$name.fsck" 2>&1 || { fail $name "xfs_repair -n not clean with a member removed: $(fsck_problems "$W/$name.fsck")"; raid5_diag $name "$dir" $dev; kill -9 "$APID"; return 1; }
  stop_attach $name TERM $dev || return 1
  timed $name "$t"
  pass $name

  # Attached again: member 1 is missing at the open.
  name=raid5-reattach-degraded
  attach_bg $name $dev "$dir" --block-size 4096 || return 1
  st=$(raid_status "$dir")
  if [[ $st != "degraded missing: "* ]]; then fail $name "status after re-attach without m1.img: $st"
  elif ! timeout 60 mount -t xfs $dev "$mnt"; then fail $name "mount failed"
  else
    if ! (cd "$mnt" && timeout 60 sha256sum -c --quiet "$W/sums" && timeout 60 sha256sum -c --quiet "$W/sums2") > "$W/$name.sums" 2>&1; then fail $name "checksums differ: $(head -c 200 "$W/$name.sums" | tr '\n' ' ')"; timeout 60 umount "$mnt" || umount -l "$mnt"
    elif ! timeout 60 umount "$mnt"; then fail $name "umount failed"
    elif ! timeout 120 xfs_repair -n $dev > "$W/$name.fsck" 2>&1; then fail $name "xfs_repair -n not clean: $(fsck_problems "$W/$name.fsck")"
    else pass $name; fi
  fi
  stop_attach $name TERM $dev || true
}

# --- the mirror across a veth pair with netem on it (two network namespaces) ------------
# `receive` in namespace nvmb, `serve --mirror-to ... --mirror-mode sync` in nvma, netem
# on both ends of the link (so both directions), one fault per phase while nbdcopy writes
# one region of a known random image into the source (holes skipped): reordering, then
# loss + duplication, then 100 ms delay each way. Then netem goes and the mirror must
# converge: a CP holding every write with equal roots on both sides (status --json of
# each: the source's CP acknowledged with its root equal, the receiver committed it), and
# both exports byte-identical to the image.
# Neither process may crash (both alive at the end, exit 0 on SIGTERM).
NETEM_PHASES=("reorder:delay 10ms reorder 25% 50%" "loss-dup:loss 10% duplicate 10%" "delay-100ms:delay 100ms")
NETEM_REGION_MIB=2
NETEM_SIZE_MIB=16
NETEM_PORT=7301
NETEM_CONVERGE_S=120
need_tools() { # NAME TOOL...: FAIL NAME naming the missing tools
  local name=$1 miss=() x; shift
  for x in "$@"; do command -v "$x" > /dev/null || miss+=("$x"); done
  [ ${#miss[@]} = 0 ] || { fail "$name" "missing tools: ${miss[*]}"; return 1; }
}
# netem_set SPEC: the same netem on both ends (empty SPEC: none).
netem_set() {
  local ns dev
  for ns in nvma:nvva nvmb:nvvb; do
    dev=${ns#*:}; ns=${ns%:*}
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null
    if [ -n "$1" ]; then ip netns exec "$ns" tc qdisc add dev "$dev" root netem $1 || return 1; fi
  done
}
# netem_counts: "<packets sent> <dropped>" summed over both ends' netem qdiscs.
netem_counts() {
  { ip netns exec nvma tc -s qdisc show dev nvva; ip netns exec nvmb tc -s qdisc show dev nvvb; } \
    | sed -n 's/.*Sent [0-9]* bytes \([0-9]*\) pkt (dropped \([0-9]*\),.*/\1 \2/p' | awk '{p+=$1; d+=$2} END {print p+0, d+0}'
}
mirror_netem_check() {
  local name=mirror-netem t src="$W/msrc" dst="$W/mdst" ssock="$W/msrc.sock" xsock="$W/mexp.sock" spid rpid uuid ph k out st i cp want a b rc
  need_tools $name ip tc nbdcopy jq md5sum || return 1
  t=$(now_ms)
  ip netns add nvma && ip netns add nvmb && ip link add nvva type veth peer name nvvb \
    && ip link set nvva netns nvma && ip link set nvvb netns nvmb \
    && ip -n nvma addr add 10.77.0.1/24 dev nvva && ip -n nvmb addr add 10.77.0.2/24 dev nvvb \
    && ip -n nvma link set nvva up && ip -n nvmb link set nvvb up && ip -n nvma link set lo up && ip -n nvmb link set lo up \
    || { fail $name "could not set up the namespaces and the veth pair"; return 1; }
  out=$(ip netns exec nvma tc qdisc add dev nvva root netem delay 1ms 2>&1) || { fail $name "netem unavailable: tc qdisc add ... netem: $out"; return 1; }
  ip netns exec nvma tc qdisc del dev nvva root
  ip netns exec nvmb "${NV[@]}" receive "$dst" --listen 10.77.0.2:$NETEM_PORT --export-socket "$xsock" --mirror-insecure > /dev/null 2> "$W/$name.rx.log" & rpid=$!
  for i in $(seq 600); do [ -S "$xsock" ] && break; kill -0 $rpid 2>/dev/null || break; sleep 0.1; done
  [ -S "$xsock" ] || { fail $name "receive did not come up: $(tail -c 300 "$W/$name.rx.log" | tr '\n' ' ')"; kill -9 $rpid; return 1; }
  ip netns exec nvma "${NV[@]}" serve "$src" --create ${NETEM_SIZE_MIB}M --socket "$ssock" --cp-interval 300ms --mirror-to 10.77.0.2:$NETEM_PORT --mirror-mode sync --mirror-insecure > /dev/null 2> "$W/$name.sv.log" & spid=$!
  # The baseline done: the source logs it (cheaper than polling status under emulation).
  for i in $(seq 1200); do grep -q '"msg":"mirror in sync"' "$W/$name.sv.log" && break; kill -0 $spid 2>/dev/null || break; sleep 0.1; done
  grep -q '"msg":"mirror in sync"' "$W/$name.sv.log" || { fail $name "the mirror did not come in sync: $(tail -c 300 "$W/$name.sv.log" | tr '\n' ' ')"; kill -9 $spid $rpid; return 1; }
  uuid=$(jq -r .uuid "$src/nvmirror.json")
  timed $name-up "$t"

  # The image: one random region per phase; each phase writes only its own (holes skipped).
  head -c $(( ${#NETEM_PHASES[@]} * NETEM_REGION_MIB ))M /dev/urandom > "$W/$name.img"
  k=0
  for ph in "${NETEM_PHASES[@]}"; do
    local pname=${ph%%:*} spec=${ph#*:} tp; tp=$(now_ms)
    truncate -s 0 "$W/$name.part"; truncate -s $(( ${#NETEM_PHASES[@]} * NETEM_REGION_MIB ))M "$W/$name.part"
    dd if="$W/$name.img" of="$W/$name.part" bs=1M skip=$((k * NETEM_REGION_MIB)) seek=$((k * NETEM_REGION_MIB)) count=$NETEM_REGION_MIB conv=notrunc status=none
    netem_set "$spec" || { fail $name "tc qdisc add ... netem $spec failed"; kill -9 $spid $rpid; return 1; }
    out=$(timeout 120 nbdcopy --destination-is-zero --flush "$W/$name.part" "nbd+unix:///?socket=$ssock" 2>&1); rc=$?
    read -r a b <<<"$(netem_counts)"
    echo "NETEM $pname: $spec; $a packets through netem, $b dropped"
    timed $name-$pname "$tp"
    if [ $rc != 0 ]; then fail $name "nbdcopy during $pname failed (rc $rc): $(tail -c 200 <<<"$out" | tr '\n' ' ')"; kill -9 $spid $rpid; return 1; fi
    if [ "$a" -le 0 ] || { [[ $spec == *loss* ]] && [ "$b" -le 0 ]; }; then fail $name "netem did not act during $pname ($a packets, $b dropped)"; kill -9 $spid $rpid; return 1; fi
    k=$((k + 1))
  done
  netem_set ""

  # Converged: the source's CP holds every write (NVRAM empty) and the receiver committed it.
  local tc; tc=$(now_ms)
  local until=$(( $(now_ms) + NETEM_CONVERGE_S * 1000 ))
  while [ "$(now_ms)" -lt $until ]; do
    st=$(timeout 60 "${NV[@]}" status "$src" --json 2>/dev/null | jq -r 'if .sections.mirror.state == "in-sync" and .sections.mirror.rootsEqual and .sections.mirror.rootMismatches == 0 and .sections.mirror.destCp == .cpNumber and .nvram.usedBytes == 0 then .cpNumber else "no \(.sections.mirror.state) cp \(.cpNumber) dest \(.sections.mirror.destCp) nvram \(.nvram.usedBytes)" end')
    [[ $st =~ ^[0-9]+$ ]] && break
    kill -0 $spid 2>/dev/null && kill -0 $rpid 2>/dev/null || break; sleep 1
  done
  [[ $st =~ ^[0-9]+$ ]] || { fail $name "did not converge: $st; $(tail -c 300 "$W/$name.sv.log" | tr '\n' ' ')"; kill -9 $spid $rpid; return 1; }
  cp=$st
  st=$(timeout 60 "${NV[@]}" status "$dst" --json 2>/dev/null | jq -r --arg u "$uuid" '.mirrors[] | select(.sourceUuid == $u) | "\(.committedCp) \(.connected)"')
  [ "$st" = "$cp true" ] || { fail $name "the receiver's status: committed CP and connected '$st', the source is at CP $cp"; kill -9 $spid $rpid; return 1; }
  want=$({ cat "$W/$name.img"; head -c $(( NETEM_SIZE_MIB - ${#NETEM_PHASES[@]} * NETEM_REGION_MIB ))M /dev/zero; } | md5sum | cut -d' ' -f1)
  a=$(timeout 120 nbdcopy "nbd+unix:///?socket=$ssock" - | md5sum | cut -d' ' -f1)
  b=$(timeout 120 nbdcopy "nbd+unix:///$uuid?socket=$xsock" - | md5sum | cut -d' ' -f1)
  timed $name-converge "$tc"
  if [ "$a" != "$want" ] || [ "$b" != "$want" ]; then fail $name "exports differ at CP $cp: source $a, mirror $b, written $want"; kill -9 $spid $rpid; return 1; fi
  # Nobody crashed: both still run, and both exit 0 on SIGTERM.
  kill -0 $spid 2>/dev/null && kill -0 $rpid 2>/dev/null || { fail $name "a process died: $(tail -c 300 "$W/$name.sv.log" "$W/$name.rx.log" | tr '\n' ' ')"; kill -9 $spid $rpid 2>/dev/null; return 1; }
  kill -TERM $spid; timeout 60 tail --pid=$spid -f /dev/null
  kill -TERM $rpid; timeout 60 tail --pid=$rpid -f /dev/null
  kill -9 $spid $rpid 2>/dev/null  # still there after 60 s: the exit codes below say so
  wait $spid; a=$?; wait $rpid; b=$?
  [ $a = 0 ] && [ $b = 0 ] || { fail $name "exit codes after SIGTERM: serve $a, receive $b"; return 1; }
  timed $name "$t"
  pass $name
}

{ lane_a; timed lane-a "$T0"; } & LA=$!
{ lane_b; timed lane-b "$T0"; } & LB=$!
wait $LA $LB

# --- no nbd driver: a clear message (last: it unloads the driver) -----------------------
if rmmod nbd 2>"$W/rmmod.err"; then
  echo /nonexistent > /proc/sys/kernel/modprobe  # no autoload of the module
  expect_out error-no-driver 1 'no nbd driver in this kernel: run `modprobe nbd`' "${NV[@]}" attach --memory 16M /dev/nbd0
else fail error-no-driver "rmmod nbd failed: $(cat "$W/rmmod.err")"; fi

timed suite "$T0"
echo "SUITE-DONE"
