#!/usr/bin/env bash
# Builds the VMM and its control client as static executables (they run
# inside the L1 initramfs, which has no C library). Output:
# target/x86_64-unknown-linux-gnu/release/{vmm,vmm-ctl}
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p vmm --bin vmm --bin vmm-ctl --target x86_64-unknown-linux-gnu "$@"
echo "static VMM: $(pwd)/target/x86_64-unknown-linux-gnu/release/vmm"
echo "static vmm-ctl: $(pwd)/target/x86_64-unknown-linux-gnu/release/vmm-ctl"
