#!/usr/bin/env bash
# Installs, with apt-get, the tools the end-to-end and kernel tests drive (real NBD
# clients, peer servers, filesystems, TLS tooling) when any is missing.
#
# Invariants:
# - idempotent: when every tool is present it prints nothing and exits 0 without
#   touching apt;
# - it installs only the packages whose tool is missing, runs `apt-get update` at most
#   once, and exits non-zero (with one line saying which) if a tool is still missing.
set -euo pipefail

# tool (command name or special check: py:MODULE, h:HEADER under /usr/include) -> Debian package that provides it
declare -a CHECKS=(
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdfuse:libnbd-bin"
  "nbdkit:nbdkit"
  "qemu-io:qemu-utils"
  "qemu-img:qemu-utils"
  "qemu-nbd:qemu-utils"
  "fio:fio"
  "nbd-client:nbd-client"
  "py:nbd:python3-libnbd"
  "nbdsh:python3-libnbd"
  "qemu-system-x86_64:qemu-system-x86"
  "busybox:busybox-static"
  "modprobe:kmod"
  "cpio:cpio"
  "mkfs.xfs:xfsprogs"
  "xfs_repair:xfsprogs"
  "mkfs.ext4:e2fsprogs"
  "e2fsck:e2fsprogs"
  "losetup:mount"
  "fusermount3:fuse3"
  "ip:iproute2"
  "tc:iproute2"
  "jq:jq"
  "nft:nftables"
  "openssl:openssl"
  "certtool:gnutls-bin"
  "truncate:coreutils"
  "sha256sum:coreutils"
  "systemd-socket-activate:systemd"
  "h:isa-l/raid.h:libisal-dev"
)

# PATH as root's, so /sbin tools (losetup, mkfs.*) are found when run as a user.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

have() {
  local tool="$1"
  if [[ "$tool" == py:* ]]; then
    /usr/bin/python3 -c "import ${tool#py:}" >/dev/null 2>&1
  elif [[ "$tool" == h:* ]]; then
    [[ -f "/usr/include/${tool#h:}" ]]
  else
    command -v "$tool" >/dev/null 2>&1
  fi
}

missing_pkgs() {
  local entry tool pkg
  local -A seen=()
  for entry in "${CHECKS[@]}"; do
    pkg="${entry##*:}"
    tool="${entry%:*}"
    if ! have "$tool" && [[ -z "${seen[$pkg]:-}" ]]; then
      seen[$pkg]=1
      printf '%s\n' "$pkg"
    fi
  done
}

mapfile -t PKGS < <(missing_pkgs)
if [[ ${#PKGS[@]} -eq 0 ]]; then
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "install-test-deps: missing packages (${PKGS[*]}) and not root; install them with apt-get" >&2
    exit 1
  fi
fi

echo "install-test-deps: installing ${PKGS[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
# Another apt run (a colleague's install) may hold the lock: wait for it, with a limit.
apt_opts=(-o DPkg::Lock::Timeout=600 -q -y --no-install-recommends)
if ! "${SUDO[@]}" apt-get "${apt_opts[@]}" install "${PKGS[@]}" >"$apt_log" 2>&1; then
  if ! { "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 -q update &&
         "${SUDO[@]}" apt-get "${apt_opts[@]}" install "${PKGS[@]}"; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    echo "install-test-deps: apt-get install ${PKGS[*]} failed" >&2
    exit 1
  fi
fi

mapfile -t STILL < <(missing_pkgs)
if [[ ${#STILL[@]} -ne 0 ]]; then
  echo "install-test-deps: still missing after install: ${STILL[*]}" >&2
  exit 1
fi
