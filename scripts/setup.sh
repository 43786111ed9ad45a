#!/usr/bin/env bash
# Installs the host packages the project needs (idempotent): QEMU for the nested
# harness, kmod for depmod, libclang for bindgen-based crates, fio for the
# disk benchmarks, sg3-utils for the USB port-reset test, debootstrap and
# e2fsprogs for the Debian root disk.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v depmod >/dev/null 2>&1 || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || need+=(kmod)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
# fio is copied (with its libraries) into the guest for the disk benchmark.
command -v fio >/dev/null 2>&1 || need+=(fio)
# sg_reset: the nested USB port-reset test copies it into the guest.
command -v sg_reset >/dev/null 2>&1 || need+=(sg3-utils)
# The Debian root disk: debootstrap builds the tree, mkfs.ext4 -d the image,
# e2fsck checks it (on the host and, copied, in the guest's initramfs).
for tool in debootstrap:debootstrap mkfs.ext4:e2fsprogs e2fsck:e2fsprogs; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] ||
        [ -x "/sbin/${tool%%:*}" ] || need+=("${tool#*:}")
done

if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
else
    echo "setup: host packages present"
fi
