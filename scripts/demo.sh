#!/usr/bin/env bash
# Main job: build what is needed and boot a Debian guest with our VMM,
# showing its console: inside an L1 QEMU guest (nested harness) on hosts
# without an ordinary KVM, directly on hosts with one.
# Options go to nested-run, e.g.: scripts/demo.sh --cpus 1 --memory 256
# A real Debian (systemd) booted from a virtio-blk root disk, up to its
# serial login prompt: scripts/demo.sh --rootfs  (add --stay to stay there).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-vmm-static.sh
cargo build -q -p integration --bin nested-run
exec target/debug/nested-run "$@"
