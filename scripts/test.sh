#!/usr/bin/env bash
# Runs every test: host packages, the static VMM, the guest kernel,
# busybox and the Debian root disk (fetched here so their progress shows),
# then the whole workspace: unit tests and the nested end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-vmm-static.sh
cargo run -q -p guest-image -- kernel
cargo run -q -p guest-image -- busybox
# The Debian root disk for tests/rootfs.rs (debootstrap on the first run).
cargo run -q -p guest-image -- rootfs
cargo test --workspace "$@"
