#!/usr/bin/env bash
# Builds the VMM as a static executable (it runs inside the L1 initramfs,
# which has no C library). Output: target/x86_64-unknown-linux-gnu/release/vmm
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p vmm --target x86_64-unknown-linux-gnu "$@"
echo "static VMM: $(pwd)/target/x86_64-unknown-linux-gnu/release/vmm"
