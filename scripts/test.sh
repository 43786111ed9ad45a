#!/usr/bin/env bash
# Runs every test: host packages, the static VMM, the guest kernel and
# busybox (fetched here so their download progress shows), then the whole
# workspace: unit tests and the nested end-to-end boot tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-vmm-static.sh
cargo run -q -p guest-image -- kernel
cargo run -q -p guest-image -- busybox
cargo test --workspace "$@"
