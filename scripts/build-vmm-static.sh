#!/usr/bin/env bash
# Builds the VMM and its control client as static executables (they run
# inside the L1 initramfs, which has no C library). Output:
# target/x86_64-unknown-linux-gnu/release/{vmm,vmm-ctl} (under $CARGO_TARGET_DIR
# when that is set, where the harness then looks for them too)
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p vmm --bin vmm --bin vmm-ctl --target x86_64-unknown-linux-gnu "$@"
out=$(realpath -m "${CARGO_TARGET_DIR:-target}")/x86_64-unknown-linux-gnu/release
echo "static VMM: $out/vmm"
echo "static vmm-ctl: $out/vmm-ctl"
