#!/usr/bin/env bash
# Builds a tiny Linux guest whose kernel has the real nbd driver (Debian's linux-image),
# for running tests against /dev/nbdX on machines whose own kernel lacks it.
# Output (cached): $KVM_DIR/<stamp>/vmlinuz and initrd.gz; prints that directory.
# Needs root the first time (apt-get). The cache is keyed on this script and guest-init
# (the stamp), so editing either builds a new directory beside the old ones: checkouts
# of different versions on one machine each keep theirs, and a guest never boots a
# kernel or initramfs built for another version. At most KEEP_BUILDS_MAX stamps are
# kept (the oldest go); concurrent builds are serialised with a lock.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KVM_DIR=${KVM_DIR:-/var/cache/nvmirror-kernel-vm}
KEEP_BUILDS_MAX=4
stamp=$(cat "$here/build.sh" "$here/guest-init" | sha256sum | cut -c1-16)
OUT=$KVM_DIR/$stamp
fresh() { [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ]; }
fresh && { echo "$OUT"; exit 0; }
mkdir -p "$KVM_DIR"
exec 9>"$KVM_DIR/.lock"
flock 9
fresh && { echo "$OUT"; exit 0; }
rm -rf "$KVM_DIR/build.$stamp"; mkdir "$KVM_DIR/build.$stamp"
cd "$KVM_DIR/build.$stamp"

# Host tools: qemu to boot, busybox/kmod/cpio to build the initramfs; the guest runs the
# host's own binaries (through 9p), so the test tools are installed here too.
need=(qemu-system-x86 busybox-static kmod cpio nbd-client e2fsprogs xfsprogs util-linux)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kernel-vm: installing ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's current kernel package (the meta package linux-image-amd64 names it).
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1; }
pkg=$(kpkg)
[ -n "$pkg" ] || { apt-get update -qq >/dev/null; pkg=$(kpkg); }
[ -n "$pkg" ] || { echo "kernel-vm: cannot find Debian's kernel package (apt-cache depends linux-image-amd64)" >&2; exit 1; }
rm -rf x && mkdir x
dl=$(mktemp -d)
(cd "$dl" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "kernel-vm: apt-get download $pkg failed" >&2; exit 1; }
dpkg-deb -x "$dl"/*.deb x
rm -rf "$dl"
KV=$(ls x/lib/modules | head -1)
depmod -b x "$KV"

# The initramfs: busybox, the modules below with their dependencies, and guest-init.
R=$(mktemp -d)
mkdir -p "$R"/{bin,sbin,dev,proc,sys,mnt,tmp,etc,lib/modules/$KV}
cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
# veth and sch_netem: two network namespaces joined by a veth pair with netem on it
# (test/kernel/guest-suite.sh's mirror check; this machine's own kernel has no netem).
mods="crypto/crc32c_generic drivers/block/nbd drivers/net/virtio_net drivers/virtio/virtio_pci fs/ext4/ext4 fs/9p/9p net/9p/9pnet_virtio fs/overlayfs/overlay fs/xfs/xfs drivers/net/veth net/sched/sch_netem"
for m in $mods; do
  deps=$(grep "^kernel/$m.ko[.a-z]*:" "x/lib/modules/$KV/modules.dep" | tr -d ':') || true
  [ -n "$deps" ] || { echo "kernel-vm: module $m not found in $pkg" >&2; exit 1; }
  for f in $deps; do
    mkdir -p "$R/lib/modules/$KV/$(dirname "$f")"; cp "x/lib/modules/$KV/$f" "$R/lib/modules/$KV/$f"
  done
done
cp x/lib/modules/$KV/modules.{dep,alias,symbols,builtin,order} "$R/lib/modules/$KV/"
cp "$here/guest-init" "$R/init"
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
cp x/boot/vmlinuz-* vmlinuz
rm -rf "$R" x
cd "$KVM_DIR"
mv "build.$stamp" "$stamp"
# Keep the newest KEEP_BUILDS_MAX stamps (directories named by 16 hex digits).
ls -1dt "$KVM_DIR"/[0-9a-f]*/ 2>/dev/null | grep -E '/[0-9a-f]{16}/$' | tail -n +$((KEEP_BUILDS_MAX + 1)) | xargs -r rm -rf
echo "$OUT"
