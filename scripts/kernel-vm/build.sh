#!/usr/bin/env bash
# Builds a tiny Linux guest whose kernel has the real nbd driver (Debian's linux-image),
# for running tests against /dev/nbdX on machines whose own kernel lacks it.
# Output (cached): $KVM_DIR/vmlinuz and $KVM_DIR/initrd.gz; prints $KVM_DIR.
# Needs root the first time (apt-get). The cache is keyed on this script and guest-init,
# so editing either rebuilds; concurrent builds are serialised with a lock.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KVM_DIR=${KVM_DIR:-/var/cache/nvmirror-kernel-vm}
stamp=$(cat "$here/build.sh" "$here/guest-init" | sha256sum | cut -c1-16)
fresh() { [ -s "$KVM_DIR/vmlinuz" ] && [ -s "$KVM_DIR/initrd.gz" ] && [ "$(cat "$KVM_DIR/stamp" 2>/dev/null)" = "$stamp" ]; }
fresh && { echo "$KVM_DIR"; exit 0; }
mkdir -p "$KVM_DIR"
exec 9>"$KVM_DIR/.lock"
flock 9
fresh && { echo "$KVM_DIR"; exit 0; }
cd "$KVM_DIR"

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
mods="crypto/crc32c_generic drivers/block/nbd drivers/net/virtio_net drivers/virtio/virtio_pci fs/ext4/ext4 fs/9p/9p net/9p/9pnet_virtio fs/overlayfs/overlay fs/xfs/xfs"
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
(cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz.new
cp x/boot/vmlinuz-* vmlinuz.new
mv initrd.gz.new initrd.gz; mv vmlinuz.new vmlinuz
echo "$stamp" > stamp
rm -rf "$R" x
echo "$KVM_DIR"
