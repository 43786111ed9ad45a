#!/usr/bin/env bash
# Installs the host packages the project needs (idempotent): QEMU for the nested
# harness (on Debian bookworm the bookworm-backports one, see HARNESS.md),
# kmod for depmod, libclang for bindgen-based crates, fio for the disk
# benchmarks, sg3-utils for the USB port-reset test, debootstrap and
# e2fsprogs for the Debian root disk.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# L1's QEMU (and the benchmarks' peer inside L1): on bookworm, the
# bookworm-backports build. Bookworm's own QEMU 7.2 wedges the TCG L1 (its
# timer interrupt is never taken); see HARNESS.md for the measurement.
. /etc/os-release 2>/dev/null || true
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    bpo=bookworm-backports
    if ! grep -rqs -- "$bpo" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "setup: adding $bpo to the apt sources (for qemu-system-x86)"
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: $bpo" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
            $SUDO tee /etc/apt/sources.list.d/backports.sources >/dev/null
    fi
    installed=$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null || true)
    case "$installed" in
    "install ok installed "*bpo12*) ;;
    *)
        echo "setup: installing qemu-system-x86 from $bpo (installed: ${installed:-none})"
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends -t "$bpo" qemu-system-x86
        ;;
    esac
fi

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
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
else
    echo "setup: host packages present"
fi
