#!/usr/bin/env bash
# Usage: run.sh [--mem MB] [--timeout S] -- COMMAND...
# Runs COMMAND as root inside a Linux guest that has the real nbd kernel driver (/dev/nbd0..15),
# in the current directory, seeing this machine's whole filesystem read-only with a
# throw-away writable overlay (nothing it writes comes back; print what you need).
# The guest reaches this machine's 127.0.0.1:PORT at 10.0.2.2:PORT.
# Exits with COMMAND's exit status (124: timed out, 125: the guest died without a status).
# Software emulation (KERNEL_VM_KVM=1 to use KVM): expect ~10 s to boot.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mem=1536; timeout=600
while [ $# -gt 0 ]; do case "$1" in --mem) mem=$2; shift 2;; --timeout) timeout=$2; shift 2;; --) shift; break;; *) break;; esac; done
[ $# -gt 0 ] || { echo "usage: run.sh [--mem MB] [--timeout S] -- COMMAND..." >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || [ "$(id -u)" = 0 ] || { echo "kernel-vm: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2; exit 127; }
dir=$("$here/build.sh" | tail -1)
cmd=$(printf '%q ' "$@" | base64 -w0); cwd=$(pwd | base64 -w0)
# KVM only when asked (KERNEL_VM_KVM=1): /dev/kvm may exist yet not work (nested
# virtualisation here aborts qemu on an MSR write), so software emulation is the default.
accel=()
if [ "${KERNEL_VM_KVM:-0}" = 1 ]; then accel=(-enable-kvm -cpu host); fi
log=$(mktemp)
set +e
timeout --kill-after=5 "$timeout" qemu-system-x86_64 -nographic -no-reboot -m "$mem" -smp 2 "${accel[@]}" \
  -kernel "$dir/vmlinuz" -initrd "$dir/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 vmcmd=$cmd vmdir=$cwd" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap 2>&1 </dev/null | tee "$log" | sed -u -e 's/\x1bc//g' -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\r$//' | grep -av --line-buffered -e '^SeaBIOS' -e '^$' -e 'reboot: Power down' -e '^iPXE' -e '^Press Ctrl-B' -e '^Booting from ROM' -e 'KERNEL-VM-EXIT'
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] || [ "$rc" = 137 ] && { rm -f "$log"; echo "kernel-vm: timed out after ${timeout}s" >&2; exit 124; }
code=$(sed -n 's/.*KERNEL-VM-EXIT \([0-9]*\).*/\1/p' "$log" | tail -1)
rm -f "$log"
[ -n "$code" ] || { echo "kernel-vm: guest ended without reporting an exit status (qemu exit $rc)" >&2; exit 125; }
exit "$code"
